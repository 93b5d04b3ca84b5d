//! The resources this server serves: a fixed set of built-in kinds, plus those of every
//! CustomResourceDefinition stored in it. Also the discovery documents built from them.

use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq)]
pub struct Kind {
    pub group: String,
    pub version: String,
    /// The plural resource name of URLs: `deployments`.
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub status: bool,
    pub short_names: Vec<String>,
    /// CRD printer columns: (name, type, JSON path).
    pub columns: Vec<(String, String, String)>,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, as messages name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether a change outside metadata and status bumps `metadata.generation`.
    pub fn has_generation(&self) -> bool {
        !matches!(
            self.plural.as_str(),
            "configmaps" | "secrets" | "events" | "leases" | "namespaces" | "serviceaccounts"
        )
    }
}

/// group, version, plural, kind, namespaced, has a status subresource, short names.
type Builtin = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    bool,
    &'static [&'static str],
);

const BUILTIN: &[Builtin] = &[
    ("", "v1", "pods", "Pod", true, true, &["po"]),
    ("", "v1", "services", "Service", true, true, &["svc"]),
    ("", "v1", "configmaps", "ConfigMap", true, false, &["cm"]),
    ("", "v1", "secrets", "Secret", true, false, &[]),
    (
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        true,
        false,
        &["sa"],
    ),
    ("", "v1", "events", "Event", true, false, &["ev"]),
    ("", "v1", "namespaces", "Namespace", false, true, &["ns"]),
    (
        "apps",
        "v1",
        "deployments",
        "Deployment",
        true,
        true,
        &["deploy"],
    ),
    (
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        true,
        false,
        &["ev"],
    ),
    (
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        true,
        false,
        &[],
    ),
    (
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        true,
        &["crd", "crds"],
    ),
];

pub fn builtin() -> Vec<Kind> {
    BUILTIN
        .iter()
        .map(
            |(group, version, plural, kind, namespaced, status, short)| Kind {
                group: group.to_string(),
                version: version.to_string(),
                plural: plural.to_string(),
                singular: kind.to_lowercase(),
                kind: kind.to_string(),
                namespaced: *namespaced,
                status: *status,
                short_names: short.iter().map(|s| s.to_string()).collect(),
                columns: Vec::new(),
            },
        )
        .collect()
}

/// The kinds a stored CRD object defines (one per served version).
pub fn from_crd(crd: &Value) -> Vec<Kind> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let Some(versions) = spec["versions"].as_array() else {
        return Vec::new();
    };
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| Kind {
            group: s(&spec["group"]),
            version: s(&v["name"]),
            plural: s(&names["plural"]),
            singular: names["singular"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| s(&names["kind"]).to_lowercase()),
            kind: s(&names["kind"]),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            status: v.pointer("/subresources/status").is_some(),
            short_names: names["shortNames"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default(),
            columns: v["additionalPrinterColumns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .map(|c| (s(&c["name"]), s(&c["type"]), s(&c["jsonPath"])))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

fn group_versions(kinds: &[Kind]) -> Vec<(String, String)> {
    let mut gv: Vec<(String, String)> = Vec::new();
    for k in kinds {
        let pair = (k.group.clone(), k.version.clone());
        if !gv.contains(&pair) {
            gv.push(pair);
        }
    }
    gv
}

pub fn api_versions(addr: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}],
    })
}

fn group_doc(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"name": group, "versions": vs, "preferredVersion": vs[0]})
}

pub fn api_group_list(kinds: &[Kind]) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for (g, v) in group_versions(kinds) {
        if g.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|(name, _)| *name == g) {
            Some((_, vs)) => vs.push(v),
            None => groups.push((g, vec![v])),
        }
    }
    let groups: Vec<Value> = groups.iter().map(|(g, vs)| group_doc(g, vs)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(kinds: &[Kind], group: &str) -> Option<Value> {
    let versions: Vec<String> = group_versions(kinds)
        .into_iter()
        .filter(|(g, _)| g == group)
        .map(|(_, v)| v)
        .collect();
    if versions.is_empty() || group.is_empty() {
        return None;
    }
    let mut doc = group_doc(group, &versions);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

pub fn resource_list(kinds: &[Kind], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for k in kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        resources.push(json!({
            "name": k.plural,
            "singularName": k.singular,
            "namespaced": k.namespaced,
            "kind": k.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": k.short_names,
        }));
        if k.status {
            resources.push(json!({
                "name": format!("{}/status", k.plural),
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The OpenAPI v3 index kubectl reads before it writes.
pub fn openapi_index(kinds: &[Kind]) -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v) in group_versions(kinds) {
        let p = gv_path(&g, &v);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}")}),
        );
    }
    json!({"paths": paths})
}

/// A group-version's OpenAPI v3 document: the object paths and their operations, enough for
/// kubectl to see that the server takes `fieldValidation` (it then leaves validation to the
/// server instead of wanting every schema). Schemas themselves are not served.
pub fn openapi_group_version(kinds: &[Kind], group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    for k in kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        let ns = if k.namespaced {
            "/namespaces/{namespace}"
        } else {
            ""
        };
        let gvk = json!({"group": k.group, "version": k.version, "kind": k.kind});
        let op = json!({
            "x-kubernetes-group-version-kind": gvk,
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {},
        });
        let base = format!("/{}{ns}/{}", gv_path(&k.group, &k.version), k.plural);
        paths.insert(base.clone(), json!({"post": op, "get": op}));
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": op, "put": op, "patch": op, "delete": op}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "sjob local control plane", "version": "v1.34.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
