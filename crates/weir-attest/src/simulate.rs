//! Simulated RA-TLS evidence, for tests and local development without TDX
//! hardware: the dstack attestation extension (`1.3.6.1.4.1.62397.1.8`,
//! SCALE `VersionedAttestation::V0`) around a TDX v4 quote whose REPORTDATA
//! binds the certificate's key, as dstack writes it. Nothing signs the
//! quote's body, so weir — and any verifier — reports it **unverified**:
//! it passes only where a policy says `require_verified = false`.

use crate::events::{runtime_event_digest, sha384};
use crate::{AppInfo, DSTACK_RUNTIME_EVENT};

/// The attestation extension's OID (`1.3.6.1.4.1.62397.1.8`) as arcs, the
/// form certificate builders (rcgen) take.
pub const ATTESTATION_OID_ARCS: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 8];
/// The app-info extension's OID (`1.3.6.1.4.1.62397.1.9`) as arcs.
pub const APP_INFO_OID_ARCS: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 9];

/// Where a TDX v4 quote keeps MRTD (the 48-byte header, then the body's
/// 136 bytes before it).
const MRTD_AT: usize = 48 + 136;
/// Where it keeps RTMR3.
const RTMR3_AT: usize = 48 + 472;
/// Where it keeps REPORTDATA.
const REPORT_DATA_AT: usize = 48 + 520;
/// A v4 quote's header and TD 1.0 body.
const HEADER_AND_BODY: usize = 48 + 584;

/// The key binding dstack puts in REPORTDATA: SHA-512 of `ratls-cert:`
/// and the certificate's SubjectPublicKeyInfo (DER).
pub fn key_binding(spki_der: &[u8]) -> [u8; 64] {
    let mut binding = ring::digest::Context::new(&ring::digest::SHA512);
    binding.update(b"ratls-cert:");
    binding.update(spki_der);
    let mut out = [0u8; 64];
    out.copy_from_slice(binding.finish().as_ref());
    out
}

/// A TDX v4 quote: a header, a TD report with this MRTD and REPORTDATA
/// (every other measurement zero), and an empty signature section.
pub fn synthetic_quote(mrtd: &[u8; 48], report_data: &[u8; 64]) -> Vec<u8> {
    let mut quote = vec![0u8; HEADER_AND_BODY + 4];
    quote[0..2].copy_from_slice(&4u16.to_le_bytes()); // version 4
    quote[2..4].copy_from_slice(&2u16.to_le_bytes()); // ECDSA P-256 attestation key
    quote[4..8].copy_from_slice(&0x81u32.to_le_bytes()); // TDX
    rebind(&mut quote, mrtd, report_data);
    quote
}

/// Writes MRTD and REPORTDATA into a TDX v4 quote (a real one, say, whose
/// signature then no longer covers its body). The quote must be v4.
pub fn rebind(quote: &mut [u8], mrtd: &[u8; 48], report_data: &[u8; 64]) {
    quote[MRTD_AT..MRTD_AT + 48].copy_from_slice(mrtd);
    quote[REPORT_DATA_AT..REPORT_DATA_AT + 64].copy_from_slice(report_data);
}

/// The attestation extension's value (a DER OCTET STRING) for `quote`,
/// with no event log, no runtime events and an empty config.
pub fn attestation_extension(quote: &[u8]) -> Vec<u8> {
    app_attestation_extension(quote, &[])
}

/// A dstack app as a simulated certificate describes it: the runtime
/// events its CVM measured into RTMR3, and the app-info extension.
#[derive(Debug, Clone, Default)]
pub struct App {
    /// The app id (20 bytes in dstack).
    pub app_id: Vec<u8>,
    /// SHA-256 of the compose file.
    pub compose_hash: Vec<u8>,
    /// The instance id.
    pub instance_id: Vec<u8>,
    /// The OS image's hash.
    pub os_image_hash: Vec<u8>,
    /// The key provider's description (JSON); none when empty.
    pub key_provider: Vec<u8>,
}

impl App {
    /// The runtime events dstack measures for the app, in its order.
    pub fn runtime_events(&self) -> Vec<(String, Vec<u8>)> {
        let mut events = vec![
            ("app-id".to_owned(), self.app_id.clone()),
            ("compose-hash".to_owned(), self.compose_hash.clone()),
            ("instance-id".to_owned(), self.instance_id.clone()),
        ];
        if !self.key_provider.is_empty() {
            events.push(("key-provider".to_owned(), self.key_provider.clone()));
        }
        events.push(("os-image-hash".to_owned(), self.os_image_hash.clone()));
        events
    }

    /// Measures the app's runtime events into `quote`'s RTMR3 (a v4 quote,
    /// as [`rebind`] takes) and returns the attestation extension carrying
    /// them and the app-info extension, both DER OCTET STRINGs: what
    /// dstack's guest agent writes `with_app_info`, `mr_system` and
    /// `mr_aggregated` computed from the quote as dstack does. A quote
    /// shorter than a v4 one's report is an error.
    pub fn extensions(&self, quote: &mut [u8]) -> Result<(Vec<u8>, Vec<u8>), crate::AttestError> {
        let report = crate::parse_quote(quote)?;
        let events = self.runtime_events();
        let mut rtmr3 = [0u8; 48];
        for (name, payload) in &events {
            let digest = runtime_event_digest(name, payload);
            rtmr3 = sha384(&[&rtmr3, &digest]);
        }
        quote[RTMR3_AT..RTMR3_AT + 48].copy_from_slice(&rtmr3);
        let attestation = app_attestation_extension(quote, &events);
        let report = crate::TdReport {
            rtmr: [report.rtmr[0], report.rtmr[1], report.rtmr[2], rtmr3],
            ..report
        };
        let (mr_system, mr_aggregated) = crate::app_info::measurements(&report, &self.key_provider);
        let bytes = |b: &[u8]| serde_bytes::ByteBuf::from(b.to_vec());
        let info = AppInfo {
            app_id: bytes(&self.app_id),
            compose_hash: bytes(&self.compose_hash),
            instance_id: bytes(&self.instance_id),
            // What dstack writes on TDX: SHA-256 of nothing.
            device_id: bytes(ring::digest::digest(&ring::digest::SHA256, b"").as_ref()),
            mr_system: bytes(&mr_system),
            mr_aggregated: bytes(&mr_aggregated),
            os_image_hash: bytes(&self.os_image_hash),
            key_provider_info: bytes(&self.key_provider),
            init_script_hashes: Some(Vec::new()),
        };
        let info = rmp_serde::to_vec(&info).map_err(|e| crate::AttestError::AppInfo(e.to_string()))?;
        Ok((attestation, octet_string(&info)))
    }
}

/// The attestation extension for `quote` with `events` as dstack runtime
/// events, both in the event log (IMR 3) and in the runtime-event list.
fn app_attestation_extension(quote: &[u8], events: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut attestation = vec![0u8, 0u8]; // V0, AttestationQuote::DstackTdx
    scale_bytes(&mut attestation, quote);
    compact_len(&mut attestation, events.len());
    for (name, payload) in events {
        attestation.extend_from_slice(&3u32.to_le_bytes());
        attestation.extend_from_slice(&DSTACK_RUNTIME_EVENT.to_le_bytes());
        scale_bytes(&mut attestation, &runtime_event_digest(name, payload));
        scale_bytes(&mut attestation, name.as_bytes());
        scale_bytes(&mut attestation, payload);
    }
    compact_len(&mut attestation, events.len());
    for (name, payload) in events {
        scale_bytes(&mut attestation, name.as_bytes());
        scale_bytes(&mut attestation, payload);
    }
    attestation.extend_from_slice(&quote[REPORT_DATA_AT..REPORT_DATA_AT + 64]);
    attestation.push(0); // config: ""
    octet_string(&attestation)
}

fn scale_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    compact_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// `bytes` as a DER OCTET STRING (up to 64 KiB).
fn octet_string(bytes: &[u8]) -> Vec<u8> {
    let mut der = vec![0x04];
    match bytes.len() {
        len @ 0..0x80 => der.push(len as u8),
        len @ 0x80..0x100 => der.extend_from_slice(&[0x81, len as u8]),
        len => {
            let len = u16::try_from(len).unwrap_or(u16::MAX);
            der.push(0x82);
            der.extend_from_slice(&len.to_be_bytes());
        }
    }
    der.extend_from_slice(bytes);
    der
}

/// SCALE's compact length (the one- to four-byte forms).
fn compact_len(out: &mut Vec<u8>, len: usize) {
    match len {
        0..0x40 => out.push((len as u8) << 2),
        0x40..0x4000 => out.extend_from_slice(&((len as u16) << 2 | 1).to_le_bytes()),
        _ => out.extend_from_slice(&((len as u32) << 2 | 2).to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_quote_parses_with_its_mrtd_and_binding() {
        let binding = key_binding(b"a key");
        let quote = synthetic_quote(&[7; 48], &binding);
        let report = crate::parse_quote(&quote).expect("parses");
        assert_eq!(report.mrtd, [7; 48]);
        assert_eq!(report.report_data, binding);
        let extension = attestation_extension(&quote);
        assert_eq!(
            extension[..2],
            [0x04, 0x82],
            "an OCTET STRING of {} bytes",
            extension.len()
        );
        let decoded = crate::decode_attestation(&extension[4..]).expect("decodes");
        assert_eq!(crate::parse_quote(&decoded.quote).expect("parses").mrtd, [7; 48]);
    }
}
