//! `--perf`: one more saturation run with `perf record` attached to the broker (call graphs
//! unwound from the DWARF unwind tables a release build has), then every sample's stack is put
//! in one category of the exchange's work, to say where the CPU beyond the crypto floor goes.
//! The categories are matched by function name, first match wins, in the order below; a sample
//! inside `malloc` counts for whatever called it. `perf report` views are saved next to the data.

use crate::broker::Broker;
use crate::load::closed_loop;
use crate::procfs::Window;
use crate::table::Row;
use std::path::Path;
use std::sync::Arc;

/// (category, any frame of the stack contains one of these).
const CATEGORIES: &[(&str, &[&str])] = &[
    ("crypto floor: RS256 verify", &["jsonwebtoken::crypto::verify"]),
    ("crypto floor: ES256 sign", &["EcdsaKeyPair::sign"]),
    ("journal compaction (reaper)", &["Storage>::replace", "Memory::snapshot", "write_snapshot", "compact_if_grown"]),
    ("journal: fdatasync", &["fdatasync"]),
    ("journal: encoding records", &["journal::format::encode", "write_lease", "ClaimSnapshot::write_to"]),
    (
        "journal: writer thread, write(2), hand-offs",
        &["journal::writer", "write_batch", "Storage>::append", "Journal::append", "spawn_blocking"],
    ),
    (
        "logging: tracing JSON lines",
        &["tracing_subscriber", "tracing_serde", "tracing_core::event", "tracing_core::dispatcher"],
    ),
    ("audit event", &["audit_exchange", "Audit::write", "audit_revocation", "ExchangeEvent", "audit::Selected"]),
    (
        "verify: claims JSON parse",
        &["serde_json::de::from_trait", "serde_json::value::Value> as serde_core::de::Deserialize"],
    ),
    (
        "verify: header, token sha256, job key, claim snapshot",
        &["ephemera::identity::", "ClaimSnapshot::new", "drop_in_place<ephemera::identity"],
    ),
    ("policy decide", &["ephemera::policy::"]),
    ("mint: broker JWT claims, id, encoding", &["JwtBackend", "JwtSigner", "jwt_id"]),
    ("ledger: issue, indexes, jti", &["ephemera::ledger::"]),
    ("reply: JSON body", &["ExchangeReply", "Credential as serde_core::ser::Serialize", "json_response"]),
    ("app: rest of the exchange", &["ephemera::app::"]),
    (
        "http: socket syscalls, hyper parse and encode",
        &[
            "writev",
            "__libc_recv",
            "recvfrom",
            "sock_",
            "tcp_",
            "Http1Transaction",
            "poll_read_from_io",
            "poll_flush",
            "Buffered<",
            "encode_headers",
        ],
    ),
    (
        "http: request_context, routing, body, bearer",
        &[
            "ephemera::http::",
            "axum::middleware",
            "axum::handler",
            "axum::routing",
            "axum::body",
            "axum::extract",
            "axum::util",
            "tower::",
            "http_body",
        ],
    ),
    ("tokio runtime, futex, scheduling", &["tokio::", "futex", "schedule", "epoll", "finish_task_switch", "park"]),
];

pub async fn saturation(broker: &Broker, out: &Path, requests: Arc<Vec<Vec<u8>>>, conns: usize) -> Vec<Row> {
    std::fs::create_dir_all(out).unwrap();
    let data = out.join("perf.data");
    let pid = broker.pid.to_string();
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
        .arg(&data)
        .args(["-p", &pid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("--perf: cannot run perf: {e}"));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let window = Window::start(&[&pid]);
    let run = closed_loop(broker.addr, requests, conns, 201).await;
    let cpu_us = window.end().cpu[0] / run.ok as f64 * 1e6;
    let _ = std::process::Command::new("kill").args(["-INT", &perf.id().to_string()]).status();
    let _ = perf.wait();

    let perf_output = |args: &[&str]| {
        std::process::Command::new("perf")
            .args(args)
            .arg("-i")
            .arg(&data)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let view = |mode: &str| {
        perf_output(&["report", "--stdio", mode, "--sort", "symbol", "--percent-limit", "0.5", "-g", "none"])
    };
    let report = out.join("perf-report.txt");
    std::fs::write(&report, view("--no-children") + &view("--children")).unwrap();
    let (counts, total) = categorize(&perf_output(&["script", "-F", "ip,sym"]));

    let mut rows = vec![Row::new(
        "P",
        "`--perf`: the broker at saturation under `perf record` (CPU by category below)",
        format!(
            "{} exchanges at {:.0}/s, {cpu_us:.0} µs broker CPU each (perf itself adds some); {total} samples",
            run.ok,
            run.rate()
        ),
        format!("`{}`", report.display()),
    )];
    for (i, (name, _)) in CATEGORIES.iter().enumerate().chain([(CATEGORIES.len(), &("other", &[][..]))]) {
        let share = counts.get(i).copied().unwrap_or(0) as f64 / total.max(1) as f64;
        rows.push(Row::new(
            &format!("P.{:02}", i + 1),
            name,
            format!("{:.1} % ≈ {:.0} µs per exchange", share * 100.0, share * cpu_us),
            "—".into(),
        ));
    }
    rows
}

/// Sample counts per category (the last slot: none matched) and the total, from `perf script`
/// output (a header line per sample, then one indented line per frame, then a blank line).
fn categorize(script: &str) -> (Vec<usize>, usize) {
    let mut counts = vec![0; CATEGORIES.len() + 1];
    let mut total = 0;
    let mut stack: Vec<&str> = Vec::new();
    let mut flush = |stack: &mut Vec<&str>| {
        if stack.is_empty() {
            return;
        }
        total += 1;
        let slot = CATEGORIES
            .iter()
            .position(|(_, needles)| stack.iter().any(|frame| needles.iter().any(|n| frame.contains(n))))
            .unwrap_or(CATEGORIES.len());
        counts[slot] += 1;
        stack.clear();
    };
    for line in script.lines() {
        if line.trim().is_empty() {
            flush(&mut stack);
        } else if line.starts_with([' ', '\t']) {
            stack.push(line.trim());
        } else {
            stack.clear();
        }
    }
    flush(&mut stack);
    (counts, total)
}
