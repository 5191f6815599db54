//! The fleet's commands: `weir run` on a node's file, `weir publish` and
//! `weir fleet status`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use weir::Gateway;
use weir::fleet::{FleetError, FleetSettings, Node, NodeFile};

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
    /// Publish `--config` as this tenant's own policy (its chain, plugins
    /// and pools) instead of the fleet's config.
    #[arg(long)]
    tenant: Option<String>,
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

/// `error`, with the endpoints named when it is etcd that failed.
fn at_endpoints(settings: &FleetSettings, error: anyhow::Error) -> anyhow::Error {
    match error.downcast::<weir::fleet::FleetError>() {
        Ok(weir::fleet::FleetError::Etcd(reason)) => {
            anyhow::anyhow!("etcd at {}: {reason}", settings.endpoints.join(", "))
        }
        Ok(other) => other.into(),
        Err(error) => error,
    }
}

/// Runs `operation` on a client to the members that answer, again on a
/// new client (up to 4 times in about 4 s) while etcd does not answer it
/// (a leader election, a member going away); returns the client and what
/// the operation gave.
async fn retrying<T>(
    settings: &FleetSettings,
    mut operation: impl AsyncFnMut(&mut etcd_client::Client) -> Result<T, FleetError>,
) -> Result<(etcd_client::Client, T), FleetError> {
    let mut delay = Duration::from_millis(250);
    for attempt in 1.. {
        let mut client = weir::fleet::connect(settings).await?;
        match operation(&mut client).await {
            Ok(value) => return Ok((client, value)),
            Err(error) if attempt < 4 && error.is_transient() => {
                tracing::debug!(%error, attempt, "etcd did not answer; again");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(error) => return Err(error),
        }
    }
    unreachable!("the loop returns")
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Starts a node: its fleet's revision read (or the one on disk) and the
/// gateway started on it.
pub async fn start_node(path: &Path, no_cache: bool) -> anyhow::Result<(Arc<Gateway>, Arc<Node>)> {
    let file = NodeFile::load(path)?;
    let settings = file.fleet.clone();
    let (node, mut config) = Node::start(file).await.map_err(|e| at_endpoints(&settings, e.into()))?;
    if no_cache {
        config.cache.enabled = false;
    }
    let gateway = match Gateway::start_with_source(config, node.source()).await {
        Ok(gateway) => gateway,
        // A tenant's new policy must not keep the node from starting.
        Err(error) => match node.start_without_new_policies(&error.to_string()).await {
            Some(mut config) => {
                config.cache.enabled &= !no_cache;
                Gateway::start_with_source(config, node.source()).await?
            }
            None => return Err(error.into()),
        },
    };
    let gateway = Arc::new(gateway);
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
    match &args.tenant {
        None => check(&args.config)?,
        Some(tenant) => check_policy(&args.config, tenant)?,
    }
    let settings = args.etcd.settings()?;
    let keys = settings.keys();
    let tenant = args.tenant.as_deref();
    let published = current_thread()?.block_on(async {
        // Uploads and the config's put may be repeated: a blob is written
        // again only when etcd lacks it, and the same config twice is served
        // the same.
        let (mut client, outcome) = retrying(&settings, async |client| match tenant {
            None => weir::fleet::publish::publish(client, &keys, &args.config).await,
            Some(tenant) => weir::fleet::publish::publish_tenant(client, &keys, tenant, &args.config).await,
        })
        .await?;
        for (field, sha256, reason) in &outcome.repaired {
            println!("repaired {field} (sha256 {sha256}): {reason}");
        }
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
        let progress = weir::fleet::publish::wait(
            &mut client,
            &keys,
            outcome.revision,
            tenant,
            Duration::from_secs(args.timeout),
        )
        .await?;
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
    });
    published.map_err(|e| at_endpoints(&settings, e))
}

/// `weir check` on a node's file: its settings (the config itself comes
/// from etcd, checked by `weir publish`).
pub fn check_node_file(path: &Path) -> anyhow::Result<()> {
    let node = NodeFile::load(path)?;
    println!(
        "{}: ok (fleet node {}, etcd {}, prefix {}; the config itself is checked by `weir publish`)",
        path.display(),
        node.node_name(),
        node.fleet.endpoints.join(","),
        node.fleet.prefix
    );
    Ok(())
}

/// Checks a tenant's policy as `weir check` checks a config: its own rules,
/// then each plugin compiled and configured. What it may route to is the
/// operator's, checked by every node.
fn check_policy(path: &Path, tenant: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut policy = weir::fleet::tenant::TenantPolicy::parse(&text, tenant)
        .map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    for (_, file) in policy.files_mut() {
        *file = dir.join(&*file);
    }
    let runtime = weir::plugin::Runtime::new()?.with_warm_instances(1);
    for (name, plugin) in &policy.plugins {
        runtime
            .load(name, &plugin.wasm, plugin)
            .with_context(|| format!("{}: plugins.{name}", path.display()))?;
    }
    println!(
        "{}: ok (tenant {tenant}: {} plugins, {} pools)",
        path.display(),
        policy.plugins.len(),
        policy.pools.len()
    );
    Ok(())
}

/// `weir fleet status`.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let settings = args.etcd.settings()?;
    let keys = settings.keys();
    let status = current_thread()?.block_on(async {
        let (_, (now, nodes)) = retrying(&settings, async |client| {
            let now = weir::fleet::current_revisions(client, &keys).await?;
            Ok((now, weir::fleet::node::list_nodes(client, &keys).await?))
        })
        .await?;
        if args.json {
            println!("{}", weir::fleet::node::status_json(&keys, &now, &nodes));
            return Ok(());
        }
        println!("fleet at revision {} under {}", now.state, keys.prefix());
        if nodes.is_empty() {
            println!("no node is live under {}", keys.prefix());
        }
        for report in nodes.values() {
            let state = match (&report.error, report.failed_revision) {
                (Some(error), Some(failed)) => format!("revision {failed} refused: {error}"),
                _ => "ok".into(),
            };
            println!(
                "{}  revision {}  {}  serving from {}  admin {}  {}",
                report.node,
                report.revision,
                if report.is_current(&now) { "current" } else { "behind" },
                report.serving,
                report.admin.as_deref().unwrap_or("-"),
                state
            );
            for (tenant, t) in &report.tenants {
                let state = match (&t.error, t.failed_revision) {
                    (Some(error), Some(failed)) => format!("revision {failed} refused: {error}"),
                    _ => "ok".into(),
                };
                println!("  tenant {tenant}  policy revision {}  {state}", t.revision);
            }
        }
        Ok(())
    });
    status.map_err(|e| at_endpoints(&settings, e))
}
