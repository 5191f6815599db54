//! The front of a connection: the PROXY header from trusted load balancers,
//! PostgreSQL's SSLRequest, the ClientHello — read under the listener's
//! deadline without consuming anything a passthrough must replay — and the
//! alerts and closes sent to clients that are refused there.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_wire::postgres::{self, First, PostgresError};
use weir_wire::proxy_protocol;
use weir_wire::sniff::{self, ClientHello, SniffError, Sniffed};

use crate::config::{ListenerConfig, ListenerProtocol};
use crate::conn::outcome::{Outcome, Record, SniffFailure};
use crate::conn::terminate::close_tls;
use crate::parked::Parked;
use crate::rewind::Rewind;
use crate::snapshot::Listener;
use crate::wit;

/// What the client sent before routing, and how.
pub(crate) struct Front {
    pub(crate) client: TcpStream,
    pub(crate) local_addr: SocketAddr,
    /// Every byte read that the upstream (or rustls) has yet to see.
    pub(crate) sniffed: Vec<u8>,
    pub(crate) protocol: wit::Protocol,
    pub(crate) hello: ClientHello,
}

impl Front {
    /// Whether the client is speaking TLS, so refusals can be TLS alerts.
    pub(crate) fn speaks_tls(&self) -> bool {
        self.protocol != wit::Protocol::Plain
    }

    /// The client's socket alone: the hello and the replay buffer are not
    /// needed during the relay.
    pub(crate) fn into_client(self) -> TcpStream {
        self.client
    }

    /// Tells a client that is about to be closed why, in its own protocol:
    /// a TLS alert, or a PostgreSQL ErrorResponse to a client without TLS.
    pub(crate) async fn refuse(&mut self, listener: &Listener, alert: u8, reason: &str) {
        if self.speaks_tls() {
            send_alert(&mut self.client, alert).await;
        } else if listener.config.protocol == ListenerProtocol::Postgres {
            let message = postgres::error_response(&format!("weir: {reason}"));
            let _ = tokio::time::timeout(Duration::from_millis(100), self.client.write_all(&message)).await;
        }
    }
}

/// Completes a TLS-ALPN-01 validation handshake with the challenge
/// certificate and `acme-tls/1`, then closes (RFC 8737: nothing else is
/// said on such a connection).
pub(crate) async fn answer_acme_challenge(
    front: Front,
    challenge: Arc<rustls::sign::CertifiedKey>,
    config: &ListenerConfig,
) -> Outcome {
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|builder| {
            builder
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(challenge)))
        });
    let mut server = match server {
        Ok(server) => server,
        Err(e) => return Outcome::Io(io::Error::other(e)),
    };
    server.alpn_protocols = vec![crate::acme::ACME_TLS_ALPN.as_bytes().to_vec()];
    let client = Rewind::new(front.sniffed, front.client);
    let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(client);
    match tokio::time::timeout(config.handshake_timeout, accept).await {
        Err(_) => Outcome::HandshakeTimeout,
        Ok(Err(e)) => Outcome::HandshakeFailed(e),
        Ok(Ok(mut tls)) => {
            close_tls(&mut tls).await;
            Outcome::AcmeChallenge
        }
    }
}

/// Reads the PROXY header (from trusted sources) and the client's first
/// bytes, all under the listener's sniff deadline. `client` comes with its
/// local address when its listener is bound to one (`None`: it is asked).
pub(crate) async fn read_front(
    (mut client, bound): (TcpStream, Option<SocketAddr>),
    listener: &Listener,
    record: &mut Record,
) -> Result<Front, Outcome> {
    let config = &listener.config;
    let mut local_addr = match bound.map_or_else(|| client.local_addr(), Ok) {
        Ok(addr) => addr,
        Err(e) => return Err(Outcome::Io(e)),
    };
    // One deadline for everything before routing: PROXY header and hello.
    let deadline = tokio::time::Instant::now() + config.sniff_timeout;
    let peer = record.client.ip().to_canonical();
    let trusted = config.accept_proxy_protocol_from.iter().any(|net| net.contains(&peer));
    let mut preread = Vec::new();
    if trusted {
        let (received, rest) = match tokio::time::timeout_at(deadline, read_proxy_header(&mut client)).await {
            Err(_) => return Err(Outcome::SniffTimeout),
            Ok(Err(failure)) => return Err(failure.into()),
            Ok(Ok(header)) => header,
        };
        if let Some((source, destination)) = received.addresses {
            record.client = source;
            local_addr = destination;
        }
        preread = rest;
    }
    // Counted once the client's address is known (behind a load balancer,
    // from its PROXY header), before any of its bytes are read.
    {
        let max = config.max_connections_per_client;
        let client = crate::snapshot::client_of(record.client.ip(), config.client_prefix_v4, config.client_prefix_v6);
        let prefix = if client.is_ipv4() {
            config.client_prefix_v4
        } else {
            config.client_prefix_v6
        };
        match listener.clients.admit(client, max) {
            Ok(slot) => record.client_slot = Some(slot),
            Err(held) => {
                crate::metrics::METRICS.shed(&listener.name, "client");
                return Err(Outcome::ClientLimit { client, prefix, held });
            }
        }
    }
    let read = match config.protocol {
        ListenerProtocol::Plain => Ok((preread, wit::Protocol::Plain, None)),
        ListenerProtocol::Tls => tokio::time::timeout_at(deadline, read_client_hello(&mut client, preread, record.id))
            .await
            .map_err(|_| Outcome::SniffTimeout)?
            .map(|(bytes, hello)| (bytes, wit::Protocol::Tls, Some(hello))),
        ListenerProtocol::Postgres => tokio::time::timeout_at(deadline, read_postgres(&mut client, preread, record.id))
            .await
            .map_err(|_| Outcome::SniffTimeout)?,
    };
    let (sniffed, protocol, hello) = match read {
        Ok(read) => read,
        Err(SniffFailure::Bad(SniffError::NotTls(first))) if proxy_protocol::looks_like_header(&first) => {
            return Err(Outcome::BadProxyHeader(format!(
                "a PROXY header from {peer}, which accept_proxy_protocol_from does not trust"
            )));
        }
        Err(SniffFailure::Shed) => {
            crate::metrics::METRICS.shed(&listener.name, "parked");
            return Err(SniffFailure::Shed.into());
        }
        Err(failure) => return Err(failure.into()),
    };
    let hello = hello.unwrap_or(ClientHello {
        sni: None,
        alpn: Vec::new(),
        versions: Vec::new(),
        prefers_chacha: false,
    });
    Ok(Front {
        client,
        local_addr,
        sniffed,
        protocol,
        hello,
    })
}

/// TLS alert descriptions (RFC 8446, 6) sent when a TLS client is refused,
/// so that it reports why instead of a bare connection reset.
pub(crate) const ALERT_ACCESS_DENIED: u8 = 49;

pub(crate) const ALERT_INTERNAL_ERROR: u8 = 80;

pub(crate) const ALERT_UNRECOGNIZED_NAME: u8 = 112;

/// Sends a fatal alert record in the clear (the handshake has not begun), best
/// effort and briefly: the connection is closed either way.
pub(crate) async fn send_alert(client: &mut TcpStream, description: u8) {
    let record = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description];
    let _ = tokio::time::timeout(Duration::from_millis(100), client.write_all(&record)).await;
}

/// Closes gracefully: FIN after whatever was written, then a short wait for
/// the client's own close. Closing with unread bytes would send a reset,
/// which can destroy the alert the client has yet to read.
pub(crate) async fn linger_close<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut stream: S) {
    let drain = async {
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 1024];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

/// Reads a PROXY header from a trusted load balancer; returns it and the
/// bytes that followed it (the client's own stream, to be sniffed and
/// replayed).
pub(crate) async fn read_proxy_header(
    client: &mut TcpStream,
) -> Result<(proxy_protocol::Received, Vec<u8>), SniffFailure> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = client.read(&mut chunk).await.map_err(SniffFailure::Io)?;
        if n == 0 {
            return Err(SniffFailure::Gone);
        }
        buf.extend_from_slice(&chunk[..n]);
        match proxy_protocol::decode(&buf) {
            Ok(Some(received)) => {
                let rest = buf.split_off(received.len);
                return Ok((received, rest));
            }
            Ok(None) => {}
            Err(reason) => return Err(SniffFailure::BadProxy(reason)),
        }
    }
}

/// Reads until the ClientHello is complete and returns every byte read, to
/// be replayed unchanged. The parser says how many bytes it needs, so a hello
/// trickling in one byte per segment is not re-parsed for every byte.
///
/// A connection that must read more than once is parked
/// ([`crate::parked`]): its bytes count towards
/// `limits.max_parked_bytes`, and it is shed if it is the oldest when they
/// are past it.
pub(crate) async fn read_client_hello(
    client: &mut TcpStream,
    already: Vec<u8>,
    id: u64,
) -> Result<(Vec<u8>, ClientHello), SniffFailure> {
    let mut buf = already;
    buf.reserve(1024);
    let mut chunk = [0u8; 2048];
    let mut needed = 1;
    let mut reads = 0u32;
    let mut parked: Option<(Parked, usize)> = None;
    loop {
        while buf.len() < needed {
            if buf.len() >= sniff::MAX_SNIFF_BYTES {
                return Err(SniffFailure::Bad(SniffError::TooLarge(buf.len())));
            }
            let room = (sniff::MAX_SNIFF_BYTES - buf.len()).min(chunk.len());
            if reads > 0 {
                let held = buf.capacity();
                match &mut parked {
                    None => parked = Some((Parked::park(id, held), held)),
                    Some((place, was)) if *was != held => {
                        place.holds(held);
                        *was = held;
                    }
                    Some(_) => {}
                }
            }
            reads += 1;
            let n = match &parked {
                None => client.read(&mut chunk[..room]).await,
                Some((place, _)) => tokio::select! {
                    read = client.read(&mut chunk[..room]) => read,
                    () = place.shed() => return Err(SniffFailure::Shed),
                },
            }
            .map_err(SniffFailure::Io)?;
            if n == 0 {
                return Err(SniffFailure::Gone);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        match sniff::parse_client_hello(&buf) {
            Ok(Sniffed::Hello(hello)) => return Ok((buf, hello)),
            Ok(Sniffed::Incomplete(more)) => needed = more,
            Err(e) => return Err(SniffFailure::Bad(e)),
        }
    }
}

/// Reads a PostgreSQL client's start: an SSLRequest is answered `S` (only
/// when nothing followed it) and the ClientHello after it read; a
/// GSSENCRequest is answered `N` and the next message read; a ClientHello
/// first is direct TLS; a StartupMessage or CancelRequest is plain.
pub(crate) async fn read_postgres(
    client: &mut TcpStream,
    already: Vec<u8>,
    id: u64,
) -> Result<(Vec<u8>, wit::Protocol, Option<ClientHello>), SniffFailure> {
    let mut buf = already;
    let mut chunk = [0u8; 512];
    loop {
        match postgres::classify(&buf).map_err(SniffFailure::Postgres)? {
            First::Incomplete(_) => {
                let n = client.read(&mut chunk).await.map_err(SniffFailure::Io)?;
                if n == 0 {
                    return Err(SniffFailure::Gone);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            First::Tls => {
                let (bytes, hello) = read_client_hello(client, buf, id).await?;
                return Ok((bytes, wit::Protocol::Tls, Some(hello)));
            }
            First::SslRequest { trailing: 0 } => {
                client.write_all(b"S").await.map_err(SniffFailure::Io)?;
                let (bytes, hello) = read_client_hello(client, Vec::new(), id).await?;
                return Ok((bytes, wit::Protocol::PostgresTls, Some(hello)));
            }
            First::SslRequest { trailing } => {
                return Err(SniffFailure::Postgres(PostgresError::BytesAfterSslRequest(trailing)));
            }
            First::GssEncRequest { trailing: 0 } => {
                client.write_all(b"N").await.map_err(SniffFailure::Io)?;
                buf.clear();
            }
            First::GssEncRequest { trailing } => {
                return Err(SniffFailure::Postgres(PostgresError::BytesAfterGssEncRequest(trailing)));
            }
            First::Plain => return Ok((buf, wit::Protocol::Plain, None)),
        }
    }
}
