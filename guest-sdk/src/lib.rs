//! The weir plugin SDK: write a routing or policy plugin as a struct and one
//! `impl`, build it for `wasm32-wasip2`, and weir loads it.
//!
//! ```
//! use weir_plugin_sdk::{export_plugin, Connection, Decision, Plugin, Target};
//!
//! #[derive(Default)]
//! struct EverythingToOnePool;
//!
//! impl Plugin for EverythingToOnePool {
//!     fn route(&self, conn: &Connection) -> Decision {
//!         match &conn.sni {
//!             Some(_) => Decision::passthrough("all", Target::pool("backends")),
//!             None => Decision::reject("no-sni", "a server name is required"),
//!         }
//!     }
//! }
//!
//! export_plugin!(EverythingToOnePool);
//! ```
//!
//! The generated WIT bindings stay inside this crate; plugins see the data
//! types re-exported here, the [`Plugin`] trait and [`export_plugin!`]. Plugin
//! logic compiles natively too, so it can be unit-tested with `cargo test`.
//!
//! Without its default `bindings` feature this crate is only the rules the
//! host shares with plugins: [`names`] (host names), [`hex`] and [`proxy`]
//! (the PROXY protocol versions).
#![deny(unsafe_code)]

pub mod hex;
pub mod names;
pub mod proxy;

#[cfg(feature = "bindings")]
mod addr;
#[cfg(feature = "bindings")]
mod caps;
#[cfg(feature = "bindings")]
pub use caps::{counters, dns, metrics, pools};
#[cfg(feature = "bindings")]
mod sdk;
#[cfg(feature = "bindings")]
pub use sdk::*;
