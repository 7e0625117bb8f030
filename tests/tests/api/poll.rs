//! The poll service over real HTTP (with the vote service beside it), plus the operational
//! surface both services share.

use std::time::{Duration, Instant};

use api_tests::{Proc, Stack, eventually, expect_problem, header, listener, names_field, skip, until};
use futures_util::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn create_returns_the_poll_its_location_and_an_admin_token_once() {
    let s = Stack::start().await;
    let res = s
        .http
        .post(format!("{}/api/polls", s.poll))
        .json(
            &json!({"name": " Lunch ", "desc": "where?", "options": ["Pizza", " Sushi "], "max_choices": 2,
                      "results": "after_close", "dedupe": "voter"}),
        )
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().expect("location").to_owned();
    let body: Value = res.json().await.expect("json");
    let id = body["id"].as_str().expect("id");
    assert_eq!(location, format!("/api/polls/{id}"));
    assert_eq!(body["name"], "Lunch", "names are trimmed");
    assert_eq!(
        body["options"],
        json!(["Pizza", "Sushi"]),
        "options stay a list of strings, trimmed"
    );
    assert_eq!(body["max_choices"], 2);
    assert_eq!(body["results"], "after_close");
    assert_eq!(body["dedupe"], "voter");
    assert_eq!(body["status"], "open");
    assert!(body["admin_token"].as_str().is_some_and(|t| t.len() >= 40));
    assert!(body["created_at"].is_string());

    let got = s.get_poll(id).await;
    assert!(
        got.get("admin_token").is_none(),
        "the admin token is shown only at creation"
    );
    assert_eq!(
        got["votes"],
        Value::Null,
        "after_close hides counts from the public while open"
    );

    // Defaults, and the predecessor's minimal shape.
    let (v, _) = s
        .create_poll(json!({"name": "n", "desc": "d", "options": ["a", "b"]}))
        .await;
    assert_eq!(v["max_choices"], 1);
    assert_eq!(v["results"], "always");
    assert_eq!(v["dedupe"], "ip");
    assert_eq!(
        v["votes"],
        json!({"count": 0, "by_option": [{"option": "a", "count": 0}, {"option": "b", "count": 0}]})
    );
}

#[tokio::test]
async fn invalid_polls_are_rejected_naming_every_field_and_nothing_is_stored() {
    let s = Stack::start().await;
    let post = |body: Value| s.http.post(format!("{}/api/polls", s.poll)).json(&body).send();
    let past = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let p = expect_problem(
        post(json!({"name": "  ", "desc": "x".repeat(2001), "options": ["a", " A", ""], "max_choices": 4, "closes_at": past}))
            .await
            .expect("post"),
        400,
    )
    .await;
    for field in ["name", "desc", "options[1]", "options[2]", "max_choices", "closes_at"] {
        assert!(names_field(&p, field), "{field} not named: {p}");
    }
    let cases = [
        (json!({"name": "n", "options": ["a"]}), "options"),
        (
            json!({"name": "n", "options": (0..21).map(|i| i.to_string()).collect::<Vec<_>>()}),
            "options",
        ),
        (json!({"name": "x".repeat(201), "options": ["a", "b"]}), "name"),
        (json!({"name": "n", "options": ["a", "x".repeat(201)]}), "options[1]"),
        (json!({"name": {"$gt": ""}, "options": ["a", "b"]}), "name"),
        (json!({"name": "n", "options": ["a", {"$gt": ""}]}), "options[1]"),
        (
            json!({"name": "n", "options": ["a", "b"], "votes": {"count": 100}}),
            "votes",
        ),
        (json!({"_id": "x", "name": "n", "options": ["a", "b"]}), "_id"),
        (
            json!({"name": "n", "options": ["a", "b"], "max_choices": "two"}),
            "max_choices",
        ),
        (
            json!({"name": "n", "options": ["a", "b"], "results": "sometimes"}),
            "results",
        ),
        (
            json!({"name": "n", "options": ["a", "b"], "dedupe": "cookie"}),
            "dedupe",
        ),
        (
            json!({"name": "n", "options": ["a", "b"], "closes_at": "tomorrow"}),
            "closes_at",
        ),
        (json!({"options": ["a", "b"]}), "body"),
        (json!(["a", "b"]), "body"),
    ];
    for (body, field) in cases {
        let p = expect_problem(post(body.clone()).await.expect("post"), 400).await;
        assert!(names_field(&p, field), "{body} should name {field}: {p}");
    }
    // Unknown fields are named in the message.
    let p = expect_problem(
        post(json!({"name": "n", "options": ["a", "b"], "votes": 1}))
            .await
            .expect("post"),
        400,
    )
    .await;
    assert!(p["detail"].as_str().unwrap_or("").contains("votes"), "{p}");

    // Malformed JSON, wrong content type, oversize body.
    let res = s
        .http
        .post(format!("{}/api/polls", s.poll))
        .header("content-type", "application/json")
        .body("{\"name\": \"n\", ")
        .send()
        .await
        .expect("post");
    let p = expect_problem(res, 400).await;
    assert_eq!(p["type"], "urn:pollvote:problem:malformed-json");
    let res = s
        .http
        .post(format!("{}/api/polls", s.poll))
        .body("name=n")
        .send()
        .await
        .expect("post");
    expect_problem(res, 415).await;
    let huge = json!({"name": "n", "desc": "x".repeat(200_000), "options": ["a", "b"]});
    expect_problem(post(huge).await.expect("post"), 413).await;

    let list: Value = s
        .http
        .get(format!("{}/api/polls", s.poll))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list, json!([]), "no rejected poll was stored");
}

#[tokio::test]
async fn listing_is_newest_first_with_cursor_pages_and_a_status_filter() {
    let s = Stack::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (v, token) = s
            .create_poll(json!({"name": format!("p{i}"), "options": ["a", "b"]}))
            .await;
        let id = v["id"].as_str().expect("id").to_owned();
        if i == 1 {
            let res = s
                .http
                .post(format!("{}/api/polls/{id}/close", s.poll))
                .bearer_auth(&token)
                .send()
                .await
                .expect("close");
            assert_eq!(res.status(), 200);
        }
        ids.push(id);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut url = format!("{}/api/polls?limit=2", s.poll);
    let mut pages = 0;
    loop {
        let res = s.http.get(&url).send().await.expect("list");
        assert_eq!(res.status(), 200);
        let next = res.headers().get("link").map(|v| v.to_str().expect("link").to_owned());
        let page: Vec<Value> = res.json().await.expect("json");
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|p| p["id"].as_str().expect("id").to_owned()));
        assert!(
            page.iter().all(|p| p["votes"]["count"] == 0),
            "listed polls carry their counts"
        );
        pages += 1;
        match next {
            Some(link) => {
                assert!(link.ends_with("; rel=\"next\""), "{link}");
                let target = link.trim_start_matches('<').split('>').next().expect("target");
                assert!(target.starts_with("/api/polls?"), "{target}");
                url = format!("{}{target}", s.poll);
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "newest first, every poll once");

    let closed: Vec<Value> = s
        .http
        .get(format!("{}/api/polls?status=closed", s.poll))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0]["id"], ids[3].as_str());
    let open: Vec<Value> = s
        .http
        .get(format!("{}/api/polls?status=open&limit=100", s.poll))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(open.len(), 4);
    assert!(open.iter().all(|p| p["status"] == "open"));

    for (q, field) in [
        ("limit=0", "query.limit"),
        ("limit=101", "query.limit"),
        ("limit=ten", "query.limit"),
        ("cursor=not-a-cursor", "query.cursor"),
        ("status=pending", "query.status"),
    ] {
        let p = expect_problem(
            s.http
                .get(format!("{}/api/polls?{q}", s.poll))
                .send()
                .await
                .expect("list"),
            400,
        )
        .await;
        assert!(names_field(&p, field), "{q}: {p}");
    }
}

#[tokio::test]
async fn get_shows_counts_per_option_and_rejects_bad_ids() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({"max_choices": 2, "dedupe": "none"})).await;
    for options in [json!(["red"]), json!(["red", "blue"]), json!(["blue"])] {
        assert_eq!(s.vote(json!({"poll_id": id, "options": options})).await.status(), 201);
    }
    let p = s.get_poll(&id).await;
    assert_eq!(
        p["votes"],
        json!({"count": 3, "by_option": [
            {"option": "red", "count": 2}, {"option": "green", "count": 0}, {"option": "blue", "count": 2}]})
    );
    assert_eq!(p["options"], json!(["red", "green", "blue"]));
    let upper = s.get_poll(&id.to_uppercase()).await;
    assert_eq!(upper["id"], id.as_str(), "ids are case-insensitive hex");

    for bad in ["nope", "123", "zzzzzzzzzzzzzzzzzzzzzzzz", "%7B%22%24gt%22%3A%22%22%7D"] {
        let p = expect_problem(
            s.http
                .get(format!("{}/api/polls/{bad}", s.poll))
                .send()
                .await
                .expect("get"),
            400,
        )
        .await;
        assert!(names_field(&p, "id"), "{p}");
    }
    let missing = "0123456789abcdef01234567";
    expect_problem(
        s.http
            .get(format!("{}/api/polls/{missing}", s.poll))
            .send()
            .await
            .expect("get"),
        404,
    )
    .await;
}

#[tokio::test]
async fn results_visibility_follows_the_poll_setting() {
    let s = Stack::start().await;
    let (after_vote, _) = s.simple_poll(json!({"results": "after_vote"})).await;
    assert_eq!(s.get_poll(&after_vote).await["votes"], Value::Null);
    assert_eq!(
        s.vote(json!({"poll_id": after_vote, "option": "red"})).await.status(),
        201
    );
    assert_eq!(
        s.get_poll(&after_vote).await["votes"]["count"],
        1,
        "the voter (same address) now sees counts"
    );

    let (by_voter, _) = s.simple_poll(json!({"results": "after_vote", "dedupe": "voter"})).await;
    assert_eq!(
        s.vote(json!({"poll_id": by_voter, "option": "red", "voter_id": "alice"}))
            .await
            .status(),
        201
    );
    let seen = |voter: &'static str| {
        let url = format!("{}/api/polls/{by_voter}", s.poll);
        let http = s.http.clone();
        async move {
            let v: Value = http
                .get(url)
                .header("x-voter-id", voter)
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            v["votes"].clone()
        }
    };
    assert_eq!(seen("alice").await["count"], 1);
    // Bob shares alice's address here, so he counts as having voted on address-keyed checks;
    // what matters is that a voter id alone unlocks the counts for its voter.
    let q: Value = s
        .http
        .get(format!("{}/api/polls/{by_voter}?voter_id=alice", s.poll))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(q["votes"]["count"], 1);

    let (after_close, token) = s.simple_poll(json!({"results": "after_close"})).await;
    assert_eq!(
        s.vote(json!({"poll_id": after_close, "option": "green"}))
            .await
            .status(),
        201
    );
    assert_eq!(
        s.get_poll(&after_close).await["votes"],
        Value::Null,
        "hidden while open, even from voters"
    );
    let admin: Value = s
        .http
        .get(format!("{}/api/polls/{after_close}", s.poll))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(admin["votes"]["count"], 1, "the admin always sees counts");
    let res = s
        .http
        .post(format!("{}/api/polls/{after_close}/close", s.poll))
        .bearer_auth(&token)
        .send()
        .await
        .expect("close");
    assert_eq!(res.status(), 200);
    assert_eq!(
        s.get_poll(&after_close).await["votes"]["by_option"][1]["count"],
        1,
        "shown once closed"
    );
}

#[tokio::test]
async fn admin_operations_need_the_token_and_options_freeze_after_the_first_vote() {
    let s = Stack::start().await;
    let (id, token) = s.simple_poll(json!({})).await;
    let url = format!("{}/api/polls/{id}", s.poll);

    let p = expect_problem(
        s.http
            .patch(&url)
            .json(&json!({"name": "x"}))
            .send()
            .await
            .expect("patch"),
        401,
    )
    .await;
    assert_eq!(p["type"], "urn:pollvote:problem:unauthorized");
    let res = s
        .http
        .patch(&url)
        .bearer_auth("wrong")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(
        res.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or("")),
        Some("Bearer")
    );
    expect_problem(res, 401).await;
    expect_problem(s.http.delete(&url).send().await.expect("delete"), 401).await;
    expect_problem(
        s.http
            .post(format!("{url}/close"))
            .bearer_auth("nope")
            .send()
            .await
            .expect("close"),
        401,
    )
    .await;
    let other = "0123456789abcdef01234567";
    expect_problem(
        s.http
            .patch(format!("{}/api/polls/{other}", s.poll))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await
            .expect("patch"),
        404,
    )
    .await;

    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let res = s
        .http
        .patch(&url)
        .bearer_auth(&token)
        .json(&json!({"name": "Renamed", "options": ["cyan", "magenta"], "closes_at": future}))
        .send()
        .await
        .expect("patch");
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.expect("json");
    assert_eq!(v["name"], "Renamed");
    assert_eq!(v["options"], json!(["cyan", "magenta"]));
    assert!(v["closes_at"].is_string());
    let res = s
        .http
        .patch(&url)
        .bearer_auth(&token)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"closes_at": null}"#)
        .send()
        .await
        .expect("patch");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<Value>().await.expect("json")["closes_at"],
        Value::Null,
        "null removes the closing time"
    );

    let p = expect_problem(
        s.http
            .patch(&url)
            .bearer_auth(&token)
            .json(&json!({"options": ["x", "X"], "max_choices": 5}))
            .send()
            .await
            .expect("patch"),
        400,
    )
    .await;
    assert!(names_field(&p, "options[1]") && names_field(&p, "max_choices"), "{p}");
    expect_problem(
        s.http
            .patch(&url)
            .bearer_auth(&token)
            .json(&json!({"votes": 3}))
            .send()
            .await
            .expect("patch"),
        400,
    )
    .await;

    assert_eq!(s.vote(json!({"poll_id": id, "option": "cyan"})).await.status(), 201);
    let p = expect_problem(
        s.http
            .patch(&url)
            .bearer_auth(&token)
            .json(&json!({"options": ["a", "b"]}))
            .send()
            .await
            .expect("patch"),
        409,
    )
    .await;
    assert_eq!(p["type"], "urn:pollvote:problem:votes-exist");
    let res = s
        .http
        .patch(&url)
        .bearer_auth(&token)
        .json(&json!({"desc": "still editable"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(res.status(), 200, "text other than options may change");
    assert_eq!(s.get_poll(&id).await["options"], json!(["cyan", "magenta"]));

    // Close twice: idempotent, same closing time.
    let first: Value = s
        .http
        .post(format!("{url}/close"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("close")
        .json()
        .await
        .expect("json");
    let second = s
        .http
        .post(format!("{url}/close"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("close");
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.expect("json");
    assert_eq!(first["status"], "closed");
    assert_eq!(first["closed_at"], second["closed_at"]);
    expect_problem(
        s.http
            .patch(&url)
            .bearer_auth(&token)
            .json(&json!({"name": "late"}))
            .send()
            .await
            .expect("patch"),
        409,
    )
    .await;

    let res = s.http.delete(&url).bearer_auth(&token).send().await.expect("delete");
    assert_eq!(res.status(), 204);
    expect_problem(s.http.get(&url).send().await.expect("get"), 404).await;
    expect_problem(
        s.http.delete(&url).bearer_auth(&token).send().await.expect("delete"),
        404,
    )
    .await;
}

#[tokio::test]
async fn concurrent_patches_of_different_fields_all_land_and_a_close_is_never_undone() {
    let s = Stack::start().await;
    let (id, token) = s.simple_poll(json!({})).await;
    let url = format!("{}/api/polls/{id}", s.poll);
    // Three merge patches of different fields at once, 50 rounds: none is lost.
    for round in 0..50 {
        let later = (chrono::Utc::now() + chrono::Duration::days(1 + round)).to_rfc3339();
        let patches = [
            json!({"name": format!("name {round}")}),
            json!({"desc": format!("desc {round}")}),
            json!({"closes_at": later}),
        ];
        let sends = patches
            .iter()
            .map(|p| s.http.patch(&url).bearer_auth(&token).json(p).send());
        for res in futures_util::future::join_all(sends).await {
            let res = res.expect("patch");
            assert_eq!(
                res.status(),
                200,
                "round {round}: {}",
                res.text().await.unwrap_or_default()
            );
        }
        let stored = s.get_poll(&id).await;
        assert_eq!(stored["name"], format!("name {round}"), "round {round}: {stored}");
        assert_eq!(stored["desc"], format!("desc {round}"), "round {round}: {stored}");
        let closes_at =
            chrono::DateTime::parse_from_rfc3339(stored["closes_at"].as_str().expect("closes_at")).expect("rfc3339");
        let later = chrono::DateTime::parse_from_rfc3339(&later).expect("rfc3339");
        assert_eq!(closes_at, later, "round {round}: {stored}");
    }

    // A close racing patches: the poll ends closed, every patch is either applied before it (200)
    // or refused after it (409 poll-closed), and nothing later reopens it.
    for round in 0..20 {
        let (id, token) = s.simple_poll(json!({})).await;
        let url = format!("{}/api/polls/{id}", s.poll);
        let patches = (0..4).map(|i| {
            s.http
                .patch(&url)
                .bearer_auth(&token)
                .json(&json!({"name": format!("patch {i}"), "closes_at": null}))
                .send()
        });
        let close = s.http.post(format!("{url}/close")).bearer_auth(&token).send();
        let (closed, patched) = tokio::join!(close, futures_util::future::join_all(patches));
        assert_eq!(closed.expect("close").status(), 200, "round {round}");
        for res in patched {
            let res = res.expect("patch");
            match res.status().as_u16() {
                200 => {}
                409 => {
                    let problem = expect_problem(res, 409).await;
                    assert!(
                        problem["type"].as_str().is_some_and(|t| t.ends_with("poll-closed")),
                        "round {round}: {problem}"
                    );
                }
                other => panic!("round {round}: patch answered {other}"),
            }
        }
        let stored = s.get_poll(&id).await;
        assert_eq!(
            stored["status"], "closed",
            "round {round}: a patch resurrected the poll: {stored}"
        );
        let after = s
            .http
            .patch(&url)
            .bearer_auth(&token)
            .json(&json!({"closes_at": null}))
            .send()
            .await
            .expect("patch");
        expect_problem(after, 409).await;
        assert_eq!(s.get_poll(&id).await["status"], "closed");
    }
}

#[tokio::test]
async fn closing_or_deleting_stops_ballots_within_a_second() {
    let s = Stack::start().await;
    for action in ["close", "delete"] {
        let (id, token) = s.simple_poll(json!({"dedupe": "none"})).await;
        // Warm the vote service's cache of the poll.
        assert_eq!(s.vote(json!({"poll_id": id, "option": "red"})).await.status(), 201);
        let url = format!("{}/api/polls/{id}", s.poll);
        let res = match action {
            "close" => s.http.post(format!("{url}/close")).bearer_auth(&token).send().await,
            _ => s.http.delete(&url).bearer_auth(&token).send().await,
        }
        .expect("admin call");
        assert!(res.status().is_success());
        let started = Instant::now();
        let expected = if action == "close" { 409 } else { 404 };
        until(started + Duration::from_secs(1), Duration::from_millis(20), || async {
            let status = s.vote(json!({"poll_id": id, "option": "red"})).await.status().as_u16();
            if status == expected {
                return Ok(());
            }
            assert_eq!(status, 201);
            Err(format!("{action}: ballots still accepted after 1 s"))
        })
        .await;
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}

#[tokio::test]
async fn closes_at_is_enforced_at_vote_time() {
    let s = Stack::start().await;
    let soon = (chrono::Utc::now() + chrono::Duration::milliseconds(1500)).to_rfc3339();
    let (id, _) = s.simple_poll(json!({"closes_at": soon})).await;
    assert_eq!(s.vote(json!({"poll_id": id, "option": "red"})).await.status(), 201);
    // What is under test: the clock passing `closes_at` (nothing else happens to wait for).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let p = expect_problem(
        s.vote(json!({"poll_id": id, "option": "red", "voter_id": "late"}))
            .await,
        409,
    )
    .await;
    assert_eq!(p["type"], "urn:pollvote:problem:poll-closed");
    assert_eq!(s.get_poll(&id).await["status"], "closed");
}

#[tokio::test]
async fn live_results_stream_the_counts_as_they_change() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({"dedupe": "none"})).await;
    let res = s
        .http
        .get(format!("{}/api/polls/{id}/results/stream", s.poll))
        .send()
        .await
        .expect("stream");
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/event-stream")
    );
    let mut body = res.bytes_stream();
    let mut buf = String::new();
    let mut next_event = async || -> Value {
        loop {
            if let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                if let Some(data) = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                {
                    assert!(event.contains("event: results"), "{event}");
                    return serde_json::from_str(data).expect("event data is JSON");
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(3), body.next())
                .await
                .expect("an event in time");
            buf.push_str(std::str::from_utf8(&chunk.expect("stream open").expect("chunk")).expect("utf-8"));
        }
    };
    let first = next_event().await;
    assert_eq!(first["votes"]["count"], 0);
    let cast_at = Instant::now();
    assert_eq!(s.vote(json!({"poll_id": id, "option": "green"})).await.status(), 201);
    let second = next_event().await;
    assert!(
        cast_at.elapsed() < Duration::from_secs(1),
        "update took {:?}",
        cast_at.elapsed()
    );
    assert_eq!(second["votes"]["count"], 1);
    assert_eq!(second["votes"]["by_option"][1], json!({"option": "green", "count": 1}));

    expect_problem(
        s.http
            .get(format!("{}/api/polls/bad/results/stream", s.poll))
            .send()
            .await
            .expect("stream"),
        400,
    )
    .await;
    expect_problem(
        s.http
            .get(format!("{}/api/polls/0123456789abcdef01234567/results/stream", s.poll))
            .send()
            .await
            .expect("stream"),
        404,
    )
    .await;
}

#[tokio::test]
async fn the_predecessors_count_bump_does_not_exist() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({})).await;
    for body in [json!({"id": id}), json!({"poll_id": id}), json!({})] {
        let res = s
            .http
            .patch(format!("{}/api/polls/inc", s.poll))
            .json(&body)
            .send()
            .await
            .expect("patch");
        assert!(res.status().is_client_error(), "{}", res.status());
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap_or("")
                .starts_with("application/problem+json")
        );
    }
    assert_eq!(s.get_poll(&id).await["votes"]["count"], 0);
}

#[tokio::test]
async fn the_vote_service_being_down_is_a_503_with_retry_after() {
    let mut s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({})).await;
    s.stop_vote().await;
    let started = Instant::now();
    let res = s
        .http
        .get(format!("{}/api/polls/{id}", s.poll))
        .send()
        .await
        .expect("get");
    assert!(res.headers().get("retry-after").is_some());
    let p = expect_problem(res, 503).await;
    assert!(p["detail"].as_str().unwrap_or("").contains("vote service"), "{p}");
    assert!(started.elapsed() < Duration::from_secs(3), "fails fast");
    let deep = s
        .http
        .get(format!("{}/health/deep", s.poll))
        .send()
        .await
        .expect("deep");
    assert_eq!(deep.status(), 503);
    let deep: Value = deep.json().await.expect("json");
    assert_eq!(deep["dependencies"]["vote service"]["status"], "down", "{deep}");
    assert_eq!(deep["dependencies"]["database"]["status"], "up");
    let ready = s.http.get(format!("{}/readyz", s.poll)).send().await.expect("ready");
    assert_eq!(ready.status(), 200, "readiness does not follow dependencies");
    // A results stream waits for the shared reader's first snapshot, which cannot come: 503
    // with Retry-After, within the request timeout.
    let started = Instant::now();
    let res = s
        .http
        .get(format!("{}/api/polls/{id}/results/stream", s.poll))
        .send()
        .await
        .expect("stream");
    assert!(res.headers().get("retry-after").is_some());
    expect_problem(res, 503).await;
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[tokio::test]
async fn operational_endpoints_answer_on_both_services() {
    let s = Stack::start().await;
    for base in [&s.poll, &s.vote] {
        for path in ["/", "/healthz", "/readyz"] {
            let res = s.http.get(format!("{base}{path}")).send().await.expect("probe");
            assert_eq!(res.status(), 200, "{base}{path}");
        }
        let deep: Value = s
            .http
            .get(format!("{base}/health/deep"))
            .send()
            .await
            .expect("deep")
            .json()
            .await
            .expect("json");
        assert_eq!(deep["status"], "ok", "{deep}");
        assert_eq!(deep["dependencies"]["database"]["status"], "up");

        let res = s
            .http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .expect("openapi");
        assert_eq!(res.status(), 200);
        let doc: Value = res.json().await.expect("json");
        assert!(
            doc["openapi"].as_str().unwrap_or("").starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        for path in ["/", "/healthz", "/readyz", "/health/deep", "/metrics"] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing from the spec");
        }
        assert!(
            doc["paths"]
                .as_object()
                .expect("paths")
                .keys()
                .all(|p| !p.starts_with("/internal")),
            "internal paths stay out"
        );

        let res = s.http.get(format!("{base}/docs/")).send().await.expect("docs");
        assert_eq!(res.status(), 200);
        let html = res.text().await.expect("html");
        assert!(html.contains("swagger-ui"), "docs page");
        assert!(
            !html.contains("https://"),
            "the API browser loads nothing from the internet"
        );
        for asset in ["swagger-ui.css", "swagger-ui-bundle.js", "swagger-initializer.js"] {
            let res = s.http.get(format!("{base}/docs/{asset}")).send().await.expect("asset");
            assert_eq!(res.status(), 200, "{asset} is served by the service");
        }

        let metrics = s
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(
            metrics.contains("http_server_request_duration_seconds_count{"),
            "{metrics}"
        );
        assert!(metrics.contains("http_route=\"/healthz\""), "labelled by matched route");

        let res = s.http.get(format!("{base}/no/such/thing")).send().await.expect("404");
        expect_problem(res, 404).await;
        let res = s.http.put(format!("{base}/healthz")).send().await.expect("405");
        expect_problem(res, 405).await;
    }
    let poll_doc: Value = s
        .http
        .get(format!("{}/openapi.json", s.poll))
        .send()
        .await
        .expect("doc")
        .json()
        .await
        .expect("json");
    for path in [
        "/api/polls",
        "/api/polls/{id}",
        "/api/polls/{id}/close",
        "/api/polls/{id}/results/stream",
    ] {
        assert!(poll_doc["paths"].get(path).is_some(), "{path} missing");
    }
    let create = &poll_doc["paths"]["/api/polls"]["post"]["responses"];
    for code in ["201", "400", "413", "415", "429", "503"] {
        assert!(create.get(code).is_some(), "POST /api/polls does not document {code}");
    }
    let vote_doc: Value = s
        .http
        .get(format!("{}/openapi.json", s.vote))
        .send()
        .await
        .expect("doc")
        .json()
        .await
        .expect("json");
    let cast = &vote_doc["paths"]["/api/votes"]["post"]["responses"];
    for code in ["201", "400", "404", "409", "413", "415", "422", "429", "503"] {
        assert!(cast.get(code).is_some(), "POST /api/votes does not document {code}");
    }
}

#[tokio::test]
async fn request_ids_cors_and_compression() {
    let s = Stack::start().await;
    let res = s.http.get(format!("{}/healthz", s.poll)).send().await.expect("get");
    let id = res.headers()["x-request-id"].to_str().expect("id").to_owned();
    assert_eq!(id.len(), 36, "a generated UUID: {id}");
    let res = s
        .http
        .get(format!("{}/healthz", s.poll))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .expect("get");
    assert_eq!(
        res.headers()["x-request-id"],
        "abc-123",
        "a caller's request id is kept"
    );

    let res = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/api/votes", s.vote))
        .header("origin", "https://example.org")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,idempotency-key")
        .send()
        .await
        .expect("preflight");
    assert!(res.status().is_success());
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    let allowed = res.headers()["access-control-allow-headers"]
        .to_str()
        .expect("headers")
        .to_ascii_lowercase();
    assert!(allowed.contains("idempotency-key"), "{allowed}");

    for i in 0..30 {
        s.create_poll(json!({"name": format!("poll number {i}"), "options": ["yes", "no"]}))
            .await;
    }
    let raw = reqwest::Client::builder().no_gzip().build().expect("client");
    let res = raw
        .get(format!("{}/api/polls?limit=30", s.poll))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("get");
    assert_eq!(
        res.headers().get("content-encoding").map(|v| v.to_str().unwrap_or("")),
        Some("gzip")
    );
}

#[tokio::test]
async fn writes_are_rate_limited_per_client() {
    let s = Stack::start_with(|c| c.rate_limit.writes_per_minute = 3).await;
    for i in 0..3 {
        s.create_poll(json!({"name": format!("p{i}"), "options": ["a", "b"]}))
            .await;
    }
    let res = s
        .http
        .post(format!("{}/api/polls", s.poll))
        .json(&json!({"name": "p", "options": ["a", "b"]}))
        .send()
        .await
        .expect("post");
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    expect_problem(res, 429).await;
    let res = s.http.get(format!("{}/api/polls", s.poll)).send().await.expect("get");
    assert_eq!(res.status(), 200, "reads are not limited");
}

#[tokio::test]
async fn front_door_id_is_enforced_except_on_probes() {
    let s = Stack::start_with(|c| c.server.front_door_id = "fd-123".into()).await;
    expect_problem(
        s.http.get(format!("{}/api/polls", s.poll)).send().await.expect("get"),
        403,
    )
    .await;
    expect_problem(
        s.http
            .get(format!("{}/api/polls", s.poll))
            .header("x-azure-fdid", "other")
            .send()
            .await
            .expect("get"),
        403,
    )
    .await;
    let res = s
        .http
        .get(format!("{}/api/polls", s.poll))
        .header("x-azure-fdid", "fd-123")
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), 200);
    for path in ["/", "/healthz", "/readyz"] {
        assert_eq!(
            s.http
                .get(format!("{}{path}", s.poll))
                .send()
                .await
                .expect("probe")
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn shutdown_turns_readiness_off_and_ends_streams() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({})).await;
    let res = s
        .http
        .get(format!("{}/api/polls/{id}/results/stream", s.poll))
        .send()
        .await
        .expect("stream");
    let mut body = res.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(3), body.next())
        .await
        .expect("first event");
    assert!(first.is_some());
    s.poll_shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ends on shutdown");
    let mut s = s;
    let task = s.poll_task.take().expect("task");
    let r = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("server stops")
        .expect("join");
    assert!(r.is_ok());
}

// Found by the schemathesis fuzz (scripts/fuzz-api) or by making the OpenAPI document match
// what the server does: each case is one the schema allows and the server refused, or the other
// way round.

#[tokio::test]
async fn whole_numbers_may_be_written_as_floats_and_lengths_count_the_text_as_sent() {
    let s = Stack::start().await;
    let post = |body: Value| s.http.post(format!("{}/api/polls", s.poll)).json(&body).send();
    let res = post(json!({"name": "n", "options": ["a", "b", "c"], "max_choices": 2.0}))
        .await
        .expect("post");
    assert_eq!(res.status(), 201, "JSON Schema's `integer` admits 2.0");
    let created: Value = res.json().await.expect("json");
    assert_eq!(created["max_choices"], 2);
    let (id, token) = (
        created["id"].as_str().expect("id"),
        created["admin_token"].as_str().expect("token"),
    );
    let res = s
        .http
        .patch(format!("{}/api/polls/{id}", s.poll))
        .bearer_auth(token)
        .json(&json!({"max_choices": 3.0}))
        .send()
        .await
        .expect("patch");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json")["max_choices"], 3);

    for (body, field) in [
        (
            json!({"name": "n", "options": ["a", "b"], "max_choices": 1.5}),
            "max_choices",
        ),
        (
            json!({"name": "n", "options": ["a", "b"], "max_choices": -1}),
            "max_choices",
        ),
        // 201 characters as sent, although only one is left after trimming: `maxLength: 200`.
        (
            json!({"name": format!("n{}", " ".repeat(200)), "options": ["a", "b"]}),
            "name",
        ),
        (
            json!({"name": "n", "options": ["a", format!("{}b", "\u{3000}".repeat(200))]}),
            "options[1]",
        ),
        // Only white space as `str::trim` counts it (the schema's pattern spells the same set out).
        (json!({"name": "\u{85}\u{a0}\u{2028}", "options": ["a", "b"]}), "name"),
    ] {
        let p = expect_problem(post(body.clone()).await.expect("post"), 400).await;
        assert!(names_field(&p, field), "{body} should name {field}: {p}");
    }
    // Characters that are not white space to Rust (but are to some regex dialects) make a name.
    let res = post(json!({"name": "\u{1c}\u{feff}", "options": ["a", "b"]}))
        .await
        .expect("post");
    assert_eq!(res.status(), 201);
}

#[tokio::test]
async fn every_well_formed_cursor_is_a_position_and_others_are_named() {
    let s = Stack::start().await;
    for _ in 0..3 {
        s.simple_poll(json!({})).await;
    }
    let list = |q: String| s.http.get(format!("{}/api/polls?{q}", s.poll)).send();
    let res = list("limit=1".into()).await.expect("list");
    let link = res.headers()["link"].to_str().expect("link").to_owned();
    let cursor = link
        .split("cursor=")
        .nth(1)
        .and_then(|c| c.split(['&', '>']).next())
        .expect("cursor")
        .to_owned();
    assert_eq!(cursor.len(), 27, "{cursor}");
    let res = list(format!("limit=5&cursor={cursor}")).await.expect("list");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Vec<Value>>().await.expect("json").len(), 2);

    // Anything of the documented shape is a position: the epoch, just before it, beyond the last
    // representable time (everything comes before) and before the first (nothing does).
    for (c, n) in [
        ("A".repeat(27), 0),
        (format!("{}w", "_".repeat(26)), 0),
        (format!("f{}w", "_".repeat(25)), 3),
        (format!("g{}A", "A".repeat(25)), 0),
    ] {
        let res = list(format!("cursor={c}")).await.expect("list");
        assert_eq!(res.status(), 200, "{c}");
        assert_eq!(res.json::<Vec<Value>>().await.expect("json").len(), n, "{c}");
    }
    for bad in ["", "not-a-cursor", &format!("{}B", "A".repeat(26)), &"A".repeat(28)] {
        let p = expect_problem(list(format!("cursor={bad}")).await.expect("list"), 400).await;
        assert!(names_field(&p, "query.cursor"), "{bad}: {p}");
    }
}

#[tokio::test]
async fn voter_ids_in_the_query_are_checked_like_ballots_check_them() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({"results": "after_vote", "dedupe": "voter"})).await;
    for path in [
        "/api/polls".to_owned(),
        format!("/api/polls/{id}"),
        format!("/api/polls/{id}/results/stream"),
    ] {
        for bad in ["", "a%20b", "%C3%A9", &"x".repeat(129)] {
            let res = s
                .http
                .get(format!("{}{path}?voter_id={bad}", s.poll))
                .send()
                .await
                .expect("get");
            let p = expect_problem(res, 400).await;
            assert!(names_field(&p, "query.voter_id"), "{path} {bad}: {p}");
        }
    }
    assert_eq!(
        s.vote(json!({"poll_id": id, "option": "red", "voter_id": "v-1"}))
            .await
            .status(),
        201
    );
    let res = s
        .http
        .get(format!("{}/api/polls/{id}?voter_id=v-1", s.poll))
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json")["votes"]["count"], 1);
}

/// Both services' OpenAPI documents, pinned: any change of the public contract shows up as a
/// reviewed diff of `tests/tests/api/snapshots/` (`cargo insta review`, or `INSTA_UPDATE=always`).
#[tokio::test]
async fn the_openapi_documents_match_their_snapshots() {
    let s = Stack::start().await;
    for (name, base) in [("poll", &s.poll), ("vote", &s.vote)] {
        let doc: Value = s
            .http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .expect("doc")
            .json()
            .await
            .expect("json");
        insta::assert_json_snapshot!(format!("openapi-{name}"), doc);
    }
}

#[tokio::test]
async fn the_openapi_document_states_the_contract_the_server_enforces() {
    let s = Stack::start().await;
    let doc: Value = s
        .http
        .get(format!("{}/openapi.json", s.poll))
        .send()
        .await
        .expect("doc")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["info"]["license"]["identifier"], "MIT");
    assert!(doc["info"].get("contact").is_none(), "not utoipa's own author");
    // Every reference resolves (the listing's `status` filter once pointed nowhere).
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().expect("name");
        assert!(doc["components"]["schemas"].get(name).is_some(), "dangling $ref {name}");
    }
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["CreatePoll"]["additionalProperties"], false);
    assert_eq!(schemas["UpdatePoll"]["additionalProperties"], false);
    assert_eq!(schemas["OptionList"]["uniqueItems"], true);
    let get = &doc["paths"]["/api/polls/{id}"]["get"];
    let id = get["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|p| p["name"] == "id")
        .expect("id");
    assert_eq!(id["schema"]["pattern"], "^[0-9a-fA-F]{24}$");
    let stream = &doc["paths"]["/api/polls/{id}/results/stream"]["get"]["responses"]["200"]["content"];
    assert_eq!(
        stream["text/event-stream"]["schema"]["$ref"],
        "#/components/schemas/ResultsEvent"
    );
    let events = &schemas["ResultsEvent"]["oneOf"];
    assert_eq!(events[0]["properties"]["event"]["enum"], json!(["results"]));
    assert_eq!(
        events[0]["properties"]["data"]["contentSchema"]["$ref"],
        "#/components/schemas/PollView"
    );
    assert_eq!(events[1]["properties"]["event"]["enum"], json!(["deleted"]));
}

/// Both binaries as child processes with JSON logs at `info` (the production default), on the
/// embedded store or the test MongoDB, plus `extra` environment. Returns poll, vote, the
/// connection string if any, and the temporary directory (data and logs).
async fn observed_pair(extra: &[(&str, String)]) -> (Proc, Proc, Option<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ((poll_socket, pp), (vote_socket, vp)) = (listener(), listener());
    let mongo = api_tests::mongo_uri();
    let db = format!("t{}", uuid::Uuid::new_v4().simple());
    let env = |name: &str| {
        let mut env = vec![
            ("POLL_API", format!("http://127.0.0.1:{pp}")),
            ("VOTE_API", format!("http://127.0.0.1:{vp}")),
            ("DATA_DIR", dir.path().join(name).display().to_string()),
            ("LOG_FORMAT", "json".to_owned()),
            ("RUST_LOG", "info".to_owned()),
            ("RATE_LIMIT_PER_MINUTE", "0".to_owned()),
        ];
        if let Some(uri) = &mongo {
            env.push(("MONGODB_CONNECTION_STRING", uri.clone()));
            env.push(("POLLVOTE__STORAGE__DATABASE", format!("{db}_{name}")));
        }
        env.extend(extra.iter().cloned());
        env
    };
    let poll = Proc::start("poll", poll_socket, &env("poll"), dir.path().join("poll.log")).await;
    let vote = Proc::start("vote", vote_socket, &env("vote"), dir.path().join("vote.log")).await;
    if let Some(uri) = &mongo {
        // Dropped when the test ends (the processes are killed first, on drop).
        let (uri, names) = (uri.clone(), vec![format!("{db}_poll"), format!("{db}_vote")]);
        tokio::spawn(async move {
            // A delayed clean-up in the background, not a wait for anything.
            tokio::time::sleep(Duration::from_secs(60)).await;
            api_tests::drop_databases(uri, names);
        });
    }
    (poll, vote, mongo, dir)
}

fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect()
}

fn access_lines<'a>(lines: &'a [Value], request_id: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["target"] == "access" && l["request_id"] == request_id)
        .collect()
}

/// Checks the Prometheus text format 0.0.4 line by line, as Prometheus' text parser reads it:
/// HELP/TYPE before a family's samples, samples only of declared families (with the histogram and
/// counter suffixes), valid names, quoted label values, a float value; histograms with `+Inf`.
fn check_prometheus_text(text: &str) -> std::collections::BTreeMap<String, String> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    let mut families = std::collections::BTreeMap::new();
    let mut infs = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(name_ok(name), "bad name {name}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                families.insert(name.to_owned(), kind.to_owned()).is_none(),
                "family {name} twice"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment in text format: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "{line}"
        );
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, Some(l.strip_suffix('}').expect("closing brace"))),
            None => (series, None),
        };
        if let Some(labels) = labels {
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("label {pair} in {line}"));
                assert!(name_ok(k) && !k.starts_with("__"), "label name {k}");
                assert!(!v.trim_end_matches('"').contains('\n'));
            }
            if labels.contains("le=\"+Inf\"") {
                infs.insert(name.trim_end_matches("_bucket").to_owned());
            }
        }
        let family = families.get(name).map(|k| (name, k)).or_else(|| {
            ["_bucket", "_sum", "_count"].iter().find_map(|s| {
                let base = name.strip_suffix(s)?;
                families.get(base).filter(|k| *k == "histogram").map(|k| (base, k))
            })
        });
        assert!(family.is_some(), "sample of an undeclared family: {line}");
    }
    for (name, kind) in &families {
        if kind == "histogram" {
            assert!(
                infs.contains(name) || !text.contains(&format!("{name}_count")),
                "{name} has no +Inf bucket"
            );
        }
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name} must be named with _total");
        }
    }
    families
}

#[tokio::test]
async fn one_access_log_line_per_request_and_the_request_context_reaches_the_other_service() {
    let (poll, vote, mongo, dir) = observed_pair(&[]).await;
    let http = reqwest::Client::new();
    let id_of = |n: &str| format!("obs-{n}-{}", uuid::Uuid::new_v4().simple());
    let (create, ballot, read, missing) = (id_of("create"), id_of("ballot"), id_of("read"), id_of("missing"));
    let res = http
        .post(format!("{}/api/polls", poll.url))
        .header("x-request-id", &create)
        .json(&json!({"name": "observed", "options": ["a", "b"]}))
        .send()
        .await
        .expect("create");
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.expect("json");
    let (poll_id, token) = (
        created["id"].as_str().expect("id").to_owned(),
        created["admin_token"].as_str().expect("token").to_owned(),
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = http
        .post(format!("{}/api/votes", vote.url))
        .header("x-request-id", &ballot)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("tracestate", "congo=t61rcWkgMzE")
        .json(&json!({"poll_id": poll_id, "option": "a", "voter_id": "voter-1"}))
        .send()
        .await
        .expect("vote");
    assert_eq!(res.status(), 201);
    let stored: Value = res.json().await.expect("json");
    let ballot_id = stored["id"].as_str().expect("ballot id").to_owned();
    let receipt = stored["receipt"].as_str().expect("receipt").to_owned();
    // The voter checks the ballot with its receipt: neither may reach the logs either.
    let res = http
        .get(format!("{}/api/votes/{ballot_id}", vote.url))
        .bearer_auth(&receipt)
        .send()
        .await
        .expect("check");
    assert_eq!(res.status(), 200);
    let res = http
        .get(format!("{}/api/polls/{poll_id}", poll.url))
        .header("x-request-id", &read)
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("read");
    assert_eq!(res.status(), 200);
    let res = http
        .get(format!("{}/api/polls/ffffffffffffffffffffffff", poll.url))
        .header("x-request-id", &missing)
        .send()
        .await
        .expect("404");
    assert_eq!(res.status(), 404);

    // /metrics: the content type says what is encoded.
    let res = http.get(format!("{}/metrics", vote.url)).send().await.expect("metrics");
    assert_eq!(
        res.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = res.text().await.expect("text");
    let families = check_prometheus_text(&text);
    for name in [
        "http_server_request_duration_seconds",
        "pollvote_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "pollvote_peer_request_duration_seconds",
        "pollvote_db_operation_duration_seconds",
        "pollvote_cache_requests_total",
        "pollvote_ballots_total",
        "pollvote_db_write_batch_size",
        "pollvote_db_throttled_total",
        "pollvote_db_retries_total",
        "pollvote_keyvault_reads_total",
        "pollvote_keyvault_last_success_timestamp_seconds",
        "pollvote_tally_cache_requests_total",
    ] {
        assert!(families.contains_key(name), "{name} missing:\n{text}");
    }
    assert!(
        text.contains("pollvote_peer_request_duration_seconds_count{service=\"vote\",peer=\"poll\",route=\"/internal/polls/{id}\",outcome=\"2xx\"} 1"),
        "{text}"
    );
    assert!(text.contains("cache=\"poll_catalog\",result=\"miss\"} 1"), "{text}");
    assert!(text.contains("operation=\"cast\",outcome=\"ok\"} 1"), "{text}");
    if mongo.is_some() {
        // The read above asked the vote service's MongoDB store for the poll's tally.
        let tally_reads: f64 = text
            .lines()
            .filter(|l| l.starts_with("pollvote_tally_cache_requests_total{"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum();
        assert!(tally_reads >= 1.0, "{text}");
    }
    let res = http
        .get(format!("{}/metrics", poll.url))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .expect("metrics");
    assert_eq!(
        res.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let open = res.text().await.expect("text");
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE pollvote_sse_subscribers gauge"), "{open}");
    let poll_text = http
        .get(format!("{}/metrics", poll.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let mut exposed = check_prometheus_text(&poll_text);
    exposed.extend(families);
    if let Some(promtool) = promtool() {
        for (service, text) in [("vote", &text), ("poll", &poll_text)] {
            let out = run_with_stdin(&promtool, &["check", "metrics"], text);
            assert!(
                out.status.success(),
                "promtool check metrics on the {service} service: {out:?}\n{text}"
            );
        }
    }
    check_dashboard(&exposed);

    // Logs are written as they happen: wait for the last request's lines.
    let (poll_log, vote_log) = eventually(Duration::from_secs(5), Duration::from_millis(20), || async {
        let (poll_log, vote_log) = (json_lines(&poll.log), json_lines(&vote.log));
        let logged = [
            (&poll_log, &create),
            (&vote_log, &ballot),
            (&poll_log, &ballot),
            (&poll_log, &read),
            (&vote_log, &read),
            (&poll_log, &missing),
        ]
        .iter()
        .all(|(lines, id)| !access_lines(lines, id).is_empty());
        if logged {
            Ok((poll_log, vote_log))
        } else {
            Err("the access lines were not all logged within 5 s".to_owned())
        }
    })
    .await;
    for (lines, id, method, route, status) in [
        (&poll_log, &create, "POST", "/api/polls", 201),
        (&vote_log, &ballot, "POST", "/api/votes", 201),
        (&poll_log, &ballot, "GET", "/internal/polls/{id}", 200),
        (&poll_log, &read, "GET", "/api/polls/{id}", 200),
        (&vote_log, &read, "GET", "/internal/tallies", 200),
        (&poll_log, &missing, "GET", "/api/polls/{id}", 404),
    ] {
        let found = access_lines(lines, id);
        assert_eq!(found.len(), 1, "exactly one access line for {id} {route}: {found:?}");
        let line = found[0];
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["method"], method);
        assert_eq!(line["route"], route);
        assert_eq!(line["status"], status);
        assert!(line["latency_ms"].as_f64().is_some_and(|l| l >= 0.0), "{line}");
        for key in ["trace_id", "span_id"] {
            assert!(line[key].as_str().is_some_and(|t| !t.is_empty()), "{key} in {line}");
        }
    }
    // The caller's trace id is kept, and travels with the request id to the other service.
    assert_eq!(access_lines(&vote_log, &ballot)[0]["trace_id"], trace);
    assert_eq!(access_lines(&poll_log, &ballot)[0]["trace_id"], trace);
    assert_eq!(
        access_lines(&poll_log, &read)[0]["trace_id"],
        access_lines(&vote_log, &read)[0]["trace_id"]
    );
    assert_ne!(
        access_lines(&poll_log, &ballot)[0]["span_id"],
        access_lines(&vote_log, &ballot)[0]["span_id"]
    );
    // Every line written inside a request carries its trace and span ids.
    for line in poll_log.iter().chain(&vote_log) {
        if line["span"]["request_id"].is_string() {
            assert!(line["trace_id"].is_string() && line["span_id"].is_string(), "{line}");
        }
    }
    // Nothing secret in the whole run's logs.
    let all = format!(
        "{}{}",
        std::fs::read_to_string(&poll.log).expect("log"),
        std::fs::read_to_string(&vote.log).expect("log")
    );
    let mut secrets = vec![
        token.as_str(),
        ballot_id.as_str(),
        receipt.as_str(),
        "mongodb://",
        "password",
        "voter-1",
    ];
    if let Some(uri) = mongo.as_deref() {
        secrets.push(uri);
    }
    for secret in secrets {
        assert!(!all.contains(secret), "the logs contain {secret}");
    }
    drop((poll, vote));
    drop(dir);
}

/// promtool (`scripts/promtool build`, given by the test command as POLLVOTE_TEST_PROMTOOL).
fn promtool() -> Option<String> {
    match std::env::var("POLLVOTE_TEST_PROMTOOL") {
        Ok(p) => Some(p),
        Err(_) => {
            skip(
                "promtool checks of /metrics and the dashboard (scripts/test builds promtool and sets POLLVOTE_TEST_PROMTOOL)",
            );
            None
        }
    }
}

fn run_with_stdin(program: &str, args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    child.wait_with_output().expect("output")
}

/// The series names a PromQL expression reads (functions, keywords, label matchers, grouping
/// labels, strings and durations left out).
fn promql_series(expr: &str) -> Vec<String> {
    let mut text = String::new();
    let (mut in_str, mut in_braces) = (false, false);
    for c in expr.chars() {
        match c {
            '"' if !in_braces => in_str = !in_str,
            '{' if !in_str => in_braces = true,
            '}' if !in_str => in_braces = false,
            _ if in_str || in_braces => {}
            '[' => in_braces = true,
            ']' => in_braces = false,
            c => text.push(c),
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':' || chars[i] == '$')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
            if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&word.as_str()) {
                skip_group = true;
                continue;
            }
            if next == Some('(')
                || word.starts_with('$')
                || [
                    "and",
                    "or",
                    "unless",
                    "bool",
                    "offset",
                    "sum",
                    "min",
                    "max",
                    "avg",
                    "count",
                    "group",
                    "stddev",
                    "stdvar",
                    "topk",
                    "bottomk",
                    "quantile",
                    "count_values",
                ]
                .contains(&word.as_str())
            {
                continue;
            }
            out.push(word);
            continue;
        }
        if c == '(' && skip_group {
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_group = false;
        }
        i += 1;
    }
    out
}

/// The Grafana dashboard (deploy/grafana/pollvote.json) queries only series the services expose,
/// and each query is valid PromQL (promtool check rules, when promtool is there).
fn check_dashboard(exposed: &std::collections::BTreeMap<String, String>) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("deploy/grafana/pollvote.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("dashboard JSON");
    let mut names = std::collections::BTreeSet::new();
    for (family, kind) in exposed {
        names.insert(family.clone());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{family}{suffix}"));
            }
        }
    }
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(exprs.len() >= 10, "the dashboard has its queries");
    for expr in &exprs {
        let series = promql_series(expr);
        assert!(!series.is_empty(), "no series in {expr}");
        for s in series {
            assert!(
                names.contains(&s),
                "the dashboard reads {s}, which no service exposes: {expr}"
            );
        }
    }
    for var in dashboard["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = var["definition"].as_str() {
            let metric = q
                .trim_start_matches("label_values(")
                .split(',')
                .next()
                .unwrap_or("")
                .trim();
            assert!(names.contains(metric), "variable {} reads {metric}", var["name"]);
        }
    }
    if let Some(promtool) = promtool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, expr) in exprs.iter().enumerate() {
            let expr = expr.replace("$__rate_interval", "5m").replace("$service", ".*");
            rules.push_str(&format!(
                "      - record: dashboard:query{i}\n        expr: {}\n",
                serde_json::to_string(&expr).expect("quoted")
            ));
        }
        let file = dir.path().join("dashboard-rules.yml");
        std::fs::write(&file, &rules).expect("rules");
        let out = std::process::Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&file)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool check rules on the dashboard's queries: {out:?}\n{rules}"
        );
    }
}

/// The Jaeger the test command started (`scripts/jaeger`): its OTLP/HTTP endpoint and query URL.
fn jaeger() -> Option<(String, String)> {
    match std::env::var("POLLVOTE_TEST_JAEGER") {
        Ok(v) => {
            let (otlp, query) = v
                .split_once(' ')
                .expect("POLLVOTE_TEST_JAEGER=\"<otlp endpoint> <query url>\"");
            Some((otlp.to_owned(), query.to_owned()))
        }
        Err(_) => {
            skip("the tracing test needs Jaeger (scripts/test starts it and sets POLLVOTE_TEST_JAEGER)");
            None
        }
    }
}

/// Waits for the trace `trace_id` in Jaeger until `complete` accepts it; returns its spans as
/// (service, operation, span id, parent span ids, tags).
async fn jaeger_trace(
    query: &str,
    trace_id: &str,
    complete: impl Fn(&[(String, String, String, Vec<String>, Value)]) -> bool,
) -> Vec<(String, String, String, Vec<String>, Value)> {
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), Duration::from_millis(200), || async {
        let mut spans = Vec::new();
        if let Ok(r) = http.get(format!("{query}/api/traces/{trace_id}")).send().await
            && r.status() == 200
        {
            let body: Value = r.json().await.expect("jaeger json");
            let traces = body["data"].as_array().cloned().unwrap_or_default();
            assert!(traces.len() <= 1, "a single trace: {body}");
            for t in &traces {
                for s in t["spans"].as_array().expect("spans") {
                    assert_eq!(s["traceID"], trace_id, "every span keeps the caller's trace id");
                    let service = t["processes"][s["processID"].as_str().expect("pid")]["serviceName"]
                        .as_str()
                        .expect("service")
                        .to_owned();
                    let parents = s["references"]
                        .as_array()
                        .map(|r| {
                            r.iter()
                                .filter_map(|r| r["spanID"].as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                    let tags: serde_json::Map<String, Value> = s["tags"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|t| (t["key"].as_str().unwrap_or("").to_owned(), t["value"].clone()))
                                .collect()
                        })
                        .unwrap_or_default();
                    spans.push((
                        service,
                        s["operationName"].as_str().unwrap_or("").to_owned(),
                        s["spanID"].as_str().unwrap_or("").to_owned(),
                        parents,
                        Value::Object(tags),
                    ));
                }
            }
        }
        if complete(&spans) {
            Ok(spans)
        } else {
            Err(format!("trace {trace_id} incomplete in Jaeger: {spans:#?}"))
        }
    })
    .await
}

#[tokio::test]
async fn traces_follow_a_ballot_and_a_read_through_both_services() {
    let Some((otlp, query)) = jaeger() else { return };
    let (poll, vote, _mongo, _dir) = observed_pair(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("HOSTNAME", "api-tests".to_owned()),
    ])
    .await;
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/api/polls", poll.url))
        .json(&json!({"name": "traced", "options": ["a", "b"]}))
        .send()
        .await
        .expect("create");
    assert_eq!(res.status(), 201);
    let poll_id = res.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();

    let fresh = || uuid::Uuid::new_v4().simple().to_string();
    let parent = "00f067aa0ba902b7";
    // A ballot on a poll the vote service has not cached: vote → poll (definition) → storage on
    // both sides.
    let ballot_trace = fresh();
    let res = http
        .post(format!("{}/api/votes", vote.url))
        .header("traceparent", format!("00-{ballot_trace}-{parent}-01"))
        .json(&json!({"poll_id": poll_id, "option": "a"}))
        .send()
        .await
        .expect("vote");
    assert_eq!(res.status(), 201);
    let has = |spans: &[(String, String, String, Vec<String>, Value)], service: &str, op: &str| {
        spans.iter().any(|s| s.0 == service && s.1 == op)
    };
    let spans = jaeger_trace(&query, &ballot_trace, |s| {
        has(s, "vote", "POST /api/votes")
            && has(s, "vote", "GET /internal/polls/{id}")
            && has(s, "poll", "GET /internal/polls/{id}")
            && has(s, "poll", "get polls")
            && has(s, "vote", "cast ballots")
            && s.iter()
                .any(|x| x.0 == "vote" && x.4.get("db.operation.batch.size").is_some())
    })
    .await;
    let cast = spans.iter().find(|s| s.1 == "cast ballots").expect("cast span");
    let batch = spans
        .iter()
        .find(|s| s.4.get("db.operation.batch.size").is_some())
        .expect("group-commit batch span");
    assert!(
        ["commit ballots", "insertMany ballots"].contains(&batch.1.as_str()),
        "{batch:?}"
    );
    assert_eq!(
        batch.3,
        vec![cast.2.clone()],
        "the batch is a child of the ballot's storage call"
    );
    let size = &batch.4["db.operation.batch.size"];
    assert!(size == 1 || size == "1", "one ballot in its batch: {size}");
    let root = spans.iter().find(|s| s.1 == "POST /api/votes").expect("server span");
    assert_eq!(root.3, vec![parent.to_owned()], "the caller's span is the parent");
    let db = spans.iter().find(|s| s.1 == "cast ballots").expect("storage span");
    assert_eq!(db.4["db.collection.name"], "ballots");
    assert_eq!(db.4["db.operation.name"], "cast");
    let client = spans
        .iter()
        .find(|s| s.0 == "vote" && s.1 == "GET /internal/polls/{id}")
        .expect("client span");
    let server = spans
        .iter()
        .find(|s| s.0 == "poll" && s.1 == "GET /internal/polls/{id}")
        .expect("server span of the poll service");
    assert_eq!(
        server.3,
        vec![client.2.clone()],
        "the poll service continues the vote service's call"
    );

    // A read: poll → storage, poll → vote (tallies) → storage.
    let read_trace = fresh();
    let res = http
        .get(format!("{}/api/polls/{poll_id}", poll.url))
        .header("traceparent", format!("00-{read_trace}-{parent}-01"))
        .send()
        .await
        .expect("read");
    assert_eq!(res.status(), 200);
    let spans = jaeger_trace(&query, &read_trace, |s| {
        has(s, "poll", "GET /api/polls/{id}")
            && has(s, "poll", "get polls")
            && has(s, "poll", "GET /internal/tallies")
            && has(s, "vote", "GET /internal/tallies")
            && has(s, "vote", "tallies ballots")
    })
    .await;
    let root = spans
        .iter()
        .find(|s| s.1 == "GET /api/polls/{id}")
        .expect("server span");
    assert_eq!(root.3, vec![parent.to_owned()]);

    // A caller that does not sample (flags 00) is followed: nothing of its request is exported.
    let unsampled = fresh();
    let res = http
        .get(format!("{}/api/polls/{poll_id}", poll.url))
        .header("traceparent", format!("00-{unsampled}-{parent}-00"))
        .send()
        .await
        .expect("read");
    assert_eq!(res.status(), 200);
    // What is under test is an absence: nothing exported in well over the batch delay (100 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let res = http
        .get(format!("{query}/api/traces/{unsampled}"))
        .send()
        .await
        .expect("jaeger");
    let body: Value = if res.status() == 200 {
        res.json().await.expect("json")
    } else {
        json!({})
    };
    assert!(
        body["data"].as_array().is_none_or(|d| d.is_empty()),
        "an unsampled request exports no span: {body}"
    );
}

/// Reads are served from a snapshot shared by every reader: each view carries a strong `ETag`,
/// `If-None-Match` answers 304 while it is current, a view that is the same for everyone may be
/// cached for a second, and a ballot shows up within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_have_validators_and_show_a_ballot_within_a_second() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({"results": "always"})).await;
    let url = format!("{}/api/polls/{id}", s.poll);
    let first = s.http.get(&url).send().await.expect("get");
    assert_eq!(first.status(), 200);
    let etag = header(&first, "etag");
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 10,
        "{etag:?}"
    );
    assert_eq!(header(&first, "cache-control"), "public, max-age=1");
    for validator in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
        "*".to_owned(),
    ] {
        let res = s
            .http
            .get(&url)
            .header("if-none-match", &validator)
            .send()
            .await
            .expect("get");
        assert_eq!(res.status(), 304, "If-None-Match: {validator}");
        assert_eq!(header(&res, "etag"), etag);
        assert_eq!(header(&res, "cache-control"), "public, max-age=1");
        assert!(res.bytes().await.expect("body").is_empty());
    }
    let stale = s
        .http
        .get(&url)
        .header("if-none-match", "\"not-this-one\"")
        .send()
        .await
        .expect("get");
    assert_eq!(stale.status(), 200);

    // A ballot changes the view (and its validator) within a second of its 201.
    assert_eq!(s.vote(json!({"poll_id": id, "option": "red"})).await.status(), 201);
    let acknowledged = Instant::now();
    let fresh = until(
        acknowledged + Duration::from_secs(1),
        Duration::from_millis(20),
        || async {
            let res = s
                .http
                .get(&url)
                .header("if-none-match", &etag)
                .send()
                .await
                .expect("get");
            if res.status() == 200 {
                return Ok(res);
            }
            assert_eq!(res.status(), 304);
            Err("the ballot was not shown within a second".to_owned())
        },
    )
    .await;
    let new_etag = header(&fresh, "etag");
    assert_ne!(new_etag, etag);
    let body: Value = fresh.json().await.expect("json");
    assert_eq!(body["votes"]["count"], 1);

    // The list: a validator and 304 too.
    let list_url = format!("{}/api/polls?limit=5", s.poll);
    let list = s.http.get(&list_url).send().await.expect("list");
    assert_eq!(list.status(), 200);
    let list_etag = header(&list, "etag");
    assert_eq!(header(&list, "cache-control"), "public, max-age=1");
    let again = s
        .http
        .get(&list_url)
        .header("if-none-match", &list_etag)
        .send()
        .await
        .expect("list");
    assert_eq!(again.status(), 304);
    s.stop().await;
}

/// A view that depends on the caller (whether they voted; whether they are the admin) is never
/// served to another caller, through the snapshot or through a cache: such views are
/// `private, no-store` with `Vary`, and a voter and a non-voter alternating each see their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_dependent_views_are_private_and_never_leak() {
    let s = Stack::start_with(|c| {
        c.server.client_ip_source = shared::config::ClientIpSource::XForwardedFor;
    })
    .await;
    let (id, _) = s.simple_poll(json!({"results": "after_vote"})).await;
    let voted = s
        .http
        .post(format!("{}/api/votes", s.vote))
        .header("x-forwarded-for", "10.0.0.1")
        .json(&json!({"poll_id": id, "option": "red"}))
        .send()
        .await
        .expect("vote");
    assert_eq!(voted.status(), 201);
    let url = format!("{}/api/polls/{id}", s.poll);
    let read = |from: &'static str, validator: Option<String>| {
        let mut req = s.http.get(&url).header("x-forwarded-for", from);
        if let Some(v) = validator {
            req = req.header("if-none-match", v);
        }
        async move {
            let res = req.send().await.expect("get");
            let status = res.status().as_u16();
            let h = |n: &str| header(&res, n);
            let (etag, cache, vary) = (h("etag"), h("cache-control"), h("vary"));
            let body: Value = if status == 200 {
                res.json().await.expect("json")
            } else {
                Value::Null
            };
            (status, etag, cache, vary, body)
        }
    };
    let mut voter_etag = None;
    for round in 0..20 {
        let (status, etag, cache, vary, body) = read("10.0.0.1", None).await;
        assert_eq!(
            (status, body["votes"]["count"].clone()),
            (200, json!(1)),
            "round {round}: the voter"
        );
        assert_eq!(cache, "private, no-store");
        assert!(
            vary.contains("Authorization") && vary.contains("X-Voter-Id"),
            "{vary:?}"
        );
        // The non-voter, even when sending the voter's validator, gets their own view.
        let (status, other_etag, cache, _, body) = read("10.0.0.2", Some(etag.clone())).await;
        assert_eq!(
            (status, body["votes"].clone()),
            (200, Value::Null),
            "round {round}: the non-voter"
        );
        assert_eq!(cache, "private, no-store");
        assert_ne!(other_etag, etag);
        voter_etag = Some(etag);
    }
    // The voter's own validator is honoured for the voter.
    assert_eq!(read("10.0.0.1", voter_etag).await.0, 304);

    // after_close: the admin sees counts while the poll is open, nobody else does; once closed
    // the view is the same for everyone and may be cached.
    let (closing, token) = s.simple_poll(json!({"results": "after_close"})).await;
    let voted = s
        .http
        .post(format!("{}/api/votes", s.vote))
        .header("x-forwarded-for", "10.0.0.3")
        .json(&json!({"poll_id": closing, "option": "red"}))
        .send()
        .await
        .expect("vote");
    assert_eq!(voted.status(), 201);
    let curl = format!("{}/api/polls/{closing}", s.poll);
    let as_admin = || async {
        let res = s.http.get(&curl).bearer_auth(&token).send().await.expect("get");
        let cache = res.headers().get("cache-control").cloned();
        (cache, res.json::<Value>().await.expect("json"))
    };
    let as_anyone = || async {
        let res = s.http.get(&curl).send().await.expect("get");
        let cache = res.headers().get("cache-control").cloned();
        (cache, res.json::<Value>().await.expect("json"))
    };
    for _ in 0..10 {
        let (cache, body) = as_admin().await;
        assert_eq!(
            (
                cache.as_ref().map(|c| c.to_str().unwrap_or_default()),
                body["votes"]["count"].clone()
            ),
            (Some("private, no-store"), json!(1))
        );
        let (cache, body) = as_anyone().await;
        assert_eq!(
            (
                cache.as_ref().map(|c| c.to_str().unwrap_or_default()),
                body["votes"].clone()
            ),
            (Some("private, no-store"), Value::Null)
        );
    }
    let closed = s
        .http
        .post(format!("{curl}/close"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("close");
    assert_eq!(closed.status(), 200);
    let (cache, admin_view) = as_admin().await;
    assert_eq!(
        cache.as_ref().map(|c| c.to_str().unwrap_or_default()),
        Some("public, max-age=1")
    );
    let (_, anyone_view) = as_anyone().await;
    assert_eq!(admin_view, anyone_view);
    assert_eq!(anyone_view["votes"]["count"], 1);
    s.stop().await;
}

/// Calls each service made to the other so far, from its `/metrics`
/// (`pollvote_peer_request_duration_seconds` counts every call, whatever its outcome):
/// (poll → vote on `/internal/tallies`, poll → vote on any route, vote → poll on any route).
async fn peer_calls(s: &Stack) -> (f64, f64, f64) {
    let metrics = |base: String| {
        let http = s.http.clone();
        async move {
            let res = http.get(format!("{base}/metrics")).send().await.expect("metrics");
            res.text().await.expect("text")
        }
    };
    let count = |text: &str, labels: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("pollvote_peer_request_duration_seconds_count{"))
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    let (poll, vote) = (metrics(s.poll.clone()).await, metrics(s.vote.clone()).await);
    (
        count(&poll, &["peer=\"vote\"", "route=\"/internal/tallies\""]),
        count(&poll, &["peer=\"vote\""]),
        count(&vote, &["peer=\"poll\""]),
    )
}

/// Issue "one house", acceptance item 3: a poll read and a page of the list each make exactly one
/// call to the vote service (whatever the polls' results visibility and dedupe), and the vote
/// service answers it without calling the poll service; `voted` still unlocks `after_vote` counts
/// for the caller's ballots keyed by voter (`ip`, `voter`) and not (`none`).
#[tokio::test]
async fn a_poll_read_or_a_list_page_is_one_call_to_the_vote_service() {
    let s = Stack::start().await;
    let mut polls = Vec::new();
    for extra in [
        json!({"results": "after_vote", "dedupe": "ip"}),
        json!({"results": "after_vote", "dedupe": "voter"}),
        json!({"results": "after_vote", "dedupe": "none"}),
        json!({"results": "after_vote", "dedupe": "ip"}),
        json!({"results": "always"}),
        json!({"results": "after_close"}),
    ] {
        polls.push(s.simple_poll(extra).await);
    }
    // The caller votes on the first three (by address, by voter id, and on a `none` poll); not on
    // the fourth, whose definition the vote service has therefore never asked for.
    for (i, body) in [
        json!({"option": "red"}),
        json!({"option": "green", "voter_id": "alice"}),
        json!({"option": "blue"}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut body = body;
        body["poll_id"] = json!(polls[i].0);
        assert_eq!(s.vote(body).await.status(), 201);
    }

    let s = &s;
    // One read of `url` (as `admin` when given), measured; each starts once the poll service's
    // snapshots (250 ms) have expired, so every read goes to the vote service. Answers the body
    // and the `Link` header.
    let read = |url: String, admin: Option<String>| async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let before = peer_calls(s).await;
        let mut req = s.http.get(&url).header("x-voter-id", "alice");
        if let Some(token) = &admin {
            req = req.bearer_auth(token);
        }
        let res = req.send().await.expect("get");
        assert_eq!(res.status(), 200, "{url}");
        let link = res
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body: Value = res.json().await.expect("json");
        let after = peer_calls(s).await;
        let delta = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
        assert_eq!(
            delta,
            (1.0, 1.0, 0.0),
            "{url} (admin: {}): (calls to /internal/tallies, calls to the vote service, calls from \
             the vote service to the poll service)",
            admin.is_some()
        );
        (link, body)
    };

    // The caller sees the counts of the `after_vote` polls it voted on, of the `always` poll, and
    // not of the others; the admin always does.
    let shown = [true, true, true, false, true, false];
    for (i, (id, token)) in polls.iter().enumerate() {
        let url = format!("{}/api/polls/{id}", s.poll);
        let (_, body) = read(url.clone(), None).await;
        assert_eq!(body["votes"].is_object(), shown[i], "poll {i}: {body}");
        let (_, admin) = read(url, Some(token.clone())).await;
        assert!(admin["votes"].is_object(), "poll {i}: the admin sees counts: {admin}");
    }

    // A page of the list, and the next one: one call each.
    let (link, first) = read(format!("{}/api/polls?limit=4", s.poll), None).await;
    let next = link
        .as_deref()
        .and_then(|l| l.strip_prefix('<'))
        .and_then(|l| l.split_once('>'))
        .map(|(path, _)| path.to_owned())
        .expect("a next page");
    let (_, second) = read(format!("{}{next}", s.poll), None).await;
    let mut listed: Vec<(String, bool)> = [first, second]
        .iter()
        .flat_map(|page| page.as_array().expect("a page is an array").clone())
        .map(|p| (p["id"].as_str().expect("id").to_owned(), p["votes"].is_object()))
        .collect();
    let mut expected: Vec<(String, bool)> = polls
        .iter()
        .zip(shown)
        .map(|((id, _), shown)| (id.clone(), shown))
        .collect();
    listed.sort();
    expected.sort();
    assert_eq!(listed, expected, "both pages, counts shown as on the poll");
}

/// Issue 12: a poll with `opens_at` is `scheduled` until then: listed under `status=scheduled`
/// and not under `status=open`, its ballots refused with 409 `poll-not-open` and nothing stored;
/// at `opens_at` it opens by itself, in both services, without any change to it.
#[tokio::test]
async fn a_scheduled_poll_refuses_ballots_until_it_opens_by_itself() {
    let s = Stack::start().await;
    let opens = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let closes = opens + chrono::Duration::hours(1);
    let (created, _) = s
        .create_poll(json!({
            "name": "Later", "options": ["red", "blue"], "dedupe": "none",
            "opens_at": opens.to_rfc3339(), "closes_at": closes.to_rfc3339(),
        }))
        .await;
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["status"], "scheduled", "{created}");
    let stated: chrono::DateTime<chrono::Utc> = created["opens_at"].as_str().expect("opens_at").parse().expect("time");
    assert_eq!(stated, opens);

    let early = expect_problem(s.vote(json!({"poll_id": id, "option": "red"})).await, 409).await;
    assert!(
        early["type"].as_str().is_some_and(|t| t.ends_with("poll-not-open")),
        "{early}"
    );
    assert!(
        early["detail"].as_str().is_some_and(|d| d.contains("opens at")),
        "{early}"
    );
    let listed = |status: &'static str| {
        let (http, url) = (
            s.http.clone(),
            format!("{}/api/polls?status={status}&limit=100", s.poll),
        );
        async move {
            let page: Value = http.get(url).send().await.expect("list").json().await.expect("json");
            page.as_array()
                .expect("a list")
                .iter()
                .map(|p| p["id"].as_str().expect("id").to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert!(listed("scheduled").await.contains(&id), "listed as scheduled");
    assert!(
        !listed("open").await.contains(&id),
        "not listed as open before opens_at"
    );
    let poll = s.get_poll(&id).await;
    assert_eq!(
        (poll["status"].as_str(), poll["votes"]["count"].as_u64()),
        (Some("scheduled"), Some(0))
    );

    // At opens_at the same ballot is accepted: nobody changed the poll.
    eventually(Duration::from_secs(10), Duration::from_millis(100), || async {
        match s.vote(json!({"poll_id": id, "option": "red"})).await.status().as_u16() {
            201 => Ok(()),
            409 if chrono::Utc::now() < opens => Err("not open yet".to_owned()),
            other => Err(format!("ballot after opens_at: {other}")),
        }
    })
    .await;
    assert!(chrono::Utc::now() >= opens, "accepted only from opens_at on");
    let poll = s.get_poll(&id).await;
    assert_eq!(
        (poll["status"].as_str(), poll["votes"]["count"].as_u64()),
        (Some("open"), Some(1)),
        "{poll}"
    );
    assert!(listed("open").await.contains(&id), "listed as open from opens_at on");
    assert!(!listed("scheduled").await.contains(&id));
}

/// Issue 12: `closes_at` must come after `opens_at` (400 naming `closes_at`, nothing stored);
/// `opens_at` moves while the poll is scheduled, `null` opens it now, and once it has opened a
/// different `opens_at` is 409 `poll-already-open` (restating the one it has is not a change).
#[tokio::test]
async fn the_opening_time_comes_before_the_close_and_changes_only_before_it_passes() {
    let s = Stack::start().await;
    let now = chrono::Utc::now();
    let at = |mins: i64| (now + chrono::Duration::minutes(mins)).to_rfc3339();
    let res = s
        .http
        .post(format!("{}/api/polls", s.poll))
        .json(&json!({"name": "Backwards", "options": ["a", "b"], "opens_at": at(60), "closes_at": at(30)}))
        .send()
        .await
        .expect("create");
    let problem = expect_problem(res, 400).await;
    assert!(names_field(&problem, "closes_at"), "{problem}");
    let all = api_tests::get_json(&s.http, &format!("{}/api/polls", s.poll)).await;
    assert_eq!(all, json!([]), "nothing stored");

    let (id, token) = s.simple_poll(json!({"opens_at": at(60), "closes_at": at(120)})).await;
    let patch = |body: Value| {
        let req = s
            .http
            .patch(format!("{}/api/polls/{id}", s.poll))
            .bearer_auth(&token)
            .json(&body);
        async move { req.send().await.expect("patch") }
    };
    let moved = patch(json!({"opens_at": at(90)})).await;
    assert_eq!(moved.status(), 200);
    let moved: Value = moved.json().await.expect("json");
    assert_eq!(moved["status"], "scheduled");
    let problem = expect_problem(patch(json!({"opens_at": at(150)})).await, 400).await;
    assert!(
        names_field(&problem, "closes_at"),
        "an opening after the close: {problem}"
    );

    let opened = patch(json!({"opens_at": null})).await;
    assert_eq!(opened.status(), 200);
    let opened: Value = opened.json().await.expect("json");
    assert_eq!(
        (opened["status"].as_str(), &opened["opens_at"]),
        (Some("open"), &Value::Null),
        "{opened}"
    );
    assert_eq!(s.vote(json!({"poll_id": id, "option": "red"})).await.status(), 201);

    let problem = expect_problem(patch(json!({"opens_at": at(5)})).await, 409).await;
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("poll-already-open")),
        "{problem}"
    );
    assert_eq!(s.get_poll(&id).await["opens_at"], Value::Null, "nothing changed");
    let restated = patch(json!({"opens_at": null, "desc": "restated"})).await;
    assert_eq!(restated.status(), 200, "restating the opening time is not a change");
}

/// Issue 12: `GET /api/polls/{id}/results.csv` has the numbers of the poll's JSON, one row per
/// option, under the same visibility rules (403 while hidden from the caller, the admin always).
#[tokio::test]
async fn the_results_csv_has_the_numbers_of_the_json_under_the_same_rules() {
    let s = Stack::start().await;
    let (id, _) = s.simple_poll(json!({"dedupe": "none", "max_choices": 2})).await;
    for options in [json!(["red"]), json!(["red", "blue"]), json!(["green"])] {
        assert_eq!(s.vote(json!({"poll_id": id, "options": options})).await.status(), 201);
    }
    let url = format!("{}/api/polls/{id}/results.csv", s.poll);
    let csv = eventually(Duration::from_secs(3), Duration::from_millis(100), || async {
        let res = s.http.get(&url).send().await.expect("csv");
        assert_eq!(res.status(), 200);
        assert!(
            header(&res, "content-type").starts_with("text/csv"),
            "{}",
            header(&res, "content-type")
        );
        let body = res.text().await.expect("text");
        if body.ends_with(",3\n") {
            Ok(body)
        } else {
            Err(format!("not all ballots yet: {body}"))
        }
    })
    .await;
    assert_eq!(csv, "option,count,ballots\nred,2,3\ngreen,1,3\nblue,1,3\n");
    let json = s.get_poll(&id).await;
    assert_eq!(json["votes"]["count"], 3);
    let from_json: Vec<(String, u64)> = json["votes"]["by_option"]
        .as_array()
        .expect("by_option")
        .iter()
        .map(|o| {
            (
                o["option"].as_str().expect("option").to_owned(),
                o["count"].as_u64().expect("count"),
            )
        })
        .collect();
    let from_csv: Vec<(String, u64)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_owned(), f[1].parse().expect("count"))
        })
        .collect();
    assert_eq!(from_csv, from_json, "the same numbers as the JSON");

    let (hidden, token) = s.simple_poll(json!({"results": "after_close"})).await;
    let url = format!("{}/api/polls/{hidden}/results.csv", s.poll);
    let problem = expect_problem(s.http.get(&url).send().await.expect("csv"), 403).await;
    assert!(
        problem["detail"].as_str().is_some_and(|d| d.contains("after_close")),
        "{problem}"
    );
    let admin = s.http.get(&url).bearer_auth(&token).send().await.expect("csv");
    assert_eq!(admin.status(), 200, "the admin always sees the counts");
    let nobody = format!("{}/api/polls/0123456789abcdef01234567/results.csv", s.poll);
    expect_problem(s.http.get(&nobody).send().await.expect("csv"), 404).await;
}

/// Issue 12: `GET /api/polls/{id}/ballots` streams every ballot to the poll's admin, as
/// newline-delimited JSON (the default) or CSV (a column per option) by `Accept`: each ballot
/// once, with its id, time and choices, never a voter's identity; 401 without the admin token, 406
/// for a format it cannot give. More ballots than one batch of the store's reads.
#[tokio::test]
async fn the_admin_exports_every_ballot_as_ndjson_or_csv_and_nothing_of_the_voters() {
    const BALLOTS: usize = 2_500;
    let s = Stack::start().await;
    let options = ["red", "with, comma", "say \"hi\""];
    let (created, token) = s
        .create_poll(json!({"name": "Export", "options": options, "dedupe": "none", "max_choices": 2}))
        .await;
    let id = created["id"].as_str().expect("id").to_owned();
    let mut cast = std::collections::HashMap::new();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for i in 0..BALLOTS {
        let chosen: Vec<&str> = match i % 3 {
            0 => vec![options[0]],
            1 => vec![options[1], options[2]],
            _ => vec![options[2]],
        };
        let req = s
            .http
            .post(format!("{}/api/votes", s.vote))
            .header("x-voter-id", format!("secret-voter-{i}"))
            .json(&json!({"poll_id": id, "options": chosen}));
        pending.push(async move {
            let res = req.send().await.expect("vote");
            assert_eq!(res.status(), 201);
            let b: Value = res.json().await.expect("json");
            (b["id"].as_str().expect("ballot id").to_owned(), chosen)
        });
        if pending.len() >= 64 {
            let (bid, chosen) = pending.next().await.expect("a ballot");
            cast.insert(bid, chosen);
        }
    }
    while let Some((bid, chosen)) = pending.next().await {
        cast.insert(bid, chosen);
    }
    assert_eq!(cast.len(), BALLOTS);

    let url = format!("{}/api/polls/{id}/ballots", s.poll);
    expect_problem(s.http.get(&url).send().await.expect("export"), 401).await;
    let refused = s
        .http
        .get(&url)
        .bearer_auth(&token)
        .header("accept", "application/xml")
        .send()
        .await
        .expect("export");
    let problem = expect_problem(refused, 406).await;
    assert!(
        problem["detail"].as_str().is_some_and(|d| d.contains("text/csv")),
        "{problem}"
    );

    let res = s.http.get(&url).bearer_auth(&token).send().await.expect("export");
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-type"), "application/x-ndjson");
    let body = res.text().await.expect("body");
    assert!(!body.contains("secret-voter") && !body.contains("voter") && !body.contains("key"));
    let mut seen = std::collections::HashMap::new();
    for line in body.lines() {
        let b: Value = serde_json::from_str(line).expect("a JSON line");
        let mut fields: Vec<&str> = b.as_object().expect("object").keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["choices", "created_at", "id"], "nothing else: {line}");
        let chosen: Vec<String> = serde_json::from_value(b["choices"].clone()).expect("texts");
        assert!(
            seen.insert(b["id"].as_str().expect("id").to_owned(), chosen).is_none(),
            "each ballot once"
        );
    }
    assert_eq!(seen.len(), BALLOTS, "every ballot");
    for (bid, chosen) in &cast {
        assert_eq!(
            seen.get(bid).map(|c| c.iter().map(String::as_str).collect::<Vec<_>>()),
            Some(chosen.clone())
        );
    }

    let res = s
        .http
        .get(&url)
        .bearer_auth(&token)
        .header("accept", "text/csv")
        .send()
        .await
        .expect("export");
    assert_eq!(res.status(), 200);
    assert!(header(&res, "content-type").starts_with("text/csv"));
    let body = res.text().await.expect("body");
    let mut lines = body.lines();
    assert_eq!(lines.next(), Some(r#"id,created_at,red,"with, comma","say ""hi""""#));
    let mut rows = 0;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 5, "{line}");
        let marks: Vec<&str> = options
            .iter()
            .map(|o| if cast[f[0]].contains(o) { "1" } else { "0" })
            .collect();
        assert_eq!(&f[2..], marks.as_slice(), "{line}");
        assert!(f[1].parse::<chrono::DateTime<chrono::Utc>>().is_ok(), "{line}");
        rows += 1;
    }
    assert_eq!(rows, BALLOTS);
}
