//! The TDX event log: its entries, the IMR-3 replay, and the legacy JSON
//! form.

use crate::{AttestError, DSTACK_RUNTIME_EVENT, MAX_EVENTS};

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
    /// Whether this is a dstack runtime event extended into RTMR3.
    pub fn is_runtime_event(&self) -> bool {
        self.imr == 3 && self.event_type == DSTACK_RUNTIME_EVENT
    }

    /// The digest extended into the IMR: recomputed from name and payload for
    /// a dstack runtime event (binding them), the logged one otherwise.
    fn extended_digest(&self, index: usize) -> Result<[u8; 48], AttestError> {
        if self.event_type == DSTACK_RUNTIME_EVENT {
            return Ok(runtime_event_digest(&self.name, &self.payload));
        }
        <[u8; 48]>::try_from(self.digest.as_slice()).map_err(|_| AttestError::Digest {
            index,
            len: self.digest.len(),
        })
    }
}

/// The first dstack runtime event called `name`: the one the system emits
/// at boot, before anything an app in the TD adds under the same name.
pub(crate) fn runtime_event<'a>(events: &'a [Event], name: &str) -> Option<&'a Event> {
    events.iter().find(|e| e.is_runtime_event() && e.name == name)
}

/// dstack's digest of a runtime event: SHA-384 of its type (little-endian),
/// `:`, its name, `:`, its payload.
pub(crate) fn runtime_event_digest(name: &str, payload: &[u8]) -> [u8; 48] {
    sha384(&[
        &DSTACK_RUNTIME_EVENT.to_le_bytes(),
        b":",
        name.as_bytes(),
        b":",
        payload,
    ])
}

pub(crate) fn sha384(parts: &[&[u8]]) -> [u8; 48] {
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

/// The legacy JSON event log (`…1.2`): dstack's `TdxEvent` with hex fields.
pub(crate) fn parse_event_log_json(bytes: &[u8]) -> Result<Vec<Event>, AttestError> {
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
    // An empty field is no bytes (dstack writes `"digest": ""` for events
    // it has not hashed).
    let hex = |s: &str| match s.strip_prefix("0x").unwrap_or(s) {
        "" => Ok(Vec::new()),
        _ => weir_plugin_sdk::hex::decode(s).map_err(|e| AttestError::EventLog(format!("a hex field: {e}"))),
    };
    let entries: Vec<Json> = serde_json::from_slice(bytes).map_err(|e| AttestError::EventLog(e.to_string()))?;
    crate::within("event log", entries.len(), MAX_EVENTS)?;
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
