//! The reconcile loop: for each `SegmentIntegration`, build the desired children (`build`), apply
//! them by server-side apply, make sure the destination schema exists (`destination`), and write
//! the status (`status`). A finalizer runs the deletion policy before the resource goes.
//!
//! Parts that do not depend on the warehouse (credentials, Deployment, Service, Ingress, HPA) are
//! applied even while the warehouse is unreachable or its Secret missing; that failure shows in
//! `SchemaReady` and the reconcile is retried with exponential backoff.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, controller as runtime, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::build::{self, BuildError, Inputs};
use crate::crd::{DeletionPolicy, SegmentIntegration};
use crate::destination;
use crate::leader::{Gate, NotLeading};
use crate::metrics::Metrics;
use crate::status::{self, Observation, Observed};
use sluice_ingest::event::Table;
use sluice_ingest::load::{Claim, Dropped};

/// The field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "sluice-operator";
/// The finalizer that runs the deletion policy.
pub const FINALIZER: &str = "sluice.dev/deletion-policy";
/// How often a healthy integration is reconciled anyway, to refresh the table report.
pub const REFRESH: Duration = Duration::from_secs(300);
/// First retry delay after a failed reconcile; doubles per consecutive failure.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// The image of `sluice-ingest` when neither the spec nor the configuration names one.
pub const DEFAULT_INGEST_IMAGE: &str = concat!("sluice-ingest:", env!("CARGO_PKG_VERSION"));

/// How the controller runs: `sluice-operator run`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "SLUICE_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Image of `sluice-ingest` for integrations whose spec names none.
    #[arg(long, env = "SLUICE_INGEST_IMAGE", default_value = DEFAULT_INGEST_IMAGE)]
    pub ingest_image: String,
    /// This replica's name in Events and the leader Lease (in a pod: its name, from the
    /// downward API). Default: the host name.
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// Integrations reconciled at once. Each may hold a database connection for its schema, so
    /// this also bounds the connections the operator opens.
    #[arg(long, env = "SLUICE_OPERATOR_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
}

/// Why a reconcile failed. Each is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// The resource could not be turned into objects.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The operating system's random generator failed while making credentials.
    #[error("cannot generate credentials: {0}")]
    Random(String),
    /// The warehouse is not ready; the status says why.
    #[error("{reason}: {message}")]
    Destination {
        /// The condition's reason.
        reason: String,
        /// The condition's message.
        message: String,
    },
    /// The deletion policy could not be carried out, so the finalizer stays.
    #[error(
        "cannot drop schema {schema} for deletionPolicy Drop ({reason}: {message}); fix that, or \
         set spec.deletionPolicy to Retain to delete the resource and keep the schema"
    )]
    Cleanup {
        /// The schema.
        schema: String,
        /// Why.
        reason: String,
        /// What to do.
        message: String,
    },
    /// Adding or removing the finalizer, or the step it wraps, failed.
    #[error(transparent)]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    /// This replica lost the leader Lease; the warehouse was left alone.
    #[error(transparent)]
    NotLeading(#[from] NotLeading),
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    config: Config,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// Open while this replica may act; checked before the warehouse is written (the Kubernetes
    /// writes are checked by the client itself, see [`Gate::fence`]).
    gate: Gate,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<ObjectRef<SegmentIntegration>, u32>>,
}

impl Context {
    /// A context for `client` and `config`, acting while `gate` is open.
    pub fn new(client: Client, config: Config, metrics: Arc<Metrics>, gate: Gate) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: config.instance.clone(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
            gate,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Fails with [`NotLeading`] unless this replica may act now: the check before writes that
    /// do not go through the fenced client (the warehouse's). It is made when such a write
    /// begins; a database statement already running when the deadline passes is not cut short.
    fn ensure_leading(&self) -> Result<(), NotLeading> {
        if self.gate.is_leading() {
            Ok(())
        } else {
            Err(NotLeading)
        }
    }

    /// Publishes an Event about `si`. A failure is logged, never fatal: Events are for people.
    async fn publish(
        &self,
        si: &SegmentIntegration,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &si.object_ref(&())).await {
            tracing::warn!(integration = %si.name_any(), %error, reason, "cannot publish Event");
        }
    }

    fn record_failure(&self, object: ObjectRef<SegmentIntegration>) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(object).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    fn record_success(&self, object: &ObjectRef<SegmentIntegration>) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(object);
    }
}

/// The delay before retry number `failures` (1-based): 1 s, 2 s, 4 s, … up to 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    BACKOFF_FIRST.saturating_mul(1 << exponent).min(BACKOFF_MAX)
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` resolves: watches `SegmentIntegration`s (in
/// `config.namespace`, or everywhere) and the children it owns, so that a child changed or
/// deleted by hand is put back, and the destination Secrets they name, so that creating a
/// missing one takes effect at once. For a single replica: no leader election.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    run_gated(client, config, metrics, Gate::unconditional(), shutdown).await;
}

/// [`run`] for a leader: writes to the warehouse only while `gate` is open. `client` must be
/// fenced by the same gate ([`Gate::fence`]); [`crate::leader::lead`] gives both.
pub async fn run_gated(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    gate: Gate,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    metrics.follow(gate.clone());
    let namespace = config.namespace.clone();
    let ns = namespace.as_deref();
    let context = Arc::new(Context::new(client.clone(), config, metrics, gate));
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice-operator");
    let controller = Controller::new(
        scoped::<SegmentIntegration>(&client, ns),
        watcher::Config::default(),
    );
    let store = controller.store();
    controller
        .owns(scoped::<Deployment>(&client, ns), owned.clone())
        .owns(scoped::<Service>(&client, ns), owned.clone())
        .owns(scoped::<Secret>(&client, ns), owned.clone())
        .owns(scoped::<Ingress>(&client, ns), owned.clone())
        .owns(scoped::<HorizontalPodAutoscaler>(&client, ns), owned)
        .watches(
            scoped::<Secret>(&client, ns),
            watcher::Config::default(),
            move |secret: Secret| {
                let namespace = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|si| {
                        si.namespace() == namespace
                            && si.spec.destination.url_secret_ref.name == name
                    })
                    .map(|si| ObjectRef::from_obj(&*si))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(runtime::Config::default().concurrency(context.config.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _action)) => tracing::debug!(%object, "reconciled"),
                // error_policy has logged it, with the retry delay.
                Err(runtime::Error::ReconcilerFailed(..)) => {}
                Err(error) => tracing::warn!(%error, "controller error"),
            }
        })
        .await;
}

/// Reconciles one `SegmentIntegration` behind the finalizer.
pub async fn reconcile(si: Arc<SegmentIntegration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = si
        .namespace()
        .ok_or(Error::Build(BuildError::Incomplete("namespace")))?;
    let api = Api::<SegmentIntegration>::namespaced(ctx.client.clone(), &namespace);
    let object = ObjectRef::from_obj(&*si);
    let started = std::time::Instant::now();
    let result = finalizer(&api, FINALIZER, si, |event| async {
        match event {
            Finalizer::Apply(si) => apply(&si, &ctx).await,
            Finalizer::Cleanup(si) => cleanup(&si, &ctx).await,
        }
    })
    .await;
    ctx.metrics.reconciled(started.elapsed());
    let action = result.map_err(|error| Error::Finalizer(Box::new(error)))?;
    ctx.record_success(&object);
    Ok(action)
}

/// Requeues a failed object with exponential backoff.
pub fn error_policy(si: Arc<SegmentIntegration>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed();
    let failures = ctx.record_failure(ObjectRef::from_obj(&*si));
    let delay = backoff(failures);
    tracing::warn!(
        integration = %si.name_any(),
        namespace = si.namespace().unwrap_or_default(),
        %error,
        failures,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

async fn apply(si: &SegmentIntegration, ctx: &Context) -> Result<Action, Error> {
    let client = &ctx.client;
    let namespace = si
        .namespace()
        .ok_or(Error::Build(BuildError::Incomplete("namespace")))?;
    // The destination URL is read first: its hash goes on the pod template (a rotated password
    // rolls the ingest pods); when it cannot be read, the status below says why.
    let url = destination::url(client, &namespace, &si.spec.destination.url_secret_ref).await;
    let inputs = Inputs {
        schema: si.schema_name(),
        default_image: ctx.config.ingest_image.clone(),
        secret_hash: url.as_deref().ok().map(|url| build::secret_hash([url])),
    };
    let tables = si.tables();
    let owner = build::schema_owner(si)?;

    // Build every object first: a resource that cannot be built changes nothing.
    let deployment = build::deployment(si, &inputs)?;
    let service = build::service(si)?;
    let ingress = build::ingress(si)?;
    let autoscaler = build::autoscaler(si)?;

    if ensure_credentials(si, client, &namespace).await? {
        ctx.publish(
            si,
            EventType::Normal,
            "CredentialsCreated",
            "CreateCredentials",
            format!(
                "created Secret {} with a new shared secret and API key for Segment",
                build::credentials_name(si)
            ),
        )
        .await;
    }
    let deployment = server_side_apply(client, &namespace, &deployment).await?;
    server_side_apply(client, &namespace, &service).await?;
    let name = build::ingest_name(si);
    match ingress {
        Some(ingress) => drop(server_side_apply(client, &namespace, &ingress).await?),
        None => {
            if delete_owned::<Ingress>(client, &namespace, &name, si).await? {
                ctx.publish(
                    si,
                    EventType::Normal,
                    "IngressDeleted",
                    "DeleteIngress",
                    format!("deleted Ingress {name}: spec.exposure.ingress was removed"),
                )
                .await;
            }
        }
    }
    match autoscaler {
        Some(autoscaler) => drop(server_side_apply(client, &namespace, &autoscaler).await?),
        None => {
            delete_owned::<HorizontalPodAutoscaler>(client, &namespace, &name, si).await?;
        }
    }

    ctx.ensure_leading()?;
    let destination =
        async { destination::ensure_schema(&url?, &inputs.schema, &tables, &owner).await }.await;
    let (schema_ready, report) = match destination {
        Ok((claim, report)) => (
            Observation::ok(
                "SchemaReady",
                schema_ready_message(&inputs.schema, &tables, &claim),
            ),
            Some(report),
        ),
        Err(failure) => (failure, None),
    };
    let observed = Observed {
        generation: si.metadata.generation,
        schema: inputs.schema.clone(),
        webhook_url: build::webhook_url(si),
        credentials_secret: build::credentials_name(si),
        schema_ready: schema_ready.clone(),
        ingest_available: status::ingest_availability(&deployment),
        tables: report,
    };
    write_status(si, client, &namespace, &observed).await?;
    for (type_, observation) in [
        (status::SCHEMA_READY, &observed.schema_ready),
        (status::INGEST_AVAILABLE, &observed.ingest_available),
    ] {
        if changed(si, type_, observation) {
            let (event_type, action) = match (observation.ok, type_) {
                (true, _) => (EventType::Normal, type_),
                (false, status::SCHEMA_READY) => (EventType::Warning, "EnsureSchema"),
                (false, _) => (EventType::Warning, "WatchIngest"),
            };
            ctx.publish(
                si,
                event_type,
                &observation.reason,
                action,
                observation.message.clone(),
            )
            .await;
        }
    }

    if schema_ready.ok {
        Ok(Action::requeue(REFRESH))
    } else {
        Err(Error::Destination {
            reason: schema_ready.reason,
            message: schema_ready.message,
        })
    }
}

/// The `SchemaReady` message: the schema, its tables, and what `Drop` would remove.
fn schema_ready_message(schema: &str, tables: &[Table], claim: &Claim) -> String {
    let names = tables
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ");
    if claim.created_schema {
        format!("schema {schema} (created by Sluice) and tables {names} exist")
    } else {
        format!(
            "schema {schema} (it existed before: deletionPolicy Drop removes only the tables \
             Sluice created, never the schema) and tables {names} exist"
        )
    }
}

/// The Event note for what `Drop` did.
fn dropped_note(schema: &str, dropped: &Dropped) -> String {
    let tables = if dropped.tables.is_empty() {
        "dropped no table".to_owned()
    } else {
        format!(
            "dropped the tables Sluice created, {}",
            dropped.tables.join(", ")
        )
    };
    match (&dropped.kept, dropped.schema) {
        (_, true) => format!("{tables}, and schema {schema} (deletionPolicy Drop)"),
        (Some(kept), false) => format!(
            "{tables} (deletionPolicy Drop); kept schema {schema} and everything else in it: {kept}"
        ),
        (None, false) => format!("{tables} (deletionPolicy Drop); kept schema {schema}"),
    }
}

async fn cleanup(si: &SegmentIntegration, ctx: &Context) -> Result<Action, Error> {
    let namespace = si
        .namespace()
        .ok_or(Error::Build(BuildError::Incomplete("namespace")))?;
    let schema = si.schema_name();
    let owner = build::schema_owner(si)?;
    match si.spec.deletion_policy {
        DeletionPolicy::Retain => {
            tracing::info!(integration = %si.name_any(), %namespace, %schema, "deleted; schema retained");
        }
        DeletionPolicy::Drop => {
            let dropped = async {
                let url =
                    destination::url(&ctx.client, &namespace, &si.spec.destination.url_secret_ref)
                        .await?;
                ctx.ensure_leading()
                    .map_err(|error| Observation::failed("NotLeading", error.to_string()))?;
                destination::drop_owned(&url, &schema, &owner).await
            }
            .await;
            let dropped = match dropped {
                Ok(dropped) => dropped,
                Err(failure) => {
                    ctx.publish(
                        si,
                        EventType::Warning,
                        "DropSchemaFailed",
                        "DropSchema",
                        format!(
                            "cannot drop schema {schema}: {}; set spec.deletionPolicy to Retain to \
                         delete the resource and keep the schema",
                            failure.message
                        ),
                    )
                    .await;
                    return Err(Error::Cleanup {
                        schema,
                        reason: failure.reason,
                        message: failure.message,
                    });
                }
            };
            let note = dropped_note(&schema, &dropped);
            tracing::info!(integration = %si.name_any(), %namespace, %schema, %note, "deleted");
            let reason = if dropped.schema {
                "SchemaDropped"
            } else {
                "TablesDropped"
            };
            ctx.publish(si, EventType::Normal, reason, "DropSchema", note)
                .await;
        }
    }
    Ok(Action::await_change())
}

/// Whether the condition `type_` differs in status or reason from the one in `si`'s status.
fn changed(si: &SegmentIntegration, type_: &str, observation: &Observation) -> bool {
    let previous = si
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
    previous.is_none_or(|c| {
        (c.status == crate::crd::ConditionStatus::True) != observation.ok
            || c.reason != observation.reason
    })
}

/// Creates the credentials Secret when it does not exist, and says whether it did. It is never
/// patched: the shared secret and API key that Segment holds must not change behind its back.
async fn ensure_credentials(
    si: &SegmentIntegration,
    client: &Client,
    namespace: &str,
) -> Result<bool, Error> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    if secrets
        .get_opt(&build::credentials_name(si))
        .await?
        .is_some()
    {
        return Ok(false);
    }
    let secret = build::credentials_secret(si, &random_token()?, &random_token()?)?;
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(integration = %si.name_any(), %namespace, "credentials created");
            Ok(true)
        }
        // Another reconcile (or operator replica) created it first: theirs stands.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// 32 random bytes from the operating system, hex-encoded.
fn random_token() -> Result<String, Error> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes).map_err(|error| Error::Random(error.to_string()))?;
    Ok(hex::encode(bytes))
}

async fn server_side_apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    // k8s-openapi's objects serialize with their apiVersion and kind, as an apply patch needs.
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?)
}

/// Deletes the object `name` of kind `K` if it exists and this integration controls it, and says
/// whether it did.
async fn delete_owned<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    si: &SegmentIntegration,
) -> Result<bool, Error>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let Some(existing) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let controlled = existing
        .owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && Some(&owner.uid) == si.uid().as_ref());
    if !controlled {
        return Ok(false);
    }
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(error) => Err(error.into()),
    }
}

async fn write_status(
    si: &SegmentIntegration,
    client: &Client,
    namespace: &str,
    observed: &Observed,
) -> Result<(), Error> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = status::status(observed, si.status.as_ref(), &now);
    if si.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": SegmentIntegration::api_version(&()),
        "kind": SegmentIntegration::kind(&()),
        "status": status,
    });
    Api::<SegmentIntegration>::namespaced(client.clone(), namespace)
        .patch_status(
            &si.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(9), Duration::from_secs(256));
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn messages_say_what_drop_removes_and_keeps() {
        let created = Claim {
            created_schema: true,
            tables: vec!["track".to_owned()],
        };
        let adopted = Claim {
            created_schema: false,
            ..created.clone()
        };
        let tables = [Table::Identify, Table::Track];
        assert_eq!(
            schema_ready_message("s", &tables, &created),
            "schema s (created by Sluice) and tables identify, track exist"
        );
        assert!(schema_ready_message("s", &tables, &adopted).contains("never the schema"));
        let all = Dropped {
            tables: vec!["_sdc_ownership".to_owned(), "track".to_owned()],
            schema: true,
            kept: None,
        };
        assert_eq!(
            dropped_note("s", &all),
            "dropped the tables Sluice created, _sdc_ownership, track, and schema s \
             (deletionPolicy Drop)"
        );
        let kept = Dropped {
            schema: false,
            kept: Some("schema s existed before Sluice used it".to_owned()),
            ..all
        };
        assert!(
            dropped_note("s", &kept).ends_with(
                "kept schema s and everything else in it: schema s existed before Sluice used it"
            ),
            "{}",
            dropped_note("s", &kept)
        );
    }

    #[test]
    fn tokens_are_random_and_64_hex_digits() {
        let a = random_token().expect("token");
        let b = random_token().expect("token");
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
