//! Pebble, Let's Encrypt's ACME test server, for the ACME tests: its own
//! HTTPS certificate from a CA made on the spot, validating on the ports
//! the test gives, resolving names through pebble-challtestsrv (everything
//! is 127.0.0.1) or a DNS server of the test's; stopped when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{STEP, free_port, openssl};

/// Pebble and its DNS server, stopped when dropped.
pub struct Pebble {
    dir: tempfile::TempDir,
    /// The ACME directory URL.
    pub directory: String,
    management: SocketAddr,
    _processes: Vec<tokio::process::Child>,
}

impl Pebble {
    /// Starts Pebble so that it validates TLS-ALPN-01 on `tls_port`,
    /// resolving every name to 127.0.0.1 through pebble-challtestsrv.
    pub async fn start(tls_port: u16) -> Pebble {
        Pebble::start_with_dns(tls_port, None).await
    }

    /// Starts Pebble validating TLS-ALPN-01 on `tls_port` and resolving
    /// names (DNS-01's TXT records included) at `dns`, or through
    /// pebble-challtestsrv when `None`.
    pub async fn start_with_dns(tls_port: u16, dns: Option<SocketAddr>) -> Pebble {
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
        let (listen, management, http) = (free_port(), free_port(), free_port());
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
        let mut processes = Vec::new();
        let dns = match dns {
            Some(dns) => dns,
            None => {
                let (stub, stub_management) = (free_port(), free_port());
                processes.push(
                    tokio::process::Command::new("pebble-challtestsrv")
                        .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                        .args(["-dns01", &format!("127.0.0.1:{stub}")])
                        .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                        .args(["-management", &format!("127.0.0.1:{stub_management}")])
                        .stdout(log("challtestsrv.log"))
                        .stderr(log("challtestsrv.err"))
                        .kill_on_drop(true)
                        .spawn()
                        .expect("pebble-challtestsrv is installed (scripts/test.sh installs pebble)"),
                );
                SocketAddr::from(([127, 0, 0, 1], stub))
            }
        };
        let pebble = tokio::process::Command::new("pebble")
            .args(["-config", &path.join("pebble.json").display().to_string()])
            .args(["-dnsserver", &dns.to_string()])
            // Validate at once, and do not reject nonces at random.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .kill_on_drop(true)
            .spawn()
            .expect("pebble is installed (scripts/test.sh installs it)");
        processes.push(pebble);
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
            _processes: processes,
        }
    }

    /// The CA of Pebble's own HTTPS (for `directory_ca`).
    pub fn https_ca(&self) -> PathBuf {
        self.dir.path().join("https-ca.pem")
    }

    /// A config whose listener `public` terminates `route` with the ACME
    /// certificate `site` for `domains` (kept in the TOML values `cert` and
    /// `key`; `acme` is the rest of its `acme` table, from `, `), sending
    /// the clients to `upstream`; `extra` is appended.
    pub fn site_config(
        &self,
        route: &str,
        domains: &[&str],
        upstream: SocketAddr,
        (cert, key): (&str, &str),
        acme: &str,
        extra: &str,
    ) -> String {
        format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."{route}" = {{ address = "{upstream}", terminate = {{ certificate = "site" }} }}

            [certificates.site]
            cert = {cert}
            key = {key}
            acme = {{ directory = "{directory}", domains = {domains:?}, directory_ca = {ca}{acme} }}
            {extra}
            "#,
            directory = self.directory,
            ca = crate::toml_path(&self.https_ca()),
        )
    }

    /// How many orders Pebble has taken, from its log.
    pub fn orders(&self) -> usize {
        ["pebble.log", "pebble.err"]
            .iter()
            .map(|log| {
                std::fs::read_to_string(self.dir.path().join(log))
                    .unwrap_or_default()
                    .matches("Added order")
                    .count()
            })
            .sum()
    }

    /// A client config trusting only the root Pebble issues under.
    pub fn client_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root()).expect("root");
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// The root Pebble issues under (made when it starts), as DER.
    pub fn root(&self) -> rustls::pki_types::CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::from_pem_slice(&self.root_pem()).expect("a PEM root")
    }

    /// That root as a PEM file in Pebble's directory (for `openssl -CAfile`).
    pub fn root_file(&self) -> PathBuf {
        let path = self.dir.path().join("root.pem");
        std::fs::write(&path, self.root_pem()).expect("write");
        path
    }

    fn root_pem(&self) -> Vec<u8> {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--cacert", &self.https_ca().display().to_string()])
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }
}
