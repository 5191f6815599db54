//! Steers each connection to the server of a pool that has the fewest
//! connections in progress right now, among those up and not draining, and
//! passes it through to that server's address; with none up, it refuses the
//! connection saying so. It reads the pool through the host's read-only view
//! (the `pools` capability: `grants = ["pools"]`), which shows only the pools
//! the plugin may name (a tenant's plugin: its tenant's).
//!
//! ```toml
//! [plugins.steer]
//! wasm = "least_loaded.wasm"
//! grants = ["pools"]
//! config = { pool = "app" }
//! ```

use serde::Deserialize;
use weir_plugin_sdk::{Connection, Decision, Plugin, Target, export_plugin, parse_config, pools};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The pool to steer within.
    pool: String,
}

#[derive(Default)]
struct LeastLoaded {
    pool: String,
}

impl Plugin for LeastLoaded {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        let config: Config = parse_config(config)?;
        if config.pool.is_empty() {
            return Err("pool must name a pool".into());
        }
        self.pool = config.pool;
        Ok(())
    }

    fn route(&self, _conn: &Connection) -> Decision {
        let Some(servers) = pools::servers(&self.pool) else {
            return Decision::reject(
                "least-loaded",
                format!("pool `{}` is not one this plugin may see", self.pool),
            );
        };
        let best = servers
            .iter()
            .filter(|s| s.up && !s.draining)
            .min_by_key(|s| (s.active, std::cmp::Reverse(s.weight)));
        match best {
            Some(server) => Decision::passthrough("least-loaded", Target::address(&server.address)),
            None => Decision::reject("least-loaded", format!("no server of pool `{}` is up", self.pool)),
        }
    }
}

export_plugin!(LeastLoaded);
