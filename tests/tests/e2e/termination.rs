//! TLS ended at the gateway: terminate then plain, terminate then
//! re-encrypt (CA, pinned fingerprint, client certificate upstream), client
//! certificates verified and admitted by the plugins, resumption bound to
//! the termination it was issued under, and the listener's TLS options —
//! reached by curl, openssl s_client and rustls clients.

use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use weir_tests::{
    Identity, Pki, Upstream, WeirProcess, answer, answer_with, read_to_end, tls_connect, tls_exchange, toml_path,
    write_config,
};

/// A `[certificates.<name>]` section for an identity written into `dir`.
fn certificate_section(dir: &Path, name: &str, identity: &Identity) -> String {
    let (cert, key) = identity.write(dir, name);
    format!(
        "[certificates.{name}]\ncert = {}\nkey = {}\n",
        toml_path(&cert),
        toml_path(&key)
    )
}

/// `openssl s_client -brief`, checking the host name too.
async fn s_client(addr: std::net::SocketAddr, sni: &str, ca: &Path, extra: &[&str], line: &str) -> (String, String) {
    let args = [&["-verify_hostname", sni, "-brief"], extra].concat();
    weir_tests::openssl_s_client(addr, sni, ca, &args, line).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_reach_a_plain_upstream_through_termination() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("weir site CA");
    let ca = pki.write_ca(dir.path(), "ca");
    let upstream = Upstream::tcp(answer).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."web.test" = {{ address = "{up}", terminate = {{ certificate = "site" }} }}
            config.routes."*.web.test" = {{ address = "{up}", terminate = {{}} }}

            {site}
            "#,
            up = upstream.addr,
            site = certificate_section(dir.path(), "site", &pki.server(&["web.test", "*.web.test"])),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");

    let curl = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert", &ca.display().to_string()])
        .args(["--resolve", &format!("web.test:{}:127.0.0.1", addr.port())])
        .arg(format!("https://web.test:{}/hello", addr.port()))
        .output()
        .await
        .expect("curl is installed (.ci/run installs it)");
    let body = String::from_utf8_lossy(&curl.stdout);
    assert_eq!(
        body,
        "upstream heard: GET /hello HTTP/1.1\n",
        "curl stderr: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let line = weir.connection_line().await;
    assert!(line.contains(r#"mode="terminate""#), "{line}");
    assert!(line.contains(r#"route="web.test""#), "{line}");

    // A name covered only by the wildcard SAN: the certificate is chosen by SNI.
    let (stdout, stderr) = s_client(addr, "a.web.test", &ca, &[], "hello through weir").await;
    assert_eq!(stdout, "upstream heard: hello through weir\n", "stderr: {stderr}");
    assert!(stderr.contains("Verification: OK"), "{stderr}");
    assert!(stderr.contains("CN = web.test"), "not weir's certificate: {stderr}");
    assert!(weir.connection_line().await.contains("route=\"*.web.test\""));
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencryption_verifies_the_upstream_and_presents_weirs_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let site_pki = Pki::new("weir site CA");
    let backend_pki = Pki::new("backend CA");
    let backend = backend_pki.server(&["backend.internal"]);
    let gateway_cert = backend_pki.client("weir-gateway");
    let expected = gateway_cert.chain[0].clone();
    let upstream = Upstream::tls_with(backend_pki.server_config_requiring_clients(&backend), move |tls| {
        let seen = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
        let note = match seen {
            Some(cert) if cert == expected => " (from weir-gateway)".to_owned(),
            other => format!(" (from someone else: {other:?})"),
        };
        answer_with(tls, note)
    })
    .await;
    let pinned_upstream = Upstream::tls(&backend, answer).await;
    let wrong_pin = "00".repeat(32);
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            [plugins.router.config.routes."web.test"]
            address = "{up}"
            terminate = {{ reencrypt = {{ ca = "backend", server_name = "backend.internal", client_cert = "gateway" }} }}
            [plugins.router.config.routes."pinned.web.test"]
            address = "{pinned}"
            terminate = {{ reencrypt = {{ ca = "pinned" }} }}
            [plugins.router.config.routes."wrongpin.web.test"]
            address = "{pinned}"
            terminate = {{ reencrypt = {{ ca = "wrong" }} }}
            [plugins.router.config.routes."unverified.web.test"]
            address = "{pinned}"
            terminate = {{ reencrypt = {{ ca = "site" }} }}

            [cas.backend]
            file = {backend_ca}
            [cas.site]
            file = {site_ca}
            [cas.pinned]
            pin_sha256 = ["{pin}"]
            [cas.wrong]
            pin_sha256 = ["{wrong_pin}"]

            {site}
            {gateway}
            "#,
            up = upstream.addr,
            pinned = pinned_upstream.addr,
            backend_ca = toml_path(&backend_pki.write_ca(dir.path(), "backend-ca")),
            site_ca = toml_path(&site_pki.write_ca(dir.path(), "site-ca")),
            pin = backend.fingerprint_hex(),
            site = certificate_section(dir.path(), "site", &site_pki.server(&["web.test", "*.web.test"])),
            gateway = certificate_section(dir.path(), "gateway", &gateway_cert),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let site_ca = dir.path().join("site-ca.pem");

    let (stdout, stderr) = s_client(addr, "web.test", &site_ca, &[], "ping").await;
    assert_eq!(stdout, "upstream heard: ping (from weir-gateway)\n", "stderr: {stderr}");
    assert!(
        stderr.contains("CN = web.test"),
        "the client must see weir's certificate: {stderr}"
    );
    let line = weir.connection_line().await;
    assert!(line.contains(r#"mode="reencrypt""#), "{line}");
    assert!(line.contains(&format!("upstream=\"{}\"", upstream.addr)), "{line}");

    let client = site_pki.client_config();
    let reply = tls_exchange(addr, "pinned.web.test", Arc::clone(&client), "pinned")
        .await
        .expect("the pinned upstream is reached");
    assert_eq!(reply, "upstream heard: pinned\n");
    weir.connection_line().await;

    for (sni, reason) in [
        ("wrongpin.web.test", "is not pinned"),
        ("unverified.web.test", "UnknownIssuer"),
    ] {
        let reply = tls_exchange(addr, sni, Arc::clone(&client), "hi").await;
        assert!(reply.as_deref().unwrap_or_default().is_empty(), "{sni}: {reply:?}");
        let line = weir.connection_line().await;
        assert!(
            line.contains("connect-failed") && line.contains(reason),
            "{sni}: {line}"
        );
    }
    assert_eq!(pinned_upstream.accepted(), 3, "one TCP connection per attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_verified_then_admitted_by_the_plugins() {
    let dir = tempfile::tempdir().expect("temp dir");
    let site_pki = Pki::new("weir site CA");
    let client_pki = Pki::new("client CA");
    let other_pki = Pki::new("some other CA");
    let upstream = Upstream::tcp(answer).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            [plugins.router.config.routes."mtls.test"]
            address = "{up}"
            terminate = {{ client_auth = "required", client_ca = "clients", clients = ["CN=alice"] }}

            [cas.clients]
            file = {clients}

            {site}
            "#,
            up = upstream.addr,
            clients = toml_path(&client_pki.write_ca(dir.path(), "clients")),
            site = certificate_section(dir.path(), "site", &site_pki.server(&["mtls.test"])),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");

    // Alice, signed by the client CA and listed: served, by openssl too.
    let alice = client_pki.client("alice");
    let reply = tls_exchange(addr, "mtls.test", site_pki.client_config_with(&alice), "hi").await;
    assert_eq!(reply.expect("alice is served"), "upstream heard: hi\n");
    let line = weir.connection_line().await;
    assert!(line.contains("outcome=closed"), "{line}");
    // The record's log target is what operators filter and ship on.
    assert!(line.contains(" weir::gateway: connection id="), "{line}");
    let (cert, key) = alice.write(dir.path(), "alice");
    let site_ca = site_pki.write_ca(dir.path(), "site-ca");
    let (stdout, stderr) = s_client(
        addr,
        "mtls.test",
        &site_ca,
        &["-cert", &cert.display().to_string(), "-key", &key.display().to_string()],
        "from openssl",
    )
    .await;
    assert_eq!(stdout, "upstream heard: from openssl\n", "stderr: {stderr}");
    weir.connection_line().await;
    assert_eq!(upstream.accepted(), 2);

    // A chain no real client sends: alice's certificate followed by
    // self-signed P-384 certificates named like her CA. Path building would
    // try every one (100-120 ms of CPU for 30-95 of them); it is refused
    // before any signature is checked.
    let padded = |junk: usize| {
        let mut identity = client_pki.client("alice");
        for _ in 0..junk {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.distinguished_name.push(rcgen::DnType::CommonName, "client CA");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            identity
                .chain
                .push(params.self_signed(&key).expect("self-signed").der().clone());
        }
        identity
    };

    // Refused: no certificate, another CA, the email-protection EKU only,
    // and a valid certificate the plugin does not admit; chains past the
    // bounds.
    let cases = [
        (
            site_pki.client_config_with(&padded(30)),
            "handshake-failed",
            "the client certificate came with 31 intermediates (at most 8)",
        ),
        (
            site_pki.client_config_with(&padded(2)),
            "handshake-failed",
            "more than two intermediates named `CN=client CA`",
        ),
        (site_pki.client_config(), "handshake-failed", "certificate"),
        (
            site_pki.client_config_with(&other_pki.client("alice")),
            "handshake-failed",
            "UnknownIssuer",
        ),
        (
            site_pki.client_config_with(
                &client_pki.client_with_usage("alice", vec![rcgen::ExtendedKeyUsagePurpose::EmailProtection]),
            ),
            "handshake-failed",
            "does not allow extended key usage for client authentication",
        ),
        (
            site_pki.client_config_with(&client_pki.client("bob")),
            "denied",
            r#"plugin `router` denied: client `CN=bob` is not listed for this route"#,
        ),
    ];
    for (client, outcome, reason) in cases {
        let reply = tls_exchange(addr, "mtls.test", client, "let me in").await;
        let line = weir.connection_line().await;
        assert!(
            line.contains(&format!("outcome={outcome}")) && line.replace('\\', "").contains(reason),
            "expected {outcome} / {reason}: {line}"
        );
        match reply {
            Err(e) if outcome == "denied" => assert!(e.to_string().contains("AccessDenied"), "{e}"),
            Err(_) => {}
            Ok(text) => assert!(text.is_empty(), "a refused client got {text:?}"),
        }
    }
    assert_eq!(upstream.accepted(), 2, "no refused client reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_does_not_carry_a_client_past_another_terminations_client_auth() {
    let dir = tempfile::tempdir().expect("temp dir");
    let site_pki = Pki::new("weir site CA");
    let client_pki = Pki::new("client CA");
    let open_upstream = Upstream::tcp(answer).await;
    let strict_upstream = Upstream::tcp(answer).await;
    let gateway = weir_tests::start_gateway(&format!(
        r#"
        [listeners.open]
        bind = "127.0.0.1:0"
        plugins = ["open"]
        [listeners.strict]
        bind = "127.0.0.1:0"
        plugins = ["strict"]

        [plugins.open]
        wasm = "{{static_router}}"
        config.routes."web.test" = {{ address = "{open}", terminate = {{}} }}
        [plugins.strict]
        wasm = "{{static_router}}"
        config.routes."web.test" = {{ address = "{strict}", terminate = {{ client_auth = "required", client_ca = "clients" }} }}

        [cas.clients]
        file = {clients}

        {site}
        "#,
        open = open_upstream.addr,
        strict = strict_upstream.addr,
        clients = toml_path(&client_pki.write_ca(dir.path(), "clients")),
        site = certificate_section(dir.path(), "site", &site_pki.server(&["web.test"])),
    ))
    .await;
    let open = gateway.local_addr("open").expect("open listener");
    let strict = gateway.local_addr("strict").expect("strict listener");

    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let client = site_pki.client_config_for(&[version], None);
        // The open termination issues a session and honours it.
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let mut tls = tls_connect(open, "web.test", Arc::clone(&client))
                .await
                .expect("handshake");
            tls.write_all(b"hi\n").await.expect("write");
            tls.flush().await.expect("flush");
            assert_eq!(read_to_end(&mut tls).await.expect("answer"), b"upstream heard: hi\n");
            kinds.push(tls.get_ref().1.handshake_kind());
        }
        assert_eq!(
            kinds,
            [Some(rustls::HandshakeKind::Full), Some(rustls::HandshakeKind::Resumed)],
            "{version:?}"
        );
        // The same session offered to the strict termination does not
        // resume: a full handshake demands a certificate this client lacks.
        let reply = tls_exchange(strict, "web.test", Arc::clone(&client), "sneak").await;
        assert!(
            reply.as_deref().unwrap_or_default().is_empty(),
            "{version:?}: {reply:?}"
        );
    }
    assert_eq!(strict_upstream.accepted(), 0);
    // A client with a certificate is served by the strict one.
    let reply = tls_exchange(
        strict,
        "web.test",
        site_pki.client_config_with(&client_pki.client("carol")),
        "hi",
    )
    .await;
    assert_eq!(reply.expect("carol is served"), "upstream heard: hi\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_tls_options_and_alpn_are_enforced() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("weir site CA");
    let upstream = Upstream::tcp(answer).await;
    let gateway = weir_tests::start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]
        tls = {{ min_version = "1.3", alpn = ["h2", "http/1.1"] }}

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."web.test" = {{ address = "{up}", terminate = {{}} }}
        config.routes."grpc.web.test" = {{ address = "{up}", terminate = {{ alpn = ["h2"] }} }}
        config.routes."nocert.test" = {{ address = "{up}", terminate = {{}} }}

        {site}
        "#,
        up = upstream.addr,
        site = certificate_section(dir.path(), "site", &pki.server(&["web.test", "*.web.test"])),
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    let with = |alpn: &[&str], versions: &[&'static rustls::SupportedProtocolVersion]| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).expect("CA");
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    };
    let tls13 = &[&rustls::version::TLS13][..];

    // The listener's ALPN list, in the client's terms.
    let tls = tls_connect(addr, "web.test", with(&["http/1.1"], tls13))
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // The decision's ALPN list replaces the listener's.
    let tls = tls_connect(addr, "grpc.web.test", with(&["h2", "http/1.1"], tls13))
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let refused = tls_connect(addr, "grpc.web.test", with(&["http/1.1"], tls13)).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("NoApplicationProtocol")),
        "{:?}",
        refused.map(|_| ())
    );
    // TLS 1.2 is below the listener's minimum.
    let old = tls_connect(addr, "web.test", with(&[], &[&rustls::version::TLS12])).await;
    assert!(
        old.as_ref().is_err_and(|e| e.to_string().contains("ProtocolVersion")),
        "{:?}",
        old.map(|_| ())
    );
    // No certificate covers the name: unrecognized_name, before any handshake.
    let nocert = tls_connect(addr, "nocert.test", with(&[], tls13)).await;
    assert!(
        nocert
            .as_ref()
            .is_err_and(|e| e.to_string().contains("UnrecognisedName")),
        "{:?}",
        nocert.map(|_| ())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ecdsa_and_an_rsa_certificate_serve_one_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("weir site CA");
    let ca = pki.write_ca(dir.path(), "ca");
    let upstream = Upstream::tcp(answer).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."web.test" = {{ address = "{up}", terminate = {{}} }}

            {ecdsa}
            {rsa}
            "#,
            up = upstream.addr,
            ecdsa = certificate_section(dir.path(), "a-ecdsa", &pki.server(&["web.test"])),
            rsa = certificate_section(dir.path(), "b-rsa", &pki.server_rsa(&["web.test"])),
        ),
    );
    let weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    // A client that can verify either gets the first certificate (ECDSA)...
    let (stdout, stderr) = s_client(addr, "web.test", &ca, &[], "any").await;
    assert_eq!(stdout, "upstream heard: any\n", "{stderr}");
    assert!(stderr.contains("Signature type: ECDSA"), "{stderr}");
    // ...one that accepts only RSA signatures gets the RSA one.
    let (stdout, stderr) = s_client(addr, "web.test", &ca, &["-sigalgs", "rsa_pss_rsae_sha256"], "rsa").await;
    assert_eq!(stdout, "upstream heard: rsa\n", "{stderr}");
    assert!(stderr.contains("CN = web.test (RSA)"), "{stderr}");
    assert!(stderr.contains("Signature type: RSA-PSS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_plugin_of_the_chain_must_admit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let site_pki = Pki::new("weir site CA");
    let backend_pki = Pki::new("backend CA");
    let client_pki = Pki::new("client CA");
    let upstream = Upstream::tls(&backend_pki.server(&["backend.internal"]), answer).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router", "gatekeeper", "trapper"]

            [plugins.router]
            wasm = "{{static_router}}"
            [plugins.router.config.routes."*.web.test"]
            address = "{up}"
            terminate = {{ client_auth = "optional", client_ca = "clients", reencrypt = {{ ca = "backend", server_name = "backend.internal" }} }}

            [plugins.gatekeeper]
            wasm = "{{misbehave}}"
            config = {{ mode = "deny-upstream", only_sni = "deny.web.test" }}

            [plugins.trapper]
            wasm = "{{misbehave}}"
            config = {{ mode = "trap-admit", only_sni = "trap.web.test" }}

            [cas.backend]
            file = {backend_ca}
            [cas.clients]
            file = {clients}

            {site}
            "#,
            up = upstream.addr,
            backend_ca = toml_path(&backend_pki.write_ca(dir.path(), "backend-ca")),
            clients = toml_path(&client_pki.write_ca(dir.path(), "clients")),
            site = certificate_section(dir.path(), "site", &site_pki.server(&["*.web.test"])),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let with_cert = site_pki.client_config_with(&client_pki.client("dave"));

    let reply = tls_exchange(addr, "ok.web.test", Arc::clone(&with_cert), "hi").await;
    assert_eq!(reply.expect("admitted by all"), "upstream heard: hi\n");
    assert!(weir.connection_line().await.contains("outcome=closed"));

    // One plugin's deny of the upstream ends the connection.
    let reply = tls_exchange(addr, "deny.web.test", Arc::clone(&with_cert), "hi").await;
    assert!(reply.as_deref().unwrap_or_default().is_empty(), "{reply:?}");
    let line = weir.connection_line().await.replace('\\', "");
    assert!(
        line.contains("denied")
            && line.contains("plugin `gatekeeper` denied: upstream `CN=backend.internal` is not trusted here"),
        "{line}"
    );

    // A plugin that traps in admit denies the client (on_error = deny)...
    let reply = tls_exchange(addr, "trap.web.test", Arc::clone(&with_cert), "hi").await;
    assert!(
        reply.as_ref().is_err_and(|e| e.to_string().contains("AccessDenied")),
        "{reply:?}"
    );
    let line = weir.connection_line().await;
    assert!(line.contains("denied") && line.contains("plugin `trapper`"), "{line}");
    // ...but a client without a certificate (optional) is never admitted by
    // anyone: no peer, no admit.
    let reply = tls_exchange(addr, "trap.web.test", site_pki.client_config(), "anonymous").await;
    assert_eq!(reply.expect("no certificate, no admit"), "upstream heard: anonymous\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_picks_the_cipher_suite_unless_the_client_puts_chacha_first() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("weir site CA");
    let ca = pki.write_ca(dir.path(), "ca");
    let upstream = Upstream::tcp(answer).await;
    let gateway = weir_tests::start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]

        [listeners.listed]
        bind = "127.0.0.1:0"
        plugins = ["router"]
        tls.cipher_suites = ["TLS13_CHACHA20_POLY1305_SHA256", "TLS13_AES_256_GCM_SHA384", "TLS13_AES_128_GCM_SHA256"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."web.test" = {{ address = "{up}", terminate = {{}} }}

        {site}
        "#,
        up = upstream.addr,
        site = certificate_section(dir.path(), "site", &pki.server(&["web.test"])),
    ))
    .await;
    let suite = |addr, extra: &'static [&'static str]| {
        let ca = ca.clone();
        async move {
            let (stdout, stderr) = s_client(addr, "web.test", &ca, extra, "hello").await;
            assert_eq!(stdout, "upstream heard: hello\n", "stderr: {stderr}");
            stderr
                .lines()
                .find_map(|l| l.strip_prefix("Ciphersuite: "))
                .unwrap_or_else(|| panic!("no Ciphersuite line: {stderr}"))
                .to_owned()
        }
    };
    let public = gateway.local_addr("public").expect("listener");
    // openssl's default order puts AES-256-GCM first: weir's order wins.
    assert_eq!(suite(public, &[]).await, "TLS_AES_128_GCM_SHA256");
    // A client that puts ChaCha20 first (no AES instructions) gets it.
    let chacha_first = &["-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"];
    assert_eq!(suite(public, chacha_first).await, "TLS_CHACHA20_POLY1305_SHA256");
    // What the client alone offers is what it gets.
    let only_256 = &["-ciphersuites", "TLS_AES_256_GCM_SHA384"];
    assert_eq!(suite(public, only_256).await, "TLS_AES_256_GCM_SHA384");
    // TLS 1.2: AES-128-GCM before the AES-256-GCM openssl lists first.
    let tls12 = &[
        "-tls1_2",
        "-cipher",
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
    ];
    assert_eq!(suite(public, tls12).await, "ECDHE-ECDSA-AES128-GCM-SHA256");
    // A listener's `cipher_suites` order is weir's order there.
    let listed = gateway.local_addr("listed").expect("listener");
    let aes_first = &["-ciphersuites", "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"];
    assert_eq!(suite(listed, aes_first).await, "TLS_AES_256_GCM_SHA384");
}
