//! The compiled-code cache through the `weir` binary: a cached `weir route`
//! decides as an uncached one, a corrupt or foreign entry is compiled again
//! (and said so), a cache directory others can write is refused.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use weir_tests::write_config;

use weir_tests::{run_weir as weir, text};

/// A static-router and a mesh-router config with its cache in `cache`.
fn config(dir: &Path, cache: &Path) -> String {
    let toml = format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
plugins = ["router", "mesh"]

[plugins.router]
wasm = "{{static_router}}"
config.routes."app.test" = {{ pool = "app" }}

[plugins.mesh]
wasm = "{{mesh_router}}"
config = """
tcp:
  routers:
    db:
      rule: "HostSNI(`db.test`)"
      service: db
      tls:
        passthrough: true
  services:
    db:
      loadBalancer:
        servers:
          - address: "127.0.0.1:5432"
"""

[pools.app]
servers = ["127.0.0.1:9000"]

[cache]
dir = "{}"
"#,
        cache.display()
    );
    write_config(dir, &toml).display().to_string()
}

/// `weir route` for `sni`: its JSON decision, and what it logged.
fn route(config: &str, sni: &str, extra: &[&str]) -> (serde_json::Value, String) {
    let mut args = vec!["route", "--config", config, "--listener", "public", "--sni", sni];
    args.extend_from_slice(extra);
    let out = weir(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut decision: serde_json::Value = serde_json::from_str(&text(&out.stdout)).expect("one JSON object");
    // Timings differ from run to run; the decision must not.
    for step in decision["steps"].as_array_mut().expect("steps") {
        step["micros"] = serde_json::Value::Null;
    }
    (decision, text(&out.stderr))
}

fn entries(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(cache)
        .expect("the cache exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    found.sort();
    found
}

#[test]
fn a_cached_route_decides_as_an_uncached_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let config = config(dir.path(), &cache);

    let (uncached_app, _) = route(&config, "app.test", &["--no-cache"]);
    let (uncached_db, _) = route(&config, "db.test", &["--no-cache"]);
    assert!(!cache.exists(), "--no-cache wrote to the cache");

    let (first, _) = route(&config, "app.test", &[]);
    assert_eq!(entries(&cache).len(), 2, "one entry per component");
    let mode = std::fs::metadata(&cache).expect("cache dir").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let written: Vec<_> = entries(&cache)
        .iter()
        .map(|p| std::fs::read(p).expect("entry"))
        .collect();
    let (cached_app, _) = route(&config, "app.test", &[]);
    let (cached_db, _) = route(&config, "db.test", &[]);
    assert_eq!(first, uncached_app);
    assert_eq!(cached_app, uncached_app);
    assert_eq!(cached_db, uncached_db);
    assert_eq!(cached_db["decision"]["route"], "db");
    // Loaded, not rewritten.
    let now: Vec<_> = entries(&cache)
        .iter()
        .map(|p| std::fs::read(p).expect("entry"))
        .collect();
    assert_eq!(now, written);

    // `weir cache prune` keeps good entries within the bound.
    let out = weir(&["cache", "prune", "--config", &config]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("0 entries removed"), "{}", text(&out.stdout));
    assert_eq!(entries(&cache).len(), 2);
}

#[test]
fn a_corrupt_or_foreign_entry_is_compiled_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let config = config(dir.path(), &cache);
    let (expected, _) = route(&config, "db.test", &[]);
    let found = entries(&cache);
    assert_eq!(found.len(), 2);
    let (a, b) = (found[0].clone(), found[1].clone());
    let good_a = std::fs::read(&a).expect("entry");

    // One byte of compiled code flipped.
    let mut corrupt = good_a.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    std::fs::write(&a, &corrupt).expect("write");
    // The other component's entry under this one's name.
    std::fs::write(&b, &good_a).expect("write");

    let (decided, log) = route(&config, "db.test", &[]);
    assert_eq!(decided, expected);
    assert!(log.contains("corrupt or foreign; compiling again"), "{log}");
    assert!(log.contains("checksum does not match"), "{log}");
    assert!(log.contains("the entry of another component or engine"), "{log}");
    // Both were written again, whole: the next run uses them as they are.
    assert_ne!(std::fs::read(&a).expect("entry"), corrupt);
    assert_ne!(std::fs::read(&b).expect("entry"), good_a);
    let (again, log) = route(&config, "db.test", &[]);
    assert_eq!(again, expected);
    assert!(!log.contains("compiling again"), "{log}");
}

#[test]
fn a_cache_directory_others_can_write_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).expect("mkdir");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let config = config(dir.path(), &cache);
    let out = weir(&["check", "--config", &config]);
    assert!(!out.status.success(), "weir check used a world-writable cache");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("plugin cache {}", cache.display())),
        "{stderr}"
    );
    assert!(stderr.contains("mode 777 lets others write to it"), "{stderr}");
    // The same config without the cache works.
    let out = weir(&["check", "--config", &config, "--no-cache"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
