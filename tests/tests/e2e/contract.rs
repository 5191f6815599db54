//! The plugin contract's versions and capabilities: `weir:plugin@0.1.0`,
//! 0.2.0 and 0.3.0 builds of static-router serve side by side in one
//! gateway; a component importing a capability its section does not grant,
//! or a tenant's plugin granted one its tenant may not give, is refused
//! with the line to change.

use weir_tests::{
    Upstream, WeirProcess, admin_request, answer, plugin_v0_1, plugin_v0_2, run_weir, text, toml_path, write_config,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_of_every_contract_serve_side_by_side() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(answer).await;
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.old]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["old"]

            [listeners.mid]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["mid"]

            [listeners.new]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["new"]

            [plugins.old]
            wasm = {old}
            config.no_sni = {{ address = "{upstream}" }}

            [plugins.mid]
            wasm = {mid}
            config.no_sni = {{ address = "{upstream}" }}

            [plugins.new]
            wasm = "{{static_router}}"
            config.no_sni = {{ address = "{upstream}" }}

            [admin]
            bind = "127.0.0.1:0"
            "#,
            old = toml_path(&plugin_v0_1("static-router")),
            mid = toml_path(&plugin_v0_2("static-router")),
            upstream = upstream.addr,
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    for listener in ["old", "mid", "new"] {
        let mut stream = tokio::net::TcpStream::connect(weir.addr(listener))
            .await
            .expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"hello\n")
            .await
            .expect("write");
        let mut reply = String::new();
        let _ = tokio::time::timeout(
            weir_tests::STEP,
            tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut reply),
        )
        .await;
        assert_eq!(reply, "upstream heard: hello\n", "through the {listener} plugin");
        drop(stream);
        let line = weir.connection_line().await;
        assert!(line.contains(r#"route="no_sni""#), "{line}");
        // The 0.1.0 plugin gets the addresses as strings, the others
        // typed: both see the same client (the log line says the host's).
        assert!(line.contains("client=127.0.0.1:"), "{line}");
    }
    let (status, body) = admin_request(&admin, "GET", "/api/plugins", None, "").await;
    assert_eq!(status, 200, "{body}");
    let plugins: serde_json::Value = serde_json::from_str(&body).expect("json");
    let contract = |name: &str| {
        plugins["plugins"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == name))
            .map(|p| p["contract"].clone())
    };
    assert_eq!(contract("old"), Some("0.1.0".into()), "{body}");
    assert_eq!(contract("mid"), Some("0.2.0".into()), "{body}");
    assert_eq!(contract("new"), Some("0.3.0".into()), "{body}");
}

fn check(dir: &std::path::Path, toml: &str) -> (bool, String) {
    let config = write_config(dir, toml);
    let out = run_weir(&["check", "--config", &config.display().to_string()]);
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

#[test]
fn a_capability_not_granted_is_refused_with_the_line_to_add() {
    let dir = tempfile::tempdir().expect("temp dir");
    let limiter = |grants: &str| {
        format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["limiter"]

            [plugins.limiter]
            wasm = "{{rate_limit}}"
            {grants}
            config = {{ limit = 3 }}
            "#
        )
    };
    let (ok, out) = check(dir.path(), &limiter(""));
    assert!(!ok, "{out}");
    assert!(
        out.contains("imports `weir:plugin/counters@0.3.0` and `weir:plugin/metrics@0.3.0`"),
        "{out}"
    );
    assert!(
        out.contains(r#"add `grants = ["counters", "metrics"]` to [plugins.limiter]"#),
        "{out}"
    );
    let (ok, out) = check(dir.path(), &limiter(r#"grants = ["counters"]"#));
    assert!(
        !ok && out.contains(r#"add `grants = ["counters", "metrics"]`"#),
        "{out}"
    );
    let (ok, out) = check(dir.path(), &limiter(r#"grants = ["counters", "metrics"]"#));
    assert!(ok, "{out}");
    // A grant the host does not know.
    let (ok, out) = check(dir.path(), &limiter(r#"grants = ["sockets"]"#));
    assert!(!ok && out.contains("unknown variant `sockets`"), "{out}");
    // Granting more than the component imports is allowed (the 0.1.0 build
    // imports none).
    let (ok, out) = check(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            protocol = "plain"
            plugins = ["old"]

            [plugins.old]
            wasm = {old}
            grants = ["counters"]
            config.no_sni = {{ address = "127.0.0.1:1" }}
            "#,
            old = toml_path(&plugin_v0_1("static-router")),
        ),
    );
    assert!(ok, "{out}");
}

#[test]
fn a_tenant_plugin_may_be_granted_only_what_its_tenant_may_give() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tenant = |tenant_grants: &str| {
        format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["edge"]

            [plugins.edge]
            wasm = "{{static_router}}"
            config.default = {{ reject = "no tenant owns this name" }}

            [tenants.acme]
            domains = ["acme.test"]
            plugins = ["acme-dstack"]
            {tenant_grants}

            [plugins.acme-dstack]
            wasm = "{{dstack_router}}"
            grants = ["dns"]
            config.dns_custom_domains = true
            "#
        )
    };
    let (ok, out) = check(dir.path(), &tenant(""));
    assert!(!ok, "{out}");
    assert!(
        out.contains("plugins.acme-dstack.grants")
            && out.contains("`dns` is not among the grants tenant `acme` may give its plugins"),
        "{out}"
    );
    let (ok, out) = check(dir.path(), &tenant(r#"grants = ["dns"]"#));
    assert!(ok, "{out}");
}
