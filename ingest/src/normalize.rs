//! Turning a Segment event into a flat record: one typed value per key path.
//!
//! - Nested objects are flattened: every scalar leaf becomes a [`Field`] with its [`KeyPath`]
//!   (`["context", "library", "name"]`); [`crate::naming`] and the catalog turn paths into
//!   column names when the record is loaded.
//! - Flattening stops at [`MAX_FLATTEN_DEPTH`] keys: a deeper object is one JSON value.
//! - Strings are `text`, integers `bigint`, other numbers `double precision` (`NaN` and
//!   `±Infinity` too), booleans `boolean`, arrays and empty objects `jsonb`. Integers outside
//!   `bigint` are `text` holding their exact digits. Null values add nothing.
//! - Segment's four timestamps (`timestamp`, `sentAt`, `receivedAt`, `originalTimestamp`) are
//!   `timestamptz` when they are ISO 8601 text ([`parse_timestamp`]); any other value is kept as
//!   it was sent, and so lands in a split column (`timestamp__st`, `timestamp__bi`, ...).
//! - Segment's identity fields (`messageId`, `userId`, `anonymousId`, `groupId`, `previousId`)
//!   are `text` whatever their JSON type ([`crate::event::id_text`]): `12345` and `"12345"` are
//!   the same user.
//!
//! Nothing here touches a database.

use chrono::{DateTime, Datelike, NaiveDateTime, TimeDelta, Timelike, Utc};
use serde_json::{Map, Value};

use crate::event::{Envelope, IDENTITY_KEYS, Table, id_text};
use crate::json::{self, Special};
use crate::naming::KeyPath;
use crate::schema::ColumnType;
use crate::selection::{TableSelection, Treatment};

/// The top-level keys that Segment defines as timestamps and that load as `timestamptz`.
pub const TIMESTAMP_KEYS: [&str; 4] = ["timestamp", "sentAt", "receivedAt", "originalTimestamp"];

/// How many keys deep objects are flattened into columns. An object found at this depth is
/// stored whole, as one `jsonb` value, in the column of its path: deep trees do not turn into
/// hundreds of long hashed column names, and its innermost values stay queryable with JSON
/// operators.
pub const MAX_FLATTEN_DEPTH: usize = 10;

/// One value of a record, typed for SQL.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    /// A string (or an integer too large for `bigint`, kept exactly as its digits).
    Text(String),
    /// An integer that fits in 64 bits.
    BigInt(i64),
    /// Any other number, `NaN` and `±Infinity` included.
    Double(f64),
    /// A boolean.
    Boolean(bool),
    /// One of Segment's timestamps, parsed.
    Timestamp(DateTime<Utc>),
    /// An array or an object stored whole, as JSON text.
    Json(String),
}

impl SqlValue {
    /// The column type this value needs.
    pub fn column_type(&self) -> ColumnType {
        match self {
            SqlValue::Text(_) => ColumnType::Text,
            SqlValue::BigInt(_) => ColumnType::BigInt,
            SqlValue::Double(_) => ColumnType::Double,
            SqlValue::Boolean(_) => ColumnType::Boolean,
            SqlValue::Timestamp(_) => ColumnType::Timestamp,
            SqlValue::Json(_) => ColumnType::Json,
        }
    }

    /// Appends the value as JSON text, for the overflow column: non-finite numbers as the
    /// strings `"NaN"`, `"Infinity"`, `"-Infinity"`, timestamps as RFC 3339 text.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            SqlValue::Text(s) => json::write_string(s, out),
            SqlValue::BigInt(i) => json::write_json(&Value::from(*i), out),
            SqlValue::Double(d) if d.is_finite() => json::write_json(&Value::from(*d), out),
            SqlValue::Double(d) => json::write_string(json::non_finite_name(*d), out),
            SqlValue::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            SqlValue::Timestamp(t) => json::write_string(&format_timestamp(t), out),
            SqlValue::Json(text) => out.extend_from_slice(text.as_bytes()),
        }
    }

    /// An upper bound of the bytes the value takes in a PostgreSQL row, padding included: each
    /// value's size rounded up to 8 bytes, so that however the columns are ordered, no value
    /// needs more room for its alignment than it is counted for. Fixed-width values count 8;
    /// text and JSON their length (plus a 4-byte header) up to 24, the 18-byte pointer TOAST
    /// leaves behind when PostgreSQL moves a longer value out of the row.
    pub fn row_bytes(&self) -> usize {
        match self {
            SqlValue::BigInt(_)
            | SqlValue::Double(_)
            | SqlValue::Boolean(_)
            | SqlValue::Timestamp(_) => 8,
            SqlValue::Text(s) | SqlValue::Json(s) => (s.len() + 4).min(24).next_multiple_of(8),
        }
    }
}

/// Formats a timestamp the way Sluice stores it where the database has no timestamp type
/// (SQLite): RFC 3339 in UTC with microseconds (PostgreSQL's precision), which sorts as text.
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A key path and the value an event gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// Where the value is in the event.
    pub path: KeyPath,
    /// The value.
    pub value: SqlValue,
}

/// An event ready to load: its table, key and flattened fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The destination table.
    pub table: Table,
    /// The primary key.
    pub message_id: String,
    /// Every non-null leaf of the event, in key order (`messageId` among them, as text).
    pub fields: Vec<Field>,
}

/// Flattens a validated event object into a [`Record`] for `table`, taking its strings.
pub fn normalize(table: Table, envelope: &Envelope, event: Map<String, Value>) -> Record {
    normalize_selected(table, envelope, event, &TableSelection::everything()).0
}

/// [`normalize`] under a column selection ([`crate::selection`]): excluded values are left out
/// (their number is the second answer, values counted per excluded path), a subtree asked for as
/// JSON is one value, a pseudonymized value is its keyed hash.
pub fn normalize_selected(
    table: Table,
    envelope: &Envelope,
    event: Map<String, Value>,
    selection: &TableSelection,
) -> (Record, usize) {
    let mut fields = Vec::with_capacity(event.len() * 2);
    let mut path = Vec::with_capacity(8);
    let mut flattening = Flattening {
        fields: &mut fields,
        selection: (!selection.is_everything()).then_some(selection),
        excluded: 0,
    };
    for (key, value) in event {
        let value = if IDENTITY_KEYS.contains(&key.as_str()) {
            match id_text(&value) {
                Some(text) => Value::String(text.into_owned()),
                None => value,
            }
        } else {
            value
        };
        let timestamp = TIMESTAMP_KEYS.contains(&key.as_str());
        path.push(key);
        match value {
            Value::String(s) if timestamp && flattening.treatment(&path) == Treatment::Load => {
                match parse_timestamp(&s) {
                    Some(t) => flattening.push(&path, SqlValue::Timestamp(t)),
                    None => flattening.visit(&mut path, Value::String(s)),
                }
            }
            value => flattening.visit(&mut path, value),
        }
        path.pop();
    }
    let excluded = flattening.excluded;
    let record = Record {
        table,
        message_id: envelope.message_id.clone(),
        fields,
    };
    (record, excluded)
}

/// One event's flattening: the fields so far, under a selection (`None`: load everything).
struct Flattening<'a> {
    fields: &'a mut Vec<Field>,
    selection: Option<&'a TableSelection>,
    excluded: usize,
}

impl Flattening<'_> {
    fn treatment(&self, path: &[String]) -> Treatment {
        self.selection
            .map_or(Treatment::Load, |selection| selection.treatment(path))
    }

    fn push(&mut self, path: &[String], value: SqlValue) {
        self.fields.push(Field {
            path: KeyPath::new(path.iter().map(String::as_str)),
            value,
        });
    }

    /// Adds the leaves of `value` at `path`. Recursion is bounded by [`MAX_FLATTEN_DEPTH`].
    fn visit(&mut self, path: &mut Vec<String>, value: Value) {
        if value.is_null() {
            return;
        }
        match self.treatment(path) {
            Treatment::Load => {}
            Treatment::Exclude => {
                self.excluded += 1;
                return;
            }
            Treatment::Json => {
                let text = json::to_json_text(&value);
                self.push(path, SqlValue::Json(text));
                return;
            }
            Treatment::Pseudonymize if !value.is_object() => {
                let text = match &value {
                    Value::String(s) => match json::special(s) {
                        Some(special) => special.text().into_owned(),
                        None => s.clone(),
                    },
                    other => json::to_json_text(other),
                };
                let pseudonym = self
                    .selection
                    .map(|selection| selection.pseudonym(&text))
                    .unwrap_or_default();
                self.push(path, SqlValue::Text(pseudonym));
                return;
            }
            Treatment::Pseudonymize => {}
        }
        let value = match value {
            Value::Null => return,
            Value::Bool(b) => SqlValue::Boolean(b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => SqlValue::BigInt(i),
                None => SqlValue::Double(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => match json::special(&s) {
                Some(Special::NonFinite(f)) => SqlValue::Double(f),
                Some(Special::BigNumber(digits)) => SqlValue::Text(digits.to_owned()),
                None => SqlValue::Text(s),
            },
            Value::Object(map) if !map.is_empty() && path.len() < MAX_FLATTEN_DEPTH => {
                for (key, value) in map {
                    path.push(key);
                    self.visit(path, value);
                    path.pop();
                }
                return;
            }
            value => SqlValue::Json(json::to_json_text(&value)),
        };
        self.push(path, value);
    }
}

/// Parses a Segment timestamp: RFC 3339 / ISO 8601 with an offset (`Z`, `+02:00`, `+0200`), or
/// without one (taken as UTC), with `T` or a space between date and time, in the years 0001 to
/// 9999 (what both databases store). Anything else is `None`: the value is then kept as sent.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    let parsed = DateTime::parse_from_rfc3339(text)
        .ok()
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"]
                .into_iter()
                .find_map(|format| DateTime::parse_from_str(text, format).ok())
        })
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .into_iter()
                .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
                .map(|t| t.and_utc())
        })?;
    // A leap second (`23:59:60`) is the first instant of the next minute, as PostgreSQL
    // stores it, so both databases hold the same time.
    let parsed = match parsed.nanosecond().checked_sub(1_000_000_000) {
        Some(nanos) => parsed.with_nanosecond(nanos)? + TimeDelta::seconds(1),
        None => parsed,
    };
    (1..=9999).contains(&parsed.year()).then_some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Call, validate};
    use serde_json::json;

    fn record(event: Value) -> Record {
        let envelope = validate(&event).expect("valid event");
        let Call::Load(table) = envelope.call else {
            panic!("not a load")
        };
        normalize(table, &envelope, event.as_object().expect("object").clone())
    }

    fn field<'a>(record: &'a Record, keys: &[&str]) -> Option<&'a SqlValue> {
        let path = KeyPath::new(keys.iter().copied());
        record
            .fields
            .iter()
            .find(|f| f.path == path)
            .map(|f| &f.value)
    }

    #[test]
    fn event_is_flattened_and_typed() {
        let r = record(json!({
            "type": "track", "messageId": "m1", "userId": "u1", "event": "Order Completed",
            "timestamp": "2015-12-10T04:08:31.905123Z", "sentAt": "not a time",
            "properties": {"revenue": 19.5, "quantity": 2, "coupon": null, "gift": false,
                           "products": [{"sku": "a"}], "extra": {}},
            "context": {"library": {"name": "analytics.js"}}
        }));
        assert_eq!(r.table, Table::Track);
        assert_eq!(
            field(&r, &["messageId"]),
            Some(&SqlValue::Text("m1".into()))
        );
        let Some(SqlValue::Timestamp(t)) = field(&r, &["timestamp"]) else {
            panic!("timestamp parsed")
        };
        assert_eq!(format_timestamp(t), "2015-12-10T04:08:31.905123Z");
        assert_eq!(
            field(&r, &["sentAt"]),
            Some(&SqlValue::Text("not a time".into()))
        );
        assert_eq!(
            field(&r, &["properties", "revenue"]),
            Some(&SqlValue::Double(19.5))
        );
        assert_eq!(
            field(&r, &["properties", "quantity"]),
            Some(&SqlValue::BigInt(2))
        );
        assert_eq!(field(&r, &["properties", "coupon"]), None);
        assert_eq!(
            field(&r, &["properties", "gift"]),
            Some(&SqlValue::Boolean(false))
        );
        assert_eq!(
            field(&r, &["properties", "products"]),
            Some(&SqlValue::Json(r#"[{"sku":"a"}]"#.into()))
        );
        assert_eq!(
            field(&r, &["properties", "extra"]),
            Some(&SqlValue::Json("{}".into()))
        );
        assert_eq!(
            field(&r, &["context", "library", "name"]),
            Some(&SqlValue::Text("analytics.js".into()))
        );
    }

    #[test]
    fn identity_fields_are_text_whatever_their_type() {
        let r = record(json!({
            "type": "group", "messageId": 150004, "userId": 9007199254740993i64,
            "anonymousId": true, "groupId": 42.5, "traits": {"accountId": 678}
        }));
        assert_eq!(r.message_id, "150004");
        assert_eq!(
            field(&r, &["messageId"]),
            Some(&SqlValue::Text("150004".into()))
        );
        assert_eq!(
            field(&r, &["userId"]),
            Some(&SqlValue::Text("9007199254740993".into()))
        );
        assert_eq!(
            field(&r, &["anonymousId"]),
            Some(&SqlValue::Text("true".into()))
        );
        assert_eq!(
            field(&r, &["groupId"]),
            Some(&SqlValue::Text("42.5".into()))
        );
        assert_eq!(
            field(&r, &["traits", "accountId"]),
            Some(&SqlValue::BigInt(678))
        );
    }

    #[test]
    fn tagged_values_become_doubles_and_exact_text() {
        let body = br#"{"type": "track", "messageId": "m", "userId": 18446744073709551616, "event": "e",
            "properties": {"nan": NaN, "inf": -Infinity, "big": -9223372036854775809, "s": "NaN", "a": [NaN, 18446744073709551616]}}"#;
        let repaired = json::repair(body).expect("repaired");
        let event: Value = json::parse(&repaired).expect("parsed");
        let r = record(event);
        assert!(
            matches!(field(&r, &["properties", "nan"]), Some(SqlValue::Double(f)) if f.is_nan())
        );
        assert_eq!(
            field(&r, &["properties", "inf"]),
            Some(&SqlValue::Double(f64::NEG_INFINITY))
        );
        assert_eq!(
            field(&r, &["properties", "big"]),
            Some(&SqlValue::Text("-9223372036854775809".into()))
        );
        assert_eq!(
            field(&r, &["properties", "s"]),
            Some(&SqlValue::Text("NaN".into()))
        );
        assert_eq!(
            field(&r, &["properties", "a"]),
            Some(&SqlValue::Json(r#"["NaN",18446744073709551616]"#.into()))
        );
        assert_eq!(
            field(&r, &["userId"]),
            Some(&SqlValue::Text("18446744073709551616".into()))
        );
    }

    #[test]
    fn flattening_stops_at_its_depth() {
        let mut tree = json!({"leaf": "bottom"});
        for _ in 0..200 {
            tree = json!({ "level": tree });
        }
        let r = record(
            json!({"type": "track", "messageId": "m", "userId": "u", "event": "e",
            "properties": {"tree": tree, "shallow": "kept"}}),
        );
        let deep: Vec<&Field> = r
            .fields
            .iter()
            .filter(|f| f.path.keys().nth(1) == Some("tree"))
            .collect();
        assert_eq!(deep.len(), 1);
        assert_eq!(deep[0].path.keys().count(), MAX_FLATTEN_DEPTH);
        let SqlValue::Json(text) = &deep[0].value else {
            panic!("a JSON value")
        };
        assert!(text.contains("\"leaf\":\"bottom\""));
        assert_eq!(
            field(&r, &["properties", "shallow"]),
            Some(&SqlValue::Text("kept".into()))
        );
    }

    #[test]
    fn timestamps_format_as_rfc_3339_in_utc_with_microseconds() {
        use chrono::TimeZone;
        for (secs, nanos) in [
            (0, 0),
            (1_714_557_600, 123_456_789),
            (1_714_557_600, 999_999_999),
            (-62_135_596_800, 1_000),   // 0001-01-01
            (-30_610_224_000, 5),       // 1000-01-01
            (253_402_300_799, 999_999), // 9999-12-31T23:59:59
        ] {
            let t = Utc.timestamp_opt(secs, nanos).single().expect("in range");
            assert_eq!(
                format_timestamp(&t),
                t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                "{secs}.{nanos:09}"
            );
        }
        let t = Utc
            .timestamp_opt(1_714_557_600, 123_456_789)
            .single()
            .expect("in range");
        assert_eq!(format_timestamp(&t), "2024-05-01T10:00:00.123456Z");
    }

    #[test]
    fn timestamps_parse_in_common_shapes_and_nothing_else() {
        let expected = parse_timestamp("2012-12-02T00:30:08.276Z").expect("rfc3339");
        for text in [
            "2012-12-02T00:30:08.276+00:00",
            "2012-12-02T01:30:08.276+0100",
            "2012-12-02T06:00:08.276+0530",
            "2012-12-02 00:30:08.276",
            "2012-12-02T00:30:08.276",
        ] {
            assert_eq!(parse_timestamp(text), Some(expected), "{text}");
        }
        assert_eq!(
            parse_timestamp("2016-12-31T23:59:60.5Z").map(|t| format_timestamp(&t)),
            Some("2017-01-01T00:00:00.500000Z".to_owned())
        );
        for text in [
            "yesterday",
            "2026-02-30T00:00:00Z",
            "10013-01-01T00:00:00Z",
            "+10013-01-01T00:00:00Z",
            "1796032800000",
        ] {
            assert_eq!(parse_timestamp(text), None, "{text}");
        }
    }

    #[test]
    fn unreadable_timestamps_are_kept_as_sent() {
        let r = record(
            json!({"type": "track", "messageId": "m", "userId": "u", "event": "e",
            "timestamp": 1796032800000i64, "sentAt": "2026-02-30T00:00:00Z"}),
        );
        assert_eq!(
            field(&r, &["timestamp"]),
            Some(&SqlValue::BigInt(1796032800000))
        );
        assert_eq!(
            field(&r, &["sentAt"]),
            Some(&SqlValue::Text("2026-02-30T00:00:00Z".into()))
        );
    }

    #[test]
    fn overflow_json_of_values() {
        let mut out = Vec::new();
        for value in [
            SqlValue::Double(f64::NAN),
            SqlValue::Double(0.5),
            SqlValue::Text("a\"b".into()),
            SqlValue::BigInt(-3),
        ] {
            value.write_json(&mut out);
            out.push(b' ');
        }
        assert_eq!(json::utf8(out), r#""NaN" 0.5 "a\"b" -3 "#);
    }
}
