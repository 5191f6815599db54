//! What a plugin component may import: weir's host interface, the harmless
//! parts of WASI, and traps for everything else.

use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use crate::plugin::state::State;

/// Interfaces (without their version) that plugins get for real; every
/// other import is linked to a trap by [`stub_unprovided_imports`].
pub(crate) const PROVIDED_INTERFACES: &[&str] = &[
    "weir:plugin/host",
    "weir:plugin/types",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/environment",
    "wasi:cli/exit",
];

/// Links the WASI interfaces that give a plugin nothing of the outside world
/// and never block: the wall clock, random numbers, an empty environment,
/// exit. (The monotonic clock is left out: its pollables need `wasi:io`.)
pub(crate) fn link_harmless_wasi(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::{cli, clocks, random};
    use wasmtime_wasi::{cli::WasiCli, clocks::WasiClocks, random::WasiRandom};
    use wasmtime_wasi::{cli::WasiCliView as _, clocks::WasiClocksView as _, random::WasiRandomView as _};
    clocks::wall_clock::add_to_linker::<State, WasiClocks>(linker, |s| s.clocks())?;
    random::random::add_to_linker::<State, WasiRandom>(linker, |s| s.random())?;
    random::insecure::add_to_linker::<State, WasiRandom>(linker, |s| s.random())?;
    random::insecure_seed::add_to_linker::<State, WasiRandom>(linker, |s| s.random())?;
    cli::environment::add_to_linker::<State, WasiCli>(linker, |s| s.cli())?;
    cli::exit::add_to_linker::<State, WasiCli>(linker, |s| s.cli())?;
    Ok(())
}

/// Links every import of `component` outside [`PROVIDED_INTERFACES`] to a
/// function that traps, naming what the plugin reached for. (wasmtime's own
/// `define_unknown_imports_as_traps` would also shadow the provided WASI
/// interfaces when the guest asks for an older 0.2.x version of them.)
pub(crate) fn stub_unprovided_imports(
    linker: &mut Linker<State>,
    component: &Component,
    engine: &Engine,
) -> wasmtime::Result<()> {
    use wasmtime::component::ResourceType;
    use wasmtime::component::types::ComponentItem;
    for (name, item) in component.component_type().imports(engine) {
        let interface = name.split_once('@').map_or(name, |(interface, _version)| interface);
        // Capabilities are linked as granted, or refused before this.
        if PROVIDED_INTERFACES.contains(&interface) || crate::config::Capability::of_import(name).is_some() {
            continue;
        }
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            wasmtime::bail!("unsupported import `{name}`");
        };
        let mut stubs = linker.instance(name)?;
        for (export, item) in instance.exports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(_) => {
                    let what = format!("{name}#{export}");
                    stubs.func_new(export, move |_, _, _, _| {
                        wasmtime::bail!("called `{what}`, which weir does not give plugins")
                    })?;
                }
                ComponentItem::Resource(_) => stubs.resource(export, ResourceType::host::<()>(), |_, _| Ok(()))?,
                _ => {}
            }
        }
    }
    Ok(())
}
