//! Tenants: connections are dispatched by the longest domain suffix before
//! any tenant code runs; a decision that leaves the tenant's namespace is
//! refused; a tenant's trapping plugin and its connection limit affect only
//! its own connections.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use weir_tests::{Pki, STEP, Upstream, WeirProcess, answer_with, tls_connect, tls_exchange, write_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_hurt_each_other() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("tenant test CA");
    let identity = pki.server(&["*.acme.test", "*.shop.acme.test", "*.globex.test"]);
    let acme = Upstream::tls(&identity, |s| answer_with(s, " (acme)".into())).await;
    let shop = Upstream::tls(&identity, |s| answer_with(s, " (shop)".into())).await;
    let globex = Upstream::tls(&identity, |s| answer_with(s, " (globex)".into())).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["edge"]

            [plugins.edge]
            wasm = "{{static_router}}"
            config.default = {{ reject = "no tenant owns this name" }}

            [plugins.acme-router]
            wasm = "{{static_router}}"
            config.routes."app.acme.test" = {{ pool = "acme" }}
            config.routes."evil.acme.test" = {{ pool = "globex" }}
            config.routes."addr.acme.test" = {{ address = "127.0.0.3:443" }}

            [plugins.shop-router]
            wasm = "{{static_router}}"
            config.routes."*.shop.acme.test" = {{ address = "{shop}" }}

            [plugins.globex-router]
            wasm = "{{misbehave}}"
            config = {{ mode = "trap", only_sni = "trap.globex.test", pool = "globex" }}

            [pools.acme]
            servers = ["{acme}"]
            [pools.globex]
            servers = ["{globex}"]

            [tenants.acme]
            domains = ["acme.test"]
            plugins = ["acme-router"]
            pools = ["acme"]
            upstreams = ["127.0.0.1/32"]

            [tenants.shop]
            domains = ["shop.acme.test"]
            plugins = ["shop-router"]
            upstreams = ["127.0.0.0/8"]

            [tenants.globex]
            domains = ["globex.test"]
            plugins = ["globex-router"]
            pools = ["globex"]
            max_connections = 2
            "#,
            acme = acme.addr,
            shop = shop.addr,
            globex = globex.addr,
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let client = pki.client_config();
    let ask = |sni: &'static str| {
        let client = Arc::clone(&client);
        async move { tls_exchange(addr, sni, client, "hi").await }
    };

    // Dispatch by the longest suffix: shop.acme.test is shop's, not acme's.
    assert_eq!(ask("app.acme.test").await.expect("acme"), "upstream heard: hi (acme)\n");
    assert!(weir.connection_line().await.contains(r#"tenant="acme""#));
    assert_eq!(
        ask("x.shop.acme.test").await.expect("shop"),
        "upstream heard: hi (shop)\n"
    );
    assert!(weir.connection_line().await.contains(r#"tenant="shop""#));
    // A name no tenant owns takes the listener's chain.
    assert!(ask("other.test").await.as_deref().unwrap_or_default().is_empty());
    assert!(weir.connection_line().await.contains(r#"tenant="-""#));

    // Leaving the namespace: another tenant's pool, an address outside the ranges.
    for (sni, reason) in [
        ("evil.acme.test", "unknown pool `globex`"),
        (
            "addr.acme.test",
            "address `127.0.0.3:443` is outside tenant `acme`'s upstream ranges",
        ),
    ] {
        assert!(ask(sni).await.as_deref().unwrap_or_default().is_empty(), "{sni}");
        let line = weir.connection_line().await;
        assert!(line.contains("rejected") && line.contains(reason), "{line}");
    }

    // globex's plugin traps on one name: only that connection suffers.
    assert!(ask("trap.globex.test").await.as_deref().unwrap_or_default().is_empty());
    assert!(weir.connection_line().await.contains("trapped"));
    assert_eq!(
        ask("ok.globex.test").await.expect("globex"),
        "upstream heard: hi (globex)\n"
    );
    weir.connection_line().await;
    assert_eq!(ask("app.acme.test").await.expect("acme"), "upstream heard: hi (acme)\n");
    weir.connection_line().await;

    // globex at its limit of 2: its third connection is refused at once,
    // acme is served meanwhile, and globex recovers when one closes.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tls = tls_connect(addr, "ok.globex.test", Arc::clone(&client))
            .await
            .expect("held");
        tls.write_all(b"hold\n").await.expect("write");
        tls.flush().await.expect("flush");
        held.push(tls);
    }
    // Both are counted once weir has routed them (the upstream answered).
    for tls in &mut held {
        let mut line = [0u8; 1];
        tokio::time::timeout(STEP, tokio::io::AsyncReadExt::read(tls, &mut line))
            .await
            .expect("held connection answered")
            .expect("read");
    }
    assert!(ask("ok.globex.test").await.as_deref().unwrap_or_default().is_empty());
    let line = weir.connection_line().await;
    assert!(
        line.contains("tenant `globex` is at its limit of 2 connections"),
        "{line}"
    );
    assert_eq!(
        ask("app.acme.test").await.expect("acme unaffected"),
        "upstream heard: hi (acme)\n"
    );
    weir.connection_line().await;
    drop(held.pop());
    weir.connection_line().await;
    assert_eq!(
        ask("ok.globex.test").await.expect("globex again"),
        "upstream heard: hi (globex)\n"
    );
    weir.child.kill().await.expect("stop");
}

/// A tenant whose plugin runs to its deadline on every connection, at 200
/// connections a second, on a gateway with one worker thread: the other
/// tenant's connections are all served (plugin calls yield at every tick
/// instead of holding the worker), and the looping tenant is held to its
/// plugin CPU budget: past it, its connections are refused without the
/// plugin running, counted as `kind="budget"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_tenant_spends_only_its_own_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("budget test CA");
    let identity = pki.server(&["*.calm.test", "*.loop.test"]);
    let calm = Upstream::tls(&identity, |s| answer_with(s, " (calm)".into())).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["edge"]

            [plugins.edge]
            wasm = "{{static_router}}"
            config.default = {{ reject = "no tenant owns this name" }}

            [plugins.looper]
            wasm = "{{misbehave}}"
            config = {{ mode = "loop" }}
            timeout = "10ms"

            [plugins.calm-router]
            wasm = "{{static_router}}"
            config.default = {{ pool = "calm" }}

            [pools.calm]
            servers = ["{calm}"]

            [tenants.loop]
            domains = ["loop.test"]
            plugins = ["looper"]
            plugin_cpu = "100ms"

            [tenants.calm]
            domains = ["calm.test"]
            plugins = ["calm-router"]
            pools = ["calm"]

            [admin]
            bind = "127.0.0.1:0"

            [reload]
            watch = false
            "#,
            calm = calm.addr,
        ),
    );
    let started = std::time::Instant::now();
    let mut weir = WeirProcess::spawn_under(&config, &["env", "TOKIO_WORKER_THREADS=1"]).await;
    let admin = weir.admin_addr().await;
    let addr = weir.addr("public");
    let client = pki.client_config();

    // The attack: 200 connections a second to the looping tenant, for 1.5 s.
    let attacker = {
        let client = Arc::clone(&client);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
            let mut attempts = Vec::new();
            for _ in 0..300 {
                tick.tick().await;
                let client = Arc::clone(&client);
                attempts.push(tokio::spawn(async move {
                    let _ = tokio::time::timeout(STEP, tls_exchange(addr, "x.loop.test", client, "spin")).await;
                }));
            }
            for attempt in attempts {
                let _ = attempt.await;
            }
        })
    };
    // Meanwhile the calm tenant's clients, one after another: every one is
    // served, well within a second (each needs ~1 ms when weir is idle).
    let mut served = 0;
    while !attacker.is_finished() {
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tls_exchange(addr, "app.calm.test", Arc::clone(&client), "hi"),
        )
        .await;
        match answer {
            Ok(Ok(text)) => assert_eq!(text, "upstream heard: hi (calm)\n"),
            Ok(Err(e)) => panic!("a calm connection failed after {served} served: {e}"),
            Err(_) => panic!("a calm connection waited over 1 s after {served} served"),
        }
        served += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    attacker.await.expect("attacker");
    assert!(served >= 20, "only {served} calm connections were tried");

    // The looping tenant ran into its deadline, then into its budget.
    let count = |kind: &'static str| {
        let admin = admin.clone();
        async move {
            let series = format!("weir_plugin_failures_total{{plugin=\"looper\",kind=\"{kind}\"}}");
            weir_tests::metric(&admin, &series).await.unwrap_or(0.0)
        }
    };
    let (timeouts, refused) = (count("timeout").await, count("budget").await);
    // (Few when other processes keep the CPUs busy: the slow lane at nice
    // 19 then barely runs, and the clients give up on its calls.)
    assert!(timeouts >= 1.0, "timeouts: {timeouts}");
    assert!(refused >= 100.0, "refused over budget: {refused}");
    // 100 ms of CPU a second for 1.5 s (plus the first second's worth) is
    // at most ~25 calls of 10 ms: the rest never ran.
    assert!(timeouts <= 60.0, "the budget let {timeouts} looping calls run");
    // Refused over its CPU, or, when the machine is so busy that the slow
    // lane barely runs, over its calls in flight.
    let line = weir.line_containing("was not run: its tenant has").await;
    assert!(
        line.contains("looper")
            && (line.contains("plugin CPU budget of 100ms a second") || line.contains("(max_plugin_calls)")),
        "{line}"
    );
    // The CPU it was charged stayed within its budget: 100 ms a second
    // since weir started, its 10 ms burst, and each of its (at most 4)
    // calls in flight overdrawing by one call (its 10 ms deadline, plus a
    // first tick up to 5 ms late and a fresh instance).
    let charged = weir_tests::metric(&admin, "weir_plugin_cpu_seconds_total{plugin=\"looper\"}")
        .await
        .expect("the looper's CPU is counted");
    let since_start = started.elapsed().as_secs_f64();
    assert!(
        charged <= 0.1 * since_start + 0.01 + 4.0 * 0.02,
        "charged {charged} s of CPU in {since_start} s"
    );
    // That CPU was spent in the slow lane, at the lowest priority, not on
    // the worker that serves the calm tenant: all of it but the first
    // slice of a call on the worker (up to 5 ms, once in 10 s) and the
    // fresh instances made there (under 0.5 ms each).
    let threads = thread_cpu(weir.child.id().expect("weir's pid"));
    let slow: Vec<_> = threads
        .iter()
        .filter(|t| t.name.starts_with("weir-plugin-slo"))
        .collect();
    let slow_cpu: std::time::Duration = slow.iter().map(|t| t.cpu).sum();
    let on_workers = std::time::Duration::from_secs_f64(0.005 + 0.0005 * (timeouts + 4.0));
    assert!(
        slow_cpu + on_workers >= std::time::Duration::from_secs_f64(charged),
        "the looper was charged {charged} s, the slow lane computed {slow_cpu:?}: {threads:?}"
    );
    assert!(!slow.is_empty() && slow.iter().all(|t| t.nice == 19), "{threads:?}");
    weir.child.kill().await.expect("stop");
}

/// One thread of a process: its name, CPU time and nice value.
#[derive(Debug)]
struct ThreadCpu {
    name: String,
    cpu: std::time::Duration,
    nice: i64,
}

/// The threads of process `pid`, from `/proc`.
fn thread_cpu(pid: u32) -> Vec<ThreadCpu> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    let mut threads = Vec::new();
    for task in tasks.flatten() {
        let path = task.path();
        let read = |file: &str| std::fs::read_to_string(path.join(file)).unwrap_or_default();
        let name = read("comm").trim().to_owned();
        let cpu_ns = read("schedstat")
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        // Field 19 of `stat`, counting after the parenthesised name.
        let stat = read("stat");
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let nice = after_name
            .split_whitespace()
            .nth(16)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        threads.push(ThreadCpu {
            name,
            cpu: std::time::Duration::from_nanos(cpu_ns),
            nice,
        });
    }
    threads
}

/// One tenant's terminations, each different (an ALPN name per connection,
/// 1,100 of them: more than the TLS config cache ever held for everyone),
/// do not take another tenant's place in that cache: the other tenant's
/// clients still resume their sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_terminations_cannot_evict_anothers_sessions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("cache test CA");
    let (cert, key) = pki.server(&["*.noisy.test", "*.quiet.test"]).write(dir.path(), "site");
    let upstream = Upstream::tcp(weir_tests::answer).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["edge"]

            [plugins.edge]
            wasm = "{{static_router}}"
            config.default = {{ reject = "no tenant owns this name" }}

            [plugins.noisy-router]
            wasm = "{{misbehave}}"
            config = {{ mode = "alpn-per-connection", pool = "noisy" }}

            [plugins.quiet-router]
            wasm = "{{static_router}}"
            config.default = {{ pool = "quiet", terminate = {{ certificate = "site" }} }}

            [pools.noisy]
            servers = ["{upstream}"]
            [pools.quiet]
            servers = ["{upstream}"]

            [certificates.site]
            cert = {cert}
            key = {key}

            [tenants.noisy]
            domains = ["noisy.test"]
            plugins = ["noisy-router"]
            pools = ["noisy"]
            certificates = ["site"]
            # Eight connections at a time: on a loaded machine more than the
            # default four calls overlap, and this test is about the cache.
            max_plugin_calls = 16

            [tenants.quiet]
            domains = ["quiet.test"]
            plugins = ["quiet-router"]
            pools = ["quiet"]
            certificates = ["site"]

            [reload]
            watch = false
            "#,
            upstream = upstream.addr,
            cert = weir_tests::toml_path(&cert),
            key = weir_tests::toml_path(&key),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");

    // The noisy tenant: 1,100 terminations served, each its own, eight at
    // a time. On a loaded machine a handshake may miss its deadline; those
    // are made up for (at most 300 more), and the first failure is told.
    let noisy = pki.client_config();
    let (mut served, mut tried, mut first_failure) = (0, 0, None);
    while served < 1100 && tried < 1400 {
        let batch: Vec<_> = (0..8)
            .map(|_| tokio::spawn(tls_exchange(addr, "x.noisy.test", Arc::clone(&noisy), "hi")))
            .collect();
        for done in batch {
            tried += 1;
            match done.await.expect("task") {
                Ok(answer) if answer == "upstream heard: hi\n" => served += 1,
                other => {
                    first_failure.get_or_insert(format!("{other:?}"));
                }
            }
        }
    }
    if served < 1100 {
        let log = weir.lines_so_far();
        let why = log.iter().find(|line| !line.contains(" INFO "));
        panic!(
            "only {served} of {tried} noisy connections were served; the first failure: {first_failure:?}; weir said: {why:?}"
        );
    }

    // The quiet tenant's client: a full handshake, then resumptions.
    let quiet = pki.client_config();
    let mut kinds = Vec::new();
    for _ in 0..10 {
        let mut tls = tls_connect(addr, "app.quiet.test", Arc::clone(&quiet))
            .await
            .expect("handshake");
        tls.write_all(b"hi\n").await.expect("write");
        tls.flush().await.expect("flush");
        let answer = weir_tests::read_to_end(&mut tls).await.expect("answer");
        assert_eq!(answer, b"upstream heard: hi\n");
        kinds.push(tls.get_ref().1.handshake_kind());
    }
    let resumed = kinds
        .iter()
        .filter(|k| **k == Some(rustls::HandshakeKind::Resumed))
        .count();
    assert!(resumed >= 8, "{resumed} of 10 resumed: {kinds:?}");
}
