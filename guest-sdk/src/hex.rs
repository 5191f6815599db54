//! Hex, as weir writes and reads it everywhere: fingerprints and pins,
//! measurements (MRTD, RTMRs), certificate serials, event-log digests.
//! Lower-case out; either case in, an optional `0x` prefix, nothing else.

use std::fmt;

/// Why text is not hex.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HexError {
    /// No digits at all.
    Empty,
    /// An odd number of digits.
    OddLength(usize),
    /// A byte that is not a hex digit, and where it is.
    NotHex {
        /// Its offset in the text (after any `0x`).
        at: usize,
        /// The byte.
        byte: u8,
    },
}

impl fmt::Display for HexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HexError::Empty => write!(f, "no hex digits"),
            HexError::OddLength(n) => write!(f, "{n} hex digits, an odd number"),
            HexError::NotHex { at, byte } => write!(f, "byte 0x{byte:02x} at {at} is not a hex digit"),
        }
    }
}

impl std::error::Error for HexError {}

/// Bytes as lower-case hex.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Hex digits (either case, an optional `0x` prefix) as bytes. Works on
/// bytes, so text that is not ASCII is an error, never a panic.
pub fn decode(text: &str) -> Result<Vec<u8>, HexError> {
    let digits = text.strip_prefix("0x").unwrap_or(text).as_bytes();
    if digits.is_empty() {
        return Err(HexError::Empty);
    }
    if !digits.len().is_multiple_of(2) {
        return Err(HexError::OddLength(digits.len()));
    }
    let value = |at: usize| {
        let byte = digits[at];
        char::from(byte)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
            .ok_or(HexError::NotHex { at, byte })
    };
    (0..digits.len())
        .step_by(2)
        .map(|at| Ok(value(at)? << 4 | value(at + 1)?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&bytes)), Ok(bytes));
        assert_eq!(encode(&[0xab, 0x01]), "ab01");
        assert_eq!(decode("0xAB01"), Ok(vec![0xab, 0x01]));
    }

    #[test]
    fn refuses_what_is_not_hex_without_panicking() {
        assert_eq!(decode(""), Err(HexError::Empty));
        assert_eq!(decode("0x"), Err(HexError::Empty));
        assert_eq!(decode("abc"), Err(HexError::OddLength(3)));
        assert_eq!(decode("0g"), Err(HexError::NotHex { at: 1, byte: b'g' }));
        // A multi-byte character where a digit pair would split it.
        assert_eq!(decode("aé0"), Err(HexError::NotHex { at: 1, byte: 0xc3 }));
        assert_eq!(decode("+1"), Err(HexError::NotHex { at: 0, byte: b'+' }));
    }
}
