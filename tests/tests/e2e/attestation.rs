//! Mutual RA-TLS end to end: clients and upstreams with (simulated) RA-TLS
//! certificates, admitted or refused by the attestation-allowlist plugin on
//! their MRTD, with the failing measurement in the log.

use std::sync::Arc;

use weir_tests::{Pki, Upstream, WeirProcess, answer, simulated_ratls, tls_exchange, write_config};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_admitted_by_their_measurements() {
    let dir = tempfile::tempdir().expect("temp dir");
    let site_pki = Pki::new("weir site CA");
    let allowed = [0x11u8; 48];
    let other = [0x22u8; 48];
    let plain = Upstream::tcp(answer).await;
    let good_tee = Upstream::tls(&simulated_ratls("good.tee", allowed), answer).await;
    let bad_tee = Upstream::tls(&simulated_ratls("bad.tee", other), answer).await;
    let (cert, key) = site_pki.server(&["*.tee.test"]).write(dir.path(), "site");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router", "allow"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."in.tee.test" = {{ address = "{plain}", terminate = {{ client_auth = "attested" }} }}
            config.routes."good.tee.test" = {{ address = "{good}", terminate = {{ reencrypt = {{ attested = true }} }} }}
            config.routes."bad.tee.test" = {{ address = "{bad}", terminate = {{ reencrypt = {{ attested = true }} }} }}

            [plugins.allow]
            wasm = "{{attestation_allowlist}}"
            # Simulated quotes bind their keys but do not verify.
            config = {{ require_verified = false, rules = [ {{ mrtd = ["{allowed}"] }} ] }}

            [certificates.site]
            cert = {cert:?}
            key = {key:?}
            "#,
            plain = plain.addr,
            good = good_tee.addr,
            bad = bad_tee.addr,
            allowed = hex(&allowed),
            cert = cert.display().to_string(),
            key = key.display().to_string(),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");

    // A client whose attested MRTD is allowed is served.
    let client = site_pki.client_config_with(&simulated_ratls("client", allowed));
    let reply = tls_exchange(addr, "in.tee.test", client, "attested hello").await;
    assert_eq!(reply.expect("allowed TD served"), "upstream heard: attested hello\n");
    assert!(weir.connection_line().await.contains("outcome=closed"));

    // One whose MRTD is not: refused in the handshake, the log names it.
    let client = site_pki.client_config_with(&simulated_ratls("client", other));
    let reply = tls_exchange(addr, "in.tee.test", client, "let me in").await;
    assert!(
        reply.as_ref().is_err_and(|e| e.to_string().contains("AccessDenied")),
        "{reply:?}"
    );
    let line = weir.connection_line().await;
    assert!(
        line.contains("denied") && line.contains(&format!("MRTD {} is not allowed", hex(&other))),
        "{line}"
    );

    // A client certificate without an attestation is not an RA-TLS one.
    let ordinary = site_pki.client_config_with(&Pki::new("some CA").client("ordinary"));
    let reply = tls_exchange(addr, "in.tee.test", ordinary, "hi").await;
    assert!(reply.as_deref().unwrap_or_default().is_empty(), "{reply:?}");
    let line = weir.connection_line().await;
    assert!(line.contains("carries no RA-TLS attestation"), "{line}");
    assert_eq!(plain.accepted(), 1);

    // Upstreams: the allowed one is reached, the other refused after its handshake.
    let reply = tls_exchange(addr, "good.tee.test", site_pki.client_config(), "to the TD").await;
    assert_eq!(reply.expect("allowed upstream"), "upstream heard: to the TD\n");
    assert!(weir.connection_line().await.contains(r#"mode="reencrypt""#));
    let reply = tls_exchange(addr, "bad.tee.test", Arc::clone(&site_pki.client_config()), "x").await;
    assert!(reply.as_deref().unwrap_or_default().is_empty(), "{reply:?}");
    let line = weir.connection_line().await;
    assert!(
        line.contains("upstream: plugin `allow` denied")
            && line.contains(&format!("MRTD {} is not allowed", hex(&other))),
        "{line}"
    );
}
