//! dstack's app-info extension (`1.3.6.1.4.1.62397.1.9`): what the guest
//! agent says about the app when asked `with_app_info` — msgpack of its
//! `AppInfo` (fields in order, byte strings as msgpack bin).
//!
//! Nothing in the quote covers these bytes; only the attested key (whose
//! holder wrote the certificate) vouches for them. So weir checks each
//! claim that the event log can prove: when RTMR3 replays, an app id,
//! compose hash, instance id, OS image hash or key-provider claim that
//! differs from its runtime event refuses the certificate.

use serde::Deserialize;
use serde_bytes::ByteBuf;

use crate::{AttestError, DSTACK_RUNTIME_EVENT, Event};

/// Largest app-info extension read.
pub const MAX_APP_INFO: usize = 16 * 1024;

/// What the app-info extension says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AppInfo {
    /// The app id.
    pub app_id: ByteBuf,
    /// SHA-256 of the app's compose file.
    pub compose_hash: ByteBuf,
    /// The CVM instance's id.
    pub instance_id: ByteBuf,
    /// The device's id.
    pub device_id: ByteBuf,
    /// dstack's measurement of everything but the app info.
    pub mr_system: ByteBuf,
    /// dstack's measurement of the whole VM.
    pub mr_aggregated: ByteBuf,
    /// The OS image's hash.
    pub os_image_hash: ByteBuf,
    /// The key provider's description.
    pub key_provider_info: ByteBuf,
}

impl AppInfo {
    /// Decodes the extension's payload (the OCTET STRING's contents).
    pub fn decode(bytes: &[u8]) -> Result<AppInfo, AttestError> {
        crate::within("app info", bytes.len(), MAX_APP_INFO)?;
        rmp_serde::from_slice(bytes).map_err(|e| AttestError::AppInfo(e.to_string()))
    }

    /// The claims as (runtime event name, value), in the names dstack's
    /// runtime events use.
    pub fn claims(&self) -> [(&'static str, &[u8]); 5] {
        [
            ("app-id", &self.app_id),
            ("compose-hash", &self.compose_hash),
            ("instance-id", &self.instance_id),
            ("os-image-hash", &self.os_image_hash),
            ("key-provider", &self.key_provider_info),
        ]
    }

    /// Refuses a claim that a replayed runtime event contradicts.
    pub fn check_against(&self, events: &[Event]) -> Result<(), AttestError> {
        for (name, claimed) in self.claims() {
            let measured = events
                .iter()
                .find(|e| e.imr == 3 && e.event_type == DSTACK_RUNTIME_EVENT && e.name == name);
            if let Some(event) = measured
                && event.payload != claimed
            {
                return Err(AttestError::AppInfo(format!(
                    "it claims {name} {}, but the event log measured {}",
                    weir_plugin_sdk::hex::encode(claimed),
                    weir_plugin_sdk::hex::encode(&event.payload)
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What dstack's `rmp_serde::to_vec(&app_info)` writes: an array of
    /// the fields, byte strings as bin.
    pub(crate) fn encoded(compose_hash: &[u8]) -> Vec<u8> {
        let fields: [&[u8]; 8] = [
            &[0x33; 20],
            compose_hash,
            &[1; 20],
            &[2; 32],
            &[3; 32],
            &[4; 32],
            &[5; 32],
            b"{}",
        ];
        let fields: Vec<ByteBuf> = fields.iter().map(|f| ByteBuf::from(f.to_vec())).collect();
        rmp_serde::to_vec(&fields).expect("encodes")
    }

    #[test]
    fn dstack_app_info_decodes_and_is_checked_against_the_event_log() {
        let info = AppInfo::decode(&encoded(&[0xc0; 32])).expect("decodes");
        assert_eq!(info.app_id.as_slice(), [0x33; 20]);
        assert_eq!(info.compose_hash.as_slice(), [0xc0; 32]);
        assert_eq!(info.key_provider_info.as_slice(), b"{}");
        let event = |payload: &[u8]| Event {
            imr: 3,
            event_type: DSTACK_RUNTIME_EVENT,
            digest: vec![0; 48],
            name: "compose-hash".into(),
            payload: payload.to_vec(),
        };
        assert_eq!(info.check_against(&[event(&[0xc0; 32])]), Ok(()));
        let lie = info.check_against(&[event(&[0xd0; 32])]).expect_err("contradicted");
        assert!(lie.to_string().contains("claims compose-hash c0c0"), "{lie}");
        assert!(AppInfo::decode(b"\x93\x01\x02\x03").is_err(), "not an AppInfo");
        assert!(AppInfo::decode(&vec![0; MAX_APP_INFO + 1]).is_err(), "too large");
    }
}
