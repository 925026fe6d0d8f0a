//! The Segment event model: which calls exist, which table each one lands in, and what makes an
//! event complete enough to load.
//!
//! This is the one place that knows the tables. Everything else asks [`Table`].

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

/// A destination table: the Segment call type of the same name.
//
// Its serde form, command-line value and (with the `schema` feature) JSON Schema are the lowercase
// table name, so the operator's CRD, the ingest's flags and the error messages all come from here.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// `alias` calls (not selected by default, as in Stitch).
    Alias,
    /// `group` calls.
    Group,
    /// `identify` calls.
    Identify,
    /// `page` calls.
    Page,
    /// `screen` calls.
    Screen,
    /// `track` calls.
    Track,
}

impl Table {
    /// Every table Sluice can load, in name order.
    pub const ALL: [Table; 6] = [
        Table::Alias,
        Table::Group,
        Table::Identify,
        Table::Page,
        Table::Screen,
        Table::Track,
    ];

    /// The tables loaded when none are selected: Stitch's five.
    pub const DEFAULT: [Table; 5] = [
        Table::Group,
        Table::Identify,
        Table::Page,
        Table::Screen,
        Table::Track,
    ];

    /// The table's name in the destination schema (also the Segment call type).
    pub fn name(self) -> &'static str {
        match self {
            Table::Alias => "alias",
            Table::Group => "group",
            Table::Identify => "identify",
            Table::Page => "page",
            Table::Screen => "screen",
            Table::Track => "track",
        }
    }

    /// Every table's name, comma-separated in name order, for messages and help texts.
    pub fn names() -> String {
        Table::ALL.map(Table::name).join(", ")
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error for a table name that Sluice does not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown table {0:?}: expected one of {names}", names = Table::names())]
pub struct UnknownTable(pub String);

impl FromStr for Table {
    type Err = UnknownTable;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Table::ALL
            .into_iter()
            .find(|t| t.name() == s.trim())
            .ok_or_else(|| UnknownTable(s.to_owned()))
    }
}

/// What a Segment event asks for, read from its `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// A call that loads a row into a table.
    Load(Table),
    /// A user deletion request (`type: delete`). Carried out only with `--honour-deletes`
    /// ([`crate::load::Warehouse::delete_user`]); otherwise refused explicitly, so that nothing
    /// is half-done.
    Delete,
}

/// Why an event cannot be accepted. Each message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    /// The payload is JSON but not an object.
    #[error("an event must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// No `type` field.
    #[error("missing \"type\": expected one of {}", Table::names())]
    MissingType,
    /// A `type` Segment does not define.
    #[error("unknown type {0:?}: expected one of {names}", names = Table::names())]
    UnknownType(String),
    /// A required field is absent, empty or not of a type that holds a value (an identity
    /// field may be any scalar: string, number or boolean; other fields must be strings).
    #[error("missing \"{0}\": a {1} event needs it as a non-empty string")]
    MissingField(&'static str, &'static str),
    /// The `messageId` is longer than [`MAX_MESSAGE_ID_BYTES`].
    #[error("\"messageId\" is {0} bytes long; at most {MAX_MESSAGE_ID_BYTES} are accepted")]
    MessageIdTooLong(usize),
    /// Neither `userId` nor `anonymousId` is present.
    #[error("a {0} event needs \"userId\" or \"anonymousId\"")]
    MissingIdentity(&'static str),
}

/// A validated event: the call it makes and its `messageId`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The call, and so the table.
    pub call: Call,
    /// Segment's unique id of the message; the primary key of every table.
    pub message_id: String,
}

/// Reads the `type` of an event object.
pub fn call_of(event: &Map<String, Value>) -> Result<Call, InvalidEvent> {
    let kind = match event.get("type") {
        None | Some(Value::Null) => return Err(InvalidEvent::MissingType),
        Some(Value::String(kind)) => kind.as_str(),
        Some(other) => return Err(InvalidEvent::UnknownType(other.to_string())),
    };
    if kind == "delete" {
        return Ok(Call::Delete);
    }
    kind.parse::<Table>()
        .map(Call::Load)
        .map_err(|_| InvalidEvent::UnknownType(kind.to_owned()))
}

/// The longest `messageId` accepted, in bytes. It is every table's primary key, and
/// PostgreSQL's index holds keys of at most about 2700 bytes; Segment's ids are 36 to 60.
pub const MAX_MESSAGE_ID_BYTES: usize = 2000;

/// Segment's identity fields. The spec types them as strings, but Segment's own libraries send
/// numbers too (analytics-python passes `groupId` and `previousId` through as the caller gave
/// them), so Sluice accepts any scalar and stores its text ([`id_text`]).
pub const IDENTITY_KEYS: [&str; 5] = [
    "messageId",
    "userId",
    "anonymousId",
    "groupId",
    "previousId",
];

/// The text of an identity field: a non-empty string as it is, a number as its exact decimal
/// text (`150004`, `9007199254740993`, digits beyond 64 bits too), a boolean as `true` or
/// `false`. `None` for null, an empty string, an array or an object. So `150004` and
/// `"150004"` are the same `messageId`, and the same user.
pub fn id_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(match crate::json::special(s) {
            Some(special) => Cow::Owned(special.text().into_owned()),
            None => Cow::Borrowed(s.as_str()),
        }),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Checks that an event is complete: a known `type`, a `messageId`, and the identity fields the
/// Segment spec requires for that call.
pub fn validate(event: &Value) -> Result<Envelope, InvalidEvent> {
    let object = event
        .as_object()
        .ok_or_else(|| InvalidEvent::NotAnObject(json_kind(event)))?;
    let call = call_of(object)?;
    let name = match call {
        Call::Load(table) => table.name(),
        Call::Delete => "delete",
    };
    let message_id = required_id(object, "messageId", name)?.into_owned();
    if message_id.len() > MAX_MESSAGE_ID_BYTES {
        return Err(InvalidEvent::MessageIdTooLong(message_id.len()));
    }
    if let Call::Load(table) = call {
        let has = |key| object.get(key).and_then(id_text).is_some();
        match table {
            Table::Alias => {
                required_id(object, "userId", name)?;
                required_id(object, "previousId", name)?;
            }
            _ if !has("userId") && !has("anonymousId") => {
                return Err(InvalidEvent::MissingIdentity(name));
            }
            Table::Track => {
                required_string(object, "event", name)?;
            }
            Table::Group => {
                required_id(object, "groupId", name)?;
            }
            Table::Identify | Table::Page | Table::Screen => {}
        }
    }
    Ok(Envelope { call, message_id })
}

fn required_id<'a>(
    object: &'a Map<String, Value>,
    key: &'static str,
    call: &'static str,
) -> Result<Cow<'a, str>, InvalidEvent> {
    object
        .get(key)
        .and_then(id_text)
        .ok_or(InvalidEvent::MissingField(key, call))
}

fn required_string<'a>(
    object: &'a Map<String, Value>,
    key: &'static str,
    call: &'static str,
) -> Result<&'a str, InvalidEvent> {
    object
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(InvalidEvent::MissingField(key, call))
}

/// The JSON type of a value, for error messages.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_names_round_trip() {
        for table in Table::ALL {
            assert_eq!(table.name().parse::<Table>(), Ok(table));
        }
        assert!("orders".parse::<Table>().is_err());
    }

    #[test]
    fn complete_track_is_valid() {
        let event = json!({"type": "track", "messageId": "m1", "userId": "u", "event": "Clicked"});
        assert_eq!(
            validate(&event),
            Ok(Envelope {
                call: Call::Load(Table::Track),
                message_id: "m1".into()
            })
        );
    }

    #[test]
    fn incomplete_events_say_what_is_missing() {
        let cases = [
            (json!([1]), InvalidEvent::NotAnObject("an array")),
            (json!({"messageId": "m"}), InvalidEvent::MissingType),
            (
                json!({"type": "purchase", "messageId": "m"}),
                InvalidEvent::UnknownType("purchase".into()),
            ),
            (
                json!({"type": "track", "userId": "u", "event": "e"}),
                InvalidEvent::MissingField("messageId", "track"),
            ),
            (
                json!({"type": "page", "messageId": "m"}),
                InvalidEvent::MissingIdentity("page"),
            ),
            (
                json!({"type": "track", "messageId": "m", "anonymousId": "a"}),
                InvalidEvent::MissingField("event", "track"),
            ),
            (
                json!({"type": "alias", "messageId": "m", "userId": "u"}),
                InvalidEvent::MissingField("previousId", "alias"),
            ),
            (
                json!({"type": "group", "messageId": "m", "userId": "u"}),
                InvalidEvent::MissingField("groupId", "group"),
            ),
            (
                json!({"type": "track", "messageId": "m".repeat(2001), "userId": "u", "event": "e"}),
                InvalidEvent::MessageIdTooLong(2001),
            ),
        ];
        for (event, expected) in cases {
            assert_eq!(validate(&event), Err(expected), "{event}");
        }
    }

    #[test]
    fn identity_fields_of_any_scalar_type_are_accepted() {
        let event = json!({"type": "group", "messageId": 150004, "userId": 12345, "groupId": 42});
        assert_eq!(
            validate(&event).map(|e| e.message_id),
            Ok("150004".to_owned())
        );
        let event = json!({"type": "alias", "messageId": "m", "userId": true, "previousId": 9.5});
        assert!(validate(&event).is_ok());
        assert_eq!(
            id_text(&json!(9007199254740993i64)).as_deref(),
            Some("9007199254740993")
        );
        for missing in [json!(null), json!(""), json!([1]), json!({"a": 1})] {
            assert_eq!(id_text(&missing), None, "{missing}");
        }
        let event = json!({"type": "page", "messageId": "m", "userId": ""});
        assert_eq!(validate(&event), Err(InvalidEvent::MissingIdentity("page")));
    }

    #[test]
    fn delete_is_recognised_not_loaded() {
        let event = json!({"type": "delete", "messageId": "m", "userId": "u"});
        assert_eq!(validate(&event).map(|e| e.call), Ok(Call::Delete));
    }
}
