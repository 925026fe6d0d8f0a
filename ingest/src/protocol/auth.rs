//! Authentication of webhook requests: Segment's `X-Signature` (HMAC-SHA1 of the raw body with
//! a shared secret) or HTTP Basic with an API key as the user name (the direct-destination
//! protocol). With neither configured, the endpoint is open.
//!
//! A batch (a JSON array) must carry credentials that cover the whole body: the API key, or a
//! signature of the whole body. Segment's Webhooks (Actions) destination signs only the first
//! event of a batch; such a signature says nothing about the events after it, so anyone who
//! holds one signed batch could append events and replay it, overwriting rows by `messageId`.
//! Accepting it is an explicit opt-in ([`Auth::accept_first_event_signatures`]).

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::value::RawValue;
use sha1::Sha1;

/// The credentials a webhook request may present.
#[derive(Clone, Default)]
pub struct Auth {
    shared_secret: Option<Vec<u8>>,
    api_key: Option<String>,
    first_event_signatures: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("shared_secret", &self.shared_secret.as_ref().map(|_| "***"))
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("first_event_signatures", &self.first_event_signatures)
            .finish()
    }
}

/// A request without acceptable credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthorized {
    /// No credentials, or wrong ones.
    #[error(
        "missing or wrong credentials: sign the body with the shared secret (X-Signature) or send the API key as the Basic user name"
    )]
    Missing,
    /// A batch whose signature covers only its first event, while that is not accepted.
    #[error(
        "missing or wrong credentials for this batch: its X-Signature signs only the first event, \
         which does not protect the other events; send the API key as the Basic user name \
         (Authorization header), sign the whole body, or start sluice-ingest with \
         --accept-first-event-signatures to accept such batches"
    )]
    FirstEventOnly,
}

impl Auth {
    /// Credentials from configuration; empty strings count as not set.
    pub fn new(shared_secret: Option<&str>, api_key: Option<&str>) -> Auth {
        Auth {
            shared_secret: shared_secret
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec()),
            api_key: api_key.filter(|s| !s.is_empty()).map(str::to_owned),
            first_event_signatures: false,
        }
    }

    /// Whether a JSON array whose `X-Signature` signs only its first element is accepted, as
    /// Segment's Webhooks (Actions) destination signs batches. Off by default: the signature
    /// does not cover the other events, so a captured signed batch with events appended would
    /// pass, and its upserts could overwrite any row by `messageId`.
    pub fn accept_first_event_signatures(mut self, accept: bool) -> Auth {
        self.first_event_signatures = accept;
        self
    }

    /// Whether requests are accepted without credentials.
    pub fn is_open(&self) -> bool {
        self.shared_secret.is_none() && self.api_key.is_none()
    }

    /// Checks a request: the API key, or a signature of the whole body; for a JSON array, a
    /// signature of its first event only when [`Auth::accept_first_event_signatures`] is on.
    pub fn check(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Unauthorized> {
        if self.is_open() {
            return Ok(());
        }
        if let (Some(key), Some(user)) = (&self.api_key, basic_user(headers))
            && constant_time_eq(key.as_bytes(), user.as_bytes())
        {
            return Ok(());
        }
        let signature = headers
            .get("x-signature")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| hex::decode(v.trim()).ok());
        if let (Some(secret), Some(signature)) = (&self.shared_secret, signature) {
            if verify(secret, body, &signature) {
                return Ok(());
            }
            if let Some(first) = first_array_element(body)
                && verify(secret, first.as_bytes(), &signature)
            {
                return if self.first_event_signatures {
                    Ok(())
                } else {
                    Err(Unauthorized::FirstEventOnly)
                };
            }
        }
        Err(Unauthorized::Missing)
    }
}

/// The hex HMAC-SHA1 of `body` with `secret`: what Segment puts in `X-Signature`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn verify(secret: &[u8], body: &[u8], signature: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(signature).is_ok()
}

fn first_array_element(body: &[u8]) -> Option<String> {
    let trimmed = body.trim_ascii_start();
    if !trimmed.starts_with(b"[") {
        return None;
    }
    let elements: Vec<&RawValue> = serde_json::from_slice(trimmed).ok()?;
    elements.first().map(|raw| raw.get().to_owned())
}

/// The user name of an `Authorization: Basic` header.
pub(super) fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
    Some(user.to_owned())
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("header"));
        }
        map
    }

    #[test]
    fn open_without_configuration() {
        assert!(Auth::new(None, Some("")).is_open());
        assert_eq!(
            Auth::new(None, None).check(&HeaderMap::new(), b"{}"),
            Ok(())
        );
    }

    #[test]
    fn signature_must_match_body() {
        let auth = Auth::new(Some("s3cret"), None);
        let body = br#"{"type":"track"}"#;
        let good = headers(&[("x-signature", sign(b"s3cret", body))]);
        assert_eq!(auth.check(&good, body), Ok(()));
        let wrong = headers(&[("x-signature", sign(b"other", body))]);
        assert_eq!(auth.check(&wrong, body), Err(Unauthorized::Missing));
        assert_eq!(
            auth.check(&HeaderMap::new(), body),
            Err(Unauthorized::Missing)
        );
        assert_eq!(
            auth.check(&headers(&[("x-signature", "zz".into())]), body),
            Err(Unauthorized::Missing)
        );
    }

    #[test]
    fn batch_signed_on_first_event_is_refused_unless_accepted() {
        let first = r#"{"type":"track","messageId":"1"}"#;
        let body = format!("[{first}, {{\"type\":\"page\"}}]");
        let h = headers(&[("x-signature", sign(b"k", first.as_bytes()))]);
        let strict = Auth::new(Some("k"), None);
        assert_eq!(
            strict.check(&h, body.as_bytes()),
            Err(Unauthorized::FirstEventOnly)
        );
        let lenient = Auth::new(Some("k"), None).accept_first_event_signatures(true);
        assert_eq!(lenient.check(&h, body.as_bytes()), Ok(()));
        // The opt-in is about batches: a single event is always signed whole.
        let single = headers(&[("x-signature", sign(b"k", b"{}"))]);
        assert_eq!(
            lenient.check(&single, br#"{"type":"track"}"#),
            Err(Unauthorized::Missing)
        );
    }

    #[test]
    fn batch_with_whole_body_credentials_is_accepted() {
        let body = br#"[{"type":"track","messageId":"1"},{"type":"page"}]"#;
        let auth = Auth::new(Some("k"), Some("key1"));
        let signed = headers(&[("x-signature", sign(b"k", body))]);
        assert_eq!(auth.check(&signed, body), Ok(()));
        let keyed = headers(&[(
            "authorization",
            format!("Basic {}", STANDARD.encode("key1:")),
        )]);
        assert_eq!(auth.check(&keyed, body), Ok(()));
    }

    #[test]
    fn api_key_is_the_basic_user() {
        let auth = Auth::new(None, Some("key1"));
        let basic = |user_pass: &str| {
            headers(&[(
                "authorization",
                format!("Basic {}", STANDARD.encode(user_pass)),
            )])
        };
        assert_eq!(auth.check(&basic("key1:"), b"{}"), Ok(()));
        assert_eq!(
            auth.check(&basic("key2:"), b"{}"),
            Err(Unauthorized::Missing)
        );
        assert_eq!(auth.check(&basic("key"), b"{}"), Err(Unauthorized::Missing));
        assert_eq!(
            auth.check(&headers(&[("authorization", "Bearer key1".into())]), b"{}"),
            Err(Unauthorized::Missing)
        );
    }
}
