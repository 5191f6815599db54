//! PostgreSQL's first message, recognised without consuming anything: an
//! SSLRequest (the client wants TLS), a GSSENCRequest (refused with `N`), a
//! StartupMessage or CancelRequest (no TLS), or a TLS ClientHello
//! (PostgreSQL 17 direct TLS). Pure, like [`crate::sniff`]: the caller owns
//! the socket and the deadline.

/// The SSLRequest message: length 8, code 80877103.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.x, the only one servers speak since PostgreSQL 7.4.
const PROTOCOL_MAJOR_3: u32 = 3;
/// Longest StartupMessage a server accepts (PostgreSQL's MAX_STARTUP_PACKET_LENGTH).
const MAX_STARTUP_LEN: u32 = 10_000;

/// What the client sent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// More bytes are needed: at least this many in total.
    Incomplete(usize),
    /// An SSLRequest, and `trailing` bytes after it.
    SslRequest {
        /// Bytes received after the 8-byte request.
        trailing: usize,
    },
    /// A GSSENCRequest, and `trailing` bytes after it.
    GssEncRequest {
        /// Bytes received after the 8-byte request.
        trailing: usize,
    },
    /// A StartupMessage or CancelRequest: the client speaks without TLS.
    Plain,
    /// A TLS record: direct TLS.
    Tls,
}

/// Why the first bytes are not a PostgreSQL client's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// The length or code is not one PostgreSQL accepts.
    #[error("not a PostgreSQL startup: length {length}, code {code}")]
    NotPostgres {
        /// The message length field.
        length: u32,
        /// The request code or protocol version.
        code: u32,
    },
    /// Bytes followed the SSLRequest before the TLS handshake; answering
    /// would let them be taken as sent over TLS (CVE-2021-23214).
    #[error("{0} bytes arrived after the SSLRequest, before TLS")]
    BytesAfterSslRequest(usize),
    /// Bytes followed a GSSENCRequest before its answer.
    #[error("{0} bytes arrived after the GSSENCRequest, before its answer")]
    BytesAfterGssEncRequest(usize),
}

/// Classifies the first message in `buf` (everything received so far).
pub fn classify(buf: &[u8]) -> Result<First, PostgresError> {
    match buf.first() {
        None => return Ok(First::Incomplete(1)),
        // A TLS handshake record: a PostgreSQL length's first byte is 0.
        Some(0x16) => return Ok(First::Tls),
        Some(_) => {}
    }
    let Some(header) = buf.get(..8) else {
        return Ok(First::Incomplete(8));
    };
    let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let code = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let trailing = buf.len() - 8;
    match (length, code) {
        (8, SSL_REQUEST_CODE) => Ok(First::SslRequest { trailing }),
        (8, GSSENC_REQUEST_CODE) => Ok(First::GssEncRequest { trailing }),
        (16, CANCEL_REQUEST_CODE) => Ok(First::Plain),
        (9..=MAX_STARTUP_LEN, code) if code >> 16 == PROTOCOL_MAJOR_3 => Ok(First::Plain),
        _ => Err(PostgresError::NotPostgres { length, code }),
    }
}

/// Whether a plain client's first message is a CancelRequest (which the
/// server answers by closing, never with a message).
pub fn is_cancel_request(first: &[u8]) -> bool {
    first.len() >= 8 && first[..8] == [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e]
}

/// Checks an upstream's one-byte answer to weir's SSLRequest: exactly `S`,
/// and nothing after it.
pub fn check_answer(answer: &[u8]) -> Result<(), String> {
    match answer {
        [b'S'] => Ok(()),
        [b'N', ..] => Err("the upstream refused TLS (answered `N` to the SSLRequest)".into()),
        [b'S', rest @ ..] => Err(format!("the upstream sent {} bytes after `S`, before TLS", rest.len())),
        [] => Err("the upstream closed instead of answering the SSLRequest".into()),
        [other, ..] => Err(format!(
            "the upstream answered the SSLRequest with {other:#04x}, not `S`"
        )),
    }
}

/// A fatal ErrorResponse (SQLSTATE 08004, "server rejected the connection")
/// carrying `message`, for a client refused before TLS.
pub fn error_response(message: &str) -> Vec<u8> {
    let message: String = message.chars().filter(|c| *c != '\0').collect();
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "08004"),
        (b'M', message.as_str()),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_messages_are_told_apart() {
        assert_eq!(classify(&[]), Ok(First::Incomplete(1)));
        assert_eq!(classify(&SSL_REQUEST[..5]), Ok(First::Incomplete(8)));
        assert_eq!(classify(&SSL_REQUEST), Ok(First::SslRequest { trailing: 0 }));
        let mut extra = SSL_REQUEST.to_vec();
        extra.extend_from_slice(b"Q");
        assert_eq!(classify(&extra), Ok(First::SslRequest { trailing: 1 }));
        assert_eq!(
            classify(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]),
            Ok(First::GssEncRequest { trailing: 0 })
        );
        // StartupMessage, protocol 3.0, "user\0postgres\0\0".
        let mut startup = vec![0, 0, 0, 23, 0, 3, 0, 0];
        startup.extend_from_slice(b"user\0postgres\0\0");
        assert_eq!(classify(&startup), Ok(First::Plain));
        let cancel = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2];
        assert_eq!(classify(&cancel), Ok(First::Plain));
        assert!(is_cancel_request(&cancel));
        assert!(!is_cancel_request(&cancel[..7]), "too short to tell");
        let startup = [0, 0, 0, 16, 0, 3, 0, 0, b'u', b's', b'e', b'r', 0, b'x', 0, 0];
        assert!(!is_cancel_request(&startup));
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Ok(First::Tls));
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f][..],
            &[0, 0, 0, 8, 0, 2, 0, 0][..],
            &[0, 1, 0, 0, 0, 3, 0, 0][..],
        ] {
            assert!(
                matches!(classify(bad), Err(PostgresError::NotPostgres { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_a_lone_s_is_an_upstream_yes() {
        assert_eq!(check_answer(b"S"), Ok(()));
        assert!(check_answer(b"N").expect_err("N").contains("refused TLS"));
        assert!(check_answer(b"SX").expect_err("extra").contains("1 bytes after"));
        assert!(check_answer(b"").is_err());
        assert!(check_answer(b"E").is_err());
    }
}
