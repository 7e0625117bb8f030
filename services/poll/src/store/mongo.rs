//! Polls in MongoDB / Cosmos DB (on [`shared::mongo`]).
//!
//! `polls` (poll service database, default `poll`): one document per poll, `_id` the poll id as an
//! ObjectId (the 24-hex id *is* an ObjectId's hex), so new polls and the predecessor's look alike.
//! Times are RFC 3339 strings with nanoseconds in UTC (`2025-01-02T03:04:05.123456789Z`): fixed
//! width, so they compare and sort as strings, and they round-trip exactly. A document without a
//! `revision` field is the predecessor's (`{_id: ObjectId, name, desc, options: [..],
//! votes: {count}}`) and reads as a poll created at its ObjectId's timestamp, `max_choices` 1,
//! results `always`, dedupe `ip`, no admin token, `legacy_votes = votes.count`, revision 0.
//! Listing sorts by `{created_at: -1, _id: -1}` (index `newest_first`); a legacy poll has no
//! `created_at`, sorts as null, i.e. after every new poll, then by ObjectId (its creation time).
//!
//! Shard key (MongoDB sharded clusters, Cosmos DB partition keys): `_id` (hashed on MongoDB,
//! `sh.shardCollection("poll.polls", {_id: "hashed"})`). Polls are few and read by id; the listing
//! is a scatter-gather either way. `_id` is the only unique key, so uniqueness holds cluster-wide.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::{Bson, Document, doc, oid::ObjectId};
use mongodb::{Client, Collection, Database};
use shared::contract::{BallotChanges, DEFAULT_MAX_SCORE, DedupePolicy, ResultsVisibility, VotingMethod};
use shared::mongo::{
    RetryPolicy, bad, database, ensure_collection, enum_of, enum_str, fmt_time, index, is_duplicate_key, opt_bson,
    opt_str, opt_time, req_str, req_time, to_i64, uint_of,
};
use shared::storage::{StoreError, StoreResult};

use super::PollStore;
use crate::record::{PollQuery, PollRecord, StatusFilter};

/// The collection of polls.
pub const POLLS_COLLECTION: &str = "polls";

/// Parses a 24-hex poll id as the ObjectId it is stored as.
fn poll_oid(id: &str) -> Option<ObjectId> {
    ObjectId::parse_str(id).ok()
}

fn poll_to_doc(p: &PollRecord) -> StoreResult<Document> {
    let oid =
        poll_oid(&p.id).ok_or_else(|| StoreError::internal(format!("poll id {:?} is not 24 hex digits", p.id)))?;
    Ok(doc! {
        "_id": oid,
        "name": &p.name,
        "desc": &p.desc,
        "options": &p.options,
        "method": enum_str(&p.method),
        "min_choices": i64::from(p.min_choices),
        "max_choices": i64::from(p.max_choices),
        "max_score": i64::from(p.max_score),
        "opens_at": opt_bson(p.opens_at.map(fmt_time)),
        "closes_at": opt_bson(p.closes_at.map(fmt_time)),
        "closed_at": opt_bson(p.closed_at.map(fmt_time)),
        "results": enum_str(&p.results),
        "dedupe": enum_str(&p.dedupe),
        "changes": enum_str(&p.changes),
        "created_at": fmt_time(p.created_at),
        "updated_at": fmt_time(p.updated_at),
        "admin_token_hash": opt_bson(p.admin_token_hash.clone()),
        "legacy_votes": to_i64(p.legacy_votes),
        "revision": to_i64(p.revision),
    })
}

fn doc_to_poll(d: &Document) -> StoreResult<PollRecord> {
    let oid = d.get_object_id("_id").map_err(|_| bad("_id"))?;
    if !d.contains_key("revision") {
        return Ok(legacy_poll(oid, d));
    }
    Ok(PollRecord {
        id: oid.to_hex(),
        name: req_str(d, "name")?,
        desc: opt_str(d, "desc")?.unwrap_or_default(),
        options: string_list(d, "options")?,
        // Polls stored before voting methods existed have none of these three.
        method: match d.get("method") {
            None => VotingMethod::Choice,
            Some(_) => enum_of::<VotingMethod>(d, "method")?,
        },
        min_choices: small_uint(d, "min_choices")?.unwrap_or(1),
        max_choices: small_uint(d, "max_choices")?.ok_or_else(|| bad("max_choices"))?,
        max_score: small_uint(d, "max_score")?.unwrap_or(DEFAULT_MAX_SCORE),
        opens_at: opt_time(d, "opens_at")?,
        closes_at: opt_time(d, "closes_at")?,
        closed_at: opt_time(d, "closed_at")?,
        results: enum_of::<ResultsVisibility>(d, "results")?,
        dedupe: enum_of::<DedupePolicy>(d, "dedupe")?,
        // Polls stored before ballot changes existed have none.
        changes: match d.get("changes") {
            None | Some(Bson::Null) => BallotChanges::Allowed,
            Some(_) => enum_of::<BallotChanges>(d, "changes")?,
        },
        created_at: req_time(d, "created_at")?,
        updated_at: req_time(d, "updated_at")?,
        admin_token_hash: opt_str(d, "admin_token_hash")?,
        legacy_votes: d.get("legacy_votes").and_then(uint_of).unwrap_or(0),
        revision: d.get("revision").and_then(uint_of).ok_or_else(|| bad("revision"))?,
    })
}

/// An optional small whole number field (`Err` when present but not one).
fn small_uint(d: &Document, key: &str) -> StoreResult<Option<u32>> {
    d.get(key)
        .map(|v| uint_of(v).and_then(|v| u32::try_from(v).ok()).ok_or_else(|| bad(key)))
        .transpose()
}

fn string_list(d: &Document, key: &str) -> StoreResult<Vec<String>> {
    let list = d.get_array(key).map_err(|_| bad(key))?;
    list.iter()
        .map(|b| match b {
            Bson::String(s) => Ok(s.clone()),
            _ => Err(bad(key)),
        })
        .collect()
}

/// A poll written by the predecessor: `{_id: ObjectId, name, desc, options: [..], votes: {count}}`.
/// Read leniently: whatever is missing takes the predecessor's implicit default.
fn legacy_poll(oid: ObjectId, d: &Document) -> PollRecord {
    let created = DateTime::<Utc>::from_timestamp_millis(oid.timestamp().timestamp_millis()).unwrap_or_default();
    let text = |b: &Bson| match b {
        Bson::String(s) => s.clone(),
        other => other.to_string(),
    };
    PollRecord {
        id: oid.to_hex(),
        name: d.get("name").map(text).unwrap_or_default(),
        desc: d.get("desc").map(text).unwrap_or_default(),
        options: d
            .get_array("options")
            .map(|a| a.iter().map(text).collect())
            .unwrap_or_default(),
        method: VotingMethod::Choice,
        min_choices: 1,
        max_choices: 1,
        max_score: DEFAULT_MAX_SCORE,
        opens_at: None,
        closes_at: None,
        closed_at: None,
        results: ResultsVisibility::Always,
        dedupe: DedupePolicy::Ip,
        changes: BallotChanges::Allowed,
        created_at: created,
        updated_at: created,
        admin_token_hash: None,
        legacy_votes: d
            .get_document("votes")
            .ok()
            .and_then(|v| v.get("count"))
            .and_then(uint_of)
            .unwrap_or(0),
        revision: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Polls

/// Polls in MongoDB / Cosmos DB.
pub struct MongoPollStore {
    db: Database,
    polls: Collection<Document>,
    retry: RetryPolicy,
}

impl MongoPollStore {
    /// Opens the store on `database` (usually `poll`) and creates its collection and indexes.
    pub async fn open(client: Client, database_name: &str, retry: RetryPolicy) -> StoreResult<Self> {
        let db = database(&client, database_name, &retry);
        let newest_first = index("newest_first", doc! { "created_at": -1, "_id": -1 });
        ensure_collection(&db, POLLS_COLLECTION, vec![newest_first], &retry).await?;
        let polls = db.collection(POLLS_COLLECTION);
        Ok(Self { db, polls, retry })
    }
}

impl MongoPollStore {
    /// Whether the listing cursor points at a legacy poll: one without `revision` (and so without
    /// `created_at`). When the poll is gone, the cursor's own shape tells: a legacy poll's
    /// `created_at` is its ObjectId's whole second.
    async fn is_legacy(&self, oid: ObjectId, created_at: DateTime<Utc>) -> StoreResult<bool> {
        let found = self
            .retry
            .run(|| {
                self.polls
                    .find_one(doc! { "_id": oid })
                    .projection(doc! { "revision": 1 })
            })
            .await?;
        Ok(match found {
            Some(d) => !d.contains_key("revision"),
            None => {
                created_at.timestamp_subsec_nanos() == 0
                    && created_at.timestamp_millis() == oid.timestamp().timestamp_millis()
            }
        })
    }
}

/// The documents strictly after the cursor in `{created_at: -1, _id: -1}` order. A legacy poll
/// (no `created_at`) sorts as null: after every new poll, among legacy polls by ObjectId.
fn after_filter(created_at: DateTime<Utc>, oid: ObjectId, cursor_is_legacy: bool) -> Document {
    if cursor_is_legacy {
        return doc! { "created_at": Bson::Null, "_id": { "$lt": oid } };
    }
    let t = fmt_time(created_at);
    doc! { "$or": [
        { "created_at": { "$lt": &t } },
        { "created_at": &t, "_id": { "$lt": oid } },
        { "created_at": Bson::Null },
    ] }
}

/// [`shared::contract::Schedule::status_at`] as a query (a missing `opens_at`, as in polls stored
/// before scheduled openings, matches `null`).
fn status_filter(status: StatusFilter, now: DateTime<Utc>) -> Document {
    let now = fmt_time(now);
    let not_closing_yet = doc! { "$or": [ { "closes_at": Bson::Null }, { "closes_at": { "$gt": &now } } ] };
    let opened = doc! { "$or": [ { "opens_at": Bson::Null }, { "opens_at": { "$lte": &now } } ] };
    match status {
        StatusFilter::Scheduled => doc! {
            "closed_at": Bson::Null,
            "opens_at": { "$gt": &now },
            "$and": [ not_closing_yet ],
        },
        StatusFilter::Open => doc! {
            "closed_at": Bson::Null,
            "$and": [ not_closing_yet, opened ],
        },
        StatusFilter::Closed => doc! {
            "$or": [ { "closed_at": { "$ne": Bson::Null } }, { "closes_at": { "$lte": &now } } ],
        },
    }
}

#[async_trait]
impl PollStore for MongoPollStore {
    async fn create(&self, poll: &PollRecord) -> StoreResult<()> {
        let doc = &poll_to_doc(poll)?;
        let inserted = self
            .retry
            .run(|| async move {
                match self.polls.insert_one(doc.clone()).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_duplicate_key(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if !inserted {
            // Our own insert, retried by the driver after a lost reply, also lands here: it is
            // ours when the stored document is exactly what we wrote.
            if self.get(&poll.id).await?.as_ref() != Some(poll) {
                return Err(StoreError::internal(format!("poll id {} already exists", poll.id)));
            }
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> StoreResult<Option<PollRecord>> {
        let Some(oid) = poll_oid(id) else { return Ok(None) };
        let found = self.retry.run(|| self.polls.find_one(doc! { "_id": oid })).await?;
        found.as_ref().map(doc_to_poll).transpose()
    }

    async fn list(&self, query: &PollQuery) -> StoreResult<Vec<PollRecord>> {
        let mut clauses = Vec::new();
        if let Some(c) = &query.after {
            let Some(oid) = poll_oid(&c.id) else {
                return Err(StoreError::internal(format!(
                    "listing cursor id {:?} is not a poll id",
                    c.id
                )));
            };
            clauses.push(after_filter(
                c.created_at,
                oid,
                self.is_legacy(oid, c.created_at).await?,
            ));
        }
        if let Some(s) = query.status {
            clauses.push(status_filter(s, query.now));
        }
        let filter = &if clauses.is_empty() {
            doc! {}
        } else {
            doc! { "$and": clauses }
        };
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let docs = self
            .retry
            .run(|| async move {
                let mut cursor = self
                    .polls
                    .find(filter.clone())
                    .sort(doc! { "created_at": -1, "_id": -1 })
                    .limit(limit)
                    .await?;
                let mut out = Vec::new();
                while cursor.advance().await? {
                    out.push(cursor.deserialize_current()?);
                }
                Ok(out)
            })
            .await?;
        docs.iter().map(doc_to_poll).collect()
    }

    async fn replace(&self, poll: &PollRecord, expected_revision: u64) -> StoreResult<bool> {
        let Some(oid) = poll_oid(&poll.id) else {
            return Ok(false);
        };
        let doc = poll_to_doc(poll)?;
        // A legacy poll has no `revision` field: it is revision 0.
        let filter = if expected_revision == 0 {
            doc! { "_id": oid, "$or": [ { "revision": 0_i64 }, { "revision": { "$exists": false } } ] }
        } else {
            doc! { "_id": oid, "revision": to_i64(expected_revision) }
        };
        let res = self
            .retry
            .run(|| self.polls.replace_one(filter.clone(), doc.clone()))
            .await?;
        Ok(res.matched_count == 1)
    }

    async fn delete(&self, id: &str) -> StoreResult<bool> {
        let Some(oid) = poll_oid(id) else { return Ok(false) };
        let res = self.retry.run(|| self.polls.delete_one(doc! { "_id": oid })).await?;
        Ok(res.deleted_count == 1)
    }

    async fn ping(&self) -> StoreResult<()> {
        shared::mongo::ping(&self.db, &self.retry).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_polls_take_the_predecessors_defaults() {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").expect("oid");
        let d = doc! { "_id": oid, "name": "Lunch?", "desc": "d", "options": ["a", "b"], "votes": { "count": 7 } };
        let p = doc_to_poll(&d).expect("legacy poll");
        assert_eq!(p.id, "65a1b2c3d4e5f60718293a4b");
        assert_eq!(p.created_at.timestamp(), 0x65a1_b2c3);
        assert_eq!((p.max_choices, p.legacy_votes, p.revision), (1, 7, 0));
        assert_eq!(p.options, vec!["a".to_owned(), "b".to_owned()]);
        assert!(p.admin_token_hash.is_none());
    }
}
