//! The storage contract: one set of checks that every backend must pass. Backends' test suites
//! call [`poll_store_contract`] and [`ballot_store_contract`] with a fresh, empty store.
//!
//! The functions panic (with a message naming the broken promise) on the first violation, so they
//! are meant to be called from `#[tokio::test]`s.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{Duration, Utc};

use super::{DynBallotStore, DynPollStore};
use crate::domain::{
    BallotRecord, CastOutcome, DedupePolicy, PollCursor, PollQuery, PollRecord, ResultsVisibility, StatusFilter, Tally,
    new_poll_id,
};

/// A poll record for tests, created `age_secs` seconds ago.
pub fn sample_poll(name: &str, age_secs: i64) -> PollRecord {
    let created = Utc::now() - Duration::seconds(age_secs);
    PollRecord {
        id: new_poll_id(created),
        name: name.to_owned(),
        desc: format!("about {name}"),
        options: vec!["red".into(), "green".into(), "blue".into()],
        max_choices: 2,
        closes_at: None,
        closed_at: None,
        results: ResultsVisibility::Always,
        dedupe: DedupePolicy::Ip,
        created_at: created,
        updated_at: created,
        admin_token_hash: Some("00".repeat(32)),
        legacy_votes: 0,
        revision: 1,
    }
}

/// A ballot for tests.
pub fn sample_ballot(poll_id: &str, key: &str, choices: &[u32]) -> BallotRecord {
    BallotRecord {
        id: uuid::Uuid::new_v4().to_string(),
        poll_id: poll_id.to_owned(),
        key: key.to_owned(),
        voter: Some(key.to_owned()),
        choices: choices.to_vec(),
        idempotency_key: None,
        fingerprint: format!("fp-{key}"),
        created_at: Utc::now(),
    }
}

/// Create, get, list (order, paging, status filter), optimistic replace and delete.
pub async fn poll_store_contract(store: DynPollStore) {
    store.ping().await.expect("ping on a healthy store");
    assert!(
        store.get(&new_poll_id(Utc::now())).await.expect("get").is_none(),
        "unknown id must be None"
    );

    let mut polls = Vec::new();
    for i in 0..7 {
        let p = sample_poll(&format!("poll {i}"), 100 - i);
        store.create(&p).await.expect("create");
        polls.push(p);
    }
    let got = store.get(&polls[3].id).await.expect("get").expect("stored poll");
    assert_eq!(got, polls[3], "a stored poll reads back unchanged");

    // Newest first, paged with a cursor, no gaps and no repeats.
    let now = Utc::now();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(&PollQuery {
                limit: 3,
                after: after.clone(),
                status: None,
                now,
            })
            .await
            .expect("list");
        assert!(page.len() <= 3, "a page never exceeds its limit");
        if page.is_empty() {
            break;
        }
        let last = page.last().expect("non-empty");
        after = Some(PollCursor {
            created_at: last.created_at,
            id: last.id.clone(),
        });
        seen.extend(page.into_iter().map(|p| p.id));
    }
    let expected: Vec<_> = polls.iter().rev().map(|p| p.id.clone()).collect();
    assert_eq!(seen, expected, "listing is newest first and pages are contiguous");

    // Status filter: one closed explicitly, one past its closing time.
    let mut closed = polls[1].clone();
    closed.closed_at = Some(now);
    closed.revision += 1;
    assert!(
        store.replace(&closed, 1).await.expect("replace"),
        "replace with the current revision applies"
    );
    assert!(
        !store.replace(&closed, 1).await.expect("replace"),
        "a stale revision is refused"
    );
    let mut expired = polls[2].clone();
    expired.closes_at = Some(now - Duration::seconds(1));
    expired.revision += 1;
    assert!(store.replace(&expired, 1).await.expect("replace"));
    let closed_ids: HashSet<_> = store
        .list(&PollQuery {
            limit: 100,
            after: None,
            status: Some(StatusFilter::Closed),
            now,
        })
        .await
        .expect("list closed")
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(
        closed_ids,
        HashSet::from([polls[1].id.clone(), polls[2].id.clone()]),
        "closed filter"
    );
    let open = store
        .list(&PollQuery {
            limit: 100,
            after: None,
            status: Some(StatusFilter::Open),
            now,
        })
        .await
        .expect("list open");
    assert_eq!(open.len(), 5, "open filter");
    assert_eq!(
        store.get(&closed.id).await.expect("get"),
        Some(closed.clone()),
        "replace is visible"
    );

    assert!(store.delete(&polls[0].id).await.expect("delete"));
    assert!(
        !store.delete(&polls[0].id).await.expect("delete twice"),
        "deleting twice reports absence"
    );
    assert!(store.get(&polls[0].id).await.expect("get").is_none());
    let all = store
        .list(&PollQuery {
            limit: 100,
            after: None,
            status: None,
            now,
        })
        .await
        .expect("list");
    assert_eq!(all.len(), 6, "a deleted poll is not listed");
    assert!(
        !store.replace(&polls[0], 1).await.expect("replace deleted"),
        "replacing a deleted poll fails"
    );
}

/// 32 concurrent changes of one poll from the same revision, repeated: exactly one applies each
/// round, the others are told (`false`), and the stored poll is the winner's, whole (no lost or
/// mixed update). A compare-and-swap the database must make atomic (FerretDB does not).
pub async fn poll_store_concurrency_contract(store: DynPollStore) {
    let poll = sample_poll("contended", 10);
    store.create(&poll).await.expect("create");
    let mut current = poll;
    for round in 0..10 {
        let mut tasks = Vec::new();
        for i in 0..32 {
            let store = Arc::clone(&store);
            let mut next = current.clone();
            next.name = format!("round {round} writer {i}");
            next.desc = format!("written by {i} in round {round}");
            next.revision = current.revision + 1;
            let expected = current.revision;
            tasks.push(tokio::spawn(async move {
                let applied = store.replace(&next, expected).await.expect("replace");
                (applied, next)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (applied, next) = t.await.expect("join");
            if applied {
                winners.push(next);
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one of 32 concurrent replaces from one revision applies"
        );
        let stored = store.get(&current.id).await.expect("get").expect("stored poll");
        assert_eq!(
            stored, winners[0],
            "round {round}: the stored poll is the winner's, whole"
        );
        current = stored;
    }
}

/// Uniqueness of `(poll, key)` under concurrency, tallies equal to recounts, `has_voted`, purge.
pub async fn ballot_store_contract(store: DynBallotStore) {
    store.ping().await.expect("ping on a healthy store");
    let poll = new_poll_id(Utc::now());
    let other = new_poll_id(Utc::now());
    assert_eq!(
        store.tally(&poll).await.expect("tally"),
        Tally::default(),
        "no ballots, zero tally"
    );

    // 64 concurrent casts of the same identity: exactly one is accepted.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = Arc::clone(&store);
        let mut b = sample_ballot(&poll, "ip:same", &[0]);
        b.fingerprint = format!("attempt {i}");
        tasks.push(tokio::spawn(async move { store.cast(b).await }));
    }
    let mut accepted = Vec::new();
    let mut duplicates = 0;
    for t in tasks {
        match t.await.expect("join").expect("cast") {
            CastOutcome::Accepted(b) => accepted.push(b),
            CastOutcome::Duplicate(_) => duplicates += 1,
        }
    }
    assert_eq!(accepted.len(), 1, "exactly one of 64 identical ballots is accepted");
    assert_eq!(duplicates, 63);
    let winner = accepted.pop().expect("one accepted");
    match store.cast(sample_ballot(&poll, "ip:same", &[1])).await.expect("cast") {
        CastOutcome::Duplicate(b) => assert_eq!(b, winner, "a duplicate returns the stored ballot"),
        CastOutcome::Accepted(_) => panic!("a second ballot with the same key was accepted"),
    }

    // Many distinct ballots, concurrently, across two polls.
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let store = Arc::clone(&store);
        let target = if i % 3 == 0 { other.clone() } else { poll.clone() };
        let choices = if i % 5 == 0 { vec![0, 2] } else { vec![i % 3] };
        tasks.push(tokio::spawn(async move {
            store
                .cast(sample_ballot(&target, &format!("id:voter-{i}"), &choices))
                .await
        }));
    }
    for t in tasks {
        assert!(matches!(
            t.await.expect("join").expect("cast"),
            CastOutcome::Accepted(_)
        ));
    }
    for id in [&poll, &other] {
        let tally = store.tally(id).await.expect("tally");
        let recount = store.recount(id).await.expect("recount");
        assert_eq!(tally, recount, "the maintained tally equals the stored ballots");
    }
    assert_eq!(store.tally(&poll).await.expect("tally").total, 201);
    assert_eq!(store.tally(&other).await.expect("tally").total, 100);
    let both = store.tallies(&[other.clone(), poll.clone()]).await.expect("tallies");
    assert_eq!(both[0].total, 100, "tallies come back in the order asked");
    assert_eq!(both[1].total, 201);
    let nobody = "0123456789abcdef0123ffff".to_owned();
    let recounted = store
        .recount_many(&[other.clone(), nobody, poll.clone()])
        .await
        .expect("recount_many");
    assert_eq!(
        recounted,
        vec![
            store.recount(&other).await.expect("recount"),
            Tally::default(),
            store.recount(&poll).await.expect("recount"),
        ],
        "recount_many is recount of each, in the order asked"
    );

    assert!(store.has_voted(&poll, "ip:same", true).await.expect("has_voted"));
    assert!(store.has_voted(&poll, "id:voter-1", false).await.expect("has_voted"));
    assert!(
        !store.has_voted(&poll, "id:voter-0", false).await.expect("has_voted"),
        "voter-0 voted on the other poll"
    );
    assert!(!store.has_voted(&poll, "id:nobody", false).await.expect("has_voted"));
    // Keyed by voter (`ip`/`voter` dedupe): the same answers, looked up by identity.
    assert!(store.has_voted(&poll, "id:voter-1", true).await.expect("has_voted"));
    assert!(!store.has_voted(&poll, "id:nobody", true).await.expect("has_voted"));
    // `none` dedupe: a random key, the voter only in the ballot.
    let mut unkeyed = sample_ballot(&poll, "r:0123456789abcdef", &[0]);
    unkeyed.voter = Some("ip:unkeyed".into());
    assert!(matches!(
        store.cast(unkeyed).await.expect("cast"),
        CastOutcome::Accepted(_)
    ));
    assert!(store.has_voted(&poll, "ip:unkeyed", false).await.expect("has_voted"));
    assert!(
        !store
            .has_voted(&poll, "r:0123456789abcdef", false)
            .await
            .expect("has_voted")
    );

    assert_eq!(store.purge(&other).await.expect("purge"), 100);
    assert_eq!(
        store.tally(&other).await.expect("tally"),
        Tally::default(),
        "purge resets the tally"
    );
    assert_eq!(store.recount(&other).await.expect("recount"), Tally::default());
    assert!(!store.has_voted(&other, "id:voter-0", false).await.expect("has_voted"));
    assert_eq!(
        store.tally(&poll).await.expect("tally").total,
        202,
        "purge touches only its poll"
    );
}
