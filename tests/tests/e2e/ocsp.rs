//! OCSP stapling and certificate expiry: a response made by `openssl ocsp`
//! is checked against its certificate and stapled to terminated handshakes
//! (`openssl s_client -status` sees it); a revoked, foreign or garbled one
//! is refused with the reason, and a reload that brings one keeps the
//! response in use. Expiry shows in `weir check`, the admin API and the
//! metrics.

use std::path::{Path, PathBuf};
use weir_tests::{Upstream, WeirProcess, admin_request, answer, openssl, toml_path, weir_binary, write_config};

/// A new P-256 key in a request (`req` then the rest).
const NEW_P256_KEY: &str = "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// A CA that is its own OCSP responder, and certificates it issued.
struct Ca {
    dir: tempfile::TempDir,
}

impl Ca {
    fn new() -> Ca {
        let dir = tempfile::tempdir().expect("temp dir");
        openssl(
            dir.path(),
            &format!(
                "{NEW_P256_KEY} -x509 -keyout ca.key -out ca.pem -subj /CN=weir-OCSP-test-CA -days 30 \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
            ),
        );
        Ca { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues `<name>.pem` (the certificate), `<name>.key` and
    /// `<name>-chain.pem` (with the CA) for `host`, valid for `days`.
    fn issue(&self, name: &str, host: &str, serial: u32, days: u32) {
        let dir = self.dir.path();
        openssl(
            dir,
            &format!("{NEW_P256_KEY} -keyout {name}.key -out {name}.csr -subj /CN={host}"),
        );
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("subjectAltName=DNS:{host}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("write extensions");
        openssl(
            dir,
            &format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -set_serial {serial} -days {days} \
                 -out {name}.pem -extfile {name}.ext"
            ),
        );
        let chain = [
            std::fs::read(dir.join(format!("{name}.pem"))).expect("certificate"),
            std::fs::read(dir.join("ca.pem")).expect("CA"),
        ]
        .concat();
        std::fs::write(dir.join(format!("{name}-chain.pem")), chain).expect("write chain");
    }

    /// The CA's OCSP response for certificate `name` (serial `serial`,
    /// subject `host`), `revoked` or good, written to `out`.
    fn respond(&self, name: &str, host: &str, serial: u32, revoked: bool, out: &str) {
        let dir = self.dir.path();
        let entry = match revoked {
            false => format!("V\t351231235959Z\t\t{serial:X}\tunknown\t/CN={host}\n"),
            true => format!("R\t351231235959Z\t250101000000Z\t{serial:X}\tunknown\t/CN={host}\n"),
        };
        std::fs::write(dir.join("index.txt"), entry).expect("write index");
        openssl(
            dir,
            &format!("ocsp -issuer ca.pem -cert {name}.pem -no_nonce -reqout req.der"),
        );
        openssl(
            dir,
            &format!(
                "ocsp -index index.txt -rsigner ca.pem -rkey ca.key -CA ca.pem -reqin req.der \
                 -respout {out} -ndays 1"
            ),
        );
    }
}

/// `openssl s_client -status` against `addr` for `host`: its stdout.
async fn s_client_status(addr: std::net::SocketAddr, host: &str, ca: &Path) -> String {
    let (stdout, stderr) = weir_tests::openssl_s_client(addr, host, ca, &["-status"], "hello").await;
    assert!(
        stdout.contains("Verify return code: 0 (ok)"),
        "the handshake failed: {stdout}\n{stderr}"
    );
    stdout
}

fn config(ca: &Ca, ocsp: Option<&str>, upstream: std::net::SocketAddr) -> String {
    let ocsp = ocsp.map_or(String::new(), |file| format!("ocsp = {}", toml_path(&ca.path(file))));
    format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."ocsp.test" = {{ address = "{upstream}", terminate = {{ certificate = "site" }} }}

        [certificates.site]
        cert = {}
        key = {}
        {ocsp}

        [reload]
        watch = false

        [admin]
        bind = "127.0.0.1:0"
        "#,
        toml_path(&ca.path("site-chain.pem")),
        toml_path(&ca.path("site.key")),
    )
}

fn weir_check(config: &Path) -> (bool, String) {
    let out = std::process::Command::new(weir_binary())
        .args(["check", "--config", &config.display().to_string()])
        .env("NO_COLOR", "1")
        .output()
        .expect("weir runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_response_is_stapled_and_a_bad_one_is_refused() {
    let ca = Ca::new();
    ca.issue("site", "ocsp.test", 0x1001, 20);
    ca.issue("other", "other.test", 0x1002, 20);
    ca.respond("site", "ocsp.test", 0x1001, false, "good.der");
    ca.respond("site", "ocsp.test", 0x1001, true, "revoked.der");
    ca.respond("other", "other.test", 0x1002, false, "other.der");
    std::fs::write(ca.path("garbage.der"), b"not an OCSP response").expect("write");
    // Another CA of the same name, with its own key, vouching for a
    // certificate with the same serial: only the issuer key hash tells.
    let impostor = Ca::new();
    impostor.issue("site", "ocsp.test", 0x1001, 20);
    impostor.respond("site", "ocsp.test", 0x1001, false, "good.der");
    std::fs::copy(impostor.path("good.der"), ca.path("impostor.der")).expect("copy");
    let upstream = Upstream::tcp(answer).await;
    let dir = tempfile::tempdir().expect("temp dir");

    // Without `ocsp`, nothing is stapled.
    let path = write_config(dir.path(), &config(&ca, None, upstream.addr));
    let weir = WeirProcess::spawn(&path).await;
    let out = s_client_status(weir.addr("public"), "ocsp.test", &ca.path("ca.pem")).await;
    assert!(out.contains("OCSP response: no response sent"), "{out}");
    drop(weir);

    // A certificate 20 days from expiry: `weir check` warns.
    let path = write_config(dir.path(), &config(&ca, Some("good.der"), upstream.addr));
    let (ok, out) = weir_check(&path);
    assert!(ok, "{out}");
    let warning = out
        .lines()
        .find(|l| l.contains("the certificate expires soon"))
        .unwrap_or_else(|| panic!("no expiry warning: {out}"));
    assert!(warning.contains("site") && warning.contains("days=19"), "{warning}");

    // Stapled: openssl sees the CA's answer for this certificate.
    let mut weir = WeirProcess::spawn(&path).await;
    let admin = weir.admin_addr().await;
    let public = weir.addr("public");
    let out = s_client_status(public, "ocsp.test", &ca.path("ca.pem")).await;
    assert!(out.contains("OCSP Response Status: successful"), "{out}");
    assert!(out.contains("Cert Status: good"), "{out}");
    assert!(out.contains("Serial Number: 1001"), "{out}");

    let (status, body) = admin_request(&admin, "GET", "/api/certificates", None, "").await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let site = &body["certificates"][0];
    assert_eq!(site["name"], "site", "{body}");
    assert_eq!(site["ocsp_stapled"], true, "{body}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let not_after = site["not_after"].as_u64().expect("not_after");
    assert!((19 * 86_400..21 * 86_400).contains(&(not_after - now)), "{body}");
    let next_update = site["ocsp_next_update"].as_u64().expect("next_update");
    assert!((0..2 * 86_400).contains(&(next_update - now)), "{body}");
    let (_, metrics) = admin_request(&admin, "GET", "/metrics", None, "").await;
    assert!(
        metrics.contains(&format!(
            "weir_certificate_not_after_timestamp_seconds{{certificate=\"site\"}} {not_after}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_certificate_ocsp_stapled{certificate=\"site\"} 1"),
        "{metrics}"
    );

    // Each bad response fails the check with the field and the reason, and
    // a reload to it keeps the good one stapled.
    for (file, reason) in [
        (
            "revoked.der",
            "says the certificate was revoked at 2025-01-01T00:00:00Z",
        ),
        ("other.der", "has no status for this certificate (serial 1001)"),
        ("impostor.der", "has no status for this certificate (serial 1001)"),
        ("garbage.der", "not a DER OCSP response"),
    ] {
        write_config(dir.path(), &config(&ca, Some(file), upstream.addr));
        let (ok, out) = weir_check(&path);
        assert!(!ok, "{file} passed the check: {out}");
        assert!(out.contains("certificates.site.ocsp") && out.contains(reason), "{out}");
        let (status, report) = admin_request(&admin, "POST", "/api/reload", None, "").await;
        assert_eq!(status, 422, "{report}");
        assert!(report.contains(reason), "{report}");
        let out = s_client_status(public, "ocsp.test", &ca.path("ca.pem")).await;
        assert!(out.contains("Cert Status: good"), "after a reload to {file}: {out}");
    }
    weir.child.kill().await.expect("stop");
}
