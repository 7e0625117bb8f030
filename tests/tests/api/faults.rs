//! Fault tests against a MongoDB-protocol server we can stop: a SecantusDB of the test's own
//! (scripts/secantusdb), cut while ballots flow and brought back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_tests::secantusdb::OwnSecantusDb;
use api_tests::{Stack, eventually, expect_problem, get_json, names_field, retry_after_secs, until};
use serde_json::{Value, json};

fn enabled() -> bool {
    let on = std::env::var("POLLVOTE_TEST_BACKEND").as_deref() == Ok("mongodb");
    if !on {
        // scripts/test runs this suite again with the MongoDB backend, where CI requires SecantusDB.
        api_tests::skipped("set POLLVOTE_TEST_BACKEND=mongodb (scripts/test does) to run the database fault tests");
    }
    on
}

struct Outcome {
    /// When the request was sent.
    sent: Instant,
    latency: Duration,
    status: u16,
    retry_after: bool,
    /// The `Retry-After` header, when it is delta-seconds.
    retry_after_secs: Option<u64>,
}

#[tokio::test]
async fn a_database_outage_gives_fast_503s_and_recovers_without_restart() {
    if !enabled() {
        return;
    }
    // Killed when the test ends, also when it fails.
    let db = match OwnSecantusDb::start(&[]) {
        Ok(db) => db,
        Err(why) => {
            return api_tests::skip(format!(
                "the database outage test: no SecantusDB on this machine ({why})"
            ));
        }
    };
    let uri = db.uri.clone();
    let s = Arc::new(
        Stack::start_with(|c| {
            c.storage.mongodb_uri = shared::Secret::new(uri.clone());
        })
        .await,
    );
    let (id, _) = s.simple_poll(json!({"dedupe": "voter"})).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::<Outcome>::new()));

    // 8 clients, each casting ballots for its own voters; a failed ballot is retried with the same
    // Idempotency-Key until it is acknowledged, as a careful client would.
    let mut clients = Vec::new();
    for c in 0..8 {
        let (s, id, stop, outcomes) = (s.clone(), id.clone(), stop.clone(), outcomes.clone());
        clients.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let voter = format!("c{c}-v{n}");
                n += 1;
                loop {
                    let started = Instant::now();
                    let res = s
                        .http
                        .post(format!("{}/api/votes", s.vote))
                        .header("idempotency-key", format!("key-{voter}"))
                        .json(&json!({"poll_id": id, "option": "red", "voter_id": voter}))
                        .send()
                        .await
                        .expect("the vote service answers");
                    let status = res.status().as_u16();
                    let retry_after = res.headers().contains_key("retry-after");
                    let retry_after_secs = retry_after_secs(&res);
                    outcomes.lock().expect("lock").push(Outcome {
                        sent: started,
                        latency: started.elapsed(),
                        status,
                        retry_after,
                        retry_after_secs,
                    });
                    if status == 201 {
                        acknowledged.push(voter.clone());
                        break;
                    }
                    // A careful client's back-off before the retry, not a wait for anything.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // A client's pace.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acknowledged
        }));
    }

    // Ballots flow before the cut.
    let acknowledged_by = |at_least: usize, since: Instant| {
        let outcomes = outcomes.clone();
        move || {
            let n = outcomes
                .lock()
                .expect("lock")
                .iter()
                .filter(|o| o.status == 201 && o.sent >= since)
                .count();
            async move {
                if n >= at_least {
                    Ok(())
                } else {
                    Err(format!("{n} of {at_least} ballots acknowledged"))
                }
            }
        }
    };
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(20),
        acknowledged_by(16, Instant::now()),
    )
    .await;
    db.kill();
    let cut_at = Instant::now();
    let deep = eventually(Duration::from_secs(10), Duration::from_millis(100), || async {
        let deep = s
            .http
            .get(format!("{}/health/deep", s.vote))
            .send()
            .await
            .expect("deep");
        let status = deep.status();
        let deep: Value = deep.json().await.expect("json");
        if status == 503 && deep["dependencies"]["database"]["status"] == "down" {
            Ok(deep)
        } else {
            Err(format!(
                "/health/deep does not say the database is down: {status} {deep}"
            ))
        }
    })
    .await;
    assert_eq!(deep["dependencies"]["database"]["status"], "down", "{deep}");
    let ready = s.http.get(format!("{}/readyz", s.vote)).send().await.expect("ready");
    assert_eq!(
        ready.status(),
        200,
        "readiness fails open during a shared database outage"
    );
    // What is under test: an outage of several seconds (4 s in all), ballots refused meanwhile.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(cut_at.elapsed())).await;
    let down_for = cut_at.elapsed();
    let restart_began = Instant::now();
    db.restart();
    let restarted = Instant::now();

    // Recovery: a ballot is acknowledged again, with no restart of the services.
    until(restarted + Duration::from_secs(30), Duration::from_millis(100), || {
        let acked_after = outcomes
            .lock()
            .expect("lock")
            .iter()
            .rev()
            .take(8)
            .any(|o| o.status == 201);
        async move {
            if acked_after && restarted.elapsed() > Duration::from_millis(500) {
                Ok(())
            } else {
                Err("no recovery within 30 s".to_owned())
            }
        }
    })
    .await;
    let recovered_in = restarted.elapsed();
    // Recovery without a restart: the same in-process services acknowledge a ballot sent after
    // the database came back, and say the database is up again.
    assert!(
        outcomes
            .lock()
            .expect("lock")
            .iter()
            .any(|o| o.status == 201 && o.sent >= restarted),
        "a ballot sent after the database came back is acknowledged"
    );
    until(
        restarted + Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let deep = s
                .http
                .get(format!("{}/health/deep", s.vote))
                .send()
                .await
                .expect("deep");
            let status = deep.status();
            let deep: Value = deep.json().await.expect("json");
            if status == 200 && deep["dependencies"]["database"]["status"] == "up" {
                Ok(())
            } else {
                Err(format!("/health/deep still says the database is down: {deep}"))
            }
        },
    )
    .await;
    // Ballots flow after the recovery too.
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(20),
        acknowledged_by(16, Instant::now()),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    for c in clients {
        acknowledged.extend(c.await.expect("join"));
    }

    let outcomes = std::mem::take(&mut *outcomes.lock().expect("lock"));
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for o in outcomes.iter() {
        *by_status.entry(o.status).or_default() += 1;
        if o.status != 201 {
            assert_eq!(o.status, 503, "during the outage only 503s: {by_status:?}");
            assert!(o.retry_after, "503 carries Retry-After");
            assert!(
                o.latency < Duration::from_secs(10),
                "answered within the request timeout: {:?}",
                o.latency
            );
        }
    }
    assert!(
        by_status.get(&503).copied().unwrap_or(0) > 0,
        "the outage was seen: {by_status:?}"
    );
    // During the cut (sent after the kill, answered before the restart began): no ballot is
    // acknowledged, and the ballots are refused with 503 and a Retry-After of whole seconds.
    let during: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.sent >= cut_at && o.sent + o.latency < restart_began)
        .collect();
    assert!(
        !during.is_empty() && during.iter().all(|o| o.status == 503),
        "every ballot sent during the cut is refused with 503: {:?}",
        during.iter().map(|o| o.status).collect::<Vec<_>>()
    );
    for o in &during {
        assert!(
            o.retry_after_secs.is_some_and(|secs| secs >= 1),
            "a 503 during the cut says when to retry, in seconds (Retry-After: {:?})",
            o.retry_after_secs
        );
    }
    let slowest = during.iter().map(|o| o.latency).max().unwrap_or_default();
    eprintln!(
        "during the cut: {} ballots refused with 503 + Retry-After, slowest answer {slowest:?}",
        during.len()
    );
    eprintln!("outage {down_for:?}, recovered {recovered_in:?} after restart, outcomes {by_status:?}");

    // The dependency metrics saw it: the ballot path's failed calls (the vote service's storage,
    // or its calls to the poll service, whose own storage was down too), and the 503s.
    let metrics = s
        .http
        .get(format!("{}/metrics", s.vote))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let count = |prefix: &str, labels: &[&str]| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    let failed = count(
        "pollvote_db_operation_duration_seconds_count{",
        &["operation=\"cast\"", "outcome=\"unavailable\""],
    ) + count(
        "pollvote_db_operation_duration_seconds_count{",
        &["operation=\"cast\"", "outcome=\"cancelled\""],
    ) + count(
        "pollvote_peer_request_duration_seconds_count{",
        &["peer=\"poll\"", "outcome=\"5xx\""],
    ) + count(
        "pollvote_peer_request_duration_seconds_count{",
        &["peer=\"poll\"", "outcome=\"timeout\""],
    );
    assert!(failed > 0.0, "failed dependency calls are counted:\n{metrics}");
    let refused = count(
        "http_server_request_duration_seconds_count{",
        &["http_route=\"/api/votes\"", "http_response_status_code=\"503\""],
    );
    assert!(refused > 0.0, "503s are counted:\n{metrics}");

    // Every acknowledged ballot is stored exactly once, and the tally equals the stored ballots.
    let audit: Value = s
        .http
        .get(format!("{}/internal/polls/{id}/audit", s.vote))
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("json");
    assert_eq!(audit["consistent"], true, "{audit}");
    assert_eq!(audit["stored"]["total"], acknowledged.len() as u64, "{audit}");
    // Per-option counts as three numbers (a tally may leave out trailing options without votes).
    let three = |counts: &Value| -> Vec<u64> {
        let mut v: Vec<u64> = counts
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c.as_u64().or_else(|| c["count"].as_u64()).unwrap_or(u64::MAX))
                    .collect()
            })
            .unwrap_or_default();
        v.resize(3, 0);
        v
    };
    let stored = three(&audit["stored"]["by_option"]);
    assert_eq!(
        stored,
        vec![acknowledged.len() as u64, 0, 0],
        "every ballot was for red: {audit}"
    );
    let p = s.get_poll(&id).await;
    assert_eq!(p["votes"]["count"], acknowledged.len() as u64);

    // At rest after the recovery, the tally the services serve (the vote service's tally and the
    // poll service's results) equals the audit's recount, within 10 s.
    let bound = Duration::from_secs(10);
    eventually(bound, Duration::from_millis(50), || async {
        let t: Value = api_tests::get_json(&s.http, &format!("{}/internal/tallies?ids={id}", s.vote)).await;
        let p = s.get_poll(&id).await;
        if t["tallies"][0]["total"] == audit["stored"]["total"]
            && three(&t["tallies"][0]["by_option"]) == stored
            && p["votes"]["count"] == audit["stored"]["total"]
            && three(&p["votes"]["by_option"]) == stored
        {
            Ok(())
        } else {
            Err(format!(
                "tally {t} and results {} are not the audit's {} within {bound:?}",
                p["votes"], audit["stored"]
            ))
        }
    })
    .await;
    drop(s);
    drop(db);
}

#[tokio::test]
async fn a_poll_written_by_the_predecessor_is_served_by_the_api() {
    if !enabled() {
        return;
    }
    let s = Stack::start().await;
    let database = s.poll_database().expect("a MongoDB stack").to_owned();
    let client = mongodb::Client::with_uri_str(s.config.storage.mongodb_uri.expose())
        .await
        .expect("client");
    let oid = mongodb::bson::oid::ObjectId::new();
    // Exactly what the predecessor's Flask service wrote.
    client
        .database(&database)
        .collection::<mongodb::bson::Document>("polls")
        .insert_one(mongodb::bson::doc! {
            "_id": oid,
            "name": "Old poll",
            "desc": "from the Flask service",
            "options": ["yes", "no"],
            "votes": { "count": 5 },
        })
        .await
        .expect("insert with the driver");
    let id = oid.to_hex();
    let p = s.get_poll(&id).await;
    assert_eq!(p["id"], id.as_str());
    assert_eq!(p["name"], "Old poll");
    assert_eq!(p["desc"], "from the Flask service");
    assert_eq!(p["options"], json!(["yes", "no"]));
    assert_eq!(p["status"], "open");
    assert_eq!(p["votes"]["count"], 5, "the predecessor's count is kept");
    let listed: Value = s
        .http
        .get(format!("{}/api/polls", s.poll))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert!(
        listed.as_array().expect("array").iter().any(|p| p["id"] == id.as_str()),
        "listed too"
    );

    // New ballots add to the old count; the old poll cannot be administered (it has no token).
    assert_eq!(s.vote(json!({"poll_id": id, "option": "no"})).await.status(), 201);
    // Reads are served from a snapshot at most 250 ms old: the ballot shows within a second.
    let p = eventually(Duration::from_secs(1), Duration::from_millis(20), || async {
        let p = s.get_poll(&id).await;
        if p["votes"]["count"] != 5 {
            Ok(p)
        } else {
            Err(format!("the ballot was not shown within a second: {p}"))
        }
    })
    .await;
    assert_eq!(p["votes"]["count"], 6);
    assert_eq!(p["votes"]["by_option"][1]["count"], 1);
    let res = s
        .http
        .post(format!("{}/api/polls/{id}/close", s.poll))
        .bearer_auth("anything")
        .send()
        .await
        .expect("close");
    assert_eq!(res.status(), 403);
}

/// Issue 16: the tally counters are a cache of the ballots. One that went wrong (here: an update
/// replayed by a failover) makes the audit report the poll inconsistent at rest, and the repair
/// endpoints rebuild it from the ballots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_tally_counter_is_found_by_the_audit_and_repaired() {
    if !enabled() {
        return;
    }
    use mongodb::bson::{Document, doc};
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({"dedupe": "none"})).await;
    for option in ["red", "red", "green"] {
        assert_eq!(s.vote(json!({"poll_id": id, "option": option})).await.status(), 201);
    }
    let client = mongodb::Client::with_uri_str(s.config.storage.mongodb_uri.expose())
        .await
        .expect("client");
    let counters = client
        .database(s.vote_database().expect("a MongoDB stack"))
        .collection::<Document>("ballots_counters");
    let folded = || async {
        let mut cursor = counters.find(doc! { "poll_id": &id }).await.expect("find");
        let mut n = 0;
        while cursor.advance().await.expect("advance") {
            n += cursor.deserialize_current().expect("doc").get_i64("n").unwrap_or(0);
        }
        n
    };
    eventually(Duration::from_secs(5), Duration::from_millis(50), || async {
        match folded().await {
            3 => Ok(()),
            n => Err(format!("the counter never folded the 3 ballots ({n})")),
        }
    })
    .await;
    counters
        .update_one(doc! { "poll_id": &id }, doc! { "$inc": { "n": 2_i64, "o.0": 2_i64 } })
        .await
        .expect("replay an update");
    let audit_url = format!("{}/internal/polls/{id}/audit", s.vote);
    let audit = eventually(Duration::from_secs(3), Duration::from_millis(50), || async {
        let audit = get_json(&s.http, &audit_url).await;
        if audit["consistent"] == false {
            Ok(audit)
        } else {
            Err(format!("the audit never saw the wrong counter: {audit}"))
        }
    })
    .await;
    assert_eq!(audit["tally"]["total"], 5, "{audit}");
    assert_eq!(audit["stored"]["total"], 3, "{audit}");
    let res = s
        .http
        .post(format!("{}/internal/polls/{id}/repair", s.vote))
        .send()
        .await
        .expect("repair");
    assert_eq!(res.status(), 200);
    let report: Value = res.json().await.expect("json");
    assert_eq!(
        (report["ballots"].clone(), report["corrected"].clone()),
        (json!(3), json!(1)),
        "{report}"
    );
    let audit = get_json(&s.http, &audit_url).await;
    assert_eq!(audit["consistent"], true, "{audit}");
    assert_eq!(audit["tally"]["by_option"], json!([2, 1]));
    eventually(Duration::from_secs(1), Duration::from_millis(20), || async {
        if s.get_poll(&id).await["votes"]["count"] == 3 {
            Ok(())
        } else {
            Err("the poll's results never showed the repaired count".to_owned())
        }
    })
    .await;

    // Every poll touched in the last five minutes: this one, with nothing left to correct.
    let since = (chrono::Utc::now() - chrono::Duration::minutes(5)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let res = s
        .http
        .post(format!("{}/internal/repair", s.vote))
        .query(&[("since", since)])
        .send()
        .await
        .expect("repair since");
    assert_eq!(res.status(), 200);
    let all: Value = res.json().await.expect("json");
    let ours = all["repairs"]
        .as_array()
        .expect("repairs")
        .iter()
        .find(|r| r["poll_id"] == id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("poll missing from {all}"));
    assert_eq!(ours["corrected"], 0);
    let bad = s
        .http
        .post(format!("{}/internal/repair?since=yesterday", s.vote))
        .send()
        .await
        .expect("repair since");
    let problem = expect_problem(bad, 400).await;
    assert!(names_field(&problem, "since"), "{problem}");
    s.stop().await;
}
