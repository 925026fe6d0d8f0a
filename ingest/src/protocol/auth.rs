//! Authentication of webhook requests: Segment's `X-Signature` (HMAC-SHA1 of the raw body with
//! a shared secret) or HTTP Basic with an API key as the user name (the direct-destination
//! protocol). With neither configured, the endpoint is open.

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
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("shared_secret", &self.shared_secret.as_ref().map(|_| "***"))
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A request without acceptable credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "missing or wrong credentials: sign the body with the shared secret (X-Signature) or send the API key as the Basic user name"
)]
pub struct Unauthorized;

impl Auth {
    /// Credentials from configuration; empty strings count as not set.
    pub fn new(shared_secret: Option<&str>, api_key: Option<&str>) -> Auth {
        Auth {
            shared_secret: shared_secret
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec()),
            api_key: api_key.filter(|s| !s.is_empty()).map(str::to_owned),
        }
    }

    /// Whether requests are accepted without credentials.
    pub fn is_open(&self) -> bool {
        self.shared_secret.is_none() && self.api_key.is_none()
    }

    /// Checks a request. A signed Webhooks (Actions) batch may carry the signature of its first
    /// event only, so for a JSON array that signature is accepted too.
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
                return Ok(());
            }
        }
        Err(Unauthorized)
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
        assert_eq!(auth.check(&wrong, body), Err(Unauthorized));
        assert_eq!(auth.check(&HeaderMap::new(), body), Err(Unauthorized));
        assert_eq!(
            auth.check(&headers(&[("x-signature", "zz".into())]), body),
            Err(Unauthorized)
        );
    }

    #[test]
    fn batch_signed_on_first_event_is_accepted() {
        let auth = Auth::new(Some("k"), None);
        let first = r#"{"type":"track","messageId":"1"}"#;
        let body = format!("[{first}, {{\"type\":\"page\"}}]");
        let h = headers(&[("x-signature", sign(b"k", first.as_bytes()))]);
        assert_eq!(auth.check(&h, body.as_bytes()), Ok(()));
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
        assert_eq!(auth.check(&basic("key2:"), b"{}"), Err(Unauthorized));
        assert_eq!(auth.check(&basic("key"), b"{}"), Err(Unauthorized));
        assert_eq!(
            auth.check(&headers(&[("authorization", "Bearer key1".into())]), b"{}"),
            Err(Unauthorized)
        );
    }
}
