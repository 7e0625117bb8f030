//! The load engine: closed-loop (a fixed number of clients, each sending its next request when
//! the previous one is answered) and open-loop (a fixed arrival rate; each request's latency is
//! measured from the time it was *scheduled* to be sent, so a stalled server cannot hide its
//! stall by slowing the client down: no coordinated omission).
//!
//! Every loop is bounded by a request count and a deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::http::Conn;

/// How long one request may take before it counts as a `timeout` error (and its connection is
/// replaced). Above the services' own 10 s request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(12);
/// Open loop: how long after the deadline the backlog may still be sent.
const OPEN_LOOP_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mode {
    /// `clients` connections, each with one request in flight.
    Closed { clients: usize },
    /// `rate` requests per second spread evenly, sent over at most `clients` connections.
    Open { rate: f64, clients: usize },
}

impl Mode {
    pub fn clients(&self) -> usize {
        match *self {
            Mode::Closed { clients } | Mode::Open { clients, .. } => clients,
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Mode::Closed { clients } => format!("closed, {clients} clients"),
            Mode::Open { rate, clients } => format!("open, {rate:.0}/s, ≤ {clients} conns"),
        }
    }
}

/// What a request was for, so that an accepted ballot can be credited to its poll and option.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tag {
    pub poll: u32,
    pub option: u8,
    /// A read of a mixed workload (`Plan::read_addr`, success 200, counted apart from the
    /// workload's own requests in `Tallies::reads`).
    pub read: bool,
    /// Which of the mixed workload's two reads (0 or 1; `Reads::by_kind`).
    pub read_kind: u8,
}

/// Produces the requests of a run. `i` is the request's number, unique within the run.
pub trait Workload: Send + Sync + 'static {
    fn build(&self, i: u64, buf: &mut Vec<u8>) -> Tag;
    /// Polls the accepted-ballot counts are kept for (0 for non-vote workloads).
    fn polls(&self) -> usize;
    /// Options per poll.
    fn options(&self) -> usize;
    /// Whether 409 (already voted) is an expected answer.
    fn conflicts_expected(&self) -> bool;
    /// The success status (201 for ballots, 200 for `GET /`).
    fn success(&self) -> u16;
}

/// The reads of a mixed workload (requests tagged `read`): success is 200, anything else an
/// error (counted in `Tallies::errors` as `read <status>`).
pub struct Reads {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub sent: u64,
    /// Successful reads and their latency per `Tag::read_kind`.
    pub by_kind: [(u64, Histogram<u64>); 2],
}

/// What a run observed.
pub struct Tallies {
    pub hist: Histogram<u64>,
    /// Successful answers (for ballots: 201 without `Idempotent-Replayed`).
    pub ok: u64,
    pub replayed: u64,
    pub conflicts: u64,
    /// Unexpected answers by status, plus `io` and `timeout`.
    pub errors: BTreeMap<String, u64>,
    /// Requests whose outcome is unknown (no answer): a ballot may or may not have been stored.
    pub ambiguous: u64,
    /// Accepted ballots per poll and option.
    pub accepted: Vec<Vec<u64>>,
    pub last_ok: Option<Instant>,
    pub sent: u64,
    /// Requests tagged `read` (mixed workloads); `ok`, `hist` and `sent` above exclude them.
    pub reads: Reads,
}

fn latency_histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl Tallies {
    fn new(polls: usize, options: usize) -> Self {
        Self {
            hist: latency_histogram(),
            ok: 0,
            replayed: 0,
            conflicts: 0,
            errors: BTreeMap::new(),
            ambiguous: 0,
            accepted: vec![vec![0; options]; polls],
            last_ok: None,
            sent: 0,
            reads: Reads {
                hist: latency_histogram(),
                ok: 0,
                sent: 0,
                by_kind: [(0, latency_histogram()), (0, latency_histogram())],
            },
        }
    }

    fn merge(&mut self, other: Tallies) {
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.replayed += other.replayed;
        self.conflicts += other.conflicts;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.ambiguous += other.ambiguous;
        for (mine, theirs) in self.accepted.iter_mut().zip(other.accepted) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m += t;
            }
        }
        self.last_ok = match (self.last_ok, other.last_ok) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.sent += other.sent;
        let _ = self.reads.hist.add(&other.reads.hist);
        self.reads.ok += other.reads.ok;
        self.reads.sent += other.reads.sent;
        for (mine, theirs) in self.reads.by_kind.iter_mut().zip(&other.reads.by_kind) {
            mine.0 += theirs.0;
            let _ = mine.1.add(&theirs.1);
        }
    }
}

/// The result of one run of a workload.
pub struct RunResult {
    pub tallies: Tallies,
    pub elapsed: Duration,
    /// Open loop: requests scheduled before the deadline that were never sent (the server was too
    /// slow to drain the backlog within the grace period).
    pub missed: u64,
}

pub struct Plan {
    pub mode: Mode,
    pub duration: Duration,
    pub max_requests: u64,
    pub addr: SocketAddr,
    /// Where requests tagged `read` go (mixed workloads; each client keeps a connection to both).
    pub read_addr: Option<SocketAddr>,
}

pub async fn run(plan: &Plan, workload: Arc<dyn Workload>) -> RunResult {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + plan.duration;
    let (clients, period, planned) = match plan.mode {
        Mode::Closed { clients } => (clients, None, plan.max_requests),
        Mode::Open { rate, clients } => {
            let planned = ((rate * plan.duration.as_secs_f64()) as u64).min(plan.max_requests);
            (clients, Some(Duration::from_secs_f64(1.0 / rate.max(0.001))), planned)
        }
    };
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (next, workload) = (next.clone(), workload.clone());
        let addrs = [plan.addr, plan.read_addr.unwrap_or(plan.addr)];
        tasks.push(tokio::spawn(async move {
            worker(addrs, workload, next, start, deadline, period, planned).await
        }));
    }
    let mut total = Tallies::new(workload.polls(), workload.options());
    for t in tasks {
        if let Ok(t) = t.await {
            total.merge(t);
        }
    }
    let elapsed = start.elapsed();
    let missed = if period.is_some() {
        planned.saturating_sub(total.sent)
    } else {
        0
    };
    RunResult {
        tallies: total,
        elapsed,
        missed,
    }
}

async fn worker(
    addrs: [SocketAddr; 2],
    workload: Arc<dyn Workload>,
    next: Arc<AtomicU64>,
    start: Instant,
    deadline: Instant,
    period: Option<Duration>,
    planned: u64,
) -> Tallies {
    let mut t = Tallies::new(workload.polls(), workload.options());
    // One connection per target: the workload's own, and the reads' (mixed workloads).
    let mut conns: [Option<Conn>; 2] = [None, None];
    let mut buf = Vec::with_capacity(512);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= planned {
            break;
        }
        // When the request should go out (open loop) or goes out (closed loop).
        let intended = match period {
            Some(p) => {
                let at = start + p.mul_f64(i as f64);
                if at >= deadline || Instant::now() > deadline + OPEN_LOOP_GRACE {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                now
            }
        };
        let tag = workload.build(i, &mut buf);
        let which = usize::from(tag.read);
        let conn = &mut conns[which];
        if conn.as_ref().is_none_or(Conn::is_closed) {
            match Conn::connect(addrs[which]).await {
                Ok(c) => *conn = Some(c),
                Err(_) => {
                    *t.errors.entry("connect".into()).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let answer = if tag.read {
            t.reads.sent += 1;
            tokio::time::timeout(REQUEST_TIMEOUT, c.send(&buf)).await
        } else {
            t.sent += 1;
            tokio::time::timeout(REQUEST_TIMEOUT, c.send(&buf)).await
        };
        let done = Instant::now();
        if tag.read {
            match answer {
                Ok(Ok(res)) if res.status == 200 => {
                    let us = done.duration_since(intended).as_micros().max(1) as u64;
                    let _ = t.reads.hist.record(us);
                    t.reads.ok += 1;
                    let kind = &mut t.reads.by_kind[usize::from(tag.read_kind.min(1))];
                    kind.0 += 1;
                    let _ = kind.1.record(us);
                }
                Ok(Ok(res)) => *t.errors.entry(format!("read {}", res.status)).or_default() += 1,
                Ok(Err(_)) => {
                    *t.errors.entry("read io".into()).or_default() += 1;
                    *conn = None;
                }
                Err(_) => {
                    *t.errors.entry("read timeout".into()).or_default() += 1;
                    *conn = None;
                }
            }
            continue;
        }
        match answer {
            Ok(Ok(res)) => {
                let _ = t.hist.record(done.duration_since(intended).as_micros().max(1) as u64);
                if res.status == workload.success() {
                    if res.replayed {
                        t.replayed += 1;
                    } else {
                        t.ok += 1;
                        t.last_ok = Some(done);
                        if let Some(row) = t.accepted.get_mut(tag.poll as usize)
                            && let Some(n) = row.get_mut(tag.option as usize)
                        {
                            *n += 1;
                        }
                    }
                } else if res.status == 409 && workload.conflicts_expected() {
                    t.conflicts += 1;
                } else {
                    *t.errors.entry(res.status.to_string()).or_default() += 1;
                    if res.status >= 500 {
                        // A 5xx ballot may have been stored (e.g. a timeout after the commit).
                        t.ambiguous += 1;
                    }
                }
            }
            Ok(Err(_)) => {
                *t.errors.entry("io".into()).or_default() += 1;
                t.ambiguous += 1;
                *conn = None;
            }
            Err(_) => {
                *t.errors.entry("timeout".into()).or_default() += 1;
                t.ambiguous += 1;
                *conn = None;
            }
        }
    }
    t
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}
