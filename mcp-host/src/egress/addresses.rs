//! Which upstream addresses a VM may reach. A name is resolved on the
//! host once and every address it gives is checked: an allowlist says
//! which names, this says which addresses, whatever the allowlist says,
//! so a name that resolves to the host's own network (DNS rebinding) gets
//! nowhere.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is refused, in the words a proxy error uses.
pub fn refused(
    addr: IpAddr,
    host_addresses: &[IpAddr],
    allow_loopback: bool,
) -> Option<&'static str> {
    let addr = canonical(addr);
    if addr.is_loopback() {
        return (!allow_loopback).then_some("a loopback address");
    }
    if host_addresses.contains(&addr) {
        return Some("one of the host's own addresses");
    }
    match addr {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

/// An IPv4-mapped (`::ffff:a.b.c.d`) or -compatible (`::a.b.c.d`) IPv6
/// address as the IPv4 one it is (`::1` stays loopback).
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) if !v6.is_loopback() && !v6.is_unspecified() => match v6.to_ipv4() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        other => other,
    }
}

fn refused_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [b0, b1, ..] = a.octets();
    if a.is_unspecified() || b0 == 0 {
        Some("an unspecified address")
    } else if a.is_private() {
        Some("a private address")
    } else if a.is_link_local() {
        // 169.254.169.254: every cloud's instance metadata.
        Some("a link-local address (cloud metadata lives there)")
    } else if b0 == 100 && (64..128).contains(&b1) {
        Some("a carrier-grade NAT address")
    } else if a.is_multicast() || a.is_broadcast() || b0 >= 240 {
        Some("a multicast, broadcast or reserved address")
    } else if a.is_documentation()
        || (b0 == 198 && (b1 == 18 || b1 == 19))
        || (b0 == 192 && b1 == 0)
    {
        Some("a special-purpose address")
    } else {
        None
    }
}

fn refused_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a.is_unspecified() {
        Some("an unspecified address")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("a unique local address")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("a link-local address")
    } else if (s[0] & 0xffc0) == 0xfec0 {
        Some("a site-local address")
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        // RFC 8215's local-use NAT64 prefix: where the IPv4 address sits
        // is the network's choice, so nothing in it is let through.
        Some("a local-use NAT64 address")
    } else if a.is_multicast() {
        Some("a multicast address")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64 maps IPv4 into this prefix: the IPv4 inside decides.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        refused_v4(v4)
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("a documentation address")
    } else {
        None
    }
}

/// The host's own addresses (every interface's), refused as upstreams.
/// [`host_addresses`], read again at most every 30 s (interfaces come
/// and go: a new one's addresses are refused soon after).
pub fn host_addresses_now() -> std::sync::Arc<Vec<IpAddr>> {
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, Instant};
    static CACHE: Mutex<Option<(Instant, Arc<Vec<IpAddr>>)>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    match &*cache {
        Some((read, addrs)) if read.elapsed() < Duration::from_secs(30) => addrs.clone(),
        _ => {
            let addrs = Arc::new(host_addresses());
            *cache = Some((Instant::now(), addrs.clone()));
            addrs
        }
    }
}

pub fn host_addresses() -> Vec<IpAddr> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    interfaces
        .filter_map(|i| i.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(addr: &str) -> Option<&'static str> {
        let parsed: IpAddr = addr
            .parse()
            .unwrap_or_else(|_| panic!("{addr} is no address"));
        refused(parsed, &[], false)
    }

    #[test]
    fn the_hosts_networks_are_refused_and_the_internet_is_not() {
        for (addr, why) in [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("::ffff:192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.127.255.254", "carrier-grade NAT"),
            ("fd00::1", "unique local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("::127.0.0.1", "loopback"),
            ("::10.0.0.1", "private"),
            ("fec0::1", "site-local"),
            ("64:ff9b:1:a00:1:0:808:808", "local-use NAT64"),
        ] {
            let got = check(addr);
            assert!(got.is_some_and(|g| g.contains(why)), "{addr}: {got:?}");
        }
        for ok in ["93.184.216.34", "1.1.1.1", "100.128.0.1", "2606:4700::1111"] {
            assert_eq!(check(ok), None, "{ok}");
        }
    }

    #[test]
    fn the_hosts_own_addresses_are_refused_and_loopback_only_when_allowed() {
        let own: IpAddr = "93.184.216.34"
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert!(refused(own, &[own], false).is_some());
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(refused(lo, &[], true), None);
        // Allowing loopback allows nothing else.
        let private = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        assert!(refused(private, &[], true).is_some());
    }
}
