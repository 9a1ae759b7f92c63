//! The `env` format of an exchange reply: POSIX `sh` assignments a job can source. One definition
//! of the variable names, shared by the broker (`Accept: text/plain`) and the CLI (`--format env`,
//! `--format github-env`), so the two can never drift apart.

use serde_json::Value;

/// The variables of the `env` format, with the same names the broker uses
/// : `EPHEMERA_LEASE_ID`, `EPHEMERA_EXPIRES_AT`, `EPHEMERA_JOB`,
/// `EPHEMERA_POLICY`, `EPHEMERA_<NAME>_<FIELD>` for every credential field, the standard
/// `AWS_*` variables when exactly one credential is of kind `aws`, and `GH_TOKEN` (what the `gh`
/// CLI reads) when exactly one is of kind `github`.
pub fn env_vars(reply: &Value) -> Vec<(String, String)> {
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let top = |k: &str| reply.get(k).map(text).unwrap_or_default();
    let mut vars: Vec<(String, String)> = vec![
        ("EPHEMERA_LEASE_ID".into(), top("lease_id")),
        ("EPHEMERA_EXPIRES_AT".into(), top("expires_at")),
        ("EPHEMERA_JOB".into(), top("job")),
        ("EPHEMERA_POLICY".into(), top("policy")),
    ];
    // A renewable lease (issue 15): what renews it, and until when.
    if let Some(renew) = reply.get("renew").filter(|r| r.is_object()) {
        vars.push(("EPHEMERA_RENEW_TOKEN".into(), renew.get("token").map(text).unwrap_or_default()));
        vars.push(("EPHEMERA_RENEW_UNTIL".into(), renew.get("until").map(text).unwrap_or_default()));
    }
    let credentials = reply.get("credentials").and_then(Value::as_object);
    for (name, cred) in credentials.into_iter().flatten() {
        for (field, value) in cred.as_object().into_iter().flatten() {
            vars.push((format!("EPHEMERA_{}_{}", env_name(name), env_name(field)), text(value)));
        }
    }
    let aws: Vec<&Value> =
        credentials.into_iter().flatten().map(|(_, c)| c).filter(|c| c["kind"].as_str() == Some("aws")).collect();
    if let [only] = aws.as_slice() {
        let field = |k: &str| only.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        for (var, key) in [
            ("AWS_ACCESS_KEY_ID", "access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
            ("AWS_SESSION_TOKEN", "session_token"),
            ("AWS_REGION", "region"),
            ("AWS_DEFAULT_REGION", "region"),
        ] {
            vars.push((var.into(), field(key)));
        }
    }
    let github: Vec<&Value> =
        credentials.into_iter().flatten().map(|(_, c)| c).filter(|c| c["kind"].as_str() == Some("github")).collect();
    if let [only] = github.as_slice() {
        vars.push(("GH_TOKEN".into(), only.get("token").map(text).unwrap_or_default()));
    }
    vars
}

/// `deploy-web` → `DEPLOY_WEB` (as the broker names them).
fn env_name(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}

/// The reply as `export NAME='value'` lines.
pub fn render(reply: &Value) -> String {
    env_vars(reply).iter().map(|(k, v)| format!("export {k}={}\n", sh_quote(v))).collect()
}

/// Single quotes for POSIX sh: nothing inside is interpreted; a `'` becomes `'\''`.
pub fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_quoting_survives_hostile_values() {
        for value in ["plain", "a'b", "$(touch /tmp/pwned)", "`id`", "two\nlines", "'; rm -rf / #", ""] {
            let script = format!("v={}; printf %s \"$v\"", sh_quote(value));
            let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), value, "{script}");
        }
        assert_eq!(env_name("deploy-web"), "DEPLOY_WEB");
    }

    #[test]
    fn a_renewable_lease_adds_its_renew_token_and_end_and_others_do_not() {
        let names =
            |reply: serde_json::Value| -> Vec<String> { env_vars(&reply).into_iter().map(|(k, _)| k).collect() };
        let renewable =
            serde_json::json!({"lease_id": "lse_1", "renew": {"token": "ephr_x", "until": "2026-12-06T12:00:00Z"}});
        let vars = env_vars(&renewable);
        assert!(vars.contains(&("EPHEMERA_RENEW_TOKEN".into(), "ephr_x".into())), "{vars:?}");
        assert!(vars.contains(&("EPHEMERA_RENEW_UNTIL".into(), "2026-12-06T12:00:00Z".into())), "{vars:?}");
        assert!(!names(serde_json::json!({"lease_id": "lse_1"})).iter().any(|n| n.starts_with("EPHEMERA_RENEW")));
    }

    #[test]
    fn one_github_credential_is_also_gh_token_and_two_are_not() {
        let gh = |t: &str| serde_json::json!({"kind": "github", "token": t});
        let one = env_vars(&serde_json::json!({"credentials": {"gh": gh("ghs_1")}}));
        assert!(one.contains(&("GH_TOKEN".into(), "ghs_1".into())), "{one:?}");
        assert!(one.contains(&("EPHEMERA_GH_TOKEN".into(), "ghs_1".into())), "{one:?}");
        let two = env_vars(&serde_json::json!({"credentials": {"a": gh("ghs_1"), "b": gh("ghs_2")}}));
        assert!(!two.iter().any(|(k, _)| k == "GH_TOKEN"), "ambiguous: none is GH_TOKEN");
    }
}
