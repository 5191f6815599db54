//! The one door out: every TCP connection weir opens — a passthrough or
//! terminated connection's upstream, a `pool:port` target, an originated
//! connection, a health probe — is opened by [`connect`] here, told whose
//! it is ([`Scope`]: the operator's, or tenant T's). The door refuses, for
//! every scope, weir's own listeners and admin address (a loop, or the admin
//! API handed to whoever chose the address); for a tenant, any address
//! outside its `upstreams` ranges and ports that the operator did not write
//! down for it ([`Vouch`]), and any socket past its `max_descriptors`; for a
//! probe, any socket that would take one of the descriptors the reserve
//! keeps for accepted connections.
//!
//! No other module opens a socket towards anyone: `door_owns_every_connect`
//! (below) reads the crate's sources and fails on a `TcpStream::connect`,
//! `TcpSocket` or `UdpSocket` anywhere else. DNS — the resolver behind the
//! `dns` capability, the RFC 2136 updates of DNS-01 — runs on [`DoorRuntime`],
//! which asks the door for every server the DNS library would reach (as the
//! operator's: its servers come from `[resolver]` and `[dns.NAME]`; a
//! tenant's lookups are rate-limited per tenant before they get here). The
//! ACME client's HTTP connections are opened by [`DoorConnector`], as the
//! operator's. What etcd's client opens (the operator's `[fleet]`
//! endpoints, over gRPC) its library opens, to addresses the config names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpSocket, TcpStream};

use crate::addr::{HostPort, UpstreamRange, ranges_text};
use crate::throttle::Rate;

/// Whose connection weir is opening.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// The operator's: a listener's own chain, an operator's pool's probe.
    Operator,
    /// A tenant's: held to its ranges and its descriptors.
    Tenant(&'a Reach),
}

/// Whether the operator wrote the address down for this scope: a server of
/// an operator's pool, as the config names it. Anything a plugin, a client
/// or a tenant chose (an address in a decision, a `pool:port`, a server of a
/// pool a tenant published) is [`Vouch::Chosen`] and, for a tenant, must lie
/// in its ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vouch {
    /// Written by the operator.
    Operator,
    /// Chosen by someone else.
    Chosen,
}

/// What the socket is for: a probe must leave the descriptor reserve to
/// the connections it is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The upstream side of a client's connection.
    Connection,
    /// An active health check.
    Probe,
}

/// What weir may reach for one tenant, and what it may hold open: built
/// with each snapshot from the tenant's section; its counts are carried
/// across reloads.
#[derive(Debug)]
pub struct Reach {
    /// The tenant's name.
    pub tenant: Arc<str>,
    ranges: Vec<UpstreamRange>,
    max_sockets: usize,
    sockets: Arc<AtomicUsize>,
    /// Health probes a second of the tenant's pools.
    pub(crate) probes: Arc<Rate>,
}

/// Why the door refused.
#[derive(Debug, thiserror::Error)]
pub enum DoorError {
    /// One of weir's own listening addresses.
    #[error("{0}")]
    Own(String),
    /// Outside the tenant's ranges.
    #[error("{addr} is outside tenant `{tenant}`'s upstream ranges ({ranges})")]
    Outside {
        /// The tenant.
        tenant: Arc<str>,
        /// The address refused.
        addr: SocketAddr,
        /// Its ranges, as written.
        ranges: String,
    },
    /// A DNS name chosen for a tenant.
    #[error("{0}: a tenant's connections go to addresses, not DNS names")]
    Name(HostPort),
    /// The tenant holds its `max_descriptors`.
    #[error("tenant `{tenant}` holds its {max} upstream sockets (max_descriptors)")]
    Descriptors {
        /// The tenant.
        tenant: Arc<str>,
        /// Its limit.
        max: usize,
    },
    /// A probe would take a descriptor the reserve keeps.
    #[error("weir keeps its last descriptors for connections (limits.descriptor_reserve); the probe waits")]
    Reserve,
    /// The name resolved to nothing.
    #[error("the name resolves to no address")]
    Unresolved(HostPort),
    /// A URL that names no server (escaped and cut to 256 bytes).
    #[error("{0}: the URL names no server to connect to")]
    Uri(String),
    /// The socket or the connect failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl DoorError {
    /// Whether weir refused the socket itself (scope, own address, a
    /// budget, the reserve), as against the network failing: such a
    /// refusal says nothing of the server's health.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            DoorError::Own(_)
                | DoorError::Outside { .. }
                | DoorError::Name(_)
                | DoorError::Descriptors { .. }
                | DoorError::Reserve
        )
    }
}

/// A tenant's place among its `max_descriptors`: held as long as the socket.
#[derive(Debug)]
pub struct SocketPermit {
    held: Arc<AtomicUsize>,
    max: usize,
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SocketPermit {
    /// Two more of the tenant's descriptors, for a splice pipe held while a
    /// burst moves; `None` when the tenant holds its `max_descriptors` (the
    /// burst is copied instead).
    pub fn pipe(&self) -> Option<PipePermit<'_>> {
        let held = self.held.fetch_add(2, Ordering::AcqRel);
        let permit = PipePermit(&self.held);
        (held + 2 <= self.max).then_some(permit)
    }
}

/// A splice pipe's two descriptors in its tenant's count.
#[derive(Debug)]
pub struct PipePermit<'a>(&'a AtomicUsize);

impl Drop for PipePermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(2, Ordering::AcqRel);
    }
}

/// A connected socket, and for a tenant its place in the tenant's count,
/// to be held as long as the socket.
#[derive(Debug)]
pub struct Outbound {
    /// The connection.
    pub stream: TcpStream,
    /// The tenant's count, if any.
    pub permit: Option<SocketPermit>,
}

/// The default `max_descriptors`: an eighth of the descriptor limit, at
/// least 64 (4,096 without a limit known).
pub fn default_max_sockets() -> usize {
    let limit = crate::descriptors::DESCRIPTOR_LIMIT.unwrap_or(32_768);
    usize::try_from(limit / 8).unwrap_or(usize::MAX).max(64)
}

impl Reach {
    /// The reach of tenant `name` with `settings`; its counts from
    /// `previous` (the same tenant in the snapshot before) when there is one.
    pub fn new(name: Arc<str>, settings: &crate::config::TenantConfig, previous: Option<&Reach>) -> Reach {
        let probes = previous
            .map(|p| Arc::clone(&p.probes))
            .filter(|r| r.per_second() == settings.health_probes_per_second)
            .unwrap_or_else(|| Arc::new(Rate::new(settings.health_probes_per_second)));
        Reach {
            tenant: name,
            ranges: settings.upstreams.clone(),
            max_sockets: settings.max_descriptors.unwrap_or_else(default_max_sockets),
            sockets: previous.map_or_else(Arc::default, |p| Arc::clone(&p.sockets)),
            probes,
        }
    }

    /// Sockets it holds open now.
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    /// Whether the tenant may reach `addr`.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.ranges.iter().any(|range| range.contains(addr))
    }

    fn take_socket(&self) -> Result<SocketPermit, DoorError> {
        let held = self.sockets.fetch_add(1, Ordering::AcqRel);
        let permit = SocketPermit {
            held: Arc::clone(&self.sockets),
            max: self.max_sockets,
        };
        if held >= self.max_sockets {
            return Err(DoorError::Descriptors {
                tenant: Arc::clone(&self.tenant),
                max: self.max_sockets,
            });
        }
        Ok(permit)
    }
}

/// Whether `scope` may connect to `addr`, vouched for or not; the error
/// says why not.
pub fn admit(scope: Scope<'_>, addr: SocketAddr, vouch: Vouch) -> Result<(), DoorError> {
    crate::own::check(addr).map_err(DoorError::Own)?;
    match scope {
        Scope::Tenant(reach) if vouch == Vouch::Chosen && !reach.contains(addr) => Err(DoorError::Outside {
            tenant: Arc::clone(&reach.tenant),
            addr,
            ranges: ranges_text(&reach.ranges),
        }),
        _ => Ok(()),
    }
}

/// Opens a connection to `addr` for `scope`, if the door admits it.
pub async fn connect(
    scope: Scope<'_>,
    addr: SocketAddr,
    vouch: Vouch,
    purpose: Purpose,
) -> Result<Outbound, DoorError> {
    admit(scope, addr, vouch)?;
    let permit = match scope {
        Scope::Tenant(reach) => Some(reach.take_socket()?),
        Scope::Operator => None,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if purpose == Purpose::Probe
        && crate::descriptors::in_descriptor_reserve(&socket, crate::descriptors::reserve_in_force())
    {
        return Err(DoorError::Reserve);
    }
    let stream = socket.connect(addr).await?;
    Ok(Outbound { stream, permit })
}

/// Opens a connection to `server` for `scope`: an address as [`connect`]
/// does; a DNS name (only one the operator wrote down: a tenant's chosen
/// targets are addresses) resolved, each address it gives tried in turn
/// through the same checks (a name may point at weir itself as well).
pub async fn connect_host(
    scope: Scope<'_>,
    server: &HostPort,
    vouch: Vouch,
    purpose: Purpose,
) -> Result<Outbound, DoorError> {
    if let Some(addr) = server.socket_addr() {
        return connect(scope, addr, vouch, purpose).await;
    }
    if matches!(scope, Scope::Tenant(_)) && vouch == Vouch::Chosen {
        return Err(DoorError::Name(server.clone()));
    }
    let mut last = None;
    for addr in tokio::net::lookup_host(server.to_string()).await? {
        match connect(scope, addr, vouch, purpose).await {
            Ok(outbound) => return Ok(outbound),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| DoorError::Unresolved(server.clone())))
}

/// The tokio runtime of the DNS library (hickory), every server it would
/// reach first asked of the door as the operator's: a resolver or update
/// server set to one of weir's own addresses is refused like any target.
#[derive(Clone, Default)]
pub struct DoorRuntime(hickory_net::runtime::TokioRuntimeProvider);

type BoxedIo<T> = std::pin::Pin<Box<dyn Send + std::future::Future<Output = std::io::Result<T>>>>;

impl hickory_net::runtime::RuntimeProvider for DoorRuntime {
    type Handle = <hickory_net::runtime::TokioRuntimeProvider as hickory_net::runtime::RuntimeProvider>::Handle;
    type Timer = <hickory_net::runtime::TokioRuntimeProvider as hickory_net::runtime::RuntimeProvider>::Timer;
    type Udp = <hickory_net::runtime::TokioRuntimeProvider as hickory_net::runtime::RuntimeProvider>::Udp;
    type Tcp = <hickory_net::runtime::TokioRuntimeProvider as hickory_net::runtime::RuntimeProvider>::Tcp;

    fn create_handle(&self) -> Self::Handle {
        self.0.create_handle()
    }

    fn connect_tcp(
        &self,
        server: SocketAddr,
        bind: Option<SocketAddr>,
        timeout: Option<std::time::Duration>,
    ) -> BoxedIo<Self::Tcp> {
        match admit(Scope::Operator, server, Vouch::Operator) {
            Ok(()) => self.0.connect_tcp(server, bind, timeout),
            Err(refused) => Box::pin(std::future::ready(Err(std::io::Error::other(refused.to_string())))),
        }
    }

    fn bind_udp(&self, local: SocketAddr, server: SocketAddr) -> BoxedIo<Self::Udp> {
        match admit(Scope::Operator, server, Vouch::Operator) {
            Ok(()) => self.0.bind_udp(local, server),
            Err(refused) => Box::pin(std::future::ready(Err(std::io::Error::other(refused.to_string())))),
        }
    }
}

/// The connector of weir's HTTP clients (the ACME directory's): every
/// connection hyper would open is the operator's, opened by
/// [`connect_host`] — a directory whose name or address is one of weir's
/// own listeners or its admin address is refused like any target.
#[derive(Clone, Copy, Debug, Default)]
pub struct DoorConnector;

impl tower_service::Service<hyper::Uri> for DoorConnector {
    type Response = hyper_util::rt::TokioIo<TcpStream>;
    type Error = DoorError;
    type Future = std::pin::Pin<Box<dyn Send + std::future::Future<Output = Result<Self::Response, DoorError>>>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), DoorError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        Box::pin(async move {
            let server = uri_server(&uri)?;
            let outbound = connect_host(Scope::Operator, &server, Vouch::Operator, Purpose::Connection).await?;
            Ok(hyper_util::rt::TokioIo::new(outbound.stream))
        })
    }
}

/// The `host:port` an HTTP client's `uri` names (the scheme's port when it
/// names none).
fn uri_server(uri: &hyper::Uri) -> Result<HostPort, DoorError> {
    let unusable = || {
        let mut text = String::new();
        let _ = crate::logfmt::escape(&mut text, &uri.to_string(), 256);
        DoorError::Uri(text)
    };
    let host = uri.host().ok_or_else(unusable)?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
    HostPort::parse(&format!("{host}:{port}")).map_err(|_| unusable())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(ranges: &[&str], max: usize) -> Reach {
        Reach {
            tenant: "a".into(),
            ranges: ranges.iter().map(|r| UpstreamRange::parse(r).expect("range")).collect(),
            max_sockets: max,
            sockets: Arc::default(),
            probes: Arc::new(Rate::new(10)),
        }
    }

    #[tokio::test]
    async fn a_tenant_reaches_its_ranges_and_ports_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let open = listener.local_addr().expect("addr");
        let a = reach(&[&format!("127.0.0.1/32:{}", open.port())], 8);
        let scope = Scope::Tenant(&a);
        let reached = connect(scope, open, Vouch::Chosen, Purpose::Connection)
            .await
            .expect("in range");
        assert_eq!(a.sockets(), 1);
        drop(reached);
        assert_eq!(a.sockets(), 0);
        let other = SocketAddr::from(([127, 0, 0, 1], open.port().wrapping_add(1).max(1)));
        let refused = connect(scope, other, Vouch::Chosen, Purpose::Connection)
            .await
            .expect_err("other port");
        assert!(refused.is_refusal());
        assert!(
            refused.to_string().contains(&format!(
                "is outside tenant `a`'s upstream ranges (127.0.0.1/32:{})",
                open.port()
            )),
            "{refused}"
        );
        // The operator's own server for the tenant needs no range.
        assert!(admit(scope, other, Vouch::Operator).is_ok());
        assert!(admit(Scope::Operator, other, Vouch::Chosen).is_ok());
        // A chosen DNS name is refused for a tenant before any lookup.
        let name = HostPort::parse("localhost:80").expect("name");
        let refused = connect_host(scope, &name, Vouch::Chosen, Purpose::Connection)
            .await
            .expect_err("name");
        assert!(matches!(refused, DoorError::Name(_)), "{refused}");
    }

    #[tokio::test]
    async fn weirs_own_addresses_are_refused_to_everyone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _own = crate::own::OwnAddress::register(addr);
        let a = reach(&["127.0.0.0/8"], 8);
        for scope in [Scope::Operator, Scope::Tenant(&a)] {
            for vouch in [Vouch::Operator, Vouch::Chosen] {
                let refused = connect(scope, addr, vouch, Purpose::Probe).await.expect_err("own");
                assert!(
                    refused.to_string().contains("weir's own listening address"),
                    "{refused}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_tenant_holds_at_most_its_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let a = reach(&["127.0.0.0/8"], 2);
        let scope = Scope::Tenant(&a);
        let one = connect(scope, addr, Vouch::Chosen, Purpose::Connection)
            .await
            .expect("one");
        let two = connect(scope, addr, Vouch::Chosen, Purpose::Connection)
            .await
            .expect("two");
        let three = connect(scope, addr, Vouch::Chosen, Purpose::Connection)
            .await
            .expect_err("three");
        assert!(matches!(three, DoorError::Descriptors { max: 2, .. }), "{three}");
        assert_eq!(a.sockets(), 2, "a refused socket is not counted");
        drop(one);
        let again = connect(scope, addr, Vouch::Chosen, Purpose::Connection)
            .await
            .expect("room again");
        // A splice pipe is two more descriptors of the tenant's, for as
        // long as its burst: none while the tenant holds its max.
        assert!(
            two.permit.as_ref().expect("permit").pipe().is_none(),
            "2 sockets of 2: no room for a pipe"
        );
        assert_eq!(a.sockets(), 2, "a refused pipe is not counted");
        drop(again);
        let b = reach(&["127.0.0.0/8"], 4);
        let held = connect(Scope::Tenant(&b), addr, Vouch::Chosen, Purpose::Connection)
            .await
            .expect("b");
        let pipe = held.permit.as_ref().expect("a tenant's permit").pipe().expect("3 of 4");
        assert_eq!(b.sockets(), 3);
        assert!(held.permit.as_ref().expect("permit").pipe().is_none(), "5 of 4");
        drop(pipe);
        assert_eq!(b.sockets(), 1);
        drop((two, held));
        assert_eq!(a.sockets(), 0);
        assert_eq!(b.sockets(), 0);
    }

    /// The DNS library's sockets pass the door: a server that is weir's
    /// own address is refused before any datagram is sent.
    #[tokio::test]
    async fn dns_servers_are_asked_of_the_door() {
        use hickory_net::runtime::RuntimeProvider;
        let own = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = own.local_addr().expect("addr");
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        assert!(
            DoorRuntime::default().bind_udp(any, addr).await.is_ok(),
            "not weir's yet"
        );
        let _own = crate::own::OwnAddress::register(addr);
        let refused = DoorRuntime::default()
            .bind_udp(any, addr)
            .await
            .expect_err("weir's own");
        assert!(
            refused.to_string().contains("weir's own listening address"),
            "{refused}"
        );
        let Err(refused) = DoorRuntime::default().connect_tcp(addr, None, None).await else {
            panic!("connected to weir's own address");
        };
        assert!(
            refused.to_string().contains("weir's own listening address"),
            "{refused}"
        );
    }

    /// The ACME client's connections pass the door: a directory at one of
    /// weir's own addresses is refused, any other is reached.
    #[tokio::test]
    async fn http_clients_connect_through_the_door() {
        use tower_service::Service;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let uri: hyper::Uri = format!("https://{addr}/directory").parse().expect("uri");
        DoorConnector.call(uri.clone()).await.expect("not weir's yet");
        let _own = crate::own::OwnAddress::register(addr);
        let refused = DoorConnector.call(uri).await.expect_err("weir's own");
        assert!(
            refused.to_string().contains("weir's own listening address"),
            "{refused}"
        );
        let hostless: hyper::Uri = "/directory".parse().expect("uri");
        let refused = DoorConnector.call(hostless).await.expect_err("no host");
        assert!(matches!(refused, DoorError::Uri(_)), "{refused}");
        let v6: hyper::Uri = "https://[::1]:1/".parse().expect("uri");
        assert_eq!(uri_server(&v6).expect("v6").to_string(), "[::1]:1");
        let plain: hyper::Uri = "http://localhost/".parse().expect("uri");
        assert_eq!(uri_server(&plain).expect("name").to_string(), "localhost:80");
    }

    /// One door: no module but this one opens a socket towards anyone.
    /// Reads every source file of the crate: a `TcpStream::connect`,
    /// `TcpSocket` or `UdpSocket` outside this file (and outside tests) is
    /// a second door.
    #[test]
    fn door_owns_every_connect() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![root];
        let mut doors = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).expect("read dir") {
                    files.push(entry.expect("entry").path());
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("door.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            // Code after a file's `#[cfg(test)]` module is its tests.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(&text);
            for (n, line) in code.lines().enumerate() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                for door in [
                    "TcpStream::connect",
                    "TcpSocket",
                    "UdpSocket::bind",
                    "std::net::TcpStream",
                    // A library's own HTTP connector (instant-acme's default
                    // client, hyper's) opens sockets the door never sees.
                    "Account::builder()",
                    "builder_with_root",
                    "HttpConnector::new",
                ] {
                    if line.contains(door) {
                        doors.push(format!("{}:{}: {line}", path.display(), n + 1));
                    }
                }
            }
        }
        // own.rs binds (never connects) a UDP socket to ask whether an
        // address is this host's.
        doors.retain(|d| !d.contains("own.rs") || !d.contains("UdpSocket::bind(SocketAddr::new(ip, 0))"));
        assert!(
            doors.is_empty(),
            "sockets opened outside the door:\n{}",
            doors.join("\n")
        );
    }
}
