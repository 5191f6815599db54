//! PostgreSQL first-message detection and the upstream answer check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_wire::postgres::{First, check_answer, classify};

fuzz_target!(|data: &[u8]| {
    if let Ok(First::SslRequest { trailing } | First::GssEncRequest { trailing }) = classify(data) {
        assert_eq!(trailing, data.len() - 8);
    }
    let _ = check_answer(data);
});
