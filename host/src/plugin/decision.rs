//! Decisions as the host carries them out: a plugin's WIT decision after
//! validation. Nothing a plugin returns is trusted: unknown pools, malformed
//! addresses, impossible PROXY versions and nameless routes are failures of
//! the plugin, never routes.

use serde::Serialize;

use crate::addr::HostPort;
use crate::wit;

/// Longest route name accepted: it ends up in logs and metric labels.
const MAX_ROUTE_LEN: usize = 256;
/// Longest reject reason accepted: it is logged with every refused
/// connection, and sent to PostgreSQL clients.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest name of a pool, certificate, CA, server name or address in a
/// decision.
const MAX_NAME_LEN: usize = 255;
/// Most ALPN protocols a termination may offer.
pub const MAX_ALPN: usize = 16;

/// Refuses a name from a decision that is longer than any real one, before
/// it is looked up or quoted in an error.
fn bounded<'a>(what: &'static str, name: &'a str) -> Result<&'a str, DecisionError> {
    if name.len() > MAX_NAME_LEN {
        return Err(DecisionError::TooLong { what, len: name.len() });
    }
    Ok(name)
}

/// Why a plugin's decision was refused (a failure of that plugin).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecisionError {
    /// A name longer than any real one.
    #[error("a {what} of {len} bytes (at most {MAX_NAME_LEN})")]
    TooLong {
        /// What the name names.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A pool or address name longer than any real one.
    #[error("an upstream of {0} bytes (at most {MAX_NAME_LEN})")]
    UpstreamTooLong(usize),
    /// A reject reason over [`MAX_REASON_LEN`].
    #[error("a reject reason of {0} bytes (at most {MAX_REASON_LEN})")]
    ReasonTooLong(usize),
    /// No route name.
    #[error("the route name is empty")]
    EmptyRoute,
    /// A route name over 256 bytes.
    #[error("the route name is {0} bytes, more than {MAX_ROUTE_LEN}")]
    RouteTooLong(usize),
    /// A route name with control characters (shown escaped).
    #[error("the route name {0:?} contains control characters")]
    RouteControl(String),
    /// More ALPN protocols than [`MAX_ALPN`].
    #[error("{0} ALPN protocols (at most {MAX_ALPN})")]
    TooManyAlpn(usize),
    /// An ALPN protocol name that is empty or over 255 bytes.
    #[error("{0}")]
    Alpn(String),
    /// A certificate the snapshot (or the tenant) does not have.
    #[error("unknown certificate `{0}`")]
    UnknownCertificate(String),
    /// A CA the snapshot (or the tenant) does not have.
    #[error("unknown CA `{0}`")]
    UnknownCa(String),
    /// Client authentication against a CA that has only pins.
    #[error("client authentication needs a CA bundle, and CA `{0}` has only pins")]
    PinsOnly(String),
    /// Both attestation and a CA for one upstream.
    #[error("upstream-tls: an attested upstream is identified by its attestation; drop `ca`")]
    AttestedWithCa,
    /// An upstream server name that is neither a DNS name nor an IP address.
    #[error("upstream server-name `{0}` is neither a DNS name nor an IP address")]
    ServerName(String),
    /// A pool the snapshot (or the tenant) does not have.
    #[error("unknown pool `{0}`")]
    UnknownPool(String),
    /// `pool:port` with a port that is not one.
    #[error("pool `{pool}`: `{port}` is not a port (1-65535)")]
    PoolPort {
        /// What the decision named.
        pool: String,
        /// The part after the colon.
        port: String,
    },
    /// An address that does not parse, or that the decision may not name
    /// (outside the tenant, one of weir's own).
    #[error("{0}")]
    Address(String),
    /// A PROXY protocol version that does not exist.
    #[error("{0}")]
    ProxyVersion(String),
}

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
    /// Terminate TLS at the gateway.
    Terminate(Termination),
    /// Open TLS to the upstream for a plain client.
    Originate(Origination),
    /// Close the connection, for this reason.
    Reject(String),
}

/// How the gateway opens TLS to the upstream of a plain client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origination {
    /// The pool or address.
    pub target: Target,
    /// How the upstream is verified, and the certificate presented to it.
    pub tls: UpstreamTls,
    /// ALPN protocols offered to the upstream, in order.
    pub alpn: Vec<String>,
    /// How TLS starts; `None`: contract 0.2.0's rule (an SSLRequest first
    /// for a PostgreSQL client unless `alpn` offers `postgresql`).
    pub start: Option<TlsStart>,
}

/// How an origination opens TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsStart {
    /// A ClientHello first.
    Direct,
    /// A PostgreSQL SSLRequest first, then the ClientHello after its `S`.
    PostgresSslRequest,
}

/// Where to send a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// The pool or address.
    pub upstream: Upstream,
    /// PROXY protocol version to send first, if any.
    pub proxy_protocol: Option<u8>,
}

/// How the gateway terminates TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Termination {
    /// The certificate to present; chosen by SNI when absent.
    pub certificate: Option<String>,
    /// Which client certificates are asked for.
    pub client_auth: ClientAuth,
    /// ALPN protocols offered to the client; the listener's when empty.
    pub alpn: Vec<String>,
    /// What happens to the decrypted stream.
    pub then: After,
}

/// Which client certificates a termination asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// None.
    None,
    /// Verified against this CA when sent.
    Optional(String),
    /// Required, verified against this CA.
    Required(String),
    /// A self-signed RA-TLS certificate whose attestation binds its key.
    Attested,
}

/// What happens after termination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum After {
    /// Forward the decrypted bytes.
    Plain(Target),
    /// Open a TLS connection to the target and forward through it.
    Reencrypt(Target, UpstreamTls),
}

impl After {
    /// The upstream target either way.
    pub fn target(&self) -> &Target {
        match self {
            After::Plain(target) | After::Reencrypt(target, _) => target,
        }
    }
}

/// How the gateway authenticates an upstream it re-encrypts to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTls {
    /// Name to send and verify; the client's SNI when absent.
    pub server_name: Option<String>,
    /// Trust anchor (CA bundle and/or pins); the system roots when absent.
    pub ca: Option<String>,
    /// Certificate presented to the upstream.
    pub client_cert: Option<String>,
    /// The upstream must present an RA-TLS certificate whose attestation
    /// binds its key.
    pub attested: bool,
}

/// A pool by name, or one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Upstream {
    /// A pool the config defines.
    Pool(String),
    /// A pool's servers, on this port instead of theirs (a plugin names it
    /// `pool:port`): the host still picks the server, with the pool's
    /// policy, health and failover.
    PoolOnPort(String, u16),
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
    /// Whether a certificate of this name exists.
    fn has_certificate(&self, name: &str) -> bool;
    /// Whether a trust anchor of this name exists, and if so whether it has
    /// a CA bundle (pins alone cannot verify clients).
    fn ca(&self, name: &str) -> Option<bool>;
    /// Whether a decision may name this address; the error says why not.
    fn check_address(&self, addr: &HostPort) -> Result<(), String> {
        let _ = addr;
        Ok(())
    }
}

impl Decision {
    /// Validates a plugin's decision. `Ok(None)` is `next`.
    pub fn from_wit(decision: wit::Decision, known: &dyn Known) -> Result<Option<Decision>, DecisionError> {
        let action = match decision.action {
            wit::Action::Next => return Ok(None),
            wit::Action::Passthrough(target) => Action::Passthrough(Target::from_wit(target, known)?),
            wit::Action::Reject(reason) if reason.len() > MAX_REASON_LEN => {
                return Err(DecisionError::ReasonTooLong(reason.len()));
            }
            wit::Action::Reject(reason) => Action::Reject(reason),
            wit::Action::Terminate(termination) => Action::Terminate(Termination::from_wit(termination, known)?),
            wit::Action::Originate(origination) => Action::Originate(Origination::from_wit(origination, known)?),
        };
        let route = decision.route;
        if route.is_empty() {
            return Err(DecisionError::EmptyRoute);
        }
        if route.len() > MAX_ROUTE_LEN {
            return Err(DecisionError::RouteTooLong(route.len()));
        }
        if route.chars().any(char::is_control) {
            return Err(DecisionError::RouteControl(route));
        }
        Ok(Some(Decision { route, action }))
    }
}

impl Termination {
    fn from_wit(t: wit::Termination, known: &dyn Known) -> Result<Termination, DecisionError> {
        if t.alpn.len() > MAX_ALPN {
            return Err(DecisionError::TooManyAlpn(t.alpn.len()));
        }
        if let Some(name) = &t.certificate {
            bounded("certificate name", name)?;
        }
        if let Some(name) = &t.certificate
            && !known.has_certificate(name)
        {
            return Err(DecisionError::UnknownCertificate(name.clone()));
        }
        let client_ca = |name: String| match bounded("CA name", &name).map(|name| known.ca(name))? {
            Some(true) => Ok(name),
            Some(false) => Err(DecisionError::PinsOnly(name)),
            None => Err(DecisionError::UnknownCa(name)),
        };
        let client_auth = match t.client_auth {
            wit::ClientAuth::None => ClientAuth::None,
            wit::ClientAuth::Optional(ca) => ClientAuth::Optional(client_ca(ca)?),
            wit::ClientAuth::Required(ca) => ClientAuth::Required(client_ca(ca)?),
            wit::ClientAuth::Attested => ClientAuth::Attested,
        };
        crate::config::tls::alpn_list(&t.alpn).map_err(DecisionError::Alpn)?;
        let then = match t.then {
            wit::After::Plain(target) => After::Plain(Target::from_wit(target, known)?),
            wit::After::Reencrypt((target, tls)) => {
                After::Reencrypt(Target::from_wit(target, known)?, UpstreamTls::from_wit(tls, known)?)
            }
        };
        Ok(Termination {
            certificate: t.certificate,
            client_auth,
            alpn: t.alpn,
            then,
        })
    }
}

impl Origination {
    fn from_wit(o: wit::Origination, known: &dyn Known) -> Result<Origination, DecisionError> {
        if o.alpn.len() > MAX_ALPN {
            return Err(DecisionError::TooManyAlpn(o.alpn.len()));
        }
        crate::config::tls::alpn_list(&o.alpn).map_err(DecisionError::Alpn)?;
        Ok(Origination {
            target: Target::from_wit(o.target, known)?,
            tls: UpstreamTls::from_wit(o.tls, known)?,
            alpn: o.alpn,
            start: o.start.map(|start| match start {
                wit::TlsStart::Direct => TlsStart::Direct,
                wit::TlsStart::PostgresSslRequest => TlsStart::PostgresSslRequest,
            }),
        })
    }
}

impl UpstreamTls {
    fn from_wit(tls: wit::UpstreamTls, known: &dyn Known) -> Result<UpstreamTls, DecisionError> {
        for (what, name) in [
            ("server name", &tls.server_name),
            ("CA name", &tls.ca),
            ("certificate name", &tls.client_cert),
        ] {
            if let Some(name) = name {
                bounded(what, name)?;
            }
        }
        if tls.attested && tls.ca.is_some() {
            return Err(DecisionError::AttestedWithCa);
        }
        if let Some(name) = &tls.server_name {
            rustls::pki_types::ServerName::try_from(name.as_str())
                .map_err(|_| DecisionError::ServerName(name.clone()))?;
        }
        if let Some(name) = &tls.ca
            && known.ca(name).is_none()
        {
            return Err(DecisionError::UnknownCa(name.clone()));
        }
        if let Some(name) = &tls.client_cert
            && !known.has_certificate(name)
        {
            return Err(DecisionError::UnknownCertificate(name.clone()));
        }
        Ok(UpstreamTls {
            server_name: tls.server_name,
            ca: tls.ca,
            client_cert: tls.client_cert,
            attested: tls.attested,
        })
    }
}

impl Target {
    fn from_wit(target: wit::Target, known: &dyn Known) -> Result<Target, DecisionError> {
        let upstream = match target.upstream {
            wit::Upstream::Pool(name) | wit::Upstream::Address(name) if name.len() > MAX_NAME_LEN => {
                return Err(DecisionError::UpstreamTooLong(name.len()));
            }
            wit::Upstream::Pool(name) if known.has_pool(&name) => Upstream::Pool(name),
            wit::Upstream::Pool(name) => match name.rsplit_once(':') {
                Some((pool, port)) if known.has_pool(pool) => match port.parse::<u16>() {
                    Ok(port) if port > 0 => Upstream::PoolOnPort(pool.to_owned(), port),
                    _ => {
                        return Err(DecisionError::PoolPort {
                            pool: name.clone(),
                            port: port.to_owned(),
                        });
                    }
                },
                _ => return Err(DecisionError::UnknownPool(name)),
            },
            wit::Upstream::Address(addr) => {
                let addr = HostPort::parse(&addr).map_err(|e| DecisionError::Address(e.to_string()))?;
                known.check_address(&addr).map_err(DecisionError::Address)?;
                Upstream::Address(addr)
            }
        };
        if let Some(version) = target.proxy_protocol {
            weir_plugin_sdk::proxy::check_version(version).map_err(DecisionError::ProxyVersion)?;
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
        fn has_certificate(&self, name: &str) -> bool {
            name == "site"
        }
        fn ca(&self, name: &str) -> Option<bool> {
            match name {
                "clients" => Some(true),
                "pinned" => Some(false),
                _ => None,
            }
        }
    }

    fn terminate(certificate: Option<&str>, client_auth: wit::ClientAuth, then: wit::After) -> wit::Decision {
        wit::Decision {
            route: "t".into(),
            action: wit::Action::Terminate(wit::Termination {
                certificate: certificate.map(Into::into),
                client_auth,
                alpn: vec!["h2".into()],
                then,
            }),
        }
    }

    fn upstream_tls(ca: Option<&str>, client_cert: Option<&str>, server_name: Option<&str>) -> wit::UpstreamTls {
        wit::UpstreamTls {
            server_name: server_name.map(Into::into),
            ca: ca.map(Into::into),
            client_cert: client_cert.map(Into::into),
            attested: false,
        }
    }

    fn pool() -> wit::Target {
        wit::Target {
            upstream: wit::Upstream::Pool("app".into()),
            proxy_protocol: None,
        }
    }

    #[test]
    fn terminations_are_checked_against_the_snapshot() {
        let good = terminate(
            Some("site"),
            wit::ClientAuth::Required("clients".into()),
            wit::After::Reencrypt((pool(), upstream_tls(Some("pinned"), Some("site"), Some("db.internal")))),
        );
        let decision = Decision::from_wit(good, &Pools).expect("valid").expect("not next");
        let Action::Terminate(t) = decision.action else {
            panic!("not a termination: {decision:?}")
        };
        assert_eq!(t.client_auth, ClientAuth::Required("clients".into()));
        assert_eq!(t.then.target().upstream, Upstream::Pool("app".into()));
        let mut many_protocols = terminate(None, wit::ClientAuth::None, wit::After::Plain(pool()));
        if let wit::Action::Terminate(t) = &mut many_protocols.action {
            t.alpn = (0..40_000).map(|n| format!("{n:0>255}")).collect();
        }
        let cases = [
            (many_protocols, "40000 ALPN protocols (at most 16)"),
            (
                terminate(Some(&"c".repeat(256)), wit::ClientAuth::None, wit::After::Plain(pool())),
                "a certificate name of 256 bytes",
            ),
            (
                terminate(
                    None,
                    wit::ClientAuth::Required("c".repeat(300)),
                    wit::After::Plain(pool()),
                ),
                "a CA name of 300 bytes",
            ),
            (
                terminate(Some("nope"), wit::ClientAuth::None, wit::After::Plain(pool())),
                "unknown certificate `nope`",
            ),
            (
                terminate(
                    None,
                    wit::ClientAuth::Required("nope".into()),
                    wit::After::Plain(pool()),
                ),
                "unknown CA `nope`",
            ),
            (
                terminate(
                    None,
                    wit::ClientAuth::Optional("pinned".into()),
                    wit::After::Plain(pool()),
                ),
                "has only pins",
            ),
            (
                terminate(
                    None,
                    wit::ClientAuth::None,
                    wit::After::Reencrypt((
                        pool(),
                        wit::UpstreamTls {
                            attested: true,
                            ..upstream_tls(Some("pinned"), None, None)
                        },
                    )),
                ),
                "drop `ca`",
            ),
            (
                terminate(
                    None,
                    wit::ClientAuth::None,
                    wit::After::Reencrypt((pool(), upstream_tls(Some("nope"), None, None))),
                ),
                "unknown CA `nope`",
            ),
            (
                terminate(
                    None,
                    wit::ClientAuth::None,
                    wit::After::Reencrypt((pool(), upstream_tls(None, Some("nope"), None))),
                ),
                "unknown certificate `nope`",
            ),
            (
                terminate(
                    None,
                    wit::ClientAuth::None,
                    wit::After::Reencrypt((pool(), upstream_tls(None, None, Some("bad name!")))),
                ),
                "neither a DNS name",
            ),
        ];
        for (decision, expected) in cases {
            let err = Decision::from_wit(decision, &Pools).expect_err(expected);
            assert!(err.to_string().contains(expected), "expected `{expected}` in: {err}");
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
        let on_port = Decision::from_wit(passthrough("r", wit::Upstream::Pool("app:8080".into()), None), &Pools)
            .expect("valid")
            .expect("not next");
        assert_eq!(
            on_port.action,
            Action::Passthrough(Target {
                upstream: Upstream::PoolOnPort("app".into(), 8080),
                proxy_protocol: None
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
                passthrough("r", wit::Upstream::Pool("nope:80".into()), None),
                "unknown pool `nope:80`",
            ),
            (
                passthrough("r", wit::Upstream::Pool("app:0".into()), None),
                "`0` is not a port",
            ),
            (
                passthrough("r", wit::Upstream::Pool("app:http".into()), None),
                "`http` is not a port",
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
            (
                passthrough("r", wit::Upstream::Pool("p\n".repeat(1000)), None),
                "an upstream of 2000 bytes (at most 255)",
            ),
            (
                passthrough("r", wit::Upstream::Address("x".repeat(70_000)), None),
                "an upstream of 70000 bytes",
            ),
            (
                wit::Decision {
                    route: "r".into(),
                    action: wit::Action::Reject("why".repeat(400)),
                },
                "a reject reason of 1200 bytes (at most 1024)",
            ),
        ];
        for (decision, expected) in cases {
            let err = Decision::from_wit(decision, &Pools).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err}");
        }
    }
}
