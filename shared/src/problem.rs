//! Errors as `application/problem+json` (RFC 9457). Every error response of both services is one
//! of these; 5xx bodies are generic while the cause goes to the log.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::Chain;
use crate::storage::StoreError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// One invalid input, named by its location (`name`, `options[2]`, `query.limit`, `body`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProblemBody {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    #[schema(example = "urn:pollvote:problem:validation")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Every invalid input, for validation problems.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// The kinds of problem both services answer with: each names its `type` URI's slug
/// (`urn:pollvote:problem:<slug>`) and its status (whose reason phrase is the title).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    /// 400: invalid fields, each named in `errors`.
    Validation,
    /// 400: the body is not valid JSON.
    MalformedJson,
    /// 400: the body could not be read.
    UnreadableBody,
    /// 401: a bearer token is needed (the response has `WWW-Authenticate: Bearer`).
    Unauthorized,
    /// 403: refused (not through the configured Front Door, a poll without admin token).
    Forbidden,
    /// 404.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 409: the poll is closed.
    PollClosed,
    /// 409: the poll has not opened yet (`opens_at` is in the future).
    PollNotOpen,
    /// 409: the poll has opened, so its opening time can no longer change.
    PollAlreadyOpen,
    /// 409: a ballot from this voter is already counted.
    AlreadyVoted,
    /// 409: the poll's ballots cannot be replaced or withdrawn (`changes: locked`).
    ChangesLocked,
    /// 409: options and dedupe cannot change once a vote exists.
    VotesExist,
    /// 409: the poll changed meanwhile.
    ConcurrentChange,
    /// 406: none of the representations `Accept` allows can be produced.
    NotAcceptable,
    /// 413.
    BodyTooLarge,
    /// 415: the body is not JSON.
    UnsupportedMediaType,
    /// 422: a chosen option is not one of the poll's.
    UnknownOption,
    /// 422: an option is chosen twice.
    DuplicateOption,
    /// 422: more choices than the poll allows.
    TooManyChoices,
    /// 422: fewer choices than the poll's `min_choices`.
    TooFewChoices,
    /// 422: a score outside the poll's 0 to `max_score`.
    ScoreOutOfRange,
    /// 422: the ballot's shape (`option`/`options`, `ranking`, `scores`) is not the poll's method's.
    WrongBallotShape,
    /// 422: an `Idempotency-Key` reused for a different ballot.
    IdempotencyKeyReused,
    /// 429 (with `Retry-After`).
    RateLimited,
    /// 500 with a generic body: the cause is logged, never sent.
    Internal,
    /// 503 (with `Retry-After`): a dependency is down or overloaded.
    Unavailable,
    /// Another 4xx status answered by a layer without a body of its own.
    ClientError(StatusCode),
}

impl ProblemKind {
    /// The last part of the `type` URI.
    pub fn slug(self) -> &'static str {
        match self {
            Self::Validation => "validation",
            Self::MalformedJson => "malformed-json",
            Self::UnreadableBody => "unreadable-body",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::PollClosed => "poll-closed",
            Self::PollNotOpen => "poll-not-open",
            Self::PollAlreadyOpen => "poll-already-open",
            Self::AlreadyVoted => "already-voted",
            Self::ChangesLocked => "changes-locked",
            Self::VotesExist => "votes-exist",
            Self::ConcurrentChange => "concurrent-change",
            Self::NotAcceptable => "not-acceptable",
            Self::BodyTooLarge => "body-too-large",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::UnknownOption => "unknown-option",
            Self::DuplicateOption => "duplicate-option",
            Self::TooManyChoices => "too-many-choices",
            Self::TooFewChoices => "too-few-choices",
            Self::ScoreOutOfRange => "score-out-of-range",
            Self::WrongBallotShape => "wrong-ballot-shape",
            Self::IdempotencyKeyReused => "idempotency-key-reused",
            Self::RateLimited => "rate-limited",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::ClientError(_) => "client-error",
        }
    }

    /// The `type` URI.
    pub fn uri(self) -> String {
        format!("urn:pollvote:problem:{}", self.slug())
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::Validation | Self::MalformedJson | Self::UnreadableBody => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PollClosed
            | Self::PollNotOpen
            | Self::PollAlreadyOpen
            | Self::AlreadyVoted
            | Self::ChangesLocked
            | Self::VotesExist
            | Self::ConcurrentChange => StatusCode::CONFLICT,
            Self::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::UnknownOption
            | Self::DuplicateOption
            | Self::TooManyChoices
            | Self::TooFewChoices
            | Self::ScoreOutOfRange
            | Self::WrongBallotShape
            | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::ClientError(status) => status,
        }
    }

    /// The status's reason phrase.
    pub fn title(self) -> &'static str {
        self.status().canonical_reason().unwrap_or("Error")
    }
}

/// An error response.
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: ProblemKind,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub retry_after: Option<Duration>,
    pub www_authenticate: bool,
}

impl Problem {
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
            www_authenticate: false,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// 400 with one entry per invalid field.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("{} fields are invalid", errors.len()),
        };
        Self {
            errors,
            ..Self::new(ProblemKind::Validation, detail)
        }
    }

    /// 400 for one invalid field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError::new(field, message)])
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::NotFound, detail)
    }

    /// A problem of `kind` (422) about one field.
    pub fn unprocessable(kind: ProblemKind, field: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        Self {
            errors: vec![FieldError::new(field, detail.clone())],
            ..Self::new(kind, detail)
        }
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self {
            www_authenticate: true,
            ..Self::new(ProblemKind::Unauthorized, detail)
        }
    }

    pub fn too_many_requests(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                ProblemKind::RateLimited,
                "too many writes from this client; retry later",
            )
        }
    }

    /// 503 with `Retry-After`: a dependency is down or overloaded.
    pub fn unavailable(detail: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(ProblemKind::Unavailable, detail)
        }
    }

    /// 500 with a generic body. The cause (an error value, or a message when there is none) is
    /// logged here with its sources, once: callers do not log it too.
    pub fn internal(cause: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        let cause = cause.into();
        tracing::error!(error = %Chain(&*cause), "internal error");
        Self::opaque_internal()
    }

    /// The 500 itself, logging nothing.
    fn opaque_internal() -> Self {
        Self::new(ProblemKind::Internal, "the server failed to handle the request")
    }

    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            kind: self.kind.uri(),
            title: self.kind.title().to_owned(),
            status: self.status().as_u16(),
            detail: self.detail.clone(),
            errors: self.errors.clone(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut res = (self.status(), body).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(d) = self.retry_after {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if self.www_authenticate {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Unavailable { message, retry_after } => {
                tracing::warn!(error = %message, "database unavailable");
                Problem::unavailable("the database is unavailable; retry later", *retry_after)
            }
            StoreError::CredentialsRejected { message } => {
                tracing::warn!(error = %message, "the database refused the credentials");
                Problem::unavailable("the database is unavailable; retry later", Duration::from_secs(1))
            }
            StoreError::Internal(_) => {
                tracing::error!(error = %Chain(&e), "storage failure");
                Problem::opaque_internal()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_failure_is_an_opaque_500() {
        let p = Problem::from(StoreError::internal("cannot reach mongodb://user:hunter2@db"));
        let body = serde_json::to_string(&p.body()).expect("json");
        assert_eq!(
            body,
            r#"{"type":"urn:pollvote:problem:internal","title":"Internal Server Error","status":500,"detail":"the server failed to handle the request"}"#
        );
    }

    #[test]
    fn the_kind_gives_type_title_and_status() {
        for (kind, slug, status, title) in [
            (ProblemKind::Validation, "validation", 400, "Bad Request"),
            (ProblemKind::AlreadyVoted, "already-voted", 409, "Conflict"),
            (
                ProblemKind::IdempotencyKeyReused,
                "idempotency-key-reused",
                422,
                "Unprocessable Entity",
            ),
            (ProblemKind::Unavailable, "unavailable", 503, "Service Unavailable"),
            (
                ProblemKind::ClientError(StatusCode::IM_A_TEAPOT),
                "client-error",
                418,
                "I'm a teapot",
            ),
        ] {
            let body = Problem::new(kind, "d").body();
            assert_eq!(body.kind, format!("urn:pollvote:problem:{slug}"));
            assert_eq!((body.status, body.title.as_str()), (status, title), "{slug}");
        }
    }
}
