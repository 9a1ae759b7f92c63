//! The live policy set: loaded and linted at start, reloaded on SIGHUP or when the policies
//! directory changes, swapped atomically; and what a change does to the leases already issued.
//!
//! A reload parses and lints every file first; any error keeps the last good set (every error is
//! logged and shown in `/readyz` and `/metrics`), so a typo cannot take access away from every
//! pipeline. An exchange takes the set once, at its start, and finishes on it.
//!
//! After a successful swap every live lease is re-evaluated against the new set with the claims
//! it was granted on: a lease whose policy is gone, or whose claims the new policy denies, ends
//! with reason `policy-changed`. `diff` answers the same question for a candidate set without
//! changing anything (admin `POST /v1/policies/diff`, `ephemera policy diff`).

use super::App;
use crate::clock::{UnixSeconds, rfc3339};
use crate::ledger::LiveLease;
use crate::policy::lint::Severity;
use crate::policy::{LoadContext, PolicyError, PolicySet, Source};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

pub const REASON_POLICY_CHANGED: &str = "policy-changed";

/// Where the policies come from, kept for reloads.
#[derive(Debug, Clone)]
pub struct PolicySource {
    /// `None` in dev mode without a policies directory (built-ins only).
    pub dir: Option<PathBuf>,
    /// Built-in policies (dev mode's `dev`): (name, YAML).
    pub builtin: Vec<(String, String)>,
    pub ctx: LoadContext,
}

impl PolicySource {
    /// Reads, parses and lints every policy: the one loader the server uses at start and on
    /// every reload (and `policy check` runs the same parse and lint).
    pub fn load(&self) -> Result<PolicySet, Vec<String>> {
        let builtin: Vec<(&str, &str)> = self.builtin.iter().map(|(n, y)| (n.as_str(), y.as_str())).collect();
        let set = PolicySet::load(self.dir.as_deref(), &builtin, &self.ctx).map_err(render_errors)?;
        lint_gate(set, &self.ctx)
    }

    /// Parses and lints a candidate set sent over the wire (diff); the built-ins are added.
    pub fn load_candidate(&self, sources: Vec<Source>) -> Result<PolicySet, Vec<String>> {
        let builtin: Vec<(&str, &str)> = self.builtin.iter().map(|(n, y)| (n.as_str(), y.as_str())).collect();
        let set = PolicySet::load_sources(sources, &builtin, &self.ctx).map_err(render_errors)?;
        lint_gate(set, &self.ctx)
    }

    /// A digest of the directory's policy files (names and contents): the file watch reloads
    /// when it changes. Content, not mtimes: a Kubernetes ConfigMap update swaps a symlink and
    /// keeps old mtimes, and an editor's save-and-rename can land within one mtime tick.
    pub fn fingerprint(&self) -> Option<[u8; 32]> {
        let dir = self.dir.as_deref()?;
        Some(dir_fingerprint(dir))
    }
}

fn render_errors(errors: Vec<PolicyError>) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

/// The lint `policy check` runs: an error finding refuses the set (it is plainly exploitable),
/// a warning is logged with its fix.
fn lint_gate(set: PolicySet, ctx: &LoadContext) -> Result<PolicySet, Vec<String>> {
    let findings = crate::policy::lint::lint(&set, ctx);
    let mut errors = Vec::new();
    for f in findings {
        let text = format!("{}: {}[{}]: {}: {}", f.file.display(), f.severity.as_str(), f.rule, f.field, f.message);
        match f.severity {
            Severity::Error => errors.push(text),
            Severity::Warning => tracing::warn!(finding = %text, fix = %f.fix, "policy lint warning"),
        }
    }
    if errors.is_empty() { Ok(set) } else { Err(errors) }
}

fn dir_fingerprint(dir: &Path) -> [u8; 32] {
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    crate::policy::read_policy_files(dir, &mut sources, &mut errors);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for s in &sources {
        for part in [s.name.as_bytes(), s.text.as_bytes()] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
    }
    for e in &errors {
        ctx.update(e.to_string().as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The outcome of the last reload, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    /// Successful loads since start (the start-up load is generation 1).
    pub generation: u64,
    /// When the set in use was loaded.
    pub loaded_at: String,
    /// `ok` or `failed` (the set in use is then the previous one).
    pub last_outcome: &'static str,
    pub last_attempt_at: String,
    /// The errors of the last failed reload (empty after a good one).
    pub errors: Vec<String>,
}

/// The set in use, swapped whole. Readers clone the `Arc` and keep it for one exchange.
pub struct LivePolicies {
    current: RwLock<Arc<PolicySet>>,
    pub source: PolicySource,
    status: Mutex<ReloadStatus>,
    /// One reload at a time (SIGHUP and the watch can race).
    reloading: tokio::sync::Mutex<Option<[u8; 32]>>,
}

impl LivePolicies {
    pub fn new(set: PolicySet, source: PolicySource, now: UnixSeconds) -> LivePolicies {
        let fingerprint = source.fingerprint();
        let status = ReloadStatus {
            generation: 1,
            loaded_at: rfc3339(now),
            last_outcome: "ok",
            last_attempt_at: rfc3339(now),
            errors: Vec::new(),
        };
        LivePolicies {
            current: RwLock::new(Arc::new(set)),
            source,
            status: Mutex::new(status),
            reloading: tokio::sync::Mutex::new(fingerprint),
        }
    }

    /// The set in use now.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn swap(&self, set: PolicySet) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }

    fn record(&self, now: UnixSeconds, result: Result<(), Vec<String>>) {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.last_attempt_at = rfc3339(now);
        match result {
            Ok(()) => {
                status.generation += 1;
                status.loaded_at = rfc3339(now);
                status.last_outcome = "ok";
                status.errors.clear();
            }
            Err(errors) => {
                status.last_outcome = "failed";
                status.errors = errors;
            }
        }
    }
}

/// A lease a policy change ends, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Ending {
    pub lease_id: String,
    pub job: String,
    pub policy: String,
    /// `policy removed`, or the denial (which claim, which rule).
    pub reason: String,
    /// The claim that decided, when a rule did.
    pub claim: Option<String>,
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// `ok`, `failed` or `unchanged` (the watch saw no change).
    pub outcome: &'static str,
    pub policies: usize,
    pub errors: Vec<String>,
    /// Leases ended because the new set no longer allows them.
    pub ended: Vec<Ending>,
    /// Live leases re-decided: only those of policies the reload changed or removed.
    pub reevaluated: usize,
}

impl ReloadReport {
    fn nothing(outcome: &'static str, policies: usize, errors: Vec<String>) -> ReloadReport {
        ReloadReport { outcome, policies, errors, ended: Vec::new(), reevaluated: 0 }
    }
}

/// Would `set` still allow `lease`? `None` if so, else why not. The decision is the exchange's
/// own ([`PolicySet::decide_claims`]: issuer, deny and match rules, grant templates) on the
/// issuer and claims the lease was granted on.
fn still_allowed(set: &PolicySet, lease: &LiveLease) -> Option<Ending> {
    let ending = |reason: String, claim: Option<String>| Ending {
        lease_id: lease.id.to_string(),
        job: lease.job.to_string(),
        policy: lease.policy.to_string(),
        reason,
        claim,
    };
    if set.get(&lease.policy).is_none() {
        return Some(ending("policy removed".into(), None));
    }
    // The ttl is not re-decided (the policy default always fits its max); rules and templates are.
    match set.decide_claims(&lease.policy, &lease.issuer, &lease.claims.to_claims(), None) {
        Ok(_) => None,
        Err(denial) => Some(ending(denial.log_detail(), Some(denial.claim))),
    }
}

impl App {
    /// Reloads the policies: parse and lint everything, swap if clean, then end the live leases
    /// the new set no longer allows. `force`: reload even if the directory looks unchanged
    /// (SIGHUP, admin); the watch passes `false`.
    pub async fn reload_policies(&self, force: bool) -> ReloadReport {
        let live = &self.policies;
        let mut last_seen = live.reloading.lock().await;
        let fingerprint = live.source.fingerprint();
        if !force && fingerprint == *last_seen {
            return ReloadReport::nothing("unchanged", live.current().len(), Vec::new());
        }
        *last_seen = fingerprint;
        let now = self.now();
        // Parsing is CPU work on files the operator controls, bounded by the loader's limits;
        // it runs off the async workers so exchanges in flight are not held up.
        let source = live.source.clone();
        let loaded = tokio::task::spawn_blocking(move || source.load())
            .await
            .unwrap_or_else(|e| Err(vec![format!("the policy loader failed: {e}")]));
        let report = match loaded {
            Err(errors) => self.refuse(errors, now),
            Ok(set) => self.swap_in(set, now).await,
        };
        self.audit_reload(&report).await;
        report
    }

    /// A reload that failed to parse or lint: the last good set stays.
    fn refuse(&self, errors: Vec<String>, now: UnixSeconds) -> ReloadReport {
        for e in &errors {
            tracing::error!(error = %e, "policy reload refused; keeping the last good set");
        }
        self.policies.record(now, Err(errors.clone()));
        self.metrics.reload("failed");
        ReloadReport::nothing("failed", self.policies.current().len(), errors)
    }

    /// Puts a clean set in use, then ends the live leases it no longer allows.
    async fn swap_in(&self, set: PolicySet, now: UnixSeconds) -> ReloadReport {
        let live = &self.policies;
        let count = set.len();
        let old = live.current();
        live.swap(set);
        live.record(now, Ok(()));
        self.metrics.reload("ok");
        tracing::info!(policies = count, "policies reloaded");
        let new = live.current();
        // A policy whose text is unchanged decides as before: its leases need no second look.
        let changed = new.changed_since(&old);
        let (ended, reevaluated) = self.end_disallowed(&new, &changed).await;
        ReloadReport { outcome: "ok", policies: count, errors: Vec::new(), ended, reevaluated }
    }

    /// Ends every live lease of the `changed` policies that `set` no longer allows (reason
    /// `policy-changed`); also says how many leases it re-decided.
    async fn end_disallowed(&self, set: &PolicySet, changed: &BTreeSet<String>) -> (Vec<Ending>, usize) {
        let (endings, reevaluated) = self.endings(set, changed).await;
        if !endings.is_empty() {
            let ids = endings.iter().map(|e| e.lease_id.clone()).collect();
            for e in &endings {
                tracing::warn!(lease_id = %e.lease_id, job = %e.job, policy = %e.policy, reason = %e.reason, "lease no longer allowed by the policies; revoking");
            }
            self.end_leases(ids, REASON_POLICY_CHANGED).await;
        }
        (endings, reevaluated)
    }

    /// The live leases of the `changed` policies that `set` would end (the dry run of a
    /// reload), and how many were re-decided. A store that cannot list them ends none.
    pub async fn endings(&self, set: &PolicySet, changed: &BTreeSet<String>) -> (Vec<Ending>, usize) {
        if changed.is_empty() {
            return (Vec::new(), 0);
        }
        let live = match self.store.live_leases(Some(changed), self.now()).await {
            Ok(live) => live,
            Err(e) => {
                tracing::error!(error = %e, "live leases not re-evaluated against the new policies");
                return (Vec::new(), 0);
            }
        };
        let mut out: Vec<Ending> = live.iter().filter_map(|l| still_allowed(set, l)).collect();
        out.sort_by(|a, b| a.lease_id.cmp(&b.lease_id));
        (out, live.len())
    }

    /// Admin `POST /v1/policies/diff`: which live leases would the candidate set end? Nothing
    /// changes. `Err` lists why the candidate would be refused by a reload.
    pub async fn diff_policies(&self, sources: Vec<Source>) -> Result<Vec<Ending>, Vec<String>> {
        let source = self.policies.source.clone();
        // Parsing a candidate set is CPU work: off the async workers.
        let candidate = tokio::task::spawn_blocking(move || source.load_candidate(sources))
            .await
            .unwrap_or_else(|e| Err(vec![format!("the policy loader failed: {e}")]))?;
        let changed = candidate.changed_since(&self.policies.current());
        Ok(self.endings(&candidate, &changed).await.0)
    }

    async fn audit_reload(&self, report: &ReloadReport) {
        let event = json!({
            "time": rfc3339(self.now()),
            "event": "reload",
            "outcome": report.outcome,
            "policies": report.policies,
            "errors": report.errors,
            "ended_leases": report.ended.iter().map(|e| &e.lease_id).collect::<Vec<_>>(),
        });
        if let Err(e) = self.audit.write(&event).await {
            tracing::error!(error = %e, "audit event for a policy reload not written");
        }
    }
}
