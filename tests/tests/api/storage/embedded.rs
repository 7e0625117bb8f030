//! The storage contract on the embedded store, plus its durability across reopen.

use std::sync::Arc;

use poll_service::store::PollStore;
use poll_service::store::contract::{poll_store_concurrency_contract, poll_store_contract, sample_poll};
use poll_service::store::embedded::EmbeddedPollStore;
use vote_service::ballot::CastOutcome;
use vote_service::store::BallotStore;
use vote_service::store::contract::{ballot_store_contract, revision_contract, sample_ballot};
use vote_service::store::embedded::EmbeddedBallotStore;

#[tokio::test]
async fn embedded_poll_store_meets_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedPollStore::open(&dir.path().join("poll.redb")).expect("open");
    poll_store_contract(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_poll_store_concurrent_replaces_have_one_winner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedPollStore::open(&dir.path().join("poll.redb")).expect("open");
    poll_store_concurrency_contract(Arc::new(store)).await;
}

#[tokio::test]
async fn embedded_ballot_store_meets_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedBallotStore::open(&dir.path().join("vote.redb")).expect("open");
    ballot_store_contract(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_revision_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedBallotStore::open(&dir.path().join("vote.redb")).expect("open");
    revision_contract(&[Arc::new(store)]).await;
}

#[tokio::test]
async fn embedded_data_survives_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let poll = sample_poll("kept", 5);
    {
        let polls = EmbeddedPollStore::open(&dir.path().join("poll.redb")).expect("open");
        polls.create(&poll).await.expect("create");
        let ballots = EmbeddedBallotStore::open(&dir.path().join("vote.redb")).expect("open");
        let outcome = ballots.cast(sample_ballot(&poll.id, "id:x", &[1])).await.expect("cast");
        assert!(matches!(outcome, CastOutcome::Accepted(_)));
    }
    // The writer thread holds the database until its queue closes; give it a moment.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let polls = EmbeddedPollStore::open(&dir.path().join("poll.redb")).expect("reopen");
    assert_eq!(polls.get(&poll.id).await.expect("get"), Some(poll.clone()));
    let ballots = EmbeddedBallotStore::open(&dir.path().join("vote.redb")).expect("reopen");
    assert_eq!(ballots.tally(&poll.id).await.expect("tally").by_option, vec![0, 1]);
    let again = ballots.cast(sample_ballot(&poll.id, "id:x", &[0])).await.expect("cast");
    assert!(
        matches!(again, CastOutcome::Duplicate(_)),
        "uniqueness holds across reopen"
    );
}
