//! Verifying clients: bounded chains checked by webpki off the worker,
//! RA-TLS client certificates, and the admission of an authenticated peer
//! by the plugin chain's `admit`.

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use weir_attest::AttestationPolicy;

use crate::wit;

/// The plugin chain's say on one connection's authenticated peers.
pub struct Admission {
    /// Emptied by [`Admission::release`] once the handshake is over.
    chain: Mutex<Vec<Arc<crate::plugin::Plugin>>>,
    conn: Arc<wit::Connection>,
    outcome: Mutex<Option<Result<(), String>>>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("conn", &self.conn.id)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// `chain` will judge peers of `conn`.
    pub fn new(chain: &[Arc<crate::plugin::Plugin>], conn: Arc<wit::Connection>) -> Admission {
        Admission {
            chain: Mutex::new(chain.to_vec()),
            conn,
            outcome: Mutex::new(None),
        }
    }

    /// Asks every plugin of the chain about a described peer (or records
    /// why it could not be described); the first refusal is the answer.
    /// Remembers the outcome.
    pub fn check(&self, side: wit::Side, peer: Result<wit::Peer, String>) -> Result<(), String> {
        let chain = crate::sync::lock(&self.chain).clone();
        let outcome =
            peer.and_then(|peer| crate::plugin::chain::admit_blocking(&chain, &self.conn, side, &Arc::new(peer)));
        *crate::sync::lock(&self.outcome) = Some(outcome.clone());
        outcome
    }

    /// Lets the plugins go: the connection's server config outlives the
    /// handshake (rustls keeps it), and must not keep a replaced snapshot's
    /// plugins alive. A check after this admits by no plugin at all, so it
    /// is called only once the handshake and its checks are over.
    pub fn release(&self) {
        crate::sync::lock(&self.chain).clear();
    }

    /// What the last check said, if one ran.
    pub fn outcome(&self) -> Option<Result<(), String>> {
        crate::sync::lock(&self.outcome).clone()
    }
}

/// Client authentication that ends in the plugins' `admit`: after the CA
/// (or attestation) check passes, a plugin's deny fails the handshake with
/// `access_denied`.
#[derive(Debug)]
pub(crate) struct Admitting {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) admission: Option<Arc<Admission>>,
    pub(crate) attestation: Option<Arc<AttestationPolicy>>,
}

impl ClientCertVerifier for Admitting {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_client_chain(end_entity, intermediates).map_err(refused)?;
        let verified = crate::sync::off_the_worker(|| self.inner.verify_client_cert(end_entity, intermediates, now))?;
        let Some(admission) = &self.admission else {
            return Ok(verified);
        };
        let attestation = self.attestation.as_ref().map(|policy| policy.examine(end_entity));
        match admission.check(wit::Side::Client, describe(end_entity, attestation)) {
            Ok(()) => Ok(verified),
            Err(_) => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A peer's description with its attestation, when it has one; an
/// attestation that failed its checks fails the description.
pub fn describe(
    der: &[u8],
    attestation: Option<Result<weir_attest::Attestation, String>>,
) -> Result<wit::Peer, String> {
    let peer = weir_attest::x509::describe(der)?;
    let attestation = attestation.transpose().map_err(|e| format!("RA-TLS: {e}"))?;
    Ok(wit::Peer::new(peer, attestation.map(wit::Attestation::from)))
}

/// RA-TLS client certificates: self-signed, so no chain to check; the
/// handshake's signature proves possession of the key, and the attestation
/// must bind that key. The full attestation check (debug policy, quote
/// verification) and the plugins' `admit` follow in [`Admitting`].
#[derive(Debug)]
pub(crate) struct AttestedClient {
    pub(crate) algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AttestedClient {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        weir_attest::RaTls::from_certificate(end_entity).map_err(|e| refused(format!("RA-TLS: {e}")))?;
        Ok(ClientCertVerified::assertion())
    }

    signatures_by_algorithms!();
}

/// Most intermediates a client may send with its certificate.
pub(crate) const MAX_CLIENT_INTERMEDIATES: usize = 8;

/// Most bytes of certificates a client may send.
pub(crate) const MAX_CLIENT_CHAIN_BYTES: usize = 32 * 1024;

/// Refuses a client certificate chain that no real client sends, before
/// any signature is checked: path building tries every intermediate whose
/// subject matches an issuer, so a leaf sent with dozens of self-signed
/// certificates named alike cost 100-120 ms of CPU per handshake (a real
/// chain, ~1 ms). At most 8 intermediates, 32 KiB in all, and no more than
/// two sharing a subject (a cross-signed intermediate and its twin).
pub(crate) fn check_client_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), String> {
    if intermediates.len() > MAX_CLIENT_INTERMEDIATES {
        return Err(format!(
            "the client certificate came with {} intermediates (at most {MAX_CLIENT_INTERMEDIATES})",
            intermediates.len()
        ));
    }
    let bytes = end_entity.len() + intermediates.iter().map(|c| c.len()).sum::<usize>();
    if bytes > MAX_CLIENT_CHAIN_BYTES {
        return Err(format!(
            "the client certificate chain is {bytes} bytes (at most {MAX_CLIENT_CHAIN_BYTES})"
        ));
    }
    let mut subjects: Vec<&[u8]> = Vec::with_capacity(intermediates.len());
    let parsed: Vec<_> = intermediates
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .collect();
    for (_, cert) in &parsed {
        let subject = cert.tbs_certificate.subject.as_raw();
        if subjects.iter().filter(|s| **s == subject).count() >= 2 {
            return Err(format!(
                "the client certificate chain has more than two intermediates named `{}`",
                cert.tbs_certificate.subject
            ));
        }
        subjects.push(subject);
    }
    Ok(())
}

/// A certificate refused for `reason`.
pub(crate) fn refused(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(std::io::Error::other(
        reason,
    )))))
}
