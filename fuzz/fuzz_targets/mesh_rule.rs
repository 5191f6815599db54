//! mesh-router's Traefik rule parser, and evaluation of what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_router::rule::{Facts, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(rule) = parse(text)
    {
        let alpn = ["h2".to_owned()];
        let facts = Facts {
            sni: Some("a.example.com"),
            client_ip: "10.0.0.1".parse().ok(),
            alpn: &alpn,
        };
        let _ = rule.matches(&facts);
    }
});
