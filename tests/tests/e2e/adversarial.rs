//! The adversarial suite: hostile first flights, PostgreSQL tricks, hostile
//! plugins and tenants, resumption across a changed config, and peers that
//! half-close. Every case asserts what happened to it (refused before any
//! upstream saw a byte, or routed by its real name and replayed byte for
//! byte) *and* that the traffic beside it was unharmed: while each test runs,
//! bystanders connect through the same gateway without pause, and a stream
//! opened before the first case must still echo byte-exact after the last.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weir::Gateway;
use weir_tests::{
    Identity, Pki, STEP, Upstream, answer_with, echo, next_report, pattern, read_to_end, recording_upstream,
    start_gateway, start_gateway_file, testdata, tls_connect, toml_path, write_config,
};

/// A config whose `public` listener (with `listener` lines added) runs the
/// static router `router` with `routes` and the bystanders' route
/// (`c.example.com`, the name in curl's captured hello, to `echo`), then
/// `rest`, which starts with a table of its own.
fn public_config(listener: &str, routes: &str, rest: &str, echo: &Upstream) -> String {
    format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = ["router"]
        {listener}

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."c.example.com" = {{ pool = "bystanders" }}
        {routes}

        [pools.bystanders]
        servers = ["{echo}"]

        {rest}
        "#,
        echo = echo.addr
    )
}

/// Clients that use the gateway while a test attacks it: a fresh connection
/// every few milliseconds (real curl hello plus a payload, echoed back in
/// full), and one long-lived stream.
struct Bystanders {
    stop: Arc<AtomicBool>,
    churn: JoinHandle<(usize, Vec<String>)>,
    long_lived: TcpStream,
}

impl Bystanders {
    /// The echo server the bystanders' route names (see [`public_config`]).
    async fn upstream() -> Upstream {
        Upstream::tcp(echo).await
    }

    async fn start(addr: SocketAddr) -> Bystanders {
        let hello = testdata("clienthello/curl-http2.bin");
        let mut long_lived = TcpStream::connect(addr).await.expect("long-lived stream");
        long_lived.write_all(&hello).await.expect("hello");
        let mut back = vec![0u8; hello.len()];
        tokio::time::timeout(STEP, long_lived.read_exact(&mut back))
            .await
            .expect("long-lived stream routed in time")
            .expect("long-lived stream routed");
        assert_eq!(back, hello);

        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let churn = tokio::spawn(async move {
            let (mut served, mut failures) = (0, Vec::new());
            let mut seed = 0u8;
            while !stopping.load(Ordering::SeqCst) {
                seed = seed.wrapping_add(1);
                let mut sent = hello.clone();
                sent.extend(pattern(4096, seed));
                let exchange = async {
                    let mut client = TcpStream::connect(addr).await?;
                    client.write_all(&sent).await?;
                    client.shutdown().await?;
                    read_to_end(&mut client).await
                };
                match exchange.await {
                    Ok(back) if back == sent => served += 1,
                    Ok(back) => failures.push(format!("echoed {} of {} bytes", back.len(), sent.len())),
                    Err(e) => failures.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (served, failures)
        });
        Bystanders {
            stop,
            churn,
            long_lived,
        }
    }

    /// Stops the churn and asserts nobody was harmed: every churned
    /// connection echoed in full, and the long-lived stream still does.
    async fn finish(mut self, what: &str) {
        self.stop.store(true, Ordering::SeqCst);
        let (served, failures) = self.churn.await.expect("bystander task");
        assert!(failures.is_empty(), "{what}: bystanders failed: {failures:?}");
        assert!(served >= 3, "{what}: only {served} bystander connections ran");
        let chunk = pattern(64 * 1024, 77);
        self.long_lived.write_all(&chunk).await.expect("long-lived write");
        let mut back = vec![0u8; chunk.len()];
        tokio::time::timeout(STEP, self.long_lived.read_exact(&mut back))
            .await
            .expect("long-lived stream answered in time")
            .expect("long-lived stream still open");
        assert!(back == chunk, "{what}: the long-lived stream was corrupted");
    }
}

/// A ClientHello built field by field, for shapes no real client sends.
struct Hello {
    record_version: u16,
    ciphers: Vec<u16>,
    extensions: Vec<(u16, Vec<u8>)>,
}

fn u16be(n: usize) -> [u8; 2] {
    u16::try_from(n).expect("fits 16 bits").to_be_bytes()
}

fn sni_extension(name: &[u8]) -> (u16, Vec<u8>) {
    let mut data = u16be(name.len() + 3).to_vec();
    data.push(0); // host_name
    data.extend(u16be(name.len()));
    data.extend_from_slice(name);
    (0x0000, data)
}

fn alpn_extension(names: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for name in names {
        list.push(u8::try_from(name.len()).expect("short name"));
        list.extend_from_slice(name);
    }
    let mut data = u16be(list.len()).to_vec();
    data.extend(list);
    (0x0010, data)
}

/// An encrypted_client_hello extension of the outer kind (draft-ietf-tls-
/// esni): HPKE suite, config id, a 32-byte encapsulated key, and a payload
/// only the real server could open.
fn ech_outer() -> Vec<u8> {
    let mut data = vec![0, 0x00, 0x20, 0x00, 0x01, 0x42];
    data.extend(u16be(32));
    data.extend(pattern(32, 4));
    data.extend(u16be(144));
    data.extend(pattern(144, 5));
    data
}

/// supported_versions offering TLS 1.3 only.
fn tls13_only() -> (u16, Vec<u8>) {
    (0x002b, vec![2, 0x03, 0x04])
}

impl Hello {
    /// A TLS 1.3 hello for `name` in a record with version 0x0301, as
    /// OpenSSL and browsers send it.
    fn to(name: &[u8]) -> Hello {
        Hello {
            record_version: 0x0301,
            ciphers: vec![0x1301, 0x1302, 0x1303],
            extensions: vec![sni_extension(name), tls13_only()],
        }
    }

    fn with(mut self, extension: (u16, Vec<u8>)) -> Hello {
        self.extensions.push(extension);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend(pattern(32, 1)); // random
        body.push(32);
        body.extend(pattern(32, 2)); // legacy session id
        body.extend(u16be(self.ciphers.len() * 2));
        for cipher in &self.ciphers {
            body.extend(cipher.to_be_bytes());
        }
        body.extend([1, 0]); // null compression
        let mut extensions = Vec::new();
        for (kind, data) in &self.extensions {
            extensions.extend(kind.to_be_bytes());
            extensions.extend(u16be(data.len()));
            extensions.extend(data);
        }
        body.extend(u16be(extensions.len()));
        body.extend(extensions);
        let mut handshake = vec![1];
        handshake.extend(&u32::try_from(body.len()).expect("length").to_be_bytes()[1..]);
        handshake.extend(body);
        let mut record = vec![22];
        record.extend(self.record_version.to_be_bytes());
        record.extend(u16be(handshake.len()));
        record.extend(handshake);
        record
    }
}

/// Re-frames a one-record hello into several records, cutting the
/// handshake message at `cuts` (offsets into it).
fn reframe(record: &[u8], cuts: &[usize]) -> Vec<u8> {
    let handshake = &record[5..];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(handshake.len());
    let mut out = Vec::new();
    for piece in bounds.windows(2) {
        out.extend(&record[..3]);
        out.extend(u16be(piece[1] - piece[0]));
        out.extend(&handshake[piece[0]..piece[1]]);
    }
    out
}

/// Reads until the gateway closes; a refusal may carry one TLS alert
/// record and nothing else.
async fn expect_refused(stream: &mut TcpStream, what: &str) {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(
        got.is_empty() || (got.len() == 7 && got[0] == 0x15 && got[5] == 2),
        "{what}: got {got:02x?} instead of a close or one fatal alert"
    );
}

/// How a hostile first flight must end.
enum Expect {
    /// Replayed byte for byte to the pool `a` or `f` upstream.
    RoutedTo(char),
    /// Closed before routing; no upstream sees it.
    Refused,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_first_flights_are_refused_or_routed_by_their_real_name() {
    let (a, mut a_rx) = recording_upstream().await;
    let (f, mut f_rx) = recording_upstream().await;
    let (other, _other_rx) = recording_upstream().await;
    let echo = Bystanders::upstream().await;
    let gateway = start_gateway(&public_config(
        "",
        r#"
        config.routes."a.example.com" = { pool = "a" }
        config.routes."f.example.com" = { pool = "f" }
        config.no_sni = { pool = "other" }
        config.default = { pool = "other" }
        "#,
        &format!(
            "[pools.a]\nservers = [\"{}\"]\n[pools.f]\nservers = [\"{}\"]\n[pools.other]\nservers = [\"{}\"]\n",
            a.addr, f.addr, other.addr
        ),
        &echo,
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    let bystanders = Bystanders::start(addr).await;

    let openssl = testdata("clienthello/openssl-tls13-sni.bin");
    let sni_at = openssl
        .windows(13)
        .position(|w| w == b"a.example.com")
        .expect("the capture names a.example.com");
    // Handshake offsets: the record header is 5 bytes.
    let inside_sni = sni_at - 5 + 6;
    let mut oversized_record = vec![22, 0x03, 0x01, 0x40, 0x01];
    oversized_record.extend(pattern(16385, 3));
    let ech_and_grease = Hello {
        record_version: 0x0301,
        ciphers: vec![0x2a2a, 0x1301, 0x1302],
        extensions: vec![
            (0x3a3a, Vec::new()),
            sni_extension(b"a.example.com"),
            (0xfe0d, ech_outer()),
            (0x002b, vec![4, 0x5a, 0x5a, 0x03, 0x04]),
            alpn_extension(&[b"h2"]),
            (0x1a1a, vec![0]),
        ],
    };
    let long_name = format!("{}.example.com", ["a"; 150].join("."));
    let duplicate_sni = Hello::to(b"a.example.com").with(sni_extension(b"f.example.com"));
    let duplicate_alpn = Hello::to(b"a.example.com")
        .with(alpn_extension(&[b"h2"]))
        .with(alpn_extension(&[b"http/1.1"]));
    let mut empty_alpns = u16be(10_000).to_vec();
    empty_alpns.extend(vec![0u8; 10_000]);
    let empty_alpn = Hello::to(b"a.example.com").with((0x0010, empty_alpns));

    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "records cut inside the server name",
            reframe(&openssl, &[inside_sni, inside_sni + 40]),
            Expect::RoutedTo('a'),
        ),
        (
            "Chromium's 2 KB post-quantum hello with ECH GREASE",
            testdata("clienthello/chromium-pq-ech.bin"),
            Expect::RoutedTo('f'),
        ),
        (
            "ECH outer hello with GREASE ciphers, extensions and versions",
            ech_and_grease.bytes(),
            Expect::RoutedTo('a'),
        ),
        (
            "TLS 1.3-only hello in a 0x0301 record",
            Hello::to(b"a.example.com").bytes(),
            Expect::RoutedTo('a'),
        ),
        (
            "mixed-case name",
            Hello::to(b"A.Example.COM").bytes(),
            Expect::RoutedTo('a'),
        ),
        (
            "name with a trailing dot",
            Hello::to(b"a.example.com.").bytes(),
            Expect::RoutedTo('a'),
        ),
        ("record of 16 KiB + 1", oversized_record, Expect::Refused),
        ("zeros", vec![0; 64], Expect::Refused),
        (
            "HTTP",
            b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n".to_vec(),
            Expect::Refused,
        ),
        (
            "SSLv2 hello",
            vec![0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10],
            Expect::Refused,
        ),
        (
            "IP literal as the name",
            Hello::to(b"127.0.0.1").bytes(),
            Expect::Refused,
        ),
        (
            "NUL in the name",
            Hello::to(b"a.example\0.com").bytes(),
            Expect::Refused,
        ),
        (
            "name over 255 bytes",
            Hello::to(long_name.as_bytes()).bytes(),
            Expect::Refused,
        ),
        ("two server_name extensions", duplicate_sni.bytes(), Expect::Refused),
        ("two ALPN extensions", duplicate_alpn.bytes(), Expect::Refused),
        ("10,000 empty ALPN names", empty_alpn.bytes(), Expect::Refused),
    ];
    for (what, bytes, expect) in cases {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        match expect {
            Expect::RoutedTo(pool) => {
                let mut sent = bytes;
                sent.extend_from_slice(b"bytes after the hello");
                client.write_all(&sent).await.expect("send");
                client.shutdown().await.expect("FIN");
                let rx = if pool == 'a' { &mut a_rx } else { &mut f_rx };
                let got = next_report(rx).await;
                assert!(
                    got == sent,
                    "{what}: pool {pool} got {} bytes, {} sent",
                    got.len(),
                    sent.len()
                );
            }
            Expect::Refused => {
                // The gateway may close before all of it is written.
                let _ = client.write_all(&bytes).await;
                expect_refused(&mut client, what).await;
            }
        }
    }

    // One byte per segment, 2 ms apart: slow, but a hello all the same.
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.set_nodelay(true).expect("nodelay");
    for byte in &openssl {
        client.write_all(std::slice::from_ref(byte)).await.expect("a byte");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    client.shutdown().await.expect("FIN");
    assert_eq!(next_report(&mut a_rx).await, openssl, "one byte per segment");

    assert_eq!(
        other.accepted(),
        0,
        "a refused or renamed hello reached the default pool"
    );
    bystanders.finish("hostile first flights").await;
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_clients_and_upstreams_that_break_the_sslrequest_rules_are_cut_off() {
    // `good` answers `S` as PostgreSQL does and records the rest; `rogue`
    // answers `S` with bytes after it, which would be injected into the
    // client's TLS stream were they relayed.
    let (good_reports_tx, mut good_reports) = mpsc::unbounded_channel();
    let good = Upstream::tcp(move |mut stream: TcpStream| {
        let reports = good_reports_tx.clone();
        async move {
            let mut request = [0u8; 8];
            if stream.read_exact(&mut request).await.is_ok() && request == SSL_REQUEST {
                let _ = stream.write_all(b"S").await;
                if let Ok(rest) = read_to_end(&mut stream).await {
                    let _ = reports.send(rest);
                }
            }
        }
    })
    .await;
    let (rogue_tx, mut rogue_reports) = mpsc::unbounded_channel();
    let rogue = Upstream::tcp(move |mut stream: TcpStream| {
        let reports = rogue_tx.clone();
        async move {
            let mut request = [0u8; 8];
            if stream.read_exact(&mut request).await.is_ok() {
                let _ = stream.write_all(b"S\x15\x03\x03\x00\x02injected").await;
                let rest = read_to_end(&mut stream).await.unwrap_or_default();
                let _ = reports.send((request, rest));
            }
        }
    })
    .await;
    let echo = Bystanders::upstream().await;
    let gateway = start_gateway(&public_config(
        "",
        &format!(
            r#"
            config.routes."pg.example.com" = {{ address = "{}" }}
            config.routes."rogue.example.com" = {{ address = "{}" }}
            "#,
            good.addr, rogue.addr
        ),
        r#"
        [listeners.pg]
        bind = "127.0.0.1:0"
        protocol = "postgres"
        plugins = ["router"]
        sniff_timeout = "1s"
        "#,
        &echo,
    ))
    .await;
    let pg = gateway.local_addr("pg").expect("pg listener");
    let bystanders = Bystanders::start(gateway.local_addr("public").expect("public")).await;
    let psql_hello = testdata("clienthello/psql-sni-clienthello.bin");

    // SSLRequest with a query behind it: never answered `S`.
    let mut client = TcpStream::connect(pg).await.expect("connect");
    let mut request = SSL_REQUEST.to_vec();
    request.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
    client.write_all(&request).await.expect("write");
    assert_eq!(read_to_end(&mut client).await.unwrap_or_default(), b"", "answered");

    // SSLRequest, `S`, then silence: closed at the 1 s sniff deadline.
    let started = Instant::now();
    let mut client = TcpStream::connect(pg).await.expect("connect");
    client.write_all(&SSL_REQUEST).await.expect("write");
    let mut s = [0u8; 1];
    client.read_exact(&mut s).await.expect("answer");
    assert_eq!(&s, b"S");
    assert_eq!(read_to_end(&mut client).await.expect("closed in time"), b"");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "stalled client closed after {waited:?}, not at the 1 s deadline"
    );

    // An upstream answering `S` plus bytes: the client gets an alert, and
    // neither the injected bytes nor the client's hello cross.
    let rogue_hello = Hello::to(b"rogue.example.com").bytes();
    let mut client = TcpStream::connect(pg).await.expect("connect");
    client.write_all(&SSL_REQUEST).await.expect("write");
    client.read_exact(&mut s).await.expect("answer");
    assert_eq!(&s, b"S");
    client.write_all(&rogue_hello).await.expect("hello");
    let reply = read_to_end(&mut client).await.unwrap_or_default();
    assert_eq!(
        reply,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 80],
        "one internal_error alert"
    );
    let (request, rest) = tokio::time::timeout(STEP, rogue_reports.recv())
        .await
        .expect("rogue upstream reported")
        .expect("rogue upstream running");
    assert_eq!(request, SSL_REQUEST, "weir's own SSLRequest");
    assert_eq!(rest, b"", "the client's hello reached a rogue upstream");

    // And a well-behaved psql flight goes through, hello byte-exact.
    let mut client = TcpStream::connect(pg).await.expect("connect");
    client.write_all(&SSL_REQUEST).await.expect("write");
    client.read_exact(&mut s).await.expect("answer");
    assert_eq!(&s, b"S");
    client.write_all(&psql_hello).await.expect("hello");
    client.shutdown().await.expect("FIN");
    assert_eq!(next_report(&mut good_reports).await, psql_hello);

    bystanders.finish("PostgreSQL tricks").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_and_tenants_cost_only_their_own_connections() {
    let (acme, mut acme_rx) = recording_upstream().await;
    let echo = Bystanders::upstream().await;
    let misbehaving = [
        "trap",
        "loop",
        "alloc",
        "unknown-pool",
        "bad-address",
        "bad-proxy-version",
        "empty-route",
    ];
    let mut plugins = String::new();
    for mode in misbehaving {
        plugins.push_str(&format!(
            "[plugins.{mode}]\nwasm = \"{{misbehave}}\"\nconfig = {{ mode = \"{mode}\", only_sni = \"{mode}.example.com\" }}\n"
        ));
    }
    let chain = misbehaving
        .iter()
        .chain(&["router"])
        .map(|name| format!("\"{name}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let gateway = start_gateway(&format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:0"
        plugins = [{chain}]

        {plugins}

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."c.example.com" = {{ pool = "bystanders" }}

        [plugins.acme-router]
        wasm = "{{static_router}}"
        config.default = {{ pool = "acme" }}

        [plugins.evil-router]
        wasm = "{{static_router}}"
        config.routes."pool.evil.test" = {{ pool = "acme" }}
        config.routes."addr.evil.test" = {{ address = "{acme}" }}

        [pools.acme]
        servers = ["{acme}"]
        [pools.bystanders]
        servers = ["{bystanders}"]

        [tenants.acme]
        domains = ["acme.test"]
        plugins = ["acme-router"]
        pools = ["acme"]

        [tenants.evil]
        domains = ["evil.test"]
        plugins = ["evil-router"]
        upstreams = ["10.0.0.0/8"]
        "#,
        acme = acme.addr,
        bystanders = echo.addr,
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    let bystanders = Bystanders::start(addr).await;

    let mut hostile: Vec<String> = misbehaving.iter().map(|mode| format!("{mode}.example.com")).collect();
    // A tenant naming another tenant's pool, or an address it does not own.
    hostile.push("pool.evil.test".into());
    hostile.push("addr.evil.test".into());
    for round in 0..3 {
        for name in &hostile {
            let mut client = TcpStream::connect(addr).await.expect("connect");
            client
                .write_all(&Hello::to(name.as_bytes()).bytes())
                .await
                .expect("hello");
            expect_refused(&mut client, &format!("{name} (round {round})")).await;
        }
    }
    assert_eq!(acme.accepted(), 0, "a hostile decision reached acme's upstream");

    // acme's own name still reaches acme, after the plugins' instances
    // were discarded and rebuilt three times over.
    let hello = Hello::to(b"www.acme.test").bytes();
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&hello).await.expect("hello");
    client.shutdown().await.expect("FIN");
    assert_eq!(next_report(&mut acme_rx).await, hello);
    bystanders.finish("hostile plugins").await;
}

/// A gateway config with tenants `stay` and (optionally) `gone`, each
/// sending its names to its own echo server.
fn tenant_config(stay: SocketAddr, gone: Option<SocketAddr>, echo: &Upstream) -> String {
    let mut tenants = format!(
        r#"
        [plugins.stay-router]
        wasm = "{{static_router}}"
        config.default = {{ address = "{stay}" }}

        [tenants.stay]
        domains = ["stay.test"]
        plugins = ["stay-router"]
        upstreams = ["127.0.0.1/32"]
        "#
    );
    if let Some(gone) = gone {
        tenants.push_str(&format!(
            r#"
            [plugins.gone-router]
            wasm = "{{static_router}}"
            config.default = {{ address = "{gone}" }}

            [tenants.gone]
            domains = ["gone.test"]
            plugins = ["gone-router"]
            upstreams = ["127.0.0.1/32"]
            "#
        ));
    }
    public_config(
        "",
        r#"config.default = { reject = "no tenant owns this name" }"#,
        &tenants,
        echo,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_tenant_that_holds_many_connections_drops_none_of_them() {
    const HELD: usize = 200;
    let dir = tempfile::tempdir().expect("temp dir");
    let stay = Upstream::tcp(echo).await;
    let gone = Upstream::tcp(echo).await;
    let echo_upstream = Bystanders::upstream().await;
    let (gateway, path) =
        start_gateway_file(dir.path(), &tenant_config(stay.addr, Some(gone.addr), &echo_upstream)).await;
    let addr = gateway.local_addr("public").expect("listener");
    let bystanders = Bystanders::start(addr).await;

    let gone_hello = Hello::to(b"db.gone.test").bytes();
    let mut held = Vec::new();
    for _ in 0..HELD {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&gone_hello).await.expect("hello");
        let mut back = vec![0u8; gone_hello.len()];
        tokio::time::timeout(STEP, stream.read_exact(&mut back))
            .await
            .expect("routed in time")
            .expect("routed to gone's upstream");
        held.push(stream);
    }
    assert_eq!(gone.accepted(), HELD);

    write_config(dir.path(), &tenant_config(stay.addr, None, &echo_upstream));
    let report = gateway.reload("test").await;
    assert_eq!(report.error, None, "reload");
    assert!(path.exists());

    // New connections for the removed tenant's names take the listener's
    // chain, which refuses them; the remaining tenant is served.
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&gone_hello).await.expect("hello");
    expect_refused(&mut client, "a name of the removed tenant").await;
    assert_eq!(gone.accepted(), HELD);
    let stay_hello = Hello::to(b"www.stay.test").bytes();
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(&stay_hello).await.expect("hello");
    client.shutdown().await.expect("FIN");
    assert_eq!(read_to_end(&mut client).await.expect("stay served"), stay_hello);

    // Every connection the removed tenant held still relays, byte-exact,
    // on the snapshot it started with.
    for (i, stream) in held.iter_mut().enumerate() {
        let chunk = pattern(1024, i as u8);
        stream.write_all(&chunk).await.expect("held write");
        let mut back = vec![0u8; chunk.len()];
        tokio::time::timeout(STEP, stream.read_exact(&mut back))
            .await
            .expect("held connection answered in time")
            .expect("held connection still open");
        assert!(back == chunk, "held connection {i} corrupted");
    }
    drop(held);
    bystanders.finish("removing a tenant").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_after_a_ca_or_route_change_is_a_full_handshake() {
    let dir = tempfile::tempdir().expect("temp dir");
    let site = Pki::new("weir site CA");
    let old_clients = Pki::new("old client CA");
    let new_clients = Pki::new("new client CA");
    let one = Upstream::tcp(|s| answer_with(s, " (one)".into())).await;
    let two = Upstream::tcp(|s| answer_with(s, " (two)".into())).await;
    let echo_upstream = Bystanders::upstream().await;
    let (cert, key) = site.server(&["web.test"]).write(dir.path(), "site");
    let old_ca = toml_path(&old_clients.write_ca(dir.path(), "old"));
    let new_ca = toml_path(&new_clients.write_ca(dir.path(), "new"));
    let config = |client_ca: &str, open_to: SocketAddr| {
        public_config(
            "",
            "",
            &format!(
                r#"
                [listeners.strict]
                bind = "127.0.0.1:0"
                plugins = ["strict"]
                [listeners.open]
                bind = "127.0.0.1:0"
                plugins = ["open"]

                [plugins.strict]
                wasm = "{{static_router}}"
                config.routes."web.test" = {{ address = "{one}", terminate = {{ client_auth = "required", client_ca = "clients" }} }}
                [plugins.open]
                wasm = "{{static_router}}"
                config.routes."web.test" = {{ address = "{open_to}", terminate = {{}} }}

                [cas.clients]
                file = {client_ca}
                [certificates.site]
                cert = {cert}
                key = {key}
                "#,
                one = one.addr,
                cert = toml_path(&cert),
                key = toml_path(&key),
            ),
            &echo_upstream,
        )
    };
    let (gateway, _) = start_gateway_file(dir.path(), &config(&old_ca, one.addr)).await;
    let strict = gateway.local_addr("strict").expect("strict");
    let open = gateway.local_addr("open").expect("open");
    let bystanders = Bystanders::start(gateway.local_addr("public").expect("public")).await;

    let client_of = |identity: Option<Identity>, version: &'static rustls::SupportedProtocolVersion| {
        site.client_config_for(&[version], identity.as_ref())
    };
    /// One exchange: what the upstream answered, and how the handshake went.
    async fn visit(addr: SocketAddr, client: &Arc<rustls::ClientConfig>) -> (String, Option<rustls::HandshakeKind>) {
        let Ok(Ok(mut tls)) = tokio::time::timeout(STEP, tls_connect(addr, "web.test", Arc::clone(client))).await
        else {
            return (String::new(), None);
        };
        let kind = tls.get_ref().1.handshake_kind();
        if tls.write_all(b"hi\n").await.is_err() || tls.flush().await.is_err() {
            return (String::new(), kind);
        }
        let answer = read_to_end(&mut tls).await.unwrap_or_default();
        (String::from_utf8_lossy(&answer).into_owned(), kind)
    }

    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let strict_clients: Vec<_> = versions
        .iter()
        .map(|v| client_of(Some(old_clients.client("carol")), v))
        .collect();
    let open_clients: Vec<_> = versions.iter().map(|v| client_of(None, v)).collect();
    // Before the change, sessions are issued and honoured.
    for (strict_client, open_client) in strict_clients.iter().zip(&open_clients) {
        for (addr, client) in [(strict, strict_client), (open, open_client)] {
            assert_eq!(visit(addr, client).await.1, Some(rustls::HandshakeKind::Full));
            let (answer, kind) = visit(addr, client).await;
            assert_eq!(answer, "upstream heard: hi (one)\n");
            assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "resumption works at all");
        }
    }

    // The client CA changes, and the open route moves to another upstream.
    write_config(dir.path(), &config(&new_ca, two.addr));
    assert_eq!(gateway.reload("test").await.error, None);
    let served_by_one = one.accepted();
    for (strict_client, open_client) in strict_clients.iter().zip(&open_clients) {
        // A session from under the old CA does not carry a client the new
        // CA never signed past client authentication.
        let (answer, _) = visit(strict, strict_client).await;
        assert_eq!(answer, "", "an old-CA client was served after the CA changed");
        // A session from before the route change does not resume into it.
        let (answer, kind) = visit(open, open_client).await;
        assert_eq!(kind, Some(rustls::HandshakeKind::Full), "resumed across a route change");
        assert_eq!(answer, "upstream heard: hi (two)\n");
    }
    assert_eq!(one.accepted(), served_by_one, "the old route's upstream was reached");
    // A certificate from the new CA, but for email only, is no client
    // certificate; a proper one is served.
    let email_only = new_clients.client_with_usage("eve", vec![rcgen::ExtendedKeyUsagePurpose::EmailProtection]);
    let (answer, _) = visit(strict, &client_of(Some(email_only), &rustls::version::TLS13)).await;
    assert_eq!(answer, "", "an email-only certificate was accepted");
    let (answer, _) = visit(
        strict,
        &client_of(Some(new_clients.client("carol")), &rustls::version::TLS13),
    )
    .await;
    assert_eq!(answer, "upstream heard: hi (one)\n", "a new-CA client is served");
    bystanders.finish("resumption across reloads").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closing_peers_get_their_answers_and_are_reaped_at_the_linger_timeout() {
    // Answers 1 MiB once it has seen the request and its FIN.
    let answering = Upstream::tcp(|mut stream: TcpStream| async move {
        if read_to_end(&mut stream).await.is_ok() {
            let _ = stream.write_all(&pattern(1 << 20, 5)).await;
            let _ = stream.shutdown().await;
        }
    })
    .await;
    // Takes the request and its FIN, then neither answers nor closes.
    let silent = Upstream::tcp(|mut stream: TcpStream| async move {
        let _ = read_to_end(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let echo_upstream = Bystanders::upstream().await;
    let gateway = start_gateway(&public_config(
        "idle_timeout = \"30s\"\nhalf_close_timeout = \"1s\"",
        &format!(
            r#"
            config.routes."answer.test" = {{ address = "{}" }}
            config.routes."silent.test" = {{ address = "{}" }}
            "#,
            answering.addr, silent.addr
        ),
        "",
        &echo_upstream,
    ))
    .await;
    let addr = gateway.local_addr("public").expect("listener");
    let bystanders = Bystanders::start(addr).await;

    // SHUT_WR after the request: the whole answer still arrives.
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(&Hello::to(b"answer.test").bytes())
        .await
        .expect("hello");
    client.write_all(b"the request").await.expect("request");
    client.shutdown().await.expect("SHUT_WR");
    let answer = read_to_end(&mut client).await.expect("answer");
    assert!(answer == pattern(1 << 20, 5), "got {} of 1 MiB", answer.len());

    // A peer that half-closes and then holds on is reaped after 1 s, not
    // the 30 s idle timeout.
    let started = Instant::now();
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(&Hello::to(b"silent.test").bytes())
        .await
        .expect("hello");
    client.shutdown().await.expect("SHUT_WR");
    assert_eq!(read_to_end(&mut client).await.expect("reaped"), b"");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "reaped after {waited:?}, not at the 1 s half-close timeout"
    );
    bystanders.finish("half-closing peers").await;
    drop(gateway);
}

/// Keeps the helpers honest: a gateway that is gone fails the bystanders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bystanders_notice_a_gateway_that_stops_serving() {
    let echo_upstream = Bystanders::upstream().await;
    let gateway: Gateway = start_gateway(&public_config("", "", "", &echo_upstream)).await;
    let addr = gateway.local_addr("public").expect("listener");
    let bystanders = Bystanders::start(addr).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(gateway);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let outcome = tokio::spawn(bystanders.finish("stopped gateway")).await;
    assert!(outcome.is_err(), "the bystanders did not notice the gateway stop");
}

/// Decisions built to hurt: a target that is weir's own listener (a loop),
/// a pool name with a newline (a forged log line), a route name that would
/// forge a metric label, a reject reason of 2 KiB. Each costs only its own
/// connection: refused, or counted under an escaped label, while the
/// bystanders are served and the scrape stays valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_decisions_cost_only_their_own_connection() {
    let echo = Bystanders::upstream().await;
    let port = weir_tests::free_port();
    let config = format!(
        r#"
        [listeners.public]
        bind = "127.0.0.1:{port}"
        plugins = ["router", "label"]

        [plugins.label]
        wasm = "{{misbehave}}"
        config = {{ mode = "named-route", only_sni = "label.example.com", pool = "bystanders", route = 'x",outcome="fake' }}

        [plugins.router]
        wasm = "{{static_router}}"
        config.routes."c.example.com" = {{ pool = "bystanders" }}
        config.routes."loop.example.com" = {{ address = "127.0.0.1:{port}" }}
        config.routes."newline.example.com" = {{ pool = "x\n2026-12-01T00:00:00Z  INFO weir::gateway: connection id=0" }}
        config.routes."reason.example.com" = {{ reject = "{reason}" }}

        [pools.bystanders]
        servers = ["{echo}"]
        "#,
        reason = "r".repeat(2048),
        echo = echo.addr,
    );
    let gateway = start_gateway(&config).await;
    let addr = gateway.local_addr("public").expect("listener");
    assert_eq!(addr.port(), port);
    let bystanders = Bystanders::start(addr).await;
    for round in 0..3 {
        for name in ["loop.example.com", "newline.example.com", "reason.example.com"] {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(&Hello::to(name.as_bytes()).bytes())
                .await
                .expect("hello");
            expect_refused(&mut stream, &format!("{name}, round {round}")).await;
        }
        let hello = Hello::to(b"label.example.com").bytes();
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&hello).await.expect("hello");
        let mut back = vec![0u8; hello.len()];
        tokio::time::timeout(STEP, stream.read_exact(&mut back))
            .await
            .expect("routed in time")
            .expect("routed");
        assert_eq!(back, hello);
    }
    // The loop was never entered: the refused connections are the only
    // ones weir accepted for it.
    let total = gateway.stats()["public"].total.load(Ordering::Relaxed);
    assert!(total < 100, "{total} connections accepted: weir looped into itself");
    // Long enough for the bystanders to have run beside every case.
    tokio::time::sleep(Duration::from_millis(100)).await;
    bystanders.finish("hostile decisions").await;
    // Every line of the scrape is a comment or one well-formed sample; the
    // forged label is one escaped value.
    let text = weir::metrics::METRICS.encode();
    let forged = r#"route="x\",outcome=\"fake""#;
    assert!(text.contains(forged), "{text}");
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let labels = line
            .split_once('{')
            .map_or("", |(_, rest)| rest.rsplit_once('}').map_or("", |(l, _)| l));
        let unescaped_quotes = labels.replace("\\\\", "").replace("\\\"", "").matches('"').count();
        assert!(unescaped_quotes % 2 == 0, "a malformed sample: {line}");
        assert!(!labels.contains("outcome=\"fake"), "a forged label: {line}");
    }
}
