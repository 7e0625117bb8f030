//! The vote service over real HTTP: ballots, dedupe, idempotency, concurrency, durability.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use api_tests::{Proc, Stack, eventually, expect_problem, listener, names_field, until};
use serde_json::{Value, json};

#[tokio::test]
async fn ballots_are_accepted_with_option_options_or_the_pool_id_alias() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({"max_choices": 2, "dedupe": "voter"})).await;
    let res = s.vote(json!({"poll_id": id, "option": "red", "voter_id": "a"})).await;
    assert_eq!(res.status(), 201);
    let b: Value = res.json().await.expect("json");
    assert_eq!(b["poll_id"], id.as_str());
    assert_eq!(b["options"], json!(["red"]));
    assert!(b["id"].is_string() && b["created_at"].is_string());
    let res = s
        .vote(json!({"poll_id": id, "options": ["blue", "GREEN "], "voter_id": "b"}))
        .await;
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.json::<Value>().await.expect("json")["options"],
        json!(["green", "blue"]),
        "option order, canonical text"
    );
    let res = s.vote(json!({"pool_id": id, "option": "red", "voter_id": "c"})).await;
    assert_eq!(res.status(), 201, "the predecessor's misspelt pool_id still works");
    let res = s
        .http
        .post(format!("{}/api/votes", s.vote))
        .header("x-voter-id", "d")
        .json(&json!({"poll_id": id, "option": "red"}))
        .send()
        .await
        .expect("vote");
    assert_eq!(res.status(), 201, "voter id from the header");
    let p = s.get_poll(&id).await;
    assert_eq!(p["votes"]["count"], 4);
    assert_eq!(
        p["votes"]["by_option"],
        json!([
        {"option": "red", "count": 3}, {"option": "green", "count": 1}, {"option": "blue", "count": 1}])
    );
}

#[tokio::test]
async fn bad_ballots_get_the_right_problem_and_change_nothing() {
    let s = Stack::start().await;
    let (id, token) = s.simple_poll(json!({"max_choices": 2})).await;
    let (by_voter, _) = s.simple_poll(json!({"dedupe": "voter"})).await;
    let missing = "0123456789abcdef01234567";
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"poll_id": "nope", "option": "red"}), 400, "poll_id"),
        (json!({"poll_id": {"$gt": ""}, "option": "red"}), 400, "poll_id"),
        (json!({"poll_id": id, "option": {"$ne": null}}), 400, "option"),
        (json!({"poll_id": id, "option": 3}), 400, "option"),
        (json!({"poll_id": id}), 400, "option"),
        (
            json!({"poll_id": id, "option": "red", "options": ["red"]}),
            400,
            "options",
        ),
        (json!({"poll_id": id, "options": []}), 400, "options"),
        (json!({"poll_id": id, "option": "red", "votes": 100}), 400, "votes"),
        (json!({"_id": "x", "poll_id": id, "option": "red"}), 400, "_id"),
        (json!({"poll_id": id, "pool_id": id, "option": "red"}), 400, "pool_id"),
        (json!({"option": "red"}), 400, "poll_id"),
        (json!({"poll_id": id, "option": "red", "voter_id": ""}), 400, "voter_id"),
        (
            json!({"poll_id": id, "option": "red", "voter_id": "x".repeat(129)}),
            400,
            "voter_id",
        ),
        (json!({"poll_id": by_voter, "option": "red"}), 400, "voter_id"),
        (json!({"poll_id": missing, "option": "red"}), 404, ""),
        (json!({"poll_id": id, "option": "purple"}), 422, "option"),
        (json!({"poll_id": id, "options": ["red", "purple"]}), 422, "options[1]"),
        (json!({"poll_id": id, "options": ["red", "red"]}), 422, "options[1]"),
        (
            json!({"poll_id": id, "options": ["red", "green", "blue"]}),
            422,
            "options",
        ),
        (json!([id, "red"]), 400, "body"),
    ];
    for (body, status, field) in cases {
        let p = expect_problem(s.vote(body.clone()).await, status).await;
        if !field.is_empty() {
            assert!(names_field(&p, field), "{body} should name {field}: {p}");
        }
    }
    let raw = |body: &'static str, ct: &'static str| {
        s.http
            .post(format!("{}/api/votes", s.vote))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    expect_problem(raw("{\"poll_id\": ", "application/json").await.expect("post"), 400).await;
    expect_problem(raw("{} {}", "application/json").await.expect("post"), 400).await;
    expect_problem(
        raw("poll_id=x", "application/x-www-form-urlencoded")
            .await
            .expect("post"),
        415,
    )
    .await;
    let huge = format!("{{\"poll_id\": \"{id}\", \"option\": \"{}\"}}", "x".repeat(100_000));
    let res = s
        .http
        .post(format!("{}/api/votes", s.vote))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("post");
    expect_problem(res, 413).await;
    let res = s
        .http
        .post(format!("{}/api/votes", s.vote))
        .header("idempotency-key", "")
        .json(&json!({"poll_id": id, "option": "red"}))
        .send()
        .await
        .expect("post");
    let p = expect_problem(res, 400).await;
    assert!(names_field(&p, "header.Idempotency-Key"), "{p}");

    assert_eq!(
        s.get_poll(&id).await["votes"]["count"],
        0,
        "no rejected ballot was counted"
    );
    assert_eq!(s.get_poll(&by_voter).await["votes"]["count"], 0);

    let res = s
        .http
        .post(format!("{}/api/polls/{id}/close", s.poll))
        .bearer_auth(&token)
        .send()
        .await
        .expect("close");
    assert_eq!(res.status(), 200);
    // What is under test: the vote service's cached poll expiring (poll_cache_ttl_ms = 500).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let p = expect_problem(s.vote(json!({"poll_id": id, "option": "red"})).await, 409).await;
    assert_eq!(p["type"], "urn:pollvote:problem:poll-closed");
}

#[tokio::test]
async fn dedupe_policies() {
    let s = Stack::start().await;
    let (by_ip, _) = s.simple_poll(json!({})).await;
    assert_eq!(s.vote(json!({"poll_id": by_ip, "option": "red"})).await.status(), 201);
    let p = expect_problem(
        s.vote(json!({"poll_id": by_ip, "option": "green", "voter_id": "other"}))
            .await,
        409,
    )
    .await;
    assert_eq!(p["type"], "urn:pollvote:problem:already-voted");

    let (by_voter, _) = s.simple_poll(json!({"dedupe": "voter"})).await;
    assert_eq!(
        s.vote(json!({"poll_id": by_voter, "option": "red", "voter_id": "alice"}))
            .await
            .status(),
        201
    );
    assert_eq!(
        s.vote(json!({"poll_id": by_voter, "option": "red", "voter_id": "bob"}))
            .await
            .status(),
        201
    );
    expect_problem(
        s.vote(json!({"poll_id": by_voter, "option": "blue", "voter_id": "alice"}))
            .await,
        409,
    )
    .await;

    let (none, _) = s.simple_poll(json!({"dedupe": "none"})).await;
    for _ in 0..3 {
        assert_eq!(s.vote(json!({"poll_id": none, "option": "red"})).await.status(), 201);
    }
    assert_eq!(s.get_poll(&by_ip).await["votes"]["count"], 1);
    assert_eq!(s.get_poll(&by_voter).await["votes"]["count"], 2);
    assert_eq!(s.get_poll(&none).await["votes"]["count"], 3);
}

#[tokio::test]
async fn client_addresses_come_from_the_proxy_header_only_when_trusted() {
    let s = Stack::start_with(|c| c.server.client_ip_source = shared::config::ClientIpSource::XForwardedFor).await;
    let (id, _) = s.simple_poll(json!({})).await;
    let vote_from = |ip: &'static str| {
        s.http
            .post(format!("{}/api/votes", s.vote))
            .header("x-forwarded-for", ip)
            .json(&json!({"poll_id": id, "option": "red"}))
            .send()
    };
    assert_eq!(vote_from("203.0.113.1").await.expect("vote").status(), 201);
    assert_eq!(vote_from("203.0.113.2").await.expect("vote").status(), 201);
    assert_eq!(
        vote_from("198.51.100.7, 203.0.113.2").await.expect("vote").status(),
        409,
        "the rightmost hop is the client"
    );

    let direct = Stack::start().await;
    let (id, _) = direct.simple_poll(json!({})).await;
    for (i, ip) in ["203.0.113.1", "203.0.113.2"].iter().enumerate() {
        let res = direct
            .http
            .post(format!("{}/api/votes", direct.vote))
            .header("x-forwarded-for", *ip)
            .json(&json!({"poll_id": id, "option": "red"}))
            .send()
            .await
            .expect("vote");
        assert_eq!(
            res.status(),
            if i == 0 { 201 } else { 409 },
            "untrusted headers cannot mint new voters"
        );
    }
}

#[tokio::test]
async fn idempotent_retries_return_the_first_answer_and_count_once() {
    let s = Stack::start().await;
    for dedupe in ["ip", "none"] {
        let (id, _) = s.simple_poll(json!({"dedupe": dedupe})).await;
        let send = |key: &'static str, option: &'static str| {
            s.http
                .post(format!("{}/api/votes", s.vote))
                .header("idempotency-key", key)
                .json(&json!({"poll_id": id, "option": option}))
                .send()
        };
        let first = send("k-1", "red").await.expect("vote");
        assert_eq!(first.status(), 201);
        assert!(first.headers().get("idempotent-replayed").is_none());
        let mut first: Value = first.json().await.expect("json");
        let mut receipt = first["receipt"].take();
        for _ in 0..3 {
            let again = send("k-1", "red").await.expect("vote");
            assert_eq!(again.status(), 201, "{dedupe}: a retry gets the first answer");
            assert_eq!(again.headers()["idempotent-replayed"], "true");
            let mut again: Value = again.json().await.expect("json");
            let new_receipt = again["receipt"].take();
            assert!(
                new_receipt.is_string() && new_receipt != receipt,
                "{dedupe}: a new receipt"
            );
            receipt = new_receipt;
            assert_eq!(again, first, "{dedupe}: same ballot");
        }
        let p = expect_problem(send("k-1", "blue").await.expect("vote"), 422).await;
        assert_eq!(p["type"], "urn:pollvote:problem:idempotency-key-reused");
        assert_eq!(s.get_poll(&id).await["votes"]["count"], 1, "{dedupe}: counted once");
    }
}

#[tokio::test]
async fn sixty_four_concurrent_identical_ballots_count_once() {
    let s = Arc::new(Stack::start().await);
    let (id, _) = s.simple_poll(json!({"dedupe": "voter"})).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let s = s.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            s.vote(json!({"poll_id": id, "option": "green", "voter_id": "same-voter"}))
                .await
                .status()
                .as_u16()
        }));
    }
    let mut counts: HashMap<u16, usize> = HashMap::new();
    for t in tasks {
        *counts.entry(t.await.expect("join")).or_default() += 1;
    }
    assert_eq!(counts.get(&201), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&409), Some(&63), "{counts:?}");
    let p = s.get_poll(&id).await;
    assert_eq!(p["votes"]["count"], 1);
    assert_eq!(p["votes"]["by_option"][1]["count"], 1);
}

#[tokio::test]
async fn fifteen_hundred_ballots_from_32_clients_are_tallied_exactly() {
    let s = Arc::new(Stack::start().await);
    let (id, _) = s.simple_poll(json!({"dedupe": "voter", "max_choices": 2})).await;
    let mut tasks = Vec::new();
    for client in 0..32 {
        let s = s.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = [0u64; 3];
            let mut total = 0u64;
            let names = ["red", "green", "blue"];
            let mut i = client;
            while i < 1500 {
                let options: Vec<&str> = if i % 7 == 0 {
                    vec![names[i % 3], names[(i + 1) % 3]]
                } else {
                    vec![names[i % 3]]
                };
                let res = s
                    .vote(json!({"poll_id": id, "options": options, "voter_id": format!("v{i}")}))
                    .await;
                if res.status() == 201 {
                    total += 1;
                    for o in &options {
                        accepted[names.iter().position(|n| n == o).expect("known")] += 1;
                    }
                } else {
                    panic!("ballot {i}: {}", res.status());
                }
                i += 32;
            }
            (total, accepted)
        }));
    }
    let mut total = 0;
    let mut per_option = [0u64; 3];
    for t in tasks {
        let (n, a) = t.await.expect("join");
        total += n;
        for k in 0..3 {
            per_option[k] += a[k];
        }
    }
    assert_eq!(total, 1500);
    let p = s.get_poll(&id).await;
    assert_eq!(p["votes"]["count"], total);
    for k in 0..3 {
        assert_eq!(p["votes"]["by_option"][k]["count"], per_option[k], "option {k}");
    }
}

#[tokio::test]
async fn the_poll_service_being_down_is_a_503_with_retry_after() {
    let mut s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({})).await;
    s.stop_poll().await;
    let res = s.vote(json!({"poll_id": id, "option": "red"})).await;
    assert!(res.headers().get("retry-after").is_some());
    let p = expect_problem(res, 503).await;
    assert!(p["detail"].as_str().unwrap_or("").contains("poll service"), "{p}");
    let deep: Value = s
        .http
        .get(format!("{}/health/deep", s.vote))
        .send()
        .await
        .expect("deep")
        .json()
        .await
        .expect("json");
    assert_eq!(deep["dependencies"]["poll service"]["status"], "down");
}

/// The environment of a service process started by a test; it serves on the listener it is
/// handed (`Proc::spawn`), so no port is configured.
pub(crate) fn env_for(data: &std::path::Path, poll_port: u16, vote_port: u16) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DATA_DIR", data.display().to_string()),
        ("POLL_API", format!("http://127.0.0.1:{poll_port}")),
        ("VOTE_API", format!("http://127.0.0.1:{vote_port}")),
        ("RATE_LIMIT_PER_MINUTE", "0".to_owned()),
        ("POLLVOTE__SERVER__HOST", "127.0.0.1".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ];
    if let Some(uri) = api_tests::mongo_uri() {
        env.push(("MONGODB_CONNECTION_STRING", uri));
    }
    env
}

#[tokio::test]
async fn acknowledged_ballots_survive_kill_9_and_dedupe_still_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The vote service starts again on the same port (the poll service has it): this test keeps a
    // copy of its listener.
    let ((poll_socket, poll_port), (vote_socket, vote_port)) = (listener(), listener());
    let mut env_poll = env_for(&dir.path().join("poll"), poll_port, vote_port);
    let mut env_vote = env_for(&dir.path().join("vote"), poll_port, vote_port);
    if api_tests::mongo_uri().is_some() {
        let db = format!("k{}", uuid::Uuid::new_v4().simple());
        env_poll.push(("POLLVOTE__STORAGE__DATABASE", format!("{db}_poll")));
        env_vote.push(("POLLVOTE__STORAGE__DATABASE", format!("{db}_vote")));
    }
    let poll = Proc::start("poll", poll_socket, &env_poll, dir.path().join("poll.log")).await;
    let vote_copy = vote_socket.try_clone().expect("dup");
    let mut vote = Proc::start("vote", vote_socket, &env_vote, dir.path().join("vote.log")).await;
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/api/polls", poll.url))
        .json(&json!({"name": "durable", "options": ["a", "b"], "dedupe": "voter"}))
        .send()
        .await
        .expect("create");
    let id = res.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();

    // Ballots flow concurrently; the kill lands right after the last acknowledgement.
    let mut acknowledged = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let http = http.clone();
        let url = format!("{}/api/votes", vote.url);
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let option = if i % 3 == 0 { "a" } else { "b" };
            let res = http
                .post(url)
                .json(&json!({"poll_id": id, "option": option, "voter_id": format!("v{i}")}))
                .send()
                .await;
            (i, res.map(|r| r.status().as_u16()).unwrap_or(0))
        }));
        if i % 32 == 31 {
            tokio::task::yield_now().await;
        }
    }
    for t in tasks {
        let (i, status) = t.await.expect("join");
        assert_eq!(status, 201, "ballot {i}");
        acknowledged.push(i);
    }
    vote.kill9().await;
    drop(vote);

    let vote = Proc::start("vote", vote_copy, &env_vote, dir.path().join("vote2.log")).await;
    let p: Value = http
        .get(format!("{}/api/polls/{id}", poll.url))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let n = acknowledged.len() as u64;
    assert_eq!(p["votes"]["count"], n, "every acknowledged ballot survived kill -9");
    assert_eq!(
        p["votes"]["by_option"][0]["count"],
        acknowledged.iter().filter(|i| *i % 3 == 0).count() as u64
    );
    for i in [0, 150, 299] {
        let res = http
            .post(format!("{}/api/votes", vote.url))
            .json(&json!({"poll_id": id, "option": "a", "voter_id": format!("v{i}")}))
            .send()
            .await
            .expect("vote");
        assert_eq!(res.status(), 409, "dedupe holds after restart");
    }
    let p: Value = http
        .get(format!("{}/api/polls/{id}", poll.url))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(p["votes"]["count"], n);
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ((poll_socket, poll_port), (_, vote_port)) = (listener(), listener());
    let env = env_for(&dir.path().join("poll"), poll_port, vote_port);
    let mut poll = Proc::start("poll", poll_socket, &env, dir.path().join("poll.log")).await;
    let pid = poll.child.id().expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), poll.child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
    let log = std::fs::read_to_string(&poll.log).expect("log");
    assert!(
        log.contains("shutdown signal received") && log.contains("stopped"),
        "{log}"
    );
    let served_on = format!("127.0.0.1:{poll_port}");
    assert!(
        log.lines().any(|l| l.contains("listening") && l.contains(&served_on)),
        "served on the inherited socket ({served_on}), not the default port:\n{log}"
    );
    for line in log.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "logs are JSON lines: {line}"
        );
    }
}

/// Socket activation misused: `LISTEN_FDS=1` without a listening socket as descriptor 3 stops
/// either binary at once with exit status 2, naming the problem, before it binds anything.
#[tokio::test]
async fn listen_fds_without_a_socket_stops_the_start() {
    for name in ["poll", "vote"] {
        let out = tokio::process::Command::new(api_tests::bin_path(name))
            .env_clear()
            .env("LISTEN_FDS", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains("LISTEN_FDS is set but descriptor 3 is not a listening TCP socket"),
            "{name}: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_internal_audit_compares_the_tally_with_the_stored_ballots() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({"dedupe": "none", "max_choices": 2})).await;
    for options in [json!(["red"]), json!(["red", "blue"])] {
        assert_eq!(s.vote(json!({"poll_id": id, "options": options})).await.status(), 201);
    }
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
    assert_eq!(audit["stored"]["total"], 2);
    assert_eq!(audit["stored"]["by_option"], json!([2, 0, 1]));

    // Several polls at once, in the order asked; a poll without ballots counts zero.
    let (other, _) = s.simple_poll(json!({})).await;
    assert_eq!(s.vote(json!({"poll_id": other, "option": "blue"})).await.status(), 201);
    let nobody = "0123456789abcdef0123ffff";
    let many: Value = s
        .http
        .get(format!("{}/internal/audit?ids={other},{nobody},{id}", s.vote))
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("json");
    let audits = many["audits"].as_array().expect("audits");
    let got: Vec<(&str, &Value, &Value, &Value)> = audits
        .iter()
        .map(|a| {
            (
                a["poll_id"].as_str().unwrap_or(""),
                &a["consistent"],
                &a["stored"]["total"],
                &a["tally"]["total"],
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (other.as_str(), &json!(true), &json!(1), &json!(1)),
            (nobody, &json!(true), &json!(0), &json!(0)),
            (id.as_str(), &json!(true), &json!(2), &json!(2)),
        ],
        "{many}"
    );
    let bad = s
        .http
        .get(format!("{}/internal/audit?ids={id},nope", s.vote))
        .send()
        .await
        .expect("audit");
    assert_eq!(bad.status(), 400);
}

// Found by the schemathesis fuzz (scripts/fuzz-api) or by making the OpenAPI document match
// what the server does.

#[tokio::test]
async fn ballots_match_their_schema_nulls_lengths_and_one_of_each_pair() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({"dedupe": "none", "max_choices": 2})).await;
    for (body, field) in [
        // `null` is not "absent": the schema says string or array.
        (json!({"poll_id": id, "option": "red", "options": null}), "options"),
        (json!({"poll_id": id, "option": null, "options": ["red"]}), "option"),
        (json!({"poll_id": id, "pool_id": null, "option": "red"}), "pool_id"),
        (json!({"poll_id": id, "option": "red", "voter_id": null}), "voter_id"),
        // 201 characters as sent: once matched `red` after trimming.
        (
            json!({"poll_id": id, "option": format!("red{}", " ".repeat(198))}),
            "option",
        ),
        (json!({"poll_id": id, "options": ["green", ""]}), "options[1]"),
    ] {
        let p = expect_problem(s.vote(body.clone()).await, 400).await;
        assert!(names_field(&p, field), "{body} should name {field}: {p}");
    }
    // An Idempotency-Key of two quotes is a key, not an empty quoted one (the schema's pattern).
    let res = s
        .http
        .post(format!("{}/api/votes", s.vote))
        .header("idempotency-key", "\"\"")
        .json(&json!({"poll_id": id, "option": "red"}))
        .send()
        .await
        .expect("vote");
    assert_eq!(res.status(), 201);
    assert_eq!(
        s.get_poll(&id).await["votes"]["count"],
        1,
        "only the accepted ballot counts"
    );

    let doc: Value = s
        .http
        .get(format!("{}/openapi.json", s.vote))
        .send()
        .await
        .expect("doc")
        .json()
        .await
        .expect("json");
    let ballot = &doc["components"]["schemas"]["CastBallot"]["allOf"];
    assert_eq!(ballot[0]["additionalProperties"], false);
    assert_eq!(ballot[0]["properties"]["pool_id"]["deprecated"], true);
    assert_eq!(
        ballot[1]["oneOf"],
        json!([{"type": "object", "required": ["poll_id"]}, {"type": "object", "required": ["pool_id"]}])
    );
    assert_eq!(
        ballot[2]["oneOf"],
        json!([
            {"type": "object", "required": ["option"]},
            {"type": "object", "required": ["options"]},
            {"type": "object", "required": ["ranking"]},
            {"type": "object", "required": ["scores"]},
        ])
    );
}

/// Watches a results stream; returns the highest `votes.count` seen and when it was first seen,
/// once it reaches `want` or the stream stays silent for 10 s.
async fn watch_until(res: reqwest::Response, want: u64) -> Option<std::time::Instant> {
    use futures_util::StreamExt;
    let mut body = res.bytes_stream();
    let mut buf = String::new();
    loop {
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")));
            if let Some(data) = data
                && event.contains("event: results")
            {
                let v: Value = serde_json::from_str(data).expect("event data is JSON");
                if v["votes"]["count"].as_u64() == Some(want) {
                    return Some(std::time::Instant::now());
                }
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next()).await;
        match chunk {
            Ok(Some(Ok(bytes))) => buf.push_str(std::str::from_utf8(&bytes).expect("utf-8")),
            _ => return None,
        }
    }
}

/// Issue 11: 2 poll and 3 vote processes on one MongoDB database, clients spreading their requests
/// over them. Identical ballots sent to different replicas count once; 3,000 distinct ballots
/// (one vote replica killed with SIGKILL in the middle, its clients retrying elsewhere with the
/// same Idempotency-Key) are each stored exactly once; every replica's tally is exact within
/// `tally_cache_ttl_ms` plus one aggregation of the last ballot; watchers on both poll replicas
/// see the final tally.
#[tokio::test]
async fn replicas_on_one_database_count_once_and_agree() {
    if api_tests::mongo_uri().is_none() {
        // scripts/test runs this suite again with the MongoDB backend, where CI requires the server.
        api_tests::skipped("replicas share a MongoDB database; set POLLVOTE_TEST_BACKEND=mongodb (scripts/test does)");
        return;
    }
    const TTL_MS: u64 = 500;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("r{}", uuid::Uuid::new_v4().simple());
    // The processes own their listeners: the killed vote replica's port refuses connections.
    let (poll_sockets, poll_ports): (Vec<_>, Vec<_>) = (0..2).map(|_| listener()).unzip();
    let (vote_sockets, vote_ports): (Vec<_>, Vec<_>) = (0..3).map(|_| listener()).unzip();
    let mut polls = Vec::new();
    for (i, socket) in poll_sockets.into_iter().enumerate() {
        let mut env = env_for(&dir.path().join(format!("poll{i}")), poll_ports[i], vote_ports[i]);
        env.push(("POLLVOTE__STORAGE__DATABASE", format!("{db}_poll")));
        polls.push(Proc::spawn(
            "poll",
            socket,
            &env,
            dir.path().join(format!("poll{i}.log")),
        ));
    }
    let vote_env = |i: usize| {
        let port = vote_ports[i];
        let mut env = env_for(&dir.path().join(format!("vote{i}")), poll_ports[i % 2], port);
        env.push(("POLLVOTE__STORAGE__DATABASE", format!("{db}_vote")));
        env.push(("POLLVOTE__STORAGE__TALLY_CACHE_TTL_MS", TTL_MS.to_string()));
        env
    };
    let mut votes = Vec::new();
    for (i, socket) in vote_sockets.into_iter().enumerate() {
        votes.push(Proc::spawn(
            "vote",
            socket,
            &vote_env(i),
            dir.path().join(format!("vote{i}.log")),
        ));
    }
    for p in polls.iter().chain(votes.iter()) {
        p.wait_ready(Duration::from_secs(30)).await;
    }
    let vote_urls: Vec<String> = votes.iter().map(|v| v.url.clone()).collect();
    let poll_urls: Vec<String> = polls.iter().map(|p| p.url.clone()).collect();
    let http = api_tests::http_client();
    let create = |dedupe: &'static str| {
        let http = http.clone();
        let url = format!("{}/api/polls", poll_urls[0]);
        async move {
            let res = http
                .post(url)
                .json(&json!({"name": "replicas", "options": ["a", "b", "c"], "dedupe": dedupe}))
                .send()
                .await
                .expect("create");
            assert_eq!(res.status(), 201);
            res.json::<Value>().await.expect("json")["id"]
                .as_str()
                .expect("id")
                .to_owned()
        }
    };

    // 1. 64 concurrent identical ballots spread over the three vote replicas: one counted.
    let same = create("voter").await;
    let sends = (0..64).map(|i| {
        http.post(format!("{}/api/votes", vote_urls[i % 3]))
            .json(&json!({"poll_id": same, "option": "b", "voter_id": "the-same-voter"}))
            .send()
    });
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for res in futures_util::future::join_all(sends).await {
        *statuses.entry(res.expect("vote").status().as_u16()).or_default() += 1;
    }
    assert_eq!(
        statuses.get(&201),
        Some(&1),
        "exactly one of 64 is accepted: {statuses:?}"
    );
    assert_eq!(statuses.get(&409), Some(&63), "the others are told: {statuses:?}");

    // 2. 3,000 distinct ballots from 32 clients over the vote replicas, watchers on both poll
    //    replicas, vote replica 3 killed with SIGKILL a third of the way through.
    let id = create("voter").await;
    let total = 3000u64;
    let mut watchers = Vec::new();
    for (i, url) in poll_urls.iter().cycle().take(4).enumerate() {
        let res = http
            .get(format!("{url}/api/polls/{id}/results/stream"))
            .send()
            .await
            .expect("stream");
        assert_eq!(res.status(), 200, "watcher {i}");
        watchers.push(tokio::spawn(watch_until(res, total)));
    }
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..32usize {
        let (http, urls, id) = (http.clone(), vote_urls.clone(), id.clone());
        let (next, acked, killed) = (next.clone(), acked.clone(), killed.clone());
        clients.push(tokio::spawn(async move {
            let mut by_option = [0u64; 3];
            let mut failures_on_survivors = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= total {
                    break;
                }
                let option = (n % 3) as usize;
                let name = ["a", "b", "c"][option];
                // Spread over the replicas; a ballot that fails is sent again, with the same
                // Idempotency-Key, to the next replica.
                let mut replica = (c + n as usize) % 3;
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    assert!(attempts < 50, "ballot {n} never acknowledged");
                    let res = http
                        .post(format!("{}/api/votes", urls[replica]))
                        .header("idempotency-key", format!("ballot-{n}"))
                        .json(&json!({"poll_id": id, "option": name, "voter_id": format!("voter-{n}")}))
                        .send()
                        .await;
                    match res.map(|r| r.status().as_u16()) {
                        Ok(201) => break,
                        other => {
                            if replica != 2 || !killed.load(std::sync::atomic::Ordering::SeqCst) {
                                failures_on_survivors.push((replica, format!("{other:?}")));
                            }
                            replica = (replica + 1) % 3;
                        }
                    }
                }
                by_option[option] += 1;
                acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            (by_option, failures_on_survivors)
        }));
    }
    eventually(Duration::from_secs(120), Duration::from_millis(5), || async {
        let n = acked.load(std::sync::atomic::Ordering::SeqCst);
        if n >= total / 3 {
            Ok(())
        } else {
            Err(format!("only {n} of {total} ballots acknowledged"))
        }
    })
    .await;
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    votes[2].kill9().await;
    let mut expected = [0u64; 3];
    for c in clients {
        let (by_option, failures) = c.await.expect("join");
        // Requests to replica 3 in flight at the kill may fail; the two survivors never do.
        let on_survivors: Vec<_> = failures.iter().filter(|(r, _)| *r != 2).collect();
        assert!(
            on_survivors.is_empty(),
            "the surviving replicas failed requests: {on_survivors:?}"
        );
        for (e, n) in expected.iter_mut().zip(by_option) {
            *e += n;
        }
    }
    let last_ack = std::time::Instant::now();

    // Every replica's tally (the poll replicas through their vote replica, the vote replicas
    // directly) is exact within the tally TTL plus one aggregation of the last acknowledgement.
    let bound = Duration::from_millis(TTL_MS + 1000);
    let want = json!(expected);
    let mut exact_after = Vec::new();
    for url in poll_urls.iter() {
        until(last_ack + bound, Duration::from_millis(20), || async {
            let p: Value = api_tests::get_json(&http, &format!("{url}/api/polls/{id}")).await;
            let counts: Vec<u64> = p["votes"]["by_option"]
                .as_array()
                .map(|a| a.iter().filter_map(|o| o["count"].as_u64()).collect())
                .unwrap_or_default();
            if p["votes"]["count"] == total && json!(counts) == want {
                Ok(())
            } else {
                Err(format!("{url}: not exact within {bound:?}: {p}"))
            }
        })
        .await;
        exact_after.push(last_ack.elapsed());
    }
    for url in &vote_urls[..2] {
        until(last_ack + bound, Duration::from_millis(20), || async {
            let t: Value = api_tests::get_json(&http, &format!("{url}/internal/tallies?ids={id}")).await;
            if t["tallies"][0]["total"] == total && t["tallies"][0]["by_option"] == want {
                Ok(())
            } else {
                Err(format!("{url}: not exact within {bound:?}: {t}"))
            }
        })
        .await;
        exact_after.push(last_ack.elapsed());
    }
    eprintln!("replicas exact after {exact_after:?} (bound {bound:?})");
    for w in watchers {
        let seen = w.await.expect("join").expect("a watcher saw the final tally");
        assert!(
            seen.saturating_duration_since(last_ack) < Duration::from_secs(3),
            "a watcher saw the final tally {:?} after the last ballot",
            seen.saturating_duration_since(last_ack)
        );
    }

    // At rest: the ground truth agrees, each ballot stored once, and identical ballots stay one.
    let audit: Value = api_tests::get_json(&http, &format!("{}/internal/polls/{id}/audit", vote_urls[0])).await;
    assert_eq!(audit["consistent"], true, "{audit}");
    assert_eq!(
        audit["stored"]["total"], total,
        "each ballot stored exactly once: {audit}"
    );
    assert_eq!(audit["stored"]["by_option"], want, "{audit}");
    let one: Value = api_tests::get_json(&http, &format!("{}/internal/polls/{same}/audit", vote_urls[1])).await;
    assert_eq!(one["stored"]["total"], 1, "{one}");
    assert_eq!(one["consistent"], true, "{one}");
    api_tests::drop_databases(
        api_tests::mongo_uri().expect("uri"),
        vec![format!("{db}_poll"), format!("{db}_vote")],
    );
}

/// A number below `n`, at random (a fresh UUID's bits: the tests have no RNG of their own).
pub(crate) fn random_below(n: u64) -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 % n
}

/// A ballot a client saw acknowledged (201): its number, option and the ballot id it was told.
struct Acked {
    n: u64,
    option: usize,
    id: String,
    /// It failed at least once (connection error or 5xx) before it was acknowledged.
    retried: bool,
    /// The acknowledgement was a replay: an earlier attempt had stored it (on a replica killed
    /// after its batch was written, before it answered).
    replayed: bool,
}

/// Drops the named MongoDB databases when dropped: at the end of a test, also when it fails.
struct DropDatabases(Vec<String>);

impl Drop for DropDatabases {
    fn drop(&mut self) {
        if let Some(uri) = api_tests::mongo_uri() {
            api_tests::drop_databases(uri, std::mem::take(&mut self.0));
        }
    }
}

#[derive(Default)]
struct KillClient {
    acked: Vec<Acked>,
    /// Ballots given up on without an answer: stored or not, nobody knows.
    ambiguous: Vec<(u64, usize)>,
    /// Failed attempts on a replica that was killed or restarting while they ran, as
    /// `(replica, generation when sent)`.
    in_kill_windows: Vec<(usize, u64)>,
    /// Failed attempts on a replica that was up, and stayed up, all the while.
    on_steady_replicas: Vec<String>,
}

/// Issue 16, proof 2: one poll and three vote processes on one MongoDB database, 24 clients
/// posting distinct ballots (Idempotency-Key, poll with `dedupe: none`) over the vote replicas
/// while, 24 times, after 50–400 ms at random, one vote replica picked at random is killed with
/// SIGKILL in the middle of its batches and started again (a new process on the same port and
/// database). A ballot that fails (connection error, 5xx) is sent again with the same
/// Idempotency-Key to the next replica. Then: every acknowledged ballot is stored exactly once
/// (the audit's recount equals the acknowledged ballots, ballots given up on without an answer
/// allowed either way; every ballot that failed before its acknowledgement, and a sample of the
/// others, is replayed: the first answer, same ballot id, nothing added), only requests to a
/// replica being killed or restarted ever fail, and every vote replica's tally and the poll
/// service's results equal the audit within 10 s of the last acknowledgement.
#[tokio::test]
async fn replicas_killed_mid_batch_24_times_store_each_acknowledged_ballot_once() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::time::Instant;
    if api_tests::mongo_uri().is_none() {
        // scripts/test runs this suite again with the MongoDB backend, where CI requires the server.
        api_tests::skipped("replicas share a MongoDB database; set POLLVOTE_TEST_BACKEND=mongodb (scripts/test does)");
        return;
    }
    const REPLICAS: usize = 3;
    const KILLS: usize = 24;
    const CLIENTS: usize = 24;
    const MAX_ATTEMPTS: usize = 50;
    const OPTIONS: [&str; 3] = ["a", "b", "c"];
    let bound = Duration::from_secs(10);
    let began = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("m{}", uuid::Uuid::new_v4().simple());
    let _databases = DropDatabases(vec![format!("{db}_poll"), format!("{db}_vote")]);
    // A killed replica starts again on the same port (its peers have it): the test keeps a copy of
    // each vote replica's listener, as a socket-activating supervisor would, so connections made
    // while a replica is down wait in the backlog for the next process.
    let (poll_socket, poll_port) = listener();
    let (vote_sockets, vote_ports): (Vec<_>, Vec<_>) = (0..REPLICAS).map(|_| listener()).unzip();
    let mut poll_env = env_for(&dir.path().join("poll"), poll_port, vote_ports[0]);
    poll_env.push(("POLLVOTE__STORAGE__DATABASE", format!("{db}_poll")));
    // Every process is a `Proc`: killed when dropped, so also when this test panics.
    let poll = Proc::spawn("poll", poll_socket, &poll_env, dir.path().join("poll.log"));
    let vote_env = |i: usize| {
        let mut env = env_for(&dir.path().join(format!("vote{i}")), poll_port, vote_ports[i]);
        env.push(("POLLVOTE__STORAGE__DATABASE", format!("{db}_vote")));
        env
    };
    let mut votes: Vec<Proc> = (0..REPLICAS)
        .map(|i| {
            let socket = vote_sockets[i].try_clone().expect("dup");
            Proc::spawn("vote", socket, &vote_env(i), dir.path().join(format!("vote{i}-0.log")))
        })
        .collect();
    poll.wait_ready(Duration::from_secs(30)).await;
    for v in &votes {
        v.wait_ready(Duration::from_secs(30)).await;
    }
    let vote_urls: Vec<String> = votes.iter().map(|v| v.url.clone()).collect();
    let http = api_tests::http_client();
    let res = http
        .post(format!("{}/api/polls", poll.url))
        .json(&json!({"name": "kill -9 mid-batch", "options": ["a", "b", "c"], "dedupe": "none"}))
        .send()
        .await
        .expect("create");
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();

    // A replica's generation is odd while it is killed or restarting, even while it is up.
    let generations: Arc<Vec<AtomicU64>> = Arc::new((0..REPLICAS).map(|_| AtomicU64::new(0)).collect());
    let acked_by: Arc<Vec<AtomicU64>> = Arc::new((0..REPLICAS).map(|_| AtomicU64::new(0)).collect());
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (http, urls, id) = (http.clone(), vote_urls.clone(), id.clone());
        let (generations, acked_by, next, stop) = (generations.clone(), acked_by.clone(), next.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut log = KillClient::default();
            while !stop.load(SeqCst) {
                let n = next.fetch_add(1, SeqCst);
                let option = (n % 3) as usize;
                let mut replica = (c + n as usize) % REPLICAS;
                let mut retried = false;
                let mut answer = None;
                for _ in 0..MAX_ATTEMPTS {
                    let sent_in = generations[replica].load(SeqCst);
                    let res = http
                        .post(format!("{}/api/votes", urls[replica]))
                        .header("idempotency-key", format!("ballot-{n}"))
                        .json(&json!({"poll_id": id, "option": OPTIONS[option], "voter_id": format!("voter-{n}")}))
                        .send()
                        .await;
                    let failure = match res {
                        Ok(r) if r.status() == 201 => {
                            let replayed = r.headers().contains_key("idempotent-replayed");
                            match r.json::<Value>().await {
                                Ok(b) => {
                                    answer = Some((b["id"].as_str().expect("ballot id").to_owned(), replayed));
                                    acked_by[replica].fetch_add(1, SeqCst);
                                    break;
                                }
                                Err(e) => format!("201, body lost: {e}"),
                            }
                        }
                        Ok(r) if r.status().is_server_error() => {
                            let status = r.status();
                            format!("{status}: {}", r.text().await.unwrap_or_default())
                        }
                        Ok(r) => {
                            let status = r.status();
                            panic!(
                                "ballot {n} on replica {replica}: {status} {}",
                                r.text().await.unwrap_or_default()
                            )
                        }
                        Err(e) => format!("{e:?}"),
                    };
                    let now_in = generations[replica].load(SeqCst);
                    if sent_in == now_in && sent_in % 2 == 0 {
                        log.on_steady_replicas
                            .push(format!("replica {replica}, ballot {n}: {failure}"));
                    } else {
                        log.in_kill_windows.push((replica, sent_in));
                    }
                    retried = true;
                    replica = (replica + 1) % REPLICAS;
                    // A careful client's back-off before the retry, not a wait for anything.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                match answer {
                    Some((ballot, replayed)) => log.acked.push(Acked {
                        n,
                        option,
                        id: ballot,
                        retried,
                        replayed,
                    }),
                    None => log.ambiguous.push((n, option)),
                }
            }
            log
        }));
    }

    // The kills: each lands at a random instant while ballots flow through the victim (it has
    // acknowledged some since it was started), so batches of it are in flight.
    let mut victims = Vec::new();
    let mut restart_times = Vec::new();
    for k in 0..KILLS {
        let r = random_below(REPLICAS as u64) as usize;
        let acked_before = acked_by[r].load(SeqCst);
        eventually(Duration::from_secs(10), Duration::from_millis(5), || async {
            if acked_by[r].load(SeqCst) != acked_before {
                Ok(())
            } else {
                Err(format!("kill {k}: no ballot went through replica {r} for 10 s"))
            }
        })
        .await;
        // What is under test: the kill at a random instant (50-400 ms) while ballots flow.
        tokio::time::sleep(Duration::from_millis(50 + random_below(351))).await;
        let up_generation = generations[r].fetch_add(1, SeqCst);
        votes[r].kill9().await;
        let restarting = Instant::now();
        let socket = vote_sockets[r].try_clone().expect("dup");
        votes[r] = Proc::spawn(
            "vote",
            socket,
            &vote_env(r),
            dir.path().join(format!("vote{r}-{}.log", k + 1)),
        );
        votes[r].wait_ready(Duration::from_secs(30)).await;
        generations[r].fetch_add(1, SeqCst);
        restart_times.push(restarting.elapsed());
        victims.push((r, up_generation));
    }
    stop.store(true, SeqCst);
    let mut logs = Vec::new();
    for c in clients {
        logs.push(c.await.expect("join"));
    }
    let last_ack = Instant::now();
    let acked: Vec<&Acked> = logs.iter().flat_map(|l| l.acked.iter()).collect();
    let ambiguous: Vec<(u64, usize)> = logs.iter().flat_map(|l| l.ambiguous.iter().copied()).collect();
    let on_steady: Vec<&String> = logs.iter().flat_map(|l| l.on_steady_replicas.iter()).collect();
    let in_windows: Vec<(usize, u64)> = logs.iter().flat_map(|l| l.in_kill_windows.iter().copied()).collect();
    assert!(
        on_steady.is_empty(),
        "requests failed on replicas that were up all the while: {on_steady:?}"
    );
    // Requests in flight on the victim when it was killed (sent while it was up, failed).
    let hit = victims.iter().filter(|v| in_windows.iter().any(|w| w == *v)).count();
    assert!(
        hit * 4 >= KILLS * 3,
        "only {hit} of {KILLS} kills caught requests in flight"
    );
    let mut want_min = [0u64; 3];
    for a in &acked {
        want_min[a.option] += 1;
    }
    let mut ambiguous_by = [0u64; 3];
    for (_, o) in &ambiguous {
        ambiguous_by[*o] += 1;
    }
    let retried = acked.iter().filter(|a| a.retried).count();
    let stored_by_the_dead = acked.iter().filter(|a| a.retried && a.replayed).count();
    eprintln!(
        "{} ballots acknowledged ({retried} after a failure, {stored_by_the_dead} of them stored by the killed \
         replica before it could answer), {} ambiguous, {} failed attempts in kill windows, \
         {hit}/{KILLS} kills caught requests in flight, restarts took {:?}",
        acked.len(),
        ambiguous.len(),
        in_windows.len(),
        restart_times
    );
    assert!(
        stored_by_the_dead > 0,
        "no kill landed between a batch's write and its answer (no retry was answered with a replay)"
    );
    let mut ids: Vec<&str> = acked.iter().map(|a| a.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), acked.len(), "each acknowledgement names a ballot of its own");

    // At rest, on every vote replica: the audit is consistent (the tally equals the stored
    // ballots) within the bound, and the stored ballots are the acknowledged ones, each once.
    let mut stored: Option<Value> = None;
    for url in &vote_urls {
        let audit = until(last_ack + bound, Duration::from_millis(50), || async {
            let audit = api_tests::get_json(&http, &format!("{url}/internal/polls/{id}/audit")).await;
            if audit["consistent"] == true {
                Ok(audit)
            } else {
                Err(format!(
                    "{url}: tally not equal to the stored ballots within {bound:?}: {audit}"
                ))
            }
        })
        .await;
        match &stored {
            None => stored = Some(audit["stored"].clone()),
            Some(s) => assert_eq!(&audit["stored"], s, "{url}: the replicas recount one database"),
        }
    }
    let stored = stored.expect("audited");
    let total = stored["total"].as_u64().expect("total");
    let n_acked = acked.len() as u64;
    assert!(
        total >= n_acked && total <= n_acked + ambiguous.len() as u64,
        "stored {total}, acknowledged {n_acked}, ambiguous {}: {stored}",
        ambiguous.len()
    );
    for o in 0..3 {
        let got = stored["by_option"][o].as_u64().expect("count");
        assert!(
            got >= want_min[o] && got <= want_min[o] + ambiguous_by[o],
            "option {o}: stored {got}, acknowledged {}, ambiguous {}: {stored}",
            want_min[o],
            ambiguous_by[o]
        );
    }

    // Every vote replica's tally and the poll service's results equal the audit within the bound.
    let mut exact_after = Vec::new();
    for url in &vote_urls {
        until(last_ack + bound, Duration::from_millis(50), || async {
            let t = api_tests::get_json(&http, &format!("{url}/internal/tallies?ids={id}")).await;
            if t["tallies"][0]["total"] == total && t["tallies"][0]["by_option"] == stored["by_option"] {
                Ok(())
            } else {
                Err(format!("{url}: tally {t} is not {stored} within {bound:?}"))
            }
        })
        .await;
        exact_after.push(last_ack.elapsed());
    }
    until(last_ack + bound, Duration::from_millis(50), || async {
        let p = api_tests::get_json(&http, &format!("{}/api/polls/{id}", poll.url)).await;
        let counts: Vec<u64> = p["votes"]["by_option"]
            .as_array()
            .map(|a| a.iter().filter_map(|o| o["count"].as_u64()).collect())
            .unwrap_or_default();
        if p["votes"]["count"] == total && json!(counts) == stored["by_option"] {
            Ok(())
        } else {
            Err(format!("poll service: {p} is not {stored} within {bound:?}"))
        }
    })
    .await;
    exact_after.push(last_ack.elapsed());
    eprintln!("tallies equal to the audit after {exact_after:?} (bound {bound:?})");

    // Each ballot that failed before it was acknowledged, and every 20th other one, replayed with
    // its Idempotency-Key: the first answer (the acknowledged ballot), and nothing is added.
    let replays: Vec<&&Acked> = acked.iter().filter(|a| a.retried || a.n % 20 == 0).collect();
    for chunk in replays.chunks(32) {
        let sends = chunk.iter().map(|a| {
            http.post(format!("{}/api/votes", vote_urls[(a.n as usize + 1) % REPLICAS]))
                .header("idempotency-key", format!("ballot-{}", a.n))
                .json(&json!({"poll_id": id, "option": OPTIONS[a.option], "voter_id": format!("voter-{}", a.n)}))
                .send()
        });
        for (a, res) in chunk.iter().zip(futures_util::future::join_all(sends).await) {
            let res = res.expect("replay");
            assert_eq!(res.status(), 201, "replay of ballot {}", a.n);
            assert_eq!(
                res.headers().get("idempotent-replayed").map(|v| v.as_bytes()),
                Some(&b"true"[..]),
                "ballot {} was acknowledged but not stored",
                a.n
            );
            let b: Value = res.json().await.expect("json");
            assert_eq!(
                b["id"],
                a.id.as_str(),
                "ballot {}: the stored ballot is the acknowledged one",
                a.n
            );
        }
    }
    let after = api_tests::get_json(&http, &format!("{}/internal/polls/{id}/audit", vote_urls[0])).await;
    assert_eq!(after["stored"], stored, "replays added nothing");
    eprintln!(
        "{} replays answered with the acknowledged ballot; whole test {:?}",
        replays.len(),
        began.elapsed()
    );
}

/// Issue 12: the answer that stores a ballot carries its receipt; with it, `GET /api/votes/{id}`
/// shows the ballot as counted. Without a receipt 401; a wrong receipt, another ballot's receipt
/// and an unknown ballot id all get the same 404; an idempotent retry gets a new receipt that
/// replaces the first (whose answer the client may have lost); a deleted poll's ballots are gone.
#[tokio::test]
async fn a_receipt_shows_its_ballot_as_counted_and_reveals_nothing_else() {
    let s = Stack::start().await;
    let (id, token) = s.simple_poll(json!({"dedupe": "none", "max_choices": 2})).await;
    let cast = |options: Value, key: &'static str| {
        let req = s
            .http
            .post(format!("{}/api/votes", s.vote))
            .header("idempotency-key", key)
            .json(&json!({"poll_id": id, "options": options}));
        async move { req.send().await.expect("vote") }
    };
    let res = cast(json!(["red", "blue"]), "first").await;
    assert_eq!(res.status(), 201);
    let first: Value = res.json().await.expect("json");
    let receipt = first["receipt"].as_str().expect("a receipt").to_owned();
    assert_eq!(receipt.len(), 43, "256 bits, base64url: {receipt}");
    assert!(
        receipt
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    let res = cast(json!(["green"]), "second").await;
    let second: Value = res.json().await.expect("json");
    let other_receipt = second["receipt"].as_str().expect("a receipt").to_owned();
    assert_ne!(receipt, other_receipt);

    let check = |ballot: String, receipt: Option<String>| {
        let mut req = s.http.get(format!("{}/api/votes/{ballot}", s.vote));
        if let Some(r) = receipt {
            req = req.bearer_auth(r);
        }
        async move { req.send().await.expect("check") }
    };
    let ballot = first["id"].as_str().expect("id").to_owned();
    let res = check(ballot.clone(), Some(receipt.clone())).await;
    assert_eq!(res.status(), 200);
    let counted: Value = res.json().await.expect("json");
    let mut expected = first.clone();
    expected.as_object_mut().expect("object").remove("receipt");
    assert_eq!(counted, expected, "the ballot as stored, without its receipt");

    let missing = expect_problem(check(ballot.clone(), None).await, 401).await;
    assert!(
        missing["detail"].as_str().is_some_and(|d| d.contains("receipt")),
        "{missing}"
    );
    let wrong = expect_problem(check(ballot.clone(), Some("x".repeat(43))).await, 404).await;
    let crossed = expect_problem(check(ballot.clone(), Some(other_receipt.clone())).await, 404).await;
    let unknown = expect_problem(
        check(uuid::Uuid::new_v4().to_string(), Some(receipt.clone())).await,
        404,
    )
    .await;
    assert_eq!(
        (&wrong, &crossed),
        (&unknown, &unknown),
        "one answer for all three: nothing revealed"
    );

    let replay = cast(json!(["red", "blue"]), "first").await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replayed: Value = replay.json().await.expect("json");
    assert_eq!(replayed["id"], first["id"]);
    let receipt = {
        let reissued = replayed["receipt"].as_str().expect("a new receipt").to_owned();
        assert_ne!(reissued, receipt);
        assert_eq!(
            check(ballot.clone(), Some(receipt.clone())).await.status(),
            404,
            "the first receipt is replaced"
        );
        reissued
    };
    assert_eq!(check(ballot.clone(), Some(receipt.clone())).await.status(), 200);

    let res = s
        .http
        .delete(format!("{}/api/polls/{id}", s.poll))
        .bearer_auth(&token)
        .send()
        .await
        .expect("delete");
    assert_eq!(res.status(), 204);
    eventually(Duration::from_secs(5), Duration::from_millis(100), || async {
        match check(ballot.clone(), Some(receipt.clone())).await.status().as_u16() {
            404 => Ok(()),
            other => Err(format!("a deleted poll's ballot answered {other}")),
        }
    })
    .await;
}
