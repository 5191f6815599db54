//! Simulated RA-TLS evidence, for tests and local development without TDX
//! hardware: the dstack attestation extension (`1.3.6.1.4.1.62397.1.8`,
//! SCALE `VersionedAttestation::V0`) around a TDX v4 quote whose REPORTDATA
//! binds the certificate's key, as dstack writes it. Nothing signs the
//! quote's body, so weir — and any verifier — reports it **unverified**:
//! it passes only where a policy says `require_verified = false`.

/// The attestation extension's OID (`1.3.6.1.4.1.62397.1.8`) as arcs, the
/// form certificate builders (rcgen) take.
pub const ATTESTATION_OID_ARCS: &[u64] = &[1, 3, 6, 1, 4, 1, 62397, 1, 8];

/// Where a TDX v4 quote keeps MRTD (the 48-byte header, then the body's
/// 136 bytes before it).
const MRTD_AT: usize = 48 + 136;
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
    let mut attestation = vec![0u8, 0u8]; // V0, AttestationQuote::DstackTdx
    compact_len(&mut attestation, quote.len());
    attestation.extend_from_slice(quote);
    attestation.extend_from_slice(&[0, 0]); // no event log, no runtime events
    attestation.extend_from_slice(&quote[REPORT_DATA_AT..REPORT_DATA_AT + 64]);
    attestation.push(0); // config: ""
    let mut der = vec![0x04];
    match attestation.len() {
        len @ 0..0x80 => der.push(len as u8),
        len @ 0x80..0x100 => der.extend_from_slice(&[0x81, len as u8]),
        len => {
            let len = u16::try_from(len).unwrap_or(u16::MAX);
            der.push(0x82);
            der.extend_from_slice(&len.to_be_bytes());
        }
    }
    der.extend_from_slice(&attestation);
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
