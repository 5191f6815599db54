//! ACME in a fleet, against real etcd, Pebble and BIND: two nodes share one
//! order (the CA sees one, both serve its certificate), the CA's
//! TLS-ALPN-01 validation is answered by the node that did not order, and
//! a node killed mid-order leaves the order to the other once its lease
//! is gone.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use weir_tests::dns::Bind;
use weir_tests::etcd::Etcd;
use weir_tests::pebble::Pebble;
use weir_tests::{STEP, Upstream, WeirProcess, answer, free_port, tls_connect, toml_path, write_config};

use super::fleet::{node_file, publish, text};

/// A TCP forwarder on `port` whose target is set later: connections wait
/// (at most a test step) until it is, then go there.
struct Forwarder {
    target: tokio::sync::watch::Sender<Option<SocketAddr>>,
    forwarded: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(port: u16) -> Forwarder {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let (target, watch) = tokio::sync::watch::channel(None::<SocketAddr>);
        let forwarded = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&forwarded);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watch = watch.clone();
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let waited = tokio::time::timeout(STEP, watch.wait_for(Option::is_some)).await;
                    let Some(target) = waited.ok().and_then(|r| r.ok()).and_then(|t| *t) else {
                        return;
                    };
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Forwarder {
            target,
            forwarded,
            _task: task,
        }
    }
}

/// Waits for the first of `a` and `b` to log `needle`: 0 for `a`, 1 for `b`.
async fn first_to_say(a: &mut WeirProcess, b: &mut WeirProcess, needle: &str) -> usize {
    tokio::select! {
        _ = a.line_containing(needle) => 0,
        _ = b.line_containing(needle) => 1,
    }
}

/// The certificate `addr` presents for `sni`, verified by `client`.
async fn served(addr: SocketAddr, sni: &str, client: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tls = tokio::time::timeout(STEP, tls_connect(addr, sni, client))
        .await
        .expect("in time")
        .expect("a verified handshake");
    tls.get_ref().1.peer_certificates().expect("a chain")[0].to_vec()
}

/// The published config: `name` terminated with the ACME certificate
/// `site` (`acme` is the rest of its `acme` table), routed to `upstream`.
fn acme_config(
    dir: &Path,
    name: &str,
    upstream: SocketAddr,
    pebble: &Pebble,
    acme: &str,
    extra: &str,
) -> std::path::PathBuf {
    let files = ("\"acme/site.pem\"", "\"acme/site-key.pem\"");
    write_config(dir, &pebble.site_config(name, &[name], upstream, files, acme, extra))
}

/// Publishes `config`, then starts the nodes `a` and `b` at once; returns
/// them, their admin addresses, and which of them orders first.
async fn two_nodes(dir: &Path, etcd: &Etcd, config: &Path) -> ([WeirProcess; 2], [String; 2], usize) {
    let published = publish(config, &etcd.endpoints(), false);
    assert!(published.status.success(), "{}", text(&published));
    let files = [
        node_file(dir, "a", &etcd.endpoints(), ""),
        node_file(dir, "b", &etcd.endpoints(), ""),
    ];
    let (a, b) = tokio::join!(
        WeirProcess::spawn_node(&files[0], 1),
        WeirProcess::spawn_node(&files[1], 1)
    );
    let mut nodes = [a, b];
    let admins = [nodes[0].admin_addr().await, nodes[1].admin_addr().await];
    let [a, b] = &mut nodes;
    let orderer = first_to_say(a, b, "ordering a certificate over ACME").await;
    (nodes, admins, orderer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_order_and_either_answers_tls_alpn() {
    let etcd = Etcd::start();
    let port = free_port();
    let forwarder = Forwarder::start(port).await;
    let pebble = Pebble::start(port).await;
    let upstream = Upstream::tcp(answer).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = acme_config(dir.path(), "shared.test", upstream.addr, &pebble, "", "");
    let (mut nodes, admins, orderer) = two_nodes(dir.path(), &etcd, &config).await;
    let other = 1 - orderer;
    // The CA's validation connections reach the node that did not order.
    forwarder.target.send_replace(Some(nodes[other].addr("public")));
    let issued = nodes[orderer].line_containing("certificate issued").await;
    assert!(issued.contains(r#"certificate="site""#), "{issued}");
    nodes[other].line_containing("certificate taken from the fleet").await;
    nodes[other].line_containing(r#"trigger="acme""#).await;
    assert!(
        forwarder.forwarded.load(Ordering::SeqCst) >= 1,
        "the CA never validated"
    );
    assert_eq!(pebble.orders(), 1, "each node ordered");

    let client = pebble.client_config();
    let from_orderer = served(nodes[orderer].addr("public"), "shared.test", Arc::clone(&client)).await;
    let from_other = served(nodes[other].addr("public"), "shared.test", client).await;
    assert_eq!(from_orderer, from_other, "the nodes serve different certificates");

    // Every node tells the same last order, made by the orderer.
    let names = ["a", "b"];
    for admin in &admins {
        let (status, body) = weir_tests::admin_request(admin, "GET", "/api/certificates", None, "").await;
        assert_eq!(status, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let last = &body["acme"]["site"]["last_order"];
        assert_eq!(last["result"], "issued", "{body}");
        assert_eq!(last["node"], names[orderer], "{body}");
    }
    // The key is the fleet's, under the prefix, for the gateway's role only.
    let stored = etcd.etcdctl(&["get", "--print-value-only", "/weir/acme/site/issued"]);
    let stored: serde_json::Value = serde_json::from_slice(&stored.stdout).expect("the issued chain is in etcd");
    assert!(
        stored["key"].as_str().is_some_and(|k| k.contains("PRIVATE KEY")),
        "{stored}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_order_leaves_the_order_to_another() {
    use std::os::unix::fs::PermissionsExt as _;
    let etcd = Etcd::start();
    let bind = Bind::start("apps.test");
    let pebble = Pebble::start_with_dns(free_port(), Some(bind.addr)).await;
    let upstream = Upstream::tcp(answer).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let nsupdate = bind.nsupdate_script(dir.path());
    // The first `present` hangs (its process group's id kept in `hung`):
    // the node running it is killed; every later run does the update.
    let hung = dir.path().join("hung");
    let script = dir.path().join("hang-once.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = present ] && mkdir {lock} 2>/dev/null; then echo $$ > {hung}; sleep 600; fi\nexec {nsupdate} \"$@\"\n",
            lock = dir.path().join("hang.lock").display(),
            hung = hung.display(),
            nsupdate = nsupdate.display(),
        ),
    )
    .expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let dns = format!(
        r#"
        [dns.primary]
        provider = "exec"
        command = [{script}]
        command_timeout = "600s"
        nameservers = ["{server}"]
        "#,
        script = toml_path(&script),
        server = bind.addr,
    );
    let acme = r#", challenge = "dns-01", dns = "primary""#;
    let config = acme_config(dir.path(), "site.apps.test", upstream.addr, &pebble, acme, &dns);
    let (mut nodes, _, orderer) = two_nodes(dir.path(), &etcd, &config).await;
    let started = std::time::Instant::now();
    while !hung.exists() {
        assert!(started.elapsed() < STEP, "the first present never ran");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    nodes[orderer]
        .child
        .kill()
        .await
        .expect("kill the node holding the order");
    let hanging: i32 = std::fs::read_to_string(&hung)
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    if let Some(group) = rustix::process::Pid::from_raw(hanging) {
        // The killed node's command, in a process group of its own, is left.
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let other = 1 - orderer;
    // Its lease (2 s) expires, the other node takes the order and issues.
    let ordering = nodes[other].line_containing("ordering a certificate over ACME").await;
    assert!(ordering.contains(r#"certificate="site""#), "{ordering}");
    nodes[other].line_containing("certificate issued").await;
    nodes[other].line_containing(r#"trigger="acme""#).await;
    let leaf = served(nodes[other].addr("public"), "site.apps.test", pebble.client_config()).await;
    assert!(!leaf.is_empty());
    assert_eq!(pebble.orders(), 2, "the abandoned order and the one completed");
    assert_eq!(
        bind.dig("TXT", "_acme-challenge.site.apps.test"),
        "",
        "records left behind"
    );
}
