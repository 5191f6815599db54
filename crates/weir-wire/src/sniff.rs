//! Reads what a client asked for from its first bytes, without decrypting or
//! consuming anything: the TLS ClientHello (server name, ALPN, versions).
//!
//! The parser is pure: it looks at everything received so far and answers
//! "need more bytes", "here is the hello" or "this is not a ClientHello we
//! accept". The caller owns the socket, the deadline and the buffer, and
//! replays the bytes unchanged to the upstream. A hello may arrive one byte at
//! a time and span several TLS records; record framing is reassembled here and
//! the handshake message is decoded with `tls-parser`.

use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake, TlsVersion};
use weir_plugin_sdk::names::{self, NameError};

/// Largest ClientHello handshake message accepted (type and length header
/// included). Real hellos are 200 B to 2 KiB; post-quantum key shares push
/// Chromium's past 1.9 KiB.
pub const MAX_HELLO_LEN: usize = 16 * 1024;

/// Most bytes the host buffers while sniffing: the largest hello plus room for
/// the record headers of a hello fragmented into many records.
pub const MAX_SNIFF_BYTES: usize = MAX_HELLO_LEN + 1024;

/// TLS records may carry at most 2^14 bytes of plaintext (RFC 8446, 5.1).
const MAX_RECORD_LEN: usize = 1 << 14;
const RECORD_HEADER_LEN: usize = 5;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

/// What the client asked for in its ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name, canonical ([`names::canonicalize`]); `None` when the
    /// client sent no server_name extension.
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order.
    pub alpn: Vec<String>,
    /// Offered versions from supported_versions (GREASE values dropped), or
    /// the legacy hello version when that extension is absent.
    pub versions: Vec<u16>,
    /// The first AEAD the client offers among AES-GCM and
    /// ChaCha20-Poly1305 is ChaCha20: clients without AES instructions list
    /// it first, and a server should then follow the client's order.
    pub prefers_chacha: bool,
}

/// Why the first bytes are not a ClientHello that weir routes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SniffError {
    /// The first bytes are not a TLS handshake record.
    #[error("not TLS: first bytes {0:02x?} are not a TLS handshake record")]
    NotTls(Vec<u8>),
    /// A record header claims more than the 16 KiB TLS allows.
    #[error("TLS record of {0} bytes exceeds the 16384-byte limit")]
    RecordOverflow(usize),
    /// The hello is larger than [`MAX_HELLO_LEN`], or its records carry more
    /// framing than [`MAX_SNIFF_BYTES`] allows.
    #[error("ClientHello of {0} bytes exceeds the {MAX_HELLO_LEN}-byte limit")]
    TooLarge(usize),
    /// The first handshake message is not a ClientHello.
    #[error("first handshake message has type {0}, not ClientHello (1)")]
    NotClientHello(u8),
    /// A record between the hello's fragments is not a handshake record.
    #[error("a non-handshake record (type {0}) interrupts the ClientHello")]
    Interleaved(u8),
    /// A zero-length handshake record (forbidden by RFC 8446, 5.1).
    #[error("empty handshake record")]
    EmptyRecord,
    /// The hello or one of its extensions does not decode.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The same extension appears twice (forbidden by RFC 8446, 4.2).
    #[error("duplicate TLS extension 0x{0:04x}")]
    DuplicateExtension(u16),
    /// The server name is not a valid host name.
    #[error("invalid server name: {0}")]
    InvalidSni(NameError),
}

/// The parser's answer when no error is proven yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// The whole hello has arrived.
    Hello(ClientHello),
    /// More bytes are needed: nothing can change before `buf` holds at least
    /// this many, so a caller fed one byte at a time need not parse again
    /// until then.
    Incomplete(usize),
}

/// Parses the ClientHello at the start of `buf`, everything the client has
/// sent so far. Errors are final and are reported as soon as the bytes
/// received prove them.
pub fn parse_client_hello(buf: &[u8]) -> Result<Sniffed, SniffError> {
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        let header = &buf[pos..buf.len().min(pos + RECORD_HEADER_LEN)];
        check_record_header(header, pos == 0)?;
        if header.len() < RECORD_HEADER_LEN {
            return Ok(Sniffed::Incomplete(pos + RECORD_HEADER_LEN));
        }
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let body_start = pos + RECORD_HEADER_LEN;
        let body = &buf[body_start..buf.len().min(body_start + record_len)];
        handshake.extend_from_slice(body);
        if let Some(&kind) = handshake.first()
            && kind != HANDSHAKE_CLIENT_HELLO
        {
            return Err(SniffError::NotClientHello(kind));
        }
        let mut hello_missing = usize::MAX;
        if handshake.len() >= 4 {
            let hello_len = 4 + u24(&handshake[1..4]);
            if hello_len > MAX_HELLO_LEN {
                return Err(SniffError::TooLarge(hello_len));
            }
            if handshake.len() >= hello_len {
                return decode_hello(&handshake[..hello_len]).map(Sniffed::Hello);
            }
            hello_missing = hello_len - handshake.len();
        }
        if body.len() < record_len {
            let record_missing = record_len - body.len();
            return Ok(Sniffed::Incomplete(buf.len() + record_missing.min(hello_missing)));
        }
        pos = body_start + record_len;
        if pos >= MAX_SNIFF_BYTES {
            return Err(SniffError::TooLarge(pos));
        }
    }
}

/// Checks as much of a record header as has arrived, so that garbage and
/// oversized records are refused without waiting for more bytes.
fn check_record_header(header: &[u8], first: bool) -> Result<(), SniffError> {
    let not_tls = || SniffError::NotTls(header.to_vec());
    if let Some(&content_type) = header.first()
        && content_type != CONTENT_TYPE_HANDSHAKE
    {
        return Err(if first {
            not_tls()
        } else {
            SniffError::Interleaved(content_type)
        });
    }
    // Record versions 3.0 to 3.4; TLS 1.3 hellos still say 3.1 here.
    if let Some(&major) = header.get(1)
        && major != 3
    {
        return Err(not_tls());
    }
    if let Some(&minor) = header.get(2)
        && minor > 4
    {
        return Err(not_tls());
    }
    if header.len() == RECORD_HEADER_LEN {
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_RECORD_LEN {
            return Err(SniffError::RecordOverflow(len));
        }
        if len == 0 {
            return Err(SniffError::EmptyRecord);
        }
    }
    Ok(())
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// Decodes one complete ClientHello handshake message.
fn decode_hello(message: &[u8]) -> Result<ClientHello, SniffError> {
    let hello = match tls_parser::parse_tls_message_handshake(message) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        Ok(_) => return Err(SniffError::NotClientHello(message[0])),
        Err(_) => return Err(SniffError::Malformed("hello body does not decode")),
    };
    let mut out = ClientHello {
        sni: None,
        alpn: Vec::new(),
        versions: Vec::new(),
        prefers_chacha: prefers_chacha(&hello.ciphers),
    };
    let Some(raw_extensions) = hello.ext else {
        out.versions.push(hello.version.0);
        return Ok(out);
    };
    let (rest, extensions) = tls_parser::parse_tls_client_hello_extensions(raw_extensions)
        .map_err(|_| SniffError::Malformed("extensions do not decode"))?;
    if !rest.is_empty() {
        return Err(SniffError::Malformed("extensions do not decode"));
    }
    let mut seen = Vec::with_capacity(extensions.len());
    let mut supported_versions = None;
    for extension in &extensions {
        let kind = match extension {
            TlsExtension::Grease(kind, _) => *kind,
            other => tls_parser::TlsExtensionType::from(other).0,
        };
        if seen.contains(&kind) {
            return Err(SniffError::DuplicateExtension(kind));
        }
        seen.push(kind);
        match extension {
            TlsExtension::SNI(list) => out.sni = Some(server_name(list)?),
            TlsExtension::ALPN(list) => out.alpn = alpn(list)?,
            TlsExtension::SupportedVersions(list) => supported_versions = Some(versions(list)),
            _ => {}
        }
    }
    out.versions = supported_versions.unwrap_or_else(|| vec![hello.version.0]);
    Ok(out)
}

/// The single host_name of a server_name extension (RFC 6066, 3: at most one
/// name of each type; other name types are ignored).
fn server_name(list: &[(tls_parser::SNIType, &[u8])]) -> Result<String, SniffError> {
    let mut host_names = list.iter().filter(|(kind, _)| *kind == tls_parser::SNIType::HostName);
    let (_, name) = host_names
        .next()
        .ok_or(SniffError::Malformed("server_name extension without a host_name"))?;
    if host_names.next().is_some() {
        return Err(SniffError::Malformed("server_name extension with two host_names"));
    }
    names::canonicalize(name).map_err(SniffError::InvalidSni)
}

/// ALPN names must be non-empty (RFC 7301, 3.1); weir passes them on as text,
/// so they must also be UTF-8.
fn alpn(list: &[&[u8]]) -> Result<Vec<String>, SniffError> {
    if list.is_empty() {
        return Err(SniffError::Malformed("empty ALPN list"));
    }
    list.iter()
        .map(|name| {
            if name.is_empty() {
                return Err(SniffError::Malformed("empty ALPN protocol name"));
            }
            String::from_utf8(name.to_vec()).map_err(|_| SniffError::Malformed("ALPN protocol name is not UTF-8"))
        })
        .collect()
}

/// Whether ChaCha20-Poly1305 comes before every AES-GCM suite in the
/// client's list (TLS 1.3 and TLS 1.2 ECDHE suites; GREASE and others
/// skipped).
fn prefers_chacha(ciphers: &[tls_parser::TlsCipherSuiteID]) -> bool {
    const CHACHA: [u16; 3] = [0x1303, 0xcca8, 0xcca9];
    const AES_GCM: [u16; 6] = [0x1301, 0x1302, 0xc02b, 0xc02c, 0xc02f, 0xc030];
    ciphers
        .iter()
        .map(|c| c.0)
        .find(|c| CHACHA.contains(c) || AES_GCM.contains(c))
        .is_some_and(|c| CHACHA.contains(&c))
}

fn versions(list: &[TlsVersion]) -> Vec<u16> {
    list.iter().map(|v| v.0).filter(|v| v & 0x0f0f != 0x0a0a).collect()
}

#[cfg(test)]
mod tests;
