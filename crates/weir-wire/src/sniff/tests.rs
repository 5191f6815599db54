use super::*;
use weir_testdata as testdata;

/// One entry of `clienthello/manifest.json`.
#[derive(serde::Deserialize)]
struct Capture {
    file: String,
    expected_sni: Option<String>,
    expected_alpn: Vec<String>,
}

fn captures() -> Vec<(Capture, Vec<u8>)> {
    let manifest = testdata::read("clienthello/manifest.json");
    let captures: Vec<Capture> = serde_json::from_slice(&manifest).expect("manifest parses");
    captures
        .into_iter()
        .map(|c| {
            let bytes = testdata::read(&format!("clienthello/{}", c.file));
            (c, bytes)
        })
        .collect()
}

fn complete(result: Result<Sniffed, SniffError>) -> ClientHello {
    match result {
        Ok(Sniffed::Hello(hello)) => hello,
        other => panic!("expected a complete hello, got {other:?}"),
    }
}

/// Asserts "need more bytes", with a hint that asks for at least one more
/// byte and never for more than the whole capture holds.
fn assert_incomplete(result: Result<Sniffed, SniffError>, have: usize, whole: usize, what: &str) {
    match result {
        Ok(Sniffed::Incomplete(needed)) => {
            assert!(
                needed > have && needed <= whole,
                "{what}: asks for {needed} with {have} of {whole}"
            )
        }
        other => panic!("{what}: expected incomplete, got {other:?}"),
    }
}

fn is_hello(file: &str) -> bool {
    !file.contains("sslrequest") && !file.contains("truncated") && !file.contains("reclen20000")
}

#[test]
fn real_client_hellos_yield_the_expected_sni_and_alpn() {
    let mut checked = 0;
    for (capture, bytes) in captures().into_iter().filter(|(c, _)| is_hello(&c.file)) {
        let hello = match parse_client_hello(&bytes) {
            Ok(Sniffed::Hello(hello)) => hello,
            other => panic!("{}: {other:?}", capture.file),
        };
        assert_eq!(hello.sni, capture.expected_sni, "{}", capture.file);
        assert_eq!(hello.alpn, capture.expected_alpn, "{}", capture.file);
        assert!(!hello.versions.is_empty(), "{}", capture.file);
        checked += 1;
    }
    assert!(checked >= 14, "only {checked} captures checked");
}

/// Every strict prefix of a real hello is "need more bytes", never an error
/// and never a wrong answer: the hello may arrive one byte per segment.
#[test]
fn every_prefix_of_a_real_hello_is_incomplete() {
    for (capture, bytes) in captures().into_iter().filter(|(c, _)| is_hello(&c.file)) {
        for end in 0..bytes.len() {
            let what = format!("{} prefix {end}", capture.file);
            assert_incomplete(parse_client_hello(&bytes[..end]), end, bytes.len(), &what);
        }
    }
}

#[test]
fn offered_versions_come_from_supported_versions() {
    let tls13 = complete(parse_client_hello(&testdata::read("clienthello/openssl-tls13-sni.bin")));
    assert_eq!(tls13.versions, vec![0x0304]);
    let tls12 = complete(parse_client_hello(&testdata::read("clienthello/openssl-tls12-sni.bin")));
    assert_eq!(tls12.versions, vec![0x0303]);
    // Chromium's GREASE version is dropped.
    let chromium = complete(parse_client_hello(&testdata::read("clienthello/chromium-pq-ech.bin")));
    assert_eq!(chromium.versions, vec![0x0304, 0x0303]);
}

#[test]
fn a_hello_split_over_three_records_is_reassembled() {
    let bytes = testdata::read("clienthello/synthetic-openssl-tls13-3records.bin");
    let hello = complete(parse_client_hello(&bytes));
    assert_eq!(hello.sni.as_deref(), Some("a.example.com"));
    for end in 0..bytes.len() {
        assert_incomplete(
            parse_client_hello(&bytes[..end]),
            end,
            bytes.len(),
            &format!("prefix {end}"),
        );
    }
}

#[test]
fn a_truncated_hello_asks_for_more() {
    let bytes = testdata::read("clienthello/synthetic-openssl-tls13-truncated-half.bin");
    // The hint asks for the rest of the record, which never comes.
    assert_eq!(parse_client_hello(&bytes), Ok(Sniffed::Incomplete(247)));
}

#[test]
fn an_oversized_record_is_refused_from_its_header() {
    let bytes = testdata::read("clienthello/synthetic-openssl-tls13-reclen20000.bin");
    assert_eq!(parse_client_hello(&bytes), Err(SniffError::RecordOverflow(20000)));
    assert_eq!(parse_client_hello(&bytes[..5]), Err(SniffError::RecordOverflow(20000)));
}

#[test]
fn a_postgres_ssl_request_is_not_tls() {
    let bytes = testdata::read("clienthello/psql-sslrequest.bin");
    assert!(matches!(parse_client_hello(&bytes), Err(SniffError::NotTls(_))));
}

#[test]
fn garbage_is_refused_on_the_first_byte_that_proves_it() {
    assert!(matches!(parse_client_hello(b"G"), Err(SniffError::NotTls(_))));
    assert!(matches!(
        parse_client_hello(b"GET / HTTP/1.1\r\n"),
        Err(SniffError::NotTls(_))
    ));
    assert!(matches!(parse_client_hello(&[0x16, 0x01]), Err(SniffError::NotTls(_))));
    assert!(matches!(parse_client_hello(&[0; 8]), Err(SniffError::NotTls(_))));
    // SSLv2-compatible hello: high bit set in the first byte.
    assert!(matches!(
        parse_client_hello(&[0x80, 0x2e, 0x01, 0x03, 0x01]),
        Err(SniffError::NotTls(_))
    ));
    assert_eq!(
        parse_client_hello(&[0x16, 0x03, 0x01, 0, 0]),
        Err(SniffError::EmptyRecord)
    );
    // A handshake record holding a ServerHello (type 2).
    assert_eq!(
        parse_client_hello(&[0x16, 0x03, 0x01, 0, 4, 2]),
        Err(SniffError::NotClientHello(2))
    );
}

/// Builds a one-record ClientHello around `extensions` (each `(type, body)`).
fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut ext = Vec::new();
    for (kind, body) in extensions {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(body.len() as u16).to_be_bytes());
        ext.extend_from_slice(body);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    frame(&body)
}

/// Wraps a ClientHello body in a handshake header and one record, whatever
/// its size (the record length field may then lie, as some tests want).
fn frame(body: &[u8]) -> Vec<u8> {
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len().min(0x4000) as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
    let mut entry = vec![0];
    entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
    entry.extend_from_slice(name);
    let mut body = (entry.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(&entry);
    (0, body)
}

fn alpn_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for name in names {
        list.push(name.len() as u8);
        list.extend_from_slice(name);
    }
    let mut body = (list.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(&list);
    (16, body)
}

#[test]
fn the_server_name_is_canonicalised_once_here() {
    let hello = complete(parse_client_hello(&hello_with(&[sni_ext(b"App.Example.COM.")])));
    assert_eq!(hello.sni.as_deref(), Some("app.example.com"));
    assert_eq!(hello.versions, vec![0x0303]);
}

#[test]
fn invalid_server_names_are_refused() {
    let long = [b'a'; 300];
    let cases: [(&[u8], NameError); 4] = [
        (b"a\0b.example", NameError::InvalidByte(0)),
        (b"127.0.0.1", NameError::IpLiteral),
        (b"a..example", NameError::EmptyLabel),
        (&long, NameError::TooLong(300)),
    ];
    for (name, expected) in cases {
        assert_eq!(
            parse_client_hello(&hello_with(&[sni_ext(name)])),
            Err(SniffError::InvalidSni(expected)),
            "{}",
            String::from_utf8_lossy(name)
        );
    }
}

#[test]
fn duplicate_extensions_are_refused() {
    let hello = hello_with(&[sni_ext(b"a.example"), sni_ext(b"b.example")]);
    assert_eq!(parse_client_hello(&hello), Err(SniffError::DuplicateExtension(0)));
}

#[test]
fn empty_alpn_names_are_refused() {
    let names: Vec<&[u8]> = vec![b""; 10_000];
    let hello = hello_with(&[alpn_ext(&names)]);
    assert_eq!(
        parse_client_hello(&hello),
        Err(SniffError::Malformed("empty ALPN protocol name"))
    );
    let ok = complete(parse_client_hello(&hello_with(&[alpn_ext(&[b"h2", b"postgresql"])])));
    assert_eq!(ok.alpn, vec!["h2", "postgresql"]);
}

#[test]
fn a_hello_over_the_limit_is_refused_before_it_arrives() {
    let big = hello_with(&[(0xffa5, vec![0; MAX_HELLO_LEN])]);
    // The first record's header and the handshake header are enough.
    assert!(matches!(parse_client_hello(&big[..9]), Err(SniffError::TooLarge(_))));
}

#[test]
fn a_hello_of_many_tiny_records_is_bounded() {
    let hello = hello_with(&[(0xffa5, vec![0; 8000])]);
    // Re-frame the handshake into 1-byte records: 6 bytes of wire per byte of hello.
    let mut wire = Vec::new();
    for byte in &hello[5..] {
        wire.extend_from_slice(&[0x16, 0x03, 0x01, 0, 1, *byte]);
    }
    assert!(matches!(parse_client_hello(&wire), Err(SniffError::TooLarge(_))));
}

#[test]
fn a_record_of_another_type_inside_the_hello_is_refused() {
    let hello = testdata::read("clienthello/openssl-tls13-sni.bin");
    let mut wire = vec![0x16, 0x03, 0x01, 0, 10];
    wire.extend_from_slice(&hello[5..15]);
    wire.extend_from_slice(&[0x17, 0x03, 0x03, 0, 1, 0]);
    assert_eq!(parse_client_hello(&wire), Err(SniffError::Interleaved(0x17)));
}

/// The cipher suite list of a single-record hello: (offset, length).
fn cipher_list(bytes: &[u8]) -> (usize, usize) {
    let session_id = 5 + 4 + 2 + 32;
    let at = session_id + 1 + usize::from(bytes[session_id]);
    (at + 2, usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]])))
}

#[test]
fn a_client_putting_chacha20_before_aes_gcm_is_seen_to_prefer_it() {
    for (capture, bytes) in captures().into_iter().filter(|(c, _)| is_hello(&c.file)) {
        // Every captured client (x86 builds) lists AES-GCM first.
        let hello = complete(parse_client_hello(&bytes));
        assert!(!hello.prefers_chacha, "{}", capture.file);
    }
    let mut bytes = testdata::read("clienthello/openssl-tls13-sni.bin");
    let (at, len) = cipher_list(&bytes);
    let suites: Vec<[u8; 2]> = bytes[at..at + len].chunks(2).map(|c| [c[0], c[1]]).collect();
    assert_eq!(
        suites[..3],
        [[0x13, 0x02], [0x13, 0x03], [0x13, 0x01]],
        "openssl's TLS 1.3 order"
    );
    // ChaCha20 first, then AES-256 and AES-128: prefers it.
    bytes[at..at + 4].copy_from_slice(&[0x13, 0x03, 0x13, 0x02]);
    assert!(complete(parse_client_hello(&bytes)).prefers_chacha);
    // A GREASE value and a non-AEAD suite before it change nothing.
    bytes[at..at + 6].copy_from_slice(&[0x1a, 0x1a, 0x00, 0x3c, 0x13, 0x03]);
    assert!(complete(parse_client_hello(&bytes)).prefers_chacha);
    // AES-128-GCM first: does not.
    bytes[at..at + 6].copy_from_slice(&[0x13, 0x01, 0x13, 0x03, 0x13, 0x02]);
    assert!(!complete(parse_client_hello(&bytes)).prefers_chacha);
}
