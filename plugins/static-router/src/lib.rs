//! `static-router`: a table from server name to a target (passed through,
//! or behind TLS the gateway terminates) or a rejection. The quickstart and
//! the tests route with it.
//!
//! Config (JSON, or a TOML table in weir's config):
//!
//! ```json
//! {
//!   "routes": {
//!     "app.localhost":     { "pool": "app" },
//!     "*.demo.localhost":  { "address": "127.0.0.1:9443", "proxy_protocol": 2 },
//!     "old.localhost":     { "reject": "moved to app.localhost" },
//!     "web.localhost":     { "pool": "web", "terminate": { "certificate": "site", "alpn": ["http/1.1"] } },
//!     "db.localhost":      { "pool": "db", "terminate": {
//!         "client_auth": "required", "client_ca": "clients", "clients": ["CN=alice"],
//!         "reencrypt": { "ca": "db-ca", "server_name": "db.internal", "client_cert": "gateway" } } }
//!   },
//!   "no_sni": { "pool": "default" },
//!   "default": { "reject": "unknown server name" }
//! }
//! ```
//!
//! A name matches exactly first, then as a one-label wildcard (`*.x`). A
//! connection without SNI takes `no_sni`; one that matches nothing takes
//! `default`. Absent `no_sni` / `default` mean `next`: the next plugin in the
//! chain decides. The route name in each decision is the table key that
//! matched (`no_sni` / `default` for those two).
//!
//! `terminate` makes the gateway end TLS and send the decrypted stream to the
//! target, or with `reencrypt` open its own TLS connection to it (verified by
//! the named `ca`, the system roots when absent). `certificate`, `client_ca`,
//! `ca` and `client_cert` are names from weir's config. With `clients`, a
//! client certificate is admitted only if its subject (RFC 4514) or one of its
//! DNS / IP names is listed. `client_auth = "attested"` asks for an RA-TLS
//! certificate (no `client_ca`), and `reencrypt.attested` requires one from
//! the upstream; pair them with the attestation-allowlist plugin.
//!
//! `originate` (for a plain client) makes the gateway open TLS to the target
//! itself: `{ "address": "db.internal:5433", "originate": { "ca": "db-ca",
//! "server_name": "db.internal", "client_cert": "gateway", "alpn":
//! ["postgresql"] } }`, or `"attested": true` in place of `ca` for an RA-TLS
//! upstream.
#![deny(unsafe_code)]

use std::collections::HashMap;

use serde::Deserialize;
use weir_plugin_sdk::names::Pattern;
use weir_plugin_sdk::{
    ClientAuth, Connection, Decision, Peer, Plugin, Side, Target, Termination, UpstreamTls, Verdict, export_plugin,
    parse_config,
};

/// What one table entry does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// Pass through to this pool.
    pool: Option<String>,
    /// Pass through to this `host:port`.
    address: Option<String>,
    /// Send a PROXY protocol header of this version first.
    proxy_protocol: Option<u8>,
    /// Reject with this reason.
    reject: Option<String>,
    /// Terminate TLS instead of passing it through.
    terminate: Option<Terminate>,
    /// Open TLS to the target for a plain client.
    originate: Option<Originate>,
}

/// How the gateway opens TLS to the target of a plain client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Originate {
    server_name: Option<String>,
    ca: Option<String>,
    client_cert: Option<String>,
    #[serde(default)]
    attested: bool,
    #[serde(default)]
    alpn: Vec<String>,
}

/// How the gateway terminates a route's TLS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Terminate {
    /// Certificate name; by SNI when absent.
    certificate: Option<String>,
    /// `none` (default), `optional`, `required` (with `client_ca`) or
    /// `attested` (an RA-TLS certificate).
    #[serde(default)]
    client_auth: ClientAuthMode,
    /// CA that verifies client certificates.
    client_ca: Option<String>,
    /// Admitted client subjects or names; everyone verified when absent.
    clients: Option<Vec<String>>,
    /// ALPN protocols to offer; the listener's when empty.
    #[serde(default)]
    alpn: Vec<String>,
    /// Re-encrypt to the target instead of sending it plaintext.
    reencrypt: Option<Reencrypt>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ClientAuthMode {
    #[default]
    None,
    Optional,
    Required,
    Attested,
}

/// How the gateway speaks TLS to the target.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reencrypt {
    server_name: Option<String>,
    ca: Option<String>,
    client_cert: Option<String>,
    #[serde(default)]
    attested: bool,
}

impl Terminate {
    fn termination(&self, target: Target) -> Termination {
        let termination = match &self.reencrypt {
            None => Termination::plain(target),
            Some(r) => Termination::reencrypt(
                target,
                UpstreamTls {
                    server_name: r.server_name.clone(),
                    ca: r.ca.clone(),
                    client_cert: r.client_cert.clone(),
                    attested: r.attested,
                },
            ),
        };
        let ca = self.client_ca.clone().unwrap_or_default();
        let client_auth = match self.client_auth {
            ClientAuthMode::None => ClientAuth::None,
            ClientAuthMode::Optional => ClientAuth::Optional(ca),
            ClientAuthMode::Required => ClientAuth::Required(ca),
            ClientAuthMode::Attested => ClientAuth::Attested,
        };
        let termination = termination.with_client_auth(client_auth).with_alpn(self.alpn.clone());
        match &self.certificate {
            Some(name) => termination.with_certificate(name),
            None => termination,
        }
    }

    fn validate(&self, key: &str) -> Result<(), String> {
        match (self.client_auth, &self.client_ca) {
            (ClientAuthMode::Attested, Some(_)) => Err(format!(
                "route `{key}`: `client_ca` makes no sense with client_auth `attested`"
            )),
            (ClientAuthMode::None, Some(_)) => Err(format!(
                "route `{key}`: `client_ca` needs client_auth `optional` or `required`"
            )),
            (ClientAuthMode::Optional | ClientAuthMode::Required, None) => {
                Err(format!("route `{key}`: client_auth needs a `client_ca`"))
            }
            (ClientAuthMode::None, None) if self.clients.is_some() => Err(format!(
                "route `{key}`: `clients` needs client_auth `optional` or `required`"
            )),
            _ => Ok(()),
        }
    }

    /// Whether `peer` is one of the listed clients (anyone, without a list).
    fn admits(&self, peer: &Peer) -> bool {
        match &self.clients {
            None => true,
            Some(clients) => clients
                .iter()
                .any(|c| *c == peer.subject || peer.sans.iter().any(|san| san.eq_ignore_ascii_case(c))),
        }
    }
}

impl Entry {
    fn decision(&self, route: &str) -> Decision {
        let target = match (&self.pool, &self.address, &self.reject) {
            (Some(pool), None, None) => Target::pool(pool),
            (None, Some(addr), None) => Target::address(addr),
            (None, None, Some(reason)) => return Decision::reject(route, reason),
            // `validate` refuses every other shape at configure time.
            _ => return Decision::reject(route, "invalid route entry"),
        };
        let target = match self.proxy_protocol {
            Some(version) => target.with_proxy_protocol(version),
            None => target,
        };
        if let Some(o) = &self.originate {
            let tls = UpstreamTls {
                server_name: o.server_name.clone(),
                ca: o.ca.clone(),
                client_cert: o.client_cert.clone(),
                attested: o.attested,
            };
            return Decision::originate(route, target, tls, o.alpn.clone());
        }
        match &self.terminate {
            Some(terminate) => Decision::terminate(route, terminate.termination(target)),
            None => Decision::passthrough(route, target),
        }
    }

    fn validate(&self, key: &str) -> Result<(), String> {
        let targets = [self.pool.is_some(), self.address.is_some(), self.reject.is_some()];
        if targets.iter().filter(|set| **set).count() != 1 {
            return Err(format!(
                "route `{key}`: give exactly one of `pool`, `address`, `reject`"
            ));
        }
        if self.reject.is_some() && self.proxy_protocol.is_some() {
            return Err(format!("route `{key}`: `proxy_protocol` makes no sense with `reject`"));
        }
        if self.originate.is_some() && (self.reject.is_some() || self.terminate.is_some()) {
            return Err(format!(
                "route `{key}`: `originate` makes no sense with `reject` or `terminate`"
            ));
        }
        if let Some(terminate) = &self.terminate {
            if self.reject.is_some() {
                return Err(format!("route `{key}`: `terminate` makes no sense with `reject`"));
            }
            terminate.validate(key)?;
        }
        if let Some(version) = self.proxy_protocol {
            weir_plugin_sdk::proxy::check_version(version)
                .map_err(|e| format!("route `{key}`: proxy_protocol: {e}"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    routes: HashMap<String, Entry>,
    no_sni: Option<Entry>,
    default: Option<Entry>,
}

/// The configured table, split for lookup.
#[derive(Debug, Default)]
pub struct StaticRouter {
    exact: HashMap<String, (String, Entry)>,
    wildcard: HashMap<String, (String, Entry)>,
    no_sni: Option<Entry>,
    default: Option<Entry>,
}

impl Plugin for StaticRouter {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let config: Config = parse_config(config)?;
        let mut router = StaticRouter {
            no_sni: config.no_sni,
            default: config.default,
            ..StaticRouter::default()
        };
        for (key, entry) in config.routes {
            entry.validate(&key)?;
            let pattern = Pattern::parse(&key).map_err(|e| format!("route `{key}`: {e}"))?;
            let table = match &pattern {
                Pattern::Exact(name) => router.exact.entry(name.clone()),
                Pattern::Wildcard(suffix) => router.wildcard.entry(suffix.clone()),
            };
            if let std::collections::hash_map::Entry::Vacant(slot) = table {
                slot.insert((key, entry));
            } else {
                return Err(format!("route `{key}`: the same name as another route ({pattern})"));
            }
        }
        for (key, entry) in [("no_sni", &router.no_sni), ("default", &router.default)] {
            if let Some(entry) = entry {
                entry.validate(key)?;
            }
        }
        *self = router;
        Ok(())
    }

    fn route(&self, conn: &Connection) -> Decision {
        match self.lookup(conn) {
            Some((key, entry)) => entry.decision(key),
            None => Decision::next(),
        }
    }

    /// A client certificate must be listed in its route's `clients`.
    fn admit(&self, conn: &Connection, side: Side, peer: &Peer) -> Verdict {
        let terminate = self.lookup(conn).and_then(|(_, entry)| entry.terminate.as_ref());
        match (side, terminate) {
            (Side::Client, Some(terminate)) if !terminate.admits(peer) => {
                Verdict::Deny(format!("client `{}` is not listed for this route", peer.subject))
            }
            _ => Verdict::Allow,
        }
    }
}

impl StaticRouter {
    /// The entry for a connection and its route name: exact name, then
    /// wildcard, then `default`; `no_sni` without a server name.
    fn lookup(&self, conn: &Connection) -> Option<(&str, &Entry)> {
        let Some(sni) = conn.sni.as_deref() else {
            return self.no_sni.as_ref().map(|entry| ("no_sni", entry));
        };
        let found = self.exact.get(sni).or_else(|| {
            let (_, parent) = weir_plugin_sdk::names::split_first_label(sni)?;
            self.wildcard.get(parent)
        });
        match found {
            Some((key, entry)) => Some((key.as_str(), entry)),
            None => self.default.as_ref().map(|entry| ("default", entry)),
        }
    }
}

export_plugin!(StaticRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_plugin_sdk::Action;

    fn router(config: &str) -> StaticRouter {
        let mut router = StaticRouter::default();
        router.configure(config).expect("config is valid");
        router
    }

    fn route(router: &StaticRouter, sni: Option<&str>) -> Decision {
        router.route(&Connection::for_test(sni, &[]))
    }

    #[test]
    fn exact_names_win_over_wildcards() {
        let r =
            router(r#"{"routes": {"a.example.com": {"pool": "exact"}, "*.example.com": {"address": "10.0.0.1:443"}}}"#);
        assert_eq!(
            route(&r, Some("a.example.com")),
            Decision::passthrough("a.example.com", Target::pool("exact"))
        );
        assert_eq!(
            route(&r, Some("b.example.com")),
            Decision::passthrough("*.example.com", Target::address("10.0.0.1:443"))
        );
        assert_eq!(route(&r, Some("x.b.example.com")).action, Action::Next);
        assert_eq!(route(&r, Some("example.com")).action, Action::Next);
    }

    #[test]
    fn keys_are_canonicalised() {
        let r = router(r#"{"routes": {"App.Example.COM.": {"pool": "p"}}}"#);
        assert_eq!(route(&r, Some("app.example.com")).route, "App.Example.COM.");
    }

    #[test]
    fn fallbacks_for_no_sni_and_no_match() {
        let r = router(r#"{"no_sni": {"pool": "plain"}, "default": {"reject": "unknown name"}}"#);
        assert_eq!(route(&r, None), Decision::passthrough("no_sni", Target::pool("plain")));
        assert_eq!(
            route(&r, Some("x.example")),
            Decision::reject("default", "unknown name")
        );
        let empty = router("");
        assert_eq!(route(&empty, None).action, Action::Next);
    }

    #[test]
    fn proxy_protocol_is_carried() {
        let r = router(r#"{"routes": {"a.example": {"pool": "p", "proxy_protocol": 2}}}"#);
        assert_eq!(
            route(&r, Some("a.example")),
            Decision::passthrough("a.example", Target::pool("p").with_proxy_protocol(2))
        );
    }

    #[test]
    fn terminations_and_their_client_lists() {
        let r = router(
            r#"{"routes": {
                "web.example": {"pool": "web", "terminate": {"certificate": "site", "alpn": ["h2"]}},
                "db.example": {"address": "10.0.0.5:5432", "terminate": {
                    "client_auth": "required", "client_ca": "clients", "clients": ["CN=alice", "bob.example"],
                    "reencrypt": {"ca": "db-ca", "server_name": "db.internal"}}}
            }}"#,
        );
        assert_eq!(
            route(&r, Some("web.example")),
            Decision::terminate(
                "web.example",
                Termination::plain(Target::pool("web"))
                    .with_certificate("site")
                    .with_alpn(["h2"])
            )
        );
        let upstream = UpstreamTls {
            server_name: Some("db.internal".into()),
            ca: Some("db-ca".into()),
            ..UpstreamTls::new()
        };
        assert_eq!(
            route(&r, Some("db.example")),
            Decision::terminate(
                "db.example",
                Termination::reencrypt(Target::address("10.0.0.5:5432"), upstream)
                    .with_client_auth(ClientAuth::Required("clients".into()))
            )
        );
        let conn = Connection::for_test(Some("db.example"), &[]);
        let peer = |subject: &str, sans: &[&str]| Peer {
            subject: subject.into(),
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
            fingerprint: vec![0; 32],
            attestation: None,
        };
        assert_eq!(r.admit(&conn, Side::Client, &peer("CN=alice", &[])), Verdict::Allow);
        assert_eq!(
            r.admit(&conn, Side::Client, &peer("CN=robert", &["Bob.Example"])),
            Verdict::Allow
        );
        assert_eq!(
            r.admit(&conn, Side::Client, &peer("CN=mallory", &["mallory.example"])),
            Verdict::Deny("client `CN=mallory` is not listed for this route".into())
        );
        assert_eq!(r.admit(&conn, Side::Upstream, &peer("CN=db", &[])), Verdict::Allow);
        let web = Connection::for_test(Some("web.example"), &[]);
        assert_eq!(r.admit(&web, Side::Client, &peer("CN=anyone", &[])), Verdict::Allow);
    }

    #[test]
    fn bad_configs_are_refused_with_the_route_named() {
        let cases = [
            (r#"{"routes": {"a": {}}}"#, "route `a`: give exactly one"),
            (
                r#"{"routes": {"a": {"pool": "p", "reject": "no"}}}"#,
                "route `a`: give exactly one",
            ),
            (
                r#"{"routes": {"a": {"pool": "p", "proxy_protocol": 3}}}"#,
                "route `a`: proxy_protocol: PROXY protocol version 3 does not exist (only 1 and 2)",
            ),
            (
                r#"{"routes": {"a..b": {"pool": "p"}}}"#,
                "route `a..b`: host name has an empty label",
            ),
            (
                r#"{"routes": {"a": {"pool": "p"}, "A.": {"pool": "q"}}}"#,
                "the same name as another route",
            ),
            (r#"{"routes": {"a": {"pol": "p"}}}"#, "unknown field `pol`"),
            (
                r#"{"routes": {"a": {"pool": "p", "terminate": {"client_auth": "required"}}}}"#,
                "route `a`: client_auth needs a `client_ca`",
            ),
            (
                r#"{"routes": {"a": {"pool": "p", "terminate": {"clients": ["CN=x"]}}}}"#,
                "`clients` needs client_auth",
            ),
            (
                r#"{"routes": {"a": {"reject": "no", "terminate": {}}}}"#,
                "`terminate` makes no sense with `reject`",
            ),
            (r#"{"route": {}}"#, "unknown field `route`"),
            ("not json", "invalid plugin config"),
        ];
        for (config, expected) in cases {
            let err = StaticRouter::default().configure(config).expect_err(config);
            assert!(err.contains(expected), "{config}: {err}");
        }
    }
}
