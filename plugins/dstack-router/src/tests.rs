use weir_plugin_sdk::{Action, After, Upstream};

use super::*;

const APP: &str = "3327603e03f5bd1f830812ca4a789277fc31f577";
const CONFIG: &str = r#"{
    "base_domains": {
        "dstack.example.com": { "certificate": "wild" },
        "example.com": { "certificate": "apex-wild" }
    },
    "apps": {
        "3327603e03f5bd1f830812ca4a789277fc31f577": {
            "instances": { "inst1": "10.0.3.7", "inst2": "10.0.3.8", "inst3": "fd00::9" }
        },
        "solo": { "instances": { "solo1": "solo.internal" } },
        "pooled": { "pool": "pooled-app", "instances": { "pinned1": "10.0.9.1" } }
    },
    "custom_domains": { "shop.example.org": "3327603e03f5bd1f830812ca4a789277fc31f577:8443", "pinned.example.org": "inst2:443" },
    "reserved": ["health", "admin"]
}"#;

fn router() -> DstackRouter {
    let mut router = DstackRouter::default();
    router.configure(CONFIG).expect("valid config");
    router
}

fn route(router: &DstackRouter, sni: &str) -> Decision {
    router.route(&Connection::for_test(Some(sni), &[]))
}

/// What a decision does, in one comparable line.
fn summary(decision: &Decision) -> String {
    let target = |t: &Target| match &t.upstream {
        Upstream::Address(a) => a.clone(),
        Upstream::Pool(p) => format!("pool {p}"),
    };
    match &decision.action {
        Action::Next => "next".into(),
        Action::Originate(o) => format!("originate {} {}", decision.route, target(&o.target)),
        Action::Reject(reason) => format!("reject {} ({reason})", decision.route),
        Action::Passthrough(t) => format!("passthrough {} {}", decision.route, target(t)),
        Action::Terminate(t) => {
            let After::Plain(to) = &t.then else {
                return "reencrypt".into();
            };
            format!(
                "terminate {} {} cert={} alpn={:?}",
                decision.route,
                target(to),
                t.certificate.as_deref().unwrap_or("-"),
                t.alpn
            )
        }
    }
}

#[test]
fn the_grammar_as_a_table() {
    let r = router();
    let solo = "solo.internal";
    let cases: Vec<(String, String)> = vec![
        // <id>: terminate, port 80, listener ALPN.
        ("solo.dstack.example.com".into(), format!("terminate solo-80 {solo}:80 cert=wild alpn=[]")),
        ("solo-.dstack.example.com".into(), format!("terminate solo-80 {solo}:80 cert=wild alpn=[]")),
        ("solo-8080.dstack.example.com".into(), format!("terminate solo-8080 {solo}:8080 cert=wild alpn=[]")),
        // s: passthrough, port 443 by default.
        ("solo-s.dstack.example.com".into(), format!("passthrough solo-443s {solo}:443")),
        ("solo-8443s.dstack.example.com".into(), format!("passthrough solo-8443s {solo}:8443")),
        // g: terminate with ALPN h2 only, port 80 by default.
        ("solo-g.dstack.example.com".into(), format!("terminate solo-80g {solo}:80 cert=wild alpn=[\"h2\"]")),
        ("solo-50051g.dstack.example.com".into(), format!("terminate solo-50051g {solo}:50051 cert=wild alpn=[\"h2\"]")),
        // An instance id pins its instance.
        ("inst2-8443s.dstack.example.com".into(), "passthrough inst2-8443s 10.0.3.8:8443".into()),
        ("inst3-22s.dstack.example.com".into(), "passthrough inst3-22s [fd00::9]:22".into()),
        // The other base domain uses its own certificate.
        ("solo-8080.example.com".into(), format!("terminate solo-8080 {solo}:8080 cert=apex-wild alpn=[]")),
        // Invalid names under a base domain: rejected, saying why.
        ("solo-8080sg.dstack.example.com".into(), "reject invalid.dstack.example.com (`solo-8080sg`: `sg` combines `s` (passthrough) and `g` (gRPC); choose one)".into()),
        ("solo-gs.dstack.example.com".into(), "reject invalid.dstack.example.com (`solo-gs`: `gs` combines `s` (passthrough) and `g` (gRPC); choose one)".into()),
        ("solo-80-s.dstack.example.com".into(), "reject invalid.dstack.example.com (`solo-80-s` has more than one `-`)".into()),
        ("solo-99999.dstack.example.com".into(), "reject invalid.dstack.example.com (`solo-99999`: port `99999` is not a number from 1 to 65535)".into()),
        ("solo-0s.dstack.example.com".into(), "reject invalid.dstack.example.com (`solo-0s`: port `0` is not a number from 1 to 65535)".into()),
        ("solo-80x.dstack.example.com".into(), "reject invalid.dstack.example.com (`solo-80x`: unknown suffix `x` (only `s` or `g`))".into()),
        ("solo-s8080.dstack.example.com".into(), "reject invalid.dstack.example.com (`solo-s8080`: unknown suffix `s8080` (only `s` or `g`))".into()),
        ("-8080.dstack.example.com".into(), "reject invalid.dstack.example.com (`-8080` has an empty id)".into()),
        ("a.solo.dstack.example.com".into(), "reject invalid.dstack.example.com (`a.solo` is more than one label under the base domain)".into()),
        ("nope-8080.dstack.example.com".into(), "reject unknown.dstack.example.com (no app or instance `nope`)".into()),
        // Reserved ids and names under no base domain are someone else's.
        ("health.dstack.example.com".into(), "next".into()),
        ("admin-8080s.dstack.example.com".into(), "next".into()),
        ("solo.other.org".into(), "next".into()),
        ("example.com".into(), "next".into()),
        // A base domain under another one is a name under that one.
        ("dstack.example.com".into(), "reject unknown.example.com (no app or instance `dstack`)".into()),
        // An app with a pool: the host picks the instance, on the asked port.
        ("pooled-8443s.dstack.example.com".into(), "passthrough pooled-8443s pool pooled-app:8443".into()),
        ("pooled-8080.dstack.example.com".into(), "terminate pooled-8080 pool pooled-app:8080 cert=wild alpn=[]".into()),
        ("pinned1-22s.dstack.example.com".into(), "passthrough pinned1-22s 10.0.9.1:22".into()),
        // Custom domains: always passthrough, to the app or the pinned instance.
        ("pinned.example.org".into(), "passthrough pinned.example.org 10.0.3.8:443".into()),
    ];
    for (sni, expected) in cases {
        assert_eq!(summary(&route(&r, &sni)), expected, "{sni}");
    }
    assert_eq!(r.route(&Connection::for_test(None, &[])).action, Action::Next);
}

#[test]
fn an_app_id_reaches_one_instance_per_client_and_spreads_clients() {
    let r = router();
    let sni = format!("{APP}-8443s.dstack.example.com");
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..300u32 {
        let mut conn = Connection::for_test(Some(&sni), &[]);
        conn.client = std::net::SocketAddr::from(([192, 0, 2, (i % 250) as u8], (40000 + i) as u16)).into();
        let first = summary(&r.route(&conn));
        // The same client address, another source port: the same instance.
        conn.client.port = (50000 + i) as u16;
        assert_eq!(summary(&r.route(&conn)), first);
        *seen.entry(first).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "every instance gets clients: {seen:?}");
    assert!(seen.values().all(|n| *n > 50), "roughly even: {seen:?}");
    let shop = summary(&route(&r, "shop.example.org"));
    assert!(shop.starts_with("passthrough shop.example.org "), "{shop}");
    assert!(shop.ends_with(":8443"), "{shop}");
}

#[test]
fn bad_configs_are_refused() {
    let cases = [
        (r#"{}"#, "at least one of"),
        (r#"{"base_domains": {}}"#, "at least one of"),
        (r#"{"base_domains": {"*.x.com": {"certificate": "c"}}}"#, "without `*.`"),
        (
            r#"{"base_domains": {"x..com": {"certificate": "c"}}}"#,
            "base domain `x..com`",
        ),
        (
            r#"{"base_domains": {"x.com": {"certificate": "c"}}, "apps": {"a-b": {"instances": {"i": "h"}}}}"#,
            "app `a-b`",
        ),
        (
            r#"{"base_domains": {"x.com": {"certificate": "c"}}, "apps": {"a": {"instances": {}}}}"#,
            "app `a`: give `instances`, a `pool`, or both",
        ),
        (
            r#"{"base_domains": {"x.com": {"certificate": "c"}}, "apps": {"a": {"instances": {"a": "h"}}}}"#,
            "both an app id and an instance id",
        ),
        (
            r#"{"base_domains": {"x.com": {"certificate": "c"}}, "custom_domains": {"s.org": "nope:443"}}"#,
            "no app or instance `nope`",
        ),
        (
            r#"{"base_domains": {"x.com": {"certificate": "c"}}, "apps": {"a": {"instances": {"i": "h"}}}, "custom_domains": {"s.org": "a:0"}}"#,
            "port `0`",
        ),
        (
            r#"{"base_domains": {"x.com": {"certificate": "c", "cert": "d"}}}"#,
            "unknown field `cert`",
        ),
    ];
    for (config, expected) in cases {
        let err = DstackRouter::default().configure(config).expect_err(config);
        assert!(err.contains(expected), "{config}: {err}");
    }
    DstackRouter::default()
        .configure(r#"{"dns_custom_domains": true}"#)
        .expect("names from DNS alone");
}

#[test]
fn txt_records_name_an_app_and_a_port() {
    assert_eq!(parse_app_address("3327603e03f5:443"), Some(("3327603e03f5", 443)));
    assert_eq!(parse_app_address(" abc:8080 "), Some(("abc", 8080)));
    for bad in ["abc", "abc:0", "abc:99999", ":443", "ABC:443", "a-b:443", "a b:443"] {
        assert_eq!(parse_app_address(bad), None, "{bad}");
    }
}

#[test]
fn an_app_with_declared_ports_is_reached_on_those_only() {
    let mut r = DstackRouter::default();
    r.configure(
        r#"{
        "base_domains": { "dstack.example.com": { "certificate": "wild" } },
        "apps": { "web": { "instances": { "web1": "10.0.0.1" }, "ports": [443, 8080] } },
        "custom_domains": { "shop.example.org": "web:443" }
    }"#,
    )
    .expect("valid config");
    assert_eq!(
        summary(&route(&r, "web-443s.dstack.example.com")),
        "passthrough web-443s 10.0.0.1:443"
    );
    assert_eq!(
        summary(&route(&r, "web-8080.dstack.example.com")),
        "terminate web-8080 10.0.0.1:8080 cert=wild alpn=[]"
    );
    for (sni, port) in [
        ("web-22s.dstack.example.com", 22),
        ("web.dstack.example.com", 80),
        ("web1-9000s.dstack.example.com", 9000),
    ] {
        let id = sni.split(['-', '.']).next().unwrap_or_default();
        assert_eq!(
            summary(&route(&r, sni)),
            format!("reject closed.dstack.example.com (port {port} is not one of `{id}`'s ports)"),
            "{sni}"
        );
    }
    let mut bad = DstackRouter::default();
    let error = bad
        .configure(
            r#"{
        "base_domains": { "dstack.example.com": { "certificate": "wild" } },
        "apps": { "web": { "instances": { "web1": "10.0.0.1" }, "ports": [443] } },
        "custom_domains": { "shop.example.org": "web:22" }
    }"#,
        )
        .expect_err("a custom domain on an undeclared port");
    assert!(error.contains("port 22 is not one of `web`'s ports"), "{error}");
}
