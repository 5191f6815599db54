//! The renewal task: every certificate with `acme` looked at each minute
//! (every 2 s while another node orders one), ordered when due, taken from
//! the fleet when another node issued it, retried with a growing wait
//! after a failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{
    AcmeState, CHECK_EVERY, CHECK_HELD_EVERY, Coordinator, LastOrder, MAX_RETRY, OrderResult, Renewing, Taken, ari,
    needs_order, order, read_leaf,
};
use crate::config::{AcmeConfig, CertificateConfig, Config};

/// What one look at a certificate came to.
#[derive(Debug, PartialEq, Eq)]
enum Looked {
    /// Nothing to do until the next pass.
    Nothing,
    /// Its files changed: the gateway reloads.
    Changed,
    /// Another node orders it, or the fleet could not be asked: look again soon.
    Soon,
}

/// What the task keeps from one pass to the next.
struct Renewals {
    node: String,
    fleet: Arc<dyn Coordinator>,
    /// Per certificate: when to try again after a failure, and the wait after that.
    retry: HashMap<String, (tokio::time::Instant, Duration)>,
    /// Per certificate another node orders (that node), or the fleet could
    /// not be asked (`!` and why): said once, not at every look.
    held_by: HashMap<String, String>,
    windows: ari::Ari,
}

/// Keeps every ACME certificate of the gateway's config ordered and
/// renewed, reloading the gateway after each issue; orders are recorded
/// as made by `node`, and `fleet` says which node orders. Runs until
/// dropped.
pub async fn run(gateway: Arc<impl Renewing>, node: String, fleet: Arc<dyn Coordinator>) {
    let mut renewals = Renewals {
        node,
        fleet,
        retry: HashMap::new(),
        held_by: HashMap::new(),
        windows: ari::Ari::default(),
    };
    loop {
        let (config, state) = gateway.current();
        renewals.windows.retain(&config);
        renewals.retry.retain(|name, _| config.certificates.contains_key(name));
        renewals
            .held_by
            .retain(|name, _| config.certificates.contains_key(name));
        let (mut changed, mut soon) = (false, false);
        for (name, certificate) in &config.certificates {
            match renewals.look(name, certificate, &config, &state).await {
                Looked::Nothing => {}
                Looked::Changed => changed = true,
                Looked::Soon => soon = true,
            }
        }
        if changed {
            gateway.reload().await;
        }
        tokio::time::sleep(if soon { CHECK_HELD_EVERY } else { CHECK_EVERY }).await;
    }
}

impl Renewals {
    /// Why `name` is due now (by its files, or by the CA's window), and the
    /// certificate a window's renewal replaces.
    async fn due(
        &mut self,
        name: &str,
        certificate: &CertificateConfig,
        acme: &AcmeConfig,
        config: &Config,
        state: &AcmeState,
    ) -> Option<(String, Option<instant_acme::CertificateIdentifier<'static>>)> {
        let (cert, key) = (config.resolve(&certificate.cert), config.resolve(&certificate.key));
        if let Some(reason) = needs_order(&cert, &key, acme) {
            return Some((reason, None));
        }
        let leaf = read_leaf(&cert).ok()?;
        let due = self.windows.due(name, certificate, acme, config, &leaf).await;
        let mut known = crate::sync::lock(&state.windows);
        known.retain(|name, _| config.certificates.contains_key(name));
        match self.windows.renew_at(name) {
            Some(at) => known.insert(name.to_owned(), at),
            None => known.remove(name),
        };
        due.map(|due| (due.reason, Some(due.replaces)))
    }

    /// Looks at the certificate `name`: orders it if it is due and this
    /// node may, or takes what the fleet issued.
    async fn look(
        &mut self,
        name: &str,
        certificate: &CertificateConfig,
        config: &Config,
        state: &AcmeState,
    ) -> Looked {
        let Some(acme) = &certificate.acme else {
            return Looked::Nothing;
        };
        if self
            .retry
            .get(name)
            .is_some_and(|(at, _)| tokio::time::Instant::now() < *at)
        {
            return Looked::Nothing;
        }
        let Some((reason, replaces)) = self.due(name, certificate, acme, config, state).await else {
            return Looked::Nothing;
        };
        let cert = config.resolve(&certificate.cert);
        let have = std::fs::read_to_string(&cert).ok();
        match self.fleet.take(name, acme, have.as_deref()).await {
            Taken::Order => {}
            Taken::Held(holder) => {
                if self.held_by.get(name) != Some(&holder) {
                    tracing::info!(
                        certificate = name,
                        node = holder.as_str(),
                        "another node is ordering the certificate"
                    );
                    self.held_by.insert(name.to_owned(), holder);
                }
                return Looked::Soon;
            }
            Taken::Unavailable(error) => {
                let said = format!("!{error}");
                if self.held_by.get(name) != Some(&said) {
                    tracing::warn!(certificate = name, %error, "the fleet cannot be asked who orders; trying again");
                    self.held_by.insert(name.to_owned(), said);
                }
                return Looked::Soon;
            }
            Taken::Issued(shared, last) => {
                self.held_by.remove(name);
                if let Some(last) = last {
                    state.orders.record(name, last, config);
                }
                return match shared.write(certificate, config) {
                    Ok(()) => {
                        tracing::info!(certificate = name, file = %cert.display(), "certificate taken from the fleet");
                        Looked::Changed
                    }
                    Err(error) => {
                        tracing::error!(certificate = name, %error, "the fleet's certificate cannot be kept");
                        Looked::Nothing
                    }
                };
            }
        }
        self.held_by.remove(name);
        tracing::info!(certificate = name, domains = ?acme.domains, challenge = acme.challenge.as_str(), reason, "ordering a certificate over ACME");
        let ordered = order(name, certificate, config, &state.challenges, &*self.fleet, replaces).await;
        let last = LastOrder {
            at: crate::clock::unix_now(),
            result: if ordered.is_ok() {
                OrderResult::Issued
            } else {
                OrderResult::Failed
            },
            error: ordered.as_ref().err().map(ToString::to_string),
            node: self.node.clone(),
        };
        state.orders.record(name, last.clone(), config);
        self.fleet.finish(name, ordered.as_ref().ok(), &last).await;
        match ordered {
            Ok(_) => {
                tracing::info!(certificate = name, file = %cert.display(), "certificate issued");
                self.retry.remove(name);
                Looked::Changed
            }
            Err(error) => {
                let wait = self
                    .retry
                    .get(name)
                    .map_or(CHECK_EVERY, |(_, wait)| (*wait * 2).min(MAX_RETRY));
                tracing::error!(certificate = name, %error, retry_in = ?wait, "ACME order failed");
                self.retry
                    .insert(name.to_owned(), (tokio::time::Instant::now() + wait, wait));
                Looked::Nothing
            }
        }
    }
}
