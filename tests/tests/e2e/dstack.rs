//! dstack-router end to end: an `s` name reaches the app's own TLS server, a
//! bare port is terminated with the base domain's wildcard certificate and
//! reaches a plain server, a `g` name negotiates h2 with the client (curl)
//! and carries an HTTP/2 exchange to a plaintext h2 server, and a custom
//! domain is passed through to its app; with `dns_custom_domains`, a name
//! is routed by its `_dstack-app-address` TXT record in a real DNS server
//! (BIND 9), through the host's resolver and its cache.

use std::sync::Arc;

use weir_tests::{Pki, STEP, Upstream, WeirProcess, answer, h2c_upstream, tls_exchange, toml_path, write_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dstack_names_reach_their_apps() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway_pki = Pki::new("gateway CA");
    let app_pki = Pki::new("app's own CA");
    let app_tls = Upstream::tls(&app_pki.server(&["*.dstack.test", "shop.test"]), answer).await;
    let app_plain = Upstream::tcp(answer).await;
    let app_h2 = h2c_upstream().await;
    let (cert, key) = gateway_pki.server(&["*.dstack.test"]).write(dir.path(), "wildcard");
    let app = "3327603e03f5bd1f830812ca4a789277fc31f577";
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["dstack"]
            tls.alpn = ["http/1.1"]

            [plugins.dstack]
            wasm = "{{dstack_router}}"
            grants = ["dns"]
            config.base_domains."dstack.test" = {{ certificate = "wildcard" }}
            config.apps.{app}.instances = {{ instance1 = "127.0.0.1" }}
            # An app whose instances are a weir pool: the host picks, on the name's port.
            config.apps.pooledapp.pool = "pooled"
            config.custom_domains."shop.test" = "{app}:{tls_port}"

            [pools.pooled]
            servers = ["127.0.0.1:1", "127.0.0.1:2"]
            max_attempts = 2

            [certificates.wildcard]
            cert = {cert}
            key = {key}
            "#,
            tls_port = app_tls.addr.port(),
            cert = toml_path(&cert),
            key = toml_path(&key),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");

    // `s`: passthrough, so only the app's CA verifies what the client sees.
    let sni = format!("{app}-{}s.dstack.test", app_tls.addr.port());
    let reply = tls_exchange(addr, &sni, app_pki.client_config(), "to the app").await;
    assert_eq!(reply.expect("passthrough"), "upstream heard: to the app\n");
    let line = weir.connection_line().await;
    assert!(line.contains(r#"mode="passthrough""#), "{line}");
    assert!(
        line.contains(&format!(r#"route="{app}-{}s""#, app_tls.addr.port())),
        "{line}"
    );

    // A bare port: terminated with the wildcard certificate, plain upstream.
    let sni = format!("{app}-{}.dstack.test", app_plain.addr.port());
    let reply = tls_exchange(addr, &sni, gateway_pki.client_config(), "terminated").await;
    assert_eq!(reply.expect("terminated"), "upstream heard: terminated\n");
    assert!(weir.connection_line().await.contains(r#"mode="terminate""#));

    // `g`: curl negotiates h2 with weir; the h2 frames reach a plaintext h2 server.
    let ca = gateway_pki.write_ca(dir.path(), "gateway-ca");
    let host = format!("instance1-{}g.dstack.test", app_h2.addr.port());
    let curl = tokio::time::timeout(
        STEP,
        tokio::process::Command::new("curl")
            .args([
                "-sS",
                "--http2",
                "--max-time",
                "20",
                "--cacert",
                &ca.display().to_string(),
            ])
            .args(["-w", "%{http_version}"])
            .args(["--resolve", &format!("{host}:{}:127.0.0.1", addr.port())])
            .arg(format!("https://{host}:{}/helloworld.Greeter/SayHello", addr.port()))
            .output(),
    )
    .await
    .expect("curl finishes")
    .expect("curl is installed (.ci/run installs it)");
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "HTTP/2.0 /helloworld.Greeter/SayHello\n2",
        "curl stderr: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let line = weir.connection_line().await;
    assert!(line.contains(r#"mode="terminate""#) && line.contains("g\""), "{line}");

    // Through the app's pool: the pool's servers on the port from the name.
    let sni = format!("pooledapp-{}s.dstack.test", app_tls.addr.port());
    let reply = tls_exchange(addr, &sni, app_pki.client_config(), "pooled").await;
    assert_eq!(reply.expect("through the pool"), "upstream heard: pooled\n");
    let line = weir.connection_line().await;
    assert!(line.contains(&format!("upstream=\"{}\"", app_tls.addr)), "{line}");

    // A custom domain: passthrough to the app.
    let reply = tls_exchange(addr, "shop.test", app_pki.client_config(), "shopping").await;
    assert_eq!(reply.expect("custom domain"), "upstream heard: shopping\n");
    weir.connection_line().await;

    // An invalid name is refused with the reason in the log.
    let reply = tls_exchange(
        addr,
        &format!("{app}-443sg.dstack.test"),
        Arc::clone(&gateway_pki.client_config()),
        "x",
    )
    .await;
    assert!(reply.is_err(), "{reply:?}");
    let line = weir.connection_line().await;
    assert!(line.contains("combines `s` (passthrough) and `g` (gRPC)"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_domains_are_routed_by_their_txt_records_and_the_answers_are_cached() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app_pki = Pki::new("app's own CA");
    let app_tls = Upstream::tls(&app_pki.server(&["shop.custom.test", "stale.custom.test"]), answer).await;
    let app = "3327603e03f5bd1f830812ca4a789277fc31f577";
    let port = app_tls.addr.port();
    let bind = weir_tests::dns::Bind::start_with(
        "custom.test",
        &format!(
            "_dstack-app-address.shop IN TXT \"{app}:{port}\"\n\
             _dstack-app-address.stale IN TXT \"0000000000000000000000000000000000000000:{port}\"\n"
        ),
    );
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["dstack"]

            [plugins.dstack]
            wasm = "{{dstack_router}}"
            grants = ["dns"]
            timeout = "200ms"
            config.dns_custom_domains = true
            config.apps.{app}.instances = {{ instance1 = "127.0.0.1" }}

            [resolver]
            servers = ["{dns}"]
            "#,
            dns = bind.addr,
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let record = "_dstack-app-address.shop.custom.test";
    for round in 0..2 {
        let reply = tls_exchange(addr, "shop.custom.test", app_pki.client_config(), "by dns").await;
        assert_eq!(
            reply.expect("routed by its TXT record"),
            "upstream heard: by dns\n",
            "round {round}"
        );
        let line = weir.connection_line().await;
        assert!(line.contains(&format!(r#"route="dns:{app}-{port}""#)), "{line}");
    }
    assert_eq!(
        bind.queries(record, "TXT"),
        1,
        "the second lookup was answered from the cache (TTL 60 s): {}",
        bind.query_log()
    );

    // No record: the plugin's own refusal, saying which record is missing.
    let line = refused(&mut weir, addr, "none.custom.test", &app_pki).await;
    assert!(line.contains(r#"route="unknown-domain""#), "{line}");
    assert!(
        line.contains("no TXT record at _dstack-app-address.none.custom.test"),
        "{line}"
    );
    // A record naming an app the router does not know.
    let line = refused(&mut weir, addr, "stale.custom.test", &app_pki).await;
    assert!(
        line.contains("no app or instance `0000000000000000000000000000000000000000`"),
        "{line}"
    );
    // The negative answer is cached too.
    refused(&mut weir, addr, "none.custom.test", &app_pki).await;
    assert_eq!(
        bind.queries("_dstack-app-address.none.custom.test", "TXT"),
        1,
        "{}",
        bind.log()
    );
}

/// Asks for `sni` through weir, which must refuse it; its log line.
async fn refused(weir: &mut WeirProcess, addr: std::net::SocketAddr, sni: &str, pki: &Pki) -> String {
    let outcome = tls_exchange(addr, sni, pki.client_config(), "x").await;
    assert!(outcome.is_err(), "{sni} is refused");
    weir.connection_line().await
}
