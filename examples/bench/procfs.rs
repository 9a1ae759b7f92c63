//! CPU time and memory from /proc. CPU time comes from each thread's `se.sum_exec_runtime`
//! (`/proc/PID/task/TID/sched`, nanoseconds) where the kernel has it, else from utime + stime
//! (`/proc/PID/stat`, scaled by the kernel to the precise runtime but shown in clock ticks:
//! `getconf CLK_TCK`, 10 ms at 100 Hz).

use std::collections::HashMap;
use std::sync::OnceLock;

/// Clock ticks per second, from `getconf CLK_TCK` (100 where it cannot be asked).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process (`/proc/PID/stat`: every thread, living or exited) or of the
/// calling thread (`thread-self`), in seconds.
pub fn cpu_seconds(who: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: count fields after the last `)`.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of stat(5); index 0 here is field 3.
    (ticks(11) + ticks(12)) as f64 / clk_tck()
}

/// A process's CPU time by thread, to subtract from a later one. Per thread, because a thread
/// that exits takes its time out of a plain sum (tokio's blocking threads exit when idle): the
/// difference counts each thread still alive, and new threads from zero.
pub struct Cpu {
    per_thread: HashMap<String, f64>,
    total: f64,
}

impl Cpu {
    /// The process's utime + stime, every thread (one clock tick's precision).
    pub fn total_seconds(&self) -> f64 {
        self.total
    }
}

pub fn cpu(pid: &str) -> Cpu {
    let mut per_thread = HashMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let tid = task.file_name().to_string_lossy().into_owned();
            if let Some(secs) = sched_runtime(&format!("/proc/{pid}/task/{tid}/sched")) {
                per_thread.insert(tid, secs);
            }
        }
    }
    Cpu { per_thread, total: cpu_seconds(pid) }
}

/// [`cpu`] without the threads whose name starts with `skip` (the journal's compaction
/// threads, `ephemera-compact`: the bench accounts for them apart).
pub fn cpu_without(pid: &str, skip: &str) -> Cpu {
    let mut all = cpu(pid);
    all.per_thread.retain(|tid, _| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        !comm.starts_with(skip)
    });
    all
}

/// Does the process have a living thread whose name starts with `name`?
pub fn has_thread(pid: &str, name: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks
        .flatten()
        .any(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.starts_with(name)))
}

/// [`cpu`] of several processes together (a database server's: a process per connection).
pub fn cpu_of(pids: &[String]) -> Cpu {
    let mut all = Cpu { per_thread: HashMap::new(), total: 0.0 };
    for pid in pids {
        let one = cpu(pid);
        all.per_thread.extend(one.per_thread);
        all.total += one.total;
    }
    all
}

impl Cpu {
    /// Seconds of CPU used since `before`.
    pub fn since(&self, before: &Cpu) -> f64 {
        if self.per_thread.is_empty() || before.per_thread.is_empty() {
            return self.total - before.total;
        }
        self.per_thread.iter().map(|(tid, now)| (now - before.per_thread.get(tid).unwrap_or(&0.0)).max(0.0)).sum()
    }
}

/// A stretch of time over which the CPU of some processes (the broker, the bench) is measured,
/// and the rest of the machine's busy time too: on a shared machine, what other tenants used
/// meanwhile says how far to trust the figures.
pub struct Window {
    pids: Vec<String>,
    cpus: Vec<Cpu>,
    machine: (f64, f64),
    started: std::time::Instant,
}

pub struct Measured {
    /// CPU seconds of each watched process, in the order given.
    pub cpu: Vec<f64>,
    /// Cores' worth of CPU that everything else used meanwhile.
    pub others_cores: f64,
    /// Cores' worth of time the hypervisor gave to other guests while this one wanted to run.
    pub steal_cores: f64,
}

impl Window {
    pub fn start(pids: &[&str]) -> Window {
        let cpus = pids.iter().map(|p| cpu(p)).collect();
        Window {
            pids: pids.iter().map(|p| p.to_string()).collect(),
            cpus,
            machine: machine_seconds(),
            started: std::time::Instant::now(),
        }
    }

    pub fn end(&self) -> Measured {
        let (busy, steal) = machine_seconds();
        let wall = self.started.elapsed().as_secs_f64();
        let cpu: Vec<f64> = self.pids.iter().zip(&self.cpus).map(|(p, before)| cpu(p).since(before)).collect();
        let others = busy - self.machine.0 - cpu.iter().sum::<f64>();
        Measured { others_cores: (others / wall).max(0.0), steal_cores: (steal - self.machine.1) / wall, cpu }
    }
}

/// Context switches of a process's living threads, voluntary (it waited: a futex, epoll, a
/// read) and involuntary (preempted), summed by thread name (`comm`: tokio's workers share one).
pub fn context_switches(pid: &str) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return by_name };
    for status in tasks.flatten().filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok()) {
        let name = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("?").trim().to_string();
        let switches: u64 = status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches"))
            .filter_map(|l| l.rsplit_once(':')?.1.trim().parse::<u64>().ok())
            .sum();
        *by_name.entry(name).or_default() += switches;
    }
    by_name
}

/// The whole machine's busy CPU time (every core: user, nice, system, irq, softirq) and steal
/// time, in seconds.
pub fn machine_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return (0.0, 0.0) };
    let f: Vec<f64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let busy: f64 = [0, 1, 2, 5, 6].iter().filter_map(|i| f.get(*i)).sum();
    (busy / clk_tck(), f.get(7).copied().unwrap_or(0.0) / clk_tck())
}

/// `se.sum_exec_runtime` (ms, ns precision) of a `sched` file, in seconds; `None` where the
/// kernel does not provide it (no CONFIG_SCHED_DEBUG).
fn sched_runtime(path: &str) -> Option<f64> {
    let sched = std::fs::read_to_string(path).ok()?;
    let line = sched.lines().find(|l| l.starts_with("se.sum_exec_runtime"))?;
    let ms: f64 = line.rsplit_once(':')?.1.trim().parse().ok()?;
    Some(ms / 1e3)
}

/// This thread's CPU time in seconds: `se.sum_exec_runtime` of `/proc/thread-self/sched` (ns
/// precision) where the kernel has it, else utime + stime (one tick precision).
pub fn thread_cpu_seconds() -> f64 {
    match sched_runtime("/proc/thread-self/sched") {
        Some(secs) if secs > 0.0 => secs,
        _ => cpu_seconds("thread-self"),
    }
}

/// The processes whose parent is `pid` (a PostgreSQL server's backends and workers).
pub fn children(pid: &str) -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .map(|p| p.file_name().to_string_lossy().into_owned())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Field 4 of stat(5), the parent: the second after the command name's `)`.
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)) == Some(pid)
        })
        .collect()
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    rss_of("self")
}

/// Resident set size of a process, in bytes.
pub fn rss_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// One line describing the machine: cores, CPU model, kernel, free memory.
pub fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |p| p.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gb = mem
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    vec![
        ("cores (nproc)".into(), cores.to_string()),
        ("CPU".into(), model),
        ("kernel".into(), kernel),
        ("memory".into(), format!("{mem_gb:.1} GiB")),
        ("load average at start".into(), load),
    ]
}

/// Seconds the threads of `pid` (but those named `skip…`, if given) have waited on a run queue, runnable
/// but not running, since each started (`/proc/PID/task/TID/schedstat`, second field): the
/// time the scheduler made them wait for a core.
pub fn runqueue_wait_without(pid: &str, skip: Option<&str>) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let mut total = 0.0;
    for task in tasks.flatten() {
        let comm = || std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if skip.is_some_and(|skip| comm().starts_with(skip)) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += stat.split_whitespace().nth(1).and_then(|w| w.parse::<f64>().ok()).unwrap_or(0.0) / 1e9;
    }
    total
}
