//! weir as the local RA-TLS forwarder, with weir at every hop: `psql` with
//! `sslmode=disable` → weir (egress: the egress plugin opens TLS, presents
//! weir's RA-TLS client certificate, and attestation-allowlist judges the
//! remote) → weir (gateway: dstack-router passes `<app>-<port>s` through) →
//! weir (sidecar: terminates with an RA-TLS server certificate, admits the
//! egress by its attestation) → PostgreSQL 15. The certificates are the
//! simulated RA-TLS ones (real quote layout and key binding, reported
//! unverified), so every allowlist here says `require_verified = false`.

use std::path::Path;
use std::time::Duration;

use weir_tests::{Pki, Postgres, STEP, WeirProcess, psql, psql_async, simulated_ratls, toml_path, write_config};

const SIDECAR_MRTD: [u8; 48] = [0x5c; 48];
const EGRESS_MRTD: [u8; 48] = [0xe9; 48];
const STRANGER_MRTD: [u8; 48] = [0x66; 48];
const APP: &str = "3327603e03f5bd1f830812ca4a789277fc31f577";

fn hex(bytes: &[u8]) -> String {
    weir_plugin_sdk::hex::encode(bytes)
}

/// One query with psql through a local listener, without TLS: its output or
/// psql's error.
async fn query(port: u16, sql: &'static str) -> Result<String, String> {
    psql_async(
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"),
        sql,
    )
    .await
}

/// The sidecar in front of PostgreSQL: a `postgres` listener (direct TLS
/// and SSLRequest alike) terminating with its RA-TLS certificate, asking
/// for the client's, and admitting only the egress's MRTD.
async fn sidecar(dir: &Path, postgres: u16) -> WeirProcess {
    let (cert, key) = simulated_ratls("*.dstack.test", SIDECAR_MRTD).write(dir, "sidecar");
    let config = write_config(
        dir,
        &format!(
            r#"
            [listeners.db]
            bind = "127.0.0.1:0"
            protocol = "postgres"
            plugins = ["route", "allow"]
            tls.alpn = ["postgresql"]

            [plugins.route]
            wasm = "{{static_router}}"
            config.routes."*.dstack.test" = {{ address = "127.0.0.1:{postgres}", terminate = {{ certificate = "sidecar", client_auth = "attested" }} }}
            config.default = {{ address = "127.0.0.1:{postgres}", terminate = {{ certificate = "sidecar", client_auth = "attested" }} }}

            [plugins.allow]
            wasm = "{{attestation_allowlist}}"
            config = {{ require_verified = false, rules = [ {{ side = "client", mrtd = ["{egress}"] }} ] }}

            [certificates.sidecar]
            cert = {cert}
            key = {key}
            "#,
            egress = hex(&EGRESS_MRTD),
            cert = toml_path(&cert),
            key = toml_path(&key),
        ),
    );
    WeirProcess::spawn(&config).await
}

/// The gateway in the middle: dstack-router, `<app>-<port>s` passed through
/// to the app's one instance on loopback (its certificate, for the names it
/// terminates, is not used here).
async fn gateway(dir: &Path) -> WeirProcess {
    let (cert, key) = Pki::new("gateway CA").server(&["*.dstack.test"]).write(dir, "wildcard");
    let config = write_config(
        dir,
        &format!(
            r#"
            [listeners.public]
            bind = "127.0.0.1:0"
            plugins = ["dstack"]

            [plugins.dstack]
            wasm = "{{dstack_router}}"
            grants = ["dns"]
            config.base_domains."dstack.test" = {{ certificate = "wildcard" }}
            config.apps.{APP}.instances = {{ instance1 = "127.0.0.1" }}

            [certificates.wildcard]
            cert = {cert}
            key = {key}
            "#,
            cert = toml_path(&cert),
            key = toml_path(&key),
        ),
    );
    WeirProcess::spawn(&config).await
}

/// The egress: one `postgres` listener per way out, its RA-TLS client
/// certificate from files (watched: a rotation is a reload).
async fn egress(dir: &Path, gateway: u16, sidecar: u16, postgres: u16) -> WeirProcess {
    let (cert, key) = simulated_ratls("egress", EGRESS_MRTD).write(dir, "egress");
    let sni = format!("{APP}-{sidecar}s.dstack.test");
    let listener = |name: &str| {
        format!(
            r#"
            [listeners.{name}]
            bind = "127.0.0.1:0"
            protocol = "postgres"
            plugins = ["egress", "allow"]
            "#
        )
    };
    let config = write_config(
        dir,
        &format!(
            r#"
            {via_gateway}
            {direct}
            {sslrequest}
            {picky}
            {pg15}

            [plugins.egress]
            wasm = "{{egress}}"
            config.routes.via-gateway = {{ remote = "127.0.0.1:{gateway}", server_name = "{sni}", protocol = "postgres", client_cert = "app" }}
            config.routes.direct = {{ remote = "127.0.0.1:{sidecar}", server_name = "{sni}", protocol = "postgres", client_cert = "app" }}
            config.routes.sslrequest = {{ remote = "127.0.0.1:{sidecar}", server_name = "{sni}", protocol = "postgres-sslrequest", client_cert = "app" }}
            config.routes.picky = {{ remote = "127.0.0.1:{sidecar}", server_name = "{sni}", protocol = "postgres", client_cert = "app" }}
            # PostgreSQL 15 itself, which knows only the SSLRequest way.
            config.routes.pg15 = {{ remote = "127.0.0.1:{postgres}", server_name = "db.internal", protocol = "postgres-sslrequest" }}

            [plugins.allow]
            wasm = "{{attestation_allowlist}}"
            config.require_verified = false
            config.rules = [
                {{ side = "upstream", listener = "via-gateway", mrtd = ["{sidecar_mrtd}"] }},
                {{ side = "upstream", listener = "direct", mrtd = ["{sidecar_mrtd}"] }},
                {{ side = "upstream", listener = "sslrequest", mrtd = ["{sidecar_mrtd}"] }},
                {{ side = "upstream", listener = "picky", mrtd = ["{stranger}"] }},
                {{ side = "upstream", listener = "pg15", mrtd = ["{db}"] }},
            ]

            [certificates.app]
            cert = {cert}
            key = {key}

            [reload]
            debounce = "50ms"
            "#,
            via_gateway = listener("via-gateway"),
            direct = listener("direct"),
            sslrequest = listener("sslrequest"),
            picky = listener("picky"),
            pg15 = listener("pg15"),
            db = hex(&[0; 48]),
            sidecar_mrtd = hex(&SIDECAR_MRTD),
            stranger = hex(&STRANGER_MRTD),
            cert = toml_path(&cert),
            key = toml_path(&key),
        ),
    );
    WeirProcess::spawn(&config).await
}

struct Path3 {
    _dirs: [tempfile::TempDir; 3],
    egress_dir: std::path::PathBuf,
    egress: WeirProcess,
    gateway: WeirProcess,
    sidecar: WeirProcess,
    _postgres: Postgres,
}

async fn three_hops() -> Path3 {
    let dirs = [(); 3].map(|()| tempfile::tempdir().expect("temp dir"));
    let postgres = tokio::task::spawn_blocking({
        let identity = simulated_ratls("db.internal", [0; 48]);
        move || Postgres::start(&identity)
    })
    .await
    .expect("postgres task");
    let sidecar = sidecar(dirs[2].path(), postgres.port).await;
    let gateway = gateway(dirs[1].path()).await;
    let egress = egress(
        dirs[0].path(),
        gateway.addr("public").port(),
        sidecar.addr("db").port(),
        postgres.port,
    )
    .await;
    Path3 {
        egress_dir: dirs[0].path().to_owned(),
        _dirs: dirs,
        egress,
        gateway,
        sidecar,
        _postgres: postgres,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reaches_postgres_through_egress_gateway_and_sidecar() {
    let mut hops = three_hops().await;
    let port = |name: &str| hops.egress.addr(name).port();
    let (via_gateway, direct, sslrequest, pg15) =
        (port("via-gateway"), port("direct"), port("sslrequest"), port("pg15"));

    // Through all three: the gateway only passes the ciphertext on.
    assert_eq!(query(via_gateway, "select 41 + 1").await.as_deref(), Ok("42"));
    let egress_line = hops.egress.connection_line().await;
    let gateway_line = hops.gateway.connection_line().await;
    let sidecar_line = hops.sidecar.connection_line().await;
    assert!(
        egress_line.contains(r#"mode="originate""#) && egress_line.contains("outcome=closed"),
        "{egress_line}"
    );
    assert!(
        gateway_line.contains(r#"mode="passthrough""#)
            && gateway_line.contains(&format!(
                r#"sni="{APP}-{}s.dstack.test""#,
                hops.sidecar.addr("db").port()
            )),
        "{gateway_line}"
    );
    assert!(
        sidecar_line.contains(r#"mode="terminate""#) && sidecar_line.contains("outcome=closed"),
        "{sidecar_line}"
    );

    // Straight to the sidecar, both ways PostgreSQL starts TLS.
    assert_eq!(query(direct, "select 'direct'").await.as_deref(), Ok("direct"));
    assert!(hops.sidecar.connection_line().await.contains(r#"mode="terminate""#));
    assert_eq!(
        query(sslrequest, "select 'sslrequest'").await.as_deref(),
        Ok("sslrequest")
    );
    assert!(hops.sidecar.connection_line().await.contains(r#"mode="terminate""#));
    // PostgreSQL 15 answers only an SSLRequest (a ClientHello first is not
    // a protocol it knows), and sees TLS on its own connection.
    let ssl = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";
    assert_eq!(query(pg15, ssl).await.as_deref(), Ok("t"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_side_refuses_an_mrtd_it_does_not_allow_and_psql_says_why() {
    let mut hops = three_hops().await;
    let sidecar_mrtd = hex(&SIDECAR_MRTD);

    // The egress refuses a sidecar whose MRTD its rule does not list.
    let refused = query(hops.egress.addr("picky").port(), "select 1").await;
    let error = refused.expect_err("refused");
    assert!(
        error.contains("weir: upstream:") && error.contains(&format!("MRTD {sidecar_mrtd} is not allowed")),
        "{error}"
    );
    let line = hops.egress.connection_line().await;
    assert!(line.contains("outcome=denied"), "{line}");
    // weir refused inside the handshake: the sidecar never finished it, so
    // it dialled nothing.
    let line = hops.sidecar.connection_line().await;
    assert!(
        line.contains(r#"upstream="-""#) && !line.contains("outcome=closed"),
        "{line}"
    );

    // The sidecar refuses an egress presenting another MRTD; psql hears it
    // from the egress, and the sidecar's log says which measurement.
    simulated_ratls("stranger", STRANGER_MRTD).write(&hops.egress_dir, "egress");
    let direct = hops.egress.addr("direct").port();
    let deadline = tokio::time::Instant::now() + STEP;
    let error = loop {
        match query(direct, "select 1").await {
            Err(error) => break error,
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the new certificate was never used"
                );
                // The egress had not reloaded yet: skip the sidecar's line.
                let _ = hops.sidecar.connection_line().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        error.contains("weir: upstream: it refused weir after the TLS handshake"),
        "{error}"
    );
    let line = loop {
        let line = hops.sidecar.connection_line().await;
        if line.contains("outcome=denied") {
            break line;
        }
    };
    assert!(
        line.contains(&format!("MRTD {} is not allowed", hex(&STRANGER_MRTD))),
        "{line}"
    );
    assert!(line.contains(r#"upstream="-""#), "nothing was dialled: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_serves_new_connections_and_open_ones_go_on() {
    let hops = three_hops().await;
    let direct = hops.egress.addr("direct").port();
    let postgres = hops._postgres.port;
    let running = "select count(*) from pg_stat_activity where query = 'select pg_sleep(6)'";
    let direct_to_db = move || {
        let conninfo = format!("host=127.0.0.1 port={postgres} user=postgres dbname=postgres sslmode=disable");
        psql(&conninfo, running)
    };
    // A connection open across the rotation.
    let open = tokio::spawn(query(direct, "select pg_sleep(6)"));
    let deadline = tokio::time::Instant::now() + STEP;
    while tokio::task::spawn_blocking(direct_to_db)
        .await
        .expect("psql task")
        .as_deref()
        != Ok("1")
    {
        assert!(tokio::time::Instant::now() < deadline, "the long query never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // New files: a certificate the sidecar does not admit. New connections
    // present it (and are refused); the open one is untouched.
    simulated_ratls("rotated", STRANGER_MRTD).write(&hops.egress_dir, "egress");
    let deadline = tokio::time::Instant::now() + STEP;
    while query(direct, "select 1").await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated certificate was never used"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        tokio::task::spawn_blocking(direct_to_db)
            .await
            .expect("psql task")
            .as_deref(),
        Ok("1"),
        "the open connection is still running its query"
    );
    // And back to an admitted one, with a new key.
    simulated_ratls("rotated-again", EGRESS_MRTD).write(&hops.egress_dir, "egress");
    let deadline = tokio::time::Instant::now() + STEP;
    while query(direct, "select 1").await.as_deref() != Ok("1") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the admitted certificate was never used"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        open.await.expect("task").as_deref(),
        Ok(""),
        "the open connection finished its query"
    );
}

/// A TLS server that wants PostgreSQL's SSLRequest first and ALPN
/// `postgresql` in the ClientHello (what a PostgreSQL 17 server accepts
/// either way): contract 0.3.0's `tls-start` lets a decision ask for both.
/// The server reports the first 8 bytes and the negotiated ALPN, then passes
/// the decrypted protocol on to PostgreSQL 15 in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssl_request_can_carry_alpn_postgresql_when_the_decision_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let postgres = tokio::task::spawn_blocking({
        let identity = simulated_ratls("db.internal", [0; 48]);
        move || Postgres::start(&identity)
    })
    .await
    .expect("postgres task");
    let db = postgres.port;
    let mut config = (*weir_tests::server_config(&simulated_ratls("*.dstack.test", SIDECAR_MRTD))).clone();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = weir_tests::Upstream::tcp(move |mut tcp: tokio::net::TcpStream| {
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        async move {
            let mut first = [0; 8];
            if tcp.read_exact(&mut first).await.is_err() || tcp.write_all(b"S").await.is_err() {
                return;
            }
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let _ = tx.send((first, alpn));
            if let Ok(mut plain) = tokio::net::TcpStream::connect(("127.0.0.1", db)).await {
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            }
        }
    })
    .await;

    let (cert, key) = simulated_ratls("egress", EGRESS_MRTD).write(dir.path(), "egress");
    let config = write_config(
        dir.path(),
        &format!(
            r#"
            [listeners.pg17]
            bind = "127.0.0.1:0"
            protocol = "postgres"
            plugins = ["egress", "allow"]

            [plugins.egress]
            wasm = "{egress}"
            config.routes.pg17 = {{ remote = "{remote}", server_name = "db.dstack.test", protocol = "postgres-sslrequest", alpn = ["postgresql"], client_cert = "app" }}

            [plugins.allow]
            wasm = "{{attestation_allowlist}}"
            config = {{ require_verified = false, rules = [ {{ side = "upstream", mrtd = ["{sidecar}"] }} ] }}

            [certificates.app]
            cert = {cert}
            key = {key}
            "#,
            // The 0.2.0 build has no `tls-start`: it refuses `alpn` here.
            egress = weir_tests::plugin_current("egress").display(),
            remote = server.addr,
            sidecar = hex(&SIDECAR_MRTD),
            cert = toml_path(&cert),
            key = toml_path(&key),
        ),
    );
    let mut egress = WeirProcess::spawn(&config).await;
    assert_eq!(
        query(egress.addr("pg17").port(), "select 'both'").await.as_deref(),
        Ok("both")
    );
    let (first, alpn) = tokio::time::timeout(STEP, rx.recv())
        .await
        .expect("the server reported in time")
        .expect("the server is running");
    assert_eq!(first, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f], "an SSLRequest came first");
    assert_eq!(alpn.as_deref(), Some(&b"postgresql"[..]));
    let line = egress.connection_line().await;
    assert!(line.contains(r#"mode="originate""#), "{line}");
}
