use super::*;
use weir_plugin_sdk::hex::encode as hex;
use weir_testdata as testdata;

/// 2025-07-01, inside the sample collateral's validity window.
const IN_WINDOW: u64 = 1_751_328_000;
/// 2026-01-01, after it.
const AFTER_WINDOW: u64 = 1_767_225_600;

#[test]
fn the_sample_quote_yields_its_documented_values() {
    let quote = testdata::read("attestation/tdx_quote_v4.bin");
    let report = parse_quote(&quote).expect("parses");
    assert_eq!(report.version, 4);
    assert!(!report.td15);
    assert_eq!(
        hex(&report.mrtd),
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
    );
    assert_eq!(report.rtmr[3], [0u8; 48]);
    assert_eq!(report.report_data.as_slice(), &quote[568..632]);
    assert_eq!(report.td_attributes.as_slice(), &quote[168..176]);
    assert_eq!(report.rtmr[0].as_slice(), &quote[376..424]);
    assert_eq!(
        u32::from_le_bytes([quote[632], quote[633], quote[634], quote[635]]),
        4300
    );
    for file in [
        "attestation/dstack_tdx_quote_v4.bin",
        "attestation/tdx_quote_v4_outdated.bin",
    ] {
        parse_quote(&testdata::read(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let dstack = parse_quote(&testdata::read("attestation/dstack_tdx_quote_v4.bin")).expect("parses");
    assert_eq!(dstack.rtmr[3], [0u8; 48]);
    assert!(
        dstack.report_data.iter().all(|b| b.is_ascii()),
        "REPORTDATA is ASCII text"
    );
}

#[test]
fn a_v5_quote_shifts_the_body_and_names_its_type() {
    let v4 = testdata::read("attestation/tdx_quote_v4.bin");
    // The same report as a v5 TD 1.0 body: version 5, then body type 2 and size 584.
    let mut v5 = v4[..48].to_vec();
    v5[0] = 5;
    v5.extend_from_slice(&2u16.to_le_bytes());
    v5.extend_from_slice(&584u32.to_le_bytes());
    v5.extend_from_slice(&v4[48..]);
    let report = parse_quote(&v5).expect("v5 parses");
    assert_eq!(
        report,
        TdReport {
            version: 5,
            ..parse_quote(&v4).expect("v4")
        }
    );
    // TD 1.5: 64 more bytes of body.
    let mut td15 = v5[..54].to_vec();
    td15[48..50].copy_from_slice(&3u16.to_le_bytes());
    td15[50..54].copy_from_slice(&648u32.to_le_bytes());
    td15.extend_from_slice(&v4[48..632]);
    td15.extend_from_slice(&[0u8; 64]);
    td15.extend_from_slice(&v4[632..]);
    let report = parse_quote(&td15).expect("TD 1.5 parses");
    assert!(report.td15);
    assert_eq!(report.mrtd.as_slice(), &v4[184..232]);
    let mut bad_type = v5.clone();
    bad_type[48] = 9;
    assert_eq!(parse_quote(&bad_type), Err(AttestError::BodyType(9)));
    let mut bad_size = v5;
    bad_size[50] = 1;
    assert!(matches!(parse_quote(&bad_size), Err(AttestError::BodySize { .. })));
}

#[test]
fn malformed_quotes_are_typed_errors() {
    let quote = testdata::read("attestation/tdx_quote_v4.bin");
    // The signature section ends at 636 + 4300; the sample carries 70 bytes of padding after it.
    for cut in [0, 1, 47, 48, 200, 631, 635, 636 + 4299] {
        let err = parse_quote(&quote[..cut]).expect_err("truncated");
        assert!(matches!(err, AttestError::Truncated { .. }), "cut at {cut}: {err}");
    }
    let mut v3 = quote.clone();
    v3[0] = 3;
    assert_eq!(parse_quote(&v3), Err(AttestError::QuoteVersion(3)));
    let mut sgx = quote.clone();
    sgx[4] = 0;
    assert_eq!(parse_quote(&sgx), Err(AttestError::NotTdx(0)));
    let mut huge_signature = quote.clone();
    huge_signature[632..636].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        parse_quote(&huge_signature),
        Err(AttestError::Truncated { .. })
    ));
    assert!(matches!(
        parse_quote(&vec![0u8; MAX_QUOTE + 1]),
        Err(AttestError::TooLarge { .. })
    ));
}

#[test]
fn the_dstack_attestation_decodes_and_replays_to_rtmr3() {
    let bytes = testdata::read("attestation/dstack_attestation_v0.bin");
    let attestation = decode_attestation(&bytes).expect("decodes");
    assert_eq!(attestation.quote.len(), 5010);
    assert_eq!(attestation.events.len(), 33);
    assert_eq!(attestation.runtime_events.len(), 9);
    assert_eq!(attestation.report_data, [0u8; 64]);
    assert!(attestation.config.starts_with('{'));
    let names: Vec<&str> = attestation.runtime_events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "system-preparing",
            "app-id",
            "compose-hash",
            "instance-id",
            "boot-mr-done",
            "os-image-hash",
            "key-provider",
            "storage-fs",
            "system-ready"
        ]
    );
    let report = parse_quote(&attestation.quote).expect("its quote parses");
    assert_eq!(replay_rtmr3(&attestation.events).expect("replays"), report.rtmr[3]);
    // A changed payload no longer replays to RTMR3.
    let mut tampered = attestation.events.clone();
    let app_id = tampered.iter_mut().find(|e| e.name == "app-id").expect("app-id event");
    app_id.payload[0] ^= 1;
    assert_ne!(replay_rtmr3(&tampered).expect("replays"), report.rtmr[3]);
}

#[test]
fn malformed_attestations_are_typed_errors() {
    let bytes = testdata::read("attestation/dstack_attestation_v0.bin");
    for cut in [0, 1, 2, 3, 100, 5013, 6000, bytes.len() - 65, bytes.len() - 1] {
        let err = decode_attestation(&bytes[..cut]).expect_err("truncated");
        assert!(
            matches!(err, AttestError::Truncated { .. } | AttestError::Compact(_)),
            "cut at {cut}: {err}"
        );
    }
    let mut v1 = bytes.clone();
    v1[0] = 1;
    assert_eq!(decode_attestation(&v1).err(), Some(AttestError::AttestationVersion(1)));
    let mut other = bytes.clone();
    other[1] = 2;
    assert_eq!(decode_attestation(&other).err(), Some(AttestError::QuoteVariant(2)));
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(decode_attestation(&trailing).err(), Some(AttestError::Trailing(1)));
    // A length prefix claiming 1 GiB of quote.
    let mut huge = vec![0u8, 0u8, 0b11, 0, 0, 0, 0x40];
    huge.extend_from_slice(&[0u8; 16]);
    assert!(matches!(decode_attestation(&huge), Err(AttestError::TooLarge { .. })));
    assert!(matches!(
        decode_attestation(&vec![0u8; MAX_ATTESTATION + 1]),
        Err(AttestError::TooLarge { .. })
    ));
}

#[test]
fn dcap_verification_depends_on_the_collateral_window() {
    let quote = testdata::read("attestation/tdx_quote_v4.bin");
    let collateral = testdata::dir().join("attestation/tdx_quote_v4_collateral.json");
    let verifier = Verifier::load(&[collateral]).expect("collateral loads");
    let inside = verifier.verify(&quote, IN_WINDOW);
    assert_eq!(
        inside,
        Verification {
            verified: true,
            tcb_status: Some("UpToDate".into()),
            reason: None
        }
    );
    let after = verifier.verify(&quote, AFTER_WINDOW);
    assert!(!after.verified);
    assert!(after.reason.as_deref().is_some_and(|r| !r.is_empty()), "{after:?}");
    // A tampered report fails its signature.
    let mut tampered = quote.clone();
    tampered[184] ^= 1;
    assert!(!verifier.verify(&tampered, IN_WINDOW).verified);
    // Without collateral nothing is verified, and it says why.
    let none = Verifier::default().verify(&quote, IN_WINDOW);
    assert_eq!(none.reason.as_deref(), Some("no DCAP collateral is configured"));
    assert!(Verifier::load(&[testdata::dir().join("attestation/tdx_quote_v4.bin")]).is_err());
}

/// A self-signed certificate with these extensions (OID arcs, value), and
/// its SubjectPublicKeyInfo.
fn certificate(extensions: &[(&[u64], Vec<u8>)]) -> (Vec<u8>, Vec<u8>, rcgen::KeyPair) {
    use rcgen::PublicKeyData as _;
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["tee.test".to_owned()]).expect("params");
    for (oid, value) in extensions {
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(oid, value.clone()));
    }
    let cert = params.self_signed(&key).expect("cert");
    (cert.der().to_vec(), key.subject_public_key_info(), key)
}

fn octet_string(content: &[u8]) -> Vec<u8> {
    let mut der = vec![0x04, 0x82];
    der.extend_from_slice(&u16::try_from(content.len()).expect("small").to_be_bytes());
    der.extend_from_slice(content);
    der
}

fn binding(spki: &[u8]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
    ctx.update(b"ratls-cert:");
    ctx.update(spki);
    ctx.finish().as_ref().to_vec()
}

const ATTESTATION: &[u64] = crate::simulate::ATTESTATION_OID_ARCS;
const QUOTE: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 1];
const EVENT_LOG: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 2];
const APP_ID: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 3];

#[test]
fn a_certificate_whose_attestation_binds_another_key_is_refused() {
    // The real dstack attestation binds all-zero report data, not our key.
    let blob = testdata::read("attestation/dstack_attestation_v0.bin");
    let (der, _, _) = certificate(&[(ATTESTATION, octet_string(&blob))]);
    assert_eq!(RaTls::from_certificate(&der).err(), Some(AttestError::Binding));
    let (plain, _, _) = certificate(&[]);
    assert_eq!(RaTls::from_certificate(&plain).err(), Some(AttestError::Missing));
    assert!(matches!(
        RaTls::from_certificate(b"not a certificate"),
        Err(AttestError::Certificate(_))
    ));
}

/// A certificate with the legacy extensions: the sample quote bound to a
/// fresh key, `log` as the event log, `app_id` as the app-id extension;
/// with `replay`, the quote's RTMR3 is what the log replays to.
fn legacy_certificate(log: &[u8], app_id: &[u8], replay: bool) -> (Vec<u8>, Vec<u8>) {
    use rcgen::PublicKeyData as _;
    let key = rcgen::KeyPair::generate().expect("key");
    let mut quote = testdata::read("attestation/tdx_quote_v4.bin");
    quote[568..632].copy_from_slice(&binding(&key.subject_public_key_info()));
    if replay {
        let events = events::parse_event_log_json(log).expect("log");
        quote[520..568].copy_from_slice(&replay_rtmr3(&events).expect("replays"));
    }
    let mut params = rcgen::CertificateParams::new(vec!["tee.test".to_owned()]).expect("params");
    for (oid, value) in [
        (QUOTE, quote.clone()),
        (EVENT_LOG, log.to_vec()),
        (APP_ID, app_id.to_vec()),
    ] {
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(oid, octet_string(&value)));
    }
    (params.self_signed(&key).expect("cert").der().to_vec(), quote)
}

#[test]
fn the_legacy_extensions_are_read_and_bound() {
    let log = br#"[{"imr":3,"event_type":134217729,"digest":"","event":"app-id","event_payload":"aabb"}]"#;
    // The sample's RTMR3 is zero; one app-id event does not replay to it.
    let (der, quote) = legacy_certificate(log, &[0xaa, 0xbb], false);
    let ratls = RaTls::from_certificate(&der).expect("bound");
    assert_eq!(ratls.quote, quote);
    assert_eq!(ratls.events.len(), 1);
    assert!(!ratls.rtmr3_matches);
    assert_eq!(ratls.app_id, None, "the extension's own word names no app");
    let seen = ratls.attestation(&Verification {
        verified: false,
        tcb_status: None,
        reason: None,
    });
    assert!(seen.runtime_events.is_empty(), "unreplayed events are not handed on");
    assert_eq!(seen.mrtd.as_slice(), &quote[184..232]);
    assert!(!seen.debug);

    // Replayed, the log names the app, and an extension claiming another
    // is refused.
    let (der, _) = legacy_certificate(log, &[0xaa, 0xbb], true);
    let ratls = RaTls::from_certificate(&der).expect("bound");
    assert!(ratls.rtmr3_matches);
    assert_eq!(ratls.app_id, Some(vec![0xaa, 0xbb]));
    let (der, _) = legacy_certificate(log, &[0xcc, 0xdd], true);
    let err = RaTls::from_certificate(&der).expect_err("contradicted");
    assert_eq!(
        err.to_string(),
        "app id (1.3.6.1.4.1.62397.1.3): it claims ccdd, but the event log measured aabb"
    );
}

/// dstack's V1 wire form, written the way dstack writes it: msgpack maps
/// with field names, bytes as `bin`.
mod v1_wire {
    use serde::Serialize;

    #[derive(Serialize)]
    pub struct Attestation<'a> {
        pub version: u64,
        pub platform: Platform<'a>,
        pub stack: Stack<'a>,
    }

    #[derive(Serialize)]
    #[serde(tag = "kind", content = "data")]
    pub enum Platform<'a> {
        #[serde(rename = "tdx")]
        Tdx {
            #[serde(with = "serde_bytes")]
            quote: &'a [u8],
            event_log: Vec<Event<'a>>,
        },
        #[serde(rename = "nitro-enclave")]
        NitroEnclave {
            #[serde(with = "serde_bytes")]
            nsm_quote: &'a [u8],
        },
    }

    #[derive(Serialize)]
    pub struct Event<'a> {
        pub imr: u32,
        pub event_type: u32,
        #[serde(with = "serde_bytes")]
        pub digest: &'a [u8],
        pub event: &'a str,
        #[serde(with = "serde_bytes")]
        pub event_payload: &'a [u8],
    }

    #[derive(Serialize)]
    #[serde(tag = "kind", content = "data")]
    pub enum Stack<'a> {
        #[serde(rename = "dstack")]
        Dstack {
            report_data: Vec<u8>,
            runtime_events: Vec<RuntimeEvent<'a>>,
            config: &'a str,
        },
    }

    #[derive(Serialize)]
    pub struct RuntimeEvent<'a> {
        pub event: &'a str,
        #[serde(with = "serde_bytes")]
        pub payload: &'a [u8],
    }
}

#[test]
fn the_msgpack_v1_form_carries_the_same_attestation() {
    let v0 = decode_attestation(&testdata::read("attestation/dstack_attestation_v0.bin")).expect("V0");
    let wire = v1_wire::Attestation {
        version: 1,
        platform: v1_wire::Platform::Tdx {
            quote: &v0.quote,
            event_log: v0
                .events
                .iter()
                .map(|e| v1_wire::Event {
                    imr: e.imr,
                    event_type: e.event_type,
                    digest: &e.digest,
                    event: &e.name,
                    event_payload: &e.payload,
                })
                .collect(),
        },
        stack: v1_wire::Stack::Dstack {
            report_data: v0.report_data.to_vec(),
            runtime_events: v0
                .runtime_events
                .iter()
                .map(|(name, payload)| v1_wire::RuntimeEvent { event: name, payload })
                .collect(),
            config: &v0.config,
        },
    };
    let bytes = rmp_serde::to_vec_named(&wire).expect("encodes");
    assert!(matches!(bytes[0], 0x80..=0x8f), "a msgpack map");
    let v1 = decode_attestation(&bytes).expect("V1 decodes");
    assert_eq!(v1.quote, v0.quote);
    assert_eq!(v1.events, v0.events);
    assert_eq!(v1.runtime_events, v0.runtime_events);
    assert_eq!(v1.report_data, v0.report_data);
    assert_eq!(v1.config, v0.config);
    let report = parse_quote(&v1.quote).expect("quote");
    assert_eq!(replay_rtmr3(&v1.events).expect("replays"), report.rtmr[3]);

    let nitro = v1_wire::Attestation {
        platform: v1_wire::Platform::NitroEnclave { nsm_quote: b"doc" },
        ..wire
    };
    let err = decode_attestation(&rmp_serde::to_vec_named(&nitro).expect("encodes")).expect_err("not TDX");
    assert!(err.to_string().contains("not TDX"), "{err}");
    for cut in [1, 10, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            matches!(decode_attestation(&bytes[..cut]), Err(AttestError::V1(_))),
            "cut at {cut}"
        );
    }
    // A V1 map that says version 2.
    let mut v2 = bytes.clone();
    let at = v2.windows(8).position(|w| w == b"version\x01").expect("version field") + 7;
    v2[at] = 2;
    assert!(
        decode_attestation(&v2)
            .expect_err("v2")
            .to_string()
            .contains("version 2")
    );
}

#[test]
fn a_legacy_event_log_with_bad_hex_is_an_error_not_a_panic() {
    let log =
        |digest: &str| format!(r#"[{{"imr":3,"event_type":1,"digest":"{digest}","event":"x","event_payload":""}}]"#);
    // A multi-byte character where a digit pair would split it used to
    // panic on a char boundary; `+1` used to read as 0x01.
    for digest in ["aé0", "+1", "abc", "zz"] {
        let err = events::parse_event_log_json(log(digest).as_bytes()).expect_err(digest);
        assert!(
            matches!(err, AttestError::EventLog(ref m) if m.starts_with("a hex field: ")),
            "{digest}: {err}"
        );
    }
    let good = events::parse_event_log_json(log(&"ab".repeat(48)).as_bytes()).expect("48-byte digest");
    assert_eq!(good[0].digest, vec![0xab; 48]);
}

#[test]
fn the_app_info_extension_is_read_and_a_malformed_one_refused() {
    use crate::simulate;
    use rcgen::PublicKeyData as _;
    let app_info = crate::app_info::tests::encoded(&[0xc0; 32]);
    // `extensions` makes the attestation (None: no event log) and app info.
    type Extensions<'a> = &'a dyn Fn(&mut Vec<u8>) -> (Vec<u8>, Vec<u8>);
    let mint = |extensions: Extensions| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut quote = simulate::synthetic_quote(&[7; 48], &simulate::key_binding(&key.subject_public_key_info()));
        let (attestation, info) = extensions(&mut quote);
        let mut params = rcgen::CertificateParams::new(vec!["tee.test".to_owned()]).expect("params");
        for (oid, value) in [(ATTESTATION, attestation), (simulate::APP_INFO_OID_ARCS, info)] {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(oid, value));
        }
        params.self_signed(&key).expect("cert").der().to_vec()
    };
    let with_info =
        |info: Vec<u8>| move |quote: &mut Vec<u8>| (simulate::attestation_extension(quote), octet_string(&info));
    let unverified = Verification {
        verified: false,
        tcb_status: None,
        reason: None,
    };
    // As dstack writes it: runtime events replaying to RTMR3, the app info
    // with the measurements dstack computes, and a ninth field.
    let app = simulate::App {
        app_id: vec![0x33; 20],
        compose_hash: vec![0xc0; 32],
        instance_id: vec![1; 20],
        os_image_hash: vec![5; 32],
        key_provider: br#"{"type":"kms"}"#.to_vec(),
    };
    let genuine = mint(&|quote| app.extensions(quote).expect("extensions"));
    let ratls = RaTls::from_certificate(&genuine).expect("read");
    assert!(ratls.rtmr3_matches && ratls.app_info_checked);
    let seen = ratls.attestation(&unverified);
    let info = seen.app_info.expect("a checked app info is handed on");
    assert_eq!(info.compose_hash.as_slice(), [0xc0; 32]);
    assert_eq!(info.init_script_hashes, Some(Vec::new()));
    let (mr_system, mr_aggregated) = crate::app_info::measurements(&ratls.report, &app.key_provider);
    assert_eq!(
        (info.mr_system.as_slice(), info.mr_aggregated.as_slice()),
        (&mr_system[..], &mr_aggregated[..])
    );
    assert_eq!(seen.runtime_events.len(), 5, "{:?}", seen.runtime_events);

    // Claims the quote or the event log contradict are refused, naming both.
    let lie = RaTls::from_certificate(&mint(&with_info(app_info.clone()))).expect_err("mr_system");
    assert!(
        lie.to_string()
            .contains(&format!("it claims mr_system {}, but the quote gives", hex(&[3; 32]))),
        "{lie}"
    );
    let other_compose = simulate::App {
        compose_hash: vec![0xd0; 32],
        ..app.clone()
    };
    let lie = mint(&|quote| {
        let (attestation, _) = app.extensions(quote).expect("extensions");
        let (_, claimed) = other_compose.extensions(&mut quote.clone()).expect("extensions");
        (attestation, claimed)
    });
    let lie = RaTls::from_certificate(&lie).expect_err("compose hash");
    assert!(lie.to_string().contains("claims compose-hash d0d0"), "{lie}");

    // With an event log that does not replay, nothing can be checked: the
    // app info is read but not handed on, and names no app.
    let unchecked = mint(&|quote| {
        let (_, info) = app.extensions(quote).expect("extensions");
        quote[48 + 472] ^= 1;
        (simulate::attestation_extension(quote), info)
    });
    let ratls = RaTls::from_certificate(&unchecked).expect("read");
    assert!(!ratls.rtmr3_matches && ratls.app_info.is_some());
    assert_eq!(ratls.app_id, None, "the app info's own word names no app");
    assert_eq!(ratls.attestation(&unverified).app_info, None);

    assert!(matches!(
        RaTls::from_certificate(&mint(&with_info(b"\x91\x01".to_vec()))),
        Err(AttestError::AppInfo(_))
    ));
}
