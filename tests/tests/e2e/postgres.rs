//! PostgreSQL clients on a `postgres` listener: `psql` against a real
//! PostgreSQL server through passthrough, terminate → plain and terminate →
//! re-encrypt, with `sslmode=require` and `verify-full`; and the refusals
//! around the SSLRequest (extra bytes, a stalled client, an upstream that
//! will not speak TLS, a plain client with no route).

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_tests::{
    Pki, Postgres, STEP, Upstream, psql_async as query, read_to_end, recording_upstream, start_gateway, toml_path,
};
use weir_wire::postgres::SSL_REQUEST;

const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reaches_postgres_through_passthrough_termination_and_reencryption() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_pki = Pki::new("database CA");
    let weir_pki = Pki::new("weir CA");
    let server = tokio::task::spawn_blocking({
        let identity = db_pki.server(&["db.test"]);
        move || Postgres::start(&identity)
    })
    .await
    .expect("postgres task");
    let db = format!("127.0.0.1:{}", server.port);
    let db_ca = db_pki.write_ca(dir.path(), "db-ca");
    let weir_ca = weir_pki.write_ca(dir.path(), "weir-ca");
    let (cert, key) = weir_pki
        .server(&["db-plain.test", "db-re.test"])
        .write(dir.path(), "weir");
    let gateway = start_gateway(&format!(
        r#"
        [listeners.pg]
        bind = "127.0.0.1:0"
        protocol = "postgres"
        plugins = ["router"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."db.test" = {{ address = "{db}" }}
        config.routes."db-plain.test" = {{ address = "{db}", terminate = {{}} }}
        config.routes."db-re.test" = {{ address = "{db}", terminate = {{ reencrypt = {{ ca = "db", server_name = "db.test" }} }} }}
        config.no_sni = {{ address = "{db}" }}

        [certificates.weir]
        cert = {cert}
        key = {key}

        [cas.db]
        file = {db_ca}
        "#,
        cert = toml_path(&cert),
        key = toml_path(&key),
        db_ca = toml_path(&db_ca),
    ))
    .await;
    let port = gateway.local_addr("pg").expect("listener").port();
    let conninfo = |host: &str, sslmode: &str, ca: &Path| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres sslmode={sslmode} sslrootcert={}",
            ca.display()
        )
    };
    // `ssl` says whether PostgreSQL itself saw TLS on its connection.
    let sql = "select 41 + 1, ssl from pg_stat_ssl where pid = pg_backend_pid()";
    let cases = [
        ("db.test", "require", &db_ca, "42|t"),
        ("db.test", "verify-full", &db_ca, "42|t"),
        ("db-plain.test", "require", &weir_ca, "42|f"),
        ("db-plain.test", "verify-full", &weir_ca, "42|f"),
        ("db-re.test", "verify-full", &weir_ca, "42|t"),
    ];
    for (host, sslmode, ca, expected) in cases {
        let answer = query(conninfo(host, sslmode, ca), sql).await;
        assert_eq!(answer.as_deref(), Ok(expected), "{host} with sslmode={sslmode}");
    }
    // verify-full notices whose certificate it got: the database's CA does
    // not vouch for weir's terminating certificate.
    let wrong = query(conninfo("db-plain.test", "verify-full", &db_ca), sql).await;
    assert!(
        wrong.as_ref().is_err_and(|e| e.contains("certificate verify failed")),
        "{wrong:?}"
    );
    // A client without TLS takes the chain's plain route (no SNI).
    let plain = query(
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"),
        sql,
    )
    .await;
    assert_eq!(plain.as_deref(), Ok("42|f"));
}

/// A gateway whose `postgres` listener routes `pg.example.com` (the SNI of
/// the captured psql hello) through to
/// `upstream`, terminates `direct.test`, and has no plain route.
async fn gateway_to(upstream: std::net::SocketAddr, dir: &Path, pki: &Pki) -> weir::Gateway {
    let (cert, key) = pki.server(&["direct.test"]).write(dir, "site");
    start_gateway(&format!(
        r#"
        [listeners.pg]
        bind = "127.0.0.1:0"
        protocol = "postgres"
        sniff_timeout = "500ms"
        plugins = ["router"]

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."pg.example.com" = {{ address = "{upstream}" }}
        config.routes."direct.test" = {{ address = "{upstream}", terminate = {{ alpn = ["postgresql"] }} }}

        [certificates.site]
        cert = {cert}
        key = {key}
        "#,
        cert = toml_path(&cert),
        key = toml_path(&key),
    ))
    .await
}

/// Reads whatever arrives until EOF, within [`STEP`].
async fn rest(stream: &mut TcpStream) -> Vec<u8> {
    read_to_end(stream).await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sslrequest_is_answered_only_when_it_is_safe() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("weir CA");
    let (upstream, mut reports) = recording_upstream().await;
    let gateway = gateway_to(upstream.addr, dir.path(), &pki).await;
    let addr = gateway.local_addr("pg").expect("listener");

    // Bytes after the SSLRequest, before TLS: closed, never answered `S`.
    let mut client = TcpStream::connect(addr).await.expect("connect");
    let mut request = SSL_REQUEST.to_vec();
    request.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
    client.write_all(&request).await.expect("write");
    assert_eq!(rest(&mut client).await, b"", "no answer, only a close");

    // GSSENCRequest: `N`, then an SSLRequest gets its `S`.
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&GSSENC_REQUEST).await.expect("write");
    let mut answer = [0u8; 1];
    client.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"N");
    client.write_all(&SSL_REQUEST).await.expect("write");
    client.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"S");

    // A client that stalls after `S` is closed at the sniff deadline.
    let started = std::time::Instant::now();
    assert_eq!(rest(&mut client).await, b"");
    assert!(started.elapsed() < STEP);

    // A plain StartupMessage with no plain route: a PostgreSQL error, then close.
    let mut client = TcpStream::connect(addr).await.expect("connect");
    let mut startup = vec![0, 0, 0, 23, 0, 3, 0, 0];
    startup.extend_from_slice(b"user\0postgres\0\0");
    client.write_all(&startup).await.expect("write");
    let error = rest(&mut client).await;
    assert_eq!(error.first(), Some(&b'E'), "{error:?}");
    let text = String::from_utf8_lossy(&error);
    assert!(
        text.contains("08004") && text.contains("no plugin in the chain decided"),
        "{text}"
    );

    // Direct TLS (PostgreSQL 17): a ClientHello first, ALPN `postgresql`.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).expect("CA");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let mut tls = weir_tests::tls_connect(addr, "direct.test", Arc::new(config))
        .await
        .expect("direct TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    tls.write_all(&startup).await.expect("write");
    tls.shutdown().await.expect("close");
    assert_eq!(
        weir_tests::next_report(&mut reports).await,
        startup,
        "decrypted startup"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_must_answer_exactly_s() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new("weir CA");
    for (answer, expected) in [(&b"N"[..], "refused TLS"), (&b"SX"[..], "after `S`")] {
        let upstream = Upstream::tcp(move |mut stream: TcpStream| async move {
            let mut request = [0u8; 8];
            if stream.read_exact(&mut request).await.is_ok() && request == SSL_REQUEST {
                let _ = stream.write_all(answer).await;
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
            }
        })
        .await;
        let gateway = gateway_to(upstream.addr, dir.path(), &pki).await;
        let addr = gateway.local_addr("pg").expect("listener");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(&SSL_REQUEST).await.expect("write");
        let mut s = [0u8; 1];
        client.read_exact(&mut s).await.expect("answer");
        assert_eq!(&s, b"S");
        // The client's hello goes nowhere: weir answers with a fatal alert.
        let hello = weir_tests::testdata("clienthello/psql-sni-clienthello.bin");
        client.write_all(&hello).await.expect("write hello");
        let reply = rest(&mut client).await;
        assert_eq!(reply.first(), Some(&0x15), "{expected}: a TLS alert, got {reply:02x?}");
        assert_eq!(reply.get(6), Some(&80), "internal_error");
        assert_eq!(upstream.accepted(), 1);
    }
}
