//! A network namespace the test creates, joined to this one by a veth pair,
//! for a weir node that can be cut off from one address (its way to etcd)
//! while clients still reach it and it still reaches its upstreams: a
//! partition as a network makes one, packets dropped without a word.
//!
//! The pair's subnet is a free `/24` of `10.213.0.0/16`, taken under a lock
//! file so that concurrent tests pick different ones. The namespace (and
//! the pair with it) is deleted when the value is dropped.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

/// A namespace and its veth pair.
pub struct Netns {
    /// The namespace's name, for `ip netns exec`.
    pub name: String,
    /// This namespace's address on the pair (reach upstreams here).
    pub host: IpAddr,
    /// A second address of this namespace on the pair: the one
    /// [`Netns::cut`] takes away from the namespace (put etcd's way here).
    pub far: IpAddr,
    /// The namespace's own address (bind the node's listeners here).
    pub inside: IpAddr,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("ip runs (Debian package iproute2)");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Netns {
    /// Whether this machine lets the tests make namespaces (root, iproute2).
    pub fn available() -> bool {
        let name = format!("weir-probe-{}", std::process::id());
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .is_ok_and(|o| o.status.success());
        if made {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
        made
    }

    /// A new namespace, its loopback up, joined to this one.
    pub fn create() -> Netns {
        let lock = std::fs::File::create(std::env::temp_dir().join("weir-netns.lock")).expect("lock file");
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
        let routes = Command::new("ip")
            .args(["-4", "route", "show"])
            .output()
            .expect("ip runs");
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        let subnet = (1..=254u8)
            .find(|n| !routes.contains(&format!("10.213.{n}.")))
            .expect("a free subnet of 10.213.0.0/16");
        let name = format!("weir-{}-{subnet}", std::process::id());
        let (outer, inner) = (
            format!("wo{subnet}x{}", std::process::id() % 10000),
            format!("wi{subnet}"),
        );
        ip(&["netns", "add", &name]);
        let netns = Netns {
            name: name.clone(),
            host: IpAddr::V4(Ipv4Addr::new(10, 213, subnet, 1)),
            far: IpAddr::V4(Ipv4Addr::new(10, 213, subnet, 3)),
            inside: IpAddr::V4(Ipv4Addr::new(10, 213, subnet, 2)),
        };
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &name]);
        ip(&["addr", "add", &format!("{}/24", netns.host), "dev", &outer]);
        ip(&["addr", "add", &format!("{}/24", netns.far), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{}/24", netns.inside),
            "dev",
            &inner,
        ]);
        ip(&["-n", &name, "link", "set", &inner, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        drop(lock);
        netns
    }

    /// The wrapper that runs a command inside the namespace.
    pub fn exec(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Drops, inside the namespace, every packet to [`Netns::far`]: no
    /// reset, no refusal, as when a link between sites fails.
    pub fn cut(&self) {
        ip(&[
            "-n",
            &self.name,
            "route",
            "add",
            "blackhole",
            &format!("{}/32", self.far),
        ]);
    }

    /// Takes the cut away.
    pub fn heal(&self) {
        ip(&[
            "-n",
            &self.name,
            "route",
            "del",
            "blackhole",
            &format!("{}/32", self.far),
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}
