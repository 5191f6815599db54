//! `maintenance`: a switch in the config that turns a route into a
//! rejection with a message — flip it and let weir reload.
//!
//! ```toml
//! config = { pool = "app", maintenance = true, message = "back at 14:00 UTC" }
//! ```
//!
//! Route names are `serving` and `maintenance`; the message is the
//! rejection's reason, in weir's log line.

use serde::Deserialize;
use weir_plugin_sdk::{Connection, Decision, Plugin, Target, export_plugin, parse_config};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    pool: String,
    #[serde(default)]
    maintenance: bool,
    #[serde(default = "default_message")]
    message: String,
}

fn default_message() -> String {
    "down for maintenance".into()
}

/// The switch.
#[derive(Debug, Default)]
pub struct Maintenance {
    config: Config,
}

impl Plugin for Maintenance {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.config = parse_config(config)?;
        Ok(())
    }

    fn route(&self, _conn: &Connection) -> Decision {
        match self.config.maintenance {
            true => Decision::reject("maintenance", &self.config.message),
            false => Decision::passthrough("serving", Target::pool(&self.config.pool)),
        }
    }
}

export_plugin!(Maintenance);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_decides() {
        let mut p = Maintenance::default();
        p.configure(r#"{"pool": "app"}"#).expect("valid");
        let conn = Connection::for_test(Some("app.test"), &[]);
        assert_eq!(p.route(&conn), Decision::passthrough("serving", Target::pool("app")));
        p.configure(r#"{"pool": "app", "maintenance": true, "message": "back soon"}"#)
            .expect("valid");
        assert_eq!(p.route(&conn), Decision::reject("maintenance", "back soon"));
    }
}
