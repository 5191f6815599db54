//! PROXY protocol from load balancers in front of weir: trusted sources must
//! send a header, and its addresses become the connection's (what plugins
//! see and what weir sends on upstream); a header from anyone else is
//! refused. And to upstreams of terminated connections: the v2 header tells
//! them the negotiated ALPN, TLS version, cipher and client certificate.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir::Gateway;
use weir_tests::{STEP, Upstream, next_report, recording_upstream, start_gateway, testdata};

/// Routes `a.example.com` to `upstream` with a PROXY v1 header, trusting
/// PROXY headers from `trusted`.
async fn gateway(upstream: &Upstream, trusted: &str) -> Gateway {
    start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]
        accept_proxy_protocol_from = ["{trusted}"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."a.example.com" = {{ address = "{}", proxy_protocol = 1 }}
        "#,
        upstream.addr
    ))
    .await
}

/// A v2 PROXY header: TCP over IPv4 from 203.0.113.7:4242 to 198.51.100.1:443.
fn v2_header() -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&[203, 0, 113, 7, 198, 51, 100, 1]);
    header.extend_from_slice(&4242u16.to_be_bytes());
    header.extend_from_slice(&443u16.to_be_bytes());
    header
}

const V1_HEADER: &[u8] = b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n";

async fn expect_closed_unrouted(stream: &mut TcpStream, upstream: &Upstream, what: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
        Err(_) => panic!("{what}: still open"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: got {n} bytes instead of a close"),
    }
    assert_eq!(upstream.accepted(), 0, "{what}: reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_load_balancers_header_becomes_the_client_address() {
    let (upstream, mut reports) = recording_upstream().await;
    let gateway = gateway(&upstream, "127.0.0.0/8").await;
    let addr = gateway.local_addr("public").expect("listener");
    let hello = testdata("clienthello/openssl-tls13-sni.bin");
    for (version, header) in [("v1", V1_HEADER.to_vec()), ("v2", v2_header())] {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        // Header and hello in separate segments, as load balancers may send them.
        client.set_nodelay(true).expect("nodelay");
        client.write_all(&header).await.expect("header");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        client.write_all(&hello).await.expect("hello");
        client.shutdown().await.expect("FIN");
        // What weir sends on names the original client and destination, and
        // the header it received is not replayed.
        let mut expected = V1_HEADER.to_vec();
        expected.extend_from_slice(&hello);
        assert_eq!(next_report(&mut reports).await, expected, "PROXY {version} in");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_from_an_untrusted_source_is_refused() {
    let (upstream, _reports) = recording_upstream().await;
    let gateway = gateway(&upstream, "10.0.0.0/8").await;
    let addr = gateway.local_addr("public").expect("listener");
    for (version, header) in [("v1", V1_HEADER.to_vec()), ("v2", v2_header())] {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let mut sent = header;
        sent.extend_from_slice(&testdata("clienthello/openssl-tls13-sni.bin"));
        let _ = client.write_all(&sent).await;
        expect_closed_unrouted(&mut client, &upstream, version).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_source_without_a_header_is_refused() {
    let (upstream, _reports) = recording_upstream().await;
    let gateway = gateway(&upstream, "127.0.0.0/8").await;
    let addr = gateway.local_addr("public").expect("listener");
    for (what, bytes) in [
        ("a bare hello", testdata("clienthello/openssl-tls13-sni.bin")),
        ("a v1 header cut short", b"PROXY TCP4 203.0.113.7\r\n".to_vec()),
        ("a line too long", vec![b'P'; 200]),
    ] {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let _ = client.write_all(&bytes).await;
        expect_closed_unrouted(&mut client, &upstream, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_connection_tells_the_upstream_its_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let site_pki = weir_tests::Pki::new("site CA");
    let client_pki = weir_tests::Pki::new("client CA");
    let (upstream, mut received_rx) = recording_upstream().await;
    let (cert, key) = site_pki.server(&["web.test"]).write(dir.path(), "site");
    let (gateway, _) = weir_tests::start_gateway_file(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            [plugins.router.config.routes."web.test"]
            address = "{}"
            proxy_protocol = 2
            terminate = {{ certificate = "site", client_auth = "optional", client_ca = "clients", alpn = ["h2", "http/1.1"] }}

            [cas.clients]
            file = {}

            [certificates.site]
            cert = {}
            key = {}
            "#,
            upstream.addr,
            weir_tests::toml_path(&client_pki.write_ca(dir.path(), "clients")),
            weir_tests::toml_path(&cert),
            weir_tests::toml_path(&key),
        ),
    )
    .await;
    let addr = gateway.local_addr("public").expect("listener");

    // TLS 1.3 with alice's certificate and h2; then TLS 1.2, no certificate,
    // no ALPN.
    let alice = client_pki.client("alice");
    let mut with_cert = (*site_pki.client_config_with(&alice)).clone();
    with_cert.alpn_protocols = vec![b"h2".to_vec()];
    let tls12 = site_pki.client_config_for(&[&rustls::version::TLS12], None);
    for (config, alpn, version, cn) in [
        (
            std::sync::Arc::new(with_cert),
            Some(&b"h2"[..]),
            "TLSv1.3",
            Some("alice"),
        ),
        (tls12, None, "TLSv1.2", None),
    ] {
        let mut client = weir_tests::tls_connect(addr, "web.test", config)
            .await
            .expect("handshake");
        client.write_all(b"hello").await.expect("send");
        client.shutdown().await.expect("close");
        let received = next_report(&mut received_rx).await;
        let header = ppp::v2::Header::try_from(&received[..]).expect("a PROXY v2 header");
        assert_eq!(&received[header.len()..], b"hello");
        let tlvs: Vec<ppp::v2::TypeLengthValue> = header.tlvs().map(|t| t.expect("a TLV")).collect();
        let tlv = |kind: u8| tlvs.iter().find(|t| t.kind == kind).map(|t| t.value.to_vec());
        assert_eq!(tlv(0x01).as_deref(), alpn, "ALPN");
        assert_eq!(tlv(0x02).as_deref(), Some(&b"web.test"[..]), "authority");
        let ssl = tlv(0x20).expect("the SSL TLV");
        let flags = if cn.is_some() { 0x07 } else { 0x01 };
        assert_eq!(ssl[..5], [flags, 0, 0, 0, 0], "client flags and verify");
        // Sub-TLVs: version, common name, cipher.
        let mut subs = Vec::new();
        let mut rest = &ssl[5..];
        while rest.len() >= 3 {
            let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
            subs.push((rest[0], String::from_utf8(rest[3..3 + len].to_vec()).expect("text")));
            rest = &rest[3 + len..];
        }
        assert!(rest.is_empty(), "{ssl:?}");
        let sub = |kind: u8| subs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.as_str());
        assert_eq!(sub(0x21), Some(version));
        assert_eq!(sub(0x22), cn);
        let cipher = sub(0x23).expect("the cipher");
        assert!(cipher.starts_with("TLS_") && !cipher.starts_with("TLS13_"), "{cipher}");
    }
}
