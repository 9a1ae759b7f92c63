//! Prometheus text metrics, kept with atomics (no registry crate needed for a handful of series).
//! Label values are bounded: the policy label is a loaded policy's name or `unknown`, so a caller
//! cannot grow the series set by inventing names.

use dashmap::DashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Default)]
pub struct Metrics {
    exchanges: DashMap<(String, &'static str), AtomicU64>,
    revocations: DashMap<&'static str, AtomicU64>,
    /// Leases ended, by reason (reasons are the broker's own constants).
    ended: DashMap<String, AtomicU64>,
    reloads: DashMap<&'static str, AtomicU64>,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

/// Gauges read at scrape time from their owners.
pub struct Gauges {
    pub live_leases: usize,
    pub pending_revocations: usize,
    pub irrevocable: usize,
    pub live_by_backend: Vec<(String, usize)>,
    pub policies_loaded: usize,
    pub policy_generation: u64,
    pub policies_reload_failing: bool,
    pub audit_failures: u64,
    pub jwks: Vec<(String, u64, u64)>,
}

impl Metrics {
    pub fn exchange(&self, policy: &str, outcome: &'static str, seconds: f64) {
        self.exchanges.entry((policy.to_string(), outcome)).or_default().fetch_add(1, Ordering::Relaxed);
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn reload(&self, outcome: &'static str) {
        self.reloads.entry(outcome).or_default().fetch_add(1, Ordering::Relaxed);
    }

    pub fn leases_ended(&self, reason: &str, n: usize) {
        if n > 0 {
            self.ended.entry(reason.to_string()).or_default().fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub fn revocation(&self, outcome: &'static str) {
        self.revocations.entry(outcome).or_default().fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP ephemera_exchanges_total Exchanges by policy and outcome.\n# TYPE ephemera_exchanges_total counter"
        );
        let mut rows: Vec<_> =
            self.exchanges.iter().map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed))).collect();
        rows.sort();
        for ((policy, outcome), n) in rows {
            let _ = writeln!(out, "ephemera_exchanges_total{{policy=\"{policy}\",outcome=\"{outcome}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP ephemera_exchange_duration_seconds Exchange latency inside the broker.\n# TYPE ephemera_exchange_duration_seconds histogram"
        );
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "ephemera_exchange_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "ephemera_exchange_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "ephemera_exchange_duration_seconds_sum {}",
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "ephemera_exchange_duration_seconds_count {count}");
        let _ = writeln!(
            out,
            "# HELP ephemera_revocations_total Lease revocations by outcome.\n# TYPE ephemera_revocations_total counter"
        );
        let mut rows: Vec<_> = self.revocations.iter().map(|e| (*e.key(), e.value().load(Ordering::Relaxed))).collect();
        rows.sort();
        for (outcome, n) in rows {
            let _ = writeln!(out, "ephemera_revocations_total{{outcome=\"{outcome}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP ephemera_leases_live Leases currently active.\n# TYPE ephemera_leases_live gauge\nephemera_leases_live {}",
            gauges.live_leases
        );
        let _ = writeln!(
            out,
            "# HELP ephemera_leases_live_by_backend Active leases holding a credential of each backend.\n# TYPE ephemera_leases_live_by_backend gauge"
        );
        for (backend, n) in &gauges.live_by_backend {
            let _ = writeln!(out, "ephemera_leases_live_by_backend{{backend=\"{backend}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP ephemera_leases_ended_total Leases ended, by reason (job, webhook, admin, expired, policy-changed, ...).\n# TYPE ephemera_leases_ended_total counter"
        );
        let mut rows: Vec<_> =
            self.ended.iter().map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed))).collect();
        rows.sort();
        for (reason, n) in rows {
            let _ = writeln!(out, "ephemera_leases_ended_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP ephemera_policy_reloads_total Policy reloads by outcome (failed: the last good set stays in use).\n# TYPE ephemera_policy_reloads_total counter"
        );
        for outcome in ["ok", "failed"] {
            let n = self.reloads.get(outcome).map_or(0, |v| v.load(Ordering::Relaxed));
            let _ = writeln!(out, "ephemera_policy_reloads_total{{outcome=\"{outcome}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP ephemera_policies_loaded Policies in the set in use.\n# TYPE ephemera_policies_loaded gauge\nephemera_policies_loaded {}",
            gauges.policies_loaded
        );
        let _ = writeln!(
            out,
            "# HELP ephemera_policy_generation Successful policy loads since start.\n# TYPE ephemera_policy_generation gauge\nephemera_policy_generation {}",
            gauges.policy_generation
        );
        let _ = writeln!(
            out,
            "# HELP ephemera_policy_reload_failing 1 while the last reload failed and an older set is in use.\n# TYPE ephemera_policy_reload_failing gauge\nephemera_policy_reload_failing {}",
            u8::from(gauges.policies_reload_failing)
        );
        let _ = writeln!(
            out,
            "# HELP ephemera_audit_write_failures_total Audit events that could not be written (exchanges failed closed).\n# TYPE ephemera_audit_write_failures_total counter\nephemera_audit_write_failures_total {}",
            gauges.audit_failures
        );
        let _ = writeln!(
            out,
            "# HELP ephemera_revocations_pending Leases whose revocation a backend has not confirmed yet.\n# TYPE ephemera_revocations_pending gauge\nephemera_revocations_pending {}",
            gauges.pending_revocations
        );
        let _ = writeln!(
            out,
            "# HELP ephemera_leases_irrevocable Leases whose revocation failed every retry; still retried, never dropped.\n# TYPE ephemera_leases_irrevocable gauge\nephemera_leases_irrevocable {}",
            gauges.irrevocable
        );
        let _ = writeln!(
            out,
            "# HELP ephemera_jwks_fetches_total Issuer JWKS fetches by result.\n# TYPE ephemera_jwks_fetches_total counter"
        );
        for (issuer, ok, failed) in &gauges.jwks {
            let _ = writeln!(out, "ephemera_jwks_fetches_total{{issuer=\"{issuer}\",result=\"attempted\"}} {ok}");
            let _ = writeln!(out, "ephemera_jwks_fetches_total{{issuer=\"{issuer}\",result=\"failed\"}} {failed}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole scrape text of a small known state, byte for byte: every family, its HELP and
    /// TYPE lines, the label order and the sorting of rows. Latencies are powers of two (or their
    /// sums) so the microsecond sum is exact.
    #[test]
    fn render_of_a_known_state_is_pinned_byte_for_byte() {
        let m = Metrics::default();
        m.exchange("deploy", "issued", 0.0625);
        m.exchange("deploy", "denied", 0.25);
        m.exchange("build", "issued", 3.0);
        m.revocation("revoked");
        m.revocation("pending");
        m.revocation("revoked");
        m.leases_ended("job", 2);
        m.leases_ended("expired", 1);
        m.leases_ended("admin", 0);
        m.reload("failed");
        let gauges = Gauges {
            live_leases: 4,
            pending_revocations: 1,
            irrevocable: 0,
            live_by_backend: vec![("aws".into(), 3), ("jwt".into(), 1)],
            policies_loaded: 2,
            policy_generation: 5,
            policies_reload_failing: true,
            audit_failures: 7,
            jwks: vec![("ci".into(), 10, 1)],
        };
        let expected = "\
# HELP ephemera_exchanges_total Exchanges by policy and outcome.
# TYPE ephemera_exchanges_total counter
ephemera_exchanges_total{policy=\"build\",outcome=\"issued\"} 1
ephemera_exchanges_total{policy=\"deploy\",outcome=\"denied\"} 1
ephemera_exchanges_total{policy=\"deploy\",outcome=\"issued\"} 1
# HELP ephemera_exchange_duration_seconds Exchange latency inside the broker.
# TYPE ephemera_exchange_duration_seconds histogram
ephemera_exchange_duration_seconds_bucket{le=\"0.0005\"} 0
ephemera_exchange_duration_seconds_bucket{le=\"0.001\"} 0
ephemera_exchange_duration_seconds_bucket{le=\"0.0025\"} 0
ephemera_exchange_duration_seconds_bucket{le=\"0.005\"} 0
ephemera_exchange_duration_seconds_bucket{le=\"0.01\"} 0
ephemera_exchange_duration_seconds_bucket{le=\"0.025\"} 0
ephemera_exchange_duration_seconds_bucket{le=\"0.05\"} 0
ephemera_exchange_duration_seconds_bucket{le=\"0.1\"} 1
ephemera_exchange_duration_seconds_bucket{le=\"0.25\"} 2
ephemera_exchange_duration_seconds_bucket{le=\"0.5\"} 2
ephemera_exchange_duration_seconds_bucket{le=\"1\"} 2
ephemera_exchange_duration_seconds_bucket{le=\"2.5\"} 2
ephemera_exchange_duration_seconds_bucket{le=\"+Inf\"} 3
ephemera_exchange_duration_seconds_sum 3.3125
ephemera_exchange_duration_seconds_count 3
# HELP ephemera_revocations_total Lease revocations by outcome.
# TYPE ephemera_revocations_total counter
ephemera_revocations_total{outcome=\"pending\"} 1
ephemera_revocations_total{outcome=\"revoked\"} 2
# HELP ephemera_leases_live Leases currently active.
# TYPE ephemera_leases_live gauge
ephemera_leases_live 4
# HELP ephemera_leases_live_by_backend Active leases holding a credential of each backend.
# TYPE ephemera_leases_live_by_backend gauge
ephemera_leases_live_by_backend{backend=\"aws\"} 3
ephemera_leases_live_by_backend{backend=\"jwt\"} 1
# HELP ephemera_leases_ended_total Leases ended, by reason (job, webhook, admin, expired, policy-changed, ...).
# TYPE ephemera_leases_ended_total counter
ephemera_leases_ended_total{reason=\"expired\"} 1
ephemera_leases_ended_total{reason=\"job\"} 2
# HELP ephemera_policy_reloads_total Policy reloads by outcome (failed: the last good set stays in use).
# TYPE ephemera_policy_reloads_total counter
ephemera_policy_reloads_total{outcome=\"ok\"} 0
ephemera_policy_reloads_total{outcome=\"failed\"} 1
# HELP ephemera_policies_loaded Policies in the set in use.
# TYPE ephemera_policies_loaded gauge
ephemera_policies_loaded 2
# HELP ephemera_policy_generation Successful policy loads since start.
# TYPE ephemera_policy_generation gauge
ephemera_policy_generation 5
# HELP ephemera_policy_reload_failing 1 while the last reload failed and an older set is in use.
# TYPE ephemera_policy_reload_failing gauge
ephemera_policy_reload_failing 1
# HELP ephemera_audit_write_failures_total Audit events that could not be written (exchanges failed closed).
# TYPE ephemera_audit_write_failures_total counter
ephemera_audit_write_failures_total 7
# HELP ephemera_revocations_pending Leases whose revocation a backend has not confirmed yet.
# TYPE ephemera_revocations_pending gauge
ephemera_revocations_pending 1
# HELP ephemera_leases_irrevocable Leases whose revocation failed every retry; still retried, never dropped.
# TYPE ephemera_leases_irrevocable gauge
ephemera_leases_irrevocable 0
# HELP ephemera_jwks_fetches_total Issuer JWKS fetches by result.
# TYPE ephemera_jwks_fetches_total counter
ephemera_jwks_fetches_total{issuer=\"ci\",result=\"attempted\"} 10
ephemera_jwks_fetches_total{issuer=\"ci\",result=\"failed\"} 1
";
        assert_eq!(m.render(&gauges), expected);
    }
}
