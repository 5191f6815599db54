//! Shadow rollouts: a candidate plugin (`shadow_of = "LIVE"`) decides every
//! connection its live plugin decides, off the connection's path, within
//! its own deadline and budget. Its decision never reaches the connection:
//! it is compared with the live one, counted
//! (`weir_shadow_decisions_total`, `weir_shadow_disagreements_total`), and
//! a disagreement is logged with the connection's facts and both decisions,
//! at most once a second per candidate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::plugin::Plugin;
use crate::wit;

/// Longest a decision is written in a log line or `weir route` output.
const MAX_SHOWN: usize = 1024;

/// The candidates of each live plugin, by the live plugin's name.
#[derive(Debug, Default)]
pub struct Shadows(HashMap<Arc<str>, Vec<Arc<Plugin>>>);

impl Shadows {
    /// Candidates and the live plugins they shadow.
    pub fn new(pairs: impl IntoIterator<Item = (Arc<str>, Arc<Plugin>)>) -> Shadows {
        let mut by_live: HashMap<Arc<str>, Vec<Arc<Plugin>>> = HashMap::new();
        for (live, candidate) in pairs {
            by_live.entry(live).or_default().push(candidate);
        }
        Shadows(by_live)
    }

    /// The candidates shadowing `live`.
    pub fn of(&self, live: &str) -> &[Arc<Plugin>] {
        if self.0.is_empty() {
            return &[];
        }
        self.0.get(live).map_or(&[], Vec::as_slice)
    }
}

/// A live plugin's decision that candidates are to be compared with.
#[derive(Debug, Clone)]
pub struct Pending {
    pub(crate) live: Arc<str>,
    pub(crate) candidates: Vec<Arc<Plugin>>,
    pub(crate) decision: wit::Decision,
}

/// What a candidate decided, for `weir route --explain`.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowStep {
    /// The candidate.
    pub plugin: Arc<str>,
    /// The live plugin it shadows.
    pub live: Arc<str>,
    /// `agreed`, `disagreed` or `failed`.
    pub result: &'static str,
    /// Its decision (or failure), as written in the log.
    pub decision: String,
}

/// Runs each candidate of `pending` in a task of its own: the connection
/// goes on at once.
pub(crate) fn spawn(pending: Vec<Pending>, conn: &Arc<wit::Connection>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    for pending in pending {
        for candidate in pending.candidates.clone() {
            let (conn, pending) = (Arc::clone(conn), pending.clone());
            runtime.spawn(async move {
                compare(&candidate, &pending, &conn).await;
            });
        }
    }
}

/// Runs every candidate of `pending` and waits for them (`weir route`).
pub(crate) async fn run(pending: &[Pending], conn: &Arc<wit::Connection>) -> Vec<ShadowStep> {
    let mut steps = Vec::new();
    for pending in pending {
        for candidate in &pending.candidates {
            steps.push(compare(candidate, pending, conn).await);
        }
    }
    steps
}

/// One candidate's call, compared, counted and (sampled) logged.
async fn compare(candidate: &Arc<Plugin>, pending: &Pending, conn: &Arc<wit::Connection>) -> ShadowStep {
    let started = Instant::now();
    let result = candidate.route(conn).await;
    crate::plugin::chain::observe(candidate, started, result.as_ref().err());
    let name = candidate.name();
    let live = &pending.live;
    let (outcome, text) = match &result {
        Ok(decision) if *decision == pending.decision => ("agreed", shown(decision)),
        Ok(decision) => ("disagreed", shown(decision)),
        Err(error) => ("failed", format!("failed: {error}")),
    };
    let route = (outcome == "disagreed")
        .then(|| crate::metrics::METRICS.route_label(conn.tenant.as_deref(), &conn.listener, &pending.decision.route));
    crate::metrics::shadow::shadow_decision(name, live, outcome, route);
    if outcome == "disagreed"
        && let Some(since) = crate::sync::lock(&candidate.shadow_reports).event()
    {
        tracing::info!(
            plugin = &**name,
            live = &**live,
            conn = conn.id,
            listener = conn.listener,
            tenant = conn.tenant.as_deref().unwrap_or("-"),
            client = %std::net::SocketAddr::from(conn.client),
            sni = conn.sni.as_deref().unwrap_or("-"),
            alpn = ?conn.alpn,
            live_decision = shown(&pending.decision),
            candidate_decision = text,
            disagreements = since,
            "shadow plugin decided otherwise"
        );
    }
    ShadowStep {
        plugin: Arc::clone(name),
        live: Arc::clone(live),
        result: outcome,
        decision: text,
    }
}

/// A decision as Rust writes it (strings quoted and escaped), cut to
/// [`MAX_SHOWN`] bytes.
fn shown(decision: &wit::Decision) -> String {
    let mut text = format!("{decision:?}");
    if text.len() > MAX_SHOWN {
        text.truncate(text.floor_char_boundary(MAX_SHOWN));
        text.push('…');
    }
    text
}
