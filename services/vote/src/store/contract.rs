//! The storage contract of ballots: one set of checks every [`BallotStore`](super::BallotStore)
//! backend must pass. Backends' test suites call [`ballot_store_contract`] with a fresh, empty
//! store.
//!
//! The functions panic (with a message naming the broken promise) on the first violation, so they
//! are meant to be called from `#[tokio::test]`s.

use std::sync::Arc;

use chrono::Utc;
use shared::contract::{Tally, new_poll_id};

use super::DynBallotStore;
use crate::ballot::{BallotRecord, CastOutcome};

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
