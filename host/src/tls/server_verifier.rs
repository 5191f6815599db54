//! Verifying upstream servers beyond the web PKI: SHA-256 pins, and RA-TLS
//! attestation (after which the chain's `admit` decides).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use weir_attest::AttestationPolicy;
use weir_plugin_sdk::hex;

use crate::tls::client_verifier::refused;

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
