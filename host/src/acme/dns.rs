//! DNS-01 (RFC 8555 §8.4): the TXT record `_acme-challenge.NAME` holding
//! a key authorization's digest, published by a `[dns.NAME]` provider —
//! RFC 2136 updates signed with TSIG, or an operator's command — and
//! looked up at the zone's authoritative servers until each answers with
//! it, so that the CA is told to validate only once it can.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use crate::door::DoorRuntime;
use hickory_net::client::{Client, ClientHandle as _};
use hickory_net::proto::op::ResponseCode;
use hickory_net::proto::rr::rdata::TXT;
use hickory_net::proto::rr::{DNSClass, Name, RData, Record, RecordType, TSigner};
use hickory_net::udp::UdpClientStream;
use tokio::io::{AsyncRead, AsyncReadExt as _};

use crate::config::{Config, DnsConfig, DnsProvider, TsigAlgorithm};

/// How long one DNS request waits for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the nameservers are asked again while the record is not there.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// How much of a command's output (each of stdout and stderr) is kept for
/// the log; the rest is read and dropped.
const MAX_OUTPUT: usize = 2048;
/// TSIG's allowed clock difference (RFC 8945 §10 recommends 300 s).
const TSIG_FUDGE: u16 = 300;

/// One DNS-01 record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Txt {
    /// `_acme-challenge.NAME`, without the trailing dot.
    pub fqdn: String,
    /// The base64url SHA-256 of the key authorization.
    pub value: String,
}

impl Txt {
    /// The record for validating `name` (a wildcard's base name for
    /// `*.NAME`) with `value`.
    pub fn for_name(name: &str, value: String) -> Txt {
        Txt {
            fqdn: format!("_acme-challenge.{}", name.trim_start_matches("*.")),
            value,
        }
    }
}

/// Adds (`present`) or removes (`cleanup`) one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publish the record beside any others of the same name.
    Present,
    /// Remove this record only.
    Cleanup,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Present => "present",
            Action::Cleanup => "cleanup",
        }
    }
}

/// Carries out `action` for `txt` through the provider `dns` (of `config`).
pub async fn change(dns: &DnsConfig, config: &Config, action: Action, txt: &Txt) -> Result<(), String> {
    match dns.provider {
        DnsProvider::Rfc2136 => update(dns, config, action, txt).await,
        DnsProvider::Exec => exec(dns, action, txt).await,
    }
}

fn name(text: &str) -> Result<Name, String> {
    let mut name = Name::from_ascii(text).map_err(|e| format!("`{}`: {e}", text.escape_debug()))?;
    name.set_fqdn(true);
    Ok(name)
}

/// An RFC 2136 update of `txt` in the provider's zone, signed with its
/// TSIG key; the server's answer must be NOERROR.
async fn update(dns: &DnsConfig, config: &Config, action: Action, txt: &Txt) -> Result<(), String> {
    let (Some(server), Some(zone), Some(key)) = (dns.server, &dns.zone, &dns.tsig_key) else {
        return Err("rfc2136 needs server, zone and tsig_key".into());
    };
    let secret = dns.tsig_secret(config)?;
    let algorithm = match dns.tsig_algorithm {
        TsigAlgorithm::HmacSha256 => hickory_net::proto::rr::rdata::tsig::TsigAlgorithm::HmacSha256,
        TsigAlgorithm::HmacSha384 => hickory_net::proto::rr::rdata::tsig::TsigAlgorithm::HmacSha384,
        TsigAlgorithm::HmacSha512 => hickory_net::proto::rr::rdata::tsig::TsigAlgorithm::HmacSha512,
    };
    let signer = TSigner::new(secret, algorithm, name(key)?, TSIG_FUDGE).map_err(|e| e.to_string())?;
    let mut client = client(server, Some(signer));
    let record = Record::from_rdata(name(&txt.fqdn)?, dns.ttl, RData::TXT(TXT::new(vec![txt.value.clone()])));
    let zone = name(zone)?;
    let response = match action {
        Action::Present => client.append(record, zone, false).await,
        Action::Cleanup => client.delete_by_rdata(record, zone).await,
    }
    .map_err(|e| {
        let error = e.to_string();
        // A server that rejects the signature (BADSIG, BADKEY) answers
        // unsigned, as RFC 8945 §5.3.2 says; hickory-proto 0.26 reports
        // that as a truncated MAC, so it is named here.
        if error.to_ascii_lowercase().contains("hmac") || error.to_ascii_lowercase().contains("tsig") {
            format!(
                "{server} refused the update's TSIG signature (check tsig_key, tsig_algorithm and the secret in tsig_secret_file): {error}"
            )
        } else {
            format!("update to {server}: {error}")
        }
    })?;
    match response.metadata.response_code {
        ResponseCode::NoError => Ok(()),
        code => Err(format!("{server} refused the update: {code}")),
    }
}

/// A DNS client of `server` over UDP, its requests signed by `signer`.
fn client(server: SocketAddr, signer: Option<TSigner>) -> Client<DoorRuntime> {
    let stream = UdpClientStream::builder(server, DoorRuntime::default())
        .with_timeout(Some(REQUEST_TIMEOUT))
        .with_signer(signer)
        .build();
    let (client, background) = Client::from_sender(stream);
    // Ends when the client (the last handle to its exchange) is dropped.
    tokio::spawn(background);
    client
}

/// Whether `server` answers a TXT query for `txt.fqdn` with `txt.value`.
async fn answers_with(server: SocketAddr, txt: &Txt) -> Result<bool, String> {
    let mut client = client(server, None);
    let response = client
        .query(name(&txt.fqdn)?, DNSClass::IN, RecordType::TXT)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.answers.iter().any(|record| match &record.data {
        RData::TXT(found) => found.txt_data.concat() == txt.value.as_bytes(),
        _ => false,
    }))
}

/// Waits until every nameserver of `dns` answers with each of `records`,
/// at most `propagation_timeout`; the error names the servers that did not.
pub async fn wait_visible(dns: &DnsConfig, records: &[Txt]) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + dns.propagation_timeout;
    let servers = dns.check_at();
    let mut waiting: Vec<(SocketAddr, &Txt, String)> = servers
        .iter()
        .flat_map(|server| records.iter().map(|txt| (*server, txt, String::new())))
        .collect();
    loop {
        let mut still = Vec::new();
        for (server, txt, _) in waiting {
            match answers_with(server, txt).await {
                Ok(true) => {}
                Ok(false) => still.push((server, txt, "not there yet".to_owned())),
                Err(error) => still.push((server, txt, error)),
            }
        }
        waiting = still;
        if waiting.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() + POLL_EVERY > deadline {
            let missing: Vec<String> = waiting
                .iter()
                .map(|(server, txt, why)| format!("{server} for {} ({why})", txt.fqdn))
                .collect();
            return Err(format!(
                "the TXT record was not visible within {:?} at {}",
                dns.propagation_timeout,
                missing.join(", ")
            ));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Runs the provider's command with `present|cleanup FQDN VALUE`, in a
/// process group of its own that is killed if it outlasts
/// `command_timeout`; it must exit 0. Its output, bounded, goes into the
/// error or the debug log.
async fn exec(dns: &DnsConfig, action: Action, txt: &Txt) -> Result<(), String> {
    let Some((program, args)) = dns.command.split_first() else {
        return Err("exec needs a command".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .args([action.as_str(), txt.fqdn.as_str(), txt.value.as_str()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("`{}` could not start: {e}", program.escape_debug()))?;
    let group = KillGroup(child.id());
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (status, stdout, stderr) = tokio::join!(child.wait(), bounded(stdout), bounded(stderr));
        (status, stdout, stderr)
    };
    let Ok((status, stdout, stderr)) = tokio::time::timeout(dns.command_timeout, run).await else {
        drop(group);
        return Err(format!(
            "`{}` {} did not finish within {:?} (its output still open); killed",
            program.escape_debug(),
            action.as_str(),
            dns.command_timeout
        ));
    };
    group.disarm();
    let status = status.map_err(|e| e.to_string())?;
    let output = format!("stdout: {:?}, stderr: {:?}", stdout, stderr);
    if status.success() {
        tracing::debug!(command = program.as_str(), action = action.as_str(), fqdn = txt.fqdn.as_str(), %output, "DNS command done");
        Ok(())
    } else {
        Err(format!(
            "`{}` {} {status}; {output}",
            program.escape_debug(),
            action.as_str()
        ))
    }
}

/// The process group a running command leads, killed when dropped — on
/// a timeout, or when the order's own limit drops the call — unless
/// disarmed once the command has been waited for (its id may then be
/// reused).
struct KillGroup(Option<u32>);

impl KillGroup {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        let pid = self
            .0
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // The command has not been waited for, so the group is still
            // its own; it may have exited meanwhile, then nothing happens.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// The first `MAX_OUTPUT` bytes of `pipe` (lossily UTF-8), the rest read
/// and dropped so that the command never blocks on a full pipe.
async fn bounded(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut pipe) = pipe else { return String::new() };
    let mut kept = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut dropped = 0usize;
    while let Ok(n) = pipe.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let room = MAX_OUTPUT.saturating_sub(kept.len()).min(n);
        kept.extend_from_slice(&buffer[..room]);
        dropped += n - room;
    }
    let mut text = String::from_utf8_lossy(&kept).trim_end().to_owned();
    if dropped > 0 {
        text.push_str(&format!(" … ({dropped} more bytes)"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_is_validated_at_its_base_name() {
        assert_eq!(
            Txt::for_name("*.apps.test", "v".into()).fqdn,
            "_acme-challenge.apps.test"
        );
        assert_eq!(Txt::for_name("apps.test", "v".into()).fqdn, "_acme-challenge.apps.test");
    }

    fn exec_config(script: &str, timeout: Duration) -> (tempfile::TempDir, DnsConfig) {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("dns.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let dns: DnsConfig = toml::from_str(&format!(
            "provider = \"exec\"\ncommand = [{:?}, \"--zone\", \"apps.test\"]\nnameservers = [\"127.0.0.1:53\"]\ncommand_timeout = \"{}ms\"\n",
            path.display().to_string(),
            timeout.as_millis()
        ))
        .expect("config");
        (dir, dns)
    }

    #[tokio::test]
    async fn a_command_gets_its_arguments_and_its_failure_is_told() {
        let (dir, dns) = exec_config(
            &format!(
                "echo \"$@\" > {}/args; echo to-stderr >&2; exit 3",
                "\"$(dirname \"$0\")\""
            ),
            Duration::from_secs(5),
        );
        let txt = Txt::for_name("a.test", "VALUE".into());
        let error = exec(&dns, Action::Present, &txt).await.expect_err("exit 3");
        assert!(
            error.contains("exit status: 3") && error.contains("to-stderr"),
            "{error}"
        );
        let args = std::fs::read_to_string(dir.path().join("args")).expect("ran");
        assert_eq!(args, "--zone apps.test present _acme-challenge.a.test VALUE\n");
    }

    /// A script that starts a background `sleep`, writes its pid to
    /// `child` beside it, and waits.
    const LEAVES_A_CHILD: &str = "sleep 30 & echo $! > \"$(dirname \"$0\")/child\"; wait";

    /// Asserts that the background child the script in `dir` started is
    /// gone (or left a zombie) once the kill is delivered.
    async fn assert_child_gone(dir: &std::path::Path) {
        let child: i32 = std::fs::read_to_string(dir.join("child"))
            .expect("started")
            .trim()
            .parse()
            .expect("pid");
        let alive = || std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| !stat.contains(") Z "));
        for _ in 0..100 {
            if !alive() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!alive(), "the command's child {child} survived");
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_with_its_children() {
        let (dir, dns) = exec_config(LEAVES_A_CHILD, Duration::from_millis(500));
        let txt = Txt::for_name("a.test", "V".into());
        let error = exec(&dns, Action::Cleanup, &txt).await.expect_err("timed out");
        assert!(error.contains("did not finish within 500ms"), "{error}");
        assert_child_gone(dir.path()).await;
    }

    #[tokio::test]
    async fn a_command_dropped_midway_is_killed_with_its_children() {
        let (dir, dns) = exec_config(LEAVES_A_CHILD, Duration::from_secs(60));
        let txt = Txt::for_name("a.test", "V".into());
        // The order's own limit ends the call long before the command's.
        let outcome = tokio::time::timeout(Duration::from_millis(500), exec(&dns, Action::Present, &txt)).await;
        assert!(outcome.is_err(), "the command finished");
        assert_child_gone(dir.path()).await;
    }

    #[tokio::test]
    async fn a_commands_output_is_bounded() {
        let (_dir, dns) = exec_config(
            "head -c 1000000 /dev/zero | tr '\\0' x; exit 1",
            Duration::from_secs(10),
        );
        let error = exec(&dns, Action::Present, &Txt::for_name("a.test", "V".into()))
            .await
            .expect_err("exit 1");
        assert!(error.len() < 3 * MAX_OUTPUT, "{} bytes", error.len());
        assert!(error.contains("more bytes"), "{error}");
    }
}
