//! Rows 9 (issue 19): token exchange at `POST /oauth/token` beside `POST /v1/exchange`, against
//! the same broker in the same run, rounds alternating so a noisy moment hits both alike.
//!
//! A token exchange verifies two RS256 tokens (the job's, as `subject_token`, and an agent's, as
//! `actor_token`: here another job's token of the same issuer, which the policy's actor rule
//! admits), decides the policy with its actor and tool rules, signs one ES256 JWT and records it
//! as a lease of the job before the reply. So its CPU should be about the exchange's plus one
//! RS256 verification: the crypto floor puts that near 1.6× (two verifications and a signature
//! against one of each).

use crate::beside::{self, Kind, Load};
use crate::broker::{Broker, POLICY_YAML, Setup};
use crate::exchange::{Plan, SAT_ROUNDS, Tokens};
use crate::http::request;
use crate::load::closed_loop;
use crate::table::Row;
use std::path::Path;
use std::sync::Arc;

const TOOLS_POLICY: &str = "bench-tools";
const RESOURCE: &str = "https://mcp.bench.invalid/github";
/// Agents' tokens the requests take turns with (an actor token is not single-use).
const ACTORS: usize = 16;

/// The bench policy's job rules, with an agent and a tool instead of grants.
fn tools_policy() -> String {
    let job_rules = POLICY_YAML.split("grants:").next().unwrap_or_default();
    format!(
        "{job_rules}actors:\n  agent:\n    issuer: github\n    match: {{repository_id: \"74\"}}\n\
         tools:\n  github:\n    resource: {RESOURCE}\n    backend: jwt\n    scopes: [\"issues:read\", \"pulls:write\"]\n"
    )
}

fn token_exchange_request(subject: &str, actor: &str) -> Vec<u8> {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange")
        .append_pair("subject_token", subject)
        .append_pair("subject_token_type", "urn:ietf:params:oauth:token-type:id_token")
        .append_pair("actor_token", actor)
        .append_pair("actor_token_type", "urn:ietf:params:oauth:token-type:jwt")
        .append_pair("audience", TOOLS_POLICY)
        .append_pair("resource", RESOURCE)
        .append_pair("scope", "issues:read")
        .finish();
    request("POST", "/oauth/token", &[], "application/x-www-form-urlencoded", body.as_bytes())
}

pub async fn run(binary: &Path, plan: &Plan, dir: &Path) -> Vec<Row> {
    ephemera::install_crypto();
    let mut tokens = Tokens::new();
    let per_round = plan.saturation / SAT_ROUNDS;
    let (warmup, exchange) = beside::exchanges(&mut tokens, plan);
    let actors = tokens.take(ACTORS).1;
    let mut token_exchanges = |n: usize| -> Arc<Vec<Vec<u8>>> {
        let subjects = tokens.take(n).1;
        Arc::new(subjects.iter().enumerate().map(|(i, s)| token_exchange_request(s, &actors[i % ACTORS])).collect())
    };
    let rounds: Vec<_> = (0..SAT_ROUNDS).map(|_| token_exchanges(per_round)).collect();
    let sequential = token_exchanges(plan.sequential);
    let warmup_te = token_exchanges(plan.warmup.min(200));

    let policies = [(TOOLS_POLICY, tools_policy())];
    let setup = Setup { policies: &policies, ..Setup::default() };
    let broker = Broker::start_with(binary, &dir.join("token-exchange"), &setup).await;
    let addr = broker.addr;
    closed_loop(addr, warmup, plan.saturation_conns, 201).await.check("warm-up");
    closed_loop(addr, warmup_te, plan.saturation_conns, 200).await.check("token exchange warm-up");
    let token_exchange = Load { rounds, sequential, status: 200 };
    let kind = Kind {
        id: "9",
        noun: "token exchange",
        how: "`POST /oauth/token`, job + agent token, closed loop, file store",
        goal: "≤ 2 (one more RS256 verification)",
        meets: |ratio| ratio <= 2.0,
    };
    beside::rows(addr, broker.pid, plan, exchange, token_exchange, &kind).await
}
