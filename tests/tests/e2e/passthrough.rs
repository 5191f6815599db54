//! Passthrough end to end: a real rustls client, weir with the static-router
//! plugin, a real rustls upstream. Nothing is terminated: the client
//! verifies the upstream's own certificate.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use weir::Gateway;
use weir_tests::{
    Pki, Upstream, next_report, pattern, read_to_end, recording_upstream, start_gateway, testdata, tls_connect,
};

const TEN_MB: usize = 10 * 1024 * 1024;

/// Every relay mode must be byte-exact and keep half-close: `copy` is the
/// portable loop, `splice` uses splice(2) from the first byte, `auto` switches
/// from one to the other mid-stream.
const RELAY_MODES: [&str; 3] = ["copy", "splice", "auto"];

async fn gateway_to(upstream: SocketAddr, name: &str, relay: &str) -> Gateway {
    start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]
        relay = "{relay}"

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."{name}" = {{ pool = "app" }}

        [pools.app]
        servers = ["{upstream}"]
        "#
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_shows_the_upstream_certificate_and_relays_10mb_each_way_after_client_half_close() {
    for relay in RELAY_MODES {
        client_half_close_case(relay).await;
    }
}

async fn client_half_close_case(relay: &str) {
    let pki = Pki::new("upstream CA");
    let identity = pki.server(&["app.test"]);
    let upstream_leaf = identity.chain[0].clone();
    let (received_tx, mut received_rx) = mpsc::unbounded_channel();
    // Reads until the client half-closes, reports what it got, then answers.
    let upstream = Upstream::tls(&identity, move |mut tls| {
        let received_tx = received_tx.clone();
        async move {
            let Ok(received) = read_to_end(&mut tls).await else {
                return;
            };
            let _ = received_tx.send(received);
            let _ = tls.write_all(&pattern(TEN_MB, 2)).await;
            let _ = tls.shutdown().await;
        }
    })
    .await;
    let gateway = gateway_to(upstream.addr, "app.test", relay).await;
    let addr = gateway.local_addr("public").expect("listener");

    let mut client = tls_connect(addr, "app.test", pki.client_config())
        .await
        .expect("TLS through weir");
    let peer_leaf = client.get_ref().1.peer_certificates().expect("peer certificates")[0].clone();
    assert_eq!(
        peer_leaf, upstream_leaf,
        "the client must see the upstream's own certificate"
    );

    let sent = pattern(TEN_MB, 1);
    client.write_all(&sent).await.expect("send 10 MB");
    client.shutdown().await.expect("half-close");
    let received = next_report(&mut received_rx).await;
    assert!(
        received == sent,
        "{relay}: upstream got {} bytes, not the 10 MB sent",
        received.len()
    );
    // Our write side is closed; the other direction still flows.
    let answer = read_to_end(&mut client).await.expect("answer");
    assert!(
        answer == pattern(TEN_MB, 2),
        "{relay}: client got {} bytes, not the 10 MB sent",
        answer.len()
    );
    assert_eq!(upstream.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_keeps_the_client_direction_flowing_after_upstream_half_close() {
    for relay in RELAY_MODES {
        upstream_half_close_case(relay).await;
    }
}

async fn upstream_half_close_case(relay: &str) {
    let pki = Pki::new("upstream CA");
    let identity = pki.server(&["app.test"]);
    let (received_tx, mut received_rx) = mpsc::unbounded_channel();
    // Sends everything and half-closes first, then keeps reading.
    let upstream = Upstream::tls(&identity, move |mut tls| {
        let received_tx = received_tx.clone();
        async move {
            if tls.write_all(&pattern(TEN_MB, 3)).await.is_err() || tls.shutdown().await.is_err() {
                return;
            }
            if let Ok(received) = read_to_end(&mut tls).await {
                let _ = received_tx.send(received);
            }
        }
    })
    .await;
    let gateway = gateway_to(upstream.addr, "app.test", relay).await;
    let addr = gateway.local_addr("public").expect("listener");

    let mut client = tls_connect(addr, "app.test", pki.client_config())
        .await
        .expect("TLS through weir");
    let answer = read_to_end(&mut client)
        .await
        .expect("upstream's bytes up to its close");
    assert!(
        answer == pattern(TEN_MB, 3),
        "{relay}: client got {} bytes, not the 10 MB sent",
        answer.len()
    );
    let sent = pattern(TEN_MB, 4);
    client.write_all(&sent).await.expect("send after upstream half-close");
    client.shutdown().await.expect("half-close");
    let received = next_report(&mut received_rx).await;
    assert!(
        received == sent,
        "{relay}: upstream got {} bytes, not the 10 MB sent",
        received.len()
    );
}

/// The TCP-level view: the exact bytes of a real ClientHello, then a payload,
/// and FIN in each direction, checked on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_half_close_is_propagated_in_each_direction() {
    for relay in RELAY_MODES {
        tcp_half_close_case(relay).await;
    }
}

async fn tcp_half_close_case(relay: &str) {
    let hello = testdata("clienthello/openssl-tls13-sni.bin");
    let (received_tx, mut received_rx) = mpsc::unbounded_channel();
    let upstream = Upstream::tcp(move |mut stream: TcpStream| {
        let received_tx = received_tx.clone();
        async move {
            // Client-first case: read to FIN, report, answer, close.
            let Ok(received) = read_to_end(&mut stream).await else {
                return;
            };
            let _ = received_tx.send(received);
            let _ = stream.write_all(&pattern(1 << 20, 6)).await;
            let _ = stream.shutdown().await;
        }
    })
    .await;
    let gateway = gateway_to(upstream.addr, "a.example.com", relay).await;
    let addr = gateway.local_addr("public").expect("listener");

    let mut client = TcpStream::connect(addr).await.expect("connect");
    let mut sent = hello.clone();
    sent.extend_from_slice(&pattern(1 << 20, 5));
    client.write_all(&sent).await.expect("send");
    client.shutdown().await.expect("FIN");
    let received = next_report(&mut received_rx).await;
    assert!(
        received == sent,
        "{relay}: upstream got {} bytes, expected {}",
        received.len(),
        sent.len()
    );
    let answer = read_to_end(&mut client).await.expect("answer after our FIN");
    assert!(answer == pattern(1 << 20, 6));

    // Upstream-first: it answers and sends FIN as soon as the hello is in.
    let (received_tx, mut received_rx) = mpsc::unbounded_channel();
    let hello_len = hello.len();
    let upstream = Upstream::tcp(move |mut stream: TcpStream| {
        let received_tx = received_tx.clone();
        async move {
            let mut first = vec![0; hello_len];
            if stream.read_exact(&mut first).await.is_err() {
                return;
            }
            let _ = stream.write_all(&pattern(1 << 20, 7)).await;
            let _ = stream.shutdown().await;
            if let Ok(rest) = read_to_end(&mut stream).await {
                first.extend_from_slice(&rest);
                let _ = received_tx.send(first);
            }
        }
    })
    .await;
    let gateway = gateway_to(upstream.addr, "a.example.com", relay).await;
    let addr = gateway.local_addr("public").expect("listener");
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&hello).await.expect("send hello");
    let answer = read_to_end(&mut client).await.expect("upstream bytes up to its FIN");
    assert!(answer == pattern(1 << 20, 7));
    // The upstream closed its side; ours still reaches it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let payload = pattern(1 << 20, 8);
    client.write_all(&payload).await.expect("send after upstream FIN");
    client.shutdown().await.expect("FIN");
    let received = next_report(&mut received_rx).await;
    let mut expected = hello;
    expected.extend_from_slice(&payload);
    assert!(
        received == expected,
        "{relay}: upstream got {} bytes, expected {}",
        received.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tls_clients_are_told_why_with_an_alert() {
    let pki = Pki::new("upstream CA");
    // Nothing listens on the pool's address: connecting to it fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let gateway = start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]
        connect_timeout = "1s"

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."blocked.test" = {{ reject = "not for you" }}
        config.routes."down.test" = {{ address = "{closed}" }}
        "#
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    for (name, alert) in [
        ("blocked.test", "AccessDenied"),
        ("unknown.test", "UnrecognisedName"),
        ("down.test", "InternalError"),
    ] {
        let error = tls_connect(addr, name, pki.client_config())
            .await
            .expect_err(name)
            .to_string();
        assert!(
            error.contains(&format!("received fatal alert: {alert}")),
            "{name}: {error}"
        );
    }
}

/// The header a decision asks for goes out before the sniffed bytes, with the
/// real client address, byte for byte as the PROXY protocol specifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_carry_the_client_address() {
    let (upstream, mut received_rx) = recording_upstream().await;
    let gateway = start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."a.example.com" = {{ address = "{0}", proxy_protocol = 1 }}
        config.routes."b.example.com" = {{ address = "{0}", proxy_protocol = 2 }}
        "#,
        upstream.addr
    ))
    .await;
    let gateway_addr = gateway.local_addr("public").expect("listener");

    for (file, version) in [
        ("clienthello/openssl-tls13-sni.bin", 1),
        ("clienthello/openssl-alpn-h2-http11-sni.bin", 2),
    ] {
        let hello = testdata(file);
        let mut client = TcpStream::connect(gateway_addr).await.expect("connect");
        let client_addr = client.local_addr().expect("client address");
        client.write_all(&hello).await.expect("send");
        client.shutdown().await.expect("FIN");
        let received = next_report(&mut received_rx).await;

        let mut expected = if version == 1 {
            format!(
                "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
                client_addr.port(),
                gateway_addr.port()
            )
            .into_bytes()
        } else {
            let sni = b"b.example.com";
            let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            v2.extend_from_slice(&[0x21, 0x11, 0, (12 + 3 + sni.len()) as u8]);
            v2.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
            v2.extend_from_slice(&client_addr.port().to_be_bytes());
            v2.extend_from_slice(&gateway_addr.port().to_be_bytes());
            v2.extend_from_slice(&[0x02, 0, sni.len() as u8]);
            v2.extend_from_slice(sni);
            v2
        };
        expected.extend_from_slice(&hello);
        assert_eq!(received, expected, "PROXY v{version}");
    }
}

/// How long the gateway keeps a connection whose upstream never sends nor
/// closes, with `timeouts` (TOML lines) on the listener; `client_fin` half-
/// closes from the client side first.
async fn time_until_closed(timeouts: &str, client_fin: bool) -> Duration {
    let upstream = Upstream::tcp(|mut stream: TcpStream| async move {
        // Takes whatever comes, up to a FIN, then holds the connection silently.
        let _ = read_to_end(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gateway = start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]
        {timeouts}

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."a.example.com" = {{ address = "{}" }}
        "#,
        upstream.addr
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(&testdata("clienthello/openssl-tls13-sni.bin"))
        .await
        .expect("hello");
    if client_fin {
        client.shutdown().await.expect("FIN");
    }
    let started = std::time::Instant::now();
    let rest = read_to_end(&mut client).await.expect("orderly close");
    assert!(rest.is_empty());
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let waited = time_until_closed("idle_timeout = \"300ms\"", false).await;
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}, before the idle timeout"
    );
    assert!(
        waited < Duration::from_secs(5),
        "closed after {waited:?}, long after the idle timeout"
    );
}

/// After one side's FIN the other may not hold the connection for the whole
/// idle timeout: the half-close timeout bounds the linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_lingers_only_for_the_half_close_timeout() {
    let waited = time_until_closed("idle_timeout = \"10s\"\nhalf_close_timeout = \"300ms\"", true).await;
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}, before the half-close timeout"
    );
    assert!(
        waited < Duration::from_secs(5),
        "closed after {waited:?}: the idle timeout, not the half-close one"
    );
}
