//! What reaches the plugin chain, and what never does: real ClientHellos from
//! real clients in awkward shapes are routed and replayed byte for byte;
//! oversized hellos, garbage and silent clients are closed and never reach an
//! upstream, while everyone else keeps being served.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use weir::Gateway;
use weir_tests::{STEP, Upstream, next_report, pattern, recording_upstream, start_gateway, testdata};

/// A gateway where *everything* routable goes to `upstream`: named hosts,
/// hellos without SNI and unknown names alike. Anything that does not reach
/// it was refused before routing.
async fn catch_all_gateway(upstream: &Upstream, sniff_timeout: &str) -> Gateway {
    start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]
        sniff_timeout = "{sniff_timeout}"

        [plugins.router]
        wasm = "{{static_router}}"
        config.no_sni = {{ pool = "all" }}
        config.default = {{ pool = "all" }}

        [pools.all]
        servers = ["{}"]
        "#,
        upstream.addr
    ))
    .await
}

async fn expect_bytes(rx: &mut mpsc::UnboundedReceiver<Vec<u8>>, expected: &[u8], what: &str) {
    let got = next_report(rx).await;
    assert!(
        got == expected,
        "{what}: upstream got {} bytes, expected {}",
        got.len(),
        expected.len()
    );
}

/// Waits for the gateway to close the connection without sending a byte
/// (an orderly FIN, or a reset when our bytes were left unread).
async fn expect_closed(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
        Err(_) => panic!("{what}: still open"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: got {n} bytes instead of a close"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_real_client_hello_is_routed_and_replayed_byte_exact() {
    let (upstream, mut rx) = recording_upstream().await;
    let gateway = catch_all_gateway(&upstream, "5s").await;
    let addr = gateway.local_addr("public").expect("listener");
    let manifest: serde_json::Value = serde_json::from_slice(&testdata("clienthello/manifest.json")).expect("manifest");
    let mut routed = 0;
    for entry in manifest.as_array().expect("list") {
        let file = entry["file"].as_str().expect("file");
        if file.contains("sslrequest") || file.contains("truncated") || file.contains("reclen20000") {
            continue;
        }
        let mut sent = testdata(&format!("clienthello/{file}"));
        sent.extend_from_slice(b"application bytes after the hello");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(&sent).await.expect("send");
        client.shutdown().await.expect("FIN");
        expect_bytes(&mut rx, &sent, file).await;
        routed += 1;
    }
    assert!(routed >= 14, "only {routed} captures routed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_sent_one_byte_per_segment_is_routed() {
    let (upstream, mut rx) = recording_upstream().await;
    let gateway = catch_all_gateway(&upstream, "5s").await;
    let addr = gateway.local_addr("public").expect("listener");
    let hello = testdata("clienthello/openssl-alpn-h2-http11-sni.bin");
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.set_nodelay(true).expect("nodelay");
    for byte in &hello {
        client.write_all(std::slice::from_ref(byte)).await.expect("send a byte");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    client.shutdown().await.expect("FIN");
    expect_bytes(&mut rx, &hello, "one byte per segment").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_split_over_three_records_is_routed() {
    let (upstream, mut rx) = recording_upstream().await;
    let gateway = catch_all_gateway(&upstream, "5s").await;
    let addr = gateway.local_addr("public").expect("listener");
    let hello = testdata("clienthello/synthetic-openssl-tls13-3records.bin");
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.set_nodelay(true).expect("nodelay");
    // Each record in its own segment, with the boundary mid-hello.
    for part in [&hello[..85], &hello[85..171], &hello[171..]] {
        client.write_all(part).await.expect("send a record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.shutdown().await.expect("FIN");
    expect_bytes(&mut rx, &hello, "three records").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_hellos_and_garbage_are_closed_and_never_routed() {
    let (upstream, mut rx) = recording_upstream().await;
    let gateway = catch_all_gateway(&upstream, "5s").await;
    let addr = gateway.local_addr("public").expect("listener");

    // A 20 KiB ClientHello: handshake length 20000 in a maximal record.
    let mut big = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x4e, 0x20];
    big.extend(pattern(20 * 1024, 9));
    let garbage = pattern(512, 10);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("20 KiB hello", big),
        (
            "record length 20000",
            testdata("clienthello/synthetic-openssl-tls13-reclen20000.bin"),
        ),
        ("random bytes", garbage),
        ("zeros", vec![0; 64]),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n".to_vec()),
        ("SSLv2 hello", vec![0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15]),
        (
            "Postgres SSLRequest on a TLS listener",
            testdata("clienthello/psql-sslrequest.bin"),
        ),
    ];
    for (what, bytes) in cases {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        // The gateway may close before all of it is written.
        let _ = client.write_all(&bytes).await;
        expect_closed(&mut client, what).await;
    }
    assert_eq!(upstream.accepted(), 0, "a refused connection reached the upstream");

    // And the gateway still routes a real client.
    let hello = testdata("clienthello/curl-http2.bin");
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&hello).await.expect("send");
    client.shutdown().await.expect("FIN");
    expect_bytes(&mut rx, &hello, "after the refusals").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_at_the_deadline_while_others_are_served() {
    let (upstream, mut rx) = recording_upstream().await;
    let gateway = catch_all_gateway(&upstream, "1s").await;
    let addr = gateway.local_addr("public").expect("listener");

    let connected = Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    // A partial hello that stalls counts as silent too.
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    stalled
        .write_all(&testdata("clienthello/synthetic-openssl-tls13-truncated-half.bin"))
        .await
        .expect("half");

    // Meanwhile, other clients are served in full.
    for i in 0..5u8 {
        let mut sent = testdata("clienthello/python-ssl-sni.bin");
        sent.extend(pattern(64 * 1024, i));
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(&sent).await.expect("send");
        client.shutdown().await.expect("FIN");
        expect_bytes(&mut rx, &sent, "served during the silence").await;
    }
    assert!(
        connected.elapsed() < Duration::from_millis(900),
        "serving the others took too long to prove anything"
    );

    expect_closed(&mut silent, "silent client").await;
    expect_closed(&mut stalled, "stalled client").await;
    let waited = connected.elapsed();
    assert!(
        waited >= Duration::from_millis(950),
        "closed after {waited:?}, before the 1 s deadline"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed after {waited:?}, long after the 1 s deadline"
    );
    assert_eq!(upstream.accepted(), 5);
}

/// A listener sending every connection to `upstream`, with a long sniff
/// deadline and `defer_accept` as given.
fn deferring_config(upstream: std::net::SocketAddr, defer: bool) -> String {
    format!(
        r#"
        [reload]
        watch = false

        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]
        sniff_timeout = "30s"
        defer_accept = {defer}

        [plugins.router]
        wasm = "{{static_router}}"
        config.default = {{ pool = "all" }}

        [pools.all]
        servers = ["{upstream}"]
        "#
    )
}

/// Connections the gateway's `public` listener has accepted.
fn accepted(gateway: &Gateway) -> u64 {
    gateway.stats()["public"]
        .total
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferring_listener_sees_a_client_only_once_it_speaks() {
    let (upstream, mut rx) = recording_upstream().await;
    let gateway = start_gateway(&deferring_config(upstream.addr, true)).await;
    let addr = gateway.local_addr("public").expect("listener");
    let accepted = || accepted(&gateway);

    // Connected as far as the client can tell, but the kernel keeps it.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    for i in 0..3u8 {
        let mut sent = testdata("clienthello/python-ssl-sni.bin");
        sent.extend(pattern(4096, i));
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(&sent).await.expect("send");
        client.shutdown().await.expect("FIN");
        expect_bytes(&mut rx, &sent, "a client that spoke").await;
    }
    assert_eq!(accepted(), 3, "the silent client reached weir before saying anything");

    // Once it speaks, it is accepted and served like the others.
    let mut sent = testdata("clienthello/python-ssl-sni.bin");
    sent.extend(pattern(4096, 9));
    silent.write_all(&sent).await.expect("send");
    silent.shutdown().await.expect("FIN");
    expect_bytes(&mut rx, &sent, "the silent client, once it spoke").await;
    assert_eq!(accepted(), 4);
    assert_eq!(upstream.accepted(), 4);
}

/// A reload that turns `defer_accept` on applies it to the listening socket
/// in place: a silent client was accepted before it, and is not after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_defer_accept_on_in_place() {
    let (upstream, mut rx) = recording_upstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = |defer: bool| deferring_config(upstream.addr, defer);
    let (gateway, _path) = weir_tests::start_gateway_file(dir.path(), &config(false)).await;
    let addr = gateway.local_addr("public").expect("listener");
    let accepted = || accepted(&gateway);
    let _before = TcpStream::connect(addr).await.expect("connect");
    let deadline = Instant::now() + STEP;
    while accepted() < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        accepted(),
        1,
        "without defer_accept a silent client is accepted at once"
    );

    weir_tests::write_config(dir.path(), &config(true));
    let report = gateway.reload("test").await;
    assert_eq!(report.error, None, "{report:?}");
    let mut after = TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        accepted(),
        1,
        "a silent client reached weir after defer_accept was turned on"
    );
    let mut sent = testdata("clienthello/python-ssl-sni.bin");
    sent.extend(pattern(1024, 4));
    after.write_all(&sent).await.expect("send");
    after.shutdown().await.expect("FIN");
    expect_bytes(&mut rx, &sent, "the deferred client, once it spoke").await;
    assert_eq!(accepted(), 2);
}
