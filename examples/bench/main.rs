//! ephemera's benchmark harness (issue 7). `scripts/bench` builds it in release and runs it:
//!
//!     target/release/examples/bench [--quick] [--broker target/release/ephemera] [--perf DIR]
//!                                   [--only crypto,exchange,jwks,ledger,postgres,renew,github,token-exchange,flood,live-set,live-set-postgres] [--leases N]
//!                                   [--keep DIR]
//!
//! It prints one Markdown table. Every row is measured in this run, next to a baseline measured
//! in the same run on the same (shared, noisy) machine: the crypto floor for the exchange's CPU,
//! `/healthz` on the same schedule for its latency, 1k leases for 1M, a file read for replay,
//! one writer for group commit. Ratios are what a check may assert; absolute figures are printed
//! for reading. Rows 2, 5 and 6 run against the real `ephemera serve` binary over loopback HTTP;
//! rows 6 (`store = "postgres"`) against a PostgreSQL server the bench starts and stops itself.
//!
//! `--quick` (a smoke run, under a minute) uses fewer requests and 100k leases instead of 1M.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod beside;
mod broker;
mod crypto;
mod exchange;
#[path = "../../tests/common/fake_github.rs"]
mod fake_github;
mod flood;
mod github;
mod http;
mod jwks;
mod ledger;
mod live_set;
mod live_set_pg;
mod load;
mod postgres;
mod procfs;
mod profile;
mod renewal;
mod soak;
mod table;
mod token_exchange;
mod tokens;
mod windows;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use table::Row;

/// The broker's allocator (src/main.rs) here too: rows 3 measure the ledger in this process,
/// and they should measure it as the broker runs it. (Whether glibc's malloc is what made 3b
/// and 3c grow with the live set: docs/benchmarks.md, issue 23.)
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Args {
    quick: bool,
    broker: PathBuf,
    perf: Option<PathBuf>,
    only: Vec<String>,
    /// Leases for the ledger rows (default 1M, 100k with `--quick`).
    leases: Option<usize>,
    /// Work in this directory and keep it (the broker's config, data, log and audit file).
    keep: Option<PathBuf>,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("ledger-child") => return ledger_child(&argv[1..]),
        Some("soak") => return soak_main(&argv[1..]),
        Some("attribution-child") => {
            let n = argv.get(1).and_then(|a| a.parse().ok()).unwrap_or(500);
            println!("{}", serde_json::to_string(&exchange::attribution_child(n)).unwrap());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "bench: {e}\nusage: bench [--quick] [--broker PATH] [--perf DIR] [--only crypto,exchange,jwks,ledger,postgres,renew,github,token-exchange,flood,live-set,live-set-postgres] [--leases N] [--keep DIR]"
            );
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let mut machine = procfs::machine();
    machine.push(("broker binary".into(), broker_built(&args.broker)));
    let rows = run(&args);
    print_report(&args, &machine, &rows, started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = Args {
        quick: false,
        broker: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/ephemera")),
        perf: None,
        only: [
            "crypto",
            "exchange",
            "jwks",
            "ledger",
            "postgres",
            "renew",
            "github",
            "token-exchange",
            "flood",
            "live-set",
            "live-set-postgres",
        ]
        .map(String::from)
        .to_vec(),
        leases: None,
        keep: None,
    };
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--broker" => args.broker = it.next().ok_or("--broker needs a path")?.into(),
            "--perf" => args.perf = Some(it.next().ok_or("--perf needs a directory")?.into()),
            "--only" => args.only = it.next().ok_or("--only needs a list")?.split(',').map(String::from).collect(),
            "--keep" => {
                let dir: PathBuf = it.next().ok_or("--keep needs a directory")?.into();
                if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
                    return Err(format!("--keep {}: not empty (a kept run needs a fresh directory)", dir.display()));
                }
                args.keep = Some(dir);
            }
            "--leases" => {
                args.leases = Some(it.next().and_then(|n| n.parse().ok()).ok_or("--leases needs a number")?);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

fn run(args: &Args) -> Vec<Row> {
    let wants = |s: &str| args.only.iter().any(|o| o == s);
    let temp = tempfile::tempdir().unwrap();
    let dir = match &args.keep {
        Some(keep) => {
            std::fs::create_dir_all(keep).unwrap();
            eprintln!("   working in {} (kept)", keep.display());
            keep.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let mut rows = Vec::new();

    eprintln!("== 1. crypto floor (first samples)");
    let mut sampler = crypto::Sampler::new();
    let sample = if args.quick { 0.4 } else { 1.0 };
    sampler.sample(sample);
    sampler.sample(sample);
    let mut exchange_figures = None;
    if wants("exchange") {
        eprintln!("== 2, 5, A. exchange and revocation against {}", args.broker.display());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let options = exchange::Options { binary: args.broker.clone(), perf: args.perf.clone() };
        let plan = exchange::Plan::new(args.quick);
        exchange_figures = Some(rt.block_on(exchange::run(&options, &plan, &mut sampler, &dir)));
    }
    let floor = sampler.floor();
    rows.push(Row::new(
        "1",
        "crypto floor per core: RS256 verify (jsonwebtoken + ring) + ES256 sign (`JwtSigner`)",
        format!(
            "{:.1} µs = {:.1} verify + {:.1} sign ({:.0}/s per core)",
            floor.total_us(),
            floor.verify_us,
            floor.sign_us,
            1e6 / floor.total_us()
        ),
        format!(
            "— ({} samples across the run: {:.1}–{:.1} µs; token of {} B)",
            floor.samples, floor.spread.0, floor.spread.1, floor.token_bytes
        ),
    ));
    if let Some(figures) = exchange_figures {
        rows.extend(figures.rows(&floor));
    }
    if wants("jwks") {
        eprintln!("== 4. JWKS storm");
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        rows.push(rt.block_on(jwks::storm()));
    }
    if wants("ledger") {
        let (leases, records) = if args.quick { (100_000, 20_000) } else { (1_000_000, 100_000) };
        let leases = args.leases.unwrap_or(leases);
        eprintln!("== 3. ledger ({leases} leases, in a child process)");
        let keep = args.keep.as_ref().map(|_| dir.join("ledger"));
        rows.extend(ledger_rows(leases, records, &args.broker, keep.as_deref()));
    }
    if wants("postgres") {
        eprintln!("== 6. the shared store on PostgreSQL (issue 14)");
        rows.extend(postgres::run(&args.broker, args.quick, &dir.join("postgres")));
    }
    if wants("renew") {
        eprintln!("== 7. renewal beside the exchange (issue 15)");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let plan = exchange::Plan::new(args.quick);
        rows.extend(rt.block_on(renewal::run(&args.broker, &plan, &dir)));
    }
    if wants("github") {
        eprintln!("== 8. GitHub App tokens beside broker JWTs (issue 16; GitHub is a fake on loopback)");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let plan = exchange::Plan::new(args.quick);
        rows.extend(rt.block_on(github::run(&args.broker, &plan, &dir)));
    }
    if wants("token-exchange") {
        eprintln!("== 9. token exchange (RFC 8693) beside the exchange (issue 19)");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let plan = exchange::Plan::new(args.quick);
        rows.extend(rt.block_on(token_exchange::run(&args.broker, &plan, &dir)));
    }
    if wants("flood") {
        eprintln!("== 10. a flood of forged tokens, before and after the limits engage (issue 21)");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let plan = exchange::Plan::new(args.quick);
        rows.extend(rt.block_on(flood::run(&args.broker, &plan, &dir)));
    }
    if wants("live-set") {
        let big = args.leases.unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
        eprintln!(
            "== 11. the exchange under a large live set: 1k vs {big} live leases, compactions running (issue 23)"
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let plan = exchange::Plan::new(args.quick);
        rows.extend(rt.block_on(live_set::run(&args.broker, &plan, &dir.join("live-set"), big)));
    }
    if wants("live-set-postgres") {
        let big = args.leases.unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
        eprintln!("== 11d–e. the exchange under a large live set on PostgreSQL: 1k vs {big} live leases (issue 23)");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let plan = exchange::Plan::new(args.quick);
        rows.extend(rt.block_on(live_set_pg::run(&args.broker, &plan, &dir.join("live-set-postgres"), big)));
    }
    rows.sort_by_key(|r| order(&r.id));
    rows
}

/// Table order: 1, 2…, 3…, 4, 5…, 6…, 10…, then attribution (A) and profile (P) rows.
fn order(id: &str) -> (u8, String) {
    let rank = match id.chars().next() {
        Some('1') if id.starts_with("10") => 10,
        Some('1') if id.starts_with("11") => 11,
        Some(c @ '1'..='9') => c as u8 - b'0',
        Some('A') => 20,
        _ => 30,
    };
    (rank, id.to_string())
}

/// Runs the ledger rows in a child process: its RSS starts clean and its memory is returned.
fn ledger_rows(leases: usize, records: usize, broker: &std::path::Path, keep: Option<&std::path::Path>) -> Vec<Row> {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["ledger-child", &leases.to_string(), &records.to_string()])
        .arg(broker)
        .args(keep)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the ledger child failed: {}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

/// `bench soak [--minutes N] [--store file,postgres] [--rate N] [--broker PATH]` (`scripts/soak`).
fn soak_main(argv: &[String]) -> ExitCode {
    let mut options = soak::Options { minutes: 10.0, stores: vec!["file".into(), "postgres".into()], rate: None };
    let mut broker = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/ephemera"));
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--minutes", Some(n)) if n.parse::<f64>().is_ok_and(|m| m >= 1.0) => options.minutes = n.parse().unwrap(),
            ("--store", Some(list)) => options.stores = list.split(',').map(String::from).collect(),
            ("--broker", Some(path)) => broker = path.into(),
            ("--rate", Some(n)) if n.parse::<f64>().is_ok_and(|r| r >= 1.0) => options.rate = n.parse().ok(),
            _ => {
                eprintln!(
                    "usage: bench soak [--minutes N (at least 1)] [--store file,postgres] [--rate REQUESTS/S] [--broker PATH]"
                );
                return ExitCode::from(2);
            }
        }
    }
    if options.stores.iter().any(|s| s != "file" && s != "postgres") {
        eprintln!("bench soak: --store takes file and/or postgres");
        return ExitCode::from(2);
    }
    let temp = tempfile::tempdir().unwrap();
    if soak::run(&broker, &options, temp.path()) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn ledger_child(argv: &[String]) -> ExitCode {
    let n = argv.first().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let records = argv.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let broker = PathBuf::from(argv.get(2).map_or("target/release/ephemera", String::as_str));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let keep = argv.get(3).map(PathBuf::from);
    let rows = rt.block_on(ledger::run(n, records, &broker, keep.as_deref()));
    println!("{}", serde_json::to_string(&rows).unwrap());
    ExitCode::SUCCESS
}

/// The broker binary's path and when it was built. A bench rebuilt without the broker (`cargo
/// build --examples` does not build binaries) measures the broker of an earlier change: said
/// out loud, because it happened.
fn broker_built(broker: &std::path::Path) -> String {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(broker) else { return format!("{} (not found)", broker.display()) };
    let seconds = built.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let this = std::env::current_exe().ok().and_then(|p| modified(&p));
    let older = this.is_some_and(|bench| built + std::time::Duration::from_secs(600) < bench);
    format!(
        "{}, built {}{}",
        broker.display(),
        ephemera::clock::rfc3339(seconds),
        if older { " (over 10 minutes before this bench: rebuild it with `scripts/bench`)" } else { "" }
    )
}

fn print_report(args: &Args, machine: &[(String, String)], rows: &[Row], secs: f64) {
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let now = ephemera::clock::rfc3339(ephemera::clock::Clock::now(&ephemera::clock::SystemClock));
    println!();
    println!("ephemera bench{} — {now}", if args.quick { " --quick" } else { "" });
    println!();
    for (k, v) in machine {
        println!("- {k}: {v}");
    }
    println!("- rustc: {rustc}");
    println!("- run took {secs:.0} s (after the build)");
    println!();
    print!("{}", table::render(rows));
}
