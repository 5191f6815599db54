//! Passthrough: the sniffed bytes replayed to the upstream, then relayed
//! untouched.

use std::sync::atomic::Ordering;

use tokio::io::AsyncWriteExt;

use crate::conn::Proxied;
use crate::conn::dial::open_upstream;
use crate::conn::front::{ALERT_INTERNAL_ERROR, Front};
use crate::conn::outcome::{Outcome, Record};
use crate::plugin::decision::Target;
use crate::snapshot::{Listener, Snapshot, Tenant};
use crate::wit;

/// Passthrough: connect, introduce the client (PROXY header; for PostgreSQL
/// TLS, weir's own SSLRequest, which must be answered `S`), replay the sniffed
/// bytes; the caller relays.
pub(crate) async fn passthrough(
    mut front: Front,
    target: &Target,
    listener: &Listener,
    tenant: Option<&Tenant>,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Proxied {
    let ssl_request = front.protocol == wit::Protocol::PostgresTls;
    // Boxed for the same reason as the sniffing: the connect attempts'
    // state would otherwise set the size of every connection's task.
    let connecting = open_upstream(
        target,
        ssl_request,
        front.local_addr,
        None,
        listener,
        tenant,
        snapshot,
        record,
    );
    let mut upstream = match Box::pin(connecting).await {
        Ok(upstream) => upstream,
        Err(outcome) => {
            front
                .refuse(listener, ALERT_INTERNAL_ERROR, "no upstream is reachable")
                .await;
            return Proxied::Ended(outcome);
        }
    };
    if let Err(e) = upstream.write_all(&front.sniffed).await {
        return Proxied::Ended(Outcome::Io(e));
    }
    record
        .transfer
        .client_to_upstream
        .fetch_add(front.sniffed.len() as u64, Ordering::Relaxed);
    Proxied::Relay(front.into_client(), upstream)
}
