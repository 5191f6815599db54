//! The config loader: any text is a config or a located error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = weir_config::Config::parse(text, std::path::Path::new("/fuzz/weir.toml"));
    }
});
