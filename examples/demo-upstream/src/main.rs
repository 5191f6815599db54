//! Demo upstreams for the quickstart: TLS servers that each present their own
//! certificate (signed by a CA written to `--dir`) and answer any HTTP
//! request, or any line, with who they are. Because the certificate is the
//! upstream's, a client that verifies it against that CA proves weir passed
//! the connection through without terminating it.

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
    #[arg(long = "serve", required = true)]
    servers: Vec<String>,
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

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tasks = Vec::new();
    for server in servers {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![server.name.clone(), format!("*.{}", server.name)])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{} ({})", server.name, server.label));
        let cert = params.signed_by(&key, &issuer)?;
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
            "hello from {} ({}, {}): this TLS session ends here, at the upstream, not at weir\n",
            server.label, server.name, server.addr
        ));
        tasks.push(tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let greeting = Arc::clone(&greeting);
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    // Wait for a request (or a line), then answer as HTTP/1.1.
                    let mut buf = [0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                        greeting.len(),
                        greeting
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        }));
    }
    // Written last: its presence tells the quickstart script the servers are up.
    std::fs::write(&ca_path, ca_cert.pem())?;
    for task in tasks {
        task.await?;
    }
    Ok(())
}
