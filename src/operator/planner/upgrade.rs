//! The stages of an upgrade (and of a suspend, which is an upgrade to nothing): preflight,
//! savepoint, verification of the new version, rollback.

use super::{Action, ConditionType, EngineObs, Planner, Reason, TriggerObs, seconds};
use crate::operator::crd::{
    DesiredState, Phase, SavepointTrigger, UpgradeMode, UpgradeStage, UpgradeStrategy,
};

/// For how long into the savepoint stage it is looked at every `FAST_SAVEPOINT_POLL_MS`.
const FAST_SAVEPOINT_POLL_S: i64 = 3;
const FAST_SAVEPOINT_POLL_MS: u64 = 25;

impl Planner<'_> {
    pub(super) fn begin_upgrade(&mut self) {
        self.status.phase = Some(Phase::Upgrading);
        self.condition(
            ConditionType::Progressing,
            true,
            Reason::Upgrading,
            format!("rolling out spec {}", self.desired),
        );
        match self.spec.upgrade.mode {
            UpgradeMode::Savepoint => {
                self.start_stage(UpgradeStage::Preflight);
                let blue_green = self.spec.upgrade.strategy == UpgradeStrategy::BlueGreen;
                if let Some(u) = self.status.upgrade.as_mut() {
                    u.blue_green = blue_green;
                }
                self.requeue_ms = 250;
                match self.newest_snapshot() {
                    Some(snapshot) => self.actions.push(Action::Preflight { snapshot }),
                    // Nothing to check against yet: wait for the running job's first checkpoint.
                    None => self.requeue_ms = 250,
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

    pub(super) fn begin_suspend(&mut self) {
        match &self.obs.engine {
            EngineObs::Running { .. } => {
                self.status.phase = Some(Phase::Suspending);
                self.start_stage(UpgradeStage::Savepointing);
                self.stop_with_savepoint();
                self.condition(
                    ConditionType::Progressing,
                    true,
                    Reason::Suspending,
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

    pub(super) fn continue_upgrade(&mut self, stage: UpgradeStage) {
        let suspending = self.spec.state == DesiredState::Suspended;
        let target = self.upgrade_target();
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
                            Reason::PreflightSkipped,
                            "the running job has no checkpoint or savepoint to check the new job graph against; stopping it with a savepoint unchecked",
                        );
                        self.start_stage(UpgradeStage::Savepointing);
                        self.ask_upgrade_savepoint();
                        self.requeue_ms = 250;
                    }
                    None => {
                        self.condition(
                            ConditionType::Progressing,
                            true,
                            Reason::WaitingForCheckpoint,
                            "waiting for the running job's first checkpoint to check the new job graph against",
                        );
                        self.requeue_ms = 250;
                    }
                },
                Some(problems) if problems.is_empty() => {
                    self.start_stage(UpgradeStage::Savepointing);
                    self.ask_upgrade_savepoint();
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
                    self.condition(
                        ConditionType::Degraded,
                        true,
                        Reason::PreflightFailed,
                        msg.clone(),
                    );
                    self.condition(
                        ConditionType::Progressing,
                        false,
                        Reason::PreflightFailed,
                        "upgrade blocked; the running job is untouched",
                    );
                    self.event(true, Reason::UpgradeBlocked, msg);
                    self.requeue_ms = 60_000;
                }
            },
            UpgradeStage::Savepointing => self.savepointing(suspending),
            UpgradeStage::Deploying
            | UpgradeStage::Verifying
            | UpgradeStage::CatchingUp
            | UpgradeStage::Switching
                if self.is_blue_green() =>
            {
                self.continue_blue_green(stage)
            }
            UpgradeStage::Deploying | UpgradeStage::Verifying => self.verifying(),
            UpgradeStage::CatchingUp | UpgradeStage::Switching => {
                // Only blue-green upgrades have these stages.
                self.status.upgrade = None;
                self.requeue_ms = 250;
            }
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
                    if suspending {
                        self.stop_with_savepoint();
                    } else {
                        self.ask_upgrade_savepoint();
                    }
                }
                self.requeue_ms = self.savepoint_poll_ms();
                return;
            }
        };
        match outcome {
            None => {
                self.requeue_ms = self.savepoint_poll_ms();
                self.watch_trigger = has_trigger && self.stage_elapsed() < FAST_SAVEPOINT_POLL_S;
            }
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
                self.condition(
                    ConditionType::Degraded,
                    true,
                    Reason::SavepointFailed,
                    msg.clone(),
                );
                self.event(true, Reason::SavepointFailed, msg);
                self.requeue_ms = (5u64 << attempts.min(6)).min(300) * 1000;
            }
            Some(Ok(path)) if !suspending && self.is_blue_green() => self.start_candidate(&path),
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
                        ConditionType::Ready,
                        false,
                        Reason::Suspending,
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
                self.event(false, Reason::Upgrading, format!("old version stopped with savepoint {path}; starting the new version from it"));
                self.requeue_ms = 250;
            }
        }
    }

    /// How soon to look at a savepoint in flight again. The job is stopped (or, blue-green,
    /// the candidate waits) until the operator sees it complete, so for the first seconds,
    /// when small and medium states complete, it looks often; then every 250 ms.
    fn savepoint_poll_ms(&self) -> u64 {
        if self.stage_elapsed() < FAST_SAVEPOINT_POLL_S {
            FAST_SAVEPOINT_POLL_MS
        } else {
            250
        }
    }

    /// The savepoint the upgrade in flight starts the new version from.
    pub(super) fn upgrade_savepoint_path(&self) -> Option<String> {
        self.status
            .upgrade
            .as_ref()
            .and_then(|u| u.savepoint.clone())
    }

    /// The spec hash the upgrade in flight rolls out.
    pub(super) fn upgrade_target(&self) -> String {
        self.status
            .upgrade
            .as_ref()
            .map(|u| u.target_spec_hash.clone())
            .unwrap_or_default()
    }

    /// Whether the upgrade in flight is blue-green.
    pub(super) fn is_blue_green(&self) -> bool {
        self.status.upgrade.as_ref().is_some_and(|u| u.blue_green)
    }

    /// Asks for the savepoint an upgrade takes: blue-green keeps the old version running.
    fn ask_upgrade_savepoint(&mut self) {
        if self.is_blue_green() {
            self.savepoint_live();
        } else {
            self.stop_with_savepoint();
        }
    }

    fn verifying(&mut self) {
        let timeout = seconds(&self.spec.upgrade.ready_timeout, 120) as i64;
        let savepoint = self.upgrade_savepoint_path();
        let target = self.upgrade_target();
        match &self.obs.engine {
            EngineObs::Running {
                spec_hash,
                job_id,
                restored_from,
            } if *spec_hash == target && (savepoint.is_none() || *restored_from == savepoint) => {
                let event = match restored_from {
                    Some(r) => format!("spec {target} runs, restored from {r}"),
                    None => format!("spec {target} runs"),
                };
                let running = format!("job {job_id} is running");
                let (job_id, restored_from) = (Some(job_id.clone()), restored_from.clone());
                self.upgrade_done(&target, job_id, restored_from, running, event);
            }
            EngineObs::Broken { reason, .. } => {
                self.begin_rollback(format!("the new version fails: {reason}"))
            }
            _ if self.stage_elapsed() > timeout => self.begin_rollback(format!(
                "the new version did not run and restore within {}",
                self.spec.upgrade.ready_timeout
            )),
            _ => self.requeue_ms = 250,
        }
    }

    /// The new version runs (restored): it is the stable one now and the upgrade ends.
    pub(super) fn upgrade_done(
        &mut self,
        target: &str,
        job_id: Option<String>,
        restored_from: Option<String>,
        running: String,
        event: String,
    ) {
        self.status.upgrade = None;
        self.status.rejected_spec_hash = None;
        self.status.job_id = job_id;
        self.status.restored_from = restored_from;
        self.status.last_stable_spec = Some(Box::new(self.spec.clone()));
        self.status.last_stable_spec_hash = Some(target.to_owned());
        self.status.phase = Some(Phase::Running);
        self.condition(ConditionType::Ready, true, Reason::Running, running);
        self.condition(
            ConditionType::Progressing,
            false,
            Reason::UpgradeComplete,
            format!("spec {target} is running"),
        );
        self.condition(ConditionType::Degraded, false, Reason::Healthy, "");
        self.event(false, Reason::UpgradeComplete, event);
    }

    fn begin_rollback(&mut self, reason: String) {
        let savepoint = self.upgrade_savepoint_path();
        let target = self.desired.clone();
        self.status.rejected_spec_hash = Some(target);
        self.condition(
            ConditionType::Degraded,
            true,
            Reason::UpgradeFailed,
            reason.clone(),
        );
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
                    Reason::RollingBack,
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
                    Reason::UpgradeFailed,
                    format!("{reason}; there is no stable spec to roll back to"),
                );
            }
        }
    }

    fn rolling_back(&mut self) {
        let target = self.upgrade_target();
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
                    ConditionType::Ready,
                    true,
                    Reason::RolledBack,
                    format!("job {job_id} runs the last stable spec"),
                );
                self.condition(
                    ConditionType::Progressing,
                    false,
                    Reason::RolledBack,
                    "the upgrade was rolled back",
                );
            }
            EngineObs::Broken { reason, .. } => {
                self.status.phase = Some(Phase::Failed);
                self.condition(
                    ConditionType::Degraded,
                    true,
                    Reason::RollbackFailing,
                    reason.clone(),
                );
                self.requeue_ms = 15_000;
            }
            _ => self.requeue_ms = 250,
        }
    }
}
