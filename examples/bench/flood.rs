//! Rows 10 (issue 21): a flood of denied tokens from one address, what it costs before the
//! limits engage and once they have.
//!
//! 10a–10c: bad signatures beside exchanges on one broker whose limits are out of reach, so every
//! forged token is checked: its CPU should be one RS256 verification plus HTTP, well under an
//! exchange's (no decision, no signing, no ledger write; its audit line is written, like any
//! denial's). 10d: the same flood against the default failure budget: after it is spent the
//! address is cooled off, and each request is refused before its token is looked at. 10e: how
//! many forged tokens one address gets checked before that.

use crate::beside::{self, Kind, Load};
use crate::broker::{Broker, Setup};
use crate::exchange::{Plan, SAT_ROUNDS, Tokens, over_rounds, requests, saturation_round_of};
use crate::http::Conn;
use crate::load::closed_loop;
use crate::table::Row;
use std::path::Path;
use std::sync::Arc;

/// `[limits]` of the broker for 10d–10e: the default failure budget and cool-off, everything
/// else out of reach (the rest of the bench is one address too). An hour's cool-off, so the
/// rounds never outlast it.
const DEFAULT_FAILURES: &str = "address = { per_second = 10000000, burst = 10000000 }
issuer = { per_second = 10000000, burst = 10000000 }
repository = { per_second = 10000000, burst = 10000000 }
failures = { per_second = 1, burst = 100 }
cool_off = \"1h\"
";

/// A token whose signature is not the issuer's: its signature's characters reversed.
fn forged(token: &str) -> String {
    let (head, signature) = token.rsplit_once('.').unwrap_or((token, ""));
    format!("{head}.{}", signature.chars().rev().collect::<String>())
}

pub async fn run(binary: &Path, plan: &Plan, dir: &Path) -> Vec<Row> {
    ephemera::install_crypto();
    let mut tokens = Tokens::new();
    let per_round = plan.saturation / SAT_ROUNDS;
    let (warmup, exchange) = beside::exchanges(&mut tokens, plan);
    let mut floods =
        |n: usize| -> Arc<Vec<Vec<u8>>> { requests(&tokens.take(n).1.iter().map(|t| forged(t)).collect::<Vec<_>>()) };
    let flood = Load {
        rounds: (0..SAT_ROUNDS).map(|_| floods(per_round)).collect(),
        sequential: floods(plan.sequential),
        status: 401,
    };
    let cooled: Vec<_> = (0..SAT_ROUNDS).map(|_| floods(per_round)).collect();
    let budget = floods(300);

    let broker = Broker::start(binary, &dir.join("flood")).await;
    closed_loop(broker.addr, warmup, plan.saturation_conns, 201).await.check("warm-up");
    let kind = Kind {
        id: "10",
        noun: "forged token",
        how: "bad RS256 signatures at `POST /v1/exchange`, limits out of reach, closed loop",
        goal: "< 1 (a denied token costs less than an exchange)",
        meets: |ratio| ratio < 1.0,
    };
    let (mut rows, exchange_cpu) =
        beside::rows_and_exchange_cpu(broker.addr, broker.pid, plan, exchange, flood, &kind).await;
    drop(broker);

    let setup = Setup { limits: Some(DEFAULT_FAILURES), ..Setup::default() };
    let broker = Broker::start_with(binary, &dir.join("flood-limited"), &setup).await;
    // One at a time on one connection, counting the tokens checked before the cool-off.
    let mut conn = Conn::open(broker.addr).await.unwrap();
    let mut checked = 0;
    for request in budget.iter() {
        match conn.send(request).await.unwrap().status {
            401 => checked += 1,
            429 => break,
            other => panic!("a forged token got {other}"),
        }
    }
    let pids = [broker.pid.to_string()];
    let mut refused = Vec::new();
    for round in cooled {
        refused.push(
            saturation_round_of(
                "forged token, cooled off",
                &[broker.addr],
                &pids,
                &[],
                round,
                plan.saturation_conns,
                429,
            )
            .await,
        );
    }
    let (cpu, cpu_lo, cpu_hi) = over_rounds(&refused, |r| r.cpu_us);
    let (rate, rate_lo, rate_hi) = over_rounds(&refused, |r| r.rate);
    rows.push(
        Row::new(
            "10d",
            "**broker CPU per request refused in a cool-off ÷ per exchange** (/proc)",
            format!(
                "{cpu:.0} µs (median: {cpu_lo:.0}–{cpu_hi:.0}); {rate:.0}/s ({rate_lo:.0}–{rate_hi:.0}), every one 429"
            ),
            format!("{exchange_cpu:.0} µs per exchange (10b's)"),
        )
        .ratio(cpu / exchange_cpu)
        .goal("≤ 0.25 (no signature checked)", cpu / exchange_cpu <= 0.25),
    );
    rows.push(Row::new(
        "10e",
        "forged tokens one address gets checked before the limits engage (default `failures`: 100 at once, then 1/s)",
        format!("{checked}, then 429 `cool-off` for 30 s (the default)"),
        "—".to_string(),
    ));
    rows
}
