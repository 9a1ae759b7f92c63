//! The outcome of a policy decision: a [`Grant`] (only this module builds one) or a [`Denial`].

use crate::clock::{UnixSeconds, format_duration, truncate};
use crate::identity::VerifiedIdentity;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Permission to mint, for one job, under one policy. A backend takes `&Grant`, so nothing is
/// minted without a verified identity and a policy decision.
#[derive(Debug, Clone)]
pub struct Grant {
    pub(super) policy: Arc<str>,
    pub(super) identity: VerifiedIdentity,
    pub(super) ttl_secs: i64,
    pub(super) expires_at: UnixSeconds,
    /// The lease's end when its policy lets the job renew it (`renew.max_lease` after now);
    /// each credential still ends at `expires_at`.
    pub(super) renew_until: Option<UnixSeconds>,
    pub(super) credentials: Vec<GrantedCredential>,
}

impl Grant {
    pub fn policy(&self) -> &str {
        &self.policy
    }

    pub fn identity(&self) -> &VerifiedIdentity {
        &self.identity
    }

    pub fn ttl_secs(&self) -> i64 {
        self.ttl_secs
    }

    pub fn expires_at(&self) -> UnixSeconds {
        self.expires_at
    }

    /// When the lease ends if it is renewable (`None`: it ends with its credentials).
    pub fn renew_until(&self) -> Option<UnixSeconds> {
        self.renew_until
    }

    pub fn credentials(&self) -> &[GrantedCredential] {
        &self.credentials
    }
}

/// One credential the grant lists, with its templates already resolved from verified claims.
#[derive(Debug, Clone)]
pub struct GrantedCredential {
    pub name: String,
    pub backend: String,
    pub spec: ResolvedSpec,
}

#[derive(Debug, Clone)]
pub enum ResolvedSpec {
    Jwt {
        audience: String,
        claims: Map<String, Value>,
    },
    Aws {
        role_arn: String,
        /// Packed (compact JSON), already checked against STS's 2,048-character limit.
        session_policy: Option<String>,
        policy_arns: Vec<String>,
        external_id: Option<String>,
        /// Values resolved from verified claims, not yet sanitised (the backend does that).
        session_tags: Vec<(String, String)>,
    },
    Github {
        /// A checked account name.
        owner: String,
        /// Checked bare repository names of `owner`, without duplicates (at least one).
        repositories: Vec<String>,
        /// (permission, level), sorted by permission.
        permissions: Vec<(String, &'static str)>,
    },
    Postgres {
        /// Checked group role names (quoted again wherever they reach SQL).
        roles: Vec<String>,
        /// The `dsn`'s database, when the grant names one.
        database: Option<String>,
    },
    Ssh {
        /// Checked principal names, without duplicates (at least one).
        principals: Vec<String>,
        force_command: Option<String>,
        source_address: Option<String>,
        /// Checked extension names.
        extensions: Vec<String>,
    },
}

/// Why a policy said no. The public message names the deciding claim, never the expected value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub policy: String,
    pub claim: String,
    pub reason: DenialReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenialReason {
    /// No such policy. Worded exactly like [`DenialReason::WrongIssuer`], so a caller cannot
    /// tell a missing policy from one bound to another issuer (no existence oracle).
    UnknownPolicy,
    WrongIssuer,
    DenyRule,
    MatchFailed,
    TtlAboveMax {
        requested: i64,
        max: i64,
    },
    TemplateClaimMissing {
        grant: String,
    },
    /// A grant's template rendered, from this claim, a GitHub account or repository name that
    /// is not one, or a repository of another owner.
    GrantOutOfScope {
        grant: String,
    },
    /// The token's `jti` was already used for an exchange under this policy.
    Replayed,
    /// Replay protection is on for the issuer and the token has no `jti`.
    MissingJti,
    /// Token exchange: the policy lists no `tools`.
    NoTools,
    /// Token exchange: the `resource` or `audience` (the deciding "claim") names no tool of the
    /// policy.
    TargetNotListed,
    /// Token exchange: the policy has several tools and the request names none.
    TargetAmbiguous,
    /// Token exchange: the subject is a token for `tool`, and the request asks for another.
    ToolChanged {
        tool: String,
    },
    /// Token exchange: no actor rule admits the actor token.
    ActorNotAdmitted,
    /// Token exchange: `scope` is not one `tool` may carry.
    ScopeNotGranted {
        scope: String,
        tool: String,
    },
    /// Token exchange: the tool carries `scope`, but not for the acting agent (`actor`'s rule).
    ScopeNotForActor {
        scope: String,
        actor: String,
    },
    /// Token exchange: `scope` is not in the subject token's scope.
    ScopeWidened {
        scope: String,
    },
}

impl Denial {
    /// A replayed token (or one without `jti` where replay protection needs it).
    pub fn replayed(policy: &str, missing_jti: bool) -> Denial {
        Denial::new(policy, "jti", if missing_jti { DenialReason::MissingJti } else { DenialReason::Replayed })
    }

    /// `claim` did not match `policy` (worded like an unknown policy's refusal).
    pub fn not_matched(policy: &str, claim: &str) -> Denial {
        Denial::new(policy, claim, DenialReason::MatchFailed)
    }

    pub(super) fn new(policy: &str, claim: &str, reason: DenialReason) -> Denial {
        Denial { policy: truncate(policy, 64).to_string(), claim: claim.to_string(), reason }
    }

    pub fn public_message(&self) -> String {
        let (policy, claim) = (&self.policy, &self.claim);
        match &self.reason {
            DenialReason::UnknownPolicy | DenialReason::WrongIssuer | DenialReason::MatchFailed => {
                format!("claim `{claim}` did not match policy `{policy}`")
            }
            DenialReason::DenyRule => format!("claim `{claim}` matched a deny rule of policy `{policy}`"),
            DenialReason::TtlAboveMax { requested, max } => {
                format!(
                    "requested ttl {} is above the maximum {} of policy `{policy}`",
                    format_duration(*requested),
                    format_duration(*max)
                )
            }
            DenialReason::Replayed => {
                format!("this token was already used for an exchange with policy `{policy}`; request a fresh ID token")
            }
            DenialReason::MissingJti => {
                format!("claim `jti` is missing; replay protection for policy `{policy}` needs it")
            }
            DenialReason::GrantOutOfScope { grant } => {
                format!(
                    "claim `{claim}`, used by grant `{grant}` of policy `{policy}`, names no repository the grant may reach"
                )
            }
            DenialReason::NoTools => format!("policy `{policy}` lists no tools: it issues no tokens at /oauth/token"),
            DenialReason::TargetNotListed => {
                format!("policy `{policy}` issues no token for this `{claim}`: it is not one of the policy's tools")
            }
            DenialReason::TargetAmbiguous => {
                format!("policy `{policy}` lists several tools: name the one the token is for with `resource`")
            }
            DenialReason::ToolChanged { tool } => format!(
                "the subject token is for tool `{tool}` and is exchanged further only for that tool; for another \
                 tool, exchange the job's own token"
            ),
            DenialReason::ActorNotAdmitted => {
                format!(
                    "no rule under `actors` of policy `{policy}` admits the actor token (issuer, match and deny rules, tools)"
                )
            }
            DenialReason::ScopeNotGranted { scope, tool } => {
                format!("scope `{}` is not one tool `{tool}` of policy `{policy}` may carry", truncate(scope, 64))
            }
            DenialReason::ScopeNotForActor { scope, actor } => {
                format!("scope `{}` is not one actor `{actor}` of policy `{policy}` may get", truncate(scope, 64))
            }
            DenialReason::ScopeWidened { scope } => format!(
                "scope `{}` is not in the subject token's scope: a delegated token can only narrow",
                truncate(scope, 64)
            ),
            DenialReason::TemplateClaimMissing { grant } => {
                format!(
                    "claim `{claim}`, needed by grant `{grant}` of policy `{policy}`, is missing or not a single value"
                )
            }
        }
    }

    /// For the log: says which case it really was.
    pub fn log_detail(&self) -> String {
        match self.reason {
            DenialReason::UnknownPolicy => format!("no policy named `{}`", self.policy),
            DenialReason::WrongIssuer => format!("policy `{}` is bound to another issuer", self.policy),
            _ => self.public_message(),
        }
    }
}
