//! `alpn-router`: one server name, several protocols: routes by the ALPN
//! protocols the client offers (`h2`, `http/1.1`, `postgresql`, ...), in the
//! client's order of preference, to different pools; passthrough, so each
//! pool's servers negotiate the protocol themselves.
//!
//! ```toml
//! config = { names = ["svc.example.com"], protocols = { h2 = "grpc", "http/1.1" = "web", postgresql = "db" }, default = "web" }
//! ```
//!
//! A client offering none of the protocols goes to `default`, or `next` when
//! there is none. Route names are `alpn:<protocol>` and `alpn:default`.

use std::collections::BTreeMap;

use serde::Deserialize;
use weir_plugin_sdk::{Connection, Decision, Plugin, Target, export_plugin, parse_config};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    names: Vec<String>,
    protocols: BTreeMap<String, String>,
    default: Option<String>,
}

/// The configured table.
#[derive(Debug, Default)]
pub struct AlpnRouter {
    config: Config,
}

impl Plugin for AlpnRouter {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let config: Config = parse_config(config)?;
        if config.protocols.is_empty() {
            return Err("`protocols` maps at least one ALPN protocol to a pool".into());
        }
        self.config = config;
        Ok(())
    }

    fn route(&self, conn: &Connection) -> Decision {
        let covered = self.config.names.is_empty()
            || conn
                .sni
                .as_deref()
                .is_some_and(|sni| self.config.names.iter().any(|n| n == sni));
        if !covered {
            return Decision::next();
        }
        let chosen = conn
            .alpn
            .iter()
            .find_map(|offered| self.config.protocols.get(offered).map(|pool| (offered, pool)));
        match (chosen, &self.config.default) {
            (Some((protocol, pool)), _) => Decision::passthrough(format!("alpn:{protocol}"), Target::pool(pool)),
            (None, Some(pool)) => Decision::passthrough("alpn:default", Target::pool(pool)),
            (None, None) => Decision::next(),
        }
    }
}

export_plugin!(AlpnRouter);

#[cfg(test)]
mod tests {
    use weir_plugin_sdk::Action;

    use super::*;

    #[test]
    fn the_clients_first_known_protocol_wins() {
        let mut p = AlpnRouter::default();
        p.configure(r#"{"names": ["svc.test"], "protocols": {"h2": "grpc", "http/1.1": "web", "postgresql": "db"}, "default": "web"}"#)
            .expect("valid");
        let route = |alpn: &[&str]| p.route(&Connection::for_test(Some("svc.test"), alpn));
        assert_eq!(
            route(&["h2", "http/1.1"]),
            Decision::passthrough("alpn:h2", Target::pool("grpc"))
        );
        assert_eq!(
            route(&["spdy", "http/1.1"]),
            Decision::passthrough("alpn:http/1.1", Target::pool("web"))
        );
        assert_eq!(
            route(&["postgresql"]),
            Decision::passthrough("alpn:postgresql", Target::pool("db"))
        );
        assert_eq!(route(&[]), Decision::passthrough("alpn:default", Target::pool("web")));
        assert_eq!(
            p.route(&Connection::for_test(Some("other.test"), &["h2"])).action,
            Action::Next
        );
        assert!(AlpnRouter::default().configure(r#"{"protocols": {}}"#).is_err());
    }
}
