//! The admin API as an operator's tools use it: a bearer token, JSON
//! answers, Prometheus metrics that count what happened, reloads on demand
//! that report their errors, and JSON log lines on request.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::{Upstream, WeirProcess, admin_request, answer, write_config};

async fn http(admin: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    admin_request(admin, method, path, token, "").await
}

async fn http_json(admin: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    admin_request(admin, method, path, None, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_reports_and_reloads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(answer).await;
    let text = weir_tests::plain_route_config(
        upstream.addr,
        "[reload]\nwatch = false\n\n[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"s3cret\"",
    );
    let config = write_config(dir.path(), &text);
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let token = Some("s3cret");

    assert_eq!(http(&admin, "GET", "/metrics", None).await.0, 401);
    assert_eq!(http(&admin, "GET", "/metrics", Some("wrong")).await.0, 401);
    let (status, body) = http(&admin, "GET", "/nope", token).await;
    assert_eq!((status, body.trim()), (404, r#"{"error":"no such endpoint: /nope"}"#));
    assert_eq!(http(&admin, "DELETE", "/api/reload", token).await.0, 405);

    // One connection, then the counters say so.
    let mut client = TcpStream::connect(weir.addr("public")).await.expect("connect");
    client.write_all(b"hello\n").await.expect("write");
    let mut reply = String::new();
    client.read_to_string(&mut reply).await.expect("reply");
    assert_eq!(reply, "upstream heard: hello\n");
    drop(client);
    weir.connection_line().await;
    let (status, metrics) = http(&admin, "GET", "/metrics", token).await;
    assert_eq!(status, 200);
    for expected in [
        r#"weir_connections_total{listener="public",tenant="-",route="no_sni",outcome="closed"} 1"#,
        r#"weir_bytes_total{listener="public",direction="up"} 6"#,
        r#"weir_bytes_total{listener="public",direction="down"} 22"#,
        r#"weir_plugin_call_seconds_count{plugin="router"} 1"#,
        r#"weir_connections_active{listener="public"} 0"#,
    ] {
        assert!(metrics.contains(expected), "missing `{expected}` in:\n{metrics}");
    }
    let (_, connections) = http(&admin, "GET", "/api/connections", token).await;
    let connections: serde_json::Value = serde_json::from_str(&connections).expect("JSON");
    assert_eq!(connections["listeners"]["public"]["total"], 1);
    let (_, plugins) = http(&admin, "GET", "/api/plugins", token).await;
    let plugins: serde_json::Value = serde_json::from_str(&plugins).expect("JSON");
    assert_eq!(plugins["plugins"][0]["name"], "router");
    assert_eq!(plugins["plugins"][0]["sha256"].as_str().map(str::len), Some(64));

    // A reload of a broken config is refused with its reason; the old
    // config keeps serving; a good one then succeeds.
    std::fs::write(&config, "[listeners.public\n").expect("break config");
    let (status, report) = http(&admin, "POST", "/api/reload", token).await;
    assert_eq!(status, 422, "{report}");
    assert!(report.contains("weir.toml"), "{report}");
    assert!(
        weir.line_containing("reload failed")
            .await
            .contains("previous config stays")
    );
    let mut client = TcpStream::connect(weir.addr("public")).await.expect("still serving");
    client.write_all(b"again\n").await.expect("write");
    let mut reply = String::new();
    client.read_to_string(&mut reply).await.expect("reply");
    assert_eq!(reply, "upstream heard: again\n");
    write_config(dir.path(), &text);
    let (status, report) = http(&admin, "POST", "/api/reload", token).await;
    assert_eq!(status, 200, "{report}");
    let (_, status) = http(&admin, "GET", "/api/reload", token).await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(
        (status["succeeded"].as_u64(), status["failed"].as_u64()),
        (Some(1), Some(1))
    );
    let (_, metrics) = http(&admin, "GET", "/metrics", token).await;
    assert!(metrics.contains(r#"weir_reloads_total{result="error"} 1"#), "{metrics}");
    weir.child.kill().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_change_at_runtime_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Upstream::tcp(|s| weir_tests::answer_with(s, " (a)".into())).await;
    let b = Upstream::tcp(|s| weir_tests::answer_with(s, " (b)".into())).await;
    let text = format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["router"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.no_sni = {{ pool = "p" }}

        [pools.p]
        servers = ["{}"]

        [admin]
        bind = "127.0.0.1:0"
        "#,
        a.addr
    );
    let config = write_config(dir.path(), &text);
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let public = weir.addr("public");
    let ask = || async move {
        let mut client = TcpStream::connect(public).await.expect("connect");
        client.write_all(b"hi\n").await.expect("write");
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.expect("reply");
        reply
    };

    // Add b: connections alternate.
    let (status, body) = http_json(
        &admin,
        "POST",
        "/api/pools/p/backends",
        &format!(r#"{{"address": "{}"}}"#, b.addr),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let pool: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(pool["backends"].as_array().map(Vec::len), Some(2));
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(ask().await);
    }
    assert_eq!(seen.iter().filter(|r| r.ends_with("(b)\n")).count(), 2, "{seen:?}");

    // Refusals leave everything as it was.
    for (method, path, body, expected) in [
        (
            "POST",
            "/api/pools/p/backends".to_owned(),
            format!(r#"{{"address": "{}"}}"#, b.addr),
            409,
        ),
        (
            "POST",
            "/api/pools/p/backends".to_owned(),
            r#"{"address": "nowhere"}"#.to_owned(),
            422,
        ),
        (
            "POST",
            "/api/pools/q/backends".to_owned(),
            r#"{"address": "127.0.0.1:1"}"#.to_owned(),
            404,
        ),
        ("POST", "/api/pools/p/backends".to_owned(), "not json".to_owned(), 400),
        (
            "POST",
            "/api/pools".to_owned(),
            r#"{"name": "x", "servers": [], "policy": "random"}"#.to_owned(),
            422,
        ),
        (
            "POST",
            "/api/pools".to_owned(),
            r#"{"name": "x", "servers": ["127.0.0.1:1"], "polcy": "x"}"#.to_owned(),
            400,
        ),
    ] {
        let (status, reply) = http_json(&admin, method, &path, &body).await;
        assert_eq!(status, expected, "{method} {path} {body}: {reply}");
        assert!(reply.contains("\"error\""), "{reply}");
    }

    // Remove a: everything goes to b.
    let (status, body) = http_json(&admin, "DELETE", &format!("/api/pools/p/backends/{}", a.addr), "").await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..3 {
        assert_eq!(ask().await, "upstream heard: hi (b)\n");
    }
    let (status, _) = http_json(&admin, "DELETE", &format!("/api/pools/p/backends/{}", b.addr), "").await;
    assert_eq!(status, 409, "the last server stays");

    // A new pool, created whole.
    let (status, body) = http_json(
        &admin,
        "POST",
        "/api/pools",
        &format!(
            r#"{{"name": "spare", "servers": [{{"address": "{}", "weight": 2}}], "policy": "weighted"}}"#,
            a.addr
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = http_json(&admin, "GET", "/api/pools/spare", "").await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""policy":"weighted""#), "{body}");
    weir.child.kill().await.expect("stop");
}
