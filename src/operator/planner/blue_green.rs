//! Blue-green upgrades: the new version (the candidate) starts beside the live one from a
//! savepoint taken without stopping it, catches up with its output held back, and takes over
//! at a source position both agree on (the engine's cut-over, README "Cut-over"): the live
//! version writes what comes from inputs before it and stops there with a savepoint, the
//! candidate writes from it on. A candidate that fails before the switch is deleted; the live
//! version was never stopped.

use super::{Action, ConditionType, EngineObs, Planner, Reason, seconds};
use crate::operator::crd::{
    CandidateStatus, CutOverPosition, Phase, Promotion, SavepointTrigger, UpgradeStage,
};

/// How long a hold may go unanswered before it is sent again (an operator restarted between
/// writing the stage and sending it).
const RESEND_HOLD_S: i64 = 5;

/// Per split, the further of two positions.
pub fn furthest(a: &[CutOverPosition], b: &[CutOverPosition]) -> Vec<CutOverPosition> {
    let mut at: std::collections::BTreeMap<&str, i64> =
        a.iter().map(|p| (p.split.as_str(), p.position)).collect();
    for p in b {
        let e = at.entry(p.split.as_str()).or_insert(p.position);
        *e = (*e).max(p.position);
    }
    at.into_iter()
        .map(|(split, position)| CutOverPosition {
            split: split.to_owned(),
            position,
        })
        .collect()
}

/// How far `behind` is behind `ahead`: the largest gap of any split. (Not the sum: a
/// generator's positions are record indexes of the whole source, so each split's gap is
/// already the source's.)
pub fn lag(ahead: &[CutOverPosition], behind: &[CutOverPosition]) -> i64 {
    ahead
        .iter()
        .map(|a| {
            let b = behind
                .iter()
                .find(|b| b.split == a.split)
                .map_or(0, |b| b.position);
            (a.position - b).max(0)
        })
        .max()
        .unwrap_or(0)
}

fn same_positions(a: &[CutOverPosition], b: &[CutOverPosition]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_by(|x, y| x.split.cmp(&y.split));
    b.sort_by(|x, y| x.split.cmp(&y.split));
    a == b
}

impl Planner<'_> {
    fn candidate_color(&self) -> crate::operator::crd::Color {
        self.status.live.unwrap_or_default().other()
    }

    /// The savepoint of the live job is there: start the candidate from it.
    pub(super) fn start_candidate(&mut self, path: &str) {
        self.record_savepoint(path, SavepointTrigger::Upgrade);
        self.start_stage(UpgradeStage::Verifying);
        if let Some(u) = self.status.upgrade.as_mut() {
            u.savepoint = Some(path.to_owned());
        }
        let color = self.candidate_color();
        self.status.candidate = Some(CandidateStatus {
            color,
            job_id: None,
            lag: None,
        });
        self.actions.push(Action::DeployCandidate {
            spec: Box::new(self.spec.clone()),
            spec_hash: self.desired.clone(),
            restore_from: path.to_owned(),
            color,
        });
        self.event(
            false,
            Reason::Upgrading,
            format!(
                "savepoint {path} taken while the live version runs; starting the new version ({}) from it beside it",
                color.as_str()
            ),
        );
        self.requeue_ms = 250;
    }

    /// Blue-green stages after the savepoint.
    pub(super) fn continue_blue_green(&mut self, stage: UpgradeStage) {
        if let EngineObs::Broken { reason, .. } = &self.obs.candidate {
            return self.abandon_switch(format!("the new version fails: {reason}"));
        }
        let stopping_at_cut_over = stage == UpgradeStage::Switching
            && self
                .status
                .upgrade
                .as_ref()
                .is_some_and(|u| u.trigger_id.is_some());
        if matches!(self.obs.engine, EngineObs::Ended { .. }) && !stopping_at_cut_over {
            return self.live_finished();
        }
        match stage {
            UpgradeStage::Deploying | UpgradeStage::Verifying => self.candidate_starting(),
            UpgradeStage::CatchingUp => self.catching_up(),
            UpgradeStage::Switching => self.switching(),
            _ => {}
        }
    }

    fn catch_up_timeout(&self) -> i64 {
        seconds(&self.spec.upgrade.blue_green.catch_up_timeout, 600) as i64
    }

    fn candidate_starting(&mut self) {
        let savepoint = self.upgrade_savepoint_path();
        let target = self.upgrade_target();
        match &self.obs.candidate {
            EngineObs::Running {
                spec_hash,
                job_id,
                restored_from,
            } if *spec_hash == target && *restored_from == savepoint => {
                if let Some(c) = self.status.candidate.as_mut() {
                    c.job_id = Some(job_id.clone());
                }
                self.start_stage(UpgradeStage::CatchingUp);
                self.requeue_ms = 250;
            }
            _ if self.stage_elapsed() > seconds(&self.spec.upgrade.ready_timeout, 120) as i64 => {
                self.abandon_switch(format!(
                    "the new version did not run and restore from {} within {}",
                    savepoint.unwrap_or_default(),
                    self.spec.upgrade.ready_timeout
                ))
            }
            _ => self.requeue_ms = 250,
        }
    }

    fn catching_up(&mut self) {
        let (Some(live), Some(candidate)) = (&self.obs.live_sources, &self.obs.candidate_sources)
        else {
            self.requeue_ms = 250;
            return;
        };
        let behind = lag(&live.positions, &candidate.positions);
        if let Some(c) = self.status.candidate.as_mut() {
            c.lag = Some(behind);
        }
        let bg = &self.spec.upgrade.blue_green;
        let promoted = match bg.promotion {
            Promotion::Auto => true,
            Promotion::Manual => {
                bg.promote_nonce.is_some() && bg.promote_nonce != self.status.observed_promote_nonce
            }
        };
        if behind <= bg.max_lag && promoted {
            if bg.promotion == Promotion::Manual {
                self.status.observed_promote_nonce = bg.promote_nonce;
            }
            self.start_stage(UpgradeStage::Switching);
            self.hold_both_now();
            self.event(
                false,
                Reason::Upgrading,
                format!("the new version has caught up (lag {behind}); switching"),
            );
            return;
        }
        if behind > bg.max_lag && self.stage_elapsed() > self.catch_up_timeout() {
            return self.abandon_switch(format!(
                "the new version did not catch up within {} (lag {behind}, at most {} allowed)",
                bg.catch_up_timeout, bg.max_lag
            ));
        }
        self.condition(
            ConditionType::Progressing,
            true,
            Reason::Upgrading,
            match bg.promotion {
                Promotion::Manual if behind <= bg.max_lag => format!(
                    "the new version has caught up (lag {behind}); waiting for upgrade.blueGreen.promoteNonce to change"
                ),
                _ => format!("the new version is catching up (lag {behind}, switching at {})", bg.max_lag),
            },
        );
        self.requeue_ms = 1000;
    }

    fn hold_both_now(&mut self) {
        for candidate in [false, true] {
            self.actions.push(Action::HoldSources {
                candidate,
                at: None,
            });
        }
        self.requeue_ms = 100;
    }

    fn hold_both_at(&mut self, cut: &[CutOverPosition]) {
        for candidate in [false, true] {
            self.actions.push(Action::HoldSources {
                candidate,
                at: Some(cut.to_vec()),
            });
        }
        self.requeue_ms = 100;
    }

    fn switching(&mut self) {
        // The live version's stop at the cut-over completed: record its savepoint once.
        if let Some(super::TriggerObs::Completed { path }) = &self.obs.trigger
            && self.status.last_savepoint.as_ref().map(|s| s.path.as_str()) != Some(path.as_str())
        {
            let path = path.clone();
            self.record_savepoint(&path, SavepointTrigger::Upgrade);
        }
        let cut = self
            .status
            .upgrade
            .as_ref()
            .and_then(|u| u.cut_over.clone());
        let stopping = self
            .status
            .upgrade
            .as_ref()
            .is_some_and(|u| u.trigger_id.is_some());
        let resend = self.stage_elapsed() >= RESEND_HOLD_S;
        let (live, candidate) = (
            self.obs.live_sources.clone().unwrap_or_default(),
            self.obs.candidate_sources.clone(),
        );
        // The candidate writes: the switch is done.
        if candidate.as_ref().is_some_and(|c| !c.shadow) {
            return self.promote();
        }
        // The live version stopped at the cut-over: the candidate takes over from there.
        if matches!(self.obs.engine, EngineObs::Ended { .. }) {
            self.actions.push(Action::ReleaseSources {
                candidate: true,
                cut_over: true,
            });
            self.requeue_ms = 100;
            return;
        }
        let Some(candidate) = candidate else {
            self.requeue_ms = 250;
            return;
        };
        if let Some(cause) = self.stop_failure() {
            return self.abandon_switch(format!(
                "the live version could not stop with a savepoint at the cut-over: {cause}"
            ));
        }
        match cut {
            None if live.holding && candidate.holding => {
                let cut = furthest(&live.positions, &candidate.positions);
                self.start_stage(UpgradeStage::Switching);
                if let Some(u) = self.status.upgrade.as_mut() {
                    u.cut_over = Some(cut.clone());
                }
                self.hold_both_at(&cut);
            }
            None if resend => self.hold_both_now(),
            None => self.requeue_ms = 100,
            Some(_) if !live.overrun.is_empty() || !candidate.overrun.is_empty() => {
                // A source was already past the cut-over when told: agree on a new one.
                self.start_stage(UpgradeStage::Switching);
                if let Some(u) = self.status.upgrade.as_mut() {
                    u.cut_over = None;
                }
                self.hold_both_now();
            }
            Some(cut)
                if live.holding
                    && candidate.holding
                    && same_positions(&live.positions, &cut)
                    && same_positions(&candidate.positions, &cut) =>
            {
                if !stopping {
                    self.stop_with_savepoint();
                }
                self.requeue_ms = 100;
            }
            Some(cut) if resend && !stopping => self.hold_both_at(&cut),
            Some(_) => self.requeue_ms = 100,
        }
    }

    /// The live version's stop-with-savepoint at the cut-over failed (it runs on, held).
    fn stop_failure(&self) -> Option<String> {
        match &self.obs.trigger {
            Some(super::TriggerObs::Failed { cause }) => Some(cause.clone()),
            _ => None,
        }
    }

    /// The candidate writes from the cut-over on: it is the live version now.
    fn promote(&mut self) {
        let Some(candidate) = self.status.candidate.take() else {
            return;
        };
        let old = self.status.live.unwrap_or_default();
        let savepoint = self.upgrade_savepoint_path();
        let target = self.upgrade_target();
        self.actions.push(Action::Serve {
            color: candidate.color,
        });
        self.actions.push(Action::RemoveColor { color: old });
        self.status.live = Some(candidate.color);
        self.status.running_spec_hash = Some(target.clone());
        let color = candidate.color.as_str();
        let running = format!(
            "job {} ({color}) is running",
            candidate.job_id.as_deref().unwrap_or_default()
        );
        let event = format!(
            "the new version ({color}) writes from the cut-over on; the old one ({}) stopped there and is removed",
            old.as_str()
        );
        self.upgrade_done(&target, candidate.job_id, savepoint, running, event);
        self.requeue_ms = 1000;
    }

    /// The live version ended on its own (its input is bounded and all read) before a
    /// cut-over: it wrote everything, so the candidate has nothing left to write and goes.
    fn live_finished(&mut self) {
        if let Some(c) = self.status.candidate.take() {
            self.actions.push(Action::RemoveColor { color: c.color });
        }
        self.status.upgrade = None;
        self.event(
            false,
            Reason::Ended,
            "the live version read all its input and ended before the switch: it wrote everything; the new version is removed",
        );
        self.requeue_ms = 250;
    }

    /// Gives the switch up before the cut-over: the candidate goes, the live version (never
    /// stopped) reads on.
    pub(super) fn abandon_switch(&mut self, reason: String) {
        if let Some(c) = self.status.candidate.take() {
            self.actions.push(Action::RemoveColor { color: c.color });
        }
        self.actions.push(Action::ReleaseSources {
            candidate: false,
            cut_over: false,
        });
        self.status.upgrade = None;
        self.status.rejected_spec_hash = Some(self.desired.clone());
        self.status.phase = Some(Phase::Blocked);
        self.condition(
            ConditionType::Degraded,
            true,
            Reason::UpgradeFailed,
            format!("{reason}; the new version is deleted, the live one was never stopped"),
        );
        self.condition(
            ConditionType::Progressing,
            false,
            Reason::UpgradeFailed,
            "blue-green switch abandoned",
        );
        self.event(
            true,
            Reason::UpgradeFailed,
            format!("{reason}; the new version is deleted, the live one was never stopped"),
        );
        self.requeue_ms = 1000;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(p: &[(&str, i64)]) -> Vec<CutOverPosition> {
        p.iter()
            .map(|(s, n)| CutOverPosition {
                split: (*s).to_owned(),
                position: *n,
            })
            .collect()
    }

    #[test]
    fn cut_over_is_the_further_position_and_lag_counts_what_is_behind() {
        let live = at(&[("0", 100), ("1", 50), ("2", 80)]);
        let cand = at(&[("0", 90), ("1", 60), ("2", 60)]);
        assert_eq!(
            furthest(&live, &cand),
            at(&[("0", 100), ("1", 60), ("2", 80)])
        );
        assert_eq!(lag(&live, &cand), 20);
        assert_eq!(lag(&cand, &live), 10);
        assert_eq!(lag(&live, &[]), 100, "a split not read yet is at 0");
        assert!(same_positions(
            &at(&[("1", 60), ("0", 100)]),
            &at(&[("0", 100), ("1", 60)])
        ));
    }
}
