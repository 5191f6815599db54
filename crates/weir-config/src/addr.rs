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

/// An address range a tenant may reach: a network, and optionally the
/// ports on it. Written `10.0.0.0/8` (every port), `10.0.0.0/8:443`,
/// `127.0.0.1/32:8000-8099`, or for IPv6 `[fd00::/8]:443`; a bare address
/// (`10.1.2.3`, `10.1.2.3:443`) is its /32 or /128.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamRange {
    /// The network.
    pub net: ipnet::IpNet,
    /// The lowest and highest port, both included.
    pub ports: (u16, u16),
}

/// Why an upstream range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not an upstream range (NET, NET:PORT or NET:LOW-HIGH; IPv6 as [NET]:PORT): {reason}")]
pub struct RangeError {
    input: String,
    reason: String,
}

impl UpstreamRange {
    /// Parses a range as the config writes it.
    pub fn parse(input: &str) -> Result<UpstreamRange, RangeError> {
        let fail = |reason: &str| RangeError {
            input: input.chars().take(128).collect(),
            reason: reason.to_owned(),
        };
        // `[v6net]:ports`, `v4net:ports`, or a net alone (an IPv6 net holds
        // colons, so without brackets it has no ports).
        let (net, ports) = if let Some(rest) = input.strip_prefix('[') {
            let (net, after) = rest
                .split_once(']')
                .ok_or_else(|| fail("no `]` after the IPv6 network"))?;
            match after {
                "" => (net, None),
                _ => (
                    net,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| fail("`]` is followed by something other than `:PORTS`"))?,
                    ),
                ),
            }
        } else if input.matches(':').count() == 1 {
            let (net, ports) = input.split_once(':').unwrap_or((input, ""));
            (net, Some(ports))
        } else {
            (input, None)
        };
        let net: ipnet::IpNet = match net.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) => net
                .parse::<IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|_| fail("not an IP network such as 10.0.0.0/8 or fd00::/8"))?,
        };
        let port = |text: &str| match text.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(fail("a port is a number from 1 to 65535")),
        };
        let ports = match ports {
            None => (1, u16::MAX),
            Some(ports) => match ports.split_once('-') {
                Some((low, high)) => {
                    let (low, high) = (port(low)?, port(high)?);
                    if low > high {
                        return Err(fail("the port range runs backwards"));
                    }
                    (low, high)
                }
                None => {
                    let port = port(ports)?;
                    (port, port)
                }
            },
        };
        Ok(UpstreamRange {
            net: net.trunc(),
            ports,
        })
    }

    /// Whether `addr` lies in the range: its address in the network (an
    /// IPv4-mapped IPv6 address counts as the IPv4 one), its port among the
    /// ports.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.net.contains(&addr.ip().to_canonical()) && (self.ports.0..=self.ports.1).contains(&addr.port())
    }
}

impl fmt::Display for UpstreamRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            net if self.ports == (1, u16::MAX) => return write!(f, "{net}"),
            ipnet::IpNet::V4(net) => write!(f, "{net}:")?,
            ipnet::IpNet::V6(net) => write!(f, "[{net}]:")?,
        }
        match self.ports {
            (low, high) if low == high => write!(f, "{low}"),
            (low, high) => write!(f, "{low}-{high}"),
        }
    }
}

/// Ranges as an error message lists them: `none` for none.
pub fn ranges_text(ranges: &[UpstreamRange]) -> String {
    if ranges.is_empty() {
        return "none".into();
    }
    ranges.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

impl<'de> serde::Deserialize<'de> for UpstreamRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<UpstreamRange, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        UpstreamRange::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for UpstreamRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
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

    #[test]
    fn upstream_ranges_hold_addresses_and_ports() {
        let all = UpstreamRange::parse("10.0.0.0/8").expect("valid");
        assert!(all.contains("10.9.8.7:1".parse().expect("addr")));
        assert!(all.contains("[::ffff:10.9.8.7]:65535".parse().expect("addr")));
        assert!(!all.contains("11.0.0.1:443".parse().expect("addr")));
        assert_eq!(all.to_string(), "10.0.0.0/8");
        let one = UpstreamRange::parse("127.0.0.1/32:8000-8099").expect("valid");
        assert!(one.contains("127.0.0.1:8000".parse().expect("addr")));
        assert!(one.contains("127.0.0.1:8099".parse().expect("addr")));
        assert!(!one.contains("127.0.0.1:8100".parse().expect("addr")));
        assert!(!one.contains("127.0.0.2:8000".parse().expect("addr")));
        assert_eq!(one.to_string(), "127.0.0.1/32:8000-8099");
        let host = UpstreamRange::parse("10.1.2.3:443").expect("valid");
        assert_eq!(host.to_string(), "10.1.2.3/32:443");
        let v6 = UpstreamRange::parse("[fd00::/8]:443").expect("valid");
        assert!(v6.contains("[fd12::1]:443".parse().expect("addr")));
        assert!(!v6.contains("[fd12::1]:444".parse().expect("addr")));
        assert_eq!(v6.to_string(), "[fd00::/8]:443");
        assert_eq!(UpstreamRange::parse("fd00::/8").expect("valid").ports, (1, u16::MAX));
        // A host part is truncated to its network.
        assert_eq!(
            UpstreamRange::parse("10.1.2.3/8").expect("valid").to_string(),
            "10.0.0.0/8"
        );
        for (input, reason) in [
            ("10.0.0.0/8:0", "a port is a number"),
            ("10.0.0.0/8:9-8", "backwards"),
            ("10.0.0.0/8:x", "a port is a number"),
            ("[fd00::/8", "no `]`"),
            ("[fd00::/8]443", "followed by"),
            ("example.com:443", "not an IP network"),
            ("10.0.0.0/33", "not an IP network"),
        ] {
            let error = UpstreamRange::parse(input).expect_err(input).to_string();
            assert!(error.contains(reason), "{input}: {error}");
        }
    }
}
