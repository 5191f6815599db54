//! ACME against a real CA: Pebble (Let's Encrypt's test server), resolving
//! every name to 127.0.0.1 through pebble-challtestsrv, validates weir's
//! order with TLS-ALPN-01 on weir's own listener; weir then serves the
//! issued certificate, and keeps it across a restart.

use weir_tests::pebble::Pebble;
use weir_tests::{Upstream, WeirProcess, answer, free_port, plain_route_config, tls_exchange, toml_path, write_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_is_ordered_validated_by_tls_alpn_and_served() {
    let port = free_port();
    let pebble = Pebble::start(port).await;
    let upstream = Upstream::tcp(answer).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("acme");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:{port}"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."acme.test" = {{ address = "{upstream}", terminate = {{ certificate = "site" }} }}

            [certificates.site]
            cert = {cert}
            key = {key}
            acme = {{ directory = "{directory}", domains = ["acme.test"], contact = ["mailto:ops@acme.test"], directory_ca = {ca} }}
            "#,
            upstream = upstream.addr,
            cert = toml_path(&store.join("site.pem")),
            key = toml_path(&store.join("site-key.pem")),
            directory = pebble.directory,
            ca = toml_path(&pebble.https_ca()),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let issued = weir.line_containing("certificate issued").await;
    assert!(issued.contains(r#"certificate="site""#), "{issued}");
    weir.line_containing(r#"trigger="acme""#).await;
    // The account is kept for the next order.
    let account: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("site.account.json")).expect("account kept")).expect("JSON");
    assert!(
        account["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("https://127.0.0.1")),
        "{account}"
    );

    // Served: a client trusting only Pebble's root reaches the upstream.
    let client = pebble.client_config();
    let reply = tls_exchange(addr, "acme.test", std::sync::Arc::clone(&client), "hello").await;
    assert_eq!(reply.expect("a verified handshake"), "upstream heard: hello\n");
    let issued_pem = std::fs::read(store.join("site.pem")).expect("certificate kept");

    // A restart keeps the certificate: no new order, and it is served.
    weir.child.kill().await.expect("stop");
    drop(weir);
    let mut weir = WeirProcess::spawn(&config).await;
    let reply = tls_exchange(weir.addr("public"), "acme.test", client, "again").await;
    assert_eq!(reply.expect("a verified handshake"), "upstream heard: again\n");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(std::fs::read(store.join("site.pem")).expect("certificate"), issued_pem);
    weir.child.kill().await.expect("stop");
}

/// A CA that cannot be reached: the order fails with the reason and a
/// retry time, the certificate is reported as awaited, and the gateway
/// serves its other routes all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_is_reported_and_the_rest_is_served() {
    let upstream = Upstream::tcp(weir_tests::echo).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("acme");
    let acme = format!(
        r#"
        [certificates.site]
        cert = {cert}
        key = {key}
        acme = {{ directory = "https://127.0.0.1:{closed}/dir", domains = ["acme.test"] }}

        [admin]
        bind = "127.0.0.1:0"
        "#,
        cert = toml_path(&store.join("site.pem")),
        key = toml_path(&store.join("site-key.pem")),
        closed = free_port(),
    );
    let config = write_config(dir.path(), &plain_route_config(upstream.addr, &acme));
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let failed = weir.line_containing("ACME order failed").await;
    assert!(
        failed.contains(r#"certificate="site""#) && failed.contains("retry_in=60s"),
        "{failed}"
    );
    let (status, body) = weir_tests::admin_request(&admin, "GET", "/api/certificates", None, "").await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["awaiting_acme"], serde_json::json!(["site"]), "{body}");
    assert!(!store.join("site.pem").exists());
    let mut stream = tokio::net::TcpStream::connect(weir.addr("public"))
        .await
        .expect("connect");
    assert!(weir_tests::echoes(&mut stream, b"still serving\n").await);
    weir.child.kill().await.expect("stop");
}
