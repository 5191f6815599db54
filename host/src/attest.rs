//! RA-TLS: the Intel TDX attestation a certificate carries, read and checked.
//!
//! A pure parser over bytes (every malformed, truncated or oversized input is
//! an [`AttestError`], never a panic) for:
//! - the dstack attestation extension (OID `1.3.6.1.4.1.62397.1.8`): SCALE
//!   `VersionedAttestation::V0` — a TDX quote, its event log, the runtime
//!   events, `report_data` and the VM config — or the msgpack V1 form
//!   (`{version, platform: {kind: "tdx", data}, stack: {kind: "dstack", data}}`);
//! - the legacy extensions: `…1.1` raw quote, `…1.2` event log (JSON),
//!   `…1.3` app id, `…1.4` certificate usage;
//! - TDX quotes v4 and v5 (TD 1.0 and TD 1.5 report bodies).
//!
//! [`RaTls::from_certificate`] also checks the key binding — REPORTDATA must
//! be SHA-512(`"ratls-cert:"` ‖ the certificate's DER SubjectPublicKeyInfo) —
//! and replays the IMR-3 event log against RTMR3. Quote signatures and TCB
//! status are checked by [`Verifier`] (dcap-qvl, offline, with collateral from
//! files).

use std::path::Path;

use crate::plugin::wit;

/// The dstack attestation extension.
pub const OID_ATTESTATION: &str = "1.3.6.1.4.1.62397.1.8";
/// Legacy: the raw TDX quote.
pub const OID_TDX_QUOTE: &str = "1.3.6.1.4.1.62397.1.1";
/// Legacy: the event log, JSON.
pub const OID_EVENT_LOG: &str = "1.3.6.1.4.1.62397.1.2";
/// Legacy: the app id.
pub const OID_APP_ID: &str = "1.3.6.1.4.1.62397.1.3";
/// Legacy: what the certificate is for.
pub const OID_CERT_USAGE: &str = "1.3.6.1.4.1.62397.1.4";

/// The event type of dstack runtime events (IMR 3).
pub const DSTACK_RUNTIME_EVENT: u32 = 0x0800_0001;
/// TDX TEE type in the quote header.
const TEE_TYPE_TDX: u32 = 0x81;
/// Largest quote accepted.
const MAX_QUOTE: usize = 64 * 1024;
/// Largest attestation extension accepted.
pub const MAX_ATTESTATION: usize = 1024 * 1024;
/// Most event-log entries (real logs hold tens).
const MAX_EVENTS: usize = 4096;
/// The tag of the RA-TLS key binding.
const BINDING_TAG: &[u8] = b"ratls-cert:";

/// Why an attestation was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The input ends inside a field.
    #[error("truncated: {what} needs {needed} bytes, {available} left")]
    Truncated {
        /// The field.
        what: &'static str,
        /// Bytes it needs.
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
    /// A field is larger than weir accepts.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A quote version other than 4 or 5.
    #[error("TDX quote version {0} is not supported (only 4 and 5)")]
    QuoteVersion(u16),
    /// A quote from another TEE.
    #[error("not a TDX quote: TEE type {0:#x}")]
    NotTdx(u32),
    /// A v5 body type other than TD 1.0 (2) or TD 1.5 (3).
    #[error("TD report body type {0} is not a TDX report (2 or 3)")]
    BodyType(u16),
    /// A v5 body size that does not fit its type.
    #[error("TD report body of {size} bytes, expected {expected}")]
    BodySize {
        /// What the quote says.
        size: u32,
        /// What the type needs.
        expected: usize,
    },
    /// An attestation version weir does not read.
    #[error("attestation version {0} is not supported (dstack V0 or the msgpack V1 form)")]
    AttestationVersion(u8),
    /// The msgpack V1 form does not decode.
    #[error("V1 attestation: {0}")]
    V1(String),
    /// The attestation is for another platform.
    #[error("the attestation carries no TDX quote (quote variant {0})")]
    QuoteVariant(u8),
    /// A SCALE compact length that is malformed.
    #[error("malformed SCALE length in {0}")]
    Compact(&'static str),
    /// A text field that is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// Bytes left over after the attestation.
    #[error("{0} bytes after the end of the attestation")]
    Trailing(usize),
    /// An event-log digest of the wrong size.
    #[error("event {index} has a {len}-byte digest, not 48")]
    Digest {
        /// Position in the log.
        index: usize,
        /// Its size.
        len: usize,
    },
    /// The legacy event log is not the expected JSON.
    #[error("event log JSON: {0}")]
    EventLog(String),
    /// The certificate does not parse.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The certificate has no attestation extension.
    #[error("the certificate carries no RA-TLS attestation")]
    Missing,
    /// REPORTDATA does not bind the certificate's key.
    #[error("key binding: REPORTDATA is not SHA-512(\"ratls-cert:\" || this certificate's public key)")]
    Binding,
}

/// What a TDX quote's TD report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdReport {
    /// Quote version (4 or 5).
    pub version: u16,
    /// TD 1.5 body (a v5 quote with body type 3).
    pub td15: bool,
    /// TD attributes; bit 0 is DEBUG.
    pub td_attributes: [u8; 8],
    /// MRTD: the initial TD image.
    pub mrtd: [u8; 48],
    /// MRCONFIGID.
    pub mrconfigid: [u8; 48],
    /// MROWNER.
    pub mrowner: [u8; 48],
    /// MROWNERCONFIG.
    pub mrownerconfig: [u8; 48],
    /// RTMR0..RTMR3.
    pub rtmr: [[u8; 48]; 4],
    /// REPORTDATA.
    pub report_data: [u8; 64],
}

impl TdReport {
    /// Whether the TD runs with the debug attribute (everything it holds is
    /// readable by the host).
    pub fn debug(&self) -> bool {
        self.td_attributes[0] & 1 != 0
    }
}

/// A bounds-checked reader.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], AttestError> {
        if n > self.remaining() {
            return Err(AttestError::Truncated {
                what,
                needed: n,
                available: self.remaining(),
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], AttestError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(what, N)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, AttestError> {
        Ok(self.take(what, 1)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, AttestError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, AttestError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A SCALE compact integer.
    fn compact(&mut self, what: &'static str) -> Result<usize, AttestError> {
        let first = self.u8(what)?;
        let value = match first & 3 {
            0 => u64::from(first >> 2),
            1 => u64::from(u16::from_le_bytes([first, self.u8(what)?]) >> 2),
            2 => {
                let rest: [u8; 3] = self.array(what)?;
                u64::from(u32::from_le_bytes([first, rest[0], rest[1], rest[2]]) >> 2)
            }
            _ => {
                let n = usize::from(first >> 2) + 4;
                if n > 8 {
                    return Err(AttestError::Compact(what));
                }
                let mut buf = [0u8; 8];
                buf[..n].copy_from_slice(self.take(what, n)?);
                u64::from_le_bytes(buf)
            }
        };
        usize::try_from(value).map_err(|_| AttestError::Compact(what))
    }

    /// A SCALE `Vec<u8>` at most `max` long.
    fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], AttestError> {
        let len = self.compact(what)?;
        if len > max {
            return Err(AttestError::TooLarge { what, len, max });
        }
        self.take(what, len)
    }

    fn string(&mut self, what: &'static str, max: usize) -> Result<String, AttestError> {
        let bytes = self.bytes(what, max)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| AttestError::Utf8(what))
    }
}

/// Parses a TDX quote (v4, or v5 with a TD 1.0 or TD 1.5 body) and checks
/// that its signature section is complete.
pub fn parse_quote(quote: &[u8]) -> Result<TdReport, AttestError> {
    if quote.len() > MAX_QUOTE {
        return Err(AttestError::TooLarge {
            what: "quote",
            len: quote.len(),
            max: MAX_QUOTE,
        });
    }
    let mut r = Reader::new(quote);
    let version = r.u16("quote header")?;
    let _attestation_key_type = r.u16("quote header")?;
    let tee_type = r.u32("quote header")?;
    r.take("quote header", 40)?;
    if version != 4 && version != 5 {
        return Err(AttestError::QuoteVersion(version));
    }
    if tee_type != TEE_TYPE_TDX {
        return Err(AttestError::NotTdx(tee_type));
    }
    let mut td15 = false;
    if version == 5 {
        let body_type = r.u16("body header")?;
        let size = r.u32("body header")?;
        let expected = match body_type {
            2 => 584,
            3 => 648,
            other => return Err(AttestError::BodyType(other)),
        };
        if size as usize != expected {
            return Err(AttestError::BodySize { size, expected });
        }
        td15 = body_type == 3;
    }
    let mut body = Reader::new(r.take("TD report", if td15 { 648 } else { 584 })?);
    body.take("TD report", 120)?; // TEE_TCB_SVN, MRSEAM, MRSIGNERSEAM, SEAM attributes
    let td_attributes = body.array("TD attributes")?;
    body.take("XFAM", 8)?;
    let mrtd = body.array("MRTD")?;
    let mrconfigid = body.array("MRCONFIGID")?;
    let mrowner = body.array("MROWNER")?;
    let mrownerconfig = body.array("MROWNERCONFIG")?;
    let rtmr = [
        body.array("RTMR0")?,
        body.array("RTMR1")?,
        body.array("RTMR2")?,
        body.array("RTMR3")?,
    ];
    let report_data = body.array("REPORTDATA")?;
    let signature_len = r.u32("signature length")? as usize;
    r.take("quote signature", signature_len)?;
    Ok(TdReport {
        version,
        td15,
        td_attributes,
        mrtd,
        mrconfigid,
        mrowner,
        mrownerconfig,
        rtmr,
        report_data,
    })
}

/// One event-log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// IMR index (3 = RTMR3).
    pub imr: u32,
    /// Event type.
    pub event_type: u32,
    /// The digest as logged.
    pub digest: Vec<u8>,
    /// Event name (dstack runtime events).
    pub name: String,
    /// Event payload.
    pub payload: Vec<u8>,
}

impl Event {
    /// The digest extended into the IMR: recomputed from name and payload for
    /// a dstack runtime event (binding them), the logged one otherwise.
    fn extended_digest(&self, index: usize) -> Result<[u8; 48], AttestError> {
        if self.event_type == DSTACK_RUNTIME_EVENT {
            let mut input = DSTACK_RUNTIME_EVENT.to_le_bytes().to_vec();
            input.push(b':');
            input.extend_from_slice(self.name.as_bytes());
            input.push(b':');
            input.extend_from_slice(&self.payload);
            return Ok(sha384(&[&input]));
        }
        <[u8; 48]>::try_from(self.digest.as_slice()).map_err(|_| AttestError::Digest {
            index,
            len: self.digest.len(),
        })
    }
}

fn sha384(parts: &[&[u8]]) -> [u8; 48] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA384);
    for part in parts {
        ctx.update(part);
    }
    let mut out = [0u8; 48];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Replays the IMR-3 entries of an event log: from 48 zero bytes,
/// `mr = SHA-384(mr ‖ digest)` for each.
pub fn replay_rtmr3(events: &[Event]) -> Result<[u8; 48], AttestError> {
    let mut mr = [0u8; 48];
    for (index, event) in events.iter().enumerate().filter(|(_, e)| e.imr == 3) {
        mr = sha384(&[&mr, &event.extended_digest(index)?]);
    }
    Ok(mr)
}

/// A decoded dstack `VersionedAttestation::V0`.
#[derive(Debug, Clone)]
pub struct DstackAttestation {
    /// The TDX quote.
    pub quote: Vec<u8>,
    /// The TDX event log.
    pub events: Vec<Event>,
    /// Runtime events as the attestation lists them.
    pub runtime_events: Vec<(String, Vec<u8>)>,
    /// The report data the attestation claims.
    pub report_data: [u8; 64],
    /// The VM config (JSON text).
    pub config: String,
}

/// Decodes the dstack attestation extension: SCALE
/// `VersionedAttestation::V0` when the first byte is 0, the msgpack V1 form
/// when it opens a msgpack map.
pub fn decode_attestation(bytes: &[u8]) -> Result<DstackAttestation, AttestError> {
    if bytes.len() > MAX_ATTESTATION {
        return Err(AttestError::TooLarge {
            what: "attestation",
            len: bytes.len(),
            max: MAX_ATTESTATION,
        });
    }
    // fixmap, map16, map32: dstack's V1 is a msgpack map.
    if matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return decode_v1(bytes);
    }
    let mut r = Reader::new(bytes);
    match r.u8("attestation version")? {
        0 => {}
        other => return Err(AttestError::AttestationVersion(other)),
    }
    match r.u8("quote variant")? {
        0 => {}
        other => return Err(AttestError::QuoteVariant(other)),
    }
    let quote = r.bytes("quote", MAX_QUOTE)?.to_vec();
    let count = r.compact("event log")?;
    if count > MAX_EVENTS {
        return Err(AttestError::TooLarge {
            what: "event log",
            len: count,
            max: MAX_EVENTS,
        });
    }
    let mut events = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        events.push(Event {
            imr: r.u32("event imr")?,
            event_type: r.u32("event type")?,
            digest: r.bytes("event digest", 64)?.to_vec(),
            name: r.string("event name", 1024)?,
            payload: r.bytes("event payload", MAX_ATTESTATION)?.to_vec(),
        });
    }
    let count = r.compact("runtime events")?;
    if count > MAX_EVENTS {
        return Err(AttestError::TooLarge {
            what: "runtime events",
            len: count,
            max: MAX_EVENTS,
        });
    }
    let mut runtime_events = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = r.string("runtime event name", 1024)?;
        let payload = r.bytes("runtime event payload", MAX_ATTESTATION)?.to_vec();
        runtime_events.push((name, payload));
    }
    let report_data = r.array("report data")?;
    let config = r.string("config", MAX_ATTESTATION)?;
    if r.remaining() > 0 {
        return Err(AttestError::Trailing(r.remaining()));
    }
    Ok(DstackAttestation {
        quote,
        events,
        runtime_events,
        report_data,
        config,
    })
}

/// dstack's V1 attestation: `{version: 1, platform: {kind, data}, stack:
/// {kind, data}}` in msgpack with field names (rmp-serde `to_vec_named`).
/// Byte fields may be msgpack `bin` or arrays of integers.
mod v1 {
    use serde::Deserialize;
    use serde_bytes::ByteBuf;

    #[derive(Deserialize)]
    pub struct Attestation {
        pub version: u64,
        pub platform: Platform,
        pub stack: Stack,
    }

    #[derive(Deserialize)]
    #[serde(tag = "kind", content = "data")]
    pub enum Platform {
        #[serde(rename = "tdx")]
        Tdx { quote: ByteBuf, event_log: Vec<Event> },
        #[serde(rename = "gcp-tdx")]
        GcpTdx { quote: ByteBuf, event_log: Vec<Event> },
        #[serde(rename = "nitro-enclave")]
        NitroEnclave {},
    }

    #[derive(Deserialize)]
    pub struct Event {
        pub imr: u32,
        pub event_type: u32,
        #[serde(default)]
        pub digest: ByteBuf,
        #[serde(default)]
        pub event: String,
        #[serde(default)]
        pub event_payload: ByteBuf,
    }

    #[derive(Deserialize)]
    #[serde(tag = "kind", content = "data")]
    pub enum Stack {
        #[serde(rename = "dstack")]
        Dstack {
            report_data: ByteBuf,
            runtime_events: Vec<RuntimeEvent>,
            config: String,
        },
        #[serde(rename = "dstack-pod")]
        DstackPod {
            report_data: ByteBuf,
            runtime_events: Vec<RuntimeEvent>,
            config: String,
        },
    }

    #[derive(Deserialize)]
    pub struct RuntimeEvent {
        pub event: String,
        pub payload: ByteBuf,
    }
}

fn decode_v1(bytes: &[u8]) -> Result<DstackAttestation, AttestError> {
    let attestation: v1::Attestation = rmp_serde::from_slice(bytes).map_err(|e| AttestError::V1(e.to_string()))?;
    if attestation.version != 1 {
        return Err(AttestError::V1(format!("version {} (only 1)", attestation.version)));
    }
    let (quote, log) = match attestation.platform {
        v1::Platform::Tdx { quote, event_log } | v1::Platform::GcpTdx { quote, event_log } => (quote, event_log),
        v1::Platform::NitroEnclave {} => return Err(AttestError::V1("a Nitro Enclave attestation, not TDX".into())),
    };
    if quote.len() > MAX_QUOTE || log.len() > MAX_EVENTS {
        return Err(AttestError::TooLarge {
            what: "V1 quote or event log",
            len: quote.len().max(log.len()),
            max: MAX_QUOTE,
        });
    }
    let (report_data, runtime_events, config) = match attestation.stack {
        v1::Stack::Dstack {
            report_data,
            runtime_events,
            config,
        }
        | v1::Stack::DstackPod {
            report_data,
            runtime_events,
            config,
        } => (report_data, runtime_events, config),
    };
    let report_data = <[u8; 64]>::try_from(report_data.as_slice())
        .map_err(|_| AttestError::V1(format!("report_data is {} bytes, not 64", report_data.len())))?;
    Ok(DstackAttestation {
        quote: quote.into_vec(),
        events: log
            .into_iter()
            .map(|e| Event {
                imr: e.imr,
                event_type: e.event_type,
                digest: e.digest.into_vec(),
                name: e.event,
                payload: e.event_payload.into_vec(),
            })
            .collect(),
        runtime_events: runtime_events
            .into_iter()
            .map(|e| (e.event, e.payload.into_vec()))
            .collect(),
        report_data,
        config,
    })
}

/// The legacy JSON event log (`…1.2`): dstack's `TdxEvent` with hex fields.
fn parse_event_log_json(bytes: &[u8]) -> Result<Vec<Event>, AttestError> {
    #[derive(serde::Deserialize)]
    struct Json {
        imr: u32,
        event_type: u32,
        #[serde(default)]
        digest: String,
        #[serde(default)]
        event: String,
        #[serde(default)]
        event_payload: String,
    }
    let hex = |s: &str| -> Result<Vec<u8>, AttestError> {
        let s = s.trim_start_matches("0x");
        if !s.len().is_multiple_of(2) {
            return Err(AttestError::EventLog(format!("odd-length hex `{s}`")));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| AttestError::EventLog(e.to_string())))
            .collect()
    };
    let entries: Vec<Json> = serde_json::from_slice(bytes).map_err(|e| AttestError::EventLog(e.to_string()))?;
    if entries.len() > MAX_EVENTS {
        return Err(AttestError::TooLarge {
            what: "event log",
            len: entries.len(),
            max: MAX_EVENTS,
        });
    }
    entries
        .into_iter()
        .map(|e| {
            Ok(Event {
                imr: e.imr,
                event_type: e.event_type,
                digest: hex(&e.digest)?,
                name: e.event,
                payload: hex(&e.event_payload)?,
            })
        })
        .collect()
}

/// The attestation an RA-TLS certificate carries, with the checks that need
/// nothing but the certificate done.
#[derive(Debug, Clone)]
pub struct RaTls {
    /// The raw quote, for signature verification.
    pub quote: Vec<u8>,
    /// What the quote reports.
    pub report: TdReport,
    /// The event log.
    pub events: Vec<Event>,
    /// Whether replaying the IMR-3 events gives the quote's RTMR3.
    pub rtmr3_matches: bool,
    /// The app id (legacy extension, else the `app-id` runtime event).
    pub app_id: Option<Vec<u8>>,
    /// The legacy certificate-usage extension.
    pub usage: Option<String>,
}

impl RaTls {
    /// Reads the attestation from a DER certificate and checks the key
    /// binding. The RTMR3 replay is recorded in `rtmr3_matches`.
    pub fn from_certificate(der: &[u8]) -> Result<RaTls, AttestError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| AttestError::Certificate(e.to_string()))?;
        let extension = |oid: &str| {
            cert.extensions()
                .iter()
                .find(|ext| ext.oid.to_id_string() == oid)
                .map(|ext| unwrap_octet_string(ext.value))
        };
        let (quote, events) = match (extension(OID_ATTESTATION), extension(OID_TDX_QUOTE)) {
            (Some(value), _) => {
                let attestation = decode_attestation(value)?;
                (attestation.quote, attestation.events)
            }
            (None, Some(quote)) => {
                let events = match extension(OID_EVENT_LOG) {
                    Some(log) => parse_event_log_json(log)?,
                    None => Vec::new(),
                };
                (quote.to_vec(), events)
            }
            (None, None) => return Err(AttestError::Missing),
        };
        let report = parse_quote(&quote)?;
        let spki = cert.public_key().raw;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
        ctx.update(BINDING_TAG);
        ctx.update(spki);
        if ctx.finish().as_ref() != report.report_data.as_slice() {
            return Err(AttestError::Binding);
        }
        let rtmr3_matches = replay_rtmr3(&events)? == report.rtmr[3];
        let app_id = extension(OID_APP_ID).map(<[u8]>::to_vec).or_else(|| {
            events
                .iter()
                .find(|e| e.imr == 3 && e.event_type == DSTACK_RUNTIME_EVENT && e.name == "app-id")
                .map(|e| e.payload.clone())
        });
        let usage = extension(OID_CERT_USAGE).map(|u| String::from_utf8_lossy(u).into_owned());
        Ok(RaTls {
            quote,
            report,
            events,
            rtmr3_matches,
            app_id: app_id.filter(|_| rtmr3_matches || extension(OID_APP_ID).is_some()),
            usage,
        })
    }

    /// The attestation as plugins see it. Runtime events are listed only
    /// when the replay matched RTMR3, so a plugin can rely on them.
    pub fn to_wit(&self, verified: &Verification) -> wit::Attestation {
        let runtime_events = match self.rtmr3_matches {
            true => self
                .events
                .iter()
                .filter(|e| e.imr == 3 && e.event_type == DSTACK_RUNTIME_EVENT)
                .map(|e| (e.name.clone(), e.payload.clone()))
                .collect(),
            false => Vec::new(),
        };
        wit::Attestation {
            tee: "tdx".into(),
            verified: verified.verified,
            tcb_status: verified.tcb_status.clone(),
            debug: self.report.debug(),
            mrtd: self.report.mrtd.to_vec(),
            rtmr: self.report.rtmr.iter().map(|r| r.to_vec()).collect(),
            report_data: self.report.report_data.to_vec(),
            app_id: self.app_id.clone(),
            runtime_events,
        }
    }
}

/// An extension value that is a DER OCTET STRING wrapping the payload (how
/// dstack writes them) is unwrapped; anything else is taken as it is.
fn unwrap_octet_string(value: &[u8]) -> &[u8] {
    use x509_parser::der_parser::der::parse_der_octetstring;
    match parse_der_octetstring(value) {
        Ok(([], object)) => object.as_slice().unwrap_or(value),
        _ => value,
    }
}

/// The outcome of checking a quote's signature chain and TCB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// The quote verified against the collateral.
    pub verified: bool,
    /// The TCB status reported (`UpToDate`, `OutOfDate`, ...).
    pub tcb_status: Option<String>,
    /// Why it did not verify, when it did not.
    pub reason: Option<String>,
}

/// Verifies quotes offline with dcap-qvl against collateral from files.
#[derive(Debug, Default)]
pub struct Verifier {
    collateral: Vec<dcap_qvl::QuoteCollateralV3>,
}

impl Verifier {
    /// Loads DCAP collateral files (JSON, as dcap-qvl and PCCS tools write
    /// them). No files means every quote is reported unverified.
    pub fn load(files: &[impl AsRef<Path>]) -> Result<Verifier, String> {
        let collateral = files
            .iter()
            .map(|file| {
                let file = file.as_ref();
                let text = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
                serde_json::from_slice(&text).map_err(|e| format!("{}: not DCAP collateral: {e}", file.display()))
            })
            .collect::<Result<_, String>>()?;
        Ok(Verifier { collateral })
    }

    /// Verifies `quote` as of `now` (seconds since the Unix epoch) against
    /// each collateral in turn; the first that verifies wins.
    pub fn verify(&self, quote: &[u8], now: u64) -> Verification {
        if self.collateral.is_empty() {
            return Verification {
                verified: false,
                tcb_status: None,
                reason: Some("no DCAP collateral is configured".into()),
            };
        }
        let mut reasons = Vec::new();
        for collateral in &self.collateral {
            match dcap_qvl::verify::verify(quote, collateral, now) {
                Ok(report) => {
                    return Verification {
                        verified: true,
                        tcb_status: Some(report.status),
                        reason: None,
                    };
                }
                Err(e) => reasons.push(format!("{e:#}")),
            }
        }
        Verification {
            verified: false,
            tcb_status: None,
            reason: Some(reasons.join("; ")),
        }
    }
}

/// What weir requires of every attestation before plugins see it: the
/// key binding (checked by [`RaTls::from_certificate`]), no debug TD unless
/// allowed; and what it reports: the quote verified against collateral.
#[derive(Debug, Default)]
pub struct AttestationPolicy {
    verifier: Verifier,
    allow_debug: bool,
}

impl AttestationPolicy {
    /// A policy verifying with `verifier`.
    pub fn new(verifier: Verifier, allow_debug: bool) -> AttestationPolicy {
        AttestationPolicy { verifier, allow_debug }
    }

    /// Reads and checks the attestation of an RA-TLS certificate (DER), and
    /// verifies its quote as of now.
    pub fn examine(&self, der: &[u8]) -> Result<wit::Attestation, String> {
        let ratls = RaTls::from_certificate(der).map_err(|e| e.to_string())?;
        if ratls.report.debug() && !self.allow_debug {
            return Err("the TD runs in debug mode (attestation.allow_debug is false)".into());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let verification = self.verifier.verify(&ratls.quote, now);
        if let Some(reason) = &verification.reason {
            tracing::debug!(%reason, "attestation not verified");
        }
        Ok(ratls.to_wit(&verification))
    }
}

#[cfg(test)]
mod tests;
