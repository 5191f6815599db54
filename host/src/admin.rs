//! The admin HTTP server: Prometheus metrics, JSON status, and reloads.
//! Off unless the config has an `[admin]` section; loopback by default;
//! with a token, every request must carry it as a bearer token.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text |
//! | `GET /api/plugins` | each plugin: wasm path, SHA-256, load time, on_error |
//! | `GET /api/routes` | listeners with their chains, pools, certificates, CAs |
//! | `GET /api/tenants` | each tenant: domains, plugins, pools, active connections and limit |
//! | `GET /api/pools`, `GET /api/pools/{name}` | policy, backends with health, ejection, active connections, connections, failures, bytes |
//! | `GET /api/connections` | active and total connections by listener |
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

/// Starts the admin server; returns its address and task.
pub async fn serve(
    gateway: Arc<Gateway>,
    bind: SocketAddr,
    token: Option<String>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let token: Option<Arc<str>> = token.map(Into::into);
    let task = tokio::spawn(async move {
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

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn answer(request: Request<Incoming>, gateway: &Gateway, token: Option<&str>) -> Response<Full<Bytes>> {
    if let Some(token) = token {
        let presented = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(token) {
            return error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        }
    }
    let path = request.uri().path().to_owned();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::metrics::METRICS.encode(),
        ),
        (&Method::GET, "/api/plugins") => {
            let snapshot = gateway.snapshot();
            let plugins: Vec<_> = snapshot
                .plugins()
                .iter()
                .map(|(name, plugin)| {
                    let loaded = plugin
                        .loaded_at()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    json!({
                        "name": name,
                        "wasm": plugin.wasm().display().to_string(),
                        "sha256": hex(&plugin.sha256()),
                        "loaded_at": loaded,
                        "on_error": plugin.on_error(),
                        "status": "loaded",
                    })
                })
                .collect();
            let reloads = gateway.reload_status().await;
            json_reply(StatusCode::OK, &json!({ "plugins": plugins, "reloads": reloads }))
        }
        (&Method::GET, "/api/routes") => {
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
        (&Method::GET, "/api/tenants") => {
            let snapshot = gateway.snapshot();
            let tenants: serde_json::Map<_, _> = snapshot
                .config
                .tenants
                .iter()
                .map(|(name, tenant)| {
                    let active = snapshot.tenants().get(name).map_or(0, |t| t.active());
                    (
                        name.clone(),
                        json!({
                            "domains": tenant.domains,
                            "plugins": tenant.plugins,
                            "pools": tenant.pools,
                            "active": active,
                            "max_connections": tenant.max_connections,
                        }),
                    )
                })
                .collect();
            json_reply(StatusCode::OK, &json!({ "tenants": tenants }))
        }
        (&Method::GET, "/api/pools") => {
            let snapshot = gateway.snapshot();
            let pools: serde_json::Map<_, _> = snapshot
                .pools()
                .iter()
                .map(|(name, pool)| (name.clone(), pool_json(pool)))
                .collect();
            json_reply(StatusCode::OK, &json!({ "pools": pools }))
        }
        (&Method::GET, pool) if pool.starts_with("/api/pools/") => {
            let name = &pool["/api/pools/".len()..];
            match gateway.snapshot().pool(name) {
                Some(pool) => json_reply(StatusCode::OK, &pool_json(pool)),
                None => error(StatusCode::NOT_FOUND, &format!("no pool named `{name}`")),
            }
        }
        (&Method::GET, "/api/connections") => {
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
        (&Method::GET, "/api/reload") => json_reply(StatusCode::OK, &json!(gateway.reload_status().await)),
        (&Method::POST, "/api/reload") => {
            let report = gateway.reload("api").await;
            let status = match report.error {
                None => StatusCode::OK,
                Some(_) => StatusCode::UNPROCESSABLE_ENTITY,
            };
            json_reply(status, &json!(report))
        }
        (_, "/metrics" | "/api/plugins" | "/api/routes" | "/api/tenants" | "/api/connections" | "/api/reload") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}
