//! The routing state a connection runs against: listeners with their plugin
//! chains, pools, loaded plugins. A snapshot is built and checked whole from a
//! [`Config`] — every plugin compiled and configured, every reference
//! resolved — and never changes after that. A new config means a new
//! snapshot; a connection keeps the one it started with.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::addr::HostPort;
use crate::config::{Config, ListenerConfig, OnError};
use crate::decision::{Action, Decision, Known};
use crate::plugin::{Plugin, PluginError, Runtime, wit};
use crate::tls::{ListenerSettings, TlsMaterial, check_listener};

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A plugin failed to load or refused its config.
    #[error("{}: plugins.{name}: {error}", config.display())]
    Plugin {
        /// The config file that names the plugin.
        config: std::path::PathBuf,
        /// The plugin's name in the config.
        name: String,
        /// What went wrong.
        error: PluginError,
    },
    /// A certificate, CA or TLS setting could not be loaded.
    #[error("{}: {field}: {reason}", config.display())]
    Tls {
        /// The config file.
        config: std::path::PathBuf,
        /// The dotted path of the field.
        field: String,
        /// What went wrong.
        reason: String,
    },
}

/// A listener's settings and its plugin chain.
#[derive(Debug)]
pub struct Listener {
    /// The listener's name in the config.
    pub name: Arc<str>,
    /// Its settings.
    pub config: ListenerConfig,
    /// TLS settings for terminated connections.
    pub tls: ListenerSettings,
    chain: Vec<Arc<Plugin>>,
}

impl Listener {
    /// Asks every plugin of the chain whether to admit an authenticated
    /// peer. The first deny is the answer; a failing plugin denies, unless
    /// its `on_error` is `next`, which skips it.
    pub fn admit(&self, conn: &wit::Connection, side: wit::Side, peer: &wit::Peer) -> Result<(), String> {
        for plugin in &self.chain {
            let name = plugin.name();
            let started = Instant::now();
            let verdict = plugin.admit(conn, side, peer);
            observe(plugin, started, verdict.as_ref().err());
            match verdict {
                Ok(wit::Verdict::Allow) => {}
                Ok(wit::Verdict::Deny(reason)) => return Err(format!("plugin `{name}` denied: {reason}")),
                Err(error) => {
                    let on_error = plugin.on_error();
                    tracing::warn!(conn = conn.id, plugin = &**name, %error, ?on_error, "plugin failed in admit");
                    if on_error == OnError::Deny {
                        return Err(format!("plugin `{name}` {error}"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A named set of servers, tried in turn from a rotating start.
#[derive(Debug)]
pub struct Pool {
    servers: Vec<HostPort>,
    next: AtomicUsize,
}

impl Pool {
    /// The servers as configured.
    pub fn server_list(&self) -> &[HostPort] {
        &self.servers
    }

    /// The servers in the order to try them for the next connection: each
    /// connection starts one further along than the previous one.
    pub fn servers(&self) -> impl Iterator<Item = &HostPort> {
        let start = self.next.fetch_add(1, Ordering::Relaxed) % self.servers.len();
        self.servers[start..].iter().chain(&self.servers[..start])
    }
}

/// Immutable routing state.
#[derive(Debug)]
pub struct Snapshot {
    /// The config it was built from.
    pub config: Config,
    listeners: BTreeMap<String, Arc<Listener>>,
    pools: BTreeMap<String, Pool>,
    tls: TlsMaterial,
    plugins: BTreeMap<String, Arc<Plugin>>,
    /// When it was built.
    pub built_at: std::time::SystemTime,
}

impl Known for Snapshot {
    fn has_pool(&self, name: &str) -> bool {
        self.pools.contains_key(name)
    }

    fn has_certificate(&self, name: &str) -> bool {
        self.tls.has_certificate(name)
    }

    fn ca(&self, name: &str) -> Option<bool> {
        self.tls.ca(name)
    }
}

/// What one plugin of the chain did.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The plugin.
    pub plugin: Arc<str>,
    /// `next`, `decided`, or the failure.
    pub outcome: StepOutcome,
    /// How long the call took, in microseconds.
    pub micros: u64,
}

/// The result of one plugin call.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcome {
    /// The plugin abstained.
    Next,
    /// The plugin decided.
    Decided,
    /// The plugin failed; `on_error` said what followed.
    Failed {
        /// The failure.
        error: String,
        /// What the host did about it.
        on_error: OnError,
    },
}

/// The chain's verdict on a connection.
#[derive(Debug, Clone, Serialize)]
pub struct Routing {
    /// The plugin whose decision (or failure) is final; none when every
    /// plugin abstained.
    pub plugin: Option<Arc<str>>,
    /// What the host does.
    pub decision: Decision,
    /// Each plugin asked, in order.
    pub steps: Vec<Step>,
}

impl Routing {
    /// Whether the final decision came from a plugin failure.
    pub fn failed(&self) -> bool {
        matches!(
            self.steps.last(),
            Some(Step {
                outcome: StepOutcome::Failed {
                    on_error: OnError::Deny,
                    ..
                },
                ..
            })
        )
    }
}

/// Records a plugin call's duration, and its failure if it failed.
fn observe(plugin: &Plugin, started: Instant, error: Option<&PluginError>) {
    let metrics = &crate::metrics::METRICS;
    let labels = crate::metrics::PluginLabels {
        plugin: plugin.name().to_string(),
    };
    metrics
        .plugin_calls
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if let Some(error) = error {
        let labels = crate::metrics::FailureLabels {
            plugin: labels.plugin,
            kind: error.kind(),
        };
        metrics.plugin_failures.get_or_create(&labels).inc();
    }
}

impl Snapshot {
    /// Loads and configures every plugin, and resolves every reference.
    pub fn build(config: Config, runtime: &Runtime) -> Result<Snapshot, SnapshotError> {
        Snapshot::rebuild(config, runtime, None)
    }

    /// Builds a snapshot that keeps `previous`'s plugins wherever their bytes,
    /// settings and config are unchanged (instances and all), and compiles
    /// only what changed.
    pub fn rebuild(config: Config, runtime: &Runtime, previous: Option<&Snapshot>) -> Result<Snapshot, SnapshotError> {
        let tls_error = |(field, reason): crate::tls::Invalid| SnapshotError::Tls {
            config: config.path.clone(),
            field,
            reason,
        };
        let tls = TlsMaterial::load(&config).map_err(tls_error)?;
        let mut plugins = BTreeMap::new();
        for (name, plugin) in &config.plugins {
            let path = config.resolve(&plugin.wasm);
            let old = previous.and_then(|p| p.plugins.get(name));
            let loaded = match runtime.load_reusing(name, &path, plugin, old) {
                Ok(loaded) => Arc::new(loaded),
                Err(PluginError::Unchanged) => old.cloned().ok_or_else(|| SnapshotError::Plugin {
                    config: config.path.clone(),
                    name: name.clone(),
                    error: PluginError::Unchanged,
                })?,
                Err(error) => {
                    return Err(SnapshotError::Plugin {
                        config: config.path.clone(),
                        name: name.clone(),
                        error,
                    });
                }
            };
            plugins.insert(name.clone(), loaded);
        }
        let listeners = config
            .listeners
            .iter()
            .map(|(name, listener)| {
                let settings = check_listener(&listener.tls)
                    .map_err(|(field, reason)| tls_error((format!("listeners.{name}.tls.{field}"), reason)))?;
                // `Config::check` proved every chain entry names a plugin.
                let chain = listener
                    .plugins
                    .iter()
                    .filter_map(|p| plugins.get(p).cloned())
                    .collect();
                let listener = Listener {
                    name: name.as_str().into(),
                    config: listener.clone(),
                    tls: settings,
                    chain,
                };
                Ok((name.clone(), Arc::new(listener)))
            })
            .collect::<Result<_, SnapshotError>>()?;
        let pools = config
            .pools
            .iter()
            .map(|(name, pool)| {
                // `Config::check` proved every server parses.
                let servers = pool.servers.iter().filter_map(|s| HostPort::parse(s).ok()).collect();
                (
                    name.clone(),
                    Pool {
                        servers,
                        next: AtomicUsize::new(0),
                    },
                )
            })
            .collect();
        Ok(Snapshot {
            config,
            listeners,
            pools,
            tls,
            plugins,
            built_at: std::time::SystemTime::now(),
        })
    }

    /// A listener by name.
    pub fn listener(&self, name: &str) -> Option<&Arc<Listener>> {
        self.listeners.get(name)
    }

    /// All listeners, by name.
    pub fn listeners(&self) -> impl Iterator<Item = &Arc<Listener>> {
        self.listeners.values()
    }

    /// Certificates, trust anchors and the TLS configs built from them.
    pub fn tls(&self) -> &TlsMaterial {
        &self.tls
    }

    /// Every loaded plugin, by name.
    pub fn plugins(&self) -> &BTreeMap<String, Arc<Plugin>> {
        &self.plugins
    }

    /// Every pool, by name.
    pub fn pools(&self) -> &BTreeMap<String, Pool> {
        &self.pools
    }

    /// A pool by name.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }

    /// Asks the listener's chain, in order, until a plugin decides. A failed
    /// plugin either ends the chain with a rejection (`on_error = "deny"`) or
    /// is skipped (`"next"`). When no plugin decides, the connection is
    /// rejected.
    pub fn route(&self, listener: &Listener, conn: &wit::Connection) -> Routing {
        let mut steps = Vec::with_capacity(listener.chain.len());
        for plugin in &listener.chain {
            let started = Instant::now();
            let result = plugin
                .route(conn)
                .and_then(|decision| Decision::from_wit(decision, self).map_err(PluginError::InvalidDecision));
            observe(plugin, started, result.as_ref().err());
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let name = Arc::clone(plugin.name());
            match result {
                Ok(None) => steps.push(Step {
                    plugin: name,
                    outcome: StepOutcome::Next,
                    micros,
                }),
                Ok(Some(decision)) => {
                    steps.push(Step {
                        plugin: Arc::clone(&name),
                        outcome: StepOutcome::Decided,
                        micros,
                    });
                    return Routing {
                        plugin: Some(name),
                        decision,
                        steps,
                    };
                }
                Err(error) => {
                    let on_error = plugin.on_error();
                    tracing::warn!(conn = conn.id, plugin = &*name, %error, ?on_error, "plugin failed");
                    let reason = format!("plugin `{name}` {error}");
                    steps.push(Step {
                        plugin: Arc::clone(&name),
                        outcome: StepOutcome::Failed {
                            error: error.to_string(),
                            on_error,
                        },
                        micros,
                    });
                    if on_error == OnError::Deny {
                        let decision = Decision {
                            route: "plugin-error".into(),
                            action: Action::Reject(reason),
                        };
                        return Routing {
                            plugin: Some(name),
                            decision,
                            steps,
                        };
                    }
                }
            }
        }
        let decision = Decision {
            route: "no-route".into(),
            action: Action::Reject("no plugin in the chain decided".into()),
        };
        Routing {
            plugin: None,
            decision,
            steps,
        }
    }
}
