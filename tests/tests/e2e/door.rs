//! One door out: every connection weir opens — a decision's upstream, a
//! `pool:port` target, a health probe — is held to the scope it is made
//! for. A tenant reaches only its ranges and ports (and the servers the
//! operator gave it), a probe never reaches weir's own listeners or admin
//! API, probes never take the descriptors accepted connections need, and a
//! tenant's plugins share one rate of DNS lookups. Each case runs beside a
//! bystander that must be served throughout.

use std::sync::Arc;
use std::time::Duration;

use weir_tests::{Pki, Upstream, WeirProcess, answer_with, tls_exchange, write_config};

/// `pool:port` is a port the client or plugin chose: on a tenant's pool it
/// is held to the tenant's `upstreams` like any address. Before the door,
/// tenant a's `{ pool = "a-echo:PB" }` reached tenant b's upstream on the
/// same host, and a loopback-only service beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_port_is_held_to_the_tenants_ranges() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("door test CA");
    let identity = pki.server(&["*.a.test", "*.b.test"]);
    let a = Upstream::tls(&identity, |s| answer_with(s, " (a)".into())).await;
    let a_extra = Upstream::tls(&identity, |s| answer_with(s, " (a's other port)".into())).await;
    let b = Upstream::tls(&identity, |s| answer_with(s, " (b)".into())).await;
    let service = Upstream::tls(&identity, |s| answer_with(s, " (loopback-only service)".into())).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["edge"]

            [plugins.edge]
            wasm = "{{static_router}}"
            config.default = {{ reject = "no tenant owns this name" }}

            [plugins.a-router]
            wasm = "{{static_router}}"
            config.routes."app.a.test" = {{ pool = "a-echo" }}
            config.routes."own-port.a.test" = {{ pool = "a-echo:{pa}" }}
            config.routes."granted.a.test" = {{ pool = "a-echo:{pa2}" }}
            config.routes."steal.a.test" = {{ pool = "a-echo:{pb}" }}
            config.routes."service.a.test" = {{ pool = "a-echo:{ps}" }}
            config.routes."address.a.test" = {{ address = "127.0.0.1:{pb}" }}

            [plugins.b-router]
            wasm = "{{static_router}}"
            config.routes."app.b.test" = {{ address = "127.0.0.1:{pb}" }}

            [pools.a-echo]
            servers = ["127.0.0.1:{pa}"]

            [tenants.a]
            domains = ["a.test"]
            plugins = ["a-router"]
            pools = ["a-echo"]
            upstreams = ["10.0.0.0/8", "127.0.0.1/32:{pa2}"]

            [tenants.b]
            domains = ["b.test"]
            plugins = ["b-router"]
            upstreams = ["127.0.0.1/32:{pb}"]
            max_descriptors = 1

            [admin]
            bind = "127.0.0.1:0"
            "#,
            pa = a.addr.port(),
            pa2 = a_extra.addr.port(),
            pb = b.addr.port(),
            ps = service.addr.port(),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let admin = weir.admin_addr().await;
    let client = pki.client_config();
    let ask = |sni: &'static str| {
        let client = Arc::clone(&client);
        async move { tls_exchange(addr, sni, client, "hi").await.unwrap_or_default() }
    };

    // The operator's server, on its own port or named again; a port inside
    // the tenant's ranges.
    assert_eq!(ask("app.a.test").await, "upstream heard: hi (a)\n");
    weir.connection_line().await;
    assert_eq!(ask("own-port.a.test").await, "upstream heard: hi (a)\n");
    weir.connection_line().await;
    assert_eq!(ask("granted.a.test").await, "upstream heard: hi (a's other port)\n");
    weir.connection_line().await;
    assert_eq!(ask("app.b.test").await, "upstream heard: hi (b)\n");
    weir.connection_line().await;
    let (b_before, service_before) = (b.accepted(), service.accepted());

    // Another tenant's upstream and a loopback-only service: refused at the
    // door, the log naming the address and the tenant's ranges.
    for (sni, port) in [("steal.a.test", b.addr.port()), ("service.a.test", service.addr.port())] {
        assert_eq!(ask(sni).await, "", "{sni} was relayed");
        let line = weir.connection_line().await;
        assert!(
            line.contains("connect-failed")
                && line.contains(&format!(
                    "127.0.0.1:{port} is outside tenant `a`'s upstream ranges (10.0.0.0/8, 127.0.0.1/32:{})",
                    a_extra.addr.port()
                )),
            "{sni}: {line}"
        );
    }
    // The same address named outright is the plugin's invalid decision.
    assert_eq!(ask("address.a.test").await, "");
    let line = weir.connection_line().await;
    assert!(line.contains("is outside tenant `a`'s upstream ranges"), "{line}");
    assert_eq!(b.accepted(), b_before, "tenant a reached b's upstream");
    assert_eq!(service.accepted(), service_before, "tenant a reached the service");

    // The bystander is served throughout.
    assert_eq!(ask("app.b.test").await, "upstream heard: hi (b)\n");
    weir.connection_line().await;

    // b's upstream socket is counted while its connection lasts: at its
    // max_descriptors of 1, a second connection is refused at the door.
    let sockets = |admin: String| async move {
        let (_, body) = weir_tests::admin_request(&admin, "GET", "/api/tenants", None, "").await;
        let tenants: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        tenants["tenants"]["b"]["upstream_sockets"].as_u64().expect("a count")
    };
    let none_held = |admin: String| async move {
        let until = std::time::Instant::now() + weir_tests::STEP;
        while sockets(admin.clone()).await != 0 {
            assert!(std::time::Instant::now() < until, "b's sockets were not given back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    none_held(admin.clone()).await;
    let mut held = weir_tests::tls_connect(addr, "app.b.test", Arc::clone(&client))
        .await
        .expect("held");
    tokio::io::AsyncWriteExt::write_all(&mut held, b"hold\n")
        .await
        .expect("write");
    tokio::io::AsyncWriteExt::flush(&mut held).await.expect("flush");
    let mut line = [0u8; 1];
    tokio::time::timeout(weir_tests::STEP, tokio::io::AsyncReadExt::read(&mut held, &mut line))
        .await
        .expect("answered")
        .expect("read");
    assert_eq!(sockets(admin.clone()).await, 1);
    assert_eq!(ask("app.b.test").await, "", "past max_descriptors");
    let line = weir.connection_line().await;
    assert!(
        line.contains("tenant `b` holds its 1 upstream sockets (max_descriptors)"),
        "{line}"
    );
    drop(held);
    weir.connection_line().await;
    none_held(admin.clone()).await;
    assert_eq!(ask("app.b.test").await, "upstream heard: hi (b)\n");
    weir.child.kill().await.expect("stop");
}

/// A pool whose server is weir's own admin address, with a health check
/// whose `send` is a raw admin-API change: the probe is refused at the door
/// (it would pass the admin API's Origin, Content-Type and Host checks,
/// coming from the node itself), logged, and the admin API never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_never_reach_the_admin_api() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(weir_tests::echo).await;
    let admin_port = weir_tests::free_port();
    let body = r#"{"address": "127.0.0.9:80"}"#;
    let send = format!(
        "POST /api/pools/victim/backends HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Type: application/json\\r\\nContent-Length: {}\\r\\nConnection: close\\r\\n\\r\\n{}",
        body.len(),
        body.replace('"', "\\\"")
    );
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.no_sni = {{ pool = "victim" }}

            [pools.victim]
            servers = ["{upstream}"]

            [pools.prober]
            servers = ["127.0.0.1:{admin_port}"]
            health = {{ interval = "100ms", timeout = "1s", send = "{send}", expect = "HTTP/1.1 200" }}

            [admin]
            bind = "127.0.0.1:{admin_port}"

            [reload]
            watch = false
            "#,
            upstream = upstream.addr,
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let line = weir.line_containing("health probe refused").await;
    assert!(
        line.contains(&format!("127.0.0.1:{admin_port}")) && line.contains("weir's own listening address"),
        "{line}"
    );
    // Several intervals later the victim pool still has its one server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, pool) = weir_tests::admin_request(&admin, "GET", "/api/pools/victim", None, "").await;
    assert_eq!(status, 200, "{pool}");
    let pool: serde_json::Value = serde_json::from_str(&pool).expect("JSON");
    let backends = pool["backends"].as_array().expect("backends");
    assert_eq!(backends.len(), 1, "a probe changed the pool: {pool}");
    // The bystander: the victim pool's clients are served.
    let mut stream = tokio::net::TcpStream::connect(weir.addr("public"))
        .await
        .expect("connect");
    assert!(weir_tests::echoes(&mut stream, b"still served\n").await);
    weir.child.kill().await.expect("stop");
}

/// Three pools of 1,000 servers each, probed every 100 ms with a 1 s
/// timeout, aimed at a listener that never accepts (every connect hangs):
/// probes in flight are bounded over the process, none takes a descriptor
/// of the reserve, and accepted connections are all served meanwhile.
/// Before, each round opened 3,000 sockets and accept failed with EMFILE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_cannot_exhaust_descriptors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(weir_tests::echo).await;
    // A black hole: listening on every loopback address with the smallest
    // backlog, never accepting; once its queue is full, SYNs go unanswered.
    let hole = tokio::net::TcpSocket::new_v4().expect("socket");
    hole.bind("0.0.0.0:0".parse().expect("addr")).expect("bind");
    let hole_port = hole.local_addr().expect("addr").port();
    let _hole = hole.listen(0).expect("listen");
    let mut pools = String::new();
    for p in 0..3 {
        let servers: Vec<String> = (0..1000)
            .map(|i| format!("\"127.{}.{}.{}:{hole_port}\"", 10 + p, i / 250, i % 250 + 1))
            .collect();
        pools.push_str(&format!(
            "[pools.hole{p}]\nservers = [{}]\nhealth = {{ interval = \"100ms\", timeout = \"1s\" }}\n",
            servers.join(", ")
        ));
    }
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.no_sni = {{ address = "{upstream}" }}

            {pools}

            [reload]
            watch = false
            "#,
            upstream = upstream.addr,
        ),
    );
    // 1,024 descriptors: the reserve is the last 64.
    let mut weir = WeirProcess::spawn_under(&config, &["prlimit", "--nofile=1024:1024"]).await;
    let pid = weir.child.id().expect("weir's pid");
    let addr = weir.addr("public");
    let mut most = 0;
    let mut held = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let open = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("running").count();
        most = most.max(open);
        // The bystander: a client connection, served and held.
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(
            weir_tests::echoes(&mut stream, b"served\n").await,
            "a client connection was not served with {open} descriptors open"
        );
        if held.len() < 100 {
            held.push(stream);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "health probes: at most {most} descriptors open at once, {} connections held",
        held.len()
    );
    // 256 probes in flight at most, beside the held connections (two each)
    // and weir's own descriptors.
    assert!(most < 256 + 2 * 100 + 64, "{most} descriptors open at once");
    assert!(most < 1024 - 64, "{most} descriptors open: probes took the reserve");
    weir.child.kill().await.expect("stop");
}

/// A tenant's plugins share one rate of DNS lookups
/// (`dns_queries_per_second`): past it, a lookup fails at once without
/// leaving the node, and another tenant's lookups are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_dns_lookups_are_held_to_its_rate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app_pki = Pki::new("app's own CA");
    let app_tls = Upstream::tls(&app_pki.server(&["shop.quiet.custom.test"]), weir_tests::answer).await;
    let app = "3327603e03f5bd1f830812ca4a789277fc31f577";
    let port = app_tls.addr.port();
    let bind = weir_tests::dns::Bind::start_with(
        "custom.test",
        &format!("_dstack-app-address.shop.quiet IN TXT \"{app}:{port}\"\n"),
    );
    let router = |name: &str| {
        format!(
            r#"
            [plugins.{name}-dstack]
            wasm = "{{dstack_router}}"
            grants = ["dns"]
            timeout = "500ms"
            config.dns_custom_domains = true
            config.apps.{app}.instances = {{ instance1 = "127.0.0.1" }}
            "#
        )
    };
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["edge"]

            [plugins.edge]
            wasm = "{{static_router}}"
            config.default = {{ reject = "no tenant owns this name" }}
            {noisy}
            {quiet}

            [tenants.noisy]
            domains = ["noisy.custom.test"]
            plugins = ["noisy-dstack"]
            upstreams = ["127.0.0.1/32"]
            grants = ["dns"]
            max_plugin_timeout = "500ms"
            dns_queries_per_second = 3

            [tenants.quiet]
            domains = ["quiet.custom.test"]
            plugins = ["quiet-dstack"]
            upstreams = ["127.0.0.1/32"]
            grants = ["dns"]
            max_plugin_timeout = "500ms"

            [resolver]
            servers = ["{dns}"]
            "#,
            noisy = router("noisy"),
            quiet = router("quiet"),
            dns = bind.addr,
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let started = std::time::Instant::now();
    let mut limited = 0;
    for n in 0..12 {
        let sni = format!("x{n}.noisy.custom.test");
        let reply = tls_exchange(addr, &sni, app_pki.client_config(), "x").await;
        assert!(reply.unwrap_or_default().is_empty(), "{sni} has no record");
        let line = weir.connection_line().await;
        if line.contains("dns_queries_per_second") {
            limited += 1;
        } else {
            assert!(line.contains("no TXT record"), "{line}");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let asked: usize = (0..12)
        .map(|n| bind.queries(&format!("_dstack-app-address.x{n}.noisy.custom.test"), "TXT"))
        .sum();
    eprintln!("dns: {asked} lookups sent, {limited} refused, in {elapsed:.2} s");
    // A second's worth at once (3), then 3 a second.
    let allowed = 3 + (elapsed * 3.0).ceil() as usize;
    assert!(asked <= allowed, "{asked} lookups left the node in {elapsed:.1} s");
    assert!(limited >= 12 - allowed, "{limited} lookups were refused");
    // The bystander tenant resolves and is routed.
    let reply = tls_exchange(addr, "shop.quiet.custom.test", app_pki.client_config(), "by dns").await;
    assert_eq!(reply.expect("quiet is routed"), "upstream heard: by dns\n");
    let line = weir.connection_line().await;
    assert!(line.contains(&format!(r#"route="dns:{app}-{port}""#)), "{line}");
    weir.child.kill().await.expect("stop");
}
