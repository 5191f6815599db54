//! `acme` on a certificate and the `[dns.NAME]` providers its DNS-01
//! challenges are published through, with their checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Config, ConfigError, defaults};

/// Most authoritative servers a provider waits at.
pub const MAX_NAMESERVERS: usize = 16;
/// Largest TSIG secret file read (a BIND key file is a few hundred bytes).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Where and how a certificate is ordered over ACME (RFC 8555).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL (`https://`).
    pub directory: String,
    /// The names the certificate is for; wildcards (`*.apps.example.com`)
    /// with the DNS-01 challenge only.
    pub domains: Vec<String>,
    /// Contact URLs for the account (`mailto:ops@example.com`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// PEM file of roots trusted for the directory's own HTTPS, for a
    /// private CA (the system roots otherwise); relative to the config file.
    pub directory_ca: Option<PathBuf>,
    /// Where the account's credentials are kept; `cert` with the extension
    /// `account.json` when absent. Relative to the config file.
    pub account: Option<PathBuf>,
    /// Renew when the certificate expires within this long.
    #[serde(default = "defaults::renew_before", with = "humantime_serde")]
    pub renew_before: Duration,
    /// How the CA validates each name.
    #[serde(default)]
    pub challenge: Challenge,
    /// The `[dns.NAME]` provider that publishes DNS-01 records.
    pub dns: Option<String>,
}

impl AcmeConfig {
    /// The account credentials file for a certificate kept in `cert`.
    pub fn account_file(&self, cert: &Path) -> PathBuf {
        self.account
            .clone()
            .unwrap_or_else(|| cert.with_extension("account.json"))
    }
}

/// An ACME challenge type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Challenge {
    /// RFC 8737: the CA connects to the name's port 443 offering the ALPN
    /// protocol `acme-tls/1`; weir's listeners answer it.
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// RFC 8555 §8.4: the CA looks up a TXT record at
    /// `_acme-challenge.NAME`, which a `[dns.NAME]` provider publishes.
    #[serde(rename = "dns-01")]
    Dns01,
}

impl Challenge {
    /// The name ACME and the config give it.
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::TlsAlpn01 => "tls-alpn-01",
            Challenge::Dns01 => "dns-01",
        }
    }
}

/// How a DNS provider publishes records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsProvider {
    /// Dynamic updates (RFC 2136) signed with TSIG (RFC 8945), sent to the
    /// zone's primary server.
    Rfc2136,
    /// An operator's command, run as `COMMAND... present|cleanup FQDN VALUE`.
    Exec,
}

/// A TSIG algorithm (RFC 8945 §6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TsigAlgorithm {
    /// HMAC-SHA256, the one every server speaks.
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    /// HMAC-SHA384.
    #[serde(rename = "hmac-sha384")]
    HmacSha384,
    /// HMAC-SHA512.
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

impl TsigAlgorithm {
    /// The name BIND's key files give it.
    pub fn as_str(self) -> &'static str {
        match self {
            TsigAlgorithm::HmacSha256 => "hmac-sha256",
            TsigAlgorithm::HmacSha384 => "hmac-sha384",
            TsigAlgorithm::HmacSha512 => "hmac-sha512",
        }
    }
}

/// A `[dns.NAME]` provider: where DNS-01 TXT records are published, and
/// the authoritative servers weir waits at until they answer with them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// `rfc2136` or `exec`.
    pub provider: DnsProvider,
    /// rfc2136: the zone's primary server (`192.0.2.53:53`).
    pub server: Option<SocketAddr>,
    /// The zone the records are in (`apps.example.com`); required for
    /// rfc2136, and when given every DNS-01 name must lie in it.
    pub zone: Option<String>,
    /// rfc2136: the TSIG key's name, as the server knows it.
    pub tsig_key: Option<String>,
    /// rfc2136: the TSIG algorithm.
    #[serde(default)]
    pub tsig_algorithm: TsigAlgorithm,
    /// rfc2136: the file holding the TSIG secret, either the base64 secret
    /// alone or the key file `tsig-keygen` writes; readable by weir's user
    /// alone. Relative to the config file.
    pub tsig_secret_file: Option<PathBuf>,
    /// exec: the program and its first arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// exec: how long one run of the command may take.
    #[serde(default = "defaults::dns_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// The zone's authoritative servers, asked directly (no recursion)
    /// until each answers with the record; rfc2136 defaults to `server`.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Longest wait for the record to be visible at every nameserver.
    #[serde(default = "defaults::dns_propagation_timeout", with = "humantime_serde")]
    pub propagation_timeout: Duration,
    /// TTL of the TXT records, in seconds.
    #[serde(default = "defaults::dns_ttl")]
    pub ttl: u32,
}

impl DnsConfig {
    /// The servers to wait at.
    pub fn check_at(&self) -> Vec<SocketAddr> {
        if self.nameservers.is_empty() {
            self.server.into_iter().collect()
        } else {
            self.nameservers.clone()
        }
    }

    /// The TSIG secret, read from `tsig_secret_file` (resolved against
    /// `config`): the file must be readable by weir's user alone, and hold
    /// either the base64 secret or a BIND key file for `tsig_key` with
    /// `tsig_algorithm`.
    pub fn tsig_secret(&self, config: &Config) -> Result<Vec<u8>, String> {
        use std::io::Read as _;
        let Some(file) = &self.tsig_secret_file else {
            return Err("no tsig_secret_file".into());
        };
        let path = config.resolve(file);
        let at = |reason: String| format!("{}: {reason}", path.display());
        crate::private::check_secret(&path).map_err(at)?;
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_string(&mut text))
            .map_err(|e| at(e.to_string()))?;
        if text.len() as u64 > MAX_SECRET_FILE {
            return Err(at(format!("larger than {MAX_SECRET_FILE} bytes")));
        }
        let key = self.tsig_key.as_deref().unwrap_or_default();
        parse_tsig_secret(&text, key, self.tsig_algorithm).map_err(at)
    }
}

/// The secret of `text`: a BIND key file (`key "NAME" { algorithm A;
/// secret "B64"; };`) for `key` with `algorithm`, or the base64 secret alone.
fn parse_tsig_secret(text: &str, key: &str, algorithm: TsigAlgorithm) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let quoted = |after: &str| -> Option<&str> {
        let rest = &text[text.find(after)? + after.len()..];
        let rest = rest.trim_start().strip_prefix('"')?;
        rest.split_once('"').map(|(value, _)| value)
    };
    let secret = if text.contains('{') {
        let named = quoted("key").ok_or("a key file without `key \"NAME\"`")?;
        if !named
            .trim_end_matches('.')
            .eq_ignore_ascii_case(key.trim_end_matches('.'))
        {
            return Err(format!(
                "the file's key is `{}`, not tsig_key `{key}`",
                named.escape_debug()
            ));
        }
        let algorithm_line = text
            .split_once("algorithm")
            .and_then(|(_, rest)| rest.split_once(';'))
            .map(|(name, _)| name.trim());
        if let Some(named) = algorithm_line
            && !named.eq_ignore_ascii_case(algorithm.as_str())
        {
            return Err(format!(
                "the file's algorithm is `{}`, not tsig_algorithm `{}`",
                named.escape_debug(),
                algorithm.as_str()
            ));
        }
        quoted("secret").ok_or("a key file without `secret \"...\"`")?
    } else {
        text.trim()
    };
    let secret = base64::engine::general_purpose::STANDARD
        .decode(secret.trim())
        .map_err(|e| format!("the secret is not base64: {e}"))?;
    if secret.len() < 16 {
        return Err(format!("the secret is {} bytes; at least 16 are needed", secret.len()));
    }
    Ok(secret)
}

/// Whether `name` is `zone` or lies below it.
fn in_zone(name: &str, zone: &str) -> bool {
    name == zone || name.strip_suffix(zone).is_some_and(|head| head.ends_with('.'))
}

fn canonical(name: &str) -> bool {
    weir_plugin_sdk::names::canonicalize(name.as_bytes()).as_deref() == Ok(name)
}

impl Config {
    /// ACME certificates: an https directory, canonical domains, wildcards
    /// only with DNS-01, and a DNS provider whose zone holds every name.
    pub(super) fn check_acme(&self) -> Result<(), ConfigError> {
        self.check_dns()?;
        for (name, certificate) in &self.certificates {
            let Some(acme) = &certificate.acme else { continue };
            let field = |f: &str| format!("certificates.{name}.acme.{f}");
            if !acme.directory.starts_with("https://") {
                return Err(self.invalid(field("directory"), "must be an https:// URL"));
            }
            if acme.domains.is_empty() {
                return Err(self.invalid(field("domains"), "must name at least one domain"));
            }
            let provider = match (acme.challenge, &acme.dns) {
                (Challenge::TlsAlpn01, None) => None,
                (Challenge::TlsAlpn01, Some(_)) => {
                    return Err(self.invalid(field("dns"), "only with challenge = \"dns-01\""));
                }
                (Challenge::Dns01, None) => {
                    return Err(self.invalid(field("dns"), "challenge = \"dns-01\" needs a [dns.NAME] provider"));
                }
                (Challenge::Dns01, Some(dns)) => Some(self.dns.get(dns).ok_or_else(|| {
                    self.invalid(field("dns"), format!("no [dns.{}] is defined", dns.escape_debug()))
                })?),
            };
            for domain in &acme.domains {
                let base = domain.strip_prefix("*.");
                if base.is_some() && provider.is_none() {
                    return Err(self.invalid(
                        field("domains"),
                        format!("`{domain}`: a wildcard needs challenge = \"dns-01\" (TLS-ALPN-01 cannot validate it)"),
                    ));
                }
                let host = base.unwrap_or(domain);
                if !canonical(host) {
                    return Err(self.invalid(
                        field("domains"),
                        format!(
                            "`{}` is not a host name in canonical form (lower case, no trailing dot)",
                            domain.escape_debug()
                        ),
                    ));
                }
                if let Some(zone) = provider.and_then(|p| p.zone.as_deref())
                    && !in_zone(host, zone)
                {
                    return Err(self.invalid(
                        field("domains"),
                        format!(
                            "`{domain}` is not in the zone `{zone}` of [dns.{}]",
                            acme.dns.as_deref().unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[dns.NAME]`: each provider has what it needs and nothing of the
    /// other kind's, and bounded timeouts. (The TSIG secret file is read
    /// where the other files are, when a snapshot is built.)
    fn check_dns(&self) -> Result<(), ConfigError> {
        for (name, dns) in &self.dns {
            let field = |f: &str| format!("dns.{name}.{f}");
            let required = |present: bool, f: &str| {
                if present {
                    Ok(())
                } else {
                    Err(self.invalid(field(f), format!("required with provider = \"{}\"", provider_name(dns))))
                }
            };
            let absent = |present: bool, f: &str| {
                if present {
                    Err(self.invalid(field(f), format!("not used with provider = \"{}\"", provider_name(dns))))
                } else {
                    Ok(())
                }
            };
            match dns.provider {
                DnsProvider::Rfc2136 => {
                    required(dns.server.is_some(), "server")?;
                    required(dns.zone.is_some(), "zone")?;
                    required(dns.tsig_key.is_some(), "tsig_key")?;
                    required(dns.tsig_secret_file.is_some(), "tsig_secret_file")?;
                    absent(!dns.command.is_empty(), "command")?;
                }
                DnsProvider::Exec => {
                    required(!dns.command.is_empty(), "command")?;
                    required(!dns.nameservers.is_empty(), "nameservers")?;
                    absent(dns.server.is_some(), "server")?;
                    absent(dns.tsig_key.is_some(), "tsig_key")?;
                    absent(dns.tsig_secret_file.is_some(), "tsig_secret_file")?;
                }
            }
            if let Some(zone) = &dns.zone
                && !canonical(zone)
            {
                return Err(self.invalid(
                    field("zone"),
                    format!("`{}` is not a domain in canonical form", zone.escape_debug()),
                ));
            }
            if let Some(key) = &dns.tsig_key
                && (key.is_empty() || key.len() > 253 || !key.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(self.invalid(field("tsig_key"), "must be a DNS name of printable characters"));
            }
            if dns.nameservers.len() > MAX_NAMESERVERS {
                return Err(self.invalid(field("nameservers"), format!("at most {MAX_NAMESERVERS}")));
            }
            let bounded = |value: Duration, f: &str, max: Duration| {
                if value < Duration::from_secs(1) || value > max {
                    Err(self.invalid(field(f), format!("must be between 1s and {max:?}")))
                } else {
                    Ok(())
                }
            };
            bounded(dns.command_timeout, "command_timeout", Duration::from_secs(600))?;
            bounded(
                dns.propagation_timeout,
                "propagation_timeout",
                Duration::from_secs(3600),
            )?;
            if !(1..=86_400).contains(&dns.ttl) {
                return Err(self.invalid(field("ttl"), "must be between 1 and 86400 seconds"));
            }
        }
        Ok(())
    }
}

fn provider_name(dns: &DnsConfig) -> &'static str {
    match dns.provider {
        DnsProvider::Rfc2136 => "rfc2136",
        DnsProvider::Exec => "exec",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tsig_secret_is_read_from_a_bind_key_file_or_alone() {
        let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ==";
        let file = format!("key \"weir-acme\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{secret}\";\n}};\n");
        let expected = b"secret-secret-secret-secret!".to_vec();
        assert_eq!(
            parse_tsig_secret(&file, "weir-acme", TsigAlgorithm::HmacSha256),
            Ok(expected.clone())
        );
        assert_eq!(
            parse_tsig_secret(&format!("{secret}\n"), "any", TsigAlgorithm::HmacSha512),
            Ok(expected)
        );
        assert_eq!(
            parse_tsig_secret(&file, "other", TsigAlgorithm::HmacSha256),
            Err("the file's key is `weir-acme`, not tsig_key `other`".into())
        );
        assert_eq!(
            parse_tsig_secret(&file, "weir-acme", TsigAlgorithm::HmacSha512),
            Err("the file's algorithm is `hmac-sha256`, not tsig_algorithm `hmac-sha512`".into())
        );
        assert!(parse_tsig_secret("not base64!", "k", TsigAlgorithm::HmacSha256).is_err_and(|e| e.contains("base64")));
        assert!(parse_tsig_secret("c2hvcnQ=", "k", TsigAlgorithm::HmacSha256).is_err_and(|e| e.contains("16")));
        assert!(parse_tsig_secret("key { secret \"x\"; };", "k", TsigAlgorithm::HmacSha256).is_err());
    }

    #[test]
    fn names_lie_in_a_zone_at_a_label_boundary() {
        assert!(in_zone("apps.test", "apps.test"));
        assert!(in_zone("x.apps.test", "apps.test"));
        assert!(!in_zone("xapps.test", "apps.test"));
        assert!(!in_zone("test", "apps.test"));
    }
}
