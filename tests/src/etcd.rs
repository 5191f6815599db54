//! Real etcd (Debian's `etcd-server`, 3.4) for the fleet tests: a single
//! member or a cluster on loopback, in a temporary directory, each member
//! stopped by its PID when dropped; `etcdctl` for what an operator would do
//! by hand; and a link that can be cut, to take one node away from etcd
//! while the others stay.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::{STEP, free_port};

/// One member of an etcd cluster.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// An etcd cluster on loopback; every member stopped when dropped.
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    /// `https` when clients must come with TLS.
    scheme: &'static str,
    /// Extra arguments for every member (TLS), and for `etcdctl`.
    server_args: Vec<String>,
    ctl_args: Vec<String>,
}

/// TLS for etcd's clients: its certificate and key, the CA that signs
/// client certificates (required), and the client's own for `etcdctl`.
pub struct EtcdTls<'a> {
    /// etcd's certificate chain (PEM).
    pub cert: &'a Path,
    /// Its key.
    pub key: &'a Path,
    /// The CA of clients' certificates, and of etcd's.
    pub ca: &'a Path,
    /// A client certificate and key for `etcdctl`.
    pub client: (&'a Path, &'a Path),
}

impl Etcd {
    /// A single-member etcd, ready.
    pub fn start() -> Etcd {
        Etcd::cluster(1)
    }

    /// An `n`-member cluster, ready (every member healthy). Elections are
    /// quick (50 ms heartbeats, 500 ms election timeout), as on a LAN.
    pub fn cluster(n: usize) -> Etcd {
        Etcd::build(n, None, &[])
    }

    /// A single member started with `args` besides the usual ones.
    pub fn start_with(args: &[&str]) -> Etcd {
        Etcd::build(1, None, args)
    }

    /// A single member that takes clients over TLS only, with a client
    /// certificate signed by `tls.ca`.
    pub fn start_tls(tls: &EtcdTls<'_>) -> Etcd {
        Etcd::build(1, Some(tls), &[])
    }

    fn build(n: usize, tls: Option<&EtcdTls<'_>>, extra: &[&str]) -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |p: &Path| p.display().to_string();
        let (scheme, server_args, ctl_args) = match tls {
            None => ("http", Vec::new(), Vec::new()),
            Some(tls) => (
                "https",
                vec![
                    "--cert-file".into(),
                    path(tls.cert),
                    "--key-file".into(),
                    path(tls.key),
                    "--trusted-ca-file".into(),
                    path(tls.ca),
                    "--client-cert-auth".into(),
                ],
                vec![
                    "--cacert".into(),
                    path(tls.ca),
                    "--cert".into(),
                    path(tls.client.0),
                    "--key".into(),
                    path(tls.client.1),
                ],
            ),
        };
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut server_args = server_args;
        server_args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut etcd = Etcd {
            members,
            dir,
            scheme,
            server_args,
            ctl_args,
        };
        for i in 0..n {
            etcd.spawn(i, "new");
        }
        etcd.wait_healthy();
        etcd
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        let data = self.dir.path().join(&self.members[i].name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", self.members[i].name))).expect("log");
        let member = &mut self.members[i];
        let client = format!("{}://127.0.0.1:{}", self.scheme, member.client);
        let peer = format!("http://127.0.0.1:{}", member.peer);
        let child = Command::new("etcd")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial, "--initial-cluster-state", state])
            .args(["--initial-cluster-token", &format!("weir-test-{}", std::process::id())])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&self.server_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts (Debian package etcd-server)");
        member.child = Some(child);
    }

    /// The running members' client URLs.
    fn running(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme, m.client))
            .collect()
    }

    /// Waits until every running member answers as healthy.
    pub fn wait_healthy(&self) {
        let started = Instant::now();
        let running = self.running();
        loop {
            let health = Command::new("etcdctl")
                .args(&self.ctl_args)
                .args(["--endpoints", &running.join(","), "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .expect("etcdctl runs (Debian package etcd-client)");
            if health.status.success() {
                return;
            }
            assert!(
                started.elapsed() < STEP,
                "etcd did not become healthy: {}{}",
                String::from_utf8_lossy(&health.stdout),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The members' logs (for a failure message).
    pub fn log(&self) -> String {
        self.members
            .iter()
            .map(|m| std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name))).unwrap_or_default())
            .collect()
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme, m.client))
            .collect()
    }

    /// Member `i`'s client address.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.members[i].client))
    }

    /// Stops member `i` (SIGKILL, as a crash).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i, "existing");
        self.wait_healthy();
    }

    /// The index of the current leader.
    pub fn leader(&self) -> usize {
        let status = self.etcdctl(&["endpoint", "status", "--cluster", "-w", "json"]);
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        let value: serde_json::Value = serde_json::from_str(&text).expect("etcdctl JSON");
        let leader = value[0]["Status"]["leader"].as_u64().expect("a leader");
        let member = value
            .as_array()
            .expect("a list")
            .iter()
            .find(|m| m["Status"]["header"]["member_id"].as_u64() == Some(leader))
            .expect("the leader's own status");
        let endpoint = member["Endpoint"].as_str().expect("endpoint");
        self.endpoints()
            .iter()
            .position(|e| e == endpoint)
            .expect("the leader is a member")
    }

    /// Runs `etcdctl` against the running members with `args`; panics if it fails.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let output = self.etcdctl_as(None, args);
        assert!(
            output.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Runs `etcdctl` as `user` (`name:password`), if any; returns what it did.
    pub fn etcdctl_as(&self, user: Option<&str>, args: &[&str]) -> Output {
        let running = self.running();
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(running.join(","));
        if let Some(user) = user {
            command.arg("--user").arg(user);
        }
        command.args(args).output().expect("etcdctl runs")
    }

    /// A counter or gauge from member `i`'s `/metrics` (0 when absent).
    pub fn metric(&self, i: usize, name: &str) -> f64 {
        use std::io::{Read, Write};
        assert_eq!(self.scheme, "http", "metrics are read over plain HTTP");
        let mut stream = std::net::TcpStream::connect(self.client_addr(i)).expect("etcd's metrics");
        stream.set_read_timeout(Some(STEP)).expect("timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n")
            .expect("ask");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("metrics");
        text.lines()
            .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .filter_map(|value| value.trim().parse::<f64>().ok())
            .sum()
    }

    /// Takes member `i` out of the cluster for good: removed from the
    /// membership, stopped, its data gone.
    pub fn remove(&mut self, i: usize) {
        let list = self.etcdctl(&["member", "list", "-w", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("etcdctl's JSON");
        let id = list["members"]
            .as_array()
            .expect("members")
            .iter()
            .find(|m| m["name"] == self.members[i].name.as_str())
            .and_then(|m| m["ID"].as_u64())
            .expect("the member is listed");
        // etcd refuses to remove a member until the others have been
        // connected for its health interval (5 s).
        let started = Instant::now();
        loop {
            let removed = self.etcdctl_as(None, &["member", "remove", &format!("{id:x}")]);
            if removed.status.success() {
                break;
            }
            assert!(
                started.elapsed() < STEP,
                "member remove: {}",
                String::from_utf8_lossy(&removed.stderr)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        self.stop(i);
        let _ = std::fs::remove_dir_all(self.dir.path().join(&self.members[i].name));
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}

/// A TCP link to `target` that the test can cut (every connection closed,
/// new ones refused) and restore: one node's way to etcd.
pub struct Link {
    /// Where the link listens.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// A link to `target`.
    pub async fn to(target: SocketAddr) -> Link {
        Link::at(std::net::Ipv4Addr::LOCALHOST.into(), target).await
    }

    /// A link to `target` that listens on `ip`.
    pub async fn at(ip: std::net::IpAddr, target: SocketAddr) -> Link {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let (c, g) = (Arc::clone(&cut), Arc::clone(&generation));
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                let mut closed = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = closed.changed() => {}
                    }
                });
            }
        });
        Link {
            addr,
            cut,
            generation,
            _task: task,
        }
    }

    /// The link's URL, for a node's `fleet.endpoints`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection through the link and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}
