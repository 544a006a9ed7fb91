//! The native JSON protocol at `/ws`: client message parsing, server message encoding, close codes; pure.

use crate::payload::write_str;
use serde::Deserialize;
use serde_json::json;

use crate::hub::{Body, Message};

/// Close codes (docs/PROTOCOL.md). 4000–4499: reconnect; 4500–4999: do not retry with this token.
pub(crate) mod close {
    /// Server shutting down: reconnect (elsewhere).
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// Protocol error (RFC 6455), e.g. an unmasked client frame.
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8 (RFC 6455).
    pub(crate) const INVALID_DATA: u16 = 1007;
    /// Message too big (RFC 6455).
    pub(crate) const TOO_BIG: u16 = 1009;
    /// The client fell behind its bounded queue.
    pub(crate) const SLOW_CONSUMER: u16 = 4000;
    /// The peer stopped answering pings.
    pub(crate) const PING_TIMEOUT: u16 = 4001;
    /// The client kept exceeding its message rate.
    pub(crate) const RATE_LIMITED: u16 = 4002;
    /// Too many connections (in total or for this subject): retry later.
    pub(crate) const OVERLOADED: u16 = 4003;
    /// The token is invalid: do not retry with it.
    pub(crate) const AUTH_FAILED: u16 = 4500;
    /// The token expired and no fresh one came in time.
    pub(crate) const TOKEN_EXPIRED: u16 = 4501;
    /// No `auth` message arrived within the deadline.
    pub(crate) const AUTH_TIMEOUT: u16 = 4502;
}

/// A parsed client message.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    /// `{"type":"auth","token":…,"since":…?}`
    Auth {
        /// The JWT.
        token: String,
        /// Recover auto-joined rooms after this event id.
        since: Option<String>,
    },
    /// `{"type":"subscribe","room":…,"since":…?}`
    Subscribe {
        /// Room name.
        room: String,
        /// Last event id seen in this room.
        since: Option<String>,
    },
    /// `{"type":"unsubscribe","room":…}`
    Unsubscribe {
        /// Room name.
        room: String,
    },
    /// `{"type":"ping"}`
    Ping,
}

/// Why a client message was refused; `code()` is the wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or not an object.
    #[error("message is not a JSON object")]
    BadJson,
    /// No string `type`.
    #[error("message has no string field \"type\"")]
    MissingType,
    /// A `type` this server does not know.
    #[error("unknown message type")]
    UnknownType,
    /// A required field is missing or has the wrong type.
    #[error("invalid fields for this message type: {0}")]
    BadFields(String),
}

impl ParseError {
    /// The `code` sent in the error message.
    pub fn code(&self) -> &'static str {
        match self {
            ParseError::BadJson => "bad_json",
            ParseError::MissingType => "bad_request",
            ParseError::UnknownType => "unknown_type",
            ParseError::BadFields(_) => "bad_request",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFields {
    #[serde(rename = "type")]
    _t: String,
    token: String,
    #[serde(default)]
    since: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeFields {
    #[serde(rename = "type")]
    _t: String,
    room: String,
    #[serde(default)]
    since: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeFields {
    #[serde(rename = "type")]
    _t: String,
    room: String,
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<ClientMsg, ParseError> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| ParseError::BadJson)?;
    let obj = v.as_object().ok_or(ParseError::BadJson)?;
    let ty = obj
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or(ParseError::MissingType)?;
    let bad = |e: serde_json::Error| ParseError::BadFields(e.to_string());
    match ty {
        "auth" => {
            let f: AuthFields = serde_json::from_value(v).map_err(bad)?;
            Ok(ClientMsg::Auth {
                token: f.token,
                since: f.since,
            })
        }
        "subscribe" => {
            let f: SubscribeFields = serde_json::from_value(v).map_err(bad)?;
            Ok(ClientMsg::Subscribe {
                room: f.room,
                since: f.since,
            })
        }
        "unsubscribe" => {
            let f: UnsubscribeFields = serde_json::from_value(v).map_err(bad)?;
            Ok(ClientMsg::Unsubscribe { room: f.room })
        }
        "ping" => Ok(ClientMsg::Ping),
        _ => Err(ParseError::UnknownType),
    }
}

/// `{"type":"event",…}` or `{"type":"resync",…}` for a hub message, encoded once and shared.
pub fn encode_message(m: &Message) -> String {
    let room = m.room().as_str();
    let s = match m.body() {
        Body::Event {
            name, ts_ms, data, ..
        } => {
            // Written into one buffer of the right size: encoding is once per message
            // and room, but it is on every change's path.
            let id = m.wire_id();
            let data = data.as_str();
            // 96: the fixed text is 59 bytes and the time up to 20 digits; 64 made
            // every frame grow (a second allocation and a copy of the payload).
            let mut s = String::with_capacity(96 + id.len() + name.len() + room.len() + data.len());
            s.push_str("{\"type\":\"event\",\"id\":");
            write_str(&mut s, id);
            s.push_str(",\"event\":");
            write_str(&mut s, name);
            s.push_str(",\"room\":");
            write_str(&mut s, room);
            s.push_str(",\"ts\":");
            s.push_str(itoa::Buffer::new().format(*ts_ms));
            s.push_str(",\"data\":");
            s.push_str(data);
            s.push('}');
            s
        }
        Body::Resync { reason } => {
            json!({"type": "resync", "room": room, "reason": &**reason}).to_string()
        }
    };
    s
}

/// `{"type":"welcome",…}`; `position` is the `since` to use before any event has arrived.
pub(crate) fn welcome(
    session: u64,
    rooms: &[String],
    subject: Option<&str>,
    position: Option<&str>,
) -> String {
    json!({"type": "welcome", "session": session, "subject": subject, "rooms": rooms, "position": position}).to_string()
}

/// `{"type":"subscribed",…}`; `position` as in [`welcome`], for this room.
pub(crate) fn subscribed(room: &str, recovered: bool, position: Option<&str>) -> String {
    json!({"type": "subscribed", "room": room, "recovered": recovered, "position": position})
        .to_string()
}

/// `{"type":"position","position":…}`: the current position, sent to an idle client once
/// every event up to it has been delivered; the client uses the most recent of this and
/// its last event's id as `since`.
pub(crate) fn position(wire: &str) -> String {
    json!({"type": "position", "position": wire}).to_string()
}

/// `{"type":"unsubscribed",…}`.
pub(crate) fn unsubscribed(room: &str) -> String {
    json!({"type": "unsubscribed", "room": room}).to_string()
}

/// `{"type":"unsubscribed","room":…,"reason":…}`: the server left the room for the client
/// (`ownership_changed`: the order moved to other owners; nothing of it is delivered after).
pub(crate) fn unsubscribed_because(room: &str, reason: &str) -> String {
    json!({"type": "unsubscribed", "room": room, "reason": reason}).to_string()
}

/// `{"type":"resync",…}` for one room (recovery could not reach back).
pub(crate) fn resync(room: &str, reason: &str) -> String {
    json!({"type": "resync", "room": room, "reason": reason}).to_string()
}

/// `{"type":"error",…}`.
pub(crate) fn error(code: &str, message: &str, room: Option<&str>) -> String {
    match room {
        Some(r) => json!({"type": "error", "code": code, "message": message, "room": r}),
        None => json!({"type": "error", "code": code, "message": message}),
    }
    .to_string()
}

/// `{"type":"pong"}`.
pub(crate) fn pong() -> &'static str {
    "{\"type\":\"pong\"}"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_message() {
        assert_eq!(
            parse(r#"{"type":"auth","token":"t"}"#),
            Ok(ClientMsg::Auth {
                token: "t".into(),
                since: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","room":"order:1","since":"82AB"}"#),
            Ok(ClientMsg::Subscribe {
                room: "order:1".into(),
                since: Some("82AB".into())
            })
        );
        assert_eq!(
            parse(r#"{"type":"unsubscribe","room":"order:1"}"#),
            Ok(ClientMsg::Unsubscribe {
                room: "order:1".into()
            })
        );
        assert_eq!(parse(r#"{"type":"ping"}"#), Ok(ClientMsg::Ping));
    }

    #[test]
    fn refuses_bad_messages_with_codes() {
        let cases = [
            ("{", "bad_json"),
            ("[]", "bad_json"),
            ("\"x\"", "bad_json"),
            ("{}", "bad_request"),
            (r#"{"type":5}"#, "bad_request"),
            (r#"{"type":"nope"}"#, "unknown_type"),
            (r#"{"type":"subscribe"}"#, "bad_request"),
            (r#"{"type":"subscribe","room":5}"#, "bad_request"),
            (r#"{"type":"auth","token":"t","extra":1}"#, "bad_request"),
        ];
        for (text, code) in cases {
            assert_eq!(parse(text).unwrap_err().code(), code, "{text}");
        }
    }

    #[test]
    fn position_is_a_json_message_with_the_sealed_id() {
        let v: serde_json::Value = serde_json::from_str(&position("a\"b")).unwrap();
        assert_eq!(v, json!({"type": "position", "position": "a\"b"}));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,300}") {
            let _ = parse(&s);
        }
    }
}
