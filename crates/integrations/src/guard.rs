//! The target guard against server-side request forgery (DESIGN.md §9):
//! before any byte is sent, a target URL's host is resolved and refused if
//! any address is not public, unless the operator's allow-list opens it;
//! the connection then goes to exactly the checked addresses (the resolver
//! below hands reqwest only those, so there is no second lookup to rebind).
//!
//! - [`check_url`] refuses what needs no lookup: schemes other than
//!   `http(s)`, credentials in the URL, `http` to a host the allow-list does
//!   not open, and IP-literal hosts that are not public.
//! - [`classify`] names the range an address falls in; [`Guard::permits`]
//!   applies the allow-list to it.
//! - [`GuardedResolver`] is reqwest's resolver: it drops every address the
//!   guard refuses and fails when none is left.
//!
//! Tests only ever connect to loopback: the ranges are proved by unit tests
//! of [`classify`], the live refusal by loopback left off the allow-list.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use url::{Host, Url};

/// How long a name may take to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an address is not public: the range it falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    Public,
    Unspecified,
    Loopback,
    /// RFC 1918 and the IPv6 unique-local range.
    Private,
    /// 100.64.0.0/10.
    SharedAddressSpace,
    /// 169.254.0.0/16 (cloud metadata at 169.254.169.254) and fe80::/10.
    LinkLocal,
    Multicast,
    Broadcast,
    /// Documentation, benchmarking, protocol assignments, reserved (240/4),
    /// 6to4 relay, discard-only and the like: never a real target.
    Reserved,
}

impl Range {
    pub fn as_str(self) -> &'static str {
        match self {
            Range::Public => "public",
            Range::Unspecified => "unspecified",
            Range::Loopback => "loopback",
            Range::Private => "private",
            Range::SharedAddressSpace => "shared address space",
            Range::LinkLocal => "link-local",
            Range::Multicast => "multicast",
            Range::Broadcast => "broadcast",
            Range::Reserved => "reserved",
        }
    }
}

/// The range of an IPv4 address. `Ipv4Addr::is_global` is unstable, so
/// the table is written out (IANA special-purpose registry).
pub fn classify_v4(ip: Ipv4Addr) -> Range {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        _ if ip.is_unspecified() => Range::Unspecified,
        _ if ip.is_broadcast() => Range::Broadcast,
        (0, _, _) => Range::Reserved,
        (127, _, _) => Range::Loopback,
        (10, _, _) | (192, 168, _) => Range::Private,
        (172, 16..=31, _) => Range::Private,
        (100, 64..=127, _) => Range::SharedAddressSpace,
        (169, 254, _) => Range::LinkLocal,
        (192, 0, 0) | (192, 0, 2) | (192, 88, 99) | (198, 18..=19, _) | (198, 51, 100) | (203, 0, 113) => {
            Range::Reserved
        }
        (224..=239, _, _) => Range::Multicast,
        (240..=255, _, _) => Range::Reserved,
        _ => Range::Public,
    }
}

/// The range of an IPv6 address; an address that embeds an IPv4 one
/// (mapped, NAT64, 6to4, Teredo) is the range of what it embeds, or
/// reserved.
pub fn classify_v6(ip: Ipv6Addr) -> Range {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let segments = ip.segments();
    match segments {
        _ if ip.is_unspecified() => Range::Unspecified,
        _ if ip.is_loopback() => Range::Loopback,
        [0xff00..=0xffff, ..] => Range::Multicast,
        [0xfe80..=0xfebf, ..] => Range::LinkLocal,
        [0xfc00..=0xfdff, ..] => Range::Private,
        // 64:ff9b::/96 (NAT64) and 64:ff9b:1::/48: an IPv4 address behind.
        [0x64, 0xff9b, ..] => Range::Reserved,
        // 100::/64 discard-only.
        [0x100, 0, 0, 0, ..] => Range::Reserved,
        // 2001::/23 protocol assignments (Teredo 2001::/32 among them) and
        // 2001:db8::/32 documentation.
        [0x2001, 0x0000..=0x01ff, ..] | [0x2001, 0x0db8, ..] => Range::Reserved,
        // 2002::/16 6to4: the IPv4 address in segments 1 and 2.
        [0x2002, high, low, ..] => {
            let v4 = Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
            match classify_v4(v4) {
                Range::Public => Range::Public,
                _ => Range::Reserved,
            }
        }
        // ::/96 (IPv4-compatible, deprecated) and the rest of ::/8.
        [0, ..] => Range::Reserved,
        _ => Range::Public,
    }
}

pub fn classify(ip: IpAddr) -> Range {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// Why a target is refused (`target_forbidden`), or cannot be reached.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("the URL is not valid: {0}")]
    InvalidUrl(String),
    #[error("the scheme `{0}` is not allowed: use https (or http to a host the operator's allow-list opens)")]
    Scheme(String),
    #[error(
        "an unencrypted connection to `{0}` is allowed only to an address the operator's allow-list opens: use TLS"
    )]
    Unencrypted(String),
    #[error("the URL carries credentials: put them in the integration's credential, not in the URL")]
    Credentials,
    #[error("the URL has no host")]
    NoHost,
    #[error("`{host}` is a {} address ({address}), which is not a public target", range.as_str())]
    Forbidden { host: String, address: IpAddr, range: Range },
    #[error("`{0}` did not resolve to any address")]
    Unresolved(String),
    #[error(
        "this server reaches only the addresses its operator allow-listed (TALLY_OUTBOUND=allow-list), and `{0}` is not one"
    )]
    OutsideAllowList(String),
}

impl GuardError {
    /// Refusals of the target itself (`target_forbidden`), as opposed to a
    /// host that did not resolve (`integration_unreachable`).
    pub fn is_forbidden(&self) -> bool {
        !matches!(self, GuardError::Unresolved(_))
    }
}

/// The operator's allow-list (`--allow-private-targets CIDR,…`): ranges
/// opened despite not being public, and opened to plain `http`.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    allowed: Vec<IpNet>,
    /// Reach allow-listed literal addresses only: no name is looked up.
    /// For test and CI servers, which must never send a packet (not even a
    /// DNS query) past loopback whatever a client asks.
    allowed_only: bool,
}

impl Guard {
    pub fn new(allowed: Vec<IpNet>) -> Guard {
        Guard { allowed, allowed_only: false }
    }

    /// Only the allow-list: names and every other address are refused
    /// before any lookup or connection.
    pub fn allow_list_only(allowed: Vec<IpNet>) -> Guard {
        Guard { allowed, allowed_only: true }
    }

    /// Parses `127.0.0.0/8,::1/128` (an address alone is one host).
    pub fn parse_allow_list(text: &str) -> Result<Vec<IpNet>, String> {
        text.split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| {
                part.parse::<IpNet>()
                    .or_else(|_| part.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{part}` is not an address or a CIDR range"))
            })
            .collect()
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allowed.iter().any(|net| net.contains(&ip))
    }

    /// `Ok` for a public address or one the allow-list opens.
    pub fn permits(&self, host: &str, ip: IpAddr) -> Result<(), GuardError> {
        // An IPv4-mapped IPv6 address is judged, and allow-listed, as IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match classify(ip) {
            _ if self.allows(ip) => Ok(()),
            Range::Public => Ok(()),
            range => Err(GuardError::Forbidden { host: host.to_owned(), address: ip, range }),
        }
    }

    /// What can be refused without a lookup. Returns the URL parsed.
    pub fn check_url(&self, text: &str) -> Result<Url, GuardError> {
        let url = Url::parse(text).map_err(|error| GuardError::InvalidUrl(error.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(GuardError::Scheme(url.scheme().to_owned()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(GuardError::Credentials);
        }
        let host = url.host().ok_or(GuardError::NoHost)?;
        let literal = match host {
            Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            Host::Domain(_) => None,
        };
        match url.scheme() {
            "https" => {}
            // Plain http only to an allow-listed literal address: a name
            // could resolve anywhere.
            "http" if literal.is_some_and(|ip| self.allows(ip)) => {}
            other => return Err(GuardError::Scheme(other.to_owned())),
        }
        match literal {
            Some(ip) if self.allowed_only && !self.allows(ip) => {
                return Err(GuardError::OutsideAllowList(host.to_string()));
            }
            Some(ip) => self.permits(&host.to_string(), ip)?,
            None if self.allowed_only => return Err(GuardError::OutsideAllowList(host.to_string())),
            None => {}
        }
        Ok(url)
    }

    /// What can be refused of a database host without a lookup: a literal
    /// address the guard refuses, a name when only the allow-list is
    /// reached, and plain text (`encrypted: false`) to anything but an
    /// allow-listed literal address, as with `http`.
    pub fn check_host(&self, host: &str, encrypted: bool) -> Result<(), GuardError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.len() > 253 || host.contains(['/', '@', ' ', '?', '#']) {
            return Err(GuardError::InvalidUrl(format!("`{host}` is not a host name or address")));
        }
        match host.parse::<IpAddr>() {
            Ok(ip) if self.allowed_only && !self.allows(ip) => Err(GuardError::OutsideAllowList(host.to_owned())),
            Ok(ip) if !encrypted && !self.allows(ip) => Err(GuardError::Unencrypted(host.to_owned())),
            Ok(ip) => self.permits(host, ip),
            Err(_) if self.allowed_only => Err(GuardError::OutsideAllowList(host.to_owned())),
            Err(_) if !encrypted => Err(GuardError::Unencrypted(host.to_owned())),
            Err(_) => Ok(()),
        }
    }

    /// The addresses a database connection may go to: a literal address
    /// checked as it is, a name resolved and checked (every address).
    pub async fn resolve_host(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) if self.allowed_only && !self.allows(ip) => Err(GuardError::OutsideAllowList(bare.to_owned())),
            Ok(ip) => self.permits(bare, ip).map(|()| vec![SocketAddr::new(ip, port)]),
            Err(_) => self.resolve(bare, port).await,
        }
    }

    /// Resolves `host` and keeps the permitted addresses; refuses when any
    /// address is forbidden (a name that points at both a public and a
    /// private address is refused, not half-trusted).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, GuardError> {
        if self.allowed_only {
            return Err(GuardError::OutsideAllowList(host.to_owned()));
        }
        let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await;
        let addresses: Vec<SocketAddr> = match lookup {
            Ok(Ok(addresses)) => addresses.collect(),
            _ => return Err(GuardError::Unresolved(host.to_owned())),
        };
        if addresses.is_empty() {
            return Err(GuardError::Unresolved(host.to_owned()));
        }
        for address in &addresses {
            self.permits(host, address.ip())?;
        }
        Ok(addresses)
    }
}

/// reqwest's resolver: every name goes through [`Guard::resolve`].
#[derive(Clone)]
pub struct GuardedResolver {
    pub guard: Arc<Guard>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let addresses = guard.resolve(name.as_str(), 0).await?;
            let addresses: reqwest::dns::Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> Range {
        classify(text.parse().unwrap())
    }

    #[test]
    fn every_special_ipv4_range_is_classified_without_a_connection() {
        for (address, range) in [
            ("0.0.0.0", Range::Unspecified),
            ("0.1.2.3", Range::Reserved),
            ("127.0.0.1", Range::Loopback),
            ("127.255.0.9", Range::Loopback),
            ("10.0.0.1", Range::Private),
            ("172.16.0.1", Range::Private),
            ("172.31.255.255", Range::Private),
            ("192.168.1.1", Range::Private),
            ("100.64.0.1", Range::SharedAddressSpace),
            ("169.254.169.254", Range::LinkLocal),
            ("192.0.0.8", Range::Reserved),
            ("192.0.2.1", Range::Reserved),
            ("198.18.0.1", Range::Reserved),
            ("198.51.100.7", Range::Reserved),
            ("203.0.113.5", Range::Reserved),
            ("224.0.0.1", Range::Multicast),
            ("240.0.0.1", Range::Reserved),
            ("255.255.255.255", Range::Broadcast),
            ("172.32.0.1", Range::Public),
            ("100.128.0.1", Range::Public),
            ("8.8.8.8", Range::Public),
        ] {
            assert_eq!(v4(address), range, "{address}");
        }
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4_are_classified() {
        for (address, range) in [
            ("::", Range::Unspecified),
            ("::1", Range::Loopback),
            ("::ffff:127.0.0.1", Range::Loopback),
            ("::ffff:169.254.169.254", Range::LinkLocal),
            ("::ffff:8.8.8.8", Range::Public),
            ("::127.0.0.1", Range::Reserved),
            ("64:ff9b::a9fe:a9fe", Range::Reserved),
            ("100::1", Range::Reserved),
            ("2001::1", Range::Reserved),
            ("2001:db8::1", Range::Reserved),
            ("2002:7f00:1::", Range::Reserved),
            ("2002:0808:0808::", Range::Public),
            ("fc00::1", Range::Private),
            ("fd00:ec2::254", Range::Private),
            ("fe80::1", Range::LinkLocal),
            ("ff02::1", Range::Multicast),
            ("2606:4700::1111", Range::Public),
        ] {
            assert_eq!(v4(address), range, "{address}");
        }
    }

    #[test]
    fn urls_are_refused_before_any_lookup_for_scheme_credentials_and_literal_addresses() {
        let guard = Guard::default();
        let refused = |url: &str| guard.check_url(url).unwrap_err();
        assert!(matches!(refused("ftp://example.com/"), GuardError::Scheme(_)));
        assert!(matches!(refused("file:///etc/passwd"), GuardError::Scheme(_)));
        assert!(matches!(refused("http://example.com/"), GuardError::Scheme(_)), "http needs the allow-list");
        assert_eq!(refused("https://user:pw@example.com/"), GuardError::Credentials);
        assert_eq!(refused("https://user@example.com/"), GuardError::Credentials);
        for literal in [
            "https://127.0.0.1/",
            "https://[::1]/",
            "https://169.254.169.254/latest",
            "https://[::ffff:10.0.0.1]/",
            // The URL parser normalises decimal, octal and hex forms.
            "https://2130706433/",
            "https://0177.0.0.1/",
            "https://0x7f.1/",
        ] {
            assert!(matches!(refused(literal), GuardError::Forbidden { .. }), "{literal}");
        }
        assert!(guard.check_url("https://example.com/path?q=1").is_ok());
    }

    #[test]
    fn the_allow_list_opens_its_ranges_and_plain_http_to_them_only() {
        let guard = Guard::new(Guard::parse_allow_list("127.0.0.0/8, ::1").unwrap());
        assert!(guard.check_url("http://127.0.0.1:8080/x").is_ok());
        assert!(guard.check_url("http://[::1]:8080/x").is_ok());
        assert!(matches!(guard.check_url("http://10.0.0.1/").unwrap_err(), GuardError::Scheme(_)));
        assert!(matches!(guard.check_url("https://10.0.0.1/").unwrap_err(), GuardError::Forbidden { .. }));
        assert!(Guard::parse_allow_list("127.0.0.0/33").is_err());
        assert!(Guard::parse_allow_list("nonsense").is_err());
    }

    #[tokio::test]
    async fn an_allow_list_only_guard_looks_up_no_name_and_reaches_no_other_address() {
        let guard = Guard::allow_list_only(Guard::parse_allow_list("127.0.0.1/32").unwrap());
        assert!(guard.check_url("http://127.0.0.1:9/x").is_ok());
        for url in ["https://example.com/", "https://localhost/", "https://127.0.0.2/"] {
            assert!(matches!(guard.check_url(url).unwrap_err(), GuardError::OutsideAllowList(_)), "{url}");
        }
        assert!(matches!(guard.resolve("localhost", 80).await.unwrap_err(), GuardError::OutsideAllowList(_)));
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_unless_allowed() {
        // `localhost` resolves from /etc/hosts: no packet leaves the machine.
        let error = Guard::default().resolve("localhost", 80).await.unwrap_err();
        assert!(matches!(error, GuardError::Forbidden { range: Range::Loopback, .. }), "{error}");
        let open = Guard::new(Guard::parse_allow_list("127.0.0.0/8,::1").unwrap());
        assert!(!open.resolve("localhost", 80).await.unwrap().is_empty());
    }
}
