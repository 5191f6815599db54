//! Decisions as the host carries them out: a plugin's WIT decision after
//! validation. Nothing a plugin returns is trusted: unknown pools, malformed
//! addresses, impossible PROXY versions and nameless routes are failures of
//! the plugin, never routes.

use serde::Serialize;

use crate::addr::HostPort;
use crate::plugin::wit;

/// Longest route name accepted: it ends up in logs and metric labels.
const MAX_ROUTE_LEN: usize = 256;

/// A validated routing decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The rule that decided, as the plugin named it.
    pub route: String,
    /// What to do with the connection.
    pub action: Action,
}

/// What to do with a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Forward the client's bytes untouched.
    Passthrough(Target),
    /// Close the connection, for this reason.
    Reject(String),
}

/// Where to send a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// The pool or address.
    pub upstream: Upstream,
    /// PROXY protocol version to send first, if any.
    pub proxy_protocol: Option<u8>,
}

/// A pool by name, or one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Upstream {
    /// A pool the config defines.
    Pool(String),
    /// One `host:port`.
    Address(#[serde(serialize_with = "display")] HostPort),
}

fn display<S: serde::Serializer>(value: &HostPort, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// What a decision may refer to: the names the current snapshot defines.
pub trait Known {
    /// Whether a pool of this name exists.
    fn has_pool(&self, name: &str) -> bool;
}

impl Decision {
    /// Validates a plugin's decision. `Ok(None)` is `next`.
    pub fn from_wit(decision: wit::Decision, known: &dyn Known) -> Result<Option<Decision>, String> {
        let action = match decision.action {
            wit::Action::Next => return Ok(None),
            wit::Action::Passthrough(target) => Action::Passthrough(Target::from_wit(target, known)?),
            wit::Action::Reject(reason) => Action::Reject(reason),
            wit::Action::Terminate(_) => {
                return Err("terminate: this gateway has no certificates to terminate TLS with".into());
            }
        };
        let route = decision.route;
        if route.is_empty() {
            return Err("the route name is empty".into());
        }
        if route.len() > MAX_ROUTE_LEN {
            return Err(format!(
                "the route name is {} bytes, more than {MAX_ROUTE_LEN}",
                route.len()
            ));
        }
        if route.chars().any(char::is_control) {
            return Err(format!("the route name {route:?} contains control characters"));
        }
        Ok(Some(Decision { route, action }))
    }
}

impl Target {
    fn from_wit(target: wit::Target, known: &dyn Known) -> Result<Target, String> {
        let upstream = match target.upstream {
            wit::Upstream::Pool(name) if known.has_pool(&name) => Upstream::Pool(name),
            wit::Upstream::Pool(name) => return Err(format!("unknown pool `{name}`")),
            wit::Upstream::Address(addr) => Upstream::Address(HostPort::parse(&addr).map_err(|e| e.to_string())?),
        };
        if let Some(version) = target.proxy_protocol
            && version != 1
            && version != 2
        {
            return Err(format!("PROXY protocol version {version} (only 1 and 2 exist)"));
        }
        Ok(Target {
            upstream,
            proxy_protocol: target.proxy_protocol,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pools;
    impl Known for Pools {
        fn has_pool(&self, name: &str) -> bool {
            name == "app"
        }
    }

    fn passthrough(route: &str, upstream: wit::Upstream, proxy_protocol: Option<u8>) -> wit::Decision {
        wit::Decision {
            route: route.into(),
            action: wit::Action::Passthrough(wit::Target {
                upstream,
                proxy_protocol,
            }),
        }
    }

    #[test]
    fn valid_decisions_pass() {
        let d = Decision::from_wit(passthrough("r", wit::Upstream::Pool("app".into()), Some(2)), &Pools)
            .expect("valid")
            .expect("not next");
        assert_eq!(
            d.action,
            Action::Passthrough(Target {
                upstream: Upstream::Pool("app".into()),
                proxy_protocol: Some(2)
            })
        );
        let next = wit::Decision {
            route: String::new(),
            action: wit::Action::Next,
        };
        assert_eq!(Decision::from_wit(next, &Pools), Ok(None));
        let json = serde_json::to_string(
            &Decision::from_wit(
                passthrough("r", wit::Upstream::Address("127.0.0.1:9".into()), None),
                &Pools,
            )
            .expect("valid"),
        )
        .expect("serialises");
        assert_eq!(
            json,
            r#"{"route":"r","action":{"passthrough":{"upstream":{"address":"127.0.0.1:9"},"proxy_protocol":null}}}"#
        );
    }

    #[test]
    fn invalid_decisions_say_why() {
        let cases = [
            (
                passthrough("r", wit::Upstream::Pool("nope".into()), None),
                "unknown pool `nope`",
            ),
            (
                passthrough("r", wit::Upstream::Address("nowhere".into()), None),
                "no port",
            ),
            (
                passthrough("r", wit::Upstream::Pool("app".into()), Some(3)),
                "PROXY protocol version 3",
            ),
            (
                passthrough("", wit::Upstream::Pool("app".into()), None),
                "route name is empty",
            ),
            (
                passthrough("a\nb", wit::Upstream::Pool("app".into()), None),
                "control characters",
            ),
            (
                passthrough(&"r".repeat(300), wit::Upstream::Pool("app".into()), None),
                "300 bytes",
            ),
        ];
        for (decision, expected) in cases {
            let err = Decision::from_wit(decision, &Pools).expect_err(expected);
            assert!(err.contains(expected), "{err}");
        }
    }
}
