//! A token bucket as one number: GCRA (the generic cell rate algorithm), so a key costs one
//! `i64` and an admission is two comparisons. Pure: time comes in as `now` (microseconds).

pub use crate::config::Rate;

/// GCRA over a configured [`Rate`].
pub trait Bucket {
    /// Admits one request at `now` against `tat`, the bucket's theoretical arrival time (0 for a
    /// key never seen). `Err` carries the microseconds until the bucket has room again.
    fn admit(&self, tat: &mut i64, now: i64) -> Result<(), i64>;
}

/// Is a bucket at `tat` full again at `now` (the same as a key never seen, so it may be
/// forgotten)?
pub fn is_idle(tat: i64, now: i64) -> bool {
    tat <= now
}

/// The time one request takes out of the bucket, in microseconds (at least 1).
fn interval(rate: &Rate) -> i64 {
    (1e6 / rate.per_second).ceil().clamp(1.0, 1e15) as i64
}

impl Bucket for Rate {
    fn admit(&self, tat: &mut i64, now: i64) -> Result<(), i64> {
        let interval = interval(self);
        let tolerance = interval.saturating_mul(i64::from(self.burst.max(1)) - 1);
        // A bucket can be at most `tolerance + interval` ahead of the clock; further ahead, the
        // clock stepped back (NTP): start the bucket afresh rather than refuse for the step.
        if tat.saturating_sub(now) > tolerance.saturating_add(interval) {
            *tat = now;
        }
        let start = (*tat).max(now);
        if start - now > tolerance {
            return Err(start - tolerance - now);
        }
        *tat = start.saturating_add(interval);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    #[test]
    fn a_burst_is_admitted_at_once_then_the_rate_refills_it() {
        let rate = Rate { per_second: 2.0, burst: 3 };
        let (mut tat, now) = (0, 100 * SECOND);
        for _ in 0..3 {
            assert_eq!(rate.admit(&mut tat, now), Ok(()));
        }
        // The fourth waits for one interval (half a second at 2/s).
        assert_eq!(rate.admit(&mut tat, now), Err(SECOND / 2));
        assert_eq!(rate.admit(&mut tat, now + SECOND / 2 - 1), Err(1));
        assert_eq!(rate.admit(&mut tat, now + SECOND / 2), Ok(()));
        assert_eq!(rate.admit(&mut tat, now + SECOND / 2), Err(SECOND / 2));
        // Left alone for longer than the burst takes to refill, it is idle (forgettable) and
        // admits a whole burst again.
        let later = now + 10 * SECOND;
        assert!(is_idle(tat, later));
        for _ in 0..3 {
            assert_eq!(rate.admit(&mut tat, later), Ok(()));
        }
        assert!(rate.admit(&mut tat, later).is_err());
    }

    #[test]
    fn a_refused_request_takes_nothing_out_of_the_bucket() {
        let rate = Rate { per_second: 1.0, burst: 1 };
        let mut tat = 0;
        assert_eq!(rate.admit(&mut tat, SECOND), Ok(()));
        let before = tat;
        for _ in 0..1000 {
            assert!(rate.admit(&mut tat, SECOND).is_err());
        }
        assert_eq!(tat, before, "a flood of refusals must not push the bucket's refill further out");
        assert_eq!(rate.admit(&mut tat, 2 * SECOND), Ok(()));
    }

    #[test]
    fn a_clock_stepping_back_starts_the_bucket_afresh_instead_of_refusing_for_the_step() {
        let rate = Rate { per_second: 1.0, burst: 2 };
        let mut tat = 0;
        let now = 1_000 * SECOND;
        assert!(rate.admit(&mut tat, now).is_ok() && rate.admit(&mut tat, now).is_ok());
        assert_eq!(rate.admit(&mut tat, now), Err(SECOND));
        // An hour back: not an hour's refusal.
        assert_eq!(rate.admit(&mut tat, now - 3600 * SECOND), Ok(()));
    }

    #[test]
    fn a_burst_of_zero_admits_one_and_huge_rates_do_not_overflow() {
        let mut tat = 0;
        assert_eq!(Rate { per_second: 1.0, burst: 0 }.admit(&mut tat, SECOND), Ok(()));
        let fast = Rate { per_second: 1e12, burst: u32::MAX };
        let mut tat = i64::MAX - 10;
        // Further ahead than any bucket can be: a clock step, started afresh without overflowing.
        assert_eq!(fast.admit(&mut tat, 0), Ok(()));
        assert_eq!(tat, 1);
        let slow = Rate { per_second: 1e-12, burst: u32::MAX };
        let mut tat = 0;
        assert_eq!(slow.admit(&mut tat, SECOND), Ok(()));
    }
}
