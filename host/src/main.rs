//! The `weir` command: run the gateway, check a config, or ask a listener's
//! plugin chain how it would route a connection.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use weir::plugin::Runtime;
use weir::{Config, Gateway, Snapshot};

mod fleet_cmd;

/// A TLS gateway whose routing decisions are made by WebAssembly plugins.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGINT or SIGTERM, then drain its connections.
    Run {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// Compile every plugin, neither reading nor writing the compiled-code cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Load the config and every plugin (calling each plugin's configure),
    /// then exit: 0 when all is well, 1 with the reason otherwise.
    Check {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// Compile every plugin, neither reading nor writing the compiled-code cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Print, as one JSON object, how a listener's plugin chain routes a
    /// connection with these properties. Opens no sockets.
    Route(RouteArgs),
    /// The compiled-code cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Plugin authoring.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Check a config as `weir check` does, then publish it and the files
    /// it names to the fleet's etcd; prints the new revision.
    Publish(fleet_cmd::PublishArgs),
    /// The fleet's nodes.
    Fleet {
        #[command(subcommand)]
        command: fleet_cmd::FleetCommand,
    },
}

/// What `weir route` asks.
#[derive(clap::Args)]
struct RouteArgs {
    /// The config file.
    #[arg(long)]
    config: PathBuf,
    /// The listener whose chain decides.
    #[arg(long)]
    listener: String,
    /// The server name the client sends (canonicalised as the gateway does).
    // A name that starts with `-` is still a value here; weir's own
    // check then says what is wrong with it.
    #[arg(long, allow_hyphen_values = true)]
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
    /// Explain in words, plugin by plugin, instead of printing JSON.
    #[arg(long)]
    explain: bool,
    /// Compile every plugin, neither reading nor writing the compiled-code cache.
    #[arg(long)]
    no_cache: bool,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Remove entries that are corrupt or not weir's, then the ones used
    /// longest ago until the cache fits `cache.max_size_mib`.
    Prune {
        /// The config file whose `[cache]` to prune.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Write a new plugin crate: Cargo.toml, src/lib.rs with a commented
    /// `route` and a native test, and a weir.toml to try it with.
    New {
        /// The plugin's name (lower case, digits, `-`).
        name: String,
        /// Where to create it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The weir guest SDK to depend on.
        #[arg(long, default_value_os_t = weir::scaffold::default_sdk())]
        sdk: PathBuf,
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
        Command::Run { config, no_cache } => run(config, no_cache),
        Command::Check { config, no_cache } => check(config, no_cache),
        Command::Route(args) => route(args),
        Command::Cache {
            command: CacheCommand::Prune { config },
        } => prune_cache(&config),
        Command::Plugin {
            command: PluginCommand::New { name, dir, sdk },
        } => new_plugin(&name, &dir, &sdk),
        Command::Publish(args) => {
            init_logging().and_then(|()| fleet_cmd::publish(args, |path| build_snapshot(path, false).map(drop)))
        }
        Command::Fleet {
            command: fleet_cmd::FleetCommand::Status(args),
        } => fleet_cmd::status(args),
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
                .fmt_fields(weir::logfmt::fields())
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .init();
        }
        Ok(other) => bail!("WEIR_LOG_FORMAT must be `text` or `json`, not `{other}`"),
    }
    Ok(())
}

/// The config at `path`, with its cache turned off for `--no-cache`.
fn load_config(path: &Path, no_cache: bool) -> anyhow::Result<Config> {
    let mut config = Config::load(path)?;
    if no_cache {
        config.cache.enabled = false;
    }
    Ok(config)
}

/// The snapshot a config builds, and the plugin runtime it runs on (whose
/// epoch ticker must outlive every plugin call: dropped, it stops, and a
/// call past its first tick would never be interrupted).
fn build_snapshot(path: &Path, no_cache: bool) -> anyhow::Result<(Snapshot, Runtime)> {
    let config = load_config(path, no_cache)?;
    // One thread calls the plugins here: one instance each proves the config.
    let runtime = Runtime::for_config(&config)?.with_warm_instances(1);
    let snapshot = Snapshot::build(config, &runtime)?;
    Ok((snapshot, runtime))
}

fn check(path: PathBuf, no_cache: bool) -> anyhow::Result<()> {
    // Warnings (a certificate about to expire, a stale OCSP response) go
    // to stderr as when running.
    init_logging()?;
    if weir::fleet::NodeFile::is_node_file(&path) {
        return fleet_cmd::check_node_file(&path);
    }
    let (snapshot, _runtime) = build_snapshot(&path, no_cache)?;
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

fn run(path: PathBuf, no_cache: bool) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    init_logging()?;
    let fleet = weir::fleet::NodeFile::is_node_file(&path);
    let config = if fleet {
        None
    } else {
        Some(load_config(&path, no_cache)?)
    };
    #[cfg(target_os = "linux")]
    match raise_descriptor_limit() {
        Some(limit) => tracing::info!(limit, "file descriptor limit (two per relayed connection)"),
        None => tracing::info!("file descriptor limit: unlimited"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(4)
        .build()?;
    runtime.block_on(async {
        let (gateway, node) = match config {
            Some(config) => (Arc::new(Gateway::start(config).await?), None),
            None => {
                let (gateway, node) = fleet_cmd::start_node(&path, no_cache).await?;
                (gateway, Some(node))
            }
        };
        let _following = node.as_ref().map(|node| node.attach(&gateway));
        // Everything that reloads (file watch, SIGHUP, the admin API) is in
        // place before the "listening" lines: whoever waits for them may
        // change a file or send SIGHUP at once.
        let snapshot = gateway.snapshot();
        let _watch = match snapshot.config.reload.watch {
            true => Some(
                gateway
                    .watch(snapshot.config.reload.debounce)
                    .map_err(anyhow::Error::msg)?,
            ),
            false => None,
        };
        let admin = match &snapshot.config.admin {
            Some(admin) => Some(
                weir::admin::serve(Arc::clone(&gateway), admin.bind, admin.token.clone())
                    .await
                    .with_context(|| format!("admin.bind: cannot listen on {}", admin.bind))?
                    .0,
            ),
            None => None,
        };
        drop(snapshot);
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        for (name, addr) in gateway.local_addrs() {
            tracing::info!(listener = name.as_str(), %addr, "listening");
        }
        if let Some(addr) = admin {
            tracing::info!(%addr, "admin listening");
        }
        // Orders and renews the certificates with `acme` (idle without any);
        // started once the listeners are announced, so its lines follow.
        let node_name = node
            .as_ref()
            .map_or_else(weir::fleet::host_name, |node| node.name().to_owned());
        let coordinator: Arc<dyn weir::acme::Coordinator> = match &node {
            Some(node) => Arc::clone(node) as _,
            None => Arc::new(weir::acme::Local),
        };
        let _acme = tokio::spawn(weir::acme::run(Arc::clone(&gateway), node_name, coordinator));
        let signal = loop {
            tokio::select! {
                _ = int.recv() => break "SIGINT",
                _ = term.recv() => break "SIGTERM",
                _ = hup.recv() => {
                    gateway.reload("SIGHUP").await;
                }
            }
        };
        drain(&gateway, signal, &mut int, &mut term).await;
        if let Some(node) = node {
            node.leave().await;
        }
        tracing::info!("shutting down");
        Ok(())
    })
}

/// Stops accepting and waits for the connections in progress to end, for
/// at most `shutdown.drain_timeout`; a second SIGTERM or SIGINT ends the
/// wait at once. Whatever is still open when this returns is closed.
async fn drain(
    gateway: &Gateway,
    signal: &str,
    int: &mut tokio::signal::unix::Signal,
    term: &mut tokio::signal::unix::Signal,
) {
    gateway.stop_accepting();
    let timeout = gateway.snapshot().config.shutdown.drain_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let open = gateway.active_connections();
    if open == 0 {
        tracing::info!(signal, "no connections in progress");
        return;
    }
    tracing::info!(
        signal,
        connections = open,
        drain_timeout = ?timeout,
        "draining: new connections are refused; waiting for those in progress (SIGTERM or SIGINT again stops now)"
    );
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = poll.tick() => {
                let open = gateway.active_connections();
                if open == 0 {
                    tracing::info!("drained: every connection has ended");
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(connections = open, "drain timeout: closing the connections still open");
                    return;
                }
            }
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
    }
    tracing::warn!(
        connections = gateway.active_connections(),
        "stopping now: closing the connections still open"
    );
}

/// Raises the soft limit on open files to the hard limit, as nginx's
/// `worker_rlimit_nofile` and Go's runtime do: a relayed connection holds
/// two descriptors, and the customary soft limit of 1024 would stop weir
/// near 500 connections. Best effort; returns the limit in force (`None`:
/// unlimited).
#[cfg(target_os = "linux")]
fn raise_descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum || limit.maximum.is_none() {
        limit.current = limit.maximum;
        // Refused when the hard limit is above what the kernel allows
        // (`fs.nr_open`); the soft limit then stays as it was.
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current
}

fn route(args: RouteArgs) -> anyhow::Result<()> {
    let RouteArgs {
        config: path,
        listener,
        sni,
        alpn,
        client_ip,
        protocol,
        explain,
        no_cache,
    } = args;
    // Warnings (a cache entry compiled again, a certificate about to expire)
    // go to stderr; the decision alone goes to stdout.
    init_logging()?;
    if weir::fleet::NodeFile::is_node_file(&path) {
        return fleet_cmd::check_node_file(&path);
    }
    let (snapshot, _runtime) = build_snapshot(&path, no_cache)?;
    let query = weir::dryrun::Query {
        listener,
        sni,
        alpn,
        client_ip,
        protocol: match protocol {
            ProtocolArg::Tls => weir::dryrun::Protocol::Tls,
            ProtocolArg::PostgresTls => weir::dryrun::Protocol::PostgresTls,
            ProtocolArg::Plain => weir::dryrun::Protocol::Plain,
        },
    };
    // A tokio runtime, as for a connection: plugin calls yield to it at each
    // epoch tick, and DNS lookups run on it.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let dry = runtime
        .block_on(weir::dryrun::run(&snapshot, &query))
        .map_err(anyhow::Error::msg)?;
    if explain {
        print!("{}", dry.explanation());
    } else {
        println!("{}", serde_json::to_string(&dry.report())?);
    }
    Ok(())
}

fn new_plugin(name: &str, dir: &Path, sdk: &Path) -> anyhow::Result<()> {
    let root = weir::scaffold::new_plugin(name, dir, sdk)?;
    println!("created {}", root.display());
    println!(
        "  build: (cd {} && cargo build --release --target wasm32-wasip2)",
        root.display()
    );
    println!("  test:  (cd {} && cargo test)", root.display());
    println!(
        "  try:   weir route --config {}/weir.toml --listener public --sni app.example.com --explain",
        root.display()
    );
    Ok(())
}

fn prune_cache(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let Some(dir) = config.cache_dir() else {
        println!("the compiled-code cache is off (cache.enabled = false, or no home directory)");
        return Ok(());
    };
    let runtime = Runtime::new()?.with_cache(&dir, config.cache.max_size_mib.saturating_mul(1024 * 1024))?;
    let removed = runtime.disk_cache().map_or(0, |cache| cache.prune());
    println!("{}: {removed} entries removed", dir.display());
    Ok(())
}
