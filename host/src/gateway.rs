//! The data path: accept, sniff under a deadline, ask the plugin chain,
//! connect, replay the sniffed bytes, relay. One task per connection; a
//! connection holds the snapshot it started with to the end.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::addr::HostPort;
use crate::config::{Config, ListenerProtocol};
use crate::decision::{Action, Target, Upstream};
use crate::plugin::{PluginError, Runtime, wit};
use crate::proxy_protocol;
use crate::relay::{RelayEnd, Timeouts, Transfer, relay};
use crate::snapshot::{Listener, Snapshot, SnapshotError};
use crate::sniff::{self, ClientHello, SniffError, Sniffed};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The plugin engine could not be set up.
    #[error(transparent)]
    Runtime(#[from] PluginError),
    /// The routing state could not be built.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A listener's address could not be bound.
    #[error("listeners.{listener}.bind: cannot listen on {addr}: {error}")]
    Bind {
        /// The listener.
        listener: String,
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        error: io::Error,
    },
}

/// Counter behind connection ids.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// A running gateway. Dropping it stops accepting; connections in flight
/// finish on their own.
pub struct Gateway {
    snapshot: Arc<ArcSwap<Snapshot>>,
    addrs: BTreeMap<String, SocketAddr>,
    accept_tasks: Vec<JoinHandle<()>>,
    _runtime: Arc<Runtime>,
}

impl Gateway {
    /// Builds the snapshot (loading every plugin), binds every listener and
    /// starts accepting on the current tokio runtime.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let runtime = Arc::new(Runtime::new()?);
        let snapshot = Snapshot::build(config, &runtime)?;
        let mut sockets = Vec::new();
        for listener in snapshot.listeners() {
            let addr = listener.config.bind;
            let bind_error = |error| GatewayError::Bind {
                listener: listener.name.to_string(),
                addr,
                error,
            };
            let socket = TcpListener::bind(addr).await.map_err(bind_error)?;
            let local = socket.local_addr().map_err(bind_error)?;
            sockets.push((Arc::clone(&listener.name), local, socket));
        }
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let mut addrs = BTreeMap::new();
        let mut accept_tasks = Vec::new();
        for (name, local, socket) in sockets {
            addrs.insert(name.to_string(), local);
            accept_tasks.push(tokio::spawn(accept_loop(name, socket, Arc::clone(&snapshot))));
        }
        Ok(Gateway {
            snapshot,
            addrs,
            accept_tasks,
            _runtime: runtime,
        })
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.addrs.get(listener).copied()
    }

    /// Every listener's bound address, by name.
    pub fn local_addrs(&self) -> &BTreeMap<String, SocketAddr> {
        &self.addrs
    }

    /// The routing state new connections use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for task in &self.accept_tasks {
            task.abort();
        }
    }
}

async fn accept_loop(name: Arc<str>, socket: TcpListener, snapshot: Arc<ArcSwap<Snapshot>>) {
    loop {
        match socket.accept().await {
            Ok((stream, client)) => {
                // Relayed handshake flights must not wait on Nagle.
                let _ = stream.set_nodelay(true);
                let snapshot = snapshot.load_full();
                let name = Arc::clone(&name);
                tokio::spawn(async move {
                    if let Some(listener) = snapshot.listener(&name).cloned() {
                        handle(stream, client, &listener, &snapshot).await;
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                tracing::error!(listener = &*name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How a connection ended, for the log line.
enum Outcome {
    Relayed(RelayEnd),
    SniffTimeout,
    ClientGone,
    BadHello(SniffError),
    BadProxyHeader(String),
    Rejected(String),
    ConnectFailed(String),
    Io(io::Error),
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
            Outcome::BadHello(e) => write!(f, "bad-hello: {e}"),
            // Plugin-supplied text: escaped so it cannot forge log lines.
            Outcome::Rejected(reason) => write!(f, "rejected: {reason:?}"),
            Outcome::ConnectFailed(reason) => write!(f, "connect-failed: {reason}"),
            Outcome::Io(e) => write!(f, "io-error: {e}"),
        }
    }
}

/// Everything the per-connection log line reports.
struct Record {
    id: u64,
    started: Instant,
    client: SocketAddr,
    sni: Option<String>,
    route: Option<String>,
    upstream: Option<String>,
    transfer: Transfer,
}

async fn handle(client: TcpStream, client_addr: SocketAddr, listener: &Listener, snapshot: &Snapshot) {
    let mut record = Record {
        id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
        started: Instant::now(),
        client: client_addr,
        sni: None,
        route: None,
        upstream: None,
        transfer: Transfer::default(),
    };
    let outcome = proxy(client, listener, snapshot, &mut record).await;
    let transfer = &record.transfer;
    let bytes_up = transfer.client_to_upstream.load(Ordering::Relaxed);
    let bytes_down = transfer.upstream_to_client.load(Ordering::Relaxed);
    let spliced = transfer.spliced.load(Ordering::Relaxed);
    let ms = u64::try_from(record.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let sni = record.sni.as_deref().unwrap_or("-");
    let route = record.route.as_deref().unwrap_or("-");
    let upstream = record.upstream.as_deref().unwrap_or("-");
    let listener = &*listener.name;
    let (id, client) = (record.id, record.client);
    tracing::info!(id, listener, %client, sni, route, upstream, bytes_up, bytes_down, spliced, ms, %outcome, "connection");
}

/// Takes a connection from sniffing to the end of its relay. Returning drops
/// (closes) the client socket.
async fn proxy(client: TcpStream, listener: &Listener, snapshot: &Snapshot, record: &mut Record) -> Outcome {
    // Setup is its own future, so the hello, the plugin's view of the
    // connection and the replay buffer are gone before the (long) relay.
    let (client, upstream) = match connect_upstream(client, listener, snapshot, record).await {
        Ok(pair) => pair,
        Err(outcome) => return outcome,
    };
    let config = &listener.config;
    let timeouts = Timeouts {
        idle: config.idle_timeout,
        half_close: config.half_close_timeout,
    };
    match relay(client, upstream, config.relay, timeouts, &record.transfer).await {
        Ok(end) => Outcome::Relayed(end),
        Err(e) => Outcome::Io(e),
    }
}

/// Sniffs, routes, connects, and writes the PROXY header and the sniffed
/// bytes: everything before relaying.
async fn connect_upstream(
    mut client: TcpStream,
    listener: &Listener,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Result<(TcpStream, TcpStream), Outcome> {
    let config = &listener.config;
    let mut local_addr = match client.local_addr() {
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
    let (sniffed, hello) = match config.protocol {
        ListenerProtocol::Plain => (preread, None),
        ListenerProtocol::Tls => match tokio::time::timeout_at(deadline, read_client_hello(&mut client, preread)).await
        {
            Err(_) => return Err(Outcome::SniffTimeout),
            Ok(Err(SniffFailure::Bad(SniffError::NotTls(first)))) if proxy_protocol::looks_like_header(&first) => {
                return Err(Outcome::BadProxyHeader(format!(
                    "a PROXY header from {peer}, which accept_proxy_protocol_from does not trust"
                )));
            }
            Ok(Err(failure)) => return Err(failure.into()),
            Ok(Ok((bytes, hello))) => (bytes, Some(hello)),
        },
    };
    let protocol = match config.protocol {
        ListenerProtocol::Tls => wit::Protocol::Tls,
        ListenerProtocol::Plain => wit::Protocol::Plain,
    };
    let hello = hello.unwrap_or(ClientHello {
        sni: None,
        alpn: Vec::new(),
        versions: Vec::new(),
    });
    record.sni.clone_from(&hello.sni);
    let conn = wit::Connection {
        id: record.id,
        listener: listener.name.to_string(),
        tenant: None,
        client_addr: record.client.to_string(),
        local_addr: local_addr.to_string(),
        protocol,
        sni: hello.sni,
        alpn: hello.alpn,
        tls_versions: hello.versions,
    };

    let routing = snapshot.route(listener, &conn);
    record.route = Some(routing.decision.route.clone());
    let speaks_tls = config.protocol == ListenerProtocol::Tls;
    let refusal_alert = match (routing.plugin.is_some(), routing.failed()) {
        (_, true) => ALERT_INTERNAL_ERROR,
        (true, false) => ALERT_ACCESS_DENIED,
        (false, false) => ALERT_UNRECOGNIZED_NAME,
    };
    let target = match routing.decision.action {
        Action::Reject(reason) => {
            if speaks_tls {
                send_alert(&mut client, refusal_alert).await;
            }
            return Err(Outcome::Rejected(reason));
        }
        Action::Passthrough(target) => target,
    };
    let (mut upstream, upstream_addr) = match connect(&target, snapshot, config.connect_timeout).await {
        Ok(connected) => connected,
        Err(reason) => {
            if speaks_tls {
                send_alert(&mut client, ALERT_INTERNAL_ERROR).await;
            }
            return Err(Outcome::ConnectFailed(reason));
        }
    };
    record.upstream = Some(upstream_addr.to_string());
    // The PROXY header, if any, and the sniffed bytes go out in one write.
    let mut first = match target.proxy_protocol {
        Some(version) => match proxy_protocol::encode(version, record.client, local_addr, record.sni.as_deref()) {
            Ok(header) => header,
            Err(e) => return Err(Outcome::Io(e)),
        },
        None => Vec::new(),
    };
    first.extend_from_slice(&sniffed);
    if let Err(e) = upstream.write_all(&first).await {
        return Err(Outcome::Io(e));
    }
    record
        .transfer
        .client_to_upstream
        .fetch_add(sniffed.len() as u64, Ordering::Relaxed);
    Ok((client, upstream))
}

/// TLS alert descriptions (RFC 8446, 6) sent when a TLS client is refused,
/// so that it reports why instead of a bare connection reset.
const ALERT_ACCESS_DENIED: u8 = 49;
const ALERT_INTERNAL_ERROR: u8 = 80;
const ALERT_UNRECOGNIZED_NAME: u8 = 112;

/// Sends a fatal alert record in the clear (the handshake has not begun), best
/// effort and briefly: the connection is closed either way.
async fn send_alert(client: &mut TcpStream, description: u8) {
    let record = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description];
    let _ = tokio::time::timeout(Duration::from_millis(100), client.write_all(&record)).await;
}

/// Why reading the first bytes (PROXY header, hello) ended without them.
enum SniffFailure {
    /// The client closed before they were complete.
    Gone,
    /// The bytes are not a hello weir accepts.
    Bad(SniffError),
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
            SniffFailure::BadProxy(reason) => Outcome::BadProxyHeader(reason),
            SniffFailure::Io(e) => Outcome::Io(e),
        }
    }
}

/// Reads a PROXY header from a trusted load balancer; returns it and the
/// bytes that followed it (the client's own stream, to be sniffed and
/// replayed).
async fn read_proxy_header(client: &mut TcpStream) -> Result<(proxy_protocol::Received, Vec<u8>), SniffFailure> {
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
async fn read_client_hello(client: &mut TcpStream, already: Vec<u8>) -> Result<(Vec<u8>, ClientHello), SniffFailure> {
    let mut buf = already;
    buf.reserve(1024);
    let mut chunk = [0u8; 2048];
    let mut needed = 1;
    loop {
        while buf.len() < needed {
            if buf.len() >= sniff::MAX_SNIFF_BYTES {
                return Err(SniffFailure::Bad(SniffError::TooLarge(buf.len())));
            }
            let room = (sniff::MAX_SNIFF_BYTES - buf.len()).min(chunk.len());
            let n = client.read(&mut chunk[..room]).await.map_err(SniffFailure::Io)?;
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

/// Connects to the target: a pool's servers in turn, or the one address,
/// all within one connect deadline.
async fn connect(target: &Target, snapshot: &Snapshot, timeout: Duration) -> Result<(TcpStream, HostPort), String> {
    let candidates: Vec<&HostPort> = match &target.upstream {
        Upstream::Address(addr) => vec![addr],
        Upstream::Pool(name) => match snapshot.pool(name) {
            Some(pool) => pool.servers().collect(),
            None => return Err(format!("pool `{name}` vanished")),
        },
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut failures = Vec::new();
    for server in candidates {
        let attempt = async {
            match server.socket_addr() {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect(server.to_string()).await,
            }
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(stream)) => {
                // Latency matters more than segment count for proxied protocols.
                let _ = stream.set_nodelay(true);
                return Ok((stream, server.clone()));
            }
            Ok(Err(e)) => failures.push(format!("{server}: {e}")),
            Err(_) => {
                failures.push(format!("{server}: no answer within {timeout:?}"));
                break;
            }
        }
    }
    Err(failures.join("; "))
}
