//! The `weir` binary as operators use it: `check` refuses broken configs and
//! broken plugins with a message that names the problem, `route` prints the
//! chain's decision as JSON without opening sockets, and `run` serves and
//! logs one line per connection.

use std::path::Path;
use std::process::Command;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use weir_tests::{Upstream, WeirProcess, read_to_end, testdata, weir_binary, workspace, write_config};

use weir_tests::{run_weir as weir, text};

/// Writes `toml` (placeholders expanded) to a config file in `dir`.
fn config_file(dir: &Path, toml: &str) -> String {
    write_config(dir, toml).display().to_string()
}

const ROUTER: &str = r#"
[listeners.public]
bind = "127.0.0.1:0"
plugins = ["router"]

[plugins.router]
wasm = "{static_router}"
config.routes."app.test" = { pool = "app" }
config.routes."*.api.test" = { address = "127.0.0.1:9001" }
config.default = { reject = "unknown name" }

[pools.app]
servers = ["127.0.0.1:9000"]
"#;

/// Checks a copy of an example config whose `run/` directory (written by
/// the example's script) holds a CA and the certificates `certificates`
/// (file name, names covered) minted here, with the built plugins.
fn check_example(example: &str, certificates: &[(&str, &[&str])], expected: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = dir.path().join("run");
    std::fs::create_dir(&run).expect("run dir");
    let pki = weir_tests::Pki::new("example test CA");
    pki.write_ca(&run, "ca");
    for (file, names) in certificates {
        pki.server(names).write(&run, file);
    }
    let source = workspace().join("examples").join(example);
    let mut config = std::fs::read_to_string(source.join("weir.toml")).expect("example config");
    // Files the config names beside it (e.g. a plugin's config_file).
    for entry in std::fs::read_dir(&source).expect("example dir").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
            std::fs::copy(&path, dir.path().join(entry.file_name())).expect("copy");
        }
    }
    for plugin in [
        "static-router",
        "dstack-router",
        "mesh-router",
        "canary",
        "alpn-router",
        "maintenance",
    ] {
        let built = weir_tests::plugin(plugin).display().to_string();
        for up in ["../../../", "../../"] {
            let file = format!("{up}target/wasm32-wasip2/release/{}.wasm", plugin.replace('-', "_"));
            config = config.replace(&file, &built);
        }
    }
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, config).expect("write config");
    let out = weir(&["check", "--config", &path.display().to_string()]);
    assert!(out.status.success(), "{example}: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains(expected), "{example}: {}", text(&out.stdout));
}

#[test]
fn check_accepts_the_example_configs() {
    check_example(
        "quickstart",
        &[("weir", &["web.localhost", "secure.localhost"])],
        "ok (1 listeners, 1 plugins, 1 pools)",
    );
    check_example(
        "dstack",
        &[("wildcard", &["*.dstack.localhost"])],
        "ok (1 listeners, 1 plugins, 0 pools)",
    );
    check_example("plugins/canary", &[], "ok (1 listeners, 1 plugins, 2 pools)");
    check_example("plugins/alpn-router", &[], "ok (1 listeners, 1 plugins, 3 pools)");
    check_example("plugins/maintenance", &[], "ok (1 listeners, 1 plugins, 1 pools)");
    check_example(
        "mesh",
        &[("web", &["web.mesh.localhost", "admin.mesh.localhost"])],
        "ok (1 listeners, 1 plugins, 0 pools)",
    );
}

#[test]
fn check_names_the_file_field_and_reason_of_a_broken_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        (ROUTER.replace("bind =", "bnid ="), "unknown field `bnid`"),
        (
            ROUTER.replace("plugins = [\"router\"]", "plugins = [\"ruoter\"]"),
            "listeners.public.plugins: no plugin named `ruoter`",
        ),
        (
            ROUTER.replace("127.0.0.1:9000", "127.0.0.1"),
            "pools.app.servers: `127.0.0.1` is not host:port: no port",
        ),
        (
            ROUTER.replace("[pools.app]", "[pools.app"),
            "unclosed table, expected `]`",
        ),
        (
            ROUTER.replace("{ pool = \"app\" }", "{ pol = \"app\" }"),
            "plugins.router: configure refused the config: invalid plugin config: unknown field `pol`",
        ),
        (
            format!("{ROUTER}\n[tenants.a]\ndomains = [\"a.test\"]\nplugins = [\"router\"]\n"),
            "tenants.a.plugins: plugin `router` is also used by listener `public`",
        ),
        (
            format!(
                "{ROUTER}\n[plugins.own]\nwasm = \"{{static_router}}\"\n[tenants.a]\ndomains = [\"a.test\"]\nplugins = [\"own\"]\nmax_plugin_memory_mib = 8\n"
            ),
            "plugins.own.max_memory_mib: 16 MiB exceeds tenant `a`'s max_plugin_memory_mib of 8",
        ),
        (
            format!(
                "{ROUTER}\n[plugins.own]\nwasm = \"{{static_router}}\"\n[plugins.other]\nwasm = \"{{static_router}}\"\n[tenants.a]\ndomains = [\"A.test.\"]\nplugins = [\"own\"]\n[tenants.b]\ndomains = [\"a.test\"]\nplugins = [\"other\"]\n"
            ),
            "tenants.b.domains: `a.test` is also tenant `a`'s",
        ),
        (
            format!(
                "{ROUTER}\n[plugins.own]\nwasm = \"{{static_router}}\"\n[tenants.a]\ndomains = [\"a.test\"]\nplugins = [\"own\"]\npools = [\"nope\"]\n"
            ),
            "tenants.a.pools: no pools entry named `nope`",
        ),
        (
            ROUTER.replace("wasm =", "config_file = \"routes.json\"\nwasm ="),
            "plugins.router.config_file: give `config` or `config_file`, not both",
        ),
        (
            ROUTER
                .replace(
                    "config.routes.\"app.test\" = { pool = \"app\" }\n",
                    "config_file = \"missing.json\"\n",
                )
                .replace("config.routes.\"*.api.test\" = { address = \"127.0.0.1:9001\" }\n", "")
                .replace("config.default = { reject = \"unknown name\" }\n", ""),
            "missing.json: No such file or directory",
        ),
    ];
    for (toml, expected) in cases {
        let path = config_file(dir.path(), &toml);
        let out = weir(&["check", "--config", &path]);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "accepted a config that should fail with {expected}"
        );
        assert!(stderr.contains(&path), "the message does not name the file: {stderr}");
        assert!(stderr.contains(expected), "expected `{expected}` in: {stderr}");
    }
}

#[test]
fn check_names_broken_certificates_cas_and_tls_settings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = weir_tests::Pki::new("check CA");
    let (cert, key) = pki.server(&["a.test"]).write(dir.path(), "site");
    let (_, other_key) = pki.server(&["b.test"]).write(dir.path(), "other");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let section = |cert: &Path, key: &Path| {
        format!(
            "{ROUTER}\n[certificates.site]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        )
    };
    let good = section(&cert, &key);
    let cases = [
        (
            section(&dir.path().join("missing.pem"), &key),
            "certificates.site.cert: ",
        ),
        (section(&empty, &key), "certificates.site.cert: "),
        (section(&cert, &other_key), "certificates.site.key: "),
        (
            format!("{good}\n[cas.clients]\n"),
            "cas.clients: give `file`, `pin_sha256`, or both",
        ),
        (
            format!("{good}\n[cas.clients]\npin_sha256 = [\"abc\"]\n"),
            "cas.clients.pin_sha256: `abc` is not a SHA-256 fingerprint",
        ),
        (
            format!("{good}\n[cas.clients]\nfile = {:?}\n", empty.display().to_string()),
            "cas.clients.file: ",
        ),
        (
            good.replace(
                "plugins = [\"router\"]",
                "plugins = [\"router\"]\ntls.cipher_suites = [\"RC4\"]",
            ),
            "listeners.public.tls.cipher_suites: unknown cipher suite `RC4`",
        ),
        (
            good.replace(
                "plugins = [\"router\"]",
                "plugins = [\"router\"]\ntls.min_version = \"1.1\"",
            ),
            "unknown variant `1.1`",
        ),
    ];
    let path = config_file(dir.path(), &good);
    let out = weir(&["check", "--config", &path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (toml, expected) in cases {
        let path = config_file(dir.path(), &toml);
        let out = weir(&["check", "--config", &path]);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "accepted a config that should fail with {expected}"
        );
        assert!(stderr.contains(expected), "expected `{expected}` in: {stderr}");
    }
}

#[test]
fn check_refuses_a_wasm_that_is_not_a_component() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A valid core module (no imports, no exports), and plain garbage.
    let core_module: &[u8] = b"\0asm\x01\0\0\0";
    for (name, bytes) in [("core.wasm", core_module), ("garbage.wasm", b"not wasm at all")] {
        let wasm = dir.path().join(name);
        std::fs::write(&wasm, bytes).expect("write wasm");
        let toml = ROUTER.replace("{static_router}", &wasm.display().to_string());
        let path = config_file(dir.path(), &toml);
        let out = weir(&["check", "--config", &path]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{name} accepted");
        assert!(stderr.contains("plugins.router"), "{stderr}");
        assert!(stderr.contains(&wasm.display().to_string()), "{stderr}");
        assert!(stderr.contains("not a loadable WebAssembly component"), "{stderr}");
    }
    // A missing file says so.
    let toml = ROUTER.replace("{static_router}", "/nonexistent/plugin.wasm");
    let out = weir(&["check", "--config", &config_file(dir.path(), &toml)]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/nonexistent/plugin.wasm: No such file"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_reports_a_plugin_that_refuses_its_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = ROUTER.replace(
        "[plugins.router]",
        "[plugins.picky]\nwasm = \"{misbehave}\"\nconfig = { mode = \"fail-configure\" }\n\n[plugins.router]",
    );
    let out = weir(&["check", "--config", &config_file(dir.path(), &toml)]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("plugins.picky: configure refused the config: refusing this config on purpose"),
        "{stderr}"
    );
}

fn route(config: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["route", "--config", config, "--listener", "public"];
    all.extend_from_slice(args);
    let out = weir(&all);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "not one line: {stdout}");
    serde_json::from_str(&stdout).expect("one JSON object")
}

#[test]
fn route_prints_the_chain_decision_as_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(dir.path(), ROUTER);

    let app = route(
        &config,
        &["--sni", "App.Test.", "--alpn", "h2,http/1.1", "--client-ip", "10.1.2.3"],
    );
    assert_eq!(app["plugin"], "router");
    assert_eq!(
        app["connection"]["sni"], "app.test",
        "the SNI is canonicalised as on the wire"
    );
    assert_eq!(app["connection"]["alpn"], serde_json::json!(["h2", "http/1.1"]));
    assert_eq!(app["connection"]["client_addr"], "10.1.2.3:0");
    assert_eq!(app["decision"]["route"], "app.test");
    assert_eq!(app["decision"]["action"]["passthrough"]["upstream"]["pool"], "app");

    let api = route(&config, &["--sni", "v2.api.test"]);
    assert_eq!(api["decision"]["route"], "*.api.test");
    assert_eq!(
        api["decision"]["action"]["passthrough"]["upstream"]["address"],
        "127.0.0.1:9001"
    );

    let unknown = route(&config, &["--sni", "other.test"]);
    assert_eq!(unknown["decision"]["action"]["reject"], "unknown name");

    let no_sni = route(&config, &[]);
    assert_eq!(no_sni["plugin"], serde_json::Value::Null);
    assert_eq!(no_sni["decision"]["route"], "no-route");
    assert_eq!(no_sni["steps"][0]["outcome"], "next");
}

#[test]
fn route_reports_a_failing_plugin_and_what_followed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = ROUTER
        .replace("plugins = [\"router\"]", "plugins = [\"faulty\", \"router\"]")
        .replace("[plugins.router]", "[plugins.faulty]\nwasm = \"{misbehave}\"\nconfig = { mode = \"trap\" }\non_error = \"next\"\n\n[plugins.router]");
    let config = config_file(dir.path(), &toml);
    let report = route(&config, &["--sni", "app.test"]);
    let failed = &report["steps"][0]["outcome"]["failed"];
    assert!(
        failed["error"].as_str().expect("error text").contains("trapped"),
        "{report}"
    );
    assert_eq!(failed["on_error"], "next");
    assert_eq!(report["plugin"], "router");
    assert_eq!(report["decision"]["route"], "app.test");
}

#[test]
fn route_refuses_an_unknown_listener_and_an_invalid_sni() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(dir.path(), ROUTER);
    let out = weir(&["route", "--config", &config, "--listener", "nope"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no listener named `nope` (the config has: public)"));
    let out = weir(&["route", "--config", &config, "--listener", "public", "--sni", "a..b"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("empty label"), "{}", text(&out.stderr));
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_relay_splices_bulk_transfers_and_copies_short_ones() {
    let upstream = Upstream::tcp(|mut stream: TcpStream| async move {
        if let Ok(received) = read_to_end(&mut stream).await {
            // Echo a short or a long answer, as long as what came in.
            let _ = stream.write_all(&received).await;
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = ROUTER
        .replace("127.0.0.1:9000", &upstream.addr.to_string())
        .replace("app.test", "a.example.com")
        .replace("plugins = [\"router\"]", "plugins = [\"router\"]\nrelay = \"auto\"");
    let mut weir = WeirProcess::spawn(Path::new(&config_file(dir.path(), &toml))).await;
    let addr = weir.addr("public");
    let hello = testdata("clienthello/openssl-tls13-sni.bin");
    for (payload, expect_splice) in [(1024, false), (4 << 20, true)] {
        let mut sent = hello.clone();
        sent.extend(weir_tests::pattern(payload, 3));
        let mut client = TcpStream::connect(&addr).await.expect("connect");
        client.write_all(&sent).await.expect("send");
        client.shutdown().await.expect("FIN");
        assert!(read_to_end(&mut client).await.expect("echo") == sent);
        let line = weir.connection_line().await;
        let spliced: u64 = line
            .split("spliced=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("spliced= in the log line");
        if expect_splice {
            // Past the first 64 KiB of each direction, bytes go through the pipe.
            let bulk = 2 * sent.len() as u64 - 2 * weir::relay::SPLICE_AFTER;
            assert!(
                spliced >= bulk - 64 * 1024,
                "only {spliced} of {} bytes spliced: {line}",
                2 * sent.len()
            );
        } else {
            assert_eq!(spliced, 0, "a short exchange should not pay for a pipe: {line}");
        }
    }
    weir.child.kill().await.expect("stop weir");
}

/// Sends `hello` and 1 MiB on each of `n` connections at once and reads
/// each echo back whole, leaving the connections open.
#[cfg(target_os = "linux")]
async fn echo_a_mebibyte_each(addr: std::net::SocketAddr, hello: &[u8], n: usize) -> Vec<TcpStream> {
    let mut sent = hello.to_vec();
    sent.extend(weir_tests::pattern(1 << 20, 5));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let sent = sent.clone();
        tasks.spawn(async move {
            let client = TcpStream::connect(addr).await.expect("connect");
            weir_tests::echo_through(client, sent).await
        });
    }
    tasks.join_all().await
}

/// A splicing direction holds a pipe only while a burst moves: connections
/// that carried megabytes and then sit idle hold none. A reload to
/// `max_pipes = 0` closes the pooled ones, and every burst after it is
/// copied, byte for byte, and counted.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_splicing_connections_hold_no_pipes_and_max_pipes_bounds_them() {
    let upstream = Upstream::tcp(|mut stream: TcpStream| async move {
        let (mut read, mut write) = stream.split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = |limits: &str| {
        ROUTER
            .replace("127.0.0.1:9000", &upstream.addr.to_string())
            .replace("app.test", "a.example.com")
            .replace("plugins = [\"router\"]", "plugins = [\"router\"]\nrelay = \"splice\"")
            + &format!("\n[reload]\nwatch = false\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n[limits]\n{limits}\n")
    };
    let path = config_file(dir.path(), &config(""));
    let mut weir = WeirProcess::spawn(Path::new(&path)).await;
    let addr = weir.addr("public");
    let admin = weir.admin_addr().await;
    let hello = testdata("clienthello/openssl-tls13-sni.bin");
    let gauge = |series: &'static str| {
        let admin = admin.clone();
        async move { weir_tests::metric(&admin, series).await.expect(series) }
    };
    // Polled: a direction gives its pipe back just after its last bytes,
    // which the client may read first.
    let settles_at = |series: &'static str, expected: f64| async move {
        let mut value = gauge(series).await;
        for _ in 0..50 {
            if value == expected {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            value = gauge(series).await;
        }
        assert_eq!(value, expected, "{series}");
    };

    let idle = echo_a_mebibyte_each(addr, &hello, 8).await;
    settles_at("weir_splice_pipes_in_use", 0.0).await;
    let open = gauge("weir_splice_pipes_open").await;
    assert!(
        (1.0..=16.0).contains(&open),
        "pooled pipes: {open} (16 directions spliced)"
    );
    assert_eq!(gauge("weir_splice_pipe_refusals_total").await, 0.0);
    drop(idle);
    for _ in 0..8 {
        let line = weir.connection_line().await;
        assert!(!line.contains("spliced=0 "), "nothing spliced: {line}");
    }

    std::fs::write(&path, weir_tests::expand(&config("max_pipes = 0"))).expect("rewrite");
    let (status, report) = weir_tests::admin_request(&admin, "POST", "/api/reload", None, "").await;
    assert_eq!(status, 200, "{report}");
    settles_at("weir_splice_pipes_open", 0.0).await;
    let copied = echo_a_mebibyte_each(addr, &hello, 4).await;
    assert_eq!(gauge("weir_splice_pipes_open").await, 0.0);
    assert!(
        gauge("weir_splice_pipe_refusals_total").await >= 8.0,
        "each direction copies"
    );
    drop(copied);
    for _ in 0..4 {
        let line = weir.connection_line().await;
        assert!(line.contains("spliced=0 "), "spliced past max_pipes = 0: {line}");
    }
    weir.child.kill().await.expect("stop weir");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_and_logs_one_line_per_connection() {
    let upstream = Upstream::tcp(|mut stream: TcpStream| async move {
        let _ = read_to_end(&mut stream).await;
        let _ = stream.write_all(b"pong").await;
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = ROUTER
        .replace("127.0.0.1:9000", &upstream.addr.to_string())
        .replace("app.test", "a.example.com");
    let config = config_file(dir.path(), &toml);
    let mut weir = WeirProcess::spawn(Path::new(&config)).await;
    let addr = weir.addr("public");

    let hello = testdata("clienthello/openssl-tls13-sni.bin");
    let mut client = TcpStream::connect(&addr).await.expect("connect");
    client.write_all(&hello).await.expect("send");
    client.shutdown().await.expect("FIN");
    assert_eq!(read_to_end(&mut client).await.expect("answer"), b"pong");

    let line = weir.connection_line().await;
    for field in [
        "listener=\"public\"".to_owned(),
        "sni=\"a.example.com\"".to_owned(),
        "route=\"a.example.com\"".to_owned(),
        format!("upstream=\"{}\"", upstream.addr),
        format!("bytes_up={}", hello.len()),
        "bytes_down=4".to_owned(),
        "outcome=closed".to_owned(),
    ] {
        assert!(line.contains(&field), "`{field}` missing from: {line}");
    }
    weir.child.kill().await.expect("stop weir");
}

#[test]
fn plugins_cannot_reach_files_sockets_or_the_environment() {
    let dir = tempfile::tempdir().expect("temp dir");
    for mode in ["read-file", "socket", "env"] {
        let toml = ROUTER
            .replace("plugins = [\"router\"]", "plugins = [\"probe\"]")
            .replace(
                "[plugins.router]",
                &format!(
                    "[plugins.probe]\nwasm = \"{{misbehave}}\"\nconfig = {{ mode = \"{mode}\" }}\n\n[plugins.router]"
                ),
            );
        let report = route(&config_file(dir.path(), &toml), &["--sni", "app.test"]);
        let decision = &report["decision"];
        assert_ne!(decision["route"], "escaped", "{mode}: {report}");
        if mode == "env" {
            assert_eq!(decision["action"]["reject"], "0 variables", "{report}");
            continue;
        }
        // Either the call trapped on an import weir does not give, or the
        // guest's own library reported the resource missing.
        let failed = report["steps"][0]["outcome"]["failed"]["error"]
            .as_str()
            .unwrap_or_default();
        let contained = decision["route"] == "contained";
        assert!(
            contained || failed.contains("which weir does not give plugins"),
            "{mode}: {report}"
        );
    }
}

#[test]
fn run_logs_json_when_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config_file(dir.path(), &ROUTER.replace("127.0.0.1:9000", "127.0.0.1:9"));
    let mut child = Command::new(weir_binary())
        .args(["run", "--config", &path])
        .env("WEIR_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("weir runs");
    let stderr = child.stderr.take().expect("stderr");
    // Every line is JSON; the start-up lines end with one per listener.
    let mut listening = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).take(10) {
        let line = line.expect("readable");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(value["level"], "INFO", "{line}");
        assert_eq!(value["target"], "weir", "{line}");
        if value["fields"]["message"] == "listening" {
            listening = Some(value);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = listening.expect("a `listening` line among the first ten");
    assert_eq!(line["fields"]["listener"], "public", "{line}");

    let out = Command::new(weir_binary())
        .args(["run", "--config", &path])
        .env("WEIR_LOG_FORMAT", "yaml")
        .output()
        .expect("weir runs");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("WEIR_LOG_FORMAT must be `text` or `json`, not `yaml`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_new_plugin_builds_tests_and_loads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = weir(&[
        "plugin",
        "new",
        "geo-router",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cargo build --release --target wasm32-wasip2"));
    let root = dir.path().join("geo-router");
    // The same target directory as the workspace: dependencies already built
    // for the workspace's plugins are reused.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), Into::into);
    let cargo = |args: &[&str]| {
        let out = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("cargo runs");
        assert!(out.status.success(), "cargo {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    assert!(
        cargo(&["test", "--quiet"]).contains("1 passed"),
        "the scaffold's own test runs natively"
    );
    cargo(&["build", "--quiet", "--release", "--target", "wasm32-wasip2"]);
    let wasm = std::path::PathBuf::from(&target).join("wasm32-wasip2/release/geo_router.wasm");
    let config = std::fs::read_to_string(root.join("weir.toml"))
        .expect("weir.toml")
        .replace(
            "target/wasm32-wasip2/release/geo_router.wasm",
            &wasm.display().to_string(),
        );
    std::fs::write(root.join("weir.toml"), config).expect("write");
    let config = root.join("weir.toml").display().to_string();
    let out = weir(&["check", "--config", &config]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = weir(&[
        "route",
        "--config",
        &config,
        "--listener",
        "public",
        "--sni",
        "app.example.com",
        "--explain",
    ]);
    let explained = text(&out.stdout);
    assert!(
        explained.contains("plugin `geo-router` decided: rule `app.example.com`")
            && explained.contains("pass through untouched to pool `app`"),
        "{explained}"
    );
    // A name the plugin leaves alone: it abstains and nobody decides.
    let out = weir(&[
        "route",
        "--config",
        &config,
        "--listener",
        "public",
        "--sni",
        "x.test",
        "--explain",
    ]);
    let explained = text(&out.stdout);
    assert!(
        explained.contains("abstained (next)") && explained.contains("no plugin decided"),
        "{explained}"
    );
    // An existing directory is not overwritten.
    let again = weir(&[
        "plugin",
        "new",
        "geo-router",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn explain_walks_a_chain_where_the_first_plugin_abstains() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(
        dir.path(),
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["first", "second"]

        [plugins.first]
        wasm = "{static_router}"
        config.routes."a.test" = { pool = "app" }

        [plugins.second]
        wasm = "{static_router}"
        config.routes."*.b.test" = { address = "127.0.0.1:9443", proxy_protocol = 2 }

        [pools.app]
        servers = ["127.0.0.1:9000"]
        "#,
    );
    let out = weir(&[
        "route",
        "--config",
        &config,
        "--listener",
        "public",
        "--sni",
        "x.b.test",
        "--alpn",
        "h2",
        "--explain",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let explained = text(&out.stdout);
    let lines: Vec<&str> = explained.lines().collect();
    assert_eq!(lines.len(), 5, "{explained}");
    assert!(
        lines[0].starts_with("connection: tls, SNI x.b.test, ALPN [h2]"),
        "{explained}"
    );
    assert!(
        lines[2].starts_with("  1. plugin `first` abstained (next) ("),
        "{explained}"
    );
    assert!(
        lines[3].starts_with("  2. plugin `second` decided: rule `*.b.test` ("),
        "{explained}"
    );
    assert_eq!(
        lines[4],
        "decision: pass through untouched to 127.0.0.1:9443, with a PROXY v2 header — by plugin `second`, rule `*.b.test`"
    );
}

/// A server name that starts with `-` reaches weir's own check of the name,
/// not the argument parser's complaint about an unknown flag.
#[test]
fn route_judges_a_name_starting_with_a_dash_itself() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_file(dir.path(), ROUTER);
    let out = weir(&[
        "route",
        "--config",
        &config,
        "--listener",
        "public",
        "--sni",
        "-80.example.com",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
    assert!(stderr.contains("-80.example.com"), "{stderr}");
}

/// Per-call timings, which differ between two runs: `micros` in the JSON,
/// `(N µs)` in the explanation.
fn without_timings(mut report: serde_json::Value) -> serde_json::Value {
    if let Some(steps) = report["steps"].as_array_mut() {
        for step in steps {
            step.as_object_mut().map(|s| s.remove("micros"));
        }
    }
    report
}

fn explanation_without_timings(text: &str) -> String {
    text.lines()
        .map(|line| match line.rfind(" (") {
            Some(at) if line.ends_with(" µs)") => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `POST /api/route` answers what `weir route` prints for the same
/// connection, decision and explanation alike, on the running config; a
/// hostile query is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_routes_as_weir_route_does() {
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = format!("{ROUTER}\n[admin]\nbind = \"127.0.0.1:0\"\n");
    let config = config_file(dir.path(), &toml);
    let mut gateway = weir_tests::WeirProcess::spawn(Path::new(&config)).await;
    let admin = gateway.admin_addr().await;
    let cases: [(&[&str], serde_json::Value); 3] = [
        (
            &["--sni", "App.Test.", "--alpn", "h2,http/1.1", "--client-ip", "10.1.2.3"],
            serde_json::json!({"listener": "public", "sni": "App.Test.", "alpn": ["h2", "http/1.1"], "client_ip": "10.1.2.3"}),
        ),
        (
            &["--sni", "v2.api.test", "--protocol", "plain"],
            serde_json::json!({"listener": "public", "sni": "v2.api.test", "protocol": "plain"}),
        ),
        (&[], serde_json::json!({"listener": "public"})),
    ];
    for (args, body) in cases {
        let printed = route(&config, args);
        let (status, answered) = weir_tests::admin_request(&admin, "POST", "/api/route", None, &body.to_string()).await;
        assert_eq!(status, 200, "{answered}");
        let mut answered: serde_json::Value = serde_json::from_str(&answered).expect("JSON");
        let explained = answered
            .as_object_mut()
            .and_then(|a| a.remove("explanation"))
            .and_then(|e| e.as_str().map(str::to_owned))
            .expect("an explanation");
        assert_eq!(without_timings(answered), without_timings(printed), "{body}");
        let mut all = vec!["route", "--config", &config, "--listener", "public", "--explain"];
        all.extend_from_slice(args);
        let out = weir(&all);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            explanation_without_timings(&explained),
            explanation_without_timings(&text(&out.stdout)),
            "{body}"
        );
    }
    for (body, status, says) in [
        (r#"{"listener": "nope"}"#, 422, "no listener named `nope`"),
        (r#"{"listener": "public", "sni": "<script>.test"}"#, 422, "sni"),
        (
            r#"{"listener": "public", "client_ip": "x"}"#,
            422,
            "is not an IP address",
        ),
        (r#"{"listener": "public", "extra": 1}"#, 400, "unknown field"),
        ("[1]", 400, "invalid JSON"),
    ] {
        let (got, answer) = weir_tests::admin_request(&admin, "POST", "/api/route", None, body).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }
    gateway.child.kill().await.expect("stop");
}
