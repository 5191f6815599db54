//! Shadow rollouts: a candidate plugin (`shadow_of`) decides beside the live
//! one, off the connections' path. A candidate that disagrees on one route is
//! counted and sampled for exactly that route; a trapping or looping candidate
//! changes nothing for clients; `weir route --explain` shows both decisions.

use std::time::{Duration, Instant};

use weir_tests::{Pki, STEP, Upstream, WeirProcess, answer, metric, run_weir, text, tls_exchange, write_config};

/// The value of `series` once it reaches `want` (the shadow calls finish
/// after their connections), or what it was when STEP ran out.
async fn metric_reaching(admin: &str, series: &str, want: f64) -> Option<f64> {
    let started = Instant::now();
    loop {
        let value = metric(admin, series).await;
        if value == Some(want) || started.elapsed() > STEP {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_plugin_is_compared_with_the_live_one_and_never_decides() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("upstream CA");
    let app = Upstream::tls(&pki.server(&["a.test", "b.test"]), answer).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["live"]

            [plugins.live]
            wasm = "{{static_router}}"
            config.routes."a.test" = {{ pool = "app" }}
            config.routes."b.test" = {{ pool = "app" }}

            # Agrees on a.test, sends b.test elsewhere.
            [plugins.candidate]
            wasm = "{{static_router}}"
            shadow_of = "live"
            config.routes."a.test" = {{ pool = "app" }}
            config.routes."b.test" = {{ pool = "elsewhere" }}

            [plugins.trapper]
            wasm = "{{misbehave}}"
            shadow_of = "live"
            config = {{ mode = "trap" }}

            [plugins.looper]
            wasm = "{{misbehave}}"
            shadow_of = "live"
            timeout = "5ms"
            config = {{ mode = "loop" }}

            [pools.app]
            servers = ["{app}"]

            [admin]
            bind = "127.0.0.1:0"
            "#,
            app = app.addr,
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let addr = weir.addr("public");
    for sni in ["a.test", "a.test", "b.test"] {
        let reply = tls_exchange(addr, sni, pki.client_config(), "hi").await;
        assert_eq!(
            reply.expect("served by the live decision"),
            "upstream heard: hi\n",
            "{sni}"
        );
    }
    let series = |plugin: &str, result: &str| {
        format!(r#"weir_shadow_decisions_total{{plugin="{plugin}",live="live",result="{result}"}}"#)
    };
    assert_eq!(
        metric_reaching(&admin, &series("candidate", "agreed"), 2.0).await,
        Some(2.0)
    );
    assert_eq!(
        metric_reaching(&admin, &series("candidate", "disagreed"), 1.0).await,
        Some(1.0)
    );
    let disagreed =
        |route: &str| format!(r#"weir_shadow_disagreements_total{{plugin="candidate",live="live",route="{route}"}}"#);
    assert_eq!(metric(&admin, &disagreed("b.test")).await, Some(1.0));
    assert_eq!(
        metric(&admin, &disagreed("a.test")).await,
        None,
        "no disagreement on a.test"
    );
    assert_eq!(
        metric_reaching(&admin, &series("trapper", "failed"), 3.0).await,
        Some(3.0)
    );
    assert_eq!(
        metric_reaching(&admin, &series("looper", "failed"), 3.0).await,
        Some(3.0)
    );
    let sample = weir.line_containing("shadow plugin decided otherwise").await;
    for fact in [
        r#"plugin="candidate""#,
        r#"sni="b.test""#,
        r#"\"elsewhere\""#,
        r#"\"app\""#,
    ] {
        assert!(sample.contains(fact), "{fact} in {sample}");
    }

    let explain = run_weir(&[
        "route",
        "--config",
        &config.display().to_string(),
        "--listener",
        "public",
        "--sni",
        "b.test",
        "--explain",
    ]);
    let said = text(&explain.stdout);
    assert!(explain.status.success(), "{said}{}", text(&explain.stderr));
    assert!(
        said.contains("shadow: plugin `candidate` (shadow_of `live`) disagreed"),
        "{said}"
    );
    assert!(
        said.contains("shadow: plugin `trapper` (shadow_of `live`) failed"),
        "{said}"
    );
    assert!(
        said.contains("decision: pass through untouched to pool `app`"),
        "{said}"
    );
}

#[test]
fn a_shadow_in_a_chain_or_of_nothing_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let check = |extra: &str, chain: &str| {
        let config = write_config(
            dir.path(),
            &format!(
                r#"
                [listeners.public]
                bind = "127.0.0.1:0"
                plugins = [{chain}]

                [plugins.live]
                wasm = "{{static_router}}"

                [plugins.candidate]
                wasm = "{{static_router}}"
                {extra}
                "#
            ),
        );
        let out = run_weir(&["check", "--config", &config.display().to_string()]);
        (
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        )
    };
    let (ok, out) = check(r#"shadow_of = "gone""#, r#""live""#);
    assert!(
        !ok && out.contains("plugins.candidate.shadow_of") && out.contains("no plugin named `gone`"),
        "{out}"
    );
    let (ok, out) = check(r#"shadow_of = "live""#, r#""live", "candidate""#);
    assert!(!ok && out.contains("take it out of the chains"), "{out}");
    let (ok, out) = check(r#"shadow_of = "live""#, r#""live""#);
    assert!(ok, "{out}");
}
