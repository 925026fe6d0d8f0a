//! Turning a Segment event into a flat record: Stitch-style column names and SQL types.
//!
//! - Keys are converted camelCase -> snake_case, other characters become `_`, nested objects are
//!   flattened with `__` (`context.library.name` -> `context__library__name`).
//! - Names are at most 63 bytes (PostgreSQL's limit); longer ones keep a prefix and get a short
//!   hash of the whole name, so two long keys never share a column.
//! - Two keys of one event that would share a name (`fooBar` and `foo_bar`, `a'b` and `a;b`) do
//!   not: the first in key order keeps the plain name, the others get a hash suffix.
//! - Strings are `text`, integers `bigint`, other numbers `double precision`, booleans
//!   `boolean`, arrays and empty objects `jsonb`; Segment's four timestamps are `timestamptz`.
//!
//! Nothing here touches a database; [`crate::schema`] quotes the names this module makes.

use std::collections::HashSet;
use std::fmt;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};
use sha1::{Digest, Sha1};

use crate::event::{Envelope, Table};

/// PostgreSQL's limit on identifier length, in bytes. SQLite has none, but uses the same names.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// The top-level keys that Segment defines as timestamps and that load as `timestamptz`.
const TIMESTAMP_KEYS: [&str; 4] = ["timestamp", "sentAt", "receivedAt", "originalTimestamp"];

/// The SQL type of a column, as Sluice creates it. The same names serve PostgreSQL and SQLite
/// (SQLite keeps declared type names verbatim and derives a fitting affinity from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// `text`
    Text,
    /// `bigint`
    BigInt,
    /// `double precision`
    Double,
    /// `boolean`
    Boolean,
    /// `timestamptz`
    Timestamp,
    /// `jsonb`
    Json,
}

impl ColumnType {
    /// Every column type.
    pub const ALL: [ColumnType; 6] = [
        ColumnType::Text,
        ColumnType::BigInt,
        ColumnType::Double,
        ColumnType::Boolean,
        ColumnType::Timestamp,
        ColumnType::Json,
    ];

    /// The type's name in DDL.
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::BigInt => "bigint",
            ColumnType::Double => "double precision",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamp => "timestamptz",
            ColumnType::Json => "jsonb",
        }
    }

    /// The suffix of the split column that holds values of this type when a column of the same
    /// name already has another type (Stitch's convention; `__js` is Sluice's for JSON).
    pub fn split_suffix(self) -> &'static str {
        match self {
            ColumnType::Text => "__st",
            ColumnType::BigInt => "__bi",
            ColumnType::Double => "__do",
            ColumnType::Boolean => "__bo",
            ColumnType::Timestamp => "__ti",
            ColumnType::Json => "__js",
        }
    }

    /// Reads a type name from a database catalog: PostgreSQL's `information_schema` spelling or
    /// the declared type that SQLite keeps. `None` for types Sluice never creates.
    pub fn from_catalog(name: &str) -> Option<ColumnType> {
        match name.trim().to_ascii_lowercase().as_str() {
            "text" => Some(ColumnType::Text),
            "bigint" => Some(ColumnType::BigInt),
            "double precision" => Some(ColumnType::Double),
            "boolean" => Some(ColumnType::Boolean),
            "timestamptz" | "timestamp with time zone" => Some(ColumnType::Timestamp),
            "jsonb" => Some(ColumnType::Json),
            _ => None,
        }
    }

    /// Whether a column of this type can store a value of type `value`: the same type, or an
    /// integer in a `double precision` column (JSON writers print `10.0` as `10`).
    pub fn accepts(self, value: ColumnType) -> bool {
        self == value || (self == ColumnType::Double && value == ColumnType::BigInt)
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sql())
    }
}

/// One value of a record, typed for SQL.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    /// A string (or an integer too large for `bigint`, kept exactly as its digits).
    Text(String),
    /// An integer that fits in 64 bits.
    BigInt(i64),
    /// Any other number.
    Double(f64),
    /// A boolean.
    Boolean(bool),
    /// One of Segment's timestamps, parsed.
    Timestamp(DateTime<Utc>),
    /// An array or an empty object, as JSON text.
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

    /// The value as JSON, for the overflow column and rejected records.
    pub fn to_json(&self) -> Value {
        match self {
            SqlValue::Text(s) => Value::String(s.clone()),
            SqlValue::BigInt(i) => Value::from(*i),
            SqlValue::Double(d) => Value::from(*d),
            SqlValue::Boolean(b) => Value::Bool(*b),
            SqlValue::Timestamp(t) => Value::String(format_timestamp(t)),
            SqlValue::Json(text) => serde_json::from_str(text).unwrap_or(Value::Null),
        }
    }
}

/// Formats a timestamp the way Sluice stores it where the database has no timestamp type
/// (SQLite): RFC 3339 in UTC with milliseconds, which sorts as text.
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A column name and the value an event gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The generated column name (never quoted here).
    pub column: String,
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
    /// Every non-null leaf of the event, `message_id` first.
    pub fields: Vec<Field>,
}

/// Column names Sluice reserves for itself; an event's keys never take them.
pub const SYSTEM_COLUMNS: [&str; 6] = [
    "_sdc_received_at",
    "_sdc_batched_at",
    "_sdc_sequence",
    "_sdc_table_version",
    "_sdc_overflow",
    "message_id",
];

/// Flattens a validated event object into a [`Record`] for `table`, taking its strings.
pub fn normalize(table: Table, envelope: &Envelope, event: Map<String, Value>) -> Record {
    let mut flattener = Flattener {
        taken: SYSTEM_COLUMNS.iter().map(|s| name_hash(s)).collect(),
        fields: Vec::with_capacity(event.len() * 2),
        name: String::with_capacity(64),
    };
    flattener.fields.push(Field {
        column: "message_id".to_owned(),
        value: SqlValue::Text(envelope.message_id.clone()),
    });
    let mut path = Vec::with_capacity(8);
    for (key, value) in event {
        if key == "messageId" {
            continue;
        }
        let leaf = match value {
            Value::String(s) if TIMESTAMP_KEYS.contains(&key.as_str()) => match parse_timestamp(&s)
            {
                Some(t) => Leaf::Timestamp(t),
                None => Leaf::Plain(Value::String(s)),
            },
            value => Leaf::Plain(value),
        };
        path.push(key);
        flattener.visit(&mut path, leaf);
        path.pop();
    }
    Record {
        table,
        message_id: envelope.message_id.clone(),
        fields: flattener.fields,
    }
}

enum Leaf {
    Plain(Value),
    Timestamp(DateTime<Utc>),
}

struct Flattener {
    /// Hashes of the names this event has taken: a name is claimed once (see [`Self::claim`]).
    taken: HashSet<u64>,
    fields: Vec<Field>,
    /// Reused buffer for building names.
    name: String,
}

impl Flattener {
    fn visit(&mut self, path: &mut Vec<String>, leaf: Leaf) {
        let value = match leaf {
            Leaf::Timestamp(t) => SqlValue::Timestamp(t),
            Leaf::Plain(value) => match value {
                Value::Null => return,
                Value::Bool(b) => SqlValue::Boolean(b),
                Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => SqlValue::BigInt(i),
                    (None, _) if n.is_u64() => SqlValue::Text(n.to_string()),
                    (None, Some(f)) => SqlValue::Double(f),
                    (None, None) => SqlValue::Text(n.to_string()),
                },
                Value::String(s) => SqlValue::Text(s),
                Value::Array(_) => SqlValue::Json(value.to_string()),
                Value::Object(map) if map.is_empty() => SqlValue::Json("{}".to_owned()),
                Value::Object(map) => {
                    for (key, value) in map {
                        path.push(key);
                        self.visit(path, Leaf::Plain(value));
                        path.pop();
                    }
                    return;
                }
            },
        };
        let column = self.claim(path);
        self.fields.push(Field { column, value });
    }

    /// Picks the column name for `path`, distinct from every name already taken by this event.
    fn claim(&mut self, path: &[String]) -> String {
        self.name.clear();
        push_column_name(&mut self.name, path.iter().map(String::as_str));
        let mut column = fit_identifier(&self.name);
        if !self.taken.insert(name_hash(&column)) {
            // The raw path (joined with a byte no key can contain unescaped) disambiguates.
            let raw = path.join("\u{1f}");
            column = fit_identifier(&format!("{column}_{}", short_hash(&raw)));
            self.taken.insert(name_hash(&column));
        }
        column
    }
}

/// A 64-bit hash of a column name, to tell taken names apart without keeping copies.
fn name_hash(name: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<rustc_hash::FxHasher>::default().hash_one(name)
}

/// The column name for a path of JSON keys: each key in snake_case, joined with `__`, at most
/// [`MAX_IDENTIFIER_BYTES`] long.
pub fn column_name(path: &[&str]) -> String {
    let mut name = String::new();
    push_column_name(&mut name, path.iter().copied());
    fit_identifier(&name)
}

/// Appends the (not yet length-limited) column name of `path` to `out`.
fn push_column_name<'a>(out: &mut String, path: impl Iterator<Item = &'a str>) {
    for (i, key) in path.enumerate() {
        if i > 0 {
            out.push_str("__");
        }
        push_snake_case(out, key);
    }
    if out.is_empty() {
        out.push('_');
    }
}

/// The split column that holds values of `value_type` for the column `column`.
pub fn split_column_name(column: &str, value_type: ColumnType) -> String {
    fit_identifier(&format!("{column}{}", value_type.split_suffix()))
}

/// Converts one key: camelCase -> snake_case, ASCII letters lowered, every character other
/// than an ASCII letter, digit or `_` replaced by `_`.
pub fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    push_snake_case(&mut out, key);
    out
}

/// [`snake_case`] appended to `out`.
fn push_snake_case(out: &mut String, key: &str) {
    // The common case, already lower snake case, is copied as it is.
    if key
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        out.push_str(key);
        return;
    }
    let chars: Vec<char> = key.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let word_start = match prev {
                Some(p) if p.is_ascii_lowercase() || p.is_ascii_digit() => true,
                Some(p) if p.is_ascii_uppercase() => next.is_some_and(|n| n.is_ascii_lowercase()),
                _ => false,
            };
            if word_start {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else {
            out.push('_');
        }
    }
}

/// Keeps a name within [`MAX_IDENTIFIER_BYTES`]: a longer one keeps its first bytes and ends in
/// `_` and a hash of the whole name, so distinct long names stay distinct.
pub fn fit_identifier(name: &str) -> String {
    if name.len() <= MAX_IDENTIFIER_BYTES {
        return name.to_owned();
    }
    let hash = short_hash(name);
    let mut keep = MAX_IDENTIFIER_BYTES - hash.len() - 1;
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}_{hash}", &name[..keep])
}

/// Eight hex digits of the SHA-1 of `text`: stable across versions and processes.
fn short_hash(text: &str) -> String {
    hex::encode(&Sha1::digest(text.as_bytes())[..4])
}

/// Parses a Segment timestamp: RFC 3339 / ISO 8601 with an offset (`Z`, `+02:00`, `+0200`), or
/// without one (taken as UTC), with `T` or a space between date and time.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(t) = DateTime::parse_from_str(text, format) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc());
        }
    }
    None
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

    fn field<'a>(record: &'a Record, column: &str) -> Option<&'a SqlValue> {
        record
            .fields
            .iter()
            .find(|f| f.column == column)
            .map(|f| &f.value)
    }

    #[test]
    fn camel_case_becomes_snake_case() {
        assert_eq!(snake_case("anonymousId"), "anonymous_id");
        assert_eq!(snake_case("originalTimestamp"), "original_timestamp");
        assert_eq!(snake_case("userID"), "user_id");
        assert_eq!(snake_case("HTTPServer"), "http_server");
        assert_eq!(snake_case("already_snake"), "already_snake");
        assert_eq!(snake_case("Plan Name"), "plan_name");
        assert_eq!(snake_case("a'b;--c"), "a_b___c");
        assert_eq!(snake_case("prénom"), "pr_nom");
    }

    #[test]
    fn nested_keys_join_with_double_underscore() {
        assert_eq!(
            column_name(&["context", "library", "name"]),
            "context__library__name"
        );
    }

    #[test]
    fn long_names_are_cut_with_a_hash_and_stay_distinct() {
        let a = "a".repeat(300);
        let b = format!("{}b", "a".repeat(299));
        let (na, nb) = (column_name(&[&a]), column_name(&[&b]));
        assert_eq!(na.len(), MAX_IDENTIFIER_BYTES);
        assert_eq!(nb.len(), MAX_IDENTIFIER_BYTES);
        assert_ne!(na, nb);
        assert!(na.starts_with(&"a".repeat(54)));
        assert_eq!(
            split_column_name(&na, ColumnType::Text).len(),
            MAX_IDENTIFIER_BYTES
        );
    }

    #[test]
    fn event_is_flattened_and_typed() {
        let r = record(json!({
            "type": "track", "messageId": "m1", "userId": "u1", "event": "Order Completed",
            "timestamp": "2015-12-10T04:08:31.905Z", "sentAt": "not a time",
            "properties": {"revenue": 19.5, "quantity": 2, "coupon": null, "gift": false,
                           "products": [{"sku": "a"}], "extra": {}},
            "context": {"library": {"name": "analytics.js"}}
        }));
        assert_eq!(r.table, Table::Track);
        assert_eq!(r.fields[0].column, "message_id");
        assert_eq!(field(&r, "message_id"), Some(&SqlValue::Text("m1".into())));
        assert_eq!(
            field(&r, "timestamp"),
            Some(&SqlValue::Timestamp(
                parse_timestamp("2015-12-10T04:08:31.905Z").expect("time")
            ))
        );
        assert_eq!(
            field(&r, "sent_at"),
            Some(&SqlValue::Text("not a time".into()))
        );
        assert_eq!(
            field(&r, "properties__revenue"),
            Some(&SqlValue::Double(19.5))
        );
        assert_eq!(
            field(&r, "properties__quantity"),
            Some(&SqlValue::BigInt(2))
        );
        assert_eq!(field(&r, "properties__coupon"), None);
        assert_eq!(
            field(&r, "properties__gift"),
            Some(&SqlValue::Boolean(false))
        );
        assert_eq!(
            field(&r, "properties__products"),
            Some(&SqlValue::Json(r#"[{"sku":"a"}]"#.into()))
        );
        assert_eq!(
            field(&r, "properties__extra"),
            Some(&SqlValue::Json("{}".into()))
        );
        assert_eq!(
            field(&r, "context__library__name"),
            Some(&SqlValue::Text("analytics.js".into()))
        );
    }

    #[test]
    fn colliding_keys_get_distinct_columns() {
        let r = record(json!({
            "type": "identify", "messageId": "m", "userId": "u",
            "traits": {"fooBar": 1, "foo_bar": 2, "a'b": 3, "a;b": 4, "a b": 5},
            "_sdc_sequence": 6, "message_id": "shadow"
        }));
        let columns: HashSet<_> = r.fields.iter().map(|f| f.column.as_str()).collect();
        assert_eq!(columns.len(), r.fields.len(), "{columns:?}");
        assert!(columns.contains("traits__foo_bar"));
        assert!(columns.contains("traits__a_b"));
        assert_eq!(field(&r, "message_id"), Some(&SqlValue::Text("m".into())));
        assert_eq!(field(&r, "_sdc_sequence"), None);
        let values: HashSet<String> = r.fields.iter().map(|f| format!("{:?}", f.value)).collect();
        for v in 1..=6 {
            assert!(values.contains(&format!("BigInt({v})")), "{v} was lost");
        }
    }

    #[test]
    fn huge_integers_keep_their_digits() {
        let r = record(json!({"type": "page", "messageId": "m", "userId": "u",
            "properties": {"big": 18446744073709551615u64}}));
        assert_eq!(
            field(&r, "properties__big"),
            Some(&SqlValue::Text("18446744073709551615".into()))
        );
    }

    #[test]
    fn timestamps_parse_in_common_shapes() {
        let expected = parse_timestamp("2012-12-02T00:30:08.276Z").expect("rfc3339");
        for text in [
            "2012-12-02T00:30:08.276+00:00",
            "2012-12-02T01:30:08.276+0100",
            "2012-12-02 00:30:08.276",
            "2012-12-02T00:30:08.276",
        ] {
            assert_eq!(parse_timestamp(text), Some(expected), "{text}");
        }
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn catalog_type_names_round_trip() {
        for t in ColumnType::ALL {
            assert_eq!(ColumnType::from_catalog(t.sql()), Some(t));
        }
        assert_eq!(
            ColumnType::from_catalog("timestamp with time zone"),
            Some(ColumnType::Timestamp)
        );
        assert_eq!(ColumnType::from_catalog("numeric"), None);
    }
}
