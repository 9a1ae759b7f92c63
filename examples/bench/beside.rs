//! One request kind measured beside the exchange on the same broker (rows 7, renewal, and 9,
//! token exchange): saturation rounds in turn, so a noisy moment hits both alike, then each
//! sequentially on one connection; three rows, every figure against the exchange's.

use crate::exchange::{Plan, SAT_ROUNDS, Tokens, over_rounds, requests, saturation_round_of};
use crate::load::closed_loop;
use crate::table::{Row, p50_p99_ms};
use std::net::SocketAddr;
use std::sync::Arc;

/// Requests, as bytes, and the status each must get.
pub struct Load {
    pub rounds: Vec<Arc<Vec<Vec<u8>>>>,
    pub sequential: Arc<Vec<Vec<u8>>>,
    pub status: u16,
}

/// The exchange side of a comparison, from the next tokens: a warm-up's requests and the
/// exchange [`Load`] (a round of `plan.saturation / SAT_ROUNDS` per saturation round).
pub fn exchanges(tokens: &mut Tokens, plan: &Plan) -> (Arc<Vec<Vec<u8>>>, Load) {
    let per_round = plan.saturation / SAT_ROUNDS;
    let warmup = requests(&tokens.take(plan.warmup).1);
    let rounds = (0..SAT_ROUNDS).map(|_| requests(&tokens.take(per_round).1)).collect();
    let sequential = requests(&tokens.take(plan.sequential).1);
    (warmup, Load { rounds, sequential, status: 201 })
}

/// What one kind of request is, for the rows' text.
pub struct Kind<'a> {
    /// Row ids `{id}a`, `{id}b`, `{id}c`.
    pub id: &'a str,
    /// One request, e.g. `renewal`.
    pub noun: &'a str,
    /// What was sent, e.g. "`POST /v1/leases/{id}/renew`, closed loop, file store".
    pub how: &'a str,
    /// Row b's goal: its text, and whether a ratio (CPU per request ÷ per exchange) meets it.
    pub goal: &'a str,
    pub meets: fn(f64) -> bool,
}

/// Runs `exchange` and `other` against the broker at `addr` (process `pid`) and makes the rows.
pub async fn rows(addr: SocketAddr, pid: u32, plan: &Plan, exchange: Load, other: Load, kind: &Kind<'_>) -> Vec<Row> {
    rows_and_exchange_cpu(addr, pid, plan, exchange, other, kind).await.0
}

/// [`rows`], and the exchange's broker CPU per request (µs, median of the rounds), for rows
/// that compare something else with it.
pub async fn rows_and_exchange_cpu(
    addr: SocketAddr,
    pid: u32,
    plan: &Plan,
    exchange: Load,
    other: Load,
    kind: &Kind<'_>,
) -> (Vec<Row>, f64) {
    let pids = [pid.to_string()];
    let per_round = plan.saturation / SAT_ROUNDS;
    let (mut ex, mut ot) = (Vec::new(), Vec::new());
    for (e, o) in exchange.rounds.into_iter().zip(other.rounds) {
        ex.push(saturation_round_of("exchange", &[addr], &pids, &[], e, plan.saturation_conns, exchange.status).await);
        ot.push(saturation_round_of(kind.noun, &[addr], &pids, &[], o, plan.saturation_conns, other.status).await);
    }
    let mut seq_ex = closed_loop(addr, exchange.sequential, 1, exchange.status).await;
    seq_ex.check("sequential exchanges");
    let mut seq_ot = closed_loop(addr, other.sequential, 1, other.status).await;
    seq_ot.check(&format!("sequential {}s", kind.noun));

    let (ex_rate, ..) = over_rounds(&ex, |r| r.rate);
    let (rate, rate_lo, rate_hi) = over_rounds(&ot, |r| r.rate);
    let (ex_cpu, ..) = over_rounds(&ex, |r| r.cpu_us);
    let (cpu, cpu_lo, cpu_hi) = over_rounds(&ot, |r| r.cpu_us);
    let (p50, p99) = p50_p99_ms(&mut seq_ot.latencies);
    let (ex50, ex99) = p50_p99_ms(&mut seq_ex.latencies);
    let (id, noun) = (kind.id, kind.noun);
    let rows = vec![
        Row::new(
            &format!("{id}a"),
            &format!("{noun}s/s at saturation ({})", kind.how),
            format!("{rate:.0}/s (median of {SAT_ROUNDS} rounds: {rate_lo:.0}–{rate_hi:.0}; {per_round} each)"),
            format!("{ex_rate:.0}/s, exchanges, rounds in turn on the same broker"),
        )
        .ratio(rate / ex_rate),
        Row::new(
            &format!("{id}b"),
            &format!("**broker CPU per {noun} at saturation ÷ per exchange** (/proc)"),
            format!("{cpu:.0} µs (median: {cpu_lo:.0}–{cpu_hi:.0})"),
            format!("{ex_cpu:.0} µs per exchange"),
        )
        .ratio(cpu / ex_cpu)
        .goal(kind.goal, (kind.meets)(cpu / ex_cpu)),
        Row::new(
            &format!("{id}c"),
            &format!("{noun} latency, sequential on one connection"),
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms (n = {})", seq_ot.ok),
            format!("exchange, the same way: p50 {ex50:.2} ms, p99 {ex99:.2} ms"),
        )
        .ratio(p99 / ex99),
    ];
    (rows, ex_cpu)
}
