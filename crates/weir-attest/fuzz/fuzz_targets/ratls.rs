//! The RA-TLS parsers: the attestation extension (V0 and V1), TDX quotes,
//! and whole certificates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_attest::{RaTls, decode_attestation, parse_quote, replay_rtmr3};

fuzz_target!(|data: &[u8]| {
    if let Ok(attestation) = decode_attestation(data) {
        let _ = parse_quote(&attestation.quote);
        let _ = replay_rtmr3(&attestation.events);
    }
    let _ = parse_quote(data);
    let _ = RaTls::from_certificate(data);
});
