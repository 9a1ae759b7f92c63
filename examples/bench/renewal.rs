//! Rows 7 (issue 15): renewing a lease beside exchanging a CI token, against the same broker in
//! the same run, rounds alternating so a noisy moment hits both alike.
//!
//! A renewal verifies no CI token (the renew token is compared by its SHA-256), but it reads the
//! lease, re-decides the policy on the lease's claims, signs a fresh JWT and records it with the
//! lease before the reply: so its CPU should be the exchange's less the RS256 verification.
//! The renewals go round robin over [`LEASES`] leases, each renewed a few hundred times at most
//! (a real job renews a lease tens to hundreds of times; a lease takes 1,000 at most).

use crate::beside::{self, Kind, Load};
use crate::broker::{Broker, RENEW_POLICY};
use crate::exchange::{Plan, SAT_ROUNDS, Tokens};
use crate::http::{Conn, request};
use crate::load::closed_loop;
use crate::table::Row;
use std::path::Path;
use std::sync::Arc;

/// Leases the renewals go round robin over.
const LEASES: usize = 256;

pub async fn run(binary: &Path, plan: &Plan, dir: &Path) -> Vec<Row> {
    ephemera::install_crypto();
    let mut tokens = Tokens::new();
    let per_round = plan.saturation / SAT_ROUNDS;
    let (warmup, exchange) = beside::exchanges(&mut tokens, plan);
    let lease_tokens = tokens.take(LEASES).1;

    let broker = Broker::start(binary, &dir.join("renewal")).await;
    let addr = broker.addr;
    closed_loop(addr, warmup, plan.saturation_conns, 201).await.check("warm-up");
    let leases = renewable_leases(addr, &lease_tokens).await;
    let renewals = |n: usize, offset: usize| -> Arc<Vec<Vec<u8>>> {
        Arc::new((0..n).map(|i| renew_request(&leases[(offset + i) % leases.len()])).collect())
    };
    let renewal = Load {
        rounds: (0..SAT_ROUNDS).map(|i| renewals(per_round, i * per_round)).collect(),
        sequential: renewals(plan.sequential, 0),
        status: 200,
    };
    let kind = Kind {
        id: "7",
        noun: "renewal",
        how: "`POST /v1/leases/{id}/renew`, closed loop, file store",
        goal: "< 1 (no CI token to verify)",
        meets: |ratio| ratio < 1.0,
    };
    beside::rows(addr, broker.pid, plan, exchange, renewal, &kind).await
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
