//! The poll service's public routes (`/api/polls…`) and its internal one (`/internal/polls/{id}`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use shared::contract::{DEFAULT_MAX_SCORE, ResultsVisibility, Tally, VotingMethod, new_poll_id};
use shared::http::{AppJson, AppQuery, ClientAddr};
use shared::internal::PollDefinition;
use shared::problem::{FieldError, Problem, ProblemBody, ProblemKind};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::access::{authorize, hash_token, is_admin, parse_id, results_visible};
use crate::model::*;
use crate::record::{
    PollCursor, PollQuery, PollRecord, UpdateRefused, check_ballot_rules, check_closes_at, check_desc, check_name,
    check_options, check_order,
};
use crate::snapshots::{Rendered, Snapshot};
use crate::state::{AppState, St};
use crate::store::DynPollStore;
use crate::stream;
use crate::votes::Viewer;

pub fn router(state: Arc<AppState>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(create_poll, list_polls))
        .routes(routes!(get_poll, update_poll, delete_poll))
        .routes(routes!(close_poll))
        .routes(routes!(stream::results_stream))
        .routes(routes!(crate::export::results_csv))
        .routes(routes!(crate::export::export_ballots))
        .route("/internal/polls/{id}", axum::routing::get(poll_definition))
        .with_state(state)
}

pub async fn load(store: &DynPollStore, id: &str) -> Result<PollRecord, Problem> {
    let id = parse_id(id)?;
    store
        .get(&id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("there is no poll {id}")))
}

/// The snapshot of the poll `id` names (400 for a malformed id, 404 for no such poll).
pub(crate) async fn snapshot(s: &AppState, id: &str) -> Result<Arc<Snapshot>, Problem> {
    let id = parse_id(id)?;
    s.snapshots
        .get(&id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("there is no poll {id}")))
}

/// The poll as this caller may see it: from the snapshot's tally when its counts show to anyone
/// (or to the admin), else with one call to the vote service, which also tells whether the caller
/// (`viewer`, asked only for a caller who is not the admin) voted. A snapshot without a tally
/// (`after_vote`) was loaded without one.
pub(crate) async fn caller_view(
    s: &AppState,
    snap: &Snapshot,
    admin: bool,
    viewer: impl FnOnce() -> Viewer,
) -> Result<PollView, Problem> {
    let now = Utc::now();
    match &snap.votes {
        Some(votes) if results_visible(&snap.poll, now, false, admin) => {
            Ok(PollView::with_votes(&snap.poll, Some((**votes).clone()), now))
        }
        _ => {
            let viewer = (!admin).then(viewer);
            views(s, std::slice::from_ref(&*snap.poll), viewer.as_ref(), admin)
                .await?
                .pop()
                .ok_or_else(|| Problem::internal("no view of the poll was made"))
        }
    }
}

/// The views of a page of polls: one call to the vote service for all their counts (and, with a
/// `viewer`, whether they voted on each).
pub(crate) async fn views(
    s: &AppState,
    polls: &[PollRecord],
    viewer: Option<&Viewer>,
    admin: bool,
) -> Result<Vec<PollView>, Problem> {
    let refs: Vec<&PollRecord> = polls.iter().collect();
    let tallies = s.votes.tallies(&refs, viewer).await?;
    let now = Utc::now();
    Ok(polls
        .iter()
        .zip(tallies)
        .map(|(p, (tally, voted))| {
            let shown = results_visible(p, now, voted, admin);
            PollView::new(p, shown.then_some(&tally), now)
        })
        .collect())
}

/// Create a poll.
#[utoipa::path(post, path = "/api/polls", tag = "polls", request_body = CreatePoll, responses(
    (status = 201, description = "Created; the admin token is in the body, only this once", body = CreatedPoll,
        headers(("Location" = String, description = "The new poll's URL"))),
    (status = 400, description = "Malformed JSON or invalid fields, each named", body = ProblemBody, content_type = "application/problem+json"),
    (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
    (status = 415, description = "Body is not JSON", body = ProblemBody, content_type = "application/problem+json"),
    (status = 429, description = "Too many writes from this client", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn create_poll(State(s): St, AppJson(body): AppJson<CreatePoll>) -> Result<Response, Problem> {
    let now = Utc::now();
    let mut errors = Vec::new();
    let name = check_name(&body.name, &mut errors);
    let desc = check_desc(body.desc.as_deref().unwrap_or(""), &mut errors);
    let options = check_options(&body.options.0, &mut errors);
    let method = body.method.unwrap_or_default();
    let n = options.len() as u32;
    let (min_choices, max_choices, max_score) = (
        body.min_choices.map(|m| m.0),
        body.max_choices.map(|m| m.0),
        body.max_score.map(|m| m.0),
    );
    let not_for = |field: &str, what: &str| FieldError::new(field, format!("does not apply to a {what} poll"));
    if method == VotingMethod::Score {
        errors.extend(min_choices.map(|_| not_for("min_choices", "score")));
        errors.extend(max_choices.map(|_| not_for("max_choices", "score")));
    } else {
        let name = if method == VotingMethod::Ranked {
            "ranked"
        } else {
            "choice"
        };
        errors.extend(max_score.map(|_| not_for("max_score", name)));
    }
    let max_choices = match method {
        VotingMethod::Choice => max_choices.unwrap_or(1),
        VotingMethod::Ranked => max_choices.unwrap_or(n),
        VotingMethod::Score => n,
    };
    if let Some(t) = body.closes_at {
        check_closes_at(t, now, &mut errors);
    }
    check_order(body.opens_at, body.closes_at, &mut errors);
    let token = shared::secret::new_token();
    let poll = PollRecord {
        id: new_poll_id(now),
        name,
        desc,
        options,
        method,
        min_choices: min_choices.unwrap_or(1),
        max_choices,
        max_score: max_score.unwrap_or(DEFAULT_MAX_SCORE),
        opens_at: body.opens_at,
        closes_at: body.closes_at,
        closed_at: None,
        results: body.results.unwrap_or_default(),
        dedupe: body.dedupe.unwrap_or_default(),
        changes: body.changes.unwrap_or_default(),
        created_at: now,
        updated_at: now,
        admin_token_hash: Some(hash_token(&token)),
        legacy_votes: 0,
        revision: 1,
    };
    check_ballot_rules(&poll, &mut errors);
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    s.store.create(&poll).await?;
    s.snapshots.invalidate(&poll.id).await;
    tracing::info!(poll_id = %poll.id, "poll created");
    let tally = Tally::default().padded(poll.options.len());
    let created = CreatedPoll {
        poll: PollView::new(&poll, Some(&tally), now),
        admin_token: token,
    };
    let location = HeaderValue::from_str(&format!("/api/polls/{}", poll.id)).map_err(Problem::internal)?;
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(created)).into_response())
}

/// A cursor is the position of the last poll of a page: its creation time (microseconds since the
/// epoch, big-endian i64) and its id (12 bytes), base64url without padding — always 27 characters,
/// the last one from the 16 whose trailing bits are zero (the pattern of [`ListParams::cursor`]).
/// Every string of that shape is a position in the newest-first order, so every one is accepted.
fn encode_cursor(p: &PollRecord) -> String {
    let mut bytes = [0u8; 20];
    bytes[..8].copy_from_slice(&p.created_at.timestamp_micros().to_be_bytes());
    // Ids are 24 hex characters, checked when parsed.
    for (i, pair) in p.id.as_bytes().chunks(2).take(12).enumerate() {
        bytes[8 + i] = std::str::from_utf8(pair)
            .ok()
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_cursor(c: &str) -> Option<PollCursor> {
    let bytes: [u8; 20] = URL_SAFE_NO_PAD.decode(c).ok()?.try_into().ok()?;
    let (micros, id) = bytes.split_at(8);
    let micros = i64::from_be_bytes(micros.try_into().ok()?);
    // Beyond the representable range, the position is before everything or after everything.
    let created_at = DateTime::from_timestamp_micros(micros).unwrap_or(if micros < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    });
    Some(PollCursor {
        created_at,
        id: id.iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// List polls, newest first.
#[utoipa::path(get, path = "/api/polls", tag = "polls", params(ListParams, ViewerParams), responses(
    (status = 200, description = "A page of polls; the next page is in `Link: <…>; rel=\"next\"`", body = Vec<PollView>,
        headers(("Link" = String, description = "URL of the next page, when there is one"),
            ("ETag" = String, description = "Validator of this page; send it back as `If-None-Match`"),
            ("Cache-Control" = String, description = "`public, max-age=1` unless a poll of the page shows its counts only to voters (`private, no-store`)"))),
    (status = 304, description = "Not modified: the `If-None-Match` ETag is current"),
    (status = 400, description = "Invalid query parameter, named", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or vote service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn list_polls(
    State(s): St,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    AppQuery(q): AppQuery<ListParams>,
    AppQuery(v): AppQuery<ViewerParams>,
) -> Result<Response, Problem> {
    let mut errors = Vec::new();
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        errors.push(FieldError::new("query.limit", "must be between 1 and 100"));
    }
    let after = match q.cursor.as_deref() {
        None => None,
        Some(c) => {
            let cursor = decode_cursor(c);
            if cursor.is_none() {
                errors.push(FieldError::new("query.cursor", "is not a cursor this service issued"));
            }
            cursor
        }
    };
    let voter_id = v.voter_id().unwrap_or_else(|p| {
        errors.extend(p.errors);
        None
    });
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let limit = limit as usize;
    let mut polls = s
        .store
        .list(&PollQuery {
            limit: limit + 1,
            after,
            status: q.status,
            now: Utc::now(),
        })
        .await?;
    let next = (polls.len() > limit).then(|| {
        polls.truncate(limit);
        polls.last().map(encode_cursor)
    });
    let viewer = Viewer::new(addr, &headers, voter_id);
    let body = views(&s, &polls, Some(&viewer), false).await?;
    // The list never recognises an admin, so only `after_vote` polls make it caller-dependent.
    let shared = polls.iter().all(|p| p.results != ResultsVisibility::AfterVote);
    let bytes = serde_json::to_vec(&body).map_err(Problem::internal)?;
    let view = Rendered::new(bytes, shared);
    let mut res = conditional(&headers, &view);
    if let Some(Some(cursor)) = next {
        let mut link = format!("/api/polls?limit={limit}&cursor={cursor}");
        if let Some(status) = q.status {
            link.push_str(match status {
                crate::record::StatusFilter::Scheduled => "&status=scheduled",
                crate::record::StatusFilter::Open => "&status=open",
                crate::record::StatusFilter::Closed => "&status=closed",
            });
        }
        if let Ok(v) = HeaderValue::from_str(&format!("<{link}>; rel=\"next\"")) {
            res.headers_mut().insert(header::LINK, v);
        }
    }
    Ok(res)
}

/// Get one poll with its counts (or `votes: null` while hidden from this caller).
///
/// Served from the poll's snapshot (at most 250 ms old, shared by every reader); `ETag` / `If-None-Match` give 304,
/// and a view that is the same for everyone may be cached for a second by browsers and the edge.
#[utoipa::path(get, path = "/api/polls/{id}", tag = "polls", params(PollIdPath, ViewerParams), responses(
    (status = 200, body = PollView, headers(
        ("ETag" = String, description = "Validator of this view; send it back as `If-None-Match`"),
        ("Cache-Control" = String, description = "`public, max-age=1` when the view is the same for everyone (results `always`, or a closed `after_close` poll), else `private, no-store`"))),
    (status = 304, description = "Not modified: the `If-None-Match` ETag is current"),
    (status = 400, description = "Malformed id", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No such poll", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or vote service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn get_poll(
    State(s): St,
    Path(id): Path<String>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    AppQuery(v): AppQuery<ViewerParams>,
) -> Result<Response, Problem> {
    let voter_id = v.voter_id()?;
    let snap = snapshot(&s, &id).await?;
    let admin = is_admin(&snap.poll, &headers);
    if let Some(public) = snap.public.as_ref().filter(|p| p.shared || !admin) {
        return Ok(conditional(&headers, public));
    }
    // Caller-dependent: the admin's view, or a poll that shows its counts only to voters.
    let view = caller_view(&s, &snap, admin, || Viewer::new(addr, &headers, voter_id)).await?;
    let body = serde_json::to_vec(&view).map_err(Problem::internal)?;
    Ok(conditional(&headers, &Rendered::new(body, false)))
}

/// Answers `view`: 304 when `If-None-Match` names its ETag (or is `*`), else the body; with
/// `Cache-Control` by whether the view is the same for everyone.
fn conditional(headers: &HeaderMap, view: &Rendered) -> Response {
    let not_modified = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || view.etag.to_str().is_ok_and(|e| e == t));
    let mut res = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            view.body.clone(),
        )
            .into_response()
    };
    let h = res.headers_mut();
    h.insert(header::ETAG, view.etag.clone());
    if view.shared {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=1"));
    } else {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
        h.insert(header::VARY, HeaderValue::from_static("Authorization, X-Voter-Id"));
    }
    res
}

/// Change a poll (admin only). Options and dedupe cannot change once a vote exists.
#[utoipa::path(patch, path = "/api/polls/{id}", tag = "polls", request_body(content = UpdatePoll, content_type = "application/json"),
    params(PollIdPath), security(("admin_token" = [])), responses(
    (status = 200, body = PollView),
    (status = 400, description = "Malformed JSON, id or fields", body = ProblemBody, content_type = "application/problem+json"),
    (status = 401, description = "Missing or wrong admin token", body = ProblemBody, content_type = "application/problem+json"),
    (status = 403, description = "The poll has no admin token", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No such poll", body = ProblemBody, content_type = "application/problem+json"),
    (status = 409, description = "Poll closed, votes exist, changed concurrently, or opens_at changed after the poll opened", body = ProblemBody, content_type = "application/problem+json"),
    (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
    (status = 415, description = "Body is not JSON", body = ProblemBody, content_type = "application/problem+json"),
    (status = 429, description = "Too many writes from this client", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or vote service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn update_poll(
    State(s): St,
    Path(id): Path<String>,
    headers: HeaderMap,
    AppJson(body): AppJson<UpdatePoll>,
) -> Result<Json<PollView>, Problem> {
    // A merge patch names only the fields it changes, so when another change lands between our
    // read and our write, it is applied again to the newer poll (which may now be closed or have
    // votes, and is checked again), instead of losing either change.
    let update = body.to_update();
    for _ in 0..UPDATE_ATTEMPTS {
        let poll = load(&s.store, &id).await?;
        authorize(&poll, &headers)?;
        let now = Utc::now();
        let mut next = poll.apply(&update, now).map_err(|e| match e {
            UpdateRefused::Closed => {
                Problem::new(ProblemKind::PollClosed, "the poll is closed and can no longer change")
            }
            UpdateRefused::AlreadyOpen => Problem::new(
                ProblemKind::PollAlreadyOpen,
                "the poll has opened; its opening time (opens_at) can no longer change",
            ),
            UpdateRefused::Invalid(errors) => Problem::validation(errors),
        })?;
        let ballots_matter = next.options != poll.options || next.dedupe != poll.dedupe;
        let tally = s.votes.tally(&poll).await?;
        if ballots_matter && (tally.total > 0 || poll.legacy_votes > 0) {
            return Err(Problem::new(
                ProblemKind::VotesExist,
                "options and dedupe cannot change once a vote exists",
            ));
        }
        next.updated_at = now;
        next.revision = poll.revision + 1;
        if s.store.replace(&next, poll.revision).await? {
            s.snapshots.invalidate(&next.id).await;
            return Ok(Json(PollView::new(&next, Some(&tally.padded(next.options.len())), now)));
        }
    }
    Err(Problem::new(
        ProblemKind::ConcurrentChange,
        "the poll changed meanwhile; read it again and retry",
    ))
}

/// How many times a patch is applied to a poll that keeps changing under it before the client is
/// told to retry (each lost round means another change was stored).
const UPDATE_ATTEMPTS: usize = 32;

/// Close a poll now (admin only). Closing a closed poll changes nothing and succeeds.
#[utoipa::path(post, path = "/api/polls/{id}/close", tag = "polls", params(PollIdPath),
    security(("admin_token" = [])), responses(
    (status = 200, body = PollView),
    (status = 400, description = "Malformed id", body = ProblemBody, content_type = "application/problem+json"),
    (status = 401, description = "Missing or wrong admin token", body = ProblemBody, content_type = "application/problem+json"),
    (status = 403, description = "The poll has no admin token", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No such poll", body = ProblemBody, content_type = "application/problem+json"),
    (status = 429, description = "Too many writes from this client", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or vote service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn close_poll(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Result<Json<PollView>, Problem> {
    let mut poll = load(&s.store, &id).await?;
    authorize(&poll, &headers)?;
    for _ in 0..5 {
        let now = Utc::now();
        if poll.closed_at.is_some() {
            break;
        }
        let mut next = poll.clone();
        next.closed_at = Some(match poll.closes_at {
            Some(t) if t <= now => t,
            _ => now,
        });
        next.updated_at = now;
        next.revision = poll.revision + 1;
        if s.store.replace(&next, poll.revision).await? {
            s.snapshots.invalidate(&next.id).await;
            tracing::info!(poll_id = %next.id, "poll closed");
            poll = next;
            break;
        }
        poll = load(&s.store, &id).await?;
    }
    if poll.closed_at.is_none() {
        return Err(Problem::unavailable(
            "the poll is changing too often; retry",
            std::time::Duration::from_secs(1),
        ));
    }
    let tally = s.votes.tally(&poll).await?;
    Ok(Json(PollView::new(&poll, Some(&tally), Utc::now())))
}

/// Delete a poll and its ballots (admin only).
#[utoipa::path(delete, path = "/api/polls/{id}", tag = "polls", params(PollIdPath),
    security(("admin_token" = [])), responses(
    (status = 204, description = "Deleted"),
    (status = 400, description = "Malformed id", body = ProblemBody, content_type = "application/problem+json"),
    (status = 401, description = "Missing or wrong admin token", body = ProblemBody, content_type = "application/problem+json"),
    (status = 403, description = "The poll has no admin token", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No such poll", body = ProblemBody, content_type = "application/problem+json"),
    (status = 429, description = "Too many writes from this client", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn delete_poll(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Result<StatusCode, Problem> {
    let poll = load(&s.store, &id).await?;
    authorize(&poll, &headers)?;
    if !s.store.delete(&poll.id).await? {
        return Err(Problem::not_found(format!("there is no poll {}", poll.id)));
    }
    s.snapshots.invalidate(&poll.id).await;
    tracing::info!(poll_id = %poll.id, "poll deleted");
    s.votes.purge(&poll.id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Internal: the definition the vote service validates ballots against.
async fn poll_definition(State(s): St, Path(id): Path<String>) -> Result<Json<PollDefinition>, Problem> {
    let poll = load(&s.store, &id).await?;
    Ok(Json(PollDefinition::from(&poll)))
}
