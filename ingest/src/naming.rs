//! Column names for key paths: Stitch-style where that is safe, and never shared.
//!
//! A *key path* is the list of JSON keys from the event's top level down to a value
//! (`["context", "library", "name"]`). Its *candidate* name converts each key camelCase ->
//! snake_case, keeps the letters and digits of every script (lower-cased), turns every other
//! character into `_`, and joins the keys with `__` (`context__library__name`). The candidate is
//! the column's name when it is *clean*:
//!
//! - no character had to be replaced, and no key is empty or only underscores;
//! - it is not a name the databases or Sluice reserve ([`is_reserved`]): PostgreSQL's system
//!   columns (`ctid`, `xmin`, ...), SQLite's row id aliases (`rowid`, `oid`, `_rowid_`),
//!   Sluice's `_sdc_*` columns, and names ending in a split suffix (`__st`, `__bi`, ...), which
//!   belong to type-conflict columns;
//! - it fits PostgreSQL's 63 bytes;
//! - no other key path holds it already.
//!
//! Otherwise the name is the candidate (cut to leave room) followed by `_` and eight hex digits
//! of the SHA-1 of the key path ([`hashed_name`]), which no clean name and no split name can
//! equal. The loader records every assignment in the `_sdc_columns` table under the schema's DDL
//! lock ([`crate::load`]), so a key path keeps its column for the life of the table, on every
//! replica and across restarts, whatever else later events hold; and the first path to claim a
//! name keeps it. `anonymousId` is `anonymous_id` and `context.library.name` is
//! `context__library__name`, as in Stitch; `userId` and `user_id` side by side get
//! `properties__user_id` and `properties__user_id_1b2c3d4e`.

use std::fmt;

use sha1::{Digest, Sha1};

use crate::schema::ColumnType;

/// PostgreSQL's limit on identifier length, in bytes. SQLite has none, but uses the same names.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Names a client key may never produce as they are: system columns of PostgreSQL (which
/// refuses to create them) and SQLite's aliases of the row id (which would shadow it).
pub const DATABASE_SYSTEM_COLUMNS: [&str; 9] = [
    "tableoid", "xmin", "cmin", "xmax", "cmax", "ctid", "oid", "rowid", "_rowid_",
];

/// The prefix of Sluice's own columns and tables.
pub const SYSTEM_PREFIX: &str = "_sdc_";

/// The JSON keys from the top of an event down to one value. Cheap to hash and compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyPath(Box<str>);

/// Joins the keys of a [`KeyPath`]: U+0000, which no key holds once [`crate::json::repair`]
/// has run (and [`KeyPath::push`] replaces it in keys built otherwise).
const SEPARATOR: char = '\0';

impl KeyPath {
    /// The path of these keys.
    pub fn new<'a, I>(keys: I) -> KeyPath
    where
        I: IntoIterator<Item = &'a str>,
        I::IntoIter: Clone,
    {
        let keys = keys.into_iter();
        // Sized once: a path is built for every leaf of every event.
        let mut text = String::with_capacity(keys.clone().map(|k| k.len() + 1).sum());
        for (i, key) in keys.enumerate() {
            if i > 0 {
                text.push(SEPARATOR);
            }
            push_key(&mut text, key);
        }
        KeyPath(text.into_boxed_str())
    }

    /// The keys, top first.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.split(SEPARATOR)
    }

    /// The path as a JSON array of its keys, as `_sdc_columns.key_path` holds it.
    pub fn to_json(&self) -> String {
        serde_json::Value::from(self.keys().collect::<Vec<_>>()).to_string()
    }

    /// Reads [`KeyPath::to_json`]'s text back; `None` if it is not an array of strings.
    pub fn from_json(text: &str) -> Option<KeyPath> {
        let keys: Vec<String> = serde_json::from_str(text).ok()?;
        Some(KeyPath::new(keys.iter().map(String::as_str)))
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json())
    }
}

/// Appends a key, with U+0000 (the separator) replaced by U+FFFD.
fn push_key(out: &mut String, key: &str) {
    if key.contains(SEPARATOR) {
        out.push_str(&key.replace(SEPARATOR, "\u{fffd}"));
    } else {
        out.push_str(key);
    }
}

/// A key path's name before collisions are considered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The Stitch-style name, not yet cut to [`MAX_IDENTIFIER_BYTES`].
    pub name: String,
    /// Whether the name may be used as it is (see the module documentation), collisions aside.
    pub clean: bool,
    /// Whether the name is the keys as they are, joined with `__` (no case or character
    /// changed): among key paths that arrive together wanting one name, such a path gets it.
    pub exact: bool,
}

/// The candidate name of a key path.
pub fn candidate(path: &KeyPath) -> Candidate {
    let mut name = String::with_capacity(path.0.len() + 8);
    let mut clean = true;
    for (i, key) in path.keys().enumerate() {
        if i > 0 {
            name.push_str("__");
        }
        clean &= push_snake_case(&mut name, key);
    }
    clean &= name.len() <= MAX_IDENTIFIER_BYTES && !is_reserved(&name);
    let exact = clean && path.keys().collect::<Vec<_>>().join("__") == name;
    Candidate { name, clean, exact }
}

/// The Stitch-style name of a key path given as keys, before collisions are considered: what
/// a key path is called unless it needs a hash (see [`candidate`]).
pub fn column_name(keys: &[&str]) -> String {
    candidate(&KeyPath::new(keys.iter().copied())).name
}

/// Whether a name is one that client keys may not take as it is.
pub fn is_reserved(name: &str) -> bool {
    DATABASE_SYSTEM_COLUMNS.contains(&name)
        || name.starts_with(SYSTEM_PREFIX)
        || ColumnType::ALL
            .iter()
            .any(|t| name.ends_with(t.split_suffix()))
}

/// Converts one key and appends it; returns whether nothing was lost: every character kept
/// (lower-cased) or an `_` inserted at a camelCase word start, and the key not empty or only
/// underscores.
fn push_snake_case(out: &mut String, key: &str) -> bool {
    // The common case, already lower snake case, is copied as it is.
    if key
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        out.push_str(key);
        return key.bytes().any(|b| b != b'_');
    }
    let chars: Vec<char> = key.chars().collect();
    let mut clean = chars.iter().any(|c| *c != '_');
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let word_start = match prev {
                Some(p) if p.is_lowercase() || p.is_numeric() => true,
                Some(p) if p.is_uppercase() => next.is_some_and(char::is_lowercase),
                _ => false,
            };
            if word_start {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else if c.is_alphanumeric() || c == '_' {
            out.extend(c.to_lowercase());
        } else {
            out.push('_');
            clean = false;
        }
    }
    clean
}

/// Whether a name may be given to a key path, as the catalog of its table says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// No column has the name.
    Free,
    /// A column has it, but no key path is recorded for it (a table made before Sluice kept
    /// `_sdc_columns`): the path may take it over.
    Unrecorded,
    /// Another key path, or Sluice itself, holds it.
    Taken,
}

/// The column for a key path that has none yet: the candidate when it is clean and free (or
/// unrecorded), else the first free [`hashed_name`].
pub fn assign(path: &KeyPath, claim: impl Fn(&str) -> Claim) -> String {
    let candidate = candidate(path);
    if candidate.clean && claim(&candidate.name) != Claim::Taken {
        return candidate.name;
    }
    // A key named like Sluice's own columns loses its leading `_`, so that every `_sdc_*` column
    // is Sluice's: also a name that is only `_sdc` before the hash's `_` (a key `\u{17}sdc`
    // becomes `_sdc`, and `_sdc` + `_<hash>` would look like a system column).
    let system_stem = SYSTEM_PREFIX.trim_end_matches('_');
    let base = match candidate.name.strip_prefix('_') {
        Some(rest) if candidate.name.starts_with(system_stem) => rest.to_owned(),
        _ => candidate.name,
    };
    (0u32..)
        .map(|attempt| hashed_name(&base, path, attempt))
        .find(|name| claim(name) == Claim::Free)
        .unwrap_or_else(|| unreachable!("the attempts are endless"))
}

/// `<name>_<8 hex digits>`, at most [`MAX_IDENTIFIER_BYTES`]: the hash is of the key path (and,
/// after the first attempt, the attempt number), so it is the same in every process.
pub fn hashed_name(name: &str, path: &KeyPath, attempt: u32) -> String {
    let mut input = path.to_json();
    if attempt > 0 {
        input.push_str(&format!("#{attempt}"));
    }
    with_hash(name, &short_hash(&input))
}

/// The split column that holds values of `value_type` for the column `column`.
pub fn split_column_name(column: &str, value_type: ColumnType) -> String {
    let name = format!("{column}{}", value_type.split_suffix());
    if name.len() <= MAX_IDENTIFIER_BYTES {
        name
    } else {
        with_hash(column, &short_hash(&name))
    }
}

/// `<name>_<hash>`, with `name` cut at a character boundary so the whole fits.
fn with_hash(name: &str, hash: &str) -> String {
    let mut keep = name.len().min(MAX_IDENTIFIER_BYTES - hash.len() - 1);
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}_{hash}", &name[..keep])
}

/// Eight hex digits of the SHA-1 of `text`: stable across versions and processes.
fn short_hash(text: &str) -> String {
    hex::encode(&Sha1::digest(text.as_bytes())[..4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    fn path(keys: &[&str]) -> KeyPath {
        KeyPath::new(keys.iter().copied())
    }

    #[test]
    fn ordinary_keys_keep_stitch_names() {
        for (keys, name) in [
            (&["anonymousId"][..], "anonymous_id"),
            (&["originalTimestamp"], "original_timestamp"),
            (&["context", "library", "name"], "context__library__name"),
            (&["properties", "userID"], "properties__user_id"),
            (&["traits", "HTTPServer"], "traits__http_server"),
            (&["traits", "prénom"], "traits__prénom"),
            (&["traits", "Имя"], "traits__имя"),
            (&["traits", "名前"], "traits__名前"),
            (&["properties", "1st_place"], "properties__1st_place"),
            (&["_metadata", "bundled"], "_metadata__bundled"),
        ] {
            let c = candidate(&path(keys));
            assert_eq!(c.name, name);
            assert!(c.clean, "{keys:?}");
        }
    }

    #[test]
    fn names_that_lost_characters_or_are_reserved_get_a_hash() {
        for keys in [
            &["properties", ""][..],
            &["properties", " "],
            &["properties", "$browser"],
            &["properties", "a-b"],
            &["properties", "🔥score"],
            &["properties", "_"],
            &["properties", "__"],
            &["xmin"],
            &["ctid"],
            &["rowid"],
            &["_sdc_sequence"],
            &["\u{17}sdc"],
            &["_sdc"; 20],
            &["properties", "amount__st"],
        ] {
            let p = path(keys);
            assert!(!candidate(&p).clean, "{keys:?}");
            let name = assign(&p, |_| Claim::Free);
            assert!(name.len() <= MAX_IDENTIFIER_BYTES);
            assert!(!is_reserved(&name), "{name}");
            assert_eq!(name.len() - name.rfind('_').expect("hash") - 1, 8);
        }
    }

    #[test]
    fn long_names_are_cut_with_a_hash() {
        let long = "a".repeat(300);
        let name = assign(&path(&[&long]), |_| Claim::Free);
        assert_eq!(name.len(), MAX_IDENTIFIER_BYTES);
        assert!(name.starts_with(&"a".repeat(54)));
        let split = split_column_name(&name, ColumnType::Text);
        assert_eq!(split.len(), MAX_IDENTIFIER_BYTES);
        assert_ne!(split, name);
        let multibyte = "é".repeat(40);
        assert!(assign(&path(&[&multibyte]), |_| Claim::Free).len() <= MAX_IDENTIFIER_BYTES);
    }

    #[test]
    fn a_taken_name_sends_the_next_path_to_a_hash() {
        let taken = |name: &str| {
            if name == "properties__user_id" {
                Claim::Taken
            } else {
                Claim::Free
            }
        };
        let name = assign(&path(&["properties", "userId"]), taken);
        assert!(name.starts_with("properties__user_id_"), "{name}");
        let unrecorded = |_: &str| Claim::Unrecorded;
        assert_eq!(
            assign(&path(&["properties", "userId"]), unrecorded),
            "properties__user_id"
        );
    }

    #[test]
    fn key_paths_round_trip_through_json() {
        let p = path(&["properties", "a\"b", "", "\u{0}x"]);
        assert_eq!(KeyPath::from_json(&p.to_json()), Some(p.clone()));
        assert_eq!(p.keys().nth(3), Some("\u{fffd}x"));
    }

    /// Delivers `paths` in batches of the given sizes to a table's catalog, as the loader does
    /// (`TableColumns::plan_columns` under the DDL lock, then recorded), and returns the
    /// catalog's key path -> first column mapping.
    fn deliver(
        table: &mut crate::schema::TableColumns,
        paths: &[Vec<String>],
        batch_sizes: &[usize],
    ) -> HashMap<KeyPath, String> {
        let mut rest = paths;
        let mut sizes = batch_sizes.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
            let (batch, later) = rest.split_at(n);
            rest = later;
            let needs: Vec<(KeyPath, ColumnType)> = batch
                .iter()
                .map(|keys| {
                    (
                        KeyPath::new(keys.iter().map(String::as_str)),
                        ColumnType::Text,
                    )
                })
                .collect();
            for new in table.plan_columns(crate::event::Table::Track, &needs) {
                table.insert(&new.record, Some(new.record.column_type));
            }
        }
        table
            .paths
            .iter()
            .map(|(p, cols)| (p.clone(), cols[0].name.clone()))
            .collect()
    }

    fn new_track_table() -> crate::schema::TableColumns {
        crate::schema::TableColumns::new_table(crate::event::Table::Track)
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z_]{0,6}",
            "[a-z]{1,4}[A-Z][a-z]{0,3}",
            "[ _$.\\-a-zA-Zé🔥Я0-9]{0,5}",
            Just("xmin".to_owned()),
            Just("amount__st".to_owned()),
            Just("_sdc_sequence".to_owned()),
            "[a-z]{60,70}",
        ]
    }

    proptest! {
        /// Whatever keys arrive, in whatever order and grouping into batches, no two key paths
        /// share a column, no path takes a reserved, system or split name, and a path's column
        /// never changes once given.
        #[test]
        fn mapping_is_injective_and_stable(
            paths in proptest::collection::vec(proptest::collection::vec(key(), 1..4), 1..40),
            sizes in proptest::collection::vec(1usize..8, 1..5),
            seed in any::<u64>(),
        ) {
            let mut table = new_track_table();
            let first = deliver(&mut table, &paths, &sizes);
            let names: HashSet<&String> = first.values().collect();
            prop_assert_eq!(names.len(), first.len(), "two paths share a column");
            for (p, name) in &first {
                if p.keys().count() == 1 && table.recorded.contains(name) && crate::schema::base_columns(crate::event::Table::Track).iter().any(|c| c.name == name) {
                    continue;
                }
                prop_assert!(name.len() <= MAX_IDENTIFIER_BYTES);
                prop_assert!(!name.is_empty());
                prop_assert!(!is_reserved(name), "{} for {}", name, p);
            }
            // Delivered again in another order and grouping, nothing moves.
            let mut shuffled = paths.clone();
            let n = shuffled.len();
            for i in 0..n {
                let j = (seed.rotate_left(i as u32) as usize) % n;
                shuffled.swap(i, j);
            }
            let again = deliver(&mut table, &shuffled, &[n]);
            prop_assert_eq!(&again, &first);
            // A fresh table fed the shuffled order is injective too.
            let fresh = deliver(&mut new_track_table(), &shuffled, &sizes);
            let fresh_names: HashSet<&String> = fresh.values().collect();
            prop_assert_eq!(fresh_names.len(), fresh.len());
        }
    }
}
