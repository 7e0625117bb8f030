//! The vote service's routes: `POST /api/votes`, a ballot's own routes for its voter
//! (`GET`/`PUT`/`DELETE /api/votes/{id}` with its receipt), and the internal tally, export and
//! purge endpoints.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use shared::contract::{
    BallotChanges, MAX_OPTION_LEN, MAX_OPTIONS, MAX_SCORE, POLL_ID_PATTERN, PollStatus, Tally, VotingMethod,
    normalise_poll_id, validate_voter_id,
};
use shared::http::{AppJson, AppQuery, ClientAddr};
use shared::internal::{MAX_TALLIES, PollDefinition, TalliesQuery, TalliesResponse, TallyView};
use shared::problem::{FieldError, Problem, ProblemBody, ProblemKind};
use utoipa::openapi::Deprecated;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type,
};
use utoipa::{PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::ballot::{BallotRecord, CastOutcome, Duplicate, Marking, Refused, Rules, duplicate, identity, mark};
use crate::catalog::Catalog;
use crate::store::{BallotStream, DynBallotStore, Revised, Revision};

pub struct AppState {
    pub store: DynBallotStore,
    pub catalog: Catalog,
    pub outcomes: Family<OutcomeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(cast_vote))
        .routes(routes!(get_vote, replace_vote, withdraw_vote))
        .route("/internal/tallies", axum::routing::get(tallies))
        .route(
            "/internal/polls/{id}/ballots",
            axum::routing::delete(purge).get(export_ballots),
        )
        .route("/internal/polls/{id}/audit", axum::routing::get(audit))
        .route("/internal/audit", axum::routing::get(audit_many))
        .route("/internal/polls/{id}/repair", axum::routing::post(repair))
        .route("/internal/repair", axum::routing::post(repair_since))
        .with_state(state)
}

/// A ballot. Give either `option` (one choice, as the predecessor's clients do) or `options`.
/// Its schema is written out in [`CastBallot::schema`]: exactly one of `poll_id`/`pool_id` and
/// exactly one of `option`/`options`, which the derive cannot say.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CastBallot {
    /// The poll (`pool_id` is accepted as an alias for the predecessor's clients).
    #[serde(default, deserialize_with = "present")]
    pub poll_id: Option<String>,
    /// The predecessor's misspelling of `poll_id`.
    #[serde(default, deserialize_with = "present")]
    pub pool_id: Option<String>,
    /// One option's text.
    #[serde(default, deserialize_with = "present")]
    pub option: Option<String>,
    /// Several options' texts, up to the poll's `max_choices`.
    #[serde(default, deserialize_with = "present")]
    pub options: Option<Vec<String>>,
    /// A `ranked` poll's ballot: options' texts, best first.
    #[serde(default, deserialize_with = "present")]
    pub ranking: Option<Vec<String>>,
    /// A `score` poll's ballot: option text → score (0 to the poll's `max_score`; omitted
    /// options score 0).
    #[serde(default, deserialize_with = "present")]
    pub scores: Option<Scores>,
    /// The voter's opaque id (1–128 visible ASCII characters), for polls with `dedupe: voter`.
    /// The `X-Voter-Id` header works too.
    #[serde(default, deserialize_with = "present")]
    pub voter_id: Option<String>,
}

/// A `scores` object, its entries in the order given.
#[derive(Debug, Default)]
pub struct Scores(pub Vec<(String, i64)>);

impl<'de> Deserialize<'de> for Scores {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Scores;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of option texts to integer scores")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Scores, A::Error> {
                let mut out = Vec::new();
                while let Some((k, Score(v))) = map.next_entry::<String, Score>()? {
                    if out.len() >= MAX_OPTIONS {
                        return Err(serde::de::Error::custom(format!("at most {MAX_OPTIONS} scores")));
                    }
                    out.push((k, v));
                }
                Ok(Scores(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A score as JSON gives it: any whole number (`6.0` is 6, as JSON Schema's `integer` says); the
/// poll's range is checked with the ballot's other rules (422).
struct Score(i64);

impl<'de> Deserialize<'de> for Score {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Score;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Score, E> {
                Ok(Score(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Score, E> {
                Ok(Score(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            #[allow(clippy::cast_possible_truncation)]
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Score, E> {
                if v.fract() == 0.0 && v.abs() < 9.0e15 {
                    Ok(Score(v as i64))
                } else {
                    Err(E::custom(format!("expected a whole number, got {v}")))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A field that may be absent but, when present, is not `null`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The schema properties of a ballot's marks (`option`, `options`, `ranking`, `scores`), for
/// a new ballot and a replacement alike.
fn with_marking_fields(fields: ObjectBuilder) -> ObjectBuilder {
    let text = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_OPTION_LEN))
    };
    let texts = |description: &str| {
        ArrayBuilder::new()
            .items(text())
            .min_items(Some(1))
            .max_items(Some(MAX_OPTIONS))
            .unique_items(true)
            .description(Some(description))
    };
    fields
        .property("option", text().description(Some("One option's text.")))
        .property(
            "options",
            texts("Several options' texts, `min_choices` to `max_choices` of them (a `choice` poll)."),
        )
        .property(
            "ranking",
            texts("A `ranked` poll's ballot: `min_choices` to `max_choices` distinct options' texts, best first."),
        )
        .property(
            "scores",
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property_names(Some(text()))
                .additional_properties(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(0))
                        .maximum(Some(MAX_SCORE)),
                ))
                .max_properties(Some(MAX_OPTIONS))
                .description(Some(
                    "A `score` poll's ballot: option text → score, a whole number from 0 to the poll's `max_score` \
                         (omitted options score 0).",
                )),
        )
}

/// Exactly one of `names` is required.
fn one_of_required(names: &[&str]) -> OneOfBuilder {
    names.iter().fold(OneOfBuilder::new(), |b, name| {
        b.item(ObjectBuilder::new().schema_type(Type::Object).required(*name))
    })
}

impl PartialSchema for CastBallot {
    fn schema() -> RefOr<Schema> {
        let poll_id = |description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(description))
                .pattern(Some(POLL_ID_PATTERN))
                .examples(["6740a0c3f1e2d3c4b5a69788"])
        };
        let fields = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("poll_id", poll_id("The poll: 24 hexadecimal characters (either case)."))
            .property(
                "pool_id",
                poll_id(
                    "The predecessor's misspelling of `poll_id`, accepted from its clients; give one or the other.",
                )
                .deprecated(Some(Deprecated::True)),
            );
        let fields = with_marking_fields(fields)
            .property(
                "voter_id",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(128))
                    .pattern(Some(VOTER_ID_PATTERN))
                    .description(Some(
                        "The voter's opaque id (1–128 visible ASCII characters), for polls with `dedupe: voter`. \
                         The `X-Voter-Id` header works too; if both are given they must be equal.",
                    )),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        let one_of = one_of_required;
        AllOfBuilder::new()
            .description(Some(
                "A ballot: the poll (`poll_id`, or its old spelling `pool_id`) and, by the poll's method, `option` \
                 (one choice, as the predecessor's clients send it) or `options` (`choice`), `ranking` (`ranked`) \
                 or `scores` (`score`).",
            ))
            .item(fields)
            .item(one_of(&["poll_id", "pool_id"]))
            .item(one_of(&["option", "options", "ranking", "scores"]))
            .examples([serde_json::json!({"poll_id": "6740a0c3f1e2d3c4b5a69788", "option": "red"})])
            .into()
    }
}

impl ToSchema for CastBallot {}

/// A ballot's new marks (`PUT /api/votes/{id}`): the fields of a new ballot, without the poll.
/// Its schema is written out in [`ReplaceBallot::schema`] (exactly one of the marking fields).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaceBallot {
    #[serde(default, deserialize_with = "present")]
    pub option: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub options: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    pub ranking: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    pub scores: Option<Scores>,
}

impl PartialSchema for ReplaceBallot {
    fn schema() -> RefOr<Schema> {
        let fields = with_marking_fields(ObjectBuilder::new().schema_type(Type::Object))
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        AllOfBuilder::new()
            .description(Some(
                "A ballot's new marks, by the poll's method: `option` or `options` (`choice`), `ranking` (`ranked`) \
                 or `scores` (`score`), checked by the poll's rules as a new ballot's are.",
            ))
            .item(fields)
            .item(one_of_required(&["option", "options", "ranking", "scores"]))
            .examples([serde_json::json!({"options": ["red", "blue"]})])
            .into()
    }
}

impl ToSchema for ReplaceBallot {}

const VOTER_ID_PATTERN: &str = "^[!-~]+$";

/// A ballot as counted.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ballot {
    pub id: String,
    pub poll_id: String,
    /// The options the ballot counts for: the chosen ones (`choice` polls), the first preference
    /// (`ranked`), the ones scored above 0 (`score`).
    pub options: Vec<String>,
    /// `ranked` polls: the ranking, best first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranking: Option<Vec<String>>,
    /// `score` polls: every option's score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<std::collections::BTreeMap<String, u32>>,
    pub created_at: DateTime<Utc>,
    /// When its voter last replaced its marks, if ever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// The ballot's receipt, only in the answer that stored it, never later: its voter sends it
    /// as `Authorization: Bearer <receipt>` to `GET /api/votes/{id}` to see the ballot as counted,
    /// and, while the poll is open and unless it locks changes, to `PUT /api/votes/{id}` (new
    /// marks) and `DELETE /api/votes/{id}` (withdraw it, then vote again if they like).
    /// Stored only as a hash. An idempotent retry (same `Idempotency-Key`, same ballot) gets a new
    /// receipt, which replaces the first: the retrying client may never have received it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
}

fn ballot_view(b: &BallotRecord, def: &PollDefinition) -> Ballot {
    let texts = |v: &[u32]| -> Vec<String> { v.iter().filter_map(|&i| def.options.get(i as usize).cloned()).collect() };
    Ballot {
        receipt: None,
        id: b.id.clone(),
        poll_id: b.poll_id.clone(),
        options: texts(&b.choices),
        ranking: b.ranking.as_deref().map(texts),
        scores: b
            .scores
            .as_ref()
            .map(|s| def.options.iter().cloned().zip(s.iter().copied()).collect()),
        created_at: b.created_at,
        updated_at: b.updated_at,
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || Problem::invalid("header.Idempotency-Key", "must be 1 to 255 visible ASCII characters");
    let s = v.to_str().map_err(|_| bad())?.trim();
    // Drafts of the Idempotency-Key header quote the value as a structured-field string.
    let s = s
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .filter(|x| !x.is_empty())
        .unwrap_or(s);
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_owned()))
}

impl From<Refused> for Problem {
    fn from(r: Refused) -> Self {
        match r {
            Refused::UnknownOption { field, text } => Problem::unprocessable(
                ProblemKind::UnknownOption,
                &field,
                format!("`{text}` is not an option of this poll"),
            ),
            Refused::DuplicateOption { field, text } => Problem::unprocessable(
                ProblemKind::DuplicateOption,
                &field,
                format!("`{text}` is chosen twice"),
            ),
            Refused::TooManyChoices { field, max, got } => Problem::unprocessable(
                ProblemKind::TooManyChoices,
                field,
                format!("this poll allows at most {max} choice(s); got {got}"),
            ),
            Refused::TooFewChoices { field, min, got } => Problem::unprocessable(
                ProblemKind::TooFewChoices,
                field,
                format!("this poll needs at least {min} choice(s); got {got}"),
            ),
            Refused::ScoreOutOfRange { field, max, got } => Problem::unprocessable(
                ProblemKind::ScoreOutOfRange,
                &field,
                format!("scores are whole numbers from 0 to {max}; got {got}"),
            ),
            Refused::WrongShape { field, method } => {
                let wanted = match method {
                    VotingMethod::Choice => "`option` or `options`",
                    VotingMethod::Ranked => "`ranking` (options' texts, best first)",
                    VotingMethod::Score => "`scores` (option text → score)",
                };
                Problem::unprocessable(
                    ProblemKind::WrongBallotShape,
                    field,
                    format!("this is a `{}` poll: give {wanted}", method_name(method)),
                )
            }
            Refused::VoterIdRequired => Problem::invalid(
                "voter_id",
                "this poll needs a voter id (body `voter_id` or header X-Voter-Id)",
            ),
        }
    }
}

fn method_name(m: VotingMethod) -> &'static str {
    match m {
        VotingMethod::Choice => "choice",
        VotingMethod::Ranked => "ranked",
        VotingMethod::Score => "score",
    }
}

/// Cast a ballot.
#[utoipa::path(post, path = "/api/votes", tag = "votes", request_body = CastBallot,
    params(
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 257, pattern = r#"^(?:[!-~]{1,255}|"[!-~]{1,255}")$"#,
            description = "Makes retries safe: the same key returns the first answer. 1–255 visible ASCII characters, optionally in double quotes"),
        ("X-Voter-Id" = Option<String>, Header, min_length = 1, max_length = 128, pattern = "^[!-~]+$",
            description = "The voter's id (1–128 visible ASCII characters), for polls with `dedupe: voter`; equal to the body's `voter_id` if both are given"),
    ),
    responses(
    (status = 201, description = "Stored durably and counted (or, with a repeated Idempotency-Key, the first answer again)", body = Ballot),
    (status = 400, description = "Malformed JSON or invalid fields, each named", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No such poll", body = ProblemBody, content_type = "application/problem+json"),
    (status = 409, description = "Already voted (per the poll's dedupe), poll closed, or poll not open yet (`opens_at`)", body = ProblemBody, content_type = "application/problem+json"),
    (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
    (status = 415, description = "Body is not JSON", body = ProblemBody, content_type = "application/problem+json"),
    (status = 422, description = "The ballot breaks the poll's rules, named by field: an unknown option, an option marked twice, too many or too few choices, a score out of range, a ballot in another method's shape; or an Idempotency-Key reused for another ballot", body = ProblemBody, content_type = "application/problem+json"),
    (status = 429, description = "Too many writes from this client", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or poll service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn cast_vote(
    State(s): St,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    AppJson(body): AppJson<CastBallot>,
) -> Result<Response, Problem> {
    let result = cast(&s, addr, &headers, body).await;
    let outcome = match &result {
        Ok((_, true)) => "replayed",
        Ok((_, false)) => "accepted",
        Err(p) => match p.kind {
            ProblemKind::AlreadyVoted => "duplicate",
            ProblemKind::PollClosed => "closed",
            ProblemKind::PollNotOpen => "not_open",
            ProblemKind::Unavailable => "unavailable",
            _ => "rejected",
        },
    };
    s.outcomes.get_or_create(&OutcomeLabels { outcome }).inc();
    let (ballot, replayed) = result?;
    let mut res = (StatusCode::CREATED, Json(ballot)).into_response();
    if replayed {
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(res)
}

async fn cast(
    s: &AppState,
    addr: std::net::IpAddr,
    headers: &HeaderMap,
    body: CastBallot,
) -> Result<(Ballot, bool), Problem> {
    let mut errors = Vec::new();
    let poll_id = match (body.poll_id, body.pool_id) {
        (Some(id), None) | (None, Some(id)) => {
            let id = normalise_poll_id(&id);
            if id.is_none() {
                errors.push(FieldError::new(
                    "poll_id",
                    "must be a poll id: 24 hexadecimal characters",
                ));
            }
            id
        }
        (None, None) => {
            errors.push(FieldError::new("poll_id", "is required"));
            None
        }
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                "pool_id",
                "give `poll_id` or its old spelling `pool_id`, not both",
            ));
            None
        }
    };
    let marking = marking(body.option, body.options, body.ranking, body.scores, &mut errors);
    let header_voter = headers.get("x-voter-id").map(|v| v.to_str().map(str::trim));
    let voter_id = match (body.voter_id.as_deref(), header_voter) {
        (_, Some(Err(_))) => {
            errors.push(FieldError::new("header.X-Voter-Id", "must be visible ASCII"));
            None
        }
        (Some(b), Some(Ok(h))) if b != h => {
            errors.push(FieldError::new("voter_id", "differs from the X-Voter-Id header"));
            None
        }
        (Some(v), _) | (None, Some(Ok(v))) => {
            if let Err(msg) = validate_voter_id(v) {
                errors.push(FieldError::new("voter_id", msg));
            }
            Some(v.to_owned())
        }
        (None, None) => None,
    };
    let idem = match idempotency_key(headers) {
        Ok(k) => k,
        Err(p) => {
            errors.extend(p.errors);
            None
        }
    };
    let (Some(poll_id), Some(marking), true) = (poll_id, marking, errors.is_empty()) else {
        return Err(Problem::validation(errors));
    };

    let def = s
        .catalog
        .get(&poll_id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("there is no poll {poll_id}")))?;
    match def.status_at(Utc::now()) {
        PollStatus::Closed => return Err(Problem::new(ProblemKind::PollClosed, "the poll is closed")),
        PollStatus::Scheduled => {
            let opens = def.opens_at.map(|t| t.to_rfc3339()).unwrap_or_default();
            return Err(Problem::new(
                ProblemKind::PollNotOpen,
                format!("the poll opens at {opens}; ballots count from then on"),
            ));
        }
        PollStatus::Open => {}
    }
    let marked = mark(&Rules::from(&*def), &marking)?;
    let (key, voter) = identity(def.dedupe, addr, voter_id.as_deref(), idem.as_deref())?;
    let mut ballot = BallotRecord::new(poll_id, key, voter, marked, idem.clone());
    let receipt = ballot.issue_receipt();
    match s.store.cast(ballot.clone()).await? {
        CastOutcome::Accepted(b) => Ok((
            Ballot {
                receipt: Some(receipt),
                ..ballot_view(&b, &def)
            },
            false,
        )),
        CastOutcome::Duplicate(existing) => match duplicate(&existing, &ballot) {
            // The first answer again, with a new receipt in place of the first one: the client
            // retrying may never have received it.
            Duplicate::Retry => {
                let hash = BallotRecord::hash_receipt(&receipt);
                let reissued = s.store.reissue_receipt(&existing, &hash).await?;
                Ok((
                    Ballot {
                        receipt: reissued.then_some(receipt),
                        ..ballot_view(&existing, &def)
                    },
                    true,
                ))
            }
            Duplicate::KeyReused => Err(Problem::unprocessable(
                ProblemKind::IdempotencyKeyReused,
                "header.Idempotency-Key",
                "this Idempotency-Key was already used for a different ballot",
            )),
            Duplicate::AlreadyVoted => Err(Problem::new(
                ProblemKind::AlreadyVoted,
                "a ballot from this voter is already counted for this poll",
            )),
        },
    }
}

/// A ballot as counted, for its voter.
///
/// With the ballot's receipt as `Authorization: Bearer <receipt>`: the ballot's choices as they
/// are stored and counted. A wrong receipt and a ballot that does not exist get the same 404, so
/// that nobody learns which ballot ids exist.
#[utoipa::path(get, path = "/api/votes/{id}", tag = "votes",
    params(("id" = String, Path, description = "The ballot's id, as the answer that stored it gave it")),
    security(("receipt" = [])),
    responses(
    (status = 200, description = "The ballot as counted", body = Ballot),
    (status = 401, description = "No receipt (`Authorization: Bearer <receipt>`)", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No ballot with this id and this receipt", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or poll service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn get_vote(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Result<Json<Ballot>, Problem> {
    let receipt = receipt_of(&headers)?;
    let (ballot, def) = shown_ballot(&s, &id, receipt).await?;
    Ok(Json(ballot_view(&ballot, &def)))
}

/// The receipt a request shows (401 without one).
fn receipt_of(headers: &HeaderMap) -> Result<&str, Problem> {
    shared::http::bearer_token(headers)
        .ok_or_else(|| Problem::unauthorized("send the ballot's receipt as `Authorization: Bearer <receipt>`"))
}

fn ballot_not_found() -> Problem {
    Problem::not_found("there is no ballot with this id and this receipt")
}

/// The ballot `id` and its poll, if `receipt` is its receipt; the same 404 otherwise, whether or
/// not the ballot exists.
async fn shown_ballot(s: &AppState, id: &str, receipt: &str) -> Result<(BallotRecord, Arc<PollDefinition>), Problem> {
    // Ballot ids are UUIDs; anything else cannot exist (and is not looked up).
    if id.len() > 64 {
        return Err(ballot_not_found());
    }
    let ballot = s
        .store
        .ballot(id)
        .await?
        .filter(|b| b.has_receipt(receipt))
        .ok_or_else(ballot_not_found)?;
    // The poll is gone (its ballots are being purged): so is the ballot.
    let def = s.catalog.get(&ballot.poll_id).await?.ok_or_else(ballot_not_found)?;
    Ok((ballot, def))
}

/// Whether the poll lets its voters change their ballots now (409 otherwise).
fn check_changeable(def: &PollDefinition) -> Result<(), Problem> {
    if def.status_at(Utc::now()) != PollStatus::Open {
        return Err(Problem::new(
            ProblemKind::PollClosed,
            "the poll is closed: its ballots are final",
        ));
    }
    if def.changes == BallotChanges::Locked {
        return Err(Problem::new(
            ProblemKind::ChangesLocked,
            "this poll's ballots cannot be replaced or withdrawn (`changes: locked`)",
        ));
    }
    Ok(())
}

/// Replace a ballot's marks, as its voter.
///
/// With the ballot's receipt as `Authorization: Bearer <receipt>`, while the poll is open and
/// unless it locks changes (`changes: locked`). The body is a new ballot's marks, checked by the
/// poll's rules the same way; the ballot keeps its id and receipt, and is counted in its new
/// form only, at once. Concurrent replacements of one ballot apply one after the other: the last
/// one applied stands.
#[utoipa::path(put, path = "/api/votes/{id}", tag = "votes", request_body = ReplaceBallot,
    params(("id" = String, Path, description = "The ballot's id, as the answer that stored it gave it")),
    security(("receipt" = [])),
    responses(
    (status = 200, description = "The ballot as counted now", body = Ballot),
    (status = 400, description = "Malformed JSON or invalid fields, each named", body = ProblemBody, content_type = "application/problem+json"),
    (status = 401, description = "No receipt (`Authorization: Bearer <receipt>`)", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No ballot with this id and this receipt", body = ProblemBody, content_type = "application/problem+json"),
    (status = 409, description = "The poll is closed (`poll-closed`) or locks its ballots (`changes-locked`)", body = ProblemBody, content_type = "application/problem+json"),
    (status = 413, description = "Body too large", body = ProblemBody, content_type = "application/problem+json"),
    (status = 415, description = "Body is not JSON", body = ProblemBody, content_type = "application/problem+json"),
    (status = 422, description = "The marks break the poll's rules, named by field (as for a new ballot)", body = ProblemBody, content_type = "application/problem+json"),
    (status = 429, description = "Too many writes from this client", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or poll service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn replace_vote(
    State(s): St,
    Path(id): Path<String>,
    headers: HeaderMap,
    AppJson(body): AppJson<ReplaceBallot>,
) -> Result<Json<Ballot>, Problem> {
    let receipt = receipt_of(&headers)?;
    let mut errors = Vec::new();
    let marking = marking(body.option, body.options, body.ranking, body.scores, &mut errors);
    let (Some(marking), true) = (marking, errors.is_empty()) else {
        return Err(Problem::validation(errors));
    };
    let (ballot, def) = shown_ballot(&s, &id, receipt).await?;
    check_changeable(&def)?;
    let marked = mark(&Rules::from(&*def), &marking)?;
    match s.store.revise(&ballot, Revision::Replace(marked)).await? {
        Revised::Replaced(b) => {
            s.outcomes.get_or_create(&OutcomeLabels { outcome: "replaced" }).inc();
            Ok(Json(ballot_view(&b, &def)))
        }
        Revised::Withdrawn | Revised::Gone => Err(ballot_not_found()),
    }
}

/// Withdraw a ballot, as its voter.
///
/// With the ballot's receipt as `Authorization: Bearer <receipt>`, while the poll is open and
/// unless it locks changes (`changes: locked`). The ballot stops counting at once, its receipt
/// stops working, and its voter may vote again (a new ballot, with a new id and receipt).
#[utoipa::path(delete, path = "/api/votes/{id}", tag = "votes",
    params(("id" = String, Path, description = "The ballot's id, as the answer that stored it gave it")),
    security(("receipt" = [])),
    responses(
    (status = 204, description = "Withdrawn: it no longer counts"),
    (status = 401, description = "No receipt (`Authorization: Bearer <receipt>`)", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No ballot with this id and this receipt (or it was withdrawn already)", body = ProblemBody, content_type = "application/problem+json"),
    (status = 409, description = "The poll is closed (`poll-closed`) or locks its ballots (`changes-locked`)", body = ProblemBody, content_type = "application/problem+json"),
    (status = 429, description = "Too many writes from this client", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or poll service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
async fn withdraw_vote(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Result<StatusCode, Problem> {
    let receipt = receipt_of(&headers)?;
    let (ballot, def) = shown_ballot(&s, &id, receipt).await?;
    check_changeable(&def)?;
    match s.store.revise(&ballot, Revision::Withdraw).await? {
        Revised::Withdrawn => {
            s.outcomes.get_or_create(&OutcomeLabels { outcome: "withdrawn" }).inc();
            Ok(StatusCode::NO_CONTENT)
        }
        Revised::Replaced(_) | Revised::Gone => Err(ballot_not_found()),
    }
}

/// `?ids=a,b,…` of the internal endpoints: at most 200 poll ids.
fn poll_ids(list: &str) -> Result<Vec<String>, Problem> {
    let ids: Vec<String> = list
        .split(',')
        .map(|id| normalise_poll_id(id).ok_or_else(|| Problem::invalid("query.ids", "must be poll ids")))
        .collect::<Result<_, _>>()?;
    if ids.len() > MAX_TALLIES {
        return Err(Problem::invalid("query.ids", format!("at most {MAX_TALLIES} ids")));
    }
    Ok(ids)
}

/// The one marking shape a ballot gives (`None`, with the problem in `errors`, when it gives none,
/// several, or texts that cannot be options).
fn marking(
    option: Option<String>,
    options: Option<Vec<String>>,
    ranking: Option<Vec<String>>,
    scores: Option<Scores>,
    errors: &mut Vec<FieldError>,
) -> Option<Marking> {
    let given: Vec<&str> = [
        option.as_ref().map(|_| "option"),
        options.as_ref().map(|_| "options"),
        ranking.as_ref().map(|_| "ranking"),
        scores.as_ref().map(|_| "scores"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let marking = match (option, options, ranking, scores) {
        _ if given.len() > 1 => {
            let message = if given == ["option", "options"] {
                "give `option` or `options`, not both".to_owned()
            } else {
                format!("give one of `{}`, not several", given.join("`, `"))
            };
            errors.push(FieldError::new(given[1], message));
            return None;
        }
        (Some(o), ..) => Marking::Choice {
            texts: vec![o],
            single: true,
        },
        (_, Some(os), ..) if os.is_empty() => {
            errors.push(FieldError::new("options", "must name at least one option"));
            return None;
        }
        (_, Some(os), ..) => Marking::Choice {
            texts: os,
            single: false,
        },
        (_, _, Some(r), _) if r.is_empty() => {
            errors.push(FieldError::new("ranking", "must rank at least one option"));
            return None;
        }
        (_, _, Some(r), _) => Marking::Ranking(r),
        (.., Some(Scores(s))) => Marking::Scores(s),
        (None, None, None, None) => {
            errors.push(FieldError::new(
                "option",
                "give `option` or `options` (`ranking` for a ranked poll, `scores` for a score poll)",
            ));
            return None;
        }
    };
    let before = errors.len();
    let texts: Vec<(String, &str)> = match &marking {
        Marking::Choice { texts, single: true } => vec![("option".to_owned(), texts[0].as_str())],
        Marking::Choice { texts, single: false } => texts
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("options[{i}]"), t.as_str()))
            .collect(),
        Marking::Ranking(texts) => texts
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("ranking[{i}]"), t.as_str()))
            .collect(),
        Marking::Scores(given) => given.iter().map(|(t, _)| (format!("scores.{t}"), t.as_str())).collect(),
    };
    if texts.len() > MAX_OPTIONS {
        errors.push(FieldError::new(
            marking.field(),
            format!("at most {MAX_OPTIONS} options"),
        ));
    }
    for (field, text) in texts {
        let n = text.chars().count();
        if n == 0 || n > MAX_OPTION_LEN {
            errors.push(FieldError::new(
                field,
                format!("must be 1 to {MAX_OPTION_LEN} characters"),
            ));
        }
    }
    (errors.len() == before).then_some(marking)
}

/// Internal: tallies of several polls, and whether any of the given voter keys voted on each.
/// Answered from this service's store alone, in one read of the tallies and one of the ballots:
/// the query says which polls' ballots are keyed by voter (see [`TalliesQuery`]).
async fn tallies(State(s): St, AppQuery(q): AppQuery<TalliesQuery>) -> Result<Json<TalliesResponse>, Problem> {
    let ids = poll_ids(&q.ids)?;
    let keyed = q
        .keyed_by_voter(ids.len())
        .map_err(|msg| Problem::invalid("query.keyed", msg))?;
    let voters = q.voter_keys();
    let polls: Vec<(String, bool)> = ids.iter().cloned().zip(keyed).collect();
    let (counts, voted) = tokio::try_join!(s.store.tallies(&ids), s.store.voted(&polls, &voters))?;
    let tallies = ids
        .into_iter()
        .zip(counts.into_iter().zip(voted))
        .map(|(poll_id, (t, voted))| TallyView::new(poll_id, t, voted))
        .collect();
    Ok(Json(TalliesResponse { tallies }))
}

/// Internal: every stored ballot of the poll, as newline-delimited JSON ([`BallotLine`]) streamed
/// while the store reads them (the poll service's export). A failure midway aborts the body, so a
/// reader never takes a cut-off export for a whole one.
async fn export_ballots(State(s): St, Path(id): Path<String>) -> Result<Response, Problem> {
    use futures_util::StreamExt as _;
    let id = normalise_poll_id(&id).ok_or_else(|| Problem::invalid("id", "must be a poll id"))?;
    let store = s.store.clone();
    let poll_id = id.clone();
    let mut open = Box::pin(async move { store.ballots(&id).await });
    // Some servers compute a whole query before its first batch (SecantusDB: several seconds for a
    // million ballots), longer than a caller's deadline for the answer's head. A store that opens
    // quickly answers as usual (a failure is a problem with its status); a slow one gets its
    // answer now and the body waits for the first batch (a failure then aborts it, as midway).
    let ballots: BallotStream = match tokio::time::timeout(EXPORT_HEAD_WITHIN, &mut open).await {
        Ok(opened) => opened?,
        Err(_) => futures_util::stream::once(open)
            .map(|opened| opened.unwrap_or_else(|e| futures_util::stream::once(async move { Err(e) }).boxed()))
            .flatten()
            .boxed(),
    };
    // Lines already read go out together, one chunk per batch rather than per ballot.
    let body = ballots.ready_chunks(EXPORT_CHUNK).map(move |lines| {
        let mut buf = Vec::with_capacity(lines.len() * 96);
        for line in lines {
            match line {
                Ok(line) => {
                    serde_json::to_writer(&mut buf, &line).map_err(std::io::Error::other)?;
                    buf.push(b'\n');
                }
                Err(e) => {
                    tracing::warn!(poll_id = %poll_id, error = %shared::error::Chain(&e), "ballot export failed midway");
                    return Err(std::io::Error::other(e));
                }
            }
        }
        Ok::<_, std::io::Error>(axum::body::Bytes::from(buf))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, HeaderValue::from_static(NDJSON))],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// How long an export waits for the store's first batch before it answers (see [`export_ballots`]).
const EXPORT_HEAD_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
/// Ballots of an export written as one chunk, at most.
const EXPORT_CHUNK: usize = 512;
/// The media type of newline-delimited JSON.
pub const NDJSON: &str = "application/x-ndjson";

/// Internal: deletes a deleted poll's ballots.
async fn purge(State(s): St, Path(id): Path<String>) -> Result<StatusCode, Problem> {
    let id = normalise_poll_id(&id).ok_or_else(|| Problem::invalid("id", "must be a poll id"))?;
    let n = s.store.purge(&id).await?;
    tracing::info!(poll_id = %id, ballots = n, "ballots purged");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize)]
struct Audit {
    poll_id: String,
    /// The tally as maintained alongside the ballots.
    tally: Tally,
    /// The stored ballots, counted one by one.
    stored: Tally,
    consistent: bool,
}

impl Audit {
    fn new(poll_id: String, tally: Tally, stored: Tally) -> Self {
        let n = tally.by_option.len().max(stored.by_option.len());
        // Equal once trimmed: a store may keep no zero counts or sums at all.
        let consistent = tally.clone().trimmed() == stored.clone().trimmed();
        let (tally, stored) = (tally.padded(n), stored.padded(n));
        Self {
            consistent,
            poll_id,
            tally,
            stored,
        }
    }
}

/// Internal: the maintained tally next to a recount of the stored ballots (used by the load
/// benchmark and by operators to check invariant 3). Reads every ballot of the poll.
async fn audit(State(s): St, Path(id): Path<String>) -> Result<Json<Audit>, Problem> {
    let id = normalise_poll_id(&id).ok_or_else(|| Problem::invalid("id", "must be a poll id"))?;
    let tally = s.store.tally(&id).await?;
    let stored = s.store.recount(&id).await?;
    Ok(Json(Audit::new(id, tally, stored)))
}

/// Internal: makes the poll's kept tally equal to its stored ballots again (idempotent; for an
/// operator after a database failover, see the README). Answers what was checked and corrected.
async fn repair(State(s): St, Path(id): Path<String>) -> Result<Json<crate::store::Repair>, Problem> {
    let id = normalise_poll_id(&id).ok_or_else(|| Problem::invalid("id", "must be a poll id"))?;
    Ok(Json(s.store.repair(&id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepairQuery {
    /// RFC 3339; omitted: every poll with ballots.
    since: Option<String>,
}

#[derive(Debug, Serialize)]
struct Repairs {
    repairs: Vec<crate::store::Repair>,
}

/// Internal: [`repair`] of every poll whose tally may have changed since `?since=` (RFC 3339),
/// e.g. the start of a failover; of every poll with ballots without it.
async fn repair_since(State(s): St, AppQuery(q): AppQuery<RepairQuery>) -> Result<Json<Repairs>, Problem> {
    let since = q
        .since
        .as_deref()
        .map(|t| {
            DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| Problem::invalid("since", "must be an RFC 3339 time, e.g. 2026-11-29T22:00:00Z"))
        })
        .transpose()?;
    Ok(Json(Repairs {
        repairs: s.store.repair_since(since).await?,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    ids: String,
}

#[derive(Debug, Serialize)]
struct Audits {
    audits: Vec<Audit>,
}

/// Internal: [`audit`] of up to 200 polls (`?ids=a,b,...`), the ballots read in one pass.
async fn audit_many(State(s): St, AppQuery(q): AppQuery<AuditQuery>) -> Result<Json<Audits>, Problem> {
    let ids = poll_ids(&q.ids)?;
    let tallies = s.store.tallies(&ids).await?;
    let stored = s.store.recount_many(&ids).await?;
    let audits = ids
        .into_iter()
        .zip(tallies.into_iter().zip(stored))
        .map(|(id, (tally, stored))| Audit::new(id, tally, stored))
        .collect();
    Ok(Json(Audits { audits }))
}
