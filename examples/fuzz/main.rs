//! ephemera's fuzzer (issue 21): an in-process, structure-aware mutation fuzzer on the stable
//! toolchain, no sanitizers, no new dependency. `scripts/fuzz` builds it in release and runs it;
//! docs/fuzzing.md explains the targets, the mutations and what counts as a finding.
//!
//!     target/release/examples/fuzz [--target token,jwks,policy,config,webhook,journal]
//!                                  [--seconds N | --inputs N] [--seed S] [--jobs N]
//!     target/release/examples/fuzz --target NAME --replay FILE...
//!
//! Each target runs in a child process of its own (this binary with `--child`), on a thread
//! with a 2 MiB stack, the size of the broker's tokio workers: a stack overflow or an abort kills
//! only the child, and the parent saves the input it was running (the child writes each input to
//! a file before it runs it). A child that makes no progress for 10 s is killed the same way (a
//! hang). In the child every input runs under `catch_unwind`: a panic, a broken invariant
//! ([`targets::Target::run`] says `Err`) or an input that takes more than 1 s is a finding, saved
//! to `tests/fuzz/findings/<target>/<sha256 prefix>.bin` (and `.txt`: what happened). The exit
//! status is 1 when anything was found.
//!
//! Coverage guidance without instrumentation: an input whose outcome label (the error variant
//! it produced, `ok …`, see `targets.rs`) was not seen before joins the in-memory corpus, which
//! starts from real inputs of the repository (`Target::seeds`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod mutate;
mod targets;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// An input slower than this is a finding (a cheap denial of service): its own CPU time, not the
/// wall clock's (see [`run_one`]).
const SLOW: Duration = Duration::from_secs(1);
/// A child that finishes no input for this long is hung: killed, its input saved.
const HANG: Duration = Duration::from_secs(10);
/// The stack each input runs on: a tokio worker's (2 MiB), where the broker parses tokens,
/// webhooks and policy reloads.
const STACK: usize = 2 * 1024 * 1024;
/// Inputs kept in memory per target.
const MAX_CORPUS: usize = 4096;

struct Args {
    targets: Vec<String>,
    seconds: Option<f64>,
    inputs: Option<u64>,
    seed: u64,
    jobs: usize,
    findings: PathBuf,
    replay: Vec<PathBuf>,
    /// Outcomes listed per target (the most frequent).
    outcomes: usize,
    /// Internal: run one target in this process, writing each input to `current` first.
    child: bool,
    current: Option<PathBuf>,
}

const USAGE: &str = "usage: fuzz [--target NAME[,NAME…]] [--seconds N | --inputs N] [--seed S] [--jobs N] [--outcomes N] [--findings DIR]\n       fuzz --target NAME --replay FILE…\ntargets: token, jwks, policy, config, webhook, journal";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fuzz: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !args.replay.is_empty() {
        return replay(&args);
    }
    if args.child {
        return child(&args);
    }
    supervise(&args)
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut args = Args {
        targets: targets::NAMES.map(String::from).to_vec(),
        seconds: None,
        inputs: None,
        seed: now.as_nanos() as u64,
        jobs: 1,
        findings: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz/findings")),
        replay: Vec::new(),
        outcomes: 8,
        child: false,
        current: None,
    };
    let mut it = argv.iter();
    let number = |v: Option<&String>, what: &str| -> Result<f64, String> {
        v.and_then(|v| v.replace('_', "").parse::<f64>().ok())
            .filter(|n| *n >= 0.0)
            .ok_or_else(|| format!("{what} needs a number"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--target" => {
                args.targets = it.next().ok_or("--target needs a name")?.split(',').map(String::from).collect();
            }
            "--seconds" => args.seconds = Some(number(it.next(), "--seconds")?),
            "--inputs" => args.inputs = Some(number(it.next(), "--inputs")? as u64),
            "--seed" => args.seed = number(it.next(), "--seed")? as u64,
            "--jobs" => args.jobs = (number(it.next(), "--jobs")? as usize).max(1),
            "--outcomes" => args.outcomes = number(it.next(), "--outcomes")? as usize,
            "--findings" => args.findings = it.next().ok_or("--findings needs a directory")?.into(),
            "--replay" => args.replay.extend(it.by_ref().map(PathBuf::from)),
            "--child" => args.child = true,
            "--current" => args.current = Some(it.next().ok_or("--current needs a path")?.into()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if let Some(bad) = args.targets.iter().find(|t| !targets::NAMES.contains(&t.as_str())) {
        return Err(format!("no target `{bad}`"));
    }
    if args.seconds.is_none() && args.inputs.is_none() {
        args.seconds = Some(60.0);
    }
    Ok(args)
}

// ---- the parent ------------------------------------------------------------------------------

/// Runs every target in a child process (`--jobs` at once), watching each for a crash or a hang.
fn supervise(args: &Args) -> ExitCode {
    let budget = match (args.seconds, args.inputs) {
        (Some(s), Some(n)) => format!("{s} s or {n} inputs per target, whichever first"),
        (Some(s), None) => format!("{s} s per target"),
        (None, Some(n)) => format!("{n} inputs per target"),
        (None, None) => unreachable!("parse_args sets a budget"),
    };
    println!("fuzz: {} ({budget}), seed {}", args.targets.join(", "), args.seed);
    // Resolved once: a rebuild while a long pass runs replaces the file, and the path read
    // later (`/proc/self/exe`) would then name the deleted one.
    let exe = std::env::current_exe().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut pending: Vec<&String> = args.targets.iter().rev().collect();
    let mut running: Vec<Running> = Vec::new();
    let mut found = 0;
    while !pending.is_empty() || !running.is_empty() {
        while running.len() < args.jobs
            && let Some(name) = pending.pop()
        {
            running.push(Running::start(args, &exe, name, work.path()));
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut still = Vec::new();
        for mut r in running {
            match r.poll(args) {
                Some(n) => found += n,
                None => still.push(r),
            }
        }
        running = still;
    }
    if found > 0 {
        println!("fuzz: {found} finding(s) saved under {}", args.findings.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

struct Running {
    name: String,
    child: std::process::Child,
    /// The child's report (its stdout), read on a thread of its own.
    output: Option<std::thread::JoinHandle<String>>,
    current: PathBuf,
    started: Instant,
}

impl Running {
    fn start(args: &Args, exe: &Path, name: &str, work: &Path) -> Running {
        let current = work.join(format!("{name}.current"));
        let mut cmd = Command::new(exe);
        cmd.args(["--child", "--target", name, "--seed", &args.seed.to_string()])
            .arg("--current")
            .arg(&current)
            .arg("--findings")
            .arg(&args.findings);
        if let Some(s) = args.seconds {
            cmd.args(["--seconds", &s.to_string()]);
        }
        if let Some(n) = args.inputs {
            cmd.args(["--inputs", &n.to_string()]);
        }
        cmd.args(["--outcomes", &args.outcomes.to_string()]);
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        // Drained as it comes: a child blocked on a full pipe would look hung.
        let mut stdout = child.stdout.take().unwrap();
        let output = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        Running { name: name.to_string(), child, output: Some(output), current, started: Instant::now() }
    }

    /// `Some(findings)` once the child is done (or was killed), `None` while it runs.
    fn poll(&mut self, args: &Args) -> Option<usize> {
        let status = match self.child.try_wait().unwrap() {
            Some(status) => status,
            None => {
                // Progress is the mtime of the current-input file, rewritten before every input.
                // Before the first input (setup), allow a minute.
                let last = std::fs::metadata(&self.current).and_then(|m| m.modified()).ok();
                let stalled = match last {
                    Some(at) => at.elapsed().unwrap_or_default() > HANG,
                    None => self.started.elapsed() > Duration::from_secs(60),
                };
                if !stalled {
                    return None;
                }
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.print_output();
                println!("fuzz {}: no progress for {} s: killed", self.name, HANG.as_secs());
                return Some(self.save_current(args, "hang: no progress for 10 s"));
            }
        };
        self.print_output();
        match status.code() {
            Some(0) => Some(0),
            Some(1) => Some(1),
            _ => {
                use std::os::unix::process::ExitStatusExt;
                let what = match status.signal() {
                    Some(sig) => format!("crash: the child died of signal {sig} (a stack overflow aborts)"),
                    None => format!("crash: the child exited with {status}"),
                };
                println!("fuzz {}: {what}", self.name);
                Some(self.save_current(args, &what))
            }
        }
    }

    fn print_output(&mut self) {
        if let Some(output) = self.output.take() {
            print!("{}", output.join().unwrap_or_default());
            let _ = std::io::stdout().flush();
        }
    }

    /// The input the child was running when it died or hung.
    fn save_current(&self, args: &Args, what: &str) -> usize {
        let bytes = std::fs::read(&self.current).unwrap_or_default();
        let len = bytes.get(..4).map_or(0, |l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize);
        let input = bytes.get(4..4 + len).unwrap_or_default();
        let path = save_finding(&args.findings, &self.name, input, what);
        println!("fuzz {}: saved {}", self.name, path.display());
        1
    }
}

/// Saves a finding as `<dir>/<target>/<sha256 prefix>.bin`, with what happened in `.txt`.
fn save_finding(dir: &Path, target: &str, input: &[u8], what: &str) -> PathBuf {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    let name = &ephemera::secret::sha256_hex(input)[..16];
    let path = dir.join(format!("{name}.bin"));
    std::fs::write(&path, input).unwrap();
    let note = format!(
        "{what}\n\nreplay: cargo run --release --example fuzz -- --target {target} --replay {}\n",
        path.display()
    );
    std::fs::write(dir.join(format!("{name}.txt")), note).unwrap();
    path
}

// ---- the child -------------------------------------------------------------------------------

thread_local! {
    /// The last panic's message and location, kept by the panic hook (which prints nothing: a
    /// panic is counted and saved, not shown a million times).
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column())).unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = format!("panic at {at}: {message}"));
    }));
}

/// What one input did.
enum Ran {
    Label(String),
    /// A finding: its kind and detail, and a key that groups the same finding's inputs.
    Finding {
        what: String,
        key: String,
    },
}

fn run_one(target: &dyn targets::Target, input: &[u8]) -> (Ran, Duration) {
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.run(input)));
    let took = started.elapsed();
    let ran = match result {
        // Judged again by this thread's own CPU time, running the input once more: the wall
        // clock counts other processes' turns too. The long pass shares the machine at nice 19,
        // and two inputs "took" 1.40 s and 1.11 s while builds held both cores; replayed, they
        // took 0.5-2.7 ms. Only the rare input over the limit pays for the second run.
        Ok(Ok(label)) if took > SLOW => match cpu_time_of(|| target.run(input)) {
            Some(cpu) if cpu <= SLOW => Ran::Label(label),
            cpu => Ran::Finding {
                what: format!(
                    "slow: {} of CPU for one input ({:.1} ms on the wall clock)",
                    cpu.map_or("unknown".into(), |c| format!("{:.1} ms", c.as_secs_f64() * 1e3)),
                    took.as_secs_f64() * 1e3
                ),
                key: "slow".into(),
            },
        },
        Ok(Ok(label)) => Ran::Label(label),
        Ok(Err(why)) => Ran::Finding { key: targets::shape(&why), what: format!("invariant broken: {why}") },
        Err(_) => {
            let what = LAST_PANIC.with(|p| p.borrow().clone());
            let key = what.split(": ").next().unwrap_or_default().to_string();
            Ran::Finding { what, key }
        }
    };
    (ran, took)
}

/// The CPU time this thread spends in `work` (Linux's `/proc/thread-self/schedstat`: time on a
/// CPU, in nanoseconds); `None` where it cannot be read, which [`run_one`] counts as slow.
fn cpu_time_of<T>(work: impl FnOnce() -> T) -> Option<Duration> {
    fn thread_cpu() -> Option<Duration> {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        text.split_whitespace().next()?.parse().ok().map(Duration::from_nanos)
    }
    let before = thread_cpu()?;
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    Some(thread_cpu()?.saturating_sub(before))
}

fn child(args: &Args) -> ExitCode {
    let name = args.targets.first().cloned().unwrap_or_default();
    let plan = Plan {
        seconds: args.seconds,
        inputs: args.inputs,
        seed: args.seed,
        current: args.current.clone(),
        findings: args.findings.clone(),
        shown: args.outcomes,
    };
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .stack_size(STACK)
        .spawn(move || fuzz(&name, &plan))
        .unwrap();
    match worker.join() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(_) => ExitCode::from(3),
    }
}

/// What one child runs: its budget, seed, and where its inputs and findings go.
struct Plan {
    seconds: Option<f64>,
    inputs: Option<u64>,
    seed: u64,
    current: Option<PathBuf>,
    findings: PathBuf,
    /// Outcomes listed in the report.
    shown: usize,
}

/// The fuzz loop for one target. Returns how many distinct findings it saved.
fn fuzz(name: &str, plan: &Plan) -> usize {
    install_panic_hook();
    let setup = Instant::now();
    let target = targets::target(name).unwrap();
    let name: &'static str = targets::NAMES.iter().find(|n| **n == name).unwrap();
    let mutator = mutate::Mutator::new(name);
    let mut rng = mutate::Rng::new(plan.seed ^ fnv(name));
    let mut corpus = target.seeds();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let seeds = corpus.len();
    let setup_secs = setup.elapsed().as_secs_f64();
    let current = plan.current.as_ref().map(|p| std::fs::File::create(p).unwrap());
    let mut frame = Vec::new();
    let mut outcomes: HashMap<String, u64> = HashMap::new();
    let mut findings: HashMap<String, (u64, String)> = HashMap::new();
    let deadline = plan.seconds.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut ran: u64 = 0;
    let mut slowest = Duration::ZERO;
    let mut next_seed = 0;
    loop {
        if plan.inputs.is_some_and(|n| ran >= n)
            || (ran.is_multiple_of(64) && deadline.is_some_and(|d| Instant::now() >= d))
        {
            break;
        }
        // The seeds first, as they are; then mutations of the corpus.
        let input = match next_seed < seeds {
            true => {
                next_seed += 1;
                corpus[next_seed - 1].clone()
            }
            false => {
                // A third of the time a seed: real inputs, whole and valid, so the mutations
                // that reach deep keep coming, however many broken entries the corpus holds.
                let from = if rng.chance(1, 3) { seeds } else { corpus.len() };
                let parent = &corpus[rng.below(from)];
                mutator.mutate(&mut rng, parent, &corpus)
            }
        };
        if let Some(file) = &current {
            frame.clear();
            frame.extend_from_slice(&(input.len() as u32).to_le_bytes());
            frame.extend_from_slice(&input);
            file.write_at(&frame, 0).unwrap();
        }
        let (result, took) = run_one(target.as_ref(), &input);
        slowest = slowest.max(took);
        ran += 1;
        match result {
            Ran::Label(label) => {
                let count = outcomes.entry(label).or_insert(0);
                *count += 1;
                if *count == 1 && next_seed >= seeds {
                    // A new outcome: keep the input that reached it.
                    match corpus.len() < MAX_CORPUS {
                        true => corpus.push(input),
                        false => {
                            let at = seeds + rng.below(MAX_CORPUS - seeds);
                            corpus[at] = input;
                        }
                    }
                }
            }
            Ran::Finding { what, key } => {
                let entry = findings.entry(key).or_insert((0, String::new()));
                entry.0 += 1;
                if entry.0 == 1 {
                    let path = save_finding(&plan.findings, name, &input, &what);
                    entry.1 = format!("{what} → {}", path.display());
                }
            }
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "   {name}: {ran} inputs, {:.0}/s, {} outcomes, corpus {}, {} findings",
                ran as f64 / secs,
                outcomes.len(),
                corpus.len(),
                findings.len()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut top: Vec<(&String, &u64)> = outcomes.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    println!(
        "fuzz {name}: {ran} inputs in {secs:.1} s ({:.0}/s), {} distinct outcomes, corpus {} ({seeds} seeds), \
         slowest input {:.1} ms, setup {setup_secs:.1} s, {} finding(s)",
        ran as f64 / secs.max(1e-9),
        outcomes.len(),
        corpus.len(),
        slowest.as_secs_f64() * 1e3,
        findings.len()
    );
    for (label, n) in top.iter().take(plan.shown) {
        println!("    {n:>10}  {label}");
    }
    if top.len() > plan.shown {
        let rest: u64 = top[plan.shown..].iter().map(|(_, n)| **n).sum();
        println!("    {rest:>10}  … {} more outcomes", top.len() - plan.shown);
    }
    for (n, what) in findings.values() {
        println!("  FINDING ({n} inputs): {what}");
    }
    findings.len()
}

/// FNV-1a: a target's own stream of the shared seed.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

// ---- replay ----------------------------------------------------------------------------------

/// Runs saved inputs through one target and says what each did.
fn replay(args: &Args) -> ExitCode {
    let Some(name) = args.targets.first().filter(|_| args.targets.len() == 1) else {
        eprintln!("fuzz: --replay needs exactly one --target");
        return ExitCode::from(2);
    };
    let (name, paths) = (name.clone(), args.replay.clone());
    // On the fuzz loop's stack size, so a replay overflows where the fuzzer did.
    let worker = std::thread::Builder::new().stack_size(STACK).spawn(move || {
        install_panic_hook();
        let target = targets::target(&name).unwrap();
        let mut bad = 0;
        for path in &paths {
            let input = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let (ran, took) = run_one(target.as_ref(), &input);
            match ran {
                Ran::Label(label) => println!("{}: {label} ({:.1} ms)", path.display(), took.as_secs_f64() * 1e3),
                Ran::Finding { what, .. } => {
                    bad += 1;
                    println!("{}: {what}", path.display());
                }
            }
        }
        bad
    });
    match worker.unwrap().join() {
        Ok(0) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
