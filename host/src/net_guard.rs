//! Addresses a client's `notify_url` may never make the daemon talk to, with the site's
//! callback credentials: link-local addresses (169.254.0.0/16 and fe80::/10, where cloud
//! metadata services answer), the EC2 IPv6 metadata address fd00:ec2::254, and the
//! unspecified addresses 0.0.0.0 and :: (which reach the local host), also in their
//! IPv4-mapped IPv6 forms.
//!
//! Invariant: a callback connection goes only to an address checked here, and only to a
//! host `callbacks.allow` lists when it lists any. A URL is checked at intake
//! ([`check_callback_url`]) and again before delivery; a host name is
//! resolved once per delivery by [`GuardedResolver`], which hands the HTTP client only the
//! addresses that pass, so the connection goes to a checked address and a name that
//! resolves to nothing else fails the attempt.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use url::{Host, Url};

use crate::allow_list::AllowList;

/// The EC2 instance metadata service's IPv6 address.
const EC2_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Whether a callback must never go to `ip`.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_forbidden(IpAddr::V4(v4));
            }
            v6.is_unspecified() || v6.is_unicast_link_local() || v6 == EC2_METADATA_V6
        }
    }
}

/// The URL's host when it is an IP literal that [`is_forbidden`].
pub fn forbidden_literal(url: &Url) -> Option<IpAddr> {
    let ip = match url.host()? {
        Host::Ipv4(v4) => IpAddr::V4(v4),
        Host::Ipv6(v6) => IpAddr::V6(v6),
        Host::Domain(_) => return None,
    };
    is_forbidden(ip).then_some(ip)
}

/// Whether a callback may go to `url` under `callbacks.allow`: a non-empty list must match
/// it, and a forbidden IP literal passes only when the list matches it. The error completes
/// "notify_url ...".
pub fn check_callback_url(url: &Url, allow: &AllowList) -> Result<(), String> {
    let listed = !allow.is_empty() && allow.allows(url);
    if !allow.is_empty() && !listed {
        return Err(format!(
            "{}: its host is not in callbacks.allow",
            url.host_str().unwrap_or("")
        ));
    }
    match forbidden_literal(url) {
        Some(ip) if !listed => Err(format!(
            "points at {ip}, a link-local, metadata-service or unspecified address; callbacks never go there"
        )),
        _ => Ok(()),
    }
}

/// The addresses of `name` a callback may use; an error naming them when none may.
pub fn keep_allowed(name: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
    if addrs.is_empty() {
        return Err(format!("{name} resolves to no address"));
    }
    let (ok, refused): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| !is_forbidden(a.ip()));
    if ok.is_empty() {
        let refused: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
        return Err(format!(
            "{name} resolves only to link-local, metadata-service or unspecified addresses ({}); callbacks never go there",
            refused.join(", ")
        ));
    }
    Ok(ok)
}

/// The callback client's resolver: the system's, filtered by [`keep_allowed`].
#[derive(Debug, Default, Clone, Copy)]
pub struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok = keep_allowed(&host, addrs)?;
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn metadata_link_local_and_unspecified_are_forbidden() {
        for bad in [
            "169.254.169.254",
            "169.254.0.1",
            "0.0.0.0",
            "::",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
        ] {
            assert!(is_forbidden(ip(bad)), "{bad}");
        }
        for good in [
            "127.0.0.1",
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "::1",
            "fd00:ec2::253",
            "fec0::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_forbidden(ip(good)), "{good}");
        }
    }

    #[test]
    fn literals_are_recognised_in_urls() {
        let lit = |u: &str| forbidden_literal(&Url::parse(u).unwrap());
        assert_eq!(
            lit("http://169.254.169.254/latest"),
            Some(ip("169.254.169.254"))
        );
        assert_eq!(lit("http://[fe80::1]:8080/cb"), Some(ip("fe80::1")));
        assert_eq!(lit("http://0.0.0.0:9/cb"), Some(ip("0.0.0.0")));
        // The URL parser normalises other spellings of an IPv4 address.
        assert_eq!(lit("http://0xA9FEA9FE/"), Some(ip("169.254.169.254")));
        assert_eq!(lit("http://asvo.example.org/cb"), None);
        assert_eq!(lit("http://127.0.0.1:9/cb"), None);
    }

    #[test]
    fn the_allow_list_decides_and_can_name_a_forbidden_address() {
        let url = |u: &str| Url::parse(u).unwrap();
        let list = |e: &[&str]| {
            AllowList::parse(&e.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let any = AllowList::default();
        assert!(check_callback_url(&url("http://asvo.example.org/cb"), &any).is_ok());
        assert!(check_callback_url(&url("http://169.254.169.254/"), &any).is_err());
        let asvo = list(&["asvo.example.org"]);
        assert!(check_callback_url(&url("https://asvo.example.org:8443/cb"), &asvo).is_ok());
        let err = check_callback_url(&url("http://evil.example.net/cb"), &asvo).unwrap_err();
        assert!(err.contains("not in callbacks.allow"), "{err}");
        assert!(check_callback_url(&url("http://169.254.169.254/"), &asvo).is_err());
        let named = list(&["169.254.10.10:8080"]);
        assert!(check_callback_url(&url("http://169.254.10.10:8080/cb"), &named).is_ok());
        assert!(check_callback_url(&url("http://169.254.10.10:9/cb"), &named).is_err());
    }

    #[test]
    fn only_checked_addresses_are_kept() {
        let sa = |s: &str| SocketAddr::new(ip(s), 0);
        assert_eq!(
            keep_allowed("h", vec![sa("169.254.169.254"), sa("10.0.0.1")]).unwrap(),
            vec![sa("10.0.0.1")]
        );
        let err = keep_allowed("h", vec![sa("169.254.169.254"), sa("::")]).unwrap_err();
        assert!(
            err.contains("169.254.169.254") && err.contains("::"),
            "{err}"
        );
        assert!(keep_allowed("h", vec![]).is_err());
    }
}
