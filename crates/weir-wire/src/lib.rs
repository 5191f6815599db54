//! weir's wire parsers: what a connection's first bytes say, read without
//! consuming or decrypting anything.
//!
//! - [`sniff`]: the TLS ClientHello (server name, ALPN, versions), across
//!   records and partial reads;
//! - [`postgres`]: PostgreSQL's first message (SSLRequest, GSSENCRequest,
//!   direct TLS) and the upstream's one-byte answer;
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers, read from trusted load
//!   balancers and written to upstreams.
//!
//! Every parser is pure — bytes in, a value or "need more" or an error out —
//! with documented limits, no I/O, no async runtime, no TLS library and no
//! WebAssembly runtime, so each is fuzzed on its own (`fuzz/` in this crate).
#![forbid(unsafe_code)]

pub mod postgres;
pub mod proxy_protocol;
pub mod sniff;
