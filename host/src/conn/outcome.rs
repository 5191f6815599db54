//! How a connection ended: the outcome (its label, its sniff-failure cause,
//! its words), and the record logged and counted once per connection.

use crate::conn::terminate::handshake_error;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::pool::BackendGuard;
use crate::relay::{RelayEnd, Transfer};
use crate::snapshot::{ClientSlot, TenantSlot};
use weir_wire::postgres::PostgresError;
use weir_wire::sniff::SniffError;

/// How a connection ended, for the log line.
pub(crate) enum Outcome {
    Relayed(RelayEnd),
    SniffTimeout,
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

    /// For a connection refused before routing, why.
    pub(crate) fn sniff_failure(&self) -> Option<&'static str> {
        match self {
            Outcome::SniffTimeout => Some("timeout"),
            Outcome::ClientGone => Some("client-closed"),
            Outcome::BadHello(_) => Some("bad-hello"),
            Outcome::BadStartup(_) => Some("bad-startup"),
            Outcome::BadProxyHeader(_) => Some("bad-proxy-header"),
            _ => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Relayed(RelayEnd::Closed) => f.write_str("closed"),
            Outcome::Relayed(RelayEnd::Idle) => f.write_str("idle-timeout"),
            Outcome::Relayed(RelayEnd::HalfCloseTimeout) => f.write_str("half-close-timeout"),
            Outcome::SniffTimeout => f.write_str("sniff-timeout: no complete ClientHello before the deadline"),
            Outcome::ClientGone => f.write_str("client-closed: before its first bytes were complete"),
            Outcome::BadProxyHeader(reason) => write!(f, "bad-proxy-header: {reason}"),
            Outcome::ClientLimit { client, prefix, held } => {
                let full = if client.is_ipv4() { 32 } else { 128 };
                let network = if *prefix < full {
                    format!("/{prefix}")
                } else {
                    String::new()
                };
                write!(
                    f,
                    "client-limit: {client}{network} already has {held} connections here (max_connections_per_client)"
                )
            }
            Outcome::BadHello(e) => write!(f, "bad-hello: {e}"),
            Outcome::BadStartup(e) => write!(f, "bad-startup: {e}"),
            // Plugin-supplied text: escaped so it cannot forge log lines.
            Outcome::Rejected(reason) => write!(f, "rejected: {reason:?}"),
            Outcome::AcmeChallenge => f.write_str("acme-challenge: a TLS-ALPN-01 validation, answered"),
            Outcome::HandshakeTimeout => f.write_str("handshake-timeout: the client's TLS handshake took too long"),
            Outcome::HandshakeFailed(e) => write!(f, "handshake-failed: {}", handshake_error(e)),
            Outcome::Denied(reason) => write!(f, "denied: {reason:?}"),
            Outcome::ConnectFailed(reason) => write!(f, "connect-failed: {reason}"),
            Outcome::Io(e) => write!(f, "io-error: {e}"),
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
    /// Its place in the listener's `max_connections_per_client`, likewise.
    pub(crate) client_slot: Option<ClientSlot>,
    pub(crate) transfer: Transfer,
}

/// Why reading the first bytes (PROXY header, hello) ended without them.
pub(crate) enum SniffFailure {
    /// The client closed before they were complete.
    Gone,
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
            SniffFailure::Bad(e) => Outcome::BadHello(e),
            SniffFailure::Postgres(e) => Outcome::BadStartup(e),
            SniffFailure::BadProxy(reason) => Outcome::BadProxyHeader(reason),
            SniffFailure::Io(e) => Outcome::Io(e),
        }
    }
}
