//! Certificates from an ACME CA (RFC 8555), validated with TLS-ALPN-01
//! (RFC 8737) on weir's own TLS listeners or with DNS-01 through a
//! `[dns.NAME]` provider ([`dns`]).
//!
//! A `[certificates.NAME]` entry with `acme` names where the certificate is
//! kept (`cert`, `key`). [`run`] looks at those files every minute; when one
//! is missing or expires within `renew_before`, it orders a new certificate:
//! for each name the CA sends a TLS connection offering only the ALPN
//! protocol `acme-tls/1`, and the gateway answers it with a challenge
//! certificate from [`Challenges`] instead of routing it. The issued chain
//! and key are written over the files and the gateway reloads, so the
//! certificate is used like any other. A failed order is retried after a
//! minute, then at doubling intervals up to an hour.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rustls::sign::CertifiedKey;

use crate::config::{AcmeConfig, CertificateConfig, Challenge, Config};

pub mod dns;

/// The ALPN protocol of TLS-ALPN-01 validation connections.
pub const ACME_TLS_ALPN: &str = "acme-tls/1";

/// How often the certificate files are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(60);
/// Longest wait before retrying a failed order.
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// Longest an order may take, CA round trips and validation included.
const ORDER_TIMEOUT: Duration = Duration::from_secs(600);

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA refused or failed a request.
    #[error("{0}")]
    Protocol(#[from] instant_acme::Error),
    /// The account credentials or the certificate could not be stored.
    #[error("{path}: {error}")]
    Storage {
        /// The file.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The order ended in another state than the one expected.
    #[error("{0}")]
    Order(String),
    /// A DNS-01 record could not be published or was not seen.
    #[error("[dns.{provider}]: {error}")]
    Dns {
        /// The `[dns.NAME]` provider.
        provider: String,
        /// What went wrong.
        error: String,
    },
}

/// What the ACME task shares with the gateway, carried across reloads:
/// the open TLS-ALPN-01 challenges, and each certificate's last order.
#[derive(Debug, Default)]
pub struct AcmeState {
    /// Challenge certificates the listeners answer `acme-tls/1` with.
    pub challenges: Challenges,
    /// The last order of each certificate.
    pub orders: Orders,
}

/// How a certificate's last order went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LastOrder {
    /// When it ended, in seconds since the Unix epoch.
    pub at: u64,
    /// `issued` or `failed`.
    pub result: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The node that ordered it.
    pub node: String,
}

/// The last order of each certificate, by name; only names of the config
/// in force are kept.
#[derive(Debug, Default)]
pub struct Orders(Mutex<BTreeMap<String, LastOrder>>);

impl Orders {
    /// The last order of `name`.
    pub fn get(&self, name: &str) -> Option<LastOrder> {
        crate::sync::lock(&self.0).get(name).cloned()
    }

    fn record(&self, name: &str, order: LastOrder, config: &Config) {
        let mut orders = crate::sync::lock(&self.0);
        orders.retain(|name, _| config.certificates.contains_key(name));
        orders.insert(name.to_owned(), order);
    }
}

/// When `certificate` is due for its next order: `renew_before` ahead of
/// its expiry, or now when its files are missing or unreadable.
pub fn next_renewal(certificate: &CertificateConfig, config: &Config) -> Option<SystemTime> {
    let acme = certificate.acme.as_ref()?;
    let leaf = read_leaf(&config.resolve(&certificate.cert)).ok()?;
    let not_after = weir_attest::x509::not_after(&leaf).ok()?;
    Some(
        not_after
            .checked_sub(acme.renew_before)
            .unwrap_or(SystemTime::UNIX_EPOCH),
    )
}

/// The first certificate of the PEM chain at `cert`.
fn read_leaf(cert: &Path) -> Result<rustls::pki_types::CertificateDer<'static>, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    CertificateDer::pem_file_iter(cert)
        .map_err(|e| e.to_string())
        .and_then(|mut chain| {
            chain
                .next()
                .ok_or_else(|| "no certificate in it".to_owned())?
                .map_err(|e| e.to_string())
        })
}

/// Challenge certificates by server name, while their orders are open.
#[derive(Debug, Default)]
pub struct Challenges(Mutex<HashMap<String, Arc<CertifiedKey>>>);

impl Challenges {
    /// The challenge certificate for `name`, while its validation is open.
    pub fn get(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        crate::sync::lock(&self.0).get(name).cloned()
    }

    fn set(&self, name: &str, key: Arc<CertifiedKey>) {
        crate::sync::lock(&self.0).insert(name.to_owned(), key);
    }

    fn clear(&self, names: &[String]) {
        let mut challenges = crate::sync::lock(&self.0);
        for name in names {
            challenges.remove(name);
        }
    }
}

/// An order's challenges, withdrawn when the order ends however it ends
/// (success, failure, or its timeout dropping it midway).
struct OpenChallenges<'a> {
    challenges: &'a Challenges,
    names: &'a [String],
}

impl Drop for OpenChallenges<'_> {
    fn drop(&mut self) {
        self.challenges.clear(self.names);
    }
}

/// The TLS-ALPN-01 certificate for `name`: self-signed, for that name only,
/// with the SHA-256 of the key authorization in its critical
/// `acmeIdentifier` extension.
fn challenge_certificate(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(str::to_owned)?;
    let signer = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// Why `cert` needs a new order, or `None` while it is good for longer than
/// `renew_before`.
pub fn needs_order(cert: &Path, key: &Path, renew_before: Duration) -> Option<String> {
    if !key.exists() {
        return Some(format!("{} does not exist", key.display()));
    }
    let not_after = match read_leaf(cert).and_then(|leaf| weir_attest::x509::not_after(&leaf)) {
        Ok(not_after) => not_after,
        Err(e) => return Some(format!("{}: {e}", cert.display())),
    };
    let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
    (left < renew_before).then(|| format!("it expires in {} days", left.as_secs() / 86_400))
}

/// Writes `data` to `path` through a temporary file and a rename, so that
/// a reader sees the old file or the new one, never a part; `private`
/// files are readable by the owner only.
fn replace_file(path: &Path, data: &[u8], private: bool) -> Result<(), AcmeError> {
    use std::io::Write as _;
    let storage = |error| AcmeError::Storage {
        path: path.display().to_string(),
        error,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(storage)?;
    }
    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary).map_err(storage)?;
    file.write_all(data).map_err(storage)?;
    file.sync_all().map_err(storage)?;
    std::fs::rename(&temporary, path).map_err(storage)
}

/// The account for `acme`: from its credentials file, or created at the CA
/// and saved there.
async fn account(acme: &AcmeConfig, config: &Config, cert: &Path) -> Result<Account, AcmeError> {
    let builder = || match &acme.directory_ca {
        Some(roots) => Account::builder_with_root(config.resolve(roots)),
        None => Account::builder(),
    };
    let file = config.resolve(&acme.account_file(cert));
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Ok(credentials) = serde_json::from_str::<AccountCredentials>(&text)
    {
        return Ok(builder()?.from_credentials(credentials).await?);
    }
    let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
    let new = NewAccount {
        contact: &contact,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, credentials) = builder()?.create(&new, acme.directory.clone(), None).await?;
    let text = serde_json::to_vec_pretty(&credentials).map_err(|e| AcmeError::Order(e.to_string()))?;
    replace_file(&file, &text, true)?;
    Ok(account)
}

/// Orders the certificate `certificate` describes, answering its
/// challenges (TLS-ALPN-01 through `challenges`, DNS-01 through its
/// `[dns.NAME]` provider), and writes it to its files. Whatever was
/// published for the order is withdrawn however it ends, its timeout
/// included.
pub async fn order(certificate: &CertificateConfig, config: &Config, challenges: &Challenges) -> Result<(), AcmeError> {
    let Some(acme) = &certificate.acme else {
        return Ok(());
    };
    let open = OpenChallenges {
        challenges,
        names: &acme.domains,
    };
    let mut published = Vec::new();
    let ordered = tokio::time::timeout(
        ORDER_TIMEOUT,
        issue(certificate, acme, config, challenges, &mut published),
    )
    .await
    .unwrap_or_else(|_| Err(AcmeError::Order(format!("not done within {ORDER_TIMEOUT:?}"))));
    drop(open);
    if let Some(dns) = acme.dns.as_ref().and_then(|name| config.dns.get(name)) {
        for txt in &published {
            if let Err(error) = dns::change(dns, config, dns::Action::Cleanup, txt).await {
                tracing::warn!(fqdn = txt.fqdn.as_str(), %error, "a DNS-01 record could not be removed");
            }
        }
    }
    let (key, chain) = ordered?;
    replace_file(&config.resolve(&certificate.key), key.as_bytes(), true)?;
    replace_file(&config.resolve(&certificate.cert), chain.as_bytes(), false)?;
    Ok(())
}

/// The order itself: account, authorizations, finalization; the DNS-01
/// records it publishes are pushed on `published`.
async fn issue(
    certificate: &CertificateConfig,
    acme: &AcmeConfig,
    config: &Config,
    challenges: &Challenges,
    published: &mut Vec<dns::Txt>,
) -> Result<(String, String), AcmeError> {
    let account = account(acme, config, &certificate.cert).await?;
    let identifiers: Vec<Identifier> = acme.domains.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(AcmeError::Order(format!("an authorization is {other:?}"))),
        }
        let kind = match acme.challenge {
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            Challenge::Dns01 => ChallengeType::Dns01,
        };
        let mut challenge = authorization
            .challenge(kind)
            .ok_or_else(|| AcmeError::Order(format!("the CA offers no {} challenge", acme.challenge.as_str())))?;
        let Identifier::Dns(name) = challenge.identifier().identifier.clone() else {
            return Err(AcmeError::Order("an identifier is not a DNS name".into()));
        };
        match acme.challenge {
            Challenge::TlsAlpn01 => {
                let digest = challenge.key_authorization().digest();
                let key = challenge_certificate(&name, digest.as_ref()).map_err(AcmeError::Order)?;
                challenges.set(&name, Arc::new(key));
            }
            Challenge::Dns01 => {
                let provider = acme.dns.as_deref().unwrap_or_default();
                let dns = config
                    .dns
                    .get(provider)
                    .ok_or_else(|| AcmeError::Order(format!("no [dns.{provider}]")))?;
                let txt = dns::Txt::for_name(&name, challenge.key_authorization().dns_value());
                let failed = |error: String| AcmeError::Dns {
                    provider: provider.to_owned(),
                    error,
                };
                dns::change(dns, config, dns::Action::Present, &txt)
                    .await
                    .map_err(failed)?;
                published.push(txt.clone());
                dns::wait_visible(dns, std::slice::from_ref(&txt))
                    .await
                    .map_err(failed)?;
            }
        }
        challenge.set_ready().await?;
    }
    let status = order.poll_ready(&RetryPolicy::default()).await?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Order(format!("the order is {status:?}, not ready")));
    }
    let key = order.finalize().await?;
    let chain = order.poll_certificate(&RetryPolicy::default()).await?;
    Ok((key, chain))
}

/// What the renewal task needs of a gateway, and nothing more.
pub trait Renewing: Send + Sync {
    /// The config in force, and the state shared with the listeners and
    /// the admin API.
    fn current(&self) -> (Config, Arc<AcmeState>);
    /// Makes newly written certificates current.
    fn reload(&self) -> impl std::future::Future<Output = ()> + Send;
}

/// Keeps every ACME certificate of the gateway's config ordered and
/// renewed, reloading the gateway after each issue; orders are recorded
/// as made by `node`. Runs until dropped.
pub async fn run(gateway: Arc<impl Renewing>, node: String) {
    // Per certificate: when to try again after a failure, and the wait after that.
    let mut retry: HashMap<String, (tokio::time::Instant, Duration)> = HashMap::new();
    loop {
        let (config, state) = gateway.current();
        let config = &config;
        let mut issued = false;
        for (name, certificate) in &config.certificates {
            let Some(acme) = &certificate.acme else { continue };
            if retry.get(name).is_some_and(|(at, _)| tokio::time::Instant::now() < *at) {
                continue;
            }
            let (cert, key) = (config.resolve(&certificate.cert), config.resolve(&certificate.key));
            let Some(reason) = needs_order(&cert, &key, acme.renew_before) else {
                continue;
            };
            tracing::info!(certificate = name.as_str(), domains = ?acme.domains, reason, "ordering a certificate over ACME");
            let ordered = order(certificate, config, &state.challenges).await;
            let at = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let last = LastOrder {
                at,
                result: if ordered.is_ok() { "issued" } else { "failed" },
                error: ordered.as_ref().err().map(ToString::to_string),
                node: node.clone(),
            };
            state.orders.record(name, last, config);
            match ordered {
                Ok(()) => {
                    tracing::info!(certificate = name.as_str(), file = %cert.display(), "certificate issued");
                    retry.remove(name);
                    issued = true;
                }
                Err(error) => {
                    let wait = retry
                        .get(name)
                        .map_or(CHECK_EVERY, |(_, wait)| (*wait * 2).min(MAX_RETRY));
                    tracing::error!(certificate = name.as_str(), %error, retry_in = ?wait, "ACME order failed");
                    retry.insert(name.clone(), (tokio::time::Instant::now() + wait, wait));
                }
            }
        }
        if issued {
            gateway.reload().await;
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_ordered_when_missing_or_due() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = (dir.path().join("site.pem"), dir.path().join("site-key.pem"));
        let day = Duration::from_secs(86_400);
        assert!(needs_order(&cert, &key, day).is_some_and(|why| why.contains("does not exist")));

        let signer = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2000, 1, 1);
        let expired = params.self_signed(&signer).expect("certificate");
        std::fs::write(&key, signer.serialize_pem()).expect("write");
        std::fs::write(&cert, expired.pem()).expect("write");
        assert_eq!(needs_order(&cert, &key, day).as_deref(), Some("it expires in 0 days"));

        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        std::fs::write(&cert, params.self_signed(&signer).expect("certificate").pem()).expect("write");
        assert_eq!(needs_order(&cert, &key, 30 * day), None);
        assert!(needs_order(&cert, &key, 100 * 365 * day).is_some_and(|why| why.starts_with("it expires in")));

        std::fs::write(&cert, "garbage").expect("write");
        assert!(needs_order(&cert, &key, day).is_some());
    }

    #[test]
    fn the_challenge_certificate_carries_the_key_authorization_digest() {
        let digest = [7u8; 32];
        let key = challenge_certificate("a.test", &digest).expect("certificate");
        let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).expect("parses");
        // id-pe-acmeIdentifier, critical, an OCTET STRING of the digest.
        let extension = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(extension.critical);
        assert_eq!(extension.value, [&[0x04, 32][..], &digest].concat());
        let sans = weir_attest::x509::describe(&key.cert[0]).expect("describes").sans;
        assert_eq!(sans, ["a.test"]);
    }
}
