//! `weir-bench`: the TLS upstream and the load generator of weir's
//! side-by-side benchmarks (`bench/run.sh`). Every client connection is a
//! full TLS handshake (no resumption) with the upstream, through whichever
//! proxy is being measured, or directly; `rate --resume` resumes with the
//! tickets of earlier connections instead (a proxy that terminates issues
//! them; the upstream issues none).
//!
//! After the handshake the client sends a 9-byte request: an op byte and a
//! big-endian u64 length. `U`: the client uploads that many bytes and the
//! upstream answers one byte when all arrived. `E`: the upstream echoes that
//! many bytes. `I`: the connection stays idle until the client closes it.
//! (`idle` sends `E` for a few bytes and then nothing until it is told to
//! check that every connection still echoes.)

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The server name every benchmark connection asks for.
const SNI: &str = "bench.test";
/// Client sockets on loopback bind to 127.0.0.2 .. 127.0.0.(2 + SOURCES - 1), so that
/// tens of thousands of connections do not run out of ephemeral ports.
const SOURCES: u32 = 32;

#[derive(Parser)]
#[command(about = "Load generator and TLS upstream for weir's benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where clients connect and what they trust.
#[derive(clap::Args, Clone)]
struct Target {
    /// The proxy (or the upstream itself, for the direct baseline).
    #[arg(long)]
    target: SocketAddr,
    /// The upstream's CA certificate (written by `upstream`).
    #[arg(long)]
    ca: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the TLS upstream; writes `ca.pem` into `--dir` once listening,
    /// and its certificate chain and key (`bench.pem`, `bench-key.pem`, and
    /// both in `bench-combined.pem`) for proxies that terminate TLS.
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        dir: PathBuf,
        /// Also serves the same protocol without TLS here: the upstream of
        /// proxies that terminate.
        #[arg(long)]
        plain: Option<SocketAddr>,
    },
    /// Uploads `--bytes` in total, split over `--conns` connections; prints MB/s.
    Bulk {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        conns: u64,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
    },
    /// New connections (handshake, a short echo, close) from `--concurrency`
    /// workers for `--seconds`; prints connections/s and handshake latency.
    Rate {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Keeps the tickets the server sends and resumes with them (TLS 1.3
        /// PSK with a fresh X25519 exchange, as clients do); the report counts
        /// the connections that did resume (and, always, those on TLS 1.3).
        #[arg(long)]
        resume: bool,
    },
    /// Opens `--conns` idle connections, prints a line once they are all up,
    /// and holds them until standard input closes; then checks that every
    /// one still relays (a short echo on each) and prints a second line.
    Idle {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 10_000)]
        conns: u32,
    },
    /// The smallest passthrough relay on weir's runtime and socket setup:
    /// the floor beside weir (see `bare.rs`).
    Bare {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
    },
}

mod bare;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Bare { listen, upstream } = cli.command {
        return bare::run(listen, upstream);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Upstream { listen, dir, plain } => upstream(listen, dir, plain).await,
            Command::Bulk { target, conns, bytes } => bulk(&target, conns, bytes).await,
            Command::Rate {
                target,
                concurrency,
                seconds,
                resume,
            } => rate(&target, concurrency, seconds, resume).await,
            Command::Idle { target, conns } => idle(&target, conns).await,
            Command::Bare { .. } => unreachable!("served above, on its own runtime"),
        }
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

async fn upstream(listen: SocketAddr, dir: PathBuf, plain: Option<SocketAddr>) -> anyhow::Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "weir bench CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![SNI.to_owned()])?.signed_by(&key, &issuer)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    // Full handshakes every time, as the clients disable resumption too.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    if let Some(plain) = plain {
        let listener = TcpListener::bind(plain)
            .await
            .with_context(|| format!("listen on {plain}"))?;
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(serve(tcp));
            }
        });
    }
    std::fs::create_dir_all(&dir)?;
    let chain = format!("{}{}", cert.pem(), ca_cert.pem());
    std::fs::write(dir.join("bench.pem"), &chain)?;
    std::fs::write(dir.join("bench-key.pem"), key.serialize_pem())?;
    std::fs::write(dir.join("bench-combined.pem"), chain + &key.serialize_pem())?;
    // Written last: its presence says the upstream is ready.
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(tls) = acceptor.accept(tcp).await {
                let _ = serve(tls).await;
            }
        });
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut tls: S) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    tls.read_exact(&mut header).await?;
    let len = u64::from_be_bytes(header[1..].try_into().unwrap_or_default());
    let mut buf = vec![0u8; 64 * 1024];
    if matches!(header[0], b'U' | b'E') {
        let echo = header[0] == b'E';
        let mut left = len;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = tls.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if echo {
                tls.write_all(&buf[..n]).await?;
                tls.flush().await?;
            }
            left -= n as u64;
        }
        if !echo {
            tls.write_all(b"K").await?;
            tls.flush().await?;
        }
    }
    // Hold until the client closes.
    while tls.read(&mut buf).await? > 0 {}
    tls.shutdown().await
}

fn client_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    client_config_with(ca, rustls::client::Resumption::disabled())
}

fn client_config_with(ca: &Path, resumption: rustls::client::Resumption) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let cert = CertificateDer::from_pem_file(ca).with_context(|| format!("read {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = resumption;
    Ok(Arc::new(config))
}

/// Opens a TCP connection from one of the rotating loopback sources.
async fn tcp_connect(target: SocketAddr, n: u64) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    // Off loopback (the network-namespace benchmarks) the kernel picks the
    // route's own source address.
    if target.ip().is_loopback() {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (n % u64::from(SOURCES)) as u8);
        socket.bind(SocketAddr::new(source.into(), 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(target: SocketAddr, config: &Arc<rustls::ClientConfig>, n: u64) -> std::io::Result<Tls> {
    let tcp = tcp_connect(target, n).await?;
    let name = ServerName::try_from(SNI).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await
}

async fn request(tls: &mut Tls, op: u8, len: u64) -> std::io::Result<()> {
    let mut header = [op; 9];
    header[1..].copy_from_slice(&len.to_be_bytes());
    tls.write_all(&header).await
}

async fn bulk(target: &Target, conns: u64, total: u64) -> anyhow::Result<()> {
    let config = client_config(&target.ca)?;
    let per_conn = total / conns;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..conns {
        let config = Arc::clone(&config);
        let addr = target.target;
        tasks.push(tokio::spawn(async move {
            let mut tls = tls_connect(addr, &config, n).await?;
            request(&mut tls, b'U', per_conn).await?;
            let chunk = vec![0x5a; 256 * 1024];
            let mut left = per_conn;
            while left > 0 {
                let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                tls.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
            // rustls may still hold the last records: send them before waiting.
            tls.flush().await?;
            let mut ack = [0u8; 1];
            tls.read_exact(&mut ack).await?;
            tls.shutdown().await?;
            Ok::<_, std::io::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let bytes = per_conn * conns;
    let report = serde_json::json!({"bytes": bytes, "seconds": seconds, "mb_per_s": bytes as f64 / seconds / 1e6});
    println!("{report}");
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn rate(target: &Target, concurrency: usize, seconds: f64, resume: bool) -> anyhow::Result<()> {
    let shared = client_config(&target.ca)?;
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let tls13 = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        // Resuming, each worker keeps its own tickets, as one client does:
        // one shared store would hold 8 for the server name, fewer than 64
        // workers take at once, and measure the store instead of the server.
        let config = if resume {
            let store = rustls::client::ClientSessionMemoryCache::new(8);
            client_config_with(&target.ca, rustls::client::Resumption::store(Arc::new(store)))?
        } else {
            Arc::clone(&shared)
        };
        let (stop, counter, errors, resumed, tls13) = (
            Arc::clone(&stop),
            Arc::clone(&counter),
            Arc::clone(&errors),
            Arc::clone(&resumed),
            Arc::clone(&tls13),
        );
        let addr = target.target;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let begin = Instant::now();
                let result = async {
                    let mut tls = tls_connect(addr, &config, n).await?;
                    let handshake = begin.elapsed();
                    let session = tls.get_ref().1;
                    let was_resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                    let on_tls13 = session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
                    request(&mut tls, b'E', 32).await?;
                    tls.write_all(&[7u8; 32]).await?;
                    tls.flush().await?;
                    let mut echo = [0u8; 32];
                    tls.read_exact(&mut echo).await?;
                    tls.shutdown().await?;
                    Ok::<_, std::io::Error>((handshake, was_resumed, on_tls13))
                }
                .await;
                match result {
                    Ok((handshake, was_resumed, on_tls13)) => {
                        latencies.push(u32::try_from(handshake.as_micros()).unwrap_or(u32::MAX));
                        resumed.fetch_add(u64::from(was_resumed), Ordering::Relaxed);
                        tls13.fetch_add(u64::from(on_tls13), Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let report = serde_json::json!({
        "connections": latencies.len(),
        "per_second": latencies.len() as f64 / elapsed,
        "p50_us": percentile(&latencies, 0.50),
        "p99_us": percentile(&latencies, 0.99),
        "errors": errors.load(Ordering::Relaxed),
        "resumed": resumed.load(Ordering::Relaxed),
        "tls13": tls13.load(Ordering::Relaxed),
    });
    println!("{report}");
    Ok(())
}

/// The bytes each idle connection echoes when it is checked.
const IDLE_PROBE: &[u8; 16] = b"still relaying?\n";

async fn idle(target: &Target, conns: u32) -> anyhow::Result<()> {
    let config = client_config(&target.ca)?;
    let mut open = Vec::with_capacity(conns as usize);
    let mut errors = 0u32;
    // Open in batches, so the proxy is not measured at its accept backlog.
    for batch in (0..conns).collect::<Vec<_>>().chunks(256) {
        let mut tasks = Vec::new();
        for &n in batch {
            let config = Arc::clone(&config);
            let addr = target.target;
            tasks.push(tokio::spawn(async move {
                let mut tls = tls_connect(addr, &config, u64::from(n)).await?;
                request(&mut tls, b'E', IDLE_PROBE.len() as u64).await?;
                tls.flush().await?;
                Ok::<_, std::io::Error>(tls)
            }));
        }
        for task in tasks {
            match task.await? {
                Ok(tls) => open.push(tls),
                Err(_) => errors += 1,
            }
        }
    }
    println!("{}", serde_json::json!({"open": open.len(), "errors": errors}));
    // Hold until the orchestrator closes our stdin.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while stdin.read(&mut sink).await? > 0 {}
    // Every connection at once: all of them are relayed concurrently.
    let checks: Vec<_> = open
        .into_iter()
        .map(|mut tls| {
            tokio::spawn(async move {
                tls.write_all(IDLE_PROBE).await?;
                tls.flush().await?;
                let mut back = [0u8; IDLE_PROBE.len()];
                tokio::time::timeout(Duration::from_secs(60), tls.read_exact(&mut back))
                    .await
                    .map_err(std::io::Error::other)??;
                Ok::<_, std::io::Error>(&back == IDLE_PROBE)
            })
        })
        .collect();
    let mut alive = 0u32;
    for check in checks {
        if matches!(check.await?, Ok(true)) {
            alive += 1;
        }
    }
    println!("{}", serde_json::json!({"alive": alive}));
    Ok(())
}
