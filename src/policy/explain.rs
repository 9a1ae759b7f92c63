//! `ephemera policy explain` and admin `POST /v1/explain`: every deny and match rule of a policy
//! against a claim set, each with its outcome, the claim's value and the rule, and the decision.
//! Nothing is minted. The decision is the one [`Policy::evaluate`] makes (a test holds them
//! together); the trace only adds the rules evaluation did not need to look at.

use super::matcher::Matcher;
use super::{Policy, Rule};
use crate::claims::Claims;
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Serialize)]
pub struct Trace {
    pub policy: String,
    pub issuer: IssuerCheck,
    /// Deny rules first, then match rules, in evaluation order.
    pub rules: Vec<RuleTrace>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The claim that decided a denial (the first failing check, as the exchange reports it).
    pub deciding_claim: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct IssuerCheck {
    pub policy_issuer: String,
    pub token_issuer: String,
    pub pass: bool,
}

#[derive(Debug, Serialize)]
pub struct RuleTrace {
    /// `deny` or `match`.
    pub section: &'static str,
    pub claim: String,
    pub rule: String,
    /// The claim's value in the claim set (`null` when missing).
    pub value: Value,
    /// Did the rule hold? For a deny rule, holding means it denies.
    pub holds: bool,
    /// Does this rule let the request through? (match rules that hold, deny rules that do not)
    pub pass: bool,
}

impl Policy {
    /// Explains the decision for `claims` from issuer `issuer` (a configured issuer's name).
    pub fn explain(&self, issuer: &str, claims: &Claims) -> Trace {
        let trace_rule = |section: &'static str, rule: &Rule| {
            let holds = rule.matcher.matches(claims.get(&rule.claim));
            RuleTrace {
                section,
                claim: rule.claim.clone(),
                rule: describe(&rule.matcher),
                value: claims.get(&rule.claim).cloned().unwrap_or(Value::Null),
                holds,
                pass: if section == "deny" { !holds } else { holds },
            }
        };
        let mut rules: Vec<RuleTrace> = self.deny_rules.iter().map(|r| trace_rule("deny", r)).collect();
        rules.extend(self.match_rules.iter().map(|r| trace_rule("match", r)));
        let denial = self.evaluate(issuer, claims).err();
        Trace {
            policy: self.name.to_string(),
            issuer: IssuerCheck {
                policy_issuer: self.issuer.clone(),
                token_issuer: issuer.to_string(),
                pass: issuer == self.issuer,
            },
            rules,
            decision: if denial.is_none() { "allow" } else { "deny" },
            deciding_claim: denial.map(|d| d.claim),
        }
    }
}

/// A matcher as a person reads it.
pub fn describe(m: &Matcher) -> String {
    match m {
        Matcher::Exact(v) => format!("{v:?}"),
        Matcher::AnyOf(vs) => format!("any of {vs:?}"),
        Matcher::Glob { source, .. } => format!("glob {source:?}"),
        Matcher::Regex { source, .. } => format!("regex {source:?}"),
        Matcher::Not(inner) => format!("not ({})", describe(inner)),
        Matcher::Exists(b) => format!("exists: {b}"),
        Matcher::Contains(inner) => format!("contains ({})", describe(inner)),
    }
}

impl Trace {
    /// A plain-text table for the terminal.
    pub fn render(&self) -> String {
        let mut out = format!("policy {}\n", self.policy);
        let mark = |pass: bool| if pass { "pass" } else { "FAIL" };
        out.push_str(&format!(
            "  {}  issuer: policy wants `{}`, token is from `{}`\n",
            mark(self.issuer.pass),
            self.issuer.policy_issuer,
            self.issuer.token_issuer
        ));
        for r in &self.rules {
            let value = if r.value.is_null() { "(missing)".to_string() } else { r.value.to_string() };
            out.push_str(&format!("  {}  {:<5} {} = {} — rule {}\n", mark(r.pass), r.section, r.claim, value, r.rule));
        }
        match &self.deciding_claim {
            None => out.push_str("decision: allow\n"),
            Some(claim) => out.push_str(&format!("decision: deny (deciding claim `{claim}`)\n")),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::Platform;
    use crate::claims::tests::fixture;
    use crate::policy::{LoadContext, PolicySet};

    #[test]
    fn the_trace_reports_every_rule_and_agrees_with_evaluate() {
        let yaml = r#"
issuer: github
match: {repository_id: "74", ref: refs/heads/main, environment: [production]}
deny: {event_name: [pull_request_target], runner_environment: self-hosted}
ttl: {default: 5m, max: 10m}
grants: {api: {backend: jwt, audience: x}}
"#;
        let ctx = LoadContext {
            issuers: [("github".to_string(), Platform::GithubActions.into())].into(),
            backends: [("jwt".to_string(), ("jwt", 3600))].into(),
            renew_max_lease_secs: 12 * 3600,
        };
        let set = PolicySet::load(None, &[("p", yaml)], &ctx).unwrap();
        let policy = set.get("p").unwrap();
        for name in
            ["github-environment-deploy.json", "github-pull-request-from-fork.json", "github-push-immutable-sub.json"]
        {
            let claims = fixture(name);
            let trace = policy.explain("github", &claims);
            assert_eq!(trace.rules.len(), 5, "every rule is reported, even after the first failure");
            assert_eq!(trace.decision == "allow", policy.evaluate("github", &claims).is_ok(), "{name}");
            assert_eq!(trace.deciding_claim, policy.evaluate("github", &claims).err().map(|d| d.claim), "{name}");
        }
        let fork = policy.explain("github", &fixture("github-pull-request-from-fork.json"));
        assert_eq!(fork.deciding_claim.as_deref(), Some("event_name"));
        let env_rule = fork.rules.iter().find(|r| r.claim == "environment").unwrap();
        assert_eq!(
            (env_rule.value.clone(), env_rule.pass),
            (Value::Null, false),
            "a missing claim fails its match rule"
        );
        assert!(fork.render().contains("FAIL  deny  event_name = \"pull_request_target\""), "{}", fork.render());
        assert_eq!(
            policy.explain("gitlab", &fixture("github-push-immutable-sub.json")).deciding_claim.as_deref(),
            Some("iss")
        );
    }
}
