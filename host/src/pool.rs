//! Upstream pools: servers with their health and counters, the policy that
//! orders them for each connection, active health checks and passive
//! ejection.
//!
//! For each connection a pool offers its servers in the order to try them:
//! the policy's choice first, then the other servers in turn, healthy ones
//! before the rest (a pool whose servers are all marked down still tries
//! them, rather than refuse everyone). The gateway moves on to the next
//! server when a connect fails, within the listener's connect deadline and
//! `max_attempts`.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::addr::HostPort;
use crate::clock::unix_now;
use crate::config::{HealthConfig, PassiveConfig, Policy, PoolConfig};

/// One server of a pool, with what is known about it.
#[derive(Debug)]
pub struct Backend {
    /// Its address.
    pub addr: HostPort,
    /// Its weight under the `weighted` policy.
    pub weight: u32,
    healthy: AtomicBool,
    /// Draining: offered to no new connection (set from the config).
    draining: AtomicBool,
    /// When its health last changed (up, down, ejected), seconds since the
    /// Unix epoch; when weir first knew it before that.
    since: AtomicU64,
    /// Milliseconds since `EPOCH` until which passive ejection skips it.
    ejected_until: AtomicU64,
    consecutive_failures: AtomicU32,
    streak_up: AtomicU32,
    streak_down: AtomicU32,
    /// Connections in progress.
    pub active: AtomicUsize,
    /// Connections made.
    pub connections: AtomicU64,
    /// Connect failures.
    pub failures: AtomicU64,
    /// Bytes client → server.
    pub bytes_up: AtomicU64,
    /// Bytes server → client.
    pub bytes_down: AtomicU64,
}

/// The process's reference instant for ejection deadlines.
static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Backend {
    fn new(addr: HostPort, weight: u32) -> Backend {
        Backend {
            addr,
            weight,
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            since: AtomicU64::new(unix_now()),
            ejected_until: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            streak_up: AtomicU32::new(0),
            streak_down: AtomicU32::new(0),
            active: AtomicUsize::new(0),
            connections: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        }
    }

    /// Whether new connections should go here: health checks pass, it is
    /// not ejected and not draining.
    pub fn available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) <= now_ms()
            && !self.draining()
    }

    /// Whether it is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Records a successful connect.
    pub fn connected(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a failed connect; ejects the server after `passive.failures`
    /// in a row.
    pub fn failed(&self, passive: &PassiveConfig) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let in_a_row = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if passive.failures > 0 && in_a_row >= passive.failures {
            let until = now_ms().saturating_add(u64::try_from(passive.eject_for.as_millis()).unwrap_or(u64::MAX));
            self.ejected_until.store(until, Ordering::Relaxed);
            self.since.store(unix_now(), Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            tracing::warn!(server = %self.addr, failures = in_a_row, eject_for = ?passive.eject_for, "server ejected");
        }
    }

    /// A health check's result: `rise` successes in a row bring the server
    /// back, `fall` failures take it out.
    fn checked(&self, ok: bool, health: &HealthConfig) {
        if ok {
            self.streak_down.store(0, Ordering::Relaxed);
            let up = self.streak_up.fetch_add(1, Ordering::Relaxed) + 1;
            if up >= health.rise && !self.healthy.swap(true, Ordering::Relaxed) {
                self.since.store(unix_now(), Ordering::Relaxed);
                // Back by the checks' judgement: earlier connect failures
                // no longer speak against it.
                self.ejected_until.store(0, Ordering::Relaxed);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                tracing::info!(server = %self.addr, "server up");
            }
        } else {
            self.streak_up.store(0, Ordering::Relaxed);
            let down = self.streak_down.fetch_add(1, Ordering::Relaxed) + 1;
            if down >= health.fall && self.healthy.swap(false, Ordering::Relaxed) {
                self.since.store(unix_now(), Ordering::Relaxed);
                tracing::warn!(server = %self.addr, "server down");
            }
        }
    }

    /// What the admin API shows.
    pub fn stats(&self) -> BackendStats {
        BackendStats {
            address: self.addr.to_string(),
            weight: self.weight,
            healthy: self.healthy.load(Ordering::Relaxed),
            ejected: self.ejected_until.load(Ordering::Relaxed) > now_ms(),
            draining: self.draining(),
            since: self.since.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
        }
    }
}

/// A backend's state and counters.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStats {
    /// `host:port`.
    pub address: String,
    /// Weight.
    pub weight: u32,
    /// Passing its health checks (always, without checks).
    pub healthy: bool,
    /// Skipped after connect failures.
    pub ejected: bool,
    /// Draining: no new connections.
    pub draining: bool,
    /// When its health last changed (or weir first knew it), seconds since
    /// the Unix epoch.
    pub since: u64,
    /// Connections in progress.
    pub active: usize,
    /// Connections made.
    pub connections: u64,
    /// Connect failures.
    pub failures: u64,
    /// Bytes client → server.
    pub bytes_up: u64,
    /// Bytes server → client.
    pub bytes_down: u64,
}

/// A connection's hold on a backend: counts it active until dropped.
#[derive(Debug)]
pub struct BackendGuard(Arc<Backend>);

impl BackendGuard {
    /// Takes a slot on `backend`.
    pub fn new(backend: Arc<Backend>) -> BackendGuard {
        backend.active.fetch_add(1, Ordering::Relaxed);
        BackendGuard(backend)
    }

    /// The backend.
    pub fn backend(&self) -> &Backend {
        &self.0
    }
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A named set of servers.
#[derive(Debug)]
pub struct Pool {
    /// Its name.
    pub name: String,
    backends: Vec<Arc<Backend>>,
    /// Its settings.
    pub config: PoolConfig,
    turn: AtomicUsize,
    /// Smooth weighted round robin state: each backend's current weight.
    current: Mutex<Vec<i64>>,
    random: std::collections::hash_map::RandomState,
}

impl Pool {
    /// Builds a pool; backends of `previous` with the same address are kept,
    /// with their health and counters.
    pub fn new(name: &str, config: &PoolConfig, previous: Option<&Pool>) -> Pool {
        let backends = config
            .servers
            .iter()
            .filter_map(|server| {
                // `Config::check` proved every address parses.
                let addr = HostPort::parse(server.address()).ok()?;
                let kept = previous
                    .and_then(|p| {
                        p.backends
                            .iter()
                            .find(|b| b.addr == addr && b.weight == server.weight())
                    })
                    .cloned();
                let backend = kept.unwrap_or_else(|| Arc::new(Backend::new(addr, server.weight())));
                backend.draining.store(server.drain(), Ordering::Relaxed);
                Some(backend)
            })
            .collect::<Vec<_>>();
        let current = Mutex::new(vec![0; backends.len()]);
        Pool {
            name: name.to_owned(),
            backends,
            config: config.clone(),
            turn: AtomicUsize::new(0),
            current,
            random: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The servers.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The servers in the order to try them for a new connection, at most
    /// `max_attempts`; never one that is draining (none at all when every
    /// server drains).
    pub fn candidates(&self) -> Vec<Arc<Backend>> {
        let n = self.backends.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let first = match self.config.policy {
            Policy::RoundRobin => start % n,
            Policy::Random => {
                let mut hasher = self.random.build_hasher();
                hasher.write_usize(start);
                (hasher.finish() % n as u64) as usize
            }
            Policy::LeastConnections => {
                // Among available servers, the fewest active; ties in turn.
                (0..n)
                    .map(|i| (start + i) % n)
                    .filter(|&i| self.backends[i].available())
                    .min_by_key(|&i| self.backends[i].active.load(Ordering::Relaxed))
                    .unwrap_or(start % n)
            }
            Policy::Weighted => self.next_weighted().unwrap_or(start % n),
        };
        let rotation = (0..n).map(|i| (first + i) % n);
        let mut ordered: Vec<Arc<Backend>> = rotation
            .clone()
            .filter(|&i| self.backends[i].available())
            .map(|i| Arc::clone(&self.backends[i]))
            .collect();
        ordered.extend(
            rotation
                .filter(|&i| !self.backends[i].available() && !self.backends[i].draining())
                .map(|i| Arc::clone(&self.backends[i])),
        );
        ordered.truncate(self.config.max_attempts.unwrap_or(n).max(1));
        ordered
    }

    /// Smooth weighted round robin over the available servers (nginx's
    /// algorithm): the same sequence each cycle, spread out, exact shares.
    fn next_weighted(&self) -> Option<usize> {
        let mut current = crate::sync::lock(&self.current);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, backend) in self.backends.iter().enumerate() {
            if !backend.available() {
                continue;
            }
            let weight = i64::from(backend.weight);
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        if let Some(best) = best {
            current[best] -= total;
        }
        best
    }

    /// Runs active health checks until the pool is gone (no snapshot holds
    /// it any more). Every probe goes through the door as the pool's
    /// owner's: the operator's, or for a pool a tenant published, the
    /// tenant's (its ranges, its sockets, its `health_probes_per_second`;
    /// a probe past the rate is skipped and its server keeps its state).
    /// Probes in flight are bounded over the whole process
    /// ([`MAX_PROBES_IN_FLIGHT`]), and none takes a descriptor the reserve
    /// keeps for connections.
    pub fn spawn_health_checks(pool: &Arc<Pool>, owner: Option<Arc<crate::door::Reach>>) {
        let Some(health) = pool.config.health.clone() else {
            return;
        };
        let weak: Weak<Pool> = Arc::downgrade(pool);
        let send: Option<Arc<[u8]>> = health.send.as_deref().map(|s| unescape(s).into());
        let expect: Option<Arc<[u8]>> = health.expect.as_deref().map(|s| unescape(s).into());
        // The operator's pools name their servers themselves; a tenant's
        // published ones are its word.
        let vouch = match owner {
            None => crate::door::Vouch::Operator,
            Some(_) => crate::door::Vouch::Chosen,
        };
        tokio::spawn(async move {
            let mut refusals = crate::throttle::EverySecond::default();
            loop {
                tokio::time::sleep(health.interval).await;
                let Some(pool) = weak.upgrade() else { return };
                let mut round = tokio::task::JoinSet::new();
                for backend in &pool.backends {
                    if owner.as_ref().is_some_and(|reach| !reach.probes.take()) {
                        continue;
                    }
                    // Waits for a place among the probes in flight.
                    let Ok(place) = Arc::clone(&PROBES_IN_FLIGHT).acquire_owned().await else {
                        return;
                    };
                    let backend = Arc::clone(backend);
                    let (health, send, expect, owner) = (health.clone(), send.clone(), expect.clone(), owner.clone());
                    round.spawn(async move {
                        let scope = match owner.as_deref() {
                            Some(reach) => crate::door::Scope::Tenant(reach),
                            None => crate::door::Scope::Operator,
                        };
                        let checked = probe(scope, vouch, &backend.addr, send.as_deref(), expect.as_deref());
                        let result = tokio::time::timeout(health.timeout, checked).await;
                        drop(place);
                        match result {
                            Ok(Err(refused)) => Some((backend, refused)),
                            Ok(result) => {
                                backend.checked(result.is_ok_and(|ok| ok), &health);
                                None
                            }
                            Err(_) => {
                                backend.checked(false, &health);
                                None
                            }
                        }
                    });
                }
                drop(pool);
                while let Some(done) = round.join_next().await {
                    // A probe the door refused says nothing of the server:
                    // its state stays, and the refusal is logged (at most
                    // once a second).
                    if let Ok(Some((backend, refused))) = done
                        && let Some(count) = refusals.event()
                    {
                        tracing::warn!(server = %backend.addr, probes = count, "health probe refused: {refused}");
                    }
                }
            }
        });
    }
}

/// Most health probes in flight over the whole process.
pub const MAX_PROBES_IN_FLIGHT: usize = 256;

/// The places of the probes in flight.
static PROBES_IN_FLIGHT: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
    std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(MAX_PROBES_IN_FLIGHT)));

/// One health check through the door: connect, then send and expect if
/// configured. `Ok(false)`: the server failed it.
async fn probe(
    scope: crate::door::Scope<'_>,
    vouch: crate::door::Vouch,
    addr: &HostPort,
    send: Option<&[u8]>,
    expect: Option<&[u8]>,
) -> Result<bool, crate::door::DoorError> {
    let connected = crate::door::connect_host(scope, addr, vouch, crate::door::Purpose::Probe).await;
    let mut stream = match connected {
        Ok(outbound) => outbound,
        Err(e) if e.is_refusal() => return Err(e),
        Err(_) => return Ok(false),
    };
    if let Some(send) = send
        && stream.stream.write_all(send).await.is_err()
    {
        return Ok(false);
    }
    let Some(expect) = expect else { return Ok(true) };
    let mut seen = Vec::new();
    let mut chunk = [0u8; 1024];
    while seen.len() < 64 * 1024 {
        match stream.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(false),
            Ok(n) => {
                seen.extend_from_slice(&chunk[..n]);
                if seen.windows(expect.len().max(1)).any(|w| w == expect) {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// `\r`, `\n`, `\t` and `\\` escapes in health check strings.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('\\') => out.push(b'\\'),
            Some(other) => {
                out.push(b'\\');
                let mut buf = [0u8; 4];
                out.extend_from_slice(other.encode_utf8(&mut buf).as_bytes());
            }
            None => out.push(b'\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ServerConfig;

    fn pool(policy: Policy, weights: &[u32]) -> Pool {
        let servers = weights
            .iter()
            .enumerate()
            .map(|(i, w)| ServerConfig::Weighted {
                address: format!("10.0.0.{}:80", i + 1),
                weight: *w,
                drain: false,
            })
            .collect();
        let config = PoolConfig {
            servers,
            policy,
            health: None,
            passive: PassiveConfig::default(),
            proxy_protocol: None,
            max_attempts: None,
            published_by: None,
        };
        Pool::new("p", &config, None)
    }

    fn firsts(pool: &Pool, n: usize) -> Vec<usize> {
        let mut counts = vec![0; pool.backends().len()];
        for _ in 0..n {
            let first = &pool.candidates()[0];
            let i = pool
                .backends()
                .iter()
                .position(|b| Arc::ptr_eq(b, first))
                .expect("member");
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn policies_share_connections_as_documented() {
        assert_eq!(firsts(&pool(Policy::RoundRobin, &[1, 1, 1]), 300), [100, 100, 100]);
        assert_eq!(firsts(&pool(Policy::Weighted, &[3, 1]), 400), [300, 100]);
        assert_eq!(firsts(&pool(Policy::Weighted, &[5, 3, 2]), 1000), [500, 300, 200]);
        let random = firsts(&pool(Policy::Random, &[1, 1, 1]), 3000);
        assert!(random.iter().all(|n| (800..1200).contains(n)), "{random:?}");
        // Least connections: the fewest active first.
        let least = pool(Policy::LeastConnections, &[1, 1, 1]);
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(BackendGuard::new(Arc::clone(&least.candidates()[0])));
        }
        let active: Vec<usize> = least
            .backends()
            .iter()
            .map(|b| b.active.load(Ordering::Relaxed))
            .collect();
        assert_eq!(active, [2, 2, 2]);
        let guard = held.remove(0);
        let freed = Arc::clone(&guard.0);
        drop(guard);
        assert!(
            Arc::ptr_eq(&least.candidates()[0], &freed),
            "the least loaded comes first"
        );
    }

    #[test]
    fn unavailable_servers_come_last_and_ejection_expires() {
        let p = pool(Policy::RoundRobin, &[1, 1, 1]);
        let passive = PassiveConfig {
            failures: 2,
            eject_for: Duration::from_millis(50),
        };
        p.backends()[0].failed(&passive);
        assert!(p.backends()[0].available(), "one failure is not enough");
        p.backends()[0].failed(&passive);
        assert!(!p.backends()[0].available());
        for _ in 0..6 {
            let order = p.candidates();
            assert_eq!(order.len(), 3);
            assert!(
                Arc::ptr_eq(&order[2], &p.backends()[0]),
                "the ejected one is tried last"
            );
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(p.backends()[0].available());
        let health = HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 2,
            send: None,
            expect: None,
        };
        let b = &p.backends()[1];
        b.checked(false, &health);
        assert!(b.available());
        b.checked(false, &health);
        assert!(!b.available());
        b.checked(true, &health);
        assert!(!b.available());
        b.checked(true, &health);
        assert!(b.available());
    }

    #[test]
    fn escapes_in_health_strings() {
        assert_eq!(unescape("PING\\r\\n"), b"PING\r\n");
        assert_eq!(unescape("a\\\\b\\x"), b"a\\b\\x");
    }

    #[test]
    fn a_draining_server_is_offered_to_no_new_connection() {
        let mut config = pool(Policy::RoundRobin, &[1, 1]).config;
        config.servers[0] = config.servers[0].draining(true);
        let drained = Pool::new("p", &config, None);
        for _ in 0..4 {
            let offered: Vec<String> = drained.candidates().iter().map(|b| b.addr.to_string()).collect();
            assert_eq!(offered, ["10.0.0.2:80"]);
        }
        // Even with the other server down, the draining one is not tried.
        drained.backends()[1].healthy.store(false, Ordering::Relaxed);
        let offered: Vec<String> = drained.candidates().iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(offered, ["10.0.0.2:80"]);
        // Undrained (a new config), the kept backend is offered again.
        let mut undrained = config.clone();
        undrained.servers[0] = undrained.servers[0].draining(false);
        let undrained = Pool::new("p", &undrained, Some(&drained));
        assert!(
            undrained
                .candidates()
                .iter()
                .any(|b| b.addr.to_string() == "10.0.0.1:80")
        );
        assert!(!undrained.backends()[0].draining());
    }
}
