//! `ephemera policy explain` and admin `POST /v1/explain`: every deny and match rule of a policy
//! against a claim set, each with its outcome, the claim's value and the rule, and the decision.
//! Nothing is minted. The decision is the one [`Policy::evaluate`] makes (a test holds them
//! together); the trace only adds the rules evaluation did not need to look at.

use super::delegation::Actor;
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
    /// The tools a token exchange may issue tokens for (`tools`), with what each may carry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolTrace>,
    /// Every actor rule (`actors`): evaluated against the actor's claims when they are given.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<ActorTrace>,
    /// With actor claims: the actor rule that admits the actor (`null`: none does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_decision: Option<ActorDecision>,
}

#[derive(Debug, Serialize)]
pub struct ToolTrace {
    pub name: String,
    pub resource: String,
    /// Scopes and `data:NAME` data scopes a token for it may carry.
    pub scopes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ActorTrace {
    pub name: String,
    pub issuer: String,
    /// The tools it may get tokens for (`null`: all).
    pub tools: Option<Vec<String>>,
    /// Deny rules, then match rules; with no actor claims, `value` is null and `pass` false.
    pub rules: Vec<RuleTrace>,
    /// With actor claims: does this rule admit the actor (issuer, deny and match rules)?
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admits: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct ActorDecision {
    /// The configured issuer the actor's claims come from.
    pub issuer: String,
    /// The first actor rule that admits it, if any (a rule's `tools` still limit where it acts).
    pub admitted_by: Option<String>,
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
        self.explain_with_actor(issuer, claims, None)
    }

    /// [`Policy::explain`], and the actor rules against an actor's claims from the configured
    /// issuer named first in `actor`.
    pub fn explain_with_actor(&self, issuer: &str, claims: &Claims, actor: Option<(&str, &Claims)>) -> Trace {
        let rules = trace_rules(&self.deny_rules, &self.match_rules, claims);
        let no_claims = Claims::new();
        let actors = self
            .actors
            .iter()
            .map(|rule| ActorTrace {
                name: rule.name.clone(),
                issuer: rule.issuer.clone(),
                tools: rule.tools.clone(),
                rules: trace_rules(&rule.deny_rules, &rule.match_rules, actor.map_or(&no_claims, |(_, c)| c)),
                admits: actor.map(|(issuer, claims)| rule.admits(Actor { issuer, claims })),
            })
            .collect::<Vec<_>>();
        let actor_decision = actor.map(|(issuer, _)| ActorDecision {
            issuer: issuer.to_string(),
            admitted_by: actors.iter().find(|a| a.admits == Some(true)).map(|a| a.name.clone()),
        });
        let tools = self
            .tools
            .iter()
            .map(|t| ToolTrace { name: t.name.clone(), resource: t.resource.clone(), scopes: t.allowed().collect() })
            .collect();
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
            tools,
            actors,
            actor_decision,
        }
    }
}

/// Deny rules then match rules against `claims`, each with its outcome.
fn trace_rules(deny: &[Rule], matching: &[Rule], claims: &Claims) -> Vec<RuleTrace> {
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
    let mut rules: Vec<RuleTrace> = deny.iter().map(|r| trace_rule("deny", r)).collect();
    rules.extend(matching.iter().map(|r| trace_rule("match", r)));
    rules
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
        for t in &self.tools {
            out.push_str(&format!("tool {} — resource {} — may carry: {}\n", t.name, t.resource, t.scopes.join(" ")));
        }
        for a in &self.actors {
            let tools = a.tools.as_ref().map_or_else(|| "every tool".to_string(), |t| t.join(", "));
            let verdict = match a.admits {
                None => String::new(),
                Some(true) => " — admits the actor".to_string(),
                Some(false) => " — does not admit the actor".to_string(),
            };
            out.push_str(&format!("actor {} — issuer `{}`, for {tools}{verdict}\n", a.name, a.issuer));
            for r in &a.rules {
                match a.admits {
                    None => out.push_str(&format!("        {:<5} {} — rule {}\n", r.section, r.claim, r.rule)),
                    Some(_) => {
                        let value = if r.value.is_null() { "(missing)".to_string() } else { r.value.to_string() };
                        out.push_str(&format!(
                            "  {}  {:<5} {} = {} — rule {}\n",
                            mark(r.pass),
                            r.section,
                            r.claim,
                            value,
                            r.rule
                        ));
                    }
                }
            }
        }
        if let Some(d) = &self.actor_decision {
            match &d.admitted_by {
                Some(rule) => out.push_str(&format!("actor decision: admitted by `{rule}` (issuer `{}`)\n", d.issuer)),
                None => out.push_str(&format!("actor decision: not admitted (issuer `{}`)\n", d.issuer)),
            }
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
