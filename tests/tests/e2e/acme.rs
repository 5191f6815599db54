//! ACME against a real CA: Pebble (Let's Encrypt's test server), resolving
//! every name to 127.0.0.1 through pebble-challtestsrv, validates weir's
//! order with TLS-ALPN-01 on weir's own listener; weir then serves the
//! issued certificate, and keeps it across a restart.

use std::net::SocketAddr;
use std::path::PathBuf;

use weir_tests::{
    STEP, Upstream, WeirProcess, answer, free_port, openssl, plain_route_config, tls_exchange, toml_path, write_config,
};

/// Pebble and its DNS server, stopped when dropped.
struct Pebble {
    dir: tempfile::TempDir,
    directory: String,
    management: SocketAddr,
    _processes: Vec<tokio::process::Child>,
}

impl Pebble {
    /// Starts Pebble so that it validates TLS-ALPN-01 on `tls_port`.
    async fn start(tls_port: u16) -> Pebble {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path();
        // Pebble's own HTTPS certificate, from a CA of the test's.
        openssl(
            path,
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout https-ca.key -out https-ca.pem \
             -subj /CN=pebble-https-ca -days 2 -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign",
        );
        openssl(
            path,
            "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout https.key -out https.csr -subj /CN=localhost",
        );
        std::fs::write(
            path.join("https.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write");
        openssl(
            path,
            "x509 -req -in https.csr -CA https-ca.pem -CAkey https-ca.key -set_serial 1 -days 2 -out https.pem \
             -extfile https.ext",
        );
        let (listen, management, dns, dns_management, http) =
            (free_port(), free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": path.join("https.pem"),
            "privateKey": path.join("https.key"),
            "httpPort": http,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(path.join("pebble.json"), config.to_string()).expect("write");
        let log = |name: &str| std::fs::File::create(path.join(name)).expect("log file");
        let challtestsrv = tokio::process::Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .kill_on_drop(true)
            .spawn()
            .expect("pebble-challtestsrv is installed (scripts/test.sh installs pebble)");
        let pebble = tokio::process::Command::new("pebble")
            .args(["-config", &path.join("pebble.json").display().to_string()])
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // Validate at once, and do not reject nonces at random.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .kill_on_drop(true)
            .spawn()
            .expect("pebble is installed (scripts/test.sh installs it)");
        let management = SocketAddr::from(([127, 0, 0, 1], management));
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", listen)).await.is_err()
            || tokio::net::TcpStream::connect(management).await.is_err()
        {
            assert!(started.elapsed() < STEP, "pebble did not start");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Pebble {
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management,
            dir,
            _processes: vec![challtestsrv, pebble],
        }
    }

    fn https_ca(&self) -> PathBuf {
        self.dir.path().join("https-ca.pem")
    }

    /// The root Pebble issues under (made when it starts), as DER.
    fn root(&self) -> rustls::pki_types::CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject as _;
        let out = std::process::Command::new("curl")
            .args(["-sS", "--cacert", &self.https_ca().display().to_string()])
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        rustls::pki_types::CertificateDer::from_pem_slice(&out.stdout).expect("a PEM root")
    }
}

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
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pebble.root()).expect("root");
    let client = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
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
