//! The plugin chain: [`route`] asks a listener's or tenant's plugins in
//! order until one decides; [`admit`] asks every plugin whether to admit an
//! authenticated peer. Each call is timed and its failure counted.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::config::OnError;
use crate::plugin::decision::{Action, Decision, Known};
use crate::plugin::shadow::{Pending, ShadowStep, Shadows};
use crate::plugin::{Plugin, PluginError};
use crate::wit;

/// Asks `chain` in order until a plugin decides. A failed plugin either
/// ends the chain with a rejection (`on_error = "deny"`) or is skipped
/// (`"next"`). A decision naming what `known` does not hold is a failure of
/// its plugin, reported to `violated` too. When no plugin decides, the
/// connection is rejected.
///
/// A plugin that decides (or abstains) with `shadows` of its own leaves its
/// decision in [`Routing::pending`], for the caller to run them against.
pub async fn route<K: Known + Sync>(
    chain: &[Arc<Plugin>],
    conn: &Arc<wit::Connection>,
    known: &K,
    shadows: &Shadows,
    violated: impl Fn(),
) -> Routing {
    let mut steps = Vec::with_capacity(chain.len());
    let mut pending = Vec::new();
    for plugin in chain {
        let started = Instant::now();
        let candidates = shadows.of(plugin.name());
        let result = plugin.route(conn).await.and_then(|decision| {
            if !candidates.is_empty() {
                pending.push(Pending {
                    live: Arc::clone(plugin.name()),
                    candidates: candidates.to_vec(),
                    decision: decision.clone(),
                });
            }
            Decision::from_wit(decision, known).map_err(|reason| {
                violated();
                PluginError::InvalidDecision(reason)
            })
        });
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
                    pending,
                    shadows: Vec::new(),
                };
            }
            Err(error) => {
                let on_error = plugin.on_error();
                if let Some(failures) = plugin.report_failure() {
                    tracing::warn!(conn = conn.id, plugin = &*name, %error, ?on_error, failures, "plugin failed");
                }
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
                        pending,
                        shadows: Vec::new(),
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
        pending,
        shadows: Vec::new(),
    }
}

/// Asks every plugin of a chain whether to admit an authenticated peer. The
/// first deny is the answer; a failing plugin denies, unless its
/// `on_error` is `next`, which skips it.
pub async fn admit(
    chain: &[Arc<Plugin>],
    conn: &Arc<wit::Connection>,
    side: wit::Side,
    peer: &Arc<wit::Peer>,
) -> Result<(), String> {
    for plugin in chain {
        let name = plugin.name();
        let started = Instant::now();
        let verdict = plugin.admit(conn, side, peer).await;
        observe(plugin, started, verdict.as_ref().err());
        match verdict {
            Ok(wit::Verdict::Allow) => {}
            Ok(wit::Verdict::Deny(reason)) => return Err(format!("plugin `{name}` denied: {reason}")),
            Err(error) => {
                let on_error = plugin.on_error();
                if let Some(failures) = plugin.report_failure() {
                    tracing::warn!(conn = conn.id, plugin = &**name, %error, ?on_error, failures, "plugin failed in admit");
                }
                if on_error == OnError::Deny {
                    return Err(format!("plugin `{name}` {error}"));
                }
            }
        }
    }
    Ok(())
}

/// [`admit`] for a caller that cannot wait asynchronously (a rustls
/// certificate verifier, inside the handshake). On a multi-threaded runtime
/// the worker's other tasks move to another thread while the chain runs.
pub fn admit_blocking(
    chain: &[Arc<Plugin>],
    conn: &Arc<wit::Connection>,
    side: wit::Side,
    peer: &Arc<wit::Peer>,
) -> Result<(), String> {
    crate::sync::off_the_worker(|| futures_executor::block_on(admit(chain, conn, side, peer)))
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
    /// Live decisions that shadow plugins are to be compared with.
    #[serde(skip)]
    pub pending: Vec<Pending>,
    /// What the shadow plugins decided, when they were run and waited for
    /// (`weir route`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadows: Vec<ShadowStep>,
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
pub(crate) fn observe(plugin: &Plugin, started: Instant, error: Option<&PluginError>) {
    let seconds = started.elapsed().as_secs_f64();
    crate::metrics::METRICS.plugin_call(plugin.name(), seconds, error.map(PluginError::kind));
}
