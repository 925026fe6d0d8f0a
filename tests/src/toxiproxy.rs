//! A Toxiproxy server of one test's own (`tests/scripts/toxiproxy.sh`), driven through its HTTP
//! API: proxies between the code under test and a server (the ingest and its database, an
//! operator and the API server), and the network faults ("toxics") added to them and removed
//! again.

use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::ingest::free_port;
use crate::postgres::{run_script, script};

/// The Toxiproxy server; stopped when dropped.
#[derive(Debug)]
pub struct Toxiproxy {
    dir: tempfile::TempDir,
    api: String,
    client: reqwest::Client,
}

/// One proxy: connections to [`Proxy::listen`] are forwarded to its upstream through the
/// toxics added.
#[derive(Debug)]
pub struct Proxy {
    /// `127.0.0.1:PORT`, where the proxy listens.
    pub listen: String,
    url: String,
    client: reqwest::Client,
}

impl Toxiproxy {
    /// Builds Toxiproxy if needed (once, into `tools/`) and starts a server on a free port.
    pub async fn start() -> Toxiproxy {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().to_str().expect("UTF-8 path");
        run_script("toxiproxy.sh", &["start", path, &free_port().to_string()]).await;
        let env = std::fs::read_to_string(dir.path().join("env")).expect("env file");
        let api = env
            .trim()
            .split_once('=')
            .map(|(_, url)| url.to_owned())
            .expect("export VAR=URL");
        Toxiproxy {
            dir,
            api,
            client: reqwest::Client::new(),
        }
    }

    /// A proxy named `name` on a free loopback port to `upstream` (`host:port`).
    pub async fn proxy(&self, name: &str, upstream: &str) -> Proxy {
        let listen = format!("127.0.0.1:{}", free_port());
        let response = self
            .client
            .post(format!("{}/proxies", self.api))
            .json(&json!({"name": name, "listen": listen, "upstream": upstream, "enabled": true}))
            .send()
            .await
            .expect("toxiproxy answers");
        assert!(
            response.status().is_success(),
            "create proxy: {}",
            response.text().await.unwrap_or_default()
        );
        Proxy {
            listen,
            url: format!("{}/proxies/{name}", self.api),
            client: self.client.clone(),
        }
    }
}

impl Drop for Toxiproxy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script("toxiproxy.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// The names of the two toxics that make a partition, one per direction.
const PARTITION: [(&str, &str); 2] = [
    ("partition-upstream", "upstream"),
    ("partition-downstream", "downstream"),
];

impl Proxy {
    /// [`Proxy::listen`] as a socket address.
    pub fn address(&self) -> SocketAddr {
        self.listen.parse().expect("127.0.0.1:PORT")
    }

    /// Cuts the connection both ways without closing it, as a network partition does: bytes sent
    /// either way are dropped (Toxiproxy's `timeout` toxic with timeout 0), on the connections
    /// that are open and on new ones, until [`Proxy::heal`].
    pub async fn partition(&self) {
        for (toxic, stream) in PARTITION {
            self.add(toxic, "timeout", stream, json!({"timeout": 0}))
                .await;
        }
    }

    /// Ends a partition, if there is one: new bytes flow again (what was dropped stays lost).
    pub async fn heal(&self) {
        for (toxic, _) in PARTITION {
            let response = self
                .client
                .delete(format!("{}/toxics/{toxic}", self.url))
                .send()
                .await
                .expect("toxiproxy answers");
            // 404: not partitioned in this direction, nothing to heal.
            assert!(
                response.status().is_success() || response.status() == 404,
                "heal {toxic}: {}",
                response.text().await.unwrap_or_default()
            );
        }
    }

    /// Adds the toxic `name` of `kind` (`latency`, `timeout`, `reset_peer`, `bandwidth`,
    /// `slicer`, ...) on the `downstream` or `upstream` direction, with its attributes.
    pub async fn add(&self, name: &str, kind: &str, stream: &str, attributes: Value) {
        let response = self
            .client
            .post(format!("{}/toxics", self.url))
            .json(&json!({
                "name": name, "type": kind, "stream": stream, "toxicity": 1.0,
                "attributes": attributes
            }))
            .send()
            .await
            .expect("toxiproxy answers");
        assert!(
            response.status().is_success(),
            "add toxic {name}: {}",
            response.text().await.unwrap_or_default()
        );
    }

    /// Removes the toxic `name`.
    pub async fn remove(&self, name: &str) {
        let response = self
            .client
            .delete(format!("{}/toxics/{name}", self.url))
            .send()
            .await
            .expect("toxiproxy answers");
        assert!(
            response.status().is_success(),
            "remove toxic {name}: {}",
            response.text().await.unwrap_or_default()
        );
    }
}
