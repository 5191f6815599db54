//! `weir run` and signals: SIGHUP reloads the config; SIGTERM or SIGINT
//! stops accepting at once and lets the connections in progress finish, for
//! up to `shutdown.drain_timeout`; a second signal stops at once.

use std::net::SocketAddr;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::{STEP, Upstream, WeirProcess, answer_with, echo, echoes, plain_route_config, write_config};

fn send(weir: &WeirProcess, signal: Signal) {
    let pid = weir.child.id().expect("weir is running");
    let pid = Pid::from_raw(i32::try_from(pid).expect("a pid")).expect("a pid");
    kill_process(pid, signal).expect("signal sent");
}

/// Every connection to `upstream`, reloads only when asked, and `extra`.
fn config(upstream: SocketAddr, extra: &str) -> String {
    plain_route_config(upstream, &format!("[reload]\nwatch = false\n\n{extra}"))
}

/// Waits for weir to exit; returns whether it exited successfully.
async fn exit(weir: &mut WeirProcess) -> bool {
    tokio::time::timeout(STEP, weir.child.wait())
        .await
        .expect("weir exits in time")
        .expect("exit status")
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = Upstream::tcp(|s| answer_with(s, " (first)".into())).await;
    let second = Upstream::tcp(|s| answer_with(s, " (second)".into())).await;
    let path = write_config(dir.path(), &config(first.addr, ""));
    let mut weir = WeirProcess::spawn(&path).await;
    let addr = weir.addr("public");
    let ask = || async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(b"who\n").await.expect("send");
        weir_tests::read_to_end(&mut stream).await.expect("answer")
    };
    assert_eq!(ask().await, b"upstream heard: who (first)\n");
    write_config(dir.path(), &config(second.addr, ""));
    send(&weir, Signal::HUP);
    let line = weir.line_containing("reloaded").await;
    assert!(line.contains("SIGHUP"), "{line}");
    assert_eq!(ask().await, b"upstream heard: who (second)\n");
    weir.child.kill().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_and_lets_open_ones_finish() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let path = write_config(dir.path(), &config(upstream.addr, ""));
    let mut weir = WeirProcess::spawn(&path).await;
    let addr = weir.addr("public");
    let mut open = TcpStream::connect(addr).await.expect("connect");
    assert!(echoes(&mut open, b"before\n").await);

    send(&weir, Signal::TERM);
    let line = weir.line_containing("draining").await;
    assert!(line.contains("connections=1") && line.contains("SIGTERM"), "{line}");
    // The listener is closed: the kernel refuses new connections.
    let started = tokio::time::Instant::now();
    while TcpStream::connect(addr).await.is_ok() {
        assert!(started.elapsed() < STEP, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open connection goes on, and when it ends weir exits.
    assert!(echoes(&mut open, b"while draining\n").await);
    drop(open);
    weir.line_containing("drained").await;
    assert!(exit(&mut weir).await, "weir did not exit cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_ends_at_its_timeout_or_at_a_second_signal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    for (extra, second) in [("[shutdown]\ndrain_timeout = \"300ms\"", None), ("", Some(Signal::INT))] {
        let path = write_config(dir.path(), &config(upstream.addr, extra));
        let mut weir = WeirProcess::spawn(&path).await;
        let mut open = TcpStream::connect(weir.addr("public")).await.expect("connect");
        assert!(echoes(&mut open, b"held\n").await);
        send(&weir, Signal::INT);
        weir.line_containing("draining").await;
        let expected = match second {
            // The default drain timeout is 30 s: only the signal ends it.
            Some(signal) => {
                send(&weir, signal);
                "stopping now"
            }
            None => "drain timeout",
        };
        let line = weir.line_containing(expected).await;
        assert!(line.contains("connections=1"), "{line}");
        assert!(exit(&mut weir).await, "weir did not exit cleanly");
        // The held connection was closed.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(STEP, open.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
}
