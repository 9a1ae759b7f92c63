//! What the operator console shows that no other part keeps: the most recent refusals, each with
//! the claims it was decided on (so the console can explain it), and the exchanges and denials
//! of each minute of the last hour. In memory, per replica, bounded: [`RECENT_REFUSALS`] records
//! and [`MINUTES`] counters, whatever the load. The audit file stays the record; this is a view.

use crate::claims::Claims;
use crate::clock::{UnixSeconds, rfc3339, truncate};
use crate::error::Error;
use crate::identity::VerifiedIdentity;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// Refusals kept for the console.
pub const RECENT_REFUSALS: usize = 200;
/// Minutes of outcomes kept for the console's chart.
pub const MINUTES: usize = 60;

/// One refused exchange or token exchange.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub time: String,
    pub request_id: String,
    /// `exchange` or `token-exchange`.
    pub endpoint: &'static str,
    /// The policy asked for (the caller's text when it names none: bounded).
    pub policy: String,
    /// `policy_denied`, `invalid_token`, `invalid_request`, …
    pub code: &'static str,
    /// The claim that decided a policy's refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deciding_claim: Option<String>,
    /// Why, as the log says it (never a secret: identity errors carry none).
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The verified claims, when the token verified: what `POST /v1/explain` needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<Arc<Claims>>,
}

/// The outcomes of one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// The minute's start (Unix seconds, a multiple of 60).
    pub at: UnixSeconds,
    pub issued: u64,
    pub denied: u64,
}

#[derive(Default)]
pub struct Recent {
    refusals: Mutex<VecDeque<Refusal>>,
    minutes: Mutex<VecDeque<Minute>>,
}

impl Recent {
    /// Counts an outcome in its minute: `Some(true)` issued, `Some(false)` denied (a policy's
    /// refusal or a bad token), `None` neither (the broker failed).
    pub fn count(&self, now: UnixSeconds, issued: Option<bool>) {
        let Some(issued) = issued else { return };
        let at = now - now.rem_euclid(60);
        let mut minutes = self.minutes.lock().unwrap_or_else(PoisonError::into_inner);
        if minutes.back().is_none_or(|m| m.at < at) {
            minutes.push_back(Minute { at, ..Minute::default() });
            while minutes.len() > MINUTES {
                minutes.pop_front();
            }
        }
        // A clock that stepped back counts into the latest minute.
        if let Some(m) = minutes.back_mut() {
            if issued { m.issued += 1 } else { m.denied += 1 }
        }
    }

    /// Keeps a refusal, dropping the oldest beyond [`RECENT_REFUSALS`].
    pub fn refused(&self, refusal: Refusal) {
        let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        refusals.push_back(refusal);
        while refusals.len() > RECENT_REFUSALS {
            refusals.pop_front();
        }
    }

    /// The kept refusals, newest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refusals.lock().unwrap_or_else(PoisonError::into_inner).iter().rev().cloned().collect()
    }

    /// The last [`MINUTES`] minutes up to `now`'s, oldest first, a minute without outcomes as
    /// zeros.
    pub fn series(&self, now: UnixSeconds) -> Vec<Minute> {
        let last = now - now.rem_euclid(60);
        let minutes = self.minutes.lock().unwrap_or_else(PoisonError::into_inner);
        (0..MINUTES as i64)
            .rev()
            .map(|back| {
                let at = last - back * 60;
                minutes.iter().find(|m| m.at == at).copied().unwrap_or(Minute { at, issued: 0, denied: 0 })
            })
            .collect()
    }
}

/// Is this outcome a denial for the chart and the list: a policy's refusal or a bad token?
pub fn is_refusal(e: &Error) -> bool {
    matches!(e, Error::Denied(_) | Error::InvalidToken(_) | Error::OAuth { .. })
}

impl Refusal {
    /// The record of a refused request.
    pub fn new(
        now: UnixSeconds,
        request_id: &str,
        endpoint: &'static str,
        policy: &str,
        identity: Option<&VerifiedIdentity>,
        error: &Error,
    ) -> Refusal {
        Refusal {
            time: rfc3339(now),
            request_id: request_id.to_string(),
            endpoint,
            policy: truncate(policy, 64).to_string(),
            code: error.code(),
            deciding_claim: match error {
                Error::Denied(d) => Some(d.claim.clone()),
                _ => None,
            },
            reason: truncate(&error.log_detail(), 300).to_string(),
            issuer: identity.map(|i| i.issuer().to_string()),
            job: identity.map(|i| i.job().to_string()),
            claims: identity.map(VerifiedIdentity::claims_shared),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_are_bounded_to_the_last_hour_and_gaps_read_as_zero() {
        let recent = Recent::default();
        let start: UnixSeconds = 1_800_000_000; // a whole minute
        for minute in 0..90 {
            recent.count(start + minute * 60 + 5, Some(true));
            recent.count(start + minute * 60 + 7, Some(minute % 2 == 0));
            recent.count(start + minute * 60 + 9, None);
        }
        let now = start + 89 * 60 + 30;
        let series = recent.series(now);
        assert_eq!(series.len(), MINUTES);
        assert_eq!(series[0].at, start + 30 * 60, "the oldest kept minute is an hour back");
        assert_eq!(series[59], Minute { at: start + 89 * 60, issued: 1, denied: 1 });
        assert_eq!(series[58], Minute { at: start + 88 * 60, issued: 2, denied: 0 });
        assert_eq!(recent.minutes.lock().unwrap().len(), MINUTES, "no more counters than the chart shows");
        let later = recent.series(now + 600);
        assert_eq!(later[59], Minute { at: start + 99 * 60, issued: 0, denied: 0 }, "a quiet minute is zeros");
    }

    #[test]
    fn refusals_are_kept_newest_first_and_bounded() {
        let recent = Recent::default();
        for i in 0..(RECENT_REFUSALS + 5) {
            let error = Error::BadRequest(format!("r{i}"));
            recent.refused(Refusal::new(0, &format!("req_{i}"), "exchange", "deploy", None, &error));
        }
        let kept = recent.refusals();
        assert_eq!(kept.len(), RECENT_REFUSALS);
        assert_eq!(kept[0].request_id, format!("req_{}", RECENT_REFUSALS + 4));
        assert_eq!(kept.last().unwrap().request_id, "req_5");
    }
}
