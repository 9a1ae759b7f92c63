//! The load generator: closed loop (N connections, each sends its next request as soon as the
//! last answered: saturation) and open loop (requests on a fixed schedule, latency measured from
//! the scheduled send time, so time spent queueing behind a slow request counts).
//!
//! Requests are pre-built bytes; everything runs on one client thread (plus a dispatcher thread
//! for the open loop's schedule: tokio's timer has 1 ms granularity, `thread::sleep` ~60 µs).

use crate::http::Conn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What [`Outcome::slow_at`] counts as slow, in seconds.
pub const SLOW: f64 = 0.005;

#[derive(Default)]
pub struct Outcome {
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// Seconds per successful request (open loop: from its scheduled send time).
    pub latencies: Vec<f64>,
    /// Open loop: the schedule positions of the requests that took over [`SLOW`] (where in a
    /// window the slow ones were).
    pub slow_at: Vec<usize>,
    pub wall: f64,
}

impl Outcome {
    pub fn merge(&mut self, other: Outcome) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies.extend(other.latencies);
        self.slow_at.extend(other.slow_at);
    }

    fn record(&mut self, result: std::io::Result<crate::http::Response>, expect: u16, latency: f64) -> bool {
        match result {
            Ok(r) if r.status == expect => {
                self.ok += 1;
                self.latencies.push(latency);
                true
            }
            Ok(r) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("HTTP {}: {}", r.status, r.text()));
                true
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
                false
            }
        }
    }

    /// Panics with the first error when more than 1 % of the requests failed: the figures would
    /// not describe the broker's normal path.
    pub fn check(&self, what: &str) {
        if self.errors * 100 > self.ok + self.errors {
            panic!(
                "{what}: {} of {} requests failed; first: {:?}",
                self.errors,
                self.ok + self.errors,
                self.first_error
            );
        }
    }

    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.wall
    }
}

/// Sends every request once over `conns` keep-alive connections, each as soon as its
/// connection is free.
pub async fn closed_loop(addr: SocketAddr, requests: Arc<Vec<Vec<u8>>>, conns: usize, expect: u16) -> Outcome {
    closed_loop_over(&[addr], requests, conns, expect).await
}

/// [`closed_loop`] over several servers (replicas): connection `i` goes to `addrs[i % len]`,
/// round robin, as a load balancer spreads keep-alive connections.
pub async fn closed_loop_over(addrs: &[SocketAddr], requests: Arc<Vec<Vec<u8>>>, conns: usize, expect: u16) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let (requests, next, addr) = (requests.clone(), next.clone(), addrs[i % addrs.len()]);
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let mut conn = Conn::open(addr).await.unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(request) = requests.get(i) else { break };
                    let sent = Instant::now();
                    let result = conn.send(request).await;
                    if !out.record(result, expect, sent.elapsed().as_secs_f64()) {
                        conn = Conn::open(addr).await.unwrap();
                    }
                }
                out
            })
        })
        .collect();
    let mut total = gather(workers).await;
    total.wall = started.elapsed().as_secs_f64();
    total
}

/// The workers' outcomes, merged.
async fn gather(workers: Vec<tokio::task::JoinHandle<Outcome>>) -> Outcome {
    let mut total = Outcome::default();
    for w in workers {
        total.merge(w.await.unwrap());
    }
    total
}

/// Sends request `i` at `start + i / rate` over `conns` keep-alive connections (whichever is
/// free). A request that waits for a free connection is late, and its lateness counts.
pub async fn open_loop(addr: SocketAddr, requests: Arc<Vec<Vec<u8>>>, rate: f64, conns: usize, expect: u16) -> Outcome {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut opened = Vec::new();
    for _ in 0..conns {
        opened.push(Conn::open(addr).await.unwrap());
    }
    let start = Instant::now() + Duration::from_millis(20);
    let n = requests.len();
    let dispatcher = std::thread::spawn(move || {
        for i in 0..n {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send((i, at)).is_err() {
                break;
            }
        }
    });
    let workers: Vec<_> = opened
        .into_iter()
        .map(|mut conn| {
            let (requests, rx) = (requests.clone(), rx.clone());
            tokio::spawn(async move {
                let mut out = Outcome::default();
                loop {
                    let job = rx.lock().await.recv().await;
                    let Some((i, at)) = job else { break };
                    let result = conn.send(&requests[i]).await;
                    let latency = at.elapsed().as_secs_f64();
                    if latency > SLOW {
                        out.slow_at.push(i);
                    }
                    if !out.record(result, expect, latency) {
                        conn = Conn::open(addr).await.unwrap();
                    }
                }
                out
            })
        })
        .collect();
    let mut total = gather(workers).await;
    dispatcher.join().unwrap();
    total.wall = start.elapsed().as_secs_f64();
    total
}
