//! Column selection: which of an event's key paths are loaded, and how. Stitch's Segment
//! integration loads every key it sees (its feature list marks column selection unsupported);
//! Sluice lets a user keep values out of the warehouse, keep a subtree as one `jsonb` value, store
//! a value only as a keyed hash, and give a table a smaller column budget.
//!
//! A selection is JSON, by table (`"*"` for every table; a table's own rules add to those):
//!
//! ```json
//! {
//!   "*":     {"exclude": ["context.ip", "context.userAgent"], "pseudonymize": ["traits.email"]},
//!   "track": {"json": ["properties.experiments"], "maxColumns": 300},
//!   "page":  {"include": ["properties.path", "properties.title"]}
//! }
//! ```
//!
//! A pattern is a key path from the event's top level, keys joined by `.` (`\.` for a dot inside
//! a key, `\\` for a backslash), `*` standing for any one key. It matches that path and
//! everything below it (`properties.card` and `properties.card.*` both keep the card's number
//! out). `include` keeps only the paths it matches, besides the fields every table has (the
//! identity fields, `type`, the timestamps, `event`, `name`). The primary key `messageId` and
//! `type` cannot be selected away.
//!
//! Excluded values are never written anywhere (not even to `_sdc_overflow`) and are counted per
//! table in `/metrics`. A selection applies to events loaded after it takes effect; rows already
//! loaded are never rewritten.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::event::Table;
use crate::schema::{COLUMN_LIMIT, base_columns};

/// Why a selection cannot be used. Each says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// The text is not a selection.
    #[error("the column selection is not valid JSON of the documented shape: {0}")]
    Malformed(String),
    /// A key that is neither `*` nor a table.
    #[error("the column selection names {0:?}: use \"*\" or one of {names}", names = Table::names())]
    UnknownTable(String),
    /// An empty pattern or key.
    #[error("the column selection pattern {0:?} has an empty key")]
    EmptyKey(String),
    /// A pattern that would select away the primary key or the call type.
    #[error(
        "the column selection pattern {0:?} would {1} \"{2}\", which every row needs; remove it"
    )]
    Protected(String, &'static str, &'static str),
    /// A column budget outside what a table can hold.
    #[error("maxColumns of {table} is {got}: it must be between {min} and {COLUMN_LIMIT}")]
    Budget {
        /// The table.
        table: String,
        /// The budget asked for.
        got: usize,
        /// The fewest columns the table is created with.
        min: usize,
    },
    /// Pseudonymization is asked for without a key.
    #[error(
        "the column selection pseudonymizes values but no key is set: give \
         --pseudonymization-key (SLUICE_PSEUDONYMIZATION_KEY) a secret of at least 16 bytes"
    )]
    MissingKey,
    /// The key is too short to resist guessing.
    #[error("the pseudonymization key is {0} bytes; use at least 16")]
    ShortKey(usize),
}

/// One key of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// This key exactly.
    Is(String),
    /// Any one key (`*`).
    Any,
}

/// A key-path pattern (`properties.card.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    keys: Vec<Key>,
}

impl Pattern {
    /// Parses a pattern: keys joined by `.`, `\.` a dot inside a key, `\\` a backslash, `*` any
    /// one key. A trailing `.*` is the same as none (a pattern matches what is below it too).
    pub fn parse(text: &str) -> Result<Pattern, SelectionError> {
        let mut keys = Vec::new();
        let mut key = String::new();
        let mut chars = text.chars();
        let finish = |key: &mut String, keys: &mut Vec<Key>| {
            if key.is_empty() {
                return Err(SelectionError::EmptyKey(text.to_owned()));
            }
            keys.push(if key == "*" {
                Key::Any
            } else {
                Key::Is(std::mem::take(key))
            });
            key.clear();
            Ok(())
        };
        while let Some(c) = chars.next() {
            match c {
                '\\' => key.push(chars.next().unwrap_or('\\')),
                '.' => finish(&mut key, &mut keys)?,
                c => key.push(c),
            }
        }
        finish(&mut key, &mut keys)?;
        while keys.len() > 1 && keys.last() == Some(&Key::Any) {
            keys.pop();
        }
        Ok(Pattern {
            text: text.to_owned(),
            keys,
        })
    }

    /// Whether the pattern matches `path` or a path above it.
    pub fn covers(&self, path: &[String]) -> bool {
        path.len() >= self.keys.len()
            && self.keys.iter().zip(path).all(|(key, part)| match key {
                Key::Any => true,
                Key::Is(k) => k == part,
            })
    }

    /// Whether `path` is above what the pattern matches (so flattening must go on to find it).
    fn leads_to(&self, path: &[String]) -> bool {
        path.len() < self.keys.len()
            && self.keys.iter().zip(path).all(|(key, part)| match key {
                Key::Any => true,
                Key::Is(k) => k == part,
            })
    }
}

/// The column selection rules of one table (or of every table, under `*`), as written: key-path
/// patterns (keys joined by `.`, `*` for any one key, each matching what is below it too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ColumnRules {
    /// Key paths whose values are never loaded (e.g. `context.ip`, `properties.card`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// When set, only these key paths load, besides the fields every table has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include: Option<Vec<String>>,
    /// Key paths stored whole as one JSON value (maps keyed by ids, e.g.
    /// `properties.experiments`), instead of a column per key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub json: Vec<String>,
    /// Key paths stored as the HMAC-SHA-256 of their text under the pseudonymization key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pseudonymize: Vec<String>,
    /// The most columns the table may have (at most 1500); later keys go to `_sdc_overflow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = COLUMN_LIMIT)))]
    pub max_columns: Option<usize>,
}

/// What to do with a value at a key path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Load it as usual (an object: look at its keys).
    Load,
    /// Keep it out of the warehouse.
    Exclude,
    /// Store it whole as one `jsonb` value.
    Json,
    /// Store the keyed hash of its text instead.
    Pseudonymize,
}

/// The rules in force for one table: `*`'s and the table's own.
#[derive(Debug, Clone, Default)]
pub struct TableSelection {
    exclude: Vec<Pattern>,
    include: Option<Vec<Pattern>>,
    json: Vec<Pattern>,
    pseudonymize: Vec<Pattern>,
    base_keys: Vec<&'static str>,
    key: Option<Vec<u8>>,
    /// The table's column budget ([`COLUMN_LIMIT`] unless set lower).
    pub max_columns: usize,
}

impl TableSelection {
    /// No rules: every key loads, as Stitch does.
    pub fn everything() -> TableSelection {
        TableSelection {
            max_columns: COLUMN_LIMIT,
            ..TableSelection::default()
        }
    }

    /// What to do with the value at `path` (keys from the event's top level).
    pub fn treatment(&self, path: &[String]) -> Treatment {
        let any = |patterns: &[Pattern]| patterns.iter().any(|p| p.covers(path));
        if any(&self.exclude) {
            return Treatment::Exclude;
        }
        if let Some(include) = &self.include {
            let base = path.len() == 1 && self.base_keys.contains(&path[0].as_str());
            let kept = include.iter().any(|p| p.covers(path) || p.leads_to(path));
            if !base && !kept {
                return Treatment::Exclude;
            }
        }
        if any(&self.json) {
            return Treatment::Json;
        }
        if self.key.is_some() && any(&self.pseudonymize) {
            return Treatment::Pseudonymize;
        }
        Treatment::Load
    }

    /// Whether any rule can change an event (so normalisation must look at every path).
    pub fn is_everything(&self) -> bool {
        self.exclude.is_empty()
            && self.include.is_none()
            && self.json.is_empty()
            && self.pseudonymize.is_empty()
    }

    /// The pseudonym of `text`: HMAC-SHA-256 under the key, as 64 lowercase hex digits (RFC 2104
    /// with SHA-256). The same text gives the same pseudonym on every replica, so joins on it
    /// still work; without the key it cannot be recomputed from a guess.
    pub fn pseudonym(&self, text: &str) -> String {
        let key = self.key.as_deref().unwrap_or_default();
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
        mac.update(text.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// A whole selection: the rules of each table.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    tables: BTreeMap<Table, TableSelection>,
}

impl Selection {
    /// Parses a selection (the JSON above; empty text is no selection) with the pseudonymization
    /// key, if one is given.
    pub fn parse(text: &str, key: Option<&str>) -> Result<Selection, SelectionError> {
        let specs: BTreeMap<String, ColumnRules> = if text.trim().is_empty() {
            BTreeMap::new()
        } else {
            serde_json::from_str(text).map_err(|e| SelectionError::Malformed(e.to_string()))?
        };
        let key = key.filter(|k| !k.is_empty()).map(str::as_bytes);
        if let Some(key) = key
            && key.len() < 16
        {
            return Err(SelectionError::ShortKey(key.len()));
        }
        for name in specs.keys() {
            if name != "*" && name.parse::<Table>().is_err() {
                return Err(SelectionError::UnknownTable(name.clone()));
            }
        }
        let all = specs.get("*").cloned().unwrap_or_default();
        let mut tables = BTreeMap::new();
        for table in Table::ALL {
            let own = specs.get(table.name()).cloned().unwrap_or_default();
            let selection = table_selection(table, &all, &own, key)?;
            tables.insert(table, selection);
        }
        Ok(Selection { tables })
    }

    /// The rules of `table`.
    pub fn table(&self, table: Table) -> &TableSelection {
        static EVERYTHING: LazyLock<TableSelection> = LazyLock::new(TableSelection::everything);
        self.tables.get(&table).unwrap_or(&EVERYTHING)
    }

    /// Each table's column budget.
    pub fn column_budgets(&self) -> BTreeMap<Table, usize> {
        Table::ALL
            .into_iter()
            .map(|t| (t, self.table(t).max_columns))
            .collect()
    }
}

fn table_selection(
    table: Table,
    all: &ColumnRules,
    own: &ColumnRules,
    key: Option<&[u8]>,
) -> Result<TableSelection, SelectionError> {
    let parse = |texts: &[String]| -> Result<Vec<Pattern>, SelectionError> {
        texts.iter().map(|t| Pattern::parse(t)).collect()
    };
    let both = |pick: fn(&ColumnRules) -> &Vec<String>| -> Result<Vec<Pattern>, SelectionError> {
        let mut patterns = parse(pick(all))?;
        patterns.extend(parse(pick(own))?);
        Ok(patterns)
    };
    let include = match (&all.include, &own.include) {
        (None, None) => None,
        (a, b) => {
            let mut patterns = parse(a.as_deref().unwrap_or_default())?;
            patterns.extend(parse(b.as_deref().unwrap_or_default())?);
            Some(patterns)
        }
    };
    let selection = TableSelection {
        exclude: both(|r| &r.exclude)?,
        include,
        json: both(|r| &r.json)?,
        pseudonymize: both(|r| &r.pseudonymize)?,
        base_keys: base_columns(table).iter().filter_map(|c| c.key).collect(),
        key: key.map(<[u8]>::to_vec),
        max_columns: own.max_columns.or(all.max_columns).unwrap_or(COLUMN_LIMIT),
    };
    let min = base_columns(table).len();
    if !(min..=COLUMN_LIMIT).contains(&selection.max_columns) {
        return Err(SelectionError::Budget {
            table: table.name().to_owned(),
            got: selection.max_columns,
            min,
        });
    }
    for (patterns, what) in [
        (&selection.exclude, "exclude"),
        (&selection.json, "store as JSON"),
        (&selection.pseudonymize, "pseudonymize"),
    ] {
        for pattern in patterns {
            for protected in ["messageId", "type"] {
                if pattern.covers(&[protected.to_owned()]) {
                    return Err(SelectionError::Protected(
                        pattern.text.clone(),
                        what,
                        protected,
                    ));
                }
            }
        }
    }
    if !selection.pseudonymize.is_empty() && key.is_none() {
        return Err(SelectionError::MissingKey);
    }
    Ok(selection)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> Vec<String> {
        text.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn patterns_match_their_path_and_what_is_below_it() {
        let card = Pattern::parse("properties.card.*").expect("pattern");
        assert!(card.covers(&path("properties.card")));
        assert!(card.covers(&path("properties.card.number")));
        assert!(!card.covers(&path("properties.cart")));
        assert!(!card.covers(&path("properties")));
        let any = Pattern::parse("context.*.id").expect("pattern");
        assert!(any.covers(&path("context.device.id")));
        assert!(!any.covers(&path("context.device.name")));
        let dotted = Pattern::parse(r"properties.a\.b").expect("pattern");
        assert!(dotted.covers(&["properties".to_owned(), "a.b".to_owned()]));
        assert!(!dotted.covers(&path("properties.a.b")));
        assert_eq!(
            Pattern::parse("properties..x"),
            Err(SelectionError::EmptyKey("properties..x".to_owned()))
        );
    }

    #[test]
    fn table_rules_add_to_every_tables_rules() {
        let selection = Selection::parse(
            r#"{"*": {"exclude": ["context.ip"]}, "track": {"json": ["properties.experiments"],
                "maxColumns": 300}, "page": {"include": ["properties.path"]}}"#,
            None,
        )
        .expect("selection");
        let track = selection.table(Table::Track);
        assert_eq!(track.treatment(&path("context.ip")), Treatment::Exclude);
        assert_eq!(
            track.treatment(&path("properties.experiments.e1")),
            Treatment::Json
        );
        assert_eq!(track.treatment(&path("properties.plan")), Treatment::Load);
        assert_eq!(track.max_columns, 300);
        let page = selection.table(Table::Page);
        assert_eq!(page.treatment(&path("properties")), Treatment::Load);
        assert_eq!(page.treatment(&path("properties.path")), Treatment::Load);
        assert_eq!(
            page.treatment(&path("properties.title")),
            Treatment::Exclude
        );
        assert_eq!(page.treatment(&path("userId")), Treatment::Load);
        assert_eq!(page.treatment(&path("name")), Treatment::Load);
        assert_eq!(page.treatment(&path("context")), Treatment::Exclude);
        assert_eq!(page.max_columns, COLUMN_LIMIT);
        assert!(
            selection
                .table(Table::Identify)
                .treatment(&path("context.ip"))
                == Treatment::Exclude
        );
    }

    #[test]
    fn pseudonyms_are_keyed_hashes() {
        let key = "a key of sixteen bytes or more";
        let selection = Selection::parse(r#"{"*": {"pseudonymize": ["traits.email"]}}"#, Some(key))
            .expect("selection");
        let identify = selection.table(Table::Identify);
        assert_eq!(
            identify.treatment(&path("traits.email")),
            Treatment::Pseudonymize
        );
        let pseudonym = identify.pseudonym("ada@example.com");
        assert_eq!(pseudonym.len(), 64);
        assert_eq!(pseudonym, identify.pseudonym("ada@example.com"));
        assert_ne!(pseudonym, identify.pseudonym("bob@example.com"));
        let other = Selection::parse(
            r#"{"*": {"pseudonymize": ["traits.email"]}}"#,
            Some("another key of sixteen bytes"),
        )
        .expect("selection");
        assert_ne!(
            pseudonym,
            other.table(Table::Identify).pseudonym("ada@example.com")
        );
    }

    #[test]
    fn selections_that_cannot_work_say_why() {
        let refused = |text: &str, key: Option<&str>| Selection::parse(text, key).expect_err(text);
        assert!(matches!(
            refused(r#"{"orders": {}}"#, None),
            SelectionError::UnknownTable(_)
        ));
        assert!(matches!(
            refused(r#"{"*": {"exclude": ["messageId"]}}"#, None),
            SelectionError::Protected(..)
        ));
        assert!(matches!(
            refused(r#"{"*": {"json": ["*"]}}"#, None),
            SelectionError::Protected(..)
        ));
        assert_eq!(
            refused(r#"{"*": {"pseudonymize": ["traits.email"]}}"#, None),
            SelectionError::MissingKey
        );
        assert_eq!(refused("{}", Some("short")), SelectionError::ShortKey(5));
        assert!(matches!(
            refused(r#"{"track": {"maxColumns": 2}}"#, None),
            SelectionError::Budget { .. }
        ));
        assert!(matches!(
            refused(r#"{"track": {"exlude": []}}"#, None),
            SelectionError::Malformed(_)
        ));
        assert!(Selection::parse("", None).is_ok());
    }
}
