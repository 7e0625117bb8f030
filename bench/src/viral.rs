//! The `viral` scenario (issue 16): one poll with `dedupe: none` (every ballot counts) takes N
//! ballots at full speed from the usual closed-loop clients while live-results watchers (SSE) and
//! one reader polling `GET /api/polls/{id}` 20 times a second follow it, during the burst and for a
//! read phase after it. Measured: the ballot rate and latency; the reader's latency and statuses,
//! per phase; how late each watcher and the reader saw the final tally after the last acknowledged
//! ballot; the audit of the poll and its duration; the vote service's tally refresh time (its
//! `/metrics` histogram, when it has one); CPU of the services and of the database server (when its
//! pid is known) during the burst and the read phase.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use crate::http::{Conn, request};
use crate::load::{self, Latency, Plan};
use crate::scenarios::{self, Ballots};
use crate::{Bench, Probe, cpu_now, procs, scenario};

/// The vote service's histogram of tally refreshes (one per recomputation of a kept tally).
pub const REFRESH_METRIC: &str = "pollvote_tally_refresh_duration_seconds";
/// GETs per second of the reader.
pub const READ_RATE: f64 = 20.0;
/// A watcher or the reader that has not seen the final tally this long after the last
/// acknowledged ballot fails the run.
const SEE_FINAL_WITHIN: Duration = Duration::from_secs(30);
/// The burst's bound: it ends after its N ballots or after this long, whichever comes first.
const BURST_LIMIT: Duration = Duration::from_secs(30 * 60);
/// How long one GET of the reader may take before it counts as `timeout` (above the services' own
/// 10 s request timeout).
const READ_TIMEOUT: Duration = Duration::from_secs(12);

/// The reader's requests of one phase (latency from send; one request in flight, so a slow answer
/// delays the next read).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadPhase {
    pub requests: u64,
    /// 200 answers.
    pub ok: u64,
    /// 5xx answers.
    pub server_errors: u64,
    /// Every outcome but 200, by status (5xx included), plus `connect`, `io` and `timeout`.
    pub not_ok: BTreeMap<String, u64>,
    pub latency: Latency,
}

struct PhaseLog {
    hist: Histogram<u64>,
    requests: u64,
    ok: u64,
    server_errors: u64,
    not_ok: BTreeMap<String, u64>,
}

impl PhaseLog {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            requests: 0,
            ok: 0,
            server_errors: 0,
            not_ok: BTreeMap::new(),
        }
    }

    fn summary(&self) -> ReadPhase {
        ReadPhase {
            requests: self.requests,
            ok: self.ok,
            server_errors: self.server_errors,
            not_ok: self.not_ok.clone(),
            latency: Latency::of(&self.hist),
        }
    }
}

/// What the reader saw.
pub struct ReaderLog {
    burst: PhaseLog,
    after: PhaseLog,
    /// When an answer first showed a count of at least the final one.
    saw_final: Option<Instant>,
    last_count: Option<u64>,
}

/// The end of the burst, as the reader learns it: the final count and when the burst ended.
pub type BurstEnd = Option<(u64, Instant)>;

/// Reads `GET /api/polls/{id}` `READ_RATE` times a second until `after` past the end of the burst
/// (once it has seen the final count, or `SEE_FINAL_WITHIN` past the end at the latest). A
/// request sent before the end is known counts for the burst, the others for the read phase.
async fn read_poll(
    poll: SocketAddr,
    id: String,
    mut end: watch::Receiver<BurstEnd>,
    after: Duration,
    progress: bool,
) -> ReaderLog {
    let req = request("GET", poll, &format!("/api/polls/{id}"), &[], None);
    let mut log = ReaderLog {
        burst: PhaseLog::new(),
        after: PhaseLog::new(),
        saw_final: None,
        last_count: None,
    };
    // Counts seen, with when they were first seen (they only grow).
    let mut seen: Vec<(u64, Instant)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / READ_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let hard_stop = started + BURST_LIMIT + after + SEE_FINAL_WITHIN + Duration::from_secs(60);
    let mut next_progress = started + Duration::from_secs(10);
    let mut conn: Option<Conn> = None;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let ended = *end.borrow_and_update();
        if let Some((target, at)) = ended {
            if log.saw_final.is_none() {
                log.saw_final = seen.iter().find(|(c, _)| *c >= target).map(|&(_, t)| t);
            }
            if now >= at + after && (log.saw_final.is_some() || now >= at + SEE_FINAL_WITHIN) {
                break;
            }
        }
        if now >= hard_stop {
            break;
        }
        if progress && now >= next_progress {
            next_progress += Duration::from_secs(10);
            eprintln!(
                "   … {:.0} s: the reader sees {} ballots",
                started.elapsed().as_secs_f64(),
                log.last_count.map_or("?".into(), |c| c.to_string())
            );
        }
        let phase = if ended.is_some() {
            &mut log.after
        } else {
            &mut log.burst
        };
        phase.requests += 1;
        if conn.as_ref().is_none_or(Conn::is_closed) {
            match Conn::connect(poll).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    *phase.not_ok.entry("connect".into()).or_default() += 1;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent = Instant::now();
        let answer = tokio::time::timeout(READ_TIMEOUT, c.send(&req)).await;
        let done = Instant::now();
        match answer {
            Ok(Ok(res)) => {
                let _ = phase.hist.record(done.duration_since(sent).as_micros().max(1) as u64);
                if res.status == 200 {
                    phase.ok += 1;
                    if let Some(n) = scenarios::count_in(&res.body) {
                        log.last_count = Some(n);
                        if seen.last().is_none_or(|&(c, _)| n > c) {
                            seen.push((n, done));
                        }
                    }
                } else {
                    if res.status >= 500 {
                        phase.server_errors += 1;
                    }
                    *phase.not_ok.entry(res.status.to_string()).or_default() += 1;
                }
            }
            Ok(Err(_)) => {
                *phase.not_ok.entry("io".into()).or_default() += 1;
                conn = None;
            }
            Err(_) => {
                *phase.not_ok.entry("timeout".into()).or_default() += 1;
                conn = None;
            }
        }
    }
    if let (None, Some((target, _))) = (log.saw_final, *end.borrow()) {
        log.saw_final = seen.iter().find(|(c, _)| *c >= target).map(|&(_, t)| t);
    }
    log
}

/// A Prometheus histogram, all its series added up (buckets by `le`, cumulative).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound, cumulative count), by bound; the last is +Inf.
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let at = labels
        .match_indices(&key)
        .find(|(i, _)| *i == 0 || matches!(labels.as_bytes()[i - 1], b',' | b' ' | b'{'))?
        .0
        + key.len();
    let rest = &labels[at..];
    Some(&rest[..rest.find('"')?])
}

fn parse_bound(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "inf" | "+inf" => Some(f64::INFINITY),
        other => other.parse().ok(),
    }
}

impl HistogramSnapshot {
    /// The histogram `name` in a Prometheus (0.0.4) or OpenMetrics text exposition; `None` when
    /// it has no samples there.
    pub fn parse(text: &str, name: &str) -> Option<Self> {
        let mut h = Self::default();
        let mut found = false;
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some(rest) = line.strip_prefix(name) else { continue };
            let (suffix, rest) = rest.split_at(rest.find(['{', ' ']).unwrap_or(rest.len()));
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => match r.split_once('}') {
                    Some((l, v)) => (l, v),
                    None => continue,
                },
                None => ("", rest),
            };
            // The value is the first field after the name and labels (a timestamp or an
            // exemplar may follow).
            let Some(value) = value.split_whitespace().next().and_then(parse_bound) else {
                continue;
            };
            match suffix {
                "_bucket" => {
                    let Some(le) = label(labels, "le").and_then(parse_bound) else {
                        continue;
                    };
                    match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some((_, c)) => *c += value,
                        None => h.buckets.push((le, value)),
                    }
                    found = true;
                }
                "_sum" => {
                    h.sum += value;
                    found = true;
                }
                "_count" => {
                    h.count += value;
                    found = true;
                }
                _ => {}
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        found.then_some(h)
    }

    /// What was added since `earlier` (a scrape of the same process).
    pub fn since(&self, earlier: &Self) -> Self {
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, c)| {
                let before = earlier.buckets.iter().find(|(b, _)| *b == le).map_or(0.0, |x| x.1);
                (le, (c - before).max(0.0))
            })
            .collect();
        Self {
            buckets,
            sum: (self.sum - earlier.sum).max(0.0),
            count: (self.count - earlier.count).max(0.0),
        }
    }

    /// The `q` quantile as Prometheus' `histogram_quantile` estimates it: linear interpolation
    /// inside the bucket that holds it; the largest finite bound when it falls in +Inf.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map(|b| b.1).filter(|t| *t > 0.0)?;
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = cum - below;
                let frac = if inside > 0.0 { (rank - below) / inside } else { 1.0 };
                return Some(lower + (le - lower) * frac);
            }
            (lower, below) = (le, cum);
        }
        Some(lower)
    }
}

/// The histogram `name` from a service's `/metrics` (`Ok(None)` when it has none).
pub async fn scrape_histogram(addr: SocketAddr, name: &str) -> Result<Option<HistogramSnapshot>, String> {
    let mut conn = Conn::connect(addr).await.map_err(|e| e.to_string())?;
    let req = request("GET", addr, "/metrics", &[], None);
    let res = tokio::time::timeout(READ_TIMEOUT, conn.send(&req))
        .await
        .map_err(|_| "GET /metrics timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if res.status != 200 {
        return Err(format!("GET /metrics: {}", res.status));
    }
    Ok(HistogramSnapshot::parse(&String::from_utf8_lossy(&res.body), name))
}

/// The vote service's tally refreshes in a part of the scenario.
#[derive(Debug, Clone, Serialize)]
pub struct TallyRefresh {
    pub refreshes: u64,
    pub mean_ms: f64,
    /// Interpolated inside the histogram's buckets, so only as fine as they are.
    pub p99_ms: Option<f64>,
}

impl TallyRefresh {
    /// The refreshes between two scrapes; `None` without the metric or without a refresh.
    fn between(earlier: Option<&HistogramSnapshot>, later: Option<&HistogramSnapshot>) -> Option<Self> {
        let h = match (earlier, later?) {
            (Some(a), b) => b.since(a),
            (None, b) => b.clone(),
        };
        (h.count > 0.0).then(|| Self {
            refreshes: h.count as u64,
            mean_ms: h.sum / h.count * 1000.0,
            p99_ms: h.quantile(0.99).map(|s| s * 1000.0),
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} refreshes, mean {:.1} ms, p99 {}",
            self.refreshes,
            self.mean_ms,
            self.p99_ms.map_or("n/a".into(), |p| format!("{p:.1} ms"))
        )
    }
}

/// The vote service's refresh histogram now (`None`, with a warning, when `/metrics` fails).
async fn refresh_histogram(vote: SocketAddr, when: &str) -> Option<HistogramSnapshot> {
    match scrape_histogram(vote, REFRESH_METRIC).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("   warning: vote /metrics {when}: {e}");
            None
        }
    }
}

/// CPU seconds per second of wall time (1.0 = one core busy).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuShare {
    pub seconds: f64,
    pub poll: f64,
    pub vote: f64,
    /// The database server, when its pid was given (`--db-pid`).
    pub database: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Export {
    /// Lines (ballots) received.
    pub lines: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Both services' VmRSS just before the export, and the largest sampled every 20 ms during it.
    pub poll_rss_before_kib: u64,
    pub poll_rss_max_kib: u64,
    pub vote_rss_before_kib: u64,
    pub vote_rss_max_kib: u64,
}

/// Reads the admin's NDJSON export of the poll to its end over one HTTP/1.0 connection (so the
/// body is the rest of the stream, not chunked), counting its lines, while sampling both services'
/// memory.
async fn export(poll: SocketAddr, id: &str, token: &str, pids: (u32, u32)) -> Result<Export, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rss = |pid| crate::procs::memory(pid).rss_kib;
    let (poll_before, vote_before) = (rss(pids.0), rss(pids.1));
    let (stop, mut stopped) = watch::channel(false);
    let sampler = tokio::spawn(async move {
        let (mut p, mut v) = (0, 0);
        loop {
            p = p.max(rss(pids.0));
            v = v.max(rss(pids.1));
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stopped.changed() => return (p, v),
            }
        }
    });
    let started = Instant::now();
    let read = async {
        let mut conn = tokio::net::TcpStream::connect(poll).await.map_err(|e| e.to_string())?;
        let req = format!(
            "GET /api/polls/{id}/ballots HTTP/1.0\r\nHost: {poll}\r\nAuthorization: Bearer {token}\r\nAccept: application/x-ndjson\r\n\r\n"
        );
        conn.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 16];
        let (mut head, mut in_body, mut lines, mut bytes) = (Vec::new(), false, 0u64, 0u64);
        loop {
            let n = conn.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            let mut chunk = &buf[..n];
            if !in_body {
                head.extend_from_slice(chunk);
                let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
                    return Err(format!("export answered {}", String::from_utf8_lossy(&head[..end])));
                }
                in_body = true;
                let body = head.split_off(end + 4);
                lines += body.iter().filter(|b| **b == b'\n').count() as u64;
                bytes += body.len() as u64;
                chunk = &[];
            }
            lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            bytes += chunk.len() as u64;
        }
        Ok::<_, String>((lines, bytes))
    };
    let result = tokio::time::timeout(Duration::from_secs(600), read).await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    let (poll_max, vote_max) = sampler.await.unwrap_or_default();
    let (lines, bytes) = result.map_err(|_| "export took longer than 600 s".to_owned())??;
    Ok(Export {
        lines,
        bytes,
        seconds,
        poll_rss_before_kib: poll_before,
        poll_rss_max_kib: poll_max,
        vote_rss_before_kib: vote_before,
        vote_rss_max_kib: vote_max,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Viral {
    /// The poll's voting method (`--viral-method`).
    pub method: scenarios::Method,
    /// Ballots planned (`--viral-ballots`).
    pub ballots: u64,
    pub accepted: u64,
    pub burst_s: f64,
    pub ballots_per_s: f64,
    pub ballot_latency: Latency,
    pub watchers: usize,
    /// Watchers that received their first event before the burst started.
    pub watchers_connected: usize,
    pub watchers_saw_final: usize,
    pub watcher_failures: BTreeMap<String, u64>,
    /// From the last acknowledged ballot to a watcher seeing the final tally.
    pub watcher_lateness: Latency,
    pub reader_during_burst: ReadPhase,
    pub reader_after_burst: ReadPhase,
    /// The read phase after the burst, as planned (`--viral-read-after`).
    pub read_after_s: f64,
    /// From the last acknowledged ballot to the reader's first answer with the final tally.
    pub reader_lateness_ms: Option<f64>,
    /// The largest lateness of all watchers and the reader; `None` when one never saw it.
    pub max_lateness_ms: Option<f64>,
    /// Whether the audit answered, how long it took and what it said (also in the scenario's
    /// `invariants`).
    pub audit_s: Option<f64>,
    pub audit_consistent: Option<bool>,
    pub audit_error: Option<String>,
    /// The admin's export of every ballot (`GET /api/polls/{id}/ballots`, NDJSON) after the audit.
    pub export: Option<Export>,
    /// Whether the vote service's `/metrics` has `pollvote_tally_refresh_duration_seconds`.
    pub tally_refresh_metric: bool,
    /// Burst and read phase; `None`: the vote service has no such metric, or it saw no refresh
    /// (printed as n/a).
    pub tally_refresh: Option<TallyRefresh>,
    pub tally_refresh_burst: Option<TallyRefresh>,
    pub tally_refresh_read_phase: Option<TallyRefresh>,
    pub cpu_burst: CpuShare,
    pub cpu_read_phase: CpuShare,
}

fn db_cpu(pid: Option<u32>) -> Option<f64> {
    pid.map(procs::cpu_seconds)
}

fn share(seconds: f64, c0: crate::Cpu, c1: crate::Cpu, d0: Option<f64>, d1: Option<f64>) -> CpuShare {
    let s = seconds.max(1e-9);
    CpuShare {
        seconds,
        poll: (c1.poll_s - c0.poll_s) / s,
        vote: (c1.vote_s - c0.vote_s) / s,
        database: d0.zip(d1).map(|(a, b)| (b - a) / s),
    }
}

impl Bench {
    pub(crate) async fn viral(&mut self) -> Result<(), String> {
        let name = "viral";
        let ballots = self.args.viral_ballots;
        let n = self.args.viral_watchers;
        let after = self.args.viral_read_after;
        let db_pid = self.args.db_pid;
        let method = self.args.viral_method;
        let (id, admin_token) =
            scenarios::create_poll_with_token(self.poll.addr, "bench viral", "none", method).await?;
        let polls = vec![id.clone()];
        eprintln!(
            "== {name}: {ballots} {} ballots on one poll (dedupe none), {n} SSE watchers, a reader at {READ_RATE:.0} GET/s \
             (and for {:.0} s after the burst)",
            method.name(),
            after.as_secs_f64()
        );
        let ready = Arc::new(AtomicUsize::new(0));
        let (target_tx, target_rx) = watch::channel(None);
        let (end_tx, end_rx) = watch::channel::<BurstEnd>(None);
        let until = Instant::now() + BURST_LIMIT + SEE_FINAL_WITHIN + Duration::from_secs(120);
        let mut subs = Vec::with_capacity(n);
        for _ in 0..n {
            subs.push(tokio::spawn(scenarios::subscribe(
                self.poll.addr,
                None,
                None,
                id.clone(),
                ready.clone(),
                target_rx.clone(),
                until,
            )));
        }
        let connect_deadline = Instant::now() + Duration::from_secs(30);
        while ready.load(Ordering::Relaxed) < n
            && Instant::now() < connect_deadline
            && subs.iter().any(|s| !s.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let connected = ready.load(Ordering::Relaxed);
        eprintln!("   {connected} watchers receiving");
        if let Some(pid) = db_pid
            && !std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
        {
            eprintln!("   warning: --db-pid {pid}: no such process; the database's CPU is not measured");
        }
        let db_pid = db_pid.filter(|pid| std::path::Path::new(&format!("/proc/{pid}/stat")).exists());
        let refresh0 = refresh_histogram(self.vote.addr, "before the burst").await;
        let reader = tokio::spawn(read_poll(self.poll.addr, id.clone(), end_rx, after, !self.args.smoke));
        let probe = Probe::start(&self.poll, &self.vote);
        let (pid_poll, pid_vote) = (self.poll.pid, self.vote.pid);
        let (c0, d0) = (cpu_now(pid_poll, pid_vote), db_cpu(db_pid));
        let mode = self.closed();
        eprintln!("   burst: {}, {ballots} ballots", mode.describe());
        let plan = Plan {
            mode,
            duration: BURST_LIMIT,
            max_requests: ballots,
            addr: self.vote.addr,
            read_addr: None,
        };
        let w = Ballots::new(self.vote.addr, polls.clone(), &format!("{}-{name}", self.run_id), 0).with_method(method);
        let run = load::run(&plan, Arc::new(w)).await;
        let burst_end = Instant::now();
        let (c1, d1) = (cpu_now(pid_poll, pid_vote), db_cpu(db_pid));
        let refresh1 = refresh_histogram(self.vote.addr, "at the end of the burst").await;
        let final_count = run.tallies.ok;
        let last_ack = run.tallies.last_ok.unwrap_or(burst_end);
        let _ = target_tx.send(Some(final_count));
        let _ = end_tx.send(Some((final_count, burst_end)));
        let burst_s = run.elapsed.as_secs_f64();
        eprintln!(
            "   burst done: {final_count} accepted in {burst_s:.1} s; read phase {:.0} s",
            after.as_secs_f64()
        );
        tokio::time::sleep_until((burst_end + after).into()).await;
        let read_s = burst_end.elapsed().as_secs_f64();
        let (c2, d2) = (cpu_now(pid_poll, pid_vote), db_cpu(db_pid));
        let refresh2 = refresh_histogram(self.vote.addr, "at the end of the read phase").await;
        // Watchers: each has until SEE_FINAL_WITHIN after the last acknowledged ballot.
        let mut lateness = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        let mut saw_final = 0;
        let wait_deadline = last_ack.max(burst_end) + SEE_FINAL_WITHIN;
        for mut s in subs {
            let left = wait_deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, &mut s).await {
                Ok(Ok(sub)) => {
                    if let Some(at) = sub.saw_final {
                        saw_final += 1;
                        let _ = lateness.record(at.saturating_duration_since(last_ack).as_micros().max(1) as u64);
                    } else {
                        *failures.entry(sub.error.unwrap_or_default()).or_default() += 1;
                    }
                }
                Ok(Err(e)) => *failures.entry(e.to_string()).or_default() += 1,
                Err(_) => {
                    s.abort();
                    *failures
                        .entry("did not see the final tally in time".into())
                        .or_default() += 1;
                }
            }
        }
        let log = match tokio::time::timeout(SEE_FINAL_WITHIN + Duration::from_secs(10), reader).await {
            Ok(Ok(log)) => Some(log),
            _ => None,
        };
        let (cpu, poll_memory, vote_memory) = probe.finish().await;
        let tally_refresh_metric = refresh2.is_some();
        let tally_refresh = TallyRefresh::between(refresh0.as_ref(), refresh2.as_ref());
        let tally_refresh_burst = TallyRefresh::between(refresh0.as_ref(), refresh1.as_ref());
        let tally_refresh_read_phase = TallyRefresh::between(refresh1.as_ref(), refresh2.as_ref());
        let audit_start = Instant::now();
        let (invariants, audit_error) =
            match scenarios::audit(self.vote.addr, &polls, &run.tallies.accepted, run.tallies.ambiguous).await {
                Ok(i) => (Some(i), None),
                Err(e) => {
                    eprintln!(
                        "   audit failed after {:.1} s: {e}",
                        audit_start.elapsed().as_secs_f64()
                    );
                    (None, Some(e))
                }
            };

        let export = match export(self.poll.addr, &id, &admin_token, (pid_poll, pid_vote)).await {
            Ok(e) => {
                eprintln!(
                    "   export: {} lines, {:.1} MB in {:.1} s; peak RSS poll {:.1} MiB, vote {:.1} MiB",
                    e.lines,
                    e.bytes as f64 / 1e6,
                    e.seconds,
                    e.poll_rss_max_kib as f64 / 1024.0,
                    e.vote_rss_max_kib as f64 / 1024.0
                );
                Some(e)
            }
            Err(e) => {
                eprintln!("   export failed: {e}");
                None
            }
        };

        let mut s = scenario(
            name,
            "vote",
            mode,
            &run,
            cpu,
            poll_memory,
            vote_memory,
            invariants.clone(),
        );
        let watcher_lateness = Latency::of(&lateness);
        let reader_lateness_ms = log
            .as_ref()
            .and_then(|l| l.saw_final)
            .map(|at| at.saturating_duration_since(last_ack).as_secs_f64() * 1000.0);
        let everyone = saw_final == n && reader_lateness_ms.is_some();
        let max_lateness_ms = everyone.then(|| watcher_lateness.max_ms.max(reader_lateness_ms.unwrap_or(0.0)));
        let (rb, ra) = log
            .as_ref()
            .map(|l| (l.burst.summary(), l.after.summary()))
            .unwrap_or_default();
        let ms = |v: Option<f64>| v.map_or("never".to_owned(), |m| format!("{m:.0} ms"));
        eprintln!(
            "   {saw_final}/{n} watchers saw the final tally {final_count}: lateness p50 {:.0} ms, max {:.0} ms; \
             reader: {}",
            watcher_lateness.p50_ms,
            watcher_lateness.max_ms,
            ms(reader_lateness_ms)
        );
        for (phase, r) in [("burst", &rb), ("after", &ra)] {
            eprintln!(
                "   reader ({phase}): {} GETs, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} 5xx, not 200: {:?}",
                r.requests, r.latency.p50_ms, r.latency.p99_ms, r.latency.max_ms, r.server_errors, r.not_ok
            );
        }
        match &tally_refresh {
            Some(t) => eprintln!(
                "   tally refresh: {}; burst: {}; read phase: {}",
                t.describe(),
                tally_refresh_burst
                    .as_ref()
                    .map_or("none".into(), TallyRefresh::describe),
                tally_refresh_read_phase
                    .as_ref()
                    .map_or("none".into(), TallyRefresh::describe)
            ),
            None => eprintln!(
                "   tally refresh: n/a ({})",
                if tally_refresh_metric {
                    "no refresh during the scenario"
                } else {
                    "the vote service has no such metric"
                }
            ),
        }
        let cpu_burst = share(burst_s, c0, c1, d0, d1);
        let cpu_read_phase = share(read_s, c1, c2, d1, d2);
        eprintln!(
            "   CPU-s per s, burst / read phase: poll {:.2} / {:.2}, vote {:.2} / {:.2}, database {} / {}",
            cpu_burst.poll,
            cpu_read_phase.poll,
            cpu_burst.vote,
            cpu_read_phase.vote,
            cpu_burst.database.map_or("n/a".into(), |d| format!("{d:.2}")),
            cpu_read_phase.database.map_or("n/a".into(), |d| format!("{d:.2}"))
        );

        let f = &mut self.report.failures;
        if saw_final < n {
            f.push(format!(
                "{name}: {} of {n} watchers did not see the final tally: {failures:?}",
                n - saw_final
            ));
        }
        match &log {
            None => f.push(format!("{name}: the reader did not finish")),
            Some(l) if l.saw_final.is_none() => f.push(format!(
                "{name}: the reader did not see the final tally {final_count} within {} s (last seen: {:?})",
                SEE_FINAL_WITHIN.as_secs(),
                l.last_count
            )),
            Some(_) => {}
        }
        for (phase, r) in [("during the burst", &rb), ("after the burst", &ra)] {
            if !r.not_ok.is_empty() {
                f.push(format!(
                    "{name}: the reader's GET /api/polls/{{id}} {phase}: unexpected answers {:?}",
                    r.not_ok
                ));
            }
        }
        if let Some(e) = &audit_error {
            f.push(format!("{name}: audit: {e}"));
        }
        match &export {
            None => f.push(format!("{name}: the admin's ballot export failed")),
            Some(e) if e.lines != final_count => f.push(format!(
                "{name}: the admin's ballot export has {} lines for {final_count} accepted ballots",
                e.lines
            )),
            Some(_) => {}
        }
        if run.tallies.sent < ballots && run.tallies.errors.is_empty() {
            f.push(format!(
                "{name}: only {} of {ballots} ballots sent within {} min",
                run.tallies.sent,
                BURST_LIMIT.as_secs() / 60
            ));
        }
        s.viral = Some(Viral {
            method,
            ballots,
            accepted: final_count,
            burst_s,
            ballots_per_s: s.ok_per_s,
            ballot_latency: s.latency,
            watchers: n,
            watchers_connected: connected,
            watchers_saw_final: saw_final,
            watcher_failures: failures,
            watcher_lateness,
            reader_during_burst: rb,
            reader_after_burst: ra,
            read_after_s: after.as_secs_f64(),
            reader_lateness_ms,
            max_lateness_ms,
            audit_s: invariants.as_ref().map(|i| i.audit_s),
            audit_consistent: invariants.as_ref().map(|i| i.consistent),
            audit_error,
            export,
            tally_refresh_metric,
            tally_refresh,
            tally_refresh_burst,
            tally_refresh_read_phase,
            cpu_burst,
            cpu_read_phase,
        });
        self.add(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP pollvote_tally_refresh_duration_seconds Tally refreshes.
# TYPE pollvote_tally_refresh_duration_seconds histogram
pollvote_tally_refresh_duration_seconds_sum{service=\"vote\"} 0.5
pollvote_tally_refresh_duration_seconds_count{service=\"vote\"} 10
pollvote_tally_refresh_duration_seconds_bucket{le=\"0.01\",service=\"vote\"} 2
pollvote_tally_refresh_duration_seconds_bucket{le=\"0.1\",service=\"vote\"} 10
pollvote_tally_refresh_duration_seconds_bucket{le=\"+Inf\",service=\"vote\"} 10
pollvote_tally_refresh_duration_seconds_bucket{service=\"other\",le=\"0.01\",outcome=\"ok\"} 0
pollvote_tally_refresh_duration_seconds_bucket{service=\"other\",le=\"0.1\"} 0
pollvote_tally_refresh_duration_seconds_bucket{service=\"other\",le=\"+Inf\"} 0
pollvote_tally_refresh_duration_seconds_created{service=\"vote\"} 1700000000
http_server_request_duration_seconds_bucket{le=\"0.01\"} 99
";

    #[test]
    fn parses_and_estimates_a_histogram() {
        let h = HistogramSnapshot::parse(TEXT, REFRESH_METRIC).expect("found");
        assert_eq!(h.buckets, vec![(0.01, 2.0), (0.1, 10.0), (f64::INFINITY, 10.0)]);
        assert_eq!((h.sum, h.count), (0.5, 10.0));
        // Rank 9.9 of 10: inside (0.01, 0.1], 7.9 of its 8.
        let p99 = h.quantile(0.99).expect("p99");
        assert!((p99 - (0.01 + 0.09 * 7.9 / 8.0)).abs() < 1e-12, "{p99}");
        assert_eq!(h.quantile(0.1), Some(0.005));
        assert_eq!(
            HistogramSnapshot::parse("# nothing\nother_count 3\n", REFRESH_METRIC),
            None
        );
        let zero = h.since(&h);
        assert_eq!((zero.count, zero.quantile(0.99)), (0.0, None));
    }

    #[test]
    fn a_quantile_in_the_overflow_bucket_is_the_largest_bound() {
        let h = HistogramSnapshot {
            buckets: vec![(0.01, 1.0), (0.1, 1.0), (f64::INFINITY, 5.0)],
            sum: 9.0,
            count: 5.0,
        };
        assert_eq!(h.quantile(0.99), Some(0.1));
    }
}
