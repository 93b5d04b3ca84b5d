//! The upgrade planner: a pure function from (spec, status, observations) to the next actions
//! and the new status. Every branch of a deploy, upgrade, rollback, suspend and savepoint
//! policy is decided here and tested without I/O; the controller only observes and acts.
//!
//! The planner is re-entrant: all progress lives in the status (stage, trigger id, savepoint),
//! so an operator restarted in the middle of an upgrade picks it up where it was.

use super::crd::{
    DesiredState, Phase, SavepointTrigger, StatefulJobSpec, StatefulJobStatus, UpgradeMode,
    UpgradeStage, UpgradeStatus,
};
use crate::engine::graph::JobGraph;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What the engine of a StatefulJob looks like right now.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineObs {
    /// No engine deployed.
    Absent,
    /// Deployed for `spec_hash`, not (yet) running its job.
    Starting { spec_hash: String },
    Running {
        spec_hash: String,
        job_id: String,
        restored_from: Option<String>,
    },
    /// The job ended (stopped with a savepoint, or finished).
    Ended { spec_hash: String },
    /// Crash-looping or failed: it will not come up by itself.
    Broken { spec_hash: String, reason: String },
}

impl EngineObs {
    fn spec_hash(&self) -> Option<&str> {
        match self {
            EngineObs::Absent => None,
            EngineObs::Starting { spec_hash }
            | EngineObs::Running { spec_hash, .. }
            | EngineObs::Ended { spec_hash }
            | EngineObs::Broken { spec_hash, .. } => Some(spec_hash),
        }
    }
}

/// The outcome of the savepoint trigger recorded in the status.
#[derive(Clone, Debug, PartialEq)]
pub enum TriggerObs {
    InProgress,
    Completed { path: String },
    Failed { cause: String },
}

/// A completed savepoint of this job, for retention.
#[derive(Clone, Debug, PartialEq)]
pub struct SavepointObs {
    pub name: String,
    pub path: String,
    pub completed_s: i64,
}

/// Everything the controller observed, besides the StatefulJob itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// Seconds since the epoch.
    pub now_s: i64,
    pub engine: EngineObs,
    /// The trigger in `status.upgrade.triggerId`, or the pending manual/periodic one.
    pub trigger: Option<TriggerObs>,
    /// When a preflight was asked for: the problems found (empty: it restores).
    pub preflight: Option<Vec<String>>,
    /// The newest completed checkpoint of the running job.
    pub latest_checkpoint: Option<String>,
    pub savepoints: Vec<SavepointObs>,
}

/// Something for the controller to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create or replace the engine for this spec, optionally restoring a snapshot.
    Deploy {
        spec: Box<StatefulJobSpec>,
        spec_hash: String,
        restore_from: Option<String>,
    },
    /// Delete the engine.
    RemoveEngine,
    /// Restart the engine's pods (they resume from their newest checkpoint).
    RestartEngine,
    /// Check the desired job graph against this snapshot; the result comes back as
    /// `Observed::preflight`.
    Preflight { snapshot: String },
    /// Stop the job with a savepoint; the controller records the trigger id in
    /// `status.upgrade.triggerId`.
    StopWithSavepoint,
    /// Take a savepoint while the job runs.
    TriggerSavepoint { trigger: SavepointTrigger },
    /// Record a completed savepoint as a Savepoint object named `name`.
    RecordSavepoint {
        name: String,
        path: String,
        trigger: SavepointTrigger,
    },
    /// Delete a Savepoint object (its finalizer disposes the files).
    DeleteSavepoint { name: String },
    /// Publish an event.
    Event {
        warning: bool,
        reason: String,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: StatefulJobStatus,
    /// Look again after this many milliseconds.
    pub requeue_ms: u64,
}

/// The hash of everything in a spec that the running engine depends on.
pub fn spec_hash(spec: &StatefulJobSpec) -> String {
    let relevant = serde_json::json!({
        "image": spec.image,
        "job": spec.job,
        "parallelism": spec.parallelism,
        "maxParallelism": spec.max_parallelism,
        "resources": spec.resources,
        "allowNonRestoredState": spec.upgrade.allow_non_restored_state,
    });
    let bytes = serde_json::to_vec(&relevant).unwrap_or_default();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes))
}

fn rfc3339(s: i64) -> String {
    jiff::Timestamp::from_second(s)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn parse_time(s: &str) -> Option<i64> {
    s.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

fn seconds(text: &str, fallback: u64) -> u64 {
    humantime::parse_duration(text)
        .map(|d| d.as_secs())
        .unwrap_or(fallback)
}

/// Sets a condition, keeping its transition time when its status does not change.
fn set_condition(
    conds: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: i64,
    now_s: i64,
) {
    let status = if status { "True" } else { "False" };
    let now = jiff::Timestamp::from_second(now_s).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    match conds.iter_mut().find(|c| c.type_ == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status.to_owned();
            c.reason = reason.to_owned();
            c.message = message;
            c.observed_generation = Some(generation);
        }
        None => conds.push(Condition {
            type_: kind.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: Some(generation),
            last_transition_time: Time(now),
        }),
    }
}

struct Planner<'a> {
    spec: &'a StatefulJobSpec,
    obs: &'a Observed,
    generation: i64,
    desired: String,
    status: StatefulJobStatus,
    actions: Vec<Action>,
    requeue_ms: u64,
}

/// Decides the next step for a StatefulJob.
pub fn plan(
    spec: &StatefulJobSpec,
    generation: i64,
    status: &StatefulJobStatus,
    obs: &Observed,
) -> Plan {
    let mut p = Planner {
        spec,
        obs,
        generation,
        desired: spec_hash(spec),
        status: status.clone(),
        actions: Vec::new(),
        requeue_ms: 10_000,
    };
    p.status.observed_generation = Some(generation);
    p.decide();
    p.summarize();
    Plan {
        actions: p.actions,
        status: p.status,
        requeue_ms: p.requeue_ms,
    }
}

/// The Savepoint object's name for a savepoint directory: its last path component.
pub fn savepoint_name(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

impl Planner<'_> {
    fn record_savepoint(&mut self, path: &str, trigger: SavepointTrigger) {
        let name = savepoint_name(path);
        self.actions.push(Action::RecordSavepoint {
            name: name.clone(),
            path: path.to_owned(),
            trigger,
        });
        self.status.last_savepoint = Some(super::crd::SavepointRef {
            name,
            path: path.to_owned(),
            time: rfc3339(self.obs.now_s),
        });
    }

    fn condition(&mut self, kind: &str, on: bool, reason: &str, message: impl Into<String>) {
        set_condition(
            &mut self.status.conditions,
            kind,
            on,
            reason,
            message.into(),
            self.generation,
            self.obs.now_s,
        );
    }

    /// The standard `Reconciling` and `Stalled` conditions (kstatus, as Flux reads them) from
    /// the phase: reconciling while a rollout is in flight; stalled when it cannot go on by
    /// itself (Blocked, Failed, or a spec that cannot be deployed).
    fn summarize(&mut self) {
        let phase = self.status.phase;
        let name = phase.map_or("Pending".to_owned(), |p| format!("{p:?}"));
        let degraded = self
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()));
        let invalid = degraded.as_ref().is_some_and(|(r, _)| r == "InvalidSpec");
        let stalled = invalid || matches!(phase, Some(Phase::Blocked | Phase::Failed));
        let reconciling = !stalled
            && matches!(
                phase,
                None | Some(
                    Phase::Deploying | Phase::Upgrading | Phase::RollingBack | Phase::Suspending
                )
            );
        let progress = self
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Progressing")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        let message = match &self.status.upgrade {
            Some(u) if reconciling => format!("{name}: stage {:?}", u.stage),
            _ if reconciling => format!("{name}: {progress}"),
            _ => String::new(),
        };
        self.condition("Reconciling", reconciling, &name, message);
        let (reason, message) = match degraded {
            Some((reason, message)) if stalled => (reason, message),
            _ => (name, String::new()),
        };
        self.condition("Stalled", stalled, &reason, message);
    }

    fn event(&mut self, warning: bool, reason: &str, message: impl Into<String>) {
        self.actions.push(Action::Event {
            warning,
            reason: reason.to_owned(),
            message: message.into(),
        });
    }

    fn deploy(&mut self, restore_from: Option<String>) {
        self.actions.push(Action::Deploy {
            spec: Box::new(self.spec.clone()),
            spec_hash: self.desired.clone(),
            restore_from,
        });
        self.status.running_spec_hash = Some(self.desired.clone());
    }

    fn start_stage(&mut self, stage: UpgradeStage) {
        let u = self.status.upgrade.get_or_insert_with(|| UpgradeStatus {
            stage,
            target_spec_hash: String::new(),
            trigger_id: None,
            savepoint: None,
            stage_started: String::new(),
            attempts: 0,
            last_error: None,
        });
        u.stage = stage;
        u.target_spec_hash = self.desired.clone();
        u.stage_started = rfc3339(self.obs.now_s);
        u.trigger_id = None;
    }

    fn stage_elapsed(&self) -> i64 {
        self.status
            .upgrade
            .as_ref()
            .and_then(|u| parse_time(&u.stage_started))
            .map(|t| self.obs.now_s - t)
            .unwrap_or(0)
    }

    fn newest_snapshot(&self) -> Option<String> {
        self.obs
            .latest_checkpoint
            .clone()
            .or_else(|| self.status.last_savepoint.as_ref().map(|s| s.path.clone()))
    }

    fn decide(&mut self) {
        // A job graph that cannot run: say which field, touch nothing.
        if let Err(e) = JobGraph::build(&self.spec.job, self.spec.parallelism) {
            self.status.phase = Some(if self.obs.engine == EngineObs::Absent {
                Phase::Failed
            } else {
                self.status.phase.unwrap_or(Phase::Running)
            });
            self.condition("Degraded", true, "InvalidSpec", format!("spec.job: {e}"));
            self.condition(
                "Progressing",
                false,
                "InvalidSpec",
                "the spec cannot be deployed",
            );
            self.event(true, "InvalidSpec", format!("spec.job: {e}"));
            self.requeue_ms = 300_000;
            return;
        }
        if let Some(stage) = self.status.upgrade.as_ref().map(|u| u.stage) {
            return self.continue_upgrade(stage);
        }
        match (&self.obs.engine, self.spec.state) {
            (EngineObs::Absent, DesiredState::Running) => self.first_deploy_or_resume(),
            (EngineObs::Absent, DesiredState::Suspended) => {
                self.status.phase = Some(Phase::Suspended);
                // Ready: what the spec asks for is reached (kstatus reads Ready=False as
                // still in progress, and a GitOps sync would wait for it).
                self.condition("Ready", true, "Suspended", "suspended by spec.state");
                self.condition("Progressing", false, "Suspended", "suspended");
                self.requeue_ms = 300_000;
            }
            (_, DesiredState::Suspended) => self.begin_suspend(),
            (engine, DesiredState::Running) => {
                let engine = engine.clone();
                self.steady(&engine)
            }
        }
    }

    fn first_deploy_or_resume(&mut self) {
        let restore = if self.status.phase == Some(Phase::Suspended) {
            self.status.last_savepoint.as_ref().map(|s| s.path.clone())
        } else {
            self.spec.restore_from.clone()
        };
        self.deploy(restore.clone());
        self.status.phase = Some(Phase::Deploying);
        self.condition(
            "Progressing",
            true,
            "Deploying",
            match &restore {
                Some(r) => format!("starting the engine from {r}"),
                None => "starting the engine".to_owned(),
            },
        );
        self.condition("Ready", false, "Deploying", "the engine is starting");
        self.requeue_ms = 250;
    }

    fn steady(&mut self, engine: &EngineObs) {
        let running_hash = engine.spec_hash().map(str::to_owned);
        let changed = running_hash.as_deref() != Some(self.desired.as_str());
        if changed && self.status.rejected_spec_hash.as_deref() == Some(self.desired.as_str()) {
            // This version already failed; keep the last stable one running. (One that ends or
            // breaks is looked after as below.)
            if let EngineObs::Running { job_id, .. } = engine {
                self.status.phase = Some(Phase::Blocked);
                self.status.job_id = Some(job_id.clone());
                self.requeue_ms = 60_000;
                return;
            }
        }
        if changed && matches!(engine, EngineObs::Running { .. }) {
            return self.begin_upgrade();
        }
        match engine {
            EngineObs::Running {
                job_id,
                restored_from,
                ..
            } => {
                self.status.phase = Some(Phase::Running);
                self.status.job_id = Some(job_id.clone());
                self.status.restored_from = restored_from.clone();
                if self.status.last_stable_spec_hash.as_deref() != Some(self.desired.as_str()) {
                    self.status.last_stable_spec = Some(Box::new(self.spec.clone()));
                    self.status.last_stable_spec_hash = Some(self.desired.clone());
                }
                self.condition("Ready", true, "Running", format!("job {job_id} is running"));
                self.condition("Progressing", false, "Stable", "nothing to roll out");
                if self.status.rejected_spec_hash.is_none() {
                    self.condition("Degraded", false, "Healthy", "");
                }
                self.policies();
            }
            EngineObs::Starting { .. } => {
                self.status.phase = Some(Phase::Deploying);
                self.requeue_ms = 250;
            }
            EngineObs::Ended { .. } => {
                // A job that ended on its own (bounded input): nothing to restart.
                self.status.phase = Some(Phase::Suspended);
                self.condition("Ready", true, "Ended", "the job has ended");
                self.requeue_ms = 60_000;
            }
            EngineObs::Broken { reason, .. } => {
                self.status.phase = Some(Phase::Failed);
                self.condition("Ready", false, "EngineFailing", reason.clone());
                self.condition("Degraded", true, "EngineFailing", reason.clone());
                self.requeue_ms = 15_000;
            }
            EngineObs::Absent => {}
        }
    }

    /// Manual and periodic savepoints, restarts, retention: only while steady.
    fn policies(&mut self) {
        let s = self.spec;
        if s.restart_nonce.is_some() && s.restart_nonce != self.status.observed_restart_nonce {
            self.status.observed_restart_nonce = s.restart_nonce;
            self.actions.push(Action::RestartEngine);
            self.event(
                false,
                "Restarting",
                "restartNonce changed: restarting the engine",
            );
            return;
        }
        match &self.obs.trigger {
            Some(TriggerObs::InProgress) => {
                self.requeue_ms = 250;
            }
            Some(TriggerObs::Completed { path }) => {
                let trigger =
                    if s.savepoint_trigger_nonce != self.status.observed_savepoint_trigger_nonce {
                        SavepointTrigger::Manual
                    } else {
                        SavepointTrigger::Periodic
                    };
                self.status.observed_savepoint_trigger_nonce = s.savepoint_trigger_nonce;
                self.record_savepoint(path, trigger);
                // Look again soon: retention then counts the new Savepoint object.
                self.requeue_ms = self.requeue_ms.min(1000);
            }
            Some(TriggerObs::Failed { cause }) => {
                self.status.observed_savepoint_trigger_nonce = s.savepoint_trigger_nonce;
                self.condition("Degraded", true, "SavepointFailed", cause.clone());
                self.event(true, "SavepointFailed", cause.clone());
            }
            None => {
                if s.savepoint_trigger_nonce.is_some()
                    && s.savepoint_trigger_nonce != self.status.observed_savepoint_trigger_nonce
                {
                    self.actions.push(Action::TriggerSavepoint {
                        trigger: SavepointTrigger::Manual,
                    });
                    self.requeue_ms = 250;
                } else if let Some(every) = s
                    .savepoints
                    .periodic
                    .as_deref()
                    .map(|p| seconds(p, 3600) as i64)
                {
                    let last = self
                        .status
                        .last_savepoint
                        .as_ref()
                        .and_then(|l| parse_time(&l.time))
                        .unwrap_or(0);
                    if self.obs.now_s - last >= every {
                        self.actions.push(Action::TriggerSavepoint {
                            trigger: SavepointTrigger::Periodic,
                        });
                        self.requeue_ms = 250;
                    } else {
                        self.requeue_ms = self
                            .requeue_ms
                            .min((last + every - self.obs.now_s).max(1) as u64 * 1000);
                    }
                }
            }
        }
        for name in retention(
            &self.obs.savepoints,
            s.savepoints.retention.max_count,
            s.savepoints
                .retention
                .max_age
                .as_deref()
                .map(|a| seconds(a, u64::MAX / 4) as i64),
            self.status.restored_from.as_deref(),
            self.obs.now_s,
        ) {
            self.actions.push(Action::DeleteSavepoint { name });
        }
    }

    fn begin_upgrade(&mut self) {
        self.status.phase = Some(Phase::Upgrading);
        self.condition(
            "Progressing",
            true,
            "Upgrading",
            format!("rolling out spec {}", self.desired),
        );
        match self.spec.upgrade.mode {
            UpgradeMode::Savepoint => {
                self.start_stage(UpgradeStage::Preflight);
                self.requeue_ms = 250;
                match self.newest_snapshot() {
                    Some(snapshot) => self.actions.push(Action::Preflight { snapshot }),
                    // Nothing to check against yet: wait for the running job's first checkpoint.
                    None => self.requeue_ms = 2,
                }
            }
            UpgradeMode::LastState => {
                let from = self.obs.latest_checkpoint.clone();
                self.start_stage(UpgradeStage::Verifying);
                if let Some(u) = self.status.upgrade.as_mut() {
                    u.savepoint = from.clone();
                }
                self.deploy(from);
                self.requeue_ms = 250;
            }
            UpgradeMode::Stateless => {
                self.start_stage(UpgradeStage::Verifying);
                self.deploy(None);
                self.requeue_ms = 250;
            }
        }
    }

    fn begin_suspend(&mut self) {
        match &self.obs.engine {
            EngineObs::Running { .. } => {
                self.status.phase = Some(Phase::Suspending);
                self.start_stage(UpgradeStage::Savepointing);
                self.actions.push(Action::StopWithSavepoint);
                self.condition(
                    "Progressing",
                    true,
                    "Suspending",
                    "stopping with a savepoint",
                );
                self.requeue_ms = 250;
            }
            _ => {
                // Not running: nothing to save. Suspended once the engine is observed gone.
                self.actions.push(Action::RemoveEngine);
                self.status.phase = Some(Phase::Suspending);
                self.requeue_ms = 250;
            }
        }
    }

    fn continue_upgrade(&mut self, stage: UpgradeStage) {
        let suspending = self.spec.state == DesiredState::Suspended;
        let target = self
            .status
            .upgrade
            .as_ref()
            .map(|u| u.target_spec_hash.clone())
            .unwrap_or_default();
        if target != self.desired && matches!(stage, UpgradeStage::Preflight) {
            // The spec changed again before anything was touched: start over.
            self.status.upgrade = None;
            return self.decide();
        }
        match stage {
            UpgradeStage::Preflight => match &self.obs.preflight {
                None => match self.newest_snapshot() {
                    Some(snapshot) => {
                        self.actions.push(Action::Preflight { snapshot });
                        self.requeue_ms = 250;
                    }
                    None if self.stage_elapsed()
                        >= seconds(&self.spec.upgrade.savepoint_timeout, 600) as i64 =>
                    {
                        // No checkpoint ever came (checkpointing off?): go on unchecked; a new
                        // version that cannot take the savepoint is rolled back from it.
                        self.event(
                            true,
                            "PreflightSkipped",
                            "the running job has no checkpoint or savepoint to check the new job graph against; stopping it with a savepoint unchecked",
                        );
                        self.start_stage(UpgradeStage::Savepointing);
                        self.actions.push(Action::StopWithSavepoint);
                        self.requeue_ms = 250;
                    }
                    None => {
                        self.condition(
                            "Progressing",
                            true,
                            "WaitingForCheckpoint",
                            "waiting for the running job's first checkpoint to check the new job graph against",
                        );
                        self.requeue_ms = 250;
                    }
                },
                Some(problems) if problems.is_empty() => {
                    self.start_stage(UpgradeStage::Savepointing);
                    self.actions.push(Action::StopWithSavepoint);
                    self.requeue_ms = 250;
                }
                Some(problems) => {
                    let msg = format!(
                        "the new job graph cannot take the running job's state: {}",
                        problems.join("; ")
                    );
                    self.status.upgrade = None;
                    self.status.rejected_spec_hash = Some(self.desired.clone());
                    self.status.phase = Some(Phase::Blocked);
                    self.condition("Degraded", true, "PreflightFailed", msg.clone());
                    self.condition(
                        "Progressing",
                        false,
                        "PreflightFailed",
                        "upgrade blocked; the running job is untouched",
                    );
                    self.event(true, "UpgradeBlocked", msg);
                    self.requeue_ms = 60_000;
                }
            },
            UpgradeStage::Savepointing => self.savepointing(suspending),
            UpgradeStage::Deploying | UpgradeStage::Verifying => self.verifying(),
            UpgradeStage::RollingBack => self.rolling_back(),
        }
    }

    fn savepointing(&mut self, suspending: bool) {
        let timeout = seconds(&self.spec.upgrade.savepoint_timeout, 600) as i64;
        let has_trigger = self
            .status
            .upgrade
            .as_ref()
            .is_some_and(|u| u.trigger_id.is_some());
        let outcome = match &self.obs.trigger {
            Some(TriggerObs::InProgress) if self.stage_elapsed() > timeout => Some(Err(format!(
                "the savepoint did not complete within {}",
                self.spec.upgrade.savepoint_timeout
            ))),
            Some(TriggerObs::InProgress) => None,
            Some(TriggerObs::Completed { path }) => Some(Ok(path.clone())),
            Some(TriggerObs::Failed { cause }) => Some(Err(cause.clone())),
            None if has_trigger => None,
            None => {
                // No trigger yet (or the operator restarted before recording it): ask again,
                // unless the backoff after a failure is still running.
                let attempts = self
                    .status
                    .upgrade
                    .as_ref()
                    .map(|u| u.attempts)
                    .unwrap_or(0);
                let backoff = (5i64 << attempts.min(6)).min(300);
                if attempts == 0 || self.stage_elapsed() >= backoff {
                    self.actions.push(Action::StopWithSavepoint);
                }
                self.requeue_ms = 250;
                return;
            }
        };
        match outcome {
            None => self.requeue_ms = 2,
            Some(Err(cause)) => {
                // The old job keeps running (a failed stop-with-savepoint leaves it running).
                let attempts = self
                    .status
                    .upgrade
                    .as_ref()
                    .map(|u| u.attempts + 1)
                    .unwrap_or(1);
                self.start_stage(UpgradeStage::Savepointing);
                if let Some(u) = self.status.upgrade.as_mut() {
                    u.attempts = attempts;
                    u.last_error = Some(cause.clone());
                }
                let msg = format!(
                    "savepoint failed (attempt {attempts}), the old job keeps running: {cause}"
                );
                self.condition("Degraded", true, "SavepointFailed", msg.clone());
                self.event(true, "SavepointFailed", msg);
                self.requeue_ms = (5u64 << attempts.min(6)).min(300) * 1000;
            }
            Some(Ok(path)) => {
                let trigger = if suspending {
                    SavepointTrigger::Suspend
                } else {
                    SavepointTrigger::Upgrade
                };
                self.record_savepoint(&path, trigger);
                if suspending {
                    // Suspended once the engine is observed gone (the status is written
                    // before the engine is removed).
                    self.status.upgrade = None;
                    self.actions.push(Action::RemoveEngine);
                    self.status.phase = Some(Phase::Suspending);
                    self.condition(
                        "Ready",
                        false,
                        "Suspending",
                        format!("stopped with savepoint {path}; removing the engine"),
                    );
                    self.requeue_ms = 250;
                    return;
                }
                self.start_stage(UpgradeStage::Verifying);
                if let Some(u) = self.status.upgrade.as_mut() {
                    u.savepoint = Some(path.clone());
                }
                self.deploy(Some(path.clone()));
                self.event(false, "Upgrading", format!("old version stopped with savepoint {path}; starting the new version from it"));
                self.requeue_ms = 250;
            }
        }
    }

    fn verifying(&mut self) {
        let timeout = seconds(&self.spec.upgrade.ready_timeout, 120) as i64;
        let savepoint = self
            .status
            .upgrade
            .as_ref()
            .and_then(|u| u.savepoint.clone());
        let target = self
            .status
            .upgrade
            .as_ref()
            .map(|u| u.target_spec_hash.clone())
            .unwrap_or_default();
        match &self.obs.engine {
            EngineObs::Running {
                spec_hash,
                job_id,
                restored_from,
            } if *spec_hash == target && (savepoint.is_none() || *restored_from == savepoint) => {
                self.status.upgrade = None;
                self.status.rejected_spec_hash = None;
                self.status.job_id = Some(job_id.clone());
                self.status.restored_from = restored_from.clone();
                self.status.last_stable_spec = Some(Box::new(self.spec.clone()));
                self.status.last_stable_spec_hash = Some(target.clone());
                self.status.phase = Some(Phase::Running);
                self.condition("Ready", true, "Running", format!("job {job_id} is running"));
                self.condition(
                    "Progressing",
                    false,
                    "UpgradeComplete",
                    format!("spec {target} is running"),
                );
                self.condition("Degraded", false, "Healthy", "");
                self.event(
                    false,
                    "UpgradeComplete",
                    match restored_from {
                        Some(r) => format!("spec {target} runs, restored from {r}"),
                        None => format!("spec {target} runs"),
                    },
                );
            }
            EngineObs::Broken { reason, .. } => {
                self.begin_rollback(format!("the new version fails: {reason}"))
            }
            _ if self.stage_elapsed() > timeout => self.begin_rollback(format!(
                "the new version did not run and restore within {}",
                self.spec.upgrade.ready_timeout
            )),
            _ => self.requeue_ms = 2,
        }
    }

    fn begin_rollback(&mut self, reason: String) {
        let savepoint = self
            .status
            .upgrade
            .as_ref()
            .and_then(|u| u.savepoint.clone());
        let target = self.desired.clone();
        self.status.rejected_spec_hash = Some(target);
        self.condition("Degraded", true, "UpgradeFailed", reason.clone());
        match (
            self.status.last_stable_spec.clone(),
            self.status.last_stable_spec_hash.clone(),
        ) {
            (Some(stable), Some(hash)) => {
                self.start_stage(UpgradeStage::RollingBack);
                if let Some(u) = self.status.upgrade.as_mut() {
                    u.target_spec_hash = hash.clone();
                    u.savepoint = savepoint.clone();
                }
                self.actions.push(Action::Deploy {
                    spec: stable,
                    spec_hash: hash.clone(),
                    restore_from: savepoint.clone(),
                });
                self.status.running_spec_hash = Some(hash);
                self.status.phase = Some(Phase::RollingBack);
                self.event(
                    true,
                    "RollingBack",
                    format!(
                        "{reason}; rolling back to the last stable spec from {}",
                        savepoint.unwrap_or_else(|| "no savepoint".into())
                    ),
                );
                self.requeue_ms = 250;
            }
            _ => {
                self.status.upgrade = None;
                self.status.phase = Some(Phase::Failed);
                self.event(
                    true,
                    "UpgradeFailed",
                    format!("{reason}; there is no stable spec to roll back to"),
                );
            }
        }
    }

    fn rolling_back(&mut self) {
        let target = self
            .status
            .upgrade
            .as_ref()
            .map(|u| u.target_spec_hash.clone())
            .unwrap_or_default();
        match &self.obs.engine {
            EngineObs::Running {
                spec_hash,
                job_id,
                restored_from,
            } if *spec_hash == target => {
                self.status.upgrade = None;
                self.status.job_id = Some(job_id.clone());
                self.status.restored_from = restored_from.clone();
                self.status.phase = Some(Phase::Running);
                self.condition(
                    "Ready",
                    true,
                    "RolledBack",
                    format!("job {job_id} runs the last stable spec"),
                );
                self.condition(
                    "Progressing",
                    false,
                    "RolledBack",
                    "the upgrade was rolled back",
                );
            }
            EngineObs::Broken { reason, .. } => {
                self.status.phase = Some(Phase::Failed);
                self.condition("Degraded", true, "RollbackFailing", reason.clone());
                self.requeue_ms = 15_000;
            }
            _ => self.requeue_ms = 2,
        }
    }
}

/// The Savepoint objects retention deletes: beyond the `max_count` newest, or older than
/// `max_age_s`; never the newest, never the one the running job restored from.
pub fn retention(
    savepoints: &[SavepointObs],
    max_count: u32,
    max_age_s: Option<i64>,
    restored_from: Option<&str>,
    now_s: i64,
) -> Vec<String> {
    let mut sorted: Vec<&SavepointObs> = savepoints.iter().collect();
    sorted.sort_by(|a, b| b.completed_s.cmp(&a.completed_s).then(b.name.cmp(&a.name)));
    let protected = |i: usize, sp: &SavepointObs| i == 0 || Some(sp.path.as_str()) == restored_from;
    // The protected ones count towards maxCount; the rest of it goes to the newest others.
    let protected_count = sorted
        .iter()
        .enumerate()
        .filter(|(i, sp)| protected(*i, sp))
        .count();
    let mut room = (max_count.max(1) as usize).saturating_sub(protected_count);
    let mut doomed = Vec::new();
    for (i, sp) in sorted.into_iter().enumerate() {
        if protected(i, sp) {
            continue;
        }
        let too_old = max_age_s.is_some_and(|age| now_s - sp.completed_s > age);
        if !too_old && room > 0 {
            room -= 1;
        } else {
            doomed.push(sp.name.clone());
        }
    }
    doomed
}

/// Why the files of a deleted Savepoint at `path` must stay for now, if they must: an upgrade
/// in flight starts the new version (or the rollback) from them; the engine was started from
/// them and has no checkpoint of its own yet (a restart would need them); or the job is
/// suspended and resumes from them.
pub fn disposal_blocker(
    path: &str,
    status: Option<&StatefulJobStatus>,
    engine: &EngineObs,
    engine_has_checkpoint: bool,
) -> Option<String> {
    let status = status?;
    let same = |p: &str| p.trim_end_matches('/') == path.trim_end_matches('/');
    if let Some(u) = &status.upgrade
        && u.savepoint.as_deref().is_some_and(same)
    {
        return Some(format!(
            "the upgrade in flight (stage {:?}) starts from {path}; its files are disposed once it no longer needs them",
            u.stage
        ));
    }
    let engine_may_restart = matches!(
        engine,
        EngineObs::Starting { .. } | EngineObs::Running { .. } | EngineObs::Broken { .. }
    );
    if engine_may_restart
        && status.restored_from.as_deref().is_some_and(same)
        && !engine_has_checkpoint
    {
        return Some(format!(
            "the running job was restored from {path} and has no checkpoint of its own yet; its files are disposed after the first one"
        ));
    }
    if *engine == EngineObs::Absent
        && status.phase == Some(Phase::Suspended)
        && status
            .last_savepoint
            .as_ref()
            .is_some_and(|s| same(&s.path))
    {
        return Some(format!(
            "the suspended job resumes from {path}; its files are disposed once it has resumed"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{SavepointRef, StatefulJobStatus};

    const T0: i64 = 1_800_000_000;

    #[test]
    fn a_deleted_savepoint_is_kept_while_an_upgrade_or_a_restart_needs_it() {
        let running = running(&spec_with(""), Some("/sp/a"));
        let mut st = StatefulJobStatus::default();
        assert_eq!(disposal_blocker("/sp/a", Some(&st), &running, false), None);
        assert_eq!(disposal_blocker("/sp/a", None, &running, false), None);
        st.upgrade = Some(UpgradeStatus {
            stage: UpgradeStage::RollingBack,
            target_spec_hash: "h".into(),
            trigger_id: None,
            savepoint: Some("/sp/a/".into()),
            stage_started: String::new(),
            attempts: 0,
            last_error: None,
        });
        let why = disposal_blocker("/sp/a", Some(&st), &EngineObs::Absent, true).unwrap();
        assert!(why.contains("RollingBack"), "{why}");
        assert_eq!(disposal_blocker("/sp/b", Some(&st), &running, false), None);
        // Restored from it: needed until the job's first checkpoint, or once it has ended.
        st.upgrade = None;
        st.restored_from = Some("/sp/a".into());
        assert!(disposal_blocker("/sp/a", Some(&st), &running, false).is_some());
        assert_eq!(disposal_blocker("/sp/a", Some(&st), &running, true), None);
        let ended = EngineObs::Ended {
            spec_hash: "h".into(),
        };
        assert_eq!(disposal_blocker("/sp/a", Some(&st), &ended, false), None);
        // Suspended: the resume starts from the last savepoint.
        st.phase = Some(Phase::Suspended);
        st.last_savepoint = Some(SavepointRef {
            name: "a".into(),
            path: "/sp/a".into(),
            time: String::new(),
        });
        assert!(disposal_blocker("/sp/a", Some(&st), &EngineObs::Absent, false).is_some());
        assert_eq!(disposal_blocker("/sp/a", Some(&st), &ended, false), None);
    }

    fn spec_with(extra_op: &str) -> StatefulJobSpec {
        let yaml = format!(
            "job:\n  name: clicks\n  operators:\n    - {{kind: generator, uid: src}}\n    - {{kind: keyBy, field: key}}\n    - {{kind: count, uid: counter}}\n{extra_op}    - {{kind: discardSink}}\nsavepoints:\n  dir: /sp\n"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn v1() -> StatefulJobSpec {
        spec_with("")
    }

    fn v2() -> StatefulJobSpec {
        spec_with("    - {kind: filter, expr: 'count > 1'}\n")
    }

    fn obs(engine: EngineObs) -> Observed {
        Observed {
            now_s: T0,
            engine,
            trigger: None,
            preflight: None,
            latest_checkpoint: None,
            savepoints: vec![],
        }
    }

    fn running(spec: &StatefulJobSpec, restored_from: Option<&str>) -> EngineObs {
        EngineObs::Running {
            spec_hash: spec_hash(spec),
            job_id: "a".repeat(32),
            restored_from: restored_from.map(str::to_owned),
        }
    }

    /// The status of a job that runs `spec` stably.
    fn stable(spec: &StatefulJobSpec) -> StatefulJobStatus {
        plan(
            spec,
            1,
            &StatefulJobStatus::default(),
            &obs(running(spec, None)),
        )
        .status
    }

    fn condition<'a>(s: &'a StatefulJobStatus, kind: &str) -> (&'a str, &'a str, &'a str) {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == kind)
            .unwrap_or_else(|| panic!("no {kind} condition"));
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    fn deploys(p: &Plan) -> Vec<(String, Option<String>)> {
        p.actions
            .iter()
            .filter_map(|a| match a {
                Action::Deploy {
                    spec_hash,
                    restore_from,
                    ..
                } => Some((spec_hash.clone(), restore_from.clone())),
                _ => None,
            })
            .collect()
    }

    fn engine_actions(p: &Plan) -> usize {
        p.actions
            .iter()
            .filter(|a| !matches!(a, Action::Event { .. }))
            .count()
    }

    #[test]
    fn first_deploy_with_and_without_restore_from() {
        let p = plan(
            &v1(),
            1,
            &StatefulJobStatus::default(),
            &obs(EngineObs::Absent),
        );
        assert_eq!(deploys(&p), vec![(spec_hash(&v1()), None)]);
        assert_eq!(p.status.phase, Some(Phase::Deploying));
        assert_eq!(p.status.observed_generation, Some(1));

        let mut s = v1();
        s.restore_from = Some("/sp/savepoint-1".into());
        let p = plan(
            &s,
            1,
            &StatefulJobStatus::default(),
            &obs(EngineObs::Absent),
        );
        assert_eq!(
            deploys(&p),
            vec![(spec_hash(&s), Some("/sp/savepoint-1".into()))]
        );
        assert!(
            condition(&p.status, "Progressing")
                .2
                .contains("/sp/savepoint-1")
        );
    }

    #[test]
    fn nothing_to_do_when_nothing_changed() {
        let status = stable(&v1());
        assert_eq!(status.phase, Some(Phase::Running));
        assert_eq!(status.last_stable_spec_hash, Some(spec_hash(&v1())));
        let p = plan(&v1(), 1, &status, &obs(running(&v1(), None)));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(condition(&p.status, "Ready").0, "True");
        assert_eq!(p.status, status, "a second look changes nothing");
    }

    #[test]
    fn without_a_snapshot_the_preflight_waits_for_the_first_checkpoint() {
        let status = stable(&v1());
        let mut o = obs(running(&v1(), None));
        o.latest_checkpoint = None;
        let p = plan(&v2(), 2, &status, &o);
        assert!(p.actions.is_empty(), "nothing stopped yet: {:?}", p.actions);
        assert_eq!(
            p.status.upgrade.as_ref().unwrap().stage,
            UpgradeStage::Preflight
        );
        let waiting = plan(&v2(), 2, &p.status, &o);
        assert!(waiting.actions.is_empty(), "{:?}", waiting.actions);
        assert_eq!(
            condition(&waiting.status, "Progressing").1,
            "WaitingForCheckpoint"
        );
        // The checkpoint arrives: it is checked.
        o.latest_checkpoint = Some("/chk/job/chk-1".into());
        let p2 = plan(&v2(), 2, &p.status, &o);
        assert_eq!(
            p2.actions,
            vec![Action::Preflight {
                snapshot: "/chk/job/chk-1".into()
            }]
        );
        // None ever comes: after the savepoint timeout it goes on, saying so.
        o.latest_checkpoint = None;
        o.now_s += 601;
        let p3 = plan(&v2(), 2, &p.status, &o);
        assert!(
            p3.actions.contains(&Action::StopWithSavepoint),
            "{:?}",
            p3.actions
        );
        assert!(
            p3.actions
                .iter()
                .any(|a| matches!(a, Action::Event { reason, .. } if reason == "PreflightSkipped"))
        );
    }

    #[test]
    fn invalid_spec_is_degraded_naming_the_field_and_touches_nothing() {
        let mut bad = v1();
        bad.job.operators.remove(1); // the count loses its keyBy
        let status = stable(&v1());
        let p = plan(&bad, 2, &status, &obs(running(&v1(), None)));
        assert_eq!(engine_actions(&p), 0);
        let (on, reason, msg) = condition(&p.status, "Degraded");
        assert_eq!((on, reason), ("True", "InvalidSpec"));
        assert!(
            msg.contains("operators[1] (count 'counter')") && msg.contains("keyBy"),
            "{msg}"
        );
        assert_eq!(
            p.status.phase,
            Some(Phase::Running),
            "the old job keeps running"
        );
    }

    /// Walks an upgrade from v1 to v2 through preflight and the savepoint.
    fn up_to_savepoint() -> (StatefulJobStatus, Plan) {
        let status = stable(&v1());
        let mut o = obs(running(&v1(), None));
        o.latest_checkpoint = Some("/chk/job/chk-7".into());
        let p = plan(&v2(), 2, &status, &o);
        assert_eq!(
            p.actions,
            vec![Action::Preflight {
                snapshot: "/chk/job/chk-7".into()
            }]
        );
        assert_eq!(
            p.status.upgrade.as_ref().unwrap().stage,
            UpgradeStage::Preflight
        );
        assert_eq!(p.status.phase, Some(Phase::Upgrading));
        o.preflight = Some(vec![]);
        let p2 = plan(&v2(), 2, &p.status, &o);
        assert_eq!(p2.actions, vec![Action::StopWithSavepoint]);
        assert_eq!(
            p2.status.upgrade.as_ref().unwrap().stage,
            UpgradeStage::Savepointing
        );
        (p2.status.clone(), p2)
    }

    #[test]
    fn savepoint_upgrade_happy_path() {
        let (mut status, _) = up_to_savepoint();
        status.upgrade.as_mut().unwrap().trigger_id = Some("t1".into());
        let mut o = obs(running(&v1(), None));
        o.trigger = Some(TriggerObs::InProgress);
        let p = plan(&v2(), 2, &status, &o);
        assert_eq!(engine_actions(&p), 0, "waits for the savepoint");

        o.trigger = Some(TriggerObs::Completed {
            path: "/sp/savepoint-aaaaaa-1".into(),
        });
        o.engine = EngineObs::Ended {
            spec_hash: spec_hash(&v1()),
        };
        let p = plan(&v2(), 2, &status, &o);
        assert!(p.actions.contains(&Action::RecordSavepoint {
            name: "savepoint-aaaaaa-1".into(),
            path: "/sp/savepoint-aaaaaa-1".into(),
            trigger: SavepointTrigger::Upgrade
        }));
        assert_eq!(
            deploys(&p),
            vec![(spec_hash(&v2()), Some("/sp/savepoint-aaaaaa-1".into()))]
        );
        assert_eq!(
            p.status.upgrade.as_ref().unwrap().stage,
            UpgradeStage::Verifying
        );
        assert_eq!(
            p.status.last_savepoint.as_ref().unwrap().path,
            "/sp/savepoint-aaaaaa-1"
        );

        // The new version runs and says it restored from that savepoint: done.
        let o = obs(running(&v2(), Some("/sp/savepoint-aaaaaa-1")));
        let done = plan(&v2(), 2, &p.status, &o);
        assert_eq!(done.status.upgrade, None);
        assert_eq!(done.status.phase, Some(Phase::Running));
        assert_eq!(done.status.last_stable_spec_hash, Some(spec_hash(&v2())));
        assert_eq!(
            done.status.restored_from.as_deref(),
            Some("/sp/savepoint-aaaaaa-1")
        );
        assert_eq!(condition(&done.status, "Progressing").1, "UpgradeComplete");
        assert_eq!(condition(&done.status, "Ready").0, "True");
    }

    #[test]
    fn running_but_not_restored_is_not_success() {
        let (mut status, _) = up_to_savepoint();
        status.upgrade.as_mut().unwrap().trigger_id = Some("t1".into());
        let mut o = obs(running(&v1(), None));
        o.trigger = Some(TriggerObs::Completed {
            path: "/sp/s1".into(),
        });
        let p = plan(&v2(), 2, &status, &o);
        let p = plan(&v2(), 2, &p.status, &obs(running(&v2(), None)));
        assert!(
            p.status.upgrade.is_some(),
            "a new version that did not restore is still being verified"
        );
    }

    #[test]
    fn preflight_failure_blocks_and_leaves_the_old_job_alone() {
        let status = stable(&v1());
        let mut o = obs(running(&v1(), None));
        o.latest_checkpoint = Some("/chk/c".into());
        let p = plan(&v2(), 2, &status, &o);
        o.preflight = Some(vec![
            "the savepoint holds state for an operator that the new job does not have: counter"
                .into(),
        ]);
        let p = plan(&v2(), 2, &p.status, &o);
        assert_eq!(engine_actions(&p), 0);
        assert_eq!(p.status.phase, Some(Phase::Blocked));
        let (on, reason, msg) = condition(&p.status, "Degraded");
        assert_eq!((on, reason), ("True", "PreflightFailed"));
        assert!(msg.contains("counter"), "{msg}");
        // kstatus: stalled (Failed), no longer reconciling.
        let (on, reason, msg) = condition(&p.status, "Stalled");
        assert_eq!((on, reason), ("True", "PreflightFailed"));
        assert!(msg.contains("counter"), "{msg}");
        assert_eq!(condition(&p.status, "Reconciling").0, "False");
        assert!(p.actions.iter().any(|a| matches!(a, Action::Event { warning: true, reason, .. } if reason == "UpgradeBlocked")));
        // Looking again changes nothing while the spec stays the same.
        o.preflight = None;
        let again = plan(&v2(), 2, &p.status, &o);
        assert_eq!(engine_actions(&again), 0);
        // allowNonRestoredState is a new spec: the upgrade is tried again.
        let mut allowed = v2();
        allowed.upgrade.allow_non_restored_state = true;
        let retry = plan(&allowed, 3, &again.status, &o);
        assert_eq!(
            retry.actions,
            vec![Action::Preflight {
                snapshot: "/chk/c".into()
            }]
        );
    }

    #[test]
    fn reconciling_while_rolling_out_and_not_when_running() {
        let p = plan(
            &v1(),
            1,
            &StatefulJobStatus::default(),
            &obs(EngineObs::Absent),
        );
        assert_eq!(condition(&p.status, "Reconciling").0, "True");
        assert_eq!(condition(&p.status, "Stalled").0, "False");
        let status = stable(&v1());
        let p = plan(&v1(), 1, &status, &obs(running(&v1(), None)));
        assert_eq!(p.status.phase, Some(Phase::Running));
        assert_eq!(condition(&p.status, "Reconciling").0, "False");
        assert_eq!(condition(&p.status, "Stalled").0, "False");
        let mut o = obs(running(&v1(), None));
        o.latest_checkpoint = Some("/chk/c".into());
        let p = plan(&v2(), 2, &status, &o);
        assert_eq!(p.status.phase, Some(Phase::Upgrading));
        let (on, reason, msg) = condition(&p.status, "Reconciling");
        assert_eq!((on, reason), ("True", "Upgrading"));
        assert!(msg.contains("Preflight"), "{msg}");
    }

    #[test]
    fn savepoint_failure_and_timeout_keep_the_old_job_and_retry_with_backoff() {
        let (mut status, _) = up_to_savepoint();
        status.upgrade.as_mut().unwrap().trigger_id = Some("t1".into());
        let mut o = obs(running(&v1(), None));
        o.trigger = Some(TriggerObs::Failed {
            cause: "the target is not writable: /sp".into(),
        });
        let p = plan(&v2(), 2, &status, &o);
        assert!(deploys(&p).is_empty());
        assert!(!p.actions.contains(&Action::RemoveEngine));
        let u = p.status.upgrade.as_ref().unwrap();
        assert_eq!(
            (u.stage, u.attempts, u.trigger_id.clone()),
            (UpgradeStage::Savepointing, 1, None)
        );
        assert!(condition(&p.status, "Degraded").2.contains("not writable"));
        assert!(p.requeue_ms >= 5000);
        // Within the backoff nothing is retried; after it, a new stop is asked for.
        let o2 = obs(running(&v1(), None));
        assert!(
            !plan(&v2(), 2, &p.status, &o2)
                .actions
                .contains(&Action::StopWithSavepoint)
        );
        let mut later = obs(running(&v1(), None));
        later.now_s = T0 + 20;
        assert!(
            plan(&v2(), 2, &p.status, &later)
                .actions
                .contains(&Action::StopWithSavepoint)
        );

        // A savepoint in progress past the timeout counts as failed.
        let mut o = obs(running(&v1(), None));
        o.trigger = Some(TriggerObs::InProgress);
        o.now_s = T0 + 601;
        let p = plan(&v2(), 2, &status, &o);
        assert!(
            condition(&p.status, "Degraded")
                .2
                .contains("did not complete within 10m")
        );
        assert!(deploys(&p).is_empty());
    }

    fn verifying_status() -> StatefulJobStatus {
        let (mut status, _) = up_to_savepoint();
        status.upgrade.as_mut().unwrap().trigger_id = Some("t1".into());
        let mut o = obs(running(&v1(), None));
        o.trigger = Some(TriggerObs::Completed {
            path: "/sp/s1".into(),
        });
        plan(&v2(), 2, &status, &o).status
    }

    #[test]
    fn a_failing_new_version_is_rolled_back_from_the_same_savepoint() {
        for engine in [
            EngineObs::Broken {
                spec_hash: spec_hash(&v2()),
                reason: "CrashLoopBackOff: exit code 1".into(),
            },
            EngineObs::Starting {
                spec_hash: spec_hash(&v2()),
            },
        ] {
            let status = verifying_status();
            let mut o = obs(engine.clone());
            if matches!(engine, EngineObs::Starting { .. }) {
                o.now_s = T0 + 121; // past readyTimeout (2m)
            }
            let p = plan(&v2(), 2, &status, &o);
            assert_eq!(
                deploys(&p),
                vec![(spec_hash(&v1()), Some("/sp/s1".into()))],
                "{engine:?}"
            );
            assert_eq!(p.status.phase, Some(Phase::RollingBack));
            assert_eq!(p.status.rejected_spec_hash, Some(spec_hash(&v2())));
            assert_eq!(condition(&p.status, "Degraded").1, "UpgradeFailed");

            // Back on v1: running, Degraded with the reason, and v2 is not retried.
            let back = plan(&v2(), 2, &p.status, &obs(running(&v1(), Some("/sp/s1"))));
            assert_eq!(back.status.upgrade, None);
            assert_eq!(back.status.phase, Some(Phase::Running));
            assert_eq!(condition(&back.status, "Degraded").0, "True");
            let again = plan(&v2(), 2, &back.status, &obs(running(&v1(), Some("/sp/s1"))));
            assert_eq!(engine_actions(&again), 0, "{:?}", again.actions);
            assert_eq!(again.status.phase, Some(Phase::Blocked));
        }
    }

    #[test]
    fn last_state_and_stateless_modes() {
        let status = stable(&v1());
        let mut o = obs(running(&v1(), None));
        o.latest_checkpoint = Some("/chk/chk-9".into());
        let mut s = v2();
        s.upgrade.mode = UpgradeMode::LastState;
        let p = plan(&s, 2, &status, &o);
        assert_eq!(
            deploys(&p),
            vec![(spec_hash(&s), Some("/chk/chk-9".into()))]
        );
        assert!(!p.actions.contains(&Action::StopWithSavepoint));
        let mut s = v2();
        s.upgrade.mode = UpgradeMode::Stateless;
        let p = plan(&s, 2, &status, &o);
        assert_eq!(deploys(&p), vec![(spec_hash(&s), None)]);
    }

    #[test]
    fn suspend_and_resume() {
        let status = stable(&v1());
        let mut s = v1();
        s.state = DesiredState::Suspended;
        let p = plan(&s, 2, &status, &obs(running(&v1(), None)));
        assert_eq!(p.actions, vec![Action::StopWithSavepoint]);
        assert_eq!(p.status.phase, Some(Phase::Suspending));
        let mut o = obs(EngineObs::Ended {
            spec_hash: spec_hash(&v1()),
        });
        o.trigger = Some(TriggerObs::Completed {
            path: "/sp/savepoint-s".into(),
        });
        let p = plan(&s, 2, &p.status, &o);
        assert!(p.actions.contains(&Action::RemoveEngine));
        assert_eq!(
            p.status.phase,
            Some(Phase::Suspending),
            "suspended only once the engine is gone"
        );
        let p = plan(&s, 2, &p.status, &obs(EngineObs::Absent));
        assert_eq!(engine_actions(&p), 0);
        assert_eq!(p.status.phase, Some(Phase::Suspended));
        // Back to running: from the suspend savepoint.
        let p = plan(&v1(), 3, &p.status, &obs(EngineObs::Absent));
        assert_eq!(
            deploys(&p),
            vec![(spec_hash(&v1()), Some("/sp/savepoint-s".into()))]
        );
    }

    #[test]
    fn manual_and_periodic_savepoints_and_restart_nonce() {
        let status = stable(&v1());
        let mut s = v1();
        s.savepoint_trigger_nonce = Some(1);
        let p = plan(&s, 2, &status, &obs(running(&v1(), None)));
        assert_eq!(
            p.actions,
            vec![Action::TriggerSavepoint {
                trigger: SavepointTrigger::Manual
            }]
        );
        let mut o = obs(running(&v1(), None));
        o.trigger = Some(TriggerObs::Completed {
            path: "/sp/savepoint-m".into(),
        });
        let p = plan(&s, 2, &p.status, &o);
        assert!(matches!(
            &p.actions[0],
            Action::RecordSavepoint {
                trigger: SavepointTrigger::Manual,
                ..
            }
        ));
        assert_eq!(p.status.observed_savepoint_trigger_nonce, Some(1));
        assert!(
            plan(&s, 2, &p.status, &obs(running(&v1(), None)))
                .actions
                .is_empty()
        );

        let mut s = v1();
        s.savepoints.periodic = Some("1h".into());
        let mut st = status.clone();
        st.last_savepoint = Some(SavepointRef {
            name: "x".into(),
            path: "/sp/x".into(),
            time: rfc3339(T0 - 3000),
        });
        let p = plan(&s, 2, &st, &obs(running(&v1(), None)));
        assert!(p.actions.is_empty());
        assert!(p.requeue_ms <= 600_000);
        let mut o = obs(running(&v1(), None));
        o.now_s = T0 + 601;
        assert_eq!(
            plan(&s, 2, &st, &o).actions,
            vec![Action::TriggerSavepoint {
                trigger: SavepointTrigger::Periodic
            }]
        );

        let mut s = v1();
        s.restart_nonce = Some(4);
        let p = plan(&s, 2, &status, &obs(running(&v1(), None)));
        assert_eq!(engine_actions(&p), 1);
        assert!(p.actions.contains(&Action::RestartEngine));
        assert_eq!(p.status.observed_restart_nonce, Some(4));
        assert!(
            !plan(&s, 2, &p.status, &obs(running(&v1(), None)))
                .actions
                .contains(&Action::RestartEngine)
        );
    }

    #[test]
    fn retention_keeps_the_newest_and_the_restored_one() {
        let sp = |n: i64| SavepointObs {
            name: format!("sp{n}"),
            path: format!("/sp/{n}"),
            completed_s: T0 - 1000 * (5 - n),
        };
        let all: Vec<_> = (1..=5).map(sp).collect();
        // maxCount 3: sp1 and sp2 go; when the job restored from sp1, it is one of the three.
        assert_eq!(
            retention(&all, 3, None, None, T0),
            vec!["sp2".to_owned(), "sp1".to_owned()]
        );
        assert_eq!(
            retention(&all, 3, None, Some("/sp/1"), T0),
            vec!["sp3".to_owned(), "sp2".to_owned()]
        );
        // maxAge 1500 s: everything older than sp4, but never the newest even if old.
        assert_eq!(
            retention(&all, 10, Some(1500), None, T0),
            vec!["sp3".to_owned(), "sp2".to_owned(), "sp1".to_owned()]
        );
        assert_eq!(
            retention(&all[..1], 1, Some(1), None, T0 + 100_000),
            Vec::<String>::new()
        );
        // Through the planner, while steady.
        let mut s = v1();
        s.savepoints.retention.max_count = 3;
        let mut o = obs(running(&v1(), Some("/sp/1")));
        o.savepoints = all;
        let p = plan(&s, 1, &stable(&v1()), &o);
        assert_eq!(
            p.actions,
            vec![
                Action::DeleteSavepoint { name: "sp3".into() },
                Action::DeleteSavepoint { name: "sp2".into() }
            ]
        );
    }

    #[test]
    fn an_operator_restart_mid_upgrade_resumes_the_stage() {
        // Status as written just before the restart: savepointing, trigger recorded.
        let (mut status, _) = up_to_savepoint();
        status.upgrade.as_mut().unwrap().trigger_id = Some("t1".into());
        let status: StatefulJobStatus =
            serde_json::from_value(serde_json::to_value(&status).unwrap()).unwrap();
        let mut o = obs(EngineObs::Ended {
            spec_hash: spec_hash(&v1()),
        });
        o.trigger = Some(TriggerObs::Completed {
            path: "/sp/s9".into(),
        });
        let p = plan(&v2(), 2, &status, &o);
        assert_eq!(deploys(&p), vec![(spec_hash(&v2()), Some("/sp/s9".into()))]);
        // Restarted before the trigger id was recorded: it asks for the stop again.
        let (status, _) = up_to_savepoint();
        let p = plan(&v2(), 2, &status, &obs(running(&v1(), None)));
        assert_eq!(p.actions, vec![Action::StopWithSavepoint]);
        // Restarted after deploying: verification goes on.
        let p = plan(
            &v2(),
            2,
            &verifying_status(),
            &obs(EngineObs::Starting {
                spec_hash: spec_hash(&v2()),
            }),
        );
        assert_eq!(engine_actions(&p), 0);
        assert_eq!(
            p.status.upgrade.as_ref().unwrap().stage,
            UpgradeStage::Verifying
        );
    }

    #[test]
    fn spec_hash_ignores_policy_fields() {
        let mut s = v1();
        let h = spec_hash(&s);
        s.savepoint_trigger_nonce = Some(9);
        s.savepoints.retention.max_count = 1;
        s.restart_nonce = Some(2);
        assert_eq!(spec_hash(&s), h);
        s.parallelism = Some(4);
        assert_ne!(spec_hash(&s), h);
        assert_eq!(
            savepoint_name("/a/b/savepoint-1a2b3c-ffee00/"),
            "savepoint-1a2b3c-ffee00"
        );
    }
}
