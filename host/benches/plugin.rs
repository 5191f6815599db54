//! A plugin `route` call as the gateway makes it: on a warm, configured
//! instance (the default), and with a fresh instance per call
//! (`reuse_instances = false`, from the configured image and with `configure`
//! run per call), all with the static-router plugin; and the
//! warm call of static-router's `weir:plugin@0.1.0` build (addresses as
//! strings, converted by the host) and its 0.2.0 build (typed addresses,
//! converted from 0.3.0's records) beside its current 0.3.0 build.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use weir::Config;
use weir::plugin::Runtime;
use weir::wit;

fn router_config(reuse: bool, snapshot: bool) -> Config {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    router_config_for(
        &root.join("target/wasm32-wasip2/release/static_router.wasm"),
        reuse,
        snapshot,
    )
}

fn router_config_for(wasm: &Path, reuse: bool, snapshot: bool) -> Config {
    assert!(
        wasm.exists(),
        "{} is missing: run scripts/build-plugins.sh",
        wasm.display()
    );
    let text = format!(
        r#"
        [listeners.bench]
        bind = "127.0.0.1:0"
        plugins = ["router"]

        [plugins.router]
        wasm = "{}"
        reuse_instances = {reuse}
        snapshot = {snapshot}
        config.routes."a.example.com" = {{ pool = "app" }}
        config.routes."*.example.net" = {{ address = "127.0.0.1:9000" }}
        config.default = {{ reject = "unknown" }}

        [pools.app]
        servers = ["127.0.0.1:9001"]
        "#,
        wasm.display()
    );
    Config::parse(&text, Path::new("bench.toml")).expect("bench config")
}

fn connection() -> Arc<wit::Connection> {
    Arc::new(wit::Connection {
        id: 1,
        listener: "bench".into(),
        tenant: None,
        client: std::net::SocketAddr::from(([127, 0, 0, 1], 40000)).into(),
        local: std::net::SocketAddr::from(([127, 0, 0, 1], 443)).into(),
        protocol: wit::Protocol::Tls,
        sni: Some("x.example.net".into()),
        alpn: vec!["h2".into(), "http/1.1".into()],
        tls_versions: vec![0x0304, 0x0303],
    })
}

/// Benchmarks `route` of the config's `router` plugin, after one call;
/// under a tenant's budget (one it never spends) when `budget`.
fn bench_router(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &Runtime,
    (name, budget): (&str, bool),
    config: &Config,
    conn: &Arc<wit::Connection>,
) {
    let settings = &config.plugins["router"];
    let plugin = runtime
        .load("router", &config.resolve(&settings.wasm), settings)
        .expect("loads");
    if budget {
        plugin.set_budget(Some(weir::plugin::Budget::new(std::time::Duration::from_secs(64), 64)));
    }
    let plugin = Arc::new(plugin);
    let call = |conn: &Arc<wit::Connection>| futures_executor::block_on(plugin.route(conn)).expect("routes");
    call(conn);
    group.bench_function(name, |b| b.iter(|| call(black_box(conn))));
}

fn route(c: &mut Criterion) {
    let runtime = Runtime::new().expect("engine");
    let conn = connection();
    let mut group = c.benchmark_group("plugin_route");
    for (name, reuse, snapshot, budget) in [
        ("warm_instance", true, true, false),
        ("fresh_instance", false, true, false),
        ("fresh_instance_configured_per_call", false, false, false),
        ("warm_instance_in_a_tenants_budget", true, true, true),
    ] {
        let config = router_config(reuse, snapshot);
        bench_router(&mut group, &runtime, (name, budget), &config, &conn);
    }
    group.finish();
}

/// static-router's 0.1.0 and 0.2.0 builds (kept in tests/contract-0.*) and
/// its current 0.3.0 build, warm: what each older contract's conversions
/// cost per call.
fn contracts(c: &mut Criterion) {
    let runtime = Runtime::new().expect("engine");
    let conn = connection();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut group = c.benchmark_group("contract_route");
    for (name, wasm) in [
        ("v0_1_0", root.join("tests/contract-0.1.0/static_router.wasm")),
        ("v0_2_0", root.join("tests/contract-0.2.0/static_router.wasm")),
        ("v0_3_0", root.join("target/wasm32-wasip2/release/static_router.wasm")),
    ] {
        let config = router_config_for(&wasm, true, true);
        bench_router(&mut group, &runtime, (name, false), &config, &conn);
    }
    group.finish();
}

/// The ALPN router example in Rust and its Python (componentize-py) and
/// JavaScript (componentize-js) twins, same config, same connection: the
/// cost of writing a plugin in either.
fn languages(c: &mut Criterion) {
    let runtime = Runtime::new().expect("engine");
    let conn = connection();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut group = c.benchmark_group("alpn_router_call");
    for (name, file) in [
        ("rust", "alpn_router.wasm"),
        ("python", "alpn_router_py.wasm"),
        ("javascript", "alpn_router_js.wasm"),
    ] {
        let wasm = root.join("target/wasm32-wasip2/release").join(file);
        if !wasm.exists() {
            eprintln!("{} is missing: build the example plugins first", wasm.display());
            continue;
        }
        let text = format!(
            r#"
            [listeners.bench]
            bind = "127.0.0.1:0"
            plugins = ["alpn"]
            [plugins.alpn]
            wasm = "{}"
            timeout = "100ms"
            config = {{ protocols = {{ h2 = "grpc", "http/1.1" = "web" }}, default = "web" }}
            [pools.grpc]
            servers = ["127.0.0.1:1"]
            [pools.web]
            servers = ["127.0.0.1:2"]
            "#,
            wasm.display()
        );
        let config = Config::parse(&text, &root.join("bench.toml")).expect("valid");
        let plugin = runtime
            .load(
                "alpn",
                &config.resolve(&config.plugins["alpn"].wasm),
                &config.plugins["alpn"],
            )
            .expect("loads");
        let plugin = Arc::new(plugin);
        let call = |conn: &Arc<wit::Connection>| futures_executor::block_on(plugin.route(conn)).expect("routes");
        call(&conn);
        group.bench_function(name, |b| b.iter(|| call(black_box(&conn))));
    }
    group.finish();
}

criterion_group!(benches, route, contracts, languages);
criterion_main!(benches);
