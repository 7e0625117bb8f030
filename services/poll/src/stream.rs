//! Live results over Server-Sent Events.
//!
//! One [`Hub`] per process keeps, per watched poll, a single poller that reads the poll and its
//! tally (from the vote service) every `interval` and publishes a snapshot on a `watch` channel
//! when something changed. Every subscriber of that poll reads the same snapshot: the work is done
//! once per poll, not once per subscriber. The poller stops when the last subscriber leaves.
//! Because it reads the shared tally, ballots accepted by any vote-service replica show up.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use shared::Problem;
use shared::contract::{PollStatus, ResultsVisibility, Tally};

use crate::record::PollRecord;
use shared::http::{AppQuery, ClientAddr};
use shared::problem::ProblemBody;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::RefOr;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::api::{St, parse_id, results_visible};
use crate::model::{PollIdPath, PollView, ViewerParams};
use crate::snapshots::Snapshots;
use crate::votes::Viewer;

#[derive(Clone, Debug)]
pub enum Snapshot {
    /// The poller has not read the poll yet.
    Pending,
    Live {
        poll: Arc<PollRecord>,
        tally: Arc<Tally>,
        status: PollStatus,
    },
    /// The poll was deleted.
    Gone,
}

/// How long a new subscriber waits for the hub's first snapshot before answering 503 (the hub
/// retries every interval meanwhile); under the request timeout.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(8);

pub struct Hub {
    polls: Mutex<HashMap<String, Arc<watch::Sender<Snapshot>>>>,
    /// The pollers read the same snapshots as `GET /api/polls/{id}`.
    snapshots: Arc<Snapshots>,
    interval: Duration,
    shutdown: CancellationToken,
}

impl Hub {
    pub fn new(snapshots: Arc<Snapshots>, interval: Duration, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            polls: Mutex::new(HashMap::new()),
            snapshots,
            interval,
            shutdown,
        })
    }

    /// How many polls have a poller running.
    pub fn watched(&self) -> usize {
        self.polls.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn subscribe(self: &Arc<Self>, id: &str) -> watch::Receiver<Snapshot> {
        let Ok(mut polls) = self.polls.lock() else {
            let (_, rx) = watch::channel(Snapshot::Pending);
            return rx;
        };
        if let Some(tx) = polls.get(id) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Snapshot::Pending);
        let tx = Arc::new(tx);
        polls.insert(id.to_owned(), tx.clone());
        let hub = Arc::clone(self);
        let id = id.to_owned();
        tokio::spawn(async move { hub.poll_loop(id, tx).await });
        rx
    }

    async fn poll_loop(self: Arc<Self>, id: String, tx: Arc<watch::Sender<Snapshot>>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => break,
            }
            if tx.receiver_count() == 0 {
                // Re-check under the lock so that a subscriber arriving now is not orphaned.
                if let Ok(mut polls) = self.polls.lock()
                    && tx.receiver_count() == 0
                {
                    polls.remove(&id);
                    return;
                }
            }
            let (poll, tally) = match self.snapshots.get(&id).await {
                // An `after_vote` poll's snapshot has no tally: one call here reads it.
                Ok(Some(snap)) => match self.snapshots.tally(&snap).await {
                    Ok(tally) => (snap.poll.clone(), tally),
                    Err(e) => {
                        tracing::debug!(poll_id = %id, error = %e.detail, "results stream: tally read failed");
                        continue;
                    }
                },
                Ok(None) => {
                    tx.send_replace(Snapshot::Gone);
                    break;
                }
                Err(e) => {
                    tracing::debug!(poll_id = %id, error = %e.detail, "results stream: poll read failed");
                    continue;
                }
            };
            let status = poll.status_at(Utc::now());
            tx.send_if_modified(|current| {
                let changed = match current {
                    Snapshot::Live {
                        poll: p,
                        tally: t,
                        status: s,
                    } => p.revision != poll.revision || **t != *tally || *s != status,
                    _ => true,
                };
                if changed {
                    *current = Snapshot::Live { poll, tally, status };
                }
                changed
            });
        }
        if let Ok(mut polls) = self.polls.lock() {
            polls.remove(&id);
        }
    }
}

/// One event of the results stream, as an OpenAPI 3.1 `text/event-stream` schema describes it: an
/// object with the event's `event` and `data` fields. `data` is JSON: the poll (`results`) or `{}`
/// (`deleted`).
pub struct ResultsEvent;

fn event_schema(name: &str, data: serde_json::Value, description: &str) -> Schema {
    let content: Extensions = [("contentSchema", data)].into_iter().collect();
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(description))
        .property(
            "event",
            ObjectBuilder::new().schema_type(Type::String).enum_values(Some([name])),
        )
        .property(
            "data",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .content_media_type("application/json")
                .extensions(Some(content)),
        )
        .required("event")
        .required("data")
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .into()
}

impl PartialSchema for ResultsEvent {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(event_schema(
                "results",
                serde_json::json!({"$ref": "#/components/schemas/PollView"}),
                "The poll with its counts (or `votes: null`), now and after every change",
            ))
            .item(event_schema(
                "deleted",
                serde_json::json!({"type": "object", "maxProperties": 0}),
                "The poll was deleted; the stream ends",
            ))
            .into()
    }
}

impl ToSchema for ResultsEvent {}

/// Live results: an event `results` with the poll (as `GET /api/polls/{id}` returns it) now and
/// whenever the counts or the poll change; `deleted` if the poll is deleted.
#[utoipa::path(get, path = "/api/polls/{id}/results/stream", tag = "polls",
    params(PollIdPath, ViewerParams), responses(
    (status = 200, description = "An event stream: `event: results` with the poll as `data`, now and after every change; `event: deleted` when the poll is deleted", body = ResultsEvent, content_type = "text/event-stream"),
    (status = 400, description = "Malformed id", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No such poll", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or vote service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
pub async fn results_stream(
    State(s): St,
    Path(id): Path<String>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    AppQuery(v): AppQuery<ViewerParams>,
) -> Result<Response, Problem> {
    let voter_id = v.voter_id()?;
    let id = parse_id(&id)?;
    // Subscribers of a poll share the hub's reads: a new one waits for the hub's snapshot instead
    // of reading the poll and its tally itself, so a thousand streams opening at once cost one
    // read, not a thousand (and a slow database is not made slower by a stampede of fallbacks).
    let mut rx = s.hub.subscribe(&id);
    let first = match tokio::time::timeout(FIRST_SNAPSHOT_WAIT, rx.wait_for(|s| !matches!(s, Snapshot::Pending))).await
    {
        Ok(Ok(snapshot)) => Some(snapshot.clone()),
        _ => None,
    };
    let poll = match first {
        Some(Snapshot::Live { poll, .. }) => poll,
        Some(Snapshot::Gone) => return Err(Problem::not_found(format!("there is no poll {id}"))),
        // The hub could not read the poll or its tally in time: the database or the vote service
        // is slow or down.
        Some(Snapshot::Pending) | None => {
            return Err(Problem::unavailable(
                "the poll's results cannot be read right now; retry later",
                Duration::from_secs(1),
            ));
        }
    };
    let viewer = Viewer::new(addr, &headers, voter_id);
    let admin = crate::api::is_admin(&poll, &headers);
    // Visibility that does not depend on time is decided once, here; only `after_vote` needs to
    // know whether this viewer voted.
    let voted = if poll.results == ResultsVisibility::AfterVote && !admin {
        s.votes
            .tallies(&[&poll], Some(&viewer))
            .await?
            .pop()
            .is_some_and(|(_, voted)| voted)
    } else {
        false
    };
    rx.mark_changed();
    let shutdown = s.shutdown.clone();
    let open = OpenStream::new(&s.metrics);
    let stream = futures_util::stream::unfold(Some(rx), move |state| {
        let _open = &open;
        let shutdown = shutdown.clone();
        async move {
            let mut rx = state?;
            loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return None },
                    () = shutdown.cancelled() => return None,
                }
                let snapshot = rx.borrow_and_update().clone();
                match snapshot {
                    Snapshot::Pending => continue,
                    Snapshot::Gone => {
                        return Some((Ok::<_, Infallible>(Event::default().event("deleted").data("{}")), None));
                    }
                    Snapshot::Live { poll, tally, .. } => {
                        let now = Utc::now();
                        let shown = results_visible(&poll, now, voted, admin);
                        let view = PollView::new(&poll, shown.then_some(&*tally), now);
                        let event = Event::default()
                            .event("results")
                            .json_data(&view)
                            .unwrap_or_else(|_| Event::default());
                        return Some((Ok(event), Some(rx)));
                    }
                }
            }
        }
    });
    let mut res = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    // Ask proxies (nginx ingress) not to buffer the stream.
    res.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    res.headers_mut()
        .insert(axum::http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(res)
}

/// Counts an open stream in `pollvote_sse_subscribers` for as long as it lives.
struct OpenStream(Arc<shared::metrics::Metrics>);

impl OpenStream {
    fn new(metrics: &Arc<shared::metrics::Metrics>) -> Self {
        metrics.sse_subscribers.inc();
        Self(metrics.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.sse_subscribers.dec();
    }
}
