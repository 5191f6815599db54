//! A `reuse_instances = false` plugin's configured image: its component
//! rewritten by wasmtime-wizer so that its linear memories and globals
//! start as `configure` left them. Every fresh instance then starts
//! configured, from the pooling allocator's copy-on-write image of that
//! memory, instead of running `configure` again on every call.
//!
//! How an image is taken: the component is instrumented (an extra export
//! reads out every memory and global), instantiated and configured exactly
//! as the gateway does it (same linker, grants, memory cap and deadline),
//! then read and rewritten. The image is compiled like any component, and
//! kept in the compiled-code cache under a key of the component's SHA-256
//! and the config text, so a later start loads it without taking it again.
//!
//! What an image cannot carry: host-side state (WASI handles, resources
//! the guest holds) is not in linear memory; a component that keeps one
//! from `configure` finds it missing and traps. Every instance starts
//! from the same bytes, so random numbers drawn in `configure` (a seeded
//! generator, a hash map's keys) are the same in every instance; draw them
//! in the call, or set the plugin's `snapshot = false`. Components that
//! wizer cannot rewrite (a nested component holding modules, a module
//! instantiated twice — some guest toolchains make these) are configured
//! per instance as before, and the load says why.

use wasmtime::Store;
use wasmtime::component::{Component, Instance, Linker};
use wasmtime_wizer::{ComponentContext, ComponentInstanceState, Wizer};

use crate::plugin::state::State;
use crate::plugin::{Plugin, PluginError, cache};

/// The version of how images are taken; part of every image's key, so a
/// change to it takes images again instead of loading old ones.
const IMAGE_FORMAT: &[u8] = b"weir-configured-image-1\0";

/// The compiled-code key of the image of the component with SHA-256
/// `component` configured with `config`.
pub(crate) fn key(component: &[u8; 32], config: &str) -> [u8; 32] {
    cache::sha256(&[IMAGE_FORMAT, component, config.as_bytes()])
}

/// Why no image was taken.
pub(crate) enum Refused {
    /// The component cannot be imaged; it is configured per instance.
    Unsupported(String),
    /// `configure` failed (or trapped, or ran out of time or memory): the
    /// config is refused, as it would be without an image.
    Plugin(PluginError),
}

/// The compiled-code key of the instrumented build of the component with
/// SHA-256 `component` (the same for every config).
pub(crate) fn instrumented_key(component: &[u8; 32]) -> [u8; 32] {
    cache::sha256(&[IMAGE_FORMAT, b"instrumented\0", component])
}

/// [`take`], to its end, on this thread. Wizer rewrites what the plugin's
/// author wrote, and some of its checks are assertions: a panic there
/// refuses the image, not the load (nor the gateway).
pub(crate) fn take_now(
    plugin: &Plugin,
    linker: &Linker<State>,
    bytes: &[u8],
    compile: impl FnOnce(&[u8]) -> Result<Component, String>,
) -> Result<Vec<u8>, Refused> {
    let taking = std::panic::AssertUnwindSafe(|| futures_executor::block_on(take(plugin, linker, bytes, compile)));
    std::panic::catch_unwind(taking).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Refused::Unsupported(format!("wizer failed on it: {what}")))
    })
}

/// Takes the configured image of `plugin`, whose component's bytes are
/// `bytes`, linked by `linker`: the rewritten component's bytes. `compile`
/// compiles the instrumented build (through the caches: it is the same for
/// every config of the component).
async fn take(
    plugin: &Plugin,
    linker: &Linker<State>,
    bytes: &[u8],
    compile: impl FnOnce(&[u8]) -> Result<Component, String>,
) -> Result<Vec<u8>, Refused> {
    let unsupported = |what: &str, e: wasmtime::Error| Refused::Unsupported(format!("{what}: {e:#}"));
    let wizer = Wizer::new();
    let (context, instrumented) = wizer
        .instrument_component(bytes)
        .map_err(|e| unsupported("wizer cannot instrument it", e))?;
    let component = compile(&instrumented)
        .map_err(|e| Refused::Unsupported(format!("its instrumented build does not compile: {e}")))?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| unsupported("its instrumented build does not link", e))?;
    let budget = plugin.configure_timeout;
    // The epoch ticker runs while this is busy: without it no deadline
    // would cut off a `configure` that never returns.
    let _busy = plugin.ticker.busy();
    let mut store = plugin.new_store(budget, false);
    let configuring = async {
        let instance = pre.instantiate_async(&mut store).await?;
        let exports = plugin.version.exports(&mut store, &instance)?;
        super::instance::arm(&mut store, budget);
        let configured = exports.configure(&mut store, &plugin.config).await?;
        Ok::<_, wasmtime::Error>((instance, configured))
    };
    let (instance, configured) = configuring
        .await
        .map_err(|e| Refused::Plugin(plugin.classify(e, &store, budget)))?;
    configured.map_err(|reason| Refused::Plugin(PluginError::Configure(reason)))?;
    super::instance::arm(&mut store, budget);
    read_out(&wizer, &context, store, instance).await
}

/// Reads the configured state out of `instance` and rewrites the component
/// with it.
async fn read_out(
    wizer: &Wizer,
    context: &ComponentContext<'_>,
    mut store: Store<State>,
    instance: Instance,
) -> Result<Vec<u8>, Refused> {
    let mut access = Access {
        store: &mut store,
        instance,
        failed: None,
    };
    let image = wizer.snapshot_component(context, &mut access).await;
    if let Some(reason) = access.failed {
        return Err(Refused::Unsupported(format!("reading its state failed: {reason}")));
    }
    image.map_err(|e| Refused::Unsupported(format!("wizer cannot rewrite it: {e:#}")))
}

/// The instrumented instance, as wizer reads it. Wizer's calls cannot fail,
/// so the first failure is kept and the image discarded.
struct Access<'a> {
    store: &'a mut Store<State>,
    instance: Instance,
    failed: Option<String>,
}

impl Access<'_> {
    /// Calls the accessor `func` of the exported instance `instance`.
    async fn call<R>(&mut self, instance: &str, func: &str) -> Option<R>
    where
        R: wasmtime::component::Lift + Send + Sync + 'static,
    {
        if self.failed.is_some() {
            return None;
        }
        let called = async {
            let (_, exported) = self
                .instance
                .get_export(&mut *self.store, None, instance)
                .ok_or_else(|| wasmtime::format_err!("no export `{instance}`"))?;
            let (_, index) = self
                .instance
                .get_export(&mut *self.store, Some(&exported), func)
                .ok_or_else(|| wasmtime::format_err!("no export `{instance}#{func}`"))?;
            let typed = self.instance.get_typed_func::<(), (R,)>(&mut *self.store, index)?;
            Ok::<_, wasmtime::Error>(typed.call_async(&mut *self.store, ()).await?.0)
        };
        match called.await {
            Ok(value) => Some(value),
            Err(e) => {
                self.failed = Some(format!("{instance}#{func}: {e:#}"));
                None
            }
        }
    }

    async fn number<R>(&mut self, instance: &str, func: &str) -> R
    where
        R: wasmtime::component::Lift + Default + Send + Sync + 'static,
    {
        self.call(instance, func).await.unwrap_or_default()
    }
}

impl ComponentInstanceState for Access<'_> {
    async fn call_func_ret_list_u8(&mut self, instance: &str, func: &str, contents: impl FnOnce(&[u8]) + Send) {
        match self.call::<wasmtime::component::WasmList<u8>>(instance, func).await {
            Some(list) => contents(list.as_le_slice(&*self.store)),
            None => contents(&[]),
        }
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.number(instance, func).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.number(instance, func).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.number::<f32>(instance, func).await.to_bits()
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.number::<f64>(instance, func).await.to_bits()
    }
}
