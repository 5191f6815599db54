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

/// Sends `request` as written (a whole HTTP/1.1 request) and returns the
/// status and body.
async fn raw_request(admin: &str, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.expect("admin connects");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = String::new();
    tokio::time::timeout(weir_tests::STEP, stream.read_to_string(&mut response))
        .await
        .expect("admin answers in time")
        .expect("response");
    let status = response.get(9..12).and_then(|s| s.parse().ok()).expect("status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// What a web page can send to a loopback admin server without a token is
/// refused: a cross-site form POST (`text/plain`, foreign `Origin`), a change
/// marked `Sec-Fetch-Site: cross-site`, and any request whose `Host` is a
/// DNS name (rebinding). Concurrent pool changes all land; pool names that
/// would shadow `pool:port` targets or escape a URL are refused; pools can
/// be deleted; health intervals are bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_pages_and_loses_no_update() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["router"]

        [plugins.router]
        wasm = "{static_router}"
        config.no_sni = { pool = "app" }

        [pools.app]
        servers = ["127.0.0.1:1"]

        [admin]
        bind = "127.0.0.1:0"

        [reload]
        watch = false
        "#;
    let config = write_config(dir.path(), text);
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let servers = |admin: String| async move {
        let (_, body) = http_json(&admin, "GET", "/api/pools/app", "").await;
        let pool: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        pool["backends"].as_array().map_or(0, Vec::len)
    };

    // A cross-site form POST: text/plain, a foreign Origin.
    let body = r#"{"address": "127.0.0.9:80"}"#;
    let forged = [
        format!(
            "POST /api/pools/app/backends HTTP/1.1\r\nhost: {admin}\r\norigin: http://evil.example\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
        format!(
            "POST /api/pools/app/backends HTTP/1.1\r\nhost: {admin}\r\norigin: http://evil.example\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
        format!(
            "POST /api/pools/app/backends HTTP/1.1\r\nhost: {admin}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
        format!(
            "POST /api/pools/app/backends HTTP/1.1\r\nhost: {admin}\r\nsec-fetch-site: cross-site\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
        // DNS rebinding: the page's own name, pointed at 127.0.0.1.
        format!(
            "POST /api/pools/app/backends HTTP/1.1\r\nhost: evil.example:{port}\r\norigin: http://evil.example:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len(),
            port = admin.rsplit_once(':').expect("port").1
        ),
        format!(
            "DELETE /api/pools/app/backends/127.0.0.1:1 HTTP/1.1\r\nhost: evil.example:{port}\r\nconnection: close\r\n\r\n",
            port = admin.rsplit_once(':').expect("port").1
        ),
    ];
    for request in &forged {
        let (status, reply) = raw_request(&admin, request).await;
        assert_eq!(status, 403, "{request}\n{reply}");
        assert!(reply.contains("\"error\""), "{reply}");
    }
    assert_eq!(servers(admin.clone()).await, 1, "a refused request changed the pool");
    // Reads answer any Host: Prometheus scrapes by name.
    let scrape = raw_request(
        &admin,
        "GET /metrics HTTP/1.1\r\nhost: weir-node-1.internal:9900\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(scrape.0, 200, "{}", scrape.1);
    // The same request as curl sends it (no Origin) is served.
    let curl_like = format!(
        "POST /api/pools/app/backends HTTP/1.1\r\nhost: {admin}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(raw_request(&admin, &curl_like).await.0, 200);

    // 40 servers added at once: every one is kept.
    let adds: Vec<_> = (0..40)
        .map(|n| {
            let admin = admin.clone();
            tokio::spawn(async move {
                http_json(
                    &admin,
                    "POST",
                    "/api/pools/app/backends",
                    &format!(r#"{{"address": "127.0.1.{}:80"}}"#, n + 1),
                )
                .await
            })
        })
        .collect();
    for add in adds {
        let (status, body) = add.await.expect("task");
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(servers(admin.clone()).await, 42, "concurrent additions were lost");

    // Names and intervals the config would refuse.
    for (name, extra) in [
        ("", ""),
        ("../x", ""),
        ("app:8080", ""),
        ("a b", ""),
        ("fast", r#", "health": {"interval": "1ms"}"#),
    ] {
        let (status, reply) = http_json(
            &admin,
            "POST",
            "/api/pools",
            &format!(r#"{{"name": "{name}", "servers": ["127.0.0.1:2"]{extra}}}"#),
        )
        .await;
        assert_eq!(status, 422, "{name:?}: {reply}");
    }
    // A pool can be deleted (and then is gone, for a second DELETE too).
    let (status, reply) = http_json(
        &admin,
        "POST",
        "/api/pools",
        r#"{"name": "spare", "servers": ["127.0.0.1:2"]}"#,
    )
    .await;
    assert_eq!(status, 201, "{reply}");
    let (status, reply) = http_json(&admin, "DELETE", "/api/pools/spare", "").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(http_json(&admin, "GET", "/api/pools/spare", "").await.0, 404);
    assert_eq!(http_json(&admin, "DELETE", "/api/pools/spare", "").await.0, 404);
    weir.child.kill().await.expect("stop");
}

/// A drained server gets no new connection while the one it has keeps
/// flowing to its end; the drain is kept across a reload, shown in
/// `/api/pools` and the metrics, and undone by undrain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_server_takes_no_new_connections_and_finishes_its_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let servers = [
        Upstream::tcp(weir_tests::echo).await,
        Upstream::tcp(weir_tests::echo).await,
    ];
    let servers_list = format!("\"{}\", \"{}\"", servers[0].addr, servers[1].addr);
    let extra = "[reload]\nwatch = false\n\n[admin]\nbind = \"127.0.0.1:0\"\n";
    let text = weir_tests::plain_pool_config("p", &servers_list, extra);
    let config = write_config(dir.path(), &text);
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let public = weir.addr("public");
    let whole = weir_tests::pattern(64 * 1024, 3);
    let mut held = TcpStream::connect(public).await.expect("connect");
    held.write_all(&whole[..32 * 1024]).await.expect("first half");
    let started = std::time::Instant::now();
    while servers.iter().map(Upstream::accepted).sum::<usize>() < 1 {
        assert!(started.elapsed() < weir_tests::STEP, "never connected");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let drained = usize::from(servers[1].accepted() == 1);
    let other = 1 - drained;
    let address = servers[drained].addr.to_string();

    let path = format!("/api/pools/p/backends/{address}/drain");
    let (status, body) = http_json(&admin, "POST", &path, "").await;
    assert_eq!(status, 200, "{body}");
    let pool: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let shown = |pool: &serde_json::Value, address: &str| {
        pool["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["address"] == address))
            .map(|b| b["draining"].clone())
    };
    assert_eq!(shown(&pool, &address), Some(serde_json::json!(true)), "{body}");
    // Kept across a reload of the file.
    let (status, report) = http(&admin, "POST", "/api/reload", None).await;
    assert_eq!(status, 200, "{report}");
    for n in 0..4 {
        let mut client = TcpStream::connect(public).await.expect("connect");
        assert!(weir_tests::echoes(&mut client, format!("new {n}\n").as_bytes()).await);
    }
    assert_eq!(servers[drained].accepted(), 1, "a drained server took a new connection");
    assert_eq!(servers[other].accepted(), 4);
    let (_, metrics) = http(&admin, "GET", "/metrics", None).await;
    let series = format!("weir_pool_server_draining{{pool=\"p\",server=\"{address}\"}} 1");
    assert!(metrics.contains(&series), "missing `{series}` in:\n{metrics}");
    let series = format!("weir_pool_server_active_connections{{pool=\"p\",server=\"{address}\"}} 1");
    assert!(metrics.contains(&series), "missing `{series}` in:\n{metrics}");

    // The held connection runs to its end, byte for byte.
    held.write_all(&whole[32 * 1024..]).await.expect("second half");
    held.shutdown().await.expect("half-close");
    let back = weir_tests::read_to_end(&mut held).await.expect("echo");
    assert!(back == whole, "the drained server's connection lost bytes");

    let path = format!("/api/pools/p/backends/{address}/undrain");
    let (status, body) = http_json(&admin, "POST", &path, "").await;
    assert_eq!(status, 200, "{body}");
    for n in 0..4 {
        let mut client = TcpStream::connect(public).await.expect("connect");
        assert!(weir_tests::echoes(&mut client, format!("again {n}\n").as_bytes()).await);
    }
    assert!(servers[drained].accepted() > 1, "undrained, it gets connections again");
    let (status, body) = http_json(&admin, "POST", "/api/pools/p/backends/10.9.9.9:1/drain", "").await;
    assert_eq!(status, 404, "{body}");
    weir.child.kill().await.expect("stop");
}
