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
        ranking: None,
        scores: None,
        idempotency_key: None,
        fingerprint: format!("fp-{key}"),
        created_at: Utc::now(),
        receipt_hash: None,
    }
}

/// Whether `voter` voted on `poll`, through [`BallotStore::voted`](super::BallotStore::voted).
async fn voted_one(store: &DynBallotStore, poll: &str, voter: &str, keyed_by_voter: bool) -> bool {
    let answer = store
        .voted(&[(poll.to_owned(), keyed_by_voter)], &[voter.to_owned()])
        .await
        .expect("voted");
    assert_eq!(answer.len(), 1, "one answer per poll");
    answer[0]
}

/// Uniqueness of `(poll, key)` under concurrency, tallies equal to recounts, `voted`, purge.
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

    // `voted`, one poll and one voter at a time first (as the old per-poll lookup answered).
    for (voter, keyed_by_voter, expected, why) in [
        ("ip:same", true, true, "a ballot keyed by its voter"),
        (
            "id:voter-1",
            false,
            true,
            "the general lookup finds a ballot keyed by voter too",
        ),
        ("id:voter-0", false, false, "voter-0 voted on the other poll"),
        ("id:nobody", false, false, "nobody"),
        // Keyed by voter (`ip`/`voter` dedupe): the same answers, looked up by identity.
        ("id:voter-1", true, true, "keyed by voter"),
        ("id:nobody", true, false, "nobody, keyed by voter"),
    ] {
        assert_eq!(
            voted_one(&store, &poll, voter, keyed_by_voter).await,
            expected,
            "voted({voter}, keyed_by_voter: {keyed_by_voter}): {why}"
        );
    }
    // `none` dedupe: a random key, the voter only in the ballot (twice: a `none` poll takes
    // several ballots of one voter).
    for key in ["r:0123456789abcdef", "r:0123456789abcdee"] {
        let mut unkeyed = sample_ballot(&poll, key, &[0]);
        unkeyed.voter = Some("ip:unkeyed".into());
        assert!(matches!(
            store.cast(unkeyed).await.expect("cast"),
            CastOutcome::Accepted(_)
        ));
    }
    assert!(voted_one(&store, &poll, "ip:unkeyed", false).await);
    assert!(
        !voted_one(&store, &poll, "r:0123456789abcdef", false).await,
        "a ballot key that is not a voter key is not a voter"
    );

    // A page: several polls, keyed by voter and not, several voters, answers in the order asked.
    let empty = new_poll_id(Utc::now());
    let voters = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    // (A poll's hint is true to its ballots: what a store answers for a wrong one is unspecified.)
    let unkeyed_page = [
        (poll.clone(), false),
        (other.clone(), true),
        (empty.clone(), false),
        (other.clone(), false),
    ];
    assert_eq!(
        store
            .voted(&unkeyed_page, &voters(&["ip:unkeyed", "id:voter-0"]))
            .await
            .expect("voted"),
        vec![true, true, false, true],
        "a page, in the order asked"
    );
    let page = [
        (poll.clone(), true),
        (other.clone(), true),
        (empty.clone(), true),
        (poll.clone(), false),
        (other.clone(), false),
    ];
    assert_eq!(
        store
            .voted(&page, &voters(&["id:nobody", "ip:same", "id:voter-3"]))
            .await
            .expect("voted"),
        vec![true, true, false, true, true],
        "any of the voters counts"
    );
    assert_eq!(
        store.voted(&page, &voters(&["id:voter-1"])).await.expect("voted"),
        vec![true, false, false, true, false],
        "each poll is answered for its own ballots"
    );
    assert_eq!(
        store.voted(&page, &voters(&["id:nobody"])).await.expect("voted"),
        vec![false; 5]
    );
    assert_eq!(
        store.voted(&page, &[]).await.expect("voted"),
        vec![false; 5],
        "no voters: nobody voted"
    );
    assert_eq!(
        store.voted(&[], &voters(&["ip:same"])).await.expect("voted"),
        Vec::<bool>::new(),
        "no polls: an empty answer"
    );

    // A ballot with a receipt is found by its id, receipt hash included; an unknown id is not.
    let mut with_receipt = sample_ballot(&other, "id:receipt-holder", &[1]);
    let receipt = with_receipt.issue_receipt();
    assert!(matches!(
        store.cast(with_receipt.clone()).await.expect("cast"),
        CastOutcome::Accepted(_)
    ));
    let found = store
        .ballot(&with_receipt.id)
        .await
        .expect("ballot")
        .expect("found by its id");
    assert_eq!(found, with_receipt);
    assert!(found.has_receipt(&receipt) && !found.has_receipt("not-it"));
    assert_eq!(store.ballot("no-such-ballot").await.expect("ballot"), None);
    // A new receipt replaces the old one; only the stored ballot (same id) gets one.
    let new_hash = BallotRecord::hash_receipt("the new receipt");
    assert!(store.reissue_receipt(&with_receipt, &new_hash).await.expect("reissue"));
    let found = store
        .ballot(&with_receipt.id)
        .await
        .expect("ballot")
        .expect("found by its id");
    assert!(found.has_receipt("the new receipt") && !found.has_receipt(&receipt));
    let impostor = BallotRecord {
        id: "another ballot id".into(),
        ..with_receipt.clone()
    };
    assert!(!store.reissue_receipt(&impostor, &new_hash).await.expect("reissue"));

    assert_eq!(store.purge(&other).await.expect("purge"), 101);
    assert_eq!(
        store.ballot(&with_receipt.id).await.expect("ballot"),
        None,
        "a purged ballot is not found by its id"
    );
    assert_eq!(
        store.tally(&other).await.expect("tally"),
        Tally::default(),
        "purge resets the tally"
    );
    assert_eq!(store.recount(&other).await.expect("recount"), Tally::default());
    assert!(!voted_one(&store, &other, "id:voter-0", false).await);
    assert!(!voted_one(&store, &other, "id:voter-0", true).await);
    assert_eq!(
        store.tally(&poll).await.expect("tally").total,
        203,
        "purge touches only its poll"
    );

    method_ballots_contract(&store).await;
}

/// Ranked and score ballots, cast concurrently: the tally keeps the ballots per ranking and the
/// score sums exactly (equal to the recount of the stored ballots, and to what was cast), a repair
/// finds nothing to correct, and the export shows each ballot's ranking or scores.
async fn method_ballots_contract(store: &DynBallotStore) {
    use futures_util::StreamExt as _;
    let ranked = new_poll_id(Utc::now());
    let scored = new_poll_id(Utc::now());
    let shapes: [&[u32]; 5] = [&[0, 1, 2], &[2, 0], &[1], &[2, 1, 0], &[1, 2]];
    let mut expected = (Tally::default(), Tally::default());
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let mut b = if i % 2 == 0 {
            let ranking = shapes[(i / 2) as usize % shapes.len()];
            let mut b = sample_ballot(&ranked, &format!("id:ranker-{i}"), &ranking[..1]);
            b.ranking = Some(ranking.to_vec());
            b
        } else {
            // Zeros included: an all-zero ballot counts in `total` and nowhere else.
            let scores = vec![i % 6, 0, (i * 7) % 4];
            let choices: Vec<u32> = (0u32..).zip(&scores).filter(|(_, s)| **s > 0).map(|(c, _)| c).collect();
            let mut b = sample_ballot(&scored, &format!("id:scorer-{i}"), &choices);
            b.scores = Some(scores);
            b
        };
        b.fingerprint = format!("method {i}");
        let into = if i % 2 == 0 { &mut expected.0 } else { &mut expected.1 };
        into.add(b.marks());
        let store = Arc::clone(store);
        tasks.push(tokio::spawn(async move { store.cast(b).await }));
    }
    for t in tasks {
        assert!(matches!(
            t.await.expect("join").expect("cast"),
            CastOutcome::Accepted(_)
        ));
    }
    for (poll, cast) in [(&ranked, &expected.0), (&scored, &expected.1)] {
        let tally = store.tally(poll).await.expect("tally").trimmed();
        let recount = store.recount(poll).await.expect("recount").trimmed();
        assert_eq!(recount, cast.clone().trimmed(), "the stored ballots are the ones cast");
        assert_eq!(
            tally, recount,
            "the kept tally equals the stored ballots, sums and rankings included"
        );
        let repair = store.repair(poll).await.expect("repair");
        assert_eq!(repair.corrected, 0, "nothing to repair: {repair:?}");
        assert_eq!(store.tally(poll).await.expect("tally").trimmed(), recount);
    }
    assert_eq!(expected.0.rankings.len(), shapes.len());
    assert_eq!(expected.0.rankings.get("2-0"), Some(&20));
    assert!(expected.1.sums[0] > 0 && expected.1.sums[1] == 0 && expected.1.sums[2] > 0);

    let mut lines = store.ballots(&ranked).await.expect("export");
    let mut seen = 0;
    while let Some(line) = lines.next().await {
        let line = line.expect("line");
        let ranking = line.ranking.expect("a ranked ballot's line has its ranking");
        assert!(shapes.contains(&ranking.as_slice()), "{ranking:?}");
        assert_eq!(line.choices, ranking[..1], "choices hold the first preference");
        seen += 1;
    }
    assert_eq!(seen, 100);
    let mut lines = store.ballots(&scored).await.expect("export");
    let mut sums = vec![0u64; 3];
    while let Some(line) = lines.next().await {
        let scores = line
            .expect("line")
            .scores
            .expect("a score ballot's line has its scores");
        for (s, x) in sums.iter_mut().zip(scores) {
            *s += u64::from(x);
        }
    }
    assert_eq!(sums, expected.1.clone().padded(3).sums);
    for poll in [&ranked, &scored] {
        assert_eq!(store.purge(poll).await.expect("purge"), 100);
    }
}
