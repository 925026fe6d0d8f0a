//! Leader election on a `coordination.k8s.io` Lease, so that two operator replicas never
//! reconcile at once. The rules are client-go's `leaderelection` package's (the one every
//! controller-runtime operator uses):
//!
//! - **Expiry is judged from what this replica saw, by its own clock.** A candidate remembers the
//!   Lease's record (holder, times, `resourceVersion`, ...) and the instant, on its monotonic
//!   clock, at which it last saw that record change. It takes the Lease over only when the record
//!   has not changed for the Lease's duration since then. The holder's `renewTime` is written for
//!   people and other tools, and never compared with the local wall clock: two machines' wall
//!   clocks may disagree by any amount, while two monotonic clocks agree on how long a few seconds
//!   last.
//! - **The leader stops before anyone may take over.** It renews every retry period; when it has
//!   not renewed successfully within the renew deadline, measured from the moment the last
//!   successful renewal was *sent*, it stops acting. A candidate can only have seen that renewal
//!   after it was sent, so it waits at least the lease duration from then: the leader has stopped
//!   `lease duration - renew deadline` before the earliest takeover.
//! - **Updates carry the `resourceVersion` read**, so of two replicas racing for the Lease the API
//!   server lets exactly one win (the other gets 409 Conflict).
//!
//! The pure rules are [`observe`], [`decide`] and [`Term`]; [`lead`] is the I/O around them.
//!
//! Stopping the controller on loss is done twice over (see [`lead`]): the controller's future is
//! dropped when the renewer reports the loss, and, because a task can be late to notice, every
//! write request of the controller passes a [`Gate`] that refuses it once the renew deadline has
//! passed, whatever the tasks are doing.

use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::client::Body;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

/// client-go's default lease duration (`LeaseDuration`, 15 s): how long a candidate waits after
/// last seeing the Lease change before it takes the Lease over.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// client-go's default renew deadline (`RenewDeadline`, 10 s): how long the leader keeps acting
/// after its last successful renewal was sent.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// client-go's default retry period (`RetryPeriod`, 2 s): how often the leader renews, and a
/// candidate looks at the Lease.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// The three durations of leader election, checked against each other as client-go checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
}

/// Why a [`Timing`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    /// The renew deadline is not shorter than the lease duration.
    #[error(
        "the renew deadline ({renew_deadline:?}) must be shorter than the lease duration \
         ({lease_duration:?}): a leader that cannot renew must stop before another replica may \
         take the Lease over"
    )]
    RenewDeadline {
        /// The renew deadline given.
        renew_deadline: Duration,
        /// The lease duration given.
        lease_duration: Duration,
    },
    /// The retry period is zero or not shorter than the renew deadline.
    #[error(
        "the retry period ({retry_period:?}) must be more than zero and shorter than the renew \
         deadline ({renew_deadline:?}): a leader must be able to try to renew before its deadline"
    )]
    RetryPeriod {
        /// The retry period given.
        retry_period: Duration,
        /// The renew deadline given.
        renew_deadline: Duration,
    },
    /// The lease duration does not fit the Lease's `leaseDurationSeconds` (1 s to about 68 years).
    #[error("the lease duration ({0:?}) must be between 1 s and {max} s", max = i32::MAX)]
    LeaseDuration(Duration),
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }
}

impl Timing {
    /// Checks the durations: `retry_period < renew_deadline < lease_duration` (client-go's
    /// `NewLeaderElector` refuses anything else), the retry period above zero, and the lease
    /// duration at least 1 s (the Lease stores it in whole seconds).
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Timing, TimingError> {
        if lease_duration < Duration::from_secs(1)
            || lease_duration.as_secs() > u64::from(i32::MAX.unsigned_abs())
        {
            return Err(TimingError::LeaseDuration(lease_duration));
        }
        if renew_deadline >= lease_duration {
            return Err(TimingError::RenewDeadline {
                renew_deadline,
                lease_duration,
            });
        }
        if retry_period.is_zero() || retry_period >= renew_deadline {
            return Err(TimingError::RetryPeriod {
                retry_period,
                renew_deadline,
            });
        }
        Ok(Timing {
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }

    /// How long a candidate waits after last seeing the Lease change.
    pub fn lease_duration(&self) -> Duration {
        self.lease_duration
    }

    /// How long the leader acts after its last successful renewal was sent.
    pub fn renew_deadline(&self) -> Duration {
        self.renew_deadline
    }

    /// How often the leader renews and a candidate looks.
    pub fn retry_period(&self) -> Duration {
        self.retry_period
    }

    /// The lease duration as the Lease records it: whole seconds, rounded up, so a candidate never
    /// waits less than this replica's setting.
    fn lease_duration_seconds(&self) -> i32 {
        let seconds =
            self.lease_duration.as_secs() + u64::from(self.lease_duration.subsec_nanos() > 0);
        i32::try_from(seconds).unwrap_or(i32::MAX)
    }
}

/// Where the Lease is, who is asking for it, and the timing.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Lease duration, renew deadline and retry period.
    pub timing: Timing,
}

/// The parts of a Lease whose change shows that its holder is alive: client-go's
/// `LeaderElectionRecord`, plus the `resourceVersion`, which changes on every write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Who holds it; `None` when nobody does (released, or never held).
    pub holder: Option<String>,
    /// The holder's lease duration, in seconds.
    pub lease_duration_seconds: Option<i32>,
    /// When the holder took it, by the holder's wall clock (informational).
    pub acquire_time: Option<MicroTime>,
    /// When the holder last renewed it, by the holder's wall clock (informational).
    pub renew_time: Option<MicroTime>,
    /// How often it changed hands.
    pub transitions: Option<i32>,
    /// The object's version in the API server.
    pub resource_version: Option<String>,
}

impl Record {
    /// The record of `lease`.
    pub fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|holder| !holder.is_empty()),
            lease_duration_seconds: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time,
            renew_time: spec.renew_time,
            transitions: spec.lease_transitions,
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// A Lease record as this replica last read it, and when, by this replica's monotonic clock, it
/// saw the record change (client-go's `observedRecord` and `observedTime`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The record last read.
    pub record: Record,
    /// When it was first read in this form.
    pub changed_at: Instant,
}

/// The observation after reading `record` at `now` (an instant taken after the read answered):
/// the time of change moves only when the record differs from the one seen before.
pub fn observe(previous: Option<Observation>, record: Record, now: Instant) -> Observation {
    match previous {
        Some(previous) if previous.record == record => previous,
        _ => Observation {
            record,
            changed_at: now,
        },
    }
}

/// What to do about the Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Nobody holds it, or its record has not changed for a lease duration since we saw it
    /// change: take it over.
    TakeOver,
    /// Someone else holds it and was seen renewing it within a lease duration: wait.
    Wait,
}

/// Decides from what this replica observed of the Lease (`None`: there is none) at `now`, by the
/// same monotonic clock as [`Observation::changed_at`]. The lease duration is the record's own
/// (the holder's setting), as client-go uses it, or ours when the record has none.
pub fn decide(
    observation: Option<&Observation>,
    identity: &str,
    timing: &Timing,
    now: Instant,
) -> Decision {
    let Some(observation) = observation else {
        return Decision::Create;
    };
    match observation.record.holder.as_deref() {
        Some(holder) if holder == identity => Decision::Renew,
        None => Decision::TakeOver,
        Some(_) => {
            let duration = observation
                .record
                .lease_duration_seconds
                .map_or(timing.lease_duration, |seconds| {
                    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
                });
            if now.saturating_duration_since(observation.changed_at) >= duration {
                Decision::TakeOver
            } else {
                Decision::Wait
            }
        }
    }
}

/// One term of leadership: leading until an instant, or ended for good. A term never comes back
/// once ended: a replica that lost the Lease starts over as a candidate, with a new term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    /// Leading until `until` (exclusive), unless renewed before.
    Leading {
        /// The renew deadline after the last successful renewal was sent.
        until: Instant,
    },
    /// Not leading any more.
    Ended,
}

impl Term {
    /// The term that a successful acquisition sent at `sent` begins.
    pub fn begin(sent: Instant, timing: &Timing) -> Term {
        Term::Leading {
            until: sent + timing.renew_deadline,
        }
    }

    /// The term after a renewal that was sent at `sent` succeeded, learnt at `now`. A success
    /// learnt after the deadline ends the term all the same: the leader has stopped by then.
    pub fn renewed(self, sent: Instant, timing: &Timing, now: Instant) -> Term {
        match self {
            Term::Leading { until } if now < until => Term::Leading {
                until: until.max(sent + timing.renew_deadline),
            },
            _ => Term::Ended,
        }
    }

    /// Whether the leader may act at `now`.
    pub fn leading(self, now: Instant) -> bool {
        matches!(self, Term::Leading { until } if now < until)
    }
}

/// The current [`Term`], shared by the renewer and everything that must act only while leading.
#[derive(Debug, Clone)]
pub struct Gate {
    term: Arc<Mutex<Term>>,
}

impl Gate {
    /// A gate that is always open: for a single replica run without leader election.
    pub fn unconditional() -> Gate {
        Gate::new(Term::Leading {
            until: Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600),
        })
    }

    fn new(term: Term) -> Gate {
        Gate {
            term: Arc::new(Mutex::new(term)),
        }
    }

    /// A gate that is closed for good: a term that is over.
    pub fn ended() -> Gate {
        Gate::new(Term::Ended)
    }

    fn update(&self, change: impl FnOnce(Term) -> Term) -> Term {
        let mut term = self.term.lock().unwrap_or_else(PoisonError::into_inner);
        *term = change(*term);
        *term
    }

    /// Whether this replica may act now: it leads, and its renew deadline has not passed.
    pub fn is_leading(&self) -> bool {
        self.term
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .leading(Instant::now())
    }

    /// `client`, refusing every request that may write (anything but GET, HEAD and OPTIONS) while
    /// this gate is closed, with [`NotLeading`]. The check is made as each request leaves, so no
    /// write leaves after the renew deadline, however late the tasks notice the loss.
    pub fn fence(&self, client: Client) -> Client {
        let namespace = client.default_namespace().to_owned();
        Client::new(
            Fenced {
                client,
                gate: self.clone(),
            },
            namespace,
        )
    }
}

/// A write refused because this replica does not lead (any more).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("refused to write: this replica does not hold the leader Lease (any more)")]
pub struct NotLeading;

/// The service behind [`Gate::fence`]'s client.
#[derive(Clone)]
struct Fenced {
    client: Client,
    gate: Gate,
}

impl tower::Service<http::Request<Body>> for Fenced {
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let reads = matches!(
            *request.method(),
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        if !reads && !self.gate.is_leading() {
            return futures::future::ready(Err(NotLeading.into())).boxed();
        }
        let client = self.client.clone();
        async move { Ok(client.send(request).await?) }.boxed()
    }
}

/// What one look at the Lease came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// We hold it; the successful request chain began at this instant.
    Held(Instant),
    /// Someone else holds it.
    HeldByOther,
    /// Our write lost a race (409 Conflict): look again.
    Conflict,
}

/// One replica's view of the Lease, kept across attempts.
struct Elector {
    api: Api<Lease>,
    settings: Settings,
    observation: Option<Observation>,
}

impl Elector {
    /// client-go's `tryAcquireOrRenew`: reads the Lease, decides, and writes it if we may.
    async fn attempt(&mut self) -> Result<Attempt, kube::Error> {
        let sent = Instant::now();
        let existing = self.api.get_opt(&self.settings.name).await?;
        let read_at = Instant::now();
        if let Some(lease) = &existing {
            self.observation = Some(observe(self.observation.take(), Record::of(lease), read_at));
        }
        let decision = decide(
            existing.as_ref().and(self.observation.as_ref()),
            &self.settings.identity,
            &self.settings.timing,
            read_at,
        );
        let now = Timestamp::now();
        let written = match (decision, existing) {
            (Decision::Wait, _) => return Ok(Attempt::HeldByOther),
            (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.settings.name.clone()),
                        namespace: Some(self.settings.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.settings.identity.clone()),
                        lease_duration_seconds: Some(self.settings.timing.lease_duration_seconds()),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::TakeOver {
                    spec.holder_identity = Some(self.settings.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(self.settings.timing.lease_duration_seconds());
                spec.renew_time = Some(MicroTime(now));
                // `replace` sends the resourceVersion we read: a concurrent change makes it fail.
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(lease) => {
                self.observation = Some(observe(None, Record::of(&lease), Instant::now()));
                Ok(Attempt::Held(sent))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
            Err(error) => Err(error),
        }
    }
}

/// The Lease, held: renewed in the background until [`Leadership::release`], or until it has
/// not been renewed within the renew deadline (then [`Leadership::lost`] resolves and the gate
/// closes). Dropping it stops the renewal without handing the Lease back, as a crashed replica
/// would: another takes over a lease duration after it last saw it renewed.
pub struct Leadership {
    api: Api<Lease>,
    settings: Settings,
    gate: Gate,
    lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("settings", &self.settings)
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

/// Waits until this replica holds the Lease, looking every retry period (client-go's `acquire`),
/// then renews it in the background every retry period (client-go's `renew`).
pub async fn acquire(client: Client, settings: Settings) -> Leadership {
    let timing = settings.timing;
    let api = Api::<Lease>::namespaced(client, &settings.namespace);
    let mut elector = Elector {
        api: api.clone(),
        settings: settings.clone(),
        observation: None,
    };
    let sent = loop {
        // An answer that comes after the renew deadline would begin a term that is already over.
        match tokio::time::timeout(timing.renew_deadline, elector.attempt()).await {
            Ok(Ok(Attempt::Held(sent))) => break sent,
            Ok(Ok(Attempt::HeldByOther | Attempt::Conflict)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, lease = %settings.name, "cannot reach the Lease")
            }
            Err(_) => tracing::warn!(lease = %settings.name, "the Lease did not answer in time"),
        }
        tokio::time::sleep(timing.retry_period).await;
    };
    tracing::info!(lease = %settings.name, identity = %settings.identity, "leading");
    let gate = Gate::new(Term::begin(sent, &timing));
    let (tell, lost) = watch::channel(false);
    let renewer = tokio::spawn(renew(elector, gate.clone(), tell));
    Leadership {
        api,
        settings,
        gate,
        lost,
        renewer,
    }
}

/// Renews every retry period while the term lasts; ends the term (and says so) when a renewal
/// has not succeeded by the renew deadline, or someone else holds the Lease.
async fn renew(mut elector: Elector, gate: Gate, tell: watch::Sender<bool>) {
    let timing = elector.settings.timing;
    while let Term::Leading { until } = gate.update(|term| term) {
        // Wake at the deadline too, so the loss is told as it happens (the gate has closed by
        // itself; this stops the controller).
        tokio::time::sleep_until((Instant::now() + timing.retry_period).min(until)).await;
        if Instant::now() >= until {
            break;
        }
        match tokio::time::timeout_at(until, elector.attempt()).await {
            Ok(Ok(Attempt::Held(sent))) => {
                if gate.update(|term| term.renewed(sent, &timing, Instant::now())) == Term::Ended {
                    break;
                }
            }
            Ok(Ok(Attempt::HeldByOther)) => {
                tracing::error!(lease = %elector.settings.name, "another replica holds the Lease");
                break;
            }
            // Someone else wrote the Lease since we read it; the next look tells who holds it.
            Ok(Ok(Attempt::Conflict)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot renew the Lease"),
            Err(_) => tracing::warn!("the Lease did not answer before the renew deadline"),
        }
    }
    gate.update(|_| Term::Ended);
    tracing::error!(lease = %elector.settings.name, identity = %elector.settings.identity, "lost the Lease; stopping");
    let _ = tell.send(true);
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewer.abort();
        self.gate.update(|_| Term::Ended);
    }
}

impl Leadership {
    /// The gate that is open while this term lasts.
    pub fn gate(&self) -> Gate {
        self.gate.clone()
    }

    /// Resolves when the Lease is lost; the controller must stop at once.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut lost = self.lost.clone();
        async move {
            // An error means the renewer is gone, which also means the Lease is not held.
            let _ = lost.wait_for(|lost| *lost).await;
        }
    }

    /// Stops renewing and hands the Lease back, so another replica takes over at once.
    pub async fn release(self) {
        self.renewer.abort();
        self.gate.update(|_| Term::Ended);
        let released = async {
            let mut lease = self.api.get(&self.settings.name).await?;
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(&self.settings.identity) {
                spec.holder_identity = None;
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await?;
            }
            Ok::<(), kube::Error>(())
        };
        if let Err(error) = released.await {
            tracing::warn!(%error, "cannot release the Lease; it expires by itself");
        }
    }
}

/// The shutdown signal handed to the work of [`lead`]: it may be awaited by several parts.
pub type Shutdown = Shared<BoxFuture<'static, ()>>;

/// How a term of [`lead`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown was asked for (before or while leading); the Lease, if held, was released.
    Shutdown,
    /// The Lease was lost; the work was stopped. Start over as a candidate (the operator exits
    /// non-zero so its pod restarts).
    Lost,
}

/// Waits for the Lease, then runs `work` while leading, until `shutdown` or the loss of the Lease.
///
/// The Lease is read and written with `lease_client`; `work` gets `work_client` fenced by the
/// term's [`Gate`] (its writes are refused once the renew deadline passes), the gate itself (for
/// writes that do not go through the client, such as the warehouse's), and the shutdown signal
/// (for a graceful stop). The operator passes the same client twice; the tests cut the Lease's
/// connection alone, to prove that a leader whose other requests still go through stops all the
/// same.
///
/// On loss, `work`'s future is dropped at once rather than asked to stop: kube-runtime's graceful
/// shutdown lets reconciles in flight finish, and a reconcile may wait long on a database.
/// Dropping it cancels them at their next await point; the fence covers the moment between the
/// deadline and that drop, so no write leaves after the deadline even if the renewer is late.
pub async fn lead<W, F>(
    lease_client: Client,
    work_client: Client,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    work: W,
) -> Ended
where
    W: FnOnce(Client, Gate, Shutdown) -> F,
    F: Future<Output = ()>,
{
    let shutdown = shutdown.boxed().shared();
    let leadership = tokio::select! {
        leadership = acquire(lease_client, settings) => leadership,
        () = shutdown.clone() => return Ended::Shutdown,
    };
    let gate = leadership.gate();
    let work = work(gate.fence(work_client), gate, shutdown);
    let lost = leadership.lost();
    let ended = tokio::select! {
        () = work => Ended::Shutdown,
        () = lost => Ended::Lost,
    };
    match ended {
        Ended::Shutdown => leadership.release().await,
        Ended::Lost => drop(leadership),
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn timing() -> Timing {
        Timing::new(
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
        .expect("client-go's defaults are valid")
    }

    fn record(holder: &str, renewed: Timestamp, version: &str) -> Record {
        Record {
            holder: Some(holder.to_owned()),
            lease_duration_seconds: Some(15),
            acquire_time: None,
            renew_time: Some(MicroTime(renewed)),
            transitions: Some(0),
            resource_version: Some(version.to_owned()),
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_renew_time_far_in_the_past_just_seen_changing_is_not_expired() {
        let timing = timing();
        let start = Instant::now();
        // The holder's clock is an hour behind ours: its renewTime looks long expired.
        let old = Timestamp::now() - SignedDuration::from_hours(1);
        let seen = observe(None, record("b", old, "1"), start);
        assert_eq!(decide(Some(&seen), "a", &timing, start), Decision::Wait);
        // It keeps renewing (the record changes), so it is never taken over.
        let mut now = start;
        let mut seen = seen;
        for version in 2..20 {
            now += 2 * SECOND;
            seen = observe(Some(seen), record("b", old, &version.to_string()), now);
            assert_eq!(decide(Some(&seen), "a", &timing, now), Decision::Wait);
        }
    }

    #[test]
    fn a_record_unchanged_for_the_lease_duration_is_expired_whatever_its_renew_time() {
        let timing = timing();
        let start = Instant::now();
        // renewTime in the future by our wall clock: still expired once unchanged long enough.
        let future = Timestamp::now() + SignedDuration::from_hours(1);
        let mut seen = observe(None, record("b", future, "7"), start);
        for elapsed in [0, 5, 10, 14] {
            let now = start + elapsed * SECOND;
            seen = observe(Some(seen), record("b", future, "7"), now);
            assert_eq!(seen.changed_at, start, "an unchanged record keeps its time");
            assert_eq!(decide(Some(&seen), "a", &timing, now), Decision::Wait);
        }
        let now = start + 15 * SECOND;
        assert_eq!(decide(Some(&seen), "a", &timing, now), Decision::TakeOver);
    }

    #[test]
    fn any_change_of_the_record_restarts_the_wait() {
        let timing = timing();
        let start = Instant::now();
        let at = Timestamp::now();
        let seen = observe(None, record("b", at, "1"), start);
        // Only the resourceVersion changed (someone edited the Lease): seen as a change.
        let later = start + 14 * SECOND;
        let seen = observe(Some(seen), record("b", at, "2"), later);
        assert_eq!(seen.changed_at, later);
        assert_eq!(
            decide(Some(&seen), "a", &timing, start + 20 * SECOND),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&seen), "a", &timing, later + 15 * SECOND),
            Decision::TakeOver
        );
    }

    #[test]
    fn the_holders_lease_duration_counts_not_ours() {
        let timing = timing();
        let start = Instant::now();
        let mut long = record("b", Timestamp::now(), "1");
        long.lease_duration_seconds = Some(60);
        let seen = observe(None, long, start);
        assert_eq!(
            decide(Some(&seen), "a", &timing, start + 30 * SECOND),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&seen), "a", &timing, start + 60 * SECOND),
            Decision::TakeOver
        );
    }

    #[test]
    fn no_lease_is_created_ours_renewed_a_released_one_taken() {
        let timing = timing();
        let now = Instant::now();
        assert_eq!(decide(None, "a", &timing, now), Decision::Create);
        let ours = observe(None, record("a", Timestamp::now(), "1"), now);
        assert_eq!(decide(Some(&ours), "a", &timing, now), Decision::Renew);
        let mut released = record("b", Timestamp::now(), "2");
        released.holder = None;
        let released = observe(None, released, now);
        assert_eq!(
            decide(Some(&released), "a", &timing, now),
            Decision::TakeOver
        );
    }

    #[test]
    fn the_leader_stops_at_the_renew_deadline_after_its_last_successful_renewal_was_sent() {
        let timing = timing();
        let sent = Instant::now();
        let term = Term::begin(sent, &timing);
        assert!(term.leading(sent + 9 * SECOND));
        assert!(!term.leading(sent + 10 * SECOND));
        // Renewals sent at 2 s and 4 s succeed: the deadline moves to 14 s.
        let term = term.renewed(sent + 2 * SECOND, &timing, sent + 3 * SECOND);
        let term = term.renewed(sent + 4 * SECOND, &timing, sent + 5 * SECOND);
        assert!(term.leading(sent + 13 * SECOND));
        assert!(!term.leading(sent + 14 * SECOND));
        // A renewal that succeeds only after the deadline does not bring the term back.
        let late = term.renewed(sent + 12 * SECOND, &timing, sent + 14 * SECOND);
        assert_eq!(late, Term::Ended);
        assert!(!late.leading(sent + 15 * SECOND));
        // An older answer arriving late never moves the deadline back.
        let term = term.renewed(sent + SECOND, &timing, sent + 6 * SECOND);
        assert_eq!(
            term,
            Term::Leading {
                until: sent + 14 * SECOND
            }
        );
    }

    #[test]
    fn the_leader_has_stopped_before_a_candidate_may_take_over() {
        // The candidate sees the last renewal at the earliest when it was sent; from then it
        // waits a lease duration, while the leader stops a renew deadline after sending it.
        let timing = timing();
        let sent = Instant::now();
        let term = Term::begin(sent, &timing);
        let seen = observe(None, record("leader", Timestamp::now(), "1"), sent);
        let mut now = sent;
        while decide(Some(&seen), "candidate", &timing, now) == Decision::Wait {
            now += Duration::from_millis(10);
        }
        assert!(!term.leading(now));
        assert!(now - (sent + timing.renew_deadline()) >= Duration::from_secs(5));
    }

    #[test]
    fn timings_are_checked_as_client_go_checks_them() {
        assert_eq!(Timing::default(), timing());
        assert!(matches!(
            Timing::new(10 * SECOND, 10 * SECOND, 2 * SECOND),
            Err(TimingError::RenewDeadline { .. })
        ));
        assert!(matches!(
            Timing::new(15 * SECOND, 10 * SECOND, 10 * SECOND),
            Err(TimingError::RetryPeriod { .. })
        ));
        assert!(matches!(
            Timing::new(15 * SECOND, 10 * SECOND, Duration::ZERO),
            Err(TimingError::RetryPeriod { .. })
        ));
        assert!(matches!(
            Timing::new(
                Duration::from_millis(900),
                Duration::from_millis(500),
                Duration::from_millis(100)
            ),
            Err(TimingError::LeaseDuration(_))
        ));
        let error = Timing::new(4 * SECOND, 5 * SECOND, SECOND).expect_err("refused");
        assert_eq!(
            error.to_string(),
            "the renew deadline (5s) must be shorter than the lease duration (4s): a leader that \
             cannot renew must stop before another replica may take the Lease over"
        );
        let fractional = Timing::new(
            Duration::from_millis(4500),
            Duration::from_millis(2500),
            Duration::from_millis(500),
        )
        .expect("valid");
        assert_eq!(fractional.lease_duration_seconds(), 5);
    }

    #[test]
    fn the_unconditional_gate_is_open() {
        assert!(Gate::unconditional().is_leading());
        assert!(!Gate::ended().is_leading());
    }
}
