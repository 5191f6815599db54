//! PROXY protocol headers sent to upstreams (HAProxy's PROXY protocol v1 and
//! v2), so a backend behind passthrough still learns the client's address.
//! The encoding is the `ppp` crate's.

use std::io;
use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Protocol, Type, Version};

/// Encodes the header a decision asked for: `client` is the connection's
/// source, `local` the gateway address it reached. Version 2 also carries the
/// server name as the `authority` TLV. Mixed address families (an IPv4 client
/// on an IPv6 socket without mapping) are sent as UNKNOWN / unspecified, as
/// the specification says.
pub fn encode(version: u8, client: SocketAddr, local: SocketAddr, sni: Option<&str>) -> io::Result<Vec<u8>> {
    let (client, local) = (unmap(client), unmap(local));
    match version {
        1 => Ok(ppp::v1::Addresses::from((client, local)).to_string().into_bytes()),
        2 => {
            let mut header = Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (client, local));
            if let Some(name) = sni {
                header = header.write_tlv(Type::Authority, name.as_bytes())?;
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

    #[test]
    fn v1_is_the_text_line() {
        let header = encode(1, addr("192.0.2.1:56324"), addr("198.51.100.7:443"), Some("a.example")).expect("encodes");
        assert_eq!(header, b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n");
        let v6 = encode(1, addr("[2001:db8::1]:1000"), addr("[2001:db8::2]:443"), None).expect("encodes");
        assert_eq!(v6, b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 443\r\n");
        let mapped = encode(1, addr("[::ffff:192.0.2.1]:1000"), addr("[::ffff:192.0.2.2]:443"), None).expect("encodes");
        assert_eq!(mapped, b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 443\r\n");
        let mixed = encode(1, addr("192.0.2.1:1000"), addr("[2001:db8::2]:443"), None).expect("encodes");
        assert_eq!(mixed, b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_carries_addresses_and_the_server_name() {
        let header = encode(2, addr("192.0.2.1:56324"), addr("198.51.100.7:443"), Some("a.example")).expect("encodes");
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
