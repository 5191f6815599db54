//! The fleet against what goes wrong with etcd and the way to it, each
//! against real etcd processes: the traffic a publish costs, history too
//! large for one message, a blob damaged in etcd, the leader lost during a
//! stream of publishes, a member lost for good, a node cut off by a
//! partition (a network namespace), a node with the wrong CA for etcd.

use std::path::Path;
use std::time::{Duration, Instant};

use weir_tests::etcd::{Etcd, Link};
use weir_tests::netns::Netns;
use weir_tests::run_weir as weir;
use weir_tests::{STEP, Upstream, WeirProcess, admin_request, echo};

use super::fleet::{eventually, exchange, gateway_config, node_file, publish, text, write};

/// The revision `weir publish` printed.
fn published_revision(output: &std::process::Output) -> i64 {
    let said = text(output);
    said.split("as revision ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no revision in: {said}"))
}

/// `weir fleet status --json`.
fn status_json(etcd: &Etcd) -> serde_json::Value {
    let output = weir(&["fleet", "status", "--json", "--etcd", &etcd.endpoints().join(",")]);
    assert!(output.status.success(), "{}", text(&output));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// The mod revision of `/weir/config` as etcd holds it.
fn config_revision(etcd: &Etcd) -> i64 {
    let got = etcd.etcdctl(&["get", "/weir/config", "-w", "json"]);
    let got: serde_json::Value = serde_json::from_slice(&got.stdout).expect("etcdctl's JSON");
    got["kvs"][0]["mod_revision"].as_i64().expect("a config")
}

/// etcd's current revision.
fn etcd_revision(etcd: &Etcd) -> i64 {
    let got = etcd.etcdctl(&["get", "/weir/config", "--keys-only", "-w", "json"]);
    let got: serde_json::Value = serde_json::from_slice(&got.stdout).expect("etcdctl's JSON");
    got["header"]["revision"].as_i64().expect("a revision")
}

/// Whether every listed node is current, each at `revision`.
fn all_current_at(status: &serde_json::Value, nodes: usize, revision: i64) -> bool {
    let Some(listed) = status["nodes"].as_object() else {
        return false;
    };
    listed.len() == nodes
        && listed
            .values()
            .all(|n| n["current"] == true && n["revision"].as_i64() == Some(revision))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_costs_etcd_events_in_proportion_to_the_nodes_and_has_one_revision() {
    const NODES: usize = 4;
    const PUBLISHES: usize = 3;
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let v0 = write(dir.path(), "v0.toml", &gateway_config(&[upstream.addr.to_string()]));
    assert!(publish(&v0, &etcd.endpoints(), false).status.success());
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let file = node_file(dir.path(), &format!("n{i}"), &etcd.endpoints(), "");
        nodes.push(WeirProcess::spawn_node(&file, 1).await);
    }
    let first = config_revision(&etcd);
    eventually("every node current", async || {
        all_current_at(&status_json(&etcd), NODES, first)
    })
    .await;

    let before = etcd.metric(0, "etcd_debugging_mvcc_events_total");
    let mut revision = 0;
    for n in 0..PUBLISHES {
        let servers = vec![upstream.addr.to_string(); n + 2];
        let config = write(dir.path(), &format!("v{}.toml", n + 1), &gateway_config(&servers));
        let published = publish(&config, &etcd.endpoints(), true);
        assert!(published.status.success(), "{}", text(&published));
        revision = published_revision(&published);
    }
    // One meaning of a revision: what `weir publish` printed is what every
    // node reports and what `weir fleet status` says the fleet is at, with
    // each node's own reports written after it.
    eventually("every node current at the published revision", async || {
        all_current_at(&status_json(&etcd), NODES, revision)
    })
    .await;
    let status = status_json(&etcd);
    assert_eq!(status["revision"], revision, "{status}");
    let listed = text(&weir(&["fleet", "status", "--etcd", &etcd.endpoints()[0]]));
    assert!(listed.contains(&format!("fleet at revision {revision} ")), "{listed}");
    assert_eq!(
        listed.matches(&format!("revision {revision}  current")).count(),
        NODES,
        "{listed}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = etcd.metric(0, "etcd_debugging_mvcc_events_total") - before;
    // Each publish is one event to each node; every node's report written
    // after it reaches no node. Watching the whole prefix, each report went
    // to every node: NODES + NODES² a publish.
    let per_publish = events / PUBLISHES as f64;
    assert!(
        per_publish <= (2 * NODES) as f64,
        "{per_publish} watch events a publish to {NODES} nodes"
    );
    assert!(per_publish >= NODES as f64, "{per_publish}: a node missed a publish");
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_in_a_watched_key_s_history_neither_stop_the_watch_nor_storm_etcd() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (one, two) = (Upstream::tcp(echo).await, Upstream::tcp(echo).await);
    let v1 = write(dir.path(), "v1.toml", &gateway_config(&[one.addr.to_string()]));
    assert!(publish(&v1, &etcd.endpoints(), false).status.success());
    let mut node = WeirProcess::spawn_node(&node_file(dir.path(), "n", &etcd.endpoints(), ""), 1).await;
    let admin = node.admin_addr().await;

    // Four values of 1.2 MiB on one watched key (4.8 MiB of history, over
    // gRPC's default 4 MiB a message), then etcd restarted under the watch.
    let big = dir.path().join("big.json");
    std::fs::write(&big, format!("\"{}\"", "x".repeat(1_200_000))).expect("write");
    let mut last = 0;
    for _ in 0..4 {
        let put = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &etcd.endpoints()[0],
                "put",
                "/weir/pools/zz",
                "-w",
                "json",
            ])
            .stdin(std::fs::File::open(&big).expect("open"))
            .output()
            .expect("etcdctl");
        assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
        let put: serde_json::Value = serde_json::from_slice(&put.stdout).expect("JSON");
        last = put["header"]["revision"].as_i64().expect("revision");
    }
    etcd.stop(0);
    etcd.restart(0);

    // The node refuses the state once, naming the key and the revision of
    // the write, and serves the revision it had.
    let fleet = async || {
        let (status, body) = admin_request(&admin, "GET", "/api/fleet", None, "").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")
    };
    eventually("the node refuses the state", async || {
        fleet().await["node"]["failed_revision"] == last
    })
    .await;
    let said = fleet().await;
    let error = said["node"]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("/weir/pools/zz") && error.contains("more than a pool may have"),
        "{said}"
    );
    assert_eq!(exchange(node.addr("public"), b"kept").await.expect("served"), b"kept");

    // Then quiet: no read-and-report loop against etcd (the reports of the
    // refusal and of etcd's return written, nothing more).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = node.lines_so_far();
    let quiet_from = etcd_revision(&etcd);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = etcd_revision(&etcd) - quiet_from;
    assert!(writes <= 1, "{writes} writes to etcd in 2 s of a refused state");
    let ended = node.lines_so_far().iter().filter(|l| l.contains("watch ended")).count();
    assert!(ended <= 1, "the watch ended {ended} times in 2 s");

    // The key taken away and a publish: the node converges.
    etcd.etcdctl(&["del", "/weir/pools/zz"]);
    let v2 = write(dir.path(), "v2.toml", &gateway_config(&[two.addr.to_string()]));
    let published = publish(&v2, &etcd.endpoints(), true);
    assert!(published.status.success(), "{}", text(&published));
    assert_eq!(exchange(node.addr("public"), b"new").await.expect("served"), b"new");
    assert_eq!(two.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_are_read_in_pages_at_one_revision() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (one, two) = (Upstream::tcp(echo).await, Upstream::tcp(echo).await);
    let v1 = write(dir.path(), "v1.toml", &gateway_config(&[one.addr.to_string()]));
    assert!(publish(&v1, &etcd.endpoints(), false).status.success());
    let node = WeirProcess::spawn_node(&node_file(dir.path(), "n", &etcd.endpoints(), ""), 1).await;
    // 70 pools before `app` in key order: `app`'s own value is on the
    // third page of the node's read.
    let unused = serde_json::json!({ "servers": ["127.0.0.1:9"] }).to_string();
    for n in 0..70 {
        etcd.etcdctl(&["put", &format!("/weir/pools/a{n:03}"), &unused]);
    }
    let app = serde_json::json!({ "servers": [two.addr.to_string()] }).to_string();
    let put = etcd.etcdctl(&["put", "/weir/pools/app", &app, "-w", "json"]);
    let put: serde_json::Value = serde_json::from_slice(&put.stdout).expect("etcdctl's JSON");
    let revision = put["header"]["revision"].as_i64().expect("revision");
    let started = Instant::now();
    while !all_current_at(&status_json(&etcd), 1, revision) {
        assert!(
            started.elapsed() < STEP,
            "never current at {revision}: {}",
            status_json(&etcd)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(exchange(node.addr("public"), b"paged").await.expect("served"), b"paged");
    assert_eq!((one.accepted(), two.accepted()), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_damaged_in_etcd_is_refused_then_repaired_by_the_next_publish() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let config = write(dir.path(), "weir.toml", &gateway_config(&[upstream.addr.to_string()]));
    let published = publish(&config, &etcd.endpoints(), false);
    assert!(published.status.success(), "{}", text(&published));
    let said = text(&published);
    let sha256 = said
        .split("sha256 ")
        .nth(1)
        .map(|rest| rest[..64].to_owned())
        .unwrap_or_else(|| panic!("no upload in: {said}"));
    let chunk = format!("/weir/blobs/{sha256}/00000");
    etcd.etcdctl(&["put", &chunk, "not the component"]);

    // A node without the file refuses what etcd holds, and says why.
    let fresh = node_file(dir.path(), "fresh", &etcd.endpoints(), "");
    let start = || {
        std::process::Command::new("timeout")
            .args(["20", weir_tests::weir_binary().to_str().expect("utf-8")])
            .args(["run", "--config", fresh.to_str().expect("utf-8")])
            .env("WEIR_LOG", "warn")
            .output()
            .expect("weir runs")
    };
    let refused = start();
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("not to the name they are stored under"),
        "{}",
        text(&refused)
    );

    // The same config again: the publish finds the damage and writes the
    // file again; the node starts on it.
    let again = publish(&config, &etcd.endpoints(), false);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains(&format!("repaired plugins.router.wasm (sha256 {sha256})")),
        "{}",
        text(&again)
    );
    let node = WeirProcess::spawn_node(&fresh, 1).await;
    assert_eq!(exchange(node.addr("public"), b"whole").await.expect("served"), b"whole");
    // And a publish of an intact file uploads nothing.
    let third = publish(&config, &etcd.endpoints(), false);
    assert!(
        !text(&third).contains("uploaded") && text(&third).contains("(1 files already there)"),
        "{}",
        text(&third)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_acknowledged_while_etcd_s_leader_is_lost_is_served_whole() {
    let mut etcd = Etcd::cluster(3);
    let dir = tempfile::tempdir().expect("temp dir");
    let upstreams = [Upstream::tcp(echo).await, Upstream::tcp(echo).await];
    let config = |i: usize| {
        let text = gateway_config(&[upstreams[i % 2].addr.to_string()]) + &format!("\n# publish {i}\n");
        write(dir.path(), &format!("v{i}.toml"), &text)
    };
    assert!(publish(&config(0), &etcd.endpoints(), false).status.success());
    let a = WeirProcess::spawn_node(&node_file(dir.path(), "a", &etcd.endpoints(), ""), 1).await;
    let b = WeirProcess::spawn_node(&node_file(dir.path(), "b", &etcd.endpoints(), ""), 1).await;

    // A stream of publishes; the leader is killed after the third.
    let mut acknowledged = Vec::new();
    let mut leader_lost = None;
    for i in 1..=8 {
        if i == 4 {
            let leader = etcd.leader();
            etcd.stop(leader);
            leader_lost = Some(leader);
        }
        let published = publish(&config(i), &etcd.endpoints(), false);
        if published.status.success() {
            acknowledged.push((i, published_revision(&published)));
        }
    }
    assert!(acknowledged.len() >= 6, "{acknowledged:?}: etcd took too few publishes");
    let (last, revision) = *acknowledged.last().expect("one publish");
    // Nothing acknowledged is lost, and every node ends on the last write
    // whole: its revision, and routed as that config says.
    let etcd_has = config_revision(&etcd);
    assert_eq!(etcd_has, revision, "etcd lost an acknowledged publish");
    eventually("both nodes current at the last publish", async || {
        all_current_at(&status_json(&etcd), 2, revision)
    })
    .await;
    let before = upstreams[last % 2].accepted();
    for node in [&a, &b] {
        assert_eq!(exchange(node.addr("public"), b"last").await.expect("served"), b"last");
    }
    assert_eq!(
        upstreams[last % 2].accepted(),
        before + 2,
        "a node routes by an older publish"
    );

    // The member comes back, and catches up: the fleet takes the next publish.
    etcd.restart(leader_lost.expect("killed"));
    let published = publish(&config(9), &etcd.endpoints(), true);
    assert!(published.status.success(), "{}", text(&published));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_lost_for_good_leaves_a_fleet_that_publishes_and_restarts() {
    let mut etcd = Etcd::cluster(3);
    let dir = tempfile::tempdir().expect("temp dir");
    let (one, two) = (Upstream::tcp(echo).await, Upstream::tcp(echo).await);
    let v1 = write(dir.path(), "v1.toml", &gateway_config(&[one.addr.to_string()]));
    assert!(publish(&v1, &etcd.endpoints(), false).status.success());
    // Each node lists all three members, as its file was written.
    let file_a = node_file(dir.path(), "a", &etcd.endpoints(), "");
    let a = WeirProcess::spawn_node(&file_a, 1).await;
    let b = WeirProcess::spawn_node(&node_file(dir.path(), "b", &etcd.endpoints(), ""), 1).await;

    let lost = etcd.leader();
    etcd.remove(lost);
    let v2 = write(dir.path(), "v2.toml", &gateway_config(&[two.addr.to_string()]));
    let published = publish(&v2, &etcd.endpoints(), true);
    assert!(published.status.success(), "{}", text(&published));
    for node in [&a, &b] {
        assert_eq!(exchange(node.addr("public"), b"v2").await.expect("served"), b"v2");
    }
    assert_eq!(two.accepted(), 2);

    // A node restarted with the lost member still first in its list reads
    // etcd, not its disk.
    drop(a);
    let mut a = WeirProcess::spawn_node(&file_a, 1).await;
    let admin = a.admin_addr().await;
    let (status, body) = admin_request(&admin, "GET", "/api/fleet", None, "").await;
    assert_eq!(status, 200, "{body}");
    let fleet: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(fleet["node"]["serving"], "etcd", "{fleet}");
    assert_eq!(fleet["node"]["revision"], published_revision(&published), "{fleet}");
    assert_eq!(exchange(a.addr("public"), b"again").await.expect("served"), b"again");
}

/// A node file for a node inside `netns`: etcd through `link`, its
/// listener and admin API on the namespace's own address.
fn node_in(dir: &Path, netns: &Netns, link: &Link) -> std::path::PathBuf {
    let path = dir.join("cut.toml");
    std::fs::write(
        &path,
        format!(
            r#"
            [fleet]
            endpoints = ["{}"]
            node = "cut"
            state_dir = "{}"
            lease_ttl = "2s"
            binds = {{ public = "{}:0" }}

            [admin]
            bind = "{}:0"
            "#,
            link.url(),
            dir.join("state-cut").display(),
            netns.inside,
            netns.inside
        ),
    )
    .expect("write node file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_by_a_partition_serves_its_revision_says_so_and_converges() {
    assert!(
        Netns::available(),
        "this test makes a network namespace: it runs as root, with iproute2"
    );
    let netns = Netns::create();
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (one, two) = (
        Upstream::tcp_at((netns.host, 0).into(), echo).await,
        Upstream::tcp_at((netns.host, 0).into(), echo).await,
    );
    let v1 = write(dir.path(), "v1.toml", &gateway_config(&[one.addr.to_string()]));
    assert!(publish(&v1, &etcd.endpoints(), false).status.success());
    let link = Link::at(netns.far, etcd.client_addr(0)).await;
    let file = node_in(dir.path(), &netns, &link);
    let mut node = WeirProcess::spawn_under_node(&file, &netns.exec(), 1).await;
    let admin = node.admin_addr().await;
    let fleet = async || {
        let (status, body) = admin_request(&admin, "GET", "/api/fleet", None, "").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")
    };
    assert_eq!(exchange(node.addr("public"), b"one").await.expect("served"), b"one");

    // The partition: packets to etcd dropped. The node notices (its HTTP/2
    // keep-alive goes unanswered), says so, and serves what it has while a
    // publish it cannot see goes to the others.
    netns.cut();
    eventually("the node says etcd cannot be read", async || {
        !fleet().await["node"]["unreachable"].is_null()
    })
    .await;
    let v2 = write(dir.path(), "v2.toml", &gateway_config(&[two.addr.to_string()]));
    let published = publish(&v2, &etcd.endpoints(), false);
    assert!(published.status.success(), "{}", text(&published));
    let revision = published_revision(&published);
    assert_eq!(exchange(node.addr("public"), b"cut").await.expect("served"), b"cut");
    assert_eq!((one.accepted(), two.accepted()), (2, 0));
    let said = fleet().await;
    assert!(said["node"]["revision"].as_i64() < Some(revision), "{said}");
    assert!(
        said["node"]["unreachable"][0]
            .as_str()
            .is_some_and(|r| r.contains("fleet.endpoints")),
        "{said}"
    );

    // Healed: the node converges on its own, and the fleet says it is current.
    netns.heal();
    eventually("the node current after the heal", async || {
        all_current_at(&status_json(&etcd), 1, revision)
    })
    .await;
    assert!(fleet().await["node"]["unreachable"].is_null());
    assert_eq!(exchange(node.addr("public"), b"two").await.expect("served"), b"two");
    assert_eq!(two.accepted(), 1);
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_ca_for_etcd_refuses_to_start_and_says_what_to_check() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = weir_tests::Pki::new("etcd CA");
    let other = weir_tests::Pki::new("another CA");
    let (etcd_cert, etcd_key) = pki.server(&["etcd.test", "127.0.0.1"]).write(dir.path(), "etcd");
    let (node_cert, node_key) = pki.client("weir-node").write(dir.path(), "node");
    std::fs::set_permissions(&node_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let wrong_ca = write(dir.path(), "wrong-ca.pem", &other.ca_pem);
    let etcd = Etcd::start_tls(&weir_tests::etcd::EtcdTls {
        cert: &etcd_cert,
        key: &etcd_key,
        ca: &ca,
        client: (&node_cert, &node_key),
    });
    let upstream = Upstream::tcp(echo).await;
    let config = write(dir.path(), "weir.toml", &gateway_config(&[upstream.addr.to_string()]));
    let tls = |ca: &Path| {
        format!(
            r#"tls = {{ ca = "{}", cert = "{}", key = "{}", server_name = "etcd.test" }}"#,
            ca.display(),
            node_cert.display(),
            node_key.display()
        )
    };
    let good = node_file(dir.path(), "node", &etcd.endpoints(), &tls(&ca));
    let published = weir(&[
        "publish",
        "--config",
        config.to_str().expect("utf-8"),
        "--fleet",
        good.to_str().expect("utf-8"),
    ]);
    assert!(published.status.success(), "{}", text(&published));
    // The node runs once, so that it keeps a revision on disk...
    drop(WeirProcess::spawn_node(&good, 1).await);
    // ...and, its CA replaced by another, refuses to start on that revision.
    let wrong = node_file(dir.path(), "node", &etcd.endpoints(), &tls(&wrong_ca));
    let started = std::process::Command::new("timeout")
        .args(["30", weir_tests::weir_binary().to_str().expect("utf-8")])
        .args(["run", "--config", wrong.to_str().expect("utf-8")])
        .env("WEIR_LOG", "warn")
        .output()
        .expect("weir runs");
    let said = text(&started);
    assert_eq!(started.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("etcd at {}", etcd.endpoints()[0])), "{said}");
    assert!(said.contains("check fleet.tls"), "{said}");
    assert!(said.to_ascii_lowercase().contains("certificate"), "{said}");
}
