//! The rights the operator needs, as RBAC rules, proven sufficient by the tests (a client with
//! exactly these rules runs the controller). The Helm chart grants them in its ClusterRole (or in
//! a Role when it watches one namespace), except the Lease rule, which it always grants in a Role
//! of the release namespace; a chart test checks that the two lists match.
//!
//! All of them are namespaced resources: bound by a RoleBinding they confine the operator to one
//! namespace, by a ClusterRoleBinding they let it serve every namespace.

use k8s_openapi::api::rbac::v1::PolicyRule;

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// The operator's rules.
pub fn rules() -> Vec<PolicyRule> {
    vec![
        // Watch integrations, add and remove the finalizer, write the status. `finalizers` is
        // for clusters that enforce owner-reference permissions (blockOwnerDeletion).
        rule(
            "sluice.dev",
            &["segmentintegrations"],
            &["get", "list", "watch", "patch", "update"],
        ),
        rule(
            "sluice.dev",
            &[
                "segmentintegrations/status",
                "segmentintegrations/finalizers",
            ],
            &["get", "patch", "update"],
        ),
        // Children: applied, watched, deleted when no longer wanted. Secrets also because the
        // operator reads the database URL from the user's Secret and watches it for changes.
        rule(
            "",
            &["secrets", "services"],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        rule(
            "apps",
            &["deployments"],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        rule(
            "networking.k8s.io",
            &["ingresses"],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        rule(
            "autoscaling",
            &["horizontalpodautoscalers"],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        // Events about integrations.
        rule("events.k8s.io", &["events"], &["create", "patch"]),
        // Leader election.
        rule(
            "coordination.k8s.io",
            &["leases"],
            &["get", "create", "update"],
        ),
    ]
}
