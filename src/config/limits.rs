//! `[limits]`: abuse limits (`crate::limits`) and the bounds on what the broker holds at once
//! (docs/architecture.md, "Limits and bounds"). Every key has a default sized for a large CI
//! fleet on one replica; `per_second = 0` turns a rate limit off.

use super::file::Errors;
use serde::Deserialize;
use std::net::IpAddr;
use std::str::FromStr;

/// `{ per_second = N, burst = B }`: B requests at once, then N a second. `per_second = 0` turns
/// the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// A network in CIDR notation (`10.0.0.0/8`, `fd00::/8`), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Network, String> {
        let bad = || format!("`{}` is not an address or a network like 10.0.0.0/8", crate::clock::truncate(text, 48));
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let addr = IpAddr::from_str(addr.trim()).map_err(|_| bad())?.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Network { addr, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(u128::from(net), u128::from(ip), self.prefix, 128),
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u32) -> bool {
    let shift = bits - u32::from(prefix);
    shift >= bits || (a >> shift) == (b >> shift)
}

/// `[limits]`, validated.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Requests that issue or renew credentials, per client address (`None`: off).
    pub address: Option<Rate>,
    /// The same, per issuer, once the token verified.
    pub issuer: Option<Rate>,
    /// The same, per repository (the issuer's identity claims), once the token verified.
    pub repository: Option<Rate>,
    /// Failed requests (invalid tokens, denials, malformed requests) per client address; past
    /// it, the address is refused for `cool_off_secs`.
    pub failures: Option<Rate>,
    pub cool_off_secs: i64,
    /// A limit refusing one key is audited once per window, with the count since the last event.
    pub audit_window_secs: i64,
    /// Keys each limit's table holds at most (memory bound under a flood from many addresses).
    pub max_tracked: usize,
    /// Proxies whose `X-Forwarded-For` names the client. Anyone else's is ignored.
    pub trusted_proxies: Vec<Network>,
    /// Open connections at most; the next waits in the kernel's accept queue.
    pub max_connections: usize,
    /// Requests issuing or renewing credentials at once; past it, a request waits up to
    /// `issuing_wait_ms` for a slot, then gets 503. Revocations, webhooks and reads are not
    /// counted, so a flood of exchanges cannot starve them.
    pub max_issuing: usize,
    pub issuing_wait_ms: u64,
    /// A connection must send a request's headers within this (slowloris); an idle keep-alive
    /// connection is closed after it too.
    pub header_read_timeout_secs: u64,
    /// A request's body must arrive within this.
    pub body_read_timeout_secs: u64,
    /// Bytes of request line and headers at most (431 past it).
    pub max_header_bytes: usize,
    /// Calls in flight to one backend's upstream (AWS, GitHub, a database) at most; past it, a
    /// mint waits up to `issuing_wait_ms`, then gets 503. A revocation waits its turn.
    pub backend_max_outstanding: usize,
}

impl LimitsConfig {
    /// No rate limits and generous bounds (tools and tests that build an `App` by hand).
    pub fn off() -> LimitsConfig {
        LimitsConfig {
            address: None,
            issuer: None,
            repository: None,
            failures: None,
            cool_off_secs: 30,
            audit_window_secs: 60,
            max_tracked: DEFAULT_MAX_TRACKED,
            trusted_proxies: Vec::new(),
            max_connections: 4096,
            max_issuing: 512,
            issuing_wait_ms: 1000,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 10,
            max_header_bytes: 64 * 1024,
            backend_max_outstanding: 64,
        }
    }
}

const DEFAULT_MAX_TRACKED: usize = 100_000;

/// The defaults: a self-hosted fleet behind one NAT address starting a 1,000-job matrix at
/// once gets through; one address hammering bad tokens is cooled off after 100.
const DEFAULT_ADDRESS: Rate = Rate { per_second: 100.0, burst: 1000 };
const DEFAULT_ISSUER: Rate = Rate { per_second: 1000.0, burst: 5000 };
const DEFAULT_REPOSITORY: Rate = Rate { per_second: 50.0, burst: 500 };
const DEFAULT_FAILURES: Rate = Rate { per_second: 1.0, burst: 100 };

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    address: Option<Rate>,
    issuer: Option<Rate>,
    repository: Option<Rate>,
    failures: Option<Rate>,
    cool_off: Option<String>,
    audit_window: Option<String>,
    max_tracked: Option<usize>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    max_connections: Option<usize>,
    max_issuing: Option<usize>,
    issuing_wait: Option<String>,
    header_read_timeout: Option<String>,
    body_read_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    backend_max_outstanding: Option<usize>,
}

impl RawLimits {
    pub(super) fn validate(&self, errs: &mut Errors) -> LimitsConfig {
        let off = LimitsConfig::off();
        let mut rate = |field: &str, raw: Option<Rate>, default: Rate| {
            let rate = raw.unwrap_or(default);
            if !(rate.per_second.is_finite() && rate.per_second >= 0.0) {
                errs.0.push(format!("limits.{field}.per_second: a number of requests, 0 or more (0 turns it off)"));
            }
            if rate.burst == 0 && rate.per_second > 0.0 {
                errs.0.push(format!("limits.{field}.burst: at least 1"));
            }
            (rate.per_second > 0.0).then_some(rate)
        };
        let address = rate("address", self.address, DEFAULT_ADDRESS);
        let issuer = rate("issuer", self.issuer, DEFAULT_ISSUER);
        let repository = rate("repository", self.repository, DEFAULT_REPOSITORY);
        let failures = rate("failures", self.failures, DEFAULT_FAILURES);
        let mut bounded =
            |field: &str, value: Option<usize>, default: usize, range: std::ops::RangeInclusive<usize>| {
                let value = value.unwrap_or(default);
                if !range.contains(&value) {
                    errs.0.push(format!("limits.{field}: {} to {}", range.start(), range.end()));
                }
                value
            };
        let max_tracked = bounded("max_tracked", self.max_tracked, off.max_tracked, 100..=10_000_000);
        let max_connections = bounded("max_connections", self.max_connections, off.max_connections, 16..=1_000_000);
        let max_issuing = bounded("max_issuing", self.max_issuing, off.max_issuing, 1..=100_000);
        let max_header_bytes = bounded("max_header_bytes", self.max_header_bytes, off.max_header_bytes, 8192..=1 << 20);
        let backend_max_outstanding =
            bounded("backend_max_outstanding", self.backend_max_outstanding, off.backend_max_outstanding, 1..=10_000);
        let mut secs = |field: &str, value: &Option<String>, default: i64, max: i64| {
            let v = errs.duration(&format!("limits.{field}"), value.as_deref(), default);
            if !(1..=max).contains(&v) {
                errs.0.push(format!("limits.{field}: between 1s and {max}s"));
            }
            v
        };
        let cool_off_secs = secs("cool_off", &self.cool_off, off.cool_off_secs, 24 * 3600);
        let audit_window_secs = secs("audit_window", &self.audit_window, off.audit_window_secs, 24 * 3600);
        let issuing_wait_secs = secs("issuing_wait", &self.issuing_wait, 1, 60);
        let header_read_timeout_secs = secs("header_read_timeout", &self.header_read_timeout, 10, 600);
        let body_read_timeout_secs = secs("body_read_timeout", &self.body_read_timeout, 10, 600);
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse::<Network>().map_err(|e| errs.0.push(format!("limits.trusted_proxies: {e}"))).ok())
            .collect();
        LimitsConfig {
            address,
            issuer,
            repository,
            failures,
            cool_off_secs,
            audit_window_secs,
            max_tracked,
            trusted_proxies,
            max_connections,
            max_issuing,
            issuing_wait_ms: u64::try_from(issuing_wait_secs).unwrap_or(1) * 1000,
            header_read_timeout_secs: u64::try_from(header_read_timeout_secs).unwrap_or(10),
            body_read_timeout_secs: u64::try_from(body_read_timeout_secs).unwrap_or(10),
            max_header_bytes,
            backend_max_outstanding,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        IpAddr::from_str(text).unwrap()
    }

    fn net(text: &str) -> Network {
        text.parse().unwrap()
    }

    fn validate(toml_text: &str) -> Result<LimitsConfig, Vec<String>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            limits: RawLimits,
        }
        let file: File = toml::from_str(toml_text).map_err(|e| vec![e.to_string()])?;
        let mut errs = Errors::default();
        let config = file.limits.validate(&mut errs);
        if errs.0.is_empty() { Ok(config) } else { Err(errs.0) }
    }

    #[test]
    fn networks_parse_and_contain_what_their_prefix_covers() {
        assert!(net("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("192.168.1.7").contains(ip("192.168.1.7")));
        assert!(!net("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(net("fd00::/8").contains(ip("fd12::1")));
        assert!(!net("fd00::/8").contains(ip("10.0.0.1")));
        // An IPv4-mapped peer (a dual-stack socket) is its IPv4 address.
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "ten", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_limit_every_key_and_bound_everything() {
        let c = validate("[limits]").unwrap();
        assert_eq!(c.address, Some(DEFAULT_ADDRESS));
        assert_eq!(c.failures, Some(DEFAULT_FAILURES));
        assert_eq!((c.max_connections, c.max_issuing, c.header_read_timeout_secs), (4096, 512, 10));
        assert!(c.trusted_proxies.is_empty());
    }

    #[test]
    fn a_rate_of_zero_turns_a_limit_off_and_proxies_parse() {
        let c = validate(
            "[limits]\naddress = { per_second = 0, burst = 1 }\nrepository = { per_second = 2.5, burst = 10 }\n\
             trusted_proxies = [\"10.0.0.0/8\", \"fd00::1\"]\ncool_off = \"2m\"",
        )
        .unwrap();
        assert_eq!(c.address, None);
        assert_eq!(c.repository, Some(Rate { per_second: 2.5, burst: 10 }));
        assert_eq!((c.trusted_proxies.len(), c.cool_off_secs), (2, 120));
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let errs = validate(
            "[limits]\nissuer = { per_second = -1, burst = 5 }\nfailures = { per_second = 1, burst = 0 }\n\
             trusted_proxies = [\"10.0.0.0/40\"]\nmax_connections = 1\nheader_read_timeout = \"1h\"",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("limits.trusted_proxies: `10.0.0.0/40`")), "{errs:?}");
        assert!(validate("[limits]\naddress = { per_second = 1, burst = 1, extra = 2 }").is_err());
        assert!(validate("[limits]\nrate = 5").is_err());
    }

    #[test]
    fn the_example_config_in_the_docs_parses_with_its_limits() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ephemera.example.toml");
        let config = crate::config::Config::parse(&std::fs::read_to_string(path).unwrap(), std::path::Path::new("/"))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(config.limits.failures, Some(DEFAULT_FAILURES));
        assert_eq!(config.limits.max_header_bytes, 65536);
    }
}
