//! Whose compile it is. wasmtime compiles a component's functions in
//! parallel on rayon's pool, one thread per CPU: the operator's components
//! do so (at the lowest CPU priority, [`super::lane::compile_at_low_priority`]).
//! A tenant's compiles run on one thread of their own, at that priority too, so a
//! tenant that republishes often takes at most one core the connections
//! leave; and a component a tenant *published* (fleet mode) is charged to
//! its `compile_per_minute`: once that is spent, its next new component is
//! refused until the allowance returns, and the node tries again then.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::Component;

use super::{Host, PluginError};

/// Whose component is compiled.
#[derive(Debug, Clone, Copy)]
pub enum CompileScope<'a> {
    /// The operator's: on every core, at low priority.
    Operator,
    /// A tenant's plugin (its chain's, or a shadow of one): one thread.
    Tenant {
        /// The tenant.
        tenant: &'a str,
        /// Its allowance, when the tenant published the component (fleet
        /// mode); `None` when the operator wrote it down.
        charged: Option<Duration>,
    },
}

/// Each tenant's compile allowance, carried across reloads: a bucket of
/// `compile_per_minute` that refills at that rate and may be overdrawn by
/// the one compile that finds it not empty (a compile cannot be cut short).
#[derive(Debug, Default)]
pub struct CompileBudgets {
    tenants: Mutex<HashMap<String, Allowance>>,
    /// The earliest a refused compile may be tried again.
    retry_at: Mutex<Option<Instant>>,
}

#[derive(Debug, Clone, Copy)]
struct Allowance {
    /// Seconds left (negative when overdrawn), as of `at`.
    left: f64,
    at: Instant,
}

impl Allowance {
    fn now(self, per_minute: Duration, now: Instant) -> f64 {
        let full = per_minute.as_secs_f64();
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * full / 60.0;
        (self.left + refill).min(full)
    }
}

impl CompileBudgets {
    /// Whether `tenant` may compile now; the error says when it may.
    pub fn admit(&self, tenant: &str, per_minute: Duration) -> Result<(), PluginError> {
        let now = Instant::now();
        let left = crate::sync::lock(&self.tenants)
            .get(tenant)
            .map_or(per_minute.as_secs_f64(), |a| a.now(per_minute, now));
        if left > 0.0 {
            return Ok(());
        }
        // Back above zero after -left seconds of refill at per_minute / 60 s.
        let wait =
            Duration::from_secs_f64((-left * 60.0 / per_minute.as_secs_f64()).min(3600.0)) + Duration::from_millis(100);
        let mut retry = crate::sync::lock(&self.retry_at);
        let at = now + wait;
        *retry = Some(retry.map_or(at, |r| r.min(at)));
        Err(PluginError::CompileBudget {
            tenant: tenant.to_owned(),
            per_minute,
            wait,
        })
    }

    /// Charges `tenant` with `spent` of compile time.
    pub fn charge(&self, tenant: &str, per_minute: Duration, spent: Duration) {
        let now = Instant::now();
        let mut tenants = crate::sync::lock(&self.tenants);
        let left = tenants
            .get(tenant)
            .map_or(per_minute.as_secs_f64(), |a| a.now(per_minute, now));
        tenants.insert(
            tenant.to_owned(),
            Allowance {
                left: left - spent.as_secs_f64(),
                at: now,
            },
        );
    }

    /// Forgets the tenants not in `tenants` (the map is as large as the
    /// config's tenants, no larger).
    pub fn retain(&self, tenants: &dyn Fn(&str) -> bool) {
        crate::sync::lock(&self.tenants).retain(|name, _| tenants(name));
    }

    /// The earliest a compile refused since the last call may be tried
    /// again, taken (the next call says `None` until another refusal).
    pub fn take_retry_at(&self) -> Option<Instant> {
        crate::sync::lock(&self.retry_at).take()
    }
}

impl super::Runtime {
    /// The compiled component kept under `key` for `host`: from memory,
    /// from the disk cache, or compiled by `compile` (and kept in both).
    pub(super) fn compiled(
        &self,
        host: &Host,
        key: [u8; 32],
        isolated: bool,
        compile: impl FnOnce() -> Result<Component, PluginError>,
    ) -> Result<Component, PluginError> {
        if let Some(component) = crate::sync::lock(&self.compiled).get(&(key, isolated)).cloned() {
            return Ok(component);
        }
        let component = self.disk_compiled(host, key, compile)?;
        crate::sync::lock(&self.compiled).insert((key, isolated), component.clone());
        Ok(component)
    }

    /// Like [`compiled`](Runtime::compiled), without keeping it in memory.
    pub(super) fn disk_compiled(
        &self,
        host: &Host,
        key: [u8; 32],
        compile: impl FnOnce() -> Result<Component, PluginError>,
    ) -> Result<Component, PluginError> {
        if let Some(component) = self.disk.as_ref().and_then(|disk| disk.load(&host.engine, &key)) {
            return Ok(component);
        }
        let component = compile()?;
        if let Some(disk) = &self.disk {
            disk.store(&key, &component);
        }
        Ok(component)
    }

    /// Runs `compile` as `scope`'s (a tenant's on its one thread), within
    /// the tenant's allowance when it is charged.
    pub(super) fn compile_for<T: Send>(
        &self,
        scope: CompileScope<'_>,
        compile: impl FnOnce() -> Result<T, PluginError> + Send,
    ) -> Result<T, PluginError> {
        if let CompileScope::Tenant {
            tenant,
            charged: Some(per_minute),
        } = scope
        {
            self.compile_budgets.admit(tenant, per_minute)?;
        }
        self.compile_charged(scope, compile)
    }

    /// Runs `compile` as `scope`'s and charges the tenant with it, without
    /// asking first: the compiles a plugin's load makes after its
    /// component's (its configured image) are part of what was admitted.
    pub(super) fn compile_charged<T: Send>(&self, scope: CompileScope<'_>, compile: impl FnOnce() -> T + Send) -> T {
        let (compiled, spent) = compile_in(scope, compile);
        if let CompileScope::Tenant {
            tenant,
            charged: Some(per_minute),
        } = scope
        {
            self.compile_budgets.charge(tenant, per_minute, spent);
        }
        compiled
    }

    /// The tenants' compile allowances.
    pub fn compile_budgets(&self) -> &CompileBudgets {
        &self.compile_budgets
    }
}

/// Runs `compile` for `scope`: a tenant's on the one low-priority tenant
/// compile thread (wasmtime's parallel compile runs on the pool it is
/// called from), returning what it returned and the CPU time it took.
pub fn compile_in<T: Send>(scope: CompileScope<'_>, compile: impl FnOnce() -> T + Send) -> (T, Duration) {
    let timed = move || {
        let start = super::lane::thread_cpu();
        let out = compile();
        (out, super::lane::thread_cpu().saturating_sub(start))
    };
    match (scope, tenant_pool()) {
        (CompileScope::Tenant { .. }, Some(pool)) => pool.install(timed),
        _ => timed(),
    }
}

/// The tenants' compile thread: one, at the lowest CPU priority. `None`
/// where the OS gives no thread (then a tenant's compile runs where it is
/// asked for, as the operator's do).
fn tenant_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "weir-tenant-compile".into())
            .start_handler(|_| super::lane::lower_priority())
            .build()
            .map_err(|error| tracing::warn!(%error, "no thread for tenants' compiles"))
            .ok()
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_allowance_refuses_until_it_returns() {
        let budgets = CompileBudgets::default();
        let minute = Duration::from_secs(6);
        budgets.admit("a", minute).expect("a full allowance");
        // One compile may overdraw it: 8 s of a 6 s allowance.
        budgets.charge("a", minute, Duration::from_secs(8));
        let refused = budgets.admit("a", minute).expect_err("spent");
        let PluginError::CompileBudget { wait, .. } = &refused else {
            panic!("{refused}");
        };
        // 2 s overdrawn at 6 s a minute: back after about 20 s.
        assert!((19..=21).contains(&wait.as_secs()), "{wait:?}");
        assert!(refused.to_string().contains("tenant `a`"), "{refused}");
        assert!(budgets.take_retry_at().is_some());
        assert!(budgets.take_retry_at().is_none(), "taken");
        // Another tenant's allowance is its own.
        budgets.admit("b", minute).expect("b's own");
        budgets.retain(&|t| t == "b");
        budgets.admit("a", minute).expect("a is forgotten with its tenant");
    }

    #[test]
    fn a_tenants_compile_runs_on_its_one_thread() {
        let (name, _) = compile_in(
            CompileScope::Tenant {
                tenant: "a",
                charged: None,
            },
            || std::thread::current().name().map(str::to_owned),
        );
        assert_eq!(name.as_deref(), Some("weir-tenant-compile"));
        let (threads, _) = compile_in(
            CompileScope::Tenant {
                tenant: "a",
                charged: None,
            },
            rayon::current_num_threads,
        );
        assert_eq!(threads, 1, "wasmtime's parallel compile gets one thread");
        let (spin, cpu) = compile_in(CompileScope::Operator, || {
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < Duration::from_millis(30) {
                n = n.wrapping_add(1);
            }
            n
        });
        assert!(spin > 0);
        assert!(cpu >= Duration::from_millis(10), "{cpu:?}");
    }
}
