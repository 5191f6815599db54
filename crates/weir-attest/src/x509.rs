//! The x509 facts weir reads off certificates: the SHA-256 fingerprint,
//! notAfter, and the identity plugins are shown of an authenticated peer
//! (subject in RFC 4514 form, DNS and IP subjectAltNames).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_plugin_sdk::hex;
use x509_parser::prelude::*;

/// SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// A DER certificate's notAfter.
pub fn not_after(der: &[u8]) -> Result<SystemTime, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("the certificate does not parse: {e}"))?;
    let seconds = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

/// The DNS names (subjectAltName) a DER certificate covers, as written.
pub fn dns_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                out.push((*dns).to_owned());
            }
        }
    }
    Ok(out)
}

/// What plugins are shown of an authenticated certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The subject, RFC 4514.
    pub subject: String,
    /// DNS names and IP addresses from subjectAltName (other SAN types are
    /// not identities weir vouches for).
    pub sans: Vec<String>,
    /// SHA-256 of the DER certificate.
    pub fingerprint: [u8; 32],
}

/// Describes a DER certificate as a [`Peer`].
pub fn describe(der: &[u8]) -> Result<Peer, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable peer certificate: {e}"))?;
    let mut sans = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => sans.push((*dns).to_owned()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => sans.push(Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default()).to_string()),
                    16 => sans.push(Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default()).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(Peer {
        subject: rfc4514(cert.subject()),
        sans,
        fingerprint: fingerprint(der),
    })
}

/// A distinguished name as RFC 4514 writes it: last RDN first, `,` between
/// RDNs, `+` inside one, special characters escaped, non-string values as
/// `#` and the hex of their DER.
pub fn rfc4514(name: &X509Name<'_>) -> String {
    use x509_parser::der_parser::asn1_rs::ToDer;
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<_> = name.iter().collect();
    rdns.into_iter()
        .rev()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let oid = attr.attr_type();
                    let key = match x509_parser::objects::oid2abbrev(oid, registry) {
                        Ok(abbrev) => abbrev.to_owned(),
                        Err(_) => oid.to_id_string(),
                    };
                    let value = match attr.as_str() {
                        Ok(text) => escape_rfc4514(text),
                        Err(_) => format!("#{}", hex::encode(&attr.attr_value().to_der_vec().unwrap_or_default())),
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn escape_rfc4514(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinguished_names_follow_rfc_4514() {
        assert_eq!(escape_rfc4514("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_rfc4514("#x "), "\\#x\\ ");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["client.example".into()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CountryName, "DE");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Weir, Inc");
        params.distinguished_name.push(rcgen::DnType::CommonName, "client one");
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        params
            .subject_alt_names
            .push(rcgen::SanType::Rfc822Name("ops@example.com".try_into().expect("email")));
        let cert = params.self_signed(&key).expect("cert");
        let peer = describe(cert.der()).expect("describes");
        assert_eq!(peer.subject, "CN=client one,O=Weir\\, Inc,C=DE");
        assert_eq!(peer.sans, vec!["client.example".to_owned(), "127.0.0.1".to_owned()]);
        assert_eq!(peer.fingerprint, fingerprint(cert.der()));
    }
}
