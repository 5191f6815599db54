//! The dstack attestation extension: SCALE `VersionedAttestation::V0` and
//! the msgpack V1 form.

use crate::events::Event;
use crate::quote::Reader;
use crate::{AttestError, MAX_ATTESTATION, MAX_EVENTS, MAX_QUOTE};

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
    /// The platform dstack names: `tdx`, or `gcp-tdx` (a TDX quote whose
    /// dstack measurements come from a TPM quote instead).
    pub platform: &'static str,
}

/// Decodes the dstack attestation extension: SCALE
/// `VersionedAttestation::V0` when the first byte is 0, the msgpack V1 form
/// when it opens a msgpack map.
pub fn decode_attestation(bytes: &[u8]) -> Result<DstackAttestation, AttestError> {
    crate::within("attestation", bytes.len(), MAX_ATTESTATION)?;
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
    crate::within("event log", count, MAX_EVENTS)?;
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
    crate::within("runtime events", count, MAX_EVENTS)?;
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
        platform: "tdx",
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
    let (quote, log, platform) = match attestation.platform {
        v1::Platform::Tdx { quote, event_log } => (quote, event_log, "tdx"),
        v1::Platform::GcpTdx { quote, event_log } => (quote, event_log, "gcp-tdx"),
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
        platform,
    })
}
