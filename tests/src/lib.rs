//! Helpers for weir's end-to-end tests: certificates minted on the spot,
//! real TLS and TCP peers on loopback, the built plugins and binary, and a
//! gateway started in-process on ephemeral ports.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weir::{Config, Gateway};

/// Upper bound for any single step of a test, so a broken build fails
/// instead of hanging CI.
pub const STEP: Duration = Duration::from_secs(30);

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The target directory cargo builds into.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

/// The plugins kept as their builds of an older contract
/// (`tests/contract-<version>/`, built from the sources of that contract
/// before the SDK moved on).
const KEPT_BUILDS: [(&str, &[&str]); 2] = [
    ("0.1.0", &["static-router", "attestation-allowlist", "misbehave"]),
    (
        "0.2.0",
        &["static-router", "attestation-allowlist", "misbehave", "egress"],
    ),
];

/// The kept `weir:plugin@<version>` build of a plugin, if there is one.
fn kept_build(version: &str, crate_name: &str) -> Option<PathBuf> {
    KEPT_BUILDS
        .iter()
        .any(|(v, crates)| *v == version && crates.contains(&crate_name))
        .then(|| {
            workspace()
                .join(format!("tests/contract-{version}"))
                .join(format!("{}.wasm", crate_name.replace('-', "_")))
        })
}

/// The `weir:plugin@0.1.0` build of a shipped plugin.
pub fn plugin_v0_1(crate_name: &str) -> PathBuf {
    kept_build("0.1.0", crate_name).unwrap_or_else(|| panic!("no 0.1.0 build of {crate_name}"))
}

/// The `weir:plugin@0.2.0` build of a shipped plugin.
pub fn plugin_v0_2(crate_name: &str) -> PathBuf {
    kept_build("0.2.0", crate_name).unwrap_or_else(|| panic!("no 0.2.0 build of {crate_name}"))
}

/// A plugin built for `wasm32-wasip2` by `scripts/build-plugins.sh`; with
/// `WEIR_TEST_CONTRACT=0.1.0` or `0.2.0`, the build of that contract for the
/// plugins kept as one, so the same tests prove weir still runs older
/// plugins unchanged.
pub fn plugin(crate_name: &str) -> PathBuf {
    if let Some(kept) = std::env::var("WEIR_TEST_CONTRACT")
        .ok()
        .and_then(|version| kept_build(&version, crate_name))
    {
        return kept;
    }
    plugin_current(crate_name)
}

/// A plugin's current build (`scripts/build-plugins.sh`), whatever
/// `WEIR_TEST_CONTRACT` says: for tests of what only the current contract
/// has.
pub fn plugin_current(crate_name: &str) -> PathBuf {
    let path = target_dir()
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first (scripts/build-plugins.sh)",
        path.display()
    );
    path
}

/// The `weir` binary of this build (`cargo build -p weir`, same profile).
pub fn weir_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/weir
    let path = exe.parent().and_then(Path::parent).expect("profile dir").join("weir");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p weir` first",
        path.display()
    );
    path
}

pub use weir_testdata::read as testdata;

pub mod browser;
pub mod dns;
pub mod etcd;
pub mod netns;
pub mod pebble;

/// Logs from the gateway go to the test's output (shown on failure).
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Starts a gateway in-process from TOML text. Listeners should bind port 0;
/// `{static_router}`, `{dstack_router}`, `{mesh_router}` and `{misbehave}` in the
/// text become the built plugins' paths.
pub async fn start_gateway(toml: &str) -> Gateway {
    init_logging();
    let text = expand(toml);
    let config = Config::parse(&text, &workspace().join("test.toml")).expect("test config is valid");
    Gateway::start(config).await.expect("gateway starts")
}

/// Starts a gateway in-process from a config written to `dir` (placeholders
/// expanded, as in [`start_gateway`]); [`Gateway::reload`] reads that file
/// again, so a test rewrites it with [`write_config`] and reloads.
pub async fn start_gateway_file(dir: &Path, toml: &str) -> (Gateway, PathBuf) {
    init_logging();
    let path = write_config(dir, toml);
    let config = Config::load(&path).expect("test config is valid");
    (Gateway::start(config).await.expect("gateway starts"), path)
}

/// Replaces the plugin placeholders in a config text.
pub fn expand(toml: &str) -> String {
    let mut text = toml.to_owned();
    for (placeholder, name) in [
        ("{static_router}", "static-router"),
        ("{dstack_router}", "dstack-router"),
        ("{mesh_router}", "mesh-router"),
        ("{attestation_allowlist}", "attestation-allowlist"),
        ("{canary}", "canary"),
        ("{alpn_router}", "alpn-router"),
        ("{alpn_router_py}", "alpn-router-py"),
        ("{alpn_router_js}", "alpn-router-js"),
        ("{maintenance}", "maintenance"),
        ("{rate_limit}", "rate-limit"),
        ("{least_loaded}", "least-loaded"),
        ("{egress}", "egress"),
        ("{misbehave}", "misbehave"),
    ] {
        if text.contains(placeholder) {
            text = text.replace(placeholder, &plugin(name).display().to_string());
        }
    }
    text
}

/// A CA and certificates it signs, minted for one test.
pub struct Pki {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
    /// The CA certificate, PEM.
    pub ca_pem: String,
}

/// A certificate chain and its key.
pub struct Identity {
    /// End-entity certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// The chain, PEM.
    pub chain_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl Pki {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> Pki {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed CA");
        let ca_der = cert.der().clone();
        let ca_pem = cert.pem();
        Pki {
            ca: rcgen::Issuer::new(params, key),
            ca_der,
            ca_pem,
        }
    }

    fn identity(&self, cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> Identity {
        Identity {
            chain: vec![cert.der().clone(), self.ca_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            chain_pem: format!("{}{}", cert.pem(), self.ca_pem),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for `names`, signed by this CA.
    pub fn server(&self, names: &[&str]) -> Identity {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.ca).expect("signed");
        self.identity(&cert, &key)
    }

    /// A server certificate for `names` with a 2048-bit RSA key (made by
    /// the openssl command: ring cannot generate RSA keys), signed by this
    /// CA. Its subject is `CN=<first name> (RSA)`.
    pub fn server_rsa(&self, names: &[&str]) -> Identity {
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        let pem = String::from_utf8(out.stdout).expect("PEM");
        let key = rcgen::KeyPair::from_pem(&pem).expect("an RSA key rcgen can sign with");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{} (RSA)", names[0]));
        let cert = params.signed_by(&key, &self.ca).expect("signed");
        self.identity(&cert, &key)
    }

    /// A client certificate (CN `name`, EKU clientAuth) signed by this CA.
    pub fn client(&self, name: &str) -> Identity {
        self.client_with_usage(name, vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// A certificate for `name` with exactly these extended key usages.
    pub fn client_with_usage(&self, name: &str, usages: Vec<rcgen::ExtendedKeyUsagePurpose>) -> Identity {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &self.ca).expect("signed");
        self.identity(&cert, &key)
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("CA is valid");
        roots
    }

    /// A client config that trusts only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config_for(rustls::DEFAULT_VERSIONS, None)
    }

    /// A client config that trusts only this CA and presents `identity`.
    pub fn client_config_with(&self, identity: &Identity) -> Arc<rustls::ClientConfig> {
        self.client_config_for(rustls::DEFAULT_VERSIONS, Some(identity))
    }

    /// A client config that trusts only this CA, offers only `versions`,
    /// and presents `identity` when given one.
    pub fn client_config_for(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        identity: Option<&Identity>,
    ) -> Arc<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(self.roots());
        Arc::new(match identity {
            Some(identity) => builder
                .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                .expect("client certificate"),
            None => builder.with_no_client_auth(),
        })
    }

    /// A server config presenting `identity` that requires a client
    /// certificate signed by this CA.
    pub fn server_config_requiring_clients(&self, identity: &Identity) -> Arc<rustls::ServerConfig> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()), provider())
            .build()
            .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain.clone(), identity.key.clone_key())
            .expect("server certificate");
        Arc::new(config)
    }

    /// Writes the CA certificate as `<name>.pem` in `dir`; returns its path.
    pub fn write_ca(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, &self.ca_pem).expect("write CA");
        path
    }
}

impl Identity {
    /// Writes the chain and key as `<name>.pem` and `<name>-key.pem` in `dir`;
    /// returns both paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, &self.chain_pem).expect("write chain");
        std::fs::write(&key, &self.key_pem).expect("write key");
        (cert, key)
    }

    /// SHA-256 of the end-entity certificate, as hex.
    pub fn fingerprint_hex(&self) -> String {
        weir_plugin_sdk::hex::encode(&weir_attest::x509::fingerprint(&self.chain[0]))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config presenting `identity`.
pub fn server_config(identity: &Identity) -> Arc<rustls::ServerConfig> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .expect("server certificate");
    Arc::new(config)
}

/// Connects with TLS to `addr`, asking for `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// An upstream server on loopback that runs `serve` for each connection and
/// counts the connections it accepted.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// A plain TCP upstream.
    pub async fn tcp<F, Fut>(serve: F) -> Upstream
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Upstream::tcp_at("127.0.0.1:0".parse().expect("address"), serve).await
    }

    /// A plain TCP upstream on a given address (to bring one back where it
    /// was).
    pub async fn tcp_at<F, Fut>(addr: SocketAddr, serve: F) -> Upstream
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        Upstream { addr, accepted, task }
    }

    /// A rustls TLS upstream presenting `identity`.
    pub async fn tls<F, Fut>(identity: &Identity, serve: F) -> Upstream
    where
        F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Sync + Clone + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Upstream::tls_with(server_config(identity), serve).await
    }

    /// A rustls TLS upstream with this server config.
    pub async fn tls_with<F, Fut>(config: Arc<rustls::ServerConfig>, serve: F) -> Upstream
    where
        F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Sync + Clone + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        Upstream::tcp(move |tcp| {
            let acceptor = acceptor.clone();
            let serve = serve.clone();
            async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            }
        })
        .await
    }

    /// How many connections it has accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream that reports each connection's bytes, up to the client's FIN,
/// on the returned channel.
pub async fn recording_upstream() -> (Upstream, mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let upstream = Upstream::tcp(move |mut stream: TcpStream| {
        let tx = tx.clone();
        async move {
            if let Ok(bytes) = read_to_end(&mut stream).await {
                let _ = tx.send(bytes);
            }
        }
    })
    .await;
    (upstream, rx)
}

/// The next report an upstream sent on `rx`, within [`STEP`].
pub async fn next_report(rx: &mut mpsc::UnboundedReceiver<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(STEP, rx.recv())
        .await
        .expect("the upstream reported in time")
        .expect("the upstream is still running")
}

/// Reads one line and answers `upstream heard: <line>` (an HTTP request gets
/// its request line answered as an HTTP/1.1 response body), then closes.
pub async fn answer<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    answer_with(stream, String::new()).await;
}

/// Like [`answer`], with `note` appended to the answer.
pub async fn answer_with<S: AsyncRead + AsyncWrite + Unpin>(stream: S, note: String) {
    use tokio::io::AsyncBufReadExt as _;
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = tokio::io::BufReader::new(read).lines();
    let Ok(Some(line)) = lines.next_line().await else {
        return;
    };
    let body = format!("upstream heard: {line}{note}\n");
    let reply = if line.starts_with("GET ") {
        while let Ok(Some(header)) = lines.next_line().await {
            if header.is_empty() {
                break;
            }
        }
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        body
    };
    let _ = write.write_all(reply.as_bytes()).await;
    let _ = write.flush().await;
    let _ = write.shutdown().await;
}

/// Connects with TLS, sends `line` and a newline, and reads to EOF.
pub async fn tls_exchange(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
    line: &str,
) -> std::io::Result<String> {
    let mut tls = tokio::time::timeout(STEP, tls_connect(addr, sni, config))
        .await
        .map_err(|_| std::io::Error::other("handshake did not finish in time"))??;
    tls.write_all(format!("{line}\n").as_bytes()).await?;
    tls.flush().await?;
    let bytes = read_to_end(&mut tls).await?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Echoes every byte back until EOF, then closes its write side.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    let (mut read, mut write) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut read, &mut write).await;
    let _ = write.shutdown().await;
}

/// `len` bytes of a pattern that a shifted or dropped byte cannot preserve.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Sends `body` on `stream` while reading its echo back (a large body
/// would stall if it were all written first), asserts that the echo is
/// `body`, byte for byte, within [`STEP`], and hands the stream back.
pub async fn echo_through(stream: TcpStream, body: Vec<u8>) -> TcpStream {
    let (mut read, mut write) = stream.into_split();
    let sent = body.clone();
    let writing = tokio::spawn(async move {
        write.write_all(&sent).await.expect("send");
        write
    });
    let mut back = vec![0u8; body.len()];
    tokio::time::timeout(STEP, read.read_exact(&mut back))
        .await
        .expect("the echo in time")
        .expect("the echo");
    assert!(back == body, "the echo differs from what was sent");
    read.reunite(writing.await.expect("writer")).expect("one stream")
}

/// Reads to EOF within [`STEP`].
pub async fn read_to_end<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(STEP, reader.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("read did not finish in time"))??;
    Ok(out)
}

/// `weir run` as a child process, with its log lines.
pub struct WeirProcess {
    /// The process; killed when dropped.
    pub child: tokio::process::Child,
    /// Log lines, read from stderr by a task as they come, so that a busy
    /// weir never blocks on a full pipe.
    lines: mpsc::UnboundedReceiver<String>,
    addrs: std::collections::BTreeMap<String, SocketAddr>,
}

impl WeirProcess {
    /// Starts `weir run --config <config>` and waits until every listener
    /// the config defines is listening.
    pub async fn spawn(config: &Path) -> WeirProcess {
        WeirProcess::spawn_under(config, &[]).await
    }

    /// Like [`WeirProcess::spawn`], run by `wrapper` (a command and its
    /// arguments that execs the rest, such as `prlimit --nofile=64:64`).
    pub async fn spawn_under(config: &Path, wrapper: &[&str]) -> WeirProcess {
        let listeners = Config::load(config).expect("the config is valid").listeners.len();
        WeirProcess::spawn_with(config, wrapper, listeners).await
    }

    /// Starts `weir run --config <node file>` for a fleet node and waits until
    /// its `listeners` listeners (those of the published config) listen.
    pub async fn spawn_node(node_file: &Path, listeners: usize) -> WeirProcess {
        WeirProcess::spawn_with(node_file, &[], listeners).await
    }

    /// Like [`WeirProcess::spawn_node`], run by `wrapper` (such as `ip
    /// netns exec NAME`).
    pub async fn spawn_under_node(node_file: &Path, wrapper: &[&str], listeners: usize) -> WeirProcess {
        WeirProcess::spawn_with(node_file, wrapper, listeners).await
    }

    async fn spawn_with(config: &Path, wrapper: &[&str], listeners: usize) -> WeirProcess {
        use tokio::io::AsyncBufReadExt as _;
        let weir = weir_binary();
        let mut command: Vec<&std::ffi::OsStr> = wrapper.iter().map(std::ffi::OsStr::new).collect();
        command.push(weir.as_os_str());
        let mut child = tokio::process::Command::new(command[0])
            .args(&command[1..])
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("WEIR_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("weir run starts");
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let (tx, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                // Once nobody listens any more, the lines are dropped, but
                // the pipe keeps being drained.
                let _ = tx.send(line);
            }
        });
        let mut addrs = std::collections::BTreeMap::new();
        let mut said = Vec::new();
        tokio::time::timeout(STEP, async {
            while addrs.len() < listeners {
                let Some(line) = lines.recv().await else {
                    panic!("weir exited early:\n{}", said.join("\n"));
                };
                said.push(line.clone());
                if line.contains("listening") && line.contains("listener=") {
                    let field = |name: &str| {
                        let at = line.find(&format!("{name}="))? + name.len() + 1;
                        line[at..]
                            .split_whitespace()
                            .next()
                            .map(|v| v.trim_matches('"').to_owned())
                    };
                    let name = field("listener").expect("listener name");
                    let addr = field("addr").expect("address").parse().expect("an address");
                    addrs.insert(name, addr);
                }
            }
        })
        .await
        .expect("weir listens in time");
        WeirProcess { child, lines, addrs }
    }

    /// Waits for a log line containing `needle` and returns it.
    pub async fn line_containing(&mut self, needle: &str) -> String {
        tokio::time::timeout(STEP, async {
            loop {
                let line = self.lines.recv().await.expect("weir exited early");
                if line.contains(needle) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("a log line containing {needle:?}"))
    }

    /// The log lines weir has written since they were last read, without
    /// waiting for more.
    pub fn lines_so_far(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.lines.try_recv().ok()).collect()
    }

    /// Where the admin API listens, from its start-up line.
    pub async fn admin_addr(&mut self) -> String {
        let line = self.line_containing("admin listening").await;
        line.split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the admin line names its address")
            .to_owned()
    }

    /// Where a listener is bound.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    /// The next per-connection log line.
    pub async fn connection_line(&mut self) -> String {
        tokio::time::timeout(STEP, async {
            loop {
                let line = self.lines.recv().await.expect("weir exited early");
                if line.contains("outcome=") {
                    return line;
                }
            }
        })
        .await
        .expect("a connection log line")
    }
}

/// Writes `toml` (with the plugin placeholders expanded) as `weir.toml` in
/// `dir`; returns its path.
pub fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("weir.toml");
    std::fs::write(&path, expand(toml)).expect("write config");
    path
}

/// A real PostgreSQL server on loopback, with TLS, in a temporary
/// directory; stopped when dropped. Run as the `postgres` user when the
/// tests run as root (PostgreSQL refuses to run as root).
pub struct Postgres {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// The directory holding `initdb` and `postgres`: `WEIR_PG_BINDIR`, or
    /// the newest `/usr/lib/postgresql/*/bin` (Debian's layout).
    fn bindir() -> PathBuf {
        if let Some(dir) = std::env::var_os("WEIR_PG_BINDIR") {
            return PathBuf::from(dir);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path().join("bin"))
            .filter(|bin| bin.join("initdb").exists())
            .collect();
        found.sort_by_key(|bin| {
            bin.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
        });
        found
            .pop()
            .expect("PostgreSQL is installed (.ci/run installs postgresql-15)")
    }

    /// The `postgres` user's id when the tests run as root (and must hand
    /// the cluster to it); `None` otherwise.
    fn run_as() -> Option<u32> {
        let id = |args: &[&str]| {
            std::process::Command::new("id")
                .args(args)
                .output()
                .ok()
                .and_then(|out| String::from_utf8(out.stdout).ok())
                .and_then(|id| id.trim().parse::<u32>().ok())
        };
        match id(&["-u"]) {
            Some(0) => Some(id(&["-u", "postgres"]).expect("a `postgres` user (the postgresql package creates it)")),
            _ => None,
        }
    }

    /// `program`, run as the `postgres` user when we are root.
    fn command(program: &Path, as_postgres: bool) -> std::process::Command {
        if as_postgres {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            std::process::Command::new(program)
        }
    }

    /// Initialises a cluster that trusts loopback clients, gives it
    /// `identity` as its TLS certificate, starts it and waits until it
    /// answers a query.
    pub fn start(identity: &Identity) -> Postgres {
        use std::os::unix::fs::PermissionsExt as _;
        let bindir = Postgres::bindir();
        let uid = Postgres::run_as();
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let hand_over = |path: &Path| {
            if let Some(uid) = uid {
                std::os::unix::fs::chown(path, Some(uid), None).expect("chown to postgres");
            }
        };
        hand_over(&data);
        let status = Postgres::command(&bindir.join("initdb"), uid.is_some())
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("initdb runs");
        assert!(status.success(), "initdb failed");
        let (cert, key) = identity.write(&data, "server");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        hand_over(&cert);
        hand_over(&key);
        let port = free_port();
        let child = Postgres::command(&bindir.join("postgres"), uid.is_some())
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "ssl=on", "-c", "fsync=off"])
            .args(["-c", "ssl_cert_file=server.pem", "-c", "ssl_key_file=server-key.pem"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("postgres starts");
        let server = Postgres { port, child, _dir: dir };
        let deadline = std::time::Instant::now() + STEP;
        loop {
            let direct = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable");
            if psql(&direct, "select 1").is_ok_and(|out| out == "1") {
                return server;
            }
            assert!(std::time::Instant::now() < deadline, "postgres did not come up in time");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Fast shutdown (SIGINT) of the postmaster ends the backends too. The
        // child may be `runuser`, which does not pass signals on: the
        // postmaster's own pid is the first line of `postmaster.pid`.
        let pid_file = self._dir.path().join("data/postmaster.pid");
        let postmaster = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next().map(str::to_owned));
        if let Some(pid) = &postmaster {
            let _ = std::process::Command::new("kill").args(["-INT", pid]).status();
        }
        for _ in 0..200 {
            if !pid_file.exists() && matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(pid) = &postmaster {
            let _ = std::process::Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one query with `psql` on a libpq connection string; returns its
/// unaligned, tuples-only output, or psql's error text.
pub fn psql(conninfo: &str, query: &str) -> Result<String, String> {
    let out = std::process::Command::new("psql")
        .args(["-X", "-tA", "-c", query, conninfo])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .map_err(|e| format!("psql: {e} (.ci/run installs postgresql-client-15)"))?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// [`psql`], run off the async runtime.
pub async fn psql_async(conninfo: String, query: &'static str) -> Result<String, String> {
    tokio::task::spawn_blocking(move || psql(&conninfo, query))
        .await
        .expect("psql task")
}

/// A simulated RA-TLS certificate, for tests and local development without
/// TDX hardware: self-signed, carrying a dstack attestation
/// (`1.3.6.1.4.1.62397.1.8`, SCALE `VersionedAttestation::V0`) built from the
/// real sample quote with `mrtd` written in and REPORTDATA set to bind this
/// certificate's key. The key binding holds, but the quote's signature no
/// longer covers its body, so weir reports the attestation **unverified**.
pub fn simulated_ratls(name: &str, mrtd: [u8; 48]) -> Identity {
    simulated_ratls_with(name, mrtd, |quote| {
        vec![(
            weir_attest::simulate::ATTESTATION_OID_ARCS,
            weir_attest::simulate::attestation_extension(quote),
        )]
    })
}

/// A simulated RA-TLS certificate as dstack's guest agent writes it for an
/// app: [`simulated_ratls`], with `app`'s runtime events measured into the
/// quote's RTMR3 and carried in the attestation, and the app-info extension
/// (`1.3.6.1.4.1.62397.1.9`) with `mr_system` and `mr_aggregated` computed
/// from the quote as dstack does.
pub fn simulated_dstack_ratls(name: &str, mrtd: [u8; 48], app: &weir_attest::simulate::App) -> Identity {
    use weir_attest::simulate;
    simulated_ratls_with(name, mrtd, |quote| {
        let (attestation, app_info) = app.extensions(quote).expect("a v4 quote");
        vec![
            (simulate::ATTESTATION_OID_ARCS, attestation),
            (simulate::APP_INFO_OID_ARCS, app_info),
        ]
    })
}

/// A self-signed certificate for `name` whose extensions `extensions`
/// writes from the sample quote, rebound to `mrtd` and to the new key: a
/// simulated RA-TLS certificate of any make, a lying one included.
pub fn simulated_ratls_with(
    name: &str,
    mrtd: [u8; 48],
    extensions: impl FnOnce(&mut [u8]) -> Vec<(&'static [u64], Vec<u8>)>,
) -> Identity {
    use rcgen::PublicKeyData as _;
    use weir_attest::simulate;
    let key = rcgen::KeyPair::generate().expect("key");
    let mut quote = testdata("attestation/tdx_quote_v4.bin");
    simulate::rebind(
        &mut quote,
        &mrtd,
        &simulate::key_binding(&key.subject_public_key_info()),
    );
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    for (oid, der) in extensions(&mut quote) {
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(oid, der));
    }
    let cert = params.self_signed(&key).expect("self-signed");
    Identity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        chain_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A path as a TOML string value.
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// A plaintext HTTP/2 server (prior knowledge, as behind a terminating
/// gateway) answering every request with its protocol version and path.
pub async fn h2c_upstream() -> Upstream {
    use http_body_util::Full;
    use hyper::body::Bytes;
    Upstream::tcp(|stream: TcpStream| async move {
        let service = hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
            let body = format!("{:?} {}\n", request.version(), request.uri().path());
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    })
    .await
}

/// The value of one series (`name{labels}` exactly as written in the
/// exposition) from weir's `/metrics`, if it is there.
pub async fn metric(admin: &str, series: &str) -> Option<f64> {
    let (_, text) = admin_request(admin, "GET", "/metrics", None, "").await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// One HTTP/1.1 request to weir's admin server, with an optional bearer
/// token and JSON body; returns the status code and the body.
pub async fn admin_request(admin: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.expect("admin connects");
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {admin}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut response))
        .await
        .expect("admin answers in time")
        .expect("response");
    let status = response.get(9..12).and_then(|s| s.parse().ok()).expect("status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs `openssl s_client` against `addr` asking for `sni` and verifying
/// with `ca` (a failed verification ends the handshake), with `args` added;
/// sends `line` and returns (stdout, stderr) once openssl has finished.
pub async fn openssl_s_client(addr: SocketAddr, sni: &str, ca: &Path, args: &[&str], line: &str) -> (String, String) {
    let mut child = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-servername", sni])
        .args(["-CAfile", &ca.display().to_string(), "-verify_return_error", "-ign_eof"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl is installed (.ci/run installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{line}\n").as_bytes())
        .await
        .expect("write to openssl");
    let output = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .expect("openssl finishes")
        .expect("output");
    drop(stdin);
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Sends `line` and reads it back within [`STEP`]: whether the connection
/// is being relayed to an echoing upstream.
pub async fn echoes(stream: &mut TcpStream, line: &[u8]) -> bool {
    if stream.write_all(line).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; line.len()];
    matches!(
        tokio::time::timeout(STEP, stream.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == line
}

/// Runs the `openssl` command in `dir` with `args` (split at spaces, so no
/// argument may hold one), expecting success.
pub fn openssl(dir: &Path, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(&args)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port free on 127.0.0.1 right now, for a server that must be told its
/// port before it starts (PostgreSQL, Pebble, a listener Pebble validates).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A config with one plain listener, `public`, whose static-router sends
/// every connection to `upstream`, followed by `extra` TOML.
pub fn plain_route_config(upstream: SocketAddr, extra: &str) -> String {
    plain_config(&format!("address = \"{upstream}\""), extra)
}

/// A config with one plain listener, `public`, whose static-router sends
/// every connection to the pool `pool` of `servers` (TOML strings, comma-separated),
/// followed by `extra` TOML (in the pool's section).
pub fn plain_pool_config(pool: &str, servers: &str, extra: &str) -> String {
    plain_config(
        &format!("pool = \"{pool}\""),
        &format!("[pools.{pool}]\nservers = [{servers}]\n{extra}"),
    )
}

/// One plain listener, `public`, whose static-router sends every
/// connection to `target` (`address = ...` or `pool = ...`), then `extra`.
fn plain_config(target: &str, extra: &str) -> String {
    format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["router"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.no_sni = {{ {target} }}

        {extra}
        "#
    )
}

/// Runs the `weir` binary with `args` to its end.
pub fn run_weir(args: &[&str]) -> std::process::Output {
    std::process::Command::new(weir_binary())
        .args(args)
        .output()
        .expect("weir runs")
}

/// Bytes a process printed, as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
