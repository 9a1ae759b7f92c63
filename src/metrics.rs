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
    /// Renewals of leases (issue 15), by policy and outcome.
    renewals: DashMap<(String, &'static str), AtomicU64>,
    /// Token exchanges at `POST /oauth/token` (issue 19), by policy and outcome.
    token_exchanges: DashMap<(String, &'static str), AtomicU64>,
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
    /// (github-app backend, GitHub's `x-ratelimit-remaining` for the App as last seen).
    pub github_rate_limit: Vec<(String, u64)>,
    /// Requests refused by each abuse limit (`crate::limits`), by limit.
    pub rate_limited: Vec<(&'static str, u64)>,
    /// Requests refused because `max_issuing` requests were already issuing.
    pub overloaded: u64,
    /// Keys the limits' tables track now.
    pub limits_tracked: usize,
    /// The file store's journal compactions (`None` on PostgreSQL).
    pub compactions: Option<CompactionStats>,
}

/// What the file store's journal compactions did since the start (`LeaseStore::compactions`,
/// for `/metrics` and the bench).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CompactionStats {
    pub compactions: u64,
    pub running: bool,
    /// CPU time of the compactions' own threads, all of them.
    pub cpu_seconds: f64,
    /// The longest time appends waited for one (its final copy and rename).
    pub pause_max_seconds: f64,
    /// The last one's records and snapshot size.
    pub last_records: u64,
    pub last_snapshot_bytes: u64,
    /// Bytes appended to the journal since the start.
    pub appended_bytes: u64,
    /// The journal's fsyncs of appended batches since the start (group commit: one per batch).
    pub fsyncs: u64,
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

    pub fn renewal(&self, policy: &str, outcome: &'static str) {
        self.renewals.entry((policy.to_string(), outcome)).or_default().fetch_add(1, Ordering::Relaxed);
    }

    pub fn token_exchange(&self, policy: &str, outcome: &'static str) {
        self.token_exchanges.entry((policy.to_string(), outcome)).or_default().fetch_add(1, Ordering::Relaxed);
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

    /// The Prometheus text exposition of every family, in a fixed order.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        self.render_exchanges(&mut out);
        self.render_latency(&mut out);
        self.render_renewals(&mut out);
        self.render_token_exchanges(&mut out);
        self.render_revocations(&mut out);
        render_live_leases(&mut out, gauges);
        self.render_ended(&mut out);
        self.render_reloads(&mut out);
        render_policy_gauges(&mut out, gauges);
        render_health(&mut out, gauges);
        render_jwks(&mut out, gauges);
        render_github(&mut out, gauges);
        render_limits(&mut out, gauges);
        render_compactions(&mut out, gauges);
        out
    }

    /// `ephemera_exchanges_total`, by policy and outcome.
    fn render_exchanges(&self, out: &mut String) {
        header(out, "ephemera_exchanges_total", "Exchanges by policy and outcome.", "counter");
        for ((policy, outcome), n) in sorted(&self.exchanges) {
            let _ = writeln!(out, "ephemera_exchanges_total{{policy=\"{policy}\",outcome=\"{outcome}\"}} {n}");
        }
    }

    /// `ephemera_exchange_duration_seconds`: the buckets, `+Inf`, sum and count.
    fn render_latency(&self, out: &mut String) {
        let name = "ephemera_exchange_duration_seconds";
        header(out, name, "Exchange latency inside the broker.", "histogram");
        for (bound, n) in BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", n.load(Ordering::Relaxed));
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }

    /// `ephemera_renewals_total`, by policy and outcome.
    fn render_renewals(&self, out: &mut String) {
        header(out, "ephemera_renewals_total", "Lease renewals by policy and outcome.", "counter");
        for ((policy, outcome), n) in sorted(&self.renewals) {
            let _ = writeln!(out, "ephemera_renewals_total{{policy=\"{policy}\",outcome=\"{outcome}\"}} {n}");
        }
    }

    /// `ephemera_token_exchanges_total`, by policy and outcome.
    fn render_token_exchanges(&self, out: &mut String) {
        let name = "ephemera_token_exchanges_total";
        header(out, name, "Token exchanges at /oauth/token by policy and outcome.", "counter");
        for ((policy, outcome), n) in sorted(&self.token_exchanges) {
            let _ = writeln!(out, "{name}{{policy=\"{policy}\",outcome=\"{outcome}\"}} {n}");
        }
    }

    /// `ephemera_revocations_total`, by outcome.
    fn render_revocations(&self, out: &mut String) {
        header(out, "ephemera_revocations_total", "Lease revocations by outcome.", "counter");
        for (outcome, n) in sorted(&self.revocations) {
            let _ = writeln!(out, "ephemera_revocations_total{{outcome=\"{outcome}\"}} {n}");
        }
    }

    /// `ephemera_leases_ended_total`, by reason.
    fn render_ended(&self, out: &mut String) {
        header(
            out,
            "ephemera_leases_ended_total",
            "Leases ended, by reason (job, webhook, admin, expired, policy-changed, ...).",
            "counter",
        );
        for (reason, n) in sorted(&self.ended) {
            let _ = writeln!(out, "ephemera_leases_ended_total{{reason=\"{reason}\"}} {n}");
        }
    }

    /// `ephemera_policy_reloads_total`: both outcomes, always (0 until one happens).
    fn render_reloads(&self, out: &mut String) {
        header(
            out,
            "ephemera_policy_reloads_total",
            "Policy reloads by outcome (failed: the last good set stays in use).",
            "counter",
        );
        for outcome in ["ok", "failed"] {
            let n = self.reloads.get(outcome).map_or(0, |v| v.load(Ordering::Relaxed));
            let _ = writeln!(out, "ephemera_policy_reloads_total{{outcome=\"{outcome}\"}} {n}");
        }
    }
}

/// `ephemera_leases_live` and `ephemera_leases_live_by_backend`.
fn render_live_leases(out: &mut String, gauges: &Gauges) {
    single(out, "ephemera_leases_live", "Leases currently active.", "gauge", gauges.live_leases);
    header(out, "ephemera_leases_live_by_backend", "Active leases holding a credential of each backend.", "gauge");
    for (backend, n) in &gauges.live_by_backend {
        let _ = writeln!(out, "ephemera_leases_live_by_backend{{backend=\"{backend}\"}} {n}");
    }
}

/// The policy set in use: its size, its generation, and whether the last reload failed.
fn render_policy_gauges(out: &mut String, gauges: &Gauges) {
    single(out, "ephemera_policies_loaded", "Policies in the set in use.", "gauge", gauges.policies_loaded);
    single(
        out,
        "ephemera_policy_generation",
        "Successful policy loads since start.",
        "gauge",
        gauges.policy_generation,
    );
    single(
        out,
        "ephemera_policy_reload_failing",
        "1 while the last reload failed and an older set is in use.",
        "gauge",
        u8::from(gauges.policies_reload_failing),
    );
}

/// What an operator is paged on: audit write failures, pending and irrevocable revocations.
fn render_health(out: &mut String, gauges: &Gauges) {
    single(
        out,
        "ephemera_audit_write_failures_total",
        "Audit events that could not be written (exchanges failed closed).",
        "counter",
        gauges.audit_failures,
    );
    single(
        out,
        "ephemera_revocations_pending",
        "Leases whose revocation a backend has not confirmed yet.",
        "gauge",
        gauges.pending_revocations,
    );
    single(
        out,
        "ephemera_leases_irrevocable",
        "Leases whose revocation failed every retry; still retried, never dropped.",
        "gauge",
        gauges.irrevocable,
    );
}

/// `ephemera_jwks_fetches_total`, by issuer: attempted and failed.
fn render_jwks(out: &mut String, gauges: &Gauges) {
    header(out, "ephemera_jwks_fetches_total", "Issuer JWKS fetches by result.", "counter");
    for (issuer, attempted, failed) in &gauges.jwks {
        let _ = writeln!(out, "ephemera_jwks_fetches_total{{issuer=\"{issuer}\",result=\"attempted\"}} {attempted}");
        let _ = writeln!(out, "ephemera_jwks_fetches_total{{issuer=\"{issuer}\",result=\"failed\"}} {failed}");
    }
}

/// `ephemera_github_rate_limit_remaining`, by backend: what GitHub last said the App may still
/// call this hour. At 0 the backend refuses at once until GitHub's reset time.
fn render_github(out: &mut String, gauges: &Gauges) {
    let name = "ephemera_github_rate_limit_remaining";
    header(out, name, "GitHub API calls the App may still make in the current window, as GitHub last said.", "gauge");
    for (backend, remaining) in &gauges.github_rate_limit {
        let _ = writeln!(out, "{name}{{backend=\"{backend}\"}} {remaining}");
    }
}

/// `ephemera_rate_limited_total` by limit, `ephemera_overloaded_total` and
/// `ephemera_limit_keys_tracked`.
fn render_limits(out: &mut String, gauges: &Gauges) {
    let name = "ephemera_rate_limited_total";
    header(out, name, "Requests refused by an abuse limit (429), by limit.", "counter");
    for (limit, n) in &gauges.rate_limited {
        let _ = writeln!(out, "{name}{{limit=\"{limit}\"}} {n}");
    }
    single(
        out,
        "ephemera_overloaded_total",
        "Requests refused (503) because max_issuing requests were already issuing credentials.",
        "counter",
        gauges.overloaded,
    );
    single(
        out,
        "ephemera_limit_keys_tracked",
        "Addresses, issuers and repositories the abuse limits track now.",
        "gauge",
        gauges.limits_tracked,
    );
}

/// The file store's journal compactions (issue 23): how often, what they cost, and the one
/// pause each makes appends wait.
fn render_compactions(out: &mut String, gauges: &Gauges) {
    let Some(c) = &gauges.compactions else { return };
    let families: [(&str, &str, &str, String); 8] = [
        ("ephemera_journal_compactions_total", "Journal compactions finished.", "counter", c.compactions.to_string()),
        ("ephemera_journal_compacting", "1 while a journal compaction runs.", "gauge", u8::from(c.running).to_string()),
        (
            "ephemera_journal_compaction_cpu_seconds_total",
            "CPU time of the compactions' own threads.",
            "counter",
            c.cpu_seconds.to_string(),
        ),
        (
            "ephemera_journal_compaction_pause_seconds_max",
            "The longest time appends waited for a compaction (its final copy and rename).",
            "gauge",
            c.pause_max_seconds.to_string(),
        ),
        (
            "ephemera_journal_compaction_records",
            "Records the last compaction's snapshot held.",
            "gauge",
            c.last_records.to_string(),
        ),
        (
            "ephemera_journal_snapshot_bytes",
            "Bytes of the last compaction's snapshot (the next waits for compact_ratio of this).",
            "gauge",
            c.last_snapshot_bytes.to_string(),
        ),
        (
            "ephemera_journal_appended_bytes_total",
            "Bytes appended to the journal since the start.",
            "counter",
            c.appended_bytes.to_string(),
        ),
        (
            "ephemera_journal_fsyncs_total",
            "Journal fsyncs of appended batches (group commit: one per batch of appends).",
            "counter",
            c.fsyncs.to_string(),
        ),
    ];
    for (name, help, kind, value) in families {
        single(out, name, help, kind, value);
    }
}

/// A family's `# HELP` and `# TYPE` lines.
fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A family of one unlabelled series.
fn single(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

/// A counter map's rows, sorted by key (a scrape is stable, whatever order the map holds).
fn sorted<K: Clone + Ord + std::hash::Hash>(map: &DashMap<K, AtomicU64>) -> Vec<(K, u64)> {
    let mut rows: Vec<_> = map.iter().map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed))).collect();
    rows.sort();
    rows
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
        m.renewal("deploy", "renewed");
        m.renewal("deploy", "renewed");
        m.renewal("unknown", "invalid_token");
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
            github_rate_limit: vec![("gh".into(), 4999)],
            rate_limited: vec![("address", 3), ("cool-off", 0)],
            overloaded: 2,
            limits_tracked: 7,
            compactions: Some(CompactionStats {
                compactions: 3,
                running: true,
                cpu_seconds: 1.25,
                pause_max_seconds: 0.004,
                last_records: 1_000_002,
                last_snapshot_bytes: 330_000_000,
                appended_bytes: 512,
                fsyncs: 9,
            }),
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
# HELP ephemera_renewals_total Lease renewals by policy and outcome.
# TYPE ephemera_renewals_total counter
ephemera_renewals_total{policy=\"deploy\",outcome=\"renewed\"} 2
ephemera_renewals_total{policy=\"unknown\",outcome=\"invalid_token\"} 1
# HELP ephemera_token_exchanges_total Token exchanges at /oauth/token by policy and outcome.
# TYPE ephemera_token_exchanges_total counter
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
# HELP ephemera_github_rate_limit_remaining GitHub API calls the App may still make in the current window, as GitHub last said.
# TYPE ephemera_github_rate_limit_remaining gauge
ephemera_github_rate_limit_remaining{backend=\"gh\"} 4999
# HELP ephemera_rate_limited_total Requests refused by an abuse limit (429), by limit.
# TYPE ephemera_rate_limited_total counter
ephemera_rate_limited_total{limit=\"address\"} 3
ephemera_rate_limited_total{limit=\"cool-off\"} 0
# HELP ephemera_overloaded_total Requests refused (503) because max_issuing requests were already issuing credentials.
# TYPE ephemera_overloaded_total counter
ephemera_overloaded_total 2
# HELP ephemera_limit_keys_tracked Addresses, issuers and repositories the abuse limits track now.
# TYPE ephemera_limit_keys_tracked gauge
ephemera_limit_keys_tracked 7
# HELP ephemera_journal_compactions_total Journal compactions finished.
# TYPE ephemera_journal_compactions_total counter
ephemera_journal_compactions_total 3
# HELP ephemera_journal_compacting 1 while a journal compaction runs.
# TYPE ephemera_journal_compacting gauge
ephemera_journal_compacting 1
# HELP ephemera_journal_compaction_cpu_seconds_total CPU time of the compactions' own threads.
# TYPE ephemera_journal_compaction_cpu_seconds_total counter
ephemera_journal_compaction_cpu_seconds_total 1.25
# HELP ephemera_journal_compaction_pause_seconds_max The longest time appends waited for a compaction (its final copy and rename).
# TYPE ephemera_journal_compaction_pause_seconds_max gauge
ephemera_journal_compaction_pause_seconds_max 0.004
# HELP ephemera_journal_compaction_records Records the last compaction's snapshot held.
# TYPE ephemera_journal_compaction_records gauge
ephemera_journal_compaction_records 1000002
# HELP ephemera_journal_snapshot_bytes Bytes of the last compaction's snapshot (the next waits for compact_ratio of this).
# TYPE ephemera_journal_snapshot_bytes gauge
ephemera_journal_snapshot_bytes 330000000
# HELP ephemera_journal_appended_bytes_total Bytes appended to the journal since the start.
# TYPE ephemera_journal_appended_bytes_total counter
ephemera_journal_appended_bytes_total 512
# HELP ephemera_journal_fsyncs_total Journal fsyncs of appended batches (group commit: one per batch of appends).
# TYPE ephemera_journal_fsyncs_total counter
ephemera_journal_fsyncs_total 9
";
        assert_eq!(m.render(&gauges), expected);
    }
}
