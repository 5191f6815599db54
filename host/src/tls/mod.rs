//! TLS at the gateway: certificates and trust anchors loaded from the config,
//! server configs for terminated connections (certificate by name or by SNI,
//! client authentication ending in the plugins' `admit`), and client configs
//! for re-encryption (CA bundle, pinned fingerprints, client certificate).
//!
//! Resumption is bound to what a session was issued under: every distinct
//! termination (listener, certificates, client authentication, ALPN) gets its
//! own session cache and ticket key, and one snapshot's are never shared with
//! another's. A ticket therefore cannot carry a client past a different
//! route's client authentication, a changed CA, or a reload.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::clock::unix_seconds;

use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use weir_attest::{AttestationPolicy, Verifier};
use weir_plugin_sdk::names::{self, Pattern};

use crate::config::tls::{Invalid, ListenerSettings, base_provider, parse_pin};
use crate::config::{CaConfig, CertificateConfig, Config};
use crate::metrics::CertificateStatus;
use crate::plugin::decision::ClientAuth;
use crate::tls::build::Candidates;

/// The signature checks of a rustls verifier that holds its provider's
/// `algorithms` (`WebPkiSupportedAlgorithms`): one definition for the
/// verifiers that do not delegate to a webpki verifier.
macro_rules! signatures_by_algorithms {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

mod build;
mod client_verifier;
mod server_verifier;

pub use build::facts;
pub use client_verifier::{Admission, describe};

/// Sessions kept per termination for ID-based (TLS 1.2) resumption.
const SESSION_CACHE_SIZE: usize = 4096;
/// Most distinct terminations whose configs are kept per tenant (and for the
/// listeners' own chains); beyond this a config is built per connection (and
/// cannot resume). Per tenant, so that one tenant's decisions, however
/// varied, cannot take another's place in the cache.
const MAX_CACHED_CONFIGS: usize = 128;

/// Cached server configs by tenant (`None`: the listeners' chains), then by
/// termination.
type ServerConfigs = HashMap<Option<Arc<str>>, HashMap<ServerKey, ServerEntry>>;

/// A named certificate and the names it covers.
#[derive(Debug)]
struct Certificate {
    name: Arc<str>,
    key: Arc<CertifiedKey>,
    /// The same with its OCSP response, and until when that is current.
    stapled: Option<(Arc<CertifiedKey>, Option<SystemTime>)>,
    not_after: SystemTime,
}

impl Certificate {
    /// What a handshake presents now: with the OCSP response while it is
    /// current, without it once it is stale.
    fn current(&self) -> &Arc<CertifiedKey> {
        match &self.stapled {
            Some((stapled, until)) if until.is_none_or(|until| SystemTime::now() < until) => stapled,
            _ => &self.key,
        }
    }
}

/// How long before a certificate expires weir starts warning at each load.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// A named trust anchor.
#[derive(Debug)]
struct Ca {
    roots: Option<Arc<RootCertStore>>,
    pins: Vec<[u8; 32]>,
}

/// Which certificates a termination may present, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ServerKey {
    listener: Arc<str>,
    certificates: Vec<Arc<str>>,
    client_auth: ClientAuth,
    alpn: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    ca: Option<String>,
    client_cert: Option<String>,
    alpn: Vec<Vec<u8>>,
    attested: bool,
}

/// A server config and what a per-connection variant needs from it.
#[derive(Clone)]
struct ServerEntry {
    /// Picks the cipher suite by weir's order.
    config: Arc<ServerConfig>,
    /// The same, following the client's order (for clients that put
    /// ChaCha20 first).
    client_order: Arc<ServerConfig>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    resolver: Arc<Candidates>,
    /// Set for attested client authentication.
    attestation: Option<Arc<AttestationPolicy>>,
}

/// An upstream client config and the verifier it was built with.
type CachedClient = (Arc<ClientConfig>, Arc<dyn ServerCertVerifier>);

/// Certificates and trust anchors from one config, and the rustls configs
/// built from them as connections need them.
pub struct TlsMaterial {
    certificates: BTreeMap<String, Arc<Certificate>>,
    exact: HashMap<String, Vec<Arc<Certificate>>>,
    wildcard: HashMap<String, Vec<Arc<Certificate>>>,
    cas: BTreeMap<String, Ca>,
    attestation: Arc<AttestationPolicy>,
    /// Server configs by tenant (`None`: the listeners' chains), then by
    /// termination.
    servers: Mutex<ServerConfigs>,
    /// Upstream client configs, with the verifier each was built with (a
    /// connection's copy wraps it to run the chain's `admit` inside the
    /// handshake).
    clients: Mutex<HashMap<ClientKey, CachedClient>>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("certificates", &self.certificates.keys().collect::<Vec<_>>())
            .field("cas", &self.cas.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Loads every certificate and trust anchor the config names. Errors name
    /// the field and say what is wrong (unreadable file, no certificate in
    /// it, a key that does not match, ...).
    pub fn load(config: &Config) -> Result<TlsMaterial, Invalid> {
        let provider = base_provider();
        let mut material = TlsMaterial {
            certificates: BTreeMap::new(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            cas: BTreeMap::new(),
            attestation: Arc::default(),
            servers: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
        };
        let collateral: Vec<_> = config
            .attestation
            .collateral
            .iter()
            .map(|f| config.resolve(f))
            .collect();
        let verifier = Verifier::load(&collateral).map_err(|e| Invalid::new("attestation.collateral", e))?;
        material.attestation = Arc::new(AttestationPolicy::new(verifier, config.attestation.allow_debug));
        for (name, cert) in &config.certificates {
            let Some((certificate, names)) = load_certificate(config, &provider, name, cert)? else {
                continue;
            };
            for pattern in names {
                let index = match pattern {
                    Pattern::Exact(name) => material.exact.entry(name),
                    Pattern::Wildcard(suffix) => material.wildcard.entry(suffix),
                };
                index.or_default().push(Arc::clone(&certificate));
            }
            material.certificates.insert(name.clone(), certificate);
        }
        for (name, ca) in &config.cas {
            material.cas.insert(name.clone(), load_ca(config, name, ca)?);
        }
        Ok(material)
    }

    /// How RA-TLS attestations are checked.
    pub fn attestation(&self) -> &Arc<AttestationPolicy> {
        &self.attestation
    }

    /// Every certificate's expiry and OCSP state, by name.
    pub fn certificate_status(&self) -> Vec<CertificateStatus> {
        self.certificates
            .values()
            .map(|c| CertificateStatus {
                name: c.name.to_string(),
                not_after: unix_seconds(c.not_after),
                ocsp_next_update: c.stapled.as_ref().and_then(|(_, until)| until.map(unix_seconds)),
                ocsp_stapled: c.current().ocsp.is_some(),
            })
            .collect()
    }

    /// Whether a certificate of this name exists.
    pub fn has_certificate(&self, name: &str) -> bool {
        self.certificates.contains_key(name)
    }

    /// Whether a trust anchor of this name exists, and whether it has a CA
    /// bundle (needed to verify client certificates).
    pub fn ca(&self, name: &str) -> Option<bool> {
        self.cas.get(name).map(|ca| ca.roots.is_some())
    }

    /// The certificates for a server name: exact names first, then one-label
    /// wildcards.
    fn by_sni(&self, sni: &str) -> Option<&Vec<Arc<Certificate>>> {
        self.exact.get(sni).or_else(|| {
            let (_, parent) = names::split_first_label(sni)?;
            self.wildcard.get(parent)
        })
    }
}

/// A loaded certificate and the names it covers.
type Loaded = (Arc<Certificate>, Vec<Pattern>);

/// Loads one certificate, its key and its OCSP response; `None` for an ACME
/// certificate not issued yet. Returns the names it covers too.
fn load_certificate(
    config: &Config,
    provider: &CryptoProvider,
    name: &str,
    cert: &CertificateConfig,
) -> Result<Option<Loaded>, Invalid> {
    let field = |f: &str| format!("certificates.{name}.{f}");
    let cert_path = config.resolve(&cert.cert);
    if cert.acme.is_some() && !(cert_path.exists() && config.resolve(&cert.key).exists()) {
        tracing::info!(
            certificate = %name,
            "no certificate yet: it is served once its ACME order is issued"
        );
        return Ok(None);
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(Iterator::collect)
        .map_err(|e| Invalid::new(field("cert"), format!("{}: {e}", cert_path.display())))?;
    let Some(leaf) = chain.first() else {
        return Err(Invalid::new(
            field("cert"),
            format!("{}: no certificate in the file", cert_path.display()),
        ));
    };
    let names = dns_names(leaf).map_err(|e| Invalid::new(field("cert"), format!("{}: {e}", cert_path.display())))?;
    let key_path = config.resolve(&cert.key);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        let reason = match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no private key in the file".to_owned(),
            other => other.to_string(),
        };
        Invalid::new(field("key"), format!("{}: {reason}", key_path.display()))
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| Invalid::new(field("key"), format!("{}: {e}", key_path.display())))?;
    let not_after = weir_attest::x509::not_after(leaf)
        .map_err(|e| Invalid::new(field("cert"), format!("{}: {e}", cert_path.display())))?;
    warn_of_expiry(name, not_after);
    let staple = load_staple(config, name, cert, &chain)?;
    let certified = CertifiedKey::new(chain, key);
    certified
        .keys_match()
        .map_err(|e| Invalid::new(field("key"), format!("{}: {e}", key_path.display())))?;
    let stapled = staple.map(|staple| {
        let mut with = certified.clone();
        with.ocsp = Some(staple.der);
        (Arc::new(with), staple.next_update)
    });
    let certificate = Arc::new(Certificate {
        name: name.into(),
        key: Arc::new(certified),
        stapled,
        not_after,
    });
    Ok(Some((certificate, names)))
}

/// The certificate's OCSP response, checked; `None` without one, or while it
/// is stale.
fn load_staple(
    config: &Config,
    name: &str,
    cert: &CertificateConfig,
    chain: &[CertificateDer<'static>],
) -> Result<Option<weir_attest::ocsp::Staple>, Invalid> {
    let field = |f: &str| format!("certificates.{name}.{f}");
    let now = SystemTime::now();
    let staple = match &cert.ocsp {
        None => None,
        Some(file) => {
            let path = config.resolve(file);
            let der =
                std::fs::read(&path).map_err(|e| Invalid::new(field("ocsp"), format!("{}: {e}", path.display())))?;
            let staple = weir_attest::ocsp::check(&der, chain, now)
                .map_err(|e| Invalid::new(field("ocsp"), format!("{}: {e}", path.display())))?;
            match staple.next_update {
                Some(next) if next <= now => {
                    tracing::warn!(
                        certificate = %name,
                        file = %path.display(),
                        next_update = %weir_attest::ocsp::rfc3339(next),
                        "the OCSP response is stale: not stapled until a newer one is in place"
                    );
                    None
                }
                _ => Some(staple),
            }
        }
    };
    Ok(staple)
}

/// Loads one trust anchor: its CA bundle, its pins.
fn load_ca(config: &Config, name: &str, ca: &CaConfig) -> Result<Ca, Invalid> {
    let field = format!("cas.{name}.file");
    let roots = match &ca.file {
        None => None,
        Some(file) => {
            let path = config.resolve(file);
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
                .and_then(Iterator::collect)
                .map_err(|e| Invalid::new(field.clone(), format!("{}: {e}", path.display())))?;
            let mut store = RootCertStore::empty();
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|e| Invalid::new(field.clone(), format!("{}: {e}", path.display())))?;
            }
            if store.is_empty() {
                return Err(Invalid::new(
                    field,
                    format!("{}: no certificate in the file", path.display()),
                ));
            }
            Some(Arc::new(store))
        }
    };
    // `Config::check` proved every pin parses.
    let pins = ca.pin_sha256.iter().filter_map(|p| parse_pin(p).ok()).collect();
    Ok(Ca { roots, pins })
}

/// Why a terminated connection could not get a server config.
#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
    /// No certificate was named and none covers the server name.
    #[error("no certificate covers {}", .0.as_deref().map_or_else(|| "a connection without SNI".to_owned(), |s| format!("`{s}`")))]
    NoCertificate(Option<String>),
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Config(String),
}

/// The system's CA certificates, loaded once.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(loaded.certs);
            match added {
                0 => Err("no system CA certificates found; name a CA for the upstream".into()),
                _ => Ok(Arc::new(store)),
            }
        })
        .clone()
}

/// DNS names (SANs) a certificate covers, as patterns; names that are no
/// valid pattern are left out.
fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<Pattern>, String> {
    let names = weir_attest::x509::dns_names(der)?;
    Ok(names.iter().filter_map(|name| Pattern::parse(name).ok()).collect())
}
/// Logs a certificate that has expired (an error: clients refuse it) or
/// expires within [`EXPIRY_WARNING`].
fn warn_of_expiry(name: &str, not_after: SystemTime) {
    let at = weir_attest::ocsp::rfc3339(not_after);
    match not_after.duration_since(SystemTime::now()) {
        Err(_) => {
            tracing::error!(certificate = name, not_after = %at, "the certificate has expired: clients will refuse it")
        }
        Ok(left) if left < EXPIRY_WARNING => tracing::warn!(
            certificate = name,
            not_after = %at,
            days = left.as_secs() / 86_400,
            "the certificate expires soon"
        ),
        Ok(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ocsp_response_is_stapled_only_while_it_is_current() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["ocsp.test".into()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let signer = base_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::try_from(key.serialize_der()).expect("key"))
            .expect("signer");
        let plain = CertifiedKey::new(vec![cert.der().clone()], signer);
        let mut with = plain.clone();
        with.ocsp = Some(b"response".to_vec());
        let now = SystemTime::now();
        let certificate = |until: Option<SystemTime>| Certificate {
            name: "site".into(),
            key: Arc::new(plain.clone()),
            stapled: Some((Arc::new(with.clone()), until)),
            not_after: now,
        };
        let stapled = |c: &Certificate| c.current().ocsp.is_some();
        assert!(stapled(&certificate(Some(now + Duration::from_secs(60)))));
        assert!(stapled(&certificate(None)), "a response without nextUpdate");
        assert!(
            !stapled(&certificate(Some(now - Duration::from_secs(1)))),
            "a stale response"
        );
    }
}
