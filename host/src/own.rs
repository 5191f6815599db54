//! The addresses weir itself listens on, so that no decision can make weir
//! connect to itself. A decision (or a client choosing a port through a
//! `pool:port` target) that pointed at one of weir's own listeners would
//! loop — each pass a new connection, until the descriptors are gone — and
//! one pointing at the admin address would hand a public client the admin
//! API. Every listener and admin server registers its bound address for as
//! long as it is open; [`check`] refuses a target that reaches one,
//! wildcard binds (`0.0.0.0:P`, `[::]:P`) included.

use std::net::{IpAddr, SocketAddr};
use std::sync::{LazyLock, RwLock};

/// Bound addresses of this process's listeners and admin servers.
static OWN: LazyLock<RwLock<Vec<SocketAddr>>> = LazyLock::new(RwLock::default);

/// An address weir listens on, registered until dropped.
#[derive(Debug)]
pub struct OwnAddress(SocketAddr);

impl OwnAddress {
    /// Registers `addr` (a bound listener's local address).
    pub fn register(addr: SocketAddr) -> OwnAddress {
        crate::sync::write(&OWN).push(addr);
        OwnAddress(addr)
    }
}

impl Drop for OwnAddress {
    fn drop(&mut self) {
        let mut own = crate::sync::write(&OWN);
        if let Some(at) = own.iter().position(|a| *a == self.0) {
            own.swap_remove(at);
        }
    }
}

/// Whether connecting to `target` would reach one of weir's own listening
/// sockets; the error names it.
pub fn check(target: SocketAddr) -> Result<(), String> {
    let own = crate::sync::read(&OWN);
    let ip = target.ip().to_canonical();
    // Connecting to 0.0.0.0 or :: reaches this host.
    let ip = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        other => other,
    };
    for bound in own.iter().filter(|a| a.port() == target.port()) {
        let bound_ip = bound.ip().to_canonical();
        if bound_ip == ip || (bound_ip.is_unspecified() && is_local(ip)) {
            return Err(format!(
                "{target} is weir's own listening address {bound}: refused, it would loop or reach the admin API"
            ));
        }
    }
    Ok(())
}

/// Whether `ip` is an address of this host: loopback, or one a socket can
/// be bound to (binding succeeds only for local addresses). Asked only for
/// targets on the port of a wildcard listener.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_are_refused_until_closed() {
        let specific = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = specific.local_addr().expect("addr");
        let wildcard = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let port = wildcard.local_addr().expect("addr").port();
        let own = OwnAddress::register(addr);
        let any = OwnAddress::register(SocketAddr::from(([0, 0, 0, 0], port)));

        assert!(check(addr).is_err());
        assert!(check(SocketAddr::from(([0, 0, 0, 0], addr.port()))).is_err());
        // Another loopback address is another socket.
        assert!(check(SocketAddr::from(([127, 0, 0, 2], addr.port()))).is_ok());
        assert!(check(SocketAddr::from(([127, 0, 0, 1], addr.port().wrapping_add(1).max(1)))).is_ok());
        // A wildcard bind is reached through every local address.
        for ip in ["127.0.0.1", "127.0.0.7", "::ffff:127.0.0.1", "0.0.0.0"] {
            let error = check(SocketAddr::new(ip.parse().expect("ip"), port)).expect_err(ip);
            assert!(error.contains("weir's own listening address"), "{error}");
        }
        // 192.0.2.1 (TEST-NET-1) is no address of this host.
        assert!(check(SocketAddr::from(([192, 0, 2, 1], port))).is_ok());
        drop((own, any));
        assert!(check(addr).is_ok());
    }
}
