//! The dashboard in a real headless browser (Debian's chromium, driven by
//! chromedriver over WebDriver): what it shows matches the admin API, it
//! follows a server going down without a reload, a server removed through
//! it gets no more connections, a wrong token changes nothing, a plugin's
//! reason with markup in it is shown as text. Screenshots of each section
//! are saved under `target/test-output/dashboard/`.

use std::path::PathBuf;

use fantoccini::Locator;
use weir_tests::browser::Browser;
use weir_tests::{Pki, Upstream, WeirProcess, admin_request, answer_with, tls_exchange, toml_path, write_config};

const TOKEN: &str = "dashboard-token";

fn output_dir() -> PathBuf {
    let dir = weir_tests::workspace().join("target/test-output/dashboard");
    std::fs::create_dir_all(&dir).expect("output dir");
    dir
}

async fn api(admin: &str, path: &str) -> serde_json::Value {
    let (status, body) = admin_request(admin, "GET", path, Some(TOKEN), "").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_gateway_and_acts_on_its_pools() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("dashboard test CA");
    let (cert, key) = pki.server(&["app.test"]).write(dir.path(), "site");
    let servers = [
        Upstream::tcp(|s| answer_with(s, " (a)".into())).await,
        Upstream::tcp(|s| answer_with(s, " (b)".into())).await,
        Upstream::tcp(|s| answer_with(s, " (c)".into())).await,
    ];
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["router"]

            [plugins.router]
            wasm = "{{static_router}}"
            config.routes."app.test" = {{ pool = "p", terminate = {{ certificate = "site" }} }}
            config.routes."evil.test" = {{ reject = "<b id=\"injected\">x</b><script>window.pwned = 1</script>" }}

            [pools.p]
            servers = ["{}", "{}", "{}"]
            health = {{ interval = "200ms", timeout = "200ms", rise = 1, fall = 2 }}

            [certificates.site]
            cert = {cert}
            key = {key}

            [admin]
            bind = "127.0.0.1:0"
            token = "{TOKEN}"
            "#,
            addrs[0],
            addrs[1],
            addrs[2],
            cert = toml_path(&cert),
            key = toml_path(&key),
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let admin = weir.admin_addr().await;
    let public = weir.addr("public");
    let client = pki.client_config();
    for n in 0..6 {
        let reply = tls_exchange(public, "app.test", std::sync::Arc::clone(&client), &format!("hi {n}")).await;
        assert!(reply.expect("served").starts_with(&format!("upstream heard: hi {n}")));
    }

    // The page asks for the token; a wrong one is refused and shows nothing.
    let browser = Browser::open(1400, 1550, &format!("http://{admin}/"), "#token-form:not([hidden])").await;
    browser.type_into("#token-input", "wrong").await;
    browser.click("#token-form button").await;
    browser
        .wait_for_text("the refusal", "#banner", |t| t.contains("The token was refused (401)"))
        .await;
    let shown = browser.text("#route-table tbody").await.unwrap_or_default();
    assert_eq!(shown, "", "data shown without the token");
    browser.type_into("#token-input", TOKEN).await;
    browser.click("#token-form button").await;

    // The route table, pool health and certificate expiry match the API.
    let (_, metrics) = admin_request(&admin, "GET", "/metrics", Some(TOKEN), "").await;
    let total: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("weir_connections_total{") && l.contains(r#"route="app.test""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, 6, "{metrics}");
    let route = r#"#route-table tr[data-route="app.test"] td.total"#;
    browser.wait_for_text("the route table", route, |t| t == "6").await;
    let up: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("weir_route_bytes_total{") && l.contains(r#"route="app.test""#))
        .filter(|l| l.contains(r#"direction="up""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(up > 0, "{metrics}");
    let bytes = browser.text(r#"#route-table tr[data-route="app.test"] td.bytes"#).await;
    assert!(
        bytes.as_deref().is_some_and(|b| b.starts_with(&format!("{up} B / "))),
        "{bytes:?}, {up} up"
    );
    // A connection held open is counted on its route while it lasts.
    let mut held = weir_tests::tls_connect(public, "app.test", std::sync::Arc::clone(&client))
        .await
        .expect("held connection");
    let active = r#"#route-table tr[data-route="app.test"] td.active"#;
    browser.wait_for_text("the held connection", active, |t| t == "1").await;
    let (_, metrics) = admin_request(&admin, "GET", "/metrics", Some(TOKEN), "").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("weir_route_connections_active{")
            && l.contains(r#"route="app.test""#)
            && l.ends_with(" 1")),
        "{metrics}"
    );
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        held.write_all(b"bye\n").await.expect("write");
        let mut reply = String::new();
        held.read_to_string(&mut reply).await.ok();
        assert!(reply.starts_with("upstream heard: bye"), "{reply:?}");
    }
    drop(held);
    browser
        .wait_for_text("the held connection ended", active, |t| t == "0")
        .await;

    let state = |address: &str| format!(r#"div[data-pool="p"] tr[data-server="{address}"] td.state"#);
    let pools = api(&admin, "/api/pools").await;
    for backend in pools["pools"]["p"]["backends"].as_array().expect("backends") {
        let expected = if backend["healthy"] == true { "up" } else { "down" };
        let css = state(backend["address"].as_str().expect("address"));
        browser
            .wait_for_text("the pool's health", &css, |t| t == expected)
            .await;
    }
    let certificates = api(&admin, "/api/certificates").await;
    let not_after = certificates["certificates"][0]["not_after"]
        .as_u64()
        .expect("not_after");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let days = format!("({} days)", (not_after - now) / 86_400);
    let expiry = browser.text(r#"tr[data-certificate="site"] td.expiry"#).await;
    assert!(
        expiry.as_deref().is_some_and(|e| e.ends_with(&days)),
        "{expiry:?} vs {days}"
    );

    let shots = output_dir();
    for section in ["overview", "routes", "plugins", "pools", "tenants", "certificates"] {
        let element = browser.client.find(Locator::Id(section)).await.expect("section");
        let png = element.screenshot().await.expect("screenshot");
        std::fs::write(shots.join(format!("{section}.png")), png).expect("save");
    }
    let page = browser.client.screenshot().await.expect("screenshot");
    std::fs::write(shots.join("page-serving.png"), page).expect("save");

    // A server that dies turns down on the page, without a reload.
    let [a, b, c] = servers;
    let dead = c.addr.to_string();
    drop(c);
    browser
        .wait_for_text("the dead server shown down", &state(&dead), |t| t == "down")
        .await;
    let pools = api(&admin, "/api/pools").await;
    let since = pools["pools"]["p"]["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["address"] == dead.as_str()))
        .and_then(|b| b["since"].as_u64())
        .expect("since");
    assert!(since >= now, "{pools}");
    let css = format!(r#"div[data-pool="p"] tr[data-server="{dead}"] td.since"#);
    browser
        .wait_for_text("when it went down", &css, |t| t.ends_with(" UTC"))
        .await;

    // A wrong token in the tab: an action is refused, and changes nothing.
    let set_token = |token: &str| format!("sessionStorage.setItem('weir-admin-token', '{token}')");
    browser
        .client
        .execute(&set_token("wrong"), vec![])
        .await
        .expect("script");
    let row = format!(r#"div[data-pool="p"] tr[data-server="{}"]"#, a.addr);
    browser.click(&format!("{row} button")).await;
    browser.client.accept_alert().await.expect("the confirmation");
    browser
        .wait_for_text("the refused action", "#banner", |t| t.contains("refused (401)"))
        .await;
    let pools = api(&admin, "/api/pools").await;
    let backends = pools["pools"]["p"]["backends"].as_array().expect("backends");
    assert!(backends.iter().all(|b| b["draining"] == false), "{pools}");
    browser.client.execute(&set_token(TOKEN), vec![]).await.expect("script");

    // Remove a server through the page: the next connections avoid it.
    let remove = format!("{row} button.danger");
    browser.eventually("the remove button", || browser.has(&remove)).await;
    browser.click(&remove).await;
    browser.client.accept_alert().await.expect("the confirmation");
    browser
        .eventually("the removed server gone from the page", || async {
            !browser.has(&row).await
        })
        .await;
    let before = a.accepted();
    for n in 0..4 {
        let reply = tls_exchange(
            public,
            "app.test",
            std::sync::Arc::clone(&client),
            &format!("after {n}"),
        )
        .await;
        assert_eq!(reply.expect("served"), format!("upstream heard: after {n} (b)\n"));
    }
    assert_eq!(a.accepted(), before, "a removed server got connections");

    // Add a server through the page: a bad address is refused and said,
    // a good one is up on the page and takes connections.
    browser.type_into("#add-address", "not an address").await;
    browser.click("#add-server-form button").await;
    browser.client.accept_alert().await.expect("the confirmation");
    browser
        .wait_for_text("the refused address", "#banner", |t| {
            t.contains("POST /api/pools/p/backends") && t.contains("`not an address` is not host:port")
        })
        .await;
    let pools = api(&admin, "/api/pools").await;
    assert_eq!(
        pools["pools"]["p"]["backends"].as_array().map(Vec::len),
        Some(2),
        "{pools}"
    );
    let d = Upstream::tcp(|s| answer_with(s, " (d)".into())).await;
    browser
        .client
        .find(Locator::Css("#add-address"))
        .await
        .expect("input")
        .clear()
        .await
        .expect("clear");
    browser.type_into("#add-address", &d.addr.to_string()).await;
    browser.click("#add-server-form button").await;
    browser.client.accept_alert().await.expect("the confirmation");
    browser
        .wait_for_text("the added server up", &state(&d.addr.to_string()), |t| t == "up")
        .await;
    for n in 0..4 {
        let reply = tls_exchange(
            public,
            "app.test",
            std::sync::Arc::clone(&client),
            &format!("added {n}"),
        )
        .await;
        assert!(
            reply
                .expect("served")
                .starts_with(&format!("upstream heard: added {n}"))
        );
    }
    assert!(d.accepted() > 0, "the added server got no connection");
    drop((b, d));

    // A plugin's reason with markup in it is text, never markup.
    browser.type_into("#route-sni", "evil.test").await;
    browser.click("#route-form button").await;
    let markup = r#"<b id=\"injected\">x</b><script>"#;
    browser
        .wait_for_text("the explanation", "#route-explanation", |t| t.contains(markup))
        .await;
    assert!(!browser.has("#injected").await, "the reason was parsed as HTML");
    let pwned = browser
        .client
        .execute("return window.pwned === undefined", vec![])
        .await;
    assert_eq!(
        pwned.expect("script"),
        serde_json::json!(true),
        "the reason's script ran"
    );
    let element = browser.client.find(Locator::Id("try")).await.expect("section");
    std::fs::write(shots.join("try.png"), element.screenshot().await.expect("screenshot")).expect("save");
    std::fs::write(
        shots.join("page.png"),
        browser.client.screenshot().await.expect("screenshot"),
    )
    .expect("save");

    // The page comes with a policy that forbids inline scripts and framing.
    let (status, headers) = head(&admin).await;
    assert_eq!(status, 200);
    assert!(
        headers.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{headers}"
    );
    assert!(
        headers.contains("x-frame-options: DENY") && headers.contains("x-content-type-options: nosniff"),
        "{headers}"
    );
    browser.client.clone().close().await.expect("close the session");
    weir.child.kill().await.expect("stop");
}

/// The status and headers (names lower-cased) of `GET /`.
async fn head(admin: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(admin).await.expect("connect");
    let request = format!("GET / HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1)?.parse().ok())
        .unwrap_or(0);
    let headers: Vec<String> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            format!("{}: {}", name.to_ascii_lowercase(), value.trim())
        })
        .collect();
    (status, headers.join("\n"))
}

/// In fleet mode the page lists the nodes holding a lease with the revision
/// each applied, shows a revision a node refused with its error, and drops
/// a node that is killed once its lease runs out — all without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_its_revisions_errors_and_liveness() {
    use super::fleet::{gateway_config, node_file, publish, write};
    let etcd = weir_tests::etcd::Etcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::tcp(weir_tests::echo).await;
    let config = write(dir.path(), "weir.toml", &gateway_config(&[upstream.addr.to_string()]));
    assert!(publish(&config, &etcd.endpoints(), false).status.success());
    let mut a = WeirProcess::spawn_node(&node_file(dir.path(), "a", &etcd.endpoints(), ""), 1).await;
    let mut b = WeirProcess::spawn_node(&node_file(dir.path(), "b", &etcd.endpoints(), ""), 1).await;
    let admin = a.admin_addr().await;
    let fleet = |admin: String| async move {
        let (status, body) = admin_request(&admin, "GET", "/api/fleet", None, "").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")
    };

    let browser = Browser::open(1400, 900, &format!("http://{admin}/"), "#fleet:not([hidden])").await;
    for node in ["a", "b"] {
        let css = format!(r#"#fleet-table tr[data-node="{node}"] td.serving"#);
        browser.wait_for_text("each node listed", &css, |t| t == "etcd").await;
    }
    let status = fleet(admin.clone()).await;
    let revision = status["nodes"]["a"]["revision"].as_i64().expect("revision");
    assert!(revision > 0, "{status}");
    let css = r#"#fleet-table tr[data-node="a"] td.revision"#;
    browser
        .wait_for_text("the applied revision", css, |t| t == revision.to_string())
        .await;
    browser
        .wait_for_text("a current", r#"#fleet-table tr[data-node="a"] td.current"#, |t| {
            t == "current"
        })
        .await;
    browser
        .wait_for_text("the config in use", "#overview-list", |t| {
            t.contains(&format!("etcd revision {revision}"))
        })
        .await;

    // A revision the nodes cannot read: each says so, and still serves.
    let put = etcd.etcdctl(&["put", "/weir/config", "not json", "-w", "json"]);
    let put: serde_json::Value = serde_json::from_slice(&put.stdout).expect("etcdctl's JSON");
    let bad = put["header"]["revision"].as_i64().expect("the put's revision");
    let css = r#"#fleet-table tr[data-node="b"] td.error"#;
    // The revision refused is the put's own, whatever reports were written
    // meanwhile.
    let refused_at = |t: &str| {
        t.strip_suffix(')')
            .and_then(|t| t.rsplit_once("(revision "))
            .and_then(|(_, n)| n.parse::<i64>().ok())
    };
    browser
        .wait_for_text("b's error", css, |t| {
            t.contains("etcd key /weir/config") && refused_at(t) == Some(bad)
        })
        .await;
    let css = r#"#fleet-table tr[data-node="b"] td.revision"#;
    let served = browser.text(css).await.and_then(|t| t.parse::<i64>().ok());
    assert!(served.is_some_and(|r| r < bad), "{served:?} vs the bad {bad}");
    let behind = format!("behind (fleet at {bad})");
    browser
        .wait_for_text(
            "b behind the bad revision",
            r#"#fleet-table tr[data-node="b"] td.current"#,
            |t| t == behind,
        )
        .await;
    let element = browser.client.find(Locator::Id("fleet")).await.expect("section");
    std::fs::write(
        output_dir().join("fleet.png"),
        element.screenshot().await.expect("screenshot"),
    )
    .expect("save");

    // A killed node leaves the table once its lease (2 s) runs out.
    b.child.start_kill().expect("SIGKILL");
    let _ = b.child.wait().await;
    browser
        .eventually("the killed node gone", || async {
            !browser.has(r#"#fleet-table tr[data-node="b"]"#).await
        })
        .await;
    assert!(browser.has(r#"#fleet-table tr[data-node="a"]"#).await);
    browser.client.clone().close().await.expect("close the session");
    drop(a);
}
