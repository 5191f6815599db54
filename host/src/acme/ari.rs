//! ACME Renewal Information (RFC 9773): a CA that offers it says, per
//! certificate, the window in which to renew it (earlier than usual when
//! it is about to revoke it). weir asks for a certificate's window when the
//! CA's directory has `renewalInfo`, picks a time in it at random (RFC 9773
//! §4.2, so that a fleet's renewals spread), asks again after the CA's
//! `Retry-After`, and renews once the time has come — saying, in the new
//! order, which certificate it `replaces`. A CA without it leaves
//! `renew_before` alone to decide.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use instant_acme::{AccountCredentials, CertificateIdentifier};
use rustls::pki_types::CertificateDer;

use super::order::builder;
use crate::config::{AcmeConfig, CertificateConfig, Config};

/// Shortest and longest wait before asking for a window again, whatever
/// the CA's `Retry-After` says.
const ASK_AT_LEAST: Duration = Duration::from_secs(600);
const ASK_AT_MOST: Duration = Duration::from_secs(24 * 3600);
/// Wait before asking again after a failed request.
const ASK_AFTER_FAILURE: Duration = Duration::from_secs(3600);
/// Longest a request for a window may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// The window of one certificate, as last asked.
struct Window {
    /// The certificate it is for (SHA-256 of its DER).
    leaf: [u8; 32],
    /// When to renew; `None`: the CA offers no window.
    renew_at: Option<SystemTime>,
    ask_again: tokio::time::Instant,
}

/// The renewal windows of the gateway's certificates.
#[derive(Default)]
pub(super) struct Ari {
    windows: HashMap<String, Window>,
}

/// Why a certificate is due by its window, and the certificate to name as
/// replaced.
pub(super) struct Due {
    pub reason: String,
    pub replaces: CertificateIdentifier<'static>,
}

impl Ari {
    /// When `name` is to be renewed by its window, if the CA gave one.
    pub fn renew_at(&self, name: &str) -> Option<SystemTime> {
        self.windows.get(name)?.renew_at
    }

    /// Forgets certificates `config` no longer has.
    pub fn retain(&mut self, config: &Config) {
        self.windows.retain(|name, _| config.certificates.contains_key(name));
    }

    /// Whether `leaf`, `name`'s certificate, is due by the window its CA
    /// gives (asked at most as often as the CA allows); `None` without an
    /// account yet, without ARI at the CA, or before the window.
    pub async fn due(
        &mut self,
        name: &str,
        certificate: &CertificateConfig,
        acme: &AcmeConfig,
        config: &Config,
        leaf: &CertificateDer<'_>,
    ) -> Option<Due> {
        let fingerprint: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, leaf)
            .as_ref()
            .try_into()
            .ok()?;
        let now = tokio::time::Instant::now();
        let fresh = self
            .windows
            .get(name)
            .is_some_and(|w| w.leaf == fingerprint && now < w.ask_again);
        if !fresh {
            let (renew_at, ask_in) = ask(certificate, acme, config, leaf).await;
            let window = Window {
                leaf: fingerprint,
                renew_at,
                ask_again: now + ask_in,
            };
            self.windows.insert(name.to_owned(), window);
        }
        let renew_at = self.windows.get(name)?.renew_at?;
        if SystemTime::now() < renew_at {
            return None;
        }
        let replaces = CertificateIdentifier::try_from(leaf).ok()?.into_owned();
        let since = crate::clock::unix_seconds(renew_at);
        Some(Due {
            reason: format!("the CA's renewal window (ARI) has opened: renew from {since} (Unix seconds)"),
            replaces,
        })
    }
}

/// Asks the CA for `leaf`'s window: a time in it, and when to ask again.
async fn ask(
    certificate: &CertificateConfig,
    acme: &AcmeConfig,
    config: &Config,
    leaf: &CertificateDer<'_>,
) -> (Option<SystemTime>, Duration) {
    let file = config.resolve(&acme.account_file(&certificate.cert));
    let Some(credentials) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|text| serde_json::from_str::<AccountCredentials>(&text).ok())
    else {
        return (None, ASK_AFTER_FAILURE);
    };
    let asked = async {
        let account = builder(acme, config)?.from_credentials(credentials).await?;
        let id = CertificateIdentifier::try_from(leaf).map_err(|e| instant_acme::Error::Other(e.into()))?;
        account.renewal_info(&id).await
    };
    let asked = tokio::time::timeout(ASK_TIMEOUT, asked)
        .await
        .unwrap_or(Err(instant_acme::Error::Str("no answer in time")));
    match asked {
        Ok((info, retry_after)) => {
            let (start, end) = (
                SystemTime::from(info.suggested_window.start),
                SystemTime::from(info.suggested_window.end),
            );
            (Some(pick(start, end)), retry_after.clamp(ASK_AT_LEAST, ASK_AT_MOST))
        }
        Err(instant_acme::Error::Unsupported(_)) => (None, ASK_AT_MOST),
        Err(error) => {
            tracing::debug!(%error, "the CA's renewal information could not be read");
            (None, ASK_AFTER_FAILURE)
        }
    }
}

/// A time in `[start, end)` chosen at random (`start` if the window is empty).
fn pick(start: SystemTime, end: SystemTime) -> SystemTime {
    use ring::rand::SecureRandom as _;
    let width = end.duration_since(start).unwrap_or_default();
    let mut bytes = [0u8; 8];
    if width.is_zero() || ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return start;
    }
    let fraction = u64::from_le_bytes(bytes) as f64 / u64::MAX as f64;
    start + width.mul_f64(fraction.min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_time_lies_in_its_window() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(86_400);
        let picks: Vec<SystemTime> = (0..64).map(|_| pick(start, end)).collect();
        assert!(picks.iter().all(|t| *t >= start && *t <= end));
        // Spread, not one time for every node.
        assert!(picks.iter().any(|t| *t != picks[0]));
        assert_eq!(pick(end, start), end);
    }
}
