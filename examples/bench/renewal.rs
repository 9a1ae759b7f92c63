//! Rows 7 (issue 15): renewing a lease beside exchanging a CI token, against the same broker in
//! the same run, rounds alternating so a noisy moment hits both alike.
//!
//! A renewal verifies no CI token (the renew token is compared by its SHA-256), but it reads the
//! lease, re-decides the policy on the lease's claims, signs a fresh JWT and records it with the
//! lease before the reply: so its CPU should be the exchange's less the RS256 verification.
//! The renewals go round robin over [`LEASES`] leases, each renewed a few hundred times at most
//! (a real job renews a lease tens to hundreds of times; a lease takes 1,000 at most).

use crate::broker::{Broker, RENEW_POLICY};
use crate::exchange::{Plan, SAT_ROUNDS, Tokens, over_rounds, requests, saturation_round_of};
use crate::http::{Conn, request};
use crate::load::closed_loop;
use crate::table::{Row, p50_p99_ms};
use std::path::Path;
use std::sync::Arc;

/// Leases the renewals go round robin over.
const LEASES: usize = 256;

pub async fn run(binary: &Path, plan: &Plan, dir: &Path) -> Vec<Row> {
    ephemera::install_crypto();
    let mut tokens = Tokens::new();
    let per_round = plan.saturation / SAT_ROUNDS;
    let warmup = requests(&tokens.take(plan.warmup).1);
    let exchanges: Vec<_> = (0..SAT_ROUNDS).map(|_| requests(&tokens.take(per_round).1)).collect();
    let sequential_exchanges = requests(&tokens.take(plan.sequential).1);
    let lease_tokens = tokens.take(LEASES).1;

    let broker = Broker::start(binary, &dir.join("renewal")).await;
    let addr = broker.addr;
    closed_loop(addr, warmup, plan.saturation_conns, 201).await.check("warm-up");
    let leases = renewable_leases(addr, &lease_tokens).await;
    let renewals = |n: usize, offset: usize| -> Arc<Vec<Vec<u8>>> {
        Arc::new((0..n).map(|i| renew_request(&leases[(offset + i) % leases.len()])).collect())
    };

    let pids = [broker.pid.to_string()];
    let (mut ex, mut rn) = (Vec::new(), Vec::new());
    for (i, requests) in exchanges.into_iter().enumerate() {
        ex.push(saturation_round_of("exchange", &[addr], &pids, &[], requests, plan.saturation_conns, 201).await);
        let renew = renewals(per_round, i * per_round);
        rn.push(saturation_round_of("renewal", &[addr], &pids, &[], renew, plan.saturation_conns, 200).await);
    }
    let mut seq_ex = closed_loop(addr, sequential_exchanges, 1, 201).await;
    seq_ex.check("sequential exchanges");
    let mut seq_rn = closed_loop(addr, renewals(plan.sequential, 0), 1, 200).await;
    seq_rn.check("sequential renewals");
    drop(broker);

    let (ex_rate, ..) = over_rounds(&ex, |r| r.rate);
    let (rn_rate, rn_rate_lo, rn_rate_hi) = over_rounds(&rn, |r| r.rate);
    let (ex_cpu, ..) = over_rounds(&ex, |r| r.cpu_us);
    let (rn_cpu, rn_cpu_lo, rn_cpu_hi) = over_rounds(&rn, |r| r.cpu_us);
    let (rn50, rn99) = p50_p99_ms(&mut seq_rn.latencies);
    let (ex50, ex99) = p50_p99_ms(&mut seq_ex.latencies);
    vec![
        Row::new(
            "7a",
            "renewals/s at saturation (`POST /v1/leases/{id}/renew`, closed loop, file store)",
            format!(
                "{rn_rate:.0}/s (median of {SAT_ROUNDS} rounds: {rn_rate_lo:.0}–{rn_rate_hi:.0}; {per_round} each)"
            ),
            format!("{ex_rate:.0}/s, exchanges, rounds in turn on the same broker"),
        )
        .ratio(rn_rate / ex_rate),
        Row::new(
            "7b",
            "**broker CPU per renewal at saturation ÷ per exchange** (/proc)",
            format!("{rn_cpu:.0} µs (median: {rn_cpu_lo:.0}–{rn_cpu_hi:.0})"),
            format!("{ex_cpu:.0} µs per exchange"),
        )
        .ratio(rn_cpu / ex_cpu)
        .goal("< 1 (no CI token to verify)", rn_cpu < ex_cpu),
        Row::new(
            "7c",
            "renewal latency, sequential on one connection",
            format!("p50 {rn50:.2} ms, p99 {rn99:.2} ms (n = {})", seq_rn.ok),
            format!("exchange, the same way: p50 {ex50:.2} ms, p99 {ex99:.2} ms"),
        )
        .ratio(rn99 / ex99),
    ]
}

/// (lease id, renew token) of one renewable lease per token.
async fn renewable_leases(addr: std::net::SocketAddr, tokens: &[String]) -> Vec<(String, String)> {
    let mut conn = Conn::open(addr).await.unwrap();
    let body = format!("{{\"policy\":\"{RENEW_POLICY}\"}}");
    let mut leases = Vec::with_capacity(tokens.len());
    for token in tokens {
        let auth = format!("Bearer {token}");
        let r = conn
            .send(&request("POST", "/v1/exchange", &[("Authorization", &auth)], "application/json", body.as_bytes()))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "renewable exchange: {}", r.text());
        let reply = r.json();
        let id = reply["lease_id"].as_str().unwrap().to_string();
        leases.push((id, reply["renew"]["token"].as_str().unwrap().to_string()));
    }
    leases
}

fn renew_request((id, token): &(String, String)) -> Vec<u8> {
    let auth = format!("Bearer {token}");
    request("POST", &format!("/v1/leases/{id}/renew"), &[("Authorization", &auth)], "application/json", b"{}")
}
