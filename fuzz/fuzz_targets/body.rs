//! Request body decoding as `/v1/webhook` does it: repair, parse, validate, normalise. No input
//! may panic; what strict JSON accepts, the repair must accept too; no key path holds U+0000.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_ingest::event::{Call, validate};
use sluice_ingest::json;
use sluice_ingest::normalize::normalize;

fuzz_target!(|data: &[u8]| {
    let strict = serde_json::from_slice::<Value>(data).is_ok();
    let repaired = match json::repair(data) {
        Ok(repaired) => repaired,
        Err(json::JsonError::TooDeep) => return,
        Err(other) => panic!("repair only refuses depth: {other}"),
    };
    let Ok(value) = json::parse::<Value>(&repaired) else {
        assert!(!strict, "strict JSON must stay readable after the repair");
        return;
    };
    let events = match value {
        Value::Array(items) => items,
        one => vec![one],
    };
    for event in events {
        let Ok(envelope) = validate(&event) else {
            continue;
        };
        let (Call::Load(table), Value::Object(object)) = (envelope.call, event) else {
            continue;
        };
        let record = normalize(table, &envelope, object);
        for field in &record.fields {
            assert!(
                field.path.keys().all(|k| !k.contains('\0')),
                "{}",
                field.path
            );
        }
    }
});
