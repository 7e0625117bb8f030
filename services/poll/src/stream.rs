//! Live results over Server-Sent Events: each stream follows its poll's snapshots from the
//! [`Hub`](crate::hub::Hub).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use shared::Problem;
use shared::contract::ResultsVisibility;

use shared::http::{AppQuery, ClientAddr};
use shared::problem::ProblemBody;
use utoipa::openapi::RefOr;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::access::{is_admin, parse_id, results_visible};
use crate::hub::{FIRST_SNAPSHOT_WAIT, Snapshot};
use crate::model::{PollIdPath, PollView, ViewerParams};
use crate::state::St;
use crate::votes::Viewer;

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
    let admin = is_admin(&poll, &headers);
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
                    Snapshot::Live { poll, votes, .. } => {
                        let now = Utc::now();
                        let shown = results_visible(&poll, now, voted, admin);
                        let view = PollView::with_votes(&poll, shown.then(|| (*votes).clone()), now);
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
