//! An RA-TLS certificate's attestation: found, its key binding checked,
//! RTMR3 replayed; and [`Attestation`], what plugins are shown of it.

use crate::events::{Event, parse_event_log_json, replay_rtmr3, runtime_event};
use crate::extension::decode_attestation;
use crate::quote::{TdReport, parse_quote};
use crate::verify::Verification;
use crate::{
    AppInfo, AttestError, BINDING_TAG, OID_APP_ID, OID_APP_INFO, OID_ATTESTATION, OID_CERT_USAGE, OID_EVENT_LOG,
    OID_TDX_QUOTE,
};

/// The attestation an RA-TLS certificate carries, with the checks that need
/// nothing but the certificate done.
#[derive(Debug, Clone)]
pub struct RaTls {
    /// The raw quote, for signature verification.
    pub quote: Vec<u8>,
    /// What the quote reports.
    pub report: TdReport,
    /// The event log.
    pub events: Vec<Event>,
    /// Whether replaying the IMR-3 events gives the quote's RTMR3.
    pub rtmr3_matches: bool,
    /// The app id: the `app-id` runtime event, when RTMR3 replayed (a
    /// legacy app-id extension that says otherwise refuses the
    /// certificate).
    pub app_id: Option<Vec<u8>>,
    /// The app-info extension, checked against the replayed event log and
    /// the quote (when `app_info_checked`).
    pub app_info: Option<AppInfo>,
    /// Whether every app-info claim the event log and the quote can prove was
    /// checked: RTMR3 replayed, on TDX (on GCP dstack measures with a TPM
    /// quote weir does not read).
    pub app_info_checked: bool,
    /// The legacy certificate-usage extension.
    pub usage: Option<String>,
}

impl RaTls {
    /// Reads the attestation from a DER certificate and checks the key
    /// binding. The RTMR3 replay is recorded in `rtmr3_matches`.
    pub fn from_certificate(der: &[u8]) -> Result<RaTls, AttestError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| AttestError::Certificate(e.to_string()))?;
        let extension = |oid: &str| {
            cert.extensions()
                .iter()
                .find(|ext| ext.oid.to_id_string() == oid)
                .map(|ext| unwrap_octet_string(ext.value))
        };
        let (quote, events, platform) = match (extension(OID_ATTESTATION), extension(OID_TDX_QUOTE)) {
            (Some(value), _) => {
                let attestation = decode_attestation(value)?;
                (attestation.quote, attestation.events, attestation.platform)
            }
            (None, Some(quote)) => {
                let events = match extension(OID_EVENT_LOG) {
                    Some(log) => parse_event_log_json(log)?,
                    None => Vec::new(),
                };
                (quote.to_vec(), events, "tdx")
            }
            (None, None) => return Err(AttestError::Missing),
        };
        let report = parse_quote(&quote)?;
        let spki = cert.public_key().raw;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
        ctx.update(BINDING_TAG);
        ctx.update(spki);
        if ctx.finish().as_ref() != report.report_data.as_slice() {
            return Err(AttestError::Binding);
        }
        let rtmr3_matches = replay_rtmr3(&events)? == report.rtmr[3];
        // The app id is what RTMR3 measured, nothing less: a TD can have
        // any key quoted, so a certificate's own claim (the legacy
        // extension, the app info) names no app unless the log proves it.
        let app_id = runtime_event(&events, "app-id")
            .map(|e| e.payload.clone())
            .filter(|_| rtmr3_matches);
        if let (Some(measured), Some(claimed)) = (&app_id, extension(OID_APP_ID))
            && measured.as_slice() != claimed
        {
            return Err(AttestError::AppId(format!(
                "it claims {}, but the event log measured {}",
                weir_plugin_sdk::hex::encode(claimed),
                weir_plugin_sdk::hex::encode(measured)
            )));
        }
        let usage = extension(OID_CERT_USAGE).map(|u| String::from_utf8_lossy(u).into_owned());
        let app_info = extension(OID_APP_INFO).map(AppInfo::decode).transpose()?;
        let app_info_checked = rtmr3_matches && platform == "tdx";
        if let Some(info) = &app_info
            && rtmr3_matches
        {
            info.check_against(&events, app_info_checked.then_some(&report))?;
        }
        Ok(RaTls {
            quote,
            report,
            events,
            rtmr3_matches,
            app_id,
            app_info,
            app_info_checked,
            usage,
        })
    }

    /// The attestation as plugins are shown it. Runtime events are listed only
    /// when the replay matched RTMR3, so a plugin can rely on them.
    pub fn attestation(&self, verified: &Verification) -> Attestation {
        let runtime_events = match self.rtmr3_matches {
            true => self
                .events
                .iter()
                .filter(|e| e.is_runtime_event())
                .map(|e| (e.name.clone(), e.payload.clone()))
                .collect(),
            false => Vec::new(),
        };
        Attestation {
            tee: "tdx".into(),
            verified: verified.verified,
            tcb_status: verified.tcb_status.clone(),
            debug: self.report.debug(),
            mrtd: self.report.mrtd.to_vec(),
            rtmr: self.report.rtmr.iter().map(|r| r.to_vec()).collect(),
            report_data: self.report.report_data.to_vec(),
            app_id: self.app_id.clone(),
            runtime_events,
            app_info: self.app_info.clone().filter(|_| self.app_info_checked),
        }
    }
}

/// An extension value that is a DER OCTET STRING wrapping the payload (how
/// dstack writes them) is unwrapped; anything else is taken as it is.
fn unwrap_octet_string(value: &[u8]) -> &[u8] {
    use x509_parser::der_parser::der::parse_der_octetstring;
    match parse_der_octetstring(value) {
        Ok(([], object)) => object.as_slice().unwrap_or(value),
        _ => value,
    }
}

/// What a checked attestation says, as plugins are shown it (the host turns
/// it into the contract's `attestation` record, field for field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// The TEE: `tdx`.
    pub tee: String,
    /// The quote verified against DCAP collateral.
    pub verified: bool,
    /// The TCB status the verification reported.
    pub tcb_status: Option<String>,
    /// The TD runs in debug mode.
    pub debug: bool,
    /// MRTD, 48 bytes.
    pub mrtd: Vec<u8>,
    /// RTMR0-3, 48 bytes each.
    pub rtmr: Vec<Vec<u8>>,
    /// REPORTDATA, 64 bytes.
    pub report_data: Vec<u8>,
    /// The app id, when RTMR3's replayed event log names one.
    pub app_id: Option<Vec<u8>>,
    /// dstack runtime events (name, payload), when RTMR3 replayed.
    pub runtime_events: Vec<(String, Vec<u8>)>,
    /// The app-info extension, only once its claims were checked
    /// ([`RaTls::app_info_checked`]).
    pub app_info: Option<AppInfo>,
}
