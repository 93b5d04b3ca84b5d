//! The custom resources: `StatefulJob` (a stateful stream job the operator deploys and upgrades
//! through savepoints) and `Savepoint` (one object per savepoint, owning its files).

use crate::engine::spec::JobSpec;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "sjob.dev";
pub const VERSION: &str = "v1alpha1";
/// Finalizer on Savepoint objects: their files are disposed before the object goes.
pub const SAVEPOINT_FINALIZER: &str = "sjob.dev/dispose";

/// A stateful stream job, upgraded without losing state.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sjob.dev",
    version = "v1alpha1",
    kind = "StatefulJob",
    plural = "statefuljobs",
    shortname = "sjob",
    namespaced,
    status = "StatefulJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Job ID","type":"string","jsonPath":".status.jobId"}"#,
    printcolumn = r#"{"name":"Last Savepoint","type":"string","jsonPath":".status.lastSavepoint.path"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.restoreFrom) || !has(self.upgrade) || !has(self.upgrade.mode) || self.upgrade.mode != 'stateless'",
        "message": "restoreFrom cannot be combined with upgrade.mode: stateless, which restores no state",
        "fieldPath": ".restoreFrom",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "!has(self.parallelism) || !has(self.maxParallelism) || self.parallelism <= self.maxParallelism",
        "message": "parallelism must not exceed maxParallelism (the number of key groups)",
        "fieldPath": ".parallelism",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.upgrade) || !has(self.upgrade.strategy) || self.upgrade.strategy != 'blue-green' || !has(self.upgrade.mode) || self.upgrade.mode == 'savepoint'",
        "message": "upgrade.strategy: blue-green starts the new version from a savepoint of the running one: it needs upgrade.mode: savepoint",
        "fieldPath": ".upgrade.strategy",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct StatefulJobSpec {
    /// The image of the engine pods; the operator's default engine image when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The job graph: the same document `sjob run` takes.
    pub job: JobSpec,
    /// Overrides the job's default parallelism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub parallelism: Option<u32>,
    /// Number of key groups; fixed once state exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32768))]
    pub max_parallelism: Option<u32>,
    /// Resources of the engine container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// `running`, or `suspended`: stopped with a savepoint, nothing running.
    #[serde(default)]
    pub state: DesiredState,
    /// How spec changes are rolled out.
    #[serde(default)]
    pub upgrade: UpgradeSpec,
    /// Where savepoints go, how long they are kept, how often they are taken.
    #[serde(default)]
    pub savepoints: SavepointsSpec,
    /// The savepoint the first deployment starts from (a path, an s3:// or an az:// URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<String>,
    /// Change it to take a savepoint now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint_trigger_nonce: Option<i64>,
    /// Change it to restart the engine (from its newest checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_nonce: Option<i64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    #[default]
    Running,
    Suspended,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeMode {
    /// Stop with a savepoint, start the new version from it.
    #[default]
    Savepoint,
    /// Start the new version from the newest checkpoint, without a new savepoint.
    LastState,
    /// Start the new version empty.
    Stateless,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeStrategy {
    /// Stop the old version, then start the new one.
    #[default]
    Recreate,
    /// Start the new version beside the old one from a savepoint taken without stopping it,
    /// switch at a source position both agree on once it has caught up (README "Blue-green").
    BlueGreen,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeSpec {
    /// `savepoint` (default), `last-state` or `stateless`.
    #[serde(default)]
    pub mode: UpgradeMode,
    /// Start even if saved state has no operator (uid) in the new job; that state is dropped.
    #[serde(default)]
    pub allow_non_restored_state: bool,
    /// How long the savepoint before an upgrade may take, e.g. `10m`.
    #[serde(default = "default_savepoint_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub savepoint_timeout: String,
    /// How long the new version has to run and restore before it is rolled back, e.g. `2m`.
    #[serde(default = "default_ready_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub ready_timeout: String,
    /// `recreate` (default) or `blue-green` (needs `mode: savepoint`).
    #[serde(default)]
    pub strategy: UpgradeStrategy,
    /// How a blue-green upgrade's new version takes over.
    #[serde(default)]
    pub blue_green: BlueGreenSpec,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Promotion {
    /// Switch once the new version runs, restored, and has caught up within `maxLag`.
    #[default]
    Auto,
    /// Switch when `promoteNonce` is set to a new value (and the new version has caught up).
    Manual,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlueGreenSpec {
    /// `auto` (default) or `manual`.
    #[serde(default)]
    pub promotion: Promotion,
    /// Caught up: no source split of the new version is further behind the old one's than
    /// this, in the sources' position units (generator: record index; fileSource: bytes).
    /// It bounds the pause at the switch: the old version holds at the cut-over until the
    /// new one has read up to it.
    #[serde(default = "default_max_lag")]
    #[schemars(range(min = 0))]
    pub max_lag: i64,
    /// How long the new version has to run, restore and catch up before the switch is
    /// abandoned (the new version deleted, the old one untouched), e.g. `10m`.
    #[serde(default = "default_catch_up_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub catch_up_timeout: String,
    /// With `promotion: manual`: set to a new value to let the waiting new version take over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_nonce: Option<i64>,
}

fn default_max_lag() -> i64 {
    10_000
}
fn default_catch_up_timeout() -> String {
    "10m".into()
}

impl Default for BlueGreenSpec {
    fn default() -> Self {
        BlueGreenSpec {
            promotion: Promotion::default(),
            max_lag: default_max_lag(),
            catch_up_timeout: default_catch_up_timeout(),
            promote_nonce: None,
        }
    }
}

fn default_savepoint_timeout() -> String {
    "10m".into()
}
fn default_ready_timeout() -> String {
    "2m".into()
}

impl Default for UpgradeSpec {
    fn default() -> Self {
        UpgradeSpec {
            mode: UpgradeMode::default(),
            allow_non_restored_state: false,
            savepoint_timeout: default_savepoint_timeout(),
            ready_timeout: default_ready_timeout(),
            strategy: UpgradeStrategy::default(),
            blue_green: BlueGreenSpec::default(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SavepointsSpec {
    /// Where savepoints go: a path the engine pods can write, a file:// URL,
    /// s3://bucket/prefix or az://container/prefix (credentials from the operator's
    /// --engine-storage-secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Which completed savepoints are kept.
    #[serde(default)]
    pub retention: RetentionSpec,
    /// Take a savepoint this often, e.g. `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub periodic: Option<String>,
    /// Delete the savepoints' files when the StatefulJob is deleted.
    #[serde(default)]
    pub dispose_on_delete: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Keep at most this many completed savepoints. The one the job restored from and the
    /// newest are never deleted and count towards this number.
    #[serde(default = "default_max_count")]
    #[schemars(range(min = 1))]
    pub max_count: u32,
    /// Delete completed savepoints older than this, e.g. `7d` written as `168h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub max_age: Option<String>,
}

fn default_max_count() -> u32 {
    5
}

impl Default for RetentionSpec {
    fn default() -> Self {
        RetentionSpec {
            max_count: default_max_count(),
            max_age: None,
        }
    }
}

/// What the operator observed and did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatefulJobStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Deploying, Running, Upgrading, RollingBack, Suspending, Suspended, Blocked or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Ready, Progressing and Degraded, and the standard Reconciling and Stalled that kstatus
    /// (Flux, `kubectl wait`) reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The running engine's job id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Hash of the spec the running engine was deployed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_spec_hash: Option<String>,
    /// The last spec that ran and restored successfully: what a rollback returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stable_spec: Option<Box<StatefulJobSpec>>,
    /// Hash of `lastStableSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stable_spec_hash: Option<String>,
    /// The upgrade in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeStatus>,
    /// The newest completed savepoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_savepoint: Option<SavepointRef>,
    /// The snapshot the running engine restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// The `savepointTriggerNonce` acted on last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_savepoint_trigger_nonce: Option<i64>,
    /// The `restartNonce` acted on last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_restart_nonce: Option<i64>,
    /// A manual or periodic savepoint the running job is taking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_savepoint: Option<PendingSavepoint>,
    /// A spec hash whose upgrade failed and was rolled back (or refused by preflight): not
    /// tried again until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_spec_hash: Option<String>,
    /// Which engine serves: `blue` (`<job>-engine`, the default) or `green`
    /// (`<job>-engine-green`). A blue-green upgrade starts the other one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<Color>,
    /// The new version of a blue-green upgrade, catching up beside the live one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<CandidateStatus>,
    /// The `upgrade.blueGreen.promoteNonce` acted on last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_promote_nonce: Option<i64>,
}

/// One of the two engines of a StatefulJob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    #[default]
    Blue,
    Green,
}

impl Color {
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
}

/// The new version of a blue-green upgrade.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CandidateStatus {
    /// Its engine: the color not live.
    pub color: Color,
    /// Its job id, once it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// How far its furthest-behind source split is behind the live version's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
}

/// A source split's position: where a blue-green switch cuts over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CutOverPosition {
    /// The split (generator: its index; fileSource: the file).
    pub split: String,
    /// Its position (generator: record index; fileSource: byte offset).
    pub position: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    Deploying,
    Running,
    Upgrading,
    RollingBack,
    Suspending,
    Suspended,
    Blocked,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpgradeStage {
    /// Checking that the new job graph can take the running job's state.
    Preflight,
    /// Stopping the old version with a savepoint.
    Savepointing,
    /// Starting the new version from the savepoint.
    Deploying,
    /// Waiting for the new version to run and restore.
    Verifying,
    /// Returning to the last stable spec from the same savepoint.
    RollingBack,
    /// Blue-green: the new version runs beside the old one, its output held back, until it
    /// has caught up (and, with manual promotion, is promoted).
    CatchingUp,
    /// Blue-green: both versions hold at a common source position; the old one stops with a
    /// savepoint there and the new one writes from there on.
    Switching,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeStatus {
    /// Preflight, Savepointing, Deploying, Verifying or RollingBack.
    pub stage: UpgradeStage,
    /// Hash of the spec being rolled out.
    pub target_spec_hash: String,
    /// The savepoint trigger in flight, if any: its id, chosen by the operator and written
    /// here before the engine is asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_id: Option<String>,
    /// The savepoint (or checkpoint) the new version starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint: Option<String>,
    /// When the current stage began (RFC 3339).
    pub stage_started: String,
    /// Attempts at the current stage (savepoints are retried with backoff).
    #[serde(default)]
    pub attempts: u32,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// A blue-green upgrade: the new version starts beside the old one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blue_green: bool,
    /// Blue-green: the source positions where output passes from the old version to the new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_over: Option<Vec<CutOverPosition>>,
}

/// A savepoint requested from the running job and not yet recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingSavepoint {
    /// The request's id, chosen by the operator and written here before the engine is asked:
    /// a request whose answer is lost is polled by it, not made again.
    pub trigger_id: String,
    /// Manual or periodic.
    pub trigger: SavepointTrigger,
    /// When it was requested (RFC 3339).
    pub started: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SavepointRef {
    /// The Savepoint object.
    pub name: String,
    /// Its location.
    pub path: String,
    /// When it completed (RFC 3339).
    pub time: String,
}

/// One savepoint of a StatefulJob; deleting it disposes its files.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sjob.dev",
    version = "v1alpha1",
    kind = "Savepoint",
    plural = "savepoints",
    shortname = "sjsp",
    namespaced,
    status = "SavepointStatus",
    printcolumn = r#"{"name":"Job","type":"string","jsonPath":".spec.jobRef"}"#,
    printcolumn = r#"{"name":"Trigger","type":"string","jsonPath":".spec.trigger"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".status.path"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SavepointSpec {
    /// The StatefulJob (same namespace).
    pub job_ref: String,
    /// What took it: upgrade, periodic, manual or suspend.
    pub trigger: SavepointTrigger,
    /// Hash of the StatefulJob spec the savepoint was taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    /// For an existing savepoint registered by hand: its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SavepointTrigger {
    Upgrade,
    Periodic,
    Manual,
    Suspend,
}

/// Where the savepoint is and how taking it went.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SavepointStatus {
    /// Pending, InProgress, Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SavepointState>,
    /// The savepoint directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Bytes of state in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// The engine's request id while it is being taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_id: Option<String>,
    /// When it was requested (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    /// When it completed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SavepointState {
    Pending,
    InProgress,
    Completed,
    Failed,
}

/// The CRDs as YAML documents, as `sjob crd` prints them and crds/ holds them.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [StatefulJob::crd(), Savepoint::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Kubernetes' structural schema rules, the part that generated schemas can break: every
    /// node has a type (or preserves unknown fields, or is int-or-string), and unions
    /// (`oneOf`/`anyOf`/`allOf`) declare no types or properties of their own.
    fn check_structural(path: &str, v: &Value, problems: &mut Vec<String>) {
        let Some(obj) = v.as_object() else { return };
        let open = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
            || obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        if !obj.contains_key("type") && !open {
            problems.push(format!("{path}: no type"));
        }
        if obj.contains_key("$ref") {
            problems.push(format!("{path}: $ref"));
        }
        for union in ["oneOf", "anyOf", "allOf"] {
            if let Some(branches) = obj.get(union).and_then(Value::as_array) {
                for b in branches {
                    if b.get("type").is_some() || b.get("properties").is_some() {
                        problems.push(format!(
                            "{path}: {union} branch declares a type or properties"
                        ));
                    }
                }
            }
        }
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                check_structural(&format!("{path}.{k}"), p, problems);
            }
        }
        if let Some(items) = obj.get("items") {
            check_structural(&format!("{path}[]"), items, problems);
        }
        if let Some(extra) = obj.get("additionalProperties").filter(|a| a.is_object()) {
            check_structural(&format!("{path}{{}}"), extra, problems);
        }
        if obj.get("description").is_none() && path.matches('.').count() <= 2 && !open {
            problems.push(format!("{path}: no description"));
        }
    }

    #[test]
    fn crds_are_structural_and_described() {
        use kube::CustomResourceExt;
        for crd in [StatefulJob::crd(), Savepoint::crd()] {
            let v = serde_json::to_value(&crd).unwrap();
            let schema = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            let mut problems = Vec::new();
            for part in ["spec", "status"] {
                check_structural(part, &schema["properties"][part], &mut problems);
            }
            assert!(
                problems.is_empty(),
                "{}: {problems:#?}",
                crd.metadata.name.unwrap_or_default()
            );
        }
    }

    #[test]
    fn crds_directory_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/sjob.dev.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crds_yaml().unwrap(),
            "crds/sjob.dev.yaml is out of date: run `cargo run -- crd > crds/sjob.dev.yaml`"
        );
    }

    #[test]
    fn validation_and_defaults_are_in_the_schema() {
        use kube::CustomResourceExt;
        let v = serde_json::to_value(StatefulJob::crd()).unwrap();
        let spec = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["parallelism"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(
            spec["savepoints"]["properties"]["retention"]["properties"]["maxCount"]["minimum"]
                .as_f64(),
            Some(1.0)
        );
        assert!(spec["upgrade"]["properties"]["savepointTimeout"]["pattern"].is_string());
        let kinds = &spec["job"]["properties"]["operators"]["items"]["properties"]["kind"]["enum"];
        assert!(kinds.as_array().unwrap().iter().any(|k| k == "generator"));
        // A StatefulJob with only the required fields deserializes with the documented defaults.
        let sj: StatefulJobSpec = serde_json::from_value(serde_json::json!({
            "job": {"name": "j", "operators": [{"kind": "generator", "uid": "s"}, {"kind": "discardSink"}]}
        }))
        .unwrap();
        assert_eq!(sj.state, DesiredState::Running);
        assert_eq!(sj.upgrade.mode, UpgradeMode::Savepoint);
        assert_eq!(sj.savepoints.retention.max_count, 5);
    }
}
