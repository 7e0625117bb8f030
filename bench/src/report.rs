//! The markdown table of a run (the JSON is the `Report` itself).

use std::fmt::Write;

use crate::{Report, Scenario};

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn errors(s: &Scenario) -> String {
    if s.errors.is_empty() {
        "0".into()
    } else {
        s.errors
            .iter()
            .map(|(k, v)| format!("{v}×{k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

struct Target {
    what: &'static str,
    goal: String,
    measured: String,
    met: Option<bool>,
}

fn targets(r: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    let hot = r.scenario("hot-poll");
    let ceiling = r.scenario("get-ceiling");
    let embedded = r.backend == "embedded";
    if let (Some(h), false) = (hot, embedded) {
        // The MongoDB target: at least the rate of one raw insert per ballot at the same concurrency.
        if let Some(raw) = &r.store_reference {
            let ratio = h.ok_per_s / raw.writes_per_s.max(1e-9);
            out.push(Target {
                what: "hot-poll / raw driver insert_one rate",
                goal: "≥ 1.0 ×".into(),
                measured: format!("{ratio:.2} ×"),
                met: Some(ratio >= 1.0),
            });
        }
    }
    if let (Some(h), true) = (hot, embedded) {
        out.push(Target {
            what: "hot-poll accepted votes/s",
            goal: "≥ 10,000".into(),
            measured: format!("{:.0}", h.ok_per_s),
            met: Some(h.ok_per_s >= 10_000.0),
        });
        out.push(Target {
            what: "hot-poll p99",
            goal: "≤ 25 ms".into(),
            measured: format!("{} ms", ms(h.latency.p99_ms)),
            met: Some(h.latency.p99_ms <= 25.0),
        });
        if let Some(c) = ceiling {
            let ratio = h.ok_per_s / c.ok_per_s.max(1e-9);
            out.push(Target {
                what: "hot-poll / GET / ceiling",
                goal: "≥ 30 %".into(),
                measured: format!("{:.0} %", ratio * 100.0),
                met: Some(ratio >= 0.30),
            });
        }
    }
    if let Some(h) = hot {
        let rss = h.poll_memory.peak_rss_kib.max(h.vote_memory.peak_rss_kib);
        out.push(Target {
            what: "RSS under hot-poll (larger service)",
            goal: "≤ 64 MB".into(),
            measured: format!("{} MiB", mib(rss)),
            met: Some(rss <= 64 * 1024),
        });
    }
    // Issue 12: a voter's change costs at most twice a new ballot.
    if let (Some(rp), Some(h)) = (r.scenario("replacements"), hot) {
        let ratio = rp.ok_per_s / h.ok_per_s.max(1e-9);
        out.push(Target {
            what: "replacements / hot-poll ballots",
            goal: "≥ 50 %".into(),
            measured: format!("{:.0} % ({:.0}/s)", ratio * 100.0, rp.ok_per_s),
            met: Some(ratio >= 0.50),
        });
    }
    // Issue 15: reads of one poll at the speed of the HTTP stack.
    if let (Some(rd), Some(c)) = (r.scenario("reads"), r.scenario("get-ceiling-poll")) {
        let ratio = rd.ok_per_s / c.ok_per_s.max(1e-9);
        let goal = if embedded { 0.50 } else { 0.25 };
        out.push(Target {
            what: "reads / GET / ceiling of the poll service",
            goal: format!("≥ {:.0} %", goal * 100.0),
            measured: format!("{:.0} %", ratio * 100.0),
            met: Some(ratio >= goal),
        });
    }
    if let (Some(rd), false) = (r.scenario("reads"), embedded) {
        out.push(Target {
            what: "reads/s (one hot poll)",
            goal: "≥ 17,700".into(),
            measured: format!("{:.0}", rd.ok_per_s),
            met: Some(rd.ok_per_s >= 17_700.0),
        });
    }
    if let Some(w) = r.scenario("watchers").and_then(|s| s.watchers.as_ref()) {
        out.push(Target {
            what: "watchers: poll RSS per subscriber",
            goal: "≤ 8 KiB".into(),
            measured: format!("{:.1} KiB", w.rss_per_subscriber_kib),
            met: Some(w.rss_per_subscriber_kib <= 8.0),
        });
        out.push(Target {
            what: "watchers see the final tally (max lateness)",
            goal: "≤ 1 s".into(),
            measured: format!("{} ms ({} of {})", ms(w.lateness.max_ms), w.saw_final, w.subscribers),
            met: Some(w.lateness.max_ms <= 1000.0 && w.saw_final == w.subscribers),
        });
    }
    if let Some(v) = r.scenario("viral").and_then(|s| s.viral.as_ref()) {
        out.push(Target {
            what: "viral: every watcher and the reader see the final tally (max lateness)",
            goal: "≤ 1 s".into(),
            measured: v.max_lateness_ms.map_or_else(
                || {
                    format!(
                        "not all saw it ({} of {} watchers; reader {})",
                        v.watchers_saw_final,
                        v.watchers,
                        if v.reader_lateness_ms.is_some() {
                            "did"
                        } else {
                            "did not"
                        }
                    )
                },
                |m| format!("{} ms", ms(m)),
            ),
            met: Some(v.max_lateness_ms.is_some_and(|m| m <= 1000.0)),
        });
    }
    for s in &r.services {
        out.push(Target {
            what: if s.name == "poll" {
                "poll idle RSS"
            } else {
                "vote idle RSS"
            },
            goal: "≤ 20 MB".into(),
            measured: format!("{} MiB", mib(s.idle.rss_kib)),
            met: Some(s.idle.rss_kib <= 20 * 1024),
        });
        if let (Some(ready), true) = (s.ready_ms, embedded) {
            out.push(Target {
                what: if s.name == "poll" {
                    "poll start to ready"
                } else {
                    "vote start to ready"
                },
                goal: "≤ 200 ms".into(),
                measured: format!("{} ms", ms(ready)),
                met: Some(ready <= 200.0),
            });
        }
    }
    out
}

pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(
        o,
        "### Benchmark: {} store{}\n",
        r.backend,
        if r.smoke {
            " (smoke run: speeds mean nothing)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "{} · {} CPUs ({}) · {} MiB · Linux {} · load average before {} / after {} · {}{}\n",
        r.started_at,
        m.cpus,
        m.cpu_model,
        m.memory_mib,
        m.kernel,
        m.loadavg_before,
        m.loadavg_after,
        if r.label.is_empty() { "" } else { "commit " },
        r.label
    );
    if let Some(server) = &r.database_server {
        let _ = writeln!(
            o,
            "Storage: {server}; both services share one fresh database for the run, the references write to \
             scratch databases of their own (all dropped afterwards).\n"
        );
    }
    let _ = writeln!(
        o,
        "Each scenario: {:.1} s, {} concurrent clients on one keep-alive connection each (closed loop) unless noted; \
         latency in ms, from send (closed loop) or from the scheduled send time (open loop).\n",
        r.duration_s, r.clients
    );
    let _ = writeln!(
        o,
        "| scenario | load | accepted/s | p50 | p90 | p99 | max | 409 / replays (expected) | errors | poll RSS peak MiB | vote RSS peak MiB | CPU s poll / vote / loadgen | invariants |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|");
    for s in &r.scenarios {
        let inv = match &s.invariants {
            None => "–".to_owned(),
            Some(i) if i.ok => format!(
                "ok: {} accepted = {} stored = {} tallied ({} poll{})",
                i.accepted,
                i.stored,
                i.tallied,
                i.polls_checked,
                if i.polls_checked == 1 { "" } else { "s" }
            ),
            Some(i) => format!("**VIOLATED**: {}", i.problems.join("; ")),
        };
        let rate = if s.name.starts_with("get-ceiling") || s.name == "reads" {
            format!("{:.0} req/s", s.ok_per_s)
        } else {
            format!("{:.0}", s.ok_per_s)
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {}{} | {} | {} | {:.1} / {:.1} / {:.1} | {} |",
            s.name,
            s.mode.describe(),
            rate,
            ms(s.latency.p50_ms),
            ms(s.latency.p90_ms),
            ms(s.latency.p99_ms),
            ms(s.latency.max_ms),
            s.conflicts,
            s.replayed,
            errors(s),
            if s.missed > 0 {
                format!(", {} never sent", s.missed)
            } else {
                String::new()
            },
            mib(s.poll_memory.peak_rss_kib),
            mib(s.vote_memory.peak_rss_kib),
            s.cpu.poll_s,
            s.cpu.vote_s,
            s.cpu.loadgen_s,
            inv
        );
    }
    let _ = writeln!(o, "\nReference points and ratios (same run):\n");
    let _ = writeln!(o, "| reference | rate | p50 | p99 | hot-poll ÷ reference |");
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    let hot = r.scenario("hot-poll").map(|s| s.ok_per_s);
    let ratio = |base: f64| hot.map_or("–".into(), |h| format!("{:.2}", h / base.max(1e-9)));
    if let Some(c) = r.scenario("get-ceiling") {
        let _ = writeln!(
            o,
            "| `GET /` of the vote service, {} clients (HTTP ceiling) | {:.0}/s | {} | {} | {} |",
            c.mode.clients(),
            c.ok_per_s,
            ms(c.latency.p50_ms),
            ms(c.latency.p99_ms),
            ratio(c.ok_per_s)
        );
    }
    for s in r.store_reference.iter().chain(&r.store_cast_reference) {
        let _ = writeln!(
            o,
            "| {}, {} tasks, one ballot per call{} | {:.0}/s | {} | {} | {} |",
            s.what,
            s.clients,
            if s.consistent {
                String::new()
            } else {
                format!(" (**inconsistent**: {} errors)", s.errors)
            },
            s.writes_per_s,
            ms(s.latency.p50_ms),
            ms(s.latency.p99_ms),
            ratio(s.writes_per_s)
        );
    }
    if let Some(f) = r.fsync_per_s {
        let _ = writeln!(
            o,
            "| disk of this machine: write + fdatasync, 1 thread (one durable commit{}) | {f:.0}/s | | | {} |",
            if r.database_server.is_some() {
                "; the database's disk only if the server runs here"
            } else {
                ""
            },
            ratio(f)
        );
    }
    if let Some(c) = r.scenario("get-ceiling-poll") {
        let _ = writeln!(
            o,
            "| `GET /` of the poll service, {} clients (HTTP ceiling of `reads`) | {:.0}/s | {} | {} | – |",
            c.mode.clients(),
            c.ok_per_s,
            ms(c.latency.p50_ms),
            ms(c.latency.p99_ms),
        );
    }
    if let Some(rd) = r.scenario("reads") {
        let _ = writeln!(
            o,
            "\nReads (`GET /api/polls/{{id}}` of one poll, full 200 answers, {} clients): {:.0}/s, p50 {} ms, p99 {} ms{}.",
            rd.mode.clients(),
            rd.ok_per_s,
            ms(rd.latency.p50_ms),
            ms(rd.latency.p99_ms),
            r.scenario("get-ceiling-poll").map_or(String::new(), |c| format!(
                "; {:.0} % of the poll service's `GET /` ceiling",
                100.0 * rd.ok_per_s / c.ok_per_s.max(1e-9)
            ))
        );
    }
    if let Some(m) = r.scenario("mixed")
        && let Some(rd) = &m.reads
    {
        let _ = writeln!(
            o,
            "\nMixed (one pool of {} clients: 10 % ballots on one dedupe-none poll, 45 % `GET /api/polls/{{id}}` of it, \
             45 % `GET /api/polls?limit=20`): reads {:.0}/s (p50 {} ms, p99 {} ms), ballots {:.0}/s (p50 {} ms, p99 {} ms); \
             errors {}. Of the reads: the poll {:.0}/s (p50 {} ms, p99 {} ms), the list {:.0}/s (p50 {} ms, p99 {} ms).",
            m.mode.clients(),
            rd.ok_per_s,
            ms(rd.latency.p50_ms),
            ms(rd.latency.p99_ms),
            m.ok_per_s,
            ms(m.latency.p50_ms),
            ms(m.latency.p99_ms),
            errors(m),
            rd.poll_ok as f64 / m.duration_s.max(1e-9),
            ms(rd.poll_latency.p50_ms),
            ms(rd.poll_latency.p99_ms),
            rd.list_ok as f64 / m.duration_s.max(1e-9),
            ms(rd.list_latency.p50_ms),
            ms(rd.list_latency.p99_ms),
        );
    }
    if let Some(s) = r.scenario("watchers")
        && let Some(w) = &s.watchers
    {
        let _ = writeln!(
            o,
            "\nWatchers' memory: poll-service RSS {} MiB before subscribing, {} MiB with {} subscribers receiving ({:.1} KiB \
             per subscriber), {} MiB after all saw the final tally; {} local source address{}.",
            mib(w.poll_rss_before_kib),
            mib(w.poll_rss_connected_kib),
            w.connected,
            w.rss_per_subscriber_kib,
            mib(w.poll_rss_after_kib),
            w.source_addresses,
            if w.source_addresses == 1 { "" } else { "es" }
        );
    }
    if let Some(s) = r.scenario("watchers")
        && let Some(w) = &s.watchers
    {
        let hot_cpu = r.scenario("hot-poll").map(|h| h.cpu.poll_s / h.duration_s);
        let _ = writeln!(
            o,
            "\nWatchers: {} of {} subscribers saw the final tally ({}); lateness after the last acknowledged ballot \
             p50 {} ms, p99 {} ms, max {} ms; {} events received. Poll-service CPU while streaming: {:.2} s \
             ({:.2} CPU-s per s{}).",
            w.saw_final,
            w.subscribers,
            w.final_count,
            ms(w.lateness.p50_ms),
            ms(w.lateness.p99_ms),
            ms(w.lateness.max_ms),
            w.events,
            w.poll_cpu_s,
            w.poll_cpu_s_per_s,
            hot_cpu.map_or(String::new(), |c| format!(
                "; {c:.2} CPU-s per s during hot-poll without watchers"
            ))
        );
    }
    if let Some(v) = r.scenario("viral").and_then(|s| s.viral.as_ref()) {
        viral(&mut o, v);
    }
    let _ = writeln!(
        o,
        "\n| service | start to ready | idle RSS MiB | peak RSS (VmHWM) after the run MiB |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|");
    for s in &r.services {
        let hwm = r
            .scenarios
            .last()
            .map(|x| {
                if s.name == "poll" {
                    x.poll_memory.hwm_kib
                } else {
                    x.vote_memory.hwm_kib
                }
            })
            .unwrap_or(0);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            s.name,
            s.ready_ms.map_or("–".into(), |m| format!("{} ms", ms(m))),
            mib(s.idle.rss_kib),
            mib(hwm)
        );
    }
    if !r.smoke {
        let _ = writeln!(o, "\n| target | goal | measured | |");
        let _ = writeln!(o, "|---|---|---|---|");
        for t in targets(r) {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                t.what,
                t.goal,
                t.measured,
                match t.met {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "–",
                }
            );
        }
    }
    if !r.failures.is_empty() {
        let _ = writeln!(o, "\nFailures:\n");
        for f in &r.failures {
            let _ = writeln!(o, "- {f}");
        }
    }
    o
}

fn statuses(m: &std::collections::BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        "0".into()
    } else {
        m.iter().map(|(k, v)| format!("{v}×{k}")).collect::<Vec<_>>().join(", ")
    }
}

fn viral(o: &mut String, v: &crate::viral::Viral) {
    let opt = |x: Option<f64>| x.map_or("n/a".to_owned(), |m| format!("{} ms", ms(m)));
    let _ = writeln!(
        o,
        "\nViral (one `{}` poll, dedupe `none`): {} of {} ballots accepted in {:.1} s = {:.0} ballots/s, ballot p50 {} ms, \
         p99 {} ms, max {} ms; meanwhile {} SSE watchers ({} receiving before the burst) and one reader of \
         `GET /api/polls/{{id}}` at 20/s, during the burst and for {:.0} s after it.\n",
        v.method.name(),
        v.accepted,
        v.ballots,
        v.burst_s,
        v.ballots_per_s,
        ms(v.ballot_latency.p50_ms),
        ms(v.ballot_latency.p99_ms),
        ms(v.ballot_latency.max_ms),
        v.watchers,
        v.watchers_connected,
        v.read_after_s
    );
    let _ = writeln!(
        o,
        "| reader `GET /api/polls/{{id}}` | GETs | p50 | p99 | max | 5xx | not 200 |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---|");
    for (phase, r) in [
        ("during the burst", &v.reader_during_burst),
        ("after the burst", &v.reader_after_burst),
    ] {
        let _ = writeln!(
            o,
            "| {phase} | {} | {} | {} | {} | {} | {} |",
            r.requests,
            ms(r.latency.p50_ms),
            ms(r.latency.p99_ms),
            ms(r.latency.max_ms),
            r.server_errors,
            statuses(&r.not_ok)
        );
    }
    let _ = writeln!(
        o,
        "\nFinal tally seen after the last acknowledged ballot: watchers {} of {} (p50 {} ms, max {} ms{}), reader {}; \
         max of all: {} (goal ≤ 1 s).",
        v.watchers_saw_final,
        v.watchers,
        ms(v.watcher_lateness.p50_ms),
        ms(v.watcher_lateness.max_ms),
        if v.watcher_failures.is_empty() {
            String::new()
        } else {
            format!("; failures: {}", statuses(&v.watcher_failures))
        },
        opt(v.reader_lateness_ms),
        v.max_lateness_ms
            .map_or("**not everyone saw it within 30 s**".to_owned(), |m| format!(
                "{} ms",
                ms(m)
            ))
    );
    let audit = match (&v.audit_error, v.audit_s, v.audit_consistent) {
        (Some(e), _, _) => format!("**failed**: {e}"),
        (None, Some(s), Some(c)) => format!(
            "{s:.2} s, {}",
            if c {
                "consistent (tally = recount of the stored ballots)"
            } else {
                "**inconsistent**"
            }
        ),
        _ => "n/a".into(),
    };
    let _ = writeln!(
        o,
        "Audit of the poll (`GET /internal/audit` on the vote service): {audit}."
    );
    let _ = writeln!(
        o,
        "Tally refresh (vote service, `pollvote_tally_refresh_duration_seconds` during the scenario): {}.",
        v.tally_refresh.as_ref().map_or(
            if v.tally_refresh_metric {
                "n/a (no refresh during the scenario)".to_owned()
            } else {
                "n/a (the vote service has no such metric)".to_owned()
            },
            |t| {
                let part = |p: &Option<crate::viral::TallyRefresh>| {
                    p.as_ref().map_or("none".to_owned(), |t| {
                        format!("{}, mean {} ms, p99 {}", t.refreshes, ms(t.mean_ms), opt(t.p99_ms))
                    })
                };
                format!(
                    "{} refreshes, mean {} ms, p99 {} (interpolated in its buckets); during the burst {}; in the read \
                     phase {}",
                    t.refreshes,
                    ms(t.mean_ms),
                    opt(t.p99_ms),
                    part(&v.tally_refresh_burst),
                    part(&v.tally_refresh_read_phase)
                )
            }
        )
    );
    let db = |d: Option<f64>| d.map_or("n/a".to_owned(), |x| format!("{x:.2}"));
    let _ = writeln!(
        o,
        "CPU-seconds per second, burst / read phase after it: database server {} / {}, vote {:.2} / {:.2}, \
         poll {:.2} / {:.2}.",
        db(v.cpu_burst.database),
        db(v.cpu_read_phase.database),
        v.cpu_burst.vote,
        v.cpu_read_phase.vote,
        v.cpu_burst.poll,
        v.cpu_read_phase.poll
    );
    if let Some(e) = &v.export {
        let _ = writeln!(
            o,
            "Admin export of every ballot (`GET /api/polls/{{id}}/ballots`, NDJSON): {} lines, {:.1} MB in {:.1} s; \
             RSS before / peak during: poll {:.1} / {:.1} MiB, vote {:.1} / {:.1} MiB.",
            e.lines,
            e.bytes as f64 / 1e6,
            e.seconds,
            e.poll_rss_before_kib as f64 / 1024.0,
            e.poll_rss_max_kib as f64 / 1024.0,
            e.vote_rss_before_kib as f64 / 1024.0,
            e.vote_rss_max_kib as f64 / 1024.0
        );
    }
}
