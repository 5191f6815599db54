//! Host names: the one canonical form and the matching rules that weir uses
//! everywhere — in the host (sniffing, certificate choice, tenant dispatch,
//! logs) and in plugins (routing tables). Sharing this code is what keeps a
//! name from meaning one thing to the router and another to the certificate
//! store.

use std::fmt;

/// Longest host name accepted, in bytes, without the trailing dot (RFC 1035).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label accepted, in bytes (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a name is not a valid host name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty (or only a dot).
    Empty,
    /// Longer than [`MAX_NAME_LEN`] bytes.
    TooLong(usize),
    /// A label is empty (two dots in a row, or a leading dot).
    EmptyLabel,
    /// A label is longer than [`MAX_LABEL_LEN`] bytes.
    LabelTooLong(usize),
    /// A byte outside letters, digits, `-` and `_` (non-ASCII names must arrive as
    /// punycode A-labels).
    InvalidByte(u8),
    /// A label starts or ends with `-`.
    Hyphen,
    /// An IP address literal, which RFC 6066 forbids in SNI.
    IpLiteral,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => write!(f, "empty host name"),
            NameError::TooLong(n) => write!(f, "host name is {n} bytes, more than {MAX_NAME_LEN}"),
            NameError::EmptyLabel => write!(f, "host name has an empty label"),
            NameError::LabelTooLong(n) => {
                write!(f, "host name has a {n}-byte label, more than {MAX_LABEL_LEN}")
            }
            NameError::InvalidByte(b) => write!(f, "host name contains byte 0x{b:02x}"),
            NameError::Hyphen => write!(f, "a host name label starts or ends with '-'"),
            NameError::IpLiteral => write!(f, "an IP address is not a host name"),
        }
    }
}

impl std::error::Error for NameError {}

/// Canonicalises a host name: ASCII lower-case, one trailing dot removed, and
/// validated (LDH labels plus `_`, label and name lengths, no IP literal).
///
/// Every name weir compares goes through this function first.
pub fn canonicalize(name: &[u8]) -> Result<String, NameError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    let mut out = String::with_capacity(name.len());
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong(label.len()));
        }
        if label.first() == Some(&b'-') || label.last() == Some(&b'-') {
            return Err(NameError::Hyphen);
        }
        if !out.is_empty() {
            out.push('.');
        }
        for &b in label {
            match b {
                b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => out.push(b as char),
                b'A'..=b'Z' => out.push(b.to_ascii_lowercase() as char),
                other => return Err(NameError::InvalidByte(other)),
            }
        }
    }
    if looks_like_ipv4(&out) {
        return Err(NameError::IpLiteral);
    }
    Ok(out)
}

/// A dotted quad of decimal numbers is an IPv4 literal, not a name. (IPv6
/// literals already fail on `:`.)
fn looks_like_ipv4(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The labels of a canonical name, left to right: `"a.b.c"` → `["a", "b", "c"]`.
pub fn labels(name: &str) -> impl DoubleEndedIterator<Item = &str> {
    name.split('.')
}

/// Splits a canonical name into its first label and the rest:
/// `"app-8080.example.com"` → `Some(("app-8080", "example.com"))`. A single-label
/// name has no rest and gives `None`.
pub fn split_first_label(name: &str) -> Option<(&str, &str)> {
    name.split_once('.')
}

/// True when `name` is `suffix` or lies below it on a label boundary:
/// `example.com` is a suffix of `a.example.com` and of `example.com`, but not of
/// `badexample.com`. Both arguments must be canonical.
pub fn has_suffix(name: &str, suffix: &str) -> bool {
    match name.strip_suffix(suffix) {
        Some("") => true,
        Some(rest) => rest.ends_with('.'),
        None => false,
    }
}

/// The part of `name` in front of `suffix` (without the joining dot), when
/// `name` lies strictly below `suffix`: `("a.b.example.com", "example.com")` →
/// `Some("a.b")`.
pub fn strip_suffix<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    name.strip_suffix(suffix)?
        .strip_suffix('.')
        .filter(|rest| !rest.is_empty())
}

/// A host-name pattern as written in routing tables and certificate lists.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Matches exactly this canonical name.
    Exact(String),
    /// `*.example.com`: matches exactly one label in front of the suffix
    /// (`a.example.com`, not `example.com` nor `a.b.example.com`), as in
    /// certificate wildcards (RFC 6125).
    Wildcard(String),
}

impl Pattern {
    /// Parses `name` or `*.suffix`, canonicalising the name part.
    pub fn parse(pattern: &str) -> Result<Pattern, NameError> {
        match pattern.strip_prefix("*.") {
            Some(suffix) => Ok(Pattern::Wildcard(canonicalize(suffix.as_bytes())?)),
            None => Ok(Pattern::Exact(canonicalize(pattern.as_bytes())?)),
        }
    }

    /// Whether a canonical name matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == name,
            Pattern::Wildcard(suffix) => strip_suffix(name, suffix).is_some_and(|label| !label.contains('.')),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_is_lowercase_without_trailing_dot() {
        assert_eq!(canonicalize(b"App.Example.COM.").as_deref(), Ok("app.example.com"));
        assert_eq!(canonicalize(b"a-b_c.example").as_deref(), Ok("a-b_c.example"));
        assert_eq!(
            canonicalize(b"xn--bcher-kva.example").as_deref(),
            Ok("xn--bcher-kva.example")
        );
    }

    #[test]
    fn invalid_names_are_refused() {
        assert_eq!(canonicalize(b""), Err(NameError::Empty));
        assert_eq!(canonicalize(b"."), Err(NameError::Empty));
        assert_eq!(canonicalize(b"a..b"), Err(NameError::EmptyLabel));
        assert_eq!(canonicalize(b".a"), Err(NameError::EmptyLabel));
        assert_eq!(canonicalize(b"a.b.."), Err(NameError::EmptyLabel));
        assert_eq!(canonicalize(b"a\0b"), Err(NameError::InvalidByte(0)));
        assert_eq!(canonicalize(b"a b"), Err(NameError::InvalidByte(b' ')));
        assert_eq!(canonicalize("bücher.de".as_bytes()), Err(NameError::InvalidByte(0xc3)));
        assert_eq!(canonicalize(b"-a.example"), Err(NameError::Hyphen));
        assert_eq!(canonicalize(b"127.0.0.1"), Err(NameError::IpLiteral));
        assert_eq!(canonicalize(b"::1"), Err(NameError::InvalidByte(b':')));
        let long_label = "a".repeat(64);
        assert_eq!(canonicalize(long_label.as_bytes()), Err(NameError::LabelTooLong(64)));
        let long_name = ["a".repeat(63).as_str(); 4].join(".");
        assert_eq!(canonicalize(long_name.as_bytes()), Err(NameError::TooLong(255)));
        // 253 bytes is the limit, and a trailing dot does not count.
        let max = format!("{}.{}", ["a".repeat(63).as_str(); 3].join("."), "a".repeat(61));
        assert_eq!(max.len(), 253);
        assert!(canonicalize(format!("{max}.").as_bytes()).is_ok());
    }

    #[test]
    fn suffix_matching_respects_label_boundaries() {
        assert!(has_suffix("a.example.com", "example.com"));
        assert!(has_suffix("example.com", "example.com"));
        assert!(!has_suffix("badexample.com", "example.com"));
        assert_eq!(strip_suffix("a.b.example.com", "example.com"), Some("a.b"));
        assert_eq!(strip_suffix("example.com", "example.com"), None);
        assert_eq!(strip_suffix("xexample.com", "example.com"), None);
        assert_eq!(split_first_label("app-1.example.com"), Some(("app-1", "example.com")));
        assert_eq!(labels("a.b.c").rev().collect::<Vec<_>>(), ["c", "b", "a"]);
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let p = Pattern::parse("*.Example.com").expect("valid pattern");
        assert!(p.matches("a.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.b.example.com"));
        assert!(!p.matches("aexample.com"));
        assert_eq!(p.to_string(), "*.example.com");
        let exact = Pattern::parse("A.example.com.").expect("valid pattern");
        assert!(exact.matches("a.example.com"));
        assert!(Pattern::parse("*.").is_err());
        assert!(Pattern::parse("a.*.com").is_err());
    }
}
