//! rustls configs built from the material for one decision — server configs
//! for terminations (cached per tenant), client configs for re-encryption —
//! and the resolvers that hand rustls the certificate to present.

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use crate::plugin::decision::{ClientAuth, Termination, UpstreamTls};
use crate::tls::client_verifier::{Admitting, AttestedClient};
use crate::tls::server_verifier::{AdmittingServer, AttestedServer, Pinned};
use crate::tls::{
    Admission, CachedClient, Certificate, ClientKey, ListenerSettings, MAX_CACHED_CONFIGS, SESSION_CACHE_SIZE,
    ServerEntry, ServerKey, TerminateError, TlsMaterial, base_provider, system_roots,
};

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
pub(crate) struct Candidates(Vec<Arc<Certificate>>);

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
pub(crate) struct Presents(Arc<CertifiedKey>);

impl ResolvesClientCert for Presents {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl TlsMaterial {
    /// The server config for a terminated connection. With client
    /// authentication the config is this connection's own, so that the
    /// plugins' `admit` runs inside the handshake (a deny is an alert); its
    /// session cache and ticket key are still the termination's. The cipher
    /// suite is weir's choice ([`PREFERENCE`](crate::config::tls::PREFERENCE)
    /// or the listener's `cipher_suites` order), unless the `hello` puts
    /// ChaCha20 first, when the client's order is followed.
    pub fn server_config(
        &self,
        listener: &Arc<str>,
        settings: &ListenerSettings,
        termination: &Termination,
        hello: &weir_wire::sniff::ClientHello,
        tenant: Option<(&Arc<str>, &std::collections::BTreeSet<String>)>,
        admission: Option<Arc<Admission>>,
    ) -> Result<Arc<ServerConfig>, TerminateError> {
        let sni = hello.sni.as_deref();
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
                config.ignore_client_order = !hello.prefers_chacha;
                Ok(Arc::new(config))
            }
            _ if hello.prefers_chacha => Ok(entry.client_order),
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
        // Both share the session cache and ticket key (Arcs).
        let mut client_order = config.clone();
        config.ignore_client_order = true;
        client_order.ignore_client_order = false;
        Ok(ServerEntry {
            config: Arc::new(config),
            client_order: Arc::new(client_order),
            verifier,
            resolver,
            attestation: (key.client_auth == ClientAuth::Attested).then(|| Arc::clone(&self.attestation)),
        })
    }

    /// The client config for one connection re-encrypting (or originating)
    /// to an upstream, offering `alpn`: a copy of the cached one (sharing its
    /// session cache) whose verifier runs `admission`'s chain on the
    /// upstream's certificate inside the handshake, so a refused upstream
    /// never sees the handshake finish.
    pub fn client_config(
        &self,
        upstream: &UpstreamTls,
        alpn: &[Vec<u8>],
        admission: &Arc<Admission>,
    ) -> Result<Arc<ClientConfig>, String> {
        let key = ClientKey {
            ca: upstream.ca.clone(),
            client_cert: upstream.client_cert.clone(),
            alpn: alpn.to_vec(),
            attested: upstream.attested,
        };
        let cached = crate::sync::lock(&self.clients).get(&key).cloned();
        let (config, verifier) = match cached {
            Some(cached) => cached,
            None => self.build_client_config(key)?,
        };
        let mut own = (*config).clone();
        own.dangerous().set_certificate_verifier(Arc::new(AdmittingServer {
            inner: verifier,
            admission: Arc::clone(admission),
            attestation: upstream.attested.then(|| Arc::clone(&self.attestation)),
        }));
        Ok(Arc::new(own))
    }

    /// Builds (and caches, up to its bound) the client config for `key`.
    fn build_client_config(&self, key: ClientKey) -> Result<CachedClient, String> {
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
            .with_custom_certificate_verifier(Arc::clone(&verifier));
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
        config.alpn_protocols = key.alpn.clone();
        let config = Arc::new(config);
        let mut clients = crate::sync::lock(&self.clients);
        if clients.len() < MAX_CACHED_CONFIGS {
            clients.insert(key, (Arc::clone(&config), Arc::clone(&verifier)));
        }
        Ok((config, verifier))
    }
}
