//! Verifying upstream servers beyond the web PKI: SHA-256 pins, and RA-TLS
//! attestation, and the chain's `admit` inside the handshake.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use weir_attest::AttestationPolicy;
use weir_plugin_sdk::hex;

use crate::tls::client_verifier::{Admission, describe, refused};
use crate::wit;

/// Verifies an upstream by pinned end-entity fingerprint, after its chain
/// when a CA bundle is also given. Without a bundle the pin is the whole
/// identity: names and validity dates are not checked.
#[derive(Debug)]
pub(crate) struct Pinned {
    pub(crate) chain: Option<Arc<WebPkiServerVerifier>>,
    pub(crate) pins: Vec<[u8; 32]>,
    pub(crate) algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(chain) = &self.chain {
            chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        }
        let seen = weir_attest::x509::fingerprint(end_entity);
        if self.pins.contains(&seen) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(refused(format!(
            "certificate SHA-256 {} is not pinned",
            hex::encode(&seen)
        )))
    }

    signatures_by_algorithms!();
}

/// RA-TLS upstreams: the certificate's attestation, fully checked, is its
/// identity (names and chains do not apply to a self-signed TD key).
#[derive(Debug)]
pub(crate) struct AttestedServer {
    pub(crate) policy: Arc<AttestationPolicy>,
    pub(crate) algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AttestedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.policy
            .examine(end_entity)
            .map_err(|e| refused(format!("RA-TLS: {e}")))?;
        Ok(ServerCertVerified::assertion())
    }

    signatures_by_algorithms!();
}

/// An upstream's certificate judged by the chain's `admit` inside the
/// handshake, after `inner` (or, for an RA-TLS upstream, the attestation,
/// examined once for both) accepts it: a deny fails the handshake before
/// weir finishes it, so the upstream never serves a refused connection.
#[derive(Debug)]
pub(crate) struct AdmittingServer {
    pub(crate) inner: Arc<dyn ServerCertVerifier>,
    pub(crate) admission: Arc<Admission>,
    /// Set for an RA-TLS upstream: `inner` would examine the same quote.
    pub(crate) attestation: Option<Arc<AttestationPolicy>>,
}

impl ServerCertVerifier for AdmittingServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let attestation = match &self.attestation {
            Some(policy) => {
                let examined = policy.examine(end_entity);
                if let Err(e) = &examined {
                    return Err(refused(format!("RA-TLS: {e}")));
                }
                Some(examined)
            }
            None => {
                self.inner
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
                None
            }
        };
        self.admission
            .check(wit::Side::Upstream, describe(end_entity, attestation))
            .map_err(refused)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
