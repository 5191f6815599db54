//! Demo upstreams for the quickstart: TLS servers that each present their own
//! certificate (signed by a CA written to `--dir`), and plaintext servers, all
//! answering any HTTP request, or any line, with who they are. Because a TLS
//! server's certificate is its own, a client that verifies it against that CA
//! proves weir passed the connection through without terminating it. The same
//! CA signs the certificates weir itself presents where it terminates
//! (`--certificate`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// TLS demo servers for the weir quickstart.
#[derive(Parser)]
struct Args {
    /// Where to write `ca.pem`, the CA that signed every server's certificate.
    #[arg(long)]
    dir: PathBuf,
    /// A server as LABEL:NAME=ADDR, e.g. `app-1:app.localhost=127.0.0.1:9101`.
    /// Its certificate covers NAME and *.NAME.
    #[arg(long = "serve")]
    servers: Vec<String>,
    /// A plaintext server as LABEL=ADDR, e.g. `web=127.0.0.1:9104`.
    #[arg(long = "plain")]
    plain: Vec<String>,
    /// A certificate for weir to present, as FILE=NAME[,NAME...]: writes
    /// `FILE.pem` (chain) and `FILE-key.pem` to `--dir`, covering exactly
    /// those names.
    #[arg(long = "certificate")]
    certificates: Vec<String>,
    /// A simulated RA-TLS certificate (self-signed, its dstack attestation
    /// binding its key to a synthetic TDX quote with this MRTD, reported
    /// unverified), as FILE=NAME,MRTD (MRTD: 96 hex digits): writes
    /// `FILE.pem` and `FILE-key.pem` to `--dir`. For trying attested paths
    /// without TDX hardware, with `require_verified = false`.
    #[arg(long = "ratls")]
    ratls: Vec<String>,
}

/// A simulated RA-TLS certificate for `name`, attesting `mrtd`.
fn simulated_ratls(name: &str, mrtd: &[u8; 48]) -> anyhow::Result<(rcgen::Certificate, rcgen::KeyPair)> {
    use rcgen::PublicKeyData as _;
    use weir_attest::simulate;
    let key = rcgen::KeyPair::generate()?;
    let quote = simulate::synthetic_quote(mrtd, &simulate::key_binding(&key.subject_public_key_info()));
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.custom_extensions.push(rcgen::CustomExtension::from_oid_content(
        simulate::ATTESTATION_OID_ARCS,
        simulate::attestation_extension(&quote),
    ));
    Ok((params.self_signed(&key)?, key))
}

struct Server {
    label: String,
    name: String,
    addr: SocketAddr,
}

fn parse_server(spec: &str) -> anyhow::Result<Server> {
    let (label, rest) = spec.split_once(':').context("expected LABEL:NAME=ADDR")?;
    let (name, addr) = rest.split_once('=').context("expected LABEL:NAME=ADDR")?;
    let addr = addr.parse().with_context(|| format!("`{addr}` is not ip:port"))?;
    if label.is_empty() || name.is_empty() {
        bail!("`{spec}`: empty label or name");
    }
    Ok(Server {
        label: label.to_owned(),
        name: name.to_owned(),
        addr,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let servers: Vec<Server> = args
        .servers
        .iter()
        .map(|s| parse_server(s))
        .collect::<anyhow::Result<_>>()?;

    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "weir quickstart demo CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    std::fs::create_dir_all(&args.dir)?;
    let ca_path = args.dir.join("ca.pem");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    // A certificate for `names`, with this common name.
    let mint = |names: Vec<String>, common_name: String| -> anyhow::Result<(rcgen::Certificate, rcgen::KeyPair)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        Ok((params.signed_by(&key, &issuer)?, key))
    };
    for spec in &args.certificates {
        let (file, names) = spec.split_once('=').context("expected FILE=NAME[,NAME...]")?;
        let names: Vec<String> = names.split(',').map(str::to_owned).collect();
        let (cert, key) = mint(names, format!("{file} (weir)"))?;
        std::fs::write(args.dir.join(format!("{file}.pem")), cert.pem() + &ca_cert.pem())?;
        std::fs::write(args.dir.join(format!("{file}-key.pem")), key.serialize_pem())?;
    }

    for spec in &args.ratls {
        let parsed = spec
            .split_once('=')
            .and_then(|(file, rest)| rest.split_once(',').map(|(name, mrtd)| (file, name, mrtd)));
        let (file, name, mrtd) = parsed.context("expected FILE=NAME,MRTD")?;
        let mrtd: [u8; 48] = weir_plugin_sdk::hex::decode(mrtd)
            .ok()
            .and_then(|m| m.try_into().ok())
            .with_context(|| format!("`{mrtd}` is not an MRTD (96 hex digits)"))?;
        let (cert, key) = simulated_ratls(name, &mrtd)?;
        std::fs::write(args.dir.join(format!("{file}.pem")), cert.pem())?;
        std::fs::write(args.dir.join(format!("{file}-key.pem")), key.serialize_pem())?;
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tasks = Vec::new();
    for spec in &args.plain {
        let (label, addr) = spec.split_once('=').context("expected LABEL=ADDR")?;
        let addr: SocketAddr = addr.parse().with_context(|| format!("`{addr}` is not ip:port"))?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for {label}"))?;
        println!("demo upstream {label} (plaintext) on {addr}");
        let greeting = Arc::new(format!(
            "hello from {label} ({addr}), in plaintext: weir ended the client's TLS session\n"
        ));
        tasks.push(tokio::spawn(serve(listener, None, greeting)));
    }
    for server in servers {
        let names = vec![server.name.clone(), format!("*.{}", server.name)];
        let (cert, key) = mint(names, format!("{} ({})", server.name, server.label))?;
        let tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), ca_cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(server.addr)
            .await
            .with_context(|| format!("cannot listen on {} for {}", server.addr, server.label))?;
        println!("demo upstream {} ({}) on {}", server.label, server.name, server.addr);
        let greeting = Arc::new(format!(
            "hello from {} ({}, {}): this TLS session ends here, at the upstream, with its own certificate\n",
            server.label, server.name, server.addr
        ));
        tasks.push(tokio::spawn(serve(listener, Some(acceptor), greeting)));
    }
    if tasks.is_empty() {
        bail!("nothing to serve: give --serve or --plain");
    }
    // Written last: its presence tells the quickstart script the servers are up.
    std::fs::write(&ca_path, ca_cert.pem())?;
    for task in tasks {
        task.await?;
    }
    Ok(())
}

/// Accepts connections (with TLS when `acceptor` is given) and answers each
/// request, or line, with `greeting` as an HTTP/1.1 response.
async fn serve(listener: TcpListener, acceptor: Option<tokio_rustls::TlsAcceptor>, greeting: Arc<String>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        let greeting = Arc::clone(&greeting);
        tokio::spawn(async move {
            match acceptor {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        answer(tls, &greeting).await;
                    }
                }
                None => answer(tcp, &greeting).await,
            }
        });
    }
}

async fn answer<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut stream: S, greeting: &str) {
    // Wait for a request (or a line), then answer as HTTP/1.1.
    let mut buf = [0u8; 4096];
    let _ = stream.read(&mut buf).await;
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        greeting.len(),
        greeting
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
