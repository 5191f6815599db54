//! Connection limits: past a listener's or the global limit, new
//! connections are closed at once, and the ones in progress go on.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::{STEP, Upstream, echo, start_gateway};

/// A connection that echoes a line back: it is being served.
async fn served(stream: &mut TcpStream, line: &[u8]) -> bool {
    if stream.write_all(line).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; line.len()];
    matches!(
        tokio::time::timeout(STEP, stream.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == line
}

/// A connection weir closed without serving: EOF before any byte.
async fn shed(addr: std::net::SocketAddr) -> bool {
    let mut stream = TcpStream::connect(addr).await.expect("the kernel accepts");
    let _ = stream.write_all(b"hello?\n").await;
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(STEP, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
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
    assert!(served(&mut first, b"one\n").await && served(&mut second, b"two\n").await);
    // The listener is full: shed, while its two go on.
    assert!(shed(small).await, "a third connection on `small` was served");
    assert!(served(&mut first, b"still one\n").await);
    // Another listener still has room, up to the global limit of 3.
    let mut third = TcpStream::connect(other).await.expect("connect");
    assert!(served(&mut third, b"three\n").await);
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
        if served(&mut again, b"room\n").await {
            break;
        }
        assert!(started.elapsed() < STEP, "no room after a connection ended");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(served(&mut first, b"and one\n").await && served(&mut third, b"and three\n").await);
}
