//! The shared test vectors: `shared/testdata` beside the checkout, or the
//! directory `WEIR_TESTDATA` names. Used by tests and benchmarks only.
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// The test-data directory.
pub fn dir() -> PathBuf {
    match std::env::var_os("WEIR_TESTDATA") {
        Some(dir) => PathBuf::from(dir),
        // crates/weir-testdata -> the checkout -> the directory beside it.
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata"),
    }
}

/// Reads a test vector; a missing one fails the test with its path.
pub fn read(relative: &str) -> Vec<u8> {
    let path = dir().join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("test vector {}: {e}", path.display()))
}
