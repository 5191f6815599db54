//! Fleet mode against a real etcd (Debian's etcd-server 3.4): weir nodes
//! as processes, `weir publish` and `weir fleet status` as an operator runs
//! them, `etcdctl` for what an operator or an attacker writes by hand.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use weir_tests::etcd::{Etcd, Link};
use weir_tests::run_weir as weir;
use weir_tests::{STEP, Upstream, WeirProcess, admin_request, echo, expand, pattern, read_to_end};

/// A published config: one plain listener whose router sends everything to
/// the pool `app` (`servers`).
pub(super) fn gateway_config(servers: &[String]) -> String {
    let servers = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    expand(&weir_tests::plain_pool_config("app", &servers, ""))
}

/// Writes a node's file for `name`, reaching etcd at `endpoints`.
pub(super) fn node_file(dir: &Path, name: &str, endpoints: &[String], extra: &str) -> PathBuf {
    let endpoints = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let path = dir.join(format!("{name}.toml"));
    let lease = if extra.contains("lease_ttl") {
        ""
    } else {
        r#"lease_ttl = "2s""#
    };
    std::fs::write(
        &path,
        format!(
            r#"
            [fleet]
            endpoints = [{endpoints}]
            node = "{name}"
            state_dir = "state-{name}"
            {lease}
            {extra}

            [admin]
            bind = "127.0.0.1:0"
            "#
        ),
    )
    .expect("write node file");
    path
}

/// Writes `text` as `name` in `dir`.
pub(super) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

pub(super) fn text(output: &Output) -> String {
    weir_tests::text(&output.stdout) + &weir_tests::text(&output.stderr)
}

/// `weir publish --config <config> --etcd <endpoints> [--wait]`.
pub(super) fn publish(config: &Path, endpoints: &[String], wait: bool) -> Output {
    let joined = endpoints.join(",");
    let mut args = vec![
        "publish",
        "--config",
        config.to_str().expect("utf-8"),
        "--etcd",
        &joined,
    ];
    if wait {
        args.extend(["--wait", "--timeout", "20"]);
    }
    weir(&args)
}

/// `weir publish --config <config> --fleet <file>` (endpoints and credentials from a node's file).
fn publish_as(config: &Path, fleet: &Path) -> Output {
    weir(&[
        "publish",
        "--config",
        config.to_str().expect("utf-8"),
        "--fleet",
        fleet.to_str().expect("utf-8"),
    ])
}

/// A whole exchange through `addr`: `sent` out, the echo back.
pub(super) async fn exchange(addr: std::net::SocketAddr, sent: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(sent).await?;
    stream.shutdown().await?;
    read_to_end(&mut stream).await
}

/// Waits until `check` holds, for at most `STEP`.
pub(super) async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < STEP, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fleet_json(admin: &str) -> serde_json::Value {
    let (status, body) = admin_request(admin, "GET", "/api/fleet", None, "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_reaches_every_node_and_open_connections_keep_flowing() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (old, new) = (Upstream::tcp(echo).await, Upstream::tcp(echo).await);
    let v1 = write(dir.path(), "v1.toml", &gateway_config(&[old.addr.to_string()]));
    let published = publish(&v1, &etcd.endpoints(), false);
    assert!(published.status.success(), "{}", text(&published));
    assert!(
        text(&published).contains("uploaded plugins.router.wasm"),
        "{}",
        text(&published)
    );

    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(WeirProcess::spawn_node(&node_file(dir.path(), name, &etcd.endpoints(), ""), 1).await);
    }
    for node in &nodes {
        assert_eq!(exchange(node.addr("public"), b"v1").await.expect("served"), b"v1");
    }
    assert_eq!(old.accepted(), 3);
    // A connection opened before the publish, half sent.
    let first = pattern(64 * 1024, 7);
    let mut held = TcpStream::connect(nodes[0].addr("public")).await.expect("connect");
    held.write_all(&first[..32 * 1024]).await.expect("first half");

    let v2 = write(dir.path(), "v2.toml", &gateway_config(&[new.addr.to_string()]));
    let started = Instant::now();
    let published = publish(&v2, &etcd.endpoints(), true);
    let elapsed = started.elapsed();
    let said = text(&published);
    assert!(published.status.success(), "{said}");
    for name in ["n1", "n2", "n3"] {
        assert!(said.contains(&format!("{name}: applied")), "{said}");
    }
    assert!(
        said.contains("1 files already there"),
        "the unchanged plugin was uploaded again: {said}"
    );
    eprintln!("publish to the last of 3 nodes applying it: {elapsed:?}");
    for node in &nodes {
        assert_eq!(exchange(node.addr("public"), b"v2").await.expect("served"), b"v2");
    }
    assert_eq!(new.accepted(), 3, "a node still routes by the old revision");
    held.write_all(&first[32 * 1024..]).await.expect("second half");
    held.shutdown().await.expect("half-close");
    assert!(
        read_to_end(&mut held).await.expect("echo") == first,
        "the held connection lost bytes"
    );
    assert_eq!(old.accepted(), 4);

    let status = weir(&["fleet", "status", "--etcd", &etcd.endpoints()[0]]);
    let listed = text(&status);
    assert!(status.status.success(), "{listed}");
    for name in ["n1", "n2", "n3"] {
        assert!(listed.contains(name) && listed.contains("ok"), "{listed}");
    }
    let fleet = fleet_json(&nodes[1].admin_addr().await).await;
    assert_eq!(fleet["node"]["node"], "n2", "{fleet}");
    assert_eq!(fleet["nodes"].as_object().map(|n| n.len()), Some(3), "{fleet}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_changed_through_one_node_is_used_by_another_and_survives_restarts() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (first, second) = (Upstream::tcp(echo).await, Upstream::tcp(echo).await);
    let config = write(dir.path(), "weir.toml", &gateway_config(&[first.addr.to_string()]));
    assert!(publish(&config, &etcd.endpoints(), false).status.success());
    let files = [
        node_file(dir.path(), "a", &etcd.endpoints(), ""),
        node_file(dir.path(), "b", &etcd.endpoints(), ""),
    ];
    let mut a = WeirProcess::spawn_node(&files[0], 1).await;
    let mut b = WeirProcess::spawn_node(&files[1], 1).await;
    let admin_a = a.admin_addr().await;
    // The pool as a whole, replaced through A: only `second` now.
    let body = format!(r#"{{"name": "app", "servers": ["{}"]}}"#, second.addr);
    let (status, reply) = admin_request(&admin_a, "POST", "/api/pools", None, &body).await;
    assert_eq!(status, 201, "{reply}");
    let b_addr = b.addr("public");
    eventually("B uses the pool set through A", async || {
        exchange(b_addr, b"x").await.is_ok() && second.accepted() > 0
    })
    .await;
    // Then a server added through B, and seen by A.
    let admin_b = b.admin_addr().await;
    let (status, reply) = admin_request(
        &admin_b,
        "POST",
        "/api/pools/app/backends",
        None,
        &format!("\"{}\"", first.addr),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let (_, pool) = admin_request(&admin_a, "GET", "/api/pools/app", None, "").await;
    eventually("A has both servers", async || {
        let (_, pool) = admin_request(&admin_a, "GET", "/api/pools/app", None, "").await;
        pool.contains(&first.addr.to_string()) && pool.contains(&second.addr.to_string())
    })
    .await;
    drop(pool);

    drop((a, b));
    let a = WeirProcess::spawn_node(&files[0], 1).await;
    let b = WeirProcess::spawn_node(&files[1], 1).await;
    let before = (first.accepted(), second.accepted());
    for _ in 0..4 {
        exchange(a.addr("public"), b"after").await.expect("served by A");
        exchange(b.addr("public"), b"after").await.expect("served by B");
    }
    assert_eq!(
        (first.accepted() - before.0, second.accepted() - before.1),
        (4, 4),
        "after restarts both nodes use both servers, in turn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_that_does_not_build_is_refused_by_every_node_and_named() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let config = write(dir.path(), "weir.toml", &gateway_config(&[upstream.addr.to_string()]));
    assert!(publish(&config, &etcd.endpoints(), false).status.success());
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        nodes.push(WeirProcess::spawn_node(&node_file(dir.path(), name, &etcd.endpoints(), ""), 1).await);
    }
    // Checks and builds on its own, but a running node cannot take a new
    // listener without a restart.
    let grown = gateway_config(&[upstream.addr.to_string()])
        + "\n[listeners.second]\nbind = \"127.0.0.1:0\"\nprotocol = \"plain\"\nplugins = [\"router\"]\n";
    let grown = write(dir.path(), "grown.toml", &grown);
    let published = publish(&grown, &etcd.endpoints(), true);
    let said = text(&published);
    assert!(!published.status.success(), "{said}");
    for name in ["a", "b"] {
        assert!(said.contains(&format!("{name}: refused:")), "{said}");
    }
    assert!(said.contains("listener"), "the error does not say what: {said}");
    assert!(said.contains("is not served by 2 of 2 nodes"), "{said}");
    for node in &nodes {
        assert_eq!(exchange(node.addr("public"), b"still").await.expect("served"), b"still");
    }

    // Garbage written by hand: refused, naming the key; still serving.
    etcd.etcdctl(&["put", "/weir/config", "not json"]);
    let mut a = nodes.remove(0);
    let admin_a = a.admin_addr().await;
    eventually("A reports the garbage", async || {
        let fleet = fleet_json(&admin_a).await;
        fleet["node"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("etcd key /weir/config") && e.contains("not what weir writes there"))
    })
    .await;
    assert_eq!(
        exchange(a.addr("public"), b"after garbage").await.expect("served"),
        b"after garbage"
    );

    // A config naming a blob whose bytes are not what its name says.
    let forged_sha = "0".repeat(64);
    let forged = serde_json::json!({
        "format": 1,
        "toml": gateway_config(&[upstream.addr.to_string()]),
        "files": { "plugins.router.wasm": forged_sha },
        "published_at": 0,
        "source": "forged",
    });
    etcd.etcdctl(&[
        "put",
        &format!("/weir/blobs/{forged_sha}/meta"),
        r#"{"size": 3, "chunks": 1}"#,
    ]);
    etcd.etcdctl(&["put", &format!("/weir/blobs/{forged_sha}/00000"), "abc"]);
    etcd.etcdctl(&["put", "/weir/config", &forged.to_string()]);
    eventually("A refuses the forged blob", async || {
        let fleet = fleet_json(&admin_a).await;
        fleet["node"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not to the name they are stored under"))
    })
    .await;
    assert_eq!(
        exchange(a.addr("public"), b"after forgery").await.expect("served"),
        b"after forgery"
    );
    assert!(
        !dir.path().join("state-a/blobs").join(&forged_sha).exists(),
        "the forged blob was kept"
    );

    // A blob with a chunk missing.
    let gap_sha = "1".repeat(64);
    etcd.etcdctl(&[
        "put",
        &format!("/weir/blobs/{gap_sha}/meta"),
        r#"{"size": 1048577, "chunks": 2}"#,
    ]);
    etcd.etcdctl(&["put", &format!("/weir/blobs/{gap_sha}/00001"), "x"]);
    let gap = forged.to_string().replace(&forged_sha, &gap_sha);
    etcd.etcdctl(&["put", "/weir/config", &gap]);
    eventually("A refuses the blob with a chunk missing", async || {
        let fleet = fleet_json(&admin_a).await;
        fleet["node"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("/weir/blobs/{gap_sha}/00000: missing chunk")))
    })
    .await;
    assert_eq!(
        exchange(a.addr("public"), b"after the gap").await.expect("served"),
        b"after the gap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_larger_than_an_etcd_request_is_chunked_and_loaded() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (grpc, web) = (Upstream::tcp(echo).await, Upstream::tcp(echo).await);
    let config = expand(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        protocol = "plain"
        plugins = ["alpn"]

        [plugins.alpn]
        wasm = "{{alpn_router_py}}"
        timeout = "500ms"
        config = {{ protocols = {{ h2 = "grpc" }}, default = "web" }}

        [pools.grpc]
        servers = ["{}"]
        [pools.web]
        servers = ["{}"]
        "#,
        grpc.addr, web.addr
    ));
    let config = write(dir.path(), "weir.toml", &config);
    let published = publish(&config, &etcd.endpoints(), false);
    let said = text(&published);
    assert!(published.status.success(), "{said}");
    let size: u64 = said
        .split("uploaded plugins.alpn.wasm: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(size > 3 << 20, "the Python component is {size} bytes");
    let chunks = etcd.etcdctl(&["get", "/weir/blobs/", "--prefix", "--keys-only"]);
    let keys = String::from_utf8_lossy(&chunks.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    assert!(keys > 3, "{keys} keys for a {size}-byte file");
    let node = WeirProcess::spawn_node(&node_file(dir.path(), "py", &etcd.endpoints(), ""), 1).await;
    assert_eq!(exchange(node.addr("public"), b"py").await.expect("served"), b"py");
    assert_eq!(web.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_while_etcd_is_away_and_catch_up_after_compaction() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (one, two, three) = (
        Upstream::tcp(echo).await,
        Upstream::tcp(echo).await,
        Upstream::tcp(echo).await,
    );
    let v1 = write(dir.path(), "v1.toml", &gateway_config(&[one.addr.to_string()]));
    assert!(publish(&v1, &etcd.endpoints(), false).status.success());
    // Node `far` reaches etcd through a link the test can cut.
    let link = Link::to(etcd.client_addr(0)).await;
    let near_file = node_file(dir.path(), "near", &etcd.endpoints(), "");
    let far_file = node_file(dir.path(), "far", &[link.url()], "");
    let near = WeirProcess::spawn_node(&near_file, 1).await;
    let far = WeirProcess::spawn_node(&far_file, 1).await;

    // etcd stops: both keep serving; `near`, restarted meanwhile, serves
    // the revision it kept on disk.
    etcd.stop(0);
    assert_eq!(exchange(far.addr("public"), b"a").await.expect("served"), b"a");
    drop(near);
    let mut near = WeirProcess::spawn_node(&near_file, 1).await;
    let near_admin = near.admin_addr().await;
    assert_eq!(fleet_json(&near_admin).await["node"]["serving"], "disk");
    assert_eq!(exchange(near.addr("public"), b"b").await.expect("served"), b"b");
    assert_eq!(one.accepted(), 2);

    // etcd back, a publish: both converge.
    etcd.restart(0);
    let v2 = write(dir.path(), "v2.toml", &gateway_config(&[two.addr.to_string()]));
    let published = publish(&v2, &etcd.endpoints(), true);
    assert!(published.status.success(), "{}", text(&published));
    assert_eq!(exchange(near.addr("public"), b"c").await.expect("served"), b"c");
    assert_eq!(fleet_json(&near_admin).await["node"]["serving"], "etcd");
    assert_eq!(exchange(far.addr("public"), b"d").await.expect("served"), b"d");
    assert_eq!(two.accepted(), 2);

    // `far` cut off; meanwhile two publishes and a compaction past them.
    link.cut();
    let v3 = write(
        dir.path(),
        "v3.toml",
        &gateway_config(&[three.addr.to_string(), two.addr.to_string()]),
    );
    assert!(publish(&v3, &etcd.endpoints(), false).status.success());
    let v4 = write(dir.path(), "v4.toml", &gateway_config(&[three.addr.to_string()]));
    let published = publish(&v4, &etcd.endpoints(), false);
    let said = text(&published);
    let revision = said
        .split("as revision ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{said}"))
        .to_owned();
    etcd.etcdctl(&["compact", &revision]);
    assert_eq!(
        exchange(far.addr("public"), b"e").await.expect("served while cut off"),
        b"e"
    );
    assert_eq!(two.accepted(), 3, "far changed while cut off");
    link.restore();
    let far_addr = far.addr("public");
    eventually("far catches up past the compaction", async || {
        let before = three.accepted();
        exchange(far_addr, b"f").await.is_ok() && three.accepted() > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_etcd_s_leader_refuses_no_connection_and_the_survivors_take_a_publish() {
    let mut etcd = Etcd::cluster(3);
    let dir = tempfile::tempdir().expect("temp dir");
    let (one, two) = (Upstream::tcp(echo).await, Upstream::tcp(echo).await);
    let v1 = write(dir.path(), "v1.toml", &gateway_config(&[one.addr.to_string()]));
    assert!(publish(&v1, &etcd.endpoints(), false).status.success());
    let a = WeirProcess::spawn_node(&node_file(dir.path(), "a", &etcd.endpoints(), ""), 1).await;
    let b = WeirProcess::spawn_node(&node_file(dir.path(), "b", &etcd.endpoints(), ""), 1).await;
    let addrs = [a.addr("public"), b.addr("public")];
    let clients = tokio::spawn(async move {
        let mut served = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            for addr in addrs {
                let sent = format!("connection {served}");
                let back = exchange(addr, sent.as_bytes())
                    .await
                    .expect("a connection was refused or reset");
                assert_eq!(back, sent.as_bytes());
                served += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        served
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leader = etcd.leader();
    etcd.stop(leader);
    let served = clients.await.expect("every connection served");
    assert!(served > 20, "{served} connections");

    let survivors: Vec<String> = etcd
        .endpoints()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, e)| e)
        .collect();
    let v2 = write(dir.path(), "v2.toml", &gateway_config(&[two.addr.to_string()]));
    let published = publish(&v2, &survivors, true);
    assert!(published.status.success(), "{}", text(&published));
    for addr in addrs {
        exchange(addr, b"after").await.expect("served");
    }
    assert_eq!(two.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_status_within_its_lease() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(echo).await;
    let config = write(dir.path(), "weir.toml", &gateway_config(&[upstream.addr.to_string()]));
    assert!(publish(&config, &etcd.endpoints(), false).status.success());
    let mut doomed = WeirProcess::spawn_node(&node_file(dir.path(), "doomed", &etcd.endpoints(), ""), 1).await;
    let _alive = WeirProcess::spawn_node(&node_file(dir.path(), "alive", &etcd.endpoints(), ""), 1).await;
    let listed = || text(&weir(&["fleet", "status", "--etcd", &etcd.endpoints()[0]]));
    eventually("both nodes are listed", async || {
        listed().contains("doomed") && listed().contains("alive")
    })
    .await;
    doomed.child.start_kill().expect("SIGKILL");
    let _ = doomed.child.wait().await;
    let killed = Instant::now();
    eventually("the killed node is gone", async || !listed().contains("doomed")).await;
    // Lease of 2 s, kept alive every 2/3 s: gone within about 2 s.
    assert!(killed.elapsed() < Duration::from_secs(10), "{:?}", killed.elapsed());
    assert!(listed().contains("alive"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fleet_settings_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = write(dir.path(), "password", "hunter2\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    for (extra, expected) in [
        (r#"prefix = "weir""#, "fleet.prefix: `weir` must start and end with `/`"),
        (r#"lease_ttl = "1s""#, "fleet.lease_ttl: must be between 2 s and 300 s"),
        (
            r#"user = "node"
            password_file = "password""#,
            "lets others read it; a secret must be readable by weir's user alone",
        ),
    ] {
        let file = node_file(dir.path(), "n", &["http://127.0.0.1:1".into()], extra);
        for command in ["run", "check"] {
            let run = weir(&[command, "--config", file.to_str().expect("utf-8")]);
            assert!(!run.status.success());
            assert!(text(&run).contains(expected), "{command} {extra}: {}", text(&run));
        }
    }
    let good = node_file(dir.path(), "good", &["http://127.0.0.1:1".into()], "");
    let checked = weir(&["check", "--config", good.to_str().expect("utf-8")]);
    assert!(text(&checked).contains("ok (fleet node good"), "{}", text(&checked));
    // Nothing published and no state on disk: a clear refusal, not a hang.
    let etcd = Etcd::start();
    let file = node_file(dir.path(), "empty", &etcd.endpoints(), "");
    let run = weir(&["run", "--config", file.to_str().expect("utf-8")]);
    assert!(!run.status.success());
    assert!(
        text(&run).contains("nothing has been published under this prefix"),
        "{}",
        text(&run)
    );
}

/// Roles, users and `auth enable`, as the README tells an operator: the
/// nodes read the prefix and write their reports and the pools; tenant
/// `acme` writes its policy and its files, and nothing else.
fn set_up_roles(etcd: &Etcd) {
    for args in [
        vec!["user", "add", "root:rootpw", "--interactive=false"],
        vec!["user", "grant-role", "root", "root"],
        vec!["role", "add", "weir-node"],
    ] {
        etcd.etcdctl(&args);
    }
    for (permission, prefix) in [
        ("read", "/weir/"),
        ("readwrite", "/weir/nodes/"),
        ("readwrite", "/weir/pools/"),
        ("readwrite", "/weir/tenants/"),
        ("readwrite", "/weir/acme/"),
    ] {
        etcd.etcdctl(&[
            "role",
            "grant-permission",
            "weir-node",
            "--prefix=true",
            permission,
            prefix,
        ]);
    }
    for args in [
        vec!["user", "add", "weir-node:weir-nodepw", "--interactive=false"],
        vec!["user", "grant-role", "weir-node", "weir-node"],
    ] {
        etcd.etcdctl(&args);
    }
    for tenant in ["acme", "bravo"] {
        let role = format!("weir-tenant-{tenant}");
        let blobs = format!("/weir/tenants/{tenant}/");
        let policy = format!("/weir/policies/{tenant}");
        let user = format!("{tenant}:{tenant}pw");
        for args in [
            vec!["role", "add", &role],
            vec!["role", "grant-permission", &role, "--prefix=true", "readwrite", &blobs],
            vec!["role", "grant-permission", &role, "readwrite", &policy],
            vec!["user", "add", &user, "--interactive=false"],
            vec!["user", "grant-role", tenant, &role],
        ] {
            etcd.etcdctl(&args);
        }
    }
    etcd.etcdctl(&["auth", "enable"]);
}

/// A file with `[fleet]` for `user` (password `<user>pw`, in a private file).
fn credentials(dir: &Path, user: &str, endpoints: &[String]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let password = write(dir, &format!("{user}.password"), &format!("{user}pw\n"));
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    node_file(
        dir,
        user,
        endpoints,
        &format!("user = \"{user}\"\npassword_file = \"{}\"", password.display()),
    )
}

/// `weir publish` of `policy` as `tenant`'s, with its etcd user.
fn publish_policy(dir: &Path, tenant: &str, policy: &str, endpoints: &[String], wait: bool) -> Output {
    let file = write(dir, &format!("{tenant}-policy.toml"), &expand(policy));
    let fleet = credentials(dir, tenant, endpoints);
    let mut args = vec![
        "publish",
        "--tenant",
        tenant,
        "--config",
        file.to_str().expect("utf-8"),
        "--fleet",
        fleet.to_str().expect("utf-8"),
    ];
    if wait {
        args.extend(["--wait", "--timeout", "20"]);
    }
    weir(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_publish_their_own_policy_and_fail_alone() {
    // Tokens that expire after a second: the node must log in again.
    let etcd = Etcd::start_with(&["--auth-token-ttl", "1"]);
    set_up_roles(&etcd);
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = weir_tests::Pki::new("fleet tenants CA");
    let identity = pki.server(&["*.acme.test", "*.bravo.test"]);
    let acme = Upstream::tls(&identity, |s| weir_tests::answer_with(s, " (acme)".into())).await;
    let bravo = Upstream::tls(&identity, |s| weir_tests::answer_with(s, " (bravo)".into())).await;
    let operator = expand(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["edge"]

        [plugins.edge]
        wasm = "{{static_router}}"
        config.default = {{ reject = "no tenant owns this name" }}
        [plugins.acme-default]
        wasm = "{{static_router}}"
        config.default = {{ reject = "acme has published nothing" }}
        [plugins.bravo-default]
        wasm = "{{static_router}}"
        config.routes."app.bravo.test" = {{ pool = "bravo-app" }}

        [plugins.operator-secret]
        wasm = "{{static_router}}"
        config_file = "operator-secret.json"

        [pools.acme-app]
        servers = ["127.0.0.1:9"]
        [pools.bravo-app]
        servers = ["{bravo}"]

        [tenants.acme]
        domains = ["acme.test"]
        plugins = ["acme-default"]
        pools = ["acme-app"]
        upstreams = ["127.0.0.1/32:{acme_port}"]
        [tenants.bravo]
        domains = ["bravo.test"]
        plugins = ["bravo-default"]
        pools = ["bravo-app"]
        "#,
        bravo = bravo.addr,
        acme_port = acme.addr.port(),
    ));
    let secret = r#"{"default": {"reject": "the operator's secret"}}"#;
    write(dir.path(), "operator-secret.json", secret);
    let operator = write(dir.path(), "weir.toml", &operator);
    let root = credentials(dir.path(), "root", &etcd.endpoints());
    let published = publish_as(&operator, &root);
    assert!(published.status.success(), "{}", text(&published));
    let node = WeirProcess::spawn_node(&credentials(dir.path(), "weir-node", &etcd.endpoints()), 1).await;
    let addr = node.addr("public");
    let client = pki.client_config();
    let ask = |sni: &'static str| {
        let client = std::sync::Arc::clone(&client);
        async move {
            weir_tests::tls_exchange(addr, sni, client, "hi")
                .await
                .unwrap_or_default()
        }
    };
    assert_eq!(ask("app.acme.test").await, "", "acme has published nothing yet");
    assert_eq!(ask("app.bravo.test").await, "upstream heard: hi (bravo)\n");

    // acme publishes its own chain and the servers of its pool.
    let policy = format!(
        r#"
        chain = ["acme-router"]
        [plugins.acme-router]
        wasm = "{{static_router}}"
        config.routes."app.acme.test" = {{ pool = "acme-app" }}
        config.routes."evil.acme.test" = {{ pool = "bravo-app" }}
        [pools.acme-app]
        servers = ["{}"]
        "#,
        acme.addr
    );
    let published = publish_policy(dir.path(), "acme", &policy, &etcd.endpoints(), true);
    assert!(published.status.success(), "{}", text(&published));
    assert!(text(&published).contains("weir-node: applied"), "{}", text(&published));
    assert_eq!(ask("app.acme.test").await, "upstream heard: hi (acme)\n");
    // Its decision naming bravo's pool is refused; bravo is untouched.
    assert_eq!(ask("evil.acme.test").await, "");
    assert_eq!(ask("app.bravo.test").await, "upstream heard: hi (bravo)\n");

    // etcd itself keeps acme's user out of everyone else's keys.
    for key in [
        "/weir/policies/bravo",
        "/weir/config",
        "/weir/tenants/bravo/blobs/x/meta",
        "/weir/pools/bravo-app",
    ] {
        let refused = etcd.etcdctl_as(Some("acme:acmepw"), &["put", key, "x"]);
        assert!(!refused.status.success(), "acme wrote {key}");
        assert!(
            text(&refused).contains("permission denied"),
            "{key}: {}",
            text(&refused)
        );
    }
    // Nor can it read what the fleet keeps of ACME (private keys, accounts).
    let refused = etcd.etcdctl_as(Some("acme:acmepw"), &["get", "--prefix", "/weir/acme/"]);
    assert!(
        !refused.status.success() && text(&refused).contains("permission denied"),
        "{}",
        text(&refused)
    );

    // Servers outside acme's ranges: bravo's upstream, a metadata address.
    // Refused by the node with the range named; acme keeps its policy, and
    // bravo's upstream hears nothing from acme's clients.
    let bravo_heard = bravo.accepted();
    for server in [bravo.addr.to_string(), "169.254.169.254:80".to_owned()] {
        let outside = policy.replace(&acme.addr.to_string(), &server);
        let refused = publish_policy(dir.path(), "acme", &outside, &etcd.endpoints(), true);
        let said = text(&refused);
        assert!(!refused.status.success(), "{said}");
        assert!(
            said.contains("weir-node: refused:")
                && said.contains(&format!(
                    "`{server}` is outside tenant `acme`'s upstream ranges (127.0.0.1/32:{}; tenants.acme.upstreams)",
                    acme.addr.port()
                )),
            "{said}"
        );
        assert_eq!(ask("app.acme.test").await, "upstream heard: hi (acme)\n");
    }
    assert_eq!(bravo.accepted(), bravo_heard, "acme's clients reached bravo's upstream");
    // A DNS name is refused by `weir publish` itself, before etcd.
    let named = policy.replace(&acme.addr.to_string(), "localhost:443");
    let refused = publish_policy(dir.path(), "acme", &named, &etcd.endpoints(), true);
    assert!(!refused.status.success());
    assert!(
        text(&refused)
            .contains("pools.acme-app.servers: `localhost:443`: a tenant's pool names addresses, not DNS names"),
        "{}",
        text(&refused)
    );

    // Published by a user that may read the operator's config (here root),
    // the same policy is refused by `weir publish` itself, before etcd.
    let outside = write(
        dir.path(),
        "acme-outside.toml",
        &expand(&policy.replace(&acme.addr.to_string(), &bravo.addr.to_string())),
    );
    let refused = weir(&[
        "publish",
        "--tenant",
        "acme",
        "--config",
        outside.to_str().expect("utf-8"),
        "--fleet",
        root.to_str().expect("utf-8"),
    ]);
    let said = text(&refused);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("against the published config (revision ")
            && said.contains(&format!("`{}` is outside tenant `acme`'s upstream ranges", bravo.addr))
            && !said.contains("weir-node"),
        "{said}"
    );

    // A policy that claims a pool its section does not list: refused by the
    // node, named; acme keeps the policy it had, bravo's new one applies.
    let greedy = policy.replace(
        "[pools.acme-app]",
        "[pools.acme-other]\nservers = [\"127.0.0.1:9\"]\n[pools.acme-app]",
    );
    let refused = publish_policy(dir.path(), "acme", &greedy, &etcd.endpoints(), true);
    let said = text(&refused);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("weir-node: refused:") && said.contains("pool `acme-other` is not one of tenant `acme`'s pools"),
        "{said}"
    );
    let bravo_policy = r#"
        chain = ["bravo-router"]
        [plugins.bravo-router]
        wasm = "{static_router}"
        config.routes."new.bravo.test" = { pool = "bravo-app" }
        "#;
    let published = publish_policy(dir.path(), "bravo", bravo_policy, &etcd.endpoints(), true);
    assert!(published.status.success(), "{}", text(&published));
    assert_eq!(ask("new.bravo.test").await, "upstream heard: hi (bravo)\n");
    assert_eq!(ask("app.acme.test").await, "upstream heard: hi (acme)\n");

    // A policy naming, by hand, the hash of a file only the operator
    // published (every node has it in its state directory): the node looks
    // for it under acme's own prefix only, and refuses the policy; acme's
    // plugin never sees the operator's file.
    let hash = |bytes: &[u8]| weir_plugin_sdk::hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    let router = std::fs::read(weir_tests::plugin("static-router")).expect("static_router.wasm");
    let leak = serde_json::json!({
        "format": 1,
        "toml": "chain = [\"acme-leak\"]\n[plugins.acme-leak]\nwasm = \"x.wasm\"\nconfig_file = \"y.json\"\n",
        "files": {
            "plugins.acme-leak.wasm": hash(&router),
            "plugins.acme-leak.config_file": hash(secret.as_bytes()),
        },
        "published_at": 0,
        "source": "by hand",
    });
    let put = etcd.etcdctl_as(Some("acme:acmepw"), &["put", "/weir/policies/acme", &leak.to_string()]);
    assert!(put.status.success(), "{}", text(&put));
    let status = || text(&weir(&["fleet", "status", "--fleet", root.to_str().expect("utf-8")]));
    let missing = format!("tenants/acme/blobs/{}/meta", hash(secret.as_bytes()));
    eventually(
        "the node refuses acme's policy naming the operator's file",
        async || status().contains(&missing),
    )
    .await;
    assert_eq!(
        ask("app.acme.test").await,
        "upstream heard: hi (acme)\n",
        "acme's previous policy serves"
    );

    // A policy that passes every check but does not build on the node (its
    // plugin refuses its config), written by acme's user by hand: acme's
    // failure alone, named; bravo's next policy still applies.
    let wasm = std::fs::read(weir_tests::plugin("misbehave")).expect("misbehave.wasm");
    let sha = weir_plugin_sdk::hex::encode(ring::digest::digest(&ring::digest::SHA256, &wasm).as_ref());
    assert!(wasm.len() < 1 << 20, "one chunk");
    let put_stdin = |key: String, value: &[u8]| {
        use std::io::Write;
        let mut child = std::process::Command::new("etcdctl")
            .args([
                "--endpoints",
                &etcd.endpoints()[0],
                "--user",
                "acme:acmepw",
                "put",
                &key,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("etcdctl");
        child.stdin.take().expect("stdin").write_all(value).expect("write");
        assert!(child.wait().expect("etcdctl").success(), "put {key}");
    };
    put_stdin(format!("/weir/tenants/acme/blobs/{sha}/00000"), &wasm);
    put_stdin(
        format!("/weir/tenants/acme/blobs/{sha}/meta"),
        format!(r#"{{"size": {}, "chunks": 1}}"#, wasm.len()).as_bytes(),
    );
    let broken = serde_json::json!({
        "format": 1,
        "toml": "chain = [\"acme-broken\"]\n[plugins.acme-broken]\nwasm = \"x.wasm\"\nconfig = { mode = \"fail-configure\" }\n",
        "files": { "plugins.acme-broken.wasm": sha },
        "published_at": 0,
        "source": "by hand",
    });
    put_stdin("/weir/policies/acme".into(), broken.to_string().as_bytes());
    eventually("the node reports acme's broken policy", async || {
        status().contains("refused: did not build") && status().contains("configure refused")
    })
    .await;
    assert_eq!(
        ask("app.acme.test").await,
        "upstream heard: hi (acme)\n",
        "acme lost its policy"
    );
    // Past the node's token's lifetime.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bravo_next = bravo_policy.replace("new.bravo.test", "next.bravo.test");
    let published = publish_policy(dir.path(), "bravo", &bravo_next, &etcd.endpoints(), true);
    assert!(published.status.success(), "{}", text(&published));
    assert_eq!(ask("next.bravo.test").await, "upstream heard: hi (bravo)\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_etcd_over_tls_with_a_client_certificate() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = weir_tests::Pki::new("etcd CA");
    let (etcd_cert, etcd_key) = pki.server(&["etcd.test", "127.0.0.1"]).write(dir.path(), "etcd");
    let (node_cert, node_key) = pki.client("weir-node").write(dir.path(), "node");
    std::fs::set_permissions(&node_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let etcd = Etcd::start_tls(&weir_tests::etcd::EtcdTls {
        cert: &etcd_cert,
        key: &etcd_key,
        ca: &ca,
        client: (&node_cert, &node_key),
    });
    let upstream = Upstream::tcp(echo).await;
    let config = write(dir.path(), "weir.toml", &gateway_config(&[upstream.addr.to_string()]));
    let tls = format!(
        r#"tls = {{ ca = "{}", cert = "{}", key = "{}", server_name = "etcd.test" }}"#,
        ca.display(),
        node_cert.display(),
        node_key.display()
    );
    let node_toml = node_file(dir.path(), "secure", &etcd.endpoints(), &tls);
    let published = publish_as(&config, &node_toml);
    assert!(published.status.success(), "{}", text(&published));
    let node = WeirProcess::spawn_node(&node_toml, 1).await;
    assert_eq!(exchange(node.addr("public"), b"tls").await.expect("served"), b"tls");

    // Without a client certificate etcd refuses the node, and says so.
    let anonymous = node_file(
        dir.path(),
        "anonymous",
        &etcd.endpoints(),
        &format!(r#"tls = {{ ca = "{}", server_name = "etcd.test" }}"#, ca.display()),
    );
    let status = weir(&["fleet", "status", "--fleet", anonymous.to_str().expect("utf-8")]);
    assert!(!status.status.success(), "{}", text(&status));
    let said = text(&status);
    assert!(
        said.starts_with(&format!("weir: etcd at {}: ", etcd.endpoints()[0])),
        "{said}"
    );
    assert!(said.contains("check fleet.tls"), "{said}");
    // A key others may read is refused before any connection.
    std::fs::set_permissions(&node_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let status = weir(&["fleet", "status", "--fleet", node_toml.to_str().expect("utf-8")]);
    assert!(text(&status).contains("lets others read it"), "{}", text(&status));
}

/// A component that is `wasm` with a custom section carrying `mark`: the
/// same plugin, but bytes (and so a compile) of its own.
fn marked_component(wasm: &Path, mark: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(wasm).expect("read component");
    let name = b"weir-test";
    let payload_len = 1 + name.len() + mark.len();
    assert!(payload_len < 128, "one-byte LEB128 sizes: {mark}");
    bytes.push(0);
    bytes.push(u8::try_from(payload_len).expect("small"));
    bytes.push(u8::try_from(name.len()).expect("small"));
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(mark.as_bytes());
    bytes
}

/// A tenant that republishes new components in a loop compiles them one at
/// a time within its `compile_per_minute`: once that is spent its next
/// component is refused (it keeps serving the one before, and the other
/// tenant is served throughout), and the node compiles it by itself once
/// the allowance is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_republished_components_are_held_to_its_compile_time() {
    let etcd = Etcd::start();
    set_up_roles(&etcd);
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = weir_tests::Pki::new("fleet compile CA");
    let identity = pki.server(&["*.acme.test", "*.bravo.test"]);
    let acme = Upstream::tls(&identity, |s| weir_tests::answer_with(s, " (acme)".into())).await;
    let bravo = Upstream::tls(&identity, |s| weir_tests::answer_with(s, " (bravo)".into())).await;
    let operator = expand(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["edge"]

        [plugins.edge]
        wasm = "{{static_router}}"
        config.default = {{ reject = "no tenant owns this name" }}
        [plugins.acme-default]
        wasm = "{{static_router}}"
        config.default = {{ reject = "acme has published nothing" }}
        [plugins.bravo-default]
        wasm = "{{static_router}}"
        config.routes."app.bravo.test" = {{ pool = "bravo-app" }}

        [pools.acme-app]
        servers = ["{acme}"]
        [pools.bravo-app]
        servers = ["{bravo}"]

        [tenants.acme]
        domains = ["acme.test"]
        plugins = ["acme-default"]
        pools = ["acme-app"]
        compile_per_minute = "1s"
        [tenants.bravo]
        domains = ["bravo.test"]
        plugins = ["bravo-default"]
        pools = ["bravo-app"]
        "#,
        acme = acme.addr,
        bravo = bravo.addr,
    ));
    let operator = write(dir.path(), "weir.toml", &operator);
    let root = credentials(dir.path(), "root", &etcd.endpoints());
    let published = publish_as(&operator, &root);
    assert!(published.status.success(), "{}", text(&published));
    let node = WeirProcess::spawn_node(&credentials(dir.path(), "weir-node", &etcd.endpoints()), 1).await;
    let addr = node.addr("public");
    let client = pki.client_config();
    let ask = |sni: String| {
        let client = std::sync::Arc::clone(&client);
        async move {
            weir_tests::tls_exchange(addr, &sni, client, "hi")
                .await
                .unwrap_or_default()
        }
    };
    let router = weir_tests::plugin("static-router");
    let mut refused = None;
    for version in 0..100 {
        let wasm = dir.path().join(format!("acme-router-{version}.wasm"));
        // Marked with the run's directory too: a compiled-code cache a run
        // before filled would otherwise be hit (and rightly not charged).
        let mark = format!("{version}-{}", dir.path().display());
        std::fs::write(&wasm, marked_component(&router, &mark)).expect("write component");
        let policy = format!(
            r#"
            chain = ["acme-router"]
            [plugins.acme-router]
            wasm = "{}"
            config.routes."v{version}.acme.test" = {{ pool = "acme-app" }}
            "#,
            wasm.display()
        );
        let published = publish_policy(dir.path(), "acme", &policy, &etcd.endpoints(), true);
        let said = text(&published);
        if said.contains("weir-node: applied") {
            assert_eq!(
                ask(format!("v{version}.acme.test")).await,
                "upstream heard: hi (acme)\n"
            );
            continue;
        }
        assert!(
            said.contains("weir-node: refused:")
                && said.contains("tenant `acme` has spent its compile time (compile_per_minute = 1s)"),
            "{said}"
        );
        refused = Some((version, said));
        break;
    }
    let (version, said) = refused.expect("100 new components in a row were all compiled");
    assert!(version > 0, "the first compile is always admitted: {said}");
    // acme keeps the component it had, bravo is served as ever.
    assert_eq!(
        ask(format!("v{}.acme.test", version - 1)).await,
        "upstream heard: hi (acme)\n"
    );
    assert_eq!(ask(format!("v{version}.acme.test")).await, "");
    assert_eq!(ask("app.bravo.test".into()).await, "upstream heard: hi (bravo)\n");
    // The refusal says when; the node compiles it then, unasked.
    let wait: u64 = said
        .split("is compiled in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no wait in: {said}"));
    assert!(wait <= 60 * 12, "{said}");
    let started = Instant::now();
    while ask(format!("v{version}.acme.test")).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(wait + 30),
            "the refused component was never compiled: {said}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ask("app.bravo.test".into()).await, "upstream heard: hi (bravo)\n");
}
