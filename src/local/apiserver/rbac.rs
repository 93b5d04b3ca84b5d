//! RBAC: a user's requests are held to the rules of a ClusterRole.

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use serde::Deserialize;

/// The rules of every ClusterRole (and Role) in a YAML stream.
pub fn rules_from_yaml(yaml: &str) -> Result<Vec<PolicyRule>, String> {
    let mut rules = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc).map_err(|e| e.to_string())?;
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("ClusterRole") | Some("Role") => {
                let role: ClusterRole = serde_json::from_value(value).map_err(|e| e.to_string())?;
                rules.extend(role.rules.unwrap_or_default());
            }
            _ => {}
        }
    }
    if rules.is_empty() {
        return Err("no ClusterRole rules found".into());
    }
    Ok(rules)
}

/// What a request does, in RBAC's terms.
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `resource` or `resource/subresource`.
    pub resource: &'a str,
    pub name: Option<&'a str>,
}

fn has(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

pub fn allows(rules: &[PolicyRule], a: &Attributes) -> bool {
    rules.iter().any(|r| {
        has(&r.verbs, a.verb)
            && has(r.api_groups.as_deref().unwrap_or_default(), a.group)
            && has(r.resources.as_deref().unwrap_or_default(), a.resource)
            && match (&r.resource_names, a.name) {
                (Some(names), Some(n)) if !names.is_empty() => names.iter().any(|x| x == n),
                (Some(names), None) => names.is_empty(),
                _ => true,
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_grant_exactly_what_they_say() {
        let rules = rules_from_yaml(
            "kind: ClusterRole\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: r}\nrules:\n- apiGroups: [apps]\n  resources: [deployments]\n  verbs: [get, patch]\n- apiGroups: ['']\n  resources: [pods/status]\n  verbs: ['*']\n",
        )
        .unwrap();
        let a = |verb, group, resource| Attributes {
            verb,
            group,
            resource,
            name: Some("x"),
        };
        assert!(allows(&rules, &a("patch", "apps", "deployments")));
        assert!(!allows(&rules, &a("delete", "apps", "deployments")));
        assert!(!allows(&rules, &a("get", "", "deployments")));
        assert!(allows(&rules, &a("update", "", "pods/status")));
        assert!(!allows(&rules, &a("update", "", "pods")));
        assert!(rules_from_yaml("kind: ConfigMap\n").is_err());
    }
}
