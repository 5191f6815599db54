//! Connection limits: past a listener's or the global limit, or one
//! client's share of a listener, new connections are closed at once, and
//! the ones in progress go on; out of
//! file descriptors, new connections wait in the backlog while weir backs
//! off, and are served once descriptors free up.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::{STEP, Upstream, echo, echoes, start_gateway};

/// A connection weir closed without serving: EOF before any byte.
async fn shed(addr: std::net::SocketAddr) -> bool {
    let stream = TcpStream::connect(addr).await.expect("the kernel accepts");
    closed_unserved(stream, b"hello?\n").await
}

/// Sends `first` and expects EOF (or a reset) before any byte comes back.
async fn closed_unserved(mut stream: TcpStream, first: &[u8]) -> bool {
    let _ = stream.write_all(first).await;
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(STEP, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// A connection to `addr` from the loopback address `source`.
async fn connect_from(source: [u8; 4], addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .expect("bind the source");
    socket.connect(addr).await.expect("the kernel accepts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_a_listener_for_itself() {
    let upstream = Upstream::tcp(echo).await;
    let gateway = start_gateway(&format!(
        r#"
        [listeners.direct]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["router"]
        max_connections_per_client = 2

        [listeners.balanced]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["router"]
        max_connections_per_client = 2
        accept_proxy_protocol_from = ["127.0.0.0/8"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.no_sni = {{ address = "{}" }}
        "#,
        upstream.addr
    ))
    .await;

    // Direct clients are counted by their own address.
    let direct = gateway.local_addr("direct").expect("listener");
    let mut first = connect_from([127, 0, 0, 1], direct).await;
    let mut second = connect_from([127, 0, 0, 1], direct).await;
    assert!(echoes(&mut first, b"one\n").await && echoes(&mut second, b"two\n").await);
    assert!(
        closed_unserved(connect_from([127, 0, 0, 1], direct).await, b"three?\n").await,
        "a third connection from 127.0.0.1 was served"
    );
    // A client is a /24 by default: 127.0.1.2 is another.
    let mut other = connect_from([127, 0, 1, 2], direct).await;
    assert!(echoes(&mut other, b"another client\n").await);
    drop(second);
    let started = std::time::Instant::now();
    loop {
        let mut again = connect_from([127, 0, 0, 1], direct).await;
        if echoes(&mut again, b"room\n").await {
            break;
        }
        assert!(started.elapsed() < STEP, "no room after a connection ended");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Behind a load balancer, by the PROXY header's source.
    let balanced = gateway.local_addr("balanced").expect("listener");
    let via_balancer = |source: &'static str| async move {
        let mut stream = TcpStream::connect(balanced).await.expect("connect");
        let header = format!("PROXY TCP4 {source} 127.0.0.1 40000 443\r\n");
        stream.write_all(header.as_bytes()).await.expect("header");
        stream
    };
    let mut a1 = via_balancer("203.0.113.7").await;
    let mut a2 = via_balancer("203.0.113.7").await;
    assert!(echoes(&mut a1, b"a1\n").await && echoes(&mut a2, b"a2\n").await);
    assert!(
        closed_unserved(via_balancer("203.0.113.7").await, b"a3?\n").await,
        "a third connection from 203.0.113.7 was served"
    );
    let mut b1 = via_balancer("198.51.100.8").await;
    assert!(echoes(&mut b1, b"b1\n").await);
    assert!(echoes(&mut first, b"still one\n").await && echoes(&mut a1, b"still a1\n").await);

    // Shed: 127.0.0.1's third, and any retry made before the dropped one
    // was counted out; 203.0.113.7's third.
    let metrics = weir::metrics::METRICS.encode();
    for listener in ["direct", "balanced"] {
        let series = format!(r#"weir_shed_total{{listener="{listener}",limit="client"}} "#);
        let count: u64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {series}in {metrics}"));
        assert!(count >= 1, "{series}{count}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limits_are_shed_and_the_rest_go_on() {
    let upstream = Upstream::tcp(echo).await;
    let gateway = start_gateway(&format!(
        r#"
        [listeners.small]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["router"]
        max_connections = 2

        [listeners.other]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["router"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.no_sni = {{ address = "{}" }}

        [limits]
        max_connections = 3
        "#,
        upstream.addr
    ))
    .await;
    let small = gateway.local_addr("small").expect("listener");
    let other = gateway.local_addr("other").expect("listener");

    let mut first = TcpStream::connect(small).await.expect("connect");
    let mut second = TcpStream::connect(small).await.expect("connect");
    assert!(echoes(&mut first, b"one\n").await && echoes(&mut second, b"two\n").await);
    // The listener is full: shed, while its two go on.
    assert!(shed(small).await, "a third connection on `small` was served");
    assert!(echoes(&mut first, b"still one\n").await);
    // Another listener still has room, up to the global limit of 3.
    let mut third = TcpStream::connect(other).await.expect("connect");
    assert!(echoes(&mut third, b"three\n").await);
    assert!(shed(other).await, "a fourth connection overall was served");
    let metrics = weir::metrics::METRICS.encode();
    assert!(
        metrics.contains(r#"weir_shed_total{listener="small",limit="listener"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"weir_shed_total{listener="other",limit="global"} 1"#),
        "{metrics}"
    );

    // When one ends, there is room again.
    drop(second);
    let started = std::time::Instant::now();
    loop {
        let mut again = TcpStream::connect(small).await.expect("connect");
        if echoes(&mut again, b"room\n").await {
            break;
        }
        assert!(started.elapsed() < STEP, "no room after a connection ended");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(echoes(&mut first, b"and one\n").await && echoes(&mut third, b"and three\n").await);
}

/// CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process is running");
    // The command name is in parentheses and may hold spaces: count after it.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat") + 2..].split(' ').collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Descriptors a process holds below 64 (the test's limit; an inherited
/// descriptor above it does not count against it).
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process is running")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|fd| *fd < 64)
        .count()
}

/// Sends the hello and expects it echoed back within `wait`.
async fn echoed(stream: &mut TcpStream, hello: &[u8], wait: std::time::Duration) -> Option<bool> {
    let mut back = vec![0u8; hello.len()];
    match tokio::time::timeout(wait, stream.read_exact(&mut back)).await {
        Ok(Ok(_)) => Some(back == hello),
        // Closed: refused.
        Ok(Err(_)) => Some(false),
        // Nothing yet: waiting.
        Err(_) => None,
    }
}

/// A listener routing a.example.com to `upstream`, with `listener` lines
/// added to it and `tables` after it, and no descriptor reserve: these
/// tests are about running out, and the reserve would shed first.
fn running_out_config(upstream: std::net::SocketAddr, listener: &str, tables: &str) -> String {
    format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
plugins = ["router"]
connect_timeout = "60s"
{listener}

[plugins.router]
wasm = "{{static_router}}"
config.routes."a.example.com" = {{ address = "{upstream}" }}

{tables}
[limits]
descriptor_reserve = 0
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_descriptor_limit_new_connections_wait_without_a_busy_loop() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let config = weir_tests::write_config(
        dir.path(),
        &running_out_config(upstream.addr, "sniff_timeout = \"60s\"", ""),
    );
    // 64 descriptors, soft and hard: a few dozen connections exhaust them.
    let mut weir = weir_tests::WeirProcess::spawn_under(&config, &["prlimit", "--nofile=64:64"]).await;
    let addr = weir.addr("public");
    let pid = weir.child.id().expect("weir's pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")),
        "{limits}"
    );
    let hello = weir_tests::testdata("clienthello/openssl-tls13-sni.bin");

    // Fill weir up: each relayed connection holds two of its descriptors.
    // With an odd number in use first, the last connection gets the last
    // descriptor and then has none for its upstream socket: it must wait
    // for one, not be refused (a silent client, sitting in the sniff for
    // 60 s, takes one descriptor to make the count odd).
    let mut held = Vec::new();
    if open_descriptors(pid).is_multiple_of(2) {
        held.push(TcpStream::connect(addr).await.expect("the kernel accepts"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!open_descriptors(pid).is_multiple_of(2));
    let mut waiting = Vec::new();
    loop {
        assert!(held.len() < 64, "64 connections and still no descriptor limit");
        let mut stream = TcpStream::connect(addr).await.expect("the kernel accepts");
        stream.write_all(&hello).await.expect("hello");
        match echoed(&mut stream, &hello, Duration::from_millis(500)).await {
            Some(true) => held.push(stream),
            // A connection accepted with the last free descriptor waits for
            // another one to open its upstream socket; it is never refused.
            Some(false) => panic!("a connection at the descriptor limit was refused instead of waiting"),
            None => {
                waiting.push(stream);
                break;
            }
        }
    }
    assert!(held.len() >= 5, "only {} connections before the limit", held.len());
    assert_eq!(
        open_descriptors(pid),
        64,
        "the last connection is not waiting with the last descriptor"
    );

    // More arrive while weir is out of descriptors: they wait in the
    // backlog, neither served nor refused.
    for _ in 0..3 {
        let mut stream = TcpStream::connect(addr).await.expect("the kernel accepts");
        stream.write_all(&hello).await.expect("hello");
        waiting.push(stream);
    }
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(pid) - before;
    // A loop retrying accept without pause would burn the whole 2 s (200
    // ticks at the usual 100 Hz); backing off costs next to nothing.
    assert!(spent < 50, "weir used {spent} ticks of CPU in 2 s at the limit");
    for stream in &mut waiting {
        assert_eq!(
            echoed(stream, &hello, Duration::from_millis(100)).await,
            None,
            "a connection was answered or refused while weir had no descriptors"
        );
    }
    let line = weir.line_containing("accept failed").await;
    assert!(line.contains("out of file descriptors"), "{line}");
    // The failures are reported at most once a second, with a count.
    let reports = {
        let mut reports = 1;
        while tokio::time::timeout(Duration::from_millis(300), weir.line_containing("accept failed"))
            .await
            .is_ok()
        {
            reports += 1;
        }
        reports
    };
    assert!(reports <= 4, "{reports} accept-failure lines in ~2 s");

    // Descriptors free up: the waiting connections are served, and so is
    // a new one.
    drop(held);
    for stream in &mut waiting {
        assert_eq!(
            echoed(stream, &hello, STEP).await,
            Some(true),
            "a waiting connection was lost"
        );
    }
    let mut fresh = TcpStream::connect(addr).await.expect("connect");
    fresh.write_all(&hello).await.expect("hello");
    assert_eq!(echoed(&mut fresh, &hello, STEP).await, Some(true));
    weir.child.kill().await.expect("stop");
}

/// No decision reaches weir itself: not a listener's own address (a loop
/// that would use every descriptor), not a wildcard listener through any
/// local address or by name, not the admin API; and failures on a port the
/// decision chose (`pool:port`) eject no server of the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_never_reach_weir_itself() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let (public, wild, admin) = (
        weir_tests::free_port(),
        weir_tests::free_port(),
        weir_tests::free_port(),
    );
    let unserved = weir_tests::free_port();
    let config = weir_tests::write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:{public}"
            plugins = ["router"]

            [listeners.wild]
            bind = "0.0.0.0:{wild}"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."self.test" = {{ address = "127.0.0.1:{public}" }}
            config.routes."zero.test" = {{ address = "0.0.0.0:{public}" }}
            config.routes."wild.test" = {{ address = "127.0.0.5:{wild}" }}
            config.routes."name.test" = {{ address = "localhost:{wild}" }}
            config.routes."admin.test" = {{ address = "127.0.0.1:{admin}" }}
            config.routes."port.test" = {{ pool = "app:{unserved}" }}
            config.routes."app.test" = {{ pool = "app" }}

            [pools.app]
            servers = ["{upstream}"]

            [admin]
            bind = "127.0.0.1:{admin}"

            [reload]
            watch = false
            "#,
            upstream = upstream.addr
        ),
    );
    let mut weir = weir_tests::WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let client = weir_tests::Pki::new("loop test CA").client_config();
    let refused = |sni: &'static str| {
        let client = std::sync::Arc::clone(&client);
        async move {
            let answer = weir_tests::tls_exchange(addr, sni, client, "x").await;
            answer.as_deref().unwrap_or_default().is_empty()
        }
    };
    for sni in ["self.test", "zero.test", "wild.test", "name.test", "admin.test"] {
        assert!(refused(sni).await, "{sni} was served");
        let line = weir.connection_line().await;
        assert!(
            line.contains("connect-failed") && line.contains("weir's own listening address"),
            "{sni}: {line}"
        );
    }
    // One connection each: no loop multiplied them.
    let (status, body) =
        weir_tests::admin_request(&format!("127.0.0.1:{admin}"), "GET", "/api/connections", None, "").await;
    assert_eq!(status, 200);
    let counts: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(counts["listeners"]["public"]["total"], 5, "{body}");
    assert_eq!(counts["listeners"]["wild"]["total"], 0, "{body}");

    // A client's port choice that nothing serves, over and over: the
    // server stays in rotation, unejected.
    for _ in 0..5 {
        assert!(refused("port.test").await);
        assert!(weir.connection_line().await.contains("connect-failed"));
    }
    let (_, body) = weir_tests::admin_request(&format!("127.0.0.1:{admin}"), "GET", "/api/pools/app", None, "").await;
    let pool: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(pool["backends"][0]["ejected"], false, "{body}");
    assert_eq!(pool["healthy"], 1, "{body}");
    weir.child.kill().await.expect("stop");
}

/// With the defaults, weir keeps a reserve of descriptors: a connection
/// accepted with one of the last ones is closed at once (a newcomer is
/// refused in milliseconds instead of waiting on a full process), and it
/// is served again as soon as descriptors free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_descriptor_reserve_sheds_before_running_out() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let config = weir_tests::write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router"]
            sniff_timeout = "60s"

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."a.example.com" = {{ address = "{}" }}
            "#,
            upstream.addr
        ),
    );
    // 128 descriptors: the reserve is 16 of them.
    let mut weir = weir_tests::WeirProcess::spawn_under(&config, &["prlimit", "--nofile=128:128"]).await;
    let addr = weir.addr("public");
    let pid = weir.child.id().expect("weir's pid");
    let hello = weir_tests::testdata("clienthello/openssl-tls13-sni.bin");
    let mut held = Vec::new();
    let mut shed_after = None;
    for n in 0..128 {
        let mut stream = TcpStream::connect(addr).await.expect("the kernel accepts");
        stream.write_all(&hello).await.expect("hello");
        match echoed(&mut stream, &hello, STEP).await {
            Some(true) => held.push(stream),
            Some(false) => {
                shed_after = Some(n);
                break;
            }
            None => panic!("connection {n} waited instead of being served or shed"),
        }
    }
    let served = shed_after.expect("no connection was shed");
    assert!(served >= 40, "shed after only {served}");
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("running").count();
    assert!(open <= 128 - 8, "{open} descriptors open: the reserve was not kept");
    // Refused at once, not after a wait.
    let started = Instant::now();
    assert!(shed(addr).await);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let line = weir.line_containing("connections shed").await;
    assert!(line.contains("descriptor_reserve"), "{line}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fresh = TcpStream::connect(addr).await.expect("connect");
    fresh.write_all(&hello).await.expect("hello");
    assert_eq!(echoed(&mut fresh, &hello, STEP).await, Some(true));
    weir.child.kill().await.expect("stop");
}

/// Without any setting, one client holds at most 512 connections on a
/// listener; a client is an address cut to a prefix, /24 by default, so
/// neighbours in one network share a count (127.0.0.1 and 127.0.0.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_or_network_cannot_take_a_listener() {
    let upstream = Upstream::tcp(echo).await;
    let gateway = start_gateway(&weir_tests::plain_route_config(upstream.addr, "")).await;
    let addr = gateway.local_addr("public").expect("listener");
    let mut held = Vec::new();
    for n in 0..256 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        assert!(echoes(&mut stream, b"hold\n").await, "connection {n} was not served");
        held.push(stream);
    }
    for n in 256..512 {
        let mut stream = connect_from([127, 0, 0, 2], addr).await;
        assert!(echoes(&mut stream, b"hold\n").await, "connection {n} was not served");
        held.push(stream);
    }
    assert!(shed(addr).await, "a 513th connection from 127.0.0.0/24 was served");
    assert!(
        closed_unserved(connect_from([127, 0, 0, 3], addr).await, b"c\n").await,
        "a neighbour in 127.0.0.0/24 was served past the network's 512"
    );
    // Another /24 is another client.
    let mut other = connect_from([127, 0, 1, 1], addr).await;
    assert!(echoes(&mut other, b"other\n").await);
    drop((held, other));

    // With /32, 127.0.0.1 and 127.0.0.2 are two clients.
    let gateway = start_gateway(&weir_tests::plain_route_config(upstream.addr, "").replace(
        "[listeners.public]",
        "[listeners.public]\nmax_connections_per_client = 2\nclient_prefix_v4 = 32",
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    let mut a = connect_from([127, 0, 0, 1], addr).await;
    let mut a2 = connect_from([127, 0, 0, 1], addr).await;
    assert!(echoes(&mut a, b"a\n").await && echoes(&mut a2, b"a2\n").await);
    assert!(
        closed_unserved(connect_from([127, 0, 0, 1], addr).await, b"a3\n").await,
        "a third connection from 127.0.0.1 was served"
    );
    let mut b = connect_from([127, 0, 0, 2], addr).await;
    assert!(echoes(&mut b, b"b\n").await, "127.0.0.2 is another client under /32");
}

/// A splicing listener out of descriptors: no burst can get a pipe, so every
/// one is copied instead, byte for byte, and counted; splicing never costs
/// a connection.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_a_splicing_relay_copies_every_byte() {
    use std::time::Duration;
    let hello = weir_tests::testdata("clienthello/openssl-tls13-sni.bin");
    let hello_len = hello.len();
    // Swallows the replayed hello, then echoes: no byte moves through the
    // relay until the bulk below, so no pipe exists before descriptors run out.
    let upstream = Upstream::tcp(move |mut stream: TcpStream| async move {
        let mut first = vec![0u8; hello_len];
        if stream.read_exact(&mut first).await.is_ok() {
            echo(stream).await;
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = weir_tests::write_config(
        dir.path(),
        &running_out_config(upstream.addr, "relay = \"splice\"", "[admin]\nbind = \"127.0.0.1:0\"\n"),
    );
    let mut weir = weir_tests::WeirProcess::spawn_under(&config, &["prlimit", "--nofile=64:64"]).await;
    let addr = weir.addr("public");
    let admin = weir.admin_addr().await;
    let pid = weir.child.id().expect("weir's pid");

    // Fill weir up, a connection at a time, until one is left waiting for
    // a descriptor for its upstream.
    let mut held = Vec::new();
    loop {
        assert!(held.len() < 64, "64 connections and still no descriptor limit");
        let mut stream = TcpStream::connect(addr).await.expect("the kernel accepts");
        stream.write_all(&hello).await.expect("hello");
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while upstream.accepted() == held.len() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if upstream.accepted() == held.len() {
            break;
        }
        held.push(stream);
    }
    assert!(held.len() >= 5, "only {} connections before the limit", held.len());
    assert_eq!(open_descriptors(pid), 64, "weir is not out of descriptors");

    // Every connection moves 256 KiB each way at once.
    let mut tasks = tokio::task::JoinSet::new();
    for (n, stream) in held.into_iter().enumerate() {
        let body = weir_tests::pattern(256 * 1024, u8::try_from(n % 251).unwrap_or(0));
        tasks.spawn(weir_tests::echo_through(stream, body));
    }
    // Kept until every echo is back: a connection closed early would free
    // descriptors for the others' pipes.
    let streams = tasks.join_all().await;
    let connections = streams.len();
    drop(streams);

    // Descriptors free again: the admin API answers, and says how many
    // bursts found no pipe (at least one per direction).
    let refusals = weir_tests::metric(&admin, "weir_splice_pipe_refusals_total")
        .await
        .expect("the refusal counter");
    assert!(
        refusals >= (2 * connections) as f64,
        "{refusals} bursts copied for want of a pipe, over {connections} connections"
    );
    weir.child.kill().await.expect("stop");
}

/// Clients that park mid-hello (the first 100 bytes of a real hello, then
/// nothing) hold at most `limits.max_parked_bytes` over all of them: past
/// it the connections parked longest are closed first, counted, and a
/// client whose hello arrives whole is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_parked_mid_way_hold_a_bounded_total() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let config = weir_tests::write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router"]
            sniff_timeout = "60s"

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."a.example.com" = {{ address = "{}" }}

            [limits]
            max_parked_bytes = 65536

            [admin]
            bind = "127.0.0.1:0"
            "#,
            upstream.addr
        ),
    );
    let mut weir = weir_tests::WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let admin = weir.admin_addr().await;
    let hello = weir_tests::testdata("clienthello/openssl-tls13-sni.bin");
    // Each parked connection counts at least 7 KiB (1 KiB of buffer, 6 of
    // task and socket): 20 are more than 64 KiB.
    let mut parked = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&hello[..100]).await.expect("part of a hello");
        parked.push(stream);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut closed = Vec::new();
    for (n, stream) in parked.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await {
            closed.push(n);
        }
    }
    assert!(closed.len() >= 10, "only {closed:?} of 20 were shed");
    assert!(
        closed.iter().enumerate().all(|(i, n)| i == *n),
        "the oldest go first: {closed:?}"
    );
    assert!(!closed.contains(&19), "the newest was shed: {closed:?}");
    let line = weir.line_containing("sniff-shed").await;
    assert!(line.contains("limits.max_parked_bytes"), "{line}");
    let shed = weir_tests::metric(&admin, r#"weir_shed_total{listener="public",limit="parked"}"#).await;
    assert_eq!(shed, Some(closed.len() as f64));
    // A whole hello is served beside them.
    let mut whole = TcpStream::connect(addr).await.expect("connect");
    whole.write_all(&hello).await.expect("hello");
    assert_eq!(echoed(&mut whole, &hello, STEP).await, Some(true));
    // A parked one that completes its hello is served too.
    let last = parked.last_mut().expect("the newest");
    last.write_all(&hello[100..]).await.expect("the rest");
    assert_eq!(echoed(last, &hello, STEP).await, Some(true));
    weir.child.kill().await.expect("stop");
}
