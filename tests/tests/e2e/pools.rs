//! Pools through the gateway: each policy's share of real connections, a
//! killed server taken out by health checks and brought back when it
//! recovers without a client connection failing, and a pool's own PROXY
//! protocol setting.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::{STEP, Upstream, answer, next_report, recording_upstream, start_gateway};

async fn ask(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"hi\n").await?;
    let mut reply = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut reply))
        .await
        .map_err(|_| std::io::Error::other("no answer in time"))??;
    Ok(reply)
}

fn pool_config(servers: &str, extra: &str) -> String {
    weir_tests::plain_pool_config("p", servers, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_share_connections() {
    let a = Upstream::tcp(answer).await;
    let b = Upstream::tcp(answer).await;
    let c = Upstream::tcp(answer).await;
    let servers = format!("\"{}\", \"{}\", \"{}\"", a.addr, b.addr, c.addr);
    let gateway = start_gateway(&pool_config(&servers, "policy = \"round_robin\"")).await;
    let addr = gateway.local_addr("public").expect("listener");
    for _ in 0..90 {
        assert_eq!(ask(addr).await.expect("served"), "upstream heard: hi\n");
    }
    assert_eq!([a.accepted(), b.accepted(), c.accepted()], [30, 30, 30]);
    drop(gateway);

    let (heavy, light) = (Upstream::tcp(answer).await, Upstream::tcp(answer).await);
    let servers = format!(
        "{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\", weight = 1 }}",
        heavy.addr, light.addr
    );
    let gateway = start_gateway(&pool_config(&servers, "policy = \"weighted\"")).await;
    let addr = gateway.local_addr("public").expect("listener");
    for _ in 0..80 {
        ask(addr).await.expect("served");
    }
    assert_eq!([heavy.accepted(), light.accepted()], [60, 20]);
    let pool = gateway.snapshot().pool("p").cloned().expect("pool");
    let stats: Vec<_> = pool.backends().iter().map(|b| b.stats()).collect();
    assert_eq!((stats[0].connections, stats[1].connections), (60, 20));
    // Bytes are added when a connection's relay ends, just after the client
    // has its answer.
    let started = Instant::now();
    while pool.backends()[0].stats().bytes_up < 60 * 3 && started.elapsed() < STEP {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.backends()[0].stats().bytes_up, 60 * 3, "\"hi\\n\" per connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_is_taken_out_and_brought_back() {
    let a = Upstream::tcp(answer).await;
    let b = Upstream::tcp(answer).await;
    let a_addr = a.addr;
    let servers = format!("\"{}\", \"{}\"", a.addr, b.addr);
    let health = "health = { interval = \"100ms\", timeout = \"100ms\", rise = 2, fall = 2 }";
    let gateway = start_gateway(&pool_config(&servers, health)).await;
    let addr = gateway.local_addr("public").expect("listener");
    let pool = gateway.snapshot().pool("p").cloned().expect("pool");
    let healthy = |i: usize| pool.backends()[i].stats().healthy;

    drop(a);
    // Clients keep being served (a refused connect moves on to b) while the
    // checks notice, within fall × interval plus one check's timeout.
    let killed = Instant::now();
    while healthy(0) {
        assert_eq!(ask(addr).await.expect("never fails"), "upstream heard: hi\n");
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the dead server is still marked healthy"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failures = pool.backends()[0].stats().failures;
    for _ in 0..20 {
        assert_eq!(ask(addr).await.expect("never fails"), "upstream heard: hi\n");
    }
    assert_eq!(
        pool.backends()[0].stats().failures,
        failures,
        "no connection tried the dead server"
    );

    // Back on the same address: after `rise` good checks it gets connections again.
    let a = Upstream::tcp_at(a_addr, answer).await;
    let revived = Instant::now();
    while !healthy(0) {
        assert!(
            revived.elapsed() < Duration::from_secs(5),
            "the server did not come back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..10 {
        ask(addr).await.expect("served");
    }
    // Its share of the 10, plus the health checks' own connections.
    assert!(a.accepted() >= 5, "a recovered server gets its share: {}", a.accepted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_sends_its_proxy_header() {
    let (upstream, mut reports) = recording_upstream().await;
    let servers = format!("\"{}\"", upstream.addr);
    let gateway = start_gateway(&pool_config(&servers, "proxy_protocol = 1")).await;
    let addr = gateway.local_addr("public").expect("listener");
    let mut client = TcpStream::connect(addr).await.expect("connect");
    let local = client.local_addr().expect("local");
    client.write_all(b"payload").await.expect("write");
    client.shutdown().await.expect("close");
    let report = next_report(&mut reports).await;
    let expected = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\npayload",
        local.port(),
        addr.port()
    );
    assert_eq!(String::from_utf8_lossy(&report), expected);
}
