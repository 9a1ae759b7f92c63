//! The JSON Schemas of policy files and policy test files are generated from their serde structs
//! (`ephemera policy schema [--tests]`); the committed copies must be what the code generates,
//! and every shipped file points its editor at them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::repo_path;
use ephemera::policy::policy_schema;
use ephemera::policy::testing::test_schema;
use serde_json::Value;

const HEADER: &str = "# yaml-language-server: $schema=./schema.json";

fn assert_committed(path: &str, generated: &str, command: &str) {
    let committed = std::fs::read_to_string(repo_path(path)).unwrap_or_default();
    assert!(
        committed == generated,
        "{path} is not the schema the code generates: run `cargo run -- {command} > {path}` and commit it"
    );
}

#[test]
fn the_committed_policy_schema_is_the_generated_one() {
    assert_committed("policies/schema.json", &policy_schema(), "policy schema");
}

#[test]
fn the_committed_test_schema_is_the_generated_one() {
    assert_committed("policies/tests/schema.json", &test_schema(), "policy schema --tests");
}

#[test]
fn the_cli_prints_the_generated_schemas() {
    for (args, want) in
        [(&["policy", "schema"][..], policy_schema()), (&["policy", "schema", "--tests"][..], test_schema())]
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera")).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stdout) == want, "{args:?}");
    }
}

#[test]
fn every_shipped_policy_and_test_file_names_its_schema_on_the_first_line() {
    for dir in ["policies", "policies/tests"] {
        let mut seen = 0;
        for entry in std::fs::read_dir(repo_path(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(text.lines().next(), Some(HEADER), "{}: the first line must be `{HEADER}`", path.display());
            seen += 1;
        }
        assert!(seen >= 2, "{dir}: no policy files");
    }
}

/// The parts written by hand (matchers, grants) and the parts derived (fields, descriptions).
#[test]
fn the_policy_schema_describes_every_field_matchers_and_both_grant_kinds() {
    let schema: Value = serde_json::from_str(&policy_schema()).unwrap();
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    let properties = schema["properties"].as_object().unwrap();
    let mut fields: Vec<&str> = properties.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["actors", "data", "deny", "description", "grants", "issuer", "match", "renew", "tools", "ttl"]);
    assert_eq!(schema["required"], serde_json::json!(["issuer", "ttl", "match"]));
    // A policy grants credentials, lists tools for token exchange, or both.
    assert_eq!(schema["anyOf"], serde_json::json!([{"required": ["grants"]}, {"required": ["tools"]}]));
    let tool = &schema["definitions"]["Tool"];
    assert_eq!(tool["required"], serde_json::json!(["resource", "backend"]));
    assert_eq!(properties["tools"]["additionalProperties"]["$ref"], "#/definitions/Tool");
    assert_eq!(properties["actors"]["additionalProperties"]["$ref"], "#/definitions/Actor");
    assert_eq!(schema["additionalProperties"], false, "unknown top-level fields are errors");
    for (name, field) in properties {
        assert!(field["description"].as_str().is_some_and(|d| !d.is_empty()), "{name} has no description");
    }
    let definitions = &schema["definitions"];
    let matcher = definitions["Matcher"]["oneOf"].as_array().unwrap();
    let keys: Vec<&str> = matcher.iter().filter_map(|m| m["required"][0].as_str()).collect::<Vec<_>>();
    assert_eq!(keys, ["glob", "regex", "not", "exists", "contains"]);
    assert_eq!(matcher[1]["minItems"], 1, "a list matcher is not empty");
    let grants = &properties["grants"]["additionalProperties"]["oneOf"];
    assert_eq!(grants[0]["$ref"], "#/definitions/JwtGrant");
    assert_eq!(grants[1]["$ref"], "#/definitions/AwsGrant");
    for (grant, fields) in [
        ("JwtGrant", &["audience", "backend", "claims"][..]),
        ("AwsGrant", &["backend", "external_id", "policy_arns", "role_arn", "session_policy", "session_tags"][..]),
    ] {
        let props = definitions[grant]["properties"].as_object().unwrap();
        let mut names: Vec<&str> = props.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, fields, "{grant}");
        assert_eq!(definitions[grant]["additionalProperties"], false, "{grant}");
        for (name, field) in props {
            assert!(field["description"].as_str().is_some_and(|d| !d.is_empty()), "{grant}.{name} has no description");
        }
    }
}
