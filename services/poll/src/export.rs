//! Exports: a poll's results as CSV (`GET /api/polls/{id}/results.csv`, the numbers of its JSON
//! under the same visibility rules), and every ballot for the admin (`GET /api/polls/{id}/ballots`,
//! CSV or newline-delimited JSON by `Accept`), streamed from the vote service line by line so that
//! memory stays bounded for any number of ballots.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde::Serialize;
use shared::Problem;
use shared::contract::VotingMethod;
use shared::http::ClientAddr;
use shared::internal::BallotLine;
use shared::problem::{ProblemBody, ProblemKind};
use utoipa::ToSchema;

use crate::access::{authorize, parse_id};
use crate::api::{caller_view, load, snapshot};
use crate::model::{PollIdPath, Votes};
use crate::state::St;
use crate::votes::Viewer;

/// `text/csv` with a header row (RFC 4180, RFC 7111's `header` parameter).
const CSV: &str = "text/csv; charset=utf-8; header=present";
/// Newline-delimited JSON: one JSON object per line.
const NDJSON: &str = "application/x-ndjson";
/// Longest line of the vote service's export read (a ballot line is ~100 bytes plus its choices).
const MAX_LINE: usize = 64 * 1024;

/// The poll's results as CSV: one row per option, in option order, with the poll's ballots.
#[utoipa::path(get, path = "/api/polls/{id}/results.csv", tag = "polls", params(PollIdPath), responses(
    (status = 200, description = "The JSON's numbers. `choice` polls: `option,count,ballots`, one row per option in option order (`count` as in `votes.by_option`, `ballots` is `votes.count`). `score` polls: `option,count,sum,mean,ballots`. `ranked` polls: `round,option,votes,exhausted,outcome,ballots`, a row per instant-runoff round and option in the running (`outcome`: `eliminated` or `elected` in the round that decided it)",
        content_type = "text/csv", body = String),
    (status = 400, description = "Malformed id", body = ProblemBody, content_type = "application/problem+json"),
    (status = 403, description = "The poll's `results` setting hides its counts from this caller", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No such poll", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or vote service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
pub async fn results_csv(
    State(s): St,
    Path(id): Path<String>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let snap = snapshot(&s, &id).await?;
    let admin = crate::access::is_admin(&snap.poll, &headers);
    let view = caller_view(&s, &snap, admin, || Viewer::new(addr, &headers, None)).await?;
    let Some(votes) = view.votes else {
        return Err(Problem::new(
            ProblemKind::Forbidden,
            format!(
                "the counts of this poll are hidden from you (its results setting is `{}`)",
                serde_json::to_value(snap.poll.results)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
        ));
    };
    let body = results_table(snap.poll.method, &votes).map_err(Problem::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(CSV)),
            (header::CACHE_CONTROL, HeaderValue::from_static("private, no-store")),
            (
                header::CONTENT_DISPOSITION,
                attachment(&format!("poll-{}-results.csv", snap.poll.id)),
            ),
        ],
        body,
    )
        .into_response())
}

/// The results as CSV, by the poll's method: `option,count,ballots` (`choice`),
/// `option,count,sum,mean,ballots` (`score`), or per instant-runoff round and option in the
/// running `round,option,votes,exhausted,outcome,ballots` (`ranked`; `outcome` is `eliminated`
/// or `elected` on the option's row of the round that decided it).
fn results_table(method: VotingMethod, votes: &Votes) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let ballots = votes.count.to_string();
    if let (VotingMethod::Ranked, Some(ranked)) = (method, &votes.ranked) {
        w.write_record(["round", "option", "votes", "exhausted", "outcome", "ballots"])?;
        let last = ranked.rounds.len();
        for (i, r) in ranked.rounds.iter().enumerate() {
            let (round, exhausted) = (r.round.to_string(), r.exhausted.to_string());
            for c in &r.counts {
                let outcome = if r.eliminated.as_deref() == Some(c.option.as_str()) {
                    "eliminated"
                } else if i + 1 == last && ranked.winner.as_deref() == Some(c.option.as_str()) {
                    "elected"
                } else {
                    ""
                };
                w.write_record([
                    &round,
                    c.option.as_str(),
                    &c.votes.to_string(),
                    &exhausted,
                    outcome,
                    &ballots,
                ])?;
            }
        }
    } else if method == VotingMethod::Score {
        w.write_record(["option", "count", "sum", "mean", "ballots"])?;
        for o in &votes.by_option {
            let sum = o.sum.unwrap_or(0).to_string();
            let mean = o.mean.unwrap_or(0.0).to_string();
            w.write_record([o.option.as_str(), &o.count.to_string(), &sum, &mean, &ballots])?;
        }
    } else {
        w.write_record(["option", "count", "ballots"])?;
        for o in &votes.by_option {
            w.write_record([o.option.as_str(), &o.count.to_string(), &ballots])?;
        }
    }
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

fn attachment(filename: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("attachment; filename=\"{filename}\""))
        .unwrap_or(HeaderValue::from_static("attachment"))
}

/// One ballot of the NDJSON export.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExportedBallot {
    pub id: String,
    pub created_at: DateTime<Utc>,
    /// The options' texts the ballot counts for, in option order: the chosen ones (`choice`
    /// polls), the first preference (`ranked`), the ones scored above 0 (`score`).
    pub choices: Vec<String>,
    /// `ranked` polls: the ranking, best first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranking: Option<Vec<String>>,
    /// `score` polls: every option's score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scores: Option<BTreeMap<String, u32>>,
}

/// Every ballot of the poll, for its admin: `id`, `created_at` and the choices — never a voter's
/// identity, key or address. CSV (`Accept: text/csv`: a column per option, `1` where chosen) or
/// newline-delimited JSON (`application/x-ndjson`, the default), streamed while it is read.
#[utoipa::path(get, path = "/api/polls/{id}/ballots", tag = "polls", params(PollIdPath),
    security(("admin_token" = [])),
    responses(
    (status = 200, description = "Every ballot, streamed: one line each. CSV: `id,created_at,<option 1>,…,<option n>` with, per option, `1`/`0` chosen or not (`choice` polls), the rank (1 = best; empty: unranked; `ranked`), the score (`score`). NDJSON: one `ExportedBallot` object per line. A failure midway aborts the response, so a cut-off export is never mistaken for a whole one",
        content(
            (String = "text/csv"),
            (ExportedBallot = "application/x-ndjson"),
        )),
    (status = 400, description = "Malformed id", body = ProblemBody, content_type = "application/problem+json"),
    (status = 401, description = "Missing or wrong admin token", body = ProblemBody, content_type = "application/problem+json"),
    (status = 403, description = "The poll has no admin token", body = ProblemBody, content_type = "application/problem+json"),
    (status = 404, description = "No such poll", body = ProblemBody, content_type = "application/problem+json"),
    (status = 406, description = "`Accept` allows neither `text/csv` nor `application/x-ndjson`", body = ProblemBody, content_type = "application/problem+json"),
    (status = 503, description = "Database or vote service unavailable", body = ProblemBody, content_type = "application/problem+json"),
))]
pub async fn export_ballots(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, Problem> {
    let id = parse_id(&id)?;
    let poll = load(&s.store, &id).await?;
    authorize(&poll, &headers)?;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = negotiate(accept).ok_or_else(|| {
        Problem::new(
            ProblemKind::NotAcceptable,
            "header.Accept: the export is text/csv or application/x-ndjson",
        )
    })?;
    let lines = s.votes.ballots(&poll.id).await?;
    let options = poll.options.clone();
    let (content_type, extension) = match format {
        Format::Csv => (CSV, "csv"),
        Format::Ndjson => (NDJSON, "ndjson"),
    };
    let header_row = match format {
        Format::Csv => csv_row(
            ["id", "created_at"]
                .into_iter()
                .chain(options.iter().map(String::as_str)),
        ),
        Format::Ndjson => Ok(Vec::new()),
    }
    .map_err(Problem::internal)?;
    let poll_id = poll.id.clone();
    let rows = frames(lines).map(move |line| {
        let line = line?;
        let ballot: BallotLine = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        render(format, &ballot, &options).map_err(std::io::Error::other)
    });
    let body = futures_util::stream::once(async move { Ok(Bytes::from(header_row)) })
        .chain(rows.ready_chunks(256).map(|chunk| {
            let mut buf = Vec::new();
            for row in chunk {
                buf.extend_from_slice(&row?);
            }
            Ok::<_, std::io::Error>(Bytes::from(buf))
        }))
        .inspect_err(move |e| tracing::warn!(poll_id = %poll_id, error = %e, "ballot export failed midway"));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("private, no-store")),
            (
                header::CONTENT_DISPOSITION,
                attachment(&format!("poll-{id}-ballots.{extension}")),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Ndjson,
}

/// The export format `Accept` prefers (RFC 9110 §12.5.1: the highest `q`, then the most specific
/// range, then the order given); NDJSON when any is acceptable or `Accept` is absent; `None` when
/// neither is acceptable.
fn negotiate(accept: Option<&str>) -> Option<Format> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Some(Format::Ndjson);
    };
    // For each format, the quality of the most specific range that matches it.
    let mut best: [(Format, f32, u8); 2] = [(Format::Ndjson, -1.0, 0), (Format::Csv, -1.0, 0)];
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        for (format, quality, specificity) in &mut best {
            let (kind, sub) = match format {
                Format::Csv => ("text", "csv"),
                Format::Ndjson => ("application", "x-ndjson"),
            };
            let s = match media.split_once('/') {
                Some((k, s)) if k == kind && (s == sub || (*format == Format::Ndjson && s == "ndjson")) => 3,
                Some((k, "*")) if k == kind => 2,
                Some(("*", "*")) => 1,
                _ => 0,
            };
            if s > *specificity {
                (*quality, *specificity) = (q, s);
            }
        }
    }
    // Ties go to the range given first... which, for one range matching both (`*/*`), is NDJSON.
    best.into_iter()
        .filter(|(_, q, s)| *s > 0 && *q > 0.0)
        .fold(None, |acc: Option<(Format, f32)>, (f, q, _)| match acc {
            Some((_, best_q)) if best_q >= q => acc,
            _ => Some((f, q)),
        })
        .map(|(f, _)| f)
}

fn csv_row<'a>(fields: impl IntoIterator<Item = &'a str>) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(fields)?;
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

/// One ballot as a line of the export.
fn render(format: Format, b: &BallotLine, options: &[String]) -> Result<Vec<u8>, String> {
    let indices = b.choices.iter().chain(b.ranking.iter().flatten());
    if let Some(bad) = indices.clone().find(|&&c| c as usize >= options.len()) {
        return Err(format!(
            "ballot {} marks option {bad}, which the poll does not have",
            b.id
        ));
    }
    if b.scores.as_ref().is_some_and(|s| s.len() > options.len()) {
        return Err(format!("ballot {} scores more options than the poll has", b.id));
    }
    let texts = |v: &[u32]| -> Vec<String> { v.iter().map(|&c| options[c as usize].clone()).collect() };
    match format {
        Format::Ndjson => {
            let line = ExportedBallot {
                id: b.id.clone(),
                created_at: b.created_at,
                choices: texts(&b.choices),
                ranking: b.ranking.as_deref().map(texts),
                scores: b
                    .scores
                    .as_ref()
                    .map(|s| options.iter().cloned().zip(s.iter().copied()).collect()),
            };
            let mut buf = serde_json::to_vec(&line).map_err(|e| e.to_string())?;
            buf.push(b'\n');
            Ok(buf)
        }
        Format::Csv => {
            // A column per option: `1`/`0` chosen or not; the rank (1 = best, empty = unranked);
            // the score.
            let marks: Vec<String> = if let Some(ranking) = &b.ranking {
                let mut m = vec![String::new(); options.len()];
                for (rank, &c) in (1u32..).zip(ranking) {
                    m[c as usize] = rank.to_string();
                }
                m
            } else if let Some(scores) = &b.scores {
                let mut m = vec!["0".to_owned(); options.len()];
                for (i, s) in scores.iter().enumerate() {
                    m[i] = s.to_string();
                }
                m
            } else {
                let mut m = vec!["0".to_owned(); options.len()];
                for &c in &b.choices {
                    m[c as usize] = "1".to_owned();
                }
                m
            };
            let created = b.created_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            csv_row(
                [b.id.as_str(), created.as_str()]
                    .into_iter()
                    .chain(marks.iter().map(String::as_str)),
            )
            .map_err(|e| e.to_string())
        }
    }
}

/// The lines of a newline-delimited body, without their ends; an error (or a line too long) ends
/// the stream with that error.
fn frames(
    body: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> impl Stream<Item = Result<String, std::io::Error>> + Send + 'static {
    use tokio_util::codec::{FramedRead, LinesCodec};
    FramedRead::new(
        tokio_util::io::StreamReader::new(body),
        LinesCodec::new_with_max_length(MAX_LINE),
    )
    .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_format_by_quality_then_specificity() {
        assert_eq!(negotiate(None), Some(Format::Ndjson));
        assert_eq!(negotiate(Some("*/*")), Some(Format::Ndjson));
        assert_eq!(negotiate(Some("text/csv")), Some(Format::Csv));
        assert_eq!(negotiate(Some("text/*")), Some(Format::Csv));
        assert_eq!(negotiate(Some("application/x-ndjson")), Some(Format::Ndjson));
        assert_eq!(negotiate(Some("application/ndjson")), Some(Format::Ndjson));
        assert_eq!(
            negotiate(Some("application/x-ndjson;q=0.5, text/csv")),
            Some(Format::Csv)
        );
        assert_eq!(negotiate(Some("text/csv;q=0.2, */*;q=0.9")), Some(Format::Ndjson));
        assert_eq!(
            negotiate(Some("*/*, text/csv;q=0")),
            Some(Format::Ndjson),
            "csv refused"
        );
        assert_eq!(negotiate(Some("text/html, application/xml")), None);
        assert_eq!(negotiate(Some("application/json")), None);
    }

    #[test]
    fn a_csv_row_marks_the_chosen_options_and_escapes_their_texts() {
        let options = vec!["plain".to_owned(), "with, comma".to_owned(), "say \"hi\"".to_owned()];
        let header = csv_row(
            ["id", "created_at"]
                .into_iter()
                .chain(options.iter().map(String::as_str)),
        )
        .expect("csv");
        assert_eq!(
            String::from_utf8(header).expect("utf-8"),
            "id,created_at,plain,\"with, comma\",\"say \"\"hi\"\"\"\n"
        );
        let b = BallotLine {
            id: "b1".into(),
            created_at: "2026-11-30T06:00:00.5Z".parse().expect("time"),
            choices: vec![0, 2],
            ranking: None,
            scores: None,
        };
        let row = render(Format::Csv, &b, &options).expect("row");
        assert_eq!(
            String::from_utf8(row).expect("utf-8"),
            "b1,2026-11-30T06:00:00.500Z,1,0,1\n"
        );
        let line = render(Format::Ndjson, &b, &options).expect("line");
        let v: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["choices"], serde_json::json!(["plain", "say \"hi\""]));
        assert!(
            render(
                Format::Csv,
                &BallotLine {
                    choices: vec![3],
                    ..b.clone()
                },
                &options
            )
            .is_err()
        );

        let ranked = BallotLine {
            choices: vec![2],
            ranking: Some(vec![2, 0]),
            ..b.clone()
        };
        let row = String::from_utf8(render(Format::Csv, &ranked, &options).expect("row")).expect("utf-8");
        assert_eq!(row, "b1,2026-11-30T06:00:00.500Z,2,,1\n", "ranks, empty where unranked");
        let v: serde_json::Value =
            serde_json::from_slice(&render(Format::Ndjson, &ranked, &options).expect("line")).expect("json");
        assert_eq!(v["ranking"], serde_json::json!(["say \"hi\"", "plain"]));
        assert!(
            render(
                Format::Csv,
                &BallotLine {
                    ranking: Some(vec![0, 7]),
                    ..ranked
                },
                &options
            )
            .is_err(),
            "a ranking beyond the options"
        );

        let scored = BallotLine {
            choices: vec![1],
            scores: Some(vec![0, 4, 0]),
            ..b
        };
        let row = String::from_utf8(render(Format::Csv, &scored, &options).expect("row")).expect("utf-8");
        assert_eq!(row, "b1,2026-11-30T06:00:00.500Z,0,4,0\n");
        let v: serde_json::Value =
            serde_json::from_slice(&render(Format::Ndjson, &scored, &options).expect("line")).expect("json");
        assert_eq!(
            v["scores"],
            serde_json::json!({"plain": 0, "with, comma": 4, "say \"hi\"": 0})
        );
    }
}
