//! `mesh-router`: Traefik's TCP routing as a weir plugin. It reads the `tcp:`
//! part (and the TLS `options`) of a Traefik dynamic configuration, in YAML
//! or TOML as Traefik users write it, and routes like Traefik's TCP routers:
//! the v3 rule language ([`rule`]), priorities, `tls.passthrough`, TLS
//! termination with client authentication and ALPN from TLS options, and
//! services with load-balanced servers (plain or TLS) and weights.
//!
//! The plugin config is the dynamic configuration itself (a string), or a
//! table that adds what only weir knows:
//!
//! ```toml
//! [plugins.mesh.config]
//! traefik = '''
//! tcp:
//!   routers:
//!     db:
//!       rule: "HostSNI(`db.example.com`)"
//!       service: db
//!       tls:
//!         passthrough: true
//!   services:
//!     db:
//!       loadBalancer:
//!         servers:
//!           - address: "10.0.0.5:5432"
//! '''
//! ca_files = { "/etc/traefik/clients.pem" = "clients" }  # clientAuth.caFiles → weir CA names
//! upstream_ca = "internal"                               # verifies `tls: true` servers
//! ```
//!
//! Matching order: routers sorted by priority (explicit, else the rule's
//! length; a bare `HostSNI(`*`)` gets -1), highest first, ties broken by
//! router name in byte order. A TLS connection (also PostgreSQL after its
//! SSLRequest) is matched against the routers with a `tls` section first,
//! then against the others, which forward its bytes untouched; a connection
//! without TLS only against the routers without `tls`. No match is `next`.
//! The route name of every decision is the router's name.
#![deny(unsafe_code)]

mod config;
pub mod rule;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use weir_plugin_sdk::{
    ClientAuth, Connection, Decision, Plugin, Protocol, Target, Termination, UpstreamTls, export_plugin,
};

use crate::rule::{Facts, Rule};

/// The table form of the plugin config.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapper {
    traefik: String,
    #[serde(default)]
    ca_files: BTreeMap<String, String>,
    upstream_ca: Option<String>,
}

/// How a router ends TLS.
#[derive(Debug, Clone)]
enum Mode {
    /// A router without `tls`: bytes forwarded as they come.
    Raw,
    /// `tls.passthrough: true`.
    Passthrough,
    /// `tls` without passthrough: terminate with these settings.
    Terminate { client_auth: ClientAuth, alpn: Vec<String> },
}

#[derive(Debug)]
struct Router {
    name: String,
    rule: Rule,
    priority: i64,
    entry_points: Vec<String>,
    service: String,
    mode: Mode,
}

/// A service, with its own round-robin position.
#[derive(Debug)]
enum Service {
    Servers {
        servers: Vec<(String, bool)>,
        proxy_protocol: Option<u8>,
        turn: AtomicU64,
    },
    Weighted(Vec<(String, u32)>, AtomicU64),
}

/// The compiled routing table.
#[derive(Debug, Default)]
pub struct MeshRouter {
    tls_routers: Vec<Router>,
    raw_routers: Vec<Router>,
    services: HashMap<String, Service>,
    upstream_ca: Option<String>,
}

impl Plugin for MeshRouter {
    fn configure(&mut self, text: &str) -> Result<(), String> {
        let wrapper = match text.trim_start().starts_with('{') {
            true => serde_json::from_str::<Wrapper>(text).map_err(|e| format!("invalid plugin config: {e}"))?,
            false => Wrapper {
                traefik: text.to_owned(),
                ..Wrapper::default()
            },
        };
        let dynamic = config::parse(&wrapper.traefik)?;
        *self = compile(dynamic, &wrapper)?;
        Ok(())
    }

    fn route(&self, conn: &Connection) -> Decision {
        let client_ip = Some(conn.client_ip());
        let facts = Facts {
            sni: conn.sni.as_deref(),
            client_ip,
            alpn: &conn.alpn,
        };
        let tls = conn.protocol != Protocol::Plain;
        let candidates = match tls {
            true => self.tls_routers.iter().chain(&self.raw_routers),
            false => [].iter().chain(&self.raw_routers),
        };
        let found = candidates.into_iter().find(|router| {
            (router.entry_points.is_empty() || router.entry_points.contains(&conn.listener))
                && router.rule.matches(&facts)
        });
        match found {
            Some(router) => self.decide(router),
            None => Decision::next(),
        }
    }
}

impl MeshRouter {
    fn decide(&self, router: &Router) -> Decision {
        let Some((address, tls, proxy_protocol)) = self.pick(&router.service, 0) else {
            return Decision::reject(&router.name, format!("service `{}` has no server", router.service));
        };
        let target = match proxy_protocol {
            Some(version) => Target::address(address).with_proxy_protocol(version),
            None => Target::address(address),
        };
        match &router.mode {
            Mode::Raw | Mode::Passthrough => Decision::passthrough(&router.name, target),
            Mode::Terminate { client_auth, alpn } => {
                let termination = match tls {
                    false => Termination::plain(target),
                    true => {
                        let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
                        let dns_name = host.parse::<IpAddr>().is_err() && !host.starts_with('[');
                        Termination::reencrypt(
                            target,
                            UpstreamTls {
                                server_name: dns_name.then(|| host.to_owned()),
                                ca: self.upstream_ca.clone(),
                                ..UpstreamTls::new()
                            },
                        )
                    }
                };
                Decision::terminate(
                    &router.name,
                    termination
                        .with_client_auth(client_auth.clone())
                        .with_alpn(alpn.clone()),
                )
            }
        }
    }

    /// Picks a server of a service: each service takes its servers in turn,
    /// and a weighted service its children in proportion to their weights.
    fn pick(&self, service: &str, depth: usize) -> Option<(&str, bool, Option<u8>)> {
        match self.services.get(service)? {
            Service::Servers {
                servers,
                proxy_protocol,
                turn,
            } => {
                let turn = turn.fetch_add(1, Ordering::Relaxed);
                let (address, tls) = servers.get((turn % servers.len() as u64) as usize)?;
                Some((address.as_str(), *tls, *proxy_protocol))
            }
            Service::Weighted(children, turn) => {
                let total: u64 = children.iter().map(|(_, w)| u64::from(*w)).sum();
                let mut slot = turn.fetch_add(1, Ordering::Relaxed) % total.max(1);
                let (name, _) = children.iter().find(|(_, weight)| {
                    let hit = slot < u64::from(*weight);
                    slot = slot.saturating_sub(u64::from(*weight));
                    hit
                })?;
                (depth < MAX_DEPTH).then(|| self.pick(name, depth + 1))?
            }
        }
    }
}

/// Deepest nesting of weighted services.
const MAX_DEPTH: usize = 8;

fn compile(dynamic: config::Dynamic, wrapper: &Wrapper) -> Result<MeshRouter, String> {
    let unsupported = |what: &str, instead: &str| Err(format!("{what} is not supported by weir; {instead}"));
    if dynamic.tcp.middlewares.is_some() {
        return unsupported(
            "tcp.middlewares",
            "express IP allow-lists with ClientIP in the rule, connection limits in weir's listener",
        );
    }
    if dynamic.tcp.servers_transports.is_some() {
        return unsupported(
            "tcp.serversTransports",
            "weir verifies `tls: true` servers with the plugin's `upstream_ca`",
        );
    }
    if dynamic.tls.certificates.is_some() || dynamic.tls.stores.is_some() {
        return unsupported(
            "tls.certificates / tls.stores",
            "name certificates in weir's [certificates]; weir picks them by SNI",
        );
    }
    let mut services = HashMap::new();
    for (name, service) in &dynamic.tcp.services {
        let at = |why: String| format!("service `{name}`: {why}");
        let compiled = match (&service.load_balancer, &service.weighted) {
            (Some(lb), None) => {
                if lb.servers_transport.is_some() {
                    return Err(at("loadBalancer.serversTransport is not supported; weir verifies `tls: true` servers with the plugin's `upstream_ca`".into()));
                }
                if lb.termination_delay.is_some() {
                    return Err(at(
                        "loadBalancer.terminationDelay is not supported; weir's listener sets half_close_timeout"
                            .into(),
                    ));
                }
                if lb.servers.is_empty() {
                    return Err(at("loadBalancer has no servers".into()));
                }
                let mut servers = Vec::new();
                for server in &lb.servers {
                    let valid = server
                        .address
                        .rsplit_once(':')
                        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
                    if !valid {
                        return Err(at(format!("server address `{}` is not host:port", server.address)));
                    }
                    servers.push((server.address.clone(), server.tls));
                }
                let proxy_protocol = match &lb.proxy_protocol {
                    None => None,
                    Some(pp) => Some(
                        weir_plugin_sdk::proxy::check_version(pp.version)
                            .map_err(|e| at(format!("proxyProtocol: {e}")))?,
                    ),
                };
                Service::Servers {
                    servers,
                    proxy_protocol,
                    turn: AtomicU64::new(0),
                }
            }
            (None, Some(weighted)) => {
                let mut children = Vec::new();
                for child in &weighted.services {
                    if !dynamic.tcp.services.contains_key(&child.name) {
                        return Err(at(format!("weighted service `{}` does not exist", child.name)));
                    }
                    children.push((child.name.clone(), child.weight.unwrap_or(1)));
                }
                if children.iter().all(|(_, weight)| *weight == 0) {
                    return Err(at("weighted services need a weight above zero".into()));
                }
                Service::Weighted(children, AtomicU64::new(0))
            }
            _ => return Err(at("give exactly one of loadBalancer and weighted".into())),
        };
        services.insert(name.clone(), compiled);
    }
    for name in services.keys() {
        check_depth(&services, name, 0).map_err(|why| format!("service `{name}`: {why}"))?;
    }

    let mut tls_routers = Vec::new();
    let mut raw_routers = Vec::new();
    for (name, router) in &dynamic.tcp.routers {
        let at = |why: String| format!("router `{name}`: {why}");
        if name.contains('@') {
            return Err(at("`@` is not allowed in router names".into()));
        }
        if router.middlewares.is_some() {
            return Err(at("middlewares are not supported; use ClientIP in the rule".into()));
        }
        match router.rule_syntax.as_deref() {
            None | Some("v3") => {}
            Some(other) => return Err(at(format!("ruleSyntax `{other}` is not supported (only v3)"))),
        }
        let text = router.rule.as_deref().ok_or_else(|| at("`rule` is required".into()))?;
        let rule = rule::parse(text).map_err(|e| at(format!("rule `{text}`: {e}")))?;
        let service = router
            .service
            .clone()
            .ok_or_else(|| at("`service` is required".into()))?;
        if !services.contains_key(&service) {
            return Err(at(format!("service `{service}` does not exist")));
        }
        let tls_servers = reaches_tls_server(&services, &service, 0);
        let mode = match &router.tls {
            None => {
                if !rule.works_without_tls() {
                    return Err(at(format!(
                        "rule `{text}`: HostSNI other than `*`, HostSNIRegexp and ALPN need a `tls` section (as in Traefik)"
                    )));
                }
                if tls_servers {
                    return Err(at("a `tls: true` server needs a router that terminates TLS".into()));
                }
                Mode::Raw
            }
            Some(tls) => {
                if tls.cert_resolver.is_some() {
                    return Err(at(
                        "tls.certResolver is not supported; give the certificate an `acme` entry in weir's [certificates] (chosen by SNI)"
                            .into(),
                    ));
                }
                for domain in &tls.domains {
                    for host in std::iter::once(&domain.main).chain(&domain.sans) {
                        weir_plugin_sdk::names::Pattern::parse(host)
                            .map_err(|e| at(format!("tls.domains `{host}`: {e}")))?;
                    }
                }
                if tls.passthrough {
                    if tls_servers {
                        return Err(at(
                            "a `tls: true` server behind tls.passthrough would get TLS inside TLS".into(),
                        ));
                    }
                    Mode::Passthrough
                } else {
                    let options = match &tls.options {
                        Some(options) => Some(
                            dynamic
                                .tls
                                .options
                                .get(options)
                                .ok_or_else(|| at(format!("TLS options `{options}` do not exist")))?,
                        ),
                        None => dynamic.tls.options.get("default"),
                    };
                    let (client_auth, alpn) = match options {
                        Some(options) => map_options(options, wrapper).map_err(|e| at(format!("TLS options: {e}")))?,
                        None => (ClientAuth::None, Vec::new()),
                    };
                    Mode::Terminate { client_auth, alpn }
                }
            }
        };
        let priority = match router.priority {
            0 if rule.is_catch_all() => -1,
            0 => i64::try_from(text.len()).unwrap_or(i64::MAX),
            explicit => explicit,
        };
        let compiled = Router {
            name: name.clone(),
            rule,
            priority,
            entry_points: router.entry_points.clone(),
            service,
            mode,
        };
        match compiled.mode {
            Mode::Raw => raw_routers.push(compiled),
            _ => tls_routers.push(compiled),
        }
    }
    for routers in [&mut tls_routers, &mut raw_routers] {
        routers.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(&b.name)));
    }
    Ok(MeshRouter {
        tls_routers,
        raw_routers,
        services,
        upstream_ca: wrapper.upstream_ca.clone(),
    })
}

fn check_depth(services: &HashMap<String, Service>, name: &str, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "weighted services nest deeper than {MAX_DEPTH} (or form a loop)"
        ));
    }
    match services.get(name) {
        Some(Service::Weighted(children, _)) => children
            .iter()
            .try_for_each(|(child, _)| check_depth(services, child, depth + 1)),
        _ => Ok(()),
    }
}

fn reaches_tls_server(services: &HashMap<String, Service>, name: &str, depth: usize) -> bool {
    match services.get(name) {
        Some(Service::Servers { servers, .. }) => servers.iter().any(|(_, tls)| *tls),
        Some(Service::Weighted(children, _)) if depth < MAX_DEPTH => children
            .iter()
            .any(|(child, _)| reaches_tls_server(services, child, depth + 1)),
        _ => false,
    }
}

/// Maps Traefik TLS options onto what a weir decision carries: client
/// authentication and ALPN. The version and cipher settings are the weir
/// listener's, so asking for them here is an error that says where to set
/// them.
fn map_options(options: &config::TlsOptions, wrapper: &Wrapper) -> Result<(ClientAuth, Vec<String>), String> {
    match options.min_version.as_deref() {
        None | Some("VersionTLS12") => {}
        Some("VersionTLS13") => {
            return Err("minVersion VersionTLS13: set `tls.min_version = \"1.3\"` on the weir listener".into());
        }
        Some(other) => return Err(format!("minVersion {other}: weir speaks TLS 1.2 and 1.3 only")),
    }
    if options.max_version.is_some() {
        return Err("maxVersion is not supported: weir offers TLS 1.3 wherever it offers 1.2".into());
    }
    if !options.cipher_suites.is_empty() {
        return Err("cipherSuites: set `tls.cipher_suites` on the weir listener".into());
    }
    if !options.curve_preferences.is_empty() {
        return Err("curvePreferences is not supported".into());
    }
    if options.disable_session_tickets.is_some() {
        return Err("disableSessionTickets is not supported (weir binds tickets to their termination)".into());
    }
    let client_auth = match &options.client_auth {
        None => ClientAuth::None,
        Some(auth) => {
            let ca = match auth.ca_files.as_slice() {
                [] => None,
                [file] => Some(wrapper.ca_files.get(file).cloned().ok_or_else(|| {
                    format!("clientAuth.caFiles `{file}`: map it to a weir CA name in the plugin's `ca_files`")
                })?),
                _ => return Err("clientAuth.caFiles: weir verifies against one CA bundle; merge the files".into()),
            };
            let kind = auth.client_auth_type.as_deref().unwrap_or(match ca {
                Some(_) => "RequireAndVerifyClientCert",
                None => "NoClientCert",
            });
            match (kind, ca) {
                ("NoClientCert", _) => ClientAuth::None,
                ("VerifyClientCertIfGiven", Some(ca)) => ClientAuth::Optional(ca),
                ("RequireAndVerifyClientCert", Some(ca)) => ClientAuth::Required(ca),
                ("VerifyClientCertIfGiven" | "RequireAndVerifyClientCert", None) => {
                    return Err(format!("clientAuthType {kind} needs caFiles"));
                }
                ("RequestClientCert" | "RequireAnyClientCert", _) => {
                    return Err(format!(
                        "clientAuthType {kind}: weir only accepts client certificates it verifies"
                    ));
                }
                (other, _) => return Err(format!("unknown clientAuthType `{other}`")),
            }
        }
    };
    // Traefik adds `acme-tls/1` for its own ACME challenges; weir has none.
    let alpn = options
        .alpn_protocols
        .iter()
        .filter(|p| *p != "acme-tls/1")
        .cloned()
        .collect();
    Ok((client_auth, alpn))
}

export_plugin!(MeshRouter);

#[cfg(test)]
mod tests;
