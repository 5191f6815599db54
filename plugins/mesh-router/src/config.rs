//! The parts of a Traefik dynamic configuration this plugin reads, as Traefik
//! spells them (camelCase keys, YAML or TOML). Every section refuses unknown
//! keys; keys Traefik knows but weir cannot honour are read so that
//! configure() can name them in its error.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;

/// The whole document: `tcp:` and `tls:` are read; `http:` and `udp:`
/// belong to other proxies and are skipped.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dynamic {
    #[serde(default)]
    pub tcp: Tcp,
    #[serde(default)]
    pub tls: Tls,
    /// Read so that a whole Traefik file is accepted; routed by other proxies.
    #[allow(dead_code)]
    pub http: Option<IgnoredAny>,
    /// As `http`.
    #[allow(dead_code)]
    pub udp: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tcp {
    #[serde(default)]
    pub routers: BTreeMap<String, Router>,
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    pub middlewares: Option<IgnoredAny>,
    #[serde(rename = "serversTransports")]
    pub servers_transports: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Router {
    pub rule: Option<String>,
    pub service: Option<String>,
    #[serde(default)]
    pub priority: i64,
    #[serde(default)]
    pub entry_points: Vec<String>,
    pub tls: Option<RouterTls>,
    pub rule_syntax: Option<String>,
    pub middlewares: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouterTls {
    #[serde(default)]
    pub passthrough: bool,
    pub options: Option<String>,
    pub cert_resolver: Option<String>,
    #[serde(default)]
    pub domains: Vec<Domain>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    pub main: String,
    #[serde(default)]
    pub sans: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub load_balancer: Option<LoadBalancer>,
    pub weighted: Option<Weighted>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default)]
    pub servers: Vec<Server>,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub servers_transport: Option<String>,
    pub termination_delay: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub address: String,
    #[serde(default)]
    pub tls: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocol {
    #[serde(default = "proxy_protocol_v2")]
    pub version: u8,
}

fn proxy_protocol_v2() -> u8 {
    2
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weighted {
    pub services: Vec<WeightedService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedService {
    pub name: String,
    pub weight: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    #[serde(default)]
    pub options: BTreeMap<String, TlsOptions>,
    pub certificates: Option<IgnoredAny>,
    pub stores: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsOptions {
    pub min_version: Option<String>,
    pub max_version: Option<String>,
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    #[serde(default)]
    pub curve_preferences: Vec<String>,
    pub client_auth: Option<ClientAuth>,
    /// Either value is honoured: weir never presents a certificate for a name
    /// none of its certificates covers (Traefik's strict behaviour).
    #[allow(dead_code)]
    #[serde(default)]
    pub sni_strict: bool,
    #[serde(default)]
    pub alpn_protocols: Vec<String>,
    /// Ignored by Go's TLS since Go 1.18, and so by Traefik; weir likewise.
    #[allow(dead_code)]
    pub prefer_server_cipher_suites: Option<IgnoredAny>,
    pub disable_session_tickets: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientAuth {
    #[serde(default)]
    pub ca_files: Vec<String>,
    pub client_auth_type: Option<String>,
}

/// Parses a dynamic configuration written in TOML or YAML (tried in that
/// order: a YAML document is never valid TOML).
pub fn parse(text: &str) -> Result<Dynamic, String> {
    match toml::from_str::<Dynamic>(text) {
        Ok(dynamic) => Ok(dynamic),
        Err(toml_error) => match serde_yaml_ng::from_str::<Option<Dynamic>>(text) {
            Ok(dynamic) => Ok(dynamic.unwrap_or_default()),
            Err(_) if looks_like_toml(text) => Err(format!("TOML: {toml_error}")),
            Err(yaml_error) => Err(format!("YAML: {yaml_error}")),
        },
    }
}

/// A document whose first significant line is a `[table]` header or a
/// `key = value` line is meant as TOML.
fn looks_like_toml(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .is_some_and(|line| line.starts_with('[') || line.split_once('=').is_some_and(|(k, _)| !k.contains(':')))
}
