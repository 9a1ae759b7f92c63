//! `POST /oauth/token` (RFC 8693, issue 19) over real HTTP against the in-process broker: every
//! parameter and every error of the wire format, agents as actors, delegation chains that only
//! narrow, `may_act`, and the cascade: ending the job (or a token above) ends every token
//! derived from it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{Map, Value, json};

const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const STRANGER: &str = "spiffe://ci.example/agent/stranger";
/// The in-process broker's `public_url` (tests/common): a grant JWT for it may be exchanged.
const BROKER: &str = "http://127.0.0.1:1";
/// The agent's own job: its exchange gets it an identity token for the broker (`identity`), the
/// actor token of the `bot` rule, and a JWT for another service (`api`), which is none.
const AGENT_JOB_POLICY: &str = r#"
issuer: ci
match: {repository_id: "74"}
ttl: {default: 5m, max: 10m}
grants:
  identity: {backend: jwt, audience: "http://127.0.0.1:1", claims: {agent: review-bot}}
  api: {backend: jwt, audience: https://api.internal.example}
"#;

/// Another repository's policy: a chain started under `agents` must not continue here.
const OTHER_POLICY: &str = r#"
issuer: ci
match: {repository_id: "74"}
ttl: {default: 5m, max: 10m}
tools:
  github: {resource: "https://mcp.example.com/github", backend: jwt, scopes: ["issues:read"]}
"#;

struct Setup {
    ci: FakeIssuer,
    agents: FakeIssuer,
    broker: Broker,
}

async fn setup() -> Setup {
    let ci = FakeIssuer::start().await;
    let agents = FakeIssuer::start().await;
    let extra = Extra { hooks_toml: agents_issuer_toml("agents", &agents.url), ..Extra::default() };
    let broker = Broker::start_custom(
        &[("ci", "github-actions", &ci)],
        &[("agents", AGENTS_POLICY), ("other", OTHER_POLICY), ("agent-job", AGENT_JOB_POLICY)],
        &extra,
    )
    .await;
    Setup { ci, agents, broker }
}

impl Setup {
    /// A fresh CI token of the job (a new `jti` each time).
    fn job_token(&self) -> String {
        self.ci.sign(&self.ci.claims("github-environment-deploy.json", self.broker.clock_now()))
    }

    /// An agent's identity token from the agent issuer.
    fn agent_token(&self, sub: &str) -> String {
        let now = self.broker.clock_now();
        let claims: Map<String, Value> = serde_json::from_value(json!({
            "iss": self.agents.url, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300,
        }))
        .unwrap();
        self.agents.sign(&claims)
    }

    /// POST /oauth/token with these form fields; (status, body, cache-control).
    async fn post(&self, fields: &[(&str, &str)]) -> (u16, Value, String) {
        let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish();
        self.post_raw("application/x-www-form-urlencoded", body).await
    }

    async fn post_raw(&self, content_type: &str, body: String) -> (u16, Value, String) {
        let resp = self
            .broker
            .http
            .post(format!("{}/oauth/token", self.broker.url))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let cache = resp.headers().get("cache-control").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), cache)
    }

    /// An exchange of `subject` (a CI token or a token this broker issued) for `resource`,
    /// with an optional actor and scope, under the `agents` policy.
    async fn exchange(&self, subject: &str, actor: Option<&str>, resource: &str, scope: Option<&str>) -> (u16, Value) {
        let mut fields = vec![
            ("grant_type", GRANT),
            ("subject_token", subject),
            ("subject_token_type", JWT),
            ("policy", "agents"),
            ("resource", resource),
        ];
        if let Some(actor) = actor {
            fields.extend([("actor_token", actor), ("actor_token_type", JWT)]);
        }
        if let Some(scope) = scope {
            fields.push(("scope", scope));
        }
        let (status, body, _) = self.post(&fields).await;
        (status, body)
    }

    /// As [`Setup::exchange`], expecting a token: its access token and decoded payload.
    async fn token(&self, subject: &str, actor: Option<&str>, resource: &str, scope: Option<&str>) -> (String, Value) {
        let (status, body) = self.exchange(subject, actor, resource, scope).await;
        assert_eq!(status, 200, "{body}");
        let token = body["access_token"].as_str().unwrap().to_string();
        let payload = payload(&token);
        (token, payload)
    }
}

impl Broker {
    fn clock_now(&self) -> i64 {
        self.running.app.now()
    }
}

fn payload(jwt: &str) -> Value {
    serde_json::from_slice(&ephemera::ids::b64url_decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

/// An RFC 6749 §5.2 error: the status, the code, a description, the request id, and none of
/// `secrets` anywhere in the body.
fn assert_oauth_error(reply: &(u16, Value), status: u16, code: &str, secrets: &[&str]) -> String {
    let (got, body) = reply;
    assert_eq!((*got, body["error"].as_str()), (status, Some(code)), "{body}");
    assert!(body["request_id"].as_str().unwrap().starts_with("req_"), "{body}");
    let text = body.to_string();
    for secret in secrets {
        assert!(!text.contains(secret), "the error body carries `{secret}`: {text}");
    }
    body["error_description"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_job_gets_one_audience_restricted_token_per_tool_with_the_scope_it_asked_for() {
    let s = setup().await;
    let job = s.job_token();
    let (status, body, cache) = s
        .post(&[
            ("grant_type", GRANT),
            ("subject_token", &job),
            ("subject_token_type", ID_TOKEN),
            ("audience", "agents"),
            ("resource", GITHUB_MCP),
            ("scope", "issues:read data:own-repo"),
            ("client_id", "ignored-as-rfc-6749-asks"),
        ])
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cache, "no-store", "RFC 6749 §5.1");
    assert_eq!(body["issued_token_type"], ACCESS_TOKEN);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 600, "the policy's default ttl");
    assert_eq!(body["scope"], "issues:read data:own-repo");
    let token = body["access_token"].as_str().unwrap();
    let claims = payload(token);
    assert_eq!(claims["aud"], GITHUB_MCP, "the one requested resource");
    assert_eq!(claims["sub"], "github:74:7712340001:2:96193868770", "the job");
    assert_eq!(claims["tool"], "github");
    assert_eq!(claims["scope"], "issues:read data:own-repo");
    assert_eq!(claims["data"], json!({"own-repo": {"repositories": ["octo-org/octo-repo"], "paths": ["src/**"]}}));
    assert_eq!(claims["lease_id"], body["lease_id"]);
    assert!(claims.get("act").is_none(), "the job acts itself: {claims}");
    let intro = s.broker.introspect(token).await;
    assert_eq!((intro["active"].clone(), intro["scope"].clone()), (json!(true), json!("issues:read data:own-repo")));
    // The same CI token gets a token for the other tool too (one use per policy and tool), and a
    // request without `scope` gets the tool's whole scope.
    let (_, search) = s.token(&job, None, SEARCH, None).await;
    assert_eq!((search["aud"].as_str(), search["scope"].as_str()), (Some(SEARCH), Some("search")));
    assert!(search.get("data").is_none(), "the search tool carries no data scope");
    // `requested_token_type` jwt is answered as jwt.
    let (status, body, _) = s
        .post(&[
            ("grant_type", GRANT),
            ("subject_token", &s.job_token()),
            ("subject_token_type", ID_TOKEN),
            ("audience", "agents"),
            ("resource", GITHUB_MCP),
            ("requested_token_type", JWT),
        ])
        .await;
    assert_eq!((status, body["issued_token_type"].as_str()), (200, Some(JWT)), "{body}");
}

#[tokio::test]
async fn a_replayed_ci_token_gets_no_second_token_for_the_same_tool() {
    let s = setup().await;
    let job = s.job_token();
    s.token(&job, None, GITHUB_MCP, None).await;
    let again = s.exchange(&job, None, GITHUB_MCP, None).await;
    let message = assert_oauth_error(&again, 400, "invalid_request", &[&job]);
    assert!(message.contains("already used"), "{message}");
}

#[tokio::test]
async fn every_malformed_request_is_refused_with_its_rfc_error_code() {
    let s = setup().await;
    let job = s.job_token();
    let agent = s.agent_token(REVIEWER);
    let base = |extra: &[(&'static str, &'static str)]| {
        let mut f: Vec<(&str, String)> = vec![
            ("grant_type", GRANT.into()),
            ("subject_token", job.clone()),
            ("subject_token_type", JWT.into()),
            ("policy", "agents".into()),
        ];
        for (k, v) in extra {
            f.retain(|(key, _)| key != k || *k == "resource" || *k == "audience");
            f.push((k, v.to_string()));
        }
        f
    };
    let without = |name: &str| {
        let mut f = base(&[("resource", GITHUB_MCP)]);
        f.retain(|(k, _)| *k != name);
        f
    };
    // (what, form fields, the error code, what the description says)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        ("no grant_type", without("grant_type"), "invalid_request", "`grant_type` is required"),
        ("another grant_type", base(&[("grant_type", "client_credentials")]), "unsupported_grant_type", GRANT),
        ("no subject_token", without("subject_token"), "invalid_request", "`subject_token` is required"),
        ("no subject_token_type", without("subject_token_type"), "invalid_request", "`subject_token_type` is required"),
        (
            "a SAML subject",
            base(&[("subject_token_type", "urn:ietf:params:oauth:token-type:saml2")]),
            "invalid_request",
            "`subject_token_type` must be one of",
        ),
        (
            "an actor_token without its type",
            base(&[("actor_token", "x")]),
            "invalid_request",
            "`actor_token_type` is required",
        ),
        (
            "an actor type without a token",
            base(&[("actor_token_type", JWT)]),
            "invalid_request",
            "without `actor_token`",
        ),
        (
            "a refresh token asked for",
            base(&[("requested_token_type", "urn:ietf:params:oauth:token-type:refresh_token")]),
            "invalid_request",
            "`requested_token_type` must be",
        ),
        ("two resources", base(&[("resource", GITHUB_MCP), ("resource", SEARCH)]), "invalid_target", "one `resource`"),
        ("two audiences", base(&[("audience", "github"), ("audience", "search")]), "invalid_target", "one `audience`"),
        (
            "a resource with a fragment",
            base(&[("resource", "https://mcp.example.com/github#x")]),
            "invalid_target",
            "RFC 8707",
        ),
        ("a relative resource", base(&[("resource", "/github")]), "invalid_target", "absolute URI"),
        ("a resource not listed", base(&[("resource", "https://evil.example/mcp")]), "invalid_target", "`resource`"),
        (
            "a resource only differing in a slash",
            base(&[("resource", "https://mcp.example.com/github/")]),
            "invalid_target",
            "`resource`",
        ),
        ("an audience naming no tool", base(&[("audience", "deploy")]), "invalid_target", "`audience`"),
        (
            "a resource and an audience naming two tools",
            base(&[("resource", GITHUB_MCP), ("audience", "search")]),
            "invalid_target",
            "`audience`",
        ),
        ("no tool named among several", base(&[]), "invalid_target", "several tools"),
        (
            "a scope the tool does not carry",
            base(&[("resource", GITHUB_MCP), ("scope", "admin:org")]),
            "invalid_scope",
            "`admin:org` is not one tool `github`",
        ),
        (
            "a data scope of another tool",
            base(&[("resource", SEARCH), ("scope", "data:own-repo")]),
            "invalid_scope",
            "tool `search`",
        ),
        ("an empty scope", base(&[("resource", GITHUB_MCP), ("scope", " ")]), "invalid_scope", "scope tokens"),
        ("a scope with a quote", base(&[("resource", GITHUB_MCP), ("scope", "a\"b")]), "invalid_scope", "scope tokens"),
        (
            "scope given twice",
            base(&[("scope", "issues:read"), ("scope", "pulls:read")]),
            "invalid_request",
            "`scope` is given more than once",
        ),
        (
            "policy given twice",
            base(&[("policy", "other"), ("policy", "agents")]),
            "invalid_request",
            "`policy` is given more than once",
        ),
    ];
    for (what, fields, code, says) in cases {
        // `base` replaced singletons; rebuild the duplicates the case is about.
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let fields = match what {
            "scope given twice" => [fields, vec![("resource", GITHUB_MCP), ("scope", "issues:read")]].concat(),
            "policy given twice" => [fields, vec![("policy", "agents")]].concat(),
            _ => fields,
        };
        let (status, body, cache) = s.post(&fields).await;
        let message = assert_oauth_error(&(status, body), 400, code, &[&job]);
        assert!(message.contains(says), "{what}: `{message}` does not say `{says}`");
        assert_eq!(cache, "no-store", "{what}");
    }
    // Neither `policy` nor `audience`.
    let reply = s.post(&[("grant_type", GRANT), ("subject_token", &job), ("subject_token_type", JWT)]).await;
    assert!(assert_oauth_error(&(reply.0, reply.1), 400, "invalid_request", &[]).contains("`policy` or"));
    // Not a form body.
    let reply = s.post_raw("application/json", json!({"grant_type": GRANT}).to_string()).await;
    assert!(assert_oauth_error(&(reply.0, reply.1), 400, "invalid_request", &[]).contains("x-www-form-urlencoded"));
    // A subject token that does not verify says which token, not why.
    let last = if job.ends_with('A') { 'B' } else { 'A' };
    let forged = format!("{}{last}", &job[..job.len() - 1]);
    let reply = s.exchange(&forged, None, GITHUB_MCP, None).await;
    assert_eq!(
        assert_oauth_error(&reply, 400, "invalid_request", &[&forged]),
        "the subject_token is not valid for this broker"
    );
    let reply = s.exchange(&job, Some("not.a.jwt"), GITHUB_MCP, None).await;
    assert_eq!(assert_oauth_error(&reply, 400, "invalid_request", &[]), "the actor_token is not valid for this broker");
    // None of these minted anything.
    assert_eq!(s.broker.running.app.leases(&Default::default(), 100).await.unwrap().len(), 0);
    let _ = agent;
}

#[tokio::test]
async fn an_unknown_policy_is_refused_exactly_like_a_policy_the_job_does_not_match() {
    let s = setup().await;
    let mut claims = s.ci.claims("github-environment-deploy.json", NOW);
    claims.insert("ref".into(), json!("refs/heads/feature"));
    let fork = s.ci.sign(&claims);
    let unknown = s
        .post(&[
            ("grant_type", GRANT),
            ("subject_token", &s.job_token()),
            ("subject_token_type", JWT),
            ("audience", "nope"),
        ])
        .await;
    let refused = s.exchange(&fork, None, GITHUB_MCP, None).await;
    let a = assert_oauth_error(&(unknown.0, unknown.1), 400, "invalid_request", &[]);
    let b = assert_oauth_error(&refused, 400, "invalid_request", &["refs/heads/feature", "refs/heads/main"]);
    // The same words; only the names in backquotes differ.
    let shape =
        |m: &str| m.split('`').enumerate().map(|(i, part)| if i % 2 == 1 { "_" } else { part }).collect::<String>();
    assert_eq!(shape(&a), shape(&b), "{a} / {b}");
    assert!(a.contains("policy `nope`") && b.contains("policy `agents`"), "{a} / {b}");
    assert!(b.contains("claim `ref`") && !b.contains("octo-org"), "the claim, no value: {b}");
}

#[tokio::test]
async fn an_agent_acts_for_the_job_and_is_named_in_act_and_in_the_audit_event() {
    let ci = FakeIssuer::start().await;
    let agents = FakeIssuer::start().await;
    let extra = Extra {
        hooks_toml: format!(
            "[audit]
file = \"audit.jsonl\"
{}",
            agents_issuer_toml("agents", &agents.url)
        ),
        ..Extra::default()
    };
    let broker = Broker::start_custom(&[("ci", "github-actions", &ci)], &[("agents", AGENTS_POLICY)], &extra).await;
    let s = Setup { ci, agents, broker };
    let job = s.job_token();
    let agent = s.agent_token(REVIEWER);
    let (token, claims) = s.token(&job, Some(&agent), GITHUB_MCP, Some("pulls:read")).await;
    assert_eq!(claims["act"], json!({"sub": REVIEWER, "iss": s.agents.url}));
    let intro = s.broker.introspect(&token).await;
    assert_eq!(intro["act"]["sub"], REVIEWER, "{intro}");
    // A stranger is no admitted actor; the helper is, but not for the search tool.
    let stranger = s.exchange(&s.job_token(), Some(&s.agent_token(STRANGER)), GITHUB_MCP, None).await;
    assert!(assert_oauth_error(&stranger, 400, "invalid_request", &[STRANGER]).contains("`actors`"));
    let helper = s.exchange(&s.job_token(), Some(&s.agent_token(HELPER)), SEARCH, None).await;
    assert!(assert_oauth_error(&helper, 400, "invalid_request", &[]).contains("admits the actor token"));
    let audit = std::fs::read_to_string(s.broker.dir.path().join("audit.jsonl")).unwrap();
    let events: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let issued = events.iter().find(|e| e["event"] == "token-exchange").expect("a token-exchange event");
    assert_eq!(issued["act"], json!({"sub": REVIEWER, "iss": s.agents.url}));
    assert_eq!((issued["resource"].as_str(), issued["scope"].as_str()), (Some(GITHUB_MCP), Some("pulls:read")));
    assert_eq!((issued["tool"].as_str(), issued["actor_rule"].as_str()), (Some("github"), Some("reviewer")));
    assert_eq!(issued["job"], "github:74:7712340001:2:96193868770");
    assert_eq!(issued["access_token_sha256"], ephemera::secret::sha256_hex(token.as_bytes()));
    let denials: Vec<&Value> = events.iter().filter(|e| e["event"] == "denial").collect();
    assert_eq!(denials.len(), 2, "{audit}");
    assert_eq!(denials[0]["deciding_claim"], "actor_token");
    assert!(
        !audit.contains(&token) && !audit.contains(&job) && !audit.contains(&agent),
        "a token reached the audit file"
    );
}

#[tokio::test]
async fn a_chain_three_deep_only_narrows_and_ending_the_job_ends_every_token_of_it() {
    let s = setup().await;
    let job = s.job_token();
    // Depth 1: the reviewer acts for the job.
    let (t1, c1) =
        s.token(&job, Some(&s.agent_token(REVIEWER)), GITHUB_MCP, Some("issues:read pulls:read data:own-repo")).await;
    // Depth 2: the reviewer's token, exchanged by the helper for less.
    let (t2, c2) = s.token(&t1, Some(&s.agent_token(HELPER)), GITHUB_MCP, Some("issues:read data:own-repo")).await;
    assert_eq!(c2["act"], json!({"sub": HELPER, "iss": s.agents.url, "act": {"sub": REVIEWER, "iss": s.agents.url}}));
    assert_eq!(c2["lease_chain"], json!([c1["lease_id"]]));
    assert_eq!(c2["sub"], c1["sub"], "still the job's");
    assert_eq!(c2["data"], c1["data"]);
    // Widening refused: a scope the parent lacks, another tool, no actor.
    let wider = s.exchange(&t1, Some(&s.agent_token(HELPER)), GITHUB_MCP, Some("pulls:write")).await;
    assert!(assert_oauth_error(&wider, 400, "invalid_scope", &[&t1]).contains("can only narrow"));
    let other_tool = s.exchange(&t1, Some(&s.agent_token(REVIEWER)), SEARCH, None).await;
    assert!(assert_oauth_error(&other_tool, 400, "invalid_target", &[&t1]).contains("only for that tool"));
    let no_actor = s.exchange(&t1, None, GITHUB_MCP, None).await;
    assert!(assert_oauth_error(&no_actor, 400, "invalid_request", &[&t1]).contains("actor_token"));
    // Depth 3, without `scope`: the parent's scope, never the tool's whole one; the ttl is the
    // parent's remaining life, not a fresh 10 minutes.
    s.broker.clock.advance(120);
    let (t3, c3) = s.token(&t2, Some(&s.agent_token(REVIEWER)), GITHUB_MCP, None).await;
    assert_eq!(c3["scope"], "issues:read data:own-repo");
    assert_eq!(c3["act"]["act"]["act"]["sub"], REVIEWER);
    assert_eq!(c3["lease_chain"], json!([c1["lease_id"], c2["lease_id"]]));
    assert_eq!(c3["exp"], c1["exp"], "bounded by the parent's exp");
    let narrower = s.exchange(&t2, Some(&s.agent_token(REVIEWER)), GITHUB_MCP, Some("pulls:read")).await;
    assert_oauth_error(&narrower, 400, "invalid_scope", &[]);
    for t in [&t1, &t2, &t3] {
        assert_eq!(s.broker.introspect(t).await["active"], true);
    }
    // The job ends (its own revoke, as the post step sends it): every token of the chain is dead.
    let (status, body) = s.broker.revoke(&job, json!({})).await;
    assert_eq!(status, 200, "{body}");
    for t in [&t1, &t2, &t3] {
        assert_eq!(s.broker.introspect(t).await["active"], false);
    }
    let dead = s.exchange(&t3, Some(&s.agent_token(HELPER)), GITHUB_MCP, None).await;
    assert!(assert_oauth_error(&dead, 400, "invalid_request", &[&t3]).contains("no longer active"));
}

#[tokio::test]
async fn ending_an_agents_token_ends_every_token_derived_from_it_and_chains_stop_at_four_actors() {
    let s = setup().await;
    let (t1, c1) = s.token(&s.job_token(), Some(&s.agent_token(REVIEWER)), GITHUB_MCP, None).await;
    let mut chain = vec![t1.clone()];
    for _ in 0..3 {
        let (t, _) = s.token(chain.last().unwrap(), Some(&s.agent_token(HELPER)), GITHUB_MCP, None).await;
        chain.push(t);
    }
    let too_deep = s.exchange(chain.last().unwrap(), Some(&s.agent_token(HELPER)), GITHUB_MCP, None).await;
    assert!(assert_oauth_error(&too_deep, 400, "invalid_request", &[]).contains("at most 4 actors"));
    // The reviewer's token ends (by its lease id, as the job may end one lease): the helper's
    // tokens below it end with it, in the ledger too, and the reply lists them.
    let (status, reply) = s.broker.revoke(&s.job_token(), json!({"lease_id": c1["lease_id"]})).await;
    assert_eq!(status, 200);
    let revoked = reply["revoked"].as_array().unwrap();
    assert_eq!(revoked.len(), 4, "the lease and the three below it: {reply}");
    assert_eq!(revoked[0], c1["lease_id"]);
    for t in &chain {
        assert_eq!(s.broker.introspect(t).await["active"], false);
        let lease = s.broker.running.app.lease(payload(t)["lease_id"].as_str().unwrap()).await.unwrap().unwrap();
        assert_eq!(lease.state, ephemera::ledger::LeaseState::Revoked);
        if *t != t1 {
            assert_eq!(lease.reason.as_deref(), Some("parent-ended"));
        }
    }
    let below = s.exchange(&chain[2], Some(&s.agent_token(HELPER)), GITHUB_MCP, None).await;
    assert!(assert_oauth_error(&below, 400, "invalid_request", &[]).contains("no longer active"));
}

/// The chain check on its own: a token whose own lease is live but an ancestor's is not (the
/// cascade could not end it, e.g. the store failed at that moment) is still dead.
#[tokio::test]
async fn a_token_whose_ancestor_lease_ended_is_inactive_even_while_its_own_lease_is_live() {
    let s = setup().await;
    let (t1, c1) = s.token(&s.job_token(), Some(&s.agent_token(REVIEWER)), GITHUB_MCP, None).await;
    let (t2, c2) = s.token(&t1, Some(&s.agent_token(HELPER)), GITHUB_MCP, None).await;
    // End only the parent's lease, past the cascade (the store's own call, as a crash between
    // the two would leave it).
    let store = s.broker.running.app.store();
    let id = c1["lease_id"].as_str().unwrap();
    let work = store.begin_revoke(id, "admin", s.broker.clock_now()).await.unwrap().unwrap();
    store.finish_revoke(&work.lease_id, None, s.broker.clock_now()).await.unwrap();
    let own = s.broker.running.app.lease(c2["lease_id"].as_str().unwrap()).await.unwrap().unwrap();
    assert_eq!(own.state, ephemera::ledger::LeaseState::Active, "its own lease is live");
    assert_eq!(s.broker.introspect(&t2).await["active"], false);
    let further = s.exchange(&t2, Some(&s.agent_token(HELPER)), GITHUB_MCP, None).await;
    assert!(assert_oauth_error(&further, 400, "invalid_request", &[]).contains("derived from has ended"));
}

#[tokio::test]
async fn may_act_limits_who_may_exchange_a_grant_token_minted_for_the_broker() {
    let s = setup().await;
    let (status, body) = s.broker.exchange(&s.job_token(), "agents").await;
    assert_eq!(status, 201, "{body}");
    let delegate = body["credentials"]["delegate"]["token"].as_str().unwrap().to_string();
    let api = body["credentials"]["api"]["token"].as_str().unwrap().to_string();
    assert_eq!(payload(&delegate)["aud"], BROKER);
    // The helper is an admitted actor, but not the one `may_act` names.
    let helper = s.exchange(&delegate, Some(&s.agent_token(HELPER)), GITHUB_MCP, None).await;
    assert!(assert_oauth_error(&helper, 400, "invalid_request", &[&delegate]).contains("`may_act`"));
    let nobody = s.exchange(&delegate, None, GITHUB_MCP, None).await;
    assert_oauth_error(&nobody, 400, "invalid_request", &[]);
    // The reviewer is: a grant's JWT has no scope of its own, so the tool's whole scope.
    let (t, c) = s.token(&delegate, Some(&s.agent_token(REVIEWER)), GITHUB_MCP, None).await;
    assert_eq!(c["scope"], "issues:read pulls:read pulls:write data:own-repo");
    assert_eq!(c["lease_chain"], json!([body["lease_id"]]));
    assert_eq!(s.broker.introspect(&t).await["active"], true);
    // A grant JWT for another service is not exchanged: that service could otherwise turn the
    // job's token for it into tokens for every tool (confused deputy).
    let deputy = s.exchange(&api, Some(&s.agent_token(REVIEWER)), GITHUB_MCP, None).await;
    assert!(assert_oauth_error(&deputy, 400, "invalid_request", &[&api]).contains("another audience"));
    // A chain stays under its policy.
    let (status, other, _) = s
        .post(&[
            ("grant_type", GRANT),
            ("subject_token", &t),
            ("subject_token_type", ACCESS_TOKEN),
            ("actor_token", &s.agent_token(REVIEWER)),
            ("actor_token_type", JWT),
            ("policy", "other"),
            ("resource", GITHUB_MCP),
        ])
        .await;
    assert!(assert_oauth_error(&(status, other), 400, "invalid_request", &[]).contains("claim `policy`"));
}

#[tokio::test]
async fn the_token_endpoint_is_advertised_in_the_rfc_8414_metadata() {
    let s = setup().await;
    let (status, text) = s.broker.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(status, 200);
    let meta: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(meta["token_endpoint"], format!("{BROKER}/oauth/token"));
    assert_eq!(meta["grant_types_supported"], json!([GRANT]));
    let (_, text) = s.broker.get("/.well-known/openid-configuration").await;
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["token_endpoint"], format!("{BROKER}/oauth/token"));
    let (_, metrics) = s.broker.get("/metrics").await;
    let _ = s.exchange(&s.job_token(), None, GITHUB_MCP, None).await;
    let (_, metrics_after) = s.broker.get("/metrics").await;
    assert!(!metrics.contains("ephemera_token_exchanges_total{policy=\"agents\",outcome=\"issued\"} 1"));
    assert!(
        metrics_after.contains("ephemera_token_exchanges_total{policy=\"agents\",outcome=\"issued\"} 1"),
        "{metrics_after}"
    );
}

/// An agent whose identity is a token this broker issued (its own job's exchange, a grant for
/// the broker itself) acts under actor rules whose issuer is `broker`; a broker JWT for another
/// audience, or one whose lease ended, is no actor.
#[tokio::test]
async fn an_agent_identity_token_this_broker_issued_acts_while_its_lease_lives() {
    let s = setup().await;
    let (status, agent_job) = s.broker.exchange(&s.job_token(), "agent-job").await;
    assert_eq!(status, 201, "{agent_job}");
    let identity = agent_job["credentials"]["identity"]["token"].as_str().unwrap().to_string();
    let api = agent_job["credentials"]["api"]["token"].as_str().unwrap().to_string();
    let (_, claims) = s.token(&s.job_token(), Some(&identity), GITHUB_MCP, Some("issues:read")).await;
    assert_eq!(claims["act"], json!({"sub": payload(&identity)["sub"], "iss": BROKER}));
    let other = s.exchange(&s.job_token(), Some(&api), GITHUB_MCP, None).await;
    assert!(assert_oauth_error(&other, 400, "invalid_request", &[&api]).contains("another audience"));
    let (status, _) = s.broker.revoke(&s.job_token(), json!({"lease_id": agent_job["lease_id"]})).await;
    assert_eq!(status, 200);
    let ended = s.exchange(&s.job_token(), Some(&identity), GITHUB_MCP, None).await;
    assert_eq!(
        assert_oauth_error(&ended, 400, "invalid_request", &[&identity]),
        "the actor_token is no longer active: its lease has ended"
    );
}

/// Fail closed, as an exchange does: when the audit event cannot be written, the token's lease
/// is ended before the token leaves, and the answer is 503 `temporarily_unavailable`.
#[tokio::test]
async fn a_token_exchange_that_cannot_be_audited_ends_its_lease_and_issues_nothing() {
    let ci = FakeIssuer::start().await;
    let agents = FakeIssuer::start().await;
    let extra = Extra {
        hooks_toml: format!("[audit]\nfile = \"/dev/full\"\n{}", agents_issuer_toml("agents", &agents.url)),
        ..Extra::default()
    };
    let broker = Broker::start_custom(&[("ci", "github-actions", &ci)], &[("agents", AGENTS_POLICY)], &extra).await;
    let s = Setup { ci, agents, broker };
    let (status, body) = s.exchange(&s.job_token(), None, GITHUB_MCP, None).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("temporarily_unavailable")), "{body}");
    assert!(body.get("access_token").is_none());
    let leases = s.broker.running.app.leases(&Default::default(), 10).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(
        (leases[0].state, leases[0].reason.as_deref()),
        (ephemera::ledger::LeaseState::Revoked, Some("audit-unavailable"))
    );
}
