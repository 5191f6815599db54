//! The example plugins under examples/plugins, end to end through weir:
//! canary (stable per client IP), ALPN router (one name, several protocols),
//! maintenance switch (flipped by a reload).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use weir_tests::{Pki, STEP, Upstream, WeirProcess, answer_with, start_gateway, write_config};

async fn tagged(tag: &str) -> Upstream {
    let tag = format!(" ({tag})");
    Upstream::tcp(move |s| answer_with(s, tag.clone())).await
}

/// A plain exchange from a chosen loopback source address.
async fn ask_from(source: &str, addr: std::net::SocketAddr) -> String {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind");
    let mut stream = socket.connect(addr).await.expect("connect");
    stream.write_all(b"hi\n").await.expect("write");
    let mut reply = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut reply))
        .await
        .expect("in time")
        .expect("reply");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_keeps_each_client_on_its_side() {
    let stable = tagged("stable").await;
    let canary = tagged("canary").await;
    let gateway = start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["canary"]

        [plugins.canary]
        wasm = "{{canary}}"
        config = {{ stable = "stable", canary = "canary", percent = 50 }}

        [pools.stable]
        servers = ["{}"]
        [pools.canary]
        servers = ["{}"]
        "#,
        stable.addr, canary.addr
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    let mut sides = Vec::new();
    for i in 1..=40 {
        let source = format!("127.0.0.{i}");
        let first = ask_from(&source, addr).await;
        assert_eq!(ask_from(&source, addr).await, first, "{source} changed sides");
        sides.push(first);
    }
    let to_canary = sides.iter().filter(|s| s.ends_with("(canary)\n")).count();
    assert!((8..=32).contains(&to_canary), "{to_canary} of 40 clients in the canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_router_sends_each_protocol_to_its_pool() {
    alpn_router("{alpn_router}").await;
}

/// The Python twin, built by componentize-py, passes the same test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_alpn_router_does_the_same() {
    alpn_router("{alpn_router_py}").await;
}

/// The JavaScript twin, built by componentize-js, passes it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_alpn_router_does_the_same() {
    alpn_router("{alpn_router_js}").await;
}

async fn alpn_router(wasm: &str) {
    let pki = Pki::new("alpn test CA");
    let identity = pki.server(&["svc.test"]);
    let mut upstreams = Vec::new();
    for tag in ["grpc", "web", "db"] {
        let tag = format!(" ({tag})");
        upstreams.push(Upstream::tls(&identity, move |s| answer_with(s, tag.clone())).await);
    }
    let gateway = start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["alpn"]

        [plugins.alpn]
        wasm = "{wasm}"
        config = {{ names = ["svc.test"], protocols = {{ h2 = "grpc", "http/1.1" = "web", postgresql = "db" }}, default = "web" }}

        [pools.grpc]
        servers = ["{}"]
        [pools.web]
        servers = ["{}"]
        [pools.db]
        servers = ["{}"]
        "#,
        upstreams[0].addr,
        upstreams[1].addr,
        upstreams[2].addr
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    for (alpn, expected) in [
        (&["h2", "http/1.1"][..], "grpc"),
        (&["http/1.1"][..], "web"),
        (&["postgresql"][..], "db"),
        (&[][..], "web"),
    ] {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).expect("CA");
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let reply = weir_tests::tls_exchange(addr, "svc.test", Arc::new(config), "which").await;
        assert_eq!(
            reply.expect("served"),
            format!("upstream heard: which ({expected})\n"),
            "{alpn:?}"
        );
    }
}

fn maintenance_config(dir: &Path, upstream: std::net::SocketAddr, on: bool) -> std::path::PathBuf {
    write_config(
        dir,
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["switch"]

            [plugins.switch]
            wasm = "{{maintenance}}"
            config = {{ pool = "app", maintenance = {on}, message = "back at 14:00 UTC" }}

            [pools.app]
            servers = ["{upstream}"]

            [reload]
            debounce = "20ms"
            "#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_is_a_config_flip_away() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app = tagged("app").await;
    let config = maintenance_config(dir.path(), app.addr, false);
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let ask = || async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let _ = stream.write_all(b"hi\n").await;
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply).await;
        reply
    };
    assert_eq!(ask().await, "upstream heard: hi (app)\n");
    weir.connection_line().await;
    for (on, expected) in [(true, ""), (false, "upstream heard: hi (app)\n")] {
        maintenance_config(dir.path(), app.addr, on);
        let flipped = Instant::now();
        loop {
            let reply = ask().await;
            let line = weir.connection_line().await;
            if reply == expected {
                if on {
                    assert!(
                        line.contains(r#"route="maintenance""#) && line.contains("back at 14:00 UTC"),
                        "{line}"
                    );
                }
                break;
            }
            assert!(
                flipped.elapsed() < Duration::from_secs(5),
                "the flip to {on} was not picked up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    weir.child.kill().await.expect("stop");
}

/// What a client at `source` reads back before weir or the upstream
/// closes; empty when the connection was refused.
async fn reply_from(source: &str, addr: std::net::SocketAddr) -> String {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind");
    let mut stream = socket.connect(addr).await.expect("connect");
    let _ = stream.write_all(b"hi\n").await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_refuses_a_client_over_its_limit_and_serves_the_others() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = tagged("app").await;
    let limiter = |limit: u32| {
        format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["limiter", "router"]

            # A fresh instance for every call: the counts live in the host.
            [plugins.limiter]
            wasm = "{{rate_limit}}"
            grants = ["counters", "metrics"]
            reuse_instances = false
            config = {{ limit = {limit}, window_seconds = 600 }}

            [plugins.router]
            wasm = "{{static_router}}"
            config.no_sni = {{ address = "{upstream}" }}

            [reload]
            watch = false

            [admin]
            bind = "127.0.0.1:0"
            "#,
            upstream = upstream.addr
        )
    };
    let config = write_config(dir.path(), &limiter(3));
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let admin = weir.admin_addr().await;
    for i in 1..=3 {
        assert_eq!(
            reply_from("127.0.0.2", addr).await,
            "upstream heard: hi (app)\n",
            "A's connection {i}"
        );
    }
    assert_eq!(
        reply_from("127.0.0.2", addr).await,
        "",
        "A's fourth connection is refused"
    );
    let line = weir.line_containing(r#"route="rate-limit""#).await;
    assert!(
        line.contains("127.0.0.2 opened 4 connections in 600 s, over its limit of 3"),
        "{line}"
    );
    assert_eq!(
        reply_from("127.0.0.3", addr).await,
        "upstream heard: hi (app)\n",
        "B is served"
    );
    let refused = r#"weir_plugin_counter_total{plugin="limiter",name="refused",label="rate-limit"}"#;
    assert_eq!(weir_tests::metric(&admin, refused).await, Some(1.0));

    // A reload under a new limit keeps the counts: A has 4 hits, so its
    // fifth is within a limit of 5 and its sixth is not.
    std::fs::write(&config, weir_tests::expand(&limiter(5))).expect("write");
    let (status, body) = weir_tests::admin_request(&admin, "POST", "/api/reload", None, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        reply_from("127.0.0.2", addr).await,
        "upstream heard: hi (app)\n",
        "fifth, limit 5"
    );
    assert_eq!(reply_from("127.0.0.2", addr).await, "", "sixth");
    assert_eq!(
        weir_tests::metric(&admin, refused).await,
        Some(2.0),
        "the series survives the reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_steers_by_the_pools_it_may_see() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = tagged("first").await;
    let second = tagged("second").await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["steer"]

            [listeners.tenant]
            bind = "127.0.0.1:0"
            plugins = ["edge"]

            [plugins.steer]
            wasm = "{{least_loaded}}"
            grants = ["pools"]
            config = {{ pool = "app" }}

            [plugins.edge]
            wasm = "{{static_router}}"

            # A tenant's plugin sees its tenant's pools only.
            [plugins.acme-steer]
            wasm = "{{least_loaded}}"
            grants = ["pools"]
            config = {{ pool = "app" }}

            [tenants.acme]
            domains = ["acme.test"]
            plugins = ["acme-steer"]
            upstreams = ["127.0.0.0/8"]

            [pools.app]
            servers = ["{first}", "{second}"]

            [admin]
            bind = "127.0.0.1:0"
            "#,
            first = first.addr,
            second = second.addr,
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let addr = weir.addr("public");
    assert_eq!(reply_from("127.0.0.1", addr).await, "upstream heard: hi (first)\n");
    let path = format!("/api/pools/app/backends/{}/drain", first.addr);
    let (status, body) = weir_tests::admin_request(&admin, "POST", &path, None, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        reply_from("127.0.0.1", addr).await,
        "upstream heard: hi (second)\n",
        "the drained server is skipped"
    );
    let path = format!("/api/pools/app/backends/{}/drain", second.addr);
    let (status, body) = weir_tests::admin_request(&admin, "POST", &path, None, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(reply_from("127.0.0.1", addr).await, "", "no server left");
    let line = weir.line_containing("no server of pool").await;
    assert!(line.contains("no server of pool `app` is up"), "{line}");
    // The tenant's copy of the plugin is not shown the operator's pool.
    let config = config.display().to_string();
    let args = [
        "route",
        "--config",
        &config,
        "--listener",
        "tenant",
        "--sni",
        "www.acme.test",
        "--explain",
    ];
    let out = weir_tests::run_weir(&args);
    let said = weir_tests::text(&out.stdout);
    assert!(
        said.contains("pool `app` is not one this plugin may see"),
        "{said}{}",
        weir_tests::text(&out.stderr)
    );
}

/// The JavaScript plugin's memory grows by about 0.75 KiB a call (its
/// runtime does not give back what each call allocates), so an instance
/// runs out of its 16 MiB after about 6,400 calls. weir retires an instance
/// once calls have used half the room it had after `configure`, and
/// configures its replacement off the connection path: no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_memory_only_grows_is_retired_before_a_call_fails() {
    let config = weir::Config::parse(
        &weir_tests::expand(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["alpn"]

            [plugins.alpn]
            wasm = "{alpn_router_js}"
            timeout = "1s"
            config = { protocols = { h2 = "grpc" }, default = "web" }

            [pools.grpc]
            servers = ["127.0.0.1:1"]
            [pools.web]
            servers = ["127.0.0.1:2"]
            "#,
        ),
        Path::new("weir.toml"),
    )
    .expect("valid");
    let runtime = weir::plugin::Runtime::new().expect("engine").with_warm_instances(1);
    let settings = &config.plugins["alpn"];
    let plugin = Arc::new(
        runtime
            .load("alpn", &config.resolve(&settings.wasm), settings)
            .expect("loads"),
    );
    let conn = Arc::new(weir::wit::Connection {
        id: 1,
        listener: "public".into(),
        tenant: None,
        client: std::net::SocketAddr::from(([127, 0, 0, 1], 40000)).into(),
        local: std::net::SocketAddr::from(([127, 0, 0, 1], 443)).into(),
        protocol: weir::wit::Protocol::Tls,
        sni: Some("svc.test".into()),
        alpn: vec!["h2".into()],
        tls_versions: vec![0x0304],
    });
    for call in 0..10_000 {
        let decision = plugin.route(&conn).await.unwrap_or_else(|e| panic!("call {call}: {e}"));
        assert_eq!(decision.route, "alpn:h2");
    }
    assert!(plugin.last_error().is_none(), "{:?}", plugin.last_error());
}
