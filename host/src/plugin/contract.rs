//! The contract versions a plugin component may speak, and each call made
//! through the one it does: 0.3.0 directly, 0.2.0 through the conversions
//! of [`wit::v0_2`], 0.1.0 through those of [`wit::v0_1`] and then
//! [`wit::v0_2`].

use wasmtime::Store;
use wasmtime::component::{Component, Instance, InstancePre};

use crate::plugin::state::State;
use crate::wit;

/// The contract version a component exports `plugin` of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V0_1,
    V0_2,
    V0_3,
}

impl Version {
    /// The version `component` implements, or what it exports instead.
    pub(crate) fn of(component: &Component, engine: &wasmtime::Engine) -> Result<Version, String> {
        let exports: Vec<String> = component
            .component_type()
            .exports(engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        for name in &exports {
            match name.strip_prefix("weir:plugin/plugin@") {
                Some(version) if version.starts_with("0.1.") => return Ok(Version::V0_1),
                Some(version) if version.starts_with("0.2.") => return Ok(Version::V0_2),
                Some(version) if version.starts_with("0.3.") => return Ok(Version::V0_3),
                _ => {}
            }
        }
        let shown: Vec<String> = exports.iter().take(8).map(|e| format!("`{e}`")).collect();
        Err(format!(
            "it exports no weir:plugin/plugin@0.1.x, @0.2.x or @0.3.x (it exports {})",
            if shown.is_empty() {
                "nothing".to_owned()
            } else {
                shown.join(", ")
            }
        ))
    }
}

impl Version {
    /// The typed exports of `instance`, a component of this version.
    pub(crate) fn exports(self, store: &mut Store<State>, instance: &Instance) -> wasmtime::Result<Exports> {
        Ok(match self {
            Version::V0_1 => Exports::V0_1(wit::v0_1::WeirPlugin::new(store, instance)?),
            Version::V0_2 => Exports::V0_2(wit::v0_2::WeirPlugin::new(store, instance)?),
            Version::V0_3 => Exports::V0_3(wit::WeirPlugin::new(store, instance)?),
        })
    }

    /// The version's number, as the admin API shows it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Version::V0_1 => "0.1.0",
            Version::V0_2 => "0.2.0",
            Version::V0_3 => "0.3.0",
        }
    }
}

/// A component linked for its contract version, ready to instantiate.
pub(crate) enum Pre {
    V0_1(wit::v0_1::WeirPluginPre<State>),
    V0_2(wit::v0_2::WeirPluginPre<State>),
    V0_3(wit::WeirPluginPre<State>),
}

/// An instance's exports.
pub(crate) enum Exports {
    V0_1(wit::v0_1::WeirPlugin),
    V0_2(wit::v0_2::WeirPlugin),
    V0_3(wit::WeirPlugin),
}

impl Pre {
    pub(crate) fn new(pre: InstancePre<State>, version: Version) -> wasmtime::Result<Pre> {
        Ok(match version {
            Version::V0_1 => Pre::V0_1(wit::v0_1::WeirPluginPre::new(pre)?),
            Version::V0_2 => Pre::V0_2(wit::v0_2::WeirPluginPre::new(pre)?),
            Version::V0_3 => Pre::V0_3(wit::WeirPluginPre::new(pre)?),
        })
    }

    pub(crate) fn engine(&self) -> &wasmtime::Engine {
        match self {
            Pre::V0_1(pre) => pre.engine(),
            Pre::V0_2(pre) => pre.engine(),
            Pre::V0_3(pre) => pre.engine(),
        }
    }

    pub(crate) async fn instantiate(&self, store: &mut Store<State>) -> wasmtime::Result<Exports> {
        Ok(match self {
            Pre::V0_1(pre) => Exports::V0_1(pre.instantiate_async(store).await?),
            Pre::V0_2(pre) => Exports::V0_2(pre.instantiate_async(store).await?),
            Pre::V0_3(pre) => Exports::V0_3(pre.instantiate_async(store).await?),
        })
    }
}

impl Exports {
    pub(crate) async fn configure(
        &self,
        store: &mut Store<State>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            Exports::V0_1(e) => e.weir_plugin_plugin().call_configure(store, config).await,
            Exports::V0_2(e) => e.weir_plugin_plugin().call_configure(store, config).await,
            Exports::V0_3(e) => e.weir_plugin_plugin().call_configure(store, config).await,
        }
    }

    pub(crate) async fn route(
        &self,
        store: &mut Store<State>,
        conn: &wit::Connection,
    ) -> wasmtime::Result<wit::Decision> {
        match self {
            Exports::V0_1(e) => {
                let conn = wit::v0_1::Connection::from(conn);
                let decision = e.weir_plugin_plugin().call_route(store, &conn).await?;
                Ok(wit::v0_2::Decision::from(decision).into())
            }
            Exports::V0_2(e) => {
                let conn = wit::v0_2::Connection::from(conn);
                Ok(e.weir_plugin_plugin().call_route(store, &conn).await?.into())
            }
            Exports::V0_3(e) => e.weir_plugin_plugin().call_route(store, conn).await,
        }
    }

    pub(crate) async fn admit(
        &self,
        store: &mut Store<State>,
        conn: &wit::Connection,
        side: wit::Side,
        peer: &wit::Peer,
    ) -> wasmtime::Result<wit::Verdict> {
        match self {
            Exports::V0_1(e) => {
                let conn = wit::v0_1::Connection::from(conn);
                let peer = wit::v0_1::Peer::from(&wit::v0_2::Peer::from(peer));
                let verdict = e
                    .weir_plugin_plugin()
                    .call_admit(store, &conn, side.into(), &peer)
                    .await?;
                Ok(verdict.into())
            }
            Exports::V0_2(e) => {
                let (conn, peer) = (wit::v0_2::Connection::from(conn), wit::v0_2::Peer::from(peer));
                let verdict = e
                    .weir_plugin_plugin()
                    .call_admit(store, &conn, side.into(), &peer)
                    .await?;
                Ok(verdict.into())
            }
            Exports::V0_3(e) => e.weir_plugin_plugin().call_admit(store, conn, side, peer).await,
        }
    }
}
