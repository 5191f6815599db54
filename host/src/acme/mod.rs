//! Certificates from an ACME CA (RFC 8555), validated with TLS-ALPN-01
//! (RFC 8737) on weir's own TLS listeners or with DNS-01 through a
//! `[dns.NAME]` provider ([`dns`]).
//!
//! A `[certificates.NAME]` entry with `acme` names where the certificate is
//! kept (`cert`, `key`). [`run`] looks at those files every minute; when one
//! is missing, expires within `renew_before`, names other domains or is due
//! by the CA's renewal window (ARI, RFC 9773), it orders a new certificate:
//! for each name the CA sends a TLS connection offering only the ALPN
//! protocol `acme-tls/1`, and the gateway answers it with a challenge
//! certificate from [`Challenges`] instead of routing it. The issued chain
//! and key are written over the files and the gateway reloads, so the
//! certificate is used like any other. A failed order is retried after a
//! minute, then at doubling intervals up to an hour.
//!
//! In a fleet, a [`Coordinator`] makes one node order at a time and shares
//! what it issued, its account and its open TLS-ALPN-01 challenges with the
//! others; on its own a node is its own [`Local`] coordinator.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

use crate::config::{AcmeConfig, CertificateConfig, Config};

mod ari;
pub mod dns;
mod order;
mod renew;
pub(crate) use order::challenge_certificate;
pub use order::order;
pub use renew::run;

/// The ALPN protocol of TLS-ALPN-01 validation connections.
pub const ACME_TLS_ALPN: &str = "acme-tls/1";

/// How often the certificate files are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(60);
/// How often a certificate another node is ordering is looked at again.
const CHECK_HELD_EVERY: Duration = Duration::from_secs(2);
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
    /// When the CA's renewal window (ARI) says to renew each certificate.
    pub windows: Mutex<BTreeMap<String, SystemTime>>,
}

/// How an order ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderResult {
    /// A certificate was issued.
    Issued,
    /// It failed (the error says why).
    Failed,
}

impl OrderResult {
    /// `issued` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderResult::Issued => "issued",
            OrderResult::Failed => "failed",
        }
    }
}

/// How a certificate's last order went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastOrder {
    /// When it ended, in seconds since the Unix epoch.
    pub at: u64,
    /// How it ended.
    pub result: OrderResult,
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

    /// Records `order` as the last of `name`, forgetting certificates
    /// `config` no longer has.
    pub fn record(&self, name: &str, order: LastOrder, config: &Config) {
        let mut orders = crate::sync::lock(&self.0);
        orders.retain(|name, _| config.certificates.contains_key(name));
        orders.insert(name.to_owned(), order);
    }
}

/// When the certificate `name` is due for its next order: `renew_before`
/// ahead of its expiry, or earlier if the CA's window (in `state`) says
/// so; `None` while it has no certificate.
pub fn next_renewal(
    name: &str,
    certificate: &CertificateConfig,
    config: &Config,
    state: &AcmeState,
) -> Option<SystemTime> {
    let acme = certificate.acme.as_ref()?;
    let leaf = read_leaf(&config.resolve(&certificate.cert)).ok()?;
    let not_after = weir_attest::x509::not_after(&leaf).ok()?;
    let by_age = not_after
        .checked_sub(acme.renew_before)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let window = crate::sync::lock(&state.windows).get(name).copied();
    Some(window.map_or(by_age, |at| at.min(by_age)))
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

    /// Answers `name`'s validation connections with `key`.
    pub(crate) fn set(&self, name: &str, key: Arc<CertifiedKey>) {
        crate::sync::lock(&self.0).insert(name.to_owned(), key);
    }

    /// Stops answering for `names`.
    pub(crate) fn clear(&self, names: &[String]) {
        let mut challenges = crate::sync::lock(&self.0);
        for name in names {
            challenges.remove(name);
        }
    }
}

/// Why the certificate kept in `cert` and `key` needs a new order, or
/// `None` while it is good for longer than `renew_before` and names the
/// configured domains.
pub fn needs_order(cert: &Path, key: &Path, acme: &AcmeConfig) -> Option<String> {
    if !key.exists() {
        return Some(format!("{} does not exist", key.display()));
    }
    match read_leaf(cert) {
        Ok(leaf) => due(&leaf, acme),
        Err(e) => Some(format!("{}: {e}", cert.display())),
    }
}

/// Why the certificate `leaf` is due for a new order under `acme`: it
/// expires within `renew_before`, or its names are not the domains.
pub fn due(leaf: &rustls::pki_types::CertificateDer<'_>, acme: &AcmeConfig) -> Option<String> {
    let not_after = match weir_attest::x509::not_after(leaf) {
        Ok(not_after) => not_after,
        Err(e) => return Some(e),
    };
    let mut names = weir_attest::x509::describe(leaf).map(|d| d.sans).unwrap_or_default();
    names.sort();
    let mut wanted = acme.domains.clone();
    wanted.sort();
    if names != wanted {
        return Some(format!("it is for {names:?}, not the domains {wanted:?}"));
    }
    let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
    (left < acme.renew_before).then(|| format!("it expires in {} days", left.as_secs() / 86_400))
}

/// An issued chain and its key, as PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// The chain, end-entity certificate first.
    pub chain: String,
    /// The private key.
    pub key: String,
}

impl Issued {
    /// Why it is due for a new order under `acme` (unreadable included).
    pub fn due(&self, acme: &AcmeConfig) -> Option<String> {
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        match CertificateDer::pem_slice_iter(self.chain.as_bytes()).next() {
            Some(Ok(leaf)) => due(&leaf, acme),
            _ => Some("the chain has no certificate".into()),
        }
    }

    /// Writes it over `certificate`'s files (the key readable by weir's
    /// user alone).
    pub fn write(&self, certificate: &CertificateConfig, config: &Config) -> Result<(), AcmeError> {
        replace_file(&config.resolve(&certificate.key), self.key.as_bytes(), true)?;
        replace_file(&config.resolve(&certificate.cert), self.chain.as_bytes(), false)
    }
}

/// What a node is told when it asks to order a certificate.
#[derive(Debug)]
pub enum Taken {
    /// It orders: the certificate is its own until [`Coordinator::finish`].
    Order,
    /// Another node (named) is ordering it.
    Held(String),
    /// The fleet has a certificate that is not due, and its last order.
    Issued(Issued, Option<LastOrder>),
    /// The fleet could not be asked (why).
    Unavailable(String),
}

/// A future a [`Coordinator`] returns.
pub type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Who else orders: in a fleet, one node orders a certificate at a time,
/// and every node shares what it issued, its account and its TLS-ALPN-01
/// challenges. Failures to share are the coordinator's to log; an order
/// goes on without them.
pub trait Coordinator: Send + Sync {
    /// Asks to order `certificate`, due under `acme` on this node, which
    /// has the chain `have` (PEM) if any: a certificate of the fleet's
    /// other than `have` and not due is to be taken instead.
    fn take<'a>(&'a self, certificate: &'a str, acme: &'a AcmeConfig, have: Option<&'a str>) -> Boxed<'a, Taken>;
    /// Ends an order taken: shares what it issued and how it went, and
    /// lets others order again.
    fn finish<'a>(&'a self, certificate: &'a str, issued: Option<&'a Issued>, last: &'a LastOrder) -> Boxed<'a, ()>;
    /// Has every node answer `name`'s TLS-ALPN-01 validation with `digest`;
    /// returns once they do (or a bounded wait is over).
    fn share_challenge<'a>(&'a self, certificate: &'a str, name: &'a str, digest: &'a [u8]) -> Boxed<'a, ()>;
    /// Withdraws every challenge shared for `certificate`.
    fn withdraw_challenges<'a>(&'a self, certificate: &'a str) -> Boxed<'a, ()>;
    /// The account credentials (JSON) the fleet uses for `certificate`.
    fn account<'a>(&'a self, certificate: &'a str) -> Boxed<'a, Option<String>>;
    /// Shares the account credentials for `certificate`.
    fn save_account<'a>(&'a self, certificate: &'a str, credentials: &'a str) -> Boxed<'a, ()>;
}

/// A node on its own: it always orders, and shares nothing.
pub struct Local;

impl Coordinator for Local {
    fn take<'a>(&'a self, _: &'a str, _: &'a AcmeConfig, _: Option<&'a str>) -> Boxed<'a, Taken> {
        Box::pin(async { Taken::Order })
    }
    fn finish<'a>(&'a self, _: &'a str, _: Option<&'a Issued>, _: &'a LastOrder) -> Boxed<'a, ()> {
        Box::pin(async {})
    }
    fn share_challenge<'a>(&'a self, _: &'a str, _: &'a str, _: &'a [u8]) -> Boxed<'a, ()> {
        Box::pin(async {})
    }
    fn withdraw_challenges<'a>(&'a self, _: &'a str) -> Boxed<'a, ()> {
        Box::pin(async {})
    }
    fn account<'a>(&'a self, _: &'a str) -> Boxed<'a, Option<String>> {
        Box::pin(async { None })
    }
    fn save_account<'a>(&'a self, _: &'a str, _: &'a str) -> Boxed<'a, ()> {
        Box::pin(async {})
    }
}

/// Writes `data` to `path` through a temporary file and a rename, so that
/// a reader sees the old file or the new one, never a part; `private`
/// files are readable by the owner only.
pub(crate) fn replace_file(path: &Path, data: &[u8], private: bool) -> Result<(), AcmeError> {
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

/// What the renewal task needs of a gateway, and nothing more.
pub trait Renewing: Send + Sync {
    /// The config in force, and the state shared with the listeners and
    /// the admin API.
    fn current(&self) -> (Config, Arc<AcmeState>);
    /// Makes newly written certificates current.
    fn reload(&self) -> impl std::future::Future<Output = ()> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_ordered_when_missing_or_due() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = (dir.path().join("site.pem"), dir.path().join("site-key.pem"));
        let day = Duration::from_secs(86_400);
        let acme = |renew_before: Duration| AcmeConfig {
            directory: "https://ca.test/dir".into(),
            domains: vec!["a.test".into()],
            contact: Vec::new(),
            directory_ca: None,
            account: None,
            renew_before,
            challenge: crate::config::Challenge::TlsAlpn01,
            dns: None,
        };
        let needs_order = |cert: &Path, key: &Path, renew_before: Duration| needs_order(cert, key, &acme(renew_before));
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

        let mut other = acme(day);
        other.domains.push("b.test".into());
        assert_eq!(
            super::needs_order(&cert, &key, &other).as_deref(),
            Some(r#"it is for ["a.test"], not the domains ["a.test", "b.test"]"#)
        );

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
