//! The dependency rule, checked: every `crate::<module>` edge in the library's production code
//! (`src/**`, test modules left out) must be listed in [`ALLOWED`] below, and the allowed graph
//! must have no cycle. So the rooms depend one way — `server` → `http` → `app` → {`ledger`,
//! `mint`, `policy`, `identity`} → the leaves — and a new edge is a decision made here, with its
//! reason, not an accident of a `use` line. `docs/architecture.md` draws the same picture.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every allowed edge `from → to`, with why. A module may always use itself.
const ALLOWED: &[(&str, &[&str], &str)] = &[
    // ---- leaves: import nothing of the crate but other leaves ----
    ("clock", &[], "time: the injected clock, durations, RFC 3339"),
    ("ids", &["clock"], "lease, request and JWT ids (a lease id sorts by its creation time)"),
    ("secret", &[], "SecretString, digests, constant-time comparison"),
    ("names", &[], "the name rules of issuers, backends, policies and claims"),
    ("claims", &[], "claim sets, platforms, typed platform views, the job key"),
    ("env_format", &[], "the `env` rendering of an exchange reply, shared with the CLI"),
    ("aws_format", &[], "AWS's formats and limits as pure functions"),
    ("github_format", &[], "GitHub's names and permission levels as pure functions"),
    ("hook_format", &["claims"], "platform webhook bodies → the job they end, as pure functions"),
    ("pg_names", &[], "PostgreSQL identifiers: what a grant may name, quoting, a lease's login role"),
    ("ssh_format", &[], "OpenSSH certificate fields (principals, options, extensions) as pure functions"),
    (
        "pg_connect",
        &["config", "secret"],
        "connections to PostgreSQL (pool, rustls), for the ledger and the postgres backend",
    ),
    ("metrics", &[], "Prometheus text from atomics"),
    ("log_format", &[], "one JSON log line per event, written straight into the line buffer"),
    ("config", &["clock", "secret", "names", "claims", "aws_format"], "TOML → validated Config"),
    ("audit", &["config", "claims"], "the audit sink"),
    // ---- the rooms, each reading only rooms below it ----
    ("identity", &["clock", "ids", "secret", "claims", "config"], "token → VerifiedIdentity"),
    (
        "policy",
        &["clock", "names", "claims", "config", "aws_format", "github_format", "pg_names", "ssh_format", "identity"],
        "claims → Grant or Denial",
    ),
    (
        "mint",
        &[
            "clock",
            "ids",
            "secret",
            "claims",
            "config",
            "aws_format",
            "github_format",
            "pg_names",
            "pg_connect",
            "ssh_format",
            "identity",
            "policy",
        ],
        "Grant → credentials",
    ),
    (
        "ledger",
        &["clock", "ids", "secret", "claims", "config", "pg_connect", "identity", "policy", "mint", "metrics"],
        "leases: Lease::new reads the identity, the grant and the minted handles; the shared store \
         reads its PostgresConfig and password; the file store reports its compactions as metrics",
    ),
    ("dev", &["clock", "ids", "claims", "config", "mint"], "serve --dev's issuer signs with a mint::jwt signer"),
    ("error", &["identity", "policy"], "one Error over every room's refusal"),
    (
        "limits",
        &["claims", "config", "error", "identity"],
        "abuse limits: token buckets per address, and per issuer and repository of a VerifiedIdentity; \
         a refusal is an Error",
    ),
    (
        "app",
        &[
            "clock",
            "ids",
            "secret",
            "claims",
            "config",
            "env_format",
            "metrics",
            "audit",
            "identity",
            "policy",
            "mint",
            "ledger",
            "dev",
            "error",
            "limits",
        ],
        "ties the rooms together: verify → decide → mint → record → audit",
    ),
    // ---- the wire and the start ----
    (
        "http",
        &[
            "app",
            "error",
            "clock",
            "ids",
            "secret",
            "claims",
            "config",
            "identity",
            "ledger",
            "policy",
            "ssh_format",
            "hook_format",
        ],
        "routes; lower rooms only for their plain data types (IdentityError for a missing bearer, \
         LeaseFilter/Lease for admin views, policy::Source for a diff, HooksConfig); every query goes through App; \
         ssh_format checks an exchange's `ssh_public_key` (400) before anything is verified; hook_format reads \
         a webhook's body",
    ),
    (
        "server",
        &["app", "http", "audit", "clock", "config", "dev", "identity", "ids", "ledger", "limits", "mint", "policy"],
        "start-up: config → App → listener",
    ),
    (
        "client",
        &["clock", "env_format", "ids", "secret", "identity", "policy"],
        "the CLI's HTTP client (clock: bounding a caller's text in a message)",
    ),
];

/// The module a file belongs to: `src/app/exchange.rs` → `app`, `src/clock.rs` → `clock`.
fn module_of(path: &Path, src: &Path) -> String {
    let rel = path.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

/// The source without comment lines and without `#[cfg(test)]` items (brace-matched).
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if trimmed.starts_with("#[cfg(test)]") {
            let mut depth = 0i32;
            let mut opened = false;
            for item in lines.by_ref() {
                depth += item.matches('{').count() as i32 - item.matches('}').count() as i32;
                opened |= item.contains('{');
                if opened && depth <= 0 || !opened && item.trim_end().ends_with(';') {
                    break;
                }
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn edges_in(text: &str) -> BTreeSet<String> {
    let code = production_code(text);
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.insert(name);
        } else if rest.starts_with('{') {
            let group = &rest[1..rest.find('}').unwrap_or(rest.len())];
            for part in group.split(',') {
                let name: String = part.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                out.insert(name);
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every production edge of the library: module → (used module → the files that use it).
fn actual_edges() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in files {
        let from = module_of(&file, &src);
        // The crate root only declares modules; the binary is the CLI on top of everything.
        if from == "lib" || from == "main" {
            continue;
        }
        for to in edges_in(&std::fs::read_to_string(&file).unwrap()) {
            if to != from {
                let shown = file.strip_prefix(&src).unwrap().display().to_string();
                edges.entry(from.clone()).or_default().entry(to).or_default().insert(shown);
            }
        }
    }
    edges
}

#[test]
fn every_production_edge_between_modules_is_allowed() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().map(|(from, to, _)| (*from, *to)).collect();
    let mut violations = Vec::new();
    for (from, targets) in actual_edges() {
        let Some(ok) = allowed.get(from.as_str()) else {
            violations.push(format!("module `{from}` is not in the allowlist (tests/dependency_rule.rs)"));
            continue;
        };
        for (to, files) in targets {
            if !ok.contains(&to.as_str()) {
                violations.push(format!("{from} → {to} (in {})", files.into_iter().collect::<Vec<_>>().join(", ")));
            }
        }
    }
    assert!(violations.is_empty(), "edges outside the dependency rule:\n  {}", violations.join("\n  "));
}

#[test]
fn every_allowed_edge_is_used_so_the_table_says_what_the_code_does() {
    let actual = actual_edges();
    let unused: Vec<String> = ALLOWED
        .iter()
        .flat_map(|(from, to, _)| to.iter().map(move |t| (*from, *t)))
        .filter(|(from, to)| !actual.get(*from).is_some_and(|targets| targets.contains_key(*to)))
        .map(|(from, to)| format!("{from} → {to}"))
        .collect();
    assert!(unused.is_empty(), "allowed but unused (remove them from ALLOWED):\n  {}", unused.join("\n  "));
}

#[test]
fn the_allowed_graph_has_no_cycle() {
    let graph: BTreeMap<&str, &[&str]> = ALLOWED.iter().map(|(from, to, _)| (*from, *to)).collect();
    // Depth-first search with colours: grey on the current path, black when done.
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, &'a [&'a str]>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) {
        match state.get(node) {
            Some(2) => return,
            Some(1) => panic!("cycle in the allowlist: {} → {node}", path.join(" → ")),
            _ => {}
        }
        state.insert(node, 1);
        path.push(node);
        for next in graph.get(node).copied().unwrap_or_default() {
            visit(next, graph, state, path);
        }
        path.pop();
        state.insert(node, 2);
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        visit(node, &graph, &mut state, &mut Vec::new());
    }
}

#[test]
fn the_edge_reader_sees_uses_and_paths_and_skips_tests_and_comments() {
    let text = "use crate::clock::Clock;\nuse crate::{ids, secret::hex};\n// crate::http in a comment\n\
                fn f() { crate::claims::scalar_text(&v); }\n#[cfg(test)]\nmod tests {\n    use crate::app::App;\n    fn g() {\n    }\n}\n\
                fn h() { crate::names::is_name(\"x\"); }\n";
    let edges: Vec<String> = edges_in(text).into_iter().collect();
    assert_eq!(edges, ["claims", "clock", "ids", "names", "secret"]);
}
