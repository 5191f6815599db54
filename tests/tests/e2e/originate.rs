//! Origination (contract 0.2.0's `originate`): a plain TCP client through
//! weir, which opens TLS to the upstream itself — verified by a CA (and
//! presenting weir's client certificate, with the ALPN the decision names),
//! refused with the reason when the certificate is wrong, or judged by its
//! RA-TLS attestation by the attestation-allowlist plugin.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::{Pki, STEP, Upstream, WeirProcess, answer, answer_with, simulated_ratls, toml_path, write_config};

/// What a plain client reads back after sending one line; empty when weir
/// closed the connection.
async fn plain_exchange(addr: std::net::SocketAddr, line: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(line.as_bytes()).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_opens_tls_for_a_plain_client_verified_by_ca_pins_or_attestation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let backend_pki = Pki::new("backend CA");
    let backend = backend_pki.server(&["backend.internal"]);
    let gateway_cert = backend_pki.client("weir-gateway");
    let expected = gateway_cert.chain[0].clone();
    let mut server_config = (*backend_pki.server_config_requiring_clients(&backend)).clone();
    server_config.alpn_protocols = vec![b"x-weir".to_vec()];
    let upstream = Upstream::tls_with(Arc::new(server_config), move |tls| {
        let conn = tls.get_ref().1;
        let from = match conn.peer_certificates().and_then(|c| c.first()) {
            Some(cert) if *cert == expected => "weir-gateway",
            _ => "someone else",
        };
        let alpn = String::from_utf8_lossy(conn.alpn_protocol().unwrap_or(b"none")).into_owned();
        answer_with(tls, format!(" (from {from}, alpn {alpn})"))
    })
    .await;
    // A server whose certificate the backend CA did not sign.
    let stranger = Upstream::tls(&Pki::new("another CA").server(&["backend.internal"]), answer).await;
    let allowed = [0x11u8; 48];
    let good_tee = Upstream::tls(&simulated_ratls("good.tee", allowed), answer).await;
    let bad_tee = Upstream::tls(&simulated_ratls("bad.tee", [0x22u8; 48]), answer).await;
    let (cert, key) = gateway_cert.write(dir.path(), "gateway");
    let ca = backend_pki.write_ca(dir.path(), "backend-ca");
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let listener = |name: &str, target: &str, judged: bool| {
        let allow = if judged { r#", "allow""# } else { "" };
        format!(
            r#"
            [listeners.{name}]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["{name}"{allow}]

            [plugins.{name}]
            wasm = "{{static_router}}"
            config.no_sni = {target}
            "#
        )
    };
    let originate = r#"originate = { ca = "backend", server_name = "backend.internal", client_cert = "gateway", alpn = ["x-weir"] }"#;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            {verified}
            {wrong}
            {good}
            {bad}

            [plugins.allow]
            wasm = "{{attestation_allowlist}}"
            config = {{ require_verified = false, rules = [ {{ mrtd = ["{allowed}"] }} ] }}

            [cas.backend]
            file = {ca}

            [certificates.gateway]
            cert = {cert}
            key = {key}
            "#,
            verified = listener(
                "verified",
                &format!(r#"{{ address = "{}", {originate} }}"#, upstream.addr),
                false
            ),
            wrong = listener(
                "wrong",
                &format!(r#"{{ address = "{}", {originate} }}"#, stranger.addr),
                false
            ),
            good = listener(
                "good",
                &format!(
                    r#"{{ address = "{}", originate = {{ attested = true }} }}"#,
                    good_tee.addr
                ),
                true
            ),
            bad = listener(
                "bad",
                &format!(
                    r#"{{ address = "{}", originate = {{ attested = true }} }}"#,
                    bad_tee.addr
                ),
                true
            ),
            allowed = hex(&allowed),
            ca = toml_path(&ca),
            cert = toml_path(&cert),
            key = toml_path(&key),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;

    let reply = plain_exchange(weir.addr("verified"), "hello\n").await;
    let line = weir.connection_line().await;
    assert_eq!(
        reply, "upstream heard: hello (from weir-gateway, alpn x-weir)\n",
        "{line}"
    );
    assert!(
        line.contains(r#"mode="originate""#) && line.contains("outcome=closed"),
        "{line}"
    );

    assert_eq!(
        plain_exchange(weir.addr("wrong"), "hello\n").await,
        "",
        "a wrong certificate is refused"
    );
    let line = weir.connection_line().await;
    assert!(
        line.contains("upstream TLS handshake: invalid peer certificate"),
        "{line}"
    );

    assert_eq!(
        plain_exchange(weir.addr("good"), "tee\n").await,
        "upstream heard: tee\n"
    );
    let _ = weir.connection_line().await;
    assert_eq!(
        plain_exchange(weir.addr("bad"), "tee\n").await,
        "",
        "an attestation off the list is refused"
    );
    let line = weir.connection_line().await;
    assert!(
        line.contains("outcome=denied") && line.contains("is not allowed"),
        "{line}"
    );
}
