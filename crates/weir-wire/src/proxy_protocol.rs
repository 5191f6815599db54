//! PROXY protocol headers (HAProxy's PROXY protocol v1 and v2): sent to
//! upstreams, so a backend behind passthrough still learns the client's
//! address, and read from trusted load balancers in front of weir. The wire
//! format is the `ppp` crate's.

use std::io;
use std::net::SocketAddr;

use ppp::PartialResult;
use ppp::v2::{Builder, Command, Protocol, Type, TypeLengthValue, Version, WriteToHeader};

/// Longest PROXY header accepted from a load balancer (v1 is at most 107
/// bytes; v2 carries TLVs, which weir reads past).
pub const MAX_HEADER_LEN: usize = 4096;

/// A PROXY header read from a load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Bytes the header took; what follows is the client's own stream.
    pub len: usize,
    /// The client's (source) and the original destination address, when the
    /// header carries them (not for v1 UNKNOWN, v2 LOCAL or non-IP families).
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// Longest v1 header, CRLF included (the specification's limit).
const V1_MAX_LEN: usize = 107;

/// Parses the PROXY header at the start of `buf`. `Ok(None)`: more bytes are
/// needed. Errors are final and say what is wrong.
///
/// v1 is a text line, so it is framed here (up to CRLF) before `ppp` parses
/// it: `ppp` reads some prefixes of a valid line as errors and some short
/// complete lines as merely incomplete.
pub fn decode(buf: &[u8]) -> Result<Option<Received>, String> {
    if b"PROXY ".starts_with(&buf[..buf.len().min(6)]) {
        let Some(end) = buf.windows(2).position(|pair| pair == b"\r\n") else {
            return match buf.len() >= V1_MAX_LEN {
                true => Err(format!("PROXY v1 header longer than {V1_MAX_LEN} bytes")),
                false => Ok(None),
            };
        };
        let line = &buf[..end + 2];
        let header = ppp::v1::Header::try_from(line).map_err(|e| format!("malformed PROXY header (v1): {e}"))?;
        let addresses = match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some((
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            )),
            ppp::v1::Addresses::Tcp6(a) => Some((
                SocketAddr::new(a.source_address.into(), a.source_port),
                SocketAddr::new(a.destination_address.into(), a.destination_port),
            )),
            ppp::v1::Addresses::Unknown => None,
        };
        return Ok(Some(Received {
            len: line.len(),
            addresses,
        }));
    }
    let parsed = ppp::v2::Header::try_from(buf);
    if parsed.is_incomplete() {
        if buf.len() >= MAX_HEADER_LEN {
            return Err(format!("PROXY header longer than {MAX_HEADER_LEN} bytes"));
        }
        return Ok(None);
    }
    let header = parsed.map_err(|e| format!("malformed PROXY header (v2): {e}"))?;
    let addresses = match (header.command, header.addresses) {
        (Command::Local, _) => None,
        (_, ppp::v2::Addresses::IPv4(a)) => Some((
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        )),
        (_, ppp::v2::Addresses::IPv6(a)) => Some((
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        )),
        _ => None,
    };
    Ok(Some(Received {
        len: header.len(),
        addresses,
    }))
}

/// Whether `first` (the first bytes of a connection) is where a PROXY header
/// would start: to name the problem when one arrives from an untrusted source.
pub fn looks_like_header(first: &[u8]) -> bool {
    const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    let prefix = |sig: &[u8]| !first.is_empty() && sig.starts_with(&first[..first.len().min(sig.len())]);
    prefix(b"PROXY ") || prefix(V2_SIGNATURE)
}

/// What a terminated connection's TLS was, for the v2 header's `ALPN` and
/// `SSL` TLVs (as HAProxy's `send-proxy-v2-ssl-cn` sends them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFacts {
    /// The protocol negotiated with the client.
    pub alpn: Option<Vec<u8>>,
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: String,
    /// The cipher suite's IANA name (`TLS_AES_128_GCM_SHA256`).
    pub cipher: String,
    /// The client certificate's subject common name, when the client
    /// presented a certificate (an empty string when it has no CN).
    pub client_cn: Option<String>,
    /// The session was resumed (the certificate, if any, came with it).
    pub resumed: bool,
}

/// `PP2_CLIENT_SSL`, `PP2_CLIENT_CERT_CONN`, `PP2_CLIENT_CERT_SESS`.
const CLIENT_SSL: u8 = 0x01;
const CLIENT_CERT_CONN: u8 = 0x02;
const CLIENT_CERT_SESS: u8 = 0x04;

impl TlsFacts {
    /// The `PP2_TYPE_SSL` value: client flags, verify result (0: weir
    /// completes only handshakes whose client certificate verified), then
    /// the version, common name and cipher sub-TLVs.
    fn ssl_tlv(&self) -> io::Result<Vec<u8>> {
        let mut client = CLIENT_SSL;
        if self.client_cn.is_some() {
            client |= CLIENT_CERT_SESS;
            if !self.resumed {
                client |= CLIENT_CERT_CONN;
            }
        }
        let mut value = vec![client, 0, 0, 0, 0];
        value.extend(TypeLengthValue::new(Type::SSLVersion, self.version.as_bytes()).to_bytes()?);
        if let Some(cn) = &self.client_cn {
            value.extend(TypeLengthValue::new(Type::SSLCommonName, cn.as_bytes()).to_bytes()?);
        }
        value.extend(TypeLengthValue::new(Type::SSLCipher, self.cipher.as_bytes()).to_bytes()?);
        Ok(value)
    }
}

/// Encodes the header a decision asked for: `client` is the connection's
/// source, `local` the gateway address it reached. Version 2 also carries the
/// server name as the `authority` TLV and, for a terminated connection, the
/// negotiated ALPN and the `SSL` TLV. Mixed address families (an IPv4 client
/// on an IPv6 socket without mapping) are sent as UNKNOWN / unspecified, as
/// the specification says.
pub fn encode(
    version: u8,
    client: SocketAddr,
    local: SocketAddr,
    sni: Option<&str>,
    tls: Option<&TlsFacts>,
) -> io::Result<Vec<u8>> {
    let (client, local) = (unmap(client), unmap(local));
    match version {
        1 => Ok(ppp::v1::Addresses::from((client, local)).to_string().into_bytes()),
        2 => {
            let mut header = Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (client, local));
            if let Some(alpn) = tls.and_then(|tls| tls.alpn.as_deref()) {
                header = header.write_tlv(Type::ALPN, alpn)?;
            }
            if let Some(name) = sni {
                header = header.write_tlv(Type::Authority, name.as_bytes())?;
            }
            if let Some(tls) = tls {
                header = header.write_tlv(Type::SSL, &tls.ssl_tlv()?)?;
            }
            header.build()
        }
        other => Err(io::Error::other(format!("PROXY protocol version {other}"))),
    }
}

/// An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer)
/// as the IPv4 address it is.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    /// The header from 192.0.2.1:56324 to 198.51.100.7:443 for `a.example`.
    fn example(version: u8) -> Vec<u8> {
        encode(
            version,
            addr("192.0.2.1:56324"),
            addr("198.51.100.7:443"),
            Some("a.example"),
            None,
        )
        .expect("encodes")
    }

    #[test]
    fn v1_is_the_text_line() {
        let header = example(1);
        assert_eq!(header, b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n");
        let v6 = encode(1, addr("[2001:db8::1]:1000"), addr("[2001:db8::2]:443"), None, None).expect("encodes");
        assert_eq!(v6, b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 443\r\n");
        let mapped = encode(
            1,
            addr("[::ffff:192.0.2.1]:1000"),
            addr("[::ffff:192.0.2.2]:443"),
            None,
            None,
        )
        .expect("encodes");
        assert_eq!(mapped, b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 443\r\n");
        let mixed = encode(1, addr("192.0.2.1:1000"), addr("[2001:db8::2]:443"), None, None).expect("encodes");
        assert_eq!(mixed, b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn headers_decode_to_addresses_and_length() {
        let client = addr("203.0.113.7:4242");
        let vip = addr("198.51.100.1:443");
        for version in [1, 2] {
            let mut wire = encode(version, client, vip, Some("a.example"), None).expect("encodes");
            let len = wire.len();
            wire.extend_from_slice(b"\x16\x03\x01 and the hello");
            let received = decode(&wire).expect("valid").expect("complete");
            assert_eq!(
                received,
                Received {
                    len,
                    addresses: Some((client, vip))
                },
                "v{version}"
            );
            for end in 0..len {
                assert_eq!(decode(&wire[..end]), Ok(None), "v{version} prefix {end}");
            }
        }
        let unknown = decode(b"PROXY UNKNOWN\r\nrest").expect("valid").expect("complete");
        assert_eq!(
            unknown,
            Received {
                len: 15,
                addresses: None
            }
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert!(
            decode(b"PROXY TCP4 1.2.3.4\r\n")
                .expect_err("short")
                .contains("malformed PROXY header")
        );
        assert!(
            decode(b"\x16\x03\x01\x02\x00\x01").is_err(),
            "a TLS hello is not a PROXY header"
        );
        assert!(decode(&[b'P'; 200]).is_err());
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(b"\r\n\r\n\0"));
        assert!(looks_like_header(b"PRO"));
        assert!(!looks_like_header(b"\x16\x03\x01"));
        assert!(!looks_like_header(b""));
    }

    #[test]
    fn v2_carries_alpn_and_tls_for_terminated_connections() {
        let facts = TlsFacts {
            alpn: Some(b"h2".to_vec()),
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_128_GCM_SHA256".into(),
            client_cn: Some("alice".into()),
            resumed: false,
        };
        let wire = encode(
            2,
            addr("192.0.2.1:56324"),
            addr("198.51.100.7:443"),
            Some("a.example"),
            Some(&facts),
        )
        .expect("encodes");
        let header = ppp::v2::Header::try_from(&wire[..]).expect("parses");
        let tlvs: Vec<(u8, Vec<u8>)> = header
            .tlvs()
            .map(|t| t.expect("a TLV"))
            .map(|t| (t.kind, t.value.to_vec()))
            .collect();
        assert_eq!(tlvs[0], (0x01, b"h2".to_vec()));
        assert_eq!(tlvs[1], (0x02, b"a.example".to_vec()));
        let (kind, ssl) = &tlvs[2];
        assert_eq!(*kind, 0x20);
        // Client flags SSL | CERT_CONN | CERT_SESS, verify 0.
        assert_eq!(ssl[..5], [0x07, 0, 0, 0, 0]);
        let mut expected = vec![0x21, 0, 7];
        expected.extend_from_slice(b"TLSv1.3");
        expected.extend_from_slice(&[0x22, 0, 5]);
        expected.extend_from_slice(b"alice");
        expected.extend_from_slice(&[0x23, 0, 22]);
        expected.extend_from_slice(b"TLS_AES_128_GCM_SHA256");
        assert_eq!(ssl[5..], expected[..]);

        // Resumed without a certificate in the session: only the SSL flag.
        let plain = TlsFacts {
            client_cn: None,
            resumed: true,
            alpn: None,
            ..facts
        };
        let wire = encode(2, addr("192.0.2.1:1"), addr("198.51.100.7:443"), None, Some(&plain)).expect("encodes");
        let header = ppp::v2::Header::try_from(&wire[..]).expect("parses");
        let tlvs: Vec<_> = header.tlvs().map(|t| t.expect("a TLV")).collect();
        assert_eq!(tlvs.len(), 1);
        assert_eq!(tlvs[0].kind, 0x20);
        assert_eq!(tlvs[0].value[0], 0x01);
    }

    #[test]
    fn v2_carries_addresses_and_the_server_name() {
        let header = example(2);
        let mut expected = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12 + 3 + 9]);
        expected.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 7]);
        expected.extend_from_slice(&56324u16.to_be_bytes());
        expected.extend_from_slice(&443u16.to_be_bytes());
        expected.extend_from_slice(&[0x02, 0, 9]);
        expected.extend_from_slice(b"a.example");
        assert_eq!(header, expected);
    }
}
