//! A listener's TLS settings (versions, cipher suites, ALPN), checked and
//! resolved once, and the other TLS rules a config is checked against
//! (ALPN names, SHA-256 pins).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, SupportedProtocolVersion};

use crate::{ListenerTls, TlsVersion};

/// A field of the config and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// The field, dotted (`certificates.site.key`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Invalid {
    /// `field` and what is wrong with it.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// TLS 1.3 alone, for `min_version = "1.3"`.
pub static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The crypto provider everything here uses, its cipher suites in weir's
/// order of preference ([`PREFERENCE`]).
pub fn base_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        PREFERENCE
            .iter()
            .position(|preferred| *preferred == suite.suite())
            .unwrap_or(PREFERENCE.len())
    });
    provider
}

/// The order in which a terminating weir picks a cipher suite when the
/// client does not put ChaCha20 first: AES-128-GCM before AES-256-GCM (a
/// TLS 1.3 handshake with SHA-256 costs less than one with SHA-384, and
/// AES-128 encrypts faster), ChaCha20-Poly1305 last (for clients with AES
/// instructions it is the slower one), as Go's TLS stack does.
pub const PREFERENCE: [CipherSuite; 9] = [
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// A listener's TLS settings, resolved.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// The provider, with the configured cipher suites (all, if none are named).
    pub provider: Arc<CryptoProvider>,
    /// The protocol versions allowed.
    pub versions: &'static [&'static SupportedProtocolVersion],
    /// The ALPN protocols offered, in preference order.
    pub alpn: Vec<Vec<u8>>,
}

/// Checks a listener's TLS settings and resolves them. Errors name the field
/// under `tls`.
pub fn check_listener(tls: &ListenerTls) -> Result<ListenerSettings, Invalid> {
    let invalid = |field: &str, reason: String| Invalid::new(field, reason);
    let versions: &'static [&'static SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => rustls::ALL_VERSIONS,
        TlsVersion::Tls13 => TLS13_ONLY,
    };
    let mut provider = base_provider();
    if !tls.cipher_suites.is_empty() {
        let mut suites = Vec::new();
        for name in &tls.cipher_suites {
            let found = rustls::crypto::ring::ALL_CIPHER_SUITES
                .iter()
                .find(|s| s.suite().as_str() == Some(name.as_str()));
            match found {
                Some(suite) => suites.push(*suite),
                None => {
                    let known: Vec<&str> = rustls::crypto::ring::ALL_CIPHER_SUITES
                        .iter()
                        .filter_map(|s| s.suite().as_str())
                        .collect();
                    return Err(invalid(
                        "cipher_suites",
                        format!("unknown cipher suite `{name}` (known: {})", known.join(", ")),
                    ));
                }
            }
        }
        if !suites.iter().any(|s| versions.contains(&s.version())) {
            return Err(invalid(
                "cipher_suites",
                "none of these suites works with the TLS versions min_version allows".into(),
            ));
        }
        provider.cipher_suites = suites;
    }
    let alpn = alpn_list(&tls.alpn).map_err(|reason| invalid("alpn", reason))?;
    Ok(ListenerSettings {
        provider: Arc::new(provider),
        versions,
        alpn,
    })
}

/// ALPN protocol names as bytes; each must be 1 to 255 bytes.
pub fn alpn_list(names: &[String]) -> Result<Vec<Vec<u8>>, String> {
    names
        .iter()
        .map(|name| match name.len() {
            1..=255 => Ok(name.as_bytes().to_vec()),
            len => Err(format!("ALPN protocol names are 1 to 255 bytes, got {len}")),
        })
        .collect()
}

/// Parses a SHA-256 fingerprint written as hex, with or without colons.
pub fn parse_pin(text: &str) -> Result<[u8; 32], String> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    let bad = || format!("`{text}` is not a SHA-256 fingerprint (64 hex digits, colons allowed)");
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(digits.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ListenerTls, TlsVersion};

    #[test]
    fn pins_parse_with_or_without_colons() {
        let plain = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let pin = parse_pin(plain).expect("valid");
        assert_eq!(pin[1], 0x11);
        assert_eq!(pin[31], 0xff);
        let colons: Vec<String> = plain
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into())
            .collect();
        assert_eq!(parse_pin(&colons.join(":")), Ok(pin));
        for bad in ["", "00", &plain[2..], &format!("{plain}00"), &plain.replace('0', "g")] {
            assert!(parse_pin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listener_settings_are_checked() {
        let ok = ListenerTls {
            min_version: TlsVersion::Tls13,
            cipher_suites: vec!["TLS13_CHACHA20_POLY1305_SHA256".into()],
            alpn: vec!["h2".into()],
        };
        let settings = check_listener(&ok).expect("valid");
        assert_eq!(settings.provider.cipher_suites.len(), 1);
        assert_eq!(settings.alpn, vec![b"h2".to_vec()]);
        let unknown = ListenerTls {
            cipher_suites: vec!["TLS_RSA_WITH_RC4_128_MD5".into()],
            ..ok.clone()
        };
        let Invalid { field, reason } = check_listener(&unknown).expect_err("unknown suite");
        assert_eq!(field, "cipher_suites");
        assert!(reason.contains("TLS_RSA_WITH_RC4_128_MD5"), "{reason}");
        let only12 = ListenerTls {
            cipher_suites: vec!["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into()],
            ..ok.clone()
        };
        assert!(check_listener(&only12).is_err());
        let empty_alpn = ListenerTls {
            alpn: vec![String::new()],
            ..ok
        };
        assert_eq!(check_listener(&empty_alpn).expect_err("empty").field, "alpn");
    }
}
