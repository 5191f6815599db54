//! `[fleet]`: how a node or a command reaches the fleet's etcd, and a
//! node's own file; the etcd client they open.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{AdminConfig, CacheConfig};
use crate::fleet::{FleetError, Keys, store};

/// How to reach the fleet's etcd: `[fleet]` in a node's file, or the
/// `--etcd` flags of `weir publish` and `weir fleet status`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSettings {
    /// etcd client URLs (`http://host:2379`, or `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// The key prefix the fleet lives under.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This node's name; default the host name.
    pub node: Option<String>,
    /// Where the node keeps the files of the revision it serves and the last
    /// good revision; default `$XDG_STATE_HOME/weir/<node>` (or
    /// `~/.local/state/weir/<node>`). Private to weir's user.
    pub state_dir: Option<PathBuf>,
    /// etcd user (with `password_file`).
    pub user: Option<String>,
    /// File holding the etcd user's password; must not be readable by
    /// group or others.
    pub password_file: Option<PathBuf>,
    /// TLS to etcd.
    pub tls: Option<EtcdTls>,
    /// Lifetime of the node's report without keep-alives.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// This node's own address for a listener of the published config, by
    /// listener name (nodes sharing a host, or binding a host's own address).
    #[serde(default)]
    pub binds: BTreeMap<String, SocketAddr>,
}

/// TLS to etcd.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// PEM bundle of the CAs that sign etcd's certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM), with `key`.
    pub cert: Option<PathBuf>,
    /// Client private key (PEM); must not be readable by group or others.
    pub key: Option<PathBuf>,
    /// The name etcd's certificate must carry, when not the endpoint's host.
    pub server_name: Option<String>,
}

fn default_prefix() -> String {
    "/weir/".into()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// A node's own file: `[fleet]`, and the sections that belong to the node
/// rather than to the fleet (replacing the published config's when given).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// How to reach the fleet.
    pub fleet: FleetSettings,
    /// This node's admin server.
    pub admin: Option<AdminConfig>,
    /// This node's compiled-code cache.
    pub cache: Option<CacheConfig>,
    /// Where the file was read from.
    #[serde(skip)]
    pub path: PathBuf,
}

impl NodeFile {
    /// Whether the file at `path` is a node's file (it has `[fleet]`).
    pub fn is_node_file(path: &Path) -> bool {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .is_some_and(|table| table.contains_key("fleet"))
    }

    /// Reads and checks a node's file; relative paths in it are resolved
    /// against its directory.
    pub fn load(path: &Path) -> Result<NodeFile, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|e| FleetError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut file: NodeFile = toml::from_str(&text).map_err(|e| FleetError::Settings {
            path: path.to_owned(),
            field: "fleet".into(),
            reason: e.to_string(),
        })?;
        file.path = path.to_owned();
        // Absolute, so what the node builds from these paths does not
        // depend on its working directory.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let dir = absolute.parent().unwrap_or(Path::new("/"));
        file.fleet.resolve(dir);
        file.fleet.check(path)?;
        Ok(file)
    }

    /// The node's name: `fleet.node`, else the host name.
    pub fn node_name(&self) -> String {
        self.fleet.node.clone().unwrap_or_else(host_name)
    }
}

/// The host name, as the kernel has it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| valid_node_name(name))
        .unwrap_or_else(|| "weir".into())
}

/// A node name: 1 to 64 letters, digits, `.`, `-`, `_`.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl FleetSettings {
    /// Settings from flags: endpoints and a prefix, nothing else.
    pub fn from_endpoints(endpoints: Vec<String>, prefix: String) -> FleetSettings {
        FleetSettings {
            endpoints,
            prefix,
            node: None,
            state_dir: None,
            user: None,
            password_file: None,
            tls: None,
            lease_ttl: default_lease_ttl(),
            binds: BTreeMap::new(),
        }
    }

    fn resolve(&mut self, dir: &Path) {
        let join = |p: &mut Option<PathBuf>| {
            if let Some(path) = p
                && path.is_relative()
            {
                *path = dir.join(&*path);
            }
        };
        join(&mut self.state_dir);
        join(&mut self.password_file);
        if let Some(tls) = &mut self.tls {
            join(&mut tls.ca);
            join(&mut tls.cert);
            join(&mut tls.key);
        }
    }

    /// Checks the settings (`path` names the file in messages).
    pub fn check(&self, path: &Path) -> Result<(), FleetError> {
        let invalid = |field: &str, reason: String| FleetError::Settings {
            path: path.to_owned(),
            field: format!("fleet.{field}"),
            reason,
        };
        if self.endpoints.is_empty() {
            return Err(invalid("endpoints", "at least one etcd endpoint is needed".into()));
        }
        for endpoint in &self.endpoints {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) || endpoint.len() > 256 {
                return Err(invalid(
                    "endpoints",
                    format!("`{}` is not an http:// or https:// URL", endpoint.escape_debug()),
                ));
            }
        }
        if !valid_prefix(&self.prefix) {
            return Err(invalid(
                "prefix",
                format!(
                    "`{}` must start and end with `/` (at most 128 printable ASCII characters)",
                    self.prefix.escape_debug()
                ),
            ));
        }
        if let Some(node) = &self.node
            && !valid_node_name(node)
        {
            return Err(invalid(
                "node",
                format!(
                    "`{}` must be 1 to 64 letters, digits, `.`, `-`, `_`",
                    node.escape_debug()
                ),
            ));
        }
        if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&self.lease_ttl) {
            return Err(invalid("lease_ttl", "must be between 2 s and 300 s".into()));
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err(invalid("user", "`user` and `password_file` go together".into()));
        }
        for secret in [
            self.password_file.as_ref(),
            self.tls.as_ref().and_then(|t| t.key.as_ref()),
        ]
        .into_iter()
        .flatten()
        {
            store::check_secret(secret)?;
        }
        Ok(())
    }

    /// The key layout under the prefix.
    pub fn keys(&self) -> Keys {
        Keys {
            prefix: self.prefix.clone(),
        }
    }
}

fn valid_prefix(prefix: &str) -> bool {
    prefix.len() <= 128
        && prefix.starts_with('/')
        && prefix.ends_with('/')
        && prefix.bytes().all(|b| b.is_ascii_graphic())
}

/// Opens a client to the fleet's etcd: to the members that answer, of
/// several (to all when none does). The connection itself is made on first
/// use: an unreachable etcd shows in the first request.
pub async fn connect(settings: &FleetSettings) -> Result<etcd_client::Client, FleetError> {
    let options = connect_options(settings)?;
    let live = live_endpoints(&settings.endpoints, &options).await;
    let endpoints = if live.is_empty() { &settings.endpoints } else { &live };
    Ok(etcd_client::Client::connect(endpoints, Some(options)).await?)
}

/// Longest a member may take to say it is there and has a leader.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The endpoints, of several, whose member answers within
/// [`PROBE_TIMEOUT`] and has a leader, in the order given. The client's
/// balancing keeps sending a share of requests to a member that is down
/// (each fails), so a client is opened on the live members only, and a node
/// opens a new one when a request fails.
async fn live_endpoints(endpoints: &[String], options: &etcd_client::ConnectOptions) -> Vec<String> {
    if endpoints.len() < 2 {
        return endpoints.to_vec();
    }
    let mut probes = tokio::task::JoinSet::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let (endpoint, options) = (endpoint.clone(), options.clone());
        probes.spawn(async move {
            let probe = async {
                let mut client = etcd_client::Client::connect([&endpoint], Some(options)).await.ok()?;
                let status = client.status().await.ok()?;
                (status.leader() != 0).then_some(())
            };
            tokio::time::timeout(PROBE_TIMEOUT, probe)
                .await
                .ok()
                .flatten()
                .map(|()| i)
        });
    }
    let mut live: Vec<usize> = probes.join_all().await.into_iter().flatten().collect();
    live.sort_unstable();
    live.into_iter().map(|i| endpoints[i].clone()).collect()
}

fn connect_options(settings: &FleetSettings) -> Result<etcd_client::ConnectOptions, FleetError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| FleetError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    };
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(3), Duration::from_secs(3))
        // A member cut off from its cluster's leader answers no request and
        // ends its watches, so the node turns to another member.
        .with_require_leader(true);
    if let (Some(user), Some(file)) = (&settings.user, &settings.password_file) {
        let password = String::from_utf8_lossy(&read(file)?).trim().to_owned();
        // etcd's tokens expire (simple tokens after 5 idle minutes): a node
        // runs for months, so it logs in again when etcd says so.
        options = options.with_user(user.clone(), password).with_auto_token_refresh(true);
    }
    if let Some(tls) = &settings.tls {
        let mut config = etcd_client::TlsOptions::new();
        if let Some(ca) = &tls.ca {
            config = config.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            config = config.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &tls.server_name {
            config = config.domain_name(name.clone());
        }
        options = options.with_tls(config);
    }
    Ok(options)
}
