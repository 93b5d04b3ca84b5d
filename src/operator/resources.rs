//! The Kubernetes objects that run one StatefulJob's engine: a ConfigMap with the job file, a
//! Deployment of one engine pod (`sjob run`, all subtasks in one process) and a Service for its
//! REST API, plus the Secret with the REST API's bearer token. Pure functions of the spec, so
//! the objects are the same on every reconcile and a server-side apply of them changes nothing
//! when nothing changed.
//!
//! Engine pods are admitted under the Pod Security "restricted" profile: non-root, no
//! privilege escalation, every capability dropped, seccomp RuntimeDefault and a read-only root
//! file system with an emptyDir for scratch files (`TMPDIR`).

use super::crd::{Color, StatefulJob, StatefulJobSpec};
use crate::engine::spec::{CheckpointSpec, JobSpec};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::{Resource, ResourceExt};
use serde_json::json;

/// Label on every object of a StatefulJob: its name.
pub const LABEL_JOB: &str = "sjob.dev/job";
/// Label on engine pods (and annotation on the Deployment): the spec hash they run.
pub const LABEL_SPEC_HASH: &str = "sjob.dev/spec-hash";
/// Label on engine pods: which of the job's two engines (blue, green) they belong to.
pub const LABEL_COLOR: &str = "sjob.dev/color";
/// Annotation on the Deployment: the snapshot the engine starts from.
pub const ANNOTATION_RESTORE_FROM: &str = "sjob.dev/restore-from";
/// Annotation on the Deployment: the engine's job id.
pub const ANNOTATION_JOB_ID: &str = "sjob.dev/job-id";
/// Annotation on the pod template, changed to restart the engine.
pub const ANNOTATION_RESTARTED: &str = "sjob.dev/restart-nonce";
/// Where the job file is mounted in the engine container.
pub const JOB_MOUNT: &str = "/etc/sjob";
/// Where the REST token Secret is mounted in the engine container.
pub const TOKEN_MOUNT: &str = "/var/run/secrets/sjob/rest";
/// The key of the token in the REST token Secret.
pub const TOKEN_KEY: &str = "token";
/// The engine's scratch directory (an emptyDir; the root file system is read-only).
pub const SCRATCH_MOUNT: &str = "/var/lib/sjob/tmp";
/// The user and group engine containers run as (not root, as the restricted profile requires).
pub const ENGINE_UID: i64 = 65532;

/// Why the objects of an engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("StatefulJob {0} has no uid yet")]
    NoUid(String),
    #[error("spec.job cannot be written as a job file: {0}")]
    JobFile(#[from] serde_yaml::Error),
    #[error("the {what} of the engine: {source}")]
    Object {
        what: &'static str,
        source: serde_json::Error,
    },
}

fn object<T: serde::de::DeserializeOwned>(
    what: &'static str,
    value: serde_json::Value,
) -> Result<T, ResourceError> {
    serde_json::from_value(value).map_err(|source| ResourceError::Object { what, source })
}

/// The StatefulJob as the owner of its engine's objects.
fn owner(sj: &StatefulJob) -> Result<serde_json::Value, ResourceError> {
    let owner = sj
        .controller_owner_ref(&())
        .ok_or_else(|| ResourceError::NoUid(sj.name_any()))?;
    serde_json::to_value(owner).map_err(|source| ResourceError::Object {
        what: "owner reference",
        source,
    })
}

/// How engine pods are built, set by the operator's flags.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Image of engine pods when the spec names none.
    pub image: String,
    /// Savepoint directory when the spec names none.
    pub default_savepoint_dir: Option<String>,
    /// The engines' REST port.
    pub port: u16,
    /// Whether engines require a bearer token on their REST API (one Secret per StatefulJob,
    /// read by the operator, mounted in the engine pod).
    pub rest_token: bool,
    /// A Secret in the job's namespace whose keys (`AWS_*`, `AZURE_*`) engine pods get as
    /// environment: the credentials of `s3://` and `az://` savepoint and checkpoint locations.
    pub storage_secret: Option<String>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            image: "ghcr.io/sjob-dev/sjob:latest".into(),
            default_savepoint_dir: None,
            port: 8081,
            rest_token: true,
            storage_secret: None,
        }
    }
}

/// The Deployment of the job's engine of this color (blue keeps the name of a job's only
/// engine).
pub fn engine_name(job: &str, color: Color) -> String {
    match color {
        Color::Blue => format!("{job}-engine"),
        Color::Green => format!("{job}-engine-green"),
    }
}

pub fn job_config_name(job: &str, color: Color) -> String {
    match color {
        Color::Blue => format!("{job}-job"),
        Color::Green => format!("{job}-job-green"),
    }
}

pub fn rest_service_name(job: &str) -> String {
    format!("{job}-rest")
}

pub fn rest_token_secret_name(job: &str) -> String {
    format!("{job}-rest-token")
}

/// The Secret holding the bearer token of a StatefulJob's engines. Created once with a random
/// token and never rewritten (every version of the job and the operator share it); it goes
/// with the StatefulJob by owner reference.
pub fn rest_token_secret(sj: &StatefulJob, token: &str) -> Result<Secret, ResourceError> {
    let name = sj.name_any();
    let owner = owner(sj)?;
    let mut secret: Secret = object(
        "Secret",
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": rest_token_secret_name(&name),
                "labels": { LABEL_JOB: name },
                "ownerReferences": [owner],
            },
            "type": "Opaque",
        }),
    )?;
    // `data`, not `stringData`: what every API server stores and every kubelet mounts.
    secret.data = Some(
        [(
            TOKEN_KEY.to_owned(),
            k8s_openapi::ByteString(token.as_bytes().to_vec()),
        )]
        .into(),
    );
    Ok(secret)
}

/// A new random bearer token (256 bits from the system's generator, as hex).
pub fn new_rest_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Where savepoints of this job go.
pub fn savepoint_dir(spec: &StatefulJobSpec, settings: &EngineSettings) -> Option<String> {
    spec.savepoints
        .dir
        .clone()
        .or_else(|| settings.default_savepoint_dir.clone())
}

/// The job file the engine runs: the spec's job with the StatefulJob's overrides, and
/// checkpoints next to the savepoints when the job sets none (so a crashed engine resumes and
/// `last-state` upgrades have something to start from).
pub fn engine_job(spec: &StatefulJobSpec, settings: &EngineSettings) -> JobSpec {
    let mut job = spec.job.clone();
    if spec.max_parallelism.is_some() {
        job.max_parallelism = spec.max_parallelism;
    }
    if job.checkpoints.is_none()
        && let Some(dir) = savepoint_dir(spec, settings)
    {
        job.checkpoints = Some(CheckpointSpec {
            interval: "10s".into(),
            dir: crate::savepoint::paths::default_checkpoint_dir(&dir),
            retained: 3,
        });
    }
    job
}

/// The engine's job id: fixed for a (StatefulJob, spec, start snapshot), so a restarted pod
/// finds its own checkpoints and a new version never resumes an old version's.
pub fn job_id(uid: &str, spec_hash: &str, restore_from: Option<&str>) -> String {
    let key = format!("{uid}/{spec_hash}/{}", restore_from.unwrap_or(""));
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
}

/// The Service of the job's REST API, selecting the engine of `color` (the one serving).
pub fn rest_service(
    sj: &StatefulJob,
    color: Color,
    settings: &EngineSettings,
) -> Result<Service, ResourceError> {
    let name = sj.name_any();
    let port = settings.port;
    object(
        "Service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": rest_service_name(&name), "labels": { LABEL_JOB: name }, "ownerReferences": [owner(sj)?]},
            "spec": {
                "selector": { LABEL_JOB: name, LABEL_COLOR: color.as_str() },
                "ports": [{"name": "rest", "port": port, "targetPort": port}],
            },
        }),
    )
}

/// Which of a job's engines, and how it starts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Instance {
    pub color: Color,
    /// Its sinks write nothing until a cut-over (a blue-green candidate).
    pub shadow: bool,
}

/// The ConfigMap and Deployment of the engine `instance` for `spec`, and the Service that
/// makes it the one serving.
pub fn engine_objects(
    sj: &StatefulJob,
    spec: &StatefulJobSpec,
    spec_hash: &str,
    restore_from: Option<&str>,
    restart_nonce: Option<i64>,
    instance: Instance,
    settings: &EngineSettings,
) -> Result<(ConfigMap, Deployment, Service), ResourceError> {
    let name = sj.name_any();
    let owner = owner(sj)?;
    let uid = sj.uid().unwrap_or_default();
    let id = job_id(&uid, spec_hash, restore_from);
    let job_yaml = serde_yaml::to_string(&engine_job(spec, settings))?;
    let port = settings.port;
    let mut args = vec![
        "run".to_owned(),
        format!("{JOB_MOUNT}/job.yaml"),
        "--job-id".into(),
        id.clone(),
        "--rest-port".into(),
        port.to_string(),
        "--keep-running".into(),
    ];
    if let Some(dir) = savepoint_dir(spec, settings) {
        // Savepoints requested over REST may only go there.
        args.extend(["--savepoint-root".into(), dir.clone()]);
        args.extend(["--savepoint-dir".into(), dir]);
    }
    let mut mounts = vec![
        json!({"name": "job", "mountPath": JOB_MOUNT, "readOnly": true}),
        json!({"name": "scratch", "mountPath": SCRATCH_MOUNT}),
    ];
    let mut volumes = vec![
        json!({"name": "job", "configMap": {"name": job_config_name(&name, instance.color)}}),
        json!({"name": "scratch", "emptyDir": {}}),
    ];
    if settings.rest_token {
        args.extend([
            "--rest-token-file".into(),
            format!("{TOKEN_MOUNT}/{TOKEN_KEY}"),
        ]);
        mounts.push(json!({"name": "rest-token", "mountPath": TOKEN_MOUNT, "readOnly": true}));
        volumes.push(json!({"name": "rest-token", "secret": {
            "secretName": rest_token_secret_name(&name),
            "defaultMode": 0o440,
        }}));
    }
    if let Some(from) = restore_from {
        args.extend(["--from-savepoint".into(), from.to_owned()]);
    }
    if spec.upgrade.allow_non_restored_state {
        args.push("--allow-non-restored-state".into());
    }
    if instance.shadow {
        args.push("--shadow".into());
    }
    if let Some(p) = spec.parallelism {
        args.extend(["--parallelism".into(), p.to_string()]);
    }
    let labels = json!({ LABEL_JOB: name });
    let color = instance.color.as_str();
    // A Deployment's selector cannot change: blue keeps the one of the engines from before
    // colors (green's pods carry another pod-template-hash, so blue's ReplicaSets never
    // match them); green's names its color.
    let selector = match instance.color {
        Color::Blue => labels.clone(),
        Color::Green => json!({ LABEL_JOB: name, LABEL_COLOR: color }),
    };
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": job_config_name(&name, instance.color), "labels": labels, "ownerReferences": [owner]},
        "data": {"job.yaml": job_yaml},
    });
    let mut template_annotations = serde_json::Map::new();
    if let Some(n) = restart_nonce {
        template_annotations.insert(ANNOTATION_RESTARTED.into(), json!(n.to_string()));
    }
    let deploy = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": engine_name(&name, instance.color),
            "labels": {LABEL_JOB: name, LABEL_COLOR: color},
            "annotations": {
                LABEL_SPEC_HASH: spec_hash,
                ANNOTATION_RESTORE_FROM: restore_from.unwrap_or(""),
                ANNOTATION_JOB_ID: id,
            },
            "ownerReferences": [owner],
        },
        "spec": {
            "replicas": 1,
            // Never two pods of one engine at once: they would share sinks and checkpoints.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": {LABEL_JOB: name, LABEL_COLOR: color, LABEL_SPEC_HASH: spec_hash},
                    "annotations": template_annotations,
                },
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    // Engines call no Kubernetes API.
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": ENGINE_UID,
                        "runAsGroup": ENGINE_UID,
                        "fsGroup": ENGINE_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "engine",
                        "image": spec.image.clone().unwrap_or_else(|| settings.image.clone()),
                        "command": ["sjob"],
                        "args": args,
                        "env": [
                            {"name": "SJOB_REST_ADDRESS",
                             "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "TMPDIR", "value": SCRATCH_MOUNT},
                        ],
                        "envFrom": settings.storage_secret.iter()
                            .map(|name| json!({"secretRef": {"name": name}}))
                            .collect::<Vec<_>>(),
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "ports": [{"name": "rest", "containerPort": port}],
                        "readinessProbe": {
                            "httpGet": {"path": "/overview", "port": port},
                            "periodSeconds": 2,
                        },
                        "resources": spec.resources.clone().map(|r| serde_json::to_value(r).unwrap_or_default()).unwrap_or_else(|| json!({})),
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    });
    Ok((
        object("ConfigMap", cm)?,
        object("Deployment", deploy)?,
        rest_service(sj, instance.color, settings)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StatefulJob {
        let mut sj: StatefulJob = serde_yaml::from_str(
            "apiVersion: sjob.dev/v1alpha1\nkind: StatefulJob\nmetadata: {name: clicks, namespace: default, uid: u-1}\nspec:\n  parallelism: 2\n  job:\n    name: clicks\n    operators:\n      - {kind: generator, uid: src}\n      - {kind: keyBy, field: key}\n      - {kind: count, uid: counter}\n      - {kind: discardSink}\n  savepoints: {dir: /data/sp}\n",
        )
        .unwrap();
        sj.metadata.uid = Some("u-1".into());
        sj
    }

    #[test]
    fn engine_runs_the_spec_from_the_snapshot_with_its_flags() {
        let sj = sample();
        let (cm, deploy, svc) = engine_objects(
            &sj,
            &sj.spec,
            "h1",
            Some("/data/sp/savepoint-1"),
            None,
            Instance::default(),
            &EngineSettings::default(),
        )
        .unwrap();
        let job: JobSpec = serde_yaml::from_str(&cm.data.as_ref().unwrap()["job.yaml"]).unwrap();
        assert_eq!(
            job.checkpoints.as_ref().map(|c| c.dir.as_str()),
            Some("/data/sp/checkpoints")
        );
        let pod = deploy.spec.template.spec.as_ref().unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        let joined = args.join(" ");
        assert!(
            joined.contains("--from-savepoint /data/sp/savepoint-1"),
            "{joined}"
        );
        assert!(joined.contains("--parallelism 2"), "{joined}");
        assert!(joined.contains("--savepoint-dir /data/sp"), "{joined}");
        assert!(!joined.contains("--allow-non-restored-state"), "{joined}");
        // REST: savepoints only under the job's directory, a bearer token from its Secret.
        assert!(joined.contains("--savepoint-root /data/sp"), "{joined}");
        assert!(
            joined.contains("--rest-token-file /var/run/secrets/sjob/rest/token"),
            "{joined}"
        );
        let volumes = serde_json::to_value(&pod.volumes).unwrap();
        assert_eq!(volumes[2]["secret"]["secretName"], "clicks-rest-token");
        let secret = rest_token_secret(&sj, "t0k").unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("clicks-rest-token"));
        assert_eq!(secret.data.unwrap()["token"].0, b"t0k");
        assert_ne!(new_rest_token(), new_rest_token());
        assert_eq!(new_rest_token().len(), 64);
        // The Pod Security "restricted" profile.
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let csc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        assert_eq!(
            csc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        // Without a token: no Secret volume, no flag.
        let (_, open, _) = engine_objects(
            &sj,
            &sj.spec,
            "h1",
            None,
            None,
            Instance::default(),
            &EngineSettings {
                rest_token: false,
                ..EngineSettings::default()
            },
        )
        .unwrap();
        let open = serde_json::to_string(&open).unwrap();
        assert!(!open.contains("rest-token"), "{open}");
        assert_eq!(
            deploy.metadata.owner_references.as_ref().unwrap()[0].uid,
            "u-1"
        );
        assert_eq!(
            deploy.spec.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
        assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 8081);
        // Same inputs, same objects (apply is a no-op); another snapshot, another job id.
        let again = engine_objects(
            &sj,
            &sj.spec,
            "h1",
            Some("/data/sp/savepoint-1"),
            None,
            Instance::default(),
            &EngineSettings::default(),
        )
        .unwrap();
        assert_eq!(again.1, deploy);
        assert_ne!(
            job_id("u-1", "h1", Some("/a")),
            job_id("u-1", "h1", Some("/b"))
        );
    }
}
