//! The admin HTTP server: Prometheus metrics, JSON status, reloads, pool
//! changes, and the dashboard.
//! Off unless the config has an `[admin]` section; loopback by default;
//! with a token, every request must carry it as a bearer token.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text |
//! | `GET /api/plugins` | each plugin: wasm path, SHA-256, load time, on_error |
//! | `GET /api/routes` | listeners with their chains, pools, certificates, CAs |
//! | `GET /api/certificates` | each certificate: notAfter, whether an OCSP response is stapled now, its nextUpdate; ACME certificates not issued yet |
//! | `GET /api/tenants` | each tenant: domains, plugins, pools, upstream ranges, active connections and limit, upstream sockets held and `max_descriptors` |
//! | `GET /api/pools`, `GET /api/pools/{name}` | policy, backends with health, ejection, active connections, connections, failures, bytes |
//! | `POST /api/pools` | creates or replaces a pool: `{"name": ..., "servers": [...], ...}` as in the config |
//! | `DELETE /api/pools/{name}` | removes a pool (refused while the config names it) |
//! | `POST /api/pools/{name}/backends` | adds a server: `{"address": "host:port", "weight": 1}` |
//! | `DELETE /api/pools/{name}/backends/{address}` | removes a server |
//! | `POST /api/pools/{name}/backends/{address}/drain`, `…/undrain` | drains or undrains a server |
//! | `GET /api/connections` | active and total connections by listener |
//! | `POST /api/route` | a dry run of a chain, as `weir route` does |
//! | `GET /api/overview` | version, uptime, the config in use, active connections, the last reload |
//! | `GET /`, `/dashboard.js`, `/dashboard.css` | the dashboard, without the token |
//! | `GET /api/reload` | reload counts and the latest reload |
//! | `POST /api/reload` | reloads now; 200 with the report, or 422 with the error |
//!
//! Anything else is a 4xx with a JSON `{"error": ...}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::gateway::Gateway;

mod dashboard;

/// Starts the admin server; returns its address and task.
pub async fn serve(
    gateway: Arc<Gateway>,
    bind: SocketAddr,
    token: Option<String>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    std::sync::LazyLock::force(&dashboard::STARTED);
    let token: Option<Arc<Token>> = token.map(|t| Arc::new(Token::new(&t)));
    let own = crate::own::OwnAddress::register(addr);
    let task = tokio::spawn(async move {
        let _own = own;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let gateway = Arc::clone(&gateway);
            let token = token.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let gateway = Arc::clone(&gateway);
                    let token = token.clone();
                    async move { Ok::<_, Infallible>(answer(request, &gateway, token.as_deref()).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

/// What every answer carries: no sniffing, no framing, no referrer, no
/// caching, and a policy that lets a page run only the dashboard's own
/// script and style sheet and talk only to this server.
const SECURITY_HEADERS: [(&str, &str); 5] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
];

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = content_type.parse() {
        headers.insert(hyper::header::CONTENT_TYPE, value);
    }
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, hyper::header::HeaderValue::from_static(value));
    }
    response
}

fn json_reply(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", format!("{value}\n"))
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_reply(status, &json!({ "error": message }))
}

/// A pool's policy and its backends' state and counters.
fn pool_json(pool: &crate::pool::Pool) -> serde_json::Value {
    let backends: Vec<_> = pool.backends().iter().map(|b| b.stats()).collect();
    let healthy = backends.iter().filter(|b| b.healthy && !b.ejected).count();
    let active: usize = backends.iter().map(|b| b.active).sum();
    json!({
        "policy": pool.config.policy,
        "health_checks": pool.config.health.is_some(),
        "backends": backends,
        "healthy": healthy,
        "active": active,
    })
}

/// A request body as JSON, at most 64 KiB.
async fn body_json<T: serde::de::DeserializeOwned>(request: Request<Incoming>) -> Result<T, Response<Full<Bytes>>> {
    use http_body_util::{BodyExt, Limited};
    let bytes = Limited::new(request.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("cannot read the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))
}

async fn pools_api(
    request: Request<Incoming>,
    gateway: &Gateway,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    use crate::gateway::{PoolEdit, PoolEditError};
    let applied = |result: Result<(), PoolEditError>, name: &str, status: StatusCode| match result {
        Ok(()) => match gateway.snapshot().pool(name) {
            Some(pool) => json_reply(status, &pool_json(pool)),
            None => json_reply(status, &json!({ "deleted": name })),
        },
        Err(PoolEditError::NotFound(reason)) => error(StatusCode::NOT_FOUND, &reason),
        Err(PoolEditError::Conflict(reason)) => error(StatusCode::CONFLICT, &reason),
        Err(reason) => error(StatusCode::UNPROCESSABLE_ENTITY, &reason.to_string()),
    };
    let rest: Vec<&str> = path
        .trim_start_matches("/api/pools")
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    match (method, rest.as_slice()) {
        (&Method::POST, []) => {
            // A pool as the config writes it, plus its name; unknown fields
            // are refused like in the config file.
            let mut fields: serde_json::Map<String, serde_json::Value> = match body_json(request).await {
                Ok(fields) => fields,
                Err(response) => return response,
            };
            let Some(serde_json::Value::String(name)) = fields.remove("name") else {
                return error(StatusCode::BAD_REQUEST, "`name` (a string) is required");
            };
            let pool: crate::config::PoolConfig = match serde_json::from_value(serde_json::Value::Object(fields)) {
                Ok(pool) => pool,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid pool: {e}")),
            };
            let result = gateway.edit_pool(&name, PoolEdit::Set(pool)).await;
            applied(result, &name, StatusCode::CREATED)
        }
        (&Method::DELETE, [name]) => {
            let result = gateway.edit_pool(name, PoolEdit::Delete).await;
            applied(result, name, StatusCode::OK)
        }
        (&Method::POST, [name, "backends"]) => {
            let server: crate::config::ServerConfig = match body_json(request).await {
                Ok(server) => server,
                Err(response) => return response,
            };
            let result = gateway.edit_pool(name, PoolEdit::AddServer(server)).await;
            applied(result, name, StatusCode::OK)
        }
        (&Method::DELETE, [name, "backends", address]) => {
            let result = gateway
                .edit_pool(name, PoolEdit::RemoveServer(percent_decode(address)))
                .await;
            applied(result, name, StatusCode::OK)
        }
        (&Method::POST, [name, "backends", address, action @ ("drain" | "undrain")]) => {
            let edit = PoolEdit::Drain(percent_decode(address), *action == "drain");
            let result = gateway.edit_pool(name, edit).await;
            applied(result, name, StatusCode::OK)
        }
        (&Method::GET, [name]) => match gateway.snapshot().pool(name) {
            Some(pool) => json_reply(StatusCode::OK, &pool_json(pool)),
            None => error(StatusCode::NOT_FOUND, &format!("no pool named `{name}`")),
        },
        (&Method::GET, []) => {
            let snapshot = gateway.snapshot();
            let pools: serde_json::Map<_, _> = snapshot
                .pools()
                .iter()
                .map(|(name, pool)| (name.clone(), pool_json(pool)))
                .collect();
            json_reply(StatusCode::OK, &json!({ "pools": pools }))
        }
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
    }
}

/// `%XX` escapes in a path segment (an IPv6 address's brackets and colons).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            segment.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()),
        ) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a request that a web page could have made is refused, if it is.
///
/// A browser lets any page it shows send a "simple" cross-site POST (a form,
/// or `fetch` with `text/plain`) to a loopback admin address, and a page
/// whose name an attacker re-points at 127.0.0.1 (DNS rebinding) is even
/// same-origin with it. So a change is refused when its `Origin` is not
/// the admin server itself or `Sec-Fetch-Site` says another site, and a
/// body must be `application/json` (which a page can only send after a
/// CORS preflight, which this server never grants). Without a token, a
/// change's `Host` must be an IP address or `localhost`, which rebinding
/// cannot produce (reads stay open to any `Host`, so Prometheus may scrape
/// by name). Clients that are not browsers (curl, scripts) send none of
/// these headers and are not affected.
fn browser_refusal(request: &Request<Incoming>, has_token: bool) -> Option<String> {
    let header =
        |name: hyper::header::HeaderName| request.headers().get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let host = header(hyper::header::HOST);
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return None;
    }
    if !has_token && let Some(host) = host {
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
        };
        if name != "localhost" && name.parse::<std::net::IpAddr>().is_err() {
            return Some(format!(
                "Host `{}` is not an IP address or localhost; without admin.token, the admin API answers only those (DNS rebinding)",
                name.escape_debug()
            ));
        }
    }
    if let Some(site) = request.headers().get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Some("a change sent by a page of another site (Sec-Fetch-Site) is refused".into());
    }
    if let Some(origin) = header(hyper::header::ORIGIN) {
        let authority = origin.split_once("://").map(|(_, rest)| rest);
        if authority.is_none() || authority != host {
            return Some(format!(
                "a change from Origin `{}` is refused: only the admin server's own pages may send one",
                origin.escape_debug()
            ));
        }
    }
    let has_body = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .is_some_and(|n| n.as_bytes() != b"0")
        || request.headers().contains_key(hyper::header::TRANSFER_ENCODING);
    let json = header(hyper::header::CONTENT_TYPE).is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    if has_body && !json {
        return Some("a request body must be sent as Content-Type: application/json".into());
    }
    None
}

/// The admin token, kept as an HMAC tag under a key of this process's own,
/// so that a presented token is compared in constant time (`hmac::verify`):
/// how long a refusal takes says nothing of how much of a guess was right.
struct Token {
    key: ring::hmac::Key,
    tag: ring::hmac::Tag,
}

impl Token {
    fn new(token: &str) -> Token {
        let rng = ring::rand::SystemRandom::new();
        // The system's random source failing is not something to serve through.
        #[allow(clippy::expect_used)]
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).expect("the system random source works");
        let tag = ring::hmac::sign(&key, token.as_bytes());
        Token { key, tag }
    }

    fn matches(&self, presented: &str) -> bool {
        ring::hmac::verify(&self.key, presented.as_bytes(), self.tag.as_ref()).is_ok()
    }
}

async fn answer(request: Request<Incoming>, gateway: &Gateway, token: Option<&Token>) -> Response<Full<Bytes>> {
    // The dashboard's page, script and style sheet hold no data: served to
    // anyone, they ask for the token themselves.
    if matches!(*request.method(), Method::GET | Method::HEAD)
        && let Some(asset) = dashboard::asset(request.uri().path())
    {
        return asset;
    }
    if let Some(token) = token {
        let presented = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|presented| token.matches(presented)) {
            return error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        }
    }
    if let Some(reason) = browser_refusal(&request, token.is_some()) {
        return error(StatusCode::FORBIDDEN, &reason);
    }
    let path = request.uri().path().to_owned();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/metrics") => metrics_reply(gateway),
        (&Method::GET, "/api/certificates") => certificates_reply(gateway),
        (&Method::GET, "/api/plugins") => plugins_reply(gateway).await,
        (&Method::GET, "/api/routes") => routes_reply(gateway),
        (&Method::GET, "/api/tenants") => tenants_reply(gateway),
        (method, pools) if pools == "/api/pools" || pools.starts_with("/api/pools/") => {
            let method = method.clone();
            return pools_api(request, gateway, &method, &path).await;
        }
        (&Method::GET, "/api/connections") => connections_reply(gateway),
        (&Method::GET, "/api/overview") => dashboard::overview(gateway).await,
        (&Method::POST, "/api/route") => route_reply(request, gateway).await,
        (&Method::GET, "/api/reload") => json_reply(StatusCode::OK, &json!(gateway.reload_status().await)),
        (&Method::GET, "/api/fleet") => match gateway.fleet_status().await {
            Some(status) => json_reply(StatusCode::OK, &status),
            None => error(StatusCode::NOT_FOUND, "this node is not in fleet mode"),
        },
        (&Method::POST, "/api/reload") => {
            let report = gateway.reload("api").await;
            let status = match report.error {
                None => StatusCode::OK,
                Some(_) => StatusCode::UNPROCESSABLE_ENTITY,
            };
            json_reply(status, &json!(report))
        }
        (
            _,
            "/metrics" | "/api/plugins" | "/api/routes" | "/api/certificates" | "/api/tenants" | "/api/connections"
            | "/api/reload" | "/api/fleet" | "/api/route" | "/api/overview",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

/// An ACME certificate as the admin API shows it.
struct AcmeEntry {
    /// What its gauges show.
    status: crate::metrics::AcmeStatus,
    domains: Vec<String>,
    dns: Option<String>,
    last_order: Option<crate::acme::LastOrder>,
}

/// Each ACME certificate: its gauges, domains, DNS provider and last order.
fn acme_status(snapshot: &crate::snapshot::Snapshot) -> Vec<AcmeEntry> {
    let state = snapshot.acme();
    let config = &snapshot.config;
    config
        .certificates
        .iter()
        .filter_map(|(name, certificate)| {
            let acme = certificate.acme.as_ref()?;
            let last = state.orders.get(name);
            let status = crate::metrics::AcmeStatus {
                name: name.clone(),
                challenge: acme.challenge.as_str(),
                last_order: last.as_ref().map(|order| (order.at, order.result.as_str())),
                next_renewal: crate::acme::next_renewal(name, certificate, config, &state)
                    .map(crate::clock::unix_seconds),
            };
            Some(AcmeEntry {
                status,
                domains: acme.domains.clone(),
                dns: acme.dns.clone(),
                last_order: last,
            })
        })
        .collect()
}

/// The metrics, with the gauges read at scrape time.
fn metrics_reply(gateway: &Gateway) -> Response<Full<Bytes>> {
    let metrics = &crate::metrics::METRICS;
    let snapshot = gateway.snapshot();
    metrics.set_certificates(&snapshot.tls().certificate_status());
    metrics.set_pools(snapshot.pools());
    let acme: Vec<_> = acme_status(&snapshot).into_iter().map(|entry| entry.status).collect();
    metrics.set_acme(&acme);
    metrics.set_plugins(crate::plugin::live_plugins(), crate::plugin::live_instances());
    reply(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        metrics.encode(),
    )
}

/// A dry run of a listener's chain (what `weir route` does), on the
/// running config: the report, and its explanation in words.
async fn route_reply(request: Request<Incoming>, gateway: &Gateway) -> Response<Full<Bytes>> {
    let query: crate::dryrun::Query = match body_json(request).await {
        Ok(query) => query,
        Err(response) => return response,
    };
    let snapshot = gateway.snapshot();
    match crate::dryrun::run(&snapshot, &query).await {
        Ok(dry) => {
            let mut report = dry.report();
            if let Some(fields) = report.as_object_mut() {
                fields.insert("explanation".into(), json!(dry.explanation()));
            }
            json_reply(StatusCode::OK, &report)
        }
        Err(reason) => error(StatusCode::UNPROCESSABLE_ENTITY, &reason),
    }
}

/// Certificates loaded, and ACME certificates not issued yet.
fn certificates_reply(gateway: &Gateway) -> Response<Full<Bytes>> {
    let snapshot = gateway.snapshot();
    let certificates = snapshot.tls().certificate_status();
    // ACME certificates not issued yet: not loaded, so not served.
    let awaiting_acme: Vec<&String> = snapshot
        .config
        .certificates
        .iter()
        .filter(|(name, c)| c.acme.is_some() && !snapshot.tls().has_certificate(name))
        .map(|(name, _)| name)
        .collect();
    let acme: serde_json::Map<String, serde_json::Value> = acme_status(&snapshot)
        .into_iter()
        .map(|entry| {
            let body = json!({
                "challenge": entry.status.challenge,
                "dns": entry.dns,
                "domains": entry.domains,
                "last_order": entry.last_order,
                "next_renewal": entry.status.next_renewal,
            });
            (entry.status.name, body)
        })
        .collect();
    json_reply(
        StatusCode::OK,
        &json!({ "certificates": certificates, "awaiting_acme": awaiting_acme, "acme": acme }),
    )
}

/// Plugins loaded (version, load time, last error, idle instances) and the reloads.
async fn plugins_reply(gateway: &Gateway) -> Response<Full<Bytes>> {
    let snapshot = gateway.snapshot();
    let plugins: Vec<_> = snapshot
        .plugins()
        .iter()
        .map(|(name, plugin)| {
            let loaded = crate::clock::unix_seconds(plugin.loaded_at());
            json!({
                "name": name,
                "wasm": plugin.wasm().display().to_string(),
                "sha256": weir_plugin_sdk::hex::encode(&plugin.sha256()),
                "contract": plugin.contract(),
                "grants": plugin.grants(),
                "loaded_at": loaded,
                "on_error": plugin.on_error(),
                "status": "loaded",
                "last_error": plugin.last_error().map(|(at, error)| json!({ "at": at, "error": error })),
                "idle_instances": plugin.idle_instances(),
            })
        })
        .collect();
    let reloads = gateway.reload_status().await;
    json_reply(StatusCode::OK, &json!({ "plugins": plugins, "reloads": reloads }))
}

/// Listeners with their chains, pools with their servers, certificate and CA names.
fn routes_reply(gateway: &Gateway) -> Response<Full<Bytes>> {
    let snapshot = gateway.snapshot();
    let config = &snapshot.config;
    let listeners: serde_json::Map<_, _> = config
        .listeners
        .iter()
        .map(|(name, listener)| {
            let bound = gateway.local_addr(name).map(|a| a.to_string());
            (
                name.clone(),
                json!({ "bind": bound, "plugins": listener.plugins, "protocol": format!("{:?}", listener.protocol).to_lowercase() }),
            )
        })
        .collect();
    let pools: serde_json::Map<_, _> = snapshot
        .pools()
        .iter()
        .map(|(name, pool)| {
            let servers: Vec<String> = pool.backends().iter().map(|b| b.addr.to_string()).collect();
            (
                name.clone(),
                json!({ "servers": servers, "policy": pool.config.policy }),
            )
        })
        .collect();
    json_reply(
        StatusCode::OK,
        &json!({
            "listeners": listeners,
            "pools": pools,
            "certificates": config.certificates.keys().collect::<Vec<_>>(),
            "cas": config.cas.keys().collect::<Vec<_>>(),
        }),
    )
}

/// Tenants with their domains, chains, pools and connections.
fn tenants_reply(gateway: &Gateway) -> Response<Full<Bytes>> {
    let snapshot = gateway.snapshot();
    let tenants: serde_json::Map<_, _> = snapshot
        .config
        .tenants
        .iter()
        .map(|(name, tenant)| {
            let live = snapshot.tenants().get(name);
            let active = live.map_or(0, |t| t.active());
            let sockets = live.map_or(0, |t| t.reach.sockets());
            (
                name.clone(),
                json!({
                    "domains": tenant.domains,
                    "plugins": tenant.plugins,
                    "pools": tenant.pools,
                    "upstreams": tenant.upstreams,
                    "active": active,
                    "max_connections": tenant.max_connections,
                    "upstream_sockets": sockets,
                    "max_descriptors": tenant.max_descriptors.unwrap_or_else(crate::door::default_max_sockets),
                }),
            )
        })
        .collect();
    json_reply(StatusCode::OK, &json!({ "tenants": tenants }))
}

/// Connections by listener.
fn connections_reply(gateway: &Gateway) -> Response<Full<Bytes>> {
    let listeners: serde_json::Map<_, _> = gateway
        .stats()
        .iter()
        .map(|(name, stats)| {
            (
                name.clone(),
                json!({
                    "active": stats.active.load(Ordering::Relaxed),
                    "total": stats.total.load(Ordering::Relaxed),
                }),
            )
        })
        .collect();
    json_reply(StatusCode::OK, &json!({ "listeners": listeners }))
}
