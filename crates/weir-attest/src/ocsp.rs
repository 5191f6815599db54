//! OCSP responses to staple: a DER `OCSPResponse` (as `openssl ocsp
//! -respout`, certbot or lego write it) is checked against the certificate
//! it is meant for before weir hands it to clients.
//!
//! Checked: the response is `successful` and basic, one of its answers names
//! this certificate (serial number, issuer name hash, and the issuer key hash
//! when the issuer is in the chain), that answer is `good`, and its
//! `thisUpdate` is not in the future. The responder's signature is the
//! client's to check, as with any stapled response; whether `nextUpdate` has
//! passed is for the caller, who decides whether to staple.

use std::time::{Duration, SystemTime};

use der::Decode;
use der::asn1::ObjectIdentifier;
use rustls_pki_types::CertificateDer;
use x509_ocsp::{BasicOcspResponse, CertStatus, OcspResponse, OcspResponseStatus, SingleResponse};

/// `id-pkix-ocsp-basic` (RFC 6960 4.2.1).
const ID_PKIX_OCSP_BASIC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.1");

/// How far a responder's clock may run ahead of weir's.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Why a response cannot be stapled to a certificate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OcspError {
    /// Not a DER OCSPResponse.
    #[error("not a DER OCSP response: {0}")]
    Malformed(String),
    /// The responder refused the request.
    #[error("the responder's status is `{0}`, not `successful`")]
    NotSuccessful(String),
    /// A response type other than the basic one.
    #[error("not a basic OCSP response (type {0})")]
    NotBasic(String),
    /// No answer in it is about this certificate.
    #[error("it has no status for this certificate (serial {0}): it is for another certificate or issuer")]
    OtherCertificate(String),
    /// The certificate is revoked.
    #[error("it says the certificate was revoked at {0}")]
    Revoked(String),
    /// The responder does not know the certificate.
    #[error("its status for the certificate is `unknown`")]
    Unknown,
    /// Produced in the future, by weir's clock.
    #[error("its thisUpdate ({0}) is in the future")]
    NotYetValid(String),
}

/// A checked response.
#[derive(Debug, Clone)]
pub struct Staple {
    /// The response, as it goes to clients.
    pub der: Vec<u8>,
    /// When the responder vouched for the certificate.
    pub this_update: SystemTime,
    /// When a newer response will be available; past it, this one is stale.
    /// `None`: the responder did not say.
    pub next_update: Option<SystemTime>,
}

/// Checks `response` (DER) for `chain`'s end-entity certificate, its issuer
/// second when present, at `now`.
pub fn check(response: &[u8], chain: &[CertificateDer<'_>], now: SystemTime) -> Result<Staple, OcspError> {
    let malformed = |e: der::Error| OcspError::Malformed(e.to_string());
    let outer = OcspResponse::from_der(response).map_err(malformed)?;
    if outer.response_status != OcspResponseStatus::Successful {
        return Err(OcspError::NotSuccessful(status_name(outer.response_status).into()));
    }
    let bytes = outer
        .response_bytes
        .ok_or_else(|| OcspError::Malformed("`successful` without a response".into()))?;
    if bytes.response_type != ID_PKIX_OCSP_BASIC {
        return Err(OcspError::NotBasic(bytes.response_type.to_string()));
    }
    let basic = BasicOcspResponse::from_der(bytes.response.as_bytes()).map_err(malformed)?;
    let leaf = chain
        .first()
        .ok_or_else(|| OcspError::Malformed("no certificate to check it against".into()))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| OcspError::Malformed(format!("the certificate does not parse: {e}")))?;
    // The issuer's key, when the certificate after the leaf is its issuer.
    let issuer_key = match chain.get(1) {
        Some(next) => {
            let (_, next) = x509_parser::parse_x509_certificate(next)
                .map_err(|e| OcspError::Malformed(format!("a chain certificate does not parse: {e}")))?;
            (next.subject().as_raw() == leaf.issuer().as_raw())
                .then(|| next.public_key().subject_public_key.data.to_vec())
        }
        None => None,
    };
    let serial = leaf.raw_serial();
    let ours = |single: &&SingleResponse| {
        let id = &single.cert_id;
        let Some(algorithm) = digest_for(&id.hash_algorithm.oid) else {
            return false;
        };
        let hash = |data: &[u8]| ring::digest::digest(algorithm, data);
        id.serial_number.as_bytes() == serial
            && id.issuer_name_hash.as_bytes() == hash(leaf.issuer().as_raw()).as_ref()
            && issuer_key
                .as_ref()
                .is_none_or(|key| id.issuer_key_hash.as_bytes() == hash(key).as_ref())
    };
    let single = basic
        .tbs_response_data
        .responses
        .iter()
        .find(ours)
        .ok_or_else(|| OcspError::OtherCertificate(weir_plugin_sdk::hex::encode(serial)))?;
    match &single.cert_status {
        CertStatus::Good(_) => {}
        CertStatus::Revoked(info) => {
            return Err(OcspError::Revoked(info.revocation_time.0.to_date_time().to_string()));
        }
        CertStatus::Unknown(_) => return Err(OcspError::Unknown),
    }
    let this_update = single.this_update.0.to_system_time();
    if this_update > now + CLOCK_SKEW {
        return Err(OcspError::NotYetValid(single.this_update.0.to_date_time().to_string()));
    }
    Ok(Staple {
        der: response.to_vec(),
        this_update,
        next_update: single.next_update.map(|t| t.0.to_system_time()),
    })
}

/// The digest a CertID names, among those RFC 6960 and its updates use.
fn digest_for(oid: &ObjectIdentifier) -> Option<&'static ring::digest::Algorithm> {
    const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
    const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
    const SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
    const SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
    match *oid {
        SHA1 => Some(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY),
        SHA256 => Some(&ring::digest::SHA256),
        SHA384 => Some(&ring::digest::SHA384),
        SHA512 => Some(&ring::digest::SHA512),
        _ => None,
    }
}

fn status_name(status: OcspResponseStatus) -> &'static str {
    match status {
        OcspResponseStatus::Successful => "successful",
        OcspResponseStatus::MalformedRequest => "malformedRequest",
        OcspResponseStatus::InternalError => "internalError",
        OcspResponseStatus::TryLater => "tryLater",
        OcspResponseStatus::SigRequired => "sigRequired",
        OcspResponseStatus::Unauthorized => "unauthorized",
    }
}

/// A time as RFC 3339, UTC, whole seconds.
pub fn rfc3339(time: SystemTime) -> String {
    der::DateTime::from_system_time(time).map_or_else(|_| format!("{time:?}"), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_or_garbage_is_named() {
        let none: &[CertificateDer<'_>] = &[];
        let now = SystemTime::now();
        // OCSPResponse { responseStatus tryLater(3) }
        assert_eq!(
            check(&[0x30, 0x03, 0x0a, 0x01, 0x03], none, now).map(|_| ()),
            Err(OcspError::NotSuccessful("tryLater".into()))
        );
        // `successful` with no responseBytes.
        assert_eq!(
            check(&[0x30, 0x03, 0x0a, 0x01, 0x00], none, now).map(|_| ()),
            Err(OcspError::Malformed("`successful` without a response".into()))
        );
        for garbage in [&b""[..], b"not DER", &[0x30, 0x05, 0x0a, 0x01]] {
            assert!(
                matches!(check(garbage, none, now), Err(OcspError::Malformed(_))),
                "{garbage:?}"
            );
        }
    }
}
