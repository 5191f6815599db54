//! Origination: weir opens TLS for a plain client — the egress side of an
//! attested path. The plugins' `admit` judges the upstream's certificate;
//! what the client sent so far is replayed inside the TLS.
//!
//! A PostgreSQL client (a StartupMessage on a `postgres` listener) is taken
//! to a PostgreSQL server's TLS in one of its two ways, as the decision's
//! `start` says: a ClientHello first (direct TLS, which PostgreSQL 17
//! accepts only with ALPN `postgresql`), or an SSLRequest first, as every
//! PostgreSQL server accepts. A decision that does not say (every 0.2.0
//! plugin's) gets direct TLS when it offers ALPN `postgresql` and an
//! SSLRequest when not; a client of another protocol gets direct TLS
//! unless the decision asks for the SSLRequest. Its first answer is
//! read before the relay starts, so a refusal the upstream only sends after
//! the handshake (a TLS 1.3 server judges the client's certificate after the
//! client has finished) reaches the client as an ErrorResponse with the
//! reason, not as a closed connection.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use weir_config::ListenerProtocol;
use weir_wire::postgres;

use crate::conn::dial::open_upstream;
use crate::conn::front::{ALERT_INTERNAL_ERROR, Front};
use crate::conn::outcome::{Outcome, Record};
use crate::conn::terminate::{Terminated, handshake_error, reencrypt};
use crate::plugin::decision::{Origination, TlsStart};
use crate::snapshot::{Listener, Snapshot, Tenant};
use crate::wit;

/// The ALPN protocol of PostgreSQL's direct TLS.
const POSTGRES_ALPN: &str = "postgresql";
/// Most bytes of the upstream's first answer read before the relay.
const FIRST_ANSWER: usize = 16 * 1024;

/// Opens TLS to the upstream for a plain client, replays what it sent, and
/// hands both to the relay; a failure is told to the client in its own
/// protocol (an ErrorResponse to a PostgreSQL client) before it is closed.
pub(crate) async fn originate(
    mut front: Front,
    conn: Arc<wit::Connection>,
    origination: &Origination,
    listener: &Arc<Listener>,
    tenant: Option<&Tenant>,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Result<Terminated, Outcome> {
    record.mode = Some("originate");
    if front.speaks_tls() {
        let reason = "the decision opens TLS for a plain client, but this client started TLS itself";
        front.refuse(listener, ALERT_INTERNAL_ERROR, reason).await;
        return Err(Outcome::Rejected(reason.into()));
    }
    match open(&mut front, &conn, origination, listener, tenant, snapshot, record).await {
        Ok((tls, answer)) => {
            let mut client = front.into_client();
            if !answer.is_empty() {
                // Bounded like the handshake: a client that does not read
                // cannot hold the task here.
                let write = tokio::time::timeout(listener.config.handshake_timeout, client.write_all(&answer));
                match write.await {
                    Ok(written) => written.map_err(Outcome::Io)?,
                    Err(_) => return Err(Outcome::Io(std::io::ErrorKind::TimedOut.into())),
                }
                record
                    .transfer
                    .upstream_to_client
                    .fetch_add(answer.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Terminated::Originated(client, tls))
        }
        Err(outcome) => {
            if let Outcome::ConnectFailed(reason) | Outcome::Denied(reason) = &outcome {
                front.refuse(listener, ALERT_INTERNAL_ERROR, reason).await;
            }
            Err(outcome)
        }
    }
}

/// The upstream's TLS, with the client's bytes replayed into it, and the
/// upstream's first answer when the client is PostgreSQL.
async fn open(
    front: &mut Front,
    conn: &Arc<wit::Connection>,
    origination: &Origination,
    listener: &Arc<Listener>,
    tenant: Option<&Tenant>,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Result<(TlsStream<TcpStream>, Vec<u8>), Outcome> {
    let postgres = listener.config.protocol == ListenerProtocol::Postgres;
    let ssl_request = match origination.start {
        Some(start) => start == TlsStart::PostgresSslRequest,
        None => postgres && !origination.alpn.iter().any(|p| p == POSTGRES_ALPN),
    };
    let chain = tenant.map_or(listener.chain(), Tenant::chain);
    let upstream = open_upstream(
        &origination.target,
        ssl_request,
        front.local_addr,
        None,
        listener,
        tenant,
        snapshot,
        record,
    )
    .await?;
    let alpn: Vec<Vec<u8>> = origination.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let mut tls = reencrypt(upstream, &origination.tls, conn, &alpn, listener, chain, snapshot).await?;
    tls.write_all(&front.sniffed).await.map_err(Outcome::Io)?;
    record
        .transfer
        .client_to_upstream
        .fetch_add(front.sniffed.len() as u64, std::sync::atomic::Ordering::Relaxed);
    if !postgres || postgres::is_cancel_request(&front.sniffed) {
        return Ok((tls, Vec::new()));
    }
    let mut answer = vec![0u8; FIRST_ANSWER];
    let read = tokio::time::timeout(listener.config.handshake_timeout, tls.read(&mut answer)).await;
    match read {
        Err(_) => Err(Outcome::ConnectFailed(
            "the upstream did not answer the StartupMessage within handshake_timeout".into(),
        )),
        Ok(Err(e)) => Err(refusal(&e)),
        Ok(Ok(0)) => Err(Outcome::ConnectFailed(
            "the upstream closed the connection before answering the StartupMessage".into(),
        )),
        Ok(Ok(n)) => {
            answer.truncate(n);
            Ok((tls, answer))
        }
    }
}

/// An error on the first read after the handshake: a TLS alert there is
/// the upstream refusing weir (its client certificate, most often).
fn refusal(e: &std::io::Error) -> Outcome {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => Outcome::Denied(format!(
            "upstream: it refused weir after the TLS handshake (alert {alert:?}): weir's client certificate \
             was not accepted there, and its log says why"
        )),
        _ => Outcome::ConnectFailed(format!("upstream TLS: {}", handshake_error(e))),
    }
}
