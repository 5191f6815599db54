//! weir: a TLS gateway whose routing and policy decisions are made by
//! WebAssembly plugins behind one WIT contract (`wit/weir.wit`).
//!
//! The host owns sockets, sniffing, TLS and relaying; plugins only decide. A
//! connection flows through [`gateway`]: its first bytes are parsed by
//! [`sniff`] (after [`postgres`]'s SSLRequest on PostgreSQL listeners), the
//! listener's plugin chain in the current [`snapshot`] decides (plugins run in
//! [`plugin`]), the decision is validated ([`decision`]), and the bytes are
//! [`relay`]ed untouched, or TLS is terminated (and re-encrypted) with the
//! certificates and trust anchors of [`tls`] (OCSP responses checked by
//! [`ocsp`]; certificates ordered and renewed by [`acme`]).
//!
//! Unsafe code is denied crate-wide; the only exception is the module that
//! wasmtime's `bindgen!` generates for the WIT contract.
#![deny(unsafe_code)]

pub mod acme;
pub mod addr;
pub mod admin;
pub mod config;
mod conn;
pub mod gateway;
pub mod heap;
pub mod logfmt;
pub mod metrics;
pub mod own;
pub mod plugin;
pub mod pool;
pub mod relay;
pub mod rewind;
pub mod scaffold;
pub mod snapshot;
pub mod source;
mod sync;

#[cfg(test)]
mod layout_tests;
pub mod throttle;
pub mod tls;
pub mod watch;
pub mod wit;

pub use config::Config;
pub use gateway::Gateway;
pub use snapshot::Snapshot;
