//! `static-router`: a table from server name to a passthrough target or a
//! rejection. The quickstart and the tests route with it.
//!
//! Config (JSON, or a TOML table in weir's config):
//!
//! ```json
//! {
//!   "routes": {
//!     "app.localhost":     { "pool": "app" },
//!     "*.demo.localhost":  { "address": "127.0.0.1:9443", "proxy_protocol": 2 },
//!     "old.localhost":     { "reject": "moved to app.localhost" }
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
#![deny(unsafe_code)]

use std::collections::HashMap;

use serde::Deserialize;
use weir_plugin_sdk::names::Pattern;
use weir_plugin_sdk::{Connection, Decision, Plugin, Target, export_plugin, parse_config};

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
        Decision::passthrough(route, target)
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
        if let Some(version) = self.proxy_protocol
            && version != 1
            && version != 2
        {
            return Err(format!("route `{key}`: proxy_protocol must be 1 or 2, got {version}"));
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
        let Some(sni) = conn.sni.as_deref() else {
            return match &self.no_sni {
                Some(entry) => entry.decision("no_sni"),
                None => Decision::next(),
            };
        };
        let found = self.exact.get(sni).or_else(|| {
            let (_, parent) = weir_plugin_sdk::names::split_first_label(sni)?;
            self.wildcard.get(parent)
        });
        match (found, &self.default) {
            (Some((key, entry)), _) => entry.decision(key),
            (None, Some(entry)) => entry.decision("default"),
            (None, None) => Decision::next(),
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
    fn bad_configs_are_refused_with_the_route_named() {
        let cases = [
            (r#"{"routes": {"a": {}}}"#, "route `a`: give exactly one"),
            (
                r#"{"routes": {"a": {"pool": "p", "reject": "no"}}}"#,
                "route `a`: give exactly one",
            ),
            (
                r#"{"routes": {"a": {"pool": "p", "proxy_protocol": 3}}}"#,
                "proxy_protocol must be 1 or 2",
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
            (r#"{"route": {}}"#, "unknown field `route`"),
            ("not json", "invalid plugin config"),
        ];
        for (config, expected) in cases {
            let err = StaticRouter::default().configure(config).expect_err(config);
            assert!(err.contains(expected), "{config}: {err}");
        }
    }
}
