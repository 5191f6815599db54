//! Dialling upstreams: a pool's servers in the balancer's order with
//! retries and health reporting, or an address; each through the door
//! ([`crate::door`]) as the connection's tenant's, or the operator's.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::door::{DoorError, Purpose, Scope, Vouch};
use weir_wire::postgres::{self};
use weir_wire::proxy_protocol;

use crate::addr::HostPort;
use crate::conn::accept::{ACCEPT_BACKOFF, out_of_descriptors};
use crate::conn::outcome::{Outcome, Record};
use crate::plugin::decision::{Target, Upstream};
use crate::pool::BackendGuard;
use crate::snapshot::{Listener, Snapshot, Tenant};

/// Connects to the target and sends what precedes the client's own bytes:
/// the PROXY header (version 2 also says what `tls`, a terminated
/// connection's handshake with the client, was), and with `ssl_request` (a PostgreSQL upstream that is to speak TLS)
/// an SSLRequest whose answer must be exactly `S`; all within the connect
/// deadline.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn open_upstream(
    target: &Target,
    ssl_request: bool,
    local_addr: SocketAddr,
    tls: Option<&rustls::ServerConnection>,
    listener: &Listener,
    tenant: Option<&Tenant>,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Result<TcpStream, Outcome> {
    let config = &listener.config;
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let scope = tenant.map_or(Scope::Operator, |t| Scope::Tenant(&t.reach));
    let (mut upstream, upstream_addr, backend) = connect(target, scope, snapshot, deadline)
        .await
        .map_err(Outcome::ConnectFailed)?;
    record.upstream = Some(upstream_addr.to_string());
    record.backend = backend;
    record.upstream_permit = upstream.permit.take();
    let mut upstream = upstream.stream;
    let pool_proxy = match &target.upstream {
        Upstream::Pool(name) | Upstream::PoolOnPort(name, _) => {
            snapshot.pool(name).and_then(|p| p.config.proxy_protocol)
        }
        Upstream::Address(_) => None,
    };
    let mut first = match target.proxy_protocol.or(pool_proxy) {
        Some(version) => {
            let facts = tls.filter(|_| version == 2).map(crate::tls::facts);
            match proxy_protocol::encode(
                version,
                record.client,
                local_addr,
                record.sni.as_deref(),
                facts.as_ref(),
            ) {
                Ok(header) => header,
                Err(e) => return Err(Outcome::Io(e)),
            }
        }
        None => Vec::new(),
    };
    if ssl_request {
        first.extend_from_slice(&postgres::SSL_REQUEST);
        let answer = async {
            upstream.write_all(&first).await?;
            let mut answer = [0u8; 64];
            let n = upstream.read(&mut answer).await?;
            Ok::<_, io::Error>(answer[..n].to_vec())
        };
        let checked = match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => Err("no answer to the SSLRequest before the connect deadline".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(answer)) => postgres::check_answer(&answer),
        };
        if let Err(reason) = checked {
            return Err(Outcome::ConnectFailed(format!("{upstream_addr}: {reason}")));
        }
    } else if let Err(e) = upstream.write_all(&first).await {
        return Err(Outcome::Io(e));
    }
    Ok(upstream)
}

/// Connects to the target: the one address, or the pool's servers in the
/// order the pool gives (its policy's choice first, available servers
/// before the others, at most `max_attempts`), all within one connect
/// deadline. Failed connects count towards passive ejection; a socket
/// that cannot be opened because weir is out of descriptors does not.
pub(crate) async fn connect(
    target: &Target,
    scope: Scope<'_>,
    snapshot: &Snapshot,
    deadline: tokio::time::Instant,
) -> Result<(crate::door::Outbound, HostPort, Option<BackendGuard>), String> {
    let (candidates, passive) = candidates(target, snapshot)?;
    if candidates.is_empty() {
        return Err("every server of the pool is draining".into());
    }
    let mut failures = Vec::new();
    for (server, backend, vouch) in candidates {
        // Out of descriptors, no socket can be opened: that is weir's
        // shortage, not the server's. Wait for one to free up (as accept
        // does) within the same deadline, and blame no one.
        let mut short_of_descriptors = None;
        let attempt = async {
            loop {
                match crate::door::connect_host(scope, &server, vouch, Purpose::Connection).await {
                    Err(DoorError::Io(e)) if out_of_descriptors(&e) => {
                        short_of_descriptors = Some(e);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    other => return other,
                }
            }
        };
        let outcome = tokio::time::timeout_at(deadline, attempt).await;
        if let (Err(_), Some(e)) = (&outcome, short_of_descriptors) {
            failures.push(format!(
                "{server}: no socket before the connect deadline, weir is out of file descriptors ({e})"
            ));
            break;
        }
        match outcome {
            Ok(Ok(stream)) => {
                // Latency matters more than segment count for proxied protocols.
                let _ = stream.stream.set_nodelay(true);
                let guard = backend.map(|backend| {
                    backend.connected();
                    BackendGuard::new(backend)
                });
                return Ok((stream, server, guard));
            }
            // Refused by the door (weir itself, outside the tenant, past its
            // sockets): nothing is said of the server's health.
            Ok(Err(refused)) if refused.is_refusal() => failures.push(refused.to_string()),
            Ok(Err(e)) => {
                if let (Some(backend), Some(passive)) = (&backend, &passive) {
                    backend.failed(passive);
                }
                failures.push(format!("{server}: {e}"));
            }
            Err(_) => {
                if let (Some(backend), Some(passive)) = (&backend, &passive) {
                    backend.failed(passive);
                }
                failures.push(format!("{server}: no answer before the connect deadline"));
                break;
            }
        }
    }
    Err(failures.join("; "))
}

/// A server to try, with its backend (for a pool) and whether the operator
/// wrote it down.
type Candidate = (HostPort, Option<std::sync::Arc<crate::pool::Backend>>, Vouch);

/// The servers to try for `target`, in order, and the passive ejection
/// settings their failures count towards (none for a port the decision
/// chose).
fn candidates(
    target: &Target,
    snapshot: &Snapshot,
) -> Result<(Vec<Candidate>, Option<crate::config::PassiveConfig>), String> {
    let (pool, port) = match &target.upstream {
        Upstream::Address(_) => (None, None),
        Upstream::Pool(name) => (Some(name), None),
        Upstream::PoolOnPort(name, port) => (Some(name), Some(*port)),
    };
    // Whether the operator wrote each server down: those of an operator's
    // pool, on their own port. A decision's address, another port the
    // decision chose and a tenant's published pool are someone else's
    // choice, which the door holds to the tenant's ranges.
    Ok(match (&target.upstream, pool) {
        (Upstream::Address(addr), _) => (vec![(addr.clone(), None, Vouch::Chosen)], None),
        (_, Some(name)) => match snapshot.pool(name) {
            Some(pool) => {
                let operators = pool.config.published_by.is_none();
                let candidates = pool
                    .candidates()
                    .into_iter()
                    .map(|b| {
                        let mut addr = b.addr.clone();
                        if let Some(port) = port {
                            addr.port = port;
                        }
                        let vouch = match operators && addr.port == b.addr.port {
                            true => Vouch::Operator,
                            false => Vouch::Chosen,
                        };
                        (addr, Some(b), vouch)
                    })
                    .collect();
                // A port the decision chose (`pool:port`, often the client's
                // choice) that nothing serves says nothing of the server:
                // such failures eject no one.
                (candidates, port.is_none().then(|| pool.config.passive.clone()))
            }
            None => return Err(format!("pool `{name}` vanished")),
        },
        (_, None) => return Err("no upstream".into()),
    })
}
