//! Mutual RA-TLS end to end: clients and upstreams with (simulated) RA-TLS
//! certificates, admitted or refused by the attestation-allowlist plugin on
//! their MRTD, with the failing measurement in the log; dstack app
//! certificates admitted on the app-info measurements weir checked.

use std::sync::Arc;

use weir_attest::simulate::{self, App};
use weir_tests::{
    Pki, Upstream, WeirProcess, answer, plugin_current, plugin_v0_2, simulated_dstack_ratls, simulated_ratls,
    simulated_ratls_with, tls_exchange, toml_path, write_config,
};

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

/// A dstack app as its guest agent would describe it.
fn app(compose: u8) -> App {
    App {
        app_id: vec![0xa1; 20],
        compose_hash: vec![compose; 32],
        instance_id: vec![0x1d; 20],
        os_image_hash: vec![0x05; 32],
        key_provider: br#"{"type":"kms","id":"30"}"#.to_vec(),
    }
}

/// `mr_aggregated` as weir reads it from a certificate's app-info.
fn mr_aggregated(identity: &weir_tests::Identity) -> Vec<u8> {
    let ratls = weir_attest::RaTls::from_certificate(&identity.chain[0]).expect("RA-TLS");
    assert!(ratls.app_info_checked, "a simulated dstack certificate replays");
    ratls.app_info.expect("app-info").mr_aggregated.into_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dstack_apps_are_admitted_by_their_checked_app_info() {
    let dir = tempfile::tempdir().expect("temp dir");
    let site_pki = Pki::new("weir site CA");
    let mrtd = [0x11u8; 48];
    let allowed = simulated_dstack_ratls("client", mrtd, &app(0xc1));
    // The same TD running another compose file: same MRTD, another RTMR3,
    // so another mr_aggregated.
    let other = simulated_dstack_ratls("client", mrtd, &app(0xc2));
    assert_ne!(mr_aggregated(&allowed), mr_aggregated(&other));
    let upstream = Upstream::tcp(answer).await;
    let (cert, key) = site_pki.server(&["*.tee.test"]).write(dir.path(), "site");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.now]
            bind = "127.0.0.1:0"
            plugins = ["router", "allow"]

            [listeners.older]
            bind = "127.0.0.1:0"
            plugins = ["router", "allow_0_2"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."in.tee.test" = {{ address = "{upstream}", terminate = {{ client_auth = "attested" }} }}

            # mr_aggregated and instance_id rules are weir:plugin@0.3.0's.
            [plugins.allow]
            wasm = {allow}
            config = {{ require_verified = false, rules = [ {{ mr_aggregated = ["{aggregated}"], instance_id = ["{instance}"] }} ] }}

            # A weir:plugin@0.2.0 build: its contract has no app-info, and
            # a certificate carrying one is admitted on what it does have.
            [plugins.allow_0_2]
            wasm = {allow_0_2}
            config = {{ require_verified = false, rules = [ {{ mrtd = ["{mrtd}"] }} ] }}

            [certificates.site]
            cert = {cert:?}
            key = {key:?}
            "#,
            upstream = upstream.addr,
            aggregated = hex(&mr_aggregated(&allowed)),
            instance = hex(&app(0xc1).instance_id),
            allow = toml_path(&plugin_current("attestation-allowlist")),
            allow_0_2 = toml_path(&plugin_v0_2("attestation-allowlist")),
            mrtd = hex(&mrtd),
            cert = cert.display().to_string(),
            key = key.display().to_string(),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;

    let reply = tls_exchange(
        weir.addr("now"),
        "in.tee.test",
        site_pki.client_config_with(&allowed),
        "from the app",
    )
    .await;
    assert_eq!(reply.expect("allowed app served"), "upstream heard: from the app\n");
    assert!(weir.connection_line().await.contains("outcome=closed"));

    let reply = tls_exchange(
        weir.addr("now"),
        "in.tee.test",
        site_pki.client_config_with(&other),
        "let me in",
    )
    .await;
    assert!(
        reply.as_ref().is_err_and(|e| e.to_string().contains("AccessDenied")),
        "{reply:?}"
    );
    let line = weir.connection_line().await;
    assert!(
        line.contains(&format!("mr_aggregated {} is not allowed", hex(&mr_aggregated(&other)))),
        "{line}"
    );

    // A certificate whose app-info claims another compose file than its
    // event log measured is refused before any plugin sees it, with the
    // claim that failed.
    let liar = simulated_ratls_with("client", mrtd, |quote| {
        let (attestation, _) = app(0xc1).extensions(quote).expect("extensions");
        let (_, claimed) = app(0xc2).extensions(&mut quote.to_vec()).expect("extensions");
        vec![
            (simulate::ATTESTATION_OID_ARCS, attestation),
            (simulate::APP_INFO_OID_ARCS, claimed),
        ]
    });
    let reply = tls_exchange(
        weir.addr("now"),
        "in.tee.test",
        site_pki.client_config_with(&liar),
        "trust me",
    )
    .await;
    assert!(reply.is_err(), "{reply:?}");
    let line = weir.connection_line().await;
    assert!(
        line.contains("compose-hash") && line.contains(&hex(&[0xc2; 32])),
        "{line}"
    );

    // The 0.2.0 build admits the other app on its MRTD, which it shares.
    let reply = tls_exchange(
        weir.addr("older"),
        "in.tee.test",
        site_pki.client_config_with(&other),
        "hello",
    )
    .await;
    assert_eq!(reply.expect("admitted on MRTD"), "upstream heard: hello\n");
    assert!(weir.connection_line().await.contains("outcome=closed"));
    assert_eq!(upstream.accepted(), 2);
}
