//! The storage contract of ballots: one set of checks every [`BallotStore`](super::BallotStore)
//! backend must pass. Backends' test suites call [`ballot_store_contract`] with a fresh, empty
//! store, and [`revision_contract`] with replicas of one (several processes' stores of one
//! database, where a backend has replicas).
//!
//! The functions panic (with a message naming the broken promise) on the first violation, so they
//! are meant to be called from `#[tokio::test]`s.

use std::sync::Arc;

use chrono::Utc;
use shared::contract::{Tally, new_poll_id};

use super::{DynBallotStore, Revised, Revision};
use crate::ballot::{BallotRecord, CastOutcome, Marked};

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
        updated_at: None,
        revision: 0,
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

/// A ballot for tests whose voter holds its receipt (a voter can find and change it).
fn held_ballot(poll_id: &str, key: &str, choices: &[u32]) -> BallotRecord {
    let mut b = sample_ballot(poll_id, key, choices);
    b.issue_receipt();
    b
}

/// Marks of a `choice` ballot.
fn chose(choices: &[u32]) -> Marked {
    Marked {
        choices: choices.to_vec(),
        ..Marked::default()
    }
}

/// Checks that `poll`'s kept tally (read through each replica) equals the recount of its stored
/// ballots, and returns it.
async fn settled(stores: &[DynBallotStore], poll: &str, why: &str) -> Tally {
    let recount = stores[0].recount(poll).await.expect("recount").trimmed();
    for (i, s) in stores.iter().enumerate() {
        let tally = s.tally(poll).await.expect("tally").trimmed();
        assert_eq!(
            tally, recount,
            "replica {i}: the kept tally equals the stored ballots ({why})"
        );
    }
    recount
}

/// Replacing and withdrawing ballots through `stores` (replicas of one database; one is enough
/// for a store without replicas): one ballot per identity at any time, under concurrency; each
/// change counted once, in its new form only; a withdrawn ballot's identity may vote again.
pub async fn revision_contract(stores: &[DynBallotStore]) {
    let replica = |i: usize| Arc::clone(&stores[i % stores.len()]);
    let poll = new_poll_id(Utc::now());
    let mut cast = Vec::new();
    for i in 0..40u32 {
        let b = held_ballot(&poll, &format!("id:changer-{i}"), &[i % 3]);
        assert!(matches!(
            replica(i as usize).cast(b.clone()).await.expect("cast"),
            CastOutcome::Accepted(_)
        ));
        cast.push(b);
    }
    settled(stores, &poll, "before any change").await;

    // 64 concurrent replacements of one ballot, through every replica: each applies once, in turn.
    let target = cast[0].clone();
    let tasks: Vec<_> = (0..64u32)
        .map(|i| {
            let (store, target) = (replica(i as usize), target.clone());
            let marks = if i % 2 == 0 { chose(&[1]) } else { chose(&[0, 2]) };
            tokio::spawn(async move { store.revise(&target, Revision::Replace(marks)).await })
        })
        .collect();
    for t in tasks {
        match t.await.expect("join").expect("revise") {
            Revised::Replaced(b) => assert_eq!(
                (b.id.as_str(), b.key.as_str()),
                (target.id.as_str(), target.key.as_str())
            ),
            other => panic!("a replacement of a stored ballot answered {other:?}"),
        }
    }
    let now = stores[0]
        .ballot(&target.id)
        .await
        .expect("ballot")
        .expect("still stored");
    assert!(now.choices == [1] || now.choices == [0, 2], "{now:?}");
    assert!(now.updated_at.is_some(), "a replaced ballot says when");
    let t = settled(stores, &poll, "64 concurrent replacements").await;
    assert_eq!(t.total, 40, "replacements change no ballot count");

    // Withdraw/re-vote storm: each of 20 voters withdraws twice at once and then votes twice at
    // once, through different replicas; a third voter's replacement races its withdrawal.
    let tasks: Vec<_> = (1..21usize)
        .map(|i| {
            let b = cast[i].clone();
            let (a, c) = (replica(i), replica(i + 1));
            tokio::spawn(async move {
                let (w1, w2, r) = tokio::join!(
                    a.revise(&b, Revision::Withdraw),
                    c.revise(&b, Revision::Withdraw),
                    a.revise(&b, Revision::Replace(chose(&[2]))),
                );
                let answers = [w1.expect("withdraw"), w2.expect("withdraw"), r.expect("replace")];
                let withdrawn = answers.iter().filter(|r| **r == Revised::Withdrawn).count();
                assert_eq!(withdrawn, 1, "exactly one of two withdrawals applies: {answers:?}");
                assert!(
                    matches!(answers[2], Revised::Replaced(_) | Revised::Gone),
                    "{answers:?}"
                );
                assert_eq!(
                    a.ballot(&b.id).await.expect("ballot"),
                    None,
                    "a withdrawn ballot is not found"
                );
                assert_eq!(
                    a.revise(&b, Revision::Replace(chose(&[0]))).await.expect("revise"),
                    Revised::Gone,
                    "a withdrawn ballot cannot be replaced"
                );
                let again = |store: DynBallotStore| {
                    let mut b = held_ballot(&b.poll_id, &b.key, &[(i % 3) as u32]);
                    b.fingerprint = format!("again {}", b.id);
                    async move { (store.cast(b.clone()).await.expect("cast"), b) }
                };
                let ((x, bx), (y, by)) = tokio::join!(again(a.clone()), again(c.clone()));
                let accepted: Vec<_> = [(&x, &bx), (&y, &by)]
                    .into_iter()
                    .filter(|(o, _)| matches!(o, CastOutcome::Accepted(_)))
                    .map(|(_, b)| b.clone())
                    .collect();
                assert_eq!(accepted.len(), 1, "one of two new ballots of one voter: {x:?} {y:?}");
                let found = c
                    .ballot(&accepted[0].id)
                    .await
                    .expect("ballot")
                    .expect("the new ballot");
                assert_eq!(found.choices, accepted[0].choices);
                accepted[0].clone()
            })
        })
        .collect();
    let mut revoted = Vec::new();
    for t in tasks {
        revoted.push(t.await.expect("join"));
    }
    let t = settled(stores, &poll, "withdrawals and votes again").await;
    assert_eq!(t.total, 40, "every voter who withdrew voted again: one ballot each");
    for b in &cast[1..21] {
        assert_eq!(
            stores[0].ballot(&b.id).await.expect("ballot"),
            None,
            "the old ballot id is gone"
        );
    }

    // Withdrawn for good: no longer counted, no longer a voter; the export leaves it out.
    for b in &revoted[..5] {
        assert_eq!(
            replica(1).revise(b, Revision::Withdraw).await.expect("withdraw"),
            Revised::Withdrawn
        );
        assert!(
            !voted_one(&stores[0], &poll, &b.key, true).await,
            "a withdrawn ballot is no vote"
        );
    }
    let t = settled(stores, &poll, "withdrawn for good").await;
    assert_eq!(t.total, 35);
    use futures_util::StreamExt as _;
    let exported: Vec<_> = stores[0].ballots(&poll).await.expect("export").collect().await;
    assert_eq!(exported.len(), 35, "the export has the ballots that count");
    assert!(
        exported
            .iter()
            .any(|l| l.as_ref().is_ok_and(|l| l.id == target.id && l.choices == now.choices))
    );

    // Ranked and score ballots: a replacement moves the ranking and the sums.
    let ranked = new_poll_id(Utc::now());
    let mut r = held_ballot(&ranked, "id:ranker", &[0]);
    r.ranking = Some(vec![0, 1, 2]);
    let mut x = held_ballot(&ranked, "id:scorer", &[0, 2]);
    x.scores = Some(vec![3, 0, 1]);
    x.ranking = None;
    for b in [&r, &x] {
        replica(0).cast(b.clone()).await.expect("cast");
    }
    let new_ranking = Marked {
        choices: vec![2],
        ranking: Some(vec![2, 0]),
        scores: None,
    };
    let new_scores = Marked {
        choices: vec![1],
        ranking: None,
        scores: Some(vec![0, 5, 0]),
    };
    replica(1)
        .revise(&r, Revision::Replace(new_ranking))
        .await
        .expect("revise");
    replica(1)
        .revise(&x, Revision::Replace(new_scores))
        .await
        .expect("revise");
    let t = settled(stores, &ranked, "ranked and score replacements").await;
    assert_eq!(t.rankings.len(), 1, "the old ranking no longer counts: {t:?}");
    assert_eq!(t.rankings.get("2-0"), Some(&1));
    assert_eq!(t.clone().padded(3).sums, vec![0, 5, 0]);
    assert_eq!(t.by_option, vec![0, 1, 1]);

    for s in stores {
        for p in [&poll, &ranked] {
            let repair = s.repair(p).await.expect("repair");
            assert_eq!(repair.corrected, 0, "nothing to repair after changes: {repair:?}");
        }
    }
    settled(stores, &poll, "after the repair").await;
    stores[0].purge(&poll).await.expect("purge");
    stores[0].purge(&ranked).await.expect("purge");
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
            let mut b = held_ballot(&ranked, &format!("id:ranker-{i}"), &ranking[..1]);
            b.ranking = Some(ranking.to_vec());
            b
        } else {
            // Zeros included: an all-zero ballot counts in `total` and nowhere else.
            let scores = vec![i % 6, 0, (i * 7) % 4];
            let choices: Vec<u32> = (0u32..).zip(&scores).filter(|(_, s)| **s > 0).map(|(c, _)| c).collect();
            let mut b = held_ballot(&scored, &format!("id:scorer-{i}"), &choices);
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
