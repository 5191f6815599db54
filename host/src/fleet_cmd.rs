//! The fleet's commands: `weir run` on a node's file, `weir publish` and
//! `weir fleet status`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use weir::Gateway;
use weir::fleet::{FleetSettings, Node, NodeFile};

/// Where the fleet's etcd is.
#[derive(clap::Args)]
pub struct EtcdArgs {
    /// A file with a `[fleet]` section (a node's file): endpoints, prefix,
    /// credentials and TLS.
    #[arg(long, conflicts_with = "etcd")]
    fleet: Option<PathBuf>,
    /// etcd endpoints, comma-separated (instead of `--fleet`).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// The fleet's key prefix (with `--etcd`).
    #[arg(long, default_value = "/weir/")]
    prefix: String,
}

impl EtcdArgs {
    fn settings(&self) -> anyhow::Result<FleetSettings> {
        if let Some(file) = &self.fleet {
            return Ok(NodeFile::load(file)?.fleet);
        }
        if self.etcd.is_empty() {
            bail!("say where the fleet is: --fleet FILE (a node's file) or --etcd URL");
        }
        let settings = FleetSettings::from_endpoints(self.etcd.clone(), self.prefix.clone());
        settings.check(Path::new("--etcd"))?;
        Ok(settings)
    }
}

/// What `weir publish` takes.
#[derive(clap::Args)]
pub struct PublishArgs {
    /// The config file to publish.
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Wait until every live node serves the new revision; exit 1 naming
    /// the nodes that refused it (and why) or did not get to it in time.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// `weir fleet` subcommands.
#[derive(clap::Subcommand)]
pub enum FleetCommand {
    /// Every live node: the revision it serves, and its last error.
    Status(StatusArgs),
}

/// What `weir fleet status` takes.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Print the nodes' reports as one JSON object.
    #[arg(long)]
    json: bool,
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Starts a node: its fleet's revision read (or the one on disk) and the
/// gateway started on it.
pub async fn start_node(path: &Path, no_cache: bool) -> anyhow::Result<(Arc<Gateway>, Arc<Node>)> {
    let file = NodeFile::load(path)?;
    let (node, mut config) = Node::start(file).await?;
    if no_cache {
        config.cache.enabled = false;
    }
    let gateway = Arc::new(Gateway::start_with_source(config, node.source()).await?);
    tracing::info!(
        node = node.name(),
        revision = node.report().revision,
        "fleet node started"
    );
    Ok((gateway, node))
}

/// `weir publish`: `check` proves the config first (plugins compiled and
/// configured), as `weir check` does.
pub fn publish(args: PublishArgs, check: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    check(&args.config)?;
    let settings = args.etcd.settings()?;
    let keys = settings.keys();
    current_thread()?.block_on(async {
        let mut client = weir::fleet::connect(&settings).await?;
        let outcome = weir::fleet::publish::publish(&mut client, &keys, &args.config).await?;
        for (field, sha256, bytes) in &outcome.uploaded {
            println!("uploaded {field}: {bytes} bytes, sha256 {sha256}");
        }
        println!(
            "published {} as revision {} under {} ({} files already there)",
            args.config.display(),
            outcome.revision,
            keys.prefix(),
            outcome.reused
        );
        if !args.wait {
            return Ok(());
        }
        let progress =
            weir::fleet::publish::wait(&mut client, &keys, outcome.revision, Duration::from_secs(args.timeout)).await?;
        for node in &progress.applied {
            println!("{node}: applied");
        }
        for (node, error) in &progress.failed {
            println!("{node}: refused: {error}");
        }
        for node in &progress.pending {
            println!("{node}: not applied after {} s", args.timeout);
        }
        if progress.applied.is_empty() && progress.failed.is_empty() && progress.pending.is_empty() {
            bail!("no node is live under {}", keys.prefix());
        }
        if !progress.failed.is_empty() || !progress.pending.is_empty() {
            bail!(
                "revision {} is not served by {} of {} nodes",
                outcome.revision,
                progress.failed.len() + progress.pending.len(),
                progress.applied.len() + progress.failed.len() + progress.pending.len()
            );
        }
        Ok(())
    })
}

/// `weir fleet status`.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let settings = args.etcd.settings()?;
    let keys = settings.keys();
    current_thread()?.block_on(async {
        let mut client = weir::fleet::connect(&settings).await?;
        let nodes = weir::fleet::node::list_nodes(&mut client, &keys).await?;
        if args.json {
            println!("{}", serde_json::json!({ "prefix": keys.prefix(), "nodes": nodes }));
            return Ok(());
        }
        if nodes.is_empty() {
            println!("no node is live under {}", keys.prefix());
        }
        for report in nodes.values() {
            let state = match (&report.error, report.failed_revision) {
                (Some(error), Some(failed)) => format!("revision {failed} refused: {error}"),
                _ => "ok".into(),
            };
            println!(
                "{}  revision {}  serving from {}  admin {}  {}",
                report.node,
                report.revision,
                report.serving,
                report.admin.as_deref().unwrap_or("-"),
                state
            );
        }
        Ok(())
    })
}
