//! Rows 6 (issue 14): the shared store on PostgreSQL beside the file store, in the same run.
//!
//! The bench starts a PostgreSQL server of its own (`scripts/pg` in a temporary directory, with
//! fsync on: a commit waits for the disk, as the file store's `fdatasync` does) and stops it when
//! it is done, also when a measurement fails. On the same machine, against the real binary:
//!
//! - a broker on the file store (the baseline),
//! - one broker on a database of its own (`store = "postgres"`, one replica),
//! - three brokers on another database (three replicas; the load spread round robin over them),
//!
//! each with the same config but for `[ledger]` and `replica_id`, all signing with one ES256 key
//! file, and all sent the same CI tokens (a token is used once per store, so replay protection
//! never refuses one). The saturation rounds go through the three setups in turn, so a noisy
//! moment hits them alike. Then, in process: `PgStore::issue` from many concurrent tasks (group
//! commit) beside `FileStore`'s (row 3e's loop).

use crate::broker::{Broker, Setup};
use crate::exchange::{Round, SAT_ROUNDS, Tokens, over_rounds, requests, revoke_and_watch, saturation_round};
use crate::http::Conn;
use crate::load::{closed_loop_over, open_loop};
use crate::table::{Row, p50_p99_ms};
use ephemera::config::PostgresConfig;
use ephemera::ledger::{LeaseStore, PgStore, RetryPolicy};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg");

/// The issue's goal for exchanges per second with PostgreSQL on the same machine.
const RATE_GOAL: f64 = 5_000.0;
/// The issue's goal for the broker's CPU per exchange on PostgreSQL, over the file store's.
const CPU_GOAL: f64 = 1.3;

/// How many requests each phase sends.
struct Plan {
    warmup: usize,
    per_round: usize,
    conns: usize,
    open: usize,
    revocations: usize,
    /// Leases of the durable-leases row.
    records: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan { warmup: 300, per_round: 1_000, conns: 32, open: 2_000, revocations: 100, records: 20_000 }
        } else {
            Plan { warmup: 1_000, per_round: 10_000, conns: 32, open: 20_000, revocations: 500, records: 100_000 }
        }
    }
}

/// Every row of the section; works in `dir`.
pub fn run(binary: &Path, quick: bool, dir: &Path) -> Vec<Row> {
    std::fs::create_dir_all(dir).unwrap();
    let plan = Plan::new(quick);
    let server = Server::start();
    eprintln!("  PostgreSQL (fsync on) at {}", server.url);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let figures = rt.block_on(over_http(binary, &plan, &server, dir));
    drop(rt);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let durable = rt.block_on(durable(&plan, &server, dir));
    figures.rows(durable)
}

/// A PostgreSQL server of the bench's own, stopped (`scripts/pg stop`) when dropped.
pub struct Server {
    dir: tempfile::TempDir,
    url: String,
}

impl Server {
    pub fn start() -> Server {
        // Its own temporary directory, not one under the bench's: scripts/pg hands the directory
        // to the `postgres` user (when run as root), who must be able to reach it.
        let dir = tempfile::Builder::new().prefix("ephemera-bench-pg.").tempdir().unwrap();
        // Stopped on drop from here on, whatever happens next.
        let mut server = Server { dir, url: String::new() };
        let out = Command::new(SCRIPT)
            .arg("start")
            .arg(server.dir.path())
            .env("EPHEMERA_PG_FSYNC", "on")
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {SCRIPT}: {e}"));
        assert!(out.status.success(), "scripts/pg start failed: {}", out.status);
        server.url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        server
    }

    /// The server's processes: the postmaster and its children (a backend per connection, the
    /// WAL writer, the checkpointer, …).
    pub fn processes(&self) -> Vec<String> {
        let pid_file = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).unwrap_or_default();
        let Some(postmaster) = pid_file.lines().next().map(str::trim) else { return Vec::new() };
        let mut all = crate::procfs::children(postmaster);
        all.push(postmaster.to_string());
        all
    }

    /// Runs `sql` as the superuser.
    async fn execute(&self, sql: &str) {
        execute(&self.url, sql).await;
    }

    /// A new database on the server; its URL.
    pub async fn database(&self, name: &str) -> String {
        self.execute(&format!("CREATE DATABASE {name}")).await;
        let mut url = url::Url::parse(&self.url).unwrap();
        url.set_path(&format!("/{name}"));
        url.to_string()
    }

    /// Writes every page the server has dirtied and fsyncs its files. Before a phase whose
    /// latency or fsyncs are measured: the kernel writes back pages ~30 s after they were
    /// dirtied (hundreds of MB after the saturation rounds), and a phase that meets that
    /// write-back on the one disk waits behind it, whichever store it measures.
    pub async fn checkpoint(&self) {
        self.execute("CHECKPOINT").await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let stopped = Command::new(SCRIPT).arg("stop").arg(self.dir.path()).stdout(Stdio::null()).status();
        if !stopped.is_ok_and(|s| s.success()) {
            eprintln!("bench: scripts/pg stop {} failed: stop that server by hand", self.dir.path().display());
        }
    }
}

/// Brokers that take the same load together: one, or the replicas of one database.
struct Setting {
    what: &'static str,
    brokers: Vec<Broker>,
}

impl Setting {
    fn addrs(&self) -> Vec<SocketAddr> {
        self.brokers.iter().map(|b| b.addr).collect()
    }

    fn pids(&self) -> Vec<String> {
        self.brokers.iter().map(|b| b.pid.to_string()).collect()
    }
}

/// A broker's config: the shared key, and for a replica its id and `[ledger]` (else the file
/// store).
fn setup<'a>(replica_id: Option<&'a str>, key: &'a Path, ledger: &'a str) -> Setup<'a> {
    Setup { replica_id, signing_key_file: Some(key), extra: ledger, ..Setup::default() }
}

/// `[ledger]` on the database at `url`, with the defaults (`pool_size` 16).
fn ledger_toml(url: &str) -> String {
    format!("\n[ledger]\nstore = \"postgres\"\nurl = \"{url}\"\n")
}

/// What the HTTP rows measured.
struct Figures {
    file: Vec<Round>,
    one: Vec<Round>,
    three: Vec<Round>,
    conns: usize,
    /// The open loop's rate, and p50/p99 (ms) on postgres and on the file store.
    half_rate: f64,
    half_pg: Percentiles,
    half_file: Percentiles,
    /// Revoke on A → B inactive; revoke on A → A inactive; one introspection on B (p50/p99, ms).
    across: Percentiles,
    same: Percentiles,
    introspect: Percentiles,
    /// Revocations whose first introspection on B, after the revoke answered, said inactive.
    first_poll: usize,
    revocations: usize,
}

async fn over_http(binary: &Path, plan: &Plan, server: &Server, dir: &Path) -> Figures {
    let mut tokens = Tokens::new();
    let signing = Instant::now();
    let warmup = requests(&tokens.take(plan.warmup).1);
    let rounds: Vec<_> = (0..SAT_ROUNDS).map(|_| requests(&tokens.take(plan.per_round).1)).collect();
    let open = tokens.take(plan.open).1;
    let revocations = (tokens.take(plan.revocations).1, tokens.take(plan.revocations).1);
    eprintln!("  signed {} CI tokens in {:.1} s", tokens.next, signing.elapsed().as_secs_f64());

    let settings = start_settings(binary, server, dir).await;
    for s in &settings {
        closed_loop_over(&s.addrs(), warmup.clone(), plan.conns, 201).await.check("warm-up");
    }
    // Saturation: each round's tokens go to every setting in turn.
    let mut sat: [Vec<Round>; 3] = Default::default();
    for requests in rounds {
        let database = server.processes();
        for (s, rounds) in settings.iter().zip(&mut sat) {
            let (addrs, pids) = (s.addrs(), s.pids());
            rounds.push(saturation_round(s.what, &addrs, &pids, &database, requests.clone(), plan.conns).await);
        }
    }
    let [file, one, three] = sat;
    let (one_rate, _, _) = over_rounds(&one, |r| r.rate);
    server.checkpoint().await;
    let [file_broker, one_broker, three_brokers] = settings.each_ref().map(Setting::addrs);
    let (half_pg, half_file) = latency(one_broker[0], file_broker[0], &open, one_rate / 2.0, plan.conns).await;
    let (across, same, introspect, first_poll) = revocation_across(&three_brokers, &revocations).await;
    Figures {
        file,
        one,
        three,
        conns: plan.conns,
        half_rate: one_rate / 2.0,
        half_pg,
        half_file,
        across,
        same,
        introspect,
        first_poll,
        revocations: plan.revocations,
    }
}

/// A new ES256 signing key (PKCS#8 DER) at `path`: replicas of one database share one.
pub fn write_signing_key(path: &Path) {
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    std::fs::write(path, pkcs8.as_ref()).unwrap();
}

/// Runs `sql` on the database at `url`.
pub async fn execute(url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = connection.await;
}

/// The brokers: on the file store, alone on a database, and three replicas on another; all
/// with one signing key (ES256, PKCS#8 DER, made here).
async fn start_settings(binary: &Path, server: &Server, dir: &Path) -> [Setting; 3] {
    let key = dir.join("jwt-signing.pk8");
    write_signing_key(&key);
    let (one_url, three_url) =
        (ledger_toml(&server.database("bench_one").await), ledger_toml(&server.database("bench_three").await));
    let file = Broker::start_with(binary, &dir.join("file"), &setup(None, &key, "")).await;
    let one = Broker::start_with(binary, &dir.join("one"), &setup(Some("one"), &key, &one_url)).await;
    let mut replicas = Vec::new();
    for id in ["three-a", "three-b", "three-c"] {
        replicas.push(Broker::start_with(binary, &dir.join(id), &setup(Some(id), &key, &three_url)).await);
    }
    [
        Setting { what: "file store", brokers: vec![file] },
        Setting { what: "postgres, 1 replica", brokers: vec![one] },
        Setting { what: "postgres, 3 replicas", brokers: replicas },
    ]
}

/// p50 and p99 (ms) of an open loop at `rate` on the postgres broker, and on the file store's
/// with the same tokens and schedule, half just before and half just after.
async fn latency(
    pg: SocketAddr,
    file: SocketAddr,
    tokens: &[String],
    rate: f64,
    conns: usize,
) -> ((f64, f64), (f64, f64)) {
    let (before, after) = tokens.split_at(tokens.len() / 2);
    let mut base = open_loop(file, requests(before), rate, conns, 201).await;
    let mut half = open_loop(pg, requests(tokens), rate, conns, 201).await;
    base.merge(open_loop(file, requests(after), rate, conns, 201).await);
    half.check("open loop, postgres");
    base.check("open loop, file store");
    let (on_pg, on_file) = (p50_p99_ms(&mut half.latencies), p50_p99_ms(&mut base.latencies));
    eprintln!(
        "  at {rate:.0}/s: postgres p50 {:.2} ms, p99 {:.2} ms (file store: {:.2}, {:.2})",
        on_pg.0, on_pg.1, on_file.0, on_file.1
    );
    (on_pg, on_file)
}

type Percentiles = (f64, f64);

/// Revocation seen across replicas: for each pair of tokens, revoke on A and watch B, then
/// revoke on A and watch A. p50/p99 (ms) of both, of one introspection on B, and how often B's
/// first introspection after the revoke answered already said inactive.
async fn revocation_across(
    replicas: &[SocketAddr],
    (across_tokens, same_tokens): &(Vec<String>, Vec<String>),
) -> (Percentiles, Percentiles, Percentiles, usize) {
    let (mut on_a, mut a_again, mut on_b) = (conn(replicas[0]).await, conn(replicas[0]).await, conn(replicas[1]).await);
    let (mut across, mut same, mut introspect, mut first_poll) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for (a, s) in across_tokens.iter().zip(same_tokens) {
        let watched = revoke_and_watch(&mut on_a, &mut on_b, a).await;
        across.push(watched.secs);
        introspect.push(watched.introspect_rtt);
        first_poll += usize::from(watched.polls == 1);
        same.push(revoke_and_watch(&mut on_a, &mut a_again, s).await.secs);
    }
    let (across, same) = (p50_p99_ms(&mut across), p50_p99_ms(&mut same));
    eprintln!(
        "  revoke on A → B inactive: p50 {:.2} ms, p99 {:.2} ms (on A alone: {:.2}, {:.2})",
        across.0, across.1, same.0, same.1
    );
    (across, same, p50_p99_ms(&mut introspect), first_poll)
}

async fn conn(addr: SocketAddr) -> Conn {
    Conn::open(addr).await.unwrap()
}

/// Leases made durable per second: PgStore with many writers (and the database's CPU per
/// lease meanwhile), PgStore with one, FileStore with as many as the first.
struct Durable {
    pg: f64,
    pg_database_us: f64,
    pg_single: f64,
    file: f64,
    records: usize,
}

/// Concurrent writers of the durable-leases rows (3e's).
const WRITERS: usize = 256;

async fn durable(plan: &Plan, server: &Server, dir: &Path) -> Durable {
    eprintln!("  durable leases: {} through FileStore, then PgStore", plan.records);
    let leases = crate::ledger::Leases::new();
    server.checkpoint().await;
    let file = crate::ledger::appends(&dir.join("journal-group"), WRITERS, plan.records, &leases).await;
    let cfg = PostgresConfig::from_url(&server.database("bench_store").await).unwrap();
    let store: Arc<dyn LeaseStore> =
        Arc::new(PgStore::open(&cfg, None, "bench", RetryPolicy::default()).await.unwrap());
    let single_n = (plan.records / 100).clamp(100, 500);
    let pg_single = crate::ledger::issues(store.clone(), 1, single_n, &leases).await;
    let database = crate::procfs::cpu_of(&server.processes());
    let pg = crate::ledger::issues(store, WRITERS, plan.records, &leases).await;
    let pg_database_us = crate::procfs::cpu_of(&server.processes()).since(&database) / plan.records as f64 * 1e6;
    eprintln!(
        "  durable leases/s: PgStore {pg:.0} ({pg_database_us:.0} µs database CPU each; one writer {pg_single:.0}), \
         FileStore {file:.0}"
    );
    Durable { pg, pg_database_us, pg_single, file, records: plan.records }
}

impl Figures {
    fn rows(self, durable: Durable) -> Vec<Row> {
        let (file_rate, file_rate_lo, file_rate_hi) = over_rounds(&self.file, |r| r.rate);
        let (file_cpu, file_cpu_lo, file_cpu_hi) = over_rounds(&self.file, |r| r.cpu_us);
        let file_rate_text =
            format!("{file_rate:.0}/s, file store (same tokens, rounds in turn: {file_rate_lo:.0}–{file_rate_hi:.0})");
        let file_cpu_text = format!("{file_cpu:.0} µs, file store ({file_cpu_lo:.0}–{file_cpu_hi:.0})");
        let mut rows = Vec::new();
        let settings = [
            (["6a", "6b"], "one replica", "", &self.one),
            (["6c", "6d"], "three replicas, load round robin", ", summed over the three", &self.three),
        ];
        for (ids, replicas, summed, rounds) in settings {
            let (rate, rate_lo, rate_hi) = over_rounds(rounds, |r| r.rate);
            let (cpu, cpu_lo, cpu_hi) = over_rounds(rounds, |r| r.cpu_us);
            let (database, _, _) = over_rounds(rounds, |r| r.extra_us);
            let (_, _, others) = over_rounds(rounds, |r| r.others + r.steal);
            let n: usize = rounds.iter().map(|r| r.ok).sum();
            rows.push(
                Row::new(
                    ids[0],
                    &format!("exchanges/s at saturation, `store = \"postgres\"`, {replicas} (PostgreSQL on the same 2 cores, fsync on)"),
                    format!(
                        "{rate:.0}/s (median of {} rounds: {rate_lo:.0}–{rate_hi:.0}; {n} exchanges, {} conns; other \
                         processes and steal: ≤ {others:.2} cores)",
                        rounds.len(),
                        self.conns
                    ),
                    file_rate_text.clone(),
                )
                .ratio(rate / file_rate)
                .goal("≥ 5,000/s", rate >= RATE_GOAL),
            );
            rows.push(
                Row::new(
                    ids[1],
                    &format!(
                        "**broker CPU per exchange at saturation, postgres ({replicas}) ÷ file store** (/proc{summed})"
                    ),
                    format!(
                        "{cpu:.0} µs (median: {cpu_lo:.0}–{cpu_hi:.0}); PostgreSQL's processes: {database:.0} µs more \
                         (broker + database: {:.2}× the file store)",
                        (cpu + database) / file_cpu
                    ),
                    file_cpu_text.clone(),
                )
                .ratio(cpu / file_cpu)
                .goal("≤ 1.3", cpu / file_cpu <= CPU_GOAL),
            );
        }
        let Durable { pg, pg_database_us, pg_single, file, records } = durable;
        rows.push(
            Row::new(
                "6e",
                &format!("durable leases/s through `PgStore::issue`, group commit ({WRITERS} concurrent writers; lease + replay key, commit with fsync)"),
                format!(
                    "{pg:.0}/s ({records} leases; PostgreSQL's processes: {pg_database_us:.0} µs CPU per lease; one \
                     writer: {pg_single:.0}/s, a commit each)"
                ),
                format!("{file:.0}/s, `FileStore`, the same {WRITERS} writers (3e)"),
            )
            .ratio(pg / file),
        );
        let ((p50, p99), (b50, b99)) = (self.half_pg, self.half_file);
        rows.push(
            Row::new(
                "6f",
                "exchange latency at 50 % of 6a's rate, postgres, one replica (open loop, from the scheduled send)",
                format!("p50 {p50:.2} ms, p99 {p99:.2} ms at {:.0}/s", self.half_rate),
                format!("file store, same schedule and tokens: p50 {b50:.2} ms, p99 {b99:.2} ms"),
            )
            .ratio(p99 / b99),
        );
        let ((a50, a99), (s50, s99), (i50, i99)) = (self.across, self.same, self.introspect);
        rows.push(
            Row::new(
                "6g",
                "revocation across replicas: POST /v1/revoke on replica A sent → introspect on replica B says inactive",
                format!(
                    "p50 {a50:.2} ms, p99 {a99:.2} ms (n = {}; B's first introspection after the revoke answered \
                     said inactive in {} of {})",
                    self.revocations, self.first_poll, self.revocations
                ),
                format!("revoke and introspect on A: p50 {s50:.2} ms, p99 {s99:.2} ms; one introspection on B: p50 {i50:.2} ms, p99 {i99:.2} ms"),
            )
            .ratio(a99 / s99),
        );
        rows
    }
}
