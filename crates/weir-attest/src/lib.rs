//! weir-attest: what a peer's certificate proves, read and checked — the
//! Intel TDX attestation an RA-TLS certificate carries ([`RaTls`]), the OCSP
//! response stapled for a certificate ([`ocsp`]), and the x509 facts weir
//! logs and hands to plugins ([`x509`]). Pure over bytes: no sockets, no
//! async runtime, no TLS stack, no WebAssembly runtime; the host converts
//! these types to the plugin contract's.
//!
//! RA-TLS, read and checked:
//!
//! A pure parser over bytes (every malformed, truncated or oversized input is
//! an [`AttestError`], never a panic) for:
//! - the dstack attestation extension (OID `1.3.6.1.4.1.62397.1.8`): SCALE
//!   `VersionedAttestation::V0` — a TDX quote, its event log, the runtime
//!   events, `report_data` and the VM config — or the msgpack V1 form
//!   (`{version, platform: {kind: "tdx", data}, stack: {kind: "dstack", data}}`);
//! - the legacy extensions: `…1.1` raw quote, `…1.2` event log (JSON),
//!   `…1.3` app id, `…1.4` certificate usage;
//! - TDX quotes v4 and v5 (TD 1.0 and TD 1.5 report bodies).
//!
//! [`RaTls::from_certificate`] also checks the key binding — REPORTDATA must
//! be SHA-512(`"ratls-cert:"` ‖ the certificate's DER SubjectPublicKeyInfo) —
//! and replays the IMR-3 event log against RTMR3. Quote signatures and TCB
//! status are checked by [`Verifier`] (dcap-qvl, offline, with collateral from
//! files).
#![forbid(unsafe_code)]

mod app_info;
mod events;
mod extension;
pub mod ocsp;
mod quote;
mod ratls;
pub mod simulate;
mod verify;
pub mod x509;

pub use app_info::AppInfo;
pub use events::{Event, replay_rtmr3};
pub use extension::{DstackAttestation, decode_attestation};
pub use quote::{TdReport, parse_quote};
pub use ratls::{Attestation, RaTls};
pub use verify::{AttestationPolicy, Verification, Verifier};

/// The dstack attestation extension.
pub const OID_ATTESTATION: &str = "1.3.6.1.4.1.62397.1.8";
/// Legacy: the raw TDX quote.
pub const OID_TDX_QUOTE: &str = "1.3.6.1.4.1.62397.1.1";
/// Legacy: the event log, JSON.
pub const OID_EVENT_LOG: &str = "1.3.6.1.4.1.62397.1.2";
/// Legacy: the app id.
pub const OID_APP_ID: &str = "1.3.6.1.4.1.62397.1.3";
/// Legacy: what the certificate is for.
pub const OID_CERT_USAGE: &str = "1.3.6.1.4.1.62397.1.4";
/// dstack's app-info extension (msgpack `AppInfo`, see [`AppInfo`]).
pub const OID_APP_INFO: &str = "1.3.6.1.4.1.62397.1.9";

/// The event type of dstack runtime events (IMR 3).
pub const DSTACK_RUNTIME_EVENT: u32 = 0x0800_0001;
/// TDX TEE type in the quote header.
const TEE_TYPE_TDX: u32 = 0x81;
/// Largest quote accepted.
const MAX_QUOTE: usize = 64 * 1024;
/// Largest attestation extension accepted.
pub const MAX_ATTESTATION: usize = 1024 * 1024;
/// Most event-log entries (real logs hold tens).
const MAX_EVENTS: usize = 4096;
/// The tag of the RA-TLS key binding.
const BINDING_TAG: &[u8] = b"ratls-cert:";

/// Why an attestation was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The input ends inside a field.
    #[error("truncated: {what} needs {needed} bytes, {available} left")]
    Truncated {
        /// The field.
        what: &'static str,
        /// Bytes it needs.
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
    /// A field is larger than weir accepts.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A quote version other than 4 or 5.
    #[error("TDX quote version {0} is not supported (only 4 and 5)")]
    QuoteVersion(u16),
    /// A quote from another TEE.
    #[error("not a TDX quote: TEE type {0:#x}")]
    NotTdx(u32),
    /// A v5 body type other than TD 1.0 (2) or TD 1.5 (3).
    #[error("TD report body type {0} is not a TDX report (2 or 3)")]
    BodyType(u16),
    /// A v5 body size that does not fit its type.
    #[error("TD report body of {size} bytes, expected {expected}")]
    BodySize {
        /// What the quote says.
        size: u32,
        /// What the type needs.
        expected: usize,
    },
    /// An attestation version weir does not read.
    #[error("attestation version {0} is not supported (dstack V0 or the msgpack V1 form)")]
    AttestationVersion(u8),
    /// The msgpack V1 form does not decode.
    #[error("V1 attestation: {0}")]
    V1(String),
    /// The attestation is for another platform.
    #[error("the attestation carries no TDX quote (quote variant {0})")]
    QuoteVariant(u8),
    /// A SCALE compact length that is malformed.
    #[error("malformed SCALE length in {0}")]
    Compact(&'static str),
    /// A text field that is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// Bytes left over after the attestation.
    #[error("{0} bytes after the end of the attestation")]
    Trailing(usize),
    /// An event-log digest of the wrong size.
    #[error("event {index} has a {len}-byte digest, not 48")]
    Digest {
        /// Position in the log.
        index: usize,
        /// Its size.
        len: usize,
    },
    /// The legacy event log is not the expected JSON.
    #[error("event log JSON: {0}")]
    EventLog(String),
    /// The app-info extension is malformed, or contradicts the event log.
    #[error("app info (1.3.6.1.4.1.62397.1.9): {0}")]
    AppInfo(String),
    /// The legacy app-id extension contradicts the event log.
    #[error("app id (1.3.6.1.4.1.62397.1.3): {0}")]
    AppId(String),
    /// The certificate does not parse.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The certificate has no attestation extension.
    #[error("the certificate carries no RA-TLS attestation")]
    Missing,
    /// REPORTDATA does not bind the certificate's key.
    #[error("key binding: REPORTDATA is not SHA-512(\"ratls-cert:\" || this certificate's public key)")]
    Binding,
}

/// Refuses `len` (of `what`) when it is over `max`.
fn within(what: &'static str, len: usize, max: usize) -> Result<(), AttestError> {
    match len > max {
        true => Err(AttestError::TooLarge { what, len, max }),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests;
