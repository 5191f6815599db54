//! mesh-router end to end, one PostgreSQL-aware listener, a Traefik
//! configuration written as Traefik's documentation writes it: a
//! passthrough router and terminating routers chosen by SNI (openssl
//! s_client, curl), an ALPN rule (curl --http2 vs --http1.1), a ClientIP
//! rule (clients from two loopback addresses), and psql through a
//! STARTTLS route to a real PostgreSQL.

use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use weir_tests::{
    Pki, Postgres, STEP, Upstream, WeirProcess, answer, answer_with, h2c_upstream, psql, toml_path, write_config,
};

async fn curl(addr: SocketAddr, host: &str, ca: &Path, version: &str) -> String {
    let out = tokio::time::timeout(
        STEP,
        tokio::process::Command::new("curl")
            .args([
                "-sS",
                version,
                "--max-time",
                "20",
                "--cacert",
                &ca.display().to_string(),
            ])
            .args(["--resolve", &format!("{host}:{}:127.0.0.1", addr.port())])
            .arg(format!("https://{host}:{}/mesh", addr.port()))
            .output(),
    )
    .await
    .expect("curl finishes")
    .expect("curl is installed (.ci/run installs it)");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TLS exchange from a chosen loopback source address.
async fn from_source(source: &str, addr: SocketAddr, sni: &str, pki: &Pki) -> String {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind source");
    let tcp = socket.connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.write_all(b"who am i\n").await.expect("write");
    tls.flush().await.expect("flush");
    let mut out = String::new();
    tokio::time::timeout(STEP, tls.read_to_string(&mut out))
        .await
        .expect("answer in time")
        .expect("answer");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_routers_route_real_clients() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway_pki = Pki::new("gateway CA");
    let app_pki = Pki::new("app CA");
    let db_pki = Pki::new("database CA");
    let db = tokio::task::spawn_blocking({
        let identity = db_pki.server(&["db.test"]);
        move || Postgres::start(&identity)
    })
    .await
    .expect("postgres task");
    let app = Upstream::tls(&app_pki.server(&["app.test"]), answer).await;
    let web = Upstream::tcp(answer).await;
    let grpc = h2c_upstream().await;
    let office = Upstream::tcp(|s| answer_with(s, " (office)".into())).await;
    let others = Upstream::tcp(|s| answer_with(s, " (others)".into())).await;
    let (cert, key) = gateway_pki.server(&["web.test", "ip.test"]).write(dir.path(), "site");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
[listeners.public]
bind = "127.0.0.1:0"
protocol = "postgres"
plugins = ["mesh"]

[certificates.site]
cert = {cert}
key = {key}

[plugins.mesh]
wasm = "{{mesh_router}}"
config = '''
tcp:
  routers:
    app:
      entryPoints:
        - public
      rule: "HostSNI(`app.test`)"
      service: app
      tls:
        passthrough: true
    postgres:
      rule: "HostSNI(`db.test`)"
      service: postgres
      tls:
        passthrough: true
    web:
      rule: "HostSNI(`web.test`)"
      service: web
      tls:
        options: web
    web-h2:
      rule: "HostSNI(`web.test`) && ALPN(`h2`)"
      priority: 100
      service: grpc
      tls:
        options: web
    office:
      rule: "HostSNI(`ip.test`) && ClientIP(`127.0.0.2/32`)"
      service: office
      tls: {{}}
    others:
      rule: "HostSNI(`ip.test`)"
      service: others
      tls: {{}}

  services:
    app:
      loadBalancer:
        servers:
          - address: "{app}"
    postgres:
      loadBalancer:
        servers:
          - address: "127.0.0.1:{pg}"
    web:
      loadBalancer:
        servers:
          - address: "{web}"
    grpc:
      loadBalancer:
        servers:
          - address: "{grpc}"
    office:
      loadBalancer:
        servers:
          - address: "{office}"
    others:
      loadBalancer:
        servers:
          - address: "{others}"

tls:
  options:
    web:
      minVersion: VersionTLS12
      alpnProtocols:
        - h2
        - http/1.1
'''
"#,
            cert = toml_path(&cert),
            key = toml_path(&key),
            app = app.addr,
            pg = db.port,
            web = web.addr,
            grpc = grpc.addr,
            office = office.addr,
            others = others.addr,
        ),
    );
    let mut weir = WeirProcess::spawn(&config).await;
    let addr = weir.addr("public");
    let gateway_ca = gateway_pki.write_ca(dir.path(), "gateway-ca");

    // Passthrough router: openssl sees the app's own certificate.
    let app_ca = app_pki.write_ca(dir.path(), "app-ca");
    let (stdout, stderr) =
        weir_tests::openssl_s_client(addr, "app.test", &app_ca, &["-brief"], "through the mesh").await;
    assert_eq!(stdout, "upstream heard: through the mesh\n", "{stderr}");
    assert!(stderr.contains("CN = app.test"), "{stderr}");
    let line = weir.connection_line().await;
    assert!(
        line.contains(r#"route="app""#) && line.contains(r#"mode="passthrough""#),
        "{line}"
    );

    // ALPN rule: h2 clients reach the h2 server, HTTP/1.1 clients the other.
    assert_eq!(curl(addr, "web.test", &gateway_ca, "--http2").await, "HTTP/2.0 /mesh\n");
    assert!(weir.connection_line().await.contains(r#"route="web-h2""#));
    assert_eq!(
        curl(addr, "web.test", &gateway_ca, "--http1.1").await,
        "upstream heard: GET /mesh HTTP/1.1\n"
    );
    let line = weir.connection_line().await;
    assert!(
        line.contains(r#"route="web""#) && line.contains(r#"mode="terminate""#),
        "{line}"
    );

    // ClientIP rule: 127.0.0.2 is the office, 127.0.0.1 everyone else.
    assert_eq!(
        from_source("127.0.0.2", addr, "ip.test", &gateway_pki).await,
        "upstream heard: who am i (office)\n"
    );
    assert!(weir.connection_line().await.contains(r#"route="office""#));
    assert_eq!(
        from_source("127.0.0.1", addr, "ip.test", &gateway_pki).await,
        "upstream heard: who am i (others)\n"
    );
    assert!(weir.connection_line().await.contains(r#"route="others""#));

    // psql: SSLRequest answered by weir, the ClientHello routed by the
    // postgres router, TLS end to end with the database.
    let db_ca = db_pki.write_ca(dir.path(), "db-ca");
    let conninfo = format!(
        "host=db.test hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        addr.port(),
        db_ca.display()
    );
    let answer = tokio::task::spawn_blocking(move || {
        psql(
            &conninfo,
            "select 'mesh', ssl from pg_stat_ssl where pid = pg_backend_pid()",
        )
    })
    .await
    .expect("psql task");
    assert_eq!(answer.as_deref(), Ok("mesh|t"));
    let line = weir.connection_line().await;
    assert!(line.contains(r#"route="postgres""#), "{line}");
}
