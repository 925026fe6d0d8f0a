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
use kube::api::{DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::utils::Backoff;
use kube::runtime::{Controller, controller as runtime, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::build::{self, BuildError, Inputs};
use crate::crd::{DeletionPolicy, SegmentIntegration};
use crate::destination;
use crate::leader::{Gate, NotLeading};
use crate::metrics::Metrics;
use crate::status::{self, Observation, Observed, Reason};
use sluice_ingest::event::Table;
use sluice_ingest::load::{Claim, Dropped};

/// The field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "sluice-operator";
/// The finalizer that runs the deletion policy.
pub const FINALIZER: &str = "sluice.dev/deletion-policy";
/// How often a healthy integration is reconciled anyway, to refresh the table report (sooner
/// when figures were held back by `Config::report_interval`).
pub const REFRESH: Duration = Duration::from_secs(300);
/// First retry delay after a failed reconcile; doubles per consecutive failure.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// First pause of the watches after one of them failed; doubles per consecutive failure.
pub const WATCH_BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// Longest pause of the watches.
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The image of `sluice-ingest` when neither the spec nor the configuration names one.
pub const DEFAULT_INGEST_IMAGE: &str = concat!("sluice-ingest:", env!("CARGO_PKG_VERSION"));
/// The longest note of an Event that the API server accepts (events.k8s.io/v1), in bytes: it
/// refuses a longer one, and the whole Event with it.
pub const NOTE_LIMIT: usize = 1024;

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
    /// The shortest time between two writes of an integration's loading figures (rows and
    /// rejections of the last hour, last load, refused requests) to its status, e.g. 1m.
    #[arg(long, env = "SLUICE_OPERATOR_REPORT_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub report_interval: Duration,
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
        reason: Reason,
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
        reason: Reason,
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

impl Error {
    /// The kind of failure, for the `reconcile_failures` metric's `category` label and the
    /// Warning Event: `kubernetes` (an API request), `spec` (the object cannot be built),
    /// `credentials`, `destination` (the warehouse), `cleanup` (the deletion policy),
    /// `leadership` (this replica lost the Lease) or `finalizer`.
    pub fn category(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube(_) => "kubernetes",
            Error::Build(_) => "spec",
            Error::Random(_) => "credentials",
            Error::Destination { .. } => "destination",
            Error::Cleanup { .. } => "cleanup",
            Error::NotLeading(_) => "leadership",
            Error::Finalizer(inner) => match inner.as_ref() {
                F::ApplyFailed(error) | F::CleanupFailed(error) => error.category(),
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => "kubernetes",
                F::UnnamedObject => "spec",
                _ => "finalizer",
            },
        }
    }

    /// Whether the step that failed has reported it already: a destination failure is the
    /// `SchemaReady` condition (and its Event), a failed `Drop` its own Event.
    fn reported(&self) -> bool {
        matches!(self.category(), "destination" | "cleanup")
    }
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    config: Config,
    reporter: Reporter,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// Open while this replica may act; checked before the warehouse is written (the Kubernetes
    /// writes are checked by the client itself, see [`Gate::fence`]).
    gate: Gate,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<ObjectRef<SegmentIntegration>, u32>>,
    /// The Event series of each failing object's current failure.
    failure_events: Mutex<FailureSeries<Recorder>>,
}

impl Context {
    /// A context for `client` and `config`, acting while `gate` is open.
    pub fn new(client: Client, config: Config, metrics: Arc<Metrics>, gate: Gate) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: config.instance.clone(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            client,
            config,
            metrics,
            gate,
            failures: Mutex::new(HashMap::new()),
            failure_events: Mutex::new(FailureSeries::default()),
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
        reason: Reason,
        action: &str,
        note: String,
    ) {
        publish(&self.recorder, si, event(type_, reason, action, note)).await;
    }

    /// Publishes a Warning Event that `si` fails with `failure` (its note), in the Event series
    /// of that failure (see [`FailureSeries`]): the same failure as the last one counts on its
    /// Event, another one gets an Event of its own.
    async fn publish_failure(
        &self,
        si: &SegmentIntegration,
        reason: Reason,
        action: &str,
        failure: String,
    ) {
        let recorder = self
            .failure_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recorder(ObjectRef::from_obj(si), &failure, || {
                Recorder::new(self.client.clone(), self.reporter.clone())
            });
        let event = event(EventType::Warning, reason, action, failure);
        publish(&recorder, si, event).await;
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
        self.failure_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(object);
    }
}

/// An Event of `type_` and `reason` for `action`, with `note`, about the object it is published
/// for.
fn event(type_: EventType, reason: Reason, action: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    }
}

/// Publishes `event` about `si` through `recorder`, its note cut to [`NOTE_LIMIT`]. A failure is
/// logged, never fatal: Events are for people.
async fn publish(recorder: &Recorder, si: &SegmentIntegration, mut event: Event) {
    event.note = event.note.map(within_note_limit);
    if let Err(error) = recorder.publish(&event, &si.object_ref(&())).await {
        tracing::warn!(integration = %si.name_any(), %error, reason = %event.reason, "cannot publish Event");
    }
}

/// `note` cut to at most [`NOTE_LIMIT`] bytes, at a character boundary, and then ending in "…".
fn within_note_limit(mut note: String) -> String {
    if note.len() <= NOTE_LIMIT {
        return note;
    }
    let mut end = NOTE_LIMIT - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note.truncate(end);
    note.push('…');
    note
}

/// Which failure each failing object's Warning Events are about, and the recorder `R` of their
/// series. kube's [`Recorder`] makes every Event of the same type, reason, action and object one
/// series: it creates the first and afterwards only counts the others on it (`series.count`),
/// under the first one's note, as long as they come within six minutes of each other (longer
/// than the longest retry delay, [`backoff`]). With one recorder for all of them, an object that
/// kept failing would show its first failure for ever, whatever it failed with since (a
/// finalizer patch refused because the cached object was out of date, then the lasting
/// Forbidden answer). So each failure of an object has a recorder of its own: the same failure
/// again counts on its Event, a different one gets a new Event. Hence a failure's note holds
/// nothing that changes between retries (not the retry delay, which is logged). An object's
/// entry goes when it reconciles or is gone.
#[derive(Debug)]
struct FailureSeries<R> {
    by_object: HashMap<ObjectRef<SegmentIntegration>, (String, R)>,
}

impl<R> Default for FailureSeries<R> {
    fn default() -> Self {
        FailureSeries {
            by_object: HashMap::new(),
        }
    }
}

impl<R: Clone> FailureSeries<R> {
    /// The recorder for `object` failing with `failure`: the one of its previous failure when
    /// that was the same, otherwise a new one made by `start`.
    fn recorder(
        &mut self,
        object: ObjectRef<SegmentIntegration>,
        failure: &str,
        start: impl FnOnce() -> R,
    ) -> R {
        match self.by_object.get(&object) {
            Some((previous, recorder)) if previous == failure => recorder.clone(),
            _ => {
                let recorder = start();
                self.by_object
                    .insert(object, (failure.to_owned(), recorder.clone()));
                recorder
            }
        }
    }

    /// Forgets `object`'s failure: it reconciled, and its next failure starts a new series.
    fn forget(&mut self, object: &ObjectRef<SegmentIntegration>) {
        self.by_object.remove(object);
    }
}

/// The pause of every watch of the controller after one of them failed: kube-runtime backs off
/// all of its watches together, so a failure of one blinds the controller to every change for
/// that long. Its default pause grows to 30 s and shrinks back only after two quiet minutes;
/// after an API server restart each watch fails once (`410 Gone`: its resource version is older
/// than the new server's cache) before it lists again, and those pauses added up to minutes in
/// which a reconcile that added the finalizer waited for an event nobody delivered. This one
/// starts again from [`WATCH_BACKOFF_FIRST`] as soon as any event arrives, and is at most
/// [`WATCH_BACKOFF_MAX`], which is still gentle on a server that is down.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff {
            next: WATCH_BACKOFF_FIRST,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(WATCH_BACKOFF_MAX);
        Some(delay)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_FIRST;
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
    // Owned children are watched as metadata only (kube-runtime's `owns` does so): the owner
    // reference is all the trigger needs. So are the destination Secrets, through an
    // `Api<PartialObjectMeta<Secret>>` (kube asks the API server for metadata only): the name is
    // all the mapping needs, and a full watch would hold every Secret's data of the namespaces in
    // memory while it lists them.
    controller
        .owns(scoped::<Deployment>(&client, ns), owned.clone())
        .owns(scoped::<Service>(&client, ns), owned.clone())
        .owns(scoped::<Secret>(&client, ns), owned.clone())
        .owns(scoped::<Ingress>(&client, ns), owned.clone())
        .owns(scoped::<HorizontalPodAutoscaler>(&client, ns), owned)
        .watches(
            scoped::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default(),
            move |secret: PartialObjectMeta<Secret>| {
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
        .trigger_backoff(WatchBackoff::default())
        .with_config(runtime::Config::default().concurrency(context.config.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context.clone())
        .for_each(|result| {
            let context = context.clone();
            async move {
                match result {
                    Ok((object, _action)) => tracing::debug!(%object, "reconciled"),
                    // error_policy has logged it, with the retry delay.
                    Err(runtime::Error::ReconcilerFailed(..)) => {}
                    // A failed object's retry came after it was deleted: forget its failures.
                    Err(runtime::Error::ObjectNotFound(gone)) => {
                        tracing::debug!(object = %gone, "gone before its retry");
                        let mut object = ObjectRef::<SegmentIntegration>::new(&gone.name);
                        object.namespace = gone.namespace;
                        context.record_success(&object);
                    }
                    Err(error) => tracing::warn!(%error, "controller error"),
                }
            }
        })
        .await;
}

/// Reconciles one `SegmentIntegration` behind the finalizer, in a `reconcile` span that names it.
pub async fn reconcile(si: Arc<SegmentIntegration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = build::namespace(&si)?.to_owned();
    let span = tracing::info_span!("reconcile", integration = %si.name_any(), %namespace);
    async move {
        let api = Api::<SegmentIntegration>::namespaced(ctx.client.clone(), &namespace);
        let object = ObjectRef::from_obj(&*si);
        let started = std::time::Instant::now();
        let Some(si) = with_current_finalizers(&api, si).await? else {
            // Gone, or replaced by a new object of the same name, whose own watch event
            // reconciles it.
            ctx.record_success(&object);
            return Ok(Action::await_change());
        };
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
    .instrument(span)
    .await
}

/// `si` as the API server has it now when the cached copy is about to have its finalizer added
/// or removed (it lacks the finalizer, or is being deleted), or `None` when the object is gone or
/// is another object of the same name (another uid). The cache can be older than the operator's
/// own last patch: another trigger of the object (its destination Secret's event, say) runs the
/// next reconcile as soon as the one that patched it returns, and the watch event of that patch
/// may not have been read yet, all the more while the watches back off after an error.
/// `finalizer` would then add the finalizer again (or clean up again and remove it again), and
/// the API server refuse the patch (its test of the finalizer list fails, 422): a failure, and a
/// Warning Event, about nothing. One GET per new object and per reconcile of a deleted one.
async fn with_current_finalizers(
    api: &Api<SegmentIntegration>,
    si: Arc<SegmentIntegration>,
) -> Result<Option<Arc<SegmentIntegration>>, Error> {
    let settled =
        si.finalizers().iter().any(|f| f == FINALIZER) && si.meta().deletion_timestamp.is_none();
    if settled {
        return Ok(Some(si));
    }
    Ok(api
        .get_opt(&si.name_any())
        .await?
        .filter(|current| current.uid() == si.uid())
        .map(Arc::new))
}

/// Requeues a failed object with exponential backoff, counts the failure under its category and,
/// unless a condition or an Event of the failing step already says it, publishes a Warning Event.
pub fn error_policy(si: Arc<SegmentIntegration>, error: &Error, ctx: Arc<Context>) -> Action {
    let category = error.category();
    ctx.metrics.failed(category);
    let failures = ctx.record_failure(ObjectRef::from_obj(&*si));
    let delay = backoff(failures);
    tracing::warn!(
        integration = %si.name_any(),
        namespace = ?si.namespace(),
        %error,
        category,
        failures,
        retry_in = ?delay,
        "reconcile failed"
    );
    if !error.reported() {
        let failure = format!("{category}: {error}");
        tokio::spawn(async move {
            ctx.publish_failure(&si, Reason::ReconcileFailed, "Reconcile", failure)
                .await;
        });
    }
    Action::requeue(delay)
}

/// The objects a resource points at, read before anything is built: today the destination's
/// database URL. A failure to read it is not fatal here: the children that do not need it are
/// still applied, and `SchemaReady` reports why.
struct Dereferenced {
    url: Result<String, Observation>,
}

/// Step 1, dereference: reads the destination Secret.
async fn dereference(si: &SegmentIntegration, ctx: &Context, namespace: &str) -> Dereferenced {
    let url = destination::url(&ctx.client, namespace, &si.spec.destination.url_secret_ref).await;
    Dereferenced { url }
}

/// Step 2, validate: what the CRD's schema cannot check (the object's identity, which every
/// child's name, labels and owner reference come from; the column selection's patterns), and the
/// build inputs.
fn validate(si: &SegmentIntegration, ctx: &Context, refs: &Dereferenced) -> Result<Inputs, Error> {
    build::schema_owner(si)?;
    build::check_column_selection(si)?;
    Ok(Inputs {
        schema: si.schema_name(),
        default_image: ctx.config.ingest_image.clone(),
        // The hash of the destination URL goes on the pod template: a rotated password rolls
        // the ingest pods.
        secret_hash: refs
            .url
            .as_deref()
            .ok()
            .map(|url| build::secret_hash([url])),
    })
}

/// The reconcile of a live resource, in the named steps of a Stackable operator: dereference,
/// validate, build (pure), apply, update status. Children that do not need the warehouse are
/// applied even while it is unreachable; then the reconcile fails with the destination's reason
/// and is retried with backoff.
async fn apply(si: &SegmentIntegration, ctx: &Context) -> Result<Action, Error> {
    let namespace = build::namespace(si)?;
    let refs = dereference(si, ctx, namespace).await;
    let inputs = validate(si, ctx, &refs)?;
    // Build every object first: a resource that cannot be built changes nothing.
    let desired = build::desired(si, &inputs)?;
    let deployment = apply_children(si, ctx, namespace, desired).await?;
    // The warehouse is not behind the Kubernetes client's fence: check leadership first.
    ctx.ensure_leading()?;
    let (schema_ready, reports) = ensure_destination(si, ctx, refs, &inputs.schema).await;
    // Figures read too soon after the last ones are not written (`status::report_due`); when
    // they differ, the reconcile comes back once they may be.
    let interval = ctx.config.report_interval;
    let due = status::report_due(si.status.as_ref(), chrono::Utc::now(), interval);
    let held_back = reports.as_ref().is_some_and(|r| {
        !due && si
            .status
            .as_ref()
            .is_some_and(|s| s.tables != r.tables || s.refused_last_hour != r.refused_last_hour)
    });
    // Versions change only with a reset, which is reported at once.
    let table_versions = reports.as_ref().map(|r| r.table_versions.clone());
    let reports = reports.filter(|_| due);
    let observed = Observed {
        generation: si.metadata.generation,
        schema: inputs.schema,
        webhook_url: build::webhook_url(si)?,
        credentials_secret: build::credentials_name(si)?,
        ingest_available: status::ingest_availability(&build::ingest_name(si)?, &deployment),
        schema_ready,
        tables: reports.as_ref().map(|r| r.tables.clone()),
        table_versions,
        refused_last_hour: reports.as_ref().map(|r| r.refused_last_hour.clone()),
        report_time: reports.map(|r| r.time),
    };
    update_status(si, ctx, namespace, &observed).await?;
    if observed.schema_ready.ok {
        Ok(Action::requeue(if held_back {
            interval.min(REFRESH)
        } else {
            REFRESH
        }))
    } else {
        Err(Error::Destination {
            reason: observed.schema_ready.reason,
            message: observed.schema_ready.message,
        })
    }
}

/// Step 4, apply: creates the credentials Secret once, applies every desired child by
/// server-side apply, then deletes every child this resource controls that is no longer desired
/// (found by label, whatever its kind), with an Event for each. Answers the applied Deployment, whose status says how
/// many pods are available.
async fn apply_children(
    si: &SegmentIntegration,
    ctx: &Context,
    namespace: &str,
    desired: build::Desired,
) -> Result<Deployment, Error> {
    let client = &ctx.client;
    if ensure_credentials(si, client, namespace).await? {
        ctx.publish(
            si,
            EventType::Normal,
            Reason::CredentialsCreated,
            "CreateCredentials",
            format!(
                "created Secret {} with a new shared secret and API key for Segment",
                build::credentials_name(si)?
            ),
        )
        .await;
    }
    let deployment = server_side_apply(client, namespace, &desired.deployment).await?;
    server_side_apply(client, namespace, &desired.service).await?;
    if let Some(ingress) = &desired.ingress {
        server_side_apply(client, namespace, ingress).await?;
    }
    if let Some(autoscaler) = &desired.autoscaler {
        server_side_apply(client, namespace, autoscaler).await?;
    }
    let keep = |name: Option<&String>| name.cloned().into_iter().collect::<Vec<_>>();
    let orphans = [
        delete_orphans::<Deployment>(
            si,
            client,
            namespace,
            &keep(desired.deployment.metadata.name.as_ref()),
        )
        .await?,
        delete_orphans::<Service>(
            si,
            client,
            namespace,
            &keep(desired.service.metadata.name.as_ref()),
        )
        .await?,
        delete_orphans::<Ingress>(
            si,
            client,
            namespace,
            &keep(
                desired
                    .ingress
                    .as_ref()
                    .and_then(|i| i.metadata.name.as_ref()),
            ),
        )
        .await?,
        delete_orphans::<HorizontalPodAutoscaler>(
            si,
            client,
            namespace,
            &keep(
                desired
                    .autoscaler
                    .as_ref()
                    .and_then(|a| a.metadata.name.as_ref()),
            ),
        )
        .await?,
    ];
    for (kind, name) in orphans.into_iter().flatten() {
        // One action per kind: Events of the same reason and action are one series, whose note
        // would name only the first child.
        ctx.publish(
            si,
            EventType::Normal,
            Reason::ChildDeleted,
            &format!("Delete{kind}"),
            format!("deleted {kind}/{name}: the spec no longer asks for it"),
        )
        .await;
    }
    Ok(deployment)
}

/// The destination part of step 4: the schema and tables exist (created where missing), the
/// table resets of `spec.tableReset` are carried out (each once, with a Normal Event
/// `TableReset`), as `SchemaReady`, the table report, the tables' versions and the last hour's
/// refused requests.
async fn ensure_destination(
    si: &SegmentIntegration,
    ctx: &Context,
    refs: Dereferenced,
    schema: &str,
) -> (Observation, Option<destination::Reports>) {
    let tables = si.tables();
    let ensured = async {
        let owner = build::schema_owner(si)
            .map_err(|error| Observation::failed(Reason::InvalidSchema, error.to_string()))?;
        destination::ensure_schema(
            &refs.url?,
            schema,
            &tables,
            &owner,
            &si.reset_requests(),
            si.spec.table_reset.old_rows,
        )
        .await
    }
    .await;
    match ensured {
        Ok((claim, report)) => {
            for reset in &report.resets {
                ctx.publish(
                    si,
                    EventType::Normal,
                    Reason::TableReset,
                    "ResetTable",
                    destination::reset_note(reset),
                )
                .await;
            }
            (
                Observation::ok(
                    Reason::SchemaReady,
                    schema_ready_message(schema, &tables, &claim),
                ),
                Some(report),
            )
        }
        Err(failure) => (failure, None),
    }
}

/// Step 5, update status: writes the status computed from what was observed (only when it
/// changed) and publishes the Events its change warrants ([`status::events`]).
async fn update_status(
    si: &SegmentIntegration,
    ctx: &Context,
    namespace: &str,
    observed: &Observed,
) -> Result<(), Error> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let previous = si.status.as_ref();
    let status = status::status(observed, previous, &now);
    if previous == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": SegmentIntegration::api_version(&()),
        "kind": SegmentIntegration::kind(&()),
        "status": status,
    });
    Api::<SegmentIntegration>::namespaced(ctx.client.clone(), namespace)
        .patch_status(
            &si.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    for event in status::events(previous, &status) {
        publish(&ctx.recorder, si, event).await;
    }
    Ok(())
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

/// The reconcile of a deleted resource: carries out its deletion policy; until that succeeds the
/// finalizer stays.
async fn cleanup(si: &SegmentIntegration, ctx: &Context) -> Result<Action, Error> {
    let namespace = build::namespace(si)?;
    let schema = si.schema_name();
    let owner = build::schema_owner(si)?;
    match si.spec.deletion_policy {
        DeletionPolicy::Retain => {
            tracing::info!(%schema, "deleted; schema retained");
        }
        DeletionPolicy::Drop => {
            let dropped = async {
                let url =
                    destination::url(&ctx.client, namespace, &si.spec.destination.url_secret_ref)
                        .await?;
                ctx.ensure_leading()
                    .map_err(|error| Observation::failed(Reason::NotLeading, error.to_string()))?;
                destination::drop_owned(&url, &schema, &owner).await
            }
            .await;
            let dropped = match dropped {
                Ok(dropped) => dropped,
                Err(failure) => {
                    let note = format!(
                        "cannot drop schema {schema}: {}; set spec.deletionPolicy to Retain to \
                         delete the resource and keep the schema",
                        failure.message
                    );
                    ctx.publish_failure(si, Reason::DropSchemaFailed, "DropSchema", note)
                        .await;
                    return Err(Error::Cleanup {
                        schema,
                        reason: failure.reason,
                        message: failure.message,
                    });
                }
            };
            let note = dropped_note(&schema, &dropped);
            tracing::info!(%schema, %note, "deleted");
            let reason = if dropped.schema {
                Reason::SchemaDropped
            } else {
                Reason::TablesDropped
            };
            ctx.publish(si, EventType::Normal, reason, "DropSchema", note)
                .await;
        }
    }
    Ok(Action::await_change())
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
        .get_opt(&build::credentials_name(si)?)
        .await?
        .is_some()
    {
        return Ok(false);
    }
    let credentials = build::Credentials {
        shared_secret: random_token()?,
        api_key: random_token()?,
        pseudonymization_key: random_token()?,
    };
    let secret = build::credentials_secret(si, &credentials)?;
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!("credentials created");
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
    let name = object
        .meta()
        .name
        .clone()
        .ok_or(Error::Build(BuildError::Incomplete("name")))?;
    // k8s-openapi's objects serialize with their apiVersion and kind, as an apply patch needs.
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?)
}

/// Deletes every object of kind `K` in `namespace` that carries `si`'s label and is controlled by
/// it (its UID), except those named in `keep`, and answers the kind and name of each one deleted. The
/// label finds the children; the owner reference makes sure they are ours, whatever the label
/// says.
async fn delete_orphans<K>(
    si: &SegmentIntegration,
    client: &Client,
    namespace: &str,
    keep: &[String],
) -> Result<Vec<(String, String)>, Error>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let selector = build::children_selector(si)?;
    let uid = si.uid();
    let mut deleted = Vec::new();
    for child in api.list(&ListParams::default().labels(&selector)).await? {
        let name = child.name_any();
        let controlled = child
            .owner_references()
            .iter()
            .any(|owner| owner.controller == Some(true) && Some(&owner.uid) == uid.as_ref());
        if !controlled || keep.contains(&name) {
            continue;
        }
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => deleted.push((K::kind(&K::DynamicType::default()).into_owned(), name)),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(deleted)
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
    fn watch_backoff_doubles_to_five_seconds_and_starts_over_on_an_event() {
        let mut backoff = WatchBackoff::default();
        let delays: Vec<Duration> = backoff.by_ref().take(6).collect();
        assert_eq!(
            delays,
            [250, 500, 1000, 2000, 4000, 5000].map(Duration::from_millis)
        );
        backoff.reset();
        assert_eq!(backoff.next(), Some(WATCH_BACKOFF_FIRST));
    }

    #[test]
    fn each_failure_of_an_object_is_an_event_series_of_its_own() {
        let shop = ObjectRef::<SegmentIntegration>::new("shop").within("ns");
        let other = ObjectRef::<SegmentIntegration>::new("other").within("ns");
        let mut series = FailureSeries::default();
        let mut started = 0;
        let mut recorder = |series: &mut FailureSeries<u32>, object: &ObjectRef<_>, failure| {
            series.recorder(object.clone(), failure, || {
                started += 1;
                started
            })
        };
        // A stale object's refused finalizer patch, then the lasting Forbidden answer: the second
        // is not counted on the first one's Event, which would keep the first one's note.
        assert_eq!(recorder(&mut series, &shop, "kubernetes: 422"), 1);
        assert_eq!(recorder(&mut series, &shop, "kubernetes: 403"), 2);
        assert_eq!(recorder(&mut series, &shop, "kubernetes: 403"), 2);
        assert_eq!(recorder(&mut series, &other, "kubernetes: 403"), 3);
        assert_eq!(recorder(&mut series, &shop, "kubernetes: 422"), 4);
        // After a success, the same failure again is a new Event.
        series.forget(&shop);
        assert_eq!(recorder(&mut series, &shop, "kubernetes: 422"), 5);
        assert_eq!(recorder(&mut series, &other, "kubernetes: 403"), 3);
    }

    #[test]
    fn notes_are_cut_to_what_the_api_server_accepts() {
        assert_eq!(within_note_limit("short".to_owned()), "short");
        let exact = "x".repeat(NOTE_LIMIT);
        assert_eq!(within_note_limit(exact.clone()), exact);
        let over = within_note_limit("x".repeat(NOTE_LIMIT + 1));
        assert_eq!(over.len(), NOTE_LIMIT);
        assert!(over.ends_with("x…"), "{over}");
        let long = within_note_limit(format!("kubernetes: {}", "é".repeat(NOTE_LIMIT)));
        assert!(long.len() <= NOTE_LIMIT, "{}", long.len());
        assert!(
            long.starts_with("kubernetes: éé") && long.ends_with("é…"),
            "{long}"
        );
    }

    #[test]
    fn errors_are_categorised_through_the_finalizer() {
        use kube::runtime::finalizer::Error as F;
        let destination = || Error::Destination {
            reason: Reason::DatabaseUnavailable,
            message: "down".to_owned(),
        };
        let spec = || Error::Build(BuildError::Incomplete("uid"));
        let cases = [
            (destination(), "destination", true),
            (spec(), "spec", false),
            (Error::Random("no entropy".to_owned()), "credentials", false),
            (
                Error::Finalizer(Box::new(F::ApplyFailed(destination()))),
                "destination",
                true,
            ),
            (
                Error::Finalizer(Box::new(F::CleanupFailed(spec()))),
                "spec",
                false,
            ),
            (Error::Finalizer(Box::new(F::UnnamedObject)), "spec", false),
        ];
        for (error, category, reported) in cases {
            assert_eq!(error.category(), category, "{error}");
            assert_eq!(error.reported(), reported, "{error}");
        }
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
