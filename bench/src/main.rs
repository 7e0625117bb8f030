//! `loadgen`: the load benchmark of the poll and vote services. `scripts/bench` builds the
//! binaries and runs it; see `loadgen --help`.

mod http;
mod load;
mod procs;
mod report;
mod scenarios;
mod storage;
mod viral;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use clap::builder::ArgGroup;
use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, Parser};
use serde::Serialize;
use tokio::sync::watch;

use crate::load::{Latency, Mode, Plan, RunResult, Workload};
use crate::procs::{Memory, Service, SpawnSpec};
use crate::scenarios::{Ballots, GetPath, GetRoot, Invariants, Mixed};
use crate::storage::{Backend, StoreReference};

/// Prose after the flags in `--help`.
const ABOUT_MORE: &str = "\
--backend mongodb: started services get MONGODB_CONNECTION_STRING and a fresh database bench_<run id>
(dropped at the end); store-raw measures the driver's insert_one (scratch database
bench_reference_<run id>) and MongoBallotStore::cast (bench_store_<run id>).

get-ceiling measures `GET /` of both services. watchers: beyond --watchers-per-source subscribers
they are spread over local source addresses 127.0.0.1, .2, … (one per 20,000 by default: the
ephemeral port range); loadgen and the poll service each need N + ~200 file descriptors.

reads: --clients clients read one poll (results always, 300 ballots) with `GET /api/polls/{id}`, no
If-None-Match: every answer must be a full 200. mixed: the viral profile from one pool of --clients
clients: 10 % ballots on one poll (dedupe none), 45 % `GET /api/polls/{id}` of that poll, 45 %
`GET /api/polls?limit=20`; reads/s and ballots/s with the p99 of each; any non-200 read is an error.
replacements: 400 ballots per client (at most 20,000; --smoke: 1,000) are cast on one poll (dedupe voter), then
--clients clients replace them round robin (`PUT /api/votes/{id}` with each ballot's receipt, a
new option every time); replacements/s against hot-poll's ballots/s; any non-200 is an error, and
the audit must be consistent with exactly the cast ballots stored.

viral: one poll with dedupe none takes --viral-ballots ballots as fast as --clients clients can send
them, while --viral-watchers SSE subscribers and one reader (GET /api/polls/{id}, 20 per second)
follow it, during the burst and for --viral-read-after seconds after it. Reported: ballots/s and
ballot latency; the reader's GET latency (p50/p99/max), 5xx and other non-200 answers, during and
after the burst; how late each watcher and the reader saw the final tally after the last
acknowledged ballot (max; goal <= 1 s; not within 30 s fails the run); the audit of the poll, its
duration and whether it is consistent; the vote service's tally refresh time (mean and p99 of the
`pollvote_tally_refresh_duration_seconds` histogram on its /metrics during the scenario, n/a
without it); CPU-seconds per second of poll, vote and (--db-pid) the database server, during the
burst and the read phase. It fails the run on a 5xx or any non-200 to the reader, a watcher or the
reader not seeing the final tally, or an audit that is inconsistent or differs from the accepted
count.

Exit code: 0 when every invariant holds and no unexpected status was seen, 1 otherwise, 2 on bad usage.";

/// loadgen: load benchmark of the poll and vote services
#[derive(Parser)]
#[command(
    name = "loadgen",
    args_override_self = true,
    allow_negative_numbers = true,
    after_help = ABOUT_MORE,
    override_usage = "\
loadgen --poll-bin PATH --vote-bin PATH --data-dir DIR [OPTIONS]
         (starts the services: fresh data directory, timed start-to-ready)
       loadgen --poll-url ADDR --poll-pid PID --vote-url ADDR --vote-pid PID [OPTIONS]
         (running services, started with RATE_LIMIT_PER_MINUTE=0; loopback addresses only)"
)]
#[command(group(ArgGroup::new("services").required(true).args(["poll_bin", "poll_url"])))]
struct Args {
    /// Start the poll service from this binary (with --vote-bin and --data-dir)
    #[arg(long, value_name = "PATH", requires_all = ["vote_bin", "data_dir"])]
    poll_bin: Option<PathBuf>,
    /// Start the vote service from this binary
    #[arg(long, value_name = "PATH", requires = "poll_bin")]
    vote_bin: Option<PathBuf>,
    /// Data directory of the started services
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Running poll service, host:port on loopback (with --poll-pid, --vote-url and --vote-pid)
    #[arg(long, value_name = "ADDR", value_parser = loopback, requires_all = ["poll_pid", "vote_url", "vote_pid"])]
    poll_url: Option<SocketAddr>,
    /// Process id of the running poll service
    #[arg(long, value_name = "PID", requires = "poll_url")]
    poll_pid: Option<u32>,
    /// Running vote service, host:port on loopback
    #[arg(long, value_name = "ADDR", value_parser = loopback, requires = "poll_url")]
    vote_url: Option<SocketAddr>,
    /// Process id of the running vote service
    #[arg(long, value_name = "PID", requires = "poll_url")]
    vote_pid: Option<u32>,
    /// Storage backend: embedded or mongodb
    #[arg(long, value_name = "NAME", default_value = "embedded")]
    backend: Backend,
    /// MongoDB server (needed with --backend mongodb); LOADGEN_MONGODB_URI keeps it out of the process list
    #[arg(long, value_name = "URI")]
    mongodb_uri: Option<String>,
    /// Comma-separated scenarios; `all` is every one but viral (--smoke: all,viral)
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set, default_value = "all",
        default_value_if("smoke", "true", "all,viral"),
        value_parser = ["all", "get-ceiling", "store-raw", "hot-poll", "hot-poll-open", "many-polls",
            "duplicates", "replacements", "reads", "mixed", "watchers", "viral"])]
    scenarios: Vec<String>,
    /// SSE subscribers of watchers
    #[arg(long, value_name = "N", default_value_t = 1000)]
    watchers: usize,
    /// Subscribers per local source address 127.0.0.x (0 counts as 1)
    #[arg(long = "watchers-per-source", value_name = "N", default_value_t = scenarios::SUBSCRIBERS_PER_SOURCE)]
    per_source: usize,
    /// Seconds per scenario; not viral, which runs to its ballot count (--smoke: 1.5)
    #[arg(long, value_name = "SECS", value_parser = secs, default_value = "10", default_value_if("smoke", "true", "1.5"))]
    duration: Duration,
    /// Concurrent clients
    #[arg(long, value_name = "N", default_value_t = 64)]
    clients: usize,
    /// Polls of many-polls
    #[arg(long, value_name = "N", default_value_t = 1000)]
    polls: usize,
    /// Ballots/s of hot-poll-open [default: 70 % of the hot-poll rate]
    #[arg(long, value_name = "N")]
    open_rate: Option<f64>,
    /// viral: ballots on its one poll (dedupe none), sent by --clients clients at full speed (--smoke: 20000)
    #[arg(
        long,
        value_name = "N",
        default_value = "1000000",
        default_value_if("smoke", "true", "20000")
    )]
    viral_ballots: u64,
    /// viral: the poll's voting method (choice: one of 3 options; ranked: a random full ranking of 8;
    /// score: 1 to 5 for one of 3 options)
    #[arg(long, value_name = "METHOD", default_value = "choice")]
    viral_method: scenarios::Method,
    /// viral: SSE subscribers of the poll's live results
    #[arg(long, value_name = "N", default_value_t = 200)]
    viral_watchers: usize,
    /// viral: seconds the reader (20 GET/s from the start of the burst) keeps reading after the last ballot (--smoke: 2)
    #[arg(long, value_name = "SECS", value_parser = secs, default_value = "10", default_value_if("smoke", "true", "2"))]
    viral_read_after: Duration,
    /// viral: the database server's process (same machine), for its CPU share
    #[arg(long, value_name = "PID")]
    db_pid: Option<u32>,
    /// Where the raw-store and fsync references put their temp files [default: --data-dir, else the temp dir]
    #[arg(long, value_name = "DIR")]
    scratch: Option<PathBuf>,
    /// Write PREFIX.json and PREFIX.md
    #[arg(long, value_name = "PREFIX")]
    out: Option<PathBuf>,
    /// Recorded in the result (e.g. the git commit)
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    label: Option<String>,
    /// Extra environment of started services, KEY=VALUE[,KEY=VALUE...]
    #[arg(long, value_name = "LIST", value_delimiter = ',', action = ArgAction::Set, value_parser = key_value)]
    service_env: Vec<(String, String)>,
    /// Short runs; only the invariants and error statuses decide the exit code
    #[arg(long)]
    smoke: bool,
}

fn secs(s: &str) -> Result<Duration, String> {
    s.parse()
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .ok_or_else(|| "expected a number of seconds >= 0".into())
}

fn key_value(kv: &str) -> Result<(String, String), String> {
    kv.split_once('=')
        .map(|(k, v)| (k.into(), v.into()))
        .ok_or_else(|| "expected KEY=VALUE".into())
}

fn loopback(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .map_err(|_| "expected host:port")?;
    if !a.ip().is_loopback() {
        return Err("not a loopback address (the load only targets loopback)".into());
    }
    Ok(a)
}

impl Args {
    /// [`Args::parse`] and what clap does not check: the MongoDB URI (LOADGEN_MONGODB_URI when no
    /// --mongodb-uri; the message never shows it).
    fn get() -> Self {
        let mut a = Self::parse();
        if a.backend == Backend::Mongodb && a.mongodb_uri.is_none() {
            a.mongodb_uri = std::env::var("LOADGEN_MONGODB_URI").ok().filter(|u| !u.is_empty());
        }
        let problem = match (a.backend, &a.mongodb_uri) {
            (Backend::Mongodb, None) => "--backend mongodb needs --mongodb-uri URI (or LOADGEN_MONGODB_URI)",
            (Backend::Embedded, Some(_)) => "--mongodb-uri goes with --backend mongodb",
            (_, Some(u)) if !(u.starts_with("mongodb://") || u.starts_with("mongodb+srv://")) => {
                "--mongodb-uri: must start with mongodb:// or mongodb+srv://"
            }
            _ => return a,
        };
        Self::command().error(ErrorKind::ArgumentConflict, problem).exit()
    }

    /// `--scenarios` asks for `name` (`all`: every one but viral, which takes about as long as
    /// all the others together).
    fn wants(&self, name: &str) -> bool {
        self.scenarios
            .iter()
            .any(|s| s == name || (s == "all" && name != "viral"))
    }

    fn scratch(&self) -> PathBuf {
        self.scratch
            .clone()
            .or(self.data_dir.clone())
            .unwrap_or_else(std::env::temp_dir)
    }
}

/// watchers: subscribers connecting at the same time (the rest wait for a permit).
const OPENING: usize = 64;
/// Ballots the `replacements` scenario casts first and then replaces, round robin (fewer with
/// few clients: 400 per client).
const REPLACED_BALLOTS: usize = 20_000;

#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    pub name: &'static str,
    /// From spawning the process to the first 200 from `/readyz` (when the benchmark started it).
    pub ready_ms: Option<f64>,
    /// One second after ready.
    pub idle: Memory,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServiceMemory {
    /// Largest VmRSS sampled every 50 ms during the scenario.
    pub peak_rss_kib: u64,
    /// VmHWM (peak since start) after the scenario.
    pub hwm_kib: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cpu {
    pub poll_s: f64,
    pub vote_s: f64,
    pub loadgen_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Watchers {
    pub subscribers: usize,
    /// Subscribers that received the first event before the load started.
    pub connected: usize,
    /// Subscribers that saw the final tally.
    pub saw_final: usize,
    pub final_count: u64,
    /// From the last acknowledged ballot to a subscriber seeing the final tally.
    pub lateness: Latency,
    pub failures: BTreeMap<String, u64>,
    pub events: u64,
    /// Poll-service CPU from the start of the load until every subscriber saw the final tally.
    pub poll_cpu_s: f64,
    pub poll_cpu_s_per_s: f64,
    /// Poll-service VmRSS before the subscribers connected, once all were receiving, and after
    /// every one saw the final tally (KiB).
    pub poll_rss_before_kib: u64,
    pub poll_rss_connected_kib: u64,
    pub poll_rss_after_kib: u64,
    /// (connected − before) ÷ receiving subscribers.
    pub rss_per_subscriber_kib: f64,
    /// Local source addresses the subscribers were spread over (one 127.0.0.x each).
    pub source_addresses: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub target: &'static str,
    pub mode: Mode,
    pub duration_s: f64,
    pub requests: u64,
    /// 200 for `GET /`; for ballots 201 without `Idempotent-Replayed`.
    pub ok: u64,
    pub replayed: u64,
    pub conflicts: u64,
    pub errors: BTreeMap<String, u64>,
    pub missed: u64,
    pub ok_per_s: f64,
    pub requests_per_s: f64,
    pub latency: Latency,
    pub poll_memory: ServiceMemory,
    pub vote_memory: ServiceMemory,
    pub cpu: Cpu,
    pub invariants: Option<Invariants>,
    pub watchers: Option<Watchers>,
    pub viral: Option<viral::Viral>,
    /// Mixed workloads (`mixed`): the reads, apart from the ballots above.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reads: Option<MixedReads>,
}

/// The reads of `mixed` (poll service, full 200 answers, no `If-None-Match`).
#[derive(Debug, Clone, Serialize)]
pub struct MixedReads {
    pub requests: u64,
    pub ok: u64,
    pub ok_per_s: f64,
    pub latency: Latency,
    /// `GET /api/polls/{id}` of the hot poll.
    pub poll_ok: u64,
    pub poll_latency: Latency,
    /// `GET /api/polls?limit=20`.
    pub list_ok: u64,
    pub list_latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub backend: &'static str,
    /// The MongoDB server, as its `buildInfo` describes it (never the URI).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_server: Option<String>,
    pub label: String,
    pub smoke: bool,
    pub started_at: String,
    pub machine: procs::Machine,
    pub clients: usize,
    pub duration_s: f64,
    pub services: Vec<ServiceInfo>,
    pub fsync_per_s: Option<f64>,
    /// The raw reference: `EmbeddedBallotStore::cast` (embedded) or the driver's `insert_one`
    /// (mongodb).
    pub store_reference: Option<StoreReference>,
    /// MongoDB only: `MongoBallotStore::cast` on the same server, for comparison with the driver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_cast_reference: Option<StoreReference>,
    pub scenarios: Vec<Scenario>,
    pub failures: Vec<String>,
}

impl Report {
    pub fn scenario(&self, name: &str) -> Option<&Scenario> {
        self.scenarios.iter().find(|s| s.name == name)
    }
}

/// Memory and CPU of both services (and this process) around a scenario.
struct Probe {
    cpu0: Cpu,
    stop: watch::Sender<bool>,
    sampler: tokio::task::JoinHandle<(u64, u64)>,
    pids: (u32, u32),
}

fn cpu_now(poll: u32, vote: u32) -> Cpu {
    Cpu {
        poll_s: procs::cpu_seconds(poll),
        vote_s: procs::cpu_seconds(vote),
        loadgen_s: procs::cpu_seconds(0),
    }
}

impl Probe {
    fn start(poll: &Service, vote: &Service) -> Self {
        let pids = (poll.pid, vote.pid);
        let (stop, mut stopped) = watch::channel(false);
        let sampler = tokio::spawn(async move {
            let (mut p, mut v) = (0, 0);
            // Bounded: stops when told, or after an hour at the latest.
            for _ in 0..72_000 {
                p = p.max(procs::memory(pids.0).rss_kib);
                v = v.max(procs::memory(pids.1).rss_kib);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stopped.changed() => break,
                }
            }
            p = p.max(procs::memory(pids.0).rss_kib);
            v = v.max(procs::memory(pids.1).rss_kib);
            (p, v)
        });
        Self {
            cpu0: cpu_now(pids.0, pids.1),
            stop,
            sampler,
            pids,
        }
    }

    async fn finish(self) -> (Cpu, ServiceMemory, ServiceMemory) {
        let c = cpu_now(self.pids.0, self.pids.1);
        let _ = self.stop.send(true);
        let (p, v) = self.sampler.await.unwrap_or_default();
        let cpu = Cpu {
            poll_s: c.poll_s - self.cpu0.poll_s,
            vote_s: c.vote_s - self.cpu0.vote_s,
            loadgen_s: c.loadgen_s - self.cpu0.loadgen_s,
        };
        let mem = |peak, pid| ServiceMemory {
            peak_rss_kib: peak,
            hwm_kib: procs::memory(pid).hwm_kib,
        };
        (cpu, mem(p, self.pids.0), mem(v, self.pids.1))
    }
}

struct Bench {
    args: Args,
    poll: Service,
    vote: Service,
    report: Report,
    run_id: String,
}

impl Bench {
    fn plan(&self, mode: Mode) -> Plan {
        Plan {
            mode,
            duration: self.args.duration,
            max_requests: 50_000_000,
            addr: self.vote.addr,
            read_addr: None,
        }
    }

    fn closed(&self) -> Mode {
        Mode::Closed {
            clients: self.args.clients,
        }
    }

    async fn measure(
        &self,
        name: &str,
        target: &'static str,
        mode: Mode,
        workload: Arc<dyn Workload>,
        polls: &[String],
    ) -> Result<Scenario, String> {
        self.measure_with(name, target, mode, workload, polls, None).await
    }

    /// [`Self::measure`]; requests tagged `read` go to `read_addr`.
    async fn measure_with(
        &self,
        name: &str,
        target: &'static str,
        mode: Mode,
        workload: Arc<dyn Workload>,
        polls: &[String],
        read_addr: Option<SocketAddr>,
    ) -> Result<Scenario, String> {
        eprintln!(
            "== {name}: {} for {:.1} s",
            mode.describe(),
            self.args.duration.as_secs_f64()
        );
        let probe = Probe::start(&self.poll, &self.vote);
        let mut plan = self.plan(mode);
        if target == "poll" {
            plan.addr = self.poll.addr;
        }
        plan.read_addr = read_addr;
        let run = load::run(&plan, workload).await;
        let (cpu, poll_memory, vote_memory) = probe.finish().await;
        let invariants = if polls.is_empty() {
            None
        } else {
            Some(scenarios::audit(self.vote.addr, polls, &run.tallies.accepted, run.tallies.ambiguous).await?)
        };
        Ok(scenario(
            name,
            target,
            mode,
            &run,
            cpu,
            poll_memory,
            vote_memory,
            invariants,
        ))
    }

    fn check_reference(&mut self, name: &str, r: &StoreReference) {
        eprintln!(
            "   {:.0} writes/s ({} writes, {} errors), p50 {:.2} ms, p99 {:.2} ms",
            r.writes_per_s, r.writes, r.errors, r.latency.p50_ms, r.latency.p99_ms
        );
        if !r.consistent {
            self.report.failures.push(format!(
                "{name}: {} failed writes{}, or what is stored differs from the {} acknowledged writes",
                r.errors,
                r.first_error
                    .as_deref()
                    .map_or(String::new(), |e| format!(" (first: {e})")),
                r.writes
            ));
        }
    }

    fn add(&mut self, s: Scenario) {
        let t = &s;
        eprintln!(
            "   {:.0} ok/s ({} ok, {} replayed, {} conflicts, {} errors), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            t.ok_per_s,
            t.ok,
            t.replayed,
            t.conflicts,
            t.errors.values().sum::<u64>(),
            t.latency.p50_ms,
            t.latency.p99_ms,
            t.latency.max_ms
        );
        if let Some(r) = &s.reads {
            eprintln!(
                "   reads: {:.0} ok/s ({} of {} ok), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                r.ok_per_s, r.ok, r.requests, r.latency.p50_ms, r.latency.p99_ms, r.latency.max_ms
            );
        }
        if !s.errors.is_empty() {
            self.report
                .failures
                .push(format!("{}: unexpected answers {:?}", s.name, s.errors));
        }
        if s.missed > 0 {
            self.report
                .failures
                .push(format!("{}: {} scheduled requests never sent", s.name, s.missed));
        }
        if let Some(inv) = &s.invariants
            && !inv.ok
        {
            self.report
                .failures
                .push(format!("{}: invariants violated: {}", s.name, inv.problems.join("; ")));
        }
        self.report.scenarios.push(s);
    }

    async fn hot_poll(&mut self, name: &str, mode: Mode) -> Result<(), String> {
        let polls = scenarios::create_polls(self.poll.addr, 1, &format!("bench {name}"), 1, "voter").await?;
        let w = Ballots::new(self.vote.addr, polls.clone(), &format!("{}-{name}", self.run_id), 0);
        let s = self.measure(name, "vote", mode, Arc::new(w), &polls).await?;
        self.add(s);
        Ok(())
    }

    /// `replacements`: ballots cast before the run replaced by their voters (`PUT /api/votes/{id}`
    /// with the receipt), round robin, as fast as the clients go: against hot-poll's new ballots,
    /// what a change costs.
    async fn replacements(&mut self) -> Result<(), String> {
        let name = "replacements";
        let polls = scenarios::create_polls(self.poll.addr, 1, "bench replacements", 1, "voter").await?;
        let n = if self.args.smoke {
            1000
        } else {
            REPLACED_BALLOTS.min(self.args.clients.max(1) * 400)
        };
        eprintln!("== {name}: casting {n} ballots to replace");
        let held = scenarios::cast_held(self.vote.addr, &polls[0], n, &format!("{}-{name}", self.run_id), 16).await?;
        let w = Arc::new(scenarios::Replacements::new(self.vote.addr, held));
        let mut s = self.measure(name, "vote", self.closed(), w, &[]).await?;
        s.invariants = Some(scenarios::audit_replaced(self.vote.addr, &polls[0], n as u64).await?);
        self.add(s);
        Ok(())
    }

    /// `reads`: every client reads one poll with a few hundred ballots (full answers).
    async fn reads(&mut self) -> Result<(), String> {
        let name = "reads";
        let polls = scenarios::create_polls(self.poll.addr, 1, "bench reads", 1, "voter").await?;
        let seed = Plan {
            mode: Mode::Closed { clients: 8 },
            duration: Duration::from_secs(30),
            max_requests: 300,
            addr: self.vote.addr,
            read_addr: None,
        };
        let w = Ballots::new(self.vote.addr, polls.clone(), &format!("{}-{name}", self.run_id), 0);
        let seeded = load::run(&seed, Arc::new(w)).await;
        if seeded.tallies.ok != 300 {
            return Err(format!(
                "reads: seeding 300 ballots: {} accepted, errors {:?}",
                seeded.tallies.ok, seeded.tallies.errors
            ));
        }
        let w = Arc::new(GetPath::new(self.poll.addr, &format!("/api/polls/{}", polls[0])));
        let s = self.measure(name, "poll", self.closed(), w, &[]).await?;
        self.add(s);
        Ok(())
    }

    /// `mixed`: the viral profile (90 % reads, 10 % ballots) from one client pool.
    async fn mixed(&mut self) -> Result<(), String> {
        let name = "mixed";
        let polls = scenarios::create_polls(self.poll.addr, 1, "bench mixed", 1, "none").await?;
        // A full page of the list: at least 20 polls exist by now in a full run; make sure.
        scenarios::create_polls(self.poll.addr, 20, "bench mixed list", 4, "none").await?;
        let w = Mixed::new(
            self.poll.addr,
            self.vote.addr,
            &polls[0],
            &format!("{}-{name}", self.run_id),
        );
        let s = self
            .measure_with(name, "vote", self.closed(), Arc::new(w), &polls, Some(self.poll.addr))
            .await?;
        if s.reads.as_ref().is_none_or(|r| r.ok == 0) || s.ok == 0 {
            self.report
                .failures
                .push("mixed: no successful read or no accepted ballot".into());
        }
        self.add(s);
        Ok(())
    }

    async fn watchers(&mut self) -> Result<(), String> {
        let name = "watchers";
        let polls = scenarios::create_polls(self.poll.addr, 1, "bench watchers", 1, "voter").await?;
        let n = self.args.watchers;
        // Descriptors: one per subscriber in loadgen and in the poll service, plus the load's
        // connections and some slack.
        let need = (n + self.args.clients + 200) as u64;
        let mine = procs::nofile(0);
        let theirs = procs::nofile(self.poll.pid);
        if let (Some(m), Some(t)) = (mine, theirs)
            && (m.0 < need || t.0 < need)
        {
            self.report.failures.push(format!(
                "watchers: {n} subscribers need about {need} file descriptors in loadgen and in the poll service; \
                 their limits are {} (hard {}) and {} (hard {}); raise the hard limit (ulimit -Hn, needs \
                 CAP_SYS_RESOURCE) or run fewer --watchers",
                m.0, m.1, t.0, t.1
            ));
            eprintln!(
                "== {name}: skipped: {}",
                self.report.failures.last().map_or("", |f| f.as_str())
            );
            return Ok(());
        }
        let sources = scenarios::source_addresses(self.poll.addr, n, self.args.per_source.max(1));
        eprintln!(
            "== {name}: {n} subscribers{}",
            if sources.len() > 1 {
                format!(" from {} local addresses", sources.len())
            } else {
                String::new()
            }
        );
        let rss_before = procs::memory(self.poll.pid).rss_kib;
        let ready = Arc::new(AtomicUsize::new(0));
        let (target_tx, target_rx) = watch::channel(None);
        // Subscribers give up 30 s after the load ends at the latest (see the deadline below).
        let until = Instant::now() + self.args.duration + Duration::from_secs(60);
        let mut subs = Vec::with_capacity(n);
        let opening = Arc::new(tokio::sync::Semaphore::new(OPENING));
        for k in 0..n {
            subs.push(tokio::spawn(scenarios::subscribe(
                self.poll.addr,
                sources.get(k % sources.len().max(1)).copied(),
                Some(opening.clone()),
                polls[0].clone(),
                ready.clone(),
                target_rx.clone(),
                until,
            )));
        }
        let connect_deadline = Instant::now() + Duration::from_secs(30);
        while ready.load(std::sync::atomic::Ordering::Relaxed) < n
            && Instant::now() < connect_deadline
            && subs.iter().any(|s| !s.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let connected = ready.load(std::sync::atomic::Ordering::Relaxed);
        let rss_connected = procs::memory(self.poll.pid).rss_kib;
        let per_sub = rss_connected.saturating_sub(rss_before) as f64 / connected.max(1) as f64;
        eprintln!(
            "   {connected} subscribers receiving; poll RSS {:.1} MiB before, {:.1} MiB now: {per_sub:.1} KiB per subscriber",
            rss_before as f64 / 1024.0,
            rss_connected as f64 / 1024.0
        );
        let w = Ballots::new(self.vote.addr, polls.clone(), &format!("{}-{name}", self.run_id), 0);
        let probe = Probe::start(&self.poll, &self.vote);
        let poll_cpu0 = self.poll.cpu_seconds();
        let load_start = Instant::now();
        let mode = self.closed();
        eprintln!(
            "   load: {} for {:.1} s",
            mode.describe(),
            self.args.duration.as_secs_f64()
        );
        let run = load::run(&self.plan(mode), Arc::new(w)).await;
        let final_count = run.tallies.ok;
        let last_ack = run.tallies.last_ok.unwrap_or_else(Instant::now);
        let _ = target_tx.send(Some(final_count));
        let mut lateness = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        let (mut saw_final, mut events) = (0, 0);
        let wait_deadline = Instant::now() + Duration::from_secs(30);
        for s in subs {
            let left = wait_deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, s).await {
                Ok(Ok(sub)) => {
                    events += sub.events;
                    if let Some(at) = sub.saw_final {
                        saw_final += 1;
                        let _ = lateness.record(at.saturating_duration_since(last_ack).as_micros().max(1) as u64);
                    } else {
                        *failures.entry(sub.error.unwrap_or_default()).or_default() += 1;
                    }
                }
                Ok(Err(e)) => *failures.entry(e.to_string()).or_default() += 1,
                Err(_) => *failures.entry("no answer in time".into()).or_default() += 1,
            }
        }
        let poll_cpu_s = self.poll.cpu_seconds() - poll_cpu0;
        let rss_after = procs::memory(self.poll.pid).rss_kib;
        let busy = load_start.elapsed().as_secs_f64();
        let (cpu, poll_memory, vote_memory) = probe.finish().await;
        let invariants = scenarios::audit(self.vote.addr, &polls, &run.tallies.accepted, run.tallies.ambiguous).await?;
        let mut s = scenario(
            name,
            "vote",
            mode,
            &run,
            cpu,
            poll_memory,
            vote_memory,
            Some(invariants),
        );
        let lat = Latency::of(&lateness);
        eprintln!(
            "   {saw_final}/{n} saw the final tally {final_count}; lateness p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; poll CPU {poll_cpu_s:.2} s",
            lat.p50_ms, lat.p99_ms, lat.max_ms
        );
        if saw_final < n {
            self.report.failures.push(format!(
                "watchers: {} of {n} subscribers did not see the final tally: {failures:?}",
                n - saw_final
            ));
        }
        s.watchers = Some(Watchers {
            subscribers: n,
            connected,
            saw_final,
            final_count,
            lateness: lat,
            failures,
            events,
            poll_cpu_s,
            poll_cpu_s_per_s: poll_cpu_s / busy,
            poll_rss_before_kib: rss_before,
            poll_rss_connected_kib: rss_connected,
            poll_rss_after_kib: rss_after,
            rss_per_subscriber_kib: per_sub,
            source_addresses: sources.len().max(1),
        });
        self.add(s);
        Ok(())
    }

    async fn run_all(&mut self) -> Result<(), String> {
        if self.args.wants("store-raw") {
            eprintln!("== fsync rate (write + fdatasync, 1 thread)");
            let r = storage::fsync_rate(&self.args.scratch(), self.args.duration.min(Duration::from_secs(3))).await?;
            eprintln!("   {r:.0}/s");
            self.report.fsync_per_s = Some(r);
            eprintln!(
                "== store-raw: {}, {} tasks for {:.1} s",
                match self.args.backend {
                    Backend::Embedded => "EmbeddedBallotStore::cast",
                    Backend::Mongodb => "driver insert_one",
                },
                self.args.clients,
                self.args.duration.as_secs_f64()
            );
            let r = storage::raw_write_rate(
                self.args.backend,
                &self.args.scratch(),
                self.args.mongodb_uri.as_deref(),
                &self.run_id,
                self.args.clients,
                self.args.duration,
            )
            .await?;
            self.check_reference("store-raw", &r);
            self.report.store_reference = Some(r);
            if let Some(uri) = self.args.mongodb_uri.clone() {
                eprintln!(
                    "== store-raw (information): MongoBallotStore::cast, {} tasks for {:.1} s",
                    self.args.clients,
                    self.args.duration.as_secs_f64()
                );
                let r =
                    storage::mongo_store_cast_rate(&uri, &self.run_id, self.args.clients, self.args.duration).await?;
                self.check_reference("store-raw (MongoBallotStore::cast)", &r);
                self.report.store_cast_reference = Some(r);
            }
        }
        if self.args.wants("get-ceiling") {
            let w = Arc::new(GetRoot::new(self.vote.addr));
            let s = self.measure("get-ceiling", "vote", self.closed(), w, &[]).await?;
            self.add(s);
            // The poll service's own ceiling: the reference of `reads`.
            let w = Arc::new(GetRoot::new(self.poll.addr));
            let s = self.measure("get-ceiling-poll", "poll", self.closed(), w, &[]).await?;
            self.add(s);
        }
        if self.args.wants("hot-poll") {
            self.hot_poll("hot-poll", self.closed()).await?;
        }
        if self.args.wants("hot-poll-open") {
            let rate = self.args.open_rate.or_else(|| {
                self.report
                    .scenario("hot-poll")
                    .map(|s| (s.ok_per_s * 0.7 / 100.0).round().max(1.0) * 100.0)
            });
            let rate = rate.unwrap_or(1000.0);
            let mode = Mode::Open {
                rate,
                clients: self.args.clients,
            };
            self.hot_poll("hot-poll-open", mode).await?;
        }
        if self.args.wants("many-polls") {
            let n = self.args.polls;
            eprintln!("== many-polls: creating {n} polls");
            let polls = scenarios::create_polls(self.poll.addr, n, "bench many-polls", 8, "voter").await?;
            let w = Ballots::new(self.vote.addr, polls.clone(), &format!("{}-many", self.run_id), 0);
            let s = self
                .measure("many-polls", "vote", self.closed(), Arc::new(w), &polls)
                .await?;
            self.add(s);
        }
        if self.args.wants("duplicates") {
            let polls = scenarios::create_polls(self.poll.addr, 1, "bench duplicates", 1, "voter").await?;
            let w = Ballots::new(self.vote.addr, polls.clone(), &format!("{}-dup", self.run_id), 30);
            let s = self
                .measure("duplicates", "vote", self.closed(), Arc::new(w), &polls)
                .await?;
            if s.conflicts + s.replayed == 0 && s.ok > 100 {
                self.report
                    .failures
                    .push("duplicates: no 409 and no replay seen: the workload did not repeat ballots".into());
            }
            self.add(s);
        }
        if self.args.wants("replacements") {
            self.replacements().await?;
        }
        if self.args.wants("reads") {
            self.reads().await?;
        }
        if self.args.wants("mixed") {
            self.mixed().await?;
        }
        if self.args.wants("watchers") {
            self.watchers().await?;
        }
        if self.args.wants("viral") {
            self.viral().await?;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn scenario(
    name: &str,
    target: &'static str,
    mode: Mode,
    run: &RunResult,
    cpu: Cpu,
    poll_memory: ServiceMemory,
    vote_memory: ServiceMemory,
    invariants: Option<Invariants>,
) -> Scenario {
    let t = &run.tallies;
    let secs = run.elapsed.as_secs_f64().max(1e-9);
    Scenario {
        name: name.to_owned(),
        target,
        mode,
        duration_s: secs,
        requests: t.sent,
        ok: t.ok,
        replayed: t.replayed,
        conflicts: t.conflicts,
        errors: t.errors.clone(),
        missed: run.missed,
        ok_per_s: t.ok as f64 / secs,
        requests_per_s: t.sent as f64 / secs,
        latency: Latency::of(&t.hist),
        poll_memory,
        vote_memory,
        cpu,
        invariants,
        watchers: None,
        viral: None,
        reads: (t.reads.sent > 0).then(|| MixedReads {
            requests: t.reads.sent,
            ok: t.reads.ok,
            ok_per_s: t.reads.ok as f64 / secs,
            latency: Latency::of(&t.reads.hist),
            poll_ok: t.reads.by_kind[0].0,
            poll_latency: Latency::of(&t.reads.by_kind[0].1),
            list_ok: t.reads.by_kind[1].0,
            list_latency: Latency::of(&t.reads.by_kind[1].1),
        }),
    }
}

/// The database both started services share on MongoDB (polls in `polls`, ballots in `ballots`).
fn services_database(run_id: &str) -> String {
    format!("bench_{run_id}")
}

async fn start_services(args: &Args, run_id: &str) -> Result<(Service, Service, Vec<ServiceInfo>), String> {
    let attach = (args.poll_url, args.poll_pid, args.vote_url, args.vote_pid);
    match ((&args.poll_bin, &args.vote_bin, &args.data_dir), attach) {
        ((Some(poll_bin), Some(vote_bin), Some(data_dir)), _) => {
            std::fs::create_dir_all(data_dir).map_err(|e| e.to_string())?;
            // MongoDB: one fresh database per run, so that runs never see each other's data.
            let storage_env: Vec<(String, String)> = match &args.mongodb_uri {
                Some(uri) => vec![
                    ("POLLVOTE__STORAGE__BACKEND".into(), "mongodb".into()),
                    ("MONGODB_CONNECTION_STRING".into(), uri.clone()),
                    ("POLLVOTE__STORAGE__DATABASE".into(), services_database(run_id)),
                ],
                None => Vec::new(),
            };
            let (poll_listener, pp) = procs::listener().map_err(|e| e.to_string())?;
            let (vote_listener, vp) = procs::listener().map_err(|e| e.to_string())?;
            let (poll, poll_ready) = Service::spawn(SpawnSpec {
                name: "poll",
                bin: poll_bin,
                listener: poll_listener,
                data_dir,
                env: [("VOTE_API".to_owned(), format!("http://127.0.0.1:{vp}"))]
                    .into_iter()
                    .chain(storage_env.iter().cloned())
                    .chain(args.service_env.iter().cloned())
                    .collect(),
            })
            .await?;
            let (vote, vote_ready) = Service::spawn(SpawnSpec {
                name: "vote",
                bin: vote_bin,
                listener: vote_listener,
                data_dir,
                env: [("POLL_API".to_owned(), format!("http://127.0.0.1:{pp}"))]
                    .into_iter()
                    .chain(storage_env.iter().cloned())
                    .chain(args.service_env.iter().cloned())
                    .collect(),
            })
            .await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let info = vec![
                ServiceInfo {
                    name: "poll",
                    ready_ms: Some(poll_ready.as_secs_f64() * 1000.0),
                    idle: poll.memory(),
                },
                ServiceInfo {
                    name: "vote",
                    ready_ms: Some(vote_ready.as_secs_f64() * 1000.0),
                    idle: vote.memory(),
                },
            ];
            Ok((poll, vote, info))
        }
        (_, (Some(pa), Some(pp), Some(va), Some(vp))) => {
            let poll = Service::attach("poll", pa, pp);
            let vote = Service::attach("vote", va, vp);
            let info = vec![
                ServiceInfo {
                    name: "poll",
                    ready_ms: None,
                    idle: poll.memory(),
                },
                ServiceInfo {
                    name: "vote",
                    ready_ms: None,
                    idle: vote.memory(),
                },
            ];
            Ok((poll, vote, info))
        }
        _ => Err("no services".into()),
    }
}

async fn main_async(args: Args) -> Result<Report, String> {
    let run_id = format!("{:x}", chrono::Utc::now().timestamp_micros());
    let database_server = match &args.mongodb_uri {
        Some(uri) => {
            let d = storage::server_description(uri).await?;
            eprintln!("MongoDB server: {d}");
            Some(d)
        }
        None => None,
    };
    // The services' database is ours to drop only when we started them.
    let own_database = match (&args.mongodb_uri, &args.poll_bin) {
        (Some(uri), Some(_)) => Some((uri.clone(), services_database(&run_id))),
        _ => None,
    };
    let started = start_services(&args, &run_id).await;
    let (poll, vote, services) = match started {
        Ok(s) => s,
        Err(e) => {
            if let Some((uri, name)) = &own_database {
                let _ = storage::drop_database(uri, name).await;
            }
            return Err(e);
        }
    };
    for s in &services {
        eprintln!(
            "{}: ready in {} ms, idle RSS {:.1} MiB",
            s.name,
            s.ready_ms.map_or("?".into(), |m| format!("{m:.1}")),
            s.idle.rss_kib as f64 / 1024.0
        );
    }
    let report = Report {
        backend: args.backend.name(),
        database_server,
        label: args.label.clone().unwrap_or_default(),
        smoke: args.smoke,
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: procs::machine(),
        clients: args.clients,
        duration_s: args.duration.as_secs_f64(),
        services,
        fsync_per_s: None,
        store_reference: None,
        store_cast_reference: None,
        scenarios: Vec::new(),
        failures: Vec::new(),
    };
    let mut bench = Bench {
        args,
        poll,
        vote,
        report,
        run_id,
    };
    let outcome = bench.run_all().await;
    for s in [&bench.poll, &bench.vote] {
        if s.log_lines() > 0 {
            eprintln!("{} logged warnings or errors; last lines:\n{}", s.name, s.log_tail());
        }
    }
    bench.poll.stop().await;
    bench.vote.stop().await;
    if let Some((uri, name)) = &own_database
        && let Err(e) = storage::drop_database(uri, name).await
    {
        bench.report.failures.push(e);
    }
    bench.report.machine.loadavg_after = procs::loadavg();
    if let Err(e) = outcome {
        bench.report.failures.push(format!("aborted: {e}"));
    }
    Ok(bench.report)
}

fn main() -> ExitCode {
    let args = Args::get();
    let out = args.out.clone();
    // Every subscriber and client connection is a descriptor here and in the services (which
    // inherit the limit): the soft limit goes up to the hard one.
    procs::raise_nofile();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match rt.block_on(main_async(args)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let md = report::markdown(&report);
    if let Some(prefix) = out {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        for (ext, text) in [("json", json + "\n"), ("md", md.clone())] {
            let path = prefix.with_extension(ext);
            if let Err(e) = std::fs::write(&path, text) {
                eprintln!("loadgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{md}");
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("loadgen: FAILED:");
        for f in &report.failures {
            eprintln!("  - {f}");
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Args::command().debug_assert();
    }
}
