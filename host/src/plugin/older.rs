//! The host side of the older contract versions' imports: each call is the
//! current version's, its arguments and answer converted by
//! [`wit::v0_1`] / [`wit::v0_2`]. Nothing here decides anything.

use crate::plugin::state::State;
use crate::wit;
use crate::wit::v0_2;

impl wit::v0_1::Host for State {}

impl wit::v0_1::host::Host for State {
    fn log(&mut self, level: wit::v0_1::host::Level, message: String) {
        wit::host::Host::log(self, v0_2::host::Level::from(level).into(), message);
    }
}

impl v0_2::host::Host for State {
    fn log(&mut self, level: v0_2::host::Level, message: String) {
        wit::host::Host::log(self, level.into(), message);
    }
}

impl v0_2::counters::Host for State {
    fn hit(&mut self, key: String, window_seconds: u32) -> Result<u64, String> {
        wit::counters::Host::hit(self, key, window_seconds)
    }

    fn peek(&mut self, key: String, window_seconds: u32) -> Result<u64, String> {
        wit::counters::Host::peek(self, key, window_seconds)
    }
}

impl v0_2::metrics::Host for State {
    fn count(&mut self, name: String, label: String, value: u64) -> Result<(), String> {
        wit::metrics::Host::count(self, name, label, value)
    }

    fn observe(&mut self, name: String, label: String, value: f64) -> Result<(), String> {
        wit::metrics::Host::observe(self, name, label, value)
    }
}

impl v0_2::dns::Host for State {
    async fn txt(&mut self, name: String) -> Result<Vec<String>, v0_2::dns::LookupError> {
        Ok(wit::dns::Host::txt(self, name).await?)
    }

    async fn ip(&mut self, name: String) -> Result<Vec<v0_2::IpAddress>, v0_2::dns::LookupError> {
        let found = wit::dns::Host::ip(self, name).await?;
        Ok(found.into_iter().map(v0_2::IpAddress::from).collect())
    }
}

impl v0_2::pools::Host for State {
    fn names(&mut self) -> Vec<String> {
        wit::pools::Host::names(self)
    }

    fn servers(&mut self, pool: String) -> Option<Vec<v0_2::pools::Server>> {
        let servers = wit::pools::Host::servers(self, pool)?;
        Some(servers.into_iter().map(v0_2::pools::Server::from).collect())
    }
}
