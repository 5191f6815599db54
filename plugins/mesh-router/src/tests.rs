use weir_plugin_sdk::{Action, After, Upstream};

use super::*;

const YAML: &str = r#"
# As Traefik's documentation writes it.
tcp:
  routers:
    to-db:
      entryPoints:
        - public
      rule: "HostSNI(`db.example.com`)"
      service: db
      tls:
        passthrough: true
    to-web:
      rule: "HostSNI(`web.example.com`) || HostSNI(`www.example.com`)"
      service: web
      tls:
        options: modern
    grpc:
      rule: "HostSNI(`web.example.com`) && ALPN(`h2`)"
      service: grpc
      priority: 100
      tls: {}
    admins:
      rule: "HostSNIRegexp(`^admin-[0-9]+\\.example\\.com$`) && ClientIP(`10.0.0.0/8`)"
      service: secure
      tls: {}
    ssh:
      rule: "HostSNI(`*`)"
      service: ssh
    office:
      rule: "ClientIP(`192.168.0.0/16`)"
      service: ssh
      priority: 5
  services:
    db:
      loadBalancer:
        servers:
          - address: "10.0.1.1:5432"
        proxyProtocol:
          version: 2
    web:
      loadBalancer:
        servers:
          - address: "10.0.2.1:80"
          - address: "10.0.2.2:80"
    grpc:
      loadBalancer:
        servers:
          - address: "10.0.3.1:50051"
    secure:
      loadBalancer:
        servers:
          - address: "admin.internal:8443"
            tls: true
    ssh:
      loadBalancer:
        servers:
          - address: "10.0.4.1:22"
tls:
  options:
    modern:
      minVersion: VersionTLS12
      alpnProtocols:
        - http/1.1
        - acme-tls/1
      clientAuth:
        caFiles:
          - /etc/traefik/clients.pem
        clientAuthType: VerifyClientCertIfGiven
http:
  routers:
    ignored:
      rule: "Host(`x`)"
      service: nothing
"#;

fn router() -> MeshRouter {
    let mut config = serde_json::Map::new();
    config.insert("traefik".into(), YAML.into());
    config.insert(
        "ca_files".into(),
        serde_json::json!({ "/etc/traefik/clients.pem": "clients" }),
    );
    config.insert("upstream_ca".into(), "internal".into());
    let mut router = MeshRouter::default();
    router
        .configure(&serde_json::Value::Object(config).to_string())
        .expect("valid config");
    router
}

fn conn(sni: Option<&str>, alpn: &[&str], client: &str, protocol: Protocol) -> Connection {
    let mut conn = Connection::for_test(sni, alpn);
    conn.client = client.parse::<std::net::SocketAddr>().expect("ip:port").into();
    conn.listener = "public".into();
    conn.protocol = protocol;
    conn
}

fn summary(decision: &Decision) -> String {
    let target = |t: &Target| match &t.upstream {
        Upstream::Address(a) => format!("{a}{}", t.proxy_protocol.map(|v| format!(" pp{v}")).unwrap_or_default()),
        Upstream::Pool(p) => format!("pool {p}"),
    };
    match &decision.action {
        Action::Next => "next".into(),
        Action::Originate(o) => format!("originate {} {}", decision.route, target(&o.target)),
        Action::Reject(reason) => format!("reject {} ({reason})", decision.route),
        Action::Passthrough(t) => format!("passthrough {} {}", decision.route, target(t)),
        Action::Terminate(t) => match &t.then {
            After::Plain(to) => format!(
                "terminate {} {} {:?} {:?}",
                decision.route,
                target(to),
                t.client_auth,
                t.alpn
            ),
            After::Reencrypt((to, up)) => format!(
                "reencrypt {} {} {:?} ca={:?} name={:?}",
                decision.route,
                target(to),
                t.client_auth,
                up.ca,
                up.server_name
            ),
        },
    }
}

#[test]
fn routers_decide_as_traefik_would() {
    let r = router();
    let tls = Protocol::Tls;
    let cases = [
        (
            conn(Some("db.example.com"), &[], "10.9.9.9:1000", tls),
            "passthrough to-db 10.0.1.1:5432 pp2",
        ),
        // PostgreSQL after its SSLRequest is TLS too.
        (
            conn(Some("db.example.com"), &[], "10.9.9.9:1000", Protocol::PostgresTls),
            "passthrough to-db 10.0.1.1:5432 pp2",
        ),
        (
            conn(Some("www.example.com"), &["http/1.1"], "10.9.9.9:1000", tls),
            "terminate to-web 10.0.2.1:80 ClientAuth::Optional(\"clients\") [\"http/1.1\"]",
        ),
        // By length to-web (55 bytes) would beat grpc (39); grpc's explicit
        // priority puts it first for h2 clients.
        (
            conn(Some("web.example.com"), &["h2", "http/1.1"], "10.9.9.9:1000", tls),
            "terminate grpc 10.0.3.1:50051 ClientAuth::None []",
        ),
        (
            conn(Some("web.example.com"), &["http/1.1"], "10.9.9.9:1000", tls),
            "terminate to-web 10.0.2.2:80 ClientAuth::Optional(\"clients\") [\"http/1.1\"]",
        ),
        (
            conn(Some("admin-42.example.com"), &[], "10.1.2.3:1000", tls),
            "reencrypt admins admin.internal:8443 ClientAuth::None ca=Some(\"internal\") name=Some(\"admin.internal\")",
        ),
        // Not from 10/8: falls through to the non-TLS catch-all, bytes untouched.
        (
            conn(Some("admin-42.example.com"), &[], "172.16.0.1:1000", tls),
            "passthrough ssh 10.0.4.1:22",
        ),
        (
            conn(None, &[], "172.16.0.1:1000", Protocol::Plain),
            "passthrough ssh 10.0.4.1:22",
        ),
        // Explicit priority 5 beats the catch-all's -1.
        (
            conn(None, &[], "192.168.1.1:1000", Protocol::Plain),
            "passthrough office 10.0.4.1:22",
        ),
    ];
    for (conn, expected) in cases {
        assert_eq!(
            summary(&r.route(&conn)),
            expected,
            "{:?} {:?}",
            conn.sni,
            conn.client.to_string()
        );
    }
    // entryPoints: to-db only on `public`.
    let mut elsewhere = conn(Some("db.example.com"), &[], "10.9.9.9:1000", tls);
    elsewhere.listener = "internal".into();
    assert_eq!(summary(&r.route(&elsewhere)), "passthrough ssh 10.0.4.1:22");
    // A plain connection never matches a TLS router.
    let plain = conn(Some("db.example.com"), &[], "10.9.9.9:1000", Protocol::Plain);
    assert_eq!(summary(&r.route(&plain)), "passthrough ssh 10.0.4.1:22");
}

#[test]
fn servers_take_turns_and_weights_are_honoured() {
    let toml = r#"
        [tcp.routers.all]
        rule = "HostSNI(`*`)"
        service = "split"
        [tcp.services.split.weighted]
        services = [{ name = "blue", weight = 3 }, { name = "green", weight = 1 }]
        [tcp.services.blue.loadBalancer]
        servers = [{ address = "10.0.0.1:80" }, { address = "10.0.0.2:80" }]
        [tcp.services.green.loadBalancer]
        servers = [{ address = "10.0.0.3:80" }]
    "#;
    let mut r = MeshRouter::default();
    r.configure(toml).expect("valid TOML config");
    let mut seen = BTreeMap::new();
    for _ in 0..400 {
        let decision = r.route(&conn(None, &[], "10.9.9.9:1", Protocol::Plain));
        *seen.entry(summary(&decision)).or_insert(0) += 1;
    }
    let count = |addr: &str| seen.get(&format!("passthrough all {addr}")).copied().unwrap_or(0);
    assert_eq!(count("10.0.0.1:80") + count("10.0.0.2:80"), 300, "{seen:?}");
    assert_eq!(count("10.0.0.3:80"), 100, "{seen:?}");
    assert_eq!(count("10.0.0.1:80"), 150, "{seen:?}");
}

#[test]
fn equal_priorities_are_broken_by_router_name() {
    let yaml = r#"
tcp:
  routers:
    b-second:
      rule: "HostSNI(`a.example.com`)"
      service: two
      tls: {}
    a-first:
      rule: "HostSNI(`a.example.com`)"
      service: one
      tls: {}
  services:
    one:
      loadBalancer:
        servers: [{ address: "10.0.0.1:1" }]
    two:
      loadBalancer:
        servers: [{ address: "10.0.0.2:1" }]
"#;
    let mut r = MeshRouter::default();
    r.configure(yaml).expect("valid");
    let decision = r.route(&conn(Some("a.example.com"), &[], "10.9.9.9:1", Protocol::Tls));
    assert_eq!(decision.route, "a-first");
}

#[test]
fn configuration_errors_name_the_router_and_the_reason() {
    let base = |router: &str| {
        format!(
            "tcp:\n  routers:\n    r:\n{router}\n  services:\n    s:\n      loadBalancer:\n        servers:\n          - address: \"10.0.0.1:1\"\n"
        )
    };
    let cases = [
        (base("      rule: \"HostSNI(`a.b`)\"\n      service: s"), "router `r`: rule `HostSNI(`a.b`)`: HostSNI other than `*`"),
        (base("      rule: \"HostSNI(`a.b`, `c.d`)\"\n      service: s\n      tls: {}"), "router `r`: rule `HostSNI(`a.b`, `c.d`)`: HostSNI takes exactly one argument"),
        (base("      rule: \"HostSNI(`a.b`) &&\"\n      service: s\n      tls: {}"), "router `r`"),
        (base("      rule: \"HostSNI(`*`)\"\n      service: nope"), "router `r`: service `nope` does not exist"),
        (base("      service: s"), "router `r`: `rule` is required"),
        (base("      rule: \"HostSNI(`a.b`)\"\n      service: s\n      tls:\n        certResolver: le"), "certResolver is not supported"),
        (base("      rule: \"HostSNI(`a.b`)\"\n      service: s\n      tls:\n        options: nope"), "TLS options `nope` do not exist"),
        (base("      rule: \"HostSNI(`*`)\"\n      service: s\n      ruleSyntax: v2"), "ruleSyntax `v2`"),
        (base("      rule: \"HostSNI(`*`)\"\n      service: s\n      rulle: x"), "unknown field `rulle`"),
        ("tcp:\n  middlewares:\n    m:\n      ipAllowList: {}\n".to_owned(), "tcp.middlewares is not supported"),
        ("tls:\n  certificates:\n    - certFile: a.pem\n      keyFile: a.key\n".to_owned(), "tls.certificates"),
        (
            "tcp:\n  services:\n    s:\n      loadBalancer:\n        servers:\n          - address: \"nowhere\"\n".to_owned(),
            "service `s`: server address `nowhere` is not host:port",
        ),
        (
            "tcp:\n  services:\n    s:\n      weighted:\n        services:\n          - name: s\n".to_owned(),
            "nest deeper",
        ),
        (
            "[tcp.routers.r]\nrule = \"HostSNI(`a.b`)\"\nservice = \"s\"\n[tcp.routers.r.tls]\noptions = \"o\"\n[tcp.services.s.loadBalancer]\nservers = [{ address = \"10.0.0.1:1\" }]\n[tls.options.o]\nminVersion = \"VersionTLS13\"\n".to_owned(),
            "router `r`: TLS options: minVersion VersionTLS13: set `tls.min_version = \"1.3\"` on the weir listener",
        ),
        (
            "[tcp.routers.r]\nrule = \"HostSNI(`a.b`)\"\nservice = \"s\"\n[tcp.routers.r.tls]\n[tcp.services.s.loadBalancer]\nservers = [{ address = \"10.0.0.1:1\" }]\n[tls.options.default.clientAuth]\ncaFiles = [\"/ca.pem\"]\n".to_owned(),
            "clientAuth.caFiles `/ca.pem`: map it to a weir CA name",
        ),
        ("[tcp.routers.r\n".to_owned(), "TOML"),
        ("tcp:\n  routers: [\n".to_owned(), "YAML"),
    ];
    for (text, expected) in cases {
        let err = MeshRouter::default().configure(&text).expect_err(&text);
        assert!(err.contains(expected), "{text}\n=> {err}");
    }
}
