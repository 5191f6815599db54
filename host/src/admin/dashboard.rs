//! The dashboard: one page, its script and its style sheet, embedded in the
//! binary and served by the admin server at `/` without the token (they
//! hold no data); the script reads the admin API with the token the page
//! asks for. `GET /api/overview` gives it the gateway's own facts.

use std::sync::LazyLock;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::json;

use super::{json_reply, reply};
use crate::clock::unix_seconds;
use crate::gateway::Gateway;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/dashboard.js");
const STYLE: &str = include_str!("assets/dashboard.css");

/// When the admin server (so, the gateway) started.
pub(super) static STARTED: LazyLock<SystemTime> = LazyLock::new(SystemTime::now);

/// The asset at `path`, if it is one.
pub(super) fn asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX),
        "/dashboard.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/dashboard.css" => ("text/css; charset=utf-8", STYLE),
        _ => return None,
    };
    Some(reply(StatusCode::OK, content_type, body.to_owned()))
}

/// Version, uptime, the config in use, active connections, the last reload.
pub(super) async fn overview(gateway: &Gateway) -> Response<Full<Bytes>> {
    let snapshot = gateway.snapshot();
    let active: u64 = gateway
        .stats()
        .values()
        .map(|stats| stats.active.load(Ordering::Relaxed))
        .sum();
    let fleet_revision = gateway
        .fleet_status()
        .await
        .and_then(|status| status["node"]["revision"].as_i64());
    let started = *STARTED;
    json_reply(
        StatusCode::OK,
        &json!({
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": unix_seconds(started),
            "uptime_seconds": SystemTime::now().duration_since(started).map_or(0, |d| d.as_secs()),
            "config_sha256": snapshot.config.sha256,
            "config_built_at": unix_seconds(snapshot.built_at),
            "fleet_revision": fleet_revision,
            "active_connections": active,
            "reload": gateway.reload_status().await,
        }),
    )
}
