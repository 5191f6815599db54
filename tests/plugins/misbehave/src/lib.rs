//! A plugin that fails on purpose, for the host's fault tests. Its config picks
//! the failure, and `only_sni` limits it to one server name so the same chain
//! keeps serving everyone else:
//!
//! ```json
//! { "mode": "trap", "only_sni": "bad.test", "pool": "good" }
//! ```
//!
//! Modes: `trap` (panics), `loop` (never returns), `alloc` (allocates without
//! bound), `unknown-pool`, `bad-address`, `bad-proxy-version`, `empty-route`
//! (return invalid decisions), `named-route` (passes through to `pool` under the route name `route`),
//! `log-flood` (logs 1,000 lines of 1 KiB, then routes to `pool`),
//! `count` (logs `configured` in `configure`; passes through to `pool` under
//! the route name `call-N`, N counting the calls this instance has served),
//! `alpn-per-connection` (terminates, with an ALPN
//! name of the connection's own, to `pool`), `read-file`, `socket`, `env` (reach for the
//! host), `next`, `fail-configure` (refuses its config), `slow-configure`
//! (spends `configure_ms` of wall-clock time in `configure`, then accepts),
//! `loop-configure` (never returns from `configure`); in `admit`,
//! `deny-upstream` (denies upstream peers) and `trap-admit` (panics on client
//! peers).
//! Connections that the failure does not apply to pass through to `pool`.
#![deny(unsafe_code)]

use serde::Deserialize;
use weir_plugin_sdk::{
    Connection, Decision, Level, Peer, Plugin, Side, Target, Termination, Verdict, export_plugin, parse_config,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Misbehave {
    mode: String,
    #[serde(default)]
    only_sni: Option<String>,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    configure_ms: u64,
    #[serde(default)]
    route: Option<String>,
}

/// Calls this instance has served (mode `count`).
static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Plugin for Misbehave {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        *self = parse_config(config)?;
        if self.configure_ms > 0 {
            // The wall clock: plugins get no monotonic clock.
            let until = std::time::SystemTime::now() + std::time::Duration::from_millis(self.configure_ms);
            while std::time::SystemTime::now() < until {
                std::hint::spin_loop();
            }
        }
        match self.mode.as_str() {
            "fail-configure" => Err("refusing this config on purpose".into()),
            "slow-configure" => Ok(()),
            "count" => {
                weir_plugin_sdk::log(Level::Info, "configured");
                Ok(())
            }
            "loop-configure" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            _ => Ok(()),
        }
    }

    fn admit(&self, conn: &Connection, side: Side, peer: &Peer) -> Verdict {
        match (self.mode.as_str(), side) {
            ("deny-upstream", Side::Upstream) if self.applies(conn) => {
                Verdict::Deny(format!("upstream `{}` is not trusted here", peer.subject))
            }
            ("trap-admit", Side::Client) if self.applies(conn) => panic!("trapping in admit on purpose"),
            _ => Verdict::Allow,
        }
    }

    fn route(&self, conn: &Connection) -> Decision {
        let applies = self.applies(conn);
        if !applies {
            return match &self.pool {
                Some(pool) => Decision::passthrough("healthy", Target::pool(pool)),
                None => Decision::next(),
            };
        }
        weir_plugin_sdk::log(Level::Info, &format!("misbehaving as `{}`", self.mode));
        match self.mode.as_str() {
            "trap" => panic!("trapping on purpose"),
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "unknown-pool" => Decision::passthrough("bad", Target::pool("no-such-pool")),
            "bad-address" => Decision::passthrough("bad", Target::address("not an address")),
            "bad-proxy-version" => Decision::passthrough("bad", Target::address("127.0.0.1:1").with_proxy_protocol(7)),
            "empty-route" => Decision::passthrough("", Target::address("127.0.0.1:1")),
            "count" => {
                let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Decision::passthrough(
                    format!("call-{n}"),
                    Target::pool(self.pool.as_deref().unwrap_or("good")),
                )
            }
            // A route name of the config's choosing, passed through to `pool`.
            "named-route" => Decision::passthrough(
                self.route.as_deref().unwrap_or("named"),
                Target::pool(self.pool.as_deref().unwrap_or("good")),
            ),
            // 1,000 lines of 1 KiB, then routed as the others.
            "log-flood" => {
                let line = "x".repeat(1024);
                for _ in 0..1000 {
                    weir_plugin_sdk::log(Level::Info, &line);
                }
                match &self.pool {
                    Some(pool) => Decision::passthrough("flooded", Target::pool(pool)),
                    None => Decision::next(),
                }
            }
            // A different termination on every connection: an ALPN name of
            // its own, so no two share a TLS server config.
            "alpn-per-connection" => {
                let mut termination = Termination::plain(Target::pool(self.pool.as_deref().unwrap_or("good")));
                termination.alpn = vec![format!("p{}", conn.id), "http/1.1".into()];
                Decision::terminate("unique", termination)
            }
            // Reaching outside: each must trap or fail, never succeed.
            "read-file" => match std::fs::read("/etc/hostname") {
                Ok(bytes) => Decision::reject("escaped", format!("read {} bytes of a host file", bytes.len())),
                Err(e) => Decision::reject("contained", format!("no file: {e}")),
            },
            "socket" => match std::net::TcpStream::connect("127.0.0.1:9") {
                Ok(_) => Decision::reject("escaped", "opened a socket"),
                Err(e) => Decision::reject("contained", format!("no socket: {e}")),
            },
            "env" => Decision::reject("env", format!("{} variables", std::env::vars_os().count())),
            _ => Decision::next(),
        }
    }
}

impl Misbehave {
    fn applies(&self, conn: &Connection) -> bool {
        match &self.only_sni {
            Some(only) => conn.sni.as_deref() == Some(only.as_str()),
            None => true,
        }
    }
}

export_plugin!(Misbehave);
