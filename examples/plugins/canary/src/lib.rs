//! `canary`: sends a fixed share of clients to a canary pool, the rest to the
//! stable one. A client is placed by a hash of its IP address, so it stays on
//! the same side on every connection (and across reloads).
//!
//! ```toml
//! config = { stable = "app", canary = "app-next", percent = 10, names = ["app.example.com"] }
//! ```
//!
//! `names` limits the plugin to those server names (all when empty); other
//! connections are `next`. Route names are `stable` and `canary`.

use serde::Deserialize;
use weir_plugin_sdk::{Connection, Decision, Plugin, Target, export_plugin, parse_config};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    stable: String,
    canary: String,
    percent: u8,
    #[serde(default)]
    names: Vec<String>,
}

/// The configured split.
#[derive(Debug, Default)]
pub struct Canary {
    config: Config,
}

/// FNV-1a: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Plugin for Canary {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let config: Config = parse_config(config)?;
        if config.percent > 100 {
            return Err(format!("percent is 0 to 100, got {}", config.percent));
        }
        self.config = config;
        Ok(())
    }

    fn route(&self, conn: &Connection) -> Decision {
        let covered = self.config.names.is_empty()
            || conn
                .sni
                .as_deref()
                .is_some_and(|sni| self.config.names.iter().any(|n| n == sni));
        if !covered {
            return Decision::next();
        }
        let slot = fnv1a(conn.client_ip().to_string().as_bytes()) % 100;
        if slot < u64::from(self.config.percent) {
            Decision::passthrough("canary", Target::pool(&self.config.canary))
        } else {
            Decision::passthrough("stable", Target::pool(&self.config.stable))
        }
    }
}

export_plugin!(Canary);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(percent: u8) -> Canary {
        let mut plugin = Canary::default();
        plugin
            .configure(&format!(r#"{{"stable": "s", "canary": "c", "percent": {percent}}}"#))
            .expect("valid");
        plugin
    }

    fn route_from(plugin: &Canary, ip: &str, port: u16) -> String {
        let mut conn = Connection::for_test(Some("app.example.com"), &[]);
        let ip: std::net::IpAddr = ip.parse().expect("an IP address");
        conn.client = std::net::SocketAddr::new(ip, port).into();
        plugin.route(&conn).route
    }

    #[test]
    fn clients_stay_on_their_side_and_the_share_holds() {
        let p = plugin(20);
        let mut canary = 0;
        for i in 0..1000u32 {
            let ip = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
            let first = route_from(&p, &ip, 1000);
            assert_eq!(route_from(&p, &ip, 2000), first, "{ip} moved");
            canary += usize::from(first == "canary");
        }
        assert!((150..250).contains(&canary), "{canary} of 1000 in the canary");
        assert_eq!(route_from(&plugin(0), "10.0.0.1", 1), "stable");
        assert_eq!(route_from(&plugin(100), "10.0.0.1", 1), "canary");
        assert_eq!(route_from(&p, "::1", 1), route_from(&p, "::1", 2));
        assert!(
            Canary::default()
                .configure(r#"{"stable": "s", "canary": "c", "percent": 101}"#)
                .is_err()
        );
    }
}
