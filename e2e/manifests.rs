//! The packaging, checked without a cluster: every YAML under config/ and charts/sjob parses;
//! the CRD copies equal crds/; the Helm chart's ClusterRole has exactly the rules of
//! config/rbac/role.yaml (which the local control plane enforces); the samples are valid
//! StatefulJobs (every field in the CRD schema, a job graph the operator accepts); the chart's
//! values satisfy values.schema.json and bad values do not; the operator Deployments use only
//! flags and environment variables that `sjob operator` has; `kubectl kustomize config/default`
//! builds (when kubectl is installed); `helm lint` and `helm template` pass (when helm is
//! installed: `bash e2e/helm/install-helm.sh`); README.md's Reference section is the one
//! generated from the CRDs.

use regex::Regex;
use serde_json::Value;
use sjob::engine::graph::JobGraph;
use sjob::engine::spec::JobSpec;
use sjob::operator::crd::StatefulJob;
use sjob::operator::reference;
use sjob::operator::resources::{self, EngineSettings};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const SJOB: &str = env!("CARGO_BIN_EXE_sjob");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `.yaml`/`.yml` file under `dir` (relative to the crate), sorted.
fn yaml_files(dir: &str) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(
                    path.strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(&root(), &root().join(dir), &mut out);
    out.sort();
    out
}

/// The documents of a (multi-document) YAML text, as JSON values; empty documents dropped.
fn documents(name: &str, text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, doc)| {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: document {i}: {e}"));
            serde_json::to_value(v).unwrap_or_else(|e| panic!("{name}: document {i}: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn find_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn role_rules() -> Value {
    let docs = documents("config/rbac/role.yaml", &read("config/rbac/role.yaml"));
    let roles = find_kind(&docs, "ClusterRole");
    assert_eq!(roles.len(), 1, "config/rbac/role.yaml: one ClusterRole");
    let rules = roles[0]["rules"].clone();
    assert!(rules.as_array().is_some_and(|r| !r.is_empty()), "no rules");
    rules
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// A validator for the part of JSON Schema (and of Kubernetes' OpenAPI v3 structural schemas)
// that values.schema.json and the CRDs use. A keyword it does not know fails the test, so a
// schema cannot quietly outgrow it.

struct Validator<'a> {
    root: &'a Value,
    /// Kubernetes semantics: a field that the schema does not declare would be pruned by the
    /// API server, so it is an error here (unless x-kubernetes-preserve-unknown-fields).
    kubernetes: bool,
}

const KNOWN_KEYWORDS: &[&str] = &[
    "$schema",
    "$ref",
    "title",
    "description",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "pattern",
    "default",
    "format",
    "nullable",
    "definitions",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    // CEL rules: not evaluated here; the real API server evaluates them
    // (e2e/operator.rs: the_real_api_server_validates_explains_and_installs_the_chart).
    "x-kubernetes-validations",
];

impl Validator<'_> {
    fn resolve<'s>(&'s self, schema: &'s Value) -> &'s Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r
                    .strip_prefix("#/definitions/")
                    .unwrap_or_else(|| panic!("unsupported $ref {r}"));
                &self.root["definitions"][name]
            }
            None => schema,
        }
    }

    fn validate(&self, schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        let Some(s) = schema.as_object() else {
            return;
        };
        for k in s.keys() {
            assert!(
                KNOWN_KEYWORDS.contains(&k.as_str()),
                "{path}: the schema uses `{k}`, which this validator does not check"
            );
        }
        if v.is_null() && s.get("nullable") == Some(&Value::Bool(true)) {
            return;
        }
        let preserve = s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            if !(v.is_string() || v.is_i64() || v.is_u64()) {
                errors.push(format!("{path}: {v} is neither an integer nor a string"));
            }
            return;
        }
        if let Some(t) = s.get("type") {
            let types: Vec<&str> = match t {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => panic!("{path}: bad type {t}"),
            };
            let ok = types.iter().any(|t| match *t {
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                "object" => v.is_object(),
                "array" => v.is_array(),
                "null" => v.is_null(),
                other => panic!("{path}: unknown type {other}"),
            });
            if !ok {
                errors.push(format!("{path}: {v} is not of type {}", types.join(" or ")));
                return;
            }
        }
        if let Some(values) = s.get("enum").and_then(Value::as_array)
            && !values.contains(v)
        {
            errors.push(format!(
                "{path}: {v} is not one of {}",
                Value::from(values.clone())
            ));
        }
        if let (Some(min), Some(x)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64())
            && x < min
        {
            errors.push(format!("{path}: {v} is less than {min}"));
        }
        if let (Some(max), Some(x)) = (s.get("maximum").and_then(Value::as_f64), v.as_f64())
            && x > max
        {
            errors.push(format!("{path}: {v} is greater than {max}"));
        }
        if let Some(text) = v.as_str() {
            if let Some(min) = s.get("minLength").and_then(Value::as_u64)
                && (text.chars().count() as u64) < min
            {
                errors.push(format!("{path}: shorter than {min}"));
            }
            if let Some(p) = s.get("pattern").and_then(Value::as_str)
                && !Regex::new(p)
                    .unwrap_or_else(|e| panic!("{path}: pattern {p}: {e}"))
                    .is_match(text)
            {
                errors.push(format!("{path}: '{text}' does not match {p}"));
            }
        }
        if let Some(obj) = v.as_object() {
            for r in s
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let r = r.as_str().unwrap();
                if !obj.contains_key(r) {
                    errors.push(format!("{path}: `{r}` is required"));
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            for (k, child) in obj {
                let at = format!("{path}.{k}");
                match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                    (Some(ps), _) => self.validate(ps, child, &at, errors),
                    (None, Some(Value::Bool(false))) => {
                        errors.push(format!("{at}: not allowed (no such field)"))
                    }
                    (None, Some(extra)) if extra.is_object() => {
                        self.validate(extra, child, &at, errors)
                    }
                    (None, _) if self.kubernetes && !preserve && props.is_some() => {
                        errors.push(format!("{at}: no such field in the schema"))
                    }
                    _ => {}
                }
            }
        }
        if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
            for (i, item) in arr.iter().enumerate() {
                self.validate(items, item, &format!("{path}[{i}]"), errors);
            }
        }
    }
}

fn validate(schema: &Value, v: &Value, kubernetes: bool) -> Vec<String> {
    let mut errors = Vec::new();
    Validator {
        root: schema,
        kubernetes,
    }
    .validate(schema, v, "", &mut errors);
    errors
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_yaml_file_parses() {
    let mut files = yaml_files("config");
    files.extend(
        yaml_files("charts/sjob")
            .into_iter()
            .filter(|f| !f.starts_with("charts/sjob/templates/")),
    );
    assert!(files.len() > 10, "{files:?}");
    for f in &files {
        let docs = documents(f, &read(f));
        assert!(!docs.is_empty(), "{f}: no document");
        let job_file = f.starts_with("config/samples/jobs/");
        let helm_meta = f == "charts/sjob/Chart.yaml" || f == "charts/sjob/values.yaml";
        for (i, d) in docs.iter().enumerate() {
            if job_file {
                let spec = JobSpec::from_yaml(&serde_yaml::to_string(d).unwrap())
                    .unwrap_or_else(|e| panic!("{f}: {e}"));
                JobGraph::build(&spec, None).unwrap_or_else(|e| panic!("{f}: {e}"));
            } else if !helm_meta {
                for key in ["apiVersion", "kind"] {
                    assert!(d[key].is_string(), "{f}: document {i} has no {key}");
                }
                if d["kind"] != "Kustomization" {
                    assert!(
                        d["metadata"]["name"].is_string(),
                        "{f}: document {i} has no metadata.name"
                    );
                }
            }
        }
    }
    println!("parsed {} YAML files", files.len());
}

#[test]
fn crd_copies_equal_crds_directory() {
    let generated: BTreeSet<String> = std::fs::read_dir(root().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let in_chart: BTreeSet<String> = std::fs::read_dir(root().join("charts/sjob/crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        in_chart, generated,
        "charts/sjob/crds/ and crds/ hold other files"
    );
    for name in &generated {
        let want = read(&format!("crds/{name}"));
        for copy in [
            format!("charts/sjob/crds/{name}"),
            format!("config/crd/{name}"),
        ] {
            assert!(
                read(&copy) == want,
                "{copy} differs from crds/{name}: cp crds/{name} {copy}"
            );
        }
    }
    let kustomization = documents(
        "config/crd/kustomization.yaml",
        &read("config/crd/kustomization.yaml"),
    );
    let listed: BTreeSet<String> = kustomization[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, generated, "config/crd/kustomization.yaml resources");
}

/// The chart's ClusterRole template without its template directives: the rules block holds
/// none, so what is left parses and its rules can be compared as data.
#[test]
fn chart_cluster_role_has_the_rules_of_config_rbac_textually() {
    let template = read("charts/sjob/templates/clusterrole.yaml");
    let plain: String = template
        .lines()
        .filter(|l| !l.contains("{{"))
        .map(|l| format!("{l}\n"))
        .collect();
    let docs = documents("charts/sjob/templates/clusterrole.yaml", &plain);
    let roles = find_kind(&docs, "ClusterRole");
    assert_eq!(roles.len(), 1);
    assert_eq!(
        roles[0]["rules"],
        role_rules(),
        "charts/sjob/templates/clusterrole.yaml must have exactly the rules of config/rbac/role.yaml"
    );
}

#[test]
fn samples_are_valid_statefuljobs_that_the_operator_accepts() {
    let crd = documents("crds/sjob.dev.yaml", &read("crds/sjob.dev.yaml"));
    let sj_crd = crd
        .iter()
        .find(|c| c["spec"]["names"]["kind"] == "StatefulJob")
        .expect("StatefulJob CRD");
    let schema = &sj_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let samples: Vec<String> = yaml_files("config/samples")
        .into_iter()
        .filter(|f| !f.starts_with("config/samples/jobs/"))
        .collect();
    for want in [
        "statefuljob.yaml",
        "minimal.yaml",
        "windowed.yaml",
        "retention.yaml",
        "blue-green-ready.yaml",
    ] {
        assert!(
            samples.contains(&format!("config/samples/{want}")),
            "config/samples/{want} is missing"
        );
    }
    for f in &samples {
        let text = read(f);
        for doc in documents(f, &text) {
            assert_eq!(doc["apiVersion"], "sjob.dev/v1alpha1", "{f}");
            assert_eq!(doc["kind"], "StatefulJob", "{f}");
            // What the API server would check (and prune: an unknown field is an error here).
            // (apiVersion, kind and metadata are the API server's own, outside the schema.)
            let mut body = doc.clone();
            for k in ["apiVersion", "kind", "metadata"] {
                body.as_object_mut().unwrap().remove(k);
            }
            let errors = validate(schema, &body, true);
            assert!(errors.is_empty(), "{f}: not valid for the CRD: {errors:#?}");
            // The crate's types, and the job graph checks of the planner and of the engine pod.
            let sj: StatefulJob = serde_json::from_value(doc.clone())
                .unwrap_or_else(|e| panic!("{f}: not a StatefulJob: {e}"));
            JobGraph::build(&sj.spec.job, sj.spec.parallelism)
                .unwrap_or_else(|e| panic!("{f}: the operator would refuse spec.job: {e}"));
            let engine_job = resources::engine_job(
                &sj.spec,
                &EngineSettings {
                    default_savepoint_dir: Some("/savepoints".into()),
                    ..EngineSettings::default()
                },
            );
            JobGraph::build(&engine_job, sj.spec.parallelism)
                .unwrap_or_else(|e| panic!("{f}: the engine pod's job is invalid: {e}"));
        }
    }
    // The validator itself catches what it should.
    let bad = serde_json::json!({
        "spec": {"job": {"name": "j", "operators": []}, "parallelizm": 2,
                 "upgrade": {"mode": "fast", "savepointTimeout": "ten minutes"}}});
    let errors = validate(schema, &bad, true).join("\n");
    for want in [
        ".spec.parallelizm",
        ".spec.upgrade.mode",
        ".spec.upgrade.savepointTimeout",
    ] {
        assert!(errors.contains(want), "{want} not reported in:\n{errors}");
    }
    println!("{} samples valid", samples.len());
}

#[test]
fn chart_values_satisfy_the_values_schema() {
    let schema: Value = serde_json::from_str(&read("charts/sjob/values.schema.json"))
        .expect("values.schema.json is JSON");
    let values = documents("charts/sjob/values.yaml", &read("charts/sjob/values.yaml"))
        .pop()
        .unwrap();
    let errors = validate(&schema, &values, false);
    assert!(errors.is_empty(), "values.yaml: {errors:#?}");
    let with = |pointer: &str, v: Value| {
        let mut x = values.clone();
        *x.pointer_mut(pointer)
            .unwrap_or_else(|| panic!("{pointer}")) = v;
        x
    };
    for (pointer, bad) in [
        ("/replicaCount", Value::from(0)),
        ("/logFormat", Value::from("xml")),
        ("/logLevel", Value::from("verbose")),
        ("/image/pullPolicy", Value::from("Sometimes")),
        ("/image/repository", Value::from("")),
        ("/metrics/service/port", Value::from(70000)),
        ("/metrics/serviceMonitor/enabled", Value::from("yes")),
        ("/leaderElection/leaseDuration", Value::from("15 seconds")),
        ("/resources/limits/memory", Value::from("lots")),
    ] {
        let errors = validate(&schema, &with(pointer, bad.clone()), false);
        assert!(
            !errors.is_empty(),
            "values.schema.json accepts {pointer} = {bad}"
        );
    }
    let mut unknown = values.clone();
    unknown["replicas"] = Value::from(2);
    assert!(
        !validate(&schema, &unknown, false).is_empty(),
        "unknown key accepted"
    );

    // The chart's version tracks the crate's, and its default image is the operator's default
    // engine image repository.
    let chart = documents("charts/sjob/Chart.yaml", &read("charts/sjob/Chart.yaml"))
        .pop()
        .unwrap();
    assert_eq!(chart["name"], "sjob");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
    let repo = values["image"]["repository"].as_str().unwrap();
    assert!(
        EngineSettings::default()
            .image
            .starts_with(&format!("{repo}:")),
        "values image.repository {repo} is not the operator's default engine image"
    );
}

/// The long flags and environment variables that `sjob operator --help` lists.
fn operator_flags_and_env() -> (BTreeSet<String>, BTreeSet<String>) {
    let (ok, help, err) = run(Command::new(SJOB).args(["operator", "--help"]));
    assert!(ok, "sjob operator --help: {err}");
    let flags = Regex::new(r"--([a-z][a-z0-9-]*)")
        .unwrap()
        .captures_iter(&help)
        .map(|c| c[1].to_owned())
        .collect();
    let mut env: BTreeSet<String> = Regex::new(r"\[env: ([A-Z_]+)=")
        .unwrap()
        .captures_iter(&help)
        .map(|c| c[1].to_owned())
        .collect();
    // The log filter is read by main.rs, not by a flag.
    let main = read("src/main.rs");
    assert!(
        main.contains("\"SJOB_LOG\""),
        "src/main.rs no longer reads SJOB_LOG"
    );
    env.insert("SJOB_LOG".into());
    (flags, env)
}

/// Checks an operator Deployment against the real command line.
fn check_operator_deployment(
    what: &str,
    d: &Value,
    flags: &BTreeSet<String>,
    env: &BTreeSet<String>,
) {
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no args"))
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args.first(), Some(&"operator"), "{what}: {args:?}");
    let mut used = BTreeSet::new();
    for a in &args[1..] {
        let name = a
            .strip_prefix("--")
            .unwrap_or_else(|| panic!("{what}: argument {a} is not a --flag"))
            .split('=')
            .next()
            .unwrap();
        assert!(
            flags.contains(name),
            "{what}: `sjob operator` has no flag --{name} (it has: {flags:?})"
        );
        used.insert(name.to_owned());
    }
    for needed in ["http-addr", "engine-image", "log-format"] {
        assert!(
            used.contains(needed),
            "{what}: --{needed} missing: {args:?}"
        );
    }
    let names: BTreeSet<String> = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    for n in &names {
        assert!(
            env.contains(n),
            "{what}: the operator reads no variable {n} (it reads {env:?})"
        );
    }
    for n in ["POD_NAME", "POD_NAMESPACE", "SJOB_LOG"] {
        assert!(names.contains(n), "{what}: env {n} missing");
    }
    let port = c["ports"][0]["containerPort"].as_u64();
    let addr = args
        .iter()
        .find_map(|a| a.strip_prefix("--http-addr="))
        .unwrap();
    assert_eq!(
        addr.rsplit(':').next().and_then(|p| p.parse().ok()),
        port,
        "{what}: --http-addr and containerPort differ"
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{what}"
    );
    assert!(
        sc["runAsNonRoot"] == true || pod["securityContext"]["runAsNonRoot"] == true,
        "{what}: runAsNonRoot"
    );
    // The typed view: a Deployment Kubernetes would accept in shape.
    let _: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(d.clone())
        .unwrap_or_else(|e| panic!("{what}: not a Deployment: {e}"));
}

#[test]
fn operator_deployments_use_the_real_flags() {
    let (flags, env) = operator_flags_and_env();
    for f in [
        "namespace",
        "engine-image",
        "default-savepoint-dir",
        "leader-elect",
        "lease-namespace",
        "identity",
        "http-addr",
        "log-format",
    ] {
        assert!(
            flags.contains(f),
            "sjob operator --help lists no --{f}: {flags:?}"
        );
    }
    let docs = documents(
        "config/manager/deployment.yaml",
        &read("config/manager/deployment.yaml"),
    );
    let deploys = find_kind(&docs, "Deployment");
    assert_eq!(deploys.len(), 1);
    check_operator_deployment("config/manager/deployment.yaml", deploys[0], &flags, &env);
    // Every `--flag` in the chart's template, whatever the values.
    let template = read("charts/sjob/templates/deployment.yaml");
    let re = Regex::new(r"^\s*- --([a-z][a-z0-9-]*)").unwrap();
    let mut n = 0;
    for line in template.lines() {
        if let Some(c) = re.captures(line) {
            n += 1;
            assert!(
                flags.contains(&c[1]),
                "charts/sjob/templates/deployment.yaml: `sjob operator` has no flag --{}",
                &c[1]
            );
        }
    }
    assert!(
        n >= 6,
        "found only {n} flags in the chart's deployment template"
    );
}

/// Whether a LabelSelector (matchLabels, matchExpressions) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_labels = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| label(k) == v.as_str()));
    let by_expressions = selector["matchExpressions"].as_array().is_none_or(|es| {
        es.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|vs| vs.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str() {
                Some("Exists") => label(key).is_some(),
                Some("DoesNotExist") => label(key).is_none(),
                Some("In") => label(key).is_some_and(|l| values.contains(&l)),
                Some("NotIn") => !label(key).is_some_and(|l| values.contains(&l)),
                other => panic!("unknown selector operator {other:?}"),
            }
        })
    });
    by_labels && by_expressions
}

/// The policy lets the operator's pods (in `operator_ns`) and no one else reach the engine
/// pods the operator creates, on their REST port.
fn check_network_policy(what: &str, policy: &Value, operator: &Value, operator_ns: &str) {
    let sj: StatefulJob = serde_yaml::from_str(
        "apiVersion: sjob.dev/v1alpha1\nkind: StatefulJob\nmetadata: {name: clicks, namespace: jobs, uid: u-1}\nspec:\n  job:\n    name: clicks\n    operators:\n      - {kind: generator, uid: src}\n      - {kind: discardSink}\n",
    )
    .unwrap();
    let settings = EngineSettings::default();
    let (_, engine, _) = resources::engine_objects(
        &sj,
        &sj.spec,
        "h",
        None,
        None,
        resources::Instance::default(),
        &settings,
    )
    .unwrap();
    let engine = serde_json::to_value(engine).unwrap();
    let engine_pod = &engine["spec"]["template"]["metadata"]["labels"];
    let operator_pod = &operator["spec"]["template"]["metadata"]["labels"];
    let spec = &policy["spec"];
    assert!(
        selects(&spec["podSelector"], engine_pod),
        "{what}: does not select engine pods {engine_pod}"
    );
    assert!(
        !selects(&spec["podSelector"], operator_pod),
        "{what}: selects the operator's pods"
    );
    assert_eq!(
        spec["policyTypes"],
        serde_json::json!(["Ingress"]),
        "{what}"
    );
    let rules = spec["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{what}: one ingress rule");
    let peers = rules[0]["from"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{what}: the operator is the only peer");
    let ns_labels = serde_json::json!({"kubernetes.io/metadata.name": operator_ns});
    assert!(
        selects(&peers[0]["namespaceSelector"], &ns_labels),
        "{what}: namespace {operator_ns}"
    );
    assert!(
        !selects(
            &peers[0]["namespaceSelector"],
            &serde_json::json!({"kubernetes.io/metadata.name": "jobs"})
        ),
        "{what}"
    );
    assert!(
        selects(&peers[0]["podSelector"], operator_pod),
        "{what}: does not admit the operator's pods {operator_pod}"
    );
    assert!(
        !selects(&peers[0]["podSelector"], engine_pod),
        "{what}: admits engine pods"
    );
    assert_eq!(
        rules[0]["ports"],
        serde_json::json!([{"protocol": "TCP", "port": settings.port}]),
        "{what}"
    );
}

#[test]
fn network_policies_admit_only_the_operator_to_engine_pods() {
    let docs = documents(
        "config/network-policy/engines.yaml",
        &read("config/network-policy/engines.yaml"),
    );
    let operator = documents(
        "config/manager/deployment.yaml",
        &read("config/manager/deployment.yaml"),
    );
    check_network_policy(
        "config/network-policy/engines.yaml",
        find_kind(&docs, "NetworkPolicy")[0],
        find_kind(&operator, "Deployment")[0],
        "sjob-system",
    );
    let helm = helm();
    let (ok, out, err) = run(Command::new(&helm)
        .args(["template", "sjob"])
        .arg(root().join("charts/sjob"))
        .args([
            "--namespace",
            "sjob-system",
            "--set",
            "networkPolicy.namespaces={jobs,more-jobs}",
        ]));
    assert!(ok, "helm template: {err}");
    let docs = documents("helm template", &out);
    let policies = find_kind(&docs, "NetworkPolicy");
    let namespaces: Vec<&str> = policies
        .iter()
        .map(|p| p["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(namespaces, ["jobs", "more-jobs"]);
    let operator = find_kind(&docs, "Deployment")[0];
    let args = operator["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--engine-port=8081") && args.contains("--engine-rest-token=true"),
        "{args}"
    );
    for p in policies {
        check_network_policy("charts/sjob NetworkPolicy", p, operator, "sjob-system");
    }
    let (ok, out, _) = run(Command::new(&helm)
        .args(["template", "sjob"])
        .arg(root().join("charts/sjob"))
        .args(["--set", "networkPolicy.enabled=false"]));
    assert!(ok);
    assert!(find_kind(&documents("helm template", &out), "NetworkPolicy").is_empty());
}

#[test]
fn dockerfile_builds_the_one_binary() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("cargo build --profile \"${CARGO_PROFILE}\" --locked --bin sjob"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/sjob\"]"));
    // The dependency layer stubs every target path of Cargo.toml with this sed expression.
    let re = Regex::new(r#"^path *= *"(.*)"$"#).unwrap();
    for line in read("Cargo.toml")
        .lines()
        .filter(|l| l.trim_start().starts_with("path"))
    {
        assert!(
            re.is_match(line),
            "Cargo.toml: `{line}` escapes the Dockerfile's stub step"
        );
    }
    // src/local/cluster.rs compiles in config/rbac/role.yaml: config/ must be in the build.
    assert!(
        dockerfile.contains("COPY config ./config"),
        "Dockerfile does not copy config/"
    );
}

#[test]
fn kustomize_builds_config_default() {
    let kubectl = sjob::local::real::bin_dir()
        .map(|d| d.join("kubectl"))
        .unwrap_or_else(|e| panic!("kubectl kustomize config/default needs kubectl: {e}"));
    let (ok, out, err) = run(Command::new(kubectl)
        .arg("kustomize")
        .arg(root().join("config/default")));
    assert!(ok, "kubectl kustomize config/default failed:\n{err}");
    let docs = documents("kubectl kustomize config/default", &out);
    let kinds: BTreeSet<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect();
    for k in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(k), "no {k} in config/default: {kinds:?}");
    }
    assert_eq!(find_kind(&docs, "CustomResourceDefinition").len(), 2);
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let cluster_scoped = matches!(
            kind,
            "Namespace" | "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding"
        );
        if !cluster_scoped {
            assert_eq!(d["metadata"]["namespace"], "sjob-system", "{kind}");
        }
    }
    assert_eq!(find_kind(&docs, "ClusterRole")[0]["rules"], role_rules());
    let binding = find_kind(&docs, "ClusterRoleBinding")[0];
    let sa = find_kind(&docs, "ServiceAccount")[0];
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], "sjob-system");
    let deploy = find_kind(&docs, "Deployment")[0];
    assert_eq!(
        deploy["spec"]["template"]["spec"]["serviceAccountName"],
        sa["metadata"]["name"]
    );
    println!("kubectl kustomize config/default: {} objects", docs.len());
}

/// helm: `SJOB_HELM` or the PATH's; missing, the test fails with how to install it.
fn helm() -> PathBuf {
    std::env::var_os("SJOB_HELM")
        .map(PathBuf::from)
        .or_else(|| which("helm"))
        .unwrap_or_else(|| {
            panic!("helm is not on PATH: install it with `bash e2e/helm/install-helm.sh` (or run `bash .ci/run`, which does)")
        })
}

#[test]
fn helm_lints_and_renders_the_chart() {
    let helm = helm();
    let chart = root().join("charts/sjob");
    let (ok, out, err) = run(Command::new(&helm).arg("lint").arg("--strict").arg(&chart));
    assert!(ok, "helm lint --strict charts/sjob:\n{out}\n{err}");
    let template = |sets: &[&str]| {
        let mut cmd = Command::new(&helm);
        cmd.args(["template", "sjob"])
            .arg(&chart)
            .args(["--namespace", "sjob-system"]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        run(&mut cmd)
    };
    let (flags, env) = operator_flags_and_env();

    let (ok, out, err) = template(&[]);
    assert!(ok, "helm template: {err}");
    let docs = documents("helm template", &out);
    let roles = find_kind(&docs, "ClusterRole");
    assert_eq!(roles.len(), 1);
    assert_eq!(
        roles[0]["rules"],
        role_rules(),
        "the rendered chart's ClusterRole rules differ from config/rbac/role.yaml"
    );
    let deploy = find_kind(&docs, "Deployment")[0];
    check_operator_deployment("helm template (defaults)", deploy, &flags, &env);
    let args = deploy["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(!args.contains("--leader-elect"), "{args}");
    let svc = find_kind(&docs, "Service")[0];
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    assert!(find_kind(&docs, "ServiceMonitor").is_empty());
    let binding = find_kind(&docs, "ClusterRoleBinding")[0];
    assert_eq!(binding["roleRef"]["name"], roles[0]["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], "sjob-system");

    let (ok, out, err) = template(&[
        "replicaCount=2",
        "watchNamespace=jobs",
        "defaultSavepointDir=/savepoints",
        "logLevel=debug",
        "metrics.serviceMonitor.enabled=true",
    ]);
    assert!(ok, "helm template (HA): {err}");
    let docs = documents("helm template (HA)", &out);
    let deploy = find_kind(&docs, "Deployment")[0];
    check_operator_deployment("helm template (HA)", deploy, &flags, &env);
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for want in [
        "--leader-elect",
        "--namespace=jobs",
        "--default-savepoint-dir=/savepoints",
    ] {
        assert!(args.contains(&want), "{want} missing: {args:?}");
    }
    assert!(c["env"].to_string().contains("\"debug\""), "{}", c["env"]);
    let sm = find_kind(&docs, "ServiceMonitor");
    assert_eq!(sm.len(), 1);
    assert_eq!(sm[0]["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm[0]["spec"]["endpoints"][0]["path"], "/metrics");

    // Bad values fail at install time, naming the value.
    for (set, names) in [
        ("replicaCount=0", "/replicaCount"),
        ("logFormat=xml", "/logFormat"),
        ("logLevel=verbose", "/logLevel"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ] {
        let (ok, _, err) = template(&[set]);
        assert!(!ok, "helm template --set {set} succeeded");
        assert!(err.contains(names), "helm template --set {set}: {err}");
    }
    println!("helm lint and helm template passed ({})", helm.display());
}

#[test]
fn readme_reference_is_generated_from_the_crds() {
    let path = root().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let want = reference::reference_markdown();
    let section = reference::section_in_readme(&readme).unwrap_or_else(|| {
        panic!(
            "README.md has no `{}` … `{}` section",
            reference::START_MARKER,
            reference::END_MARKER
        )
    });
    if section == want {
        return;
    }
    if std::env::var_os("SJOB_BLESS").is_some() {
        std::fs::write(&path, reference::replace_in_readme(&readme).unwrap()).unwrap();
        println!("README.md: Reference section regenerated");
        return;
    }
    panic!(
        "README.md's Reference section is not the one generated from the CRDs. Regenerate it \
         with `SJOB_BLESS=1 cargo test --test manifests readme`, or paste the output of \
         `cargo run -- crd --reference` between {} and {}.",
        reference::START_MARKER,
        reference::END_MARKER
    );
}

#[test]
fn sjob_crd_reference_prints_the_generated_text() {
    let (ok, out, err) = run(Command::new(SJOB).args(["crd", "--reference"]));
    assert!(ok, "{err}");
    assert_eq!(out, reference::reference_markdown());
    let (ok, out, _) = run(Command::new(SJOB).arg("crd"));
    assert!(ok);
    assert!(
        out == read("crds/sjob.dev.yaml"),
        "crds/sjob.dev.yaml is not what `sjob crd` prints: run `cargo run -- crd > crds/sjob.dev.yaml` \
         and copy it to charts/sjob/crds/ and config/crd/"
    );
}

#[test]
fn reference_covers_every_field_and_kind() {
    let kinds: Vec<&str> = reference::operator_kind_schemas()
        .iter()
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(kinds, sjob::engine::spec::OperatorSpec::KINDS);
    let text = reference::reference_markdown();
    for field in [
        "`spec.upgrade.savepointTimeout`",
        "`spec.savepoints.retention.maxAge`",
        "`spec.job.checkpoints.interval`",
        "`status.conditions`",
        "`status.upgrade.stage`",
        "`spec.jobRef`",
        "`status.sizeBytes`",
        "`timestampStepMs`",
        "`fields[].default`",
        "`uid`",
    ] {
        assert!(text.contains(field), "{field} missing from\n{text}");
    }
    assert!(!text.contains("`spec.resources.limits`"), "{text}");
    assert!(
        text.contains("| `spec.state` | `running` \\| `suspended` | `running` |"),
        "{text}"
    );
    // Every field has a description.
    for line in text
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains('`'))
    {
        assert!(
            !line.ends_with("|  |"),
            "a field without a description (add a doc comment): {line}"
        );
    }
    // Splicing into README.md is stable.
    let readme = format!(
        "# x\n\n{}\nold\n{}\ntail\n",
        reference::START_MARKER,
        reference::END_MARKER
    );
    let new = reference::replace_in_readme(&readme).unwrap();
    assert_eq!(reference::section_in_readme(&new), Some(text.as_str()));
    assert!(new.ends_with(&format!("{}\ntail\n", reference::END_MARKER)));
    assert_eq!(reference::replace_in_readme(&new).unwrap(), new);
}
