//! weir's end-to-end tests, one binary (linking wasmtime once, not once per
//! file): each module starts real gateways, plugins and peers (openssl,
//! curl, psql and PostgreSQL, Pebble) on loopback and checks what they see.
//! Shared helpers are in the `weir-tests` library (`tests/src/lib.rs`).
//!
//! Run one area with `cargo test -p weir-tests --test e2e <module>::`.

mod acme;
mod admin;
mod adversarial;
mod attestation;
mod cache;
mod cli;
mod contract;
mod dashboard;
mod dns01;
mod door;
mod dstack;
mod egress;
mod example_plugins;
mod fleet;
mod fleet_acme;
mod fleet_faults;
mod images;
mod limits;
mod mesh;
mod ocsp;
mod openssl;
mod originate;
mod passthrough;
mod plugin_faults;
mod pools;
mod postgres;
mod proxy_protocol;
mod reload;
mod shadow;
mod signals;
mod sniffing;
mod tenants;
mod termination;
