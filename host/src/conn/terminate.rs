//! Termination: the TLS handshake with the client (certificate chosen,
//! client certificate admitted), then plain or re-encrypted to the upstream.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::conn::dial::open_upstream;
use crate::conn::front::{ALERT_INTERNAL_ERROR, ALERT_UNRECOGNIZED_NAME, Front, linger_close};
use crate::conn::outcome::{Outcome, Record};
use crate::plugin::decision::{After, ClientAuth, Termination, UpstreamTls};
use crate::relay::{RelayEnd, Timeouts, Transfer, relay_streams};
use crate::rewind::Rewind;
use crate::snapshot::{Listener, Snapshot, Tenant};
use crate::tls::{Admission, TerminateError, describe};
use crate::wit;

/// The two sides of a terminated connection, ready to relay. (Carried
/// boxed, in [`Proxied::Terminated`], so its variants' sizes matter little.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Terminated {
    Plain(tokio_rustls::server::TlsStream<Rewind<TcpStream>>, TcpStream),
    Reencrypted(
        tokio_rustls::server::TlsStream<Rewind<TcpStream>>,
        tokio_rustls::client::TlsStream<TcpStream>,
    ),
    /// A plain client, and the TLS weir opened to its upstream.
    Originated(TcpStream, tokio_rustls::client::TlsStream<TcpStream>),
}

impl Terminated {
    pub(crate) async fn relay(self, timeouts: Timeouts, transfer: &Transfer) -> std::io::Result<RelayEnd> {
        match self {
            Terminated::Plain(client, upstream) => relay_streams(client, upstream, timeouts, transfer).await,
            Terminated::Reencrypted(client, upstream) => relay_streams(client, upstream, timeouts, transfer).await,
            Terminated::Originated(client, upstream) => relay_streams(client, upstream, timeouts, transfer).await,
        }
    }
}

/// Termination: TLS handshake with the client (client authentication and
/// `admit` inside it), then plain or re-encrypted to the target.
pub(crate) async fn terminate(
    mut front: Front,
    conn: Arc<wit::Connection>,
    termination: &Termination,
    listener: &Arc<Listener>,
    tenant: Option<&Tenant>,
    snapshot: &Snapshot,
    record: &mut Record,
) -> Result<Terminated, Outcome> {
    let chain = tenant.map_or(listener.chain(), Tenant::chain);
    let reencrypting = matches!(termination.then, After::Reencrypt(..));
    record.mode = Some(if reencrypting { "reencrypt" } else { "terminate" });
    if !front.speaks_tls() {
        let reason = "the decision terminates TLS, but this client did not start TLS";
        front.refuse(listener, ALERT_INTERNAL_ERROR, reason).await;
        return Err(Outcome::Rejected(reason.into()));
    }
    let admission = match termination.client_auth {
        ClientAuth::None => None,
        _ => Some(Arc::new(Admission::new(chain, Arc::clone(&conn)))),
    };
    let local_addr = front.local_addr;
    let ssl_request = reencrypting && front.protocol == wit::Protocol::PostgresTls;
    let mut tls = handshake(front, termination, listener, tenant, snapshot, admission.as_ref()).await?;
    // The connection's server config (which rustls keeps) need not keep
    // the plugins alive once they have spoken.
    if let Some(admission) = &admission {
        admission.release();
    }
    let alpn: Vec<Vec<u8>> = tls
        .get_ref()
        .1
        .alpn_protocol()
        .map(<[u8]>::to_vec)
        .into_iter()
        .collect();
    let target = termination.then.target();
    let opening = open_upstream(
        target,
        ssl_request,
        local_addr,
        Some(tls.get_ref().1),
        listener,
        tenant,
        snapshot,
        record,
    );
    let upstream = match opening.await {
        Ok(upstream) => upstream,
        Err(outcome) => {
            close_tls(&mut tls).await;
            return Err(outcome);
        }
    };
    match &termination.then {
        After::Plain(_) => Ok(Terminated::Plain(tls, upstream)),
        After::Reencrypt(_, upstream_tls) => {
            match reencrypt(upstream, upstream_tls, &conn, &alpn, listener, chain, snapshot).await {
                Ok(upstream) => Ok(Terminated::Reencrypted(tls, upstream)),
                Err(outcome) => {
                    close_tls(&mut tls).await;
                    Err(outcome)
                }
            }
        }
    }
}

/// The handshake with the client, with the certificate the termination
/// names; with client authentication, `admit` runs inside it, or after it
/// for a resumed session (which skips verification).
async fn handshake(
    mut front: Front,
    termination: &Termination,
    listener: &Arc<Listener>,
    tenant: Option<&Tenant>,
    snapshot: &Snapshot,
    admission: Option<&Arc<Admission>>,
) -> Result<tokio_rustls::server::TlsStream<Rewind<TcpStream>>, Outcome> {
    let server_config = match snapshot.tls().server_config(
        &listener.name,
        &listener.tls,
        termination,
        &front.hello,
        tenant.map(|t| (&t.name, t.certificates())),
        admission.cloned(),
    ) {
        Ok(config) => config,
        Err(e) => {
            let alert = match e {
                TerminateError::NoCertificate(_) => ALERT_UNRECOGNIZED_NAME,
                TerminateError::Config(_) => ALERT_INTERNAL_ERROR,
            };
            front.refuse(listener, alert, &e.to_string()).await;
            return Err(Outcome::Rejected(e.to_string()));
        }
    };
    let config = &listener.config;
    let client = Rewind::new(std::mem::take(&mut front.sniffed), front.client);
    let accept = tokio_rustls::TlsAcceptor::from(server_config)
        .accept(client)
        .into_fallible();
    let mut tls = match tokio::time::timeout(config.handshake_timeout, accept).await {
        Err(_) => return Err(Outcome::HandshakeTimeout),
        Ok(Err((e, client))) => {
            // rustls has queued its alert; let it reach the client.
            linger_close(client).await;
            return Err(match admission.and_then(|a| a.outcome()) {
                Some(Err(reason)) => Outcome::Denied(reason),
                _ => Outcome::HandshakeFailed(e),
            });
        }
        Ok(Ok(tls)) => tls,
    };
    // A resumed session skips certificate verification, and with it the
    // `admit` inside the handshake: ask the plugins now.
    if let Some(admission) = &admission
        && admission.outcome().is_none()
        && let Some(cert) = tls.get_ref().1.peer_certificates().and_then(<[_]>::first)
    {
        let attestation =
            (termination.client_auth == ClientAuth::Attested).then(|| snapshot.tls().attestation().examine(cert));
        if let Err(reason) = admission.check(wit::Side::Client, describe(cert, attestation)) {
            close_tls(&mut tls).await;
            return Err(Outcome::Denied(reason));
        }
    }
    Ok(tls)
}

/// The TLS handshake with an upstream, the plugins' `admit` on its
/// certificate inside it (after it, for a resumed session).
pub(crate) async fn reencrypt(
    upstream: TcpStream,
    upstream_tls: &UpstreamTls,
    conn: &Arc<wit::Connection>,
    alpn: &[Vec<u8>],
    listener: &Listener,
    chain: &[Arc<crate::plugin::Plugin>],
    snapshot: &Snapshot,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Outcome> {
    let peer_ip = upstream.peer_addr().map(|a| a.ip());
    let name = match (&upstream_tls.server_name, &conn.sni, peer_ip) {
        (Some(name), _, _) | (None, Some(name), _) => ServerName::try_from(name.clone()),
        (None, None, Ok(ip)) => Ok(ServerName::IpAddress(ip.into())),
        (None, None, Err(e)) => return Err(Outcome::Io(e)),
    };
    let name = name.map_err(|e| Outcome::ConnectFailed(format!("upstream server name: {e}")))?;
    // The chain judges the upstream's certificate inside the handshake.
    let admission = Arc::new(Admission::new(chain, Arc::clone(conn)));
    let client_config = snapshot
        .tls()
        .client_config(upstream_tls, alpn, &admission)
        .map_err(|reason| Outcome::ConnectFailed(format!("upstream TLS: {reason}")))?;
    let connect = tokio_rustls::TlsConnector::from(client_config).connect(name, upstream);
    let handshake = tokio::time::timeout(listener.config.handshake_timeout, connect).await;
    // The connection's client config (which rustls keeps) need not keep
    // the plugins alive once they have spoken.
    admission.release();
    let tls = match handshake {
        Err(_) => return Err(Outcome::ConnectFailed("upstream TLS handshake timed out".into())),
        Ok(Err(e)) => {
            return Err(match admission.outcome() {
                Some(Err(reason)) => Outcome::Denied(format!("upstream: {reason}")),
                _ => Outcome::ConnectFailed(format!("upstream TLS handshake: {}", handshake_error(&e))),
            });
        }
        Ok(Ok(tls)) => tls,
    };
    if admission.outcome().is_some() {
        return Ok(tls);
    }
    // A resumed session skips certificate verification, and with it the
    // `admit` inside the handshake: ask the plugins now.
    let Some(cert) = tls.get_ref().1.peer_certificates().and_then(<[_]>::first) else {
        return Err(Outcome::ConnectFailed("the upstream presented no certificate".into()));
    };
    let attestation = upstream_tls
        .attested
        .then(|| snapshot.tls().attestation().examine(cert));
    let admitted = match describe(cert, attestation) {
        Ok(peer) => crate::plugin::chain::admit(chain, conn, wit::Side::Upstream, &Arc::new(peer)).await,
        Err(reason) => Err(reason),
    };
    match admitted {
        Ok(()) => Ok(tls),
        Err(reason) => Err(Outcome::Denied(format!("upstream: {reason}"))),
    }
}

/// A failed handshake in words: rustls shows a certificate refusal that
/// carries weir's own reason (a failed RA-TLS key binding, a chain over
/// its bounds) as Rust debug output; this says the reason itself.
pub(crate) fn handshake_error(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error, OtherError};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Other(OtherError(reason)))) => {
            format!("invalid peer certificate: {reason}")
        }
        _ => e.to_string(),
    }
}

/// Sends close_notify and FIN to a TLS client that will not be served,
/// briefly: a client that does not read cannot hold the task.
pub(crate) async fn close_tls<S: AsyncWriteExt + Unpin>(tls: &mut S) {
    let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
}
