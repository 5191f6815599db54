//! The passthrough route reached by a client that is not ours:
//! `openssl s_client -servername`, verifying the upstream's certificate
//! against the upstream's CA only.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use weir_tests::{Pki, Upstream, start_gateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_reaches_the_upstream_through_passthrough() {
    let pki = Pki::new("weir test upstream CA");
    let upstream = Upstream::tls(&pki.server(&["app.test"]), |tls| async move {
        // Greets, reads one line, answers it, and closes.
        let (read, mut write) = tokio::io::split(tls);
        let mut lines = BufReader::new(read).lines();
        if let Ok(Some(line)) = lines.next_line().await {
            let _ = write.write_all(format!("upstream heard: {line}\n").as_bytes()).await;
        }
        let _ = write.shutdown().await;
    })
    .await;
    let gateway = start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."app.test" = {{ address = "{}" }}
        "#,
        upstream.addr
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).expect("write CA");

    let (stdout, stderr) = weir_tests::openssl_s_client(
        addr,
        "app.test",
        &ca,
        &["-verify_hostname", "app.test", "-brief"],
        "hello through weir",
    )
    .await;
    assert!(
        stdout.contains("upstream heard: hello through weir"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("Verification: OK"), "stderr: {stderr}");
    assert!(
        stderr.contains("CN = app.test"),
        "the peer is not the upstream: {stderr}"
    );
}
