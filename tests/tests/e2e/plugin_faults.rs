//! A plugin that fails costs the connection it failed on and nothing else:
//! traps, endless loops and unbounded allocation are cut off by the host,
//! invalid decisions are refused, and the gateway keeps serving.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use weir::Gateway;
use weir_tests::{Pki, STEP, Upstream, echo, pattern, read_to_end, start_gateway, tls_connect};

/// Plugin call deadline used by these tests.
const DEADLINE: Duration = Duration::from_millis(200);

/// `faulty` misbehaves (as `mode`) for `bad.test` only and abstains for the
/// rest; `router` sends both names to the upstream, so a connection for
/// `bad.test` reaches the upstream only if the failure is skipped.
async fn gateway(mode: &str, on_error: &str, upstream: &Upstream) -> Gateway {
    start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["faulty", "router"]

        [plugins.faulty]
        wasm = "{{misbehave}}"
        config = {{ mode = "{mode}", only_sni = "bad.test" }}
        on_error = "{on_error}"
        timeout = "{}ms"
        max_memory_mib = 16

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."good.test" = {{ pool = "echo" }}
        config.routes."bad.test" = {{ pool = "echo" }}

        [pools.echo]
        servers = ["{}"]
        "#,
        DEADLINE.as_millis(),
        upstream.addr
    ))
    .await
}

async fn echo_upstream(pki: &Pki) -> Upstream {
    Upstream::tls(&pki.server(&["good.test", "bad.test"]), echo).await
}

/// A full TLS exchange with the echo upstream through the gateway.
async fn exchange(gateway: &Gateway, pki: &Pki, name: &str) -> std::io::Result<()> {
    let addr = gateway.local_addr("public").expect("listener");
    let mut client = tls_connect(addr, name, pki.client_config()).await?;
    let sent = pattern(256 * 1024, 1);
    client.write_all(&sent).await?;
    client.shutdown().await?;
    let back = read_to_end(&mut client).await?;
    assert!(back == sent, "echo returned {} bytes", back.len());
    Ok(())
}

/// A looping call that the machine starves — it computes in the slow lane
/// at nice 19 while every CPU is kept busy at normal priority — sees a tick
/// only now and then, yet is cut off by the wall clock at four times its
/// deadline (and at least a second more), so its connection and instance
/// are held for a bounded time. (Counting ticks alone, its 801 ticks took
/// minutes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starved_looping_call_is_cut_off_by_the_wall_clock() {
    let pki = Pki::new("upstream CA");
    let upstream = echo_upstream(&pki).await;
    let gateway = gateway("loop", "deny", &upstream).await;
    let addr = gateway.local_addr("public").expect("listener");
    exchange(&gateway, &pki, "good.test").await.expect("served before");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..2 * cpus)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let started = Instant::now();
    let refused = tokio::time::timeout(STEP, tls_connect(addr, "bad.test", pki.client_config())).await;
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for spinner in spinners {
        spinner.join().expect("spinner");
    }
    let error = refused
        .expect("the starved call was cut off")
        .expect_err("bad.test was served")
        .to_string();
    assert!(error.contains("received fatal alert: InternalError"), "{error}");
    let (_, failure) = gateway.snapshot().plugins()["faulty"]
        .last_error()
        .expect("the timeout is recorded");
    assert!(
        failure.contains(&format!("did not return within {DEADLINE:?}")),
        "{failure}"
    );
    // Its cap is 1.2 s; the rest is slack for a loaded machine.
    assert!(took < Duration::from_secs(10), "the starved call took {took:?}");
    exchange(&gateway, &pki, "good.test").await.expect("served after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_looping_and_hoarding_plugins_cost_only_their_connection() {
    let pki = Pki::new("upstream CA");
    for mode in ["trap", "loop", "alloc"] {
        let upstream = echo_upstream(&pki).await;
        let gateway = gateway(mode, "deny", &upstream).await;
        // A long-lived connection opened before the failure...
        let addr = gateway.local_addr("public").expect("listener");
        let mut before = tls_connect(addr, "good.test", pki.client_config())
            .await
            .expect("good.test before");
        before.write_all(b"first half, ").await.expect("write");
        // Idle long enough for the deadline clock to go to sleep: the first
        // failing call must wake it (a loop would otherwise never end).
        tokio::time::sleep(Duration::from_millis(300)).await;

        // What cut each call off: the host's own mechanism for that fault
        // (a trap, the epoch deadline, the memory cap), not a timeout here.
        let cut_off = match mode {
            "trap" => "trapped:".to_owned(),
            "loop" => format!("did not return within {DEADLINE:?}"),
            _ => "exceeded its memory limit of 16 MiB".to_owned(),
        };
        // (On a machine kept busy, the slow lane may be starved before an
        // allocation reaches the cap; the wall clock then cuts the call
        // off. At least one attempt must meet the cap.)
        let starved = format!("did not return within {DEADLINE:?}");
        let mut met = 0;
        for attempt in 0..3 {
            let refused = tokio::time::timeout(STEP, tls_connect(addr, "bad.test", pki.client_config()))
                .await
                .unwrap_or_else(|_| panic!("{mode}: the plugin call was never cut off"));
            let error = refused.expect_err("bad.test was served").to_string();
            assert!(error.contains("received fatal alert: InternalError"), "{mode}: {error}");
            let last = gateway.snapshot().plugins()["faulty"].last_error();
            let (_, failure) = last.unwrap_or_else(|| panic!("{mode} attempt {attempt}: no failure recorded"));
            met += usize::from(failure.contains(&cut_off));
            assert!(
                failure.contains(&cut_off) || (mode == "alloc" && failure.contains(&starved)),
                "{mode} attempt {attempt}: {failure}"
            );
        }
        assert!(met >= 1, "{mode}: no attempt was cut off by {cut_off:?}");
        // ...keeps flowing, and new connections are served.
        before
            .write_all(b"second half")
            .await
            .expect("write after the failures");
        before.shutdown().await.expect("half-close");
        assert_eq!(
            read_to_end(&mut before).await.expect("echo"),
            b"first half, second half"
        );
        exchange(&gateway, &pki, "good.test")
            .await
            .expect("good.test after the failures");
        assert_eq!(
            upstream.accepted(),
            2,
            "{mode}: a failed connection reached the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_decisions_are_refused() {
    let pki = Pki::new("upstream CA");
    for mode in ["unknown-pool", "bad-address", "bad-proxy-version", "empty-route"] {
        let upstream = echo_upstream(&pki).await;
        let gateway = gateway(mode, "deny", &upstream).await;
        let addr = gateway.local_addr("public").expect("listener");
        assert!(
            tls_connect(addr, "bad.test", pki.client_config()).await.is_err(),
            "{mode}: bad.test was served"
        );
        exchange(&gateway, &pki, "good.test")
            .await
            .expect("good.test still served");
        assert_eq!(
            upstream.accepted(),
            1,
            "{mode}: the invalid decision reached an upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_next_skips_the_failed_plugin() {
    let pki = Pki::new("upstream CA");
    let upstream = echo_upstream(&pki).await;
    let gateway = gateway("trap", "next", &upstream).await;
    exchange(&gateway, &pki, "bad.test")
        .await
        .expect("the next plugin routes bad.test");
    exchange(&gateway, &pki, "bad.test")
        .await
        .expect("and again, on a fresh instance");
    assert_eq!(upstream.accepted(), 2);
}

/// A gateway whose first plugin, `slow`, runs `mode` in `configure` with
/// `extra` settings and a 5 ms call deadline; `router` echoes everything.
fn slow_configure_config(mode: &str, extra: &str, upstream: &Upstream) -> String {
    format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["slow", "router"]

        [plugins.slow]
        wasm = "{{misbehave}}"
        config = {{ mode = "{mode}", configure_ms = 60 }}
        timeout = "5ms"
        {extra}

        [plugins.router]
        wasm = "{{static_router}}"
        config.no_sni = {{ address = "{}" }}
        "#,
        upstream.addr
    )
}

/// Loading runs `configure` under `configure_timeout`, not the per-call
/// `timeout`: a plugin that spends longer than a call's deadline setting up
/// loads and serves, and one that never finishes is refused with the
/// deadline named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_runs_under_its_own_deadline() {
    use tokio::io::AsyncReadExt;
    let upstream = Upstream::tcp(echo).await;
    let gateway = start_gateway(&slow_configure_config("slow-configure", "", &upstream)).await;
    let addr = gateway.local_addr("public").expect("listener");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"set up slowly\n").await.expect("write");
    let mut back = [0u8; 14];
    tokio::time::timeout(STEP, stream.read_exact(&mut back))
        .await
        .expect("echoed in time")
        .expect("echoed");
    assert_eq!(&back, b"set up slowly\n");

    weir_tests::init_logging();
    let text = weir_tests::expand(&slow_configure_config(
        "loop-configure",
        r#"configure_timeout = "100ms""#,
        &upstream,
    ));
    let config = weir::config::Config::parse(&text, &weir_tests::workspace().join("test.toml")).expect("valid config");
    let started = Instant::now();
    let error = match Gateway::start(config).await {
        Ok(_) => panic!("a plugin that never finishes configure was loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("slow") && error.contains("within 100ms (configure_timeout)"),
        "{error}"
    );
    assert!(started.elapsed() < STEP, "the load was not cut off");
}

/// A plugin gets one configured instance per worker thread at load, so a
/// connection never waits for a `configure` longer than a call's deadline,
/// however many arrive at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_finds_a_configured_instance() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let text = slow_configure_config("slow-configure", "", &upstream)
        + "\n[admin]\nbind = \"127.0.0.1:0\"\n\n[reload]\nwatch = false\n";
    let config = weir_tests::write_config(dir.path(), &text);
    let mut weir = weir_tests::WeirProcess::spawn_under(&config, &["env", "TOKIO_WORKER_THREADS=3"]).await;
    let admin = weir.admin_addr().await;
    let (status, body) = weir_tests::admin_request(&admin, "GET", "/api/plugins", None, "").await;
    assert_eq!(status, 200, "{body}");
    let plugins: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let slow = plugins["plugins"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|p| p["name"] == "slow")
        .expect("the slow plugin");
    assert_eq!(slow["idle_instances"], 3, "{body}");

    // 60 connections at once: each call finds a configured instance (a
    // fresh one would need 60 ms, past the 5 ms deadline, and be denied).
    let addr = weir.addr("public");
    let clients: Vec<_> = (0..60)
        .map(|n| {
            tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await?;
                let line = format!("client {n:02}\n");
                stream.write_all(line.as_bytes()).await?;
                let mut back = vec![0u8; line.len()];
                tokio::time::timeout(STEP, stream.read_exact(&mut back)).await??;
                Ok::<_, std::io::Error>(back == line.as_bytes())
            })
        })
        .collect();
    for client in clients {
        assert!(client.await.expect("task").expect("served"), "a wrong echo");
    }
}

/// After a trap the failed instance is replaced off the connection path,
/// under `configure_timeout`: a plugin whose `configure` (60 ms) is slower
/// than its call deadline (5 ms) keeps serving the connections after the
/// one it trapped on, even with one worker thread (one instance in stock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_replaced_under_configure_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("replacement test CA");
    let identity = pki.server(&["ok.test", "trap.test"]);
    let upstream = Upstream::tls(&identity, |s| weir_tests::answer_with(s, String::new())).await;
    let config = weir_tests::write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["slow"]

            [plugins.slow]
            wasm = "{{misbehave}}"
            config = {{ mode = "trap", only_sni = "trap.test", pool = "good", configure_ms = 60 }}
            timeout = "5ms"

            [pools.good]
            servers = ["{}"]

            [reload]
            watch = false
            "#,
            upstream.addr
        ),
    );
    let mut weir = weir_tests::WeirProcess::spawn_under(&config, &["env", "TOKIO_WORKER_THREADS=1"]).await;
    let addr = weir.addr("public");
    let client = pki.client_config();
    for round in 0..3 {
        let trapped = weir_tests::tls_exchange(addr, "trap.test", std::sync::Arc::clone(&client), "x").await;
        assert!(trapped.as_deref().unwrap_or_default().is_empty(), "round {round}");
        assert!(weir.connection_line().await.contains("trapped"));
        for n in 0..3 {
            let answer = weir_tests::tls_exchange(addr, "ok.test", std::sync::Arc::clone(&client), "hi").await;
            let line = weir.connection_line().await;
            assert_eq!(
                answer.as_deref().unwrap_or("refused"),
                "upstream heard: hi\n",
                "round {round}, connection {n} after the trap: {line}"
            );
        }
    }
}

/// A plugin that logs in a loop writes at most its allowance (a 64 KiB
/// burst, then 32 KiB a second): the rest is dropped, counted, and said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_flood_the_log() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let config = weir_tests::write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["flood"]

            [plugins.flood]
            wasm = "{{misbehave}}"
            config = {{ mode = "log-flood", pool = "good" }}
            timeout = "1s"

            [pools.good]
            servers = ["{}"]

            [admin]
            bind = "127.0.0.1:0"

            [reload]
            watch = false
            "#,
            upstream.addr
        ),
    );
    let mut weir = weir_tests::WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let addr = weir.addr("public");
    for round in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"still served\n").await.expect("write");
        let mut back = [0u8; 13];
        tokio::time::timeout(STEP, stream.read_exact(&mut back))
            .await
            .expect("echoed in time")
            .expect("echoed");
        assert_eq!(&back, b"still served\n", "round {round}");
    }
    // Everything the plugin got to write, up to the second connection's line.
    let mut flood_lines = 0;
    let mut said = false;
    let mut connections = 0;
    while connections < 2 {
        let line = weir.line_containing("").await;
        if line.contains("xxxxxxxx") {
            flood_lines += 1;
        }
        said |= line.contains("lines were dropped") && line.contains("dropped=");
        connections += usize::from(line.contains("connection id="));
    }
    // 64 KiB of burst and a little refill: about 60 lines of 1 KiB, of 2,000.
    assert!(
        (30..=120).contains(&flood_lines),
        "{flood_lines} lines of the flood were written"
    );
    assert!(said, "the drop was not said");
    let dropped = weir_tests::metric(&admin, "weir_plugin_log_dropped_total{plugin=\"flood\"}")
        .await
        .unwrap_or(0.0);
    assert!(dropped >= 1800.0, "{dropped} dropped");
}

/// `reuse_instances = false` plugins take their instances from a fixed pool
/// of slots (`[limits] isolated_instances`): a call that finds every slot
/// in use is refused at once, with the limit named, instead of waiting or
/// failing obscurely; once the slot is free again calls run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_finding_every_isolated_slot_in_use_is_refused_and_says_so() {
    let pki = Pki::new("upstream CA");
    let upstream = echo_upstream(&pki).await;
    let gateway = start_gateway(&format!(
        r#"
        [limits]
        isolated_instances = 1

        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["faulty", "router"]

        [plugins.faulty]
        wasm = "{{misbehave}}"
        config = {{ mode = "loop", only_sni = "bad.test" }}
        reuse_instances = false
        on_error = "deny"
        timeout = "1s"

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."good.test" = {{ pool = "echo" }}

        [pools.echo]
        servers = ["{}"]
        "#,
        upstream.addr
    ))
    .await;
    exchange(&gateway, &pki, "good.test").await.expect("served before");
    let addr = gateway.local_addr("public").expect("listener");
    // The looping call holds the only slot until its deadline. Under load a
    // good.test call may take the slot first and the loop's own call be the
    // refused one; then the loop never ran and the round is tried again.
    let mut refused = None;
    let mut looping = None;
    for _ in 0..5 {
        let client = pki.client_config();
        let attempt = tokio::spawn(async move { tls_connect(addr, "bad.test", client).await.map(|_| ()) });
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(900) {
            match tls_connect(addr, "good.test", pki.client_config()).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => {
                    refused = Some(e.to_string());
                    break;
                }
            }
        }
        if refused.is_some() {
            looping = Some(attempt);
            break;
        }
        let _ = tokio::time::timeout(STEP, attempt).await;
    }
    let refused = refused.expect("no call was refused while the only slot was held");
    assert!(refused.contains("received fatal alert"), "{refused}");
    let (_, failure) = gateway.snapshot().plugins()["faulty"]
        .last_error()
        .expect("the refusal is recorded");
    assert!(
        failure.contains("was not run: all 1 isolated instance slots ([limits] isolated_instances) are in use"),
        "{failure}"
    );
    let looping = looping.expect("a loop held the slot");
    let looped = tokio::time::timeout(STEP, looping).await.expect("the loop was cut off");
    assert!(looped.expect("task").is_err(), "bad.test was served");
    exchange(&gateway, &pki, "good.test")
        .await
        .expect("served once the slot is free");
}
