//! Time, injected. Pure decisions take `now`; services hold a [`Clock`]; tests move a
//! [`ManualClock`] instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch: the unit of every JWT time claim and lease expiry.
pub type UnixSeconds = i64;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> UnixSeconds;

    /// Microseconds since the Unix epoch, for what needs finer time than a JWT (the abuse
    /// limits' token buckets). A clock that only knows seconds answers whole seconds.
    fn now_micros(&self) -> i64 {
        self.now().saturating_mul(1_000_000)
    }
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixSeconds {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }

    fn now_micros(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now: UnixSeconds) -> Self {
        Self(AtomicI64::new(now))
    }

    pub fn set(&self, now: UnixSeconds) {
        self.0.store(now, Ordering::SeqCst);
    }

    pub fn advance(&self, seconds: i64) {
        self.0.fetch_add(seconds, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixSeconds {
        self.0.load(Ordering::SeqCst)
    }
}

/// RFC 3339 in UTC with second precision, e.g. `2026-11-25T17:10:00Z`.
pub fn rfc3339(t: UnixSeconds) -> String {
    let secs = u64::try_from(t).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// Parses a duration such as `15m`, `1h`, `90s` or `1h30m` into whole seconds (at least 1).
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{}` is not a duration like 15m or 1h ({e})", truncate(text, 32)))?;
    let secs = i64::try_from(d.as_secs()).map_err(|_| "duration is too large".to_string())?;
    if secs < 1 || d.subsec_nanos() != 0 {
        return Err(format!("`{}` must be a whole number of seconds, at least 1s", truncate(text, 32)));
    }
    Ok(secs)
}

/// Formats whole seconds the way the config writes them (`15m`, `1h`, `90s`).
pub fn format_duration(secs: i64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
        .to_string()
        .replace(' ', "")
}

/// Cuts untrusted text for messages and logs (on a char boundary).
pub fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_from_config_notation() {
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(format_duration(5400), "1h30m");
    }

    #[test]
    fn rfc3339_is_utc_with_seconds() {
        assert_eq!(rfc3339(1_787_166_757), "2026-08-19T19:12:37Z");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(100);
        c.advance(5);
        assert_eq!(c.now(), 105);
    }
}
