//! The storage contract on MongoDB-protocol servers (SecantusDB in CI, any MongoDB with
//! `MONGODB_TEST_URI`), plus what is specific to that backend: the predecessor's poll documents,
//! idempotent start-up, duplicate handling, the Cosmos DB throttling retry (no server needed) and
//! fast failure when the server is unreachable.
//!
//! `MONGODB_TEST_URI` names the server (`scripts/secantusdb start <dir>` prints one). Without it
//! the server tests say `skipped: <why>` on stderr and pass, except under `CI=true`, where they fail. Every test
//! works in a database of its own, `contract_<uuid>`, dropped afterwards.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::Utc;
use mongodb::Client;
use mongodb::bson::{Document, doc, oid::ObjectId};
use mongodb::error::{CommandError, Error as MongoError, ErrorKind};
use poll_service::record::{PollCursor, PollQuery};
use poll_service::store::PollStore;
use poll_service::store::contract::{poll_store_concurrency_contract, poll_store_contract, sample_poll};
use poll_service::store::mongo::{MongoPollStore, POLLS_COLLECTION};
use shared::Problem;
use shared::backoff::Backoff;
use shared::contract::{DedupePolicy, ResultsVisibility, new_poll_id};
use shared::mongo::{Decision, Failure, MongoSettings, RetryPolicy, build_client, classify, is_duplicate_key};
use shared::storage::StoreError;
use vote_service::ballot::CastOutcome;
use vote_service::store::contract::{ballot_store_contract, revision_contract, sample_ballot};
use vote_service::store::mongo::{BALLOTS_COLLECTION, MongoBallotStore, Tuning};
use vote_service::store::{BallotStore, DynBallotStore, Revision};

/// The test server's URI, or `None` (after saying why, visibly) when the test is skipped; under
/// `CI=true` a missing server fails the test.
fn test_uri() -> Option<String> {
    match std::env::var("MONGODB_TEST_URI") {
        Ok(uri) if !uri.trim().is_empty() => Some(uri),
        _ => {
            api_tests::skip("MONGODB_TEST_URI is not set (`scripts/secantusdb start <dir>` prints one)");
            None
        }
    }
}

fn settings(uri: &str, database: &str) -> MongoSettings {
    MongoSettings {
        server_selection_timeout: Duration::from_secs(5),
        operation_timeout: Duration::from_secs(20),
        ..MongoSettings::new(uri, database)
    }
}

/// Runs `body` with a client and a fresh database name, then drops that database, whether the
/// body passed or panicked.
async fn with_database<F, Fut>(body: F)
where
    F: FnOnce(Client, MongoSettings) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(uri) = test_uri() else { return };
    let name = format!("contract_{}", uuid::Uuid::new_v4().simple());
    let settings = settings(&uri, &name);
    let client = build_client(&settings).await.expect("client");
    let outcome = tokio::spawn(body(client.clone(), settings)).await;
    client.database(&name).drop().await.expect("drop the test database");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn poll_store(client: &Client, s: &MongoSettings) -> MongoPollStore {
    MongoPollStore::open(client.clone(), &s.database, s.retry_policy())
        .await
        .expect("open poll store")
}

async fn ballot_store(client: &Client, s: &MongoSettings) -> MongoBallotStore {
    ballot_store_with(client, s, Tuning::default()).await
}

async fn ballot_store_with(client: &Client, s: &MongoSettings, tuning: Tuning) -> MongoBallotStore {
    MongoBallotStore::open(client.clone(), &s.database, s.retry_policy(), tuning)
        .await
        .expect("open ballot store")
}

async fn index_names(client: &Client, s: &MongoSettings, collection: &str) -> Vec<String> {
    let mut names = client
        .database(&s.database)
        .collection::<Document>(collection)
        .list_index_names()
        .await
        .expect("list indexes");
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_poll_store_meets_the_contract() {
    with_database(|client, s| async move {
        poll_store_contract(Arc::new(poll_store(&client, &s).await)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_poll_store_concurrent_replaces_have_one_winner() {
    with_database(|client, s| async move {
        poll_store_concurrency_contract(Arc::new(poll_store(&client, &s).await)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_ballot_store_meets_the_contract() {
    with_database(|client, s| async move {
        ballot_store_contract(Arc::new(ballot_store(&client, &s).await)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_revision_contract_on_one_store() {
    with_database(|client, s| async move {
        revision_contract(&[Arc::new(ballot_store(&client, &s).await)]).await;
    })
    .await;
}

/// Two replicas change each other's ballots (a withdrawal counted by another writer than the
/// ballot), without tally caches so that each reads the other's changes at once; a third replica
/// opened afterwards reads the same tallies from the counters and tails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_revision_contract_across_replicas() {
    with_database(|client, s| async move {
        let tuning = Tuning {
            tally_cache_ttl: Duration::ZERO,
            ..Tuning::default()
        };
        let a: DynBallotStore = Arc::new(ballot_store_with(&client, &s, tuning).await);
        let b: DynBallotStore = Arc::new(ballot_store_with(&client, &s, tuning).await);
        revision_contract(&[a.clone(), b.clone()]).await;
        // Kept data, read by a newcomer: cast and change through two replicas, then a third reads.
        let poll = new_poll_id(chrono::Utc::now());
        let mut ballots = Vec::new();
        for i in 0..30u32 {
            let ballot = sample_ballot(&poll, &format!("id:kept-{i}"), &[i % 2]);
            let via = if i % 2 == 0 { &a } else { &b };
            via.cast(ballot.clone()).await.expect("cast");
            ballots.push(ballot);
        }
        for (i, ballot) in ballots.iter().enumerate().take(10) {
            let via = if i % 2 == 0 { &b } else { &a };
            let change = if i < 5 {
                Revision::Withdraw
            } else {
                Revision::Replace(vote_service::ballot::Marked {
                    choices: vec![2],
                    ..Default::default()
                })
            };
            via.revise(ballot, change).await.expect("revise");
        }
        // Whether the appliers have folded the changes into the counters yet or not, a newcomer
        // counts each once (counter or tail).
        let c = ballot_store_with(&client, &s, tuning).await;
        let recount = c.recount(&poll).await.expect("recount").trimmed();
        assert_eq!(recount.total, 25);
        assert_eq!(recount.by_option, vec![10, 10, 5]);
        assert_eq!(c.tally(&poll).await.expect("tally").trimmed(), recount);
        for store in [&a, &b] {
            assert_eq!(store.repair(&poll).await.expect("repair").corrected, 0);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_ballot_store_meets_the_contract_without_tally_cache() {
    with_database(|client, s| async move {
        let tuning = Tuning {
            tally_cache_ttl: Duration::ZERO,
            ..Tuning::default()
        };
        ballot_store_contract(Arc::new(ballot_store_with(&client, &s, tuning).await)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predecessor_poll_documents_are_served() {
    with_database(|client, s| async move {
        let store = poll_store(&client, &s).await;
        // Exactly what the predecessor's Flask service wrote.
        let oid = ObjectId::new();
        client
            .database(&s.database)
            .collection::<Document>(POLLS_COLLECTION)
            .insert_one(doc! {
                "_id": oid,
                "name": "Favourite colour?",
                "desc": "from the old service",
                "options": ["red", "green"],
                "votes": { "count": 5 },
            })
            .await
            .expect("insert a legacy document");

        let poll = store.get(&oid.to_hex()).await.expect("get").expect("legacy poll found");
        assert_eq!(poll.id, oid.to_hex());
        assert_eq!(poll.name, "Favourite colour?");
        assert_eq!(poll.desc, "from the old service");
        assert_eq!(poll.options, vec!["red".to_owned(), "green".to_owned()]);
        assert_eq!(poll.legacy_votes, 5);
        assert_eq!(poll.max_choices, 1);
        assert_eq!(poll.results, ResultsVisibility::Always);
        assert_eq!(poll.dedupe, DedupePolicy::Ip);
        assert!(poll.admin_token_hash.is_none(), "legacy polls have no admin token");
        assert!(poll.closes_at.is_none() && poll.closed_at.is_none());
        let created_secs = oid.timestamp().timestamp_millis() / 1000;
        assert_eq!(
            poll.created_at.timestamp(),
            created_secs,
            "created_at is the ObjectId's time"
        );
        assert!(
            store.get(&oid.to_hex().to_uppercase()).await.expect("get").is_some(),
            "ids are case-insensitive"
        );

        // Listed with the new polls: newest first, the legacy one last, across page boundaries.
        let newer = sample_poll("new", 0);
        store.create(&newer).await.expect("create");
        let now = Utc::now();
        let all = store
            .list(&PollQuery {
                limit: 10,
                after: None,
                status: None,
                now,
            })
            .await
            .expect("list");
        let ids: Vec<_> = all.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, vec![newer.id.as_str(), poll.id.as_str()]);
        let first = store
            .list(&PollQuery {
                limit: 1,
                after: None,
                status: None,
                now,
            })
            .await
            .expect("page 1");
        let after = Some(PollCursor {
            created_at: first[0].created_at,
            id: first[0].id.clone(),
        });
        let second = store
            .list(&PollQuery {
                limit: 1,
                after,
                status: None,
                now,
            })
            .await
            .expect("page 2");
        assert_eq!(second, vec![poll.clone()], "the legacy poll is on the next page");
        let after = Some(PollCursor {
            created_at: poll.created_at,
            id: poll.id.clone(),
        });
        let third = store
            .list(&PollQuery {
                limit: 1,
                after,
                status: None,
                now,
            })
            .await
            .expect("page 3");
        assert!(third.is_empty(), "nothing after the oldest poll");
        let open = store
            .list(&PollQuery {
                limit: 10,
                after: None,
                status: Some(poll_service::record::StatusFilter::Open),
                now,
            })
            .await
            .expect("open polls");
        assert_eq!(open.len(), 2, "legacy polls are open");

        // A legacy poll is revision 0; replacing it writes the new layout.
        let mut renamed = poll.clone();
        renamed.name = "renamed".into();
        renamed.revision = 1;
        assert!(store.replace(&renamed, 0).await.expect("replace legacy"));
        assert_eq!(store.get(&poll.id).await.expect("get"), Some(renamed));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_twice_is_idempotent_and_keeps_data() {
    with_database(|client, s| async move {
        let polls = poll_store(&client, &s).await;
        let ballots = ballot_store(&client, &s).await;
        let poll = sample_poll("kept", 1);
        polls.create(&poll).await.expect("create");
        assert!(matches!(
            ballots.cast(sample_ballot(&poll.id, "id:a", &[0])).await.expect("cast"),
            CastOutcome::Accepted(_)
        ));
        let poll_indexes = index_names(&client, &s, POLLS_COLLECTION).await;
        let ballot_indexes = index_names(&client, &s, BALLOTS_COLLECTION).await;
        assert_eq!(poll_indexes, vec!["_id_", "newest_first"]);
        assert_eq!(
            ballot_indexes,
            vec!["_id_", "ballot_id", "poll_voter", "poll_writer_seq"]
        );

        // A second process starting (or a restart) against the same, non-empty database.
        let polls_again = poll_store(&client, &s).await;
        let ballots_again = ballot_store(&client, &s).await;
        assert_eq!(index_names(&client, &s, POLLS_COLLECTION).await, poll_indexes);
        assert_eq!(index_names(&client, &s, BALLOTS_COLLECTION).await, ballot_indexes);
        assert_eq!(polls_again.get(&poll.id).await.expect("get"), Some(poll.clone()));
        assert_eq!(ballots_again.tally(&poll.id).await.expect("tally").total, 1);
        assert!(matches!(
            ballots_again
                .cast(sample_ballot(&poll.id, "id:a", &[1]))
                .await
                .expect("cast"),
            CastOutcome::Duplicate(_)
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_refused_by_the_database() {
    with_database(|client, s| async move {
        let polls = poll_store(&client, &s).await;
        let ballots = ballot_store(&client, &s).await;
        let poll_id = new_poll_id(Utc::now());

        let first = sample_ballot(&poll_id, "ip:one", &[1]);
        assert_eq!(
            ballots.cast(first.clone()).await.expect("cast"),
            CastOutcome::Accepted(first.clone())
        );
        // Another request from the same voter: refused, the stored ballot is returned untouched.
        let second = sample_ballot(&poll_id, "ip:one", &[0]);
        assert_eq!(
            ballots.cast(second).await.expect("cast"),
            CastOutcome::Duplicate(first.clone())
        );
        // The same ballot again (an insert repeated after a lost reply) is recognised as ours.
        assert_eq!(
            ballots.cast(first.clone()).await.expect("cast"),
            CastOutcome::Accepted(first.clone())
        );
        assert_eq!(ballots.tally(&poll_id).await.expect("tally").by_option, vec![0, 1]);
        assert_eq!(ballots.recount(&poll_id).await.expect("recount").total, 1);

        // The refusal is the database's: a raw insert of the same identity fails with 11000.
        let raw = client.database(&s.database).collection::<Document>(BALLOTS_COLLECTION);
        let err = raw
            .insert_one(doc! { "_id": format!("{poll_id}:ip:one"), "poll_id": &poll_id })
            .await
            .expect_err("the database refuses a second ballot with the same identity");
        assert!(is_duplicate_key(&err), "11000 expected, got {err}");
        assert!(matches!(classify(&err), Failure::Fatal { .. }));
        let docs = raw.count_documents(doc! { "poll_id": &poll_id }).await.expect("count");
        assert_eq!(docs, 1);

        // A tally read on another replica is at most `tally_cache_ttl` stale; this one reads its
        // own writes at once.
        let other = MongoBallotStore::open(
            client.clone(),
            &s.database,
            s.retry_policy(),
            Tuning {
                tally_cache_ttl: Duration::from_millis(200),
                ..Tuning::default()
            },
        )
        .await
        .expect("open");
        assert_eq!(other.tally(&poll_id).await.expect("tally").total, 1);
        ballots
            .cast(sample_ballot(&poll_id, "ip:two", &[0]))
            .await
            .expect("cast");
        assert_eq!(
            ballots.tally(&poll_id).await.expect("tally").total,
            2,
            "own writes are read at once"
        );
        // Other replicas: a reader past the TTL may be served the kept tally once while it is
        // refreshed in the background; the new ballot shows up right after.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let total = other.tally(&poll_id).await.expect("tally").total;
            if total == 2 {
                break;
            }
            assert_eq!(total, 1);
            assert!(Instant::now() < deadline, "the other replica never saw the new ballot");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // After a quiet spell (5 TTLs) a read asks the database at once.
        tokio::time::sleep(Duration::from_millis(1050)).await;
        ballots
            .cast(sample_ballot(&poll_id, "ip:three", &[1]))
            .await
            .expect("cast");
        assert_eq!(other.tally(&poll_id).await.expect("tally").total, 3);

        // A poll id clash is an error, not a silent overwrite.
        let poll = sample_poll("p", 1);
        polls.create(&poll).await.expect("create");
        let mut clash = poll.clone();
        clash.name = "other".into();
        assert!(matches!(polls.create(&clash).await, Err(StoreError::Internal(_))));
        assert_eq!(polls.get(&poll.id).await.expect("get"), Some(poll));
    })
    .await;
}

/// Group commit: concurrent ballots share `insertMany` commands (counted with the driver's command
/// monitoring), every one is acknowledged and counted once, and a batch holding the same identity
/// twice stores it once and answers the other caller with the stored ballot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ballots_share_insert_commands() {
    with_database(|_, s| async move {
        let inserts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let aggregations = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut options = mongodb::options::ClientOptions::parse(s.uri.expose())
            .await
            .expect("options");
        let (seen_inserts, seen_aggregations) = (inserts.clone(), aggregations.clone());
        options.command_event_handler = Some(mongodb::event::EventHandler::callback(move |ev| {
            if let mongodb::event::command::CommandEvent::Started(started) = ev {
                match started.command_name.as_str() {
                    "insert" => seen_inserts.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    "aggregate" => seen_aggregations.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    _ => 0,
                };
            }
        }));
        let client = Client::with_options(options).expect("client");
        let ballots = Arc::new(ballot_store(&client, &s).await);
        let poll_id = new_poll_id(Utc::now());

        const TASKS: usize = 64;
        const EACH: usize = 10;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (ballots, poll_id) = (ballots.clone(), poll_id.clone());
            tasks.push(tokio::spawn(async move {
                let mut accepted = 0;
                for n in 0..EACH {
                    let b = sample_ballot(&poll_id, &format!("ip:{t}-{n}"), &[(n % 2) as u32]);
                    if matches!(ballots.cast(b).await.expect("cast"), CastOutcome::Accepted(_)) {
                        accepted += 1;
                    }
                }
                accepted
            }));
        }
        let mut accepted = 0;
        for t in tasks {
            accepted += t.await.expect("task");
        }
        assert_eq!(accepted, TASKS * EACH);
        let commands = inserts.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            commands * 2 <= TASKS * EACH,
            "{commands} insert commands for {} ballots: concurrent ballots were not batched",
            TASKS * EACH
        );
        let tally = ballots.tally(&poll_id).await.expect("tally");
        assert_eq!(tally.total, (TASKS * EACH) as u64);
        assert_eq!(tally, ballots.recount(&poll_id).await.expect("recount"));

        // Reading our own writes does not cost an aggregation per ballot: the kept tally plus
        // this process's acknowledged batches is exact.
        let before = aggregations.load(std::sync::atomic::Ordering::Relaxed);
        for n in 0..30u64 {
            let b = sample_ballot(&poll_id, &format!("ip:seq-{n}"), &[1]);
            assert!(matches!(ballots.cast(b).await.expect("cast"), CastOutcome::Accepted(_)));
            let tally = ballots.tally(&poll_id).await.expect("tally");
            assert_eq!(
                tally.total,
                (TASKS * EACH) as u64 + n + 1,
                "own writes are read at once"
            );
        }
        let spent = aggregations.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(spent <= 3, "{spent} aggregations for 30 reads of our own writes");
        let tally = ballots.tally(&poll_id).await.expect("tally");
        assert_eq!(tally, ballots.recount(&poll_id).await.expect("recount"));

        // 32 concurrent ballots of one voter (different requests): batched together or not, one
        // is stored and every other caller gets that one back.
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (ballots, poll_id) = (ballots.clone(), poll_id.clone());
            tasks.push(tokio::spawn(async move {
                ballots
                    .cast(sample_ballot(&poll_id, "ip:same", &[1]))
                    .await
                    .expect("cast")
            }));
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.expect("task"));
        }
        let stored: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                CastOutcome::Accepted(b) => Some(b.clone()),
                CastOutcome::Duplicate(_) => None,
            })
            .collect();
        assert_eq!(stored.len(), 1, "exactly one of 32 identical ballots is accepted");
        assert!(outcomes.iter().all(|o| match o {
            CastOutcome::Accepted(b) | CastOutcome::Duplicate(b) => b == &stored[0],
        }));
        let tally = ballots.tally(&poll_id).await.expect("tally");
        assert_eq!(tally.total, (TASKS * EACH) as u64 + 31);
        assert_eq!(tally, ballots.recount(&poll_id).await.expect("recount"));
    })
    .await;
}

/// A server error as the driver reports it.
fn server_error(code: i32, name: &str, message: &str) -> MongoError {
    let err: CommandError = mongodb::bson::deserialize_from_document(doc! {
        "code": code, "codeName": name, "errmsg": message,
    })
    .expect("command error");
    MongoError::from(ErrorKind::Command(err))
}

fn throttled(retry_after_ms: u64) -> MongoError {
    server_error(
        16500,
        "TooManyRequests",
        &format!("Error=16500, RetryAfterMs={retry_after_ms}, Details='Request rate is large'"),
    )
}

/// Runs `policy` over an injected sequence of results, recording the sleeps instead of waiting.
async fn drive(
    policy: &RetryPolicy,
    script: Vec<Result<u32, MongoError>>,
) -> (Result<u32, StoreError>, Vec<Duration>, usize) {
    let script = Mutex::new(VecDeque::from(script));
    let attempts = Mutex::new(0usize);
    let sleeps = Mutex::new(Vec::new());
    let result = policy
        .run_with_sleep(
            || {
                *attempts.lock().expect("lock") += 1;
                let next = script
                    .lock()
                    .expect("lock")
                    .pop_front()
                    .unwrap_or_else(|| Err(throttled(100)));
                async move { next }
            },
            |d| {
                sleeps.lock().expect("lock").push(d);
                async {}
            },
        )
        .await;
    let attempts = *attempts.lock().expect("lock");
    (result, sleeps.into_inner().expect("lock"), attempts)
}

fn ms(v: &[u64]) -> Vec<Duration> {
    v.iter().copied().map(Duration::from_millis).collect()
}

/// Acceptance 4: Cosmos DB throttling (16500) is retried with bounded exponential backoff that
/// honours `RetryAfterMs`, and then answered with 503 and `Retry-After`. No server needed.
#[tokio::test]
async fn throttling_is_retried_with_bounded_backoff_then_answered_503() {
    let policy = RetryPolicy {
        max_retries: 5,
        backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(800)),
        deadline: Duration::from_secs(10),
        ..RetryPolicy::default()
    };

    // Classification of what Cosmos DB sends.
    assert!(
        matches!(classify(&throttled(72)), Failure::Throttled { retry_after: Some(d), .. } if d == Duration::from_millis(72))
    );

    // Throttled twice, then success: the backoff doubles, and is never shorter than RetryAfterMs.
    let (result, sleeps, attempts) = drive(&policy, vec![Err(throttled(72)), Err(throttled(72)), Ok(7)]).await;
    assert_eq!(result.expect("succeeds after retries"), 7);
    assert_eq!(sleeps, ms(&[72, 100]), "max(RetryAfterMs, 50 ms * 2^n)");
    assert_eq!(attempts, 3);

    // Throttled for good: 5 retries with exponential, capped backoff, then Unavailable.
    let (result, sleeps, attempts) = drive(&policy, (0..20).map(|_| Err(throttled(10))).collect()).await;
    assert_eq!(sleeps, ms(&[50, 100, 200, 400, 800]), "bounded exponential backoff");
    assert_eq!(attempts, 6, "one attempt plus max_retries retries");
    let err = result.expect_err("gives up");
    let StoreError::Unavailable {
        retry_after,
        ref message,
    } = err
    else {
        panic!("expected Unavailable, got {err:?}")
    };
    assert_eq!(retry_after, Duration::from_secs(1), "Retry-After is at least a second");
    assert!(message.contains("16500"), "{message}");

    // ... which the HTTP layer answers with 503 and Retry-After, without the driver's message.
    let response = Problem::from(err).into_response();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
    let body = String::from_utf8_lossy(&body);
    assert!(
        !body.contains("16500") && !body.contains("RetryAfterMs"),
        "driver text leaked: {body}"
    );

    // A long RetryAfterMs is honoured, but not past the deadline: give up early with that hint.
    let (result, sleeps, _) = drive(&policy, (0..20).map(|_| Err(throttled(4_000))).collect()).await;
    assert_eq!(sleeps, ms(&[4_000, 4_000]), "4 s + 4 s fit in 10 s, a third would not");
    assert!(
        matches!(result, Err(StoreError::Unavailable { retry_after, .. }) if retry_after == Duration::from_secs(4))
    );

    // An unreachable server is not retried here: Unavailable with 1 s at once.
    let io = MongoError::from(ErrorKind::Io(Arc::new(std::io::ErrorKind::ConnectionRefused.into())));
    let (result, sleeps, attempts) = drive(&policy, vec![Err(io)]).await;
    assert!(sleeps.is_empty() && attempts == 1);
    assert!(
        matches!(result, Err(StoreError::Unavailable { retry_after, .. }) if retry_after == Duration::from_secs(1))
    );

    // Other server errors are internal, not retried.
    let (result, sleeps, _) = drive(&policy, vec![Err(server_error(2, "BadValue", "bad"))]).await;
    assert!(sleeps.is_empty());
    assert!(matches!(result, Err(StoreError::Internal(_))));

    // The pure decision, for the record.
    let hint = Failure::Throttled {
        retry_after: Some(Duration::from_millis(300)),
        message: String::new(),
    };
    assert!(
        matches!(policy.decide(hint.clone(), 0, Duration::ZERO), Decision::Retry(d) if d == Duration::from_millis(300))
    );
    assert!(matches!(
        policy.decide(hint.clone(), 5, Duration::ZERO),
        Decision::GiveUp(StoreError::Unavailable { .. })
    ));
    assert!(matches!(
        policy.decide(hint, 0, Duration::from_millis(9_800)),
        Decision::GiveUp(_)
    ));
}

/// With no server listening, calls fail fast with Unavailable (503), never hang, and the error
/// text carries no credentials.
#[tokio::test]
async fn an_unreachable_server_fails_fast_as_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let uri = format!("mongodb://tester:s3cr3t-pw@127.0.0.1:{port}/?retryWrites=false");
    let s = MongoSettings {
        server_selection_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        operation_timeout: Duration::from_secs(3),
        ..MongoSettings::new(uri, "unreachable")
    };
    let client = build_client(&s).await.expect("building a client needs no server");
    let started = Instant::now();
    let err = match MongoBallotStore::open(client.clone(), &s.database, s.retry_policy(), Tuning::default()).await {
        Err(e) => e,
        Ok(_) => panic!("opened a store without a server"),
    };
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let StoreError::Unavailable { retry_after, message } = err else {
        panic!("expected Unavailable, got {err:?}")
    };
    assert_eq!(retry_after, Duration::from_secs(1));
    assert!(!message.contains("s3cr3t-pw"), "{message}");
    assert!(!format!("{s:?}").contains("s3cr3t-pw"));

    let bad = MongoSettings::new("mongodb://tester:s3cr3t-pw@/nohost?bogus===", "x");
    if let Err(e) = build_client(&bad).await {
        assert!(!e.to_string().contains("s3cr3t-pw"), "{e}");
    }
}

/// A SecantusDB of the test's own (so it can be crashed), killed when dropped (its data is temporary).
struct OwnSecantusDb {
    state: tempfile::TempDir,
}

impl OwnSecantusDb {
    fn script() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/secantusdb")
    }

    /// Starts (or restarts) the instance; `None` when SecantusDB cannot be provisioned here and the
    /// test may be skipped (never under CI, where the script fails instead).
    fn start(state: &std::path::Path) -> Option<String> {
        let out = std::process::Command::new("bash")
            .arg(Self::script())
            .arg("start")
            .arg(state)
            .output()
            .expect("run scripts/secantusdb");
        match out.status.code() {
            Some(0) => Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
            Some(77) => {
                api_tests::skip(String::from_utf8_lossy(&out.stderr).trim());
                None
            }
            _ => panic!(
                "scripts/secantusdb start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// A crash: SIGKILL, no shutdown.
    fn kill(&self) {
        let status = std::process::Command::new("bash")
            .arg(Self::script())
            .arg("kill")
            .arg(self.state.path())
            .status()
            .expect("run scripts/secantusdb");
        assert!(status.success(), "scripts/secantusdb kill failed");
    }
}

impl Drop for OwnSecantusDb {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(Self::script())
            .arg("kill")
            .arg(self.state.path())
            .status();
    }
}

/// The database crashes (SIGKILL) under a running store and comes back: calls fail fast with
/// Unavailable meanwhile, and the same client recovers by itself; nothing acknowledged is lost
/// and nothing is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_recovers_by_itself_when_the_server_returns() {
    if test_uri().is_none() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let Some(uri) = OwnSecantusDb::start(state.path()) else {
        return;
    };
    let server = OwnSecantusDb { state };
    let s = MongoSettings {
        server_selection_timeout: Duration::from_secs(1),
        operation_timeout: Duration::from_secs(3),
        ..MongoSettings::new(uri.clone(), "outage")
    };
    let client = build_client(&s).await.expect("client");
    let store = MongoBallotStore::open(client.clone(), &s.database, s.retry_policy(), Tuning::default())
        .await
        .expect("open");
    let poll = new_poll_id(Utc::now());
    let mut accepted = 0;
    assert!(matches!(
        store.cast(sample_ballot(&poll, "id:before", &[0])).await,
        Ok(CastOutcome::Accepted(_))
    ));
    accepted += 1;

    server.kill();
    let started = Instant::now();
    let err = store
        .cast(sample_ballot(&poll, "id:during", &[1]))
        .await
        .expect_err("no server, no ballot");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(store.ping().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "failed in {:?}, not fast",
        started.elapsed()
    );

    let again = OwnSecantusDb::start(server.state.path()).expect("restart");
    assert_eq!(again, uri, "a restart keeps the address");
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(20);
    loop {
        match store.cast(sample_ballot(&poll, "id:after", &[1])).await {
            Ok(CastOutcome::Accepted(_)) => break,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) if Instant::now() < deadline => {
                assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the store did not recover: {e:?}"),
        }
    }
    accepted += 1;
    eprintln!(
        "outage: failed in {:?}; recovered {:?} after restart",
        started.elapsed(),
        restarted.elapsed()
    );
    let tally = store.tally(&poll).await.expect("tally");
    assert_eq!(tally.total, accepted);
    assert_eq!(
        tally,
        store.recount(&poll).await.expect("recount"),
        "tally equals the stored ballots"
    );
    client.database(&s.database).drop().await.expect("drop");
    drop(server);
}

/// The counter documents of a poll, `(writer, seq, n)`, read raw.
async fn counters_of(client: &Client, s: &MongoSettings, poll_id: &str) -> Vec<(i64, i64, i64)> {
    use futures_util::TryStreamExt;
    let coll = client
        .database(&s.database)
        .collection::<Document>(&format!("{}_counters", BALLOTS_COLLECTION));
    let docs: Vec<Document> = coll
        .find(doc! { "poll_id": poll_id })
        .await
        .expect("find counters")
        .try_collect()
        .await
        .expect("read counters");
    docs.iter()
        .map(|d| {
            (
                d.get_i64("w").expect("w"),
                d.get_i64("seq").expect("seq"),
                d.get_i64("n").expect("n"),
            )
        })
        .collect()
}

/// Evaluates `check` every 50 ms until it holds, for at most `within`.
macro_rules! eventually {
    ($within:expr, $what:expr, $check:expr) => {{
        let deadline = Instant::now() + $within;
        while !$check {
            assert!(
                Instant::now() < deadline,
                "{} did not happen within {:?}",
                $what,
                $within
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

/// The counter of the writer that is not `not`, `(seq, n)`.
async fn counter_other_than(client: &Client, s: &MongoSettings, poll_id: &str, not: i64) -> Option<(i64, i64)> {
    counters_of(client, s, poll_id)
        .await
        .into_iter()
        .find(|c| c.0 != not)
        .map(|c| (c.1, c.2))
}

/// Two writers on one poll: once at rest, every ballot is covered by its writer's counter (no
/// tail left), each counter equals its writer's ballots, and a third process's tally — counters
/// plus an empty tail — equals the recount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_cover_every_ballot_at_rest() {
    with_database(|client, s| async move {
        let (a, b) = (
            Arc::new(ballot_store(&client, &s).await),
            Arc::new(ballot_store(&client, &s).await),
        );
        let poll_id = new_poll_id(Utc::now());
        let mut tasks = Vec::new();
        for t in 0..16 {
            let (store, poll_id) = (if t % 2 == 0 { a.clone() } else { b.clone() }, poll_id.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..50 {
                    let ballot = sample_ballot(&poll_id, &format!("id:{t}-{n}"), &[(n % 3) as u32]);
                    assert!(matches!(
                        store.cast(ballot).await.expect("cast"),
                        CastOutcome::Accepted(_)
                    ));
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        eventually!(
            Duration::from_secs(10),
            "counters folding every ballot",
            counters_of(&client, &s, &poll_id)
                .await
                .iter()
                .map(|c| c.2)
                .sum::<i64>()
                == 800
        );
        let counters = counters_of(&client, &s, &poll_id).await;
        assert_eq!(counters.len(), 2, "one counter per writer: {counters:?}");
        let raw = client.database(&s.database).collection::<Document>(BALLOTS_COLLECTION);
        for (w, seq, n) in &counters {
            let covered = raw
                .count_documents(doc! { "poll_id": &poll_id, "w": w, "s": { "$lte": seq } })
                .await
                .expect("count");
            let tail = raw
                .count_documents(doc! { "poll_id": &poll_id, "w": w, "s": { "$gt": seq } })
                .await
                .expect("count");
            assert_eq!((covered as i64, tail), (*n, 0), "writer {w}");
        }
        let third = ballot_store(&client, &s).await;
        let tally = third.tally(&poll_id).await.expect("tally");
        assert_eq!(tally, third.recount(&poll_id).await.expect("recount"));
        assert_eq!(tally.total, 800);
    })
    .await;
}

/// What a dead process leaves (a counter behind its last batches, an expired lease) is counted
/// exactly from the start, adopted into its counter by another replica, and a counter that went
/// wrong (a failover replaying or losing updates) is restored by the repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_writers_are_adopted_and_repair_restores_counters() {
    with_database(|client, s| async move {
        let db = client.database(&s.database);
        let raw = db.collection::<Document>(BALLOTS_COLLECTION);
        let counters = db.collection::<Document>(&format!("{}_counters", BALLOTS_COLLECTION));
        let writers = db.collection::<Document>(&format!("{}_writers", BALLOTS_COLLECTION));
        let store = ballot_store(&client, &s).await;
        let poll_id = new_poll_id(Utc::now());
        // Writer 7 died: batches 1 and 2 are in its counter, batch 3 is not.
        for (i, seq) in [1, 1, 2, 3, 3].into_iter().enumerate() {
            let mut d =
                vote_service::store::mongo::ballot_to_doc(&sample_ballot(&poll_id, &format!("id:dead{i}"), &[0]));
            d.insert("w", 7_i64);
            d.insert("s", seq as i64);
            raw.insert_one(d).await.expect("insert");
        }
        let counter_id = format!("{poll_id}:7");
        counters
            .insert_one(
                doc! { "_id": &counter_id, "poll_id": &poll_id, "w": 7_i64, "seq": 2_i64, "n": 3_i64,
                "o": { "0": 3_i64 }, "at": mongodb::bson::DateTime::now() },
            )
            .await
            .expect("counter");
        let expired = mongodb::bson::DateTime::from_millis(mongodb::bson::DateTime::now().timestamp_millis() - 120_000);
        writers
            .insert_one(doc! { "_id": 7_i64, "at": expired })
            .await
            .expect("writer");
        store
            .cast(sample_ballot(&poll_id, "id:alive", &[1]))
            .await
            .expect("cast");
        assert_eq!(store.tally(&poll_id).await.expect("tally").by_option, vec![5, 1]);

        assert_eq!(store.adopt_dead_writers().await.expect("adopt"), 1);
        let c = counters
            .find_one(doc! { "_id": &counter_id })
            .await
            .expect("read")
            .expect("counter");
        assert_eq!((c.get_i64("seq").expect("seq"), c.get_i64("n").expect("n")), (3, 5));
        assert!(writers.find_one(doc! { "_id": 7_i64 }).await.expect("read").is_none());
        assert_eq!(store.adopt_dead_writers().await.expect("adopt again"), 0);

        // A failover replayed an update of writer 7's counter: 2 ballots too many.
        counters
            .update_one(
                doc! { "_id": &counter_id },
                doc! { "$inc": { "n": 2_i64, "o.0": 2_i64 } },
            )
            .await
            .expect("tamper");
        let other = ballot_store(&client, &s).await;
        assert_eq!(
            other.tally(&poll_id).await.expect("tally").total,
            8,
            "the counter is trusted"
        );
        let report = store.repair(&poll_id).await.expect("repair");
        assert_eq!((report.ballots, report.corrected), (6, 1), "{report:?}");
        let fresh = ballot_store(&client, &s).await;
        let tally = fresh.tally(&poll_id).await.expect("tally");
        assert_eq!(tally, fresh.recount(&poll_id).await.expect("recount"));
        assert_eq!(tally.by_option, vec![5, 1]);
        // Idempotent: nothing left to correct; and "every poll touched since" finds this one.
        assert_eq!(store.repair(&poll_id).await.expect("repair").corrected, 0);
        let since = store
            .repair_since(Some(Utc::now() - chrono::Duration::minutes(5)))
            .await
            .expect("repair since");
        assert!(
            since.iter().any(|r| r.poll_id == poll_id && r.corrected == 0),
            "{since:?}"
        );
    })
    .await;
}

/// A counter rolled back under a live writer (a failover lost its last updates) is caught up
/// from the ballots by that writer itself; and ballots written before counters existed are
/// counted into counters when the store first opens on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_counter_updates_and_old_ballots_are_recounted() {
    with_database(|client, s| async move {
        let db = client.database(&s.database);
        let raw = db.collection::<Document>(BALLOTS_COLLECTION);
        let poll_id = new_poll_id(Utc::now());
        // Ballots of an earlier version (writer and batch tags, no counters yet).
        for i in 0..4 {
            let mut d =
                vote_service::store::mongo::ballot_to_doc(&sample_ballot(&poll_id, &format!("id:old{i}"), &[1]));
            d.insert("w", 99_i64);
            d.insert("s", 1_i64);
            raw.insert_one(d).await.expect("insert");
        }
        let store = MongoBallotStore::open(
            client.clone(),
            &s.database,
            s.retry_policy(),
            Tuning {
                tally_cache_ttl: Duration::from_millis(100),
                ..Tuning::default()
            },
        )
        .await
        .expect("open");
        eventually!(
            Duration::from_secs(10),
            "old ballots counted",
            counters_of(&client, &s, &poll_id).await == vec![(99, 1, 4)]
        );
        for i in 0..3 {
            store
                .cast(sample_ballot(&poll_id, &format!("id:new{i}"), &[0]))
                .await
                .expect("cast");
        }
        eventually!(
            Duration::from_secs(10),
            "own counter folded",
            counter_other_than(&client, &s, &poll_id, 99)
                .await
                .is_some_and(|c| c.1 == 3)
        );
        let (seq, _) = counter_other_than(&client, &s, &poll_id, 99)
            .await
            .expect("own counter");
        // The failover: our counter is back at its creation.
        let counters = db.collection::<Document>(&format!("{}_counters", BALLOTS_COLLECTION));
        counters
            .update_one(
                doc! { "poll_id": &poll_id, "w": { "$ne": 99_i64 } },
                doc! { "$set": { "seq": 0_i64, "n": 0_i64, "o": {} } },
            )
            .await
            .expect("roll back");
        // Still exact (counter + tail), and the writer notices and catches its counter up.
        eventually!(Duration::from_secs(10), "the counter caught up", {
            let t = store.tally(&poll_id).await.expect("tally");
            assert_eq!(t.total, 7, "{t:?}");
            counter_other_than(&client, &s, &poll_id, 99).await == Some((seq, 3))
        });
        let tally = store.tally(&poll_id).await.expect("tally");
        assert_eq!(tally, store.recount(&poll_id).await.expect("recount"));
        assert_eq!(tally.by_option, vec![3, 4]);
    })
    .await;
}
