//! `docs/architecture.md` names the functions that handle each request ("draw the flow once,
//! with real function names"). This keeps it true: every `Type::item` and `module::item` it cites
//! in backticks must exist in `src/` (it once cited a `Ledger::reap` that did not).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn source_text() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = String::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out
}

/// Is `name` declared in the source as an item (fn, type, trait, const, static, module, field or
/// variant)?
fn declared(src: &str, name: &str) -> bool {
    let whole_word_after = |prefix: &str| {
        let needle = format!("{prefix}{name}");
        src.match_indices(&needle)
            .any(|(at, _)| !src[at + needle.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
    };
    ["fn ", "struct ", "enum ", "trait ", "type ", "const ", "static ", "mod "].iter().any(|k| whole_word_after(k))
        || src.contains(&format!("pub {name}:"))
        || src.contains(&format!("    {name},"))
        || src.contains(&format!("    {name} {{"))
        || src.contains(&format!("    {name}("))
}

fn is_path(span: &str) -> bool {
    span.contains("::")
        && span.split("::").all(|seg| !seg.is_empty() && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

/// The `a::b` paths in backticks (each segment an identifier, nothing else in the span), and
/// the `Type::item` names in sequence-diagram lines (`->>`).
fn cited_paths(doc: &str) -> Vec<String> {
    let mut out: Vec<String> = doc.split('`').skip(1).step_by(2).filter(|s| is_path(s)).map(str::to_string).collect();
    for line in doc.lines().filter(|l| l.contains("->>")) {
        let words = line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
        out.extend(words.filter(|w| is_path(w) && w.starts_with(char::is_uppercase)).map(str::to_string));
    }
    out
}

#[test]
fn every_name_the_architecture_page_cites_exists_in_the_source() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md")).unwrap();
    let src = source_text();
    let mut missing = Vec::new();
    for path in cited_paths(&doc) {
        // Outside crates' paths (`ring::digest`, `tokio::spawn`) are not ours to check.
        let first = path.split("::").next().unwrap_or_default();
        if ["ring", "tokio", "serde_json", "jsonwebtoken", "axum", "std", "aws_sdk_sts", "aws_sdk_iam", "reqwest"]
            .contains(&first)
        {
            continue;
        }
        if let Some(gone) = path.split("::").find(|seg| !declared(&src, seg)) {
            missing.push(format!("`{path}` (no `{gone}` in src/)"));
        }
    }
    missing.sort();
    missing.dedup();
    assert!(missing.is_empty(), "docs/architecture.md cites names that do not exist:\n  {}", missing.join("\n  "));
}

#[test]
fn the_reader_finds_paths_and_skips_code_spans_that_are_not_paths() {
    let doc = "calls `App::exchange` and `ledger::FileStore`, not `a b::c` or `x::` or `--dev`";
    assert_eq!(cited_paths(doc), ["App::exchange", "ledger::FileStore"]);
    assert!(declared("pub fn reap_once(&self)", "reap_once") && !declared("fn reap_once()", "reap"));
}
