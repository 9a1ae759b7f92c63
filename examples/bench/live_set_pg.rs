//! Rows 11d–11e (issue 23, PostgreSQL's half): the exchange under a large live set on the shared
//! store. Two brokers, each on its own database of one PostgreSQL server (the bench's, fsync on),
//! one holding 1k live leases and one holding 1M, take the same open-loop load at 50 % of the 1k
//! broker's saturation, in short windows taken in turn.
//!
//! The windows are short (about half a second each) and strictly alternate, 1k, 1M, 1k, 1M:
//! this machine has stalls of a second or two that have nothing to do with the live set (both
//! sides showed them, whichever was loaded; see docs/benchmarks.md), and with three long windows
//! a side one stall decided which side's p99 it raised. Short windows are meant to spread a
//! stall over both sides (an ABBA order, tried first, put two windows of one side back to back
//! at every other pair); on this machine a few stalled windows still fall on one side or the
//! other in a run, so the row also reports each side's median window p99, which they do not
//! move.
//!
//! PostgreSQL has no compaction: what a large live set could cost there is the tables and their
//! indexes outgrowing the server's memory (an exchange inserts into the lease table, its state
//! table with four indexes, the replay keys; the reaper claims by the expiry index), and
//! autovacuum and checkpoints over more pages. Pruning, the counterpart of compaction, only ever
//! touches ended leases, of which both sides have the same few.
//!
//! The live leases are copies of a real one: the broker's first exchange on each database is
//! copied `count` times by SQL (new id, job and a day more to live), so every row has the shape
//! and size an exchange writes. CPU per exchange is the broker's plus the whole server's
//! (`/proc`), over the windows: the database's work is the store's cost here.

use crate::broker::{Broker, Setup};
use crate::exchange::{Plan, SAT_ROUNDS, Tokens, over_rounds, requests, saturation_round};
use crate::live_set::sorted;
use crate::load::{Outcome, closed_loop, open_loop};
use crate::table::{Row, percentile};
use std::path::Path;
use std::time::Instant;

/// Pairs of windows; each side gets `3 × plan.open` exchanges in all, as the file store's rows.
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

/// Exchanges the broker at `addr` has timed over 10 ms inside itself since it started (its
/// latency histogram: the count less the `le="0.01"` bucket).
async fn over_10ms_inside(addr: std::net::SocketAddr) -> f64 {
    let mut conn = crate::http::Conn::open(addr).await.unwrap();
    let text = conn.send(&crate::http::request("GET", "/metrics", &[], "", b"")).await.unwrap().text();
    let sample = |name: &str| crate::http::sample(&text, name);
    sample("ephemera_exchange_duration_seconds_count")
        - sample("ephemera_exchange_duration_seconds_bucket{le=\"0.01\"}")
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
    let firsts = [requests(&tokens.take(1).1), requests(&tokens.take(1).1)];
    let warmups = [requests(&tokens.take(plan.warmup).1), requests(&tokens.take(plan.warmup).1)];
    let saturation: Vec<_> = (0..SAT_ROUNDS).map(|_| requests(&tokens.take(plan.saturation / SAT_ROUNDS).1)).collect();
    let per_window = plan.open * 3 / ROUNDS;
    let windows: Vec<[_; 2]> =
        (0..ROUNDS).map(|_| [requests(&tokens.take(per_window).1), requests(&tokens.take(per_window).1)]).collect();

    let mut brokers = Vec::new();
    let mut urls = Vec::new();
    for ((name, count), first) in [("small", small), ("big", big)].into_iter().zip(firsts) {
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
        // map, statistics) is not what a large live set costs. The small one is left as young
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
    let pid = brokers[0].pid.to_string();
    let mut rounds = Vec::new();
    for round in saturation {
        let pids = std::slice::from_ref(&pid);
        rounds.push(
            saturation_round("saturation, 1k live", &[brokers[0].addr], pids, &database, round, plan.saturation_conns)
                .await,
        );
    }
    let (rate, _, _) = over_rounds(&rounds, |r| r.rate);
    let half = rate / 2.0;
    // Both settled before the windows: the saturation rounds left the 1k database tens of
    // thousands of fresh rows, and autovacuum's first pass over them must not fall in its
    // windows (an `ANALYZE` also has every pooled connection plan its statements anew).
    for url in &urls {
        crate::postgres::execute(url, "VACUUM ANALYZE").await;
    }
    server.checkpoint().await;

    let mut sides = [Side::default(), Side::default()];
    let mut window_p99s: [Vec<f64>; 2] = Default::default();
    // Exchanges over 10 ms from the scheduled send (the client's view) and inside the broker
    // (`ephemera_exchange_duration_seconds`, from the handler's start to its reply), by side:
    // a window slow on the client's clock but not inside the broker waited outside the
    // exchange (the socket, the runtime's scheduling, the machine).
    let mut slow: [(usize, f64); 2] = Default::default();
    for (r, round) in windows.into_iter().enumerate() {
        let mut p99s = [0.0; 2];
        let mut slow_now = [(0usize, 0.0); 2];
        // Wall-clock time of the pair, to find it in the server's log (milliseconds).
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        for (i, requests) in round.into_iter().enumerate() {
            let broker = &brokers[i];
            let pid = broker.pid.to_string();
            let (cpu, db_cpu) = (crate::procfs::cpu(&pid), crate::procfs::cpu_of(&server.processes()));
            let inside_before = over_10ms_inside(broker.addr).await;
            let outcome = open_loop(broker.addr, requests, half, plan.open_conns, 201).await;
            let inside = over_10ms_inside(broker.addr).await - inside_before;
            slow_now[i] = (outcome.latencies.iter().filter(|l| **l > 0.010).count(), inside);
            sides[i].broker_cpu += crate::procfs::cpu(&pid).since(&cpu);
            sides[i].database_cpu += crate::procfs::cpu_of(&server.processes()).since(&db_cpu);
            outcome.check("open loop under a live set, postgres");
            p99s[i] = percentile(&sorted(&outcome.latencies), 0.99) * 1e3;
            sides[i].outcome.merge(outcome);
        }
        for (all, p99) in window_p99s.iter_mut().zip(p99s) {
            all.push(p99);
        }
        for (total, now) in slow.iter_mut().zip(slow_now) {
            *total = (total.0 + now.0, total.1 + now.1);
        }
        eprintln!(
            "  postgres, pair {} at {}.{:03} UTC: p99 1k {:.2} ms, {scale} {:.2} ms ({per_window} exchanges each at {half:.0}/s; over 10 ms, client / inside the broker: 1k {} / {:.0}, {scale} {} / {:.0})",
            r + 1,
            &ephemera::clock::rfc3339(at.as_secs() as i64)[11..19],
            at.subsec_millis(),
            p99s[0],
            p99s[1],
            slow_now[0].0,
            slow_now[0].1,
            slow_now[1].0,
            slow_now[1].1,
        );
    }
    drop(brokers);
    drop(server);

    let [small_lat, big_lat] = [&sides[0], &sides[1]].map(|s| sorted(&s.outcome.latencies));
    // The typical window, which a stall of seconds in one or two windows does not move.
    let [small_window, big_window] = window_p99s.map(|p99s| percentile(&sorted(&p99s), 0.5));
    let p = |l: &[f64], q: f64| percentile(l, q) * 1e3;
    let per = |s: &Side| {
        let ok = s.outcome.ok as f64;
        ((s.broker_cpu + s.database_cpu) / ok, s.broker_cpu / ok, s.database_cpu / ok)
    };
    let ((big_all, big_broker, big_db), (small_all, small_broker, small_db)) = (per(&sides[1]), per(&sides[0]));
    let n = sides[1].outcome.ok;
    vec![
        Row::new(
            "11d",
            &format!("**exchange p99 at 50 % of saturation, PostgreSQL, {scale} live leases ÷ 1k** (fsync on)"),
            format!(
                "p99 {:.2} ms, p50 {:.2} ms ({n} exchanges at {half:.0}/s in {ROUNDS} windows; median window's p99 {big_window:.2} ms; over 10 ms: {} from the client's send, {:.0} inside the broker)",
                p(&big_lat, 0.99),
                p(&big_lat, 0.5),
                slow[1].0,
                slow[1].1
            ),
            format!(
                "1k live: p99 {:.2} ms, p50 {:.2} ms (same schedule, windows alternating; median window's p99 {small_window:.2} ms; over 10 ms: {} / {:.0})",
                p(&small_lat, 0.99),
                p(&small_lat, 0.5),
                slow[0].0,
                slow[0].1
            ),
        )
        .ratio(p(&big_lat, 0.99) / p(&small_lat, 0.99))
        .goal("≤ 1.2", p(&big_lat, 0.99) / p(&small_lat, 0.99) <= 1.2),
        Row::new(
            "11e",
            &format!("**broker + PostgreSQL CPU per exchange at 50 % of saturation, {scale} live leases ÷ 1k**"),
            format!("{:.0} µs = {:.0} broker + {:.0} database", big_all * 1e6, big_broker * 1e6, big_db * 1e6),
            format!("1k live: {:.0} µs = {:.0} + {:.0}", small_all * 1e6, small_broker * 1e6, small_db * 1e6),
        )
        .ratio(big_all / small_all)
        .goal("≤ 1.2", big_all / small_all <= 1.2),
    ]
}
