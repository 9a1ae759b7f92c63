//! Rows 11d–11e (issue 23, PostgreSQL's half): the exchange under a large live set on the shared
//! store. Three brokers, each on its own database of one PostgreSQL server (the bench's, fsync
//! on): one holding 1k live leases, one holding 1M, and the control, a second 1k set up exactly
//! as the first (`windows`). They take the same open-loop load at 50 % of the 1k broker's
//! saturation, in short windows taken strictly in turn: 1k, 1M, control, 1k, 1M, control …
//!
//! The windows are short (about half a second each): this machine has stalls of a second or two
//! that have nothing to do with the live set (every side shows them, whichever is loaded; see
//! docs/benchmarks.md), and short windows let a stall spoil one window, not a side's figure. The
//! goal is judged on each side's typical window (`windows`); the pooled p99 is printed beside it,
//! and the control says how far two identical brokers differ in this very run.
//!
//! PostgreSQL has no compaction: what a large live set could cost there is the tables and their
//! indexes outgrowing the server's memory (an exchange inserts into the lease table, its state
//! table with four indexes, the replay keys; the reaper claims by the expiry index), and
//! autovacuum and checkpoints over more pages. Pruning, the counterpart of compaction, only ever
//! touches ended leases, of which every side has the same few.
//!
//! The live leases are copies of a real one: the broker's first exchange on each database is
//! copied `count` times by SQL (new id, job and a day more to live), so every row has the shape
//! and size an exchange writes. CPU per exchange is the broker's plus the whole server's
//! (`/proc`), over the windows: the database's work is the store's cost here.

use crate::broker::{Broker, Setup};
use crate::exchange::{Plan, SAT_ROUNDS, Tokens, over_rounds, requests, saturation_round};
use crate::live_set::over_10ms_inside;
use crate::load::{Outcome, closed_loop, open_loop};
use crate::table::Row;
use crate::windows::{BASELINE, LARGE, SIDES, Windows};
use std::path::Path;
use std::time::Instant;

/// Rounds of windows (one per side); each side gets `3 × plan.open` exchanges in all, as the
/// file store's rows.
const ROUNDS: usize = 30;

/// Copies the database's one lease `count` times: both of its rows, as they are but for the id,
/// the job and the expiry (a day later, so none expires during the run). The column lists come
/// from the catalog, so a schema change needs nothing here.
fn fill(count: usize) -> String {
    let copy = |table: &str| {
        format!(
            "DO $$ DECLARE cols text; vals text; BEGIN
               SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position),
                      string_agg(CASE column_name
                                   WHEN 'id' THEN '''lse_fill'' || lpad(i::text, 8, ''0'')'
                                   WHEN 'job' THEN 't.job || ''-fill-'' || i'
                                   WHEN 'expires_at' THEN 't.expires_at + 86400'
                                   ELSE 't.' || quote_ident(column_name) END, ', ' ORDER BY ordinal_position)
                 INTO cols, vals
                 FROM information_schema.columns WHERE table_name = '{table}' AND table_schema = current_schema();
               EXECUTE format('INSERT INTO {table} (%s) SELECT %s FROM {table} t, generate_series(1, {count}) i
                               WHERE t.id = (SELECT min(id) FROM {table})', cols, vals);
             END $$;"
        )
    };
    format!("{}{}", copy("ephemera_leases"), copy("ephemera_lease_state"))
}

/// Active leases in the database at `url`.
async fn live_leases(url: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    let row = client.query_one("SELECT count(*) FROM ephemera_lease_state WHERE state = 'active'", &[]).await.unwrap();
    drop(client);
    let _ = connection.await;
    row.get(0)
}

#[derive(Default)]
struct Side {
    outcome: Outcome,
    /// Broker and server CPU seconds over the windows.
    broker_cpu: f64,
    database_cpu: f64,
}

pub async fn run(binary: &Path, plan: &Plan, dir: &Path, big: usize) -> Vec<Row> {
    ephemera::install_crypto();
    std::fs::create_dir_all(dir).unwrap();
    let small = 1_000;
    let scale = if big >= 1_000_000 { format!("{}M", big / 1_000_000) } else { format!("{}k", big / 1_000) };
    let server = crate::postgres::Server::start();
    let key = dir.join("jwt-es256.pk8");
    crate::postgres::write_signing_key(&key);
    let mut tokens = Tokens::new();
    let mut take = |n: usize| requests(&tokens.take(n).1);
    let firsts: [_; SIDES] = std::array::from_fn(|_| take(1));
    let warmups: [_; SIDES] = std::array::from_fn(|_| take(plan.warmup));
    let saturation: Vec<_> = (0..SAT_ROUNDS).map(|_| take(plan.saturation / SAT_ROUNDS)).collect();
    let per_window = plan.open * 3 / ROUNDS;
    let rounds: Vec<[_; SIDES]> = (0..ROUNDS).map(|_| std::array::from_fn(|_| take(per_window))).collect();

    // In window order: baseline, large, control.
    let setups = [("small", small), ("big", big), ("control", small)];
    let mut brokers = Vec::new();
    let mut urls = Vec::new();
    for ((name, count), first) in setups.into_iter().zip(firsts) {
        let url = server.database(&format!("live_{name}")).await;
        urls.push(url.clone());
        let ledger = format!("\n[ledger]\nstore = \"postgres\"\nurl = \"{url}\"\n");
        let setup = Setup { replica_id: Some(name), signing_key_file: Some(&key), extra: &ledger, ..Setup::default() };
        let broker = Broker::start_with(binary, &dir.join(name), &setup).await;
        closed_loop(broker.addr, first, 1, 201).await.check("the lease to copy");
        let started = Instant::now();
        crate::postgres::execute(&url, &fill(count)).await;
        // The large database settled, as a broker that has held a million leases for a while
        // finds it: autovacuum's first pass over a fresh million rows (hint bits, the visibility
        // map, statistics) is not what a large live set costs. The small ones are left as young
        // as a new deployment's: analyzed at 1k rows and then grown 30-fold by the saturation
        // rounds, its prepared statements would keep plans made for a table of 1k rows.
        if name == "big" {
            crate::postgres::execute(&url, "VACUUM ANALYZE").await;
        }
        let leases = live_leases(&url).await;
        assert!(leases > count as i64, "{name}: {leases} live leases after copying one {count} times");
        eprintln!("  {name}: copied a lease {count} times in {:.1} s", started.elapsed().as_secs_f64());
        brokers.push(broker);
    }
    for (broker, warmup) in brokers.iter().zip(warmups) {
        closed_loop(broker.addr, warmup, plan.saturation_conns, 201).await.check("warm-up");
    }
    server.checkpoint().await;
    let database = server.processes();
    let pid = brokers[BASELINE].pid.to_string();
    let mut measured = Vec::new();
    for round in saturation {
        let pids = std::slice::from_ref(&pid);
        measured.push(
            saturation_round(
                "saturation, 1k live",
                &[brokers[BASELINE].addr],
                pids,
                &database,
                round,
                plan.saturation_conns,
            )
            .await,
        );
    }
    let (rate, _, _) = over_rounds(&measured, |r| r.rate);
    let half = rate / 2.0;
    // All settled before the windows: the saturation rounds left the baseline's database tens
    // of thousands of fresh rows, and autovacuum's first pass over them must not fall in its
    // windows (an `ANALYZE` also has every pooled connection plan its statements anew).
    for url in &urls {
        crate::postgres::execute(url, "VACUUM ANALYZE").await;
    }
    server.checkpoint().await;

    let mut sides: [Side; SIDES] = Default::default();
    let mut windows = Windows::default();
    // Exchanges over 10 ms from the scheduled send (the client's view) and inside the broker
    // (`ephemera_exchange_duration_seconds`, from the handler's start to its reply), by side:
    // a window slow on the client's clock but not inside the broker waited outside the
    // exchange (the socket, the runtime's scheduling, the machine).
    let mut slow: [(usize, f64); SIDES] = Default::default();
    let names = ["1k", scale.as_str(), "control"];
    for (r, round) in rounds.into_iter().enumerate() {
        let mut line = Vec::new();
        // Wall-clock time of the round, to find it in the server's log (milliseconds).
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        for (i, requests) in round.into_iter().enumerate() {
            let broker = &brokers[i];
            let pid = broker.pid.to_string();
            let (cpu, db_cpu) = (crate::procfs::cpu(&pid), crate::procfs::cpu_of(&server.processes()));
            let inside_before = over_10ms_inside(broker.addr).await;
            let outcome = open_loop(broker.addr, requests, half, plan.open_conns, 201).await;
            let inside = over_10ms_inside(broker.addr).await - inside_before;
            let client = outcome.latencies.iter().filter(|l| **l > 0.010).count();
            slow[i] = (slow[i].0 + client, slow[i].1 + inside);
            sides[i].broker_cpu += crate::procfs::cpu(&pid).since(&cpu);
            sides[i].database_cpu += crate::procfs::cpu_of(&server.processes()).since(&db_cpu);
            outcome.check("open loop under a live set, postgres");
            let p99 = windows.add(i, &outcome.latencies);
            line.push(format!("{} {p99:.2} ms ({client} / {inside:.0})", names[i]));
            sides[i].outcome.merge(outcome);
        }
        eprintln!(
            "  postgres, round {} at {}.{:03} UTC, {per_window} exchanges a window at {half:.0}/s: p99 {} (over 10 ms, from the client's send / inside the broker)",
            r + 1,
            &ephemera::clock::rfc3339(at.as_secs() as i64)[11..19],
            at.subsec_millis(),
            line.join(", "),
        );
    }
    drop(brokers);
    drop(server);

    let per = |s: &Side| {
        let ok = s.outcome.ok as f64;
        ((s.broker_cpu + s.database_cpu) / ok, s.broker_cpu / ok, s.database_cpu / ok)
    };
    let [(small_all, small_broker, small_db), (big_all, big_broker, big_db), (control_all, _, _)] =
        sides.each_ref().map(per);
    let n = sides[LARGE].outcome.ok;
    let over = |side: usize| {
        format!("over 10 ms: {} from the client's send, {:.0} inside the broker", slow[side].0, slow[side].1)
    };
    vec![
        Row::new(
            "11d",
            &format!("**exchange p99 at 50 % of saturation, PostgreSQL, {scale} live leases ÷ 1k**: the typical window's (fsync on)"),
            format!("{} ({n} exchanges at {half:.0}/s; {})", windows.describe(LARGE), over(LARGE)),
            format!(
                "1k live: {} (same schedule, windows in turn; {}); {}",
                windows.describe(BASELINE),
                over(BASELINE),
                windows.control()
            ),
        )
        .ratio(windows.ratio())
        .goal("≤ 1.2", windows.ratio() <= 1.2),
        Row::new(
            "11e",
            &format!("**broker + PostgreSQL CPU per exchange at 50 % of saturation, {scale} live leases ÷ 1k**"),
            format!("{:.0} µs = {:.0} broker + {:.0} database", big_all * 1e6, big_broker * 1e6, big_db * 1e6),
            format!(
                "1k live: {:.0} µs = {:.0} + {:.0}; control ÷ 1k: {:.2}",
                small_all * 1e6,
                small_broker * 1e6,
                small_db * 1e6,
                control_all / small_all
            ),
        )
        .ratio(big_all / small_all)
        .goal("≤ 1.2", big_all / small_all <= 1.2),
    ]
}
