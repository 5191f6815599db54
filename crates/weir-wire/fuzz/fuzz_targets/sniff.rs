//! The ClientHello sniffer: any bytes, never a panic; a hello it accepts
//! carries a server name that is already canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_wire::sniff::{Sniffed, parse_client_hello};
use weir_plugin_sdk::names::canonicalize;

fuzz_target!(|data: &[u8]| {
    if let Ok(Sniffed::Hello(hello)) = parse_client_hello(data)
        && let Some(sni) = hello.sni
    {
        assert_eq!(canonicalize(sni.as_bytes()).as_deref(), Ok(sni.as_str()));
    }
});
