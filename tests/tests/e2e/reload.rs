//! Hot reload under load: while new connections arrive continuously and
//! long-lived streams carry data, the config is rewritten 50 times, each
//! time swapping the routing plugin for another component (and a broken
//! config and a broken plugin are dropped in). No connection may be
//! refused or reset, every stream must stay byte-exact, and new connections
//! must follow each new config. The admin API reports the reloads.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use weir_tests::{STEP, Upstream, WeirProcess, plugin};

/// Answers every line with `<tag> <line>`, until EOF.
async fn tagged(tag: &'static str) -> Upstream {
    Upstream::tcp(move |stream: TcpStream| async move {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if write.write_all(format!("{tag} {line}\n").as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    })
    .await
}

/// Green is reached through static-router, blue through another component
/// (the misbehave test plugin, which routes everything but one name to its
/// pool): each swap replaces the plugin, not only its config.
fn config(
    router: &Path,
    other: &Path,
    green: std::net::SocketAddr,
    blue: std::net::SocketAddr,
    to_green: bool,
) -> String {
    let plugin = match to_green {
        true => format!(
            "wasm = {:?}\nconfig.no_sni = {{ address = \"{green}\" }}",
            router.display().to_string()
        ),
        false => format!(
            "wasm = {:?}\nconfig = {{ mode = \"trap\", only_sni = \"never.test\", pool = \"blue\" }}",
            other.display().to_string()
        ),
    };
    format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
protocol = "plain"
plugins = ["router"]

[plugins.router]
{plugin}

[pools.blue]
servers = ["{blue}"]

[reload]
debounce = "20ms"

[admin]
bind = "127.0.0.1:0"
"#
    )
}

/// Writes a file the way editors and deploy tools do: a new file renamed
/// over the old one.
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_drop_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let blue = tagged("blue").await;
    let green = tagged("green").await;
    let wasm = dir.path().join("router.wasm");
    let original = std::fs::read(plugin("static-router")).expect("plugin");
    std::fs::write(&wasm, &original).expect("copy plugin");
    let other = dir.path().join("other.wasm");
    std::fs::write(&other, std::fs::read(plugin("misbehave")).expect("plugin")).expect("copy plugin");
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, config(&wasm, &other, green.addr, blue.addr, false)).expect("config");
    let mut weir = WeirProcess::spawn(&path).await;
    let addr = weir.addr("public");
    let admin = weir.admin_addr().await;

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let made = Arc::new(AtomicU64::new(0));
    // The tag the latest-opened connection saw, when it was answered, and
    // when it was opened: a connection opened before a swap and answered
    // after it (a slow one, on a loaded machine) says nothing of the swap.
    let latest = Arc::new(Mutex::new(("blue".to_owned(), Instant::now(), Instant::now())));

    // Long-lived streams: a line every 5 ms, each answered by blue.
    let mut streams = Vec::new();
    for n in 0..4 {
        let (stop, failures) = (Arc::clone(&stop), Arc::clone(&failures));
        streams.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("stream connects");
            let (read, mut write) = stream.into_split();
            let mut replies = BufReader::new(read).lines();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let line = format!("stream {n} line {sent}");
                write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .expect("stream write");
                match replies.next_line().await {
                    Ok(Some(reply)) if reply == format!("blue {line}") => {}
                    other => failures.lock().await.push(format!("stream {n}: {other:?} for {line}")),
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        }));
    }
    // New connections, continuously, from 8 loops.
    let mut loops = Vec::new();
    for _ in 0..8 {
        let (stop, failures, made, latest) = (
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&made),
            Arc::clone(&latest),
        );
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let opened = Instant::now();
                let result = async {
                    let mut stream = TcpStream::connect(addr).await?;
                    stream.write_all(b"ping\n").await?;
                    stream.shutdown().await?;
                    let mut reply = String::new();
                    stream.read_to_string(&mut reply).await?;
                    Ok::<_, std::io::Error>(reply)
                };
                match tokio::time::timeout(STEP, result).await {
                    Ok(Ok(reply)) if reply == "blue ping\n" || reply == "green ping\n" => {
                        made.fetch_add(1, Ordering::Relaxed);
                        let tag = reply.split_whitespace().next().unwrap_or_default().to_owned();
                        let mut latest = latest.lock().await;
                        if opened > latest.2 {
                            *latest = (tag, Instant::now(), opened);
                        }
                    }
                    other => failures.lock().await.push(format!("connection: {other:?}")),
                }
            }
        }));
    }

    let started = Instant::now();
    let mut delays = Vec::new();
    for i in 0..50 {
        let (to_green, tag) = if i % 2 == 0 { (true, "green") } else { (false, "blue") };
        if i % 10 == 5 {
            // A broken config, then a broken plugin: both refused, nothing changes.
            let before = latest.lock().await.0.clone();
            replace(&path, b"[listeners.public\nthis is not TOML");
            tokio::time::sleep(Duration::from_millis(150)).await;
            replace(&wasm, b"not a component");
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(latest.lock().await.0, before, "a broken reload changed the routing");
            replace(&wasm, &original);
        }
        let written = Instant::now();
        replace(&path, config(&wasm, &other, green.addr, blue.addr, to_green).as_bytes());
        loop {
            let (seen, at, _) = latest.lock().await.clone();
            if seen == tag && at > written {
                delays.push(at - written);
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "reload {i} not followed: still {seen}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in loops {
        task.await.expect("connection loop");
    }
    let mut lines = 0;
    for stream in streams {
        lines += stream.await.expect("stream task");
    }
    let failures = failures.lock().await;
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    let made = made.load(Ordering::Relaxed);
    let rate = made as f64 / elapsed.as_secs_f64();
    delays.sort();
    eprintln!(
        "{made} connections in {elapsed:?} ({rate:.0}/s), {lines} stream lines; \
         new policy followed after p50 {:?}, max {:?}",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    assert!(
        rate >= 500.0,
        "the load was {rate:.0} connections/s, below the 500/s this test promises"
    );

    // The admin API saw it all: the good reloads (writes landing within one
    // debounce window of each other may make one reload, so a few fewer than
    // the writes on a busy machine) and the refused ones.
    let (_, body) = weir_tests::admin_request(&admin, "GET", "/api/reload", None, "").await;
    let status: serde_json::Value = serde_json::from_str(body.trim()).expect("JSON");
    assert!(status["succeeded"].as_u64().unwrap_or(0) >= 40, "{status}");
    assert!(status["failed"].as_u64().unwrap_or(0) >= 10, "{status}");
    weir.child.kill().await.expect("stop weir");
}

/// A component with a custom section appended: the same code, bytes (and
/// so a hash) of its own, which weir must compile anew.
fn variant(component: &[u8], generation: u32) -> Vec<u8> {
    let name = b"weir-test";
    let payload = generation.to_le_bytes();
    let size = u8::try_from(1 + name.len() + payload.len()).expect("short section");
    let mut out = component.to_vec();
    out.extend([0x00, size, name.len() as u8]);
    out.extend(name);
    out.extend(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_plugin_many_times_keeps_only_the_compiled_code_in_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let router = std::fs::read(plugin("static-router")).expect("built plugin");
    let wasm = dir.path().join("router.wasm");
    let upstream = Upstream::tcp(weir_tests::echo).await;
    let text = format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["router"]

        [plugins.router]
        wasm = "{}"
        config.no_sni = {{ address = "{}" }}
        "#,
        wasm.display(),
        upstream.addr
    );
    std::fs::write(&wasm, variant(&router, 0)).expect("write");
    let (gateway, _) = weir_tests::start_gateway_file(dir.path(), &text).await;
    let addr = gateway.local_addr("public").expect("listener");
    for generation in 1..=10 {
        std::fs::write(&wasm, variant(&router, generation)).expect("write");
        let report = gateway.reload("test").await;
        assert_eq!(report.error, None, "generation {generation}");
        assert_eq!(report.reloaded_plugins, ["router"]);
        // The running component and the one before it, for a rollback.
        assert_eq!(gateway.compiled_components(), 2, "generation {generation}");
    }
    // A broken component is refused and its attempt leaves nothing behind.
    std::fs::write(&wasm, b"\0asm broken").expect("write");
    assert!(gateway.reload("test").await.error.is_some());
    assert_eq!(gateway.compiled_components(), 1);

    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(b"still routed\n").await.expect("write");
    client.shutdown().await.expect("FIN");
    let mut back = Vec::new();
    tokio::time::timeout(STEP, client.read_to_end(&mut back))
        .await
        .expect("answered in time")
        .expect("read");
    assert_eq!(back, b"still routed\n");
}

/// The config of the watch tests: every plain connection goes to `upstream`.
fn plain_to(upstream: std::net::SocketAddr) -> String {
    weir_tests::expand(&weir_tests::plain_route_config(
        upstream,
        "[reload]\ndebounce = \"20ms\"",
    ))
}

/// Which upstream a new connection reaches, by the tag it answers with.
async fn answered_by(addr: std::net::SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(b"which\n").await.ok()?;
    let mut lines = BufReader::new(stream).lines();
    let line = tokio::time::timeout(STEP, lines.next_line()).await.ok()?.ok()??;
    line.split_whitespace().next().map(str::to_owned)
}

/// Polls until new connections reach the upstream tagged `tag`, for up to
/// `within`.
async fn follows(addr: std::net::SocketAddr, tag: &str, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if answered_by(addr).await.as_deref() == Some(tag) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A Kubernetes ConfigMap mount: `weir.toml -> ..data/weir.toml`, and an
/// update swaps the `..data` symlink (no event names `weir.toml`). The
/// change is applied, and so is the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_a_reload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (green, blue) = (tagged("green").await, tagged("blue").await);
    let root = dir.path();
    let publish = |generation: &str, upstream: std::net::SocketAddr| {
        let data = root.join(generation);
        std::fs::create_dir(&data).expect("data dir");
        std::fs::write(data.join("weir.toml"), plain_to(upstream)).expect("write");
        // Exactly as kubelet does: a new symlink, renamed over `..data`.
        std::os::unix::fs::symlink(generation, root.join("..data_tmp")).expect("symlink");
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    };
    publish("..2026_12_01_a", green.addr);
    std::os::unix::fs::symlink("..data/weir.toml", root.join("weir.toml")).expect("symlink");
    let weir = WeirProcess::spawn(&root.join("weir.toml")).await;
    let addr = weir.addr("public");
    assert_eq!(answered_by(addr).await.as_deref(), Some("green"));
    publish("..2026_12_01_b", blue.addr);
    assert!(
        follows(addr, "blue", STEP).await,
        "the swapped ConfigMap was not applied"
    );
    publish("..2026_12_01_c", green.addr);
    assert!(follows(addr, "green", STEP).await, "the second swap was not applied");
}

/// A file written again and again beside the config (a log) does not
/// postpone a reload: only changes to what weir reads extend the quiet
/// period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_neighbour_file_does_not_postpone_reloads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (green, blue) = (tagged("green").await, tagged("blue").await);
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, plain_to(green.addr)).expect("write");
    let weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, log) = (Arc::clone(&stop), dir.path().join("weir.log"));
        std::thread::spawn(move || {
            use std::io::Write as _;
            let mut file = std::fs::File::create(log).expect("log");
            while !stop.load(Ordering::Relaxed) {
                let _ = writeln!(file, "a line of log");
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    replace(&config, plain_to(blue.addr).as_bytes());
    let applied = follows(addr, "blue", Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(applied, "the reload waited for the neighbour file to fall quiet");
}

/// Reads one gauge or counter from weir's metrics.
async fn metric(admin: &str, series: &str) -> f64 {
    weir_tests::metric(admin, series)
        .await
        .unwrap_or_else(|| panic!("no {series} in weir's metrics"))
}

/// Connections that outlive many reloads (passthrough, and terminated
/// with client certificates checked by a plugin) keep only their streams:
/// the replaced plugins, their instances and compiled code are freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_connections_keep_no_replaced_plugin_alive() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = weir_tests::Pki::new("pinning test CA");
    let (cert, key) = pki.server(&["tls.test", "pass.test"]).write(dir.path(), "site");
    let ca = pki.write_ca(dir.path(), "clients");
    let upstream = Upstream::tcp(weir_tests::echo).await;
    let tls_upstream = Upstream::tls(&pki.server(&["pass.test"]), weir_tests::echo).await;
    let config_path = dir.path().join("weir.toml");
    let write = |generation: u32| {
        let text = format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:{{port}}"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."pass.test" = {{ address = "{tls_upstream}" }}
            config.routes."tls.test" = {{ address = "{upstream}", terminate = {{ certificate = "site", client_auth = "optional", client_ca = "clients" }} }}
            config.default = {{ reject = "generation {generation}" }}

            [certificates.site]
            cert = {cert}
            key = {key}

            [cas.clients]
            file = {ca}

            [admin]
            bind = "127.0.0.1:0"

            [reload]
            watch = false
            "#,
            tls_upstream = tls_upstream.addr,
            upstream = upstream.addr,
            cert = weir_tests::toml_path(&cert),
            key = weir_tests::toml_path(&key),
            ca = weir_tests::toml_path(&ca),
        );
        text
    };
    let port = weir_tests::free_port();
    let expand = |generation: u32| weir_tests::expand(&write(generation)).replace("{port}", &port.to_string());
    std::fs::write(&config_path, expand(0)).expect("write");
    let mut weir = WeirProcess::spawn(&config_path).await;
    let admin = weir.admin_addr().await;
    let addr = weir.addr("public");
    let client = pki.client_config_with(&pki.client("carol"));
    let baseline = metric(&admin, "weir_plugins_loaded").await;
    let mut held = Vec::new();
    for generation in 1..=10 {
        // One of each, opened under this generation and kept open.
        let mut pass = weir_tests::tls_connect(addr, "pass.test", Arc::clone(&client))
            .await
            .expect("passthrough");
        echoed(&mut pass, b"ping\n").await;
        let mut tls = weir_tests::tls_connect(addr, "tls.test", Arc::clone(&client))
            .await
            .expect("terminated");
        echoed(&mut tls, b"ping\n").await;
        held.push((pass, tls));
        // A new generation: a new plugin (its config changed).
        std::fs::write(&config_path, expand(generation)).expect("write");
        let (status, body) = weir_tests::admin_request(&admin, "POST", "/api/reload", None, "").await;
        assert_eq!(status, 200, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let loaded = metric(&admin, "weir_plugins_loaded").await;
    assert!(
        loaded <= baseline,
        "{loaded} plugins in memory after 10 reloads with connections held (1 is running)"
    );
    // The held connections still work, on both kinds.
    for (pass, tls) in &mut held {
        echoed(pass, b"pong\n").await;
        echoed(tls, b"pong\n").await;
    }
    let _ = weir.line_containing("reload").await;
}

/// Writes `line` and expects it echoed.
async fn echoed<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S, line: &[u8]) {
    stream.write_all(line).await.expect("write");
    stream.flush().await.expect("flush");
    let mut back = vec![0u8; line.len()];
    tokio::time::timeout(STEP, stream.read_exact(&mut back))
        .await
        .expect("echoed in time")
        .expect("echoed");
    assert_eq!(back, line);
}

/// A config written in place by a writer that pauses mid-file: the prefix
/// written so far is itself a valid config (it routes to blue, lacking the
/// sections after it), and is not applied while the writer holds the file
/// open; once the writer closes it, the whole file is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_still_being_written_is_not_read() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let (green, blue) = (tagged("green").await, tagged("blue").await);
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, plain_to(green.addr)).expect("write");
    let weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    assert_eq!(answered_by(addr).await.as_deref(), Some("green"));

    let mut file = std::fs::File::create(&config).expect("open in place");
    file.write_all(plain_to(blue.addr).as_bytes()).expect("the first part");
    file.flush().expect("flush");
    // Many debounce periods (20 ms) pass with the valid prefix on disk.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        answered_by(addr).await.as_deref(),
        Some("green"),
        "a half-written config was applied"
    );
    file.write_all(b"\n[limits]\nmax_connections = 1000\n")
        .expect("the rest");
    drop(file);
    assert!(
        follows(addr, "blue", STEP).await,
        "the completed config was not applied"
    );
}
