//! AWS STS/IAM request formats and limits as pure functions: ARNs, session policies, session
//! tags, `RoleSessionName`, `DurationSeconds`, a backend's maximum session length; [`deny`] holds
//! the inline deny policy that revokes sessions.
//!
//! A leaf: nothing here imports the rest of the crate, so config (`check_backend_max_ttl`), policy
//! (grant checks at load) and `mint::aws` (the calls) all depend on it without depending on each
//! other. Checking here, before a call, turns an opaque `ValidationError` from AWS into a message
//! that names the rule, and keeps job-controlled text (branch names, repository names) from
//! breaking a mint. Error messages echo at most the first 40 characters of any input.

pub mod deny;

use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

/// Partitions whose IAM ARNs we accept.
const PARTITIONS: [&str; 3] = ["aws", "aws-cn", "aws-us-gov"];
/// IAM: ARNs are at most 2,048 characters.
const MAX_ARN_CHARS: usize = 2048;
/// IAM: role names are 1–64 characters.
const MAX_ROLE_NAME_CHARS: usize = 64;
/// IAM: managed policy names are 1–128 characters.
const MAX_POLICY_NAME_CHARS: usize = 128;
/// IAM: paths are at most 512 characters, slashes included.
const MAX_PATH_CHARS: usize = 512;
/// STS: the inline session policy is at most 2,048 characters.
const MAX_SESSION_POLICY_CHARS: usize = 2048;
/// STS: tag keys are 1–128 characters, tag values 0–256.
const MAX_TAG_KEY_CHARS: usize = 128;
const MAX_TAG_VALUE_CHARS: usize = 256;
/// STS: `RoleSessionName` is 2–64 characters.
const MIN_SESSION_NAME_CHARS: usize = 2;
const MAX_SESSION_NAME_CHARS: usize = 64;
/// STS: `DurationSeconds` is 900 (15 minutes) to 43,200 (12 hours).
const MIN_DURATION_SECS: i64 = 900;
const MAX_DURATION_SECS: i64 = 43_200;
/// How much user input an error message may repeat.
const ECHO_CHARS: usize = 40;

/// STS `AssumeRole` accepts at most 10 managed session policy ARNs (`PolicyArns`).
pub const MAX_POLICY_ARNS: usize = 10;

/// STS accepts at most 50 session tags per `AssumeRole` call.
pub const MAX_SESSION_TAGS: usize = 50;

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// The first 40 characters of `input`, debug-quoted (control characters escaped, so a hostile
/// value cannot forge log lines), with `…` when cut. Never the whole of a long value.
fn shown(input: &str) -> String {
    let head: String = input.chars().take(ECHO_CHARS).collect();
    let more = if input.chars().nth(ECHO_CHARS).is_some() { "…" } else { "" };
    format!("{head:?}{more}")
}

/// IAM name characters (`[\w+=,.@-]` with ASCII `\w`): role, policy and path segment names,
/// `RoleSessionName`.
fn is_iam_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '=' | ',' | '.' | '@' | '-')
}

/// Tag characters, AWS `[\p{L}\p{Z}\p{N}_.:/=+\-@]`. std has no general-category lookup, so
/// `\p{L}` is approximated by Alphabetic-and-not-numeric: exact for letters, but it also admits
/// the rare Other_Alphabetic marks (e.g. Indic vowel signs), which AWS may still refuse.
/// `\p{Z}` is White_Space minus controls (exact); `\p{N}` is `is_numeric` (exact).
fn is_tag_char(c: char) -> bool {
    let letter = c.is_alphabetic() && !c.is_numeric();
    let separator = c.is_whitespace() && !c.is_control();
    letter || separator || c.is_numeric() || matches!(c, '_' | '.' | ':' | '/' | '=' | '+' | '-' | '@')
}

fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// Compact JSON (no whitespace between tokens) and its length in characters.
fn compact(doc: &Value) -> Result<(String, usize), String> {
    let text = serde_json::to_string(doc).map_err(|e| format!("policy does not serialize: {e}"))?;
    let chars = char_len(&text);
    Ok((text, chars))
}

// ---------------------------------------------------------------------------------------------
// ARNs
// ---------------------------------------------------------------------------------------------

/// Checks an IAM role ARN: `arn:{aws|aws-cn|aws-us-gov}:iam::{12-digit account}:role/{path/}name`,
/// role name 1–64 characters of `[A-Za-z0-9_+=,.@-]`, path segments of the same characters
/// (path ≤ 512 characters), whole ARN ≤ 2,048 characters. Refusing at config time stops a typo
/// (an 11-digit account, a `user/` ARN) from surfacing only as a failed mint in a job.
pub fn check_role_arn(arn: &str) -> Result<(), String> {
    check_iam_arn(arn, "role", false, MAX_ROLE_NAME_CHARS)
}

/// Checks an IAM managed policy ARN: `arn:{partition}:iam::{12-digit account | aws}:policy/{path/}name`,
/// policy name 1–128 characters of `[A-Za-z0-9_+=,.@-]`; `aws` is the account of AWS managed
/// policies (`arn:aws:iam::aws:policy/ReadOnlyAccess`).
pub fn check_policy_arn(arn: &str) -> Result<(), String> {
    check_iam_arn(arn, "policy", true, MAX_POLICY_NAME_CHARS)
}

fn check_iam_arn(arn: &str, kind: &str, aws_account_ok: bool, max_name: usize) -> Result<(), String> {
    let what = format!("{kind} ARN {}", shown(arn));
    let len = char_len(arn);
    if len > MAX_ARN_CHARS {
        return Err(format!("{what} is {len} characters; IAM allows at most 2,048"));
    }
    let fields: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = fields[..] else {
        return Err(format!("{what} is not arn:PARTITION:iam::ACCOUNT:{kind}/NAME"));
    };
    if prefix != "arn" || service != "iam" || !region.is_empty() {
        return Err(format!("{what} is not arn:PARTITION:iam::ACCOUNT:{kind}/NAME (IAM ARNs have no region)"));
    }
    if !PARTITIONS.contains(&partition) {
        return Err(format!("{what}: partition must be one of aws, aws-cn, aws-us-gov"));
    }
    let twelve_digits = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    if !(twelve_digits || (aws_account_ok && account == "aws")) {
        let expected = if aws_account_ok { "a 12-digit account id or \"aws\"" } else { "a 12-digit account id" };
        return Err(format!("{what}: account must be {expected}"));
    }
    let Some(path_and_name) = resource.strip_prefix(kind).and_then(|r| r.strip_prefix('/')) else {
        return Err(format!("{what}: resource must start with {kind}/"));
    };
    check_path_and_name(&what, kind, path_and_name, max_name)
}

/// `path/segments/name` after `role/` or `policy/`.
fn check_path_and_name(what: &str, kind: &str, path_and_name: &str, max_name: usize) -> Result<(), String> {
    let (path, name) = path_and_name.rsplit_once('/').unwrap_or(("", path_and_name));
    let name_len = char_len(name);
    if name_len == 0 || name_len > max_name || !name.chars().all(is_iam_name_char) {
        return Err(format!(
            "{what}: {kind} name must be 1–{max_name} characters of A-Z a-z 0-9 _+=,.@- (got {name_len})"
        ));
    }
    if path.is_empty() {
        return Ok(());
    }
    if path.split('/').any(|seg| seg.is_empty() || !seg.chars().all(is_iam_name_char)) {
        return Err(format!("{what}: path segments must be non-empty and use only A-Z a-z 0-9 _+=,.@-"));
    }
    let path_len = char_len(path) + 2; // IAM counts the leading and trailing slash
    if path_len > MAX_PATH_CHARS {
        return Err(format!("{what}: path is {path_len} characters; IAM allows at most 512"));
    }
    Ok(())
}

/// Checks the `PolicyArns` of one `AssumeRole` call: at most 10, each a valid policy ARN, no
/// duplicates (STS refuses the call otherwise, and a duplicate usually hides a config mistake).
pub fn check_policy_arns(arns: &[String]) -> Result<(), String> {
    if arns.len() > MAX_POLICY_ARNS {
        return Err(format!("{} policy ARNs; STS allows at most {MAX_POLICY_ARNS} per session", arns.len()));
    }
    let mut seen = BTreeSet::new();
    for arn in arns {
        check_policy_arn(arn)?;
        if !seen.insert(arn.as_str()) {
            return Err(format!("policy ARN {} is listed twice", shown(arn)));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Session policy
// ---------------------------------------------------------------------------------------------

/// Validates an inline session policy and returns its compact serialization, the form sent as
/// `Policy`. It must be an object with `Version` (`2012-10-17` or `2008-10-17`) and a non-empty
/// `Statement` (one object or an array of objects), and pack to at most 2,048 characters, the STS
/// limit. Refusing here means an oversized policy fails the grant instead of minting a session
/// without the intended narrowing.
pub fn pack_session_policy(policy: &Value) -> Result<String, String> {
    let Some(obj) = policy.as_object() else {
        return Err("session policy must be a JSON object".into());
    };
    match obj.get("Version").and_then(Value::as_str) {
        Some("2012-10-17" | "2008-10-17") => {}
        _ => return Err("session policy needs \"Version\": \"2012-10-17\"".into()),
    }
    let statement_ok = match obj.get("Statement") {
        Some(Value::Object(s)) => !s.is_empty(),
        Some(Value::Array(list)) => {
            !list.is_empty() && list.iter().all(|s| s.as_object().is_some_and(|o| !o.is_empty()))
        }
        _ => false,
    };
    if !statement_ok {
        return Err("session policy needs a non-empty \"Statement\" (an object or an array of objects)".into());
    }
    let (packed, chars) = compact(policy)?;
    if chars > MAX_SESSION_POLICY_CHARS {
        return Err(format!("session policy is {chars} characters packed; STS allows at most 2,048 characters"));
    }
    Ok(packed)
}

// ---------------------------------------------------------------------------------------------
// Session tags
// ---------------------------------------------------------------------------------------------

/// Checks a session tag key: 1–128 characters of letters, digits, spaces and `_ . : / = + - @`
/// (AWS `[\p{L}\p{Z}\p{N}_.:/=+\-@]+`), not starting with the reserved `aws:` prefix.
pub fn check_tag_key(key: &str) -> Result<(), String> {
    let len = char_len(key);
    if len == 0 || len > MAX_TAG_KEY_CHARS {
        return Err(format!("session tag key {} is {len} characters; AWS allows 1–128", shown(key)));
    }
    if let Some(bad) = key.chars().find(|c| !is_tag_char(*c)) {
        return Err(format!(
            "session tag key {} has {bad:?}; AWS allows letters, digits, spaces and _.:/=+-@",
            shown(key)
        ));
    }
    if key.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:")) {
        return Err(format!("session tag key {}: the aws: prefix is reserved by AWS", shown(key)));
    }
    Ok(())
}

/// Checks the tag keys of one session: at most 50, and unique case-insensitively — AWS treats
/// `Repo` and `repo` as the same key and refuses the call, so two config entries that differ
/// only in case must be caught before a job depends on them.
pub fn check_tag_keys_unique(keys: &[&str]) -> Result<(), String> {
    if keys.len() > MAX_SESSION_TAGS {
        return Err(format!("{} session tags; STS allows at most {MAX_SESSION_TAGS}", keys.len()));
    }
    let mut seen: HashMap<String, &str> = HashMap::new();
    for key in keys {
        if let Some(first) = seen.insert(key.to_lowercase(), *key) {
            return Err(format!(
                "session tag keys {} and {} differ only in case; AWS tag keys are case-insensitive",
                shown(first),
                shown(key)
            ));
        }
    }
    Ok(())
}

/// Makes job-controlled text (a branch, a workflow name) a valid session tag value: every
/// character outside letters, digits, spaces and `_ . : / = + - @` becomes `_`, then the result
/// is cut to 256 characters. Empty stays empty (AWS allows empty values). Without this, a branch
/// named `fix;rm` or holding an emoji would make `AssumeRole` fail for that job.
pub fn sanitize_tag_value(value: &str) -> String {
    value.chars().map(|c| if is_tag_char(c) { c } else { '_' }).take(MAX_TAG_VALUE_CHARS).collect()
}

/// Whether [`sanitize_tag_value`] altered a value, so the caller can log that the tag differs
/// from the claim it came from.
pub fn tag_value_was_changed(original: &str, sanitized: &str) -> bool {
    original != sanitized
}

// ---------------------------------------------------------------------------------------------
// RoleSessionName
// ---------------------------------------------------------------------------------------------

/// Builds a `RoleSessionName` (2–64 characters of `[A-Za-z0-9_+=,.@-]`) that traces a session in
/// CloudTrail back to its job. The rule:
///
/// 1. each part has every character outside that set replaced by `-`; empty parts are skipped;
/// 2. parts are joined with `.`;
/// 3. if that exceeds 64 characters, the FIRST part (typically the repository) is cut from its
///    start, keeping its end, so the later parts (run id, attempt) survive intact; if those later
///    parts alone leave no room for it, the first part is dropped and the rest is cut at 64;
/// 4. a result shorter than 2 characters is padded with `-`.
pub fn role_session_name(parts: &[&str]) -> String {
    let cleaned: Vec<String> = parts
        .iter()
        .map(|p| p.chars().map(|c| if is_iam_name_char(c) { c } else { '-' }).collect::<String>())
        .filter(|p| !p.is_empty())
        .collect();
    let mut name = fit_session_name(&cleaned);
    while name.len() < MIN_SESSION_NAME_CHARS {
        name.push('-');
    }
    name
}

/// Steps 2–3 of [`role_session_name`]; parts are ASCII, so bytes are characters.
fn fit_session_name(parts: &[String]) -> String {
    let joined = parts.join(".");
    if joined.len() <= MAX_SESSION_NAME_CHARS {
        return joined;
    }
    let Some((first, rest)) = parts.split_first() else {
        return joined;
    };
    let tail = rest.join(".");
    let separator = usize::from(!tail.is_empty());
    match MAX_SESSION_NAME_CHARS.checked_sub(tail.len() + separator) {
        Some(room) if room > 0 => {
            let kept: String = first.chars().skip(first.len().saturating_sub(room)).collect();
            if tail.is_empty() { kept } else { format!("{kept}.{tail}") }
        }
        _ => tail.chars().take(MAX_SESSION_NAME_CHARS).collect(),
    }
}

/// Checks a `RoleSessionName`: 2–64 characters of `[A-Za-z0-9_+=,.@-]`.
pub fn check_role_session_name(name: &str) -> Result<(), String> {
    let len = char_len(name);
    if !(MIN_SESSION_NAME_CHARS..=MAX_SESSION_NAME_CHARS).contains(&len) {
        return Err(format!("role session name {} is {len} characters; STS allows 2–64", shown(name)));
    }
    if !name.chars().all(is_iam_name_char) {
        return Err(format!("role session name {} may use only A-Z a-z 0-9 _+=,.@-", shown(name)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// DurationSeconds
// ---------------------------------------------------------------------------------------------

/// The `DurationSeconds` for a lease: the lease TTL, raised to STS's minimum of 900 seconds,
/// capped by the backend's configured maximum (the role's `MaxSessionDuration`) and by STS's
/// 43,200, and never below 900 even if that maximum is misconfigured lower (STS would refuse
/// anything shorter). A session can so outlive a short lease; revocation covers that gap.
pub fn duration_seconds(lease_ttl_secs: i64, backend_max_secs: i64) -> i64 {
    lease_ttl_secs.min(backend_max_secs).clamp(MIN_DURATION_SECS, MAX_DURATION_SECS)
}

/// Checks a backend's maximum session length: 900..=43,200 seconds, the range STS and IAM's
/// `MaxSessionDuration` allow.
pub fn check_backend_max_ttl(secs: i64) -> Result<(), String> {
    if (MIN_DURATION_SECS..=MAX_DURATION_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(format!("max TTL of {secs} seconds; AWS sessions last 900 to 43,200 seconds (15 minutes to 12 hours)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ACCOUNT: &str = "123456789012";

    fn role_arn(resource: &str) -> String {
        format!("arn:aws:iam::{ACCOUNT}:role/{resource}")
    }

    #[test]
    fn role_arns_follow_partition_account_and_name_rules() {
        let cases: Vec<(&str, String, bool)> = vec![
            ("plain role", role_arn("deploy"), true),
            ("china partition", format!("arn:aws-cn:iam::{ACCOUNT}:role/deploy"), true),
            ("govcloud with a path", format!("arn:aws-us-gov:iam::{ACCOUNT}:role/ci/prod/deploy"), true),
            ("every allowed name character", role_arn("a_b+c=d,e.f@g-h9"), true),
            ("64-char name", role_arn(&"r".repeat(64)), true),
            ("65-char name", role_arn(&"r".repeat(65)), false),
            ("11-digit account", "arn:aws:iam::12345678901:role/deploy".into(), false),
            ("13-digit account", "arn:aws:iam::1234567890123:role/deploy".into(), false),
            ("letter in account", "arn:aws:iam::12345678901a:role/deploy".into(), false),
            ("aws account is for policies only", "arn:aws:iam::aws:role/deploy".into(), false),
            ("unknown partition", format!("arn:aws-iso:iam::{ACCOUNT}:role/deploy"), false),
            ("sts service", format!("arn:aws:sts::{ACCOUNT}:role/deploy"), false),
            ("region present", format!("arn:aws:iam:us-east-1:{ACCOUNT}:role/deploy"), false),
            ("user not role", format!("arn:aws:iam::{ACCOUNT}:user/deploy"), false),
            ("rolex prefix", format!("arn:aws:iam::{ACCOUNT}:rolex/deploy"), false),
            ("empty name", role_arn(""), false),
            ("trailing slash", role_arn("ci/"), false),
            ("empty path segment", role_arn("ci//deploy"), false),
            ("space in name", role_arn("de ploy"), false),
            ("colon in name", role_arn("de:ploy"), false),
            ("unicode in name", role_arn("déploy"), false),
            ("too few fields", "arn:aws:iam::123456789012".into(), false),
            ("not an arn", "deploy".into(), false),
            ("path of 512 chars", role_arn(&format!("{}/deploy", "p".repeat(510))), true),
            ("path of 513 chars", role_arn(&format!("{}/deploy", "p".repeat(511))), false),
            ("over 2048 chars", role_arn(&format!("{}/deploy", "p/".repeat(1100))), false),
        ];
        for (scenario, arn, ok) in cases {
            assert_eq!(check_role_arn(&arn).is_ok(), ok, "{scenario}: {:?}", check_role_arn(&arn));
        }
    }

    #[test]
    fn arn_errors_name_the_limit_and_echo_only_forty_chars() {
        let secretish = format!("arn:aws:iam::{ACCOUNT}:role/{}", "S3CR3T".repeat(400));
        let err = check_role_arn(&secretish).unwrap_err();
        assert!(err.contains("2,048"), "{err}");
        assert!(!err.contains(&"S3CR3T".repeat(3)), "echoes too much: {err}");
        let err = check_role_arn(&role_arn(&"r".repeat(65))).unwrap_err();
        assert!(err.contains("1–64") && err.contains("got 65"), "{err}");
        let err = check_role_arn("arn:aws:iam::12345678901:role/deploy").unwrap_err();
        assert!(err.contains("12-digit"), "{err}");
        let err = check_role_arn("arn:aws:iam::123456789012:role/a\nFAKE LOG LINE").unwrap_err();
        assert!(!err.contains('\n'), "control characters are escaped: {err}");
    }

    #[test]
    fn policy_arns_allow_the_aws_account_and_longer_names() {
        let cases: Vec<(&str, String, bool)> = vec![
            ("aws managed", "arn:aws:iam::aws:policy/ReadOnlyAccess".into(), true),
            ("aws managed with path", "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole".into(), true),
            ("customer managed with path", format!("arn:aws:iam::{ACCOUNT}:policy/team/ci-deploy"), true),
            ("128-char name", format!("arn:aws:iam::{ACCOUNT}:policy/{}", "p".repeat(128)), true),
            ("129-char name", format!("arn:aws:iam::{ACCOUNT}:policy/{}", "p".repeat(129)), false),
            ("AWS in capitals", "arn:aws:iam::AWS:policy/ReadOnlyAccess".into(), false),
            ("role arn", role_arn("deploy"), false),
            ("11-digit account", "arn:aws:iam::12345678901:policy/x".into(), false),
        ];
        for (scenario, arn, ok) in cases {
            assert_eq!(check_policy_arn(&arn).is_ok(), ok, "{scenario}: {:?}", check_policy_arn(&arn));
        }
    }

    #[test]
    fn policy_arn_lists_are_capped_at_ten_valid_distinct_arns() {
        let arns =
            |n: usize| -> Vec<String> { (0..n).map(|i| format!("arn:aws:iam::{ACCOUNT}:policy/p{i}")).collect() };
        let mut duplicate = arns(3);
        duplicate.push(duplicate[1].clone());
        let mut invalid = arns(3);
        invalid.push("arn:aws:iam::1:policy/x".into());
        let cases: Vec<(&str, Vec<String>, Option<&str>)> = vec![
            ("none", vec![], None),
            ("ten", arns(10), None),
            ("eleven", arns(11), Some("at most 10")),
            ("duplicate", duplicate, Some("twice")),
            ("one invalid", invalid, Some("12-digit")),
        ];
        for (scenario, list, want_err) in cases {
            match (check_policy_arns(&list), want_err) {
                (Ok(()), None) => {}
                (Err(e), Some(fragment)) => assert!(e.contains(fragment), "{scenario}: {e}"),
                (got, _) => panic!("{scenario}: unexpected {got:?}"),
            }
        }
    }

    fn policy_with_resource(resource: &str) -> Value {
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": resource}]})
    }

    #[test]
    fn session_policy_packs_up_to_exactly_2048_chars() {
        let base = compact(&policy_with_resource("")).unwrap().1;
        let at_limit = policy_with_resource(&"a".repeat(2048 - base));
        let packed = pack_session_policy(&at_limit).unwrap();
        assert_eq!(packed.chars().count(), 2048);
        assert!(!packed.contains(' ') && !packed.contains('\n'), "compact: {}", &packed[..60]);
        let over = policy_with_resource(&"a".repeat(2049 - base));
        let err = pack_session_policy(&over).unwrap_err();
        assert!(err.contains("2049") && err.contains("2,048 characters"), "{err}");
    }

    #[test]
    fn session_policy_counts_characters_not_bytes() {
        let base = compact(&policy_with_resource("")).unwrap().1;
        let latin1 = policy_with_resource(&"é".repeat(2048 - base));
        assert!(pack_session_policy(&latin1).is_ok(), "2048 characters but more bytes");
    }

    #[test]
    fn session_policy_pretty_printed_large_but_packing_small_is_accepted() {
        let actions: Vec<String> = (0..150).map(|i| format!("s3:A{i}")).collect();
        let pretty = serde_json::to_string_pretty(
            &json!({"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": actions, "Resource": "*"}}),
        )
        .unwrap();
        assert!(pretty.len() > 2048, "the fixture must be large when pretty: {}", pretty.len());
        let policy: Value = serde_json::from_str(&pretty).unwrap();
        let packed = pack_session_policy(&policy).unwrap();
        assert!(packed.len() <= 2048 && packed.starts_with("{\""), "{}", packed.len());
    }

    #[test]
    fn session_policy_needs_version_and_a_non_empty_statement() {
        let cases: Vec<(&str, Value)> = vec![
            ("not an object", json!(["Version"])),
            ("no version", json!({"Statement": {"Effect": "Allow"}})),
            ("unknown version", json!({"Version": "2024-01-01", "Statement": {"Effect": "Allow"}})),
            ("no statement", json!({"Version": "2012-10-17"})),
            ("empty statement array", json!({"Version": "2012-10-17", "Statement": []})),
            ("empty statement object", json!({"Version": "2012-10-17", "Statement": {}})),
            ("statement string", json!({"Version": "2012-10-17", "Statement": "allow all"})),
            ("array of strings", json!({"Version": "2012-10-17", "Statement": ["x"]})),
        ];
        for (scenario, policy) in cases {
            assert!(pack_session_policy(&policy).is_err(), "{scenario}");
        }
        assert!(pack_session_policy(&json!({"Version": "2008-10-17", "Statement": {"Effect": "Deny"}})).is_ok());
    }

    #[test]
    fn tag_keys_use_the_aws_character_set_and_length() {
        let cases: Vec<(&str, String, bool)> = vec![
            ("simple", "repository".into(), true),
            ("every allowed symbol", "team:ci/x=y+z-w@v_u.t".into(), true),
            ("space", "Project Name".into(), true),
            ("non-latin letters and digits", "東京٣".into(), true),
            ("128 chars", "k".repeat(128), true),
            ("129 chars", "k".repeat(129), false),
            ("empty", String::new(), false),
            ("semicolon", "a;b".into(), false),
            ("newline", "a\nb".into(), false),
            ("emoji", "tag😀".into(), false),
            ("reserved aws prefix", "aws:source".into(), false),
            ("reserved prefix in capitals", "AWS:Source".into(), false),
            ("aws without colon is fine", "awsome".into(), true),
        ];
        for (scenario, key, ok) in cases {
            assert_eq!(check_tag_key(&key).is_ok(), ok, "{scenario}: {:?}", check_tag_key(&key));
        }
    }

    #[test]
    fn tag_keys_differing_only_in_case_are_duplicates() {
        let fifty_one: Vec<String> = (0..51).map(|i| format!("k{i}")).collect();
        let fifty_one: Vec<&str> = fifty_one.iter().map(String::as_str).collect();
        let cases: Vec<(&str, Vec<&str>, bool)> = vec![
            ("distinct", vec!["Repo", "Ref", "Actor"], true),
            ("same key twice", vec!["Repo", "Repo"], false),
            ("differ in case", vec!["Repo", "Ref", "repo"], false),
            ("non-ascii case", vec!["Été", "été"], false),
            ("fifty", fifty_one[..50].to_vec(), true),
            ("fifty-one", fifty_one, false),
        ];
        for (scenario, keys, ok) in cases {
            assert_eq!(check_tag_keys_unique(&keys).is_ok(), ok, "{scenario}: {:?}", check_tag_keys_unique(&keys));
        }
        let err = check_tag_keys_unique(&["Repo", "repo"]).unwrap_err();
        assert!(err.contains("\"Repo\"") && err.contains("\"repo\"") && err.contains("case-insensitive"), "{err}");
    }

    #[test]
    fn tag_values_are_sanitized_and_truncated() {
        let cases: Vec<(&str, String, String)> = vec![
            ("empty stays empty", String::new(), String::new()),
            ("clean is untouched", "refs/heads/main".into(), "refs/heads/main".into()),
            ("newline emoji semicolon", "fix\nbug😀;rm".into(), "fix_bug__rm".into()),
            ("tab replaced, nbsp kept", "a\tb\u{a0}c".into(), "a_b\u{a0}c".into()),
            ("letters of any script kept", "café 東京 ١٢".into(), "café 東京 ١٢".into()),
            ("quotes and shell", "$(id)`\"'".into(), "__id____".into()),
            ("300 ascii to 256", "v".repeat(300), "v".repeat(256)),
            ("300 multibyte to 256 chars", "é".repeat(300), "é".repeat(256)),
        ];
        for (scenario, input, want) in cases {
            let got = sanitize_tag_value(&input);
            assert_eq!(got, want, "{scenario}");
            assert_eq!(tag_value_was_changed(&input, &got), input != want, "{scenario}");
        }
    }

    #[test]
    fn session_names_keep_the_run_id_when_the_repository_is_long() {
        let repo = "a-very-long-organisation-name/an-even-longer-repository-name-for-testing";
        let repo_end = &repo.replace('/', "-")[repo.len() - (64 - ".9876543210.3".len())..];
        let (long_single, t63, t70) = ("ab".repeat(40), "t".repeat(63), "t".repeat(70));
        let cases: Vec<(&str, Vec<&str>, String)> = vec![
            ("short parts joined with dots", vec!["org/repo", "12345", "1"], "org-repo.12345.1".into()),
            ("long repository cut from its start", vec![repo, "9876543210", "3"], format!("{repo_end}.9876543210.3")),
            ("empty parts skipped", vec!["org/repo", "", "7"], "org-repo.7".into()),
            ("single long part keeps its end", vec![&long_single], long_single[16..].to_string()),
            ("tail alone too long is cut at the end", vec!["repo", &t70], t70[..64].to_string()),
            ("tail leaving no room drops the first part", vec!["repo", &t63], t63.clone()),
            ("one char padded", vec!["x"], "x-".into()),
            ("nothing padded", vec![], "--".into()),
            ("only empty parts padded", vec!["", ""], "--".into()),
            ("disallowed chars become dashes", vec!["ré po", "1:2"], "r--po.1-2".into()),
        ];
        for (scenario, parts, want) in cases {
            let got = role_session_name(&parts);
            assert_eq!(got, want, "{scenario}");
            assert!(check_role_session_name(&got).is_ok(), "{scenario}: {got}");
        }
        let long = role_session_name(&[repo, "9876543210", "3"]);
        assert_eq!(long.len(), 64);
        assert!(long.ends_with("repository-name-for-testing.9876543210.3"), "{long}");
    }

    #[test]
    fn session_name_check_enforces_length_and_characters() {
        let cases: Vec<(&str, String, bool)> = vec![
            ("two chars", "ab".into(), true),
            ("one char", "a".into(), false),
            ("64 chars", "n".repeat(64), true),
            ("65 chars", "n".repeat(65), false),
            ("all symbols", "a_+=,.@-".into(), true),
            ("slash", "org/repo".into(), false),
            ("space", "a b".into(), false),
        ];
        for (scenario, name, ok) in cases {
            assert_eq!(check_role_session_name(&name).is_ok(), ok, "{scenario}");
        }
    }

    #[test]
    fn duration_is_clamped_between_900_and_the_backend_max() {
        let cases = [
            ("short lease raised to 900", 60, 3600, 900),
            ("long lease capped by backend", 7200, 3600, 3600),
            ("lease within range", 1800, 3600, 1800),
            ("backend max below 900 still 900", 1000, 600, 900),
            ("negative ttl", -5, 3600, 900),
            ("capped by the STS maximum", 100_000, 100_000, 43_200),
            ("twelve hours", 43_200, 43_200, 43_200),
        ];
        for (scenario, ttl, max, want) in cases {
            assert_eq!(duration_seconds(ttl, max), want, "{scenario}");
        }
    }

    #[test]
    fn backend_max_ttl_must_be_a_valid_session_length() {
        let cases = [(899, false), (900, true), (3600, true), (43_200, true), (43_201, false), (-1, false)];
        for (secs, ok) in cases {
            assert_eq!(check_backend_max_ttl(secs).is_ok(), ok, "{secs}");
        }
        assert!(check_backend_max_ttl(60).unwrap_err().contains("43,200"));
    }
}
