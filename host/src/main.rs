//! The `weir` command: run the gateway, check a config, or ask a listener's
//! plugin chain how it would route a connection.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use weir::plugin::{Runtime, wit};
use weir::snapshot::Routing;
use weir::{Config, Gateway, Snapshot};
use weir_plugin_sdk::names;

/// A TLS gateway whose routing decisions are made by WebAssembly plugins.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGINT or SIGTERM.
    Run {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Load the config and every plugin (calling each plugin's configure),
    /// then exit: 0 when all is well, 1 with the reason otherwise.
    Check {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print, as one JSON object, how a listener's plugin chain routes a
    /// connection with these properties. Opens no sockets.
    Route {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// The listener whose chain decides.
        #[arg(long)]
        listener: String,
        /// The server name the client sends (canonicalised as the gateway does).
        #[arg(long)]
        sni: Option<String>,
        /// ALPN protocols the client offers, comma-separated.
        #[arg(long, value_delimiter = ',')]
        alpn: Vec<String>,
        /// The client's address (an IP, or ip:port).
        #[arg(long, default_value = "127.0.0.1")]
        client_ip: String,
        /// How the client started the connection.
        #[arg(long, value_enum, default_value_t = ProtocolArg::Tls)]
        protocol: ProtocolArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Tls,
    PostgresTls,
    Plain,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
        Command::Route {
            config,
            listener,
            sni,
            alpn,
            client_ip,
            protocol,
        } => route(config, &listener, sni, alpn, &client_ip, protocol),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match std::env::var("WEIR_LOG_FORMAT").as_deref() {
        // One JSON object per line, for log pipelines.
        Ok("json") => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        Ok("text") | Err(_) => {
            // Colour only for a person at a terminal; log files and journald get plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .init();
        }
        Ok(other) => bail!("WEIR_LOG_FORMAT must be `text` or `json`, not `{other}`"),
    }
    Ok(())
}

fn build_snapshot(path: &Path) -> anyhow::Result<Snapshot> {
    let config = Config::load(path)?;
    let runtime = Runtime::new()?;
    Ok(Snapshot::build(config, &runtime)?)
}

fn check(path: PathBuf) -> anyhow::Result<()> {
    let snapshot = build_snapshot(&path)?;
    let config = &snapshot.config;
    println!(
        "{}: ok ({} listeners, {} plugins, {} pools)",
        path.display(),
        config.listeners.len(),
        config.plugins.len(),
        config.pools.len()
    );
    Ok(())
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    init_logging()?;
    let config = Config::load(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let gateway = Arc::new(Gateway::start(config).await?);
        for (name, addr) in gateway.local_addrs() {
            tracing::info!(listener = name.as_str(), %addr, "listening");
        }
        let snapshot = gateway.snapshot();
        let _watch = match snapshot.config.reload.watch {
            true => Some(
                gateway
                    .watch(snapshot.config.reload.debounce)
                    .map_err(anyhow::Error::msg)?,
            ),
            false => None,
        };
        if let Some(admin) = &snapshot.config.admin {
            let (addr, _) = weir::admin::serve(Arc::clone(&gateway), admin.bind, admin.token.clone())
                .await
                .with_context(|| format!("admin.bind: cannot listen on {}", admin.bind))?;
            tracing::info!(%addr, "admin listening");
        }
        drop(snapshot);
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        loop {
            tokio::select! {
                result = tokio::signal::ctrl_c() => {
                    result.context("cannot watch SIGINT")?;
                    break;
                }
                _ = term.recv() => break,
                _ = hup.recv() => {
                    gateway.reload("SIGHUP").await;
                }
            }
        }
        tracing::info!("shutting down");
        Ok(())
    })
}

/// What `weir route` prints.
#[derive(Serialize)]
struct RouteReport<'a> {
    listener: &'a str,
    connection: ConnectionReport<'a>,
    #[serde(flatten)]
    routing: &'a Routing,
}

#[derive(Serialize)]
struct ConnectionReport<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    client_addr: &'a str,
    local_addr: &'a str,
    protocol: &'static str,
    sni: Option<&'a str>,
    alpn: &'a [String],
}

fn route(
    path: PathBuf,
    listener_name: &str,
    sni: Option<String>,
    alpn: Vec<String>,
    client_ip: &str,
    protocol: ProtocolArg,
) -> anyhow::Result<()> {
    let snapshot = build_snapshot(&path)?;
    let Some(listener) = snapshot.listener(listener_name) else {
        let known: Vec<&str> = snapshot.config.listeners.keys().map(String::as_str).collect();
        bail!(
            "no listener named `{listener_name}` (the config has: {})",
            known.join(", ")
        );
    };
    let sni = sni
        .map(|name| names::canonicalize(name.as_bytes()).with_context(|| format!("--sni {name:?}")))
        .transpose()?;
    let client_addr = match client_ip.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => SocketAddr::new(
            client_ip
                .parse::<IpAddr>()
                .with_context(|| format!("--client-ip {client_ip:?} is not an IP address"))?,
            0,
        ),
    };
    let (protocol, protocol_name) = match protocol {
        ProtocolArg::Tls => (wit::Protocol::Tls, "tls"),
        ProtocolArg::PostgresTls => (wit::Protocol::PostgresTls, "postgres-tls"),
        ProtocolArg::Plain => (wit::Protocol::Plain, "plain"),
    };
    let conn = wit::Connection {
        id: 0,
        listener: listener_name.to_owned(),
        tenant: None,
        client_addr: client_addr.to_string(),
        local_addr: listener.config.bind.to_string(),
        protocol,
        sni,
        alpn,
        tls_versions: if protocol == wit::Protocol::Plain {
            Vec::new()
        } else {
            vec![0x0304, 0x0303]
        },
    };
    let tenant = snapshot.tenant_for(conn.sni.as_deref()).cloned();
    let mut conn = conn;
    conn.tenant = tenant.as_ref().map(|t| t.name.to_string());
    let routing = snapshot.route(listener, tenant.as_deref(), &conn);
    let report = RouteReport {
        listener: listener_name,
        connection: ConnectionReport {
            tenant: conn.tenant.as_deref(),
            client_addr: &conn.client_addr,
            local_addr: &conn.local_addr,
            protocol: protocol_name,
            sni: conn.sni.as_deref(),
            alpn: &conn.alpn,
        },
        routing: &routing,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
