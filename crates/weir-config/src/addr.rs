//! Upstream addresses as config and plugins write them: `host:port`, where the
//! host is an IP address (IPv6 in brackets) or a DNS name.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use weir_plugin_sdk::names;

/// Why a `host:port` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not host:port: {reason}")]
pub struct AddrError {
    input: String,
    reason: String,
}

/// The host part of an upstream address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A literal address: connected to without a lookup.
    Ip(IpAddr),
    /// A canonical DNS name, resolved when connecting.
    Name(String),
}

/// A validated `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// The host.
    pub host: Host,
    /// The port, never 0.
    pub port: u16,
}

impl HostPort {
    /// Parses `1.2.3.4:443`, `[::1]:443` or `name.example:443`.
    pub fn parse(input: &str) -> Result<HostPort, AddrError> {
        let fail = |reason: &str| AddrError {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        if let Ok(addr) = input.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(fail("port 0"));
            }
            return Ok(HostPort {
                host: Host::Ip(addr.ip()),
                port: addr.port(),
            });
        }
        let (host, port) = input.rsplit_once(':').ok_or_else(|| fail("no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| fail("the port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(fail("port 0"));
        }
        let name = names::canonicalize(host.as_bytes()).map_err(|e| fail(&e.to_string()))?;
        Ok(HostPort {
            host: Host::Name(name),
            port,
        })
    }

    /// The socket address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Name(_) => None,
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_and_names_parse() {
        let v4 = HostPort::parse("127.0.0.1:443").expect("valid");
        assert_eq!(v4.socket_addr(), Some("127.0.0.1:443".parse().expect("literal")));
        let v6 = HostPort::parse("[::1]:8443").expect("valid");
        assert_eq!(v6.to_string(), "[::1]:8443");
        let name = HostPort::parse("Backend.Internal.:9000").expect("valid");
        assert_eq!(name.host, Host::Name("backend.internal".into()));
        assert_eq!(name.to_string(), "backend.internal:9000");
    }

    #[test]
    fn malformed_addresses_say_why() {
        for (input, reason) in [
            ("127.0.0.1", "no port"),
            ("host:", "not a number"),
            ("host:70000", "not a number"),
            ("host:0", "port 0"),
            ("[::1]:0", "port 0"),
            ("bad host:80", "byte 0x20"),
            ("::1:80", "byte 0x3a"),
            ("not an address", "no port"),
        ] {
            let err = HostPort::parse(input).expect_err(input).to_string();
            assert!(err.contains(reason), "{input}: {err}");
        }
    }
}
