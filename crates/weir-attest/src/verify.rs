//! Quote verification against DCAP collateral, and the policy every
//! attestation meets before plugins see it.

use std::path::Path;

use crate::ratls::{Attestation, RaTls};

/// The outcome of checking a quote's signature chain and TCB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// The quote verified against the collateral.
    pub verified: bool,
    /// The TCB status reported (`UpToDate`, `OutOfDate`, ...).
    pub tcb_status: Option<String>,
    /// Why it did not verify, when it did not.
    pub reason: Option<String>,
}

/// Verifies quotes offline with dcap-qvl against collateral from files.
#[derive(Debug, Default)]
pub struct Verifier {
    collateral: Vec<dcap_qvl::QuoteCollateralV3>,
}

impl Verifier {
    /// Loads DCAP collateral files (JSON, as dcap-qvl and PCCS tools write
    /// them). No files means every quote is reported unverified.
    pub fn load(files: &[impl AsRef<Path>]) -> Result<Verifier, String> {
        let collateral = files
            .iter()
            .map(|file| {
                let file = file.as_ref();
                let text = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
                serde_json::from_slice(&text).map_err(|e| format!("{}: not DCAP collateral: {e}", file.display()))
            })
            .collect::<Result<_, String>>()?;
        Ok(Verifier { collateral })
    }

    /// Verifies `quote` as of `now` (seconds since the Unix epoch) against
    /// each collateral in turn; the first that verifies wins.
    pub fn verify(&self, quote: &[u8], now: u64) -> Verification {
        if self.collateral.is_empty() {
            return Verification {
                verified: false,
                tcb_status: None,
                reason: Some("no DCAP collateral is configured".into()),
            };
        }
        let mut reasons = Vec::new();
        for collateral in &self.collateral {
            match dcap_qvl::verify::verify(quote, collateral, now) {
                Ok(report) => {
                    return Verification {
                        verified: true,
                        tcb_status: Some(report.status),
                        reason: None,
                    };
                }
                Err(e) => reasons.push(format!("{e:#}")),
            }
        }
        Verification {
            verified: false,
            tcb_status: None,
            reason: Some(reasons.join("; ")),
        }
    }
}

/// What weir requires of every attestation before plugins see it: the
/// key binding (checked by [`RaTls::from_certificate`]), no debug TD unless
/// allowed; and what it reports: the quote verified against collateral.
#[derive(Debug, Default)]
pub struct AttestationPolicy {
    verifier: Verifier,
    allow_debug: bool,
}

impl AttestationPolicy {
    /// A policy verifying with `verifier`.
    pub fn new(verifier: Verifier, allow_debug: bool) -> AttestationPolicy {
        AttestationPolicy { verifier, allow_debug }
    }

    /// Reads and checks the attestation of an RA-TLS certificate (DER), and
    /// verifies its quote as of now.
    pub fn examine(&self, der: &[u8]) -> Result<Attestation, String> {
        let ratls = RaTls::from_certificate(der).map_err(|e| e.to_string())?;
        if ratls.report.debug() && !self.allow_debug {
            return Err("the TD runs in debug mode (attestation.allow_debug is false)".into());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let verification = self.verifier.verify(&ratls.quote, now);
        if let Some(reason) = &verification.reason {
            tracing::debug!(%reason, "attestation not verified");
        }
        Ok(ratls.attestation(&verification))
    }
}
