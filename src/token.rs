//! Resume tokens: parsing from operators' input, the cluster time they encode, conversion to the driver's type.

use bson::{Bson, Document, Timestamp};
use mongodb::change_stream::event::ResumeToken;

/// Why a token or start time given by an operator is unusable.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    /// Neither extended JSON `{"_data": …}` nor a bare hex string.
    #[error("resume token must be JSON like {{\"_data\":\"8263…\"}} or a bare hex string")]
    BadToken,
    /// Neither RFC 3339 nor `t:i`.
    #[error("start time must be RFC 3339 (2026-11-23T09:00:00Z) or a cluster timestamp t:i (1763888400:1)")]
    BadTime,
}

/// Where a stream should start.
#[derive(Debug, Clone, PartialEq)]
pub enum StartAt {
    /// After this token (`resumeAfter`, or `startAfter` when the token may be an invalidate).
    Token(Document),
    /// At this cluster time (`startAtOperationTime`).
    Time(Timestamp),
    /// From the current end of the oplog.
    Now,
}

/// Parses `--resume-token`: `{"_data":"…"}` (extended JSON) or the bare hex `_data`.
pub fn parse_token(input: &str) -> Result<Document, TokenError> {
    let input = input.trim();
    if input.starts_with('{') {
        let json: serde_json::Value =
            serde_json::from_str(input).map_err(|_| TokenError::BadToken)?;
        return match Bson::try_from(json) {
            Ok(Bson::Document(d)) if d.get_str("_data").is_ok_and(is_hex) => Ok(d),
            _ => Err(TokenError::BadToken),
        };
    }
    if is_hex(input) {
        let mut d = Document::new();
        d.insert("_data", input.to_ascii_uppercase());
        return Ok(d);
    }
    Err(TokenError::BadToken)
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.len() <= 4096 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses `--start-at`: RFC 3339 or `t:i`.
pub(crate) fn parse_start_at(input: &str) -> Result<Timestamp, TokenError> {
    let input = input.trim();
    if let Some((t, i)) = input
        .split_once(':')
        .filter(|(t, _)| t.bytes().all(|b| b.is_ascii_digit()))
    {
        let time = t.parse::<u32>().map_err(|_| TokenError::BadTime)?;
        let increment = i.parse::<u32>().map_err(|_| TokenError::BadTime)?;
        return Ok(Timestamp { time, increment });
    }
    let dt = time::OffsetDateTime::parse(input, &time::format_description::well_known::Rfc3339)
        .map_err(|_| TokenError::BadTime)?;
    let secs = u32::try_from(dt.unix_timestamp()).map_err(|_| TokenError::BadTime)?;
    Ok(Timestamp {
        time: secs,
        increment: 0,
    })
}

/// The cluster time a token encodes, when it is in the KeyString v1 form that
/// mongod (and mongo-sim) use: `82` then the timestamp as 8 big-endian bytes. For
/// operators only (`token show` of an older checkpoint): ids and order never rely on it.
pub fn cluster_time(data_hex: &str) -> Option<Timestamp> {
    if !data_hex.get(..2)?.eq_ignore_ascii_case("82") {
        return None;
    }
    let t = u32::from_str_radix(data_hex.get(2..10)?, 16).ok()?;
    let i = u32::from_str_radix(data_hex.get(10..18)?, 16).ok()?;
    Some(Timestamp {
        time: t,
        increment: i,
    })
}

/// Driver token → plain document.
pub fn to_document(token: &ResumeToken) -> Option<Document> {
    match bson::to_bson(token) {
        Ok(Bson::Document(d)) => Some(d),
        _ => None,
    }
}

/// Plain document → driver token.
pub fn from_document(doc: &Document) -> Option<ResumeToken> {
    bson::from_bson(Bson::Document(doc.clone())).ok()
}

/// Renders a cluster timestamp as RFC 3339 plus `t:i`, for operators.
pub fn describe_time(ts: Timestamp) -> String {
    let when = time::OffsetDateTime::from_unix_timestamp(i64::from(ts.time))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "?".into());
    format!("{when} ({}:{})", ts.time, ts.increment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_token_forms() {
        let hex = "8265F0A1B2000000012B0429296E1404";
        let a = parse_token(&format!("{{\"_data\":\"{hex}\"}}")).unwrap();
        let b = parse_token(&hex.to_ascii_lowercase()).unwrap();
        assert_eq!(a.get_str("_data").unwrap(), hex);
        assert_eq!(b.get_str("_data").unwrap(), hex);
        for bad in [
            "",
            "{}",
            "{\"_data\":5}",
            "zz",
            "{\"_data\":\"xyz\"}",
            "[1]",
        ] {
            assert_eq!(parse_token(bad), Err(TokenError::BadToken), "{bad}");
        }
    }

    #[test]
    fn parses_start_times() {
        assert_eq!(
            parse_start_at("1763888400:7").unwrap(),
            Timestamp {
                time: 1763888400,
                increment: 7
            }
        );
        assert_eq!(
            parse_start_at("2025-11-23T09:00:00Z").unwrap().time,
            1763888400
        );
        for bad in ["", "yesterday", "1:x", "-1:0", "99999999999:0"] {
            assert!(parse_start_at(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decodes_cluster_time() {
        let ts = cluster_time("8265F0A1B2000000012B02").unwrap();
        assert_eq!(
            ts,
            Timestamp {
                time: 0x65F0A1B2,
                increment: 1
            }
        );
        assert_eq!(cluster_time("00"), None);
        assert_eq!(cluster_time("82ZZ"), None);
    }

    #[test]
    fn driver_token_round_trip() {
        let d = parse_token("8265F0A1B2000000012B").unwrap();
        let t = from_document(&d).unwrap();
        assert_eq!(to_document(&t).unwrap(), d);
    }
}
