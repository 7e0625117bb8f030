//! Extractors whose rejections are the app's own problem documents, naming what was wrong.

use std::net::IpAddr;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{StatusCode, header, request::Parts};
use serde::de::DeserializeOwned;

use crate::problem::{FieldError, Problem, ProblemKind};

/// A JSON body. Rejections: 415 (not JSON), 413 (too large), 400 (malformed JSON, or a field of
/// the wrong type, unknown or missing, named in `errors`).
pub struct AppJson<T>(pub T);

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// Parses `bytes` as a JSON object into `T`, with errors naming the field. (serde would also
/// accept an array for a struct, by position; our bodies are objects only.)
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(b'[' | b'"' | b't' | b'f' | b'n' | b'-' | b'0'..=b'9') => {
            return Err(Problem::invalid("body", "must be a JSON object"));
        }
        _ => return Err(Problem::new(ProblemKind::MalformedJson, "the body is not valid JSON")),
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            Problem::new(
                ProblemKind::MalformedJson,
                format!(
                    "the body is not valid JSON ({} at line {} column {})",
                    inner_kind(&inner),
                    inner.line(),
                    inner.column()
                ),
            )
        } else {
            let field = if path == "." { "body".to_owned() } else { path };
            Problem::validation(vec![FieldError::new(field, strip_position(&inner.to_string()))])
        }
    })?;
    de.end().map_err(|e| {
        Problem::new(
            ProblemKind::MalformedJson,
            format!("unexpected data after the JSON value at column {}", e.column()),
        )
    })?;
    Ok(value)
}

fn inner_kind(e: &serde_json::Error) -> &'static str {
    if e.is_eof() {
        "unexpected end of input"
    } else {
        "syntax error"
    }
}

fn is_json(parts: &axum::http::HeaderMap) -> bool {
    let Some(ct) = parts.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AppJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(Problem::new(
                ProblemKind::UnsupportedMediaType,
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(ProblemKind::BodyTooLarge, "the request body is too large")
            } else {
                Problem::new(ProblemKind::UnreadableBody, "the request body could not be read")
            }
        })?;
        parse_json(&bytes).map(AppJson)
    }
}

/// Query parameters. Unknown parameters are ignored; invalid ones are named.
pub struct AppQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for AppQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(AppQuery).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "query".to_owned()
            } else {
                format!("query.{path}")
            };
            Problem::validation(vec![FieldError::new(field, e.into_inner().to_string())])
        })
    }
}

/// The client's address, resolved by the client-address middleware according to configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<ClientAddr>()
            .copied()
            .ok_or_else(|| Problem::internal("client address middleware is not installed"))
    }
}

/// The bearer token of the `Authorization` header, if any.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        options: Vec<String>,
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<Body>(br#"{"name": {"$gt": ""}, "options": []}"#).expect_err("map for string");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.errors[0].field, "name");
        assert!(e.errors[0].message.contains("expected a string"), "{:?}", e.errors);
        let e = parse_json::<Body>(br#"{"name": "x", "options": [], "votes": 5}"#).expect_err("unknown");
        assert!(e.errors[0].message.contains("unknown field `votes`"), "{:?}", e.errors);
        let e = parse_json::<Body>(br#"{"name": "x", "options": [1]}"#).expect_err("wrong item type");
        assert_eq!(e.errors[0].field, "options[0]");
        let e = parse_json::<Body>(br#"{"name": "x""#).expect_err("truncated");
        assert_eq!(e.kind, ProblemKind::MalformedJson);
        let e = parse_json::<Body>(br#"{"name": "x", "options": []} {}"#).expect_err("trailing");
        assert_eq!(e.kind, ProblemKind::MalformedJson);
        let e = parse_json::<Body>(br#"["x", []]"#).expect_err("array");
        assert_eq!(e.errors[0].field, "body");
        let e = parse_json::<Body>(b"").expect_err("empty");
        assert_eq!(e.kind, ProblemKind::MalformedJson);
        let e = parse_json::<Body>(br#"{"options": []}"#).expect_err("missing");
        assert!(e.errors[0].message.contains("missing field `name`"), "{:?}", e.errors);
    }

    #[test]
    fn bearer_tokens_are_parsed() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().expect("header"));
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(bearer_token(&h), None);
    }
}
