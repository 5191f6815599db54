use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/weir/weir.toml"))
}

const MINIMAL: &str = r#"
    [listeners.public]
    bind = "127.0.0.1:8443"
    plugins = ["router"]

    [plugins.router]
    wasm = "static_router.wasm"
    config = { routes = { "a.example" = { pool = "app" } } }

    [pools.app]
    servers = ["127.0.0.1:9000", "backend.internal:9000"]
"#;

#[test]
fn a_minimal_config_gets_the_documented_defaults() {
    let config = parse(MINIMAL).expect("valid");
    let listener = &config.listeners["public"];
    assert_eq!(listener.protocol, ListenerProtocol::Tls);
    assert_eq!(listener.sniff_timeout, Duration::from_secs(5));
    assert_eq!(listener.relay, RelayMode::Copy);
    assert!(!listener.defer_accept);
    let plugin = &config.plugins["router"];
    assert_eq!(plugin.on_error, OnError::Deny);
    assert_eq!(plugin.timeout, Duration::from_millis(10));
    assert_eq!(plugin.configure_timeout, Duration::from_secs(1));
    assert_eq!(plugin.max_memory_mib, 16);
    assert_eq!(
        plugin.config_string().expect("inline"),
        r#"{"routes":{"a.example":{"pool":"app"}}}"#
    );
    assert_eq!(config.resolve(&plugin.wasm), Path::new("/etc/weir/static_router.wasm"));
}

/// A wildcard certificate ordered with DNS-01 through `[dns.primary]`.
const DNS01_SITE: &str = "[certificates.site]\ncert = \"s.pem\"\nkey = \"s.key\"\nacme = { directory = \"https://ca.example/dir\", domains = [\"*.apps.test\"], challenge = \"dns-01\", dns = \"primary\" }";

#[test]
fn errors_name_the_file_the_field_and_the_reason() {
    let cases = [
        (
            MINIMAL.replace("plugins = [\"router\"]", "plugins = [\"ruoter\"]"),
            "listeners.public.plugins: no plugin named `ruoter`",
        ),
        (MINIMAL.replace("bind =", "bnid ="), "unknown field `bnid`"),
        (
            MINIMAL.replace("\"127.0.0.1:9000\"", "\"127.0.0.1\""),
            "pools.app.servers",
        ),
        (MINIMAL.replace("[\"router\"]", "[]"), "the plugin chain is empty"),
        (
            MINIMAL.replace("bind =", "protocol = \"plain\"\ndefer_accept = true\nbind ="),
            "listeners.public.defer_accept: a plain listener's clients may wait for the server to speak first",
        ),
        (
            MINIMAL.replace("wasm =", "timeout = \"0ms\"\nwasm ="),
            "plugins.router.timeout",
        ),
        (
            format!(
                "{MINIMAL}\n[certificates.site]\ncert = \"s.pem\"\nkey = \"s.key\"\nacme = {{ directory = \"https://ca.example/dir\", domains = [\"*.example.com\"] }}\n"
            ),
            "certificates.site.acme.domains: `*.example.com`: a wildcard needs challenge = \"dns-01\"",
        ),
        (
            format!(
                "{MINIMAL}\n[certificates.site]\ncert = \"s.pem\"\nkey = \"s.key\"\nacme = {{ directory = \"http://ca.example/dir\", domains = [\"a.example.com\"] }}\n"
            ),
            "certificates.site.acme.directory: must be an https:// URL",
        ),
        (
            MINIMAL.replace("bind =", "max_connections_per_client = 0\nbind ="),
            "listeners.public.max_connections_per_client: must be at least 1",
        ),
        (
            MINIMAL.replace("wasm =", "configure_timeout = \"2m\"\nwasm ="),
            "plugins.router.configure_timeout: must be between 1ms and 60s",
        ),
        (
            MINIMAL.replace("wasm =", "on_error = \"ignore\"\nwasm ="),
            "unknown variant `ignore`",
        ),
        (MINIMAL.replace("wasm =", "config = 3\nwasm ="), "duplicate key"),
        (
            format!("{MINIMAL}\n{DNS01_SITE}\n"),
            "certificates.site.acme.dns: no [dns.primary] is defined",
        ),
        (
            format!("{MINIMAL}\n{DNS01_SITE}\n[dns.primary]\nprovider = \"exec\"\ncommand = [\"/bin/true\"]\n"),
            "dns.primary.nameservers: required with provider = \"exec\"",
        ),
        (
            format!("{MINIMAL}\n{DNS01_SITE}\n[dns.primary]\nprovider = \"rfc2136\"\nserver = \"127.0.0.1:53\"\n"),
            "dns.primary.zone: required with provider = \"rfc2136\"",
        ),
        (
            format!(
                "{MINIMAL}\n{DNS01_SITE}\n[dns.primary]\nprovider = \"exec\"\ncommand = [\"/bin/true\"]\nnameservers = [\"127.0.0.1:53\"]\nzone = \"other.test\"\n"
            ),
            "certificates.site.acme.domains: `*.apps.test` is not in the zone `other.test` of [dns.primary]",
        ),
        (
            format!(
                "{MINIMAL}\n{DNS01_SITE}\n[dns.primary]\nprovider = \"exec\"\ncommand = [\"/bin/true\"]\nnameservers = [\"127.0.0.1:53\"]\nserver = \"127.0.0.1:53\"\n"
            ),
            "dns.primary.server: not used with provider = \"exec\"",
        ),
        (
            format!(
                "{MINIMAL}\n{DNS01_SITE}\n[dns.primary]\nprovider = \"exec\"\ncommand = [\"/bin/true\"]\nnameservers = [\"127.0.0.1:53\"]\npropagation_timeout = \"2h\"\n"
            ),
            "dns.primary.propagation_timeout: must be between 1s and 3600s",
        ),
        (
            format!("{MINIMAL}\n[dns.primary]\nprovider = \"bind\"\n"),
            "unknown variant `bind`",
        ),
    ];
    for (text, expected) in cases {
        let err = parse(&text).expect_err(expected).to_string();
        assert!(err.starts_with("/etc/weir/weir.toml: "), "{err}");
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
    }
}

#[test]
fn a_string_config_is_passed_verbatim() {
    let text = MINIMAL.replace(
        r#"config = { routes = { "a.example" = { pool = "app" } } }"#,
        r#"config = "tcp:\n  routers: {}""#,
    );
    let config = parse(&text).expect("valid");
    assert_eq!(
        config.plugins["router"].config_string().expect("inline"),
        "tcp:\n  routers: {}"
    );
}

/// A tenant's section: its ranges name ports, its shadows are counted, and
/// the defaults of its budgets are the documented ones.
#[test]
fn a_tenants_ranges_ports_and_shadows_are_checked() {
    let tenant = |extra: &str| {
        format!(
            "{MINIMAL}\n[plugins.acme-router]\nwasm = \"r.wasm\"\n[plugins.acme-next]\nwasm = \"r.wasm\"\nshadow_of = \"acme-router\"\n\
             [tenants.acme]\ndomains = [\"acme.test\"]\nplugins = [\"acme-router\"]\n{extra}\n"
        )
    };
    let config = parse(&tenant(
        "upstreams = [\"10.0.0.0/8\", \"127.0.0.1/32:8000-8099\", \"[fd00::/8]:443\"]",
    ))
    .expect("valid");
    let acme = &config.tenants["acme"];
    assert_eq!(acme.upstreams.len(), 3);
    assert!(acme.upstreams[1].contains("127.0.0.1:8050".parse().expect("addr")));
    assert!(!acme.upstreams[1].contains("127.0.0.1:9000".parse().expect("addr")));
    assert_eq!(acme.health_probes_per_second, 50);
    assert_eq!(acme.dns_queries_per_second, 200);
    assert_eq!(acme.max_shadows, 2);
    assert_eq!(acme.max_descriptors, None);
    assert_eq!(config.listeners["public"].client_prefix_v4, 24);

    let error = parse(&tenant("upstreams = [\"10.0.0.0/8:99999\"]"))
        .expect_err("bad port")
        .to_string();
    assert!(error.contains("a port is a number from 1 to 65535"), "{error}");
    let error = parse(&tenant("max_shadows = 0"))
        .expect_err("too many shadows")
        .to_string();
    assert!(
        error.contains("tenants.acme.plugins: 1 shadow plugins exceed tenant `acme`'s max_shadows of 0"),
        "{error}"
    );
    let error = parse(&tenant("max_descriptors = 0"))
        .expect_err("no descriptors")
        .to_string();
    assert!(
        error.contains("tenants.acme.max_descriptors: must be at least 1"),
        "{error}"
    );
}

/// A pool a tenant published is held to the tenant's ranges, ports
/// included; an operator's pool is not.
#[test]
fn a_published_pool_lies_in_its_tenants_ranges() {
    let text = format!(
        "{MINIMAL}\n[plugins.acme-router]\nwasm = \"r.wasm\"\n[pools.acme-app]\nservers = [\"127.0.0.1:9001\"]\n\
         [tenants.acme]\ndomains = [\"acme.test\"]\nplugins = [\"acme-router\"]\npools = [\"acme-app\"]\n\
         upstreams = [\"10.0.0.0/8\", \"127.0.0.1/32:9001\"]\n"
    );
    let config = parse(&text).expect("an operator's pool names any server");
    let publish = |servers: &[&str]| {
        let mut config = config.clone();
        let pool = config.pools.get_mut("acme-app").expect("pool");
        pool.servers = servers.iter().map(|s| ServerConfig::Address((*s).to_owned())).collect();
        pool.published_by = Some("acme".into());
        config.check()
    };
    publish(&["127.0.0.1:9001", "10.1.2.3:443"]).expect("inside its ranges");
    for (servers, reason) in [
        (
            ["127.0.0.1:9002"],
            "pools.acme-app.servers: `127.0.0.1:9002` is outside tenant `acme`'s upstream ranges (10.0.0.0/8, 127.0.0.1/32:9001; tenants.acme.upstreams)",
        ),
        (
            ["169.254.169.254:80"],
            "`169.254.169.254:80` is outside tenant `acme`'s upstream ranges",
        ),
        (
            ["backend.internal:443"],
            "a tenant's pool names addresses, not DNS names",
        ),
    ] {
        let error = publish(&servers).expect_err(reason).to_string();
        assert!(error.contains(reason), "{error}");
    }
}
