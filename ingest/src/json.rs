//! Request bodies as JSON, read the way Segment's senders really write it.
//!
//! Segment's own libraries emit JSON that a strict parser refuses or mangles, and refusing it
//! loses whole batches (libraries drop a batch on 400). Before parsing, one pass over the bytes
//! ([`repair`]) changes what a strict parser cannot take into what it can, without changing any
//! valid character:
//!
//! | in the body | becomes | why |
//! |---|---|---|
//! | `\u0000` in a string | `\ufffd` (U+FFFD) | PostgreSQL `text` and `jsonb` cannot hold U+0000 |
//! | a lone UTF-16 surrogate escape (`\ud83d` cut from its pair) in a string | `\ufffd` | browsers cut strings inside a pair |
//! | either in an object key, and U+FFFD in a key | U+FFFD and the four hex digits of what it replaced (`src\ufffd0000tag`, `a\ufffdfffd`) | keys that differed must stay different, or one value would be lost |
//! | the bare tokens `NaN`, `Infinity`, `-Infinity` | a tagged string (below) | analytics-python writes them |
//! | an integer outside `-2^63 ..= 2^63-1`, or a number beyond a double's range (`1e400`) | a tagged string of its exact text | `serde_json` would round the one and refuse the other |
//!
//! A *tagged string* starts with U+0000, which no other string can contain after the repair, so
//! [`special`] tells them apart from anything a client sent. [`crate::normalize`] stores them as
//! double precision (`NaN`, `±Infinity`) or as text with the exact digits; [`write_json`]
//! writes them back as the strings `"NaN"`, `"Infinity"`, `"-Infinity"` and as bare digits
//! where JSON is stored (a `jsonb` column cannot hold a non-finite number).
//!
//! Nesting deeper than [`MAX_DEPTH`] is refused before parsing, so no input can exhaust the
//! stack of the parser or of the code that walks the parsed value.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

/// The deepest nesting of objects and arrays a body may have. Segment's 32 KB events fit
/// thousands of levels, but nobody's data is that deep on purpose; 512 leaves room for every
/// real payload and keeps the recursive parser well inside a thread's stack.
pub const MAX_DEPTH: usize = 512;

/// The first character of a tagged string: see the module documentation.
const TAG: char = '\0';

/// Why a body is not JSON Sluice can read.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Objects and arrays nest deeper than [`MAX_DEPTH`].
    #[error("JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// Not JSON, even after the repairs.
    #[error("{0}")]
    Syntax(#[from] serde_json::Error),
}

/// A value that JSON text can hold but `serde_json::Value` cannot, read from a tagged string.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Special<'a> {
    /// `NaN`, `Infinity` or `-Infinity`.
    NonFinite(f64),
    /// A number neither `bigint` nor `double precision` holds exactly (an integer beyond 64 bits,
    /// a decimal beyond a double's range), as the client wrote it.
    BigNumber(&'a str),
}

impl Special<'_> {
    /// The value as text: `NaN`, `Infinity`, `-Infinity`, or the digits.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Special::NonFinite(f) => Cow::Borrowed(non_finite_name(*f)),
            Special::BigNumber(digits) => Cow::Borrowed(digits),
        }
    }
}

/// The name JSON writers use for a non-finite double.
pub fn non_finite_name(f: f64) -> &'static str {
    if f.is_nan() {
        "NaN"
    } else if f > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// Reads a tagged string made by [`repair`]; `None` for every other string.
pub fn special(text: &str) -> Option<Special<'_>> {
    let rest = text.strip_prefix(TAG)?;
    Some(match rest {
        "NaN" => Special::NonFinite(f64::NAN),
        "Infinity" => Special::NonFinite(f64::INFINITY),
        "-Infinity" => Special::NonFinite(f64::NEG_INFINITY),
        text => Special::BigNumber(text),
    })
}

/// Parses a body after [`repair`], with the parser's own depth limit lifted (the repair has
/// checked the depth).
pub fn parse<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, JsonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    deserializer.disable_recursion_limit();
    let value = T::deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// Repairs a body as the module documentation describes, or refuses it as too deep. Borrows
/// the body when nothing needed repair, which is the common case. Never fails on malformed JSON:
/// what it does not understand it leaves for the parser to report.
pub fn repair(body: &[u8]) -> Result<Cow<'_, [u8]>, JsonError> {
    let mut out: Option<Vec<u8>> = None;
    // Everything before `copied` is already in `out` (when there is an `out`).
    let mut copied = 0;
    let mut replace = |out: &mut Option<Vec<u8>>, from: usize, to: usize, with: &[u8]| {
        let buffer = out.get_or_insert_with(|| Vec::with_capacity(body.len() + 16));
        buffer.extend_from_slice(&body[copied..from]);
        buffer.extend_from_slice(with);
        copied = to;
    };
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(JsonError::TooDeep);
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' => {
                // Escapes to repair, and U+FFFD the client sent (which keys must mark too).
                let mut marks: Vec<Mark> = Vec::new();
                i += 1;
                while i < body.len() {
                    // Only a quote, a backslash or the first byte of U+FFFD needs a look.
                    match memchr::memchr3(b'"', b'\\', REPLACEMENT_UTF8[0], &body[i..]) {
                        Some(skip) => i += skip,
                        None => i = body.len(),
                    }
                    if i == body.len() || body[i] == b'"' {
                        break;
                    }
                    if body[i] == b'\\' {
                        match (body.get(i + 1), escaped_unit(body, i)) {
                            (Some(b'u'), Some(unit @ 0xD800..=0xDBFF)) => {
                                if matches!(escaped_unit(body, i + 6), Some(0xDC00..=0xDFFF)) {
                                    i += 12;
                                } else {
                                    marks.push(Mark::repair(i, 6, unit));
                                    i += 6;
                                }
                            }
                            (Some(b'u'), Some(unit @ (0 | 0xDC00..=0xDFFF))) => {
                                marks.push(Mark::repair(i, 6, unit));
                                i += 6;
                            }
                            (Some(b'u'), Some(0xFFFD)) => {
                                marks.push(Mark::sent(i, 6));
                                i += 6;
                            }
                            _ => i += 2,
                        }
                    } else if body[i] == REPLACEMENT_UTF8[0]
                        && body[i..].starts_with(REPLACEMENT_UTF8)
                    {
                        marks.push(Mark::sent(i, 3));
                        i += 3;
                    } else {
                        i += 1;
                    }
                }
                i += 1;
                if marks.is_empty() {
                    continue;
                }
                let key = is_key(body, i);
                for mark in marks {
                    if key {
                        let with = format!("\\ufffd{:04x}", mark.unit);
                        replace(&mut out, mark.at, mark.at + mark.len, with.as_bytes());
                    } else if mark.repair {
                        replace(&mut out, mark.at, mark.at + mark.len, br"\ufffd");
                    }
                }
            }
            b'N' | b'I' | b'-' if non_finite_token(&body[i..]).is_some() => {
                let token = non_finite_token(&body[i..]).unwrap_or_default();
                let tagged = format!("\"\\u0000{token}\"");
                replace(&mut out, i, i + token.len(), tagged.as_bytes());
                i += token.len();
            }
            b'-' | b'0'..=b'9' => {
                let end = number_end(body, i);
                let token = &body[i..end];
                if needs_exact_text(token) {
                    let mut tagged = Vec::with_capacity(token.len() + 10);
                    tagged.extend_from_slice(b"\"\\u0000");
                    tagged.extend_from_slice(token);
                    tagged.push(b'"');
                    replace(&mut out, i, end, &tagged);
                }
                i = end.max(i + 1);
            }
            _ => i += 1,
        }
    }
    Ok(match out {
        None => Cow::Borrowed(body),
        Some(mut buffer) => {
            buffer.extend_from_slice(&body[copied..]);
            Cow::Owned(buffer)
        }
    })
}

/// U+FFFD in UTF-8.
const REPLACEMENT_UTF8: &[u8] = "\u{fffd}".as_bytes();

/// A place in a string that [`repair`] may rewrite.
struct Mark {
    /// Where it starts in the body, and its length in bytes.
    at: usize,
    len: usize,
    /// The UTF-16 unit it stands for.
    unit: u32,
    /// Whether it must be repaired (U+0000 or a lone surrogate), or is a U+FFFD the client sent.
    repair: bool,
}

impl Mark {
    fn repair(at: usize, len: usize, unit: u32) -> Mark {
        Mark {
            at,
            len,
            unit,
            repair: true,
        }
    }

    fn sent(at: usize, len: usize) -> Mark {
        Mark {
            at,
            len,
            unit: 0xFFFD,
            repair: false,
        }
    }
}

/// Whether the string that ended just before `at` is an object key: a `:` follows.
fn is_key(body: &[u8], at: usize) -> bool {
    body[at.min(body.len())..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b':')
}

/// The UTF-16 unit of a `\uXXXX` escape starting at `at`, if there is one.
fn escaped_unit(body: &[u8], at: usize) -> Option<u32> {
    let escape = body.get(at..at + 6)?;
    if escape[0] != b'\\' || escape[1] != b'u' {
        return None;
    }
    let hex = std::str::from_utf8(&escape[2..]).ok()?;
    u32::from_str_radix(hex, 16).ok()
}

/// `NaN`, `Infinity` or `-Infinity` at the start of `rest`, ending where a JSON token may end.
fn non_finite_token(rest: &[u8]) -> Option<&'static str> {
    ["NaN", "Infinity", "-Infinity"].into_iter().find(|token| {
        rest.starts_with(token.as_bytes())
            && rest
                .get(token.len())
                .is_none_or(|b| !b.is_ascii_alphanumeric())
    })
}

/// Where the number token starting at `start` ends.
fn number_end(body: &[u8], start: usize) -> usize {
    let mut end = start + 1;
    while end < body.len() && matches!(body[end], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
        end += 1;
    }
    end
}

/// Whether a number token is an integer (no fraction, no exponent) outside `i64`, or a number
/// whose magnitude no double reaches: too large (it would be infinite) or too small (it would
/// be 0 though it is not).
fn needs_exact_text(token: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(token) else {
        return false;
    };
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.bytes().all(|b| b.is_ascii_digit()) {
        // i64 has 19 digits at most; anything shorter fits.
        return digits.len() >= 19 && text.parse::<i64>().is_err();
    }
    let mantissa = digits.split(['e', 'E']).next().unwrap_or_default();
    let zero = !mantissa.bytes().any(|b| (b'1'..=b'9').contains(&b));
    text.parse::<f64>()
        .is_ok_and(|f| f.is_infinite() || (f == 0.0 && !zero))
}

/// The most digits of an integer written as a bare number in stored JSON; longer ones, and other
/// big numbers, are written as strings (PostgreSQL's `numeric`, which `jsonb` numbers are, holds
/// 131072 digits before the point and none past an exponent of that size).
const MAX_JSON_INTEGER_DIGITS: usize = 1000;

/// Writes `value` as JSON text, with tagged strings written back as what the client sent:
/// integers beyond 64 bits as bare numbers (up to 1000 digits), other big numbers as strings of
/// their text, non-finite numbers as the strings `"NaN"`, `"Infinity"` and `"-Infinity"` (JSON,
/// and so `jsonb`, has no such numbers).
///
/// JSON text is built as bytes: every piece is UTF-8 (strings as `serde_json` escapes them,
/// which escapes only ASCII characters), so the whole is checked once, by [`to_json_text`] or
/// whoever turns the bytes into a `String`, not piece by piece.
pub fn write_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::String(s) => match special(s) {
            Some(Special::BigNumber(text)) if is_json_integer(text) => {
                out.extend_from_slice(text.as_bytes());
            }
            Some(Special::BigNumber(text)) => write_string(text, out),
            Some(Special::NonFinite(f)) => write_string(non_finite_name(f), out),
            None => write_string(s, out),
        },
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_json(item, out);
            }
            out.push(b'}');
        }
        // Numbers, booleans and null print the same in every writer.
        scalar => write_serde(scalar, out),
    }
}

/// Whether a big number's text is an integer short enough to store as a JSON number.
fn is_json_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    digits.len() <= MAX_JSON_INTEGER_DIGITS && digits.bytes().all(|b| b.is_ascii_digit())
}

/// [`write_json`] into a new string.
pub fn to_json_text(value: &Value) -> String {
    let mut out = Vec::new();
    write_json(value, &mut out);
    utf8(out)
}

/// Writes a JSON string literal, escaped by serde_json.
pub fn write_string(text: &str, out: &mut Vec<u8>) {
    write_serde(text, out);
}

/// Appends what serde_json writes for `value`.
fn write_serde<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    serde_json::to_writer(out, value).expect("serde_json writes a string or scalar to a Vec");
}

/// JSON text built by [`write_json`] and [`write_string`] as a `String`.
///
/// # Panics
/// If `bytes` is not UTF-8, which the writers above never produce from Rust strings.
pub fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("JSON written from Rust strings is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(body: &str) -> Result<Value, JsonError> {
        let repaired = repair(body.as_bytes())?;
        parse(&repaired)
    }

    #[test]
    fn strings_are_written_as_serde_json_escapes_them() {
        for text in [
            "",
            "plain",
            "quote \" and backslash \\",
            "controls \u{0}\u{1f}\n\t\r",
            "é, 中文, 🙂 and \u{fffd}",
            "\u{7f}\u{2028}",
        ] {
            let mut out = b"before:".to_vec();
            write_string(text, &mut out);
            assert_eq!(
                utf8(out),
                format!("before:{}", serde_json::to_string(text).expect("text"))
            );
        }
    }

    #[test]
    fn valid_json_is_borrowed_unchanged() {
        let body = br#"{"a": "x \" \\u0000 \ud83d\ude80", "n": [1, -2.5e3, 9223372036854775807]}"#;
        assert!(matches!(repair(body), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn nul_and_lone_surrogates_become_replacement_characters() {
        let value = read(r#"{"a\u0000b": "\u0000", "t": "deal \ud83d", "l": "\ude00 x", "p": "\ud83d\ude80", "hh": "\ud83d\ud83d\ude80"}"#)
            .expect("repaired");
        assert_eq!(value["a\u{fffd}0000b"], "\u{fffd}");
        assert_eq!(value["t"], "deal \u{fffd}");
        assert_eq!(value["l"], "\u{fffd} x");
        assert_eq!(value["p"], "🚀");
        assert_eq!(value["hh"], "\u{fffd}🚀");
    }

    #[test]
    fn repaired_keys_stay_distinct() {
        let value = read(
            "{\"a\\u0000\": 1, \"a\\ufffd\": 2, \"a\u{fffd}x\": 3, \"b\\ud800\" : 4, \"b\\udc00\": 5, \"v\": \"\\u0000\u{fffd}\"}",
        )
        .expect("repaired");
        let object = value.as_object().expect("object");
        assert_eq!(object.len(), 6, "{object:?}");
        assert_eq!(value["a\u{fffd}0000"], 1);
        assert_eq!(value["a\u{fffd}fffd"], 2);
        assert_eq!(value["a\u{fffd}fffdx"], 3);
        assert_eq!(value["b\u{fffd}d800"], 4);
        assert_eq!(value["b\u{fffd}dc00"], 5);
        assert_eq!(
            value["v"], "\u{fffd}\u{fffd}",
            "values only lose what cannot be stored"
        );
    }

    #[test]
    fn escaped_backslashes_are_not_escapes() {
        let value = read(r#"{"a": "\\ud83d", "b": "\\\ud83d"}"#).expect("parsed");
        assert_eq!(value["a"], "\\ud83d");
        assert_eq!(value["b"], "\\\u{fffd}");
    }

    #[test]
    fn non_finite_tokens_become_tagged_strings() {
        let value = read(r#"{"n": NaN, "i": Infinity, "m": -Infinity, "s": "NaN", "a": [NaN]}"#)
            .expect("repaired");
        let tagged = |key: &str| special(value[key].as_str().expect("string"));
        assert!(matches!(tagged("n"), Some(Special::NonFinite(f)) if f.is_nan()));
        assert_eq!(tagged("i"), Some(Special::NonFinite(f64::INFINITY)));
        assert_eq!(tagged("m"), Some(Special::NonFinite(f64::NEG_INFINITY)));
        assert_eq!(tagged("s"), None, "a string that says NaN stays a string");
        assert_eq!(to_json_text(&value["a"]), r#"["NaN"]"#);
    }

    #[test]
    fn integers_beyond_64_bits_keep_their_digits() {
        let value = read(
            r#"{"max": 9223372036854775807, "over": 9223372036854775808, "u": 18446744073709551616,
                "neg": -9223372036854775809, "min": -9223372036854775808, "f": 1e400, "x": 1.5}"#,
        )
        .expect("repaired");
        assert_eq!(value["max"], json!(i64::MAX));
        assert_eq!(value["min"], json!(i64::MIN));
        for (key, digits) in [
            ("over", "9223372036854775808"),
            ("u", "18446744073709551616"),
            ("neg", "-9223372036854775809"),
        ] {
            assert_eq!(
                special(value[key].as_str().expect("tagged")),
                Some(Special::BigNumber(digits))
            );
        }
        assert_eq!(value["x"], json!(1.5));
        assert_eq!(
            special(value["f"].as_str().expect("tagged")),
            Some(Special::BigNumber("1e400"))
        );
        let text = to_json_text(&json!([value["over"], value["neg"]]));
        assert_eq!(text, "[9223372036854775808,-9223372036854775809]");
    }

    #[test]
    fn nesting_is_bounded_but_deep_enough() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(read(&deep(MAX_DEPTH)).is_ok());
        assert!(matches!(
            read(&deep(MAX_DEPTH + 1)),
            Err(JsonError::TooDeep)
        ));
        assert!(matches!(
            repair(deep(100_000).as_bytes()),
            Err(JsonError::TooDeep)
        ));
        // Brackets inside strings do not count.
        let in_string = format!(r#"{{"a": "{}"}}"#, "[".repeat(10_000));
        assert!(read(&in_string).is_ok());
    }

    #[test]
    fn malformed_input_is_left_for_the_parser() {
        for body in [
            "{",
            "\"\\u12",
            "\"\\ud83d\\u",
            "-",
            "NaNa",
            "[1,]",
            "\"abc",
            "\\",
            "\"\\",
            "{\"a\": \"x\\",
        ] {
            assert!(repair(body.as_bytes()).is_ok(), "{body}");
            assert!(read(body).is_err(), "{body}");
        }
        // A string cut off inside a U+FFFD, or inside the escape after it.
        for body in [&b"\"\xEF\xBF"[..], b"\"\xEF\xBF\xBD\\u00", b"\"ab\xEF"] {
            assert!(repair(body).is_ok(), "{body:?}");
            assert!(parse::<Value>(&repair(body).expect("repaired")).is_err());
        }
    }
}
