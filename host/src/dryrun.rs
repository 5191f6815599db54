//! A dry run of a listener's plugin chain: the connection a client with
//! this SNI, ALPN, address and protocol would be, and what the chain
//! decides for it, plugin by plugin — what `weir route` prints and
//! `POST /api/route` answers.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::plugin::chain::Routing;
use crate::snapshot::Snapshot;
use crate::wit;

/// Longest server name a query may give (a DNS name is at most 253).
const MAX_SNI: usize = 253;
/// Most ALPN protocols a query may give, and their longest.
const MAX_ALPN: usize = 16;
const MAX_ALPN_LEN: usize = 255;

/// How the client starts the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// A TLS ClientHello.
    #[default]
    Tls,
    /// PostgreSQL's SSLRequest, then a ClientHello.
    PostgresTls,
    /// Nothing sniffed.
    Plain,
}

/// The connection to decide for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// The listener whose chain decides.
    pub listener: String,
    /// The server name the client sends (canonicalised as the gateway does).
    #[serde(default)]
    pub sni: Option<String>,
    /// The ALPN protocols it offers.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Its address: an IP, or `ip:port`.
    #[serde(default = "loopback")]
    pub client_ip: String,
    /// How it starts.
    #[serde(default)]
    pub protocol: Protocol,
}

fn loopback() -> String {
    "127.0.0.1".into()
}

/// A dry run's connection and what the chain made of it.
pub struct DryRun {
    conn: wit::Connection,
    protocol: &'static str,
    routing: Routing,
}

/// What `weir route` prints.
#[derive(Serialize)]
struct Report<'a> {
    listener: &'a str,
    connection: ConnectionReport<'a>,
    #[serde(flatten)]
    routing: &'a Routing,
}

#[derive(Serialize)]
struct ConnectionReport<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    client_addr: String,
    local_addr: String,
    protocol: &'static str,
    sni: Option<&'a str>,
    alpn: &'a [String],
}

/// Runs `snapshot`'s chain for `query` (the tenant owning its name decides
/// when there is one), as a connection would; the error says what in the
/// query is wrong.
pub async fn run(snapshot: &Snapshot, query: &Query) -> Result<DryRun, String> {
    use std::net::IpAddr;
    let name = query.listener.as_str();
    let Some(listener) = snapshot.listener(name) else {
        let known: Vec<&str> = snapshot.config.listeners.keys().map(String::as_str).collect();
        return Err(format!(
            "no listener named `{}` (the config has: {})",
            name.escape_debug(),
            known.join(", ")
        ));
    };
    let sni = match &query.sni {
        Some(sni) if sni.len() > MAX_SNI => return Err(format!("sni: longer than {MAX_SNI} bytes")),
        Some(sni) => Some(
            weir_plugin_sdk::names::canonicalize(sni.as_bytes())
                .map_err(|e| format!("sni {:?}: {e}", sni.escape_debug().to_string()))?,
        ),
        None => None,
    };
    if query.alpn.len() > MAX_ALPN || query.alpn.iter().any(|p| p.is_empty() || p.len() > MAX_ALPN_LEN) {
        return Err(format!(
            "alpn: at most {MAX_ALPN} protocols of 1 to {MAX_ALPN_LEN} bytes"
        ));
    }
    let client_ip = query.client_ip.as_str();
    let client_addr = match client_ip.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => SocketAddr::new(
            client_ip.parse::<IpAddr>().map_err(|_| {
                format!(
                    "client_ip {:?} is not an IP address",
                    client_ip.escape_debug().to_string()
                )
            })?,
            0,
        ),
    };
    let (protocol, protocol_name) = match query.protocol {
        Protocol::Tls => (wit::Protocol::Tls, "tls"),
        Protocol::PostgresTls => (wit::Protocol::PostgresTls, "postgres-tls"),
        Protocol::Plain => (wit::Protocol::Plain, "plain"),
    };
    let mut conn = wit::Connection {
        id: 0,
        listener: name.to_owned(),
        tenant: None,
        client: client_addr.into(),
        local: listener.config.bind.into(),
        protocol,
        sni,
        alpn: query.alpn.clone(),
        tls_versions: if protocol == wit::Protocol::Plain {
            Vec::new()
        } else {
            vec![0x0304, 0x0303]
        },
    };
    let tenant = snapshot.tenant_for(conn.sni.as_deref()).cloned();
    conn.tenant = tenant.as_ref().map(|t| t.name.to_string());
    let conn = Arc::new(conn);
    let mut routing = snapshot.route(listener, tenant.as_deref(), &conn).await;
    let pending = std::mem::take(&mut routing.pending);
    routing.shadows = crate::plugin::shadow::run(&pending, &conn).await;
    Ok(DryRun {
        conn: Arc::unwrap_or_clone(conn),
        protocol: protocol_name,
        routing,
    })
}

impl DryRun {
    /// The connection and the decision, as JSON (`weir route`'s output).
    pub fn report(&self) -> serde_json::Value {
        let report = Report {
            listener: &self.conn.listener,
            connection: ConnectionReport {
                tenant: self.conn.tenant.as_deref(),
                client_addr: SocketAddr::from(self.conn.client).to_string(),
                local_addr: SocketAddr::from(self.conn.local).to_string(),
                protocol: self.protocol,
                sni: self.conn.sni.as_deref(),
                alpn: &self.conn.alpn,
            },
            routing: &self.routing,
        };
        serde_json::to_value(&report).unwrap_or_default()
    }

    /// The chain's work in words (`weir route --explain`).
    pub fn explanation(&self) -> String {
        explanation(&self.conn, self.protocol, &self.routing)
    }
}

/// `weir route --explain`: the chain's work in words.
fn explanation(conn: &wit::Connection, protocol: &str, routing: &Routing) -> String {
    use crate::config::OnError;
    use crate::plugin::chain::StepOutcome;
    use std::fmt::Write as _;
    let mut out = String::new();
    let sni = conn.sni.as_deref().unwrap_or("(none)");
    let _ = writeln!(
        out,
        "connection: {protocol}, SNI {sni}, ALPN [{}], from {}, on listener `{}`",
        conn.alpn.join(", "),
        SocketAddr::from(conn.client),
        conn.listener
    );
    match &conn.tenant {
        Some(tenant) => {
            let _ = writeln!(out, "tenant: `{tenant}` owns this name, so its chain decides");
        }
        None => {
            let _ = writeln!(out, "tenant: none, so the listener's chain decides");
        }
    }
    for (i, step) in routing.steps.iter().enumerate() {
        let what = match &step.outcome {
            StepOutcome::Next => "abstained (next)".to_owned(),
            StepOutcome::Decided => format!("decided: rule `{}`", routing.decision.route),
            StepOutcome::Failed { error, on_error } => {
                let then = match on_error {
                    OnError::Deny => "on_error = deny, so the connection is refused",
                    OnError::Next => "on_error = next, so it is skipped",
                };
                format!("failed: {error}; {then}")
            }
        };
        let _ = writeln!(out, "  {}. plugin `{}` {what} ({} µs)", i + 1, step.plugin, step.micros);
    }
    let why = match &routing.plugin {
        Some(plugin) => format!("by plugin `{plugin}`, rule `{}`", routing.decision.route),
        None => "no plugin decided (`no-route`)".to_owned(),
    };
    let _ = writeln!(out, "decision: {} — {why}", describe_action(&routing.decision.action));
    for shadow in &routing.shadows {
        let _ = writeln!(
            out,
            "shadow: plugin `{}` (shadow_of `{}`) {}: {}",
            shadow.plugin, shadow.live, shadow.result, shadow.decision
        );
    }
    out
}

fn describe_target(target: &crate::plugin::decision::Target) -> String {
    use crate::plugin::decision::Upstream;
    let to = match &target.upstream {
        Upstream::Pool(pool) => format!("pool `{pool}`"),
        Upstream::PoolOnPort(pool, port) => format!("pool `{pool}` on port {port}"),
        Upstream::Address(addr) => addr.to_string(),
    };
    match target.proxy_protocol {
        Some(version) => format!("{to}, with a PROXY v{version} header"),
        None => to,
    }
}

fn describe_action(action: &crate::plugin::decision::Action) -> String {
    use crate::plugin::decision::{Action, After, ClientAuth};
    match action {
        Action::Passthrough(target) => format!("pass through untouched to {}", describe_target(target)),
        Action::Reject(reason) => format!("reject ({reason:?})"),
        Action::Terminate(t) => {
            let certificate = match &t.certificate {
                Some(name) => format!("certificate `{name}`"),
                None => "the certificate chosen by SNI".to_owned(),
            };
            let client = match &t.client_auth {
                ClientAuth::None => String::new(),
                ClientAuth::Optional(ca) => format!(", client certificates optional (CA `{ca}`)"),
                ClientAuth::Required(ca) => format!(", client certificates required (CA `{ca}`)"),
                ClientAuth::Attested => ", RA-TLS client certificates required".to_owned(),
            };
            let alpn = match t.alpn.is_empty() {
                true => String::new(),
                false => format!(", ALPN [{}]", t.alpn.join(", ")),
            };
            let then = match &t.then {
                After::Plain(target) => format!("then plain to {}", describe_target(target)),
                After::Reencrypt(target, tls) => format!(
                    "then re-encrypted to {} (verified by {})",
                    describe_target(target),
                    describe_verification(tls)
                ),
            };
            format!("terminate TLS with {certificate}{client}{alpn}, {then}")
        }
        Action::Originate(o) => {
            let alpn = match o.alpn.is_empty() {
                true => String::new(),
                false => format!(", offering ALPN [{}]", o.alpn.join(", ")),
            };
            let client_cert = match &o.tls.client_cert {
                Some(name) => format!(", presenting certificate `{name}`"),
                None => String::new(),
            };
            format!(
                "open TLS for the plain client to {} (verified by {}){client_cert}{alpn}",
                describe_target(&o.target),
                describe_verification(&o.tls)
            )
        }
    }
}

/// What verifies an upstream weir speaks TLS to.
fn describe_verification(tls: &crate::plugin::decision::UpstreamTls) -> String {
    match (&tls.ca, tls.attested) {
        (_, true) => "its RA-TLS attestation".to_owned(),
        (Some(ca), false) => format!("CA `{ca}`"),
        (None, false) => "the system roots".to_owned(),
    }
}
