//! dstack's app-info extension (`1.3.6.1.4.1.62397.1.9`): what the guest
//! agent says about the app when asked `with_app_info` — msgpack of its
//! `AppInfo` (fields in order, byte strings as msgpack bin).
//!
//! Nothing in the quote covers these bytes; only the attested key (whose
//! holder wrote the certificate) vouches for them. So weir checks each
//! claim that the event log and the quote can prove: when RTMR3 replays, an
//! app id, compose hash, instance id, OS image hash or key-provider claim
//! that differs from its runtime event, or an `mr_system` or
//! `mr_aggregated` that is not what dstack computes from the quote, refuses
//! the certificate.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::events::runtime_event;
use crate::{AttestError, Event, TdReport};

/// Largest app-info extension read.
pub const MAX_APP_INFO: usize = 16 * 1024;
/// Most init-script hashes an app-info may list (dstack's `MAX_INIT_SCRIPTS`).
pub const MAX_INIT_SCRIPTS: usize = 5;

/// What the app-info extension says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// SHA-256 of each init script, in order, when the certificate binds
    /// them (dstack 0.6 and later write the field; earlier ones do not).
    #[serde(default)]
    pub init_script_hashes: Option<Vec<ByteBuf>>,
}

impl AppInfo {
    /// Decodes the extension's payload (the OCTET STRING's contents).
    pub fn decode(bytes: &[u8]) -> Result<AppInfo, AttestError> {
        crate::within("app info", bytes.len(), MAX_APP_INFO)?;
        let info: AppInfo = rmp_serde::from_slice(bytes).map_err(|e| AttestError::AppInfo(e.to_string()))?;
        if let Some(hashes) = &info.init_script_hashes {
            crate::within("init-script hashes", hashes.len(), MAX_INIT_SCRIPTS)?;
            if let Some(bad) = hashes.iter().find(|hash| hash.len() != 32) {
                return Err(AttestError::AppInfo(format!(
                    "an init-script hash is {} bytes, not 32",
                    bad.len()
                )));
            }
        }
        Ok(info)
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

    /// Refuses a claim that a replayed runtime event contradicts, or an
    /// `mr_system` / `mr_aggregated` other than dstack's from `report`
    /// (whose RTMR3 the events replayed into), when there is one.
    pub fn check_against(&self, events: &[Event], report: Option<&TdReport>) -> Result<(), AttestError> {
        for (name, claimed) in self.claims() {
            if let Some(event) = runtime_event(events, name)
                && event.payload != claimed
            {
                return Err(contradicted(name, claimed, &event.payload, "the event log measured"));
            }
        }
        let Some(report) = report else {
            return Ok(());
        };
        let key_provider = runtime_event(events, "key-provider").map_or(&[][..], |e| &e.payload);
        let (mr_system, mr_aggregated) = measurements(report, key_provider);
        for (name, claimed, computed) in [
            ("mr_system", &self.mr_system, mr_system),
            ("mr_aggregated", &self.mr_aggregated, mr_aggregated),
        ] {
            if claimed.as_slice() != computed {
                return Err(contradicted(name, claimed, &computed, "the quote gives"));
            }
        }
        Ok(())
    }
}

fn contradicted(name: &str, claimed: &[u8], proven: &[u8], by: &str) -> AttestError {
    AttestError::AppInfo(format!(
        "it claims {name} {}, but {by} {}",
        weir_plugin_sdk::hex::encode(claimed),
        weir_plugin_sdk::hex::encode(proven)
    ))
}

/// dstack's `mr_system` and `mr_aggregated` of a TDX quote whose RTMR3 the
/// runtime events replay into (`decode_mr_tdx_from_quote` in dstack-attest):
/// - `mr_system` = SHA-256(MRTD ‖ RTMR0 ‖ RTMR1 ‖ RTMR2 ‖ the key provider's
///   SHA-256, or 32 zero bytes when it has none);
/// - `mr_aggregated` = SHA-256(MRTD ‖ RTMR0 ‖ RTMR1 ‖ RTMR2 ‖ RTMR3, then
///   MRCONFIGID ‖ MROWNER ‖ MROWNERCONFIG when any of them is not zero).
pub fn measurements(report: &TdReport, key_provider: &[u8]) -> ([u8; 32], [u8; 32]) {
    use ring::digest::{Context, SHA256, digest};
    let mr_key_provider = match key_provider.is_empty() {
        true => [0u8; 32],
        false => sha256(digest(&SHA256, key_provider).as_ref()),
    };
    let [rtmr0, rtmr1, rtmr2, rtmr3] = &report.rtmr;
    let mut system = Context::new(&SHA256);
    let mut aggregated = Context::new(&SHA256);
    for part in [&report.mrtd, rtmr0, rtmr1, rtmr2] {
        system.update(part);
        aggregated.update(part);
    }
    system.update(&mr_key_provider);
    aggregated.update(rtmr3);
    let owner = [&report.mrconfigid, &report.mrowner, &report.mrownerconfig];
    if owner.iter().any(|field| **field != [0u8; 48]) {
        owner.iter().for_each(|field| aggregated.update(*field));
    }
    (sha256(system.finish().as_ref()), sha256(aggregated.finish().as_ref()))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::DSTACK_RUNTIME_EVENT;

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
        assert_eq!(info.init_script_hashes, None, "dstack before 0.6 writes eight fields");
        assert_eq!(info.check_against(&[event(&[0xc0; 32])], None), Ok(()));
        let lie = info
            .check_against(&[event(&[0xd0; 32])], None)
            .expect_err("contradicted");
        assert!(lie.to_string().contains("claims compose-hash c0c0"), "{lie}");
        assert!(AppInfo::decode(b"\x93\x01\x02\x03").is_err(), "not an AppInfo");
        assert!(AppInfo::decode(&vec![0; MAX_APP_INFO + 1]).is_err(), "too large");
    }

    /// dstack 0.6 and later: a ninth field, nil or a list of 32-byte hashes.
    #[test]
    fn init_script_hashes_are_read_and_bounded() {
        let with = |ninth: rmpv_like::Ninth| {
            let mut fields = encoded(&[0xc0; 32]);
            fields[0] = 0x99; // fixarray of 9
            fields.extend_from_slice(&ninth.0);
            AppInfo::decode(&fields)
        };
        assert_eq!(with(rmpv_like::nil()).expect("nil").init_script_hashes, None);
        let two = with(rmpv_like::hashes(&[32, 32])).expect("two");
        assert_eq!(two.init_script_hashes.map(|h| h.len()), Some(2));
        let short = with(rmpv_like::hashes(&[31])).expect_err("31 bytes");
        assert!(
            short.to_string().contains("an init-script hash is 31 bytes, not 32"),
            "{short}"
        );
        let many = with(rmpv_like::hashes(&[32; MAX_INIT_SCRIPTS + 1])).expect_err("too many");
        assert!(many.to_string().contains("init-script hashes"), "{many}");
    }

    /// Hand-written msgpack for the ninth field.
    mod rmpv_like {
        pub(super) struct Ninth(pub(super) Vec<u8>);

        pub(super) fn nil() -> Ninth {
            Ninth(vec![0xc0])
        }

        pub(super) fn hashes(lens: &[usize]) -> Ninth {
            let mut out = vec![0x90 | lens.len() as u8];
            for len in lens {
                out.extend_from_slice(&[0xc4, *len as u8]);
                out.extend(std::iter::repeat_n(0xab, *len));
            }
            Ninth(out)
        }
    }
}
