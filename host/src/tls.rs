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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use weir_attest::{AttestationPolicy, Verifier};
use weir_plugin_sdk::hex;
use weir_plugin_sdk::names::{self, Pattern};

use crate::config::{Config, ListenerTls, TlsVersion};
use crate::decision::{ClientAuth, Termination, UpstreamTls};
use crate::wit;

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

/// A field of the config and what is wrong with it.
pub type Invalid = (String, String);

static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The crypto provider everything here uses.
fn base_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A listener's TLS settings, resolved.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    provider: Arc<CryptoProvider>,
    versions: &'static [&'static SupportedProtocolVersion],
    alpn: Vec<Vec<u8>>,
}

/// Checks a listener's TLS settings and resolves them. Errors name the field
/// under `tls`.
pub fn check_listener(tls: &ListenerTls) -> Result<ListenerSettings, Invalid> {
    let invalid = |field: &str, reason: String| (field.to_owned(), reason);
    let versions: &'static [&'static SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => rustls::ALL_VERSIONS,
        TlsVersion::Tls13 => TLS13_ONLY,
    };
    let mut provider = base_provider();
    if !tls.cipher_suites.is_empty() {
        let mut suites = Vec::new();
        for name in &tls.cipher_suites {
            let found = rustls::crypto::ring::ALL_CIPHER_SUITES
                .iter()
                .find(|s| s.suite().as_str() == Some(name.as_str()));
            match found {
                Some(suite) => suites.push(*suite),
                None => {
                    let known: Vec<&str> = rustls::crypto::ring::ALL_CIPHER_SUITES
                        .iter()
                        .filter_map(|s| s.suite().as_str())
                        .collect();
                    return Err(invalid(
                        "cipher_suites",
                        format!("unknown cipher suite `{name}` (known: {})", known.join(", ")),
                    ));
                }
            }
        }
        if !suites.iter().any(|s| versions.contains(&s.version())) {
            return Err(invalid(
                "cipher_suites",
                "none of these suites works with the TLS versions min_version allows".into(),
            ));
        }
        provider.cipher_suites = suites;
    }
    let alpn = alpn_list(&tls.alpn).map_err(|reason| invalid("alpn", reason))?;
    Ok(ListenerSettings {
        provider: Arc::new(provider),
        versions,
        alpn,
    })
}

/// ALPN protocol names as bytes; each must be 1 to 255 bytes.
pub fn alpn_list(names: &[String]) -> Result<Vec<Vec<u8>>, String> {
    names
        .iter()
        .map(|name| match name.len() {
            1..=255 => Ok(name.as_bytes().to_vec()),
            len => Err(format!("ALPN protocol names are 1 to 255 bytes, got {len}")),
        })
        .collect()
}

/// Parses a SHA-256 fingerprint written as hex, with or without colons.
pub fn parse_pin(text: &str) -> Result<[u8; 32], String> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    let bad = || format!("`{text}` is not a SHA-256 fingerprint (64 hex digits, colons allowed)");
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(digits.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

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

/// What the admin API and the metrics say about a certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateStatus {
    /// Its name in the config.
    pub name: String,
    /// The end-entity certificate's notAfter, seconds since the Unix epoch.
    pub not_after: u64,
    /// Its OCSP response's nextUpdate (seconds since the Unix epoch), if
    /// one is stapled and says.
    pub ocsp_next_update: Option<u64>,
    /// Whether an OCSP response is stapled right now.
    pub ocsp_stapled: bool,
}

/// How long before a certificate expires weir starts warning at each load.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

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
    alpn: Option<Vec<u8>>,
    attested: bool,
}

/// A server config and what a per-connection variant needs from it.
#[derive(Clone)]
struct ServerEntry {
    config: Arc<ServerConfig>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    resolver: Arc<Candidates>,
    /// Set for attested client authentication.
    attestation: Option<Arc<AttestationPolicy>>,
}

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
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
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
        let verifier = Verifier::load(&collateral).map_err(|e| ("attestation.collateral".to_owned(), e))?;
        material.attestation = Arc::new(AttestationPolicy::new(verifier, config.attestation.allow_debug));
        for (name, cert) in &config.certificates {
            let field = |f: &str| format!("certificates.{name}.{f}");
            let cert_path = config.resolve(&cert.cert);
            if cert.acme.is_some() && !(cert_path.exists() && config.resolve(&cert.key).exists()) {
                tracing::info!(
                    certificate = %name,
                    "no certificate yet: it is served once its ACME order is issued"
                );
                continue;
            }
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
                .and_then(Iterator::collect)
                .map_err(|e| (field("cert"), format!("{}: {e}", cert_path.display())))?;
            let Some(leaf) = chain.first() else {
                return Err((
                    field("cert"),
                    format!("{}: no certificate in the file", cert_path.display()),
                ));
            };
            let names = dns_names(leaf).map_err(|e| (field("cert"), format!("{}: {e}", cert_path.display())))?;
            let key_path = config.resolve(&cert.key);
            let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
                let reason = match e {
                    rustls::pki_types::pem::Error::NoItemsFound => "no private key in the file".to_owned(),
                    other => other.to_string(),
                };
                (field("key"), format!("{}: {reason}", key_path.display()))
            })?;
            let key = provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| (field("key"), format!("{}: {e}", key_path.display())))?;
            let not_after = weir_attest::x509::not_after(leaf)
                .map_err(|e| (field("cert"), format!("{}: {e}", cert_path.display())))?;
            warn_of_expiry(name, not_after);
            let now = SystemTime::now();
            let staple = match &cert.ocsp {
                None => None,
                Some(file) => {
                    let path = config.resolve(file);
                    let der = std::fs::read(&path).map_err(|e| (field("ocsp"), format!("{}: {e}", path.display())))?;
                    let staple = weir_attest::ocsp::check(&der, &chain, now)
                        .map_err(|e| (field("ocsp"), format!("{}: {e}", path.display())))?;
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
            let certified = CertifiedKey::new(chain, key);
            certified
                .keys_match()
                .map_err(|e| (field("key"), format!("{}: {e}", key_path.display())))?;
            let stapled = staple.map(|staple| {
                let mut with = certified.clone();
                with.ocsp = Some(staple.der);
                (Arc::new(with), staple.next_update)
            });
            let certificate = Arc::new(Certificate {
                name: name.as_str().into(),
                key: Arc::new(certified),
                stapled,
                not_after,
            });
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
            let field = format!("cas.{name}.file");
            let roots = match &ca.file {
                None => None,
                Some(file) => {
                    let path = config.resolve(file);
                    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
                        .and_then(Iterator::collect)
                        .map_err(|e| (field.clone(), format!("{}: {e}", path.display())))?;
                    let mut store = RootCertStore::empty();
                    for cert in certs {
                        store
                            .add(cert)
                            .map_err(|e| (field.clone(), format!("{}: {e}", path.display())))?;
                    }
                    if store.is_empty() {
                        return Err((field, format!("{}: no certificate in the file", path.display())));
                    }
                    Some(Arc::new(store))
                }
            };
            // `Config::check` proved every pin parses.
            let pins = ca.pin_sha256.iter().filter_map(|p| parse_pin(p).ok()).collect();
            material.cas.insert(name.clone(), Ca { roots, pins });
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

    /// The server config for a terminated connection. With client
    /// authentication the config is this connection's own, so that the
    /// plugins' `admit` runs inside the handshake (a deny is an alert); its
    /// session cache and ticket key are still the termination's.
    pub fn server_config(
        &self,
        listener: &Arc<str>,
        settings: &ListenerSettings,
        termination: &Termination,
        sni: Option<&str>,
        tenant: Option<(&Arc<str>, &std::collections::BTreeSet<String>)>,
        admission: Option<Arc<Admission>>,
    ) -> Result<Arc<ServerConfig>, TerminateError> {
        let (owner, allowed) = match tenant {
            Some((name, certificates)) => (Some(Arc::clone(name)), Some(certificates)),
            None => (None, None),
        };
        let certificates: Vec<Arc<Certificate>> = match &termination.certificate {
            // Validation proved the name exists (and is the tenant's).
            Some(name) => self.certificates.get(name).cloned().into_iter().collect(),
            None => {
                let found: Vec<Arc<Certificate>> = sni
                    .and_then(|sni| self.by_sni(sni))
                    .into_iter()
                    .flatten()
                    .filter(|c| allowed.is_none_or(|allowed| allowed.contains(&*c.name)))
                    .cloned()
                    .collect();
                if found.is_empty() {
                    return Err(TerminateError::NoCertificate(sni.map(str::to_owned)));
                }
                found
            }
        };
        let alpn = match termination.alpn.is_empty() {
            true => settings.alpn.clone(),
            false => termination.alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
        };
        let key = ServerKey {
            listener: Arc::clone(listener),
            certificates: certificates.iter().map(|c| Arc::clone(&c.name)).collect(),
            client_auth: termination.client_auth.clone(),
            alpn,
        };
        let cached = crate::sync::lock(&self.servers)
            .get(&owner)
            .and_then(|configs| configs.get(&key))
            .cloned();
        let entry = match cached {
            Some(entry) => entry,
            None => {
                let entry = self.build_server(settings, &key, certificates)?;
                let mut servers = crate::sync::lock(&self.servers);
                let configs = servers.entry(owner).or_default();
                if configs.len() < MAX_CACHED_CONFIGS {
                    configs.insert(key, entry.clone());
                }
                entry
            }
        };
        match (entry.verifier, admission) {
            (Some(verifier), Some(admission)) => {
                let verifier = Arc::new(Admitting {
                    inner: verifier,
                    admission: Some(admission),
                    attestation: entry.attestation,
                });
                let mut config = ServerConfig::builder_with_provider(Arc::clone(&settings.provider))
                    .with_protocol_versions(settings.versions)
                    .map_err(|e| TerminateError::Config(e.to_string()))?
                    .with_client_cert_verifier(verifier)
                    .with_cert_resolver(entry.resolver);
                config.alpn_protocols.clone_from(&entry.config.alpn_protocols);
                config.session_storage = Arc::clone(&entry.config.session_storage);
                config.ticketer = Arc::clone(&entry.config.ticketer);
                Ok(Arc::new(config))
            }
            _ => Ok(entry.config),
        }
    }

    fn build_server(
        &self,
        settings: &ListenerSettings,
        key: &ServerKey,
        certificates: Vec<Arc<Certificate>>,
    ) -> Result<ServerEntry, TerminateError> {
        let config_error = |e: rustls::Error| TerminateError::Config(e.to_string());
        let provider = Arc::clone(&settings.provider);
        let verifier: Option<Arc<dyn ClientCertVerifier>> = match &key.client_auth {
            ClientAuth::None => None,
            ClientAuth::Attested => Some(Arc::new(AttestedClient {
                algorithms: provider.signature_verification_algorithms,
            })),
            ClientAuth::Optional(ca) | ClientAuth::Required(ca) => {
                let roots = self
                    .cas
                    .get(ca)
                    .and_then(|ca| ca.roots.clone())
                    .ok_or_else(|| TerminateError::Config(format!("CA `{ca}` has no `file`")))?;
                let builder = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider));
                let builder = match key.client_auth {
                    ClientAuth::Optional(_) => builder.allow_unauthenticated(),
                    _ => builder,
                };
                Some(builder.build().map_err(|e| TerminateError::Config(e.to_string()))?)
            }
        };
        let resolver = Arc::new(Candidates(certificates));
        let builder = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(settings.versions)
            .map_err(config_error)?;
        let builder = match &verifier {
            Some(verifier) => builder.with_client_cert_verifier(Arc::clone(verifier)),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols.clone_from(&key.alpn);
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(config_error)?;
        Ok(ServerEntry {
            config: Arc::new(config),
            verifier,
            resolver,
            attestation: (key.client_auth == ClientAuth::Attested).then(|| Arc::clone(&self.attestation)),
        })
    }

    /// The client config for re-encrypting to an upstream, offering `alpn`
    /// (the protocol negotiated with the client, if any).
    pub fn client_config(&self, upstream: &UpstreamTls, alpn: Option<&[u8]>) -> Result<Arc<ClientConfig>, String> {
        let key = ClientKey {
            ca: upstream.ca.clone(),
            client_cert: upstream.client_cert.clone(),
            alpn: alpn.map(<[u8]>::to_vec),
            attested: upstream.attested,
        };
        if let Some(config) = crate::sync::lock(&self.clients).get(&key) {
            return Ok(Arc::clone(config));
        }
        let provider = Arc::new(base_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match &key.ca {
            None if key.attested => Arc::new(AttestedServer {
                policy: Arc::clone(&self.attestation),
                algorithms: provider.signature_verification_algorithms,
            }),
            None => WebPkiServerVerifier::builder_with_provider(system_roots()?, Arc::clone(&provider))
                .build()
                .map_err(|e| e.to_string())?,
            Some(name) => {
                let ca = self.cas.get(name).ok_or_else(|| format!("CA `{name}` vanished"))?;
                let chain = match &ca.roots {
                    Some(roots) => Some(
                        WebPkiServerVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(&provider))
                            .build()
                            .map_err(|e| e.to_string())?,
                    ),
                    None => None,
                };
                match (chain, ca.pins.is_empty()) {
                    (Some(chain), true) => chain,
                    (chain, _) => Arc::new(Pinned {
                        chain,
                        pins: ca.pins.clone(),
                        algorithms: provider.signature_verification_algorithms,
                    }),
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &key.client_cert {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let cert = self
                    .certificates
                    .get(name)
                    .ok_or_else(|| format!("certificate `{name}` vanished"))?;
                builder.with_client_cert_resolver(Arc::new(Presents(Arc::clone(&cert.key))))
            }
        };
        config.alpn_protocols = key.alpn.iter().cloned().collect();
        let config = Arc::new(config);
        let mut clients = crate::sync::lock(&self.clients);
        if clients.len() < MAX_CACHED_CONFIGS {
            clients.insert(key, Arc::clone(&config));
        }
        Ok(config)
    }
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

/// What a completed server handshake was, for a PROXY v2 header.
pub fn facts(conn: &rustls::ServerConnection) -> weir_wire::proxy_protocol::TlsFacts {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "",
    };
    // rustls spells TLS 1.3 suites `TLS13_...`; their IANA names are `TLS_...`.
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|suite| suite.suite().as_str())
        .map(|name| name.replacen("TLS13_", "TLS_", 1))
        .unwrap_or_default();
    let client_cn = conn.peer_certificates().and_then(<[_]>::first).map(|cert| {
        x509_parser::parse_x509_certificate(cert)
            .ok()
            .and_then(|(_, cert)| {
                cert.subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok().map(str::to_owned))
            })
            .unwrap_or_default()
    });
    weir_wire::proxy_protocol::TlsFacts {
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: version.into(),
        cipher,
        client_cn,
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    }
}

/// Picks, among certificates for one name, the first whose key can sign
/// with a scheme the client offers (so an ECDSA and an RSA certificate can
/// serve the same name).
#[derive(Debug)]
struct Candidates(Vec<Arc<Certificate>>);

impl ResolvesServerCert for Candidates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let schemes = hello.signature_schemes();
        self.0
            .iter()
            .find(|c| c.key.key.choose_scheme(schemes).is_some())
            .or_else(|| self.0.first())
            .map(|c| Arc::clone(c.current()))
    }
}

/// Presents one certificate to upstreams that ask for one.
#[derive(Debug)]
struct Presents(Arc<CertifiedKey>);

impl ResolvesClientCert for Presents {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies an upstream by pinned end-entity fingerprint, after its chain
/// when a CA bundle is also given. Without a bundle the pin is the whole
/// identity: names and validity dates are not checked.
#[derive(Debug)]
struct Pinned {
    chain: Option<Arc<WebPkiServerVerifier>>,
    pins: Vec<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(chain) = &self.chain {
            chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        }
        let seen = weir_attest::x509::fingerprint(end_entity);
        if self.pins.contains(&seen) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(refused(format!(
            "certificate SHA-256 {} is not pinned",
            hex::encode(&seen)
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The plugin chain's say on one connection's authenticated peers.
pub struct Admission {
    /// Emptied by [`Admission::release`] once the handshake is over.
    chain: Mutex<Vec<Arc<crate::plugin::Plugin>>>,
    conn: wit::Connection,
    outcome: Mutex<Option<Result<(), String>>>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("conn", &self.conn.id)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// `chain` will judge peers of `conn`.
    pub fn new(chain: &[Arc<crate::plugin::Plugin>], conn: wit::Connection) -> Admission {
        Admission {
            chain: Mutex::new(chain.to_vec()),
            conn,
            outcome: Mutex::new(None),
        }
    }

    /// Asks every plugin of the chain about a described peer (or records
    /// why it could not be described); the first refusal is the answer.
    /// Remembers the outcome.
    pub fn check(&self, side: wit::Side, peer: Result<wit::Peer, String>) -> Result<(), String> {
        let chain = crate::sync::lock(&self.chain).clone();
        let outcome = peer.and_then(|peer| crate::snapshot::admit_blocking(&chain, &self.conn, side, &peer));
        *crate::sync::lock(&self.outcome) = Some(outcome.clone());
        outcome
    }

    /// Lets the plugins go: the connection's server config outlives the
    /// handshake (rustls keeps it), and must not keep a replaced snapshot's
    /// plugins alive. A check after this admits by no plugin at all, so it
    /// is called only once the handshake and its checks are over.
    pub fn release(&self) {
        crate::sync::lock(&self.chain).clear();
    }

    /// What the last check said, if one ran.
    pub fn outcome(&self) -> Option<Result<(), String>> {
        crate::sync::lock(&self.outcome).clone()
    }
}

/// Client authentication that ends in the plugins' `admit`: after the CA
/// (or attestation) check passes, a plugin's deny fails the handshake with
/// `access_denied`.
#[derive(Debug)]
struct Admitting {
    inner: Arc<dyn ClientCertVerifier>,
    admission: Option<Arc<Admission>>,
    attestation: Option<Arc<AttestationPolicy>>,
}

impl ClientCertVerifier for Admitting {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_client_chain(end_entity, intermediates).map_err(refused)?;
        let verified =
            crate::snapshot::off_the_worker(|| self.inner.verify_client_cert(end_entity, intermediates, now))?;
        let Some(admission) = &self.admission else {
            return Ok(verified);
        };
        let attestation = self.attestation.as_ref().map(|policy| policy.examine(end_entity));
        match admission.check(wit::Side::Client, describe(end_entity, attestation)) {
            Ok(()) => Ok(verified),
            Err(_) => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A peer's description with its attestation, when it has one; an
/// attestation that failed its checks fails the description.
pub fn describe(
    der: &[u8],
    attestation: Option<Result<weir_attest::Attestation, String>>,
) -> Result<wit::Peer, String> {
    let peer = weir_attest::x509::describe(der)?;
    let attestation = attestation.transpose().map_err(|e| format!("RA-TLS: {e}"))?;
    Ok(wit::Peer::new(peer, attestation.map(wit::Attestation::from)))
}

/// RA-TLS client certificates: self-signed, so no chain to check; the
/// handshake's signature proves possession of the key, and the attestation
/// must bind that key. The full attestation check (debug policy, quote
/// verification) and the plugins' `admit` follow in [`Admitting`].
#[derive(Debug)]
struct AttestedClient {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AttestedClient {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        weir_attest::RaTls::from_certificate(end_entity).map_err(|e| refused(format!("RA-TLS: {e}")))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// RA-TLS upstreams: the certificate's attestation, fully checked, is its
/// identity (names and chains do not apply to a self-signed TD key).
#[derive(Debug)]
struct AttestedServer {
    policy: Arc<AttestationPolicy>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AttestedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.policy
            .examine(end_entity)
            .map_err(|e| refused(format!("RA-TLS: {e}")))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A certificate refused for `reason`.
/// Most intermediates a client may send with its certificate.
const MAX_CLIENT_INTERMEDIATES: usize = 8;
/// Most bytes of certificates a client may send.
const MAX_CLIENT_CHAIN_BYTES: usize = 32 * 1024;

/// Refuses a client certificate chain that no real client sends, before
/// any signature is checked: path building tries every intermediate whose
/// subject matches an issuer, so a leaf sent with dozens of self-signed
/// certificates named alike cost 100-120 ms of CPU per handshake (a real
/// chain, ~1 ms). At most 8 intermediates, 32 KiB in all, and no more than
/// two sharing a subject (a cross-signed intermediate and its twin).
fn check_client_chain(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Result<(), String> {
    if intermediates.len() > MAX_CLIENT_INTERMEDIATES {
        return Err(format!(
            "the client certificate came with {} intermediates (at most {MAX_CLIENT_INTERMEDIATES})",
            intermediates.len()
        ));
    }
    let bytes = end_entity.len() + intermediates.iter().map(|c| c.len()).sum::<usize>();
    if bytes > MAX_CLIENT_CHAIN_BYTES {
        return Err(format!(
            "the client certificate chain is {bytes} bytes (at most {MAX_CLIENT_CHAIN_BYTES})"
        ));
    }
    let mut subjects: Vec<&[u8]> = Vec::with_capacity(intermediates.len());
    let parsed: Vec<_> = intermediates
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .collect();
    for (_, cert) in &parsed {
        let subject = cert.tbs_certificate.subject.as_raw();
        if subjects.iter().filter(|s| **s == subject).count() >= 2 {
            return Err(format!(
                "the client certificate chain has more than two intermediates named `{}`",
                cert.tbs_certificate.subject
            ));
        }
        subjects.push(subject);
    }
    Ok(())
}

fn refused(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(std::io::Error::other(
        reason,
    )))))
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

    #[test]
    fn pins_parse_with_or_without_colons() {
        let plain = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let pin = parse_pin(plain).expect("valid");
        assert_eq!(pin[1], 0x11);
        assert_eq!(pin[31], 0xff);
        let colons: Vec<String> = plain
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into())
            .collect();
        assert_eq!(parse_pin(&colons.join(":")), Ok(pin));
        for bad in ["", "00", &plain[2..], &format!("{plain}00"), &plain.replace('0', "g")] {
            assert!(parse_pin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listener_settings_are_checked() {
        let ok = ListenerTls {
            min_version: TlsVersion::Tls13,
            cipher_suites: vec!["TLS13_CHACHA20_POLY1305_SHA256".into()],
            alpn: vec!["h2".into()],
        };
        let settings = check_listener(&ok).expect("valid");
        assert_eq!(settings.provider.cipher_suites.len(), 1);
        assert_eq!(settings.alpn, vec![b"h2".to_vec()]);
        let unknown = ListenerTls {
            cipher_suites: vec!["TLS_RSA_WITH_RC4_128_MD5".into()],
            ..ok.clone()
        };
        let (field, reason) = check_listener(&unknown).expect_err("unknown suite");
        assert_eq!(field, "cipher_suites");
        assert!(reason.contains("TLS_RSA_WITH_RC4_128_MD5"), "{reason}");
        let only12 = ListenerTls {
            cipher_suites: vec!["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into()],
            ..ok.clone()
        };
        assert!(check_listener(&only12).is_err());
        let empty_alpn = ListenerTls {
            alpn: vec![String::new()],
            ..ok
        };
        assert_eq!(check_listener(&empty_alpn).expect_err("empty").0, "alpn");
    }
}
