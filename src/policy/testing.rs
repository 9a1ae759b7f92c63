//! `ephemera policy test`: the cases in `policies/tests/*.yaml` — a claim set, a policy, the
//! expected outcome — run through [`PolicySet::decide_claims`], the decision an exchange makes,
//! so a case passes only if the exchange would decide the same. A failing case's report shows
//! the expected and the actual outcome and the explain lines of the rules that failed.

use super::file::{parse_yaml, schema_text};
use super::{MAX_POLICY_BYTES, PolicySet};
use crate::claims::Claims;
use crate::clock::{format_duration, parse_duration};
use crate::config::IssuerConfig;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Largest claims file read.
const MAX_CLAIMS_BYTES: u64 = 1024 * 1024;

// ---- the file as written -------------------------------------------------------------------

/// Test cases for ephemera policies, run by `ephemera policy test`: each case decides a claim
/// set with a policy, exactly as an exchange would, and compares the outcome with `expect`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "ephemera policy tests")]
struct TestFile {
    /// The policy (file stem in the policies directory) the cases test, unless a case names
    /// its own.
    policy: Option<String>,
    /// A JSON file of claims every case starts from unless it names its own; relative to this
    /// file.
    claims_file: Option<String>,
    /// The cases, run in order.
    cases: Vec<CaseFile>,
}

/// One case: a claim set, a policy, the outcome an exchange must have.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Case")]
struct CaseFile {
    /// What the case shows; unique within the file (the report names the case by it).
    name: String,
    /// The policy to decide with (default: the file's `policy`).
    policy: Option<String>,
    /// A JSON object of claims (e.g. a token's claims), relative to this file (default: the
    /// file's `claims_file`).
    claims_file: Option<String>,
    /// Claims merged over the claims file's: a value sets the claim, `null` removes it.
    #[serde(default)]
    claims: BTreeMap<String, Value>,
    /// The ttl the exchange asks for, e.g. `30m` (default: the policy's `ttl.default`).
    ttl: Option<String>,
    /// The configured issuer the token comes from (default: the one whose `url` is the claims'
    /// `iss`, else the policy's own issuer).
    issuer: Option<String>,
    /// `allow`, or `{deny: CLAIM}` with the claim that decides the denial, as the exchange
    /// names it (`iss` for another issuer, `ttl` for a ttl above the maximum).
    expect: Expect,
}

/// The outcome a case expects.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Expect {
    /// The exchange is allowed.
    Allow,
    /// The exchange is denied, and this claim decides it.
    Deny(String),
}

/// The JSON Schema of policy test files, as `ephemera policy schema --tests` prints it.
pub fn test_schema() -> String {
    schema_text::<TestFile>()
}

// ---- loaded --------------------------------------------------------------------------------

/// Every case of every test file in a directory, and every error met loading them.
#[derive(Debug, Default)]
pub struct Suite {
    pub cases: Vec<Case>,
    pub errors: Vec<TestError>,
}

/// One case, ready to run: the claims merged, the issuer and the ttl resolved.
#[derive(Debug)]
pub struct Case {
    pub file: PathBuf,
    pub name: String,
    pub policy: String,
    pub issuer: String,
    pub claims: Claims,
    pub ttl_secs: Option<i64>,
    pub expect: Expect,
}

/// A test file or case that cannot run, with the file and (when it is one case's) the case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestError {
    pub file: PathBuf,
    pub case: Option<String>,
    pub message: String,
}

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.case {
            Some(case) => write!(f, "{}: case `{case}`: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// What a test file's cases are checked against: the loaded policies and the configured issuers.
pub struct Context<'a> {
    pub policies: &'a PolicySet,
    pub issuers: &'a [IssuerConfig],
}

impl Suite {
    /// Loads every `*.yaml`/`*.yml` file in `dir` (not its subdirectories, such as `claims/`).
    /// `Err` when there is no test file to run; an error in a file or a case is in `errors`.
    pub fn load(dir: &Path, ctx: &Context<'_>) -> Result<Suite, String> {
        let files = test_files(dir)?;
        let mut suite = Suite::default();
        for file in files {
            suite.load_file(&file, ctx);
        }
        Ok(suite)
    }

    fn load_file(&mut self, path: &Path, ctx: &Context<'_>) {
        let file_error = |message: String| TestError { file: path.to_path_buf(), case: None, message };
        let raw: TestFile = match read_test_file(path) {
            Ok(raw) => raw,
            Err(message) => return self.errors.push(file_error(message)),
        };
        let TestFile { policy, claims_file, cases } = raw;
        if cases.is_empty() {
            self.errors.push(file_error("no cases".into()));
        }
        let defaults = Defaults { path, policy: policy.as_deref(), claims_file: claims_file.as_deref() };
        let mut names = BTreeSet::new();
        for case in cases {
            let name = case.name.clone();
            let loaded = if names.insert(name.clone()) {
                load_case(case, &defaults, ctx)
            } else {
                Err("another case in this file has the same name".into())
            };
            match loaded {
                Ok(case) => self.cases.push(case),
                Err(message) => self.errors.push(TestError { file: path.to_path_buf(), case: Some(name), message }),
            }
        }
    }

    /// Runs every case; the report also carries the load errors.
    pub fn run(self, policies: &PolicySet) -> Report {
        let results = self.cases.into_iter().map(|case| run_case(case, policies)).collect();
        Report { errors: self.errors, results }
    }
}

/// The test files in `dir`, sorted; `Err` when there are none.
fn test_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let hint = "write cases in *.yaml files there (see docs/policy.md, \"Policy tests\")";
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("no policy tests: {} does not exist; {hint}", dir.display()));
        }
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.is_dir() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    if files.is_empty() {
        return Err(format!("no policy tests: no *.yaml file in {}; {hint}", dir.display()));
    }
    files.sort();
    Ok(files)
}

fn read_test_file(path: &Path) -> Result<TestFile, String> {
    let len = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?.len();
    if len > MAX_POLICY_BYTES {
        return Err(format!("larger than {MAX_POLICY_BYTES} bytes"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    parse_yaml(&text)
}

/// What a case takes from its file.
struct Defaults<'a> {
    path: &'a Path,
    policy: Option<&'a str>,
    claims_file: Option<&'a str>,
}

fn load_case(raw: CaseFile, file: &Defaults<'_>, ctx: &Context<'_>) -> Result<Case, String> {
    let policy_name = raw
        .policy
        .or_else(|| file.policy.map(str::to_string))
        .ok_or("names no policy: set `policy` in the file or the case")?;
    let policy = ctx
        .policies
        .get(&policy_name)
        .ok_or_else(|| format!("unknown policy `{policy_name}` (loaded: {})", ctx.policies.names().join(", ")))?;
    let base = file.path.parent().unwrap_or(Path::new(""));
    let claims = case_claims(raw.claims_file.as_deref().or(file.claims_file), raw.claims, base)?;
    let issuer = match raw.issuer {
        Some(name) if ctx.issuers.iter().any(|i| i.name == name) => name,
        Some(name) => return Err(format!("issuer `{name}` is not a configured issuer")),
        None => policy.claims_issuer(&claims, ctx.issuers),
    };
    let ttl_secs = raw.ttl.as_deref().map(parse_duration).transpose().map_err(|e| format!("ttl: {e}"))?;
    Ok(Case {
        file: file.path.to_path_buf(),
        name: raw.name,
        policy: policy_name,
        issuer,
        claims,
        ttl_secs,
        expect: raw.expect,
    })
}

/// The claims file's claims (if any), with the inline claims merged over them.
fn case_claims(claims_file: Option<&str>, inline: BTreeMap<String, Value>, base: &Path) -> Result<Claims, String> {
    if claims_file.is_none() && inline.is_empty() {
        return Err("no claims: give `claims_file` or `claims`".into());
    }
    let mut claims = match claims_file {
        Some(rel) => read_claims(&base.join(rel))?,
        None => Claims::new(),
    };
    for (name, value) in inline {
        if value.is_null() {
            claims.remove(&name);
        } else {
            claims.insert(name, value);
        }
    }
    Ok(claims)
}

fn read_claims(path: &Path) -> Result<Claims, String> {
    let shown = path.display();
    let len = std::fs::metadata(path).map_err(|e| format!("claims file {shown}: cannot read: {e}"))?.len();
    if len > MAX_CLAIMS_BYTES {
        return Err(format!("claims file {shown}: larger than {MAX_CLAIMS_BYTES} bytes"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("claims file {shown}: cannot read: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("claims file {shown}: not a JSON object of claims: {e}"))
}

// ---- run -----------------------------------------------------------------------------------

/// The outcome of every case, and the errors that kept files or cases from running.
#[derive(Debug, Serialize)]
pub struct Report {
    pub errors: Vec<TestError>,
    #[serde(rename = "cases")]
    pub results: Vec<CaseResult>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    passed: usize,
    failed: usize,
    #[serde(flatten)]
    report: &'a Report,
}

/// One case's outcome.
#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub file: PathBuf,
    pub name: String,
    pub pass: bool,
    pub policy: String,
    pub issuer: String,
    pub expected: Expect,
    pub actual: Outcome,
    /// For a failing case: the explain lines of the checks that failed (issuer, rules).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed_rules: Vec<String>,
}

/// What the decision was.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The claim that decided a denial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// The ttl and grants of an allow; why, for a denial.
    pub detail: String,
}

fn run_case(case: Case, policies: &PolicySet) -> CaseResult {
    let actual = match policies.decide_claims(&case.policy, &case.issuer, &case.claims, case.ttl_secs) {
        Ok(allowed) => {
            let grants: Vec<&str> = allowed.credentials.iter().map(|c| c.name.as_str()).collect();
            let detail = format!("ttl {}, grants {}", format_duration(allowed.ttl_secs), grants.join(", "));
            Outcome { decision: "allow", claim: None, detail }
        }
        Err(denial) => Outcome { decision: "deny", detail: denial.log_detail(), claim: Some(denial.claim) },
    };
    let actual_expect = match &actual.claim {
        None => Expect::Allow,
        Some(claim) => Expect::Deny(claim.clone()),
    };
    let pass = actual_expect == case.expect;
    let failed_rules = if pass { Vec::new() } else { failed_checks(&case, policies) };
    CaseResult {
        file: case.file,
        name: case.name,
        pass,
        policy: case.policy,
        issuer: case.issuer,
        expected: case.expect,
        actual,
        failed_rules,
    }
}

/// The `FAIL` lines of the policy's explain trace.
fn failed_checks(case: &Case, policies: &PolicySet) -> Vec<String> {
    let Some(policy) = policies.get(&case.policy) else { return Vec::new() };
    let trace = policy.explain(&case.issuer, &case.claims).render();
    trace.lines().map(str::trim).filter(|l| l.starts_with("FAIL")).map(str::to_string).collect()
}

impl Report {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.pass).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }

    /// Every case passed and nothing failed to load.
    pub fn is_success(&self) -> bool {
        self.errors.is_empty() && self.failed() == 0
    }

    /// One line per case; a failing case adds expected, actual and the failed checks.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for r in &self.results {
            out.push_str(&render_case(r));
        }
        for e in &self.errors {
            out.push_str(&format!("error {e}\n"));
        }
        out.push_str(&format!("{} passed, {} failed", self.passed(), self.failed()));
        if !self.errors.is_empty() {
            out.push_str(&format!(", {} error(s)", self.errors.len()));
        }
        out.push('\n');
        out
    }

    /// `{passed, failed, errors, cases}`, pretty.
    pub fn render_json(&self) -> String {
        let json = JsonReport { passed: self.passed(), failed: self.failed(), report: self };
        // Serialising plain structs, strings and numbers cannot fail.
        serde_json::to_string_pretty(&json).unwrap_or_default() + "\n"
    }
}

fn render_case(r: &CaseResult) -> String {
    let head = format!("{}: {}", r.file.display(), r.name);
    if r.pass {
        return format!("ok    {head}\n");
    }
    let mut out = format!("FAIL  {head}\n");
    out.push_str(&format!("        policy `{}`, issuer `{}`\n", r.policy, r.issuer));
    out.push_str(&format!("        expected: {}\n", describe_expect(&r.expected)));
    let actual = match &r.actual.claim {
        None => format!("allow ({})", r.actual.detail),
        Some(claim) => format!("deny (deciding claim `{claim}`): {}", r.actual.detail),
    };
    out.push_str(&format!("        actual:   {actual}\n"));
    for line in &r.failed_rules {
        out.push_str(&format!("        {line}\n"));
    }
    out
}

fn describe_expect(expect: &Expect) -> String {
    match expect {
        Expect::Allow => "allow".into(),
        Expect::Deny(claim) => format!("deny (deciding claim `{claim}`)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inline_claims_override_the_file_and_null_removes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.json"), r#"{"ref": "refs/heads/main", "environment": "prod"}"#).unwrap();
        let inline =
            BTreeMap::from([("ref".to_string(), json!("refs/heads/dev")), ("environment".to_string(), Value::Null)]);
        let claims = case_claims(Some("c.json"), inline, dir.path()).unwrap();
        assert_eq!(Value::Object(claims), json!({"ref": "refs/heads/dev"}));
        assert!(case_claims(None, BTreeMap::new(), dir.path()).unwrap_err().contains("no claims"));
        std::fs::write(dir.path().join("list.json"), "[1]").unwrap();
        let err = case_claims(Some("list.json"), BTreeMap::new(), dir.path()).unwrap_err();
        assert!(err.contains("list.json: not a JSON object of claims"), "{err}");
    }

    #[test]
    fn expect_is_allow_or_deny_with_a_claim() {
        let parse = |yaml: &str| parse_yaml::<Expect>(yaml);
        assert_eq!(parse("allow"), Ok(Expect::Allow));
        assert_eq!(parse("{deny: event_name}"), Ok(Expect::Deny("event_name".into())));
        for bad in ["deny", "{deny: a, allow: b}", "maybe", "{deny: [a]}"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
