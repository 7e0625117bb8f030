//! Voting methods over real HTTP: `choice` with `min_choices`, `ranked` (instant runoff,
//! Condorcet, pairwise) and `score`, their ballots, results, exports and refusals.

use std::time::Duration;

use api_tests::{Stack, eventually, expect_problem, names_field};
use serde_json::{Value, json};

const CITIES: [&str; 4] = ["Memphis", "Nashville", "Chattanooga", "Knoxville"];

/// Casts `n` ballots of `body` (a `poll_id` is added) on a poll without dedupe; returns the last
/// answer.
async fn cast_many(s: &Stack, poll: &str, body: Value, n: usize) -> Value {
    let mut last = Value::Null;
    for _ in 0..n {
        let mut b = body.clone();
        b["poll_id"] = json!(poll);
        let res = s.vote(b).await;
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
        last = res.json().await.expect("json");
    }
    last
}

/// A 200 answer's body as text.
async fn body_of(req: reqwest::RequestBuilder) -> String {
    let res = req.send().await.expect("get");
    assert_eq!(res.status(), 200);
    res.text().await.expect("text")
}

/// The poll's results as CSV.
async fn results_csv(s: &Stack, poll: &str) -> String {
    body_of(s.http.get(format!("{}/api/polls/{poll}/results.csv", s.poll))).await
}

/// The admin's export of every ballot, in the format `accept` asks for.
async fn ballots_export(s: &Stack, poll: &str, token: &str, accept: &str) -> String {
    body_of(
        s.http
            .get(format!("{}/api/polls/{poll}/ballots", s.poll))
            .bearer_auth(token)
            .header("accept", accept),
    )
    .await
}

/// The textbook case where instant runoff and Condorcet disagree (Tennessee's capital): 42 % rank
/// Memphis first, 26 % Nashville, 15 % Chattanooga, 17 % Knoxville. Instant runoff elects
/// Knoxville; Nashville beats every other city head to head.
#[tokio::test]
async fn a_ranked_poll_runs_an_instant_runoff_and_finds_the_condorcet_winner() {
    let s = Stack::start().await;
    let (created, token) = s
        .create_poll(json!({"name": "Capital", "options": CITIES, "method": "ranked", "dedupe": "none"}))
        .await;
    assert_eq!(created["method"], "ranked");
    assert_eq!(created["max_choices"], 4, "a ranked poll ranks every option by default");
    assert_eq!(created["min_choices"], 1);
    assert!(created.get("max_score").is_none(), "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let groups: [(&[&str], usize); 4] = [
        (&["Memphis", "Nashville", "Chattanooga", "Knoxville"], 42),
        (&["Nashville", "Chattanooga", "Knoxville", "Memphis"], 26),
        (&["chattanooga ", "Knoxville", "Nashville", "Memphis"], 15),
        (&["Knoxville", "Chattanooga", "Nashville", "Memphis"], 17),
    ];
    let mut last = Value::Null;
    for (ranking, n) in groups {
        last = cast_many(&s, &id, json!({"ranking": ranking}), n).await;
    }
    assert_eq!(
        last["ranking"],
        json!(["Knoxville", "Chattanooga", "Nashville", "Memphis"])
    );
    assert_eq!(last["options"], json!(["Knoxville"]), "the first preference");

    let p = s.get_poll(&id).await;
    let votes = &p["votes"];
    assert_eq!(votes["count"], 100);
    let firsts: Vec<&Value> = votes["by_option"]
        .as_array()
        .expect("by_option")
        .iter()
        .map(|o| &o["count"])
        .collect();
    assert_eq!(
        firsts,
        [&json!(42), &json!(26), &json!(15), &json!(17)],
        "first preferences"
    );
    let ranked = &votes["ranked"];
    assert_eq!(ranked["winner"], "Knoxville", "{ranked}");
    assert_eq!(ranked["condorcet_winner"], "Nashville");
    assert_eq!(
        ranked["rounds"],
        json!([
            {"round": 1, "exhausted": 0, "eliminated": "Chattanooga", "counts": [
                {"option": "Memphis", "votes": 42}, {"option": "Nashville", "votes": 26},
                {"option": "Chattanooga", "votes": 15}, {"option": "Knoxville", "votes": 17}]},
            {"round": 2, "exhausted": 0, "eliminated": "Nashville", "counts": [
                {"option": "Memphis", "votes": 42}, {"option": "Nashville", "votes": 26},
                {"option": "Knoxville", "votes": 32}]},
            {"round": 3, "exhausted": 0, "eliminated": null, "counts": [
                {"option": "Memphis", "votes": 42}, {"option": "Knoxville", "votes": 58}]},
        ])
    );
    // Nashville over Memphis 58–42, over Chattanooga and Knoxville 68–32.
    assert_eq!(ranked["pairwise"][1], json!([58, 0, 68, 68]));
    assert_eq!(ranked["pairwise"][0], json!([0, 42, 42, 42]));

    let csv = results_csv(&s, &id).await;
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "round,option,votes,exhausted,outcome,ballots");
    assert!(rows.contains(&"1,Chattanooga,15,0,eliminated,100"), "{csv}");
    assert!(rows.contains(&"3,Knoxville,58,0,elected,100"), "{csv}");
    assert_eq!(rows.len(), 1 + 4 + 3 + 2, "a row per round and option in the running");

    let export = ballots_export(&s, &id, &token, "text/csv").await;
    let lines: Vec<&str> = export.lines().collect();
    assert_eq!(lines[0], "id,created_at,Memphis,Nashville,Chattanooga,Knoxville");
    assert_eq!(lines.len(), 101);
    assert_eq!(
        lines.iter().filter(|l| l.ends_with(",4,1,2,3")).count(),
        26,
        "the rank of each option"
    );
    let ndjson = ballots_export(&s, &id, &token, "application/x-ndjson").await;
    let first: Value = serde_json::from_str(ndjson.lines().next().expect("a line")).expect("json");
    assert_eq!(first["ranking"].as_array().map(Vec::len), Some(4), "{first}");

    // The receipt shows the ranking as counted.
    let res = s
        .http
        .get(format!("{}/api/votes/{}", s.vote, last["id"].as_str().expect("id")))
        .bearer_auth(last["receipt"].as_str().expect("receipt"))
        .send()
        .await
        .expect("get vote");
    assert_eq!(res.status(), 200);
    let shown: Value = res.json().await.expect("json");
    assert_eq!(shown["ranking"], last["ranking"]);
}

#[tokio::test]
async fn ranked_ballots_are_checked_field_by_field_and_nothing_bad_is_stored() {
    let s = Stack::start().await;
    let (id, _) = s
        .simple_poll(json!({"method": "ranked", "min_choices": 2, "max_choices": 2, "dedupe": "none"}))
        .await;
    let (choice, _) = s.simple_poll(json!({"dedupe": "none"})).await;
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"poll_id": id, "ranking": ["red", "RED"]}),
            422,
            "ranking[1]",
            "duplicate-option",
        ),
        (
            json!({"poll_id": id, "ranking": ["red", "pink"]}),
            422,
            "ranking[1]",
            "unknown-option",
        ),
        (
            json!({"poll_id": id, "ranking": ["red", "green", "blue"]}),
            422,
            "ranking",
            "too-many-choices",
        ),
        (
            json!({"poll_id": id, "ranking": ["red"]}),
            422,
            "ranking",
            "too-few-choices",
        ),
        (
            json!({"poll_id": id, "option": "red"}),
            422,
            "option",
            "wrong-ballot-shape",
        ),
        (
            json!({"poll_id": id, "scores": {"red": 1}}),
            422,
            "scores",
            "wrong-ballot-shape",
        ),
        (
            json!({"poll_id": choice, "ranking": ["red"]}),
            422,
            "ranking",
            "wrong-ballot-shape",
        ),
        (json!({"poll_id": id, "ranking": []}), 400, "ranking", "validation"),
        (
            json!({"poll_id": id, "ranking": ["red", ""]}),
            400,
            "ranking[1]",
            "validation",
        ),
        (json!({"poll_id": id, "ranking": "red"}), 400, "ranking", "validation"),
        (
            json!({"poll_id": id, "option": "red", "ranking": ["red", "blue"]}),
            400,
            "ranking",
            "validation",
        ),
    ];
    for (body, status, field, kind) in cases {
        let p = expect_problem(s.vote(body.clone()).await, status).await;
        assert!(names_field(&p, field), "{body} should name {field}: {p}");
        assert_eq!(p["type"], format!("urn:pollvote:problem:{kind}"), "{body}: {p}");
    }
    for poll in [&id, &choice] {
        assert_eq!(s.get_poll(poll).await["votes"]["count"], 0, "nothing was stored");
    }
    let ok = s.vote(json!({"poll_id": id, "ranking": ["Blue", "red"]})).await;
    assert_eq!(ok.status(), 201);
    // The poll read above may be served from the poll service's short-lived cache.
    let p = eventually(Duration::from_secs(5), Duration::from_millis(50), || async {
        let p = s.get_poll(&id).await;
        if p["votes"]["count"] == 1 {
            Ok(p)
        } else {
            Err(format!("not counted yet: {p}"))
        }
    })
    .await;
    let ranked = &p["votes"]["ranked"];
    assert_eq!(ranked["winner"], "blue", "{ranked}");
    assert_eq!(ranked["rounds"][0]["counts"][2], json!({"option": "blue", "votes": 1}));
}

#[tokio::test]
async fn a_score_poll_sums_and_averages_every_options_scores() {
    let s = Stack::start().await;
    let (created, token) = s
        .create_poll(
            json!({"name": "Rate", "options": ["tea", "coffee", "water"], "method": "score",
            "max_score": 10, "dedupe": "none"}),
        )
        .await;
    assert_eq!(
        (created["method"].as_str(), created["max_score"].as_u64()),
        (Some("score"), Some(10))
    );
    let id = created["id"].as_str().expect("id").to_owned();
    cast_many(&s, &id, json!({"scores": {"tea": 10, "coffee": 4}}), 2).await;
    let last = cast_many(&s, &id, json!({"scores": {"Water ": 7, "tea": 0}}), 1).await;
    assert_eq!(last["scores"], json!({"tea": 0, "coffee": 0, "water": 7}));
    assert_eq!(last["options"], json!(["water"]), "the options scored above 0");
    cast_many(&s, &id, json!({"scores": {}}), 1).await;

    let bad: Vec<(Value, &str, &str)> = vec![
        (
            json!({"poll_id": id, "scores": {"tea": 11}}),
            "scores.tea",
            "score-out-of-range",
        ),
        (
            json!({"poll_id": id, "scores": {"tea": -1}}),
            "scores.tea",
            "score-out-of-range",
        ),
        (
            json!({"poll_id": id, "scores": {"juice": 1}}),
            "scores.juice",
            "unknown-option",
        ),
        // (Sent in key order: `TEA` first.)
        (
            json!({"poll_id": id, "scores": {"tea": 1, "TEA": 2}}),
            "scores.tea",
            "duplicate-option",
        ),
        (
            json!({"poll_id": id, "options": ["tea"]}),
            "options",
            "wrong-ballot-shape",
        ),
    ];
    for (body, field, kind) in bad {
        let p = expect_problem(s.vote(body.clone()).await, 422).await;
        assert!(names_field(&p, field), "{body} should name {field}: {p}");
        assert_eq!(p["type"], format!("urn:pollvote:problem:{kind}"), "{body}: {p}");
    }
    let p = expect_problem(s.vote(json!({"poll_id": id, "scores": {"tea": 2.5}})).await, 400).await;
    assert!(names_field(&p, "scores.tea"), "{p}");

    let votes = &s.get_poll(&id).await["votes"];
    assert_eq!(
        votes["count"], 4,
        "the refused ballots were not stored; an all-zero ballot counts"
    );
    assert_eq!(
        votes["by_option"],
        json!([
            {"option": "tea", "count": 2, "sum": 20, "mean": 5.0},
            {"option": "coffee", "count": 2, "sum": 8, "mean": 2.0},
            {"option": "water", "count": 1, "sum": 7, "mean": 1.75},
        ])
    );
    assert!(votes.get("ranked").is_none());
    let csv = results_csv(&s, &id).await;
    assert_eq!(
        csv,
        "option,count,sum,mean,ballots\ntea,2,20,5,4\ncoffee,2,8,2,4\nwater,1,7,1.75,4\n"
    );
    let export = ballots_export(&s, &id, &token, "text/csv").await;
    let mut rows: Vec<&str> = export
        .lines()
        .skip(1)
        .map(|l| l.splitn(3, ',').nth(2).unwrap_or(""))
        .collect();
    rows.sort_unstable();
    assert_eq!(rows, ["0,0,0", "0,0,7", "10,4,0", "10,4,0"]);
}

#[tokio::test]
async fn method_settings_are_checked_when_a_poll_is_created_or_changed() {
    let s = Stack::start().await;
    let base = json!({"name": "n", "options": ["a", "b", "c"]});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let nine: Vec<String> = (1..=9).map(|i| format!("option {i}")).collect();
    let cases: Vec<(Value, &str)> = vec![
        (with(json!({"min_choices": 2})), "min_choices"),
        (with(json!({"min_choices": 0, "max_choices": 2})), "min_choices"),
        (with(json!({"max_score": 3})), "max_score"),
        (with(json!({"method": "ranked", "max_score": 3})), "max_score"),
        (with(json!({"method": "score", "max_choices": 2})), "max_choices"),
        (with(json!({"method": "score", "min_choices": 1})), "min_choices"),
        (with(json!({"method": "score", "max_score": 11})), "max_score"),
        (with(json!({"method": "score", "max_score": 0})), "max_score"),
        (with(json!({"method": "plurality"})), "method"),
        (json!({"name": "n", "options": nine, "method": "ranked"}), "max_choices"),
    ];
    for (body, field) in cases {
        let res = s
            .http
            .post(format!("{}/api/polls", s.poll))
            .json(&body)
            .send()
            .await
            .expect("post");
        let p = expect_problem(res, 400).await;
        assert!(names_field(&p, field), "{body} should name {field}: {p}");
    }
    // Nine options ranked up to six is within the bound (79,209 rankings).
    let (p, _) = s
        .create_poll(json!({"name": "n", "options": nine, "method": "ranked", "max_choices": 6}))
        .await;
    assert_eq!(p["max_choices"], 6);

    let (id, token) = s
        .simple_poll(json!({"min_choices": 2, "max_choices": 3, "dedupe": "none"}))
        .await;
    let p = expect_problem(s.vote(json!({"poll_id": id, "option": "red"})).await, 422).await;
    assert_eq!(p["type"], "urn:pollvote:problem:too-few-choices");
    assert!(names_field(&p, "option"), "{p}");
    assert_eq!(
        s.vote(json!({"poll_id": id, "options": ["red", "blue"]}))
            .await
            .status(),
        201
    );
    let patch = |body: Value| {
        s.http
            .patch(format!("{}/api/polls/{id}", s.poll))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let p = expect_problem(patch(json!({"min_choices": 4})).await.expect("patch"), 400).await;
    assert!(names_field(&p, "min_choices"), "{p}");
    let res = patch(json!({"min_choices": 1})).await.expect("patch");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json")["min_choices"], 1);
    let p = expect_problem(patch(json!({"method": "score"})).await.expect("patch"), 400).await;
    assert!(names_field(&p, "method"), "the method cannot change: {p}");

    let (score, score_token) = s.simple_poll(json!({"method": "score"})).await;
    let res = s
        .http
        .patch(format!("{}/api/polls/{score}", s.poll))
        .bearer_auth(&score_token)
        .json(&json!({"max_choices": 2}))
        .send()
        .await
        .expect("patch");
    let p = expect_problem(res, 400).await;
    assert!(names_field(&p, "max_choices"), "{p}");
    assert_eq!(s.get_poll(&score).await["max_score"], 5, "the default");
}
