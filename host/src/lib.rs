//! weir: a TLS gateway whose routing and policy decisions are made by
//! WebAssembly plugins behind one WIT contract (`wit/weir.wit`).
//!
//! The host owns sockets, sniffing, TLS and relaying; plugins only decide. A
//! connection is served by `conn`, a module per stage: accepted (and shed at
//! the limits), its first bytes read (PROXY header, PostgreSQL's SSLRequest,
//! the ClientHello — parsed by the `weir-wire` crate), the listener's or
//! tenant's plugin chain in the current [`snapshot`] asked ([`plugin::chain`],
//! plugins run by [`plugin`], decisions validated by [`plugin::decision`]),
//! then the upstream dialled through the one [`door`] every outbound
//! connection passes (held to the scope of whoever it is for), and the
//! bytes [`relay`]ed untouched, or TLS terminated (and re-encrypted)
//! with the certificates and trust anchors of [`tls`] (attestations and OCSP
//! responses checked by the `weir-attest` crate; certificates ordered by
//! [`acme`]). [`gateway`] starts all this and changes it only through its one
//! rebuild-and-swap, fed by a [`source`] of configuration and [`watch`].
//!
//! Unsafe code is denied crate-wide; the exceptions are the module that
//! wasmtime's `bindgen!` generates for the WIT contract ([`wit`]), glibc's
//! `malloc_trim` ([`heap`]) and loading compiled plugin code from the cache
//! ([`plugin::cache`]), each with what it trusts.
#![deny(unsafe_code)]

pub mod acme;
pub use weir_config::addr;
pub mod admin;
pub mod clock;
pub use weir_config as config;
mod conn;
mod descriptors;
pub mod door;
pub mod dryrun;
pub mod fleet;
pub mod gateway;
pub mod heap;
pub mod logfmt;
pub mod metrics;
pub mod own;
mod parked;
pub mod plugin;
pub mod pool;
use weir_config::private;
pub mod relay;
pub mod rewind;
pub mod scaffold;
pub mod snapshot;
pub mod source;
mod sync;
pub mod throttle;
pub mod tls;
pub mod watch;
pub mod wit;

#[cfg(test)]
mod layout_tests;

pub use config::Config;
pub use gateway::Gateway;
pub use snapshot::Snapshot;
