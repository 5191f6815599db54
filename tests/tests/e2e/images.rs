//! `reuse_instances = false` plugins start every instance from their
//! configured image (a snapshot taken once after `configure`): calls decide
//! as they would with `configure` run per instance, no state survives from
//! one call to the next, a config the plugin refuses still fails the load,
//! and the image is kept in the compiled-code cache.

use std::path::Path;
use std::sync::Arc;

use weir::plugin::Runtime;
use weir::{Config, wit};

/// A config with one misbehave plugin, `plugin`, given `settings`.
fn config(settings: &str) -> Config {
    let text = weir_tests::expand(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["plugin"]

        [plugins.plugin]
        wasm = "{{misbehave}}"
        {settings}

        [pools.good]
        servers = ["127.0.0.1:9000"]
        "#
    ));
    Config::parse(&text, Path::new("images.toml")).expect("config")
}

fn connection(id: u64) -> Arc<wit::Connection> {
    Arc::new(wit::Connection {
        id,
        listener: "public".into(),
        tenant: None,
        client: std::net::SocketAddr::from(([127, 0, 0, 1], 40000)).into(),
        local: std::net::SocketAddr::from(([127, 0, 0, 1], 443)).into(),
        protocol: wit::Protocol::Tls,
        sni: Some("a.test".into()),
        alpn: vec![],
        tls_versions: vec![0x0304],
    })
}

fn load(runtime: &Runtime, config: &Config) -> Result<Arc<weir::plugin::Plugin>, weir::plugin::PluginError> {
    let settings = &config.plugins["plugin"];
    runtime
        .load("plugin", &config.resolve(&settings.wasm), settings)
        .map(Arc::new)
}

/// The route names of `calls` calls.
async fn routes(plugin: &Arc<weir::plugin::Plugin>, calls: u64) -> Vec<String> {
    let mut names = Vec::new();
    for id in 1..=calls {
        names.push(plugin.route(&connection(id)).await.expect("routes").route);
    }
    names
}

#[tokio::test]
async fn every_isolated_call_starts_configured_with_nothing_left_by_the_one_before() {
    let runtime = Runtime::new().expect("runtime");
    let counting = r#"config = { mode = "count", pool = "good" }"#;
    // Kept instances count their calls: state survives between them.
    let kept = load(&runtime, &config(counting)).expect("loads");
    assert_eq!(routes(&kept, 3).await, ["call-1", "call-2", "call-3"]);
    // Isolated, from the image or with `configure` per instance: every call
    // is an instance's first.
    for snapshot in [true, false] {
        let settings = format!("{counting}\nreuse_instances = false\nsnapshot = {snapshot}");
        let isolated = load(&runtime, &config(&settings)).expect("loads");
        assert_eq!(routes(&isolated, 20).await, vec!["call-1"; 20], "snapshot = {snapshot}");
    }
}

/// A `configure` slower than the call deadline: with `configure` per
/// instance every call runs out of time; from the image, none runs it.
/// (`configure` spins on the wall clock for longer than the call's wall
/// cap, a second past its deadline, so the call is cut off even when it
/// gets little CPU.)
#[tokio::test]
async fn an_image_takes_configure_off_every_call() {
    let runtime = Runtime::new().expect("runtime");
    let slow = r#"
        config = { mode = "slow-configure", configure_ms = 1500 }
        reuse_instances = false
        timeout = "20ms"
        configure_timeout = "5s"
    "#;
    let imaged = load(&runtime, &config(slow)).expect("loads");
    for id in 1..=5 {
        let decided = imaged.route(&connection(id)).await;
        assert!(decided.is_ok(), "call {id}: {decided:?}");
    }
    // Without the image the load's own instance is configured within
    // `configure_timeout`, and every call's within its `timeout`.
    let per_call = load(&runtime, &config(&format!("{slow}\nsnapshot = false"))).expect("loads");
    let decided = per_call.route(&connection(1)).await;
    let error = decided.expect_err("configure ran in the call").to_string();
    assert!(error.contains("20ms"), "{error}");
}

#[tokio::test]
async fn a_config_the_plugin_refuses_fails_the_load_with_its_reason() {
    let runtime = Runtime::new().expect("runtime");
    let refused = load(
        &runtime,
        &config(
            r#"config = { mode = "fail-configure" }
        reuse_instances = false"#,
        ),
    )
    .expect_err("refused");
    assert!(
        refused.to_string().contains("refusing this config on purpose"),
        "{refused}"
    );
    let endless = load(
        &runtime,
        &config(
            r#"config = { mode = "loop-configure" }
        reuse_instances = false
        configure_timeout = "100ms""#,
        ),
    )
    .expect_err("cut off");
    assert!(endless.to_string().contains("100ms"), "{endless}");
}

fn entries(cache: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found: Vec<_> = std::fs::read_dir(cache)
        .expect("the cache exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .map(|p| {
            let bytes = std::fs::read(&p).expect("entry");
            (p, bytes)
        })
        .collect();
    found.sort();
    found
}

/// The image is compiled once and kept beside the component's own code: a
/// later runtime loads both and decides alike; another config text is
/// another image (the instrumented build serves every config); corrupt
/// entries are compiled and taken again.
#[tokio::test]
async fn images_are_kept_in_the_compiled_code_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let isolated = |pool: &str| {
        config(&format!(
            r#"config = {{ mode = "count", pool = "{pool}" }}
            reuse_instances = false"#
        ))
    };
    let cached = || {
        Runtime::new()
            .expect("runtime")
            .with_cache(&cache, 1 << 30)
            .expect("cache")
    };
    let first = load(&cached(), &isolated("good")).expect("loads");
    let expected = routes(&first, 2).await;
    let written = entries(&cache);
    assert_eq!(written.len(), 3, "the component, its instrumented build and its image");

    let again = load(&cached(), &isolated("good")).expect("loads");
    assert_eq!(routes(&again, 2).await, expected);
    assert_eq!(entries(&cache), written, "loaded, not written again");

    let other = load(&cached(), &isolated("other")).expect("loads");
    let decision = other.route(&connection(1)).await.expect("routes");
    assert!(format!("{:?}", decision.action).contains("\"other\""), "{decision:?}");
    assert_eq!(
        entries(&cache).len(),
        4,
        "a config of its own is an image of its own, from the same instrumented build"
    );

    // Every entry corrupted: each is compiled (or taken) again, written
    // again, and the calls decide as before.
    let mut corrupted = Vec::new();
    for (path, bytes) in &written {
        let mut corrupt = bytes.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0x40;
        std::fs::write(path, &corrupt).expect("write");
        corrupted.push((path.clone(), corrupt));
    }
    let retaken = load(&cached(), &isolated("good")).expect("loads");
    assert_eq!(routes(&retaken, 2).await, expected);
    let rewritten = entries(&cache);
    for (path, corrupt) in &corrupted {
        let now = rewritten.iter().find(|(p, _)| p == path).expect("still there");
        assert_ne!(&now.1, corrupt, "{} was not written again", path.display());
    }
}

/// What `configure` may have read through a capability is in the image, so
/// a granted plugin's image is taken at each load and never written to the
/// cache, where a later start would find it stale.
#[tokio::test]
async fn a_granted_plugins_image_is_not_kept_on_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let granted = config(
        r#"config = { mode = "count", pool = "good" }
        reuse_instances = false
        grants = ["counters"]"#,
    );
    for _ in 0..2 {
        let runtime = Runtime::new()
            .expect("runtime")
            .with_cache(&cache, 1 << 30)
            .expect("cache");
        let plugin = load(&runtime, &granted).expect("loads");
        assert_eq!(routes(&plugin, 3).await, vec!["call-1"; 3]);
        assert_eq!(
            entries(&cache).len(),
            2,
            "the component and its instrumented build only"
        );
    }
}
