//! The Savepoint objects' decisions: which go (retention), whether a deleted one's files may
//! be disposed, and the steps of a savepoint a user asks for with a Savepoint object.

use super::{EngineObs, SavepointObs, TriggerObs};
use crate::operator::crd::{
    Phase, SavepointSpec, SavepointState, SavepointStatus, SavepointTrigger, StatefulJobStatus,
};

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

/// A deleted Savepoint object, as far as deciding whether its files may go.
#[derive(Clone, Debug, PartialEq)]
pub struct DeletedSavepoint<'a> {
    pub path: &'a str,
    pub trigger: SavepointTrigger,
    /// When the operator recorded it completed (None: it is being recorded right now).
    pub completed_s: Option<i64>,
}

/// Why the files of a deleted Savepoint must stay for now, if they must: an upgrade in flight
/// starts the new version (or the rollback) from them, or took them and has not written that
/// down yet (the Savepoint object is made before the job's status names it, so a savepoint is
/// never unrecorded); the engine was started from them and has no checkpoint of its own yet (a
/// restart would need them); or the job is suspending or suspended and resumes from them.
pub fn disposal_blocker(
    sp: &DeletedSavepoint,
    status: Option<&StatefulJobStatus>,
    engine: &EngineObs,
    engine_has_checkpoint: bool,
) -> Option<String> {
    let status = status?;
    let path = sp.path;
    let same = |p: &str| p.trim_end_matches('/') == path.trim_end_matches('/');
    if let Some(u) = &status.upgrade {
        if u.savepoint.as_deref().is_some_and(same) {
            return Some(format!(
                "the upgrade in flight (stage {:?}) starts from {path}; its files are disposed once it no longer needs them",
                u.stage
            ));
        }
        let taken_by_upgrade = matches!(
            sp.trigger,
            SavepointTrigger::Upgrade | SavepointTrigger::Suspend
        );
        let since_stage = match (sp.completed_s, super::parse_time(&u.stage_started)) {
            (Some(done), Some(started)) => done >= started,
            _ => true,
        };
        if taken_by_upgrade && since_stage {
            return Some(format!(
                "the upgrade in flight (stage {:?}) took {path} and has not yet recorded it; its files are disposed once it no longer needs them",
                u.stage
            ));
        }
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
    let resumes_from_it = status
        .last_savepoint
        .as_ref()
        .is_some_and(|s| same(&s.path));
    let suspending = status.phase == Some(Phase::Suspending);
    let suspended = status.phase == Some(Phase::Suspended) && *engine == EngineObs::Absent;
    if resumes_from_it && (suspending || suspended) {
        return Some(format!(
            "the suspended job resumes from {path}; its files are disposed once it has resumed"
        ));
    }
    None
}

/// Whether `disposal_blocker` needs the engine's state for the savepoint at `path`: only when
/// the job was restored from it or resumes from it. The engine's state (a Deployment, its
/// pods, the engine's REST API) is not read for any other, as for most of a retention sweep's.
pub fn disposal_needs_engine(path: &str, status: Option<&StatefulJobStatus>) -> bool {
    let same = |p: &str| p.trim_end_matches('/') == path.trim_end_matches('/');
    status.is_some_and(|s| {
        s.restored_from.as_deref().is_some_and(same)
            || s.last_savepoint.as_ref().is_some_and(|l| same(&l.path))
    })
}

/// What the Savepoint controller must look at for a Savepoint object.
#[derive(Clone, Debug, PartialEq)]
pub enum SavepointNeed {
    /// Nothing: it has completed or failed.
    Nothing,
    /// `spec.path` registers an existing snapshot: read its `_metadata`.
    Register { path: String },
    /// Take a savepoint on the job's engine, if it runs.
    Trigger,
    /// Ask the engine how request `trigger` of job `job_id` is going.
    Poll { job_id: String, trigger: String },
}

/// What the Savepoint controller found.
#[derive(Clone, Debug, PartialEq)]
pub enum RequestObs {
    /// The snapshot at `spec.path`, if complete: its completion time (ms) and size.
    Registered(Option<(u64, Option<u64>)>),
    /// The job's engine runs no job, so no savepoint was asked for.
    NoEngine,
    /// A savepoint was asked of job `job_id`: the trigger id, or why it was refused.
    Triggered {
        job_id: String,
        result: Result<String, String>,
    },
    /// The request in flight as the engine reports it (None: not known now), and the size of
    /// a completed one.
    Outcome {
        outcome: Option<TriggerObs>,
        bytes: Option<u64>,
    },
}

/// The Savepoint's next status (None: unchanged) and when to look again (None: on change).
#[derive(Clone, Debug, PartialEq)]
pub struct SavepointDecision {
    pub status: Option<SavepointStatus>,
    pub requeue_s: Option<u64>,
}

/// What a Savepoint object needs looked at, from its spec and status.
pub fn savepoint_need(spec: &SavepointSpec, status: &SavepointStatus) -> SavepointNeed {
    match status.state {
        Some(SavepointState::Completed | SavepointState::Failed) => SavepointNeed::Nothing,
        None | Some(SavepointState::Pending) => match &spec.path {
            Some(path) => SavepointNeed::Register { path: path.clone() },
            None => SavepointNeed::Trigger,
        },
        Some(SavepointState::InProgress) => {
            match status.trigger_id.as_deref().and_then(|t| t.split_once('/')) {
                Some((job_id, trigger)) => SavepointNeed::Poll {
                    job_id: job_id.to_owned(),
                    trigger: trigger.to_owned(),
                },
                None => SavepointNeed::Nothing,
            }
        }
    }
}

/// The Savepoint controller's decision: a pure function of the object and what was found
/// (`now` is the time to record, RFC 3339).
pub fn savepoint_decision(
    spec: &SavepointSpec,
    status: &SavepointStatus,
    obs: RequestObs,
    now: &str,
) -> SavepointDecision {
    let set = |status: SavepointStatus, requeue_s: Option<u64>| SavepointDecision {
        status: Some(status),
        requeue_s,
    };
    match obs {
        RequestObs::Registered(found) => {
            let path = spec.path.clone().unwrap_or_default();
            let next = match found {
                Some((ms, bytes)) => SavepointStatus {
                    state: Some(SavepointState::Completed),
                    path: Some(path),
                    size_bytes: bytes,
                    completed: jiff::Timestamp::from_millisecond(ms as i64)
                        .ok()
                        .map(|t| t.to_string()),
                    ..Default::default()
                },
                None => SavepointStatus {
                    state: Some(SavepointState::Failed),
                    failure: Some(format!(
                        "spec.path: {path} is not a complete savepoint (no readable _metadata)"
                    )),
                    path: Some(path),
                    ..Default::default()
                },
            };
            set(next, None)
        }
        RequestObs::NoEngine => {
            let waiting = SavepointStatus {
                state: Some(SavepointState::Pending),
                failure: Some(format!(
                    "spec.jobRef: StatefulJob {} has no running engine; waiting",
                    spec.job_ref
                )),
                ..Default::default()
            };
            SavepointDecision {
                status: (*status != waiting).then_some(waiting),
                requeue_s: Some(5),
            }
        }
        RequestObs::Triggered { job_id, result } => {
            let next = match result {
                Ok(id) => SavepointStatus {
                    state: Some(SavepointState::InProgress),
                    trigger_id: Some(format!("{job_id}/{id}")),
                    started: Some(now.to_owned()),
                    ..Default::default()
                },
                Err(cause) => SavepointStatus {
                    state: Some(SavepointState::Failed),
                    failure: Some(cause),
                    ..Default::default()
                },
            };
            set(next, Some(1))
        }
        RequestObs::Outcome { outcome, bytes } => match outcome {
            None => SavepointDecision {
                status: None,
                requeue_s: Some(2),
            },
            Some(TriggerObs::InProgress) => SavepointDecision {
                status: None,
                requeue_s: Some(1),
            },
            Some(TriggerObs::Completed { path }) => set(
                SavepointStatus {
                    state: Some(SavepointState::Completed),
                    size_bytes: bytes,
                    path: Some(path),
                    completed: Some(now.to_owned()),
                    ..status.clone()
                },
                None,
            ),
            Some(TriggerObs::Failed { cause }) => set(
                SavepointStatus {
                    state: Some(SavepointState::Failed),
                    failure: Some(cause),
                    ..status.clone()
                },
                None,
            ),
        },
    }
}
