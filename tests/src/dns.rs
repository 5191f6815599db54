//! Real BIND 9 (Debian's `bind9`) for the DNS-01 tests: `named` in a
//! temporary directory, authoritative for one zone on a loopback port, with
//! a TSIG key (made by `tsig-keygen`) allowed to update its TXT records;
//! stopped by its PID when dropped. `dig` reads what it serves.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::{STEP, free_port};

/// The TSIG key's name, as `named` and weir know it.
pub const TSIG_KEY: &str = "weir-acme";

/// `named`, authoritative for one zone.
pub struct Bind {
    dir: tempfile::TempDir,
    /// Where it answers, UDP and TCP.
    pub addr: SocketAddr,
    /// The zone.
    pub zone: String,
    child: Child,
}

impl Bind {
    /// `named` serving `zone` (its apex, `ns` and every name below it
    /// resolve to 127.0.0.1), letting the key [`TSIG_KEY`] change TXT
    /// records in it; ready to answer.
    pub fn start(zone: &str) -> Bind {
        Bind::start_with(zone, "")
    }

    /// Like [`Bind::start`], with `records` (zone-file lines, relative
    /// names) in the zone too. Every query it answers is logged, for
    /// [`Bind::queries`].
    pub fn start_with(zone: &str, records: &str) -> Bind {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path();
        let key = Command::new(sbin("tsig-keygen"))
            .args(["-a", "hmac-sha256", TSIG_KEY])
            .output()
            .expect("tsig-keygen runs (scripts/test.sh installs bind9)");
        assert!(key.status.success(), "{}", String::from_utf8_lossy(&key.stderr));
        let key_file = path.join("tsig.key");
        std::fs::write(&key_file, &key.stdout).expect("write");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(
            path.join("zone.db"),
            format!(
                "$TTL 60\n@ IN SOA ns.{zone}. hostmaster.{zone}. 1 60 60 3600 60\n@ IN NS ns.{zone}.\n\
                 @ IN A 127.0.0.1\nns IN A 127.0.0.1\n* IN A 127.0.0.1\n{records}\n"
            ),
        )
        .expect("write");
        let port = free_port();
        let dir_text = path.display();
        std::fs::write(
            path.join("named.conf"),
            format!(
                r#"options {{
    directory "{dir_text}";
    pid-file "{dir_text}/named.pid";
    session-keyfile "{dir_text}/session.key";
    managed-keys-directory "{dir_text}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    allow-query {{ any; }};
    querylog yes;
}};

controls {{ }};
include "{dir_text}/tsig.key";
zone "{zone}" {{
    type primary;
    file "{dir_text}/zone.db";
    update-policy {{ grant {TSIG_KEY} zonesub TXT; }};
}};
"#
            ),
        )
        .expect("write");
        let log = |name: &str| std::fs::File::create(path.join(name)).expect("log file");
        let child = Command::new(sbin("named"))
            .args(["-g", "-4", "-c"])
            .arg(path.join("named.conf"))
            .stdout(log("named.out"))
            .stderr(log("named.log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("named is installed (scripts/test.sh installs bind9)");
        let bind = Bind {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            zone: zone.to_owned(),
            dir,
            child,
        };
        let started = Instant::now();
        while bind.dig("SOA", zone).is_empty() {
            assert!(started.elapsed() < STEP, "named did not start: {}", bind.log());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bind
    }

    /// How many queries for `name` (as asked, without the trailing dot) of
    /// type `kind` it has answered.
    pub fn queries(&self, name: &str, kind: &str) -> usize {
        let log = self.query_log();
        let asked = format!("query: {name} IN {kind} ");
        log.lines().filter(|line| line.contains(&asked)).count()
    }

    /// The queries it answered, a line each (`named -g` logs them to its
    /// stderr, with the rest of its log).
    pub fn query_log(&self) -> String {
        self.log()
            .lines()
            .filter(|line| line.contains("query: "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The key file `tsig-keygen` wrote (mode 0600).
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("tsig.key")
    }

    /// `named`'s log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("named.log")).unwrap_or_default()
    }

    /// The records of `kind` at `name`, as `dig +short` prints them.
    pub fn dig(&self, kind: &str, name: &str) -> String {
        let out = Command::new("dig")
            .args(["+short", "+norecurse", "+time=2", "+tries=1", "-p"])
            .arg(self.addr.port().to_string())
            .arg(format!("@{}", self.addr.ip()))
            .args([kind, name])
            .output()
            .expect("dig runs (scripts/test.sh installs bind9-dnsutils)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.starts_with(";;") {
            String::new()
        } else {
            text.trim().to_owned()
        }
    }

    /// A shell script for weir's `exec` DNS provider that publishes and
    /// removes records in this server with `nsupdate` and its TSIG key.
    pub fn nsupdate_script(&self, dir: &Path) -> PathBuf {
        let script = dir.join("nsupdate.sh");
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/sh
# weir's exec DNS provider: present|cleanup FQDN VALUE
set -eu
case "$1" in
    present) change="update add $2. 60 IN TXT \"$3\"" ;;
    cleanup) change="update delete $2. IN TXT \"$3\"" ;;
    *) echo "unknown action $1" >&2; exit 2 ;;
esac
printf 'server {ip} {port}\nzone {zone}\n%s\nsend\n' "$change" | nsupdate -k {key}
echo "$1 $2 done"
"#,
                ip = self.addr.ip(),
                port = self.addr.port(),
                zone = self.zone,
                key = self.key_file().display(),
            ),
        )
        .expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        script
    }
}

/// A BIND program from `/usr/sbin`, which an ordinary user's `PATH` may
/// not have, else from the `PATH`.
fn sbin(program: &str) -> PathBuf {
    let path = Path::new("/usr/sbin").join(program);
    if path.exists() { path } else { PathBuf::from(program) }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
