//! Leader election on a `coordination.k8s.io` Lease, so that two operator replicas never
//! reconcile at once: the one holding the Lease runs the controller, the other waits to take
//! over when the holder stops renewing it.
//!
//! The Lease is updated with its `resourceVersion`, so of two replicas racing for it the API
//! server lets exactly one win (the other gets 409 Conflict and keeps waiting).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

/// Where the Lease is and who is asking for it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease stays held without renewal; the holder renews it three times as often.
    pub duration: Duration,
}

/// What to do about the Lease as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// Nobody holds it, or the holder let it expire: take it over.
    TakeOver,
    /// Someone else holds it: wait.
    Wait,
}

/// Decides from the Lease's spec (`None` when there is no Lease) at time `now`.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
    match &spec.renew_time {
        Some(MicroTime(renewed)) if *renewed + duration > now => Decision::Wait,
        _ => Decision::TakeOver,
    }
}

/// Acquires or renews the Lease once; says whether we hold it afterwards.
pub async fn try_hold(api: &Api<Lease>, settings: &Settings) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let existing = api.get_opt(&settings.name).await?;
    let decision = decide(
        existing.as_ref().and_then(|l| l.spec.as_ref()),
        &settings.identity,
        now,
    );
    let duration_seconds = i32::try_from(settings.duration.as_secs()).unwrap_or(i32::MAX);
    let result = match (decision, existing) {
        (Decision::Wait, _) => return Ok(false),
        (Decision::Create, _) | (_, None) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    namespace: Some(settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(settings.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await
        }
        (decision, Some(mut lease)) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if decision == Decision::TakeOver {
                spec.holder_identity = Some(settings.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.lease_duration_seconds = Some(duration_seconds);
            spec.renew_time = Some(MicroTime(now));
            // `replace` sends the resourceVersion we read: a concurrent change makes it fail.
            api.replace(&settings.name, &PostParams::default(), &lease)
                .await
        }
    };
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

/// The Lease, held: renewed in the background until [`Leadership::release`] or until renewal
/// fails for longer than the Lease's duration. Dropping it stops the renewal without handing the
/// Lease back, as a crashed replica would: another takes over once it expires.
#[derive(Debug)]
pub struct Leadership {
    api: Api<Lease>,
    settings: Settings,
    lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

/// Waits until this replica holds the Lease, retrying every third of its duration.
pub async fn acquire(client: Client, settings: Settings) -> Leadership {
    let api = Api::<Lease>::namespaced(client, &settings.namespace);
    let period = settings.duration / 3;
    loop {
        match try_hold(&api, &settings).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, lease = %settings.name, "cannot reach the Lease"),
        }
        tokio::time::sleep(period).await;
    }
    tracing::info!(lease = %settings.name, identity = %settings.identity, "leading");
    let (tell, lost) = watch::channel(false);
    let renewer = tokio::spawn({
        let api = api.clone();
        let settings = settings.clone();
        async move {
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(period).await;
                match try_hold(&api, &settings).await {
                    Ok(true) => renewed = tokio::time::Instant::now(),
                    Ok(false) => break,
                    Err(error) => {
                        tracing::warn!(%error, "cannot renew the Lease");
                        if renewed.elapsed() >= settings.duration {
                            break;
                        }
                    }
                }
            }
            tracing::error!(lease = %settings.name, "lost the Lease");
            let _ = tell.send(true);
        }
    });
    Leadership {
        api,
        settings,
        lost,
        renewer,
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl Leadership {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_fresh_lease_of_another_replica_is_waited_for_an_expired_one_taken() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), Decision::Create);
        assert_eq!(decide(Some(&held_by("a", now)), "a", now), Decision::Renew);
        assert_eq!(decide(Some(&held_by("b", now)), "a", now), Decision::Wait);
        let old = now - SignedDuration::from_secs(16);
        assert_eq!(
            decide(Some(&held_by("b", old)), "a", now),
            Decision::TakeOver
        );
        let released = LeaseSpec::default();
        assert_eq!(decide(Some(&released), "a", now), Decision::TakeOver);
    }
}
