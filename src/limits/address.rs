//! Who the client is, for the per-address limits: the TCP peer, or — only when the peer is a
//! proxy the operator listed — the address that proxy says it forwarded for.

pub use crate::config::Network;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// The key an address is limited under. IPv6 by its /64: one host is routinely given a whole
/// /64, so keying by the full address would let it rotate to a fresh bucket for every request.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// The client behind `peer`. A peer that is not a trusted proxy is the client: its
/// `X-Forwarded-For` is ignored (spoofing: anyone can send the header, so honouring it from
/// anyone would let a flood pick a fresh address for every request). Behind trusted proxies,
/// the right-most hop that is not itself a trusted proxy is the client — the left part of the
/// header is whatever the client chose to send. A hop that does not parse stops the walk at the
/// proxy that appended it.
pub fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[Network],
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    // Each header value may list several hops, comma-separated; values come in order.
    let hops: Vec<&str> = forwarded_for.flat_map(|v| v.split(',')).collect();
    for hop in hops.iter().rev() {
        let Ok(ip) = IpAddr::from_str(hop.trim()) else { return client };
        client = ip.to_canonical();
        if !is_trusted(client) {
            return client;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        IpAddr::from_str(text).unwrap_or_else(|_| IpAddr::from([0, 0, 0, 0]))
    }

    fn net(text: &str) -> Network {
        text.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_cannot_choose_its_address_with_x_forwarded_for() {
        let trusted = [net("10.0.0.0/8")];
        let client = client_address(ip("203.0.113.9"), ["1.2.3.4"].into_iter(), &trusted);
        assert_eq!(client, ip("203.0.113.9"));
        assert_eq!(client_address(ip("203.0.113.9"), std::iter::empty(), &[]), ip("203.0.113.9"));
    }

    #[test]
    fn behind_trusted_proxies_the_right_most_untrusted_hop_is_the_client() {
        let trusted = [net("10.0.0.0/8")];
        // The client sent a forged first hop; the load balancer appended the real one.
        let hops = ["6.6.6.6, 198.51.100.7", "10.0.0.5"];
        assert_eq!(client_address(ip("10.0.0.1"), hops.into_iter(), &trusted), ip("198.51.100.7"));
        // A trusted proxy that forwarded for nobody is the client.
        assert_eq!(client_address(ip("10.0.0.1"), std::iter::empty(), &trusted), ip("10.0.0.1"));
        // Garbage stops the walk at the proxy that appended it.
        let hops = ["198.51.100.7", "not-an-ip", "10.0.0.9"];
        assert_eq!(client_address(ip("10.0.0.1"), hops.into_iter(), &trusted), ip("10.0.0.9"));
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_slash_64() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), limit_key(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(limit_key(ip("2001:db8:1:2::1")), limit_key(ip("2001:db8:1:3::1")));
        assert_eq!(limit_key(ip("203.0.113.9")), ip("203.0.113.9"));
        assert_eq!(limit_key(ip("::ffff:203.0.113.9")), ip("203.0.113.9"));
    }
}
