//! At most `limit` new connections per client IP in a sliding window of
//! `window_seconds`: a chain's first plugin, abstaining (`next`) for
//! clients within their limit and refusing the others with a reason that
//! says their count. Counts live in the host (the `counters` capability),
//! shared by every instance of the plugin and kept across reloads; refusals
//! are counted in `/metrics` (the `metrics` capability) as
//! `weir_plugin_counter_total{plugin=..., name="refused", label="rate-limit"}`.
//!
//! ```toml
//! [plugins.limiter]
//! wasm = "rate_limit.wasm"
//! grants = ["counters", "metrics"]
//! config = { limit = 100, window_seconds = 60 }
//! ```

use serde::Deserialize;
use weir_plugin_sdk::{Connection, Decision, Level, Plugin, counters, export_plugin, log, metrics, parse_config};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// New connections a client may open per window.
    limit: u64,
    /// The sliding window, in seconds (1 to 86400).
    #[serde(default = "a_minute")]
    window_seconds: u32,
}

fn a_minute() -> u32 {
    60
}

#[derive(Default)]
struct RateLimit {
    limit: u64,
    window_seconds: u32,
}

impl Plugin for RateLimit {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let config: Config = parse_config(config)?;
        if config.limit == 0 {
            return Err("limit must be at least 1".into());
        }
        if !(1..=86_400).contains(&config.window_seconds) {
            return Err("window_seconds must be between 1 and 86400".into());
        }
        self.limit = config.limit;
        self.window_seconds = config.window_seconds;
        Ok(())
    }

    fn route(&self, conn: &Connection) -> Decision {
        let client = conn.client_ip().to_string();
        let count = match counters::hit(&client, self.window_seconds) {
            Ok(count) => count,
            Err(error) => {
                // The host refused the count (it never should for an IP):
                // let the connection through rather than refuse everyone.
                log(Level::Warn, &format!("cannot count {client}: {error}"));
                return Decision::next();
            }
        };
        if count <= self.limit {
            return Decision::next();
        }
        if let Err(error) = metrics::count("refused", "rate-limit", 1) {
            log(Level::Warn, &format!("cannot count a refusal: {error}"));
        }
        Decision::reject(
            "rate-limit",
            format!(
                "{client} opened {count} connections in {} s, over its limit of {}",
                self.window_seconds, self.limit
            ),
        )
    }
}

export_plugin!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_plugin_sdk::Action;

    #[test]
    fn a_client_over_its_limit_is_refused_and_others_are_not() {
        let mut plugin = RateLimit::default();
        plugin.configure(r#"{"limit": 2}"#).expect("valid");
        let mut conn = Connection::for_test(Some("app.example.com"), &[]);
        conn.client = std::net::SocketAddr::from(([192, 0, 2, 1], 1000)).into();
        assert_eq!(plugin.route(&conn).action, Action::Next);
        assert_eq!(plugin.route(&conn).action, Action::Next);
        let refused = plugin.route(&conn);
        assert_eq!(refused.route, "rate-limit");
        assert!(
            matches!(&refused.action, Action::Reject(reason) if reason == "192.0.2.1 opened 3 connections in 60 s, over its limit of 2"),
            "{refused:?}"
        );
        conn.client = std::net::SocketAddr::from(([192, 0, 2, 2], 1000)).into();
        assert_eq!(plugin.route(&conn).action, Action::Next, "another client");
        assert!(RateLimit::default().configure(r#"{"limit": 0}"#).is_err());
        assert!(
            RateLimit::default()
                .configure(r#"{"limit": 1, "window_seconds": 0}"#)
                .is_err()
        );
    }
}
