//! TDX quotes v4 and v5: the TD report, and a signature section that is
//! complete.

use crate::{AttestError, MAX_QUOTE, TEE_TYPE_TDX};

/// What a TDX quote's TD report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdReport {
    /// Quote version (4 or 5).
    pub version: u16,
    /// TD 1.5 body (a v5 quote with body type 3).
    pub td15: bool,
    /// TD attributes; bit 0 is DEBUG.
    pub td_attributes: [u8; 8],
    /// MRTD: the initial TD image.
    pub mrtd: [u8; 48],
    /// MRCONFIGID.
    pub mrconfigid: [u8; 48],
    /// MROWNER.
    pub mrowner: [u8; 48],
    /// MROWNERCONFIG.
    pub mrownerconfig: [u8; 48],
    /// RTMR0..RTMR3.
    pub rtmr: [[u8; 48]; 4],
    /// REPORTDATA.
    pub report_data: [u8; 64],
}

impl TdReport {
    /// Whether the TD runs with the debug attribute (everything it holds is
    /// readable by the host).
    pub fn debug(&self) -> bool {
        self.td_attributes[0] & 1 != 0
    }
}

/// A bounds-checked reader.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], AttestError> {
        if n > self.remaining() {
            return Err(AttestError::Truncated {
                what,
                needed: n,
                available: self.remaining(),
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], AttestError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(what, N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, AttestError> {
        Ok(self.take(what, 1)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, AttestError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, AttestError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A SCALE compact integer.
    pub(crate) fn compact(&mut self, what: &'static str) -> Result<usize, AttestError> {
        let first = self.u8(what)?;
        let value = match first & 3 {
            0 => u64::from(first >> 2),
            1 => u64::from(u16::from_le_bytes([first, self.u8(what)?]) >> 2),
            2 => {
                let rest: [u8; 3] = self.array(what)?;
                u64::from(u32::from_le_bytes([first, rest[0], rest[1], rest[2]]) >> 2)
            }
            _ => {
                let n = usize::from(first >> 2) + 4;
                if n > 8 {
                    return Err(AttestError::Compact(what));
                }
                let mut buf = [0u8; 8];
                buf[..n].copy_from_slice(self.take(what, n)?);
                u64::from_le_bytes(buf)
            }
        };
        usize::try_from(value).map_err(|_| AttestError::Compact(what))
    }

    /// A SCALE `Vec<u8>` at most `max` long.
    pub(crate) fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], AttestError> {
        let len = self.compact(what)?;
        crate::within(what, len, max)?;
        self.take(what, len)
    }

    pub(crate) fn string(&mut self, what: &'static str, max: usize) -> Result<String, AttestError> {
        let bytes = self.bytes(what, max)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| AttestError::Utf8(what))
    }
}

/// Parses a TDX quote (v4, or v5 with a TD 1.0 or TD 1.5 body) and checks
/// that its signature section is complete.
pub fn parse_quote(quote: &[u8]) -> Result<TdReport, AttestError> {
    crate::within("quote", quote.len(), MAX_QUOTE)?;
    let mut r = Reader::new(quote);
    let version = r.u16("quote header")?;
    let _attestation_key_type = r.u16("quote header")?;
    let tee_type = r.u32("quote header")?;
    r.take("quote header", 40)?;
    if version != 4 && version != 5 {
        return Err(AttestError::QuoteVersion(version));
    }
    if tee_type != TEE_TYPE_TDX {
        return Err(AttestError::NotTdx(tee_type));
    }
    let mut td15 = false;
    if version == 5 {
        let body_type = r.u16("body header")?;
        let size = r.u32("body header")?;
        let expected = match body_type {
            2 => 584,
            3 => 648,
            other => return Err(AttestError::BodyType(other)),
        };
        if size as usize != expected {
            return Err(AttestError::BodySize { size, expected });
        }
        td15 = body_type == 3;
    }
    let mut body = Reader::new(r.take("TD report", if td15 { 648 } else { 584 })?);
    body.take("TD report", 120)?; // TEE_TCB_SVN, MRSEAM, MRSIGNERSEAM, SEAM attributes
    let td_attributes = body.array("TD attributes")?;
    body.take("XFAM", 8)?;
    let mrtd = body.array("MRTD")?;
    let mrconfigid = body.array("MRCONFIGID")?;
    let mrowner = body.array("MROWNER")?;
    let mrownerconfig = body.array("MROWNERCONFIG")?;
    let rtmr = [
        body.array("RTMR0")?,
        body.array("RTMR1")?,
        body.array("RTMR2")?,
        body.array("RTMR3")?,
    ];
    let report_data = body.array("REPORTDATA")?;
    let signature_len = r.u32("signature length")? as usize;
    r.take("quote signature", signature_len)?;
    Ok(TdReport {
        version,
        td15,
        td_attributes,
        mrtd,
        mrconfigid,
        mrowner,
        mrownerconfig,
        rtmr,
        report_data,
    })
}
