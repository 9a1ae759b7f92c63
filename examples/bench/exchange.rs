//! Rows 2 and 5, and the CPU attribution rows, against the real release binary.
//!
//! Every token is signed before any clock starts, each with its own `jti` and its own job, so
//! replay protection is exercised on every exchange but never refuses one.

use crate::broker::{self, ADMIN_TOKEN, AUDIENCE, Broker, ISSUER_URL, POLICY, WEBHOOK_SECRET};
use crate::crypto::{Floor, Sampler};
use crate::http::{Conn, metric, request};
use crate::load::{closed_loop, closed_loop_over, open_loop};
use crate::procfs::Window;
use crate::table::{Row, median, p50_p99_ms};
use crate::tokens::{self, Issuer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The saturation run is split in rounds; rows report the median round.
pub const SAT_ROUNDS: usize = 3;

/// One saturation round.
pub struct Round {
    pub rate: f64,
    /// Broker CPU per exchange (summed over the brokers served), µs.
    pub cpu_us: f64,
    /// CPU per exchange of the other processes watched (the database's), µs.
    pub extra_us: f64,
    pub others: f64,
    pub steal: f64,
    pub ok: usize,
}

/// The median of `f` over the rounds, and its spread: (median, lowest, highest).
pub fn over_rounds(rounds: &[Round], f: fn(&Round) -> f64) -> (f64, f64, f64) {
    let v: Vec<f64> = rounds.iter().map(f).collect();
    (median(&v), v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max))
}

/// One saturation round of exchanges: [`saturation_round_of`] expecting 201.
pub async fn saturation_round(
    what: &str,
    addrs: &[SocketAddr],
    brokers: &[String],
    extra: &[String],
    requests: Arc<Vec<Vec<u8>>>,
    conns: usize,
) -> Round {
    saturation_round_of(what, addrs, brokers, extra, requests, conns, 201).await
}

/// One saturation round: a closed loop over `addrs` (every reply `expect`), and the CPU time per
/// request of the `brokers` (summed) and of the `extra` processes (summed), with what the rest
/// of the machine used meanwhile. Prints a progress line headed `what`.
pub async fn saturation_round_of(
    what: &str,
    addrs: &[SocketAddr],
    brokers: &[String],
    extra: &[String],
    requests: Arc<Vec<Vec<u8>>>,
    conns: usize,
    expect: u16,
) -> Round {
    let watched: Vec<&str> = brokers.iter().chain(extra).map(String::as_str).chain(["self"]).collect();
    let window = Window::start(&watched);
    let run = closed_loop_over(addrs, requests, conns, expect).await;
    let measured = window.end();
    run.check(what);
    let per_exchange = |cpu: &[f64]| cpu.iter().sum::<f64>() / run.ok as f64 * 1e6;
    let (brokers_cpu, extra_cpu) = measured.cpu.split_at(brokers.len());
    let round = Round {
        rate: run.rate(),
        cpu_us: per_exchange(brokers_cpu),
        extra_us: per_exchange(&extra_cpu[..extra.len()]),
        others: measured.others_cores,
        steal: measured.steal_cores,
        ok: run.ok,
    };
    let extra_text = if extra.is_empty() { String::new() } else { format!(" + {:.0} µs database", round.extra_us) };
    eprintln!(
        "  {what}: {:.0}/s, {:.0} µs broker CPU each{extra_text} (others: {:.2} cores, steal {:.2})",
        round.rate, round.cpu_us, round.others, round.steal
    );
    round
}

/// How many requests each phase sends.
pub struct Plan {
    pub warmup: usize,
    pub saturation: usize,
    /// Connections of the closed loop: enough to keep both broker cores busy.
    pub saturation_conns: usize,
    pub open: usize,
    pub open_conns: usize,
    pub sequential: usize,
    pub revocations: usize,
    pub in_process: usize,
    /// CPU seconds of each crypto-floor sample taken between phases.
    pub floor_sample: f64,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                warmup: 300,
                saturation: 3_000,
                saturation_conns: 32,
                open: 2_000,
                open_conns: 32,
                sequential: 500,
                revocations: 100,
                in_process: 500,
                floor_sample: 0.4,
            }
        } else {
            Plan {
                warmup: 1_000,
                saturation: 30_000,
                saturation_conns: 32,
                open: 20_000,
                open_conns: 32,
                sequential: 3_000,
                revocations: 500,
                in_process: 3_000,
                floor_sample: 1.0,
            }
        }
    }
}

pub struct Options {
    pub binary: PathBuf,
    pub perf: Option<PathBuf>,
}

/// Token index ranges, so every token of the run has its own job.
pub struct Tokens {
    issuer: Issuer,
    pub next: u64,
    now: i64,
}

impl Tokens {
    /// Tokens of the bench's issuer for the broker's audience, issued now.
    pub fn new() -> Tokens {
        let now = ephemera::clock::Clock::now(&ephemera::clock::SystemClock);
        Tokens { issuer: Issuer::new(ISSUER_URL, AUDIENCE), next: 0, now }
    }

    /// The next `n` tokens, and the index of the first (its job: [`tokens::job_ids`]).
    pub fn take(&mut self, n: usize) -> (u64, Vec<String>) {
        let first = self.next;
        self.next += n as u64;
        (first, self.issuer.tokens(first, n, self.now))
    }
}

fn exchange_request(token: &str, policy: &str) -> Vec<u8> {
    let auth = format!("Bearer {token}");
    let body = format!("{{\"policy\":\"{policy}\"}}");
    request("POST", "/v1/exchange", &[("Authorization", &auth)], "application/json", body.as_bytes())
}

/// `POST /v1/exchange` for each token, as bytes.
pub fn requests(tokens: &[String]) -> Arc<Vec<Vec<u8>>> {
    requests_for(tokens, POLICY)
}

/// [`requests`] under another policy.
pub fn requests_for(tokens: &[String], policy: &str) -> Arc<Vec<Vec<u8>>> {
    Arc::new(tokens.iter().map(|t| exchange_request(t, policy)).collect())
}

/// What rows 2, 5 and A measured; turned into rows once the floor's last sample is in.
pub struct Figures {
    conns: usize,
    sat: Vec<Round>,
    /// Medians over the rounds.
    rate: f64,
    sat_cpu_us: f64,
    health_sat_cpu_us: f64,
    half_rate: f64,
    health_cpu_us: f64,
    /// Cores' worth of CPU other processes (not the broker, not the bench) used meanwhile.
    half_others: f64,
    half_cpu_us: f64,
    latency: (f64, f64),
    health: (f64, f64),
    seq_cpu_us: f64,
    seq_n: usize,
    revoke_ms: (f64, f64),
    hook_ms: (f64, f64),
    introspect_ms: (f64, f64),
    revocations: usize,
    attribution: Attribution,
    perf: Vec<Row>,
    hand_offs: HandOffs,
}

const FSYNCS: &str = "ephemera_journal_fsyncs_total";

/// Over the saturation rounds: the journal's fsyncs (`/metrics`) and the broker's context
/// switches (`/proc`), the hand-offs an exchange's CPU pays for beyond its own work.
struct HandOffs {
    fsyncs: f64,
    /// By thread name.
    switches: Vec<(String, u64)>,
}

/// Runs rows 2 and 5 against the binary, then the in-process attribution rows. Between phases,
/// with the broker idle, the crypto floor takes another sample.
pub async fn run(options: &Options, plan: &Plan, floor: &mut Sampler, dir: &Path) -> Figures {
    ephemera::install_crypto();
    let mut tokens = Tokens::new();
    let signing = Instant::now();
    let warmup = requests(&tokens.take(plan.warmup).1);
    let saturation: Vec<_> = (0..SAT_ROUNDS).map(|_| requests(&tokens.take(plan.saturation / SAT_ROUNDS).1)).collect();
    let open = requests(&tokens.take(plan.open).1);
    let sequential = requests(&tokens.take(plan.sequential).1);
    let revoke = tokens.take(plan.revocations);
    let hook = tokens.take(plan.revocations);
    let profile = options.perf.as_ref().map(|_| requests(&tokens.take(plan.saturation).1));
    eprintln!("  signed {} CI tokens in {:.1} s", tokens.next, signing.elapsed().as_secs_f64());

    let broker = Broker::start(&options.binary, &dir.join("binary")).await;
    let addr = broker.addr;
    closed_loop(addr, warmup, plan.saturation_conns, 201).await.check("warm-up");
    floor.sample(plan.floor_sample);

    // (a) saturation: closed loop, and the broker's CPU time over it, in rounds (the median is
    // reported, with the spread).
    let pid = broker.pid.to_string();
    let mut sat = Vec::new();
    let hand_offs_before = (metric(addr, FSYNCS).await, crate::procfs::context_switches(&pid));
    for requests in saturation {
        let pids = std::slice::from_ref(&pid);
        sat.push(saturation_round("saturation", &[addr], pids, &[], requests, plan.saturation_conns).await);
        floor.sample(plan.floor_sample / 2.0);
    }
    let (rate, _, _) = over_rounds(&sat, |r| r.rate);
    let (sat_cpu_us, _, _) = over_rounds(&sat, |r| r.cpu_us);
    // (Between rounds the floor samples and the broker idles: few switches, no fsyncs.)
    let hand_offs = HandOffs {
        fsyncs: metric(addr, FSYNCS).await - hand_offs_before.0,
        switches: crate::procfs::context_switches(&pid)
            .into_iter()
            .map(|(name, n)| (name.clone(), n.saturating_sub(hand_offs_before.1.get(&name).copied().unwrap_or(0))))
            .filter(|(_, n)| *n > 0)
            .collect(),
    };

    // (a') the same closed loop against /healthz: what serving any request costs at saturation
    // (HTTP, the runtime, the request log line), to tell it apart from the exchange's own work.
    let n = plan.saturation / SAT_ROUNDS;
    let health: Arc<Vec<Vec<u8>>> = Arc::new((0..n).map(|_| request("GET", "/healthz", &[], "", b"")).collect());
    let window = Window::start(&[&pid]);
    let run = closed_loop(addr, health, plan.saturation_conns, 200).await;
    let health_sat_cpu_us = window.end().cpu[0] / run.ok as f64 * 1e6;
    run.check("saturation /healthz");

    // (b) latency at half that rate, open loop; as its baseline, the same schedule against
    // /healthz (the HTTP and scheduling floor), half just before and half just after.
    let health: Arc<Vec<Vec<u8>>> =
        Arc::new((0..plan.open / 4).map(|_| request("GET", "/healthz", &[], "", b"")).collect());
    let health_window = Window::start(&[&pid]);
    let mut base = open_loop(addr, health.clone(), rate / 2.0, plan.open_conns, 200).await;
    let mut health_cpu = health_window.end().cpu[0];
    let window = Window::start(&[&pid, "self"]);
    let mut half = open_loop(addr, open, rate / 2.0, plan.open_conns, 201).await;
    let measured = window.end();
    let half_cpu_us = measured.cpu[0] / half.ok as f64 * 1e6;
    let half_others = measured.others_cores + measured.steal_cores;
    half.check("open loop");
    let health_window = Window::start(&[&pid]);
    base.merge(open_loop(addr, health, rate / 2.0, plan.open_conns, 200).await);
    health_cpu += health_window.end().cpu[0];
    base.check("open loop /healthz");
    // The HTTP floor in CPU terms: what the broker spends on a request that does nothing.
    let health_cpu_us = health_cpu / base.ok as f64 * 1e6;
    let latency = p50_p99_ms(&mut half.latencies);
    let health = p50_p99_ms(&mut base.latencies);
    eprintln!(
        "  at {:.0}/s: p50 {:.2} ms, p99 {:.2} ms (/healthz: {:.2}, {:.2})",
        half.rate(),
        latency.0,
        latency.1,
        health.0,
        health.1
    );
    floor.sample(plan.floor_sample);

    // Sequential, one connection: the same path without concurrency (for the attribution rows).
    let cpu = broker.cpu();
    let seq = closed_loop(addr, sequential, 1, 201).await;
    seq.check("sequential");
    let seq_cpu_us = broker.cpu().since(&cpu) / seq.ok as f64 * 1e6;

    let (revoke_ms, hook_ms, introspect_ms) = revocations(addr, revoke, hook).await;

    let perf = match (&options.perf, profile) {
        (Some(out), Some(requests)) => crate::profile::saturation(&broker, out, requests, plan.saturation_conns).await,
        _ => Vec::new(),
    };
    drop(broker);

    let attribution = attribution_in_child(plan.in_process);
    floor.sample(plan.floor_sample);
    Figures {
        conns: plan.saturation_conns,
        sat,
        rate,
        sat_cpu_us,
        health_sat_cpu_us,
        half_rate: half.rate(),
        health_cpu_us,
        half_others,
        half_cpu_us,
        latency,
        health,
        seq_cpu_us,
        seq_n: seq.ok,
        revoke_ms,
        hook_ms,
        introspect_ms,
        revocations: plan.revocations,
        attribution,
        perf,
        hand_offs,
    }
}

impl Figures {
    pub fn rows(self, floor: &Floor) -> Vec<Row> {
        let total = floor.total_us();
        let Figures { rate, sat_cpu_us, half_cpu_us, latency: (p50, p99), health: (b50, b99), .. } = self;
        let (revoke_ms, hook_ms, introspect_ms) = (self.revoke_ms, self.hook_ms, self.introspect_ms);
        let (_, rate_lo, rate_hi) = over_rounds(&self.sat, |r| r.rate);
        let (_, cpu_lo, cpu_hi) = over_rounds(&self.sat, |r| r.cpu_us);
        let (_, _, others) = over_rounds(&self.sat, |r| r.others + r.steal);
        let n: usize = self.sat.iter().map(|r| r.ok).sum();
        let rounds = self.sat.len();
        let mut rows = vec![
            Row::new(
                "2a",
                "exchange throughput at saturation (closed loop, HTTP/1.1 keep-alive)",
                format!(
                    "{rate:.0}/s (median of {rounds} rounds: {rate_lo:.0}–{rate_hi:.0}; {n} exchanges, {} conns; \
                     other processes and steal: ≤ {others:.2} cores)",
                    self.conns
                ),
                format!("{:.0}/s = cores ÷ floor", cores() / total * 1e6),
            )
            .ratio(rate / (cores() / total * 1e6))
            .goal("≥ 0.7 (issue 22)", rate / (cores() / total * 1e6) >= 0.7),
            Row::new(
                "2b",
                "**broker CPU per exchange at saturation ÷ crypto floor** (utime+stime from /proc)",
                format!("{sat_cpu_us:.0} µs (median of {rounds} rounds: {cpu_lo:.0}–{cpu_hi:.0})"),
                format!("{total:.1} µs (floor)"),
            )
            .ratio(sat_cpu_us / total)
            .goal("≤ 1.3", sat_cpu_us / total <= 1.3),
            Row::new(
                "2c",
                "exchange latency at 50 % of saturation (open loop, from the scheduled send)",
                format!(
                    "p50 {p50:.2} ms, p99 {p99:.2} ms at {:.0}/s (other processes and steal: {:.2} cores)",
                    self.half_rate, self.half_others
                ),
                format!("GET /healthz, same schedule: p50 {b50:.2} ms, p99 {b99:.2} ms"),
            )
            .ratio(p99 / b99)
            .goal("p99 ≤ 2 ms (issue 22; issue 7: ≤ 5)", p99 <= 2.0),
            Row::new(
                "2d",
                "broker CPU per exchange at 50 % of saturation",
                format!("{half_cpu_us:.0} µs"),
                format!("{total:.1} µs (floor)"),
            )
            .ratio(half_cpu_us / total),
            Row::new(
                "2e",
                "broker CPU per `GET /healthz` at the same schedule (HTTP, runtime and logging alone)",
                format!("{:.0} µs", self.health_cpu_us),
                format!("{total:.1} µs (floor)"),
            )
            .ratio(self.health_cpu_us / total),
            Row::new(
                "2f",
                "the exchange's own work: 2b less the broker CPU per `GET /healthz` at saturation, ÷ crypto floor",
                format!(
                    "{:.0} µs ({sat_cpu_us:.0} − {:.0} µs per /healthz, same closed loop)",
                    sat_cpu_us - self.health_sat_cpu_us,
                    self.health_sat_cpu_us
                ),
                format!("{total:.1} µs (floor)"),
            )
            .ratio((sat_cpu_us - self.health_sat_cpu_us) / total),
            Row::new(
                "2g",
                "hand-offs at saturation: exchanges per journal fsync (the group commit's batch), \
                 broker context switches per exchange",
                format!(
                    "{:.1} exchanges per fsync ({:.0} fsyncs); {:.2} switches per exchange ({})",
                    n as f64 / self.hand_offs.fsyncs.max(1.0),
                    self.hand_offs.fsyncs,
                    self.hand_offs.switches.iter().map(|(_, s)| *s).sum::<u64>() as f64 / n as f64,
                    self.hand_offs
                        .switches
                        .iter()
                        .map(|(name, s)| format!("{name} {:.2}", *s as f64 / n as f64))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "—".to_string(),
            ),
            Row::new(
                "5a",
                "revocation latency: POST /v1/revoke sent → introspect says inactive",
                format!("p50 {:.2} ms, p99 {:.2} ms (n = {})", revoke_ms.0, revoke_ms.1, self.revocations),
                format!("one introspect round trip: p50 {:.2} ms, p99 {:.2} ms", introspect_ms.0, introspect_ms.1),
            )
            .ratio(revoke_ms.1 / introspect_ms.1),
            Row::new(
                "5b",
                "revocation latency: GitHub `workflow_job` completed webhook sent → introspect inactive",
                format!("p50 {:.2} ms, p99 {:.2} ms (n = {})", hook_ms.0, hook_ms.1, self.revocations),
                format!("one introspect round trip: p50 {:.2} ms, p99 {:.2} ms", introspect_ms.0, introspect_ms.1),
            )
            .ratio(hook_ms.1 / introspect_ms.1),
        ];
        rows.extend(self.attribution.rows(floor, self.seq_cpu_us, self.seq_n));
        rows.extend(self.perf);
        rows
    }
}

pub fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |p| p.get() as f64)
}

/// Row 5: for each job, exchange, then end the lease and poll introspection until it says
/// inactive; once by the job's own revoke, once by the platform's webhook. Sequential.
async fn revocations(
    addr: std::net::SocketAddr,
    revoke: (u64, Vec<String>),
    hook: (u64, Vec<String>),
) -> ((f64, f64), (f64, f64), (f64, f64)) {
    let mut conn = Conn::open(addr).await.unwrap();
    let mut watcher = Conn::open(addr).await.unwrap();
    let mut introspect_rtt = Vec::new();
    let mut by_revoke = Vec::new();
    for token in &revoke.1 {
        let watched = revoke_and_watch(&mut conn, &mut watcher, token).await;
        introspect_rtt.push(watched.introspect_rtt);
        by_revoke.push(watched.secs);
    }
    let mut by_hook = Vec::new();
    for (k, token) in hook.1.iter().enumerate() {
        let (_, jwt) = exchange(&mut conn, token).await;
        let (run_id, check_run_id) = tokens::job_ids(hook.0 + k as u64);
        let payload = serde_json::json!({
            "action": "completed",
            "workflow_job": {"id": check_run_id, "run_id": run_id, "run_attempt": tokens::RUN_ATTEMPT,
                             "status": "completed", "conclusion": "success", "name": "deploy", "labels": ["ubuntu-latest"]},
            "repository": {"id": tokens::REPOSITORY_ID, "full_name": "octo-org/octo-repo"},
            "sender": {"login": "octocat"},
        })
        .to_string();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_SECRET.as_bytes());
        let signature =
            format!("sha256={}", ephemera::secret::hex(ring::hmac::sign(&key, payload.as_bytes()).as_ref()));
        let delivery = format!("bench-delivery-{}", hook.0 + k as u64);
        let headers = [
            ("X-GitHub-Event", "workflow_job"),
            ("X-GitHub-Delivery", delivery.as_str()),
            ("X-Hub-Signature-256", signature.as_str()),
        ];
        let started = Instant::now();
        let r = conn
            .send(&request("POST", "/v1/hooks/github", &headers, "application/json", payload.as_bytes()))
            .await
            .unwrap();
        assert!(r.status == 200 && r.text().contains("revoked"), "webhook: {} {}", r.status, r.text());
        introspect_until(&mut conn, &jwt, false).await;
        by_hook.push(started.elapsed().as_secs_f64());
    }
    (p50_p99_ms(&mut by_revoke), p50_p99_ms(&mut by_hook), p50_p99_ms(&mut introspect_rtt))
}

/// What [`revoke_and_watch`] saw.
pub struct Watched {
    /// From sending the revoke to the watcher's first inactive answer.
    pub secs: f64,
    /// Introspections the watcher needed after the revoke had answered (1: the first said so).
    pub polls: usize,
    /// One introspection round trip on the watcher, for the live lease (a baseline).
    pub introspect_rtt: f64,
}

/// Exchanges `token` over `conn`, checks that `watcher` (another connection: to the same broker
/// or to another replica) sees the lease active, revokes it over `conn` with the job's token, and
/// introspects over `watcher` until it says inactive.
pub async fn revoke_and_watch(conn: &mut Conn, watcher: &mut Conn, token: &str) -> Watched {
    let (lease, jwt) = exchange(conn, token).await;
    let (introspect_rtt, _) = introspect_until(watcher, &jwt, true).await;
    let started = Instant::now();
    revoke(conn, token, &lease).await;
    let (_, polls) = introspect_until(watcher, &jwt, false).await;
    Watched { secs: started.elapsed().as_secs_f64(), polls, introspect_rtt }
}

/// One exchange: the lease id and the broker JWT it minted.
async fn exchange(conn: &mut Conn, token: &str) -> (String, String) {
    let r = conn.send(&exchange_request(token, POLICY)).await.unwrap();
    assert_eq!(r.status, 201, "exchange: {}", r.text());
    let body = r.json();
    let lease = body["lease_id"].as_str().unwrap().to_string();
    let jwt = body["credentials"]["api"]["token"].as_str().unwrap().to_string();
    (lease, jwt)
}

/// Ends `lease` with `POST /v1/revoke`, authenticated by the job's own CI token.
async fn revoke(conn: &mut Conn, token: &str, lease: &str) {
    let body = serde_json::json!({"lease_id": lease}).to_string();
    let auth = format!("Bearer {token}");
    let r = conn
        .send(&request("POST", "/v1/revoke", &[("Authorization", &auth)], "application/json", body.as_bytes()))
        .await
        .unwrap();
    assert!(r.status == 200 && r.text().contains(lease), "revoke: {} {}", r.status, r.text());
}

/// Introspects `jwt` until `active` is `want_active`: once for a live lease (one round trip, the
/// baseline), and after a revocation as often as it takes. Seconds taken, and introspections.
async fn introspect_until(conn: &mut Conn, jwt: &str, want_active: bool) -> (f64, usize) {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let body = format!("token={jwt}");
    let req = request(
        "POST",
        "/v1/introspect",
        &[("Authorization", &auth)],
        "application/x-www-form-urlencoded",
        body.as_bytes(),
    );
    let started = Instant::now();
    for polls in 1..=10_000 {
        let r = conn.send(&req).await.unwrap();
        assert_eq!(r.status, 200, "introspect: {}", r.text());
        if r.json()["active"] == want_active {
            return (started.elapsed().as_secs_f64(), polls);
        }
    }
    panic!("introspection never answered active = {want_active}");
}

/// The exchange's CPU split by layer, measured in a child process (a fresh heap: the allocator's
/// state after this process's ~100k requests would colour the figures) with the broker's own
/// library: `Verifier::verify` alone, then `App::exchange` (verify, decide, mint, journal +
/// fsync, audit) without and with the binary's JSON logging. What the binary spends beyond that
/// is HTTP.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Attribution {
    verify_us: f64,
    app_us: f64,
    app_logged_us: f64,
    /// A request's log line (its span, the lease id recorded on it, the event) into a sink:
    /// the binary's `log_format`, and `tracing-subscriber`'s JSON format it replaced.
    log_line_us: f64,
    log_line_reference_us: f64,
    n: usize,
}

fn attribution_in_child(n: usize) -> Attribution {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["attribution-child", &n.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the attribution child failed: {}", out.status);
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default()).unwrap()
}

/// The child process's side of [`Attribution`]: `n` sequential calls of each kind.
pub fn attribution_child(n: usize) -> Attribution {
    let dir = tempfile::tempdir().unwrap();
    let mut tokens = Tokens::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(in_process(dir.path(), &mut tokens, n))
}

async fn in_process(dir: &Path, tokens: &mut Tokens, n: usize) -> Attribution {
    let config_path = broker::write_setup(dir, &broker::Setup::default());
    let text = std::fs::read_to_string(&config_path).unwrap();
    let config = ephemera::config::Config::parse(&text, dir).unwrap();
    let clock: Arc<dyn ephemera::clock::Clock> = Arc::new(ephemera::clock::SystemClock);
    let running = ephemera::server::start(ephemera::server::Options::new(config, false, clock)).await.unwrap();
    while !running.app.readiness().0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let app = running.app.clone();
    let (_, verify_tokens) = tokens.take(n);
    let now = app.now();
    let cpu = crate::procfs::thread_cpu_seconds();
    for t in &verify_tokens {
        app.verifier().verify(t, now).await.unwrap();
    }
    let verify_us = (crate::procfs::thread_cpu_seconds() - cpu) / n as f64 * 1e6;

    let exchange_all = |tokens: Vec<String>| {
        let app = app.clone();
        async move {
            let cpu = crate::procfs::cpu("self");
            for t in &tokens {
                app.exchange(t, &ephemera::app::ExchangeRequest::policy(POLICY), "req_bench").await.unwrap();
            }
            crate::procfs::cpu("self").since(&cpu) / tokens.len() as f64 * 1e6
        }
    };
    let app_us = exchange_all(tokens.take(n).1).await;
    let log = std::fs::File::create(dir.join("in-process.log")).unwrap();
    let subscriber = tracing_subscriber::fmt()
        .fmt_fields(ephemera::log_format::JsonFields)
        .event_format(ephemera::log_format::JsonLine)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::sync::Mutex::new(log))
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let app_logged_us = exchange_all(tokens.take(n).1).await;
    drop(guard);
    running.shutdown().await;
    let lines = n * 20;
    let ours = || {
        tracing_subscriber::fmt()
            .fmt_fields(ephemera::log_format::JsonFields)
            .event_format(ephemera::log_format::JsonLine)
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::sink)
            .finish()
    };
    let reference = || {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::sink)
            .with_current_span(true)
            .with_span_list(false)
            .finish()
    };
    // Twice each, in turn: the first round of each warms what it touches.
    let (_, _) = (request_lines(lines, ours()), request_lines(lines, reference()));
    let (log_line_us, log_line_reference_us) = (request_lines(lines, ours()), request_lines(lines, reference()));
    Attribution { verify_us, app_us, app_logged_us, log_line_us, log_line_reference_us, n }
}

/// CPU µs per request line as `http::request_context` writes it, under `subscriber`.
fn request_lines(n: usize, subscriber: impl tracing::Subscriber + Send + Sync + 'static) -> f64 {
    let cpu = crate::procfs::thread_cpu_seconds();
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..n {
            let span = tracing::info_span!(
                "request",
                request_id = %"req_01jf2q9zb3w5n7x0y4k6m8p1r3",
                lease_id = tracing::field::Empty
            );
            span.record("lease_id", tracing::field::display("lse_01jf2q9zb3w5n7x0y4k6m8p1r3"));
            span.in_scope(|| {
                tracing::info!(method = %"POST", route = %"/v1/exchange", status = 201u16, micros = i as u64, "request");
            });
        }
    });
    (crate::procfs::thread_cpu_seconds() - cpu) / n as f64 * 1e6
}

impl Attribution {
    fn rows(&self, floor: &Floor, binary_us: f64, binary_n: usize) -> Vec<Row> {
        let total = floor.total_us();
        let n = self.n;
        vec![
            Row::new(
                "A1",
                "attribution: `Verifier::verify` in process (sequential)",
                format!("{:.1} µs (n = {n})", self.verify_us),
                format!("{:.1} µs (floor: verify only)", floor.verify_us),
            )
            .ratio(self.verify_us / floor.verify_us),
            Row::new(
                "A2",
                "attribution: `App::exchange` in process, no logging (sequential)",
                format!("{:.0} µs (n = {n})", self.app_us),
                format!("{total:.1} µs (floor)"),
            )
            .ratio(self.app_us / total),
            Row::new(
                "A3",
                "attribution: `App::exchange` in process, JSON logging as the binary (sequential)",
                format!("{:.0} µs (n = {n})", self.app_logged_us),
                format!("{total:.1} µs (floor)"),
            )
            .ratio(self.app_logged_us / total),
            Row::new(
                "A3b",
                "attribution: one request's log line (span, lease id, event) into a sink, `log_format` (as the binary)",
                format!("{:.2} µs (n = {})", self.log_line_us, n * 20),
                format!("{:.2} µs (`tracing-subscriber`'s JSON format, as before)", self.log_line_reference_us),
            )
            .ratio(self.log_line_us / self.log_line_reference_us),
            Row::new(
                "A4",
                "attribution: the binary over HTTP, one connection (sequential)",
                format!("{binary_us:.0} µs (n = {binary_n})"),
                format!("{total:.1} µs (floor)"),
            )
            .ratio(binary_us / total),
        ]
    }
}
