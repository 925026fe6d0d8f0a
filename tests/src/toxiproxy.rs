//! A client of Toxiproxy's HTTP API, for tests that need a faulty network: `tests/run.sh` starts
//! the server with `tests/scripts/toxiproxy.sh` and exports [`TOXIPROXY_URL_ENV`]; a test makes
//! a [`Proxy`] in front of a server, points the code under test at the proxy's address, and cuts
//! or heals the connection when it wants.

use std::net::SocketAddr;

use serde_json::{Value, json};

/// The base URL of the Toxiproxy API, e.g. `http://127.0.0.1:8474`.
pub const TOXIPROXY_URL_ENV: &str = "SLUICE_TEST_TOXIPROXY_URL";

/// What can go wrong while talking to Toxiproxy.
///
/// `Debug` prints the same sentence as `Display`, for `expect()` in tests.
#[derive(thiserror::Error)]
pub enum Error {
    /// The test command did not start a Toxiproxy server.
    #[error(
        "{TOXIPROXY_URL_ENV} is not set, so there is no Toxiproxy server. Run the tests with \
         `bash tests/run.sh`, or start one by hand: `bash tests/scripts/toxiproxy.sh start \
         /tmp/sluice-toxiproxy 0 && source /tmp/sluice-toxiproxy/env`"
    )]
    NotConfigured,
    /// The API did not answer, or answered with an error.
    #[error("Toxiproxy API request {what} failed: {source}")]
    Request {
        /// Which request.
        what: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The API's answer lacked what it should hold.
    #[error("Toxiproxy answered {what} without a usable {field}: {answer}")]
    Answer {
        /// Which request.
        what: String,
        /// The missing field.
        field: &'static str,
        /// The answer.
        answer: Value,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A TCP proxy of the Toxiproxy server, listening on a loopback port of its own.
#[derive(Debug, Clone)]
pub struct Proxy {
    api: String,
    name: String,
    listen: SocketAddr,
    http: reqwest::Client,
}

/// The names of the two toxics that make a partition, one per direction.
const PARTITION: [(&str, &str); 2] = [
    ("partition-upstream", "upstream"),
    ("partition-downstream", "downstream"),
];

impl Proxy {
    /// Makes a proxy named `name` (unique on the server) to `upstream`, on a free loopback port.
    pub async fn create(name: &str, upstream: &str) -> Result<Proxy, Error> {
        let api = std::env::var(TOXIPROXY_URL_ENV)
            .ok()
            .filter(|url| !url.is_empty())
            .ok_or(Error::NotConfigured)?;
        let http = reqwest::Client::new();
        let what = format!("POST /proxies ({name})");
        let answer: Value = send(
            &what,
            http.post(format!("{api}/proxies")).json(&json!({
                "name": name,
                "listen": "127.0.0.1:0",
                "upstream": upstream,
                "enabled": true,
            })),
        )
        .await?
        .json()
        .await
        .map_err(|source| Error::Request {
            what: what.clone(),
            source,
        })?;
        let listen = answer["listen"]
            .as_str()
            .and_then(|listen| listen.parse().ok())
            .ok_or_else(|| Error::Answer {
                what,
                field: "listen",
                answer: answer.clone(),
            })?;
        Ok(Proxy {
            api,
            name: name.to_owned(),
            listen,
            http,
        })
    }

    /// The address clients connect to.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Cuts the connection both ways without closing it, as a network partition does: bytes sent
    /// either way are dropped (Toxiproxy's `timeout` toxic with timeout 0), on the connections
    /// that are open and on new ones, until [`Proxy::heal`].
    pub async fn partition(&self) -> Result<(), Error> {
        for (toxic, stream) in PARTITION {
            let what = format!("POST /proxies/{}/toxics ({toxic})", self.name);
            send(
                &what,
                self.http
                    .post(format!("{}/proxies/{}/toxics", self.api, self.name))
                    .json(&json!({
                        "name": toxic,
                        "type": "timeout",
                        "stream": stream,
                        "toxicity": 1.0,
                        "attributes": {"timeout": 0},
                    })),
            )
            .await?;
        }
        Ok(())
    }

    /// Ends a partition, if there is one: new bytes flow again (what was dropped stays lost).
    pub async fn heal(&self) -> Result<(), Error> {
        for (toxic, _) in PARTITION {
            let what = format!("DELETE /proxies/{}/toxics/{toxic}", self.name);
            let url = format!("{}/proxies/{}/toxics/{toxic}", self.api, self.name);
            match send(&what, self.http.delete(url)).await {
                Ok(_) => {}
                // Not partitioned in this direction: nothing to heal.
                Err(Error::Request { source, .. })
                    if source.status() == Some(reqwest::StatusCode::NOT_FOUND) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

async fn send(what: &str, request: reqwest::RequestBuilder) -> Result<reqwest::Response, Error> {
    request
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|source| Error::Request {
            what: what.to_owned(),
            source,
        })
}
