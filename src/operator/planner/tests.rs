use super::*;
use crate::operator::crd::{CutOverPosition, SavepointRef, StatefulJobStatus, UpgradeMode};

const T0: i64 = 1_800_000_000;

/// An upgrade in `stage` towards `target`, nothing else set.
fn upgrade_at(stage: UpgradeStage, target: impl Into<String>) -> UpgradeStatus {
    UpgradeStatus {
        stage,
        target_spec_hash: target.into(),
        trigger_id: None,
        savepoint: None,
        stage_started: String::new(),
        attempts: 0,
        last_error: None,
        blue_green: false,
        cut_over: None,
    }
}

fn deleted(path: &str) -> DeletedSavepoint<'_> {
    DeletedSavepoint {
        path,
        trigger: SavepointTrigger::Manual,
        completed_s: Some(T0),
    }
}

#[test]
fn a_deleted_savepoint_is_kept_while_an_upgrade_or_a_restart_needs_it() {
    let running = running(&spec_with(""), Some("/sp/a"));
    let (a, b) = (deleted("/sp/a"), deleted("/sp/b"));
    let mut st = StatefulJobStatus::default();
    assert_eq!(disposal_blocker(&a, Some(&st), &running, false), None);
    assert_eq!(disposal_blocker(&a, None, &running, false), None);
    st.upgrade = Some(UpgradeStatus {
        savepoint: Some("/sp/a/".into()),
        stage_started: rfc3339(T0 - 10),
        ..upgrade_at(UpgradeStage::RollingBack, "h")
    });
    let why = disposal_blocker(&a, Some(&st), &EngineObs::Absent, true).unwrap();
    assert!(why.contains("RollingBack"), "{why}");
    assert_eq!(disposal_blocker(&b, Some(&st), &running, false), None);
    // Restored from it: needed until the job's first checkpoint, or once it has ended.
    st.upgrade = None;
    st.restored_from = Some("/sp/a".into());
    assert!(disposal_blocker(&a, Some(&st), &running, false).is_some());
    assert_eq!(disposal_blocker(&a, Some(&st), &running, true), None);
    let ended = EngineObs::Ended {
        spec_hash: "h".into(),
    };
    assert_eq!(disposal_blocker(&a, Some(&st), &ended, false), None);
    // Suspended: the resume starts from the last savepoint.
    st.phase = Some(Phase::Suspended);
    st.last_savepoint = Some(SavepointRef {
        name: "a".into(),
        path: "/sp/a".into(),
        time: String::new(),
    });
    assert!(disposal_blocker(&a, Some(&st), &EngineObs::Absent, false).is_some());
    assert_eq!(disposal_blocker(&a, Some(&st), &ended, false), None);
    // Suspending: the engine is still being removed, and the resume starts from it.
    st.phase = Some(Phase::Suspending);
    assert!(disposal_blocker(&a, Some(&st), &ended, false).is_some());
}

#[test]
fn the_engine_is_read_only_for_a_savepoint_the_job_was_restored_from_or_resumes_from() {
    let (a, b) = (deleted("/sp/a"), deleted("/sp/b"));
    let mut st = StatefulJobStatus {
        upgrade: Some(UpgradeStatus {
            savepoint: Some("/sp/b".into()),
            ..upgrade_at(UpgradeStage::Verifying, "h")
        }),
        ..Default::default()
    };
    assert!(!disposal_needs_engine("/sp/a", None));
    assert!(!disposal_needs_engine("/sp/a", Some(&st)));
    st.restored_from = Some("/sp/a/".into());
    assert!(disposal_needs_engine("/sp/a", Some(&st)));
    st.restored_from = None;
    st.last_savepoint = Some(SavepointRef {
        name: "a".into(),
        path: "/sp/a".into(),
        time: String::new(),
    });
    assert!(disposal_needs_engine("/sp/a", Some(&st)));
    // For any other savepoint the engine's state does not change the answer (the sweep passes
    // "absent" without reading it).
    st.restored_from = Some("/sp/a".into());
    let ended = EngineObs::Ended {
        spec_hash: "h".into(),
    };
    for phase in [
        None,
        Some(Phase::Running),
        Some(Phase::Suspending),
        Some(Phase::Suspended),
    ] {
        st.phase = phase;
        for sp in [&a, &b] {
            if disposal_needs_engine(sp.path, Some(&st)) {
                continue;
            }
            let absent = disposal_blocker(sp, Some(&st), &EngineObs::Absent, false);
            for (obs, cp) in [
                (running(&spec_with(""), Some("/sp/a")), false),
                (running(&spec_with(""), Some("/sp/a")), true),
                (ended.clone(), false),
            ] {
                assert_eq!(
                    disposal_blocker(sp, Some(&st), &obs, cp),
                    absent,
                    "{}",
                    sp.path
                );
            }
        }
    }
}

#[test]
fn a_savepoint_the_upgrade_took_but_has_not_recorded_is_kept() {
    // The Savepoint object is made before the status names it: deleted in between, the
    // upgrade still starts from it.
    let mut st = StatefulJobStatus {
        upgrade: Some(UpgradeStatus {
            trigger_id: Some("t".into()),
            stage_started: rfc3339(T0),
            ..upgrade_at(UpgradeStage::Savepointing, "h")
        }),
        ..Default::default()
    };
    let running = running(&spec_with(""), None);
    for trigger in [SavepointTrigger::Upgrade, SavepointTrigger::Suspend] {
        for completed_s in [Some(T0), Some(T0 + 3), None] {
            let sp = DeletedSavepoint {
                path: "/sp/new",
                trigger,
                completed_s,
            };
            let why = disposal_blocker(&sp, Some(&st), &running, true).unwrap();
            assert!(why.contains("not yet recorded"), "{why}");
        }
    }
    // One taken before this upgrade began, or asked for by hand, may go.
    let older = DeletedSavepoint {
        path: "/sp/old",
        trigger: SavepointTrigger::Upgrade,
        completed_s: Some(T0 - 60),
    };
    assert_eq!(disposal_blocker(&older, Some(&st), &running, true), None);
    let manual = DeletedSavepoint {
        path: "/sp/manual",
        trigger: SavepointTrigger::Manual,
        completed_s: Some(T0 + 3),
    };
    assert_eq!(disposal_blocker(&manual, Some(&st), &running, true), None);
    // Once no upgrade is in flight, nothing is waiting to record it.
    st.upgrade = None;
    let sp = DeletedSavepoint {
        path: "/sp/new",
        trigger: SavepointTrigger::Upgrade,
        completed_s: Some(T0 + 3),
    };
    assert_eq!(disposal_blocker(&sp, Some(&st), &running, true), None);
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
        candidate: EngineObs::Absent,
        live_sources: None,
        candidate_sources: None,
        trigger: None,
        preflight: None,
        latest_checkpoint: None,
        savepoints: vec![],
        source_problems: vec![],
        new_trigger_id: TID.into(),
    }
}

/// The trigger id `obs` offers a plan.
const TID: &str = "5a7e0000000000000000000000000001";

fn stop_action() -> Action {
    Action::StopWithSavepoint {
        trigger_id: TID.into(),
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
    assert!(p3.actions.contains(&stop_action()), "{:?}", p3.actions);
    assert!(
        p3.actions.iter().any(
            |a| matches!(a, Action::Event { reason, .. } if *reason == Reason::PreflightSkipped)
        )
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

#[test]
fn a_source_that_cannot_read_is_degraded_until_it_reads_again() {
    let status = stable(&v1());
    let mut o = obs(running(&v1(), None));
    o.source_problems = vec!["kafkaSource 'in': brokers 127.0.0.1:9: all brokers down".into()];
    let p = plan(&v1(), 1, &status, &o);
    let (on, reason, msg) = condition(&p.status, "Degraded");
    assert_eq!((on, reason), ("True", "SourceUnavailable"));
    assert!(msg.contains("kafkaSource 'in'"), "{msg}");
    assert_eq!(condition(&p.status, "Ready").0, "True", "it still runs");
    assert!(
        p.requeue_ms <= 5_000,
        "looked at again soon: {}",
        p.requeue_ms
    );
    assert_eq!(engine_actions(&p), 0);
    o.source_problems.clear();
    let p = plan(&v1(), 1, &p.status, &o);
    assert_eq!(condition(&p.status, "Degraded").0, "False");
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
    assert_eq!(p2.actions, vec![stop_action()]);
    assert_eq!(
        p2.status.upgrade.as_ref().unwrap().stage,
        UpgradeStage::Savepointing
    );
    (p2.status.clone(), p2)
}

#[test]
fn a_preflight_done_at_once_chains_into_its_outcome() {
    // The controller does the (read-only) preflight in the reconcile that asks for it and
    // plans again: the old job is stopped one reconcile sooner.
    let status = stable(&v1());
    let mut o = obs(running(&v1(), None));
    o.latest_checkpoint = Some("/chk/job/chk-7".into());
    let first = plan(&v2(), 2, &status, &o);
    assert!(first.asks_preflight());
    o.preflight = Some(vec![]);
    let second = plan(&v2(), 2, &first.status, &o);
    let chained = first.clone().then(second.clone());
    assert!(!chained.asks_preflight());
    assert_eq!(chained.actions, vec![stop_action()]);
    assert_eq!(chained.status, second.status);
    assert_eq!(
        chained.status.upgrade.as_ref().unwrap().stage,
        UpgradeStage::Savepointing
    );
    // A failed check chains into the block and its warning, the old job untouched.
    o.preflight = Some(vec!["operator uid 'counts' has no match".into()]);
    let blocked = first.clone().then(plan(&v2(), 2, &first.status, &o));
    assert_eq!(blocked.status.phase, Some(Phase::Blocked));
    assert!(
        blocked
            .actions
            .iter()
            .any(|a| matches!(a, Action::Event { warning: true, .. }))
    );
    assert_eq!(engine_actions(&blocked), 0);
}

#[test]
fn a_savepoint_in_flight_is_looked_at_often_at_first_then_every_250_ms() {
    // The old job is stopped while its savepoint completes: a small state completes within
    // tens of milliseconds, and each poll interval adds to the downtime.
    let (mut status, _) = up_to_savepoint();
    status.upgrade.as_mut().unwrap().trigger_id = Some("t1".into());
    let mut o = obs(running(&v1(), None));
    o.trigger = Some(TriggerObs::InProgress);
    let p = plan(&v2(), 2, &status, &o);
    assert!(p.requeue_ms <= 50, "{}", p.requeue_ms);
    assert!(
        p.watch_trigger,
        "the controller may watch it closely meanwhile"
    );
    // Status unknown for a moment (the engine did not answer): as often.
    o.trigger = None;
    assert!(plan(&v2(), 2, &status, &o).requeue_ms <= 50);
    o.trigger = Some(TriggerObs::InProgress);
    o.now_s = T0 + 10;
    let p = plan(&v2(), 2, &status, &o);
    assert_eq!(p.requeue_ms, 250);
    assert!(!p.watch_trigger);
    // Done: nothing to watch.
    o.now_s = T0;
    o.trigger = Some(TriggerObs::Completed {
        path: "/sp/savepoint-1".into(),
    });
    assert!(!plan(&v2(), 2, &status, &o).watch_trigger);
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
        "the savepoint holds state for an operator that the new job does not have: counter".into(),
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
    assert!(p.actions.iter().any(
        |a| matches!(a, Action::Event { warning: true, reason, .. } if *reason == Reason::UpgradeBlocked)
    ));
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
            .contains(&stop_action())
    );
    let mut later = obs(running(&v1(), None));
    later.now_s = T0 + 20;
    assert!(
        plan(&v2(), 2, &p.status, &later)
            .actions
            .contains(&stop_action())
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
    assert!(!p.actions.contains(&stop_action()));
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
    assert_eq!(p.actions, vec![stop_action()]);
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
fn a_savepoint_is_in_the_status_before_it_is_asked_for() {
    // The controller writes the planned status before it acts: the trigger id each request
    // goes by is there first, so a lost answer or status write is polled, not asked again.
    let status = stable(&v1());
    let mut s = v1();
    s.savepoint_trigger_nonce = Some(1);
    let p = plan(&s, 2, &status, &obs(running(&v1(), None)));
    let pending = p.status.pending_savepoint.clone().expect("pending");
    assert_eq!(
        (pending.trigger_id.as_str(), pending.trigger),
        (TID, SavepointTrigger::Manual)
    );
    assert_eq!(pending.started, rfc3339(T0));

    let mut o = obs(running(&v1(), None));
    o.latest_checkpoint = Some("/chk/job/chk-7".into());
    o.preflight = Some(vec![]);
    let first = plan(&v2(), 2, &status, &o);
    let stop = plan(&v2(), 2, &first.status, &o);
    assert_eq!(stop.actions, vec![stop_action()]);
    assert_eq!(
        stop.status.upgrade.and_then(|u| u.trigger_id).as_deref(),
        Some(TID)
    );
}

#[test]
fn a_pending_savepoint_whose_outcome_is_unknown_is_not_asked_for_again() {
    let mut s = v1();
    s.savepoints.periodic = Some("1m".into());
    s.savepoint_trigger_nonce = Some(2);
    let mut status = stable(&v1());
    status.pending_savepoint = Some(PendingSavepoint {
        trigger_id: "0123456789abcdef0123456789abcdef".into(),
        trigger: SavepointTrigger::Periodic,
        started: rfc3339(T0 - 3600),
    });
    // The engine did not answer the status query (`trigger: None`): wait for it, however
    // overdue the periodic and manual savepoints are.
    let p = plan(&s, 2, &status, &obs(running(&v1(), None)));
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::TriggerSavepoint { .. })),
        "{:?}",
        p.actions
    );
    assert_eq!(p.status.pending_savepoint, status.pending_savepoint);
    assert!(p.requeue_ms <= 1000);
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
            trigger: SavepointTrigger::Manual,
            trigger_id: TID.into(),
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
            trigger: SavepointTrigger::Periodic,
            trigger_id: TID.into(),
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
    // No trigger id in the status (written by an operator that recorded it only after asking,
    // then restarted before that): it asks for the stop again.
    let (mut status, _) = up_to_savepoint();
    status.upgrade.as_mut().unwrap().trigger_id = None;
    let p = plan(&v2(), 2, &status, &obs(running(&v1(), None)));
    assert_eq!(p.actions, vec![stop_action()]);
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

#[test]
fn a_requested_savepoint_is_taken_registered_or_failed() {
    use crate::operator::crd::{SavepointSpec, SavepointState, SavepointStatus};
    let spec: SavepointSpec =
        serde_json::from_value(serde_json::json!({"jobRef": "clicks", "trigger": "manual"}))
            .unwrap();
    let fresh = SavepointStatus::default();
    assert_eq!(savepoint_need(&spec, &fresh), SavepointNeed::Trigger);
    // No engine: Pending with the reason, written once.
    let d = savepoint_decision(&spec, &fresh, RequestObs::NoEngine, "t0");
    let waiting = d.status.unwrap();
    assert_eq!(waiting.state, Some(SavepointState::Pending));
    assert!(waiting.failure.as_deref().unwrap().contains("spec.jobRef"));
    assert_eq!(d.requeue_s, Some(5));
    let again = savepoint_decision(&spec, &waiting, RequestObs::NoEngine, "t1");
    assert_eq!(again.status, None);
    // Triggered: in progress with the job and trigger ids, then polled.
    let d = savepoint_decision(
        &spec,
        &waiting,
        RequestObs::Triggered {
            job_id: "j1".into(),
            result: Ok("r1".into()),
        },
        "t2",
    );
    let in_progress = d.status.unwrap();
    assert_eq!(in_progress.trigger_id.as_deref(), Some("j1/r1"));
    assert_eq!(in_progress.started.as_deref(), Some("t2"));
    assert_eq!(
        savepoint_need(&spec, &in_progress),
        SavepointNeed::Poll {
            job_id: "j1".into(),
            trigger: "r1".into()
        }
    );
    let unknown = RequestObs::Outcome {
        outcome: None,
        bytes: None,
    };
    assert_eq!(
        savepoint_decision(&spec, &in_progress, unknown, "t3").requeue_s,
        Some(2)
    );
    let done = savepoint_decision(
        &spec,
        &in_progress,
        RequestObs::Outcome {
            outcome: Some(TriggerObs::Completed {
                path: "/sp/savepoint-1".into(),
            }),
            bytes: Some(42),
        },
        "t4",
    );
    let st = done.status.unwrap();
    assert_eq!(
        (
            st.state,
            st.path.as_deref(),
            st.size_bytes,
            st.started.as_deref()
        ),
        (
            Some(SavepointState::Completed),
            Some("/sp/savepoint-1"),
            Some(42),
            Some("t2")
        )
    );
    assert_eq!(done.requeue_s, None);
    assert_eq!(savepoint_need(&spec, &st), SavepointNeed::Nothing);
    // Refused by the engine: failed with its words.
    let refused = savepoint_decision(
        &spec,
        &fresh,
        RequestObs::Triggered {
            job_id: "j1".into(),
            result: Err("403: outside the roots".into()),
        },
        "t5",
    );
    assert_eq!(
        refused.status.unwrap().failure.as_deref(),
        Some("403: outside the roots")
    );
    // Registering an existing snapshot, or one that is not complete.
    let mut registering = spec.clone();
    registering.path = Some("/sp/old".into());
    assert_eq!(
        savepoint_need(&registering, &fresh),
        SavepointNeed::Register {
            path: "/sp/old".into()
        }
    );
    let ok = savepoint_decision(
        &registering,
        &fresh,
        RequestObs::Registered(Some((1_800_000_000_000, Some(7)))),
        "t6",
    );
    assert_eq!(ok.status.unwrap().state, Some(SavepointState::Completed));
    let bad = savepoint_decision(&registering, &fresh, RequestObs::Registered(None), "t6");
    assert!(
        bad.status
            .unwrap()
            .failure
            .unwrap()
            .contains("spec.path: /sp/old")
    );
}

fn sources(holding: bool, shadow: bool, p: &[(&str, i64)]) -> SourcesObs {
    SourcesObs {
        holding,
        shadow,
        positions: p
            .iter()
            .map(|(s, n)| CutOverPosition {
                split: (*s).to_owned(),
                position: *n,
            })
            .collect(),
        overrun: vec![],
    }
}

#[test]
fn a_blue_green_upgrade_catches_up_cuts_over_and_never_stops_blue_early() {
    use crate::operator::crd::{Color, UpgradeStrategy};
    let mut spec = v2();
    spec.upgrade.strategy = UpgradeStrategy::BlueGreen;
    let blue = running(&v1(), None);
    // Preflight passes: a savepoint of the running job, without stopping it.
    let p = plan(&spec, 2, &stable(&v1()), &obs(blue.clone()));
    assert!(p.status.upgrade.as_ref().unwrap().blue_green);
    let mut o = obs(blue.clone());
    o.preflight = Some(vec![]);
    let p = plan(&spec, 2, &p.status, &o);
    assert!(
        p.actions.contains(&Action::SavepointLive {
            trigger_id: TID.into()
        }),
        "{:?}",
        p.actions
    );
    assert!(!p.actions.contains(&stop_action()));
    let mut st = p.status;
    st.upgrade.as_mut().unwrap().trigger_id = Some("t1".into());
    // The savepoint completes: green starts from it in shadow mode; blue is untouched.
    let mut o = obs(blue.clone());
    o.trigger = Some(TriggerObs::Completed {
        path: "/sp/savepoint-1".into(),
    });
    let p = plan(&spec, 2, &st, &o);
    assert!(p.actions.iter().any(|a| matches!(a,
        Action::DeployCandidate { color: Color::Green, restore_from, .. } if restore_from == "/sp/savepoint-1")));
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::Deploy { .. } | Action::RemoveEngine))
    );
    assert_eq!(p.status.candidate.as_ref().unwrap().color, Color::Green);
    // Green runs, restored from it: catching up.
    let mut o = obs(blue.clone());
    o.candidate = EngineObs::Running {
        spec_hash: spec_hash(&spec),
        job_id: "green-job".into(),
        restored_from: Some("/sp/savepoint-1".into()),
    };
    let p = plan(&spec, 2, &p.status, &o);
    assert_eq!(
        p.status.upgrade.as_ref().unwrap().stage,
        UpgradeStage::CatchingUp
    );
    // Behind by more than maxLag: no switch yet.
    let mut o2 = o.clone();
    o2.live_sources = Some(sources(false, false, &[("0", 50_000)]));
    o2.candidate_sources = Some(sources(false, true, &[("0", 10)]));
    let behind = plan(&spec, 2, &p.status, &o2);
    assert_eq!(
        behind.status.upgrade.as_ref().unwrap().stage,
        UpgradeStage::CatchingUp
    );
    assert_eq!(behind.status.candidate.as_ref().unwrap().lag, Some(49_990));
    // Caught up: both hold where they are.
    o2.candidate_sources = Some(sources(false, true, &[("0", 49_990)]));
    let p = plan(&spec, 2, &p.status, &o2);
    assert_eq!(
        p.status.upgrade.as_ref().unwrap().stage,
        UpgradeStage::Switching
    );
    assert_eq!(
        p.actions
            .iter()
            .filter(|a| matches!(a, Action::HoldSources { at: None, .. }))
            .count(),
        2
    );
    // Both hold: the cut-over is the further position; both are held there.
    o2.live_sources = Some(sources(true, false, &[("0", 50_000)]));
    o2.candidate_sources = Some(sources(true, true, &[("0", 49_990)]));
    let p = plan(&spec, 2, &p.status, &o2);
    let cut = p.status.upgrade.as_ref().unwrap().cut_over.clone().unwrap();
    assert_eq!(cut[0].position, 50_000);
    assert!(!p.actions.contains(&stop_action()));
    // Both hold exactly there: blue stops with a savepoint.
    o2.candidate_sources = Some(sources(true, true, &[("0", 50_000)]));
    let p = plan(&spec, 2, &p.status, &o2);
    assert!(p.actions.contains(&stop_action()));
    // Blue ended: green is released with the cut-over.
    let mut st = p.status;
    st.upgrade.as_mut().unwrap().trigger_id = Some("t2".into());
    let mut o3 = o2.clone();
    o3.engine = EngineObs::Ended {
        spec_hash: spec_hash(&v1()),
    };
    o3.trigger = Some(TriggerObs::Completed {
        path: "/sp/savepoint-2".into(),
    });
    let p = plan(&spec, 2, &st, &o3);
    assert!(p.actions.contains(&Action::ReleaseSources {
        candidate: true,
        cut_over: true
    }));
    assert_eq!(
        p.status.last_savepoint.as_ref().unwrap().path,
        "/sp/savepoint-2"
    );
    // Green writes: it is live; blue goes.
    o3.candidate_sources = Some(sources(false, false, &[("0", 50_100)]));
    let p = plan(&spec, 2, &p.status, &o3);
    assert_eq!(p.status.live, Some(Color::Green));
    assert!(p.status.upgrade.is_none() && p.status.candidate.is_none());
    assert!(p.actions.contains(&Action::Serve {
        color: Color::Green
    }));
    assert!(
        p.actions
            .contains(&Action::RemoveColor { color: Color::Blue })
    );
    assert_eq!(p.status.job_id.as_deref(), Some("green-job"));
}

#[test]
fn a_failing_candidate_is_removed_and_blue_never_stopped() {
    use crate::operator::crd::{CandidateStatus, Color, UpgradeStrategy};
    let mut spec = v2();
    spec.upgrade.strategy = UpgradeStrategy::BlueGreen;
    let mut st = stable(&v1());
    st.upgrade = Some(UpgradeStatus {
        savepoint: Some("/sp/savepoint-1".into()),
        blue_green: true,
        ..upgrade_at(UpgradeStage::CatchingUp, spec_hash(&spec))
    });
    st.candidate = Some(CandidateStatus {
        color: Color::Green,
        job_id: None,
        lag: None,
    });
    let mut o = obs(running(&v1(), None));
    o.candidate = EngineObs::Broken {
        spec_hash: spec_hash(&spec),
        reason: "restarted 3 times".into(),
    };
    let p = plan(&spec, 2, &st, &o);
    assert!(p.actions.contains(&Action::RemoveColor {
        color: Color::Green
    }));
    assert!(!p.actions.iter().any(|a| matches!(
        a,
        Action::StopWithSavepoint { .. } | Action::RemoveEngine | Action::Deploy { .. }
    )));
    assert!(p.status.upgrade.is_none() && p.status.candidate.is_none());
    assert_eq!(p.status.rejected_spec_hash, Some(spec_hash(&spec)));
    let (on, reason, msg) = condition(&p.status, "Degraded");
    assert_eq!((on, reason), ("True", "UpgradeFailed"));
    assert!(
        msg.contains("restarted 3 times") && msg.contains("never stopped"),
        "{msg}"
    );
}

#[test]
fn a_live_version_that_ends_on_its_own_before_the_cut_over_ends_the_switch() {
    use crate::operator::crd::{CandidateStatus, Color, UpgradeStrategy};
    let mut spec = v2();
    spec.upgrade.strategy = UpgradeStrategy::BlueGreen;
    let mut st = stable(&v1());
    st.upgrade = Some(UpgradeStatus {
        savepoint: Some("/sp/savepoint-1".into()),
        blue_green: true,
        ..upgrade_at(UpgradeStage::Switching, spec_hash(&spec))
    });
    st.candidate = Some(CandidateStatus {
        color: Color::Green,
        job_id: Some("j2".into()),
        lag: Some(10),
    });
    let mut o = obs(EngineObs::Ended {
        spec_hash: spec_hash(&v1()),
    });
    o.candidate = running(&spec, Some("/sp/savepoint-1"));
    let p = plan(&spec, 2, &st, &o);
    // The candidate would write again what the live version wrote: it goes, unreleased.
    assert!(p.actions.contains(&Action::RemoveColor {
        color: Color::Green
    }));
    assert!(!p.actions.iter().any(|a| matches!(
        a,
        Action::ReleaseSources { .. } | Action::Serve { .. } | Action::StopWithSavepoint { .. }
    )));
    assert!(p.status.upgrade.is_none() && p.status.candidate.is_none());
    assert_eq!(p.status.live, None, "blue stays the live color");
    assert_eq!(
        p.status.rejected_spec_hash, None,
        "the new spec is not at fault"
    );
}
