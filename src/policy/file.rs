//! A policy file as written: the raw serde structs (`deny_unknown_fields`) that
//! [`compile`](super::compile::compile) turns into a [`Policy`](super::Policy), the YAML limits every
//! policy-repository file is parsed under, and the JSON Schema of the format
//! (`ephemera policy schema`, committed as `policies/schema.json`). The doc comments below are
//! the schema's descriptions: an editor shows them on hover.

use schemars::generate::SchemaSettings;
use schemars::transform::RecursiveTransform;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;

// ---- YAML limits ---------------------------------------------------------------------------
//
// A policy file is at most 256 KiB, but YAML can make far more of it: `&a`/`*a` aliases replay a
// subtree wherever they appear, so nine nested lists of nine aliases ("billion laughs") expand
// a few hundred bytes into 9^9 nodes; and every `[` nests a level the parser recurses into. A real policy
// is a few dozen nodes, at most 9 levels deep (grants → session_policy → Statement → Condition
// → …). These caps refuse hostile input after a bounded amount of work, with an error that names
// the limit, instead of relying on the library's defaults (which admit 250,000 nodes).

/// Deepest nesting of block and flow collections.
const MAX_DEPTH: usize = 32;
/// Collection and scalar nodes in one file, as written.
const MAX_NODES: usize = 20_000;
/// Parser events in one file (about two per collection, one per scalar).
const MAX_EVENTS: usize = 50_000;
/// `*alias` uses, and `&anchor` definitions.
const MAX_ALIASES: usize = 1_000;
/// Events injected by replaying aliases, across the file: the amplification bound.
const MAX_REPLAYED_EVENTS: usize = 10_000;
/// Aliases inside aliased subtrees inside …
const MAX_REPLAY_DEPTH: usize = 8;
/// `<<` merge keys.
const MAX_MERGE_KEYS: usize = 100;
/// Total scalar text: no more than the file itself may hold.
const MAX_SCALAR_BYTES: usize = super::MAX_POLICY_BYTES as usize;

/// Parses one YAML document under the limits above; errors are one line, `line L column C: …`.
pub(crate) fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| yaml_error(&e.to_string()))
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_nodes: MAX_NODES,
            max_events: MAX_EVENTS,
            max_aliases: MAX_ALIASES,
            max_anchors: MAX_ALIASES,
            max_recorded_anchor_events: MAX_REPLAYED_EVENTS,
            max_recorded_anchor_bytes: MAX_SCALAR_BYTES,
            max_merge_keys: MAX_MERGE_KEYS,
            max_documents: 1,
            max_total_scalar_bytes: MAX_SCALAR_BYTES,
            max_inclusion_depth: 0,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_REPLAYED_EVENTS,
            max_replay_stack_depth: MAX_REPLAY_DEPTH,
            max_alias_expansions_per_anchor: MAX_ALIASES,
        },
        // A repeated key is an error, never a silent override (the library's default, made explicit).
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::Error,
        // The snippet form starts with `line L column C: …`, the one line `yaml_error` keeps.
        with_snippet: true,
    }
}

/// serde-saphyr's messages can carry a rendered snippet; keep the first line, which says what
/// and where, and say which limit a hostile document ran into.
fn yaml_error(message: &str) -> String {
    let first = message.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("invalid YAML");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    if first.contains("budget breached") || first.contains("recursion limit exceeded") {
        return format!(
            "{first} (limits: nesting depth {MAX_DEPTH}, {MAX_NODES} nodes, {MAX_ALIASES} aliases, {MAX_REPLAYED_EVENTS} events replayed from aliases)"
        );
    }
    first.to_string()
}

// ---- the policy file -----------------------------------------------------------------------

/// An ephemera policy: which CI jobs may get which credentials. One YAML file per policy in the
/// broker's `policies` directory; the file stem is the policy's name. A request is allowed only
/// if the token comes from `issuer`, no `deny` rule holds and every `match` rule holds.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "ephemera policy", transform = require_match_and_grants_or_tools)]
pub(super) struct PolicyFile {
    /// For people; not used in decisions.
    #[serde(default)]
    pub description: String,
    /// The name (not the URL) of an issuer in the broker config, e.g. `github` or `gitlab`.
    /// Tokens from any other issuer are denied.
    pub issuer: String,
    /// Claim name → matcher; every rule must hold. Must bind an immutable id (`repository_id`,
    /// `repository_owner_id`, `project_id` or `namespace_id`) to an exact value or a list.
    #[serde(rename = "match", default)]
    #[schemars(schema_with = "rules_schema")]
    pub match_rules: BTreeMap<String, Value>,
    /// Claim name → matcher; if any rule holds the request is denied. Checked before `match`. A
    /// rule on a missing claim does not fire.
    #[serde(default)]
    #[schemars(schema_with = "rules_schema")]
    pub deny: BTreeMap<String, Value>,
    /// Lease and credential lifetime.
    pub ttl: TtlFile,
    /// Job-bound leases: the job may renew its lease (`POST /v1/leases/{id}/renew` with the
    /// renew token the exchange returned), getting fresh credentials of `ttl` each time, until
    /// `max_lease` after the exchange. Without it a lease cannot be renewed.
    #[serde(default)]
    pub renew: Option<RenewFile>,
    /// Grant name → the credential one exchange mints under it (the key in the reply's
    /// `credentials`). At least one.
    #[serde(default)]
    #[schemars(schema_with = "grants_schema")]
    pub grants: BTreeMap<String, Value>,
    /// Agents that may act for the job at `POST /oauth/token` (RFC 8693 `actor_token`): rule
    /// name → the agent's issuer and claim rules. Without this section no actor is admitted:
    /// only the job itself may exchange, and only its own CI token.
    #[serde(default)]
    pub actors: BTreeMap<String, ActorFile>,
    /// Tool name → the tool server a token from `POST /oauth/token` may be for: its `resource`
    /// URI (the token's `aud`), the scopes and data scopes such a token may carry, and the `jwt`
    /// backend that signs it. A resource not listed here is refused (`invalid_target`).
    #[serde(default)]
    #[schemars(schema_with = "tools_schema")]
    pub tools: BTreeMap<String, ToolFile>,
    /// Data scope name → what a token carrying it may reach (repository paths, schema names,
    /// bucket prefixes: any JSON; strings are `${claim}` templates of the job's claims). A token
    /// asks for one with the scope `data:NAME` and carries its value under `data.NAME`.
    #[serde(default)]
    #[schemars(schema_with = "data_schema")]
    pub data: BTreeMap<String, Value>,
}

/// An agent admitted to act for the job: its token comes from `issuer` and passes these rules.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Actor")]
pub(super) struct ActorFile {
    /// The name of the issuer in the broker config that verifies the agent's token (an agent
    /// identity provider, a SPIFFE JWT-SVID issuer configured as `generic`, or a CI issuer).
    pub issuer: String,
    /// Claim name → matcher on the actor token; every rule must hold. Must bind one of the
    /// issuer's identity claims (e.g. `sub`) to an exact value or a list.
    #[serde(rename = "match", default)]
    #[schemars(schema_with = "rules_schema")]
    pub match_rules: BTreeMap<String, Value>,
    /// Claim name → matcher on the actor token; if any holds the actor is refused.
    #[serde(default)]
    #[schemars(schema_with = "rules_schema")]
    pub deny: BTreeMap<String, Value>,
    /// The tools (names under `tools`) this agent may get tokens for; all of them when absent.
    #[serde(default)]
    pub tools: Option<Vec<String>>,
    /// The scopes and data scopes (`data:NAME`) this agent may get, of those its tools carry;
    /// all of them when absent.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
}

/// A tool server tokens may be issued for.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Tool")]
pub(super) struct ToolFile {
    /// The tool server's URI, as clients send it in `resource` (RFC 8707): absolute, no
    /// fragment, compared exactly. It becomes the token's `aud`.
    #[schemars(length(min = 1, max = 512))]
    pub resource: String,
    /// A backend of `type = "jwt"` that signs the tokens.
    pub backend: String,
    /// The OAuth scopes a token for this tool may carry (space-free, not starting with `data:`).
    /// A request without `scope` gets all of them and every data scope below.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Data scopes (names under `data`) a token for this tool may carry.
    #[serde(default)]
    pub data: Vec<String>,
}

/// Durations are written like `90s`, `15m`, `1h`, `1h30m`: whole seconds, at least 1s.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Ttl")]
pub(super) struct TtlFile {
    /// The ttl when the exchange asks for none; at most `max`.
    pub default: String,
    /// The longest ttl an exchange may ask for; a request above it is denied, not clamped. At
    /// most the `max_ttl` of every backend the policy grants from.
    pub max: String,
}

/// How long a renewable lease may last.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Renew")]
pub(super) struct RenewFile {
    /// The lease ends this long after its exchange at the latest, renewed or not; each of its
    /// credentials lives its own `ttl`. At least `ttl.max`, at most the broker's
    /// `[renew] max_lease` (default 12h).
    pub max_lease: String,
}

/// A broker-signed JWT (a backend of `type = "jwt"`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "JwtGrant")]
pub(super) struct JwtGrantFile {
    /// The name of a backend in the broker config; its kind decides the other fields.
    #[allow(dead_code)] // read before the kind is known; here only so the field is allowed
    pub backend: String,
    /// The `aud` of the minted JWT (one string, not empty). May hold `${claim}` templates.
    #[schemars(length(min = 1))]
    pub audience: String,
    /// Extra claims. Strings are `${claim}` templates, also inside lists and maps; numbers,
    /// booleans and null are copied. `iss`, `sub`, `aud`, `exp`, `nbf`, `iat`, `jti`, `lease_id`
    /// and `policy` are set by the broker.
    #[serde(default)]
    pub claims: BTreeMap<String, Value>,
}

/// AWS STS credentials for a role (a backend of `type = "aws"`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "AwsGrant")]
pub(super) struct AwsGrantFile {
    /// The name of a backend in the broker config; its kind decides the other fields.
    #[allow(dead_code)] // read before the kind is known; here only so the field is allowed
    pub backend: String,
    /// The role to assume, `arn:aws:iam::ACCOUNT:role/NAME`.
    pub role_arn: String,
    /// An IAM policy document that scopes the session down (packed, at most 2,048 characters).
    #[serde(default)]
    #[schemars(schema_with = "session_policy_schema")]
    pub session_policy: Option<Value>,
    /// Managed policy ARNs that scope the session down (at most 10).
    #[serde(default)]
    pub policy_arns: Vec<String>,
    /// The role's trust policy's `sts:ExternalId` (2 to 1,224 characters).
    pub external_id: Option<String>,
    /// Tag key → template (e.g. `repository: "${repository}"`), resolved from verified claims.
    #[serde(default)]
    pub session_tags: BTreeMap<String, String>,
}

/// A GitHub App installation token (a backend of `type = "github-app"`), for exactly the
/// repositories and permissions named here: never the installation's whole scope.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "GithubGrant")]
pub(super) struct GithubGrantFile {
    /// The name of a backend in the broker config; its kind decides the other fields.
    #[allow(dead_code)] // read before the kind is known; here only so the field is allowed
    pub backend: String,
    /// The organisation or user account the App is installed on, e.g. `octo-org`. May be a
    /// `${claim}` template of the job's own repository owner (`${repository_owner}`).
    #[schemars(length(min = 1, max = 100))]
    pub owner: String,
    /// Repositories of `owner` the token reaches (1 to 500): names (`web`), or templates of the
    /// job's own repository (`${repository}`, which renders as `owner/name`; its owner must be
    /// `owner`).
    #[schemars(length(min = 1, max = 500))]
    pub repositories: Vec<String>,
    /// Permission → level, as GitHub names them, e.g. `contents: write`, `pull_requests: write`.
    /// The token carries exactly these (GitHub adds `metadata: read`).
    #[schemars(length(min = 1))]
    pub permissions: BTreeMap<String, GithubPermissionLevel>,
}

/// A PostgreSQL login role for the lease (a backend of `type = "postgres"`), member of exactly
/// the group roles named here, dropped when the lease ends.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "PostgresGrant")]
pub(super) struct PostgresGrantFile {
    /// The name of a backend in the broker config; its kind decides the other fields.
    #[allow(dead_code)] // read before the kind is known; here only so the field is allowed
    pub backend: String,
    /// Existing group roles the login role becomes a member of (1 to 16), e.g. `app_readonly`.
    /// Never a superuser, `CREATEROLE`, replication or `BYPASSRLS` role, nor one of PostgreSQL's
    /// predefined `pg_*` roles that read or write server files or run programs.
    #[schemars(length(min = 1, max = 16))]
    pub roles: Vec<String>,
    /// The database the credential's `dsn` names (default: the backend's).
    pub database: Option<String>,
}

/// An OpenSSH user certificate for the lease (a backend of `type = "ssh"`).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "SshGrant")]
pub(super) struct SshGrantFile {
    /// The name of a backend in the broker config; its kind decides the other fields.
    #[allow(dead_code)] // read before the kind is known; here only so the field is allowed
    pub backend: String,
    /// The users the certificate may log in as (1 to 32). May be `${claim}` templates of claims
    /// the platform sets (`deploy-${repository_owner}`).
    #[schemars(length(min = 1, max = 32))]
    pub principals: Vec<String>,
    /// OpenSSH critical options: `force-command` (the only command the certificate may run) and
    /// `source-address` (CIDR list the client must connect from).
    #[serde(default, rename = "critical_options")]
    pub critical_options: SshCriticalOptionsFile,
    /// OpenSSH extensions granted, e.g. `permit-pty`. None by default: no forwarding of the
    /// agent, ports or X11, no `~/.ssh/rc`.
    #[serde(default)]
    pub extensions: Vec<String>,
}

/// A certificate's critical options.
#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "SshCriticalOptions")]
pub(super) struct SshCriticalOptionsFile {
    /// The only command the certificate may run, whatever the client asks.
    #[serde(rename = "force-command")]
    pub force_command: Option<String>,
    /// Comma-separated CIDR blocks the client must connect from, e.g. `10.0.0.0/8`.
    #[serde(rename = "source-address")]
    pub source_address: Option<String>,
}

/// An App permission's level.
#[derive(Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum GithubPermissionLevel {
    Read,
    Write,
    Admin,
}

/// The JSON Schema of policy files, as `ephemera policy schema` prints it.
pub fn policy_schema() -> String {
    schema_text::<PolicyFile>()
}

/// Draft-07 (what YAML and JSON editors support most widely), pretty, with a final newline.
pub(crate) fn schema_text<T: JsonSchema>() -> String {
    let settings = SchemaSettings::draft07().with_transform(RecursiveTransform(unwrap_description));
    let schema = settings.into_generator().into_root_schema_for::<T>();
    // Serialising a `serde_json::Value` cannot fail (string keys only).
    serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
}

/// Doc comments wrap at 100 columns; an editor's hover should not.
fn unwrap_description(schema: &mut Schema) {
    if let Some(Value::String(text)) = schema.get_mut("description") {
        *text = text.replace('\n', " ");
    }
}

/// `match` and `grants` default to empty for serde, so that loading says what is missing ("binds
/// no immutable identity claim", "must grant at least one credential"); a policy without them
/// never loads, so the schema requires `match`, and `grants` or `tools` (a policy that only
/// issues tool tokens at `POST /oauth/token` grants nothing at `POST /v1/exchange`).
fn require_match_and_grants_or_tools(schema: &mut Schema) {
    if let Some(Value::Array(required)) = schema.get_mut("required") {
        required.push("match".into());
    }
    schema.insert("anyOf".into(), serde_json::json!([{"required": ["grants"]}, {"required": ["tools"]}]));
}

fn tools_schema(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "propertyNames": {"pattern": "^[a-z0-9][a-z0-9_-]{0,63}$"},
        "additionalProperties": generator.subschema_for::<ToolFile>(),
    })
}

fn data_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "propertyNames": {"pattern": "^[a-z0-9][a-z0-9_-]{0,63}$"},
    })
}

fn rules_schema(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "propertyNames": {"pattern": "^[A-Za-z0-9_./-]{1,128}$"},
        "additionalProperties": generator.subschema_for::<MatcherSchema>(),
    })
}

fn grants_schema(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"pattern": "^[a-z0-9][a-z0-9_-]{0,63}$"},
        "additionalProperties": {
            "oneOf": [
                generator.subschema_for::<JwtGrantFile>(),
                generator.subschema_for::<AwsGrantFile>(),
                generator.subschema_for::<GithubGrantFile>(),
                generator.subschema_for::<PostgresGrantFile>(),
                generator.subschema_for::<SshGrantFile>(),
            ],
        },
    })
}

fn session_policy_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object"})
}

/// The schema of a matcher. Matchers are `serde_json::Value` in [`PolicyFile`] and parsed by
/// [`Matcher::parse`](super::matcher::Matcher::parse); this type exists only to describe them.
struct MatcherSchema;

impl JsonSchema for MatcherSchema {
    fn schema_name() -> Cow<'static, str> {
        "Matcher".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let matcher = generator.subschema_for::<MatcherSchema>();
        let one_key = |key: &str, description: &str, value: Schema| {
            json_schema!({
                "type": "object",
                "description": description,
                "properties": {(key): value},
                "required": [key],
                "additionalProperties": false,
            })
        };
        let scalar = json_schema!({"type": ["string", "number", "boolean"]});
        json_schema!({
            "description": "How a claim must look. Scalars compare as text (\"74\" equals 74). A missing or null claim fails every matcher except {exists: false} and {not: …}.",
            "oneOf": [
                {"type": ["string", "number", "boolean"], "description": "Exact: the claim's text equals this value."},
                {"type": "array", "minItems": 1, "items": scalar, "description": "Any of: the claim's text equals one of these values."},
                one_key("glob", "The whole value matches the glob: `*` matches any run of characters except `/`; everything else is literal.", json_schema!({"type": "string", "maxLength": 1024})),
                one_key("regex", "The whole value matches the pattern, always anchored as ^(?:…)$ (Rust regex syntax, linear time).", json_schema!({"type": "string", "maxLength": 1024})),
                one_key("not", "The inner matcher does not hold (a missing claim passes).", matcher.clone()),
                one_key("exists", "true: the claim is present and not null; false: absent or null.", json_schema!({"type": "boolean"})),
                one_key("contains", "The claim is an array and at least one element satisfies the inner matcher.", matcher),
            ],
        })
    }
}
