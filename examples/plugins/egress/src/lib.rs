//! Egress: weir as the local RA-TLS forwarder of an app. A database driver
//! (or any client) speaks plain to a loopback listener; this plugin's table
//! says, per listener, which remote weir opens TLS to, how, and with which
//! of weir's certificates. The remote's measurements are judged by the
//! `admit` of the plugins after it in the chain (attestation-allowlist with
//! a rule per listener), so a refusal names the measurement that failed.
//!
//! ```toml
//! [listeners.db]
//! bind = "127.0.0.1:5432"
//! protocol = "postgres"
//! plugins = ["egress", "allow"]
//!
//! [plugins.egress]
//! wasm = "egress.wasm"
//! config.routes.db = { remote = "3327603e-5433s.dstack.example:443", protocol = "postgres", client_cert = "app" }
//!
//! [plugins.allow]
//! wasm = "attestation_allowlist.wasm"
//! config.rules = [{ listener = "db", side = "upstream", mrtd = ["91eb2b44..."] }]
//! ```
//!
//! Each route: `remote` (`host:port`) or `pool`; `server_name` (the SNI,
//! and the name the remote's certificate must carry unless `attested`;
//! defaults to `remote`'s host); `protocol`: `postgres` (PostgreSQL 17's
//! direct TLS: a ClientHello first, ALPN `postgresql` — what a dstack
//! gateway in between can route by SNI), `postgres-sslrequest` (an
//! SSLRequest first, for a server that expects one; no ALPN unless `alpn`
//! names it, as `["postgresql"]` is what PostgreSQL 17's libpq offers
//! there), or `tls` (anything else, with the `alpn` list given);
//! `client_cert` (a `[certificates]` name:
//! weir's attested identity); `ca` (a `[cas]` name) and `attested` (the
//! remote must present a verified RA-TLS certificate; default true). A
//! listener without a route abstains (`next`).

use std::collections::BTreeMap;

use serde::Deserialize;
use weir_plugin_sdk::{Connection, Decision, Plugin, Target, TlsStart, UpstreamTls, export_plugin, parse_config};

/// How weir starts TLS with the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Protocol {
    /// PostgreSQL's direct TLS: ALPN `postgresql`, ClientHello first.
    Postgres,
    /// PostgreSQL's SSLRequest, then TLS.
    PostgresSslrequest,
    /// TLS from the first byte, with the route's ALPN list.
    Tls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Route {
    remote: Option<String>,
    pool: Option<String>,
    server_name: Option<String>,
    protocol: Protocol,
    #[serde(default)]
    alpn: Vec<String>,
    client_cert: Option<String>,
    ca: Option<String>,
    #[serde(default = "yes")]
    attested: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    routes: BTreeMap<String, Route>,
}

/// The table, checked.
#[derive(Debug, Default)]
pub struct Egress {
    routes: BTreeMap<String, Route>,
}

/// The host of a `host:port` (an IPv6 address without its brackets); the
/// host checks the whole address again when the decision names it.
fn host_of(remote: &str) -> Result<&str, &'static str> {
    let (host, port) = remote.rsplit_once(':').ok_or("is not host:port")?;
    match port.parse::<u16>() {
        Ok(port) if port > 0 => {}
        _ => return Err("has no port from 1 to 65535"),
    }
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return Err("has no host");
    }
    Ok(host)
}

impl Route {
    fn check(&mut self) -> Result<(), String> {
        match (&self.remote, &self.pool) {
            (Some(remote), None) => {
                let host = host_of(remote).map_err(|e| format!("remote: `{remote}` {e}"))?;
                if self.server_name.is_none() {
                    self.server_name = Some(host.to_owned());
                }
            }
            (None, Some(_)) if self.server_name.is_some() || self.attested => {}
            (None, Some(_)) => return Err("a pool route needs `server_name` (or `attested`)".into()),
            _ => return Err("name exactly one of `remote` and `pool`".into()),
        }
        match self.protocol {
            Protocol::Postgres if self.alpn.is_empty() => self.alpn = vec!["postgresql".into()],
            Protocol::Postgres => return Err("`alpn` is `postgresql` for protocol `postgres`: leave it out".into()),
            Protocol::PostgresSslrequest | Protocol::Tls => {}
        }
        if self.alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
            return Err("each ALPN protocol is 1 to 255 bytes".into());
        }
        if !self.attested && self.ca.is_none() && self.server_name.is_none() {
            return Err("the remote would be verified by nothing: set `attested`, `ca` or `server_name`".into());
        }
        Ok(())
    }

    fn decision(&self, listener: &str) -> Decision {
        let target = match (&self.remote, &self.pool) {
            (Some(remote), _) => Target::address(remote.clone()),
            (None, Some(pool)) => Target::pool(pool.clone()),
            (None, None) => return Decision::reject(listener, "invalid route"),
        };
        let tls = UpstreamTls {
            server_name: self.server_name.clone(),
            ca: self.ca.clone(),
            client_cert: self.client_cert.clone(),
            attested: self.attested,
        };
        let start = match self.protocol {
            Protocol::Postgres | Protocol::Tls => TlsStart::Direct,
            Protocol::PostgresSslrequest => TlsStart::PostgresSslRequest,
        };
        Decision::originate(listener, target, tls, self.alpn.clone()).starting(start)
    }
}

impl Plugin for Egress {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let mut config: Config = parse_config(config)?;
        for (listener, route) in &mut config.routes {
            route.check().map_err(|e| format!("routes.{listener}: {e}"))?;
        }
        self.routes = config.routes;
        Ok(())
    }

    fn route(&self, conn: &Connection) -> Decision {
        match self.routes.get(&conn.listener) {
            Some(route) => route.decision(&conn.listener),
            None => Decision::next(),
        }
    }
}

export_plugin!(Egress);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_plugin_sdk::{Action, Upstream};

    fn egress(config: &str) -> Result<Egress, String> {
        let mut plugin = Egress::default();
        plugin.configure(config).map(|()| plugin)
    }

    fn on(listener: &str) -> Connection {
        let mut conn = Connection::for_test(None, &[]);
        conn.listener = listener.into();
        conn
    }

    #[test]
    fn each_listener_opens_tls_to_its_remote() {
        let plugin = egress(
            r#"{"routes": {
                "db": {"remote": "app-5433s.dstack.example:443", "protocol": "postgres", "client_cert": "app"},
                "old-db": {"remote": "10.0.0.5:5432", "server_name": "db.internal", "protocol": "postgres-sslrequest", "ca": "db-ca", "attested": false},
                "pg17": {"remote": "10.0.0.6:5432", "protocol": "postgres-sslrequest", "alpn": ["postgresql"]},
                "api": {"pool": "api", "protocol": "tls", "alpn": ["h2"]}
            }}"#,
        )
        .expect("valid");
        let Action::Originate(db) = plugin.route(&on("db")).action else {
            panic!("originates")
        };
        assert_eq!(
            db.target.upstream,
            Upstream::Address("app-5433s.dstack.example:443".into())
        );
        assert_eq!(db.tls.server_name.as_deref(), Some("app-5433s.dstack.example"));
        assert_eq!(db.tls.client_cert.as_deref(), Some("app"));
        assert!(db.tls.attested);
        assert_eq!(db.alpn, ["postgresql"]);
        assert_eq!(db.start, Some(TlsStart::Direct));
        let Action::Originate(old) = plugin.route(&on("old-db")).action else {
            panic!("originates")
        };
        assert!(old.alpn.is_empty(), "no ALPN unless the route names one");
        assert_eq!(old.start, Some(TlsStart::PostgresSslRequest));
        let Action::Originate(pg17) = plugin.route(&on("pg17")).action else {
            panic!("originates")
        };
        assert_eq!(
            (pg17.alpn.as_slice(), pg17.start),
            (&["postgresql".to_owned()][..], Some(TlsStart::PostgresSslRequest))
        );
        assert_eq!(old.tls.ca.as_deref(), Some("db-ca"));
        assert!(!old.tls.attested);
        let Action::Originate(api) = plugin.route(&on("api")).action else {
            panic!("originates")
        };
        assert_eq!(api.target.upstream, Upstream::Pool("api".into()));
        assert_eq!(api.alpn, ["h2"]);
        assert_eq!(api.start, Some(TlsStart::Direct));
        assert_eq!(plugin.route(&on("other")).action, Action::Next);
    }

    #[test]
    fn bad_routes_are_refused_with_where() {
        for (config, error) in [
            (
                r#"{"routes": {"db": {"protocol": "postgres"}}}"#,
                "routes.db: name exactly one of `remote` and `pool`",
            ),
            (
                r#"{"routes": {"db": {"remote": "no-port", "protocol": "postgres"}}}"#,
                "routes.db: remote:",
            ),
            (
                r#"{"routes": {"db": {"remote": "a:1", "protocol": "postgres", "alpn": ["h2"]}}}"#,
                "routes.db: `alpn` is `postgresql`",
            ),
            (
                r#"{"routes": {"db": {"remote": "a:1", "protocol": "tls", "alpn": [""]}}}"#,
                "routes.db: each ALPN protocol is 1 to 255 bytes",
            ),
            (
                r#"{"routes": {"db": {"remote": "a:1", "protocol": "ftp"}}}"#,
                "unknown variant `ftp`",
            ),
        ] {
            let got = egress(config).expect_err(config);
            assert!(got.contains(error), "{config}: {got}");
        }
    }
}
