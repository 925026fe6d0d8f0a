//! The Tracking API's decoding: gzip or not, size limits, JSON, and the batch merge of
//! `context`, `integrations` and `sentAt` into each event, then Segment's server-side fields.
//! No input may panic; every event of an accepted batch carries a `messageId` after enrichment.
#![no_main]

use axum::body::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_ingest::protocol::{decode_object, enrich, split_batch};

// The first byte says how to send the rest: bit 0 as gzip, bit 1 to /v1/batch.
fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let (gzip, batch) = (flags & 1 == 1, flags & 2 == 2);
    let encoding = gzip.then_some("gzip");
    let Ok(object) = decode_object(encoding, Bytes::copy_from_slice(data), batch) else {
        return;
    };
    let events = if batch {
        match split_batch(object) {
            Ok(events) => events,
            Err(_) => return,
        }
    } else {
        vec![object]
    };
    for event in events {
        let enriched = enrich(event, chrono::Utc::now());
        assert!(enriched.contains_key("messageId"));
        assert!(enriched.contains_key("receivedAt"));
    }
});
