//! `[[listeners]]`: where weir listens, what it expects first, and its TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::{AcmeConfig, RelayMode, defaults};

/// What a listener expects its clients to send first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerProtocol {
    /// A TLS ClientHello; anything else is closed.
    #[default]
    Tls,
    /// PostgreSQL clients: an SSLRequest is answered `S` and the
    /// ClientHello that follows is routed (`postgres-tls`); a ClientHello
    /// first (PostgreSQL 17 direct TLS) is routed as `tls`; a StartupMessage
    /// without TLS is routed as `plain`.
    Postgres,
    /// Nothing is sniffed; plugins route on addresses alone.
    Plain,
}

/// One listening socket and the plugin chain that routes its connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on, `ip:port`.
    pub bind: SocketAddr,
    /// What clients send first.
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Plugin names, in the order they are asked; the first decision that is
    /// not `next` wins.
    pub plugins: Vec<String>,
    /// Deadline for everything before routing: the ClientHello must have
    /// arrived by then.
    #[serde(default = "defaults::sniff_timeout", with = "humantime_serde")]
    pub sniff_timeout: Duration,
    /// Deadline for connecting to an upstream server.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A relayed connection with no bytes in either direction for this long
    /// is closed.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Source ranges (CIDR) of load balancers that put a PROXY protocol v1
    /// or v2 header in front of every connection. A connection from these
    /// ranges must begin with one, and its source and destination become the
    /// connection's client and local addresses (for plugins, PROXY headers
    /// sent upstream, and logs). A header from any other source is refused.
    #[serde(default)]
    pub accept_proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Once either side of a relayed connection has sent FIN, no byte for
    /// this long closes it (the idle timeout still applies if shorter).
    #[serde(default = "defaults::half_close_timeout", with = "humantime_serde")]
    pub half_close_timeout: Duration,
    /// Lets the kernel hold each new connection until its first bytes
    /// arrive (Linux `TCP_DEFER_ACCEPT`, for up to `sniff_timeout`, in whole
    /// seconds): weir wakes once per connection instead of twice, and a
    /// client that connects and says nothing costs no descriptor, task or
    /// connection-limit slot until the kernel gives up waiting. Not for
    /// `plain` listeners, whose clients may wait for the server to speak.
    #[serde(default)]
    pub defer_accept: bool,
    /// How passthrough bytes are moved: `copy` (the default), `auto` (copy,
    /// then `splice(2)` past 64 KiB in a direction), or `splice`.
    #[serde(default)]
    pub relay: RelayMode,
    /// Most connections this listener serves at once; more are closed as
    /// soon as they are accepted (those in progress are untouched).
    pub max_connections: Option<usize>,
    /// Most connections one client holds on this listener at once (the
    /// PROXY header's source behind a trusted load balancer); more are
    /// closed before their first byte is read. A client is its address cut
    /// to `client_prefix_v4` / `client_prefix_v6` bits, so one IPv6 /64 (a
    /// single customer's network) is one client.
    #[serde(default = "defaults::max_connections_per_client")]
    pub max_connections_per_client: u32,
    /// Bits of an IPv4 client address that name one client (1-32). The
    /// default, 24, counts a /24 as one client: one holder of a /24 could
    /// otherwise take `max_connections_per_client` 256 times over.
    #[serde(default = "defaults::client_prefix_v4")]
    pub client_prefix_v4: u8,
    /// Bits of an IPv6 client address that name one client (1-128).
    #[serde(default = "defaults::client_prefix_v6")]
    pub client_prefix_v6: u8,
    /// Deadline for the TLS handshake with the client when the gateway
    /// terminates, counted from the routing decision.
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// TLS settings used when a decision terminates TLS on this listener.
    #[serde(default)]
    pub tls: ListenerTls,
}

/// A listener's TLS settings for terminated connections.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Lowest TLS version accepted from clients.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Cipher suites offered, by their IANA names (e.g.
    /// `TLS13_AES_128_GCM_SHA256`, `TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384`),
    /// in order of preference. Empty means rustls's defaults.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
    /// ALPN protocols offered to clients when a decision names none.
    #[serde(default)]
    pub alpn: Vec<String>,
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3).
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// The chain, end-entity certificate first, relative to the config file.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 RSA or SEC1 EC), relative to the
    /// config file.
    pub key: PathBuf,
    /// A DER OCSP response for the certificate, stapled to handshakes
    /// while it is current; relative to the config file.
    pub ocsp: Option<PathBuf>,
    /// Obtain and renew the certificate from an ACME CA, keeping it in
    /// `cert` and `key`.
    pub acme: Option<AcmeConfig>,
}
