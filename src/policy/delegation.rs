//! Delegation (RFC 8693 token exchange, issue 19): which agents may act for a job (`actors`),
//! which tool servers its tokens may be for (`tools`), which scopes and data those tokens may
//! carry (`data`), compiled from a policy; and the decision for one request at
//! `POST /oauth/token`, which along a chain of exchanges only ever narrows.
//!
//! The attacks this answers, each at its check below: an agent nobody admitted acting for a
//! job; a token for one tool server replayed at another (every token names exactly one
//! `resource` as its `aud`); a delegated token exchanged into more than it was (scopes, data,
//! tool or lifetime wider than its parent's).

use super::compile::{Errors, check_immutable_binding, compile_rules};
use super::decision::{Denial, DenialReason, Grant, GrantedCredential, ResolvedSpec};
use super::file::{ActorFile, ToolFile};
use super::load::LoadContext;
use super::template::TemplateValue;
use super::{Policy, PolicySet, Rule};
use crate::claims::Claims;
use crate::clock::UnixSeconds;
use crate::identity::VerifiedIdentity;
use crate::names::is_name;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// The issuer actor rules name for agents' identity tokens this broker issued itself (a grant's
/// JWT whose audience is the broker, from the agent's own exchange).
pub const BROKER_ACTOR_ISSUER: &str = "broker";
/// A scope that asks for a data scope: `data:NAME`.
pub const DATA_SCOPE_PREFIX: &str = "data:";
/// The longest `resource` URI a tool may have (and a request may send).
pub const MAX_RESOURCE_BYTES: usize = 512;
/// The most scopes (tool scopes and data scopes) one tool may list.
const MAX_SCOPES: usize = 64;

/// An agent admitted to act for the job.
#[derive(Debug)]
pub struct ActorRule {
    pub name: String,
    /// The configured issuer that verifies the actor token.
    pub issuer: String,
    pub match_rules: Vec<Rule>,
    pub deny_rules: Vec<Rule>,
    /// The tools it may get tokens for (`None`: every tool of the policy).
    pub tools: Option<Vec<String>>,
    /// The scopes (`data:NAME` for data) it may get (`None`: all its tools carry).
    pub scopes: Option<Vec<String>>,
}

/// A tool server tokens may be issued for.
#[derive(Debug)]
pub struct Tool {
    pub name: String,
    /// Compared exactly with the request's `resource`; the token's `aud`.
    pub resource: String,
    /// The `jwt` backend that signs its tokens.
    pub backend: String,
    /// OAuth scopes it may carry.
    pub scopes: Vec<String>,
    /// Data scope names it may carry.
    pub data: Vec<String>,
}

impl Tool {
    /// Everything a token for this tool may carry, as scope strings (`data:NAME` for data).
    pub fn allowed(&self) -> impl Iterator<Item = String> + '_ {
        self.scopes.iter().cloned().chain(self.data.iter().map(|d| format!("{DATA_SCOPE_PREFIX}{d}")))
    }
}

/// What the agent's verified token says: its configured issuer's name and its claims.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub issuer: &'a str,
    pub claims: &'a Claims,
}

/// The subject token's own bounds when it is a token this broker issued: a child never gets
/// more than these.
#[derive(Debug, Clone)]
pub struct Parent {
    /// The tool it is for, when it is a tool token (`None`: a grant's JWT minted to be
    /// exchanged, whose bounds are its policy's).
    pub tool: Option<String>,
    /// Its scopes (tool and data), when it is a tool token.
    pub scopes: Option<BTreeSet<String>>,
    /// When it, or its lease, ends, whichever is first.
    pub expires_at: UnixSeconds,
}

/// One request at `POST /oauth/token`, as the policy decides it.
#[derive(Debug)]
pub struct Delegation<'a> {
    /// `resource`: the tool server's URI.
    pub resource: Option<&'a str>,
    /// `audience` naming a tool (when `policy` names the policy).
    pub tool: Option<&'a str>,
    /// `scope`, split; `None`: the tool's (or the parent's) whole scope.
    pub scopes: Option<&'a [String]>,
    pub actor: Option<Actor<'a>>,
    pub parent: Option<&'a Parent>,
    /// Claims the token carries that come from the tokens, not from the policy (`act`, the
    /// lease chain). The policy's own claims (`scope`, `tool`, `data`) overwrite none of them.
    pub carry: Map<String, Value>,
}

/// What was decided besides the grant: for the reply and the audit event.
#[derive(Debug, Clone)]
pub struct Delegated {
    pub tool: String,
    pub resource: String,
    /// Granted scopes, space-separated, in the order asked (or the tool's order).
    pub scope: String,
    /// The actor rule that admitted the actor.
    pub actor_rule: Option<String>,
}

impl PolicySet {
    /// The decision for a token exchange (DESIGN §1 step 2 for `POST /oauth/token`): the named
    /// policy's issuer, deny and match rules on the job's claims, exactly as for an exchange;
    /// then the tool, the actor, the scopes and the lifetime. The grant is one `jwt` credential
    /// for the tool. Pure: `now` is an argument.
    pub fn decide_delegation(
        &self,
        name: &str,
        identity: &VerifiedIdentity,
        ask: Delegation<'_>,
        now: UnixSeconds,
    ) -> Result<(Grant, Delegated), Denial> {
        // The job first, so a caller whose job the policy refuses learns nothing about its tools
        // (and an unknown policy answers like a refusing one: no oracle of policy names).
        let policy = self.get(name).ok_or_else(|| Denial::new(name, "iss", DenialReason::UnknownPolicy))?;
        policy.evaluate(identity.issuer(), identity.claims())?;
        let tool = policy.pick_tool(&ask)?;
        let actor_rule = match ask.actor {
            None => None,
            Some(actor) => Some(policy.admit_actor(actor, tool)?),
        };
        let granted = policy.grant_scopes(tool, actor_rule, ask.scopes, ask.parent)?;
        // A token never outlives its job (GitLab: the job token's `exp`), nor its parent.
        let mut expires_at = now + policy.ttl_default_secs;
        if identity.platform() == crate::claims::Platform::GitlabCi {
            expires_at = expires_at.min(identity.expires_at());
        }
        if let Some(parent) = ask.parent {
            expires_at = expires_at.min(parent.expires_at);
        }
        let mut claims = ask.carry;
        claims.insert("scope".into(), Value::String(granted.join(" ")));
        claims.insert("tool".into(), Value::String(tool.name.clone()));
        let data = policy.render_data(&granted, tool, identity.claims())?;
        if !data.is_empty() {
            claims.insert("data".into(), Value::Object(data));
        }
        let credential = GrantedCredential {
            name: tool.name.clone(),
            backend: tool.backend.clone(),
            spec: ResolvedSpec::Jwt { audience: tool.resource.clone(), claims },
        };
        let grant = Grant {
            policy: policy.name.clone(),
            identity: identity.clone(),
            ttl_secs: (expires_at - now).max(0),
            expires_at,
            renew_until: None,
            credentials: vec![credential],
        };
        let delegated = Delegated {
            tool: tool.name.clone(),
            resource: tool.resource.clone(),
            scope: granted.join(" "),
            actor_rule: actor_rule.map(|r| r.name.clone()),
        };
        Ok((grant, delegated))
    }
}

impl Policy {
    /// The tool a request is for: by `resource`, by `audience` naming it, by the parent's tool,
    /// or the policy's only tool.
    fn pick_tool(&self, ask: &Delegation<'_>) -> Result<&Tool, Denial> {
        let refuse = |claim: &str, reason: DenialReason| Denial::new(&self.name, claim, reason);
        if self.tools.is_empty() {
            return Err(refuse("resource", DenialReason::NoTools));
        }
        let by_resource = match ask.resource {
            None => None,
            // Exact comparison: no normalisation, so `https://a/` and `https://a` are two
            // resources, and no trick of case or escaping reaches a tool it does not name.
            Some(r) => Some(
                self.tools
                    .iter()
                    .find(|t| t.resource == r)
                    .ok_or_else(|| refuse("resource", DenialReason::TargetNotListed))?,
            ),
        };
        let by_name = match ask.tool {
            None => None,
            Some(n) => Some(
                self.tools
                    .iter()
                    .find(|t| t.name == n)
                    .ok_or_else(|| refuse("audience", DenialReason::TargetNotListed))?,
            ),
        };
        let parent_tool = ask.parent.and_then(|p| p.tool.as_deref());
        let tool = match (by_resource, by_name) {
            (Some(a), Some(b)) if a.name != b.name => return Err(refuse("audience", DenialReason::TargetNotListed)),
            (Some(t), _) | (None, Some(t)) => t,
            (None, None) => match parent_tool {
                Some(name) => self
                    .tools
                    .iter()
                    .find(|t| t.name == name)
                    .ok_or_else(|| refuse("tool", DenialReason::TargetNotListed))?,
                None if self.tools.len() == 1 => &self.tools[0],
                None => return Err(refuse("resource", DenialReason::TargetAmbiguous)),
            },
        };
        // Attack: a token for one tool server, exchanged for a token to another, would carry
        // the first server's trust to a place the delegation never meant.
        if parent_tool.is_some_and(|p| p != tool.name) {
            return Err(refuse("resource", DenialReason::ToolChanged { tool: parent_tool.unwrap_or_default().into() }));
        }
        Ok(tool)
    }

    /// The first actor rule that admits the actor for `tool`: its issuer, no deny rule, every
    /// match rule, and the tool among its tools. Deny by default: no rule, no actor.
    fn admit_actor(&self, actor: Actor<'_>, tool: &Tool) -> Result<&ActorRule, Denial> {
        self.actors
            .iter()
            .find(|rule| rule.admits(actor) && rule.tools.as_ref().is_none_or(|tools| tools.contains(&tool.name)))
            .ok_or_else(|| Denial::new(&self.name, "actor_token", DenialReason::ActorNotAdmitted))
    }

    /// The scopes granted: those asked (each one the tool's and, along a chain, the parent's),
    /// or when none are asked, all the tool's that the parent has.
    fn grant_scopes(
        &self,
        tool: &Tool,
        actor: Option<&ActorRule>,
        asked: Option<&[String]>,
        parent: Option<&Parent>,
    ) -> Result<Vec<String>, Denial> {
        // What the tool carries, and of that, what the acting agent may get.
        let for_actor = |s: &String| actor.and_then(|a| a.scopes.as_ref()).is_none_or(|list| list.contains(s));
        let allowed: Vec<String> = tool.allowed().filter(for_actor).collect();
        let in_parent = |s: &str| parent.and_then(|p| p.scopes.as_ref()).is_none_or(|set| set.contains(s));
        let Some(asked) = asked else {
            return Ok(allowed.into_iter().filter(|s| in_parent(s)).collect());
        };
        let mut granted: Vec<String> = Vec::with_capacity(asked.len());
        for scope in asked {
            if !allowed.contains(scope) {
                let reason = match (tool.allowed().any(|s| s == *scope), actor) {
                    (true, Some(actor)) => {
                        DenialReason::ScopeNotForActor { scope: scope.clone(), actor: actor.name.clone() }
                    }
                    _ => DenialReason::ScopeNotGranted { scope: scope.clone(), tool: tool.name.clone() },
                };
                return Err(Denial::new(&self.name, "scope", reason));
            }
            // Attack: a delegated token exchanged for more than it carries. Scopes and data
            // only narrow along a chain.
            if !in_parent(scope) {
                return Err(Denial::new(&self.name, "scope", DenialReason::ScopeWidened { scope: scope.clone() }));
            }
            if !granted.contains(scope) {
                granted.push(scope.clone());
            }
        }
        Ok(granted)
    }

    /// The data scopes among `granted`, rendered from the job's claims.
    fn render_data(&self, granted: &[String], tool: &Tool, claims: &Claims) -> Result<Map<String, Value>, Denial> {
        let mut out = Map::new();
        for name in granted.iter().filter_map(|s| s.strip_prefix(DATA_SCOPE_PREFIX)) {
            let Some((_, template)) = self.data.iter().find(|(n, _)| n == name) else { continue };
            let value = template.render(claims).map_err(|claim| {
                Denial::new(&self.name, &claim, DenialReason::TemplateClaimMissing { grant: tool.name.clone() })
            })?;
            out.insert(name.to_string(), value);
        }
        Ok(out)
    }
}

impl ActorRule {
    /// Its issuer, no deny rule holds, every match rule holds.
    pub fn admits(&self, actor: Actor<'_>) -> bool {
        actor.issuer == self.issuer
            && !self.deny_rules.iter().any(|r| r.matcher.matches(actor.claims.get(&r.claim)))
            && self.match_rules.iter().all(|r| r.matcher.matches(actor.claims.get(&r.claim)))
    }
}

// ---- compiling -----------------------------------------------------------------------------

/// Is `text` an OAuth scope token (RFC 6749 §3.3: printable ASCII but space, `"` and `\`), at
/// most 128 bytes?
pub fn is_scope(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 128
        && text.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// Is `text` a resource URI a tool may name (RFC 8707 §2): absolute (`scheme:`), no fragment,
/// printable ASCII without spaces, at most [`MAX_RESOURCE_BYTES`]?
pub fn is_resource(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once(':') else { return false };
    let mut scheme_bytes = scheme.bytes();
    text.len() <= MAX_RESOURCE_BYTES
        && !rest.is_empty()
        && scheme_bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme_bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        && !text.contains('#')
        && text.bytes().all(|b| b.is_ascii_graphic())
}

/// The `data` section: name → value whose strings are templates.
pub(super) fn compile_data(data: &BTreeMap<String, Value>, errors: &mut Errors<'_>) -> Vec<(String, TemplateValue)> {
    let mut out = Vec::new();
    for (name, value) in data {
        if !is_name(name) {
            errors.push(format!("data.{name}"), "a data scope name must match [a-z0-9][a-z0-9-_]*");
        }
        match TemplateValue::parse(value) {
            Ok(t) => out.push((name.clone(), t)),
            Err(e) => errors.push(format!("data.{name}"), e),
        }
    }
    out
}

/// The `tools` section: each a resource URI, a `jwt` backend, its scopes and data scopes.
pub(super) fn compile_tools(
    tools: &BTreeMap<String, ToolFile>,
    data: &[(String, TemplateValue)],
    ctx: &LoadContext,
    ttl_max_secs: i64,
    errors: &mut Errors<'_>,
) -> Vec<Tool> {
    let mut out: Vec<Tool> = Vec::new();
    for (name, file) in tools {
        let field = |sub: &str| format!("tools.{name}.{sub}");
        if !is_name(name) {
            errors.push(format!("tools.{name}"), "a tool name must match [a-z0-9][a-z0-9-_]*");
        }
        if !is_resource(&file.resource) {
            errors.push(
                field("resource"),
                format!(
                    "must be an absolute URI without a fragment, printable ASCII, at most {MAX_RESOURCE_BYTES} bytes"
                ),
            );
        }
        if let Some(other) = out.iter().find(|t| t.resource == file.resource) {
            errors.push(field("resource"), format!("is also tool `{}`'s: a resource names one tool", other.name));
        }
        match ctx.backends.get(&file.backend) {
            Some(("jwt", max)) if ttl_max_secs > *max => errors.lint(
                super::lint::TTL_ABOVE_BACKEND_MAX,
                field("backend"),
                format!(
                    "ttl.max {} is above backend `{}`'s max_ttl {}",
                    crate::clock::format_duration(ttl_max_secs),
                    file.backend,
                    crate::clock::format_duration(*max)
                ),
            ),
            Some(("jwt", _)) => {}
            Some((kind, _)) => errors.push(
                field("backend"),
                format!("`{}` is a `{kind}` backend; tool tokens are signed by a `jwt` backend", file.backend),
            ),
            None => errors.push(field("backend"), format!("`{}` is not a backend in the broker config", file.backend)),
        }
        if file.scopes.len() + file.data.len() > MAX_SCOPES {
            errors.push(format!("tools.{name}"), format!("at most {MAX_SCOPES} scopes and data scopes"));
        }
        for scope in &file.scopes {
            if !is_scope(scope) || scope.starts_with(DATA_SCOPE_PREFIX) {
                errors.push(
                    field("scopes"),
                    format!(
                        "`{}` is not a scope (printable ASCII without space, `\"` or `\\`, at most 128; `data:` names data scopes)",
                        crate::clock::truncate(scope, 40)
                    ),
                );
            }
        }
        for d in &file.data {
            if !data.iter().any(|(n, _)| n == d) {
                errors.push(
                    field("data"),
                    format!("`{}` is not a data scope of this policy", crate::clock::truncate(d, 64)),
                );
            }
        }
        let mut scopes = file.scopes.clone();
        dedup_keep_order(&mut scopes);
        let mut data_names = file.data.clone();
        dedup_keep_order(&mut data_names);
        out.push(Tool {
            name: name.clone(),
            resource: file.resource.clone(),
            backend: file.backend.clone(),
            scopes,
            data: data_names,
        });
    }
    out
}

/// The `actors` section: each an issuer of the config, its rules (binding one of the issuer's
/// identity claims, as a policy's `match` must), and the tools it may get tokens for.
pub(super) fn compile_actors(
    actors: &BTreeMap<String, ActorFile>,
    tools: &[Tool],
    ctx: &LoadContext,
    errors: &mut Errors<'_>,
) -> Vec<ActorRule> {
    if !actors.is_empty() && tools.is_empty() {
        errors.push("actors", "actors act only through tools: list the tools they may get tokens for under `tools`");
    }
    let mut out = Vec::new();
    for (name, file) in actors {
        let section = format!("actors.{name}");
        if !is_name(name) {
            errors.push(section.clone(), "an actor rule name must match [a-z0-9][a-z0-9-_]*");
        }
        let match_rules = compile_rules(&format!("{section}.match"), &file.match_rules, errors);
        let deny_rules = compile_rules(&format!("{section}.deny"), &file.deny, errors);
        match ctx.issuers.get(&file.issuer) {
            // Two issuers by one name: the config's wins nowhere; say so.
            Some(_) if file.issuer == BROKER_ACTOR_ISSUER => errors.push(
                format!("{section}.issuer"),
                format!(
                    "`{BROKER_ACTOR_ISSUER}` names this broker's own tokens, and an issuer in the config has that name too: rename the issuer"
                ),
            ),
            // Attack: an actor rule that pins no identity admits every agent of its issuer.
            Some(facts) => check_immutable_binding(&match_rules, facts, &format!("{section}.match"), errors),
            // The broker's own tokens: every job whose policy grants a JWT for the broker could
            // present one; the rule must pin the policy that minted it or the job.
            None if file.issuer == BROKER_ACTOR_ISSUER => {
                if !match_rules.iter().any(|r| (r.claim == "policy" || r.claim == "sub") && r.matcher.is_binding()) {
                    errors.lint(
                        super::lint::IMMUTABLE_ID,
                        format!("{section}.match"),
                        "binds no identity of a token this broker issued: add an exact value or list for `policy` (the policy that minted it) or `sub` (its job)".into(),
                    );
                }
            }
            None => errors.push(
                format!("{section}.issuer"),
                format!("`{}` is not an issuer in the broker config", crate::clock::truncate(&file.issuer, 64)),
            ),
        }
        for scope in file.scopes.iter().flatten() {
            let tools_of_actor = tools.iter().filter(|t| file.tools.as_ref().is_none_or(|n| n.contains(&t.name)));
            if !tools_of_actor.flat_map(Tool::allowed).any(|s| s == *scope) {
                errors.push(
                    format!("{section}.scopes"),
                    format!("`{}` is carried by none of its tools", crate::clock::truncate(scope, 64)),
                );
            }
        }
        for tool in file.tools.iter().flatten() {
            if !tools.iter().any(|t| t.name == *tool) {
                errors.push(
                    format!("{section}.tools"),
                    format!("`{}` is not a tool of this policy", crate::clock::truncate(tool, 64)),
                );
            }
        }
        out.push(ActorRule {
            name: name.clone(),
            issuer: file.issuer.clone(),
            match_rules,
            deny_rules,
            tools: file.tools.clone(),
            scopes: file.scopes.clone(),
        });
    }
    out
}

fn dedup_keep_order(list: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    list.retain(|s| seen.insert(s.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::Platform;
    use crate::claims::tests::fixture;
    use crate::policy::{IssuerFacts, LoadContext, PolicySet};

    const POLICY: &str = r#"
issuer: github
match: {repository_id: "74"}
ttl: {default: 10m, max: 30m}
actors:
  reviewer: {issuer: agents, match: {sub: "spiffe://x/reviewer"}, deny: {env: test}, scopes: [search, "issues:read", "data:repo"]}
  helper: {issuer: agents, match: {sub: "spiffe://x/helper"}, tools: [github]}
tools:
  github: {resource: "https://mcp.example/github", backend: jwt, scopes: ["issues:read", "pulls:write"], data: [repo]}
  search: {resource: "https://search.example/mcp", backend: jwt, scopes: [search]}
data:
  repo: {repositories: ["${repository}"]}
"#;

    fn ctx() -> LoadContext {
        LoadContext {
            issuers: [
                ("github".to_string(), Platform::GithubActions.into()),
                ("gitlab".to_string(), Platform::GitlabCi.into()),
                (
                    "agents".to_string(),
                    IssuerFacts { platform: Platform::Generic, identity_claims: vec!["sub".into()] },
                ),
            ]
            .into(),
            backends: [("jwt".to_string(), ("jwt", 3600)), ("aws".to_string(), ("aws", 3600))].into(),
            renew_max_lease_secs: 12 * 3600,
        }
    }

    fn errors(yaml: &str) -> Vec<String> {
        PolicySet::load(None, &[("p", yaml)], &ctx())
            .expect_err("loaded")
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    fn assert_has(errors: &[String], want: &str) {
        assert!(errors.iter().any(|e| e.contains(want)), "no error containing {want:?} in {errors:#?}");
    }

    fn actor(sub: &str) -> Claims {
        serde_json::from_value(serde_json::json!({"iss": "https://agents.example", "sub": sub})).unwrap()
    }

    fn job() -> VerifiedIdentity {
        let claims = fixture("github-environment-deploy.json");
        VerifiedIdentity::remembered("github", Platform::GithubActions, "github:74:1", claims, 0, "digest")
    }

    fn ask<'a>(resource: Option<&'a str>, scopes: Option<&'a [String]>, parent: Option<&'a Parent>) -> Delegation<'a> {
        Delegation { resource, tool: None, scopes, actor: None, parent, carry: Map::new() }
    }

    #[test]
    fn every_mistake_in_actors_tools_and_data_is_reported_with_its_field() {
        let bad = r##"
issuer: github
match: {repository_id: "74"}
ttl: {default: 10m, max: 2h}
actors:
  loose: {issuer: agents, match: {sub: {glob: "spiffe://x/*"}}}
  nowhere: {issuer: mystery, match: {sub: a}}
  wrong-tool: {issuer: agents, match: {sub: a}, tools: [github, nope], scopes: ["issues:read", "push"]}
  unpinned-bot: {issuer: broker, match: {agent: reviewer}}
tools:
  github: {resource: "https://mcp.example/github#frag", backend: aws, scopes: ["has space", "data:x"], data: [missing]}
  twin: {resource: "https://mcp.example/github#frag", backend: jwt}
  nobackend: {resource: "urn:tool:x", backend: nope}
"##;
        let e = errors(bad);
        assert_has(
            &e,
            "actors.loose.match: binds no immutable identity claim: add an exact value or list for one of sub",
        );
        assert_has(&e, "actors.nowhere.issuer: `mystery` is not an issuer");
        assert_has(&e, "actors.wrong-tool.tools: `nope` is not a tool of this policy");
        assert_has(&e, "actors.wrong-tool.scopes: `push` is carried by none of its tools");
        assert_has(&e, "actors.unpinned-bot.match: binds no identity of a token this broker issued");
        assert_has(&e, "tools.github.resource: must be an absolute URI without a fragment");
        assert_has(&e, "tools.github.backend: `aws` is a `aws` backend; tool tokens are signed by a `jwt` backend");
        assert_has(&e, "tools.github.scopes: `has space` is not a scope");
        assert_has(&e, "tools.github.scopes: `data:x` is not a scope");
        assert_has(&e, "tools.github.data: `missing` is not a data scope of this policy");
        assert_has(&e, "tools.twin.resource: is also tool `github`'s");
        assert_has(&e, "tools.twin.backend: ttl.max 2h is above backend `jwt`'s max_ttl 1h");
        assert_has(&e, "tools.nobackend.backend: `nope` is not a backend");
        let none = "issuer: github\nmatch: {repository_id: \"74\"}\nttl: {default: 1m, max: 1m}\n";
        assert_has(&errors(none), "grants: a policy must grant at least one credential, or list a tool");
        let actors_only = format!(
            "{none}actors: {{a: {{issuer: agents, match: {{sub: a}}}}}}\ngrants: {{x: {{backend: jwt, audience: svc}}}}\n"
        );
        assert_has(&errors(&actors_only), "actors: actors act only through tools");
        let forged_act =
            format!("{none}grants: {{x: {{backend: jwt, audience: svc, claims: {{act: {{sub: me}}, tool: t}}}}}}\n");
        assert_has(&errors(&forged_act), "grants.x.claims.act: is set by the broker");
        assert_has(&errors(&forged_act), "grants.x.claims.tool: is set by the broker");
    }

    #[test]
    fn a_decision_names_one_tool_and_narrows_to_the_parents_scope_and_life() {
        let set = PolicySet::load(None, &[("p", POLICY)], &ctx()).unwrap();
        let identity = job();
        let (grant, d) =
            set.decide_delegation("p", &identity, ask(Some("https://mcp.example/github"), None, None), 100).unwrap();
        assert_eq!((d.tool.as_str(), d.scope.as_str()), ("github", "issues:read pulls:write data:repo"));
        assert_eq!(grant.expires_at(), 700, "the policy's default ttl");
        let ResolvedSpec::Jwt { audience, claims } = &grant.credentials()[0].spec else { panic!("not a jwt") };
        assert_eq!(audience, "https://mcp.example/github");
        assert_eq!(claims["data"], serde_json::json!({"repo": {"repositories": ["octo-org/octo-repo"]}}));
        // Along a chain: the parent's scopes bound the default and every ask, its life the ttl.
        let parent =
            Parent { tool: Some("github".into()), scopes: Some(["issues:read".to_string()].into()), expires_at: 400 };
        let (grant, d) = set.decide_delegation("p", &identity, ask(None, None, Some(&parent)), 100).unwrap();
        assert_eq!((d.tool.as_str(), d.scope.as_str(), grant.expires_at()), ("github", "issues:read", 400));
        let wider = ["pulls:write".to_string()];
        let denial = set.decide_delegation("p", &identity, ask(None, Some(&wider), Some(&parent)), 100).unwrap_err();
        assert_eq!(denial.reason, DenialReason::ScopeWidened { scope: "pulls:write".into() });
        let elsewhere = set
            .decide_delegation("p", &identity, ask(Some("https://search.example/mcp"), None, Some(&parent)), 100)
            .unwrap_err();
        assert_eq!(elsewhere.reason, DenialReason::ToolChanged { tool: "github".into() });
        // Two tools and none named; an unknown resource; an unknown policy like a failed match.
        let ambiguous = set.decide_delegation("p", &identity, ask(None, None, None), 100).unwrap_err();
        assert_eq!(ambiguous.reason, DenialReason::TargetAmbiguous);
        let unknown = set.decide_delegation("p", &identity, ask(Some("https://mcp.example/github/"), None, None), 100);
        assert_eq!(unknown.unwrap_err().reason, DenialReason::TargetNotListed);
        let nope = set.decide_delegation("nope", &identity, ask(None, None, None), 100).unwrap_err();
        assert_eq!(nope.public_message(), "claim `iss` did not match policy `nope`");
    }

    #[test]
    fn an_actor_is_admitted_only_by_a_rule_for_its_issuer_claims_and_tool() {
        let set = PolicySet::load(None, &[("p", POLICY)], &ctx()).unwrap();
        let identity = job();
        let decide = |issuer: &str, claims: &Claims, resource: &str| {
            let mut a = ask(Some(resource), None, None);
            a.actor = Some(Actor { issuer, claims });
            set.decide_delegation("p", &identity, a, 100).map(|(_, d)| d.actor_rule)
        };
        let (github, search) = ("https://mcp.example/github", "https://search.example/mcp");
        assert_eq!(decide("agents", &actor("spiffe://x/reviewer"), search).unwrap().as_deref(), Some("reviewer"));
        assert_eq!(decide("agents", &actor("spiffe://x/helper"), github).unwrap().as_deref(), Some("helper"));
        let refused =
            |issuer: &str, claims: &Claims, resource: &str| decide(issuer, claims, resource).unwrap_err().reason;
        assert_eq!(
            refused("agents", &actor("spiffe://x/helper"), search),
            DenialReason::ActorNotAdmitted,
            "not its tool"
        );
        assert_eq!(refused("github", &actor("spiffe://x/reviewer"), search), DenialReason::ActorNotAdmitted, "issuer");
        assert_eq!(refused("agents", &actor("spiffe://x/other"), search), DenialReason::ActorNotAdmitted);
        let mut denied = actor("spiffe://x/reviewer");
        denied.insert("env".into(), "test".into());
        assert_eq!(refused("agents", &denied, search), DenialReason::ActorNotAdmitted, "a deny rule holds");
        // An admitted agent gets only its own scopes of what the tool carries.
        let reviewer = actor("spiffe://x/reviewer");
        let mut a = ask(Some(github), None, None);
        a.actor = Some(Actor { issuer: "agents", claims: &reviewer });
        let (_, d) = set.decide_delegation("p", &identity, a, 100).unwrap();
        assert_eq!(d.scope, "issues:read data:repo", "its share of the tool's scope by default");
        let push = ["pulls:write".to_string()];
        let mut a = ask(Some(github), Some(&push), None);
        a.actor = Some(Actor { issuer: "agents", claims: &reviewer });
        let denial = set.decide_delegation("p", &identity, a, 100).unwrap_err();
        assert_eq!(
            denial.reason,
            DenialReason::ScopeNotForActor { scope: "pulls:write".into(), actor: "reviewer".into() }
        );
        assert_eq!(denial.public_message(), "scope `pulls:write` is not one actor `reviewer` of policy `p` may get");
        // `policy explain` shows the same: every actor rule, and which admits.
        let policy = set.get("p").unwrap();
        let trace =
            policy.explain_with_actor("github", &fixture("github-environment-deploy.json"), Some(("agents", &denied)));
        assert_eq!(trace.actor_decision.as_ref().unwrap().admitted_by, None);
        let reviewer = actor("spiffe://x/reviewer");
        let trace = policy.explain_with_actor(
            "github",
            &fixture("github-environment-deploy.json"),
            Some(("agents", &reviewer)),
        );
        assert_eq!(trace.actor_decision.as_ref().unwrap().admitted_by.as_deref(), Some("reviewer"));
        let text = trace.render();
        assert!(text.contains("actor decision: admitted by `reviewer`"), "{text}");
        assert!(
            text.contains(
                "tool github — resource https://mcp.example/github — may carry: issues:read pulls:write data:repo"
            ),
            "{text}"
        );
        assert!(text.contains("FAIL  match sub = \"spiffe://x/reviewer\""), "the helper rule's sub fails: {text}");
    }
}
