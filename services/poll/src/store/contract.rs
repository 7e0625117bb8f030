//! The storage contract of polls: one set of checks every [`PollStore`](super::PollStore)
//! backend must pass. Backends' test suites call [`poll_store_contract`] and
//! [`poll_store_concurrency_contract`] with a fresh, empty store.
//!
//! The functions panic (with a message naming the broken promise) on the first violation, so they
//! are meant to be called from `#[tokio::test]`s.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{Duration, Utc};
use shared::contract::{DedupePolicy, ResultsVisibility, VotingMethod, new_poll_id};

use super::DynPollStore;
use crate::record::{PollCursor, PollQuery, PollRecord, StatusFilter};

/// A poll record for tests, created `age_secs` seconds ago.
pub fn sample_poll(name: &str, age_secs: i64) -> PollRecord {
    let created = Utc::now() - Duration::seconds(age_secs);
    PollRecord {
        id: new_poll_id(created),
        name: name.to_owned(),
        desc: format!("about {name}"),
        options: vec!["red".into(), "green".into(), "blue".into()],
        // Not the defaults, so that a store that drops them fails the round trip.
        method: VotingMethod::Ranked,
        min_choices: 2,
        max_choices: 2,
        max_score: 7,
        opens_at: None,
        closes_at: None,
        closed_at: None,
        results: ResultsVisibility::Always,
        dedupe: DedupePolicy::Ip,
        changes: shared::contract::BallotChanges::Locked,
        created_at: created,
        updated_at: created,
        admin_token_hash: Some("00".repeat(32)),
        legacy_votes: 0,
        revision: 1,
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
        let mut p = sample_poll(&format!("poll {i}"), 100 - i);
        match i {
            // Scheduled: opens tomorrow, closes the day after.
            3 => {
                p.opens_at = Some(Utc::now() + Duration::days(1));
                p.closes_at = Some(Utc::now() + Duration::days(2));
            }
            // Opened a minute ago.
            4 => p.opens_at = Some(Utc::now() - Duration::seconds(60)),
            _ => {}
        }
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
    assert_eq!(
        open.iter().map(|p| p.id.as_str()).collect::<HashSet<_>>(),
        HashSet::from([0, 4, 5, 6].map(|i| polls[i].id.as_str())),
        "open filter: not closed, not before its opening"
    );
    let scheduled: Vec<_> = store
        .list(&PollQuery {
            limit: 100,
            after: None,
            status: Some(StatusFilter::Scheduled),
            now,
        })
        .await
        .expect("list scheduled")
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(scheduled, vec![polls[3].id.clone()], "scheduled filter");
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
