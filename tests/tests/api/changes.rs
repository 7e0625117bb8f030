//! Ballots their voters change over real HTTP (issue 12): `PUT` and `DELETE /api/votes/{id}` with
//! the ballot's receipt, the poll's `changes` setting, closed polls, every method's shape, and
//! the results (JSON and live stream) following each change.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use api_tests::{Stack, eventually, expect_problem, names_field};
use futures_util::StreamExt as _;
use serde_json::{Value, json};

/// A request on a ballot's own URL, with its receipt when given.
fn on_ballot(s: &Stack, method: reqwest::Method, ballot: &str, receipt: Option<&str>) -> reqwest::RequestBuilder {
    let req = s.http.request(method, format!("{}/api/votes/{ballot}", s.vote));
    match receipt {
        Some(r) => req.bearer_auth(r),
        None => req,
    }
}

async fn replace(s: &Stack, ballot: &str, receipt: Option<&str>, body: Value) -> reqwest::Response {
    on_ballot(s, reqwest::Method::PUT, ballot, receipt)
        .json(&body)
        .send()
        .await
        .expect("put")
}

async fn withdraw(s: &Stack, ballot: &str, receipt: Option<&str>) -> reqwest::Response {
    on_ballot(s, reqwest::Method::DELETE, ballot, receipt)
        .send()
        .await
        .expect("delete")
}

/// Sends ballot `body` as voter `voter` (`X-Voter-Id`).
async fn post_as(s: &Stack, voter: &str, body: Value) -> reqwest::Response {
    s.http
        .post(format!("{}/api/votes", s.vote))
        .header("x-voter-id", voter)
        .json(&body)
        .send()
        .await
        .expect("vote")
}

/// Casts `body` as voter `voter` (`dedupe: voter` polls): the 201 answer's body.
async fn cast_as(s: &Stack, voter: &str, body: Value) -> Value {
    let res = post_as(s, voter, body).await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
    res.json().await.expect("json")
}

/// The vote service at `vote`'s audit of `poll` (its tally against the recount of its ballots).
async fn audit_of(http: &reqwest::Client, vote: &str, poll: &str) -> Value {
    http.get(format!("{vote}/internal/polls/{poll}/audit"))
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("json")
}

/// Waits (a few snapshot intervals at most) until the poll's JSON shows `expected` per option and
/// `total` ballots; returns the poll.
async fn shows(s: &Stack, poll: &str, expected: &[u64], total: u64) -> Value {
    eventually(Duration::from_secs(3), Duration::from_millis(50), || async {
        let p = s.get_poll(poll).await;
        if counts(&p) == expected && p["votes"]["count"] == total {
            Ok(p)
        } else {
            Err(format!("expected {expected:?} of {total}: {}", p["votes"]))
        }
    })
    .await
}

fn counts(poll: &Value) -> Vec<u64> {
    poll["votes"]["by_option"]
        .as_array()
        .expect("by_option")
        .iter()
        .map(|o| o["count"].as_u64().expect("count"))
        .collect()
}

/// The next `results` event of a live results stream.
struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buf: String,
}

impl Events {
    async fn open(s: &Stack, poll: &str) -> Self {
        let res = s
            .http
            .get(format!("{}/api/polls/{poll}/results/stream", s.poll))
            .send()
            .await
            .expect("stream");
        assert_eq!(res.status(), 200);
        Self {
            body: res.bytes_stream().map(|c| c.map(|b| b.to_vec())).boxed(),
            buf: String::new(),
        }
    }

    /// The first event (from now) showing `expected` per option and `total` ballots.
    async fn until(&mut self, expected: &[u64], total: u64) -> Value {
        loop {
            let e = self.next().await;
            if counts(&e) == expected && e["votes"]["count"] == total {
                return e;
            }
        }
    }

    async fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    return serde_json::from_str(data).expect("event data is JSON");
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(3), self.body.next())
                .await
                .expect("an event in time");
            self.buf
                .push_str(std::str::from_utf8(&chunk.expect("stream open").expect("chunk")).expect("utf-8"));
        }
    }
}

#[tokio::test]
async fn a_voter_replaces_and_withdraws_their_ballot_with_its_receipt_and_may_vote_again() {
    let s = Stack::start().await;
    let (poll, _) = s.simple_poll(json!({"dedupe": "voter", "max_choices": 2})).await;
    assert_eq!(s.get_poll(&poll).await["changes"], "allowed", "the default");
    let mut events = Events::open(&s, &poll).await;
    assert_eq!(events.next().await["votes"]["count"], 0);
    let alice = cast_as(&s, "alice", json!({"poll_id": poll, "option": "red"})).await;
    cast_as(&s, "bob", json!({"poll_id": poll, "option": "green"})).await;
    let (ballot, receipt) = (
        alice["id"].as_str().expect("id").to_owned(),
        alice["receipt"].as_str().expect("receipt").to_owned(),
    );
    events.until(&[1, 1, 0], 2).await;

    // Replaced: same id, new marks, counted in the new form only, at once (the stream too).
    let changed_at = Instant::now();
    let res = replace(&s, &ballot, Some(&receipt), json!({"options": ["blue", "green"]})).await;
    assert_eq!(res.status(), 200);
    let replaced: Value = res.json().await.expect("json");
    assert_eq!(replaced["id"], alice["id"]);
    assert_eq!(replaced["options"], json!(["green", "blue"]));
    assert!(replaced["updated_at"].is_string(), "{replaced}");
    assert!(replaced.get("receipt").is_none(), "a receipt is shown only once");
    events.until(&[0, 2, 1], 2).await;
    assert!(
        changed_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        changed_at.elapsed()
    );
    shows(&s, &poll, &[0, 2, 1], 2).await;
    let shown: Value = on_ballot(&s, reqwest::Method::GET, &ballot, Some(&receipt))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(shown, replaced, "the ballot as counted now");

    // Refusals change nothing: no receipt 401; a wrong receipt and an unknown ballot the same 404;
    // marks the poll's rules refuse 422 naming the field; a body without marks 400.
    let missing = expect_problem(replace(&s, &ballot, None, json!({"option": "red"})).await, 401).await;
    assert!(
        missing["detail"].as_str().is_some_and(|d| d.contains("receipt")),
        "{missing}"
    );
    let wrong = expect_problem(
        replace(&s, &ballot, Some(&"x".repeat(43)), json!({"option": "red"})).await,
        404,
    )
    .await;
    let unknown = expect_problem(
        replace(
            &s,
            &uuid::Uuid::new_v4().to_string(),
            Some(&receipt),
            json!({"option": "red"}),
        )
        .await,
        404,
    )
    .await;
    assert_eq!(wrong, unknown, "nothing revealed");
    let p = expect_problem(
        replace(&s, &ballot, Some(&receipt), json!({"option": "purple"})).await,
        422,
    )
    .await;
    assert_eq!(p["type"], "urn:pollvote:problem:unknown-option");
    assert!(names_field(&p, "option"), "{p}");
    let p = expect_problem(
        replace(
            &s,
            &ballot,
            Some(&receipt),
            json!({"options": ["red", "green", "blue"]}),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(p["type"], "urn:pollvote:problem:too-many-choices");
    let p = expect_problem(replace(&s, &ballot, Some(&receipt), json!({})).await, 400).await;
    assert!(names_field(&p, "option"), "{p}");
    assert_eq!(
        expect_problem(withdraw(&s, &ballot, None).await, 401).await["status"],
        401
    );
    assert_eq!(
        expect_problem(withdraw(&s, &ballot, Some(&"x".repeat(43))).await, 404).await,
        wrong
    );
    assert_eq!(counts(&s.get_poll(&poll).await), vec![0, 2, 1], "nothing changed");
    // One ballot per voter still: a new one is refused.
    let res = post_as(&s, "alice", json!({"poll_id": poll, "option": "red"})).await;
    assert_eq!(
        expect_problem(res, 409).await["type"],
        "urn:pollvote:problem:already-voted"
    );

    // Withdrawn: no longer counted (the stream too), no longer shown; then the voter votes again.
    let res = withdraw(&s, &ballot, Some(&receipt)).await;
    assert_eq!(res.status(), 204);
    events.until(&[0, 1, 0], 1).await;
    for res in [
        on_ballot(&s, reqwest::Method::GET, &ballot, Some(&receipt))
            .send()
            .await
            .expect("get"),
        withdraw(&s, &ballot, Some(&receipt)).await,
        replace(&s, &ballot, Some(&receipt), json!({"option": "red"})).await,
    ] {
        assert_eq!(expect_problem(res, 404).await, wrong, "a withdrawn ballot is gone");
    }
    let again = cast_as(&s, "alice", json!({"poll_id": poll, "option": "blue"})).await;
    assert_ne!(again["id"], alice["id"], "a new ballot");
    assert_ne!(again["receipt"], alice["receipt"]);
    shows(&s, &poll, &[0, 1, 1], 2).await;
    let again_id = again["id"].as_str().expect("id");
    assert_eq!(
        on_ballot(&s, reqwest::Method::GET, again_id, Some(&receipt))
            .send()
            .await
            .expect("get")
            .status(),
        404,
        "the old receipt opens nothing"
    );
    let audit = audit_of(&s.http, &s.vote, &poll).await;
    assert_eq!(audit["consistent"], true, "{audit}");
}

/// Replaces the ballot's marks by option blue until the answer is `status` (the vote service
/// caches polls: a change of the poll reaches it within its cache's lifetime).
async fn until_replacing_answers(s: &Stack, ballot: &str, receipt: &str, status: u16) {
    eventually(Duration::from_secs(5), Duration::from_millis(100), || async {
        match replace(s, ballot, Some(receipt), json!({"option": "blue"}))
            .await
            .status()
            .as_u16()
        {
            got if got == status => Ok(()),
            other => Err(format!("a replacement answered {other}, not {status}")),
        }
    })
    .await;
}

/// `changes: locked` keeps ballots as cast; a poll changed to `allowed` lets them change; a closed
/// poll's ballots are final.
#[tokio::test]
async fn locked_and_closed_polls_keep_their_ballots() {
    let s = Stack::start().await;
    let (poll, token) = s.simple_poll(json!({"dedupe": "none", "changes": "locked"})).await;
    assert_eq!(s.get_poll(&poll).await["changes"], "locked");
    let cast: Value = s
        .vote(json!({"poll_id": poll, "option": "red"}))
        .await
        .json()
        .await
        .expect("json");
    let (ballot, receipt) = (
        cast["id"].as_str().expect("id"),
        cast["receipt"].as_str().expect("receipt"),
    );
    for res in [
        replace(&s, ballot, Some(receipt), json!({"option": "blue"})).await,
        withdraw(&s, ballot, Some(receipt)).await,
    ] {
        let p = expect_problem(res, 409).await;
        assert_eq!(p["type"], "urn:pollvote:problem:changes-locked", "{p}");
    }
    shows(&s, &poll, &[1, 0, 0], 1).await;

    let patch = |body: Value| {
        s.http
            .patch(format!("{}/api/polls/{poll}", s.poll))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let res = patch(json!({"changes": "allowed"})).await.expect("patch");
    assert_eq!(res.status(), 200);
    // The vote service learns of it when its cached poll expires.
    until_replacing_answers(&s, ballot, receipt, 200).await;
    shows(&s, &poll, &[0, 0, 1], 1).await;

    let res = s
        .http
        .post(format!("{}/api/polls/{poll}/close", s.poll))
        .bearer_auth(&token)
        .send()
        .await
        .expect("close");
    assert_eq!(res.status(), 200);
    // (Until the vote service's cached poll expires, the probe replaces the marks by themselves.)
    until_replacing_answers(&s, ballot, receipt, 409).await;
    let p = expect_problem(withdraw(&s, ballot, Some(receipt)).await, 409).await;
    assert_eq!(p["type"], "urn:pollvote:problem:poll-closed");
    assert_eq!(counts(&shows(&s, &poll, &[0, 0, 1], 1).await), vec![0, 0, 1], "final");
}

/// A ranked or score ballot is replaced in its poll's shape only, and the method's results follow.
#[tokio::test]
async fn ranked_and_score_ballots_are_replaced_in_their_own_shape() {
    let s = Stack::start().await;
    let (ranked, _) = s.simple_poll(json!({"method": "ranked", "dedupe": "none"})).await;
    let mut held = Vec::new();
    for ranking in [
        json!(["red", "green"]),
        json!(["green", "red"]),
        json!(["blue", "green"]),
    ] {
        let b: Value = s
            .vote(json!({"poll_id": ranked, "ranking": ranking}))
            .await
            .json()
            .await
            .expect("json");
        held.push(b);
    }
    assert_eq!(s.get_poll(&ranked).await["votes"]["ranked"]["winner"], "green");
    let (id, receipt) = (
        held[2]["id"].as_str().expect("id"),
        held[2]["receipt"].as_str().expect("r"),
    );
    let p = expect_problem(replace(&s, id, Some(receipt), json!({"option": "red"})).await, 422).await;
    assert_eq!(p["type"], "urn:pollvote:problem:wrong-ballot-shape");
    let p = expect_problem(
        replace(&s, id, Some(receipt), json!({"ranking": ["red", "red"]})).await,
        422,
    )
    .await;
    assert_eq!(p["type"], "urn:pollvote:problem:duplicate-option");
    let res = replace(&s, id, Some(receipt), json!({"ranking": ["red", "blue"]})).await;
    assert_eq!(res.status(), 200);
    let b: Value = res.json().await.expect("json");
    assert_eq!(b["ranking"], json!(["red", "blue"]));
    let votes = shows(&s, &ranked, &[2, 1, 0], 3).await["votes"].clone();
    assert_eq!(votes["ranked"]["winner"], "red", "{votes}");

    let (scored, _) = s.simple_poll(json!({"method": "score", "dedupe": "none"})).await;
    let b: Value = s
        .vote(json!({"poll_id": scored, "scores": {"red": 5, "blue": 1}}))
        .await
        .json()
        .await
        .expect("json");
    let (id, receipt) = (b["id"].as_str().expect("id"), b["receipt"].as_str().expect("r"));
    let p = expect_problem(replace(&s, id, Some(receipt), json!({"scores": {"red": 6}})).await, 422).await;
    assert_eq!(p["type"], "urn:pollvote:problem:score-out-of-range");
    assert!(names_field(&p, "scores.red"), "{p}");
    // `4.0` is a whole number, as JSON Schema's `integer` says.
    let res = replace(&s, id, Some(receipt), json!({"scores": {"green": 4.0}})).await;
    assert_eq!(res.status(), 200);
    let votes = shows(&s, &scored, &[0, 1, 0], 1).await["votes"].clone();
    let sums: Vec<u64> = votes["by_option"]
        .as_array()
        .expect("by_option")
        .iter()
        .map(|o| o["sum"].as_u64().expect("sum"))
        .collect();
    assert_eq!(sums, vec![0, 4, 0], "{votes}");
    assert_eq!(votes["count"], 1);
}

/// 64 concurrent replacements of one ballot, then withdrawals and new votes racing: one ballot
/// per voter at every step, and the tally equals the stored ballots.
#[tokio::test]
async fn concurrent_changes_of_one_ballot_apply_one_after_the_other() {
    let s = Stack::start().await;
    let (poll, _) = s.simple_poll(json!({"dedupe": "voter", "max_choices": 3})).await;
    let first = cast_as(&s, "carol", json!({"poll_id": poll, "option": "red"})).await;
    let (ballot, receipt) = (
        first["id"].as_str().expect("id").to_owned(),
        first["receipt"].as_str().expect("receipt").to_owned(),
    );
    let choices = [
        json!(["green"]),
        json!(["red", "blue"]),
        json!(["red", "green", "blue"]),
    ];
    let answers = futures_util::future::join_all(
        (0..64).map(|i| replace(&s, &ballot, Some(&receipt), json!({"options": choices[i % 3]}))),
    )
    .await;
    for res in answers {
        assert_eq!(res.status(), 200);
    }
    let a = audit_of(&s.http, &s.vote, &poll).await;
    assert_eq!(
        (&a["consistent"], &a["tally"]["total"]),
        (&json!(true), &json!(1)),
        "{a}"
    );
    let marked: u64 = a["tally"]["by_option"]
        .as_array()
        .expect("by_option")
        .iter()
        .filter_map(Value::as_u64)
        .sum();
    assert!([1, 2, 3].contains(&marked), "one ballot's marks: {a}");
    // Two withdrawals and two new ballots of the same voter at once.
    let (w1, w2) = tokio::join!(
        withdraw(&s, &ballot, Some(&receipt)),
        withdraw(&s, &ballot, Some(&receipt))
    );
    let mut statuses = [w1.status().as_u16(), w2.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [204, 404], "one withdrawal applies");
    let again = |option: &'static str| post_as(&s, "carol", json!({"poll_id": poll, "option": option}));
    let (a, b) = tokio::join!(again("green"), again("blue"));
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409], "one new ballot per voter");
    let a = audit_of(&s.http, &s.vote, &poll).await;
    assert_eq!(
        (&a["consistent"], &a["stored"]["total"]),
        (&json!(true), &json!(1)),
        "{a}"
    );
}

/// Voter `v{i}` of the kill -9 test votes `c` again after withdrawing, always with the same
/// Idempotency-Key (a retry gets the first answer).
async fn vote_again(
    http: &reqwest::Client,
    vote_url: &str,
    poll: &str,
    i: usize,
) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{vote_url}/api/votes"))
        .header("idempotency-key", format!("again-{i}"))
        .json(&json!({"poll_id": poll, "option": "c", "voter_id": format!("v{i}")}))
        .send()
        .await
}

/// Invariant 2 of issue 12 through `kill -9`: three times, 150 voters each change their ballot
/// once (replace it, withdraw it, or withdraw it and vote again) while the vote process is killed
/// with SIGKILL in the middle (once a random few of their answers have come back). After each restart, every ballot is in one form
/// only: the results equal what the ballots themselves show their voters (replaced marks, or 404
/// once withdrawn), each acknowledged change is there, and the audit's recount equals the tally.
#[tokio::test]
async fn changes_cut_short_by_kill_9_count_in_one_form_only() {
    const PER_ROUND: usize = 150;
    const VOTERS: usize = 3 * PER_ROUND;
    let dir = tempfile::tempdir().expect("tempdir");
    let ((poll_socket, poll_port), (vote_socket, vote_port)) = (api_tests::listener(), api_tests::listener());
    let mut env_poll = crate::vote::env_for(&dir.path().join("poll"), poll_port, vote_port);
    let mut env_vote = crate::vote::env_for(&dir.path().join("vote"), poll_port, vote_port);
    let db = format!("c{}", uuid::Uuid::new_v4().simple());
    if api_tests::mongo_uri().is_some() {
        env_poll.push(("POLLVOTE__STORAGE__DATABASE", format!("{db}_poll")));
        env_vote.push(("POLLVOTE__STORAGE__DATABASE", format!("{db}_vote")));
    }
    let _poll = api_tests::Proc::start("poll", poll_socket, &env_poll, dir.path().join("poll.log")).await;
    let mut vote = api_tests::Proc::start(
        "vote",
        vote_socket.try_clone().expect("dup"),
        &env_vote,
        dir.path().join("vote-0.log"),
    )
    .await;
    let (poll_url, vote_url) = (
        format!("http://127.0.0.1:{poll_port}"),
        format!("http://127.0.0.1:{vote_port}"),
    );
    let http = api_tests::http_client();
    let created: Value = http
        .post(format!("{poll_url}/api/polls"))
        .json(&json!({"name": "changes", "options": ["a", "b", "c"], "dedupe": "voter"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let poll = created["id"].as_str().expect("id").to_owned();
    // voter → (ballot id, receipt)
    let mut held: Vec<(String, String)> = Vec::new();
    for i in 0..VOTERS {
        let res = http
            .post(format!("{vote_url}/api/votes"))
            .json(&json!({"poll_id": poll, "option": "a", "voter_id": format!("v{i}")}))
            .send()
            .await
            .expect("vote");
        assert_eq!(res.status(), 201);
        let b: Value = res.json().await.expect("json");
        held.push((
            b["id"].as_str().expect("id").to_owned(),
            b["receipt"].as_str().expect("receipt").to_owned(),
        ));
    }
    let mut unanswered = 0;
    for round in 0..3usize {
        let voters: Vec<usize> = (round * PER_ROUND..(round + 1) * PER_ROUND).collect();
        let answered = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = voters
            .iter()
            .map(|&i| {
                let (http, vote_url, poll) = (http.clone(), vote_url.clone(), poll.clone());
                let answered = answered.clone();
                let (id, receipt) = held[i].clone();
                tokio::spawn(async move {
                    let url = format!("{vote_url}/api/votes/{id}");
                    // What the voter was told, if anything: the change's answer.
                    let told = match i % 3 {
                        0 => {
                            http.put(&url)
                                .bearer_auth(&receipt)
                                .json(&json!({"option": "b"}))
                                .send()
                                .await
                        }
                        _ => http.delete(&url).bearer_auth(&receipt).send().await,
                    };
                    let told = told.map(|r| r.status().as_u16()).ok();
                    answered.fetch_add(1, Ordering::Relaxed);
                    if i % 3 == 2
                        && told == Some(204)
                        && let Ok(r) = vote_again(&http, &vote_url, &poll, i).await
                        && r.status() == 201
                    {
                        let b: Value = r.json().await.expect("json");
                        return (
                            i,
                            told,
                            Some((
                                b["id"].as_str().expect("id").to_owned(),
                                b["receipt"].as_str().expect("r").to_owned(),
                            )),
                        );
                    }
                    (i, told, None)
                })
            })
            .collect();
        let kill_after = 5 + crate::vote::random_below(PER_ROUND as u64 / 2) as usize;
        while answered.load(Ordering::Relaxed) < kill_after {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        vote.kill9().await;
        // The restart comes before waiting for the voters: the listening socket outlives the
        // process, so a change sent after the kill waits in its backlog for the next process.
        vote = api_tests::Proc::start(
            "vote",
            vote_socket.try_clone().expect("dup"),
            &env_vote,
            dir.path().join(format!("vote-{}.log", round + 1)),
        )
        .await;
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.expect("join"));
        }
        for (i, told, again) in outcomes {
            if let Some(b) = again {
                held[i] = b;
            }
            if told.is_none() {
                unanswered += 1;
            }
        }
        // What every ballot shows its voter, summed, is what the results say. A voter whose vote
        // again went unanswered (it may be stored) sends it again with the same Idempotency-Key:
        // the first answer, or the ballot stored now.
        let mut expected = [0u64; 3];
        for (i, (id, receipt)) in held.iter_mut().enumerate() {
            let shown = http
                .get(format!("{vote_url}/api/votes/{id}"))
                .bearer_auth(&*receipt)
                .send()
                .await;
            if i % 3 == 2 && shown.expect("get").status() == 404 {
                let res = vote_again(&http, &vote_url, &poll, i).await.expect("vote");
                assert_eq!(res.status(), 201, "voter {i} votes again");
                let b: Value = res.json().await.expect("json");
                *id = b["id"].as_str().expect("id").to_owned();
                *receipt = b["receipt"].as_str().expect("receipt").to_owned();
            }
            let res = http
                .get(format!("{vote_url}/api/votes/{id}"))
                .bearer_auth(&*receipt)
                .send()
                .await
                .expect("get");
            match res.status().as_u16() {
                200 => {
                    let b: Value = res.json().await.expect("json");
                    let option = b["options"][0].as_str().expect("one option");
                    expected[usize::from(option.as_bytes()[0] - b'a')] += 1;
                    if i % 3 == 0 {
                        assert!(option == "a" || option == "b", "voter {i}: {b}");
                    }
                }
                404 => assert!(i % 3 != 0, "voter {i}'s ballot was only ever replaced"),
                other => panic!("voter {i}: {other}"),
            }
        }
        let total: u64 = expected.iter().sum();
        eventually(Duration::from_secs(10), Duration::from_millis(100), || async {
            let p: Value = http
                .get(format!("{poll_url}/api/polls/{poll}"))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            if counts(&p) == expected && p["votes"]["count"] == total {
                Ok(())
            } else {
                Err(format!(
                    "round {round}: the ballots show {expected:?}, the results {}",
                    p["votes"]
                ))
            }
        })
        .await;
        let audit = audit_of(&http, &vote_url, &poll).await;
        assert_eq!(audit["consistent"], true, "round {round}: {audit}");
        assert_eq!(audit["stored"]["total"], total, "{audit}");
    }
    eprintln!("{unanswered} of {} changes cut short by the kills", 3 * PER_ROUND);
    if let Some(uri) = api_tests::mongo_uri() {
        api_tests::drop_databases(uri, vec![format!("{db}_poll"), format!("{db}_vote")]);
    }
}
