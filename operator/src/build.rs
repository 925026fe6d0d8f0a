//! The desired Kubernetes objects of one `SegmentIntegration`: pure functions, spec in, objects
//! out. No client here; `controller` applies what these return.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    Secret, SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use sluice_ingest::load::Owner;

use crate::crd::SegmentIntegration;

/// Port the ingest container listens on.
pub const INGEST_PORT: i32 = 8080;
/// Port of the Service in front of it.
pub const SERVICE_PORT: i32 = 80;
/// Key of the shared secret (for `X-Signature`) in the credentials Secret.
pub const SHARED_SECRET_KEY: &str = "sharedSecret";
/// Key of the API key (for HTTP Basic) in the credentials Secret.
pub const API_KEY_KEY: &str = "apiKey";
/// Key of the pseudonymization key (for `spec.columnSelection`'s `pseudonymize`) in the
/// credentials Secret.
pub const PSEUDONYMIZATION_KEY_KEY: &str = "pseudonymizationKey";
/// Key of the webhook URL in the credentials Secret, for convenience.
pub const WEBHOOK_URL_KEY: &str = "webhookUrl";
/// The container's name in the ingest pod.
pub const CONTAINER_NAME: &str = "ingest";
/// The label every child carries, naming its integration; children are found by it.
pub const INTEGRATION_LABEL: &str = "sluice.dev/integration";
/// The pod template's annotation holding [`secret_hash`] of the Secret values the ingest reads.
pub const SECRET_HASH_ANNOTATION: &str = "sluice.dev/secret-hash";

/// What the build step needs beyond the resource itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// The schema the tables are in (see [`SegmentIntegration::schema_name`]).
    pub schema: String,
    /// The image when the spec names none.
    pub default_image: String,
    /// [`secret_hash`] of the referenced Secret values, when they could be read. Environment
    /// variables from a Secret are read only when a container starts, so a changed value (a
    /// rotated database password) must change the pod template for the pods to roll.
    pub secret_hash: Option<String>,
}

/// A short, stable digest of Secret values (SHA-256, length-prefixed so that value boundaries
/// count, first 16 hex digits): the same values give the same hash on every replica and release.
pub fn secret_hash<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    for value in values {
        digest.update((value.len() as u64).to_be_bytes());
        digest.update(value.as_bytes());
    }
    hex::encode(&digest.finalize()[..8])
}

/// Why a resource cannot be built into objects. Normally the CRD's validation prevents these.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    /// The object has no name, namespace or uid yet (it was not read from the API server).
    #[error("the SegmentIntegration has no {0} (it must be read from the API server)")]
    Incomplete(&'static str),
    /// `spec.columnSelection` cannot be used (a pattern that selects away `messageId`, say).
    #[error("spec.columnSelection: {0}")]
    ColumnSelection(#[from] sluice_ingest::selection::SelectionError),
}

/// The Deployment's and Service's name: `<name>-ingest`.
pub fn ingest_name(si: &SegmentIntegration) -> Result<String, BuildError> {
    Ok(format!("{}-ingest", name(si)?))
}

/// The credentials Secret's name: `<name>-credentials`.
pub fn credentials_name(si: &SegmentIntegration) -> Result<String, BuildError> {
    Ok(format!("{}-credentials", name(si)?))
}

/// The resource's name; an object not read from the API server has none, and building children
/// named `-ingest` from it would be a bug.
fn name(si: &SegmentIntegration) -> Result<&str, BuildError> {
    si.metadata
        .name
        .as_deref()
        .filter(|name| !name.is_empty())
        .ok_or(BuildError::Incomplete("name"))
}

/// The resource's namespace (it is namespaced: one without is not from the API server).
pub fn namespace(si: &SegmentIntegration) -> Result<&str, BuildError> {
    si.metadata
        .namespace
        .as_deref()
        .filter(|namespace| !namespace.is_empty())
        .ok_or(BuildError::Incomplete("namespace"))
}

/// The labels of every child, and the selector of the ingest pods.
pub fn labels(si: &SegmentIntegration) -> Result<BTreeMap<String, String>, BuildError> {
    let name = name(si)?;
    Ok(BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "sluice-ingest".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), name.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "sluice-operator".to_owned(),
        ),
        (INTEGRATION_LABEL.to_owned(), name.to_owned()),
    ]))
}

/// The label selector of every child of `si` (`sluice.dev/integration=<name>`).
pub fn children_selector(si: &SegmentIntegration) -> Result<String, BuildError> {
    Ok(format!("{INTEGRATION_LABEL}={}", name(si)?))
}

fn owner(si: &SegmentIntegration) -> Result<OwnerReference, BuildError> {
    if si.metadata.uid.is_none() {
        return Err(BuildError::Incomplete("uid"));
    }
    si.controller_owner_ref(&())
        .ok_or(BuildError::Incomplete("name"))
}

fn metadata(si: &SegmentIntegration, name: String) -> Result<ObjectMeta, BuildError> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace(si)?.to_owned()),
        labels: Some(labels(si)?),
        owner_references: Some(vec![owner(si)?]),
        ..ObjectMeta::default()
    })
}

/// The webhook URL to give Segment: the Ingress host over HTTPS when there is one, else the
/// in-cluster Service.
pub fn webhook_url(si: &SegmentIntegration) -> Result<String, BuildError> {
    Ok(match &si.spec.exposure.ingress {
        Some(ingress) => format!("https://{}/v1/webhook", ingress.host),
        None => format!(
            "http://{}.{}.svc.cluster.local/v1/webhook",
            ingest_name(si)?,
            namespace(si)?
        ),
    })
}

/// The random values of a credentials Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Signs webhook requests (`X-Signature`).
    pub shared_secret: String,
    /// Authenticates webhook requests (HTTP Basic).
    pub api_key: String,
    /// Keys the HMAC of pseudonymized values.
    pub pseudonymization_key: String,
}

/// The credentials Secret with the given values. The controller creates it once and never
/// patches it, so the credentials Segment holds stay valid and pseudonyms stay the same.
pub fn credentials_secret(
    si: &SegmentIntegration,
    credentials: &Credentials,
) -> Result<Secret, BuildError> {
    Ok(Secret {
        metadata: metadata(si, credentials_name(si)?)?,
        type_: Some("Opaque".to_owned()),
        string_data: Some(BTreeMap::from([
            (
                SHARED_SECRET_KEY.to_owned(),
                credentials.shared_secret.clone(),
            ),
            (API_KEY_KEY.to_owned(), credentials.api_key.clone()),
            (
                PSEUDONYMIZATION_KEY_KEY.to_owned(),
                credentials.pseudonymization_key.clone(),
            ),
            (WEBHOOK_URL_KEY.to_owned(), webhook_url(si)?),
        ])),
        ..Secret::default()
    })
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    env_from_secret_key(name, secret, key, false)
}

/// An environment variable from a Secret's key; an `optional` one is left unset when the key is
/// missing (a credentials Secret made before the key existed).
fn env_from_secret_key(name: &str, secret: &str, key: &str, optional: bool) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(optional),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Who the schema objects Sluice creates for `si` belong to, as recorded in the schema's
/// `_sdc_ownership` table: the resource's UID, which a resource recreated under the same name
/// does not share.
pub fn schema_owner(si: &SegmentIntegration) -> Result<Owner, BuildError> {
    let uid = si
        .metadata
        .uid
        .clone()
        .ok_or(BuildError::Incomplete("uid"))?;
    Ok(Owner {
        uid,
        name: format!("SegmentIntegration {}/{}", namespace(si)?, name(si)?),
    })
}

/// `spec.columnSelection` as the ingest's `SLUICE_COLUMN_SELECTION` JSON (empty for none).
pub fn column_selection(si: &SegmentIntegration) -> String {
    if si.spec.column_selection.is_empty() {
        return String::new();
    }
    // A map of strings and plain structs always serializes.
    serde_json::to_string(&si.spec.column_selection).unwrap_or_default()
}

/// Checks `spec.columnSelection` as the ingest will read it (the CRD's schema checks its shape,
/// not its patterns), so a selection the ingest would refuse is refused before anything rolls out.
pub fn check_column_selection(si: &SegmentIntegration) -> Result<(), BuildError> {
    // The key itself is the credentials Secret's; any key of the right length stands for it.
    let stand_in = "a stand-in for the Secret's key";
    sluice_ingest::selection::Selection::parse(&column_selection(si), Some(stand_in))?;
    Ok(())
}

/// The environment of the ingest container: every setting of `sluice-ingest`, secrets by
/// reference.
pub fn ingest_env(si: &SegmentIntegration, inputs: &Inputs) -> Result<Vec<EnvVar>, BuildError> {
    let url = &si.spec.destination.url_secret_ref;
    let tables: Vec<&str> = si.tables().iter().map(|t| t.name()).collect();
    let owner = schema_owner(si)?;
    let credentials = credentials_name(si)?;
    Ok(vec![
        env_from_secret("SLUICE_DATABASE_URL", &url.name, &url.key),
        env_from_secret("SLUICE_SHARED_SECRET", &credentials, SHARED_SECRET_KEY),
        env_from_secret("SLUICE_API_KEY", &credentials, API_KEY_KEY),
        env_from_secret_key(
            "SLUICE_PSEUDONYMIZATION_KEY",
            &credentials,
            PSEUDONYMIZATION_KEY_KEY,
            true,
        ),
        env("SLUICE_COLUMN_SELECTION", column_selection(si)),
        env("SLUICE_SCHEMA", inputs.schema.clone()),
        env("SLUICE_TABLES", tables.join(",")),
        env("SLUICE_LISTEN", format!("0.0.0.0:{INGEST_PORT}")),
        env(
            "SLUICE_MAX_BATCH_ROWS",
            si.spec.loading.max_batch_rows.to_string(),
        ),
        env(
            "SLUICE_MAX_BATCH_DELAY",
            si.spec.loading.max_batch_delay.clone(),
        ),
        env(
            "SLUICE_ACCEPT_FIRST_EVENT_SIGNATURES",
            si.spec.ingest.accept_first_event_signatures.to_string(),
        ),
        env(
            "SLUICE_HONOUR_DELETES",
            si.spec.ingest.honour_deletes.to_string(),
        ),
        env("SLUICE_INTEGRATION_UID", owner.uid),
        env("SLUICE_INTEGRATION_NAME", owner.name),
    ])
}

fn probe(path: &str, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(10),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn resources(si: &SegmentIntegration) -> Option<ResourceRequirements> {
    let spec = si.spec.ingest.resources.as_ref()?;
    let quantities = |map: &BTreeMap<String, String>| {
        (!map.is_empty()).then(|| {
            map.iter()
                .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                .collect()
        })
    };
    Some(ResourceRequirements {
        requests: quantities(&spec.requests),
        limits: quantities(&spec.limits),
        ..ResourceRequirements::default()
    })
}

/// Every child the operator applies for one resource; the optional ones are `None` when the spec
/// does not ask for them (and any existing one is then deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The ingest Deployment.
    pub deployment: Deployment,
    /// The Service in front of it.
    pub service: Service,
    /// The Ingress, when `spec.exposure.ingress` is set.
    pub ingress: Option<Ingress>,
    /// The HorizontalPodAutoscaler, when `spec.ingest.autoscaling` is set.
    pub autoscaler: Option<HorizontalPodAutoscaler>,
}

/// The build step: every child of `si` (the credentials Secret aside, which is created once with
/// random values, never built anew). Nothing is applied unless all of them can be built.
pub fn desired(si: &SegmentIntegration, inputs: &Inputs) -> Result<Desired, BuildError> {
    Ok(Desired {
        deployment: deployment(si, inputs)?,
        service: service(si)?,
        ingress: ingress(si)?,
        autoscaler: autoscaler(si)?,
    })
}

/// The ingest Deployment: `sluice-ingest` configured by environment, probed on `/readyz` and
/// `/healthz`, non-root with a read-only root filesystem.
pub fn deployment(si: &SegmentIntegration, inputs: &Inputs) -> Result<Deployment, BuildError> {
    let labels = labels(si)?;
    let image = si
        .spec
        .ingest
        .image
        .clone()
        .unwrap_or_else(|| inputs.default_image.clone());
    let container = Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(image),
        command: Some(vec!["sluice-ingest".to_owned()]),
        env: Some(ingest_env(si, inputs)?),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: INGEST_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe("/readyz", 3)),
        liveness_probe: Some(probe("/healthz", 6)),
        resources: resources(si),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Ok(Deployment {
        metadata: metadata(si, ingest_name(si)?)?,
        spec: Some(DeploymentSpec {
            // With autoscaling the HPA owns the replica count; leaving it out of the applied
            // object keeps the operator from fighting it.
            replicas: si
                .spec
                .ingest
                .autoscaling
                .is_none()
                .then_some(si.spec.ingest.replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: inputs.secret_hash.as_ref().map(|hash| {
                        BTreeMap::from([(SECRET_HASH_ANNOTATION.to_owned(), hash.clone())])
                    }),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    // The ingest writes nothing to disk, and stops within its batch delay.
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65_532),
                        run_as_group: Some(65_532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

/// The Service in front of the ingest pods: port 80 to the container's 8080.
pub fn service(si: &SegmentIntegration) -> Result<Service, BuildError> {
    Ok(Service {
        metadata: metadata(si, ingest_name(si)?)?,
        spec: Some(ServiceSpec {
            selector: Some(labels(si)?),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: SERVICE_PORT,
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// The Ingress routing `/v1/webhook` of the configured host to the Service, when
/// `spec.exposure.ingress` is set.
pub fn ingress(si: &SegmentIntegration) -> Result<Option<Ingress>, BuildError> {
    let Some(spec) = &si.spec.exposure.ingress else {
        return Ok(None);
    };
    let mut metadata = metadata(si, ingest_name(si)?)?;
    if !spec.annotations.is_empty() {
        metadata.annotations = Some(spec.annotations.clone());
    }
    Ok(Some(Ingress {
        metadata,
        spec: Some(K8sIngressSpec {
            ingress_class_name: spec.class_name.clone(),
            tls: spec.tls_secret_name.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: Some(vec![spec.host.clone()]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            rules: Some(vec![IngressRule {
                host: Some(spec.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/v1/webhook".to_owned()),
                        path_type: "Exact".to_owned(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: ingest_name(si)?,
                                port: Some(ServiceBackendPort {
                                    name: Some("http".to_owned()),
                                    ..ServiceBackendPort::default()
                                }),
                            }),
                            ..IngressBackend::default()
                        },
                    }],
                }),
            }]),
            ..K8sIngressSpec::default()
        }),
        status: None,
    }))
}

/// The HorizontalPodAutoscaler of the ingest Deployment, when `spec.ingest.autoscaling` is set.
pub fn autoscaler(si: &SegmentIntegration) -> Result<Option<HorizontalPodAutoscaler>, BuildError> {
    let Some(spec) = &si.spec.ingest.autoscaling else {
        return Ok(None);
    };
    Ok(Some(HorizontalPodAutoscaler {
        metadata: metadata(si, ingest_name(si)?)?,
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: "Deployment".to_owned(),
                name: ingest_name(si)?,
            },
            min_replicas: Some(spec.min_replicas),
            max_replicas: spec.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(spec.target_cpu_utilization_percentage),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        status: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Autoscaling, IngressSpec, Resources};
    use serde_json::json;

    fn integration(spec: serde_json::Value) -> SegmentIntegration {
        let mut si =
            SegmentIntegration::new("shop", serde_json::from_value(spec).expect("a valid spec"));
        si.metadata.namespace = Some("team-a".to_owned());
        si.metadata.uid = Some("0000-1111".to_owned());
        si
    }

    fn basic() -> SegmentIntegration {
        integration(serde_json::json!({
            "displayName": "Shop Events",
            "destination": {"urlSecretRef": {"name": "warehouse", "key": "dsn"}},
            "loading": {"maxBatchRows": 500, "maxBatchDelay": "20ms"},
        }))
    }

    fn inputs() -> Inputs {
        Inputs {
            schema: "shop_events".to_owned(),
            default_image: "sluice-ingest:test".to_owned(),
            secret_hash: None,
        }
    }

    fn template_annotation(deployment: &Deployment) -> Option<String> {
        deployment
            .spec
            .as_ref()?
            .template
            .metadata
            .as_ref()?
            .annotations
            .as_ref()?
            .get(SECRET_HASH_ANNOTATION)
            .cloned()
    }

    #[test]
    fn a_changed_secret_value_changes_the_pod_template() {
        let old = secret_hash(["postgres://sluice:old@db/warehouse"]);
        let new = secret_hash(["postgres://sluice:new@db/warehouse"]);
        assert_ne!(old, new);
        assert_eq!(old, secret_hash(["postgres://sluice:old@db/warehouse"]));
        assert_eq!(old.len(), 16);
        // Value boundaries count: ["ab", "c"] is not ["a", "bc"].
        assert_ne!(secret_hash(["ab", "c"]), secret_hash(["a", "bc"]));

        let with = |hash: &str| Inputs {
            secret_hash: Some(hash.to_owned()),
            ..inputs()
        };
        let before = deployment(&basic(), &with(&old)).expect("deployment");
        let after = deployment(&basic(), &with(&new)).expect("deployment");
        assert_eq!(template_annotation(&before), Some(old));
        assert_eq!(template_annotation(&after), Some(new));
        assert_ne!(
            before.spec.map(|s| s.template),
            after.spec.map(|s| s.template)
        );
    }

    #[test]
    fn without_readable_secrets_the_template_has_no_hash() {
        let deployment = deployment(&basic(), &inputs()).expect("deployment");
        assert_eq!(template_annotation(&deployment), None);
    }

    fn env_value(env: &[EnvVar], name: &str) -> Option<String> {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    fn env_secret(env: &[EnvVar], name: &str) -> Option<(String, String)> {
        let selector = env
            .iter()
            .find(|e| e.name == name)?
            .value_from
            .as_ref()?
            .secret_key_ref
            .as_ref()?;
        Some((selector.name.clone(), selector.key.clone()))
    }

    #[test]
    fn every_child_has_a_controller_owner_reference_and_labels() {
        let si = basic();
        let deployment = deployment(&si, &inputs()).expect("deployment");
        let owners = deployment.metadata.owner_references.expect("owners");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].kind, "SegmentIntegration");
        assert_eq!(owners[0].uid, "0000-1111");
        let service = service(&si).expect("service");
        assert_eq!(
            service.metadata.labels.expect("labels")[INTEGRATION_LABEL],
            "shop"
        );
    }

    #[test]
    fn an_object_not_read_from_the_server_cannot_be_built() {
        let mut si = basic();
        si.metadata.uid = None;
        assert_eq!(
            service(&si).expect_err("no uid"),
            BuildError::Incomplete("uid")
        );
        for (missing, field) in [("name", 0), ("namespace", 1)] {
            let mut si = basic();
            match field {
                0 => si.metadata.name = None,
                _ => si.metadata.namespace = Some(String::new()),
            }
            assert_eq!(
                desired(&si, &inputs()).expect_err("incomplete"),
                BuildError::Incomplete(missing)
            );
            assert_eq!(
                webhook_url(&si).expect_err("incomplete"),
                BuildError::Incomplete(missing)
            );
        }
    }

    #[test]
    fn deployment_configures_sluice_ingest_by_environment() {
        let deployment = deployment(&basic(), &inputs()).expect("deployment");
        let spec = deployment.spec.expect("spec");
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.expect("pod");
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("sluice-ingest:test"));
        assert_eq!(container.command, Some(vec!["sluice-ingest".to_owned()]));
        let env = container.env.clone().expect("env");
        assert_eq!(
            env_secret(&env, "SLUICE_DATABASE_URL"),
            Some(("warehouse".to_owned(), "dsn".to_owned()))
        );
        assert_eq!(
            env_secret(&env, "SLUICE_SHARED_SECRET"),
            Some(("shop-credentials".to_owned(), SHARED_SECRET_KEY.to_owned()))
        );
        assert_eq!(
            env_secret(&env, "SLUICE_API_KEY"),
            Some(("shop-credentials".to_owned(), API_KEY_KEY.to_owned()))
        );
        assert_eq!(
            env_value(&env, "SLUICE_SCHEMA").as_deref(),
            Some("shop_events")
        );
        assert_eq!(
            env_value(&env, "SLUICE_TABLES").as_deref(),
            Some("group,identify,page,screen,track")
        );
        assert_eq!(
            env_value(&env, "SLUICE_LISTEN").as_deref(),
            Some("0.0.0.0:8080")
        );
        assert_eq!(
            env_value(&env, "SLUICE_MAX_BATCH_ROWS").as_deref(),
            Some("500")
        );
        assert_eq!(
            env_value(&env, "SLUICE_MAX_BATCH_DELAY").as_deref(),
            Some("20ms")
        );
        assert_eq!(
            env_value(&env, "SLUICE_INTEGRATION_UID").as_deref(),
            Some("0000-1111")
        );
        assert_eq!(
            env_value(&env, "SLUICE_INTEGRATION_NAME").as_deref(),
            Some("SegmentIntegration team-a/shop")
        );
        let readiness = container.readiness_probe.clone().expect("readiness");
        assert_eq!(
            readiness.http_get.expect("http").path.as_deref(),
            Some("/readyz")
        );
        let liveness = container.liveness_probe.clone().expect("liveness");
        assert_eq!(
            liveness.http_get.expect("http").path.as_deref(),
            Some("/healthz")
        );
        let security = container.security_context.clone().expect("security");
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn first_event_signatures_are_refused_unless_the_spec_accepts_them() {
        let setting = |si: &SegmentIntegration| {
            let deployment = deployment(si, &inputs()).expect("deployment");
            let pod = deployment.spec.expect("spec").template.spec.expect("pod");
            env_value(
                &pod.containers[0].env.clone().expect("env"),
                "SLUICE_ACCEPT_FIRST_EVENT_SIGNATURES",
            )
        };
        let mut si = basic();
        assert_eq!(setting(&si).as_deref(), Some("false"));
        si.spec.ingest.accept_first_event_signatures = true;
        assert_eq!(setting(&si).as_deref(), Some("true"));
    }

    #[test]
    fn deletion_requests_are_honoured_only_when_the_spec_says_so() {
        let setting = |si: &SegmentIntegration| {
            let deployment = deployment(si, &inputs()).expect("deployment");
            let pod = deployment.spec.expect("spec").template.spec.expect("pod");
            env_value(
                &pod.containers[0].env.clone().expect("env"),
                "SLUICE_HONOUR_DELETES",
            )
        };
        let mut si = basic();
        assert_eq!(setting(&si).as_deref(), Some("false"));
        si.spec.ingest.honour_deletes = true;
        assert_eq!(setting(&si).as_deref(), Some("true"));
    }

    #[test]
    fn spec_image_and_resources_reach_the_container() {
        let mut si = basic();
        si.spec.ingest.image = Some("registry.local/sluice-ingest:1.2".to_owned());
        si.spec.ingest.resources = Some(Resources {
            requests: BTreeMap::from([("cpu".to_owned(), "100m".to_owned())]),
            limits: BTreeMap::from([("memory".to_owned(), "128Mi".to_owned())]),
        });
        let deployment = deployment(&si, &inputs()).expect("deployment");
        let container = &deployment
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod")
            .containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("registry.local/sluice-ingest:1.2")
        );
        let resources = container.resources.clone().expect("resources");
        assert_eq!(
            resources.requests.expect("requests")["cpu"],
            Quantity("100m".to_owned())
        );
        assert_eq!(
            resources.limits.expect("limits")["memory"],
            Quantity("128Mi".to_owned())
        );
    }

    #[test]
    fn service_maps_port_80_to_the_container_port() {
        let service = service(&basic()).expect("service");
        let spec = service.spec.expect("spec");
        let port = &spec.ports.expect("ports")[0];
        assert_eq!(port.port, 80);
        assert_eq!(
            port.target_port,
            Some(IntOrString::String("http".to_owned()))
        );
        assert_eq!(spec.selector, Some(labels(&basic()).expect("labels")));
    }

    #[test]
    fn without_ingress_the_webhook_url_is_the_services() {
        let si = basic();
        assert_eq!(ingress(&si).expect("built"), None);
        assert_eq!(
            webhook_url(&si).as_deref(),
            Ok("http://shop-ingest.team-a.svc.cluster.local/v1/webhook")
        );
    }

    #[test]
    fn ingress_routes_the_webhook_of_its_host_with_tls() {
        let mut si = basic();
        si.spec.exposure.ingress = Some(IngressSpec {
            host: "hooks.example.com".to_owned(),
            class_name: Some("nginx".to_owned()),
            tls_secret_name: Some("hooks-tls".to_owned()),
            annotations: BTreeMap::from([("a".to_owned(), "b".to_owned())]),
        });
        assert_eq!(
            webhook_url(&si).as_deref(),
            Ok("https://hooks.example.com/v1/webhook")
        );
        let ingress = ingress(&si).expect("built").expect("an ingress");
        assert_eq!(
            ingress.metadata.annotations,
            Some(BTreeMap::from([("a".to_owned(), "b".to_owned())]))
        );
        let spec = ingress.spec.expect("spec");
        assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
        assert_eq!(
            spec.tls.expect("tls")[0].secret_name.as_deref(),
            Some("hooks-tls")
        );
        let rule = &spec.rules.expect("rules")[0];
        assert_eq!(rule.host.as_deref(), Some("hooks.example.com"));
        let path = &rule.http.as_ref().expect("http").paths[0];
        assert_eq!(path.path.as_deref(), Some("/v1/webhook"));
        assert_eq!(
            path.backend.service.as_ref().expect("service").name,
            "shop-ingest"
        );
    }

    #[test]
    fn autoscaling_adds_an_hpa_and_leaves_replicas_to_it() {
        let mut si = basic();
        assert_eq!(autoscaler(&si).expect("built"), None);
        si.spec.ingest.autoscaling = Some(Autoscaling {
            min_replicas: 2,
            max_replicas: 10,
            target_cpu_utilization_percentage: 70,
        });
        let hpa = autoscaler(&si).expect("built").expect("an hpa");
        let spec = hpa.spec.expect("spec");
        assert_eq!(spec.min_replicas, Some(2));
        assert_eq!(spec.max_replicas, 10);
        assert_eq!(spec.scale_target_ref.name, "shop-ingest");
        let deployment = deployment(&si, &inputs()).expect("deployment");
        assert_eq!(deployment.spec.expect("spec").replicas, None);
    }

    #[test]
    fn column_selection_goes_to_the_ingest_as_json_and_is_checked_first() {
        let si = integration(json!({
            "destination": {"urlSecretRef": {"name": "warehouse"}},
            "columnSelection": {
                "*": {"exclude": ["context.ip"], "pseudonymize": ["traits.email"]},
                "track": {"json": ["properties.experiments"], "maxColumns": 300},
            },
        }));
        let env = ingest_env(&si, &inputs()).expect("env");
        let value = |name: &str| env.iter().find(|e| e.name == name).cloned();
        let selection: serde_json::Value = serde_json::from_str(
            value("SLUICE_COLUMN_SELECTION")
                .and_then(|e| e.value)
                .as_deref()
                .expect("selection"),
        )
        .expect("JSON");
        assert_eq!(
            selection,
            json!({
                "*": {"exclude": ["context.ip"], "pseudonymize": ["traits.email"]},
                "track": {"json": ["properties.experiments"], "maxColumns": 300},
            })
        );
        let key = value("SLUICE_PSEUDONYMIZATION_KEY")
            .and_then(|e| e.value_from)
            .and_then(|from| from.secret_key_ref)
            .expect("from the credentials Secret");
        assert_eq!(
            (key.name.as_str(), key.key.as_str(), key.optional),
            ("shop-credentials", PSEUDONYMIZATION_KEY_KEY, Some(true))
        );
        assert_eq!(check_column_selection(&si), Ok(()));

        let protected = integration(json!({
            "destination": {"urlSecretRef": {"name": "warehouse"}},
            "columnSelection": {"*": {"exclude": ["messageId"]}},
        }));
        let error = check_column_selection(&protected).expect_err("messageId is the key");
        assert!(error.to_string().contains("\"messageId\""), "{error}");
    }

    #[test]
    fn credentials_secret_holds_the_credentials_and_the_url() {
        let credentials = Credentials {
            shared_secret: "s3cret".to_owned(),
            api_key: "k3y".to_owned(),
            pseudonymization_key: "p5eudo".to_owned(),
        };
        let secret = credentials_secret(&basic(), &credentials).expect("secret");
        assert_eq!(secret.metadata.name.as_deref(), Some("shop-credentials"));
        let data = secret.string_data.expect("data");
        assert_eq!(data[SHARED_SECRET_KEY], "s3cret");
        assert_eq!(data[API_KEY_KEY], "k3y");
        assert_eq!(data[PSEUDONYMIZATION_KEY_KEY], "p5eudo");
        assert_eq!(
            data[WEBHOOK_URL_KEY],
            "http://shop-ingest.team-a.svc.cluster.local/v1/webhook"
        );
    }
}
