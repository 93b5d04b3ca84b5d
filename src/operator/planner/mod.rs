//! The upgrade planner: a pure function from (spec, status, observations) to the next actions
//! and the new status. Every branch of a deploy, upgrade, rollback, suspend and savepoint
//! policy is decided here and tested without I/O; the controller only observes and acts.
//!
//! The planner is re-entrant: all progress lives in the status (stage, trigger id, savepoint),
//! so an operator restarted in the middle of an upgrade picks it up where it was.

use super::crd::{
    Color, CutOverPosition, DesiredState, PendingSavepoint, Phase, SavepointTrigger,
    StatefulJobSpec, StatefulJobStatus, UpgradeStage, UpgradeStatus,
};
use crate::engine::graph::JobGraph;
pub use conditions::{ConditionType, Reason};
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

/// An engine's sources, as a blue-green switch needs them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourcesObs {
    /// Every source subtask holds at the newest hold's bound (or is out of input).
    pub holding: bool,
    /// Its sinks write nothing until a cut-over.
    pub shadow: bool,
    pub positions: Vec<CutOverPosition>,
    /// Splits already past the newest hold's bound.
    pub overrun: Vec<String>,
}

/// Everything the controller observed, besides the StatefulJob itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// Seconds since the epoch.
    pub now_s: i64,
    /// The live engine.
    pub engine: EngineObs,
    /// Blue-green: the candidate engine (the color not live).
    pub candidate: EngineObs,
    /// Blue-green, while catching up and switching: the sources of the live engine and of
    /// the candidate.
    pub live_sources: Option<SourcesObs>,
    pub candidate_sources: Option<SourcesObs>,
    /// The trigger in `status.upgrade.triggerId`, or the pending manual/periodic one.
    pub trigger: Option<TriggerObs>,
    /// When a preflight was asked for: the problems found (empty: it restores).
    pub preflight: Option<Vec<String>>,
    /// The newest completed checkpoint of the running job.
    pub latest_checkpoint: Option<String>,
    pub savepoints: Vec<SavepointObs>,
    /// Why the running job's sources cannot read now (e.g. Kafka brokers unreachable), while
    /// they retry.
    pub source_problems: Vec<String>,
    /// The id a savepoint this plan asks for goes by (32 hex digits, new each reconcile). The
    /// plan keeps it in the status, which is written before the engine is asked: a request
    /// whose answer or status write is lost is then polled by its id, not asked for again
    /// (a second savepoint no Savepoint object records, whose files retention never deletes).
    pub new_trigger_id: String,
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
    /// Blue-green: start the candidate engine for this spec from the savepoint, in shadow
    /// mode (its sinks write nothing until the cut-over).
    DeployCandidate {
        spec: Box<StatefulJobSpec>,
        spec_hash: String,
        restore_from: String,
        color: Color,
    },
    /// Blue-green: delete the engine of this color.
    RemoveColor { color: Color },
    /// Take a savepoint of the live job without stopping it, under `trigger_id` (kept in
    /// `status.upgrade.triggerId`).
    SavepointLive { trigger_id: String },
    /// Hold the sources of the live engine (or the candidate) at `at` (None: where they are).
    HoldSources {
        candidate: bool,
        at: Option<Vec<CutOverPosition>>,
    },
    /// Let the sources of the live engine (or the candidate) read on; `cut_over` first sends
    /// the cut-over marker (the candidate's sinks write from it on).
    ReleaseSources { candidate: bool, cut_over: bool },
    /// Blue-green: the REST Service selects the engine of this color.
    Serve { color: Color },
    /// Restart the engine's pods (they resume from their newest checkpoint).
    RestartEngine,
    /// Check the desired job graph against this snapshot; the result comes back as
    /// `Observed::preflight`.
    Preflight { snapshot: String },
    /// Stop the job with a savepoint, under `trigger_id` (kept in `status.upgrade.triggerId`).
    StopWithSavepoint { trigger_id: String },
    /// Take a savepoint while the job runs, under `trigger_id` (kept in
    /// `status.pendingSavepoint`).
    TriggerSavepoint {
        trigger: SavepointTrigger,
        trigger_id: String,
    },
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
        reason: Reason,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: StatefulJobStatus,
    /// Look again after this many milliseconds.
    pub requeue_ms: u64,
    /// The savepoint in flight is downtime (an upgrade's stopped job waits on it): the
    /// controller may watch it closely for a moment rather than wait for the next look.
    pub watch_trigger: bool,
}

impl Plan {
    /// Whether the plan asks for a preflight check (which only reads, so a controller may do
    /// it at once and plan again with its result).
    pub fn asks_preflight(&self) -> bool {
        self.actions
            .iter()
            .any(|a| matches!(a, Action::Preflight { .. }))
    }

    /// This plan followed by `next`, planned from this plan's status: the actions of both
    /// (this one's preflight done), `next`'s status and requeue.
    pub fn then(self, next: Plan) -> Plan {
        let mut actions: Vec<Action> = self
            .actions
            .into_iter()
            .filter(|a| !matches!(a, Action::Preflight { .. }))
            .collect();
        actions.extend(next.actions);
        Plan { actions, ..next }
    }
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
    watch_trigger: bool,
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
        watch_trigger: false,
    };
    p.status.observed_generation = Some(generation);
    p.decide();
    p.summarize();
    Plan {
        actions: p.actions,
        status: p.status,
        requeue_ms: p.requeue_ms,
        watch_trigger: p.watch_trigger,
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

    fn condition(
        &mut self,
        kind: ConditionType,
        on: bool,
        reason: Reason,
        message: impl Into<String>,
    ) {
        self.condition_named(kind, on, reason.as_str(), message);
    }

    /// A condition whose reason is not one of ours (kstatus's carry the phase's name).
    fn condition_named(
        &mut self,
        kind: ConditionType,
        on: bool,
        reason: &str,
        message: impl Into<String>,
    ) {
        set_condition(
            &mut self.status.conditions,
            kind.as_str(),
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
            .find(|c| c.type_ == ConditionType::Degraded.as_str() && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()));
        let invalid = degraded
            .as_ref()
            .is_some_and(|(r, _)| r == Reason::InvalidSpec.as_str());
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
            .find(|c| c.type_ == ConditionType::Progressing.as_str())
            .map(|c| c.message.clone())
            .unwrap_or_default();
        let message = match &self.status.upgrade {
            Some(u) if reconciling => format!("{name}: stage {:?}", u.stage),
            _ if reconciling => format!("{name}: {progress}"),
            _ => String::new(),
        };
        self.condition_named(ConditionType::Reconciling, reconciling, &name, message);
        let (reason, message) = match degraded {
            Some((reason, message)) if stalled => (reason, message),
            _ => (name, String::new()),
        };
        self.condition_named(ConditionType::Stalled, stalled, &reason, message);
    }

    fn event(&mut self, warning: bool, reason: Reason, message: impl Into<String>) {
        self.actions.push(Action::Event {
            warning,
            reason,
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
            blue_green: false,
            cut_over: None,
        });
        u.stage = stage;
        u.target_spec_hash = self.desired.clone();
        u.stage_started = rfc3339(self.obs.now_s);
        u.trigger_id = None;
    }

    /// Stops the job with a savepoint under this reconcile's trigger id, kept in the upgrade's
    /// status (see `Observed::new_trigger_id`).
    fn stop_with_savepoint(&mut self) {
        let trigger_id = self.upgrade_trigger_id();
        self.actions.push(Action::StopWithSavepoint { trigger_id });
    }

    /// Blue-green's savepoint of the live job, which keeps running; like `stop_with_savepoint`.
    fn savepoint_live(&mut self) {
        let trigger_id = self.upgrade_trigger_id();
        self.actions.push(Action::SavepointLive { trigger_id });
    }

    fn upgrade_trigger_id(&mut self) -> String {
        let id = self.obs.new_trigger_id.clone();
        if let Some(u) = self.status.upgrade.as_mut() {
            u.trigger_id = Some(id.clone());
        }
        id
    }

    /// A manual or periodic savepoint of the running job, pending in the status under this
    /// reconcile's trigger id before it is asked for.
    fn trigger_savepoint(&mut self, trigger: SavepointTrigger) {
        let trigger_id = self.obs.new_trigger_id.clone();
        self.status.pending_savepoint = Some(PendingSavepoint {
            trigger_id: trigger_id.clone(),
            trigger,
            started: rfc3339(self.obs.now_s),
        });
        self.actions.push(Action::TriggerSavepoint {
            trigger,
            trigger_id,
        });
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
            self.condition(
                ConditionType::Degraded,
                true,
                Reason::InvalidSpec,
                format!("spec.job: {e}"),
            );
            self.condition(
                ConditionType::Progressing,
                false,
                Reason::InvalidSpec,
                "the spec cannot be deployed",
            );
            self.event(true, Reason::InvalidSpec, format!("spec.job: {e}"));
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
                self.condition(
                    ConditionType::Ready,
                    true,
                    Reason::Suspended,
                    "suspended by spec.state",
                );
                self.condition(
                    ConditionType::Progressing,
                    false,
                    Reason::Suspended,
                    "suspended",
                );
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
            ConditionType::Progressing,
            true,
            Reason::Deploying,
            match &restore {
                Some(r) => format!("starting the engine from {r}"),
                None => "starting the engine".to_owned(),
            },
        );
        self.condition(
            ConditionType::Ready,
            false,
            Reason::Deploying,
            "the engine is starting",
        );
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
                self.condition(
                    ConditionType::Ready,
                    true,
                    Reason::Running,
                    format!("job {job_id} is running"),
                );
                self.condition(
                    ConditionType::Progressing,
                    false,
                    Reason::Stable,
                    "nothing to roll out",
                );
                if self.status.rejected_spec_hash.is_some() {
                } else if self.obs.source_problems.is_empty() {
                    self.condition(ConditionType::Degraded, false, Reason::Healthy, "");
                } else {
                    // Running and keeping its state, but not reading: say why, and look again
                    // soon so the condition clears when the source reads again.
                    let why = self.obs.source_problems.join("; ");
                    self.condition(
                        ConditionType::Degraded,
                        true,
                        Reason::SourceUnavailable,
                        why,
                    );
                    self.requeue_ms = self.requeue_ms.min(5_000);
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
                self.condition(
                    ConditionType::Ready,
                    true,
                    Reason::Ended,
                    "the job has ended",
                );
                self.requeue_ms = 60_000;
            }
            EngineObs::Broken { reason, .. } => {
                self.status.phase = Some(Phase::Failed);
                self.condition(
                    ConditionType::Ready,
                    false,
                    Reason::EngineFailing,
                    reason.clone(),
                );
                self.condition(
                    ConditionType::Degraded,
                    true,
                    Reason::EngineFailing,
                    reason.clone(),
                );
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
                Reason::Restarting,
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
                self.condition(
                    ConditionType::Degraded,
                    true,
                    Reason::SavepointFailed,
                    cause.clone(),
                );
                self.event(true, Reason::SavepointFailed, cause.clone());
            }
            None if self.status.pending_savepoint.is_some() => {
                // Asked for, its outcome not known for now (the engine did not answer): asking
                // again would take a second savepoint and lose the first.
                self.requeue_ms = self.requeue_ms.min(1000);
            }
            None => {
                if s.savepoint_trigger_nonce.is_some()
                    && s.savepoint_trigger_nonce != self.status.observed_savepoint_trigger_nonce
                {
                    self.trigger_savepoint(SavepointTrigger::Manual);
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
                        self.trigger_savepoint(SavepointTrigger::Periodic);
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
}

mod blue_green;
mod conditions;
mod savepoints;
#[cfg(test)]
mod tests;
mod upgrade;

pub use savepoints::{
    DeletedSavepoint, RequestObs, SavepointDecision, SavepointNeed, disposal_blocker,
    disposal_needs_engine, retention, savepoint_decision, savepoint_need,
};
