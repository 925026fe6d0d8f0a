//! The Kubernetes API server harness: clients for the etcd + kube-apiserver pair that
//! `tests/scripts/kube-apiserver.sh start DIR` runs, and the few steps every test against it takes.
//!
//! Starting and stopping the shared server is the script's job alone: `tests/run.sh` starts it once
//! for the whole run and exports the variables below (from `DIR/env`). This module only reads them,
//! so a test run without them fails with a message that says how to get a server, instead of
//! starting one per test binary that nothing would stop. A test that stops or restarts its control
//! plane takes one of its own instead ([`ControlPlane`]), stopped when the test drops it.
//!
//! One server is shared by every test binary and every test in it, in parallel. A test isolates
//! itself in a namespace of its own ([`TestNamespace::create`]); cluster-scoped objects (CRDs,
//! ClusterRoles) must carry names that no other test uses, or be identical wherever they are
//! applied. Namespaces are not deleted afterwards: without a controller manager a deleted namespace
//! stays `Terminating` for ever, and the whole server is thrown away after the run.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config};

/// Path of the kubeconfig of the admin identity (client certificate in group `system:masters`).
pub const ADMIN_KUBECONFIG_ENV: &str = "SLUICE_TEST_KUBECONFIG";
/// Path of the kubeconfig of the restricted identity, which RBAC grants nothing until a test binds
/// a role to it.
pub const RESTRICTED_KUBECONFIG_ENV: &str = "SLUICE_TEST_KUBECONFIG_RESTRICTED";
/// User name of the restricted identity, the subject a test's RoleBinding names.
pub const RESTRICTED_USER_ENV: &str = "SLUICE_TEST_KUBE_RESTRICTED_USER";

/// Field manager of the objects that the harness itself applies.
pub const FIELD_MANAGER: &str = "sluice-tests";

/// How long [`apply_crd`] waits for a CRD to be `Established`; a fresh CRD on an idle local server
/// takes well under a second.
pub const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong while reaching the test API server.
///
/// `Debug` prints the same sentence as `Display`: tests `expect()` these errors, and the panic
/// message should say what to do, not show the enum.
#[derive(thiserror::Error)]
pub enum Error {
    /// The test command did not start a server for this run.
    #[error(
        "{var} is not set, so there is no Kubernetes API server to test against. Run the tests with \
         `bash tests/run.sh`, or start a server by hand: `bash tests/scripts/kube-apiserver.sh start \
         /tmp/sluice-kube && source /tmp/sluice-kube/env` (and `... stop /tmp/sluice-kube` afterwards)"
    )]
    NotConfigured {
        /// The variable that is missing.
        var: &'static str,
    },
    /// The kubeconfig that the variable names cannot be read or used.
    #[error(
        "cannot use kubeconfig {path} (from {var}); is the server of this run still running? \
         (restart it with tests/scripts/kube-apiserver.sh start): {source}"
    )]
    Kubeconfig {
        /// The variable that named the file.
        var: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        #[source]
        source: KubeconfigError,
    },
    /// A client cannot be built from a valid kubeconfig (TLS set-up failed).
    #[error("cannot build a Kubernetes client from {path}: {source}")]
    Client {
        /// The kubeconfig.
        path: PathBuf,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The API server answered a request of the harness with an error.
    #[error("Kubernetes API request failed: {0}")]
    Api(#[from] kube::Error),
    /// A CRD did not become `Established` in time.
    #[error(
        "CustomResourceDefinition {name} was not Established within {:?}; see the API server log \
         in the directory given to kube-apiserver.sh start",
        CRD_ESTABLISHED_TIMEOUT
    )]
    CrdNotEstablished {
        /// The CRD's name.
        name: String,
    },
    /// Waiting for a CRD failed before its timeout.
    #[error("waiting for CustomResourceDefinition {name} failed: {source}")]
    Wait {
        /// The CRD's name.
        name: String,
        /// Why the wait failed.
        #[source]
        source: kube::runtime::wait::Error,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn env_var(var: &'static str) -> Result<String, Error> {
    std::env::var(var)
        .ok()
        .filter(|value| !value.is_empty())
        .ok_or(Error::NotConfigured { var })
}

async fn client_from_env(var: &'static str) -> Result<Client, Error> {
    client_from_path(var, PathBuf::from(env_var(var)?)).await
}

async fn client_from_path(var: &'static str, path: PathBuf) -> Result<Client, Error> {
    let config = config_from_path(var, &path).await?;
    Client::try_from(config).map_err(|source| Error::Client { path, source })
}

async fn config_from_env(var: &'static str) -> Result<Config, Error> {
    config_from_path(var, &PathBuf::from(env_var(var)?)).await
}

async fn config_from_path(var: &'static str, path: &std::path::Path) -> Result<Config, Error> {
    let path = path.to_owned();
    let kubeconfig = Kubeconfig::read_from(&path).map_err(|source| Error::Kubeconfig {
        var,
        path: path.clone(),
        source,
    })?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| Error::Kubeconfig { var, path, source })
}

/// A client with every right (group `system:masters`), for setting up what a test needs and for
/// checking what the code under test did.
pub async fn admin_client() -> Result<Client, Error> {
    client_from_env(ADMIN_KUBECONFIG_ENV).await
}

/// The `host:port` of the API server, as a TCP proxy in front of it needs it.
pub async fn api_server_address() -> Result<String, Error> {
    let config = config_from_env(ADMIN_KUBECONFIG_ENV).await?;
    let uri = &config.cluster_url;
    Ok(format!(
        "{}:{}",
        uri.host().unwrap_or("127.0.0.1"),
        uri.port_u16().unwrap_or(443)
    ))
}

/// An admin client that reaches the API server through `proxy` (a TCP proxy in front of
/// [`api_server_address`]). TLS passes through: the server's certificate names 127.0.0.1.
pub async fn admin_client_via(proxy: std::net::SocketAddr) -> Result<Client, Error> {
    let mut config = config_from_env(ADMIN_KUBECONFIG_ENV).await?;
    let path = PathBuf::from(env_var(ADMIN_KUBECONFIG_ENV)?);
    config.cluster_url = format!("https://{proxy}")
        .parse()
        .expect("a socket address makes a valid URI");
    Client::try_from(config).map_err(|source| Error::Client { path, source })
}

/// A client of the restricted identity ([`restricted_user`]): RBAC forbids it everything until a
/// test binds a role to it, so a test can prove that exactly those rights are enough.
pub async fn restricted_client() -> Result<Client, Error> {
    client_from_env(RESTRICTED_KUBECONFIG_ENV).await
}

/// The user name of the restricted identity, as a RoleBinding's subject (`kind: User`) names it.
pub fn restricted_user() -> Result<String, Error> {
    env_var(RESTRICTED_USER_ENV)
}

/// A namespace that belongs to one test, so tests can run in parallel on the shared server.
#[derive(Debug, Clone)]
pub struct TestNamespace {
    name: String,
}

impl TestNamespace {
    /// Creates a namespace named `sluice-test-{prefix}-` plus a suffix that the server makes
    /// unique (`generateName`); `prefix` is usually the test's name in kebab case, kept short
    /// (a namespace name has at most 63 characters).
    pub async fn create(client: &Client, prefix: &str) -> Result<Self, Error> {
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("sluice-test-{prefix}-")),
                labels: Some([("sluice.dev/test".to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        let name = created
            .metadata
            .name
            .expect("the API server names a namespace created with generateName");
        Ok(Self { name })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Applies `crd` by server-side apply (idempotent, so tests that share a CRD may all apply it) and
/// returns once the server reports it `Established`, that is, once its custom objects can be
/// created.
pub async fn apply_crd(
    client: &Client,
    crd: &CustomResourceDefinition,
) -> Result<CustomResourceDefinition, Error> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let name = crd
        .metadata
        .name
        .clone()
        .expect("a CustomResourceDefinition has a name");
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(crd),
    )
    .await?;
    let established = tokio::time::timeout(
        CRD_ESTABLISHED_TIMEOUT,
        await_condition(api, &name, conditions::is_crd_established()),
    )
    .await
    .map_err(|_elapsed| Error::CrdNotEstablished { name: name.clone() })?
    .map_err(|source| Error::Wait {
        name: name.clone(),
        source,
    })?;
    established.ok_or(Error::CrdNotEstablished { name })
}

/// Applies `crd` (see [`apply_crd`]) and creates a namespace of the test's own for its objects.
pub async fn namespace_with_crd(
    client: &Client,
    crd: &CustomResourceDefinition,
    prefix: &str,
) -> Result<TestNamespace, Error> {
    apply_crd(client, crd).await?;
    TestNamespace::create(client, prefix).await
}

/// Applies (creates, or replaces the value of) the Secret `name` in `namespace` holding `url` under
/// the key `url`: the way a `SegmentIntegration` names its warehouse.
pub async fn put_url_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    url: &str,
) -> Result<(), Error> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        string_data: Some([("url".to_owned(), url.to_owned())].into()),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(secret),
        )
        .await?;
    Ok(())
}

/// One of the two servers of a [`ControlPlane`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// etcd, where the API server keeps every object.
    Etcd,
    /// kube-apiserver, which the operator and the tests talk to.
    ApiServer,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Etcd => "etcd",
            Server::ApiServer => "kube-apiserver",
        }
    }
}

/// An etcd + kube-apiserver pair of one test's own (`tests/scripts/kube-apiserver.sh` in a
/// temporary folder, with the binaries of the shared one), for tests that stop or restart it;
/// stopped when dropped. Each server comes back on its port with its data, so clients made before
/// a restart keep working after it.
#[derive(Debug)]
pub struct ControlPlane {
    dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts a new, empty control plane; returns once the API server is ready.
    pub async fn start() -> ControlPlane {
        let dir = tempfile::tempdir().expect("temporary folder");
        let control_plane = ControlPlane { dir };
        crate::postgres::run_script("kube-apiserver.sh", &["start", control_plane.path()]).await;
        control_plane
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().expect("UTF-8 path")
    }

    /// The kubeconfig of its admin identity (group `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// A new admin client of this control plane.
    pub async fn admin_client(&self) -> Result<Client, Error> {
        client_from_path(ADMIN_KUBECONFIG_ENV, self.kubeconfig()).await
    }

    /// Stops `server`, keeping its data and port.
    pub async fn down(&self, server: Server) {
        crate::postgres::run_script("kube-apiserver.sh", &["down", self.path(), server.name()])
            .await;
    }

    /// Starts `server` again after [`ControlPlane::down`]; returns once it is healthy.
    pub async fn up(&self, server: Server) {
        crate::postgres::run_script("kube-apiserver.sh", &["up", self.path(), server.name()]).await;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(crate::postgres::script("kube-apiserver.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// How long a test waits for something the operator or the API server does eventually. Generous:
/// the machine may be busy building.
pub const EVENTUAL: Duration = Duration::from_secs(90);

/// Polls `probe` every 200 ms until it returns `Some`, for at most `limit`; the error names
/// `what` was awaited.
pub async fn within<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// [`within`] [`EVENTUAL`], panicking when the time is up.
pub async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    within(EVENTUAL, what, probe)
        .await
        .unwrap_or_else(|timeout| panic!("{timeout}"))
}

/// Waits [`EVENTUAL`] for the object `name` to be gone from `api` (deleted, finalizers done),
/// panicking when the time is up.
pub async fn eventually_gone<K>(api: &Api<K>, name: &str)
where
    K: Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(&format!("{name} to be gone"), || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await
}

/// The API error status of a request that must fail, with the request's outcome in the panic
/// message when it did not.
pub fn api_status<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an error answer from the API server, got {other:?}"),
    }
}
