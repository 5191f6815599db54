//! `dstack-router`: the routing rules of the dstack gateway (the gateway in
//! front of dstack's confidential VMs) as a weir plugin.
//!
//! A server name `<id>[-[<port>][s|g]].<base-domain>` names an app (or one
//! instance of it) and a port:
//!
//! | first label        | action                                              |
//! | ------------------ | --------------------------------------------------- |
//! | `<id>`             | terminate (listener ALPN), plain to port 80         |
//! | `<id>-<port>`      | terminate, plain to `<port>`                        |
//! | `<id>-[<port>]s`   | passthrough to `<port>` (default 443)               |
//! | `<id>-[<port>]g`   | terminate with ALPN `h2` only, plain to `<port>` (default 80): gRPC |
//!
//! `sg`, `gs`, a second `-`, or a port that is not 1-65535 is rejected with a
//! reason saying which, and so is a port an app does not list in its `ports`
//! (when it lists them: a client then cannot reach any other port of the
//! app's instances). An app id reaches the weir pool of its instances
//! when it has one (`pool`: the host picks the instance, with the pool's
//! policy, health checks and failover, on the port the name asks for), else
//! one of its listed instances (chosen by a hash of the client's IP, so a
//! client keeps reaching the same instance); an instance id pins that
//! instance. Terminations present the base domain's
//! wildcard certificate. Custom domains map a full name to `app-id:port` and
//! are always passed through. Names under no base domain, reserved ids and
//! connections without SNI are left to the next plugin (`next`).
//!
//! With `"dns_custom_domains": true`, a name that is neither under a base
//! domain nor a configured custom domain is looked up as the dstack
//! gateway does: the TXT record `_dstack-app-address.<name>` holds
//! `app-id:port`, and the name is passed through to that app like a
//! configured custom domain. A name without the record, or naming an app
//! this router does not know, is rejected with a reason saying which. The
//! lookups go through the host's resolver and cache (the `dns` capability:
//! the plugin's section needs `grants = ["dns"]`).
//!
//! Config:
//!
//! ```json
//! {
//!   "base_domains": { "dstack.example.com": { "certificate": "dstack-wildcard" } },
//!   "apps": {
//!     "3327603e03f5bd1f830812ca4a789277fc31f577": {
//!       "instances": { "a1b2c3d4e5f6": "10.0.3.7", "f6e5d4c3b2a1": "10.0.3.8" },
//!       "ports": [443, 8080]
//!     }
//!   },
//!   "custom_domains": { "shop.example.org": "3327603e03f5bd1f830812ca4a789277fc31f577:443" },
//!   "reserved": ["health"]
//! }
//! ```
#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::Deserialize;
use weir_plugin_sdk::dns::{self, LookupError};
use weir_plugin_sdk::names::{self, Pattern};
use weir_plugin_sdk::{Connection, Decision, Plugin, Target, Termination, export_plugin, parse_config};

/// Port an `s` name reaches when it names none.
const DEFAULT_TLS_PORT: u16 = 443;
/// Port a terminated name reaches when it names none.
const DEFAULT_PLAIN_PORT: u16 = 80;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaseDomain {
    /// The certificate (weir config name) for `*.<base>`.
    certificate: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct App {
    /// Instance id → host (IP address or DNS name) of that instance.
    #[serde(default)]
    instances: BTreeMap<String, String>,
    /// A pool of weir's config holding the app's instances: the host picks
    /// among them (policy, health checks, failover), on the port the name
    /// asks for.
    pool: Option<String>,
    /// The ports the app serves, as the dstack gateway restricts each app
    /// to its declared ports: a name asking for another is rejected. Absent:
    /// any port.
    ports: Option<Vec<u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    base_domains: BTreeMap<String, BaseDomain>,
    #[serde(default)]
    apps: BTreeMap<String, App>,
    #[serde(default)]
    custom_domains: BTreeMap<String, String>,
    #[serde(default = "default_reserved")]
    reserved: Vec<String>,
    #[serde(default)]
    dns_custom_domains: bool,
}

fn default_reserved() -> Vec<String> {
    vec!["health".into()]
}

/// What the first label asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No suffix: terminate, plain.
    Terminate,
    /// `s`: passthrough.
    Passthrough,
    /// `g`: terminate with ALPN h2.
    Grpc,
}

/// A parsed first label.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request<'a> {
    id: &'a str,
    port: Option<u16>,
    mode: Mode,
}

/// Parses `<id>[-[<port>][s|g]]`; the error says what is wrong.
fn parse_label(label: &str) -> Result<Request<'_>, String> {
    if label.contains('.') {
        return Err(format!("`{label}` is more than one label under the base domain"));
    }
    let mut parts = label.split('-');
    let id = parts.next().unwrap_or_default();
    let rest = parts.next();
    if parts.next().is_some() {
        return Err(format!("`{label}` has more than one `-`"));
    }
    if id.is_empty() {
        return Err(format!("`{label}` has an empty id"));
    }
    let Some(rest) = rest else {
        return Ok(Request {
            id,
            port: None,
            mode: Mode::Terminate,
        });
    };
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (port, suffix) = rest.split_at(digits);
    let mode = match suffix {
        "" => Mode::Terminate,
        "s" => Mode::Passthrough,
        "g" => Mode::Grpc,
        "sg" | "gs" => {
            return Err(format!(
                "`{label}`: `{suffix}` combines `s` (passthrough) and `g` (gRPC); choose one"
            ));
        }
        other => return Err(format!("`{label}`: unknown suffix `{other}` (only `s` or `g`)")),
    };
    let port = match port {
        "" => None,
        digits => match digits.parse::<u16>() {
            Ok(port) if port > 0 => Some(port),
            _ => return Err(format!("`{label}`: port `{digits}` is not a number from 1 to 65535")),
        },
    };
    Ok(Request { id, port, mode })
}

/// The configured rules, indexed for lookup.
#[derive(Debug, Default)]
pub struct DstackRouter {
    /// Base domain → certificate name.
    base_domains: HashMap<String, String>,
    /// App id → its instances' hosts, with their instance ids.
    apps: HashMap<String, Vec<(String, String)>>,
    /// App id → the weir pool of its instances.
    app_pools: HashMap<String, String>,
    /// Instance id → (app id, host).
    instances: HashMap<String, (String, String)>,
    /// Full name → (app id, port).
    custom_domains: HashMap<String, (String, u16)>,
    /// App id → the ports it serves, when it declares them.
    app_ports: HashMap<String, Vec<u16>>,
    reserved: Vec<String>,
    /// Look names up in DNS (`_dstack-app-address.<name>` TXT).
    dns_custom_domains: bool,
}

impl Plugin for DstackRouter {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let config: Config = parse_config(config)?;
        let mut router = DstackRouter {
            reserved: config.reserved,
            dns_custom_domains: config.dns_custom_domains,
            ..DstackRouter::default()
        };
        if config.base_domains.is_empty() && config.custom_domains.is_empty() && !config.dns_custom_domains {
            return Err("give at least one of `base_domains`, `custom_domains` and `dns_custom_domains`".into());
        }
        for (base, settings) in config.base_domains {
            let canonical = match Pattern::parse(&base) {
                Ok(Pattern::Exact(name)) => name,
                Ok(Pattern::Wildcard(_)) => return Err(format!("base domain `{base}`: write it without `*.`")),
                Err(e) => return Err(format!("base domain `{base}`: {e}")),
            };
            router.base_domains.insert(canonical, settings.certificate);
        }
        for (app, settings) in config.apps {
            if app.is_empty() || app.contains(['-', '.']) || app != app.to_ascii_lowercase() {
                return Err(format!("app `{app}`: an id is one lower-case label without `-`"));
            }
            if settings.instances.is_empty() && settings.pool.is_none() {
                return Err(format!("app `{app}`: give `instances`, a `pool`, or both"));
            }
            if let Some(ports) = settings.ports {
                if ports.is_empty() || ports.contains(&0) {
                    return Err(format!("app `{app}`: `ports` lists the ports it serves (1-65535)"));
                }
                router.app_ports.insert(app.clone(), ports);
            }
            if let Some(pool) = settings.pool {
                if pool.is_empty() || pool.contains(':') {
                    return Err(format!("app `{app}`: `{pool}` is not a pool name"));
                }
                router.app_pools.insert(app.clone(), pool);
            }
            let mut hosts = Vec::new();
            for (instance, host) in settings.instances {
                if instance.is_empty() || instance.contains(['-', '.']) || instance != instance.to_ascii_lowercase() {
                    return Err(format!(
                        "app `{app}`: instance `{instance}`: an id is one lower-case label without `-`"
                    ));
                }
                if host.is_empty() || host.contains(['/', ' ']) {
                    return Err(format!("app `{app}`: instance `{instance}`: `{host}` is not a host"));
                }
                if router.instances.contains_key(&instance) || router.apps.contains_key(&instance) {
                    return Err(format!("instance `{instance}`: the id is used twice"));
                }
                router.instances.insert(instance.clone(), (app.clone(), host.clone()));
                hosts.push((instance, host));
            }
            router.apps.insert(app, hosts);
        }
        if let Some(clash) = router
            .apps
            .keys()
            .chain(router.app_pools.keys())
            .find(|app| router.instances.contains_key(*app))
        {
            return Err(format!("`{clash}` is both an app id and an instance id"));
        }
        for (name, target) in config.custom_domains {
            let canonical = match Pattern::parse(&name) {
                Ok(Pattern::Exact(name)) => name,
                _ => return Err(format!("custom domain `{name}`: not a host name")),
            };
            let (app, port) = target
                .rsplit_once(':')
                .ok_or_else(|| format!("custom domain `{name}`: `{target}` is not app-id:port"))?;
            let port = match port.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(format!("custom domain `{name}`: port `{port}` is not 1-65535")),
            };
            if !router.apps.contains_key(app)
                && !router.instances.contains_key(app)
                && !router.app_pools.contains_key(app)
            {
                return Err(format!("custom domain `{name}`: no app or instance `{app}`"));
            }
            if !router.serves(app, port) {
                return Err(format!(
                    "custom domain `{name}`: port {port} is not one of `{app}`'s ports"
                ));
            }
            router.custom_domains.insert(canonical, (app.to_owned(), port));
        }
        *self = router;
        Ok(())
    }

    fn route(&self, conn: &Connection) -> Decision {
        let Some(sni) = conn.sni.as_deref() else {
            return Decision::next();
        };
        if let Some((app, port)) = self.custom_domains.get(sni) {
            return match self.target(app, *port, conn) {
                Some(target) => Decision::passthrough(sni, target),
                None => Decision::reject(sni, format!("no app or instance `{app}`")),
            };
        }
        let Some((label, base, certificate)) = self.split(sni) else {
            if self.dns_custom_domains {
                return self.route_by_dns(sni, conn);
            }
            return Decision::next();
        };
        let request = match parse_label(label) {
            Ok(request) => request,
            Err(reason) => return Decision::reject(format!("invalid.{base}"), reason),
        };
        if self.reserved.iter().any(|r| r == request.id) {
            return Decision::next();
        }
        let (default_port, suffix) = match request.mode {
            Mode::Passthrough => (DEFAULT_TLS_PORT, "s"),
            Mode::Grpc => (DEFAULT_PLAIN_PORT, "g"),
            Mode::Terminate => (DEFAULT_PLAIN_PORT, ""),
        };
        let port = request.port.unwrap_or(default_port);
        if !self.serves(request.id, port) {
            return Decision::reject(
                format!("closed.{base}"),
                format!("port {port} is not one of `{}`'s ports", request.id),
            );
        }
        let Some(target) = self.target(request.id, port, conn) else {
            return Decision::reject(
                format!("unknown.{base}"),
                format!("no app or instance `{}`", request.id),
            );
        };
        let route = format!("{}-{port}{suffix}", request.id);
        match request.mode {
            Mode::Passthrough => Decision::passthrough(route, target),
            Mode::Grpc => Decision::terminate(
                route,
                Termination::plain(target)
                    .with_certificate(certificate)
                    .with_alpn(["h2"]),
            ),
            Mode::Terminate => Decision::terminate(route, Termination::plain(target).with_certificate(certificate)),
        }
    }
}

impl DstackRouter {
    /// Routes a custom domain by its `_dstack-app-address` TXT record.
    fn route_by_dns(&self, sni: &str, conn: &Connection) -> Decision {
        let record = format!("_dstack-app-address.{sni}");
        let texts = match dns::txt(&record) {
            Ok(texts) => texts,
            Err(LookupError::NoRecords) => {
                return Decision::reject("unknown-domain", format!("{sni}: no TXT record at {record}"));
            }
            Err(error) => return Decision::reject("unknown-domain", format!("{sni}: looking up {record}: {error}")),
        };
        let Some((app, port)) = texts.iter().find_map(|text| parse_app_address(text)) else {
            return Decision::reject("unknown-domain", format!("{sni}: {record} holds no app-id:port"));
        };
        if !self.serves(app, port) {
            return Decision::reject(
                "unknown-domain",
                format!("{sni}: port {port} is not one of `{app}`'s ports"),
            );
        }
        match self.target(app, port, conn) {
            Some(target) => Decision::passthrough(format!("dns:{app}-{port}"), target),
            None => Decision::reject("unknown-domain", format!("{sni}: no app or instance `{app}`")),
        }
    }

    /// Splits a name under a base domain into its first label, the base
    /// domain and its certificate. A name deeper under a base domain is
    /// reported as an invalid one-label name.
    fn split<'a>(&'a self, sni: &'a str) -> Option<(&'a str, &'a str, &'a str)> {
        if let Some((label, parent)) = names::split_first_label(sni)
            && let Some((base, certificate)) = self.base_domains.get_key_value(parent)
        {
            return Some((label, base, certificate));
        }
        // Deeper names under a base domain (`a.b.<base>`), the longest base
        // that matches.
        let (base, certificate) = self
            .base_domains
            .iter()
            .filter(|(base, _)| names::strip_suffix(sni, base).is_some())
            .max_by_key(|(base, _)| base.len())?;
        let label = names::strip_suffix(sni, base)?;
        Some((label, base, certificate))
    }

    /// Whether an app (or an instance's app) serves `port`: any port unless
    /// the app declares its `ports`.
    fn serves(&self, id: &str, port: u16) -> bool {
        let app = self.instances.get(id).map_or(id, |(app, _)| app.as_str());
        self.app_ports.get(app).is_none_or(|ports| ports.contains(&port))
    }

    /// Where an id's port is: an instance id's own host; an app id's weir
    /// pool (`pool:port`, the host picks the instance), else one of its
    /// instances by client IP.
    fn target(&self, id: &str, port: u16, conn: &Connection) -> Option<Target> {
        if !self.instances.contains_key(id)
            && let Some(pool) = self.app_pools.get(id)
        {
            return Some(Target::pool(format!("{pool}:{port}")));
        }
        let host = self.host(id, conn)?;
        Some(Target::address(format!("{}:{port}", bracket(host))))
    }

    /// The host for an app id (one of its instances, by client IP) or an
    /// instance id (that instance).
    fn host(&self, id: &str, conn: &Connection) -> Option<&str> {
        if let Some((_, host)) = self.instances.get(id) {
            return Some(host);
        }
        let instances = self.apps.get(id)?;
        let client_ip = conn.client_ip();
        // Rendezvous hashing: each client has a stable favourite, and
        // removing an instance moves only that instance's clients.
        instances
            .iter()
            .max_by_key(|(instance, _)| {
                let mut hasher = DefaultHasher::new();
                (client_ip, instance).hash(&mut hasher);
                hasher.finish()
            })
            .map(|(_, host)| host.as_str())
    }
}

/// An IPv6 literal in brackets, for `host:port`.
/// `app-id:port` from a TXT record, as the dstack gateway writes it.
fn parse_app_address(text: &str) -> Option<(&str, u16)> {
    let (app, port) = text.trim().rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    let id_like =
        !app.is_empty() && app.len() <= 64 && app.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    id_like.then_some((app, port))
}

fn bracket(host: &str) -> String {
    match host.contains(':') && !host.starts_with('[') {
        true => format!("[{host}]"),
        false => host.to_owned(),
    }
}

export_plugin!(DstackRouter);

#[cfg(test)]
mod tests;
