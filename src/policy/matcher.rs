//! Claim matchers, compiled once at load time.
//!
//! Scalars compare by their text: GitHub sends ids and booleans as strings, so `"74"` and `74`,
//! `"true"` and `true` are the same value to a policy. A missing (or `null`) claim fails every
//! matcher except `{exists: false}` and `{not: …}`.

use crate::claims::scalar_text;
use regex::{Regex, RegexBuilder};
use serde_json::Value;

/// Longest regex or glob source accepted.
const MAX_PATTERN_CHARS: usize = 1024;
/// Compiled-program cap: a pathological pattern is refused at load, not discovered at request.
const MAX_REGEX_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    AnyOf(Vec<String>),
    Glob {
        source: String,
        regex: Regex,
    },
    Regex {
        source: String,
        regex: Regex,
    },
    Not(Box<Matcher>),
    Exists(bool),
    /// For array claims (GitLab `groups_direct`): any element matches the inner matcher.
    Contains(Box<Matcher>),
}

impl Matcher {
    /// Compiles a matcher from its YAML form; the error names what is wrong, not where.
    pub fn parse(value: &Value) -> Result<Matcher, String> {
        match value {
            Value::Null => Err("a matcher cannot be empty (null)".into()),
            Value::Array(items) => {
                if items.is_empty() {
                    return Err("an empty list matches nothing; remove the rule or list values".into());
                }
                let texts = items
                    .iter()
                    .map(|v| scalar_text(v).ok_or("a list matcher holds only strings, numbers or booleans"))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Matcher::AnyOf(texts))
            }
            Value::Object(map) => {
                let mut entries = map.iter();
                let (Some((key, inner)), None) = (entries.next(), entries.next()) else {
                    return Err("a matcher map has exactly one key: glob, regex, not, exists or contains".into());
                };
                match key.as_str() {
                    "glob" => {
                        let source = pattern_text(inner, "glob")?;
                        Ok(Matcher::Glob { regex: compile(&glob_to_regex(&source))?, source })
                    }
                    "regex" => {
                        let source = pattern_text(inner, "regex")?;
                        // Anchored as ^(?:…)$, not ^…$: with plain anchors the alternation in
                        // `main|release` would match any value that merely starts with `main`
                        // or ends with `release` (octo-sts shipped this bug once).
                        Ok(Matcher::Regex { regex: compile(&format!("^(?:{source})$"))?, source })
                    }
                    "not" => Ok(Matcher::Not(Box::new(Matcher::parse(inner)?))),
                    "exists" => {
                        inner.as_bool().map(Matcher::Exists).ok_or_else(|| "`exists` takes true or false".into())
                    }
                    "contains" => Ok(Matcher::Contains(Box::new(Matcher::parse(inner)?))),
                    other => Err(format!(
                        "unknown matcher `{}` (use glob, regex, not, exists or contains)",
                        crate::clock::truncate(other, 40)
                    )),
                }
            }
            scalar => Ok(Matcher::Exact(scalar_text(scalar).unwrap_or_default())),
        }
    }

    /// Does the claim value satisfy this matcher? `None` is a missing claim.
    pub fn matches(&self, value: Option<&Value>) -> bool {
        let value = value.filter(|v| !v.is_null());
        match self {
            Matcher::Not(inner) => !inner.matches(value),
            Matcher::Exists(want) => value.is_some() == *want,
            Matcher::Contains(inner) => match value {
                Some(Value::Array(items)) => items.iter().any(|item| inner.matches(Some(item))),
                _ => false,
            },
            scalar_matcher => match value.and_then(scalar_text) {
                Some(text) => scalar_matcher.matches_text(&text),
                None => false,
            },
        }
    }

    fn matches_text(&self, text: &str) -> bool {
        match self {
            Matcher::Exact(want) => text == want,
            Matcher::AnyOf(wants) => wants.iter().any(|w| w == text),
            Matcher::Glob { regex, .. } | Matcher::Regex { regex, .. } => regex.is_match(text),
            Matcher::Not(_) | Matcher::Exists(_) | Matcher::Contains(_) => false,
        }
    }

    /// Does this matcher pin the claim to known values (exact or a list), so that a policy
    /// using it on an immutable id is really bound to specific repositories or projects?
    pub fn is_binding(&self) -> bool {
        matches!(self, Matcher::Exact(_) | Matcher::AnyOf(_))
    }
}

fn pattern_text(value: &Value, kind: &str) -> Result<String, String> {
    let text = value.as_str().ok_or_else(|| format!("`{kind}` takes a string"))?;
    if text.chars().count() > MAX_PATTERN_CHARS {
        return Err(format!("`{kind}` pattern is longer than {MAX_PATTERN_CHARS} characters"));
    }
    Ok(text.to_string())
}

/// `*` matches any run of characters except `/`, so `acme/*` never matches `acme/a/b`; every
/// other character is literal.
fn glob_to_regex(glob: &str) -> String {
    let mut out = String::from("^(?:");
    for (i, piece) in glob.split('*').enumerate() {
        if i > 0 {
            out.push_str("[^/]*");
        }
        out.push_str(&regex::escape(piece));
    }
    out.push_str(")$");
    out
}

fn compile(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .size_limit(MAX_REGEX_BYTES)
        .dfa_size_limit(MAX_REGEX_BYTES)
        .build()
        .map_err(|e| format!("invalid pattern: {}", e.to_string().lines().last().unwrap_or("syntax error").trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(v: Value) -> Matcher {
        Matcher::parse(&v).unwrap()
    }

    #[test]
    fn table_of_matchers_against_claim_values() {
        let cases: &[(Value, Option<Value>, bool)] = &[
            (json!("74"), Some(json!("74")), true),
            (json!(74), Some(json!("74")), true),
            (json!(true), Some(json!("true")), true),
            (json!("74"), Some(json!("740")), false),
            (json!("74"), None, false),
            (json!("74"), Some(json!(null)), false),
            (json!(["production", "staging"]), Some(json!("staging")), true),
            (json!(["production", "staging"]), Some(json!("dev")), false),
            (json!({"glob": "acme/*"}), Some(json!("acme/web")), true),
            (json!({"glob": "acme/*"}), Some(json!("acme/web/x")), false),
            (json!({"glob": "refs/heads/*"}), Some(json!("refs/heads/feature/x")), false),
            (json!({"glob": "a.b"}), Some(json!("axb")), false),
            (json!({"regex": "main|release"}), Some(json!("mainline")), false),
            (json!({"regex": "main|release"}), Some(json!("pre-release")), false),
            (json!({"regex": "main|release"}), Some(json!("release")), true),
            (json!({"not": "self-hosted"}), Some(json!("github-hosted")), true),
            (json!({"not": "self-hosted"}), None, true),
            (json!({"not": "self-hosted"}), Some(json!("self-hosted")), false),
            (json!({"exists": false}), None, true),
            (json!({"exists": false}), Some(json!(null)), true),
            (json!({"exists": true}), Some(json!("")), true),
            (json!({"contains": "my-group/platform"}), Some(json!(["x", "my-group/platform"])), true),
            (json!({"contains": {"glob": "my-group/*"}}), Some(json!(["other/x"])), false),
            (json!({"contains": "x"}), Some(json!("x")), false),
            (json!("x"), Some(json!(["x"])), false),
        ];
        for (rule, value, want) in cases {
            assert_eq!(m(rule.clone()).matches(value.as_ref()), *want, "{rule} against {value:?}");
        }
    }

    #[test]
    fn bad_matchers_are_refused_with_a_reason() {
        let cases = [
            (json!({"regx": "a"}), "unknown matcher `regx`"),
            (json!({"regex": "(unclosed"}), "invalid pattern"),
            (json!({"regex": "a{1000}{1000}{1000}"}), "invalid pattern"),
            (json!({"glob": "a", "regex": "b"}), "exactly one key"),
            (json!([]), "empty list"),
            (json!([["nested"]]), "only strings"),
            (json!({"exists": "yes"}), "true or false"),
            (json!(null), "cannot be empty"),
        ];
        for (rule, want) in cases {
            let err = Matcher::parse(&rule).unwrap_err();
            assert!(err.contains(want), "{rule}: {err}");
        }
    }
}
