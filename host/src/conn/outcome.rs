//! How a connection ended: the outcome (its label, its sniff-failure cause,
//! its words), and the record logged and counted once per connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use weir_wire::postgres::PostgresError;
use weir_wire::sniff::SniffError;

use crate::conn::terminate::handshake_error;
use crate::pool::BackendGuard;
use crate::relay::{RelayEnd, Transfer};
use crate::snapshot::{ClientSlot, TenantSlot};

/// How a connection ended, for the log line.
pub(crate) enum Outcome {
    Relayed(RelayEnd),
    SniffTimeout,
    /// Shed while its hello was incomplete: the bytes parked before routing
    /// were past `limits.max_parked_bytes`, and it was the oldest.
    SniffShed,
    ClientGone,
    BadHello(SniffError),
    BadStartup(PostgresError),
    BadProxyHeader(String),
    /// Closed at the listener's per-client limit.
    ClientLimit {
        client: std::net::IpAddr,
        /// The prefix that names one client.
        prefix: u8,
        held: u32,
    },
    Rejected(String),
    /// A TLS-ALPN-01 validation of weir's own ACME order, answered.
    AcmeChallenge,
    HandshakeTimeout,
    HandshakeFailed(io::Error),
    Denied(String),
    ConnectFailed(String),
    Io(io::Error),
}

impl Outcome {
    /// A short label for metrics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Outcome::Relayed(RelayEnd::Closed) => "closed",
            Outcome::Relayed(RelayEnd::Idle) => "idle-timeout",
            Outcome::Relayed(RelayEnd::HalfCloseTimeout) => "half-close-timeout",
            Outcome::SniffTimeout => "sniff-timeout",
            Outcome::SniffShed => "sniff-shed",
            Outcome::ClientGone => "client-closed",
            Outcome::BadHello(_) => "bad-hello",
            Outcome::BadStartup(_) => "bad-startup",
            Outcome::BadProxyHeader(_) => "bad-proxy-header",
            Outcome::ClientLimit { .. } => "client-limit",
            Outcome::Rejected(_) => "rejected",
            Outcome::AcmeChallenge => "acme-challenge",
            Outcome::HandshakeTimeout => "handshake-timeout",
            Outcome::HandshakeFailed(_) => "handshake-failed",
            Outcome::Denied(_) => "denied",
            Outcome::ConnectFailed(_) => "connect-failed",
            Outcome::Io(_) => "io-error",
        }
    }

    /// For a connection refused before routing, why: its label, without
    /// the `sniff-` that `weir_sniff_failures_total` does not repeat.
    pub(crate) fn sniff_failure(&self) -> Option<&'static str> {
        match self {
            Outcome::SniffTimeout
            | Outcome::SniffShed
            | Outcome::ClientGone
            | Outcome::BadHello(_)
            | Outcome::BadStartup(_)
            | Outcome::BadProxyHeader(_) => Some(self.kind().trim_start_matches("sniff-")),
            _ => None,
        }
    }
}

/// The label, then what happened in words: `bad-hello: ...`.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())?;
        match self {
            Outcome::Relayed(_) => Ok(()),
            Outcome::SniffTimeout => f.write_str(": no complete ClientHello before the deadline"),
            Outcome::SniffShed => f.write_str(
                ": its hello was incomplete when the bytes parked before routing passed limits.max_parked_bytes, and it was parked longest",
            ),
            Outcome::ClientGone => f.write_str(": before its first bytes were complete"),
            Outcome::BadProxyHeader(reason) => write!(f, ": {reason}"),
            Outcome::ClientLimit { client, prefix, held } => {
                let full = if client.is_ipv4() { 32 } else { 128 };
                let network = if *prefix < full {
                    format!("/{prefix}")
                } else {
                    String::new()
                };
                write!(
                    f,
                    ": {client}{network} already has {held} connections here (max_connections_per_client)"
                )
            }
            Outcome::BadHello(e) => write!(f, ": {e}"),
            Outcome::BadStartup(e) => write!(f, ": {e}"),
            // Plugin-supplied text: escaped so it cannot forge log lines.
            Outcome::Rejected(reason) => write!(f, ": {reason:?}"),
            Outcome::AcmeChallenge => f.write_str(": a TLS-ALPN-01 validation, answered"),
            Outcome::HandshakeTimeout => f.write_str(": the client's TLS handshake took too long"),
            Outcome::HandshakeFailed(e) => write!(f, ": {}", handshake_error(e)),
            Outcome::Denied(reason) => write!(f, ": {reason:?}"),
            Outcome::ConnectFailed(reason) => write!(f, ": {reason}"),
            Outcome::Io(e) => write!(f, ": {e}"),
        }
    }
}

/// Everything the per-connection log line reports.
pub(crate) struct Record {
    pub(crate) id: u64,
    pub(crate) started: Instant,
    pub(crate) client: SocketAddr,
    pub(crate) sni: Option<String>,
    pub(crate) tenant: Option<Arc<str>>,
    pub(crate) route: Option<String>,
    pub(crate) mode: Option<&'static str>,
    pub(crate) upstream: Option<String>,
    /// The pool server in use, counted active until the record is dropped.
    pub(crate) backend: Option<BackendGuard>,
    /// The connection's place in its tenant's `max_connections`, held
    /// until the record is dropped.
    pub(crate) tenant_slot: Option<TenantSlot>,
    /// Its upstream socket's place in its tenant's `max_descriptors`,
    /// likewise.
    pub(crate) upstream_permit: Option<crate::door::SocketPermit>,
    /// Its place in the listener's `max_connections_per_client`, likewise.
    pub(crate) client_slot: Option<ClientSlot>,
    pub(crate) transfer: Transfer,
}

/// Why reading the first bytes (PROXY header, hello) ended without them.
pub(crate) enum SniffFailure {
    /// The client closed before they were complete.
    Gone,
    /// Shed while parked ([`crate::parked`]).
    Shed,
    /// The bytes are not a hello weir accepts.
    Bad(SniffError),
    /// The bytes are not a PostgreSQL start weir accepts.
    Postgres(PostgresError),
    /// The bytes are not a PROXY header weir accepts.
    BadProxy(String),
    /// The socket failed.
    Io(io::Error),
}

impl From<SniffFailure> for Outcome {
    fn from(failure: SniffFailure) -> Outcome {
        match failure {
            SniffFailure::Gone => Outcome::ClientGone,
            SniffFailure::Shed => Outcome::SniffShed,
            SniffFailure::Bad(e) => Outcome::BadHello(e),
            SniffFailure::Postgres(e) => Outcome::BadStartup(e),
            SniffFailure::BadProxy(reason) => Outcome::BadProxyHeader(reason),
            SniffFailure::Io(e) => Outcome::Io(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_is_spelled_once() {
        let outcomes = [
            Outcome::Relayed(RelayEnd::Closed),
            Outcome::SniffTimeout,
            Outcome::ClientGone,
            Outcome::BadProxyHeader("no".into()),
            Outcome::ClientLimit {
                client: "10.0.0.1".parse().expect("ip"),
                prefix: 24,
                held: 3,
            },
            Outcome::Rejected("a\nb".into()),
            Outcome::HandshakeTimeout,
            Outcome::ConnectFailed("refused".into()),
        ];
        for outcome in &outcomes {
            let words = outcome.to_string();
            assert!(words.starts_with(outcome.kind()), "{words}");
        }
        assert_eq!(outcomes[0].to_string(), "closed");
        assert_eq!(outcomes[1].sniff_failure(), Some("timeout"));
        assert_eq!(outcomes[2].sniff_failure(), Some("client-closed"));
        assert_eq!(outcomes[3].sniff_failure(), Some("bad-proxy-header"));
        assert_eq!(outcomes[5].sniff_failure(), None);
        assert_eq!(
            outcomes[4].to_string(),
            "client-limit: 10.0.0.1/24 already has 3 connections here (max_connections_per_client)"
        );
        assert_eq!(outcomes[5].to_string(), r#"rejected: "a\nb""#);
    }
}
