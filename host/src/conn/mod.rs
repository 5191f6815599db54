//! A connection, stage by stage: [`accept`] → [`front`] (PROXY header,
//! STARTTLS, ClientHello) → the plugin chain → [`passthrough`] or
//! [`terminate`] (and re-encrypt) → [`dial`]ing the upstream → relay; how it
//! ended is its [`outcome`]. One task per connection; a connection holds the
//! snapshot it started with until it is relaying, then lets it go.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::config::ListenerConfig;
use crate::conn::accept::NEXT_CONNECTION_ID;
use crate::conn::front::{
    ALERT_ACCESS_DENIED, ALERT_INTERNAL_ERROR, ALERT_UNRECOGNIZED_NAME, Front, answer_acme_challenge, read_front,
};
use crate::conn::originate::originate;
use crate::conn::outcome::{Outcome, Record};
use crate::conn::passthrough::passthrough;
use crate::conn::terminate::{Terminated, terminate};
use crate::plugin::decision::{Action, Decision};
use crate::relay::{Timeouts, Transfer, relay};
use crate::snapshot::{Listener, Snapshot, Tenant};
use crate::wit;

pub(crate) mod accept;
mod dial;
mod front;
mod originate;
mod outcome;
mod passthrough;
mod terminate;

/// The log target of the one record each connection ends with. Operators
/// filter and ship on it (`RUST_LOG=weir::gateway=info`), so it stays what it
/// was when connections were served from `gateway.rs`.
const RECORD_TARGET: &str = "weir::gateway";

/// Serves one connection to its end and records it. The routing state
/// (`listener`, `snapshot`: compiled plugins, TLS material, pools) is let go
/// before the relay starts, so a connection relayed for days holds only its
/// streams and counters, however many reloads happen meanwhile.
pub(crate) async fn handle(
    client: TcpStream,
    client_addr: SocketAddr,
    bound: Option<SocketAddr>,
    listener: Arc<Listener>,
    snapshot: Arc<Snapshot>,
) {
    let mut record = Record {
        id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
        started: Instant::now(),
        client: client_addr,
        sni: None,
        tenant: None,
        route: None,
        mode: None,
        upstream: None,
        backend: None,
        tenant_slot: None,
        upstream_permit: None,
        client_slot: None,
        transfer: Transfer::default(),
    };
    let metrics = &crate::metrics::METRICS;
    let active = metrics.active(&listener.name);
    active.inc();
    let proxied = proxy((client, bound), &listener, &snapshot, &mut record).await;
    let (name, mode, timeouts) = (
        Arc::clone(&listener.name),
        listener.config.relay,
        relay_timeouts(&listener.config),
    );
    drop((listener, snapshot));
    let tenant = record.tenant.as_deref();
    let route_label = metrics.route_label(tenant, &name, record.route.as_deref().unwrap_or("-"));
    let route_active = match (&proxied, &record.route) {
        (Proxied::Ended(_), _) | (_, None) => None,
        (_, Some(_)) => Some(metrics.route_active(&name, tenant, &route_label)),
    };
    if let Some(gauge) = &route_active {
        gauge.inc();
    }
    let ended = match proxied {
        Proxied::Ended(outcome) => Err(outcome),
        Proxied::Relay(client, upstream) => Ok(relay(
            client,
            upstream,
            mode,
            timeouts,
            &record.transfer,
            record.upstream_permit.as_ref(),
        )
        .await),
        // Boxed: the TLS relay's state does not size every connection's task.
        Proxied::Terminated(streams) => Ok(Box::pin(streams.relay(timeouts, &record.transfer)).await),
    };
    let outcome = match ended {
        Err(outcome) => outcome,
        Ok(Ok(end)) => Outcome::Relayed(end),
        Ok(Err(e)) => Outcome::Io(e),
    };
    active.dec();
    if let Some(gauge) = &route_active {
        gauge.dec();
    }
    let transfer = &record.transfer;
    let bytes_up = transfer.client_to_upstream.load(Ordering::Relaxed);
    let bytes_down = transfer.upstream_to_client.load(Ordering::Relaxed);
    if let Some(guard) = &record.backend {
        guard.backend().bytes_up.fetch_add(bytes_up, Ordering::Relaxed);
        guard.backend().bytes_down.fetch_add(bytes_down, Ordering::Relaxed);
    }
    metrics.connection_ended(&crate::metrics::Ended {
        listener: &name,
        tenant: record.tenant.as_deref(),
        route: route_label,
        outcome: outcome.kind(),
        sniff_failure: outcome.sniff_failure(),
        bytes_up,
        bytes_down,
    });
    let spliced = transfer.spliced.load(Ordering::Relaxed);
    let ms = u64::try_from(record.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let sni = record.sni.as_deref().unwrap_or("-");
    let route = record.route.as_deref().unwrap_or("-");
    let tenant = record.tenant.as_deref().unwrap_or("-");
    let mode = record.mode.unwrap_or("-");
    let upstream = record.upstream.as_deref().unwrap_or("-");
    let listener = &*name;
    let (id, client) = (record.id, record.client);
    tracing::info!(target: RECORD_TARGET, id, listener, %client, sni, tenant, route, mode, upstream, bytes_up, bytes_down, spliced, ms, %outcome, "connection");
}

/// Where [`proxy`] leaves a connection.
pub(crate) enum Proxied {
    Ended(Outcome),
    /// A passthrough connection, introduced to its upstream, to be relayed.
    /// The relay runs in [`handle`] rather than here so that a connection
    /// relayed for hours keeps nothing of the routing in its task.
    Relay(TcpStream, TcpStream),
    /// A terminated connection, handshakes done, to be relayed likewise.
    Terminated(Box<Terminated>),
}

/// Takes a connection from sniffing through routing to its end, or, for a
/// passthrough, to the point where [`handle`] relays it. Returning
/// `Ended` drops (closes) the client socket.
/// `client` comes with its local address when the listener knows it (see
/// [`read_front`]).
pub(crate) async fn proxy(
    client: (TcpStream, Option<SocketAddr>),
    listener: &Arc<Listener>,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Proxied {
    // Boxed, like `terminate` below: freed before the relay starts.
    let mut front = match Box::pin(read_front(client, listener, record)).await {
        Ok(front) => front,
        Err(outcome) => return Proxied::Ended(outcome),
    };
    record.sni.clone_from(&front.hello.sni);
    // A CA validating one of weir's own ACME orders: answered here, never
    // routed. Any other `acme-tls/1` connection (an upstream's own order,
    // behind passthrough) is routed like the rest.
    if front.protocol == wit::Protocol::Tls
        && let [protocol] = front.hello.alpn.as_slice()
        && protocol == crate::acme::ACME_TLS_ALPN
        && let Some(challenge) = front
            .hello
            .sni
            .as_deref()
            .and_then(|sni| snapshot.acme_challenges().get(sni))
    {
        record.mode = Some("acme-challenge");
        return Proxied::Ended(Box::pin(answer_acme_challenge(front, challenge, &listener.config)).await);
    }
    let conn = wit::Connection {
        id: record.id,
        listener: listener.name.to_string(),
        tenant: None,
        client: record.client.into(),
        local: front.local_addr.into(),
        protocol: front.protocol,
        sni: front.hello.sni.clone(),
        alpn: std::mem::take(&mut front.hello.alpn),
        tls_versions: std::mem::take(&mut front.hello.versions),
    };
    let mut conn = conn;
    let tenant = snapshot.tenant_for(conn.sni.as_deref()).cloned();
    record.tenant_slot = match &tenant {
        None => None,
        Some(tenant) => {
            conn.tenant = Some(tenant.name.to_string());
            record.tenant = Some(Arc::clone(&tenant.name));
            match tenant.admit_connection() {
                Ok(slot) => Some(slot),
                Err(reason) => {
                    crate::metrics::METRICS.tenant_limited(&tenant.name);
                    record.route = Some("tenant-limit".into());
                    front.refuse(listener, ALERT_INTERNAL_ERROR, &reason).await;
                    return Proxied::Ended(Outcome::Rejected(reason));
                }
            }
        }
    };
    // Boxed like the sniffing: an asynchronous plugin call's state (the
    // wasm call's future) would otherwise size every connection's task, for
    // the connection's whole life.
    let conn = Arc::new(conn);
    let mut routing = Box::pin(snapshot.route(listener, tenant.as_deref(), &conn)).await;
    if !routing.pending.is_empty() {
        crate::plugin::shadow::spawn(std::mem::take(&mut routing.pending), &conn);
    }
    let refusal_alert = match (routing.plugin.is_some(), routing.failed()) {
        (_, true) => ALERT_INTERNAL_ERROR,
        (true, false) => ALERT_ACCESS_DENIED,
        (false, false) => ALERT_UNRECOGNIZED_NAME,
    };
    let Decision { route, action } = routing.decision;
    record.route = Some(route);
    let tenant = tenant.as_deref();
    carry_out(action, front, conn, refusal_alert, listener, tenant, snapshot, record).await
}

/// Does what the decision says: refuses, passes through, terminates or
/// originates.
#[allow(clippy::too_many_arguments)]
async fn carry_out(
    action: Action,
    mut front: Front,
    conn: Arc<wit::Connection>,
    refusal_alert: u8,
    listener: &Arc<Listener>,
    tenant: Option<&Tenant>,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Proxied {
    match action {
        Action::Reject(reason) => {
            front.refuse(listener, refusal_alert, &reason).await;
            Proxied::Ended(Outcome::Rejected(reason))
        }
        Action::Passthrough(target) => {
            record.mode = Some("passthrough");
            passthrough(front, &target, listener, tenant, snapshot, record).await
        }
        // Boxed, so that the task's own allocation is sized for the
        // passthrough relay, not for a TLS handshake.
        Action::Terminate(termination) => {
            match Box::pin(terminate(front, conn, &termination, listener, tenant, snapshot, record)).await {
                Ok(streams) => Proxied::Terminated(Box::new(streams)),
                Err(outcome) => Proxied::Ended(outcome),
            }
        }
        Action::Originate(origination) => {
            let originating = originate(front, conn, &origination, listener, tenant, snapshot, record);
            match Box::pin(originating).await {
                Ok(streams) => Proxied::Terminated(Box::new(streams)),
                Err(outcome) => Proxied::Ended(outcome),
            }
        }
    }
}

/// A listener's timeouts for a relayed connection.
pub(crate) fn relay_timeouts(config: &ListenerConfig) -> Timeouts {
    Timeouts {
        idle: config.idle_timeout,
        half_close: config.half_close_timeout,
    }
}
