//! The scenarios' workloads, their setup (polls) and the invariant check after each run.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::http::{Conn, request, write_request};
use crate::load::{Tag, Workload};

pub const OPTIONS: [&str; 3] = ["a", "b", "c"];
/// The options of a `ranked` poll of the viral scenario: full rankings of eight options, so that a
/// million ballots hold tens of thousands of distinct rankings (of 40,320).
pub const RANKED_OPTIONS: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

/// The voting method of the viral scenario's poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// One option per ballot.
    #[default]
    Choice,
    /// A full ranking of eight options per ballot, drawn at random.
    Ranked,
    /// A score from 1 to 5 for one option (0 for the others) per ballot.
    Score,
}

impl Method {
    pub fn options(self) -> &'static [&'static str] {
        match self {
            Self::Ranked => &RANKED_OPTIONS,
            _ => &OPTIONS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Choice => "choice",
            Self::Ranked => "ranked",
            Self::Score => "score",
        }
    }
}

/// splitmix64: a cheap, well-mixed hash for deterministic per-request choices.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `GET /`: the HTTP ceiling of a service.
pub struct GetRoot {
    req: Vec<u8>,
}

impl GetRoot {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            req: request("GET", addr, "/", &[], None),
        }
    }
}

impl Workload for GetRoot {
    fn build(&self, _i: u64, buf: &mut Vec<u8>) -> Tag {
        buf.clear();
        buf.extend_from_slice(&self.req);
        Tag::default()
    }
    fn polls(&self) -> usize {
        0
    }
    fn options(&self) -> usize {
        0
    }
    fn conflicts_expected(&self) -> bool {
        false
    }
    fn success(&self) -> u16 {
        200
    }
}

/// `GET` of one path: a poll read (`GET /api/polls/{id}`) without `If-None-Match`, so that every
/// answer is a full 200 (a 304 counts as an error).
pub struct GetPath {
    req: Vec<u8>,
}

impl GetPath {
    pub fn new(addr: SocketAddr, path: &str) -> Self {
        Self {
            req: request("GET", addr, path, &[], None),
        }
    }
}

impl Workload for GetPath {
    fn build(&self, _i: u64, buf: &mut Vec<u8>) -> Tag {
        buf.clear();
        buf.extend_from_slice(&self.req);
        Tag::default()
    }
    fn polls(&self) -> usize {
        0
    }
    fn options(&self) -> usize {
        0
    }
    fn conflicts_expected(&self) -> bool {
        false
    }
    fn success(&self) -> u16 {
        200
    }
}

/// The viral profile from one client pool: [`MIXED_BALLOT_PCT`] % ballots on the hot poll (one
/// poll, dedupe none, to the vote service), the rest reads of the poll service without
/// `If-None-Match` (tagged `read`), half `GET /api/polls/{id}` of the hot poll and half
/// `GET /api/polls?limit=20` (read kinds 0 and 1).
pub struct Mixed {
    vote: SocketAddr,
    poll_id: String,
    read_poll: Vec<u8>,
    read_list: Vec<u8>,
    run: String,
}

pub const MIXED_BALLOT_PCT: u64 = 10;

impl Mixed {
    pub fn new(poll: SocketAddr, vote: SocketAddr, poll_id: &str, run: &str) -> Self {
        Self {
            vote,
            poll_id: poll_id.to_owned(),
            read_poll: request("GET", poll, &format!("/api/polls/{poll_id}"), &[], None),
            read_list: request("GET", poll, "/api/polls?limit=20", &[], None),
            run: run.to_owned(),
        }
    }
}

impl Workload for Mixed {
    fn build(&self, i: u64, buf: &mut Vec<u8>) -> Tag {
        let roll = mix(i ^ 0x3c3c) % 200;
        if roll < 2 * MIXED_BALLOT_PCT {
            let option = (i % 3) as usize;
            let mut body = Vec::with_capacity(128);
            let _ = write!(
                body,
                r#"{{"poll_id":"{}","option":"{}","voter_id":"{}-{i}"}}"#,
                self.poll_id, OPTIONS[option], self.run
            );
            write_request(buf, "POST", self.vote, "/api/votes", &[], Some(&body));
            return Tag {
                poll: 0,
                option: option as u8,
                ..Tag::default()
            };
        }
        buf.clear();
        buf.extend_from_slice(if roll.is_multiple_of(2) {
            &self.read_poll
        } else {
            &self.read_list
        });
        Tag {
            read: true,
            read_kind: (roll % 2) as u8,
            ..Tag::default()
        }
    }
    fn polls(&self) -> usize {
        1
    }
    fn options(&self) -> usize {
        OPTIONS.len()
    }
    fn conflicts_expected(&self) -> bool {
        false
    }
    fn success(&self) -> u16 {
        201
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fresh,
    /// Same voter as an earlier ballot, another option, no idempotency key: 409.
    Repeat(u64),
    /// The earlier request again, byte for byte, with its idempotency key: a replay.
    Retry(u64),
}

/// Ballots (`POST /api/votes`), each from a distinct voter (`dedupe: voter`), over one or many
/// polls; optionally a share of them repeats or retries an earlier ballot.
pub struct Ballots {
    addr: SocketAddr,
    polls: Vec<String>,
    /// Distinguishes voter ids of different runs.
    run: String,
    /// Percentage of ballots that repeat or retry an earlier one (half each).
    duplicate_pct: u64,
    method: Method,
}

impl Ballots {
    pub fn new(addr: SocketAddr, polls: Vec<String>, run: &str, duplicate_pct: u64) -> Self {
        Self {
            addr,
            polls,
            run: run.to_owned(),
            duplicate_pct,
            method: Method::Choice,
        }
    }

    /// Ballots in `method`'s shape (the polls must have that method and its options).
    pub fn with_method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// The marks of ballot `voter` choosing `option` first, as JSON fields after `poll_id`.
    fn marks(&self, voter: u64, option: usize, body: &mut Vec<u8>) {
        match self.method {
            Method::Choice => {
                let _ = write!(body, r#""option":"{}""#, OPTIONS[option]);
            }
            Method::Score => {
                let _ = write!(body, r#""scores":{{"{}":{}}}"#, OPTIONS[option], 1 + voter % 5);
            }
            Method::Ranked => {
                // A permutation drawn from the voter's number, `option` first.
                let mut rest: Vec<usize> = (0..RANKED_OPTIONS.len()).filter(|&o| o != option).collect();
                let mut x = mix(voter ^ 0x7777);
                for k in (1..rest.len()).rev() {
                    rest.swap(k, (x % (k as u64 + 1)) as usize);
                    x = mix(x);
                }
                let _ = write!(body, r#""ranking":["{}""#, RANKED_OPTIONS[option]);
                for o in rest {
                    let _ = write!(body, r#","{}""#, RANKED_OPTIONS[o]);
                }
                body.push(b']');
            }
        }
    }

    fn kind(&self, i: u64) -> Kind {
        if self.duplicate_pct == 0 || i == 0 {
            return Kind::Fresh;
        }
        let roll = mix(i ^ 0x5555) % 100;
        if roll >= self.duplicate_pct {
            return Kind::Fresh;
        }
        // An earlier fresh ballot: usually a recent one (a client retrying), sometimes any.
        let back = 1 + mix(i ^ 0xaaaa) % i.min(256);
        let mut j = i - back;
        for _ in 0..64 {
            if self.fresh(j) {
                return if roll < self.duplicate_pct / 2 {
                    Kind::Repeat(j)
                } else {
                    Kind::Retry(j)
                };
            }
            if j == 0 {
                break;
            }
            j -= 1;
        }
        Kind::Fresh
    }

    fn fresh(&self, j: u64) -> bool {
        j == 0 || self.duplicate_pct == 0 || mix(j ^ 0x5555) % 100 >= self.duplicate_pct
    }

    fn poll_of(&self, i: u64) -> usize {
        if self.polls.len() <= 1 {
            0
        } else {
            (mix(i) % self.polls.len() as u64) as usize
        }
    }
}

impl Workload for Ballots {
    fn build(&self, i: u64, buf: &mut Vec<u8>) -> Tag {
        let n = self.options() as u64;
        let (voter, option, idem) = match self.kind(i) {
            Kind::Fresh => (i, (mix(i ^ 0x1234) % n) as usize, self.duplicate_pct > 0),
            Kind::Repeat(j) => (j, ((mix(j ^ 0x1234) + 1) % n) as usize, false),
            Kind::Retry(j) => (j, (mix(j ^ 0x1234) % n) as usize, true),
        };
        let poll = self.poll_of(voter);
        let mut body = Vec::with_capacity(160);
        let _ = write!(body, r#"{{"poll_id":"{}","#, self.polls[poll]);
        self.marks(voter, option, &mut body);
        let _ = write!(body, r#","voter_id":"{}-{voter}"}}"#, self.run);
        let key = format!("{}-k{voter}", self.run);
        let headers: &[(&str, &str)] = if idem { &[("idempotency-key", &key)] } else { &[] };
        write_request(buf, "POST", self.addr, "/api/votes", headers, Some(&body));
        Tag {
            poll: poll as u32,
            option: option as u8,
            ..Tag::default()
        }
    }
    fn polls(&self) -> usize {
        self.polls.len()
    }
    fn options(&self) -> usize {
        self.method.options().len()
    }
    fn conflicts_expected(&self) -> bool {
        self.duplicate_pct > 0
    }
    fn success(&self) -> u16 {
        201
    }
}

/// Replacements of ballots cast before the run (`PUT /api/votes/{id}` with each ballot's
/// receipt, a `choice` poll of options a, b, c), round robin over the ballots: request `i` gives
/// ballot `i mod n` the option after the one it gave it last time, so every request changes the
/// ballot (never a no-op) and no two requests in flight touch one ballot unless the clients
/// outnumber the ballots.
pub struct Replacements {
    addr: SocketAddr,
    /// (ballot id, receipt)
    held: Vec<(String, String)>,
}

impl Replacements {
    pub fn new(addr: SocketAddr, held: Vec<(String, String)>) -> Self {
        Self { addr, held }
    }
}

impl Workload for Replacements {
    fn build(&self, i: u64, buf: &mut Vec<u8>) -> Tag {
        let n = self.held.len() as u64;
        let (id, receipt) = &self.held[(i % n) as usize];
        // Cast with option a (0); round r of replacements gives option (r + 1) mod 3.
        let option = ((i / n + 1) % 3) as usize;
        let body = format!(r#"{{"option":"{}"}}"#, OPTIONS[option]);
        let auth = format!("Bearer {receipt}");
        write_request(
            buf,
            "PUT",
            self.addr,
            &format!("/api/votes/{id}"),
            &[("authorization", &auth)],
            Some(body.as_bytes()),
        );
        Tag::default()
    }
    fn polls(&self) -> usize {
        0
    }
    fn options(&self) -> usize {
        0
    }
    fn conflicts_expected(&self) -> bool {
        false
    }
    fn success(&self) -> u16 {
        200
    }
}

/// Casts `n` ballots for option a on `poll` (`dedupe: voter`) over `parallel` connections: each
/// ballot's id and receipt, for [`Replacements`].
pub async fn cast_held(
    vote: SocketAddr,
    poll: &str,
    n: usize,
    run: &str,
    parallel: usize,
) -> Result<Vec<(String, String)>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.clamp(1, n.max(1)) {
        let (next, poll, run) = (next.clone(), poll.to_owned(), run.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(vote).await.map_err(|e| e.to_string())?;
            let mut held = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    return Ok::<_, String>(held);
                }
                let body =
                    serde_json::json!({"poll_id": poll, "option": OPTIONS[0], "voter_id": format!("{run}-h{k}")});
                let req = request("POST", vote, "/api/votes", &[], Some(body.to_string().as_bytes()));
                let (status, v) = json_call(&mut conn, &req).await?;
                match (status, v["id"].as_str(), v["receipt"].as_str()) {
                    (201, Some(id), Some(receipt)) => held.push((id.to_owned(), receipt.to_owned())),
                    _ => return Err(format!("casting a ballot to replace: {status} {v}")),
                }
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    Ok(all)
}

/// The invariants after replacements of `ballots` ballots of `poll`: the vote service's audit is
/// consistent (tally = recount of the stored ballots) and there are still exactly `ballots`.
pub async fn audit_replaced(vote: SocketAddr, poll: &str, ballots: u64) -> Result<Invariants, String> {
    let start = Instant::now();
    let v = fetch_audits(vote, &[poll.to_owned()]).await?.remove(0);
    let total = |t: &Value| t["total"].as_u64().unwrap_or(u64::MAX);
    let (tallied, stored) = (total(&v["tally"]), total(&v["stored"]));
    let consistent = v["consistent"] == Value::Bool(true);
    let mut problems = Vec::new();
    if !consistent || tallied != stored {
        problems.push(format!("poll {poll}: tally {} != stored {}", v["tally"], v["stored"]));
    }
    if stored != ballots {
        problems.push(format!(
            "poll {poll}: {stored} ballots stored, {ballots} cast and only replaced"
        ));
    }
    Ok(Invariants {
        polls_checked: 1,
        accepted: ballots,
        stored,
        tallied,
        ok: problems.is_empty(),
        consistent,
        problems,
        audit_s: start.elapsed().as_secs_f64(),
    })
}

async fn json_call(conn: &mut Conn, req: &[u8]) -> Result<(u16, Value), String> {
    let res = conn.send(req).await.map_err(|e| e.to_string())?;
    let v = serde_json::from_slice(&res.body).unwrap_or(Value::Null);
    Ok((res.status, v))
}

/// Creates `n` polls (options a, b, c; `dedupe` as given: `voter`, or `none` so that every ballot
/// counts) over `parallel` connections.
pub async fn create_polls(
    poll: SocketAddr,
    n: usize,
    label: &str,
    parallel: usize,
    dedupe: &'static str,
) -> Result<Vec<String>, String> {
    create_polls_of(poll, n, label, parallel, dedupe, Method::Choice).await
}

/// One poll with a voting method (and its options): its id and admin token.
pub async fn create_poll_with_token(
    poll: SocketAddr,
    label: &str,
    dedupe: &'static str,
    method: Method,
) -> Result<(String, String), String> {
    let mut conn = Conn::connect(poll).await.map_err(|e| e.to_string())?;
    let mut body = serde_json::json!({ "name": label, "options": method.options(), "dedupe": dedupe });
    if method != Method::Choice {
        body["method"] = method.name().into();
    }
    let req = request("POST", poll, "/api/polls", &[], Some(body.to_string().as_bytes()));
    let (status, v) = json_call(&mut conn, &req).await?;
    match (status, v["id"].as_str(), v["admin_token"].as_str()) {
        (201, Some(id), Some(token)) => Ok((id.to_owned(), token.to_owned())),
        _ => Err(format!("creating a poll: {status} {v}")),
    }
}

/// [`create_polls`] with a voting method (and its options, [`Method::options`]).
pub async fn create_polls_of(
    poll: SocketAddr,
    n: usize,
    label: &str,
    parallel: usize,
    dedupe: &'static str,
    method: Method,
) -> Result<Vec<String>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.clamp(1, n.max(1)) {
        let (next, label) = (next.clone(), label.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(poll).await.map_err(|e| e.to_string())?;
            let mut made = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    return Ok::<_, String>(made);
                }
                let mut body = serde_json::json!({
                    "name": format!("{label} {k}"),
                    "options": method.options(),
                    "dedupe": dedupe,
                });
                // Only when not the default: a service that predates methods takes these polls too.
                if method != Method::Choice {
                    body["method"] = method.name().into();
                }
                let req = request("POST", poll, "/api/polls", &[], Some(body.to_string().as_bytes()));
                let (status, v) = json_call(&mut conn, &req).await?;
                if status != 201 {
                    return Err(format!("creating a poll: {status} {v}"));
                }
                let id = v["id"].as_str().ok_or("created poll without id")?.to_owned();
                made.push((k, id));
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    all.sort();
    Ok(all.into_iter().map(|(_, id)| id).collect())
}

/// Invariant check of one run: for every poll, the maintained tally equals the recount of stored
/// ballots (the vote service's audit), and both equal the ballots the load generator saw
/// accepted.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Invariants {
    pub polls_checked: usize,
    pub accepted: u64,
    pub stored: u64,
    pub tallied: u64,
    pub ok: bool,
    /// Every audit answered `consistent: true` (maintained tally = recount of stored ballots).
    pub consistent: bool,
    pub problems: Vec<String>,
    /// How long reading the audits took (they read every stored ballot of each poll).
    pub audit_s: f64,
}

/// Polls per `GET /internal/audit?ids=…` (the vote service's limit): each request reads the
/// ballots of all its polls in one pass, which matters on servers that scan the whole collection
/// for any query but by `_id` (FerretDB's SQLite backend).
const AUDIT_BATCH: usize = 200;

/// The vote service's audit of every poll, in the order of `polls`.
async fn fetch_audits(vote: SocketAddr, polls: &[String]) -> Result<Vec<Value>, String> {
    let mut conn = Conn::connect(vote).await.map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(polls.len());
    for chunk in polls.chunks(AUDIT_BATCH) {
        let req = request(
            "GET",
            vote,
            &format!("/internal/audit?ids={}", chunk.join(",")),
            &[],
            None,
        );
        let (status, v) = json_call(&mut conn, &req).await?;
        if status != 200 {
            return Err(format!("audit of {} polls: {status} {v}", chunk.len()));
        }
        let mut by_poll: std::collections::HashMap<&str, &Value> = v["audits"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| Some((x["poll_id"].as_str()?, x))).collect())
            .unwrap_or_default();
        for poll in chunk {
            match by_poll.remove(poll.as_str()) {
                Some(a) => out.push(a.clone()),
                None => return Err(format!("audit: no answer for poll {poll}: {v}")),
            }
        }
    }
    Ok(out)
}

pub async fn audit(
    vote: SocketAddr,
    polls: &[String],
    accepted: &[Vec<u64>],
    ambiguous: u64,
) -> Result<Invariants, String> {
    let start = Instant::now();
    let answers = fetch_audits(vote, polls).await?;
    let mut inv = Invariants {
        polls_checked: polls.len(),
        ok: true,
        consistent: true,
        ..Invariants::default()
    };
    let counts = |v: &Value| -> (u64, Vec<u64>) {
        let total = v["total"].as_u64().unwrap_or(u64::MAX);
        let by: Vec<u64> = v["by_option"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(u64::MAX)).collect())
            .unwrap_or_default();
        (total, by)
    };
    for ((poll, expected), v) in polls.iter().zip(accepted).zip(answers) {
        let (tally_total, mut tally_by) = counts(&v["tally"]);
        let (stored_total, mut stored_by) = counts(&v["stored"]);
        let mut expected_by = expected.clone();
        let n = tally_by.len().max(stored_by.len()).max(expected_by.len());
        for by in [&mut tally_by, &mut stored_by, &mut expected_by] {
            by.resize(n, 0);
        }
        let expected_total: u64 = expected.iter().sum();
        inv.accepted += expected_total;
        inv.stored += stored_total;
        inv.tallied += tally_total;
        if v["consistent"] != Value::Bool(true) {
            inv.consistent = false;
        }
        if v["consistent"] != Value::Bool(true) || tally_total != stored_total || tally_by != stored_by {
            inv.problems.push(format!(
                "poll {poll}: tally {tally_total} {tally_by:?} != stored {stored_total} {stored_by:?}"
            ));
        }
        // With requests that got no answer, each may or may not have been stored.
        if ambiguous == 0 && (stored_total != expected_total || stored_by != expected_by) {
            inv.problems.push(format!(
                "poll {poll}: stored {stored_total} {stored_by:?} != accepted {expected_total} {expected_by:?}"
            ));
        }
    }
    if ambiguous > 0 && (inv.stored < inv.accepted || inv.stored > inv.accepted + ambiguous) {
        inv.problems.push(format!(
            "stored {} is outside accepted {} + up to {ambiguous} unanswered",
            inv.stored, inv.accepted
        ));
    }
    inv.problems.truncate(20);
    inv.ok = inv.problems.is_empty();
    inv.audit_s = start.elapsed().as_secs_f64();
    eprintln!(
        "   audit of {} poll{}: {:.1} s",
        polls.len(),
        if polls.len() == 1 { "" } else { "s" },
        inv.audit_s
    );
    Ok(inv)
}

/// One live-results subscriber: how late it saw the final tally.
pub struct Subscriber {
    /// When the subscriber first saw a count at least the target.
    pub saw_final: Option<Instant>,
    pub events: u64,
    pub error: Option<String>,
}

/// `"votes":{"count":N` in a poll's JSON.
pub fn count_in(data: &[u8]) -> Option<u64> {
    const NEEDLE: &[u8] = br#""votes":{"count":"#;
    let at = data.windows(NEEDLE.len()).position(|w| w == NEEDLE)? + NEEDLE.len();
    let digits: &[u8] = &data[at..];
    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// Subscribers per local source address: one address has the ephemeral port range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 28,232 ports by default) for its connections to one
/// server address.
pub const SUBSCRIBERS_PER_SOURCE: usize = 20_000;

/// The local addresses `n` subscribers to `server` are spread over: none (the kernel's choice)
/// up to `per_source` (normally [`SUBSCRIBERS_PER_SOURCE`]), else 127.0.0.1, 127.0.0.2, … (all of
/// 127/8 is loopback on Linux) for an IPv4 loopback server.
pub fn source_addresses(server: SocketAddr, n: usize, per_source: usize) -> Vec<std::net::IpAddr> {
    if n <= per_source || !matches!(server.ip(), std::net::IpAddr::V4(ip) if ip.is_loopback()) {
        return Vec::new();
    }
    let k = n.div_ceil(per_source.max(1)).min(254);
    (1..=k as u8)
        .map(|i| std::net::Ipv4Addr::new(127, 0, 0, i).into())
        .collect()
}

/// Subscribes to the poll's results stream (from the local address `source`, if given; opening
/// under a permit of `opening`, if given, i.e. with a bounded number of connects in flight); counts in `ready` once the first event arrived; then
/// reads until it has seen a count of at least the target (once the target is known) or `until`.
pub async fn subscribe(
    poll: SocketAddr,
    source: Option<std::net::IpAddr>,
    opening: Option<Arc<tokio::sync::Semaphore>>,
    id: String,
    ready: Arc<AtomicUsize>,
    mut target: watch::Receiver<Option<u64>>,
    until: Instant,
) -> Subscriber {
    let mut out = Subscriber {
        saw_final: None,
        events: 0,
        error: None,
    };
    let fail = |mut out: Subscriber, e: String| {
        out.error = Some(e);
        out
    };
    let req = request(
        "GET",
        poll,
        &format!("/api/polls/{id}/results/stream"),
        &[("accept", "text/event-stream")],
        None,
    );
    // At most `opening` subscribers connect at a time: thousands of SYNs at once overflow the
    // server's accept queue (a listen backlog of 128), which is a connect storm, not fan-out.
    let permit = match &opening {
        Some(sem) => sem.clone().acquire_owned().await.ok(),
        None => None,
    };
    let conn = match Conn::connect_from(poll, source).await {
        Ok(c) => c,
        Err(e) => return fail(out, format!("connect: {e}")),
    };
    let mut stream = match conn.open_stream(&req).await {
        Ok((200, s)) => s,
        Ok((status, _)) => return fail(out, format!("status {status}")),
        Err(e) => return fail(out, format!("open: {e}")),
    };
    drop(permit);
    // Counts seen, with when they were first seen (monotonic, so a short list).
    let mut seen: Vec<(u64, Instant)> = Vec::new();
    loop {
        if let Some(t) = *target.borrow_and_update()
            && let Some(&(_, at)) = seen.iter().find(|(c, _)| *c >= t)
        {
            out.saw_final = Some(at);
            return out;
        }
        if Instant::now() >= until {
            return fail(out, "did not see the final tally in time".into());
        }
        let line = match tokio::time::timeout(Duration::from_millis(50), stream.next_line()).await {
            Err(_) => continue,
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return fail(out, "stream ended".into()),
            Ok(Err(e)) => return fail(out, format!("read: {e}")),
        };
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        if let Some(count) = count_in(data) {
            out.events += 1;
            if out.events == 1 {
                ready.fetch_add(1, Ordering::Relaxed);
            }
            if seen.last().is_none_or(|&(c, _)| count > c) {
                seen.push((count, Instant::now()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_many_subscribers_over_loopback_sources() {
        let server: SocketAddr = ([127, 0, 0, 1], 80).into();
        let per = SUBSCRIBERS_PER_SOURCE;
        assert!(source_addresses(server, 20_000, per).is_empty());
        let s = source_addresses(server, 50_000, per);
        assert_eq!(s.len(), 3);
        assert_eq!(s[2], std::net::IpAddr::from([127, 0, 0, 3]));
        assert_eq!(source_addresses(server, 19_500, 7_000).len(), 3);
        assert!(source_addresses(([10, 0, 0, 1], 80).into(), 50_000, per).is_empty());
    }

    #[test]
    fn finds_the_count() {
        let d = br#" {"id":"x","votes":{"count":1234,"by_option":[]}}"#;
        assert_eq!(count_in(d), Some(1234));
        assert_eq!(count_in(br#"{"votes":null}"#), None);
    }

    #[test]
    fn duplicates_refer_to_earlier_fresh_ballots() {
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let b = Ballots::new(addr, vec!["p".into()], "r", 30);
        let mut dup = 0;
        for i in 0..10_000u64 {
            match b.kind(i) {
                Kind::Fresh => assert!(b.fresh(i)),
                Kind::Repeat(j) | Kind::Retry(j) => {
                    dup += 1;
                    assert!(j < i && b.fresh(j));
                }
            }
        }
        assert!((2_700..3_300).contains(&dup), "{dup}");
    }
}
