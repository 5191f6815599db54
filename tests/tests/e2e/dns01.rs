//! ACME DNS-01 against real servers: BIND 9 is the authoritative server of
//! `apps.test` and takes TSIG-signed updates; Pebble resolves through it.
//! weir publishes the TXT records (RFC 2136 or an `exec` script calling
//! `nsupdate`), waits until BIND serves them, gets a wildcard certificate,
//! serves it, and leaves no record behind. Failures are logged with their
//! reason and retried while the listener goes on serving.

use std::path::Path;

use weir_tests::dns::{Bind, TSIG_KEY};
use weir_tests::pebble::Pebble;
use weir_tests::{Upstream, WeirProcess, answer, free_port, tls_exchange, toml_path, write_config};

/// A config terminating `*.apps.test` with the certificate `site`, ordered
/// with DNS-01 through `[dns.primary]` as `dns` describes.
fn wildcard_config(dir: &Path, upstream: std::net::SocketAddr, pebble: &Pebble, dns: &str) -> std::path::PathBuf {
    let store = dir.join("acme");
    let files = (
        toml_path(&store.join("site.pem")),
        toml_path(&store.join("site-key.pem")),
    );
    let extra = format!("[admin]\nbind = \"127.0.0.1:0\"\n{dns}");
    write_config(
        dir,
        &pebble.site_config(
            "*.apps.test",
            &["*.apps.test", "apps.test"],
            upstream,
            (&files.0, &files.1),
            r#", challenge = "dns-01", dns = "primary""#,
            &extra,
        ),
    )
}

/// Orders `*.apps.test` + `apps.test` through `dns`, then checks it is
/// served (verified against Pebble's root, for both names), that no TXT
/// record is left, and what the admin API says of the order.
async fn obtains_the_wildcard(bind: &Bind, dns: &str) {
    let pebble = Pebble::start_with_dns(free_port(), Some(bind.addr)).await;
    let upstream = Upstream::tcp(answer).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = wildcard_config(dir.path(), upstream.addr, &pebble, dns);
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let issued = weir.line_containing("certificate issued").await;
    assert!(issued.contains(r#"certificate="site""#), "{issued}");
    weir.line_containing(r#"trigger="acme""#).await;
    assert_eq!(pebble.orders(), 1);

    let client = pebble.client_config();
    for name in ["x.apps.test", "deep-name.apps.test"] {
        let reply = tls_exchange(weir.addr("public"), name, std::sync::Arc::clone(&client), "hello").await;
        assert_eq!(
            reply.expect("a verified handshake"),
            "upstream heard: hello\n",
            "{name}"
        );
    }
    // openssl sees the issued chain, verified against Pebble's root.
    let (stdout, stderr) = weir_tests::openssl_s_client(
        weir.addr("public"),
        "x.apps.test",
        &pebble.root_file(),
        &[],
        "via openssl",
    )
    .await;
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}\n{stderr}");
    assert!(stdout.contains("upstream heard: via openssl"), "{stdout}\n{stderr}");
    let pem = std::fs::read(dir.path().join("acme/site.pem")).expect("issued");
    let leaf = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .next()
        .expect("a certificate")
        .expect("PEM");
    let leaf: rustls::pki_types::CertificateDer = leaf;
    let mut sans = weir_attest::x509::describe(&leaf).expect("describes").sans;
    sans.sort();
    assert_eq!(sans, ["*.apps.test", "apps.test"]);
    assert_eq!(bind.dig("TXT", "_acme-challenge.apps.test"), "", "records left behind");

    let (status, body) = weir_tests::admin_request(&admin, "GET", "/api/certificates", None, "").await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let site = &body["acme"]["site"];
    assert_eq!(site["challenge"], "dns-01", "{body}");
    assert_eq!(site["last_order"]["result"], "issued", "{body}");
    let next = site["next_renewal"].as_u64().expect("a next renewal");
    let ordered = site["last_order"]["at"].as_u64().expect("an order time");
    assert!(next > ordered, "{body}");
    let series = "weir_acme_last_order_timestamp_seconds{certificate=\"site\",challenge=\"dns-01\",result=\"issued\"}";
    assert_eq!(weir_tests::metric(&admin, series).await, Some(ordered as f64));
    let series = "weir_acme_next_renewal_timestamp_seconds{certificate=\"site\"}";
    assert_eq!(weir_tests::metric(&admin, series).await, Some(next as f64));
    weir.child.kill().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_is_obtained_with_rfc2136_updates() {
    let bind = Bind::start("apps.test");
    let dns = format!(
        r#"
        [dns.primary]
        provider = "rfc2136"
        server = "{server}"
        zone = "apps.test"
        tsig_key = "{TSIG_KEY}"
        tsig_secret_file = {secret}
        "#,
        server = bind.addr,
        secret = toml_path(&bind.key_file()),
    );
    obtains_the_wildcard(&bind, &dns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_is_obtained_through_an_exec_script() {
    let bind = Bind::start("apps.test");
    let scripts = tempfile::tempdir().expect("temp dir");
    let dns = format!(
        r#"
        [dns.primary]
        provider = "exec"
        command = [{script}]
        nameservers = ["{server}"]
        "#,
        script = toml_path(&bind.nsupdate_script(scripts.path())),
        server = bind.addr,
    );
    obtains_the_wildcard(&bind, &dns).await;
}

/// Four certificates whose DNS-01 cannot succeed: a wrong TSIG secret
/// (BIND refuses the update), a DNS server that is not there, a script
/// that fails and one that hangs. Each is logged with its reason and a
/// retry time, and the listener serves all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns01_failures_are_told_and_retried_while_serving() {
    use std::os::unix::fs::PermissionsExt as _;
    let bind = Bind::start("apps.test");
    let pebble = Pebble::start_with_dns(free_port(), Some(bind.addr)).await;
    let upstream = Upstream::tcp(weir_tests::echo).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA==\n").expect("write");
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let script = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        toml_path(&path)
    };
    let certificate = |name: &str, dns: &str| {
        format!(
            r#"
            [certificates.{name}]
            cert = {cert}
            key = {key}
            acme = {{ directory = "{directory}", domains = ["{name}.apps.test"], directory_ca = {ca}, challenge = "dns-01", dns = "{dns}" }}
            "#,
            cert = toml_path(&dir.path().join(format!("{name}.pem"))),
            key = toml_path(&dir.path().join(format!("{name}-key.pem"))),
            directory = pebble.directory,
            ca = toml_path(&pebble.https_ca()),
        )
    };
    let extra = format!(
        r#"
        {badkey}
        {nowhere}
        {fails}
        {hangs}

        [dns.badkey]
        provider = "rfc2136"
        server = "{server}"
        zone = "apps.test"
        tsig_key = "{TSIG_KEY}"
        tsig_secret_file = {wrong}

        [dns.nowhere]
        provider = "rfc2136"
        server = "127.0.0.1:{closed}"
        zone = "apps.test"
        tsig_key = "{TSIG_KEY}"
        tsig_secret_file = {secret}

        [dns.fails]
        provider = "exec"
        command = [{fails_script}]
        nameservers = ["{server}"]

        [dns.hangs]
        provider = "exec"
        command = [{hangs_script}]
        command_timeout = "1s"
        nameservers = ["{server}"]
        "#,
        badkey = certificate("badkey", "badkey"),
        nowhere = certificate("nowhere", "nowhere"),
        fails = certificate("fails", "fails"),
        hangs = certificate("hangs", "hangs"),
        server = bind.addr,
        wrong = toml_path(&wrong),
        closed = free_port(),
        secret = toml_path(&bind.key_file()),
        fails_script = script("fails.sh", "echo \"no API token for $2\" >&2; exit 7"),
        hangs_script = script("hangs.sh", "sleep 600"),
    );
    let config = write_config(dir.path(), &weir_tests::plain_route_config(upstream.addr, &extra));
    let mut weir = WeirProcess::spawn(&config).await;
    let mut failures = std::collections::BTreeMap::new();
    while failures.len() < 4 {
        let line = weir.line_containing("ACME order failed").await;
        let name = line
            .split("certificate=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("names its certificate")
            .to_owned();
        assert!(line.contains("retry_in=60s"), "{line}");
        failures.insert(name, line);
    }
    let told = |name: &str, needle: &str| {
        assert!(failures[name].contains(needle), "{name}: {}", failures[name]);
    };
    told("badkey", "[dns.badkey]");
    told("badkey", "refused the update's TSIG signature");
    told("nowhere", "[dns.nowhere]");
    told("fails", "exit status: 7");
    told("fails", "no API token for _acme-challenge.fails.apps.test");
    told("hangs", "did not finish within 1s");
    assert_eq!(bind.dig("TXT", "_acme-challenge.badkey.apps.test"), "");
    let mut stream = tokio::net::TcpStream::connect(weir.addr("public"))
        .await
        .expect("connect");
    assert!(weir_tests::echoes(&mut stream, b"still serving\n").await);
    weir.child.kill().await.expect("stop");
}

/// A TSIG secret others may read keeps weir from starting, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readable_tsig_secret_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("tsig.key");
    std::fs::write(&secret, "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ==\n").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let extra = format!(
        r#"
        [dns.primary]
        provider = "rfc2136"
        server = "127.0.0.1:53"
        zone = "apps.test"
        tsig_key = "k"
        tsig_secret_file = {secret}
        "#,
        secret = toml_path(&secret),
    );
    let config = write_config(
        dir.path(),
        &weir_tests::plain_route_config("127.0.0.1:1".parse().expect("addr"), &extra),
    );
    let run = tokio::process::Command::new(weir_tests::weir_binary())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(weir_tests::STEP, run)
        .await
        .expect("weir refuses at once")
        .expect("weir runs");
    let stderr = weir_tests::text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("dns.primary.tsig_secret_file")
            && stderr.contains(&secret.display().to_string())
            && stderr.contains("lets others read it"),
        "{stderr}"
    );
}
