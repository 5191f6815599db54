//! PROXY protocol headers from trusted load balancers: decoding arbitrary
//! bytes never panics, a decoded header is self-contained, and every header
//! weir encodes decodes to the addresses it was made from.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use weir_wire::proxy_protocol::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(received)) = decode(data) {
        assert!(received.len > 0 && received.len <= data.len());
        // The header alone says the same: nothing after it was read.
        assert_eq!(decode(&data[..received.len]), Ok(Some(received)));
    }
    // Addresses and a version from the input, encoded and decoded again.
    if data.len() >= 37 {
        let port = |at: usize| u16::from_be_bytes([data[at], data[at + 1]]);
        let (client, local) = if data[0] & 1 == 0 {
            let v4 = |at: usize| IpAddr::V4(Ipv4Addr::new(data[at], data[at + 1], data[at + 2], data[at + 3]));
            (SocketAddr::new(v4(1), port(33)), SocketAddr::new(v4(5), port(35)))
        } else {
            let v6 = |at: usize| {
                let octets: [u8; 16] = data[at..at + 16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            (SocketAddr::new(v6(1), port(33)), SocketAddr::new(v6(17), port(35)))
        };
        let version = 1 + (data[0] >> 1 & 1);
        let header = encode(version, client, local, None, None).expect("encodes");
        let received = decode(&header).expect("weir's own header decodes").expect("complete");
        assert_eq!(received.len, header.len());
        // Mapped IPv6 addresses come back as the IPv4 addresses they are,
        // and mixed families as no addresses at all.
        let unmapped = |addr: SocketAddr| match addr.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(addr, |v4| SocketAddr::new(IpAddr::V4(v4), addr.port())),
            IpAddr::V4(_) => addr,
        };
        let (client, local) = (unmapped(client), unmapped(local));
        match received.addresses {
            Some(addresses) => assert_eq!(addresses, (client, local)),
            None => assert_ne!(client.is_ipv4(), local.is_ipv4()),
        }
    }
});
