//! The checkpoint coordinator: triggers snapshots at the sources, collects the state files the
//! tasks acknowledge, and commits a snapshot by writing `_metadata` last. A snapshot that
//! fails (a write error, a declined trigger, a timeout) is deleted and reported; the job goes
//! on. It also tracks the tasks and decides the job's final state.

use super::graph::JobGraph;
use super::runtime::{Barrier, Control, Shared};
use super::sources::Bound;
use crate::savepoint::metadata::{
    FORMAT_VERSION, OperatorMetadata, SnapshotKind, SnapshotMetadata, SplitPosition, SubtaskState,
};
use crate::savepoint::paths;
use crate::savepoint::store::Store;
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(crate) enum CoordMsg {
    Trigger(TriggerRequest),
    Ack {
        id: u64,
        node: usize,
        subtask: u32,
        result: Result<(SubtaskState, Vec<SplitPosition>), String>,
    },
    Decline {
        id: u64,
        reason: String,
    },
    TaskDone {
        result: Result<(), String>,
    },
    /// Hold the sources at these positions (None: where they are now).
    Hold {
        bound: Option<Arc<Bound>>,
        reply: Sender<Result<(), String>>,
    },
    /// Let the sources read on; with `cut_over`, after sending the cut-over marker (only
    /// while the job's output is in shadow mode, and then no longer).
    Release {
        cut_over: bool,
        reply: Sender<Result<(), String>>,
    },
}

pub(crate) struct TriggerRequest {
    pub kind: SnapshotKind,
    /// Savepoints: the directory to create the savepoint in. Checkpoints: unused.
    pub target: String,
    /// Stop-with-savepoint, with drain or not.
    pub stop: Option<bool>,
    pub reply: Option<Sender<Result<String, String>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Created,
    Running,
    Finished,
    Canceled,
    Failed,
}

impl JobState {
    /// Flink's name for the state.
    pub fn as_flink(&self) -> &'static str {
        match self {
            JobState::Created => "CREATED",
            JobState::Running => "RUNNING",
            JobState::Finished => "FINISHED",
            JobState::Canceled => "CANCELED",
            JobState::Failed => "FAILED",
        }
    }
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Finished | JobState::Canceled | JobState::Failed
        )
    }
}

/// What REST and the CLI report about snapshots.
#[derive(Clone, Debug, Default)]
pub struct SnapshotStats {
    pub completed: u64,
    pub failed: u64,
    pub in_progress: u64,
    pub latest_checkpoint: Option<CompletedSnapshot>,
    pub latest_savepoint: Option<CompletedSnapshot>,
    pub latest_failure: Option<FailedSnapshot>,
}

/// The newest snapshot that failed: why, and when.
#[derive(Clone, Debug)]
pub struct FailedSnapshot {
    pub message: String,
    pub timestamp_ms: u64,
}

impl FailedSnapshot {
    fn now(message: &str) -> Option<FailedSnapshot> {
        Some(FailedSnapshot {
            message: message.to_owned(),
            timestamp_ms: now_ms(),
        })
    }
}

#[derive(Clone, Debug)]
pub struct CompletedSnapshot {
    pub id: u64,
    pub location: String,
    pub timestamp_ms: u64,
    pub size: u64,
    pub duration_ms: u64,
}

pub(crate) struct Status {
    pub state: JobState,
    pub failure: Option<String>,
    pub snapshots: SnapshotStats,
    pub end_time_ms: Option<u64>,
}

pub(crate) struct StatusCell {
    pub status: Mutex<Status>,
    pub changed: Condvar,
}

impl StatusCell {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        match self.status.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

pub(crate) struct CheckpointConfig {
    pub interval: Duration,
    pub dir: Store,
    pub retained: u32,
}

pub(crate) struct Coordinator {
    pub job_id: String,
    pub graph: Arc<JobGraph>,
    pub shared: Arc<Shared>,
    pub status: Arc<StatusCell>,
    pub sources: Vec<Sender<Control>>,
    pub all_tasks: Vec<Sender<Control>>,
    pub tasks_running: usize,
    pub next_id: u64,
    pub timeout: Duration,
    pub checkpoints: Option<CheckpointConfig>,
    pub restored_from: Option<String>,
}

struct Pending {
    id: u64,
    kind: SnapshotKind,
    barrier: Arc<Barrier>,
    dir: Store,
    stop: Option<bool>,
    reply: Option<Sender<Result<String, String>>>,
    expected: usize,
    acks: BTreeMap<(usize, u32), (SubtaskState, Vec<SplitPosition>)>,
    started: Instant,
    /// Taken before the cut-over marker went out: the sinks were in shadow mode.
    shadow: bool,
}

/// A failed snapshot on its way off storage. Its directory is deleted, and the failure
/// reported, once no task or writer holds its barrier any more: a writer still busy with a
/// state file would otherwise write it again after the delete.
struct Aborting {
    barrier: Arc<Barrier>,
    reason: String,
    reply: Option<Sender<Result<String, String>>>,
    /// After this, whatever is there is deleted and the failure reported even if a writer
    /// still holds the barrier (a writer stuck on storage).
    deadline: Instant,
}

/// How long a failed snapshot waits for its writers before it is reported anyway.
const ABORT_GRACE: Duration = Duration::from_secs(30);

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Coordinator {
    fn expected_acks(&self) -> usize {
        self.graph
            .nodes
            .iter()
            .filter(|n| n.is_stateful())
            .map(|n| n.parallelism as usize)
            .sum()
    }

    pub fn run(mut self, rx: Receiver<CoordMsg>) {
        let mut pending: Option<Pending> = None;
        let mut aborting: Vec<Aborting> = Vec::new();
        let mut queued: VecDeque<TriggerRequest> = VecDeque::new();
        let mut next_checkpoint = self
            .checkpoints
            .as_ref()
            .map(|c| Instant::now() + c.interval);
        while self.tasks_running > 0 {
            let mut wake = Duration::from_millis(200);
            if let Some(p) = &pending {
                wake =
                    wake.min((p.started + self.timeout).saturating_duration_since(Instant::now()));
            }
            if let Some(t) = next_checkpoint {
                wake = wake.min(t.saturating_duration_since(Instant::now()));
            }
            if !aborting.is_empty() {
                wake = wake.min(Duration::from_millis(10));
            }
            match rx.recv_timeout(wake) {
                Ok(CoordMsg::Trigger(req)) => queued.push_back(req),
                Ok(CoordMsg::Hold { bound, reply }) => {
                    let epoch = self.shared.source_epoch.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = reply.send(self.to_sources(|| Control::Hold {
                        bound: bound.clone(),
                        epoch,
                    }));
                }
                Ok(CoordMsg::Release { cut_over, reply }) => {
                    let result = if cut_over && !self.shared.shadow.load(Ordering::SeqCst) {
                        Err("the job's output is not in shadow mode: there is nothing to cut over (sjob run --shadow)".into())
                    } else {
                        if cut_over {
                            self.shared.shadow.store(false, Ordering::SeqCst);
                            tracing::info!(job = %self.job_id, "cut-over: sources send the marker; sinks write from it on");
                        }
                        let epoch = self.shared.source_epoch.fetch_add(1, Ordering::SeqCst) + 1;
                        self.to_sources(|| Control::Release { cut_over, epoch })
                    };
                    let _ = reply.send(result);
                }
                Ok(CoordMsg::Ack {
                    id,
                    node,
                    subtask,
                    result,
                }) => {
                    if let Some(p) = pending.as_mut().filter(|p| p.id == id) {
                        match result {
                            Ok(state) => {
                                p.acks.insert((node, subtask), state);
                                if p.acks.len() == p.expected
                                    && let Some(p) = pending.take()
                                {
                                    self.complete(p);
                                }
                            }
                            Err(e) => {
                                if let Some(p) = pending.take() {
                                    aborting
                                        .push(self.fail(p, format!("writing state failed: {e}")));
                                }
                            }
                        }
                    }
                }
                Ok(CoordMsg::Decline { id, reason }) => {
                    if pending.as_ref().is_some_and(|p| p.id == id)
                        && let Some(p) = pending.take()
                    {
                        aborting.push(self.fail(p, reason));
                    }
                }
                Ok(CoordMsg::TaskDone { result }) => {
                    self.tasks_running -= 1;
                    if let Err(e) = result
                        && !e.is_empty()
                    {
                        let mut st = self.status.lock();
                        if st.failure.is_none() {
                            tracing::error!(job = %self.job_id, error = %e, "task failed; the job fails");
                            st.failure = Some(e);
                        }
                        self.shared.cancel.store(true, Ordering::SeqCst);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            if let Some(p) = pending.as_ref()
                && p.started.elapsed() >= self.timeout
                && let Some(p) = pending.take()
            {
                let secs = self.timeout.as_secs_f64();
                aborting.push(self.fail(p, format!("timed out after {secs:.1}s")));
            }
            if let (Some(t), Some(cfg)) = (next_checkpoint, self.checkpoints.as_ref())
                && Instant::now() >= t
            {
                next_checkpoint = Some(Instant::now() + cfg.interval);
                if pending.is_none() && queued.is_empty() {
                    queued.push_back(TriggerRequest {
                        kind: SnapshotKind::Checkpoint,
                        target: String::new(),
                        stop: None,
                        reply: None,
                    });
                }
            }
            if pending.is_none()
                && let Some(req) = queued.pop_front()
            {
                pending = self.trigger(req, &mut aborting);
            }
            aborting.retain_mut(|a| !self.finish_abort(a, false));
        }
        let reason = "the job ended before the snapshot completed".to_owned();
        if let Some(p) = pending.take() {
            aborting.push(self.fail(p, reason.clone()));
        }
        // The tasks have ended; writers may still be finishing state files of failed snapshots.
        while !aborting.is_empty() {
            aborting.retain_mut(|a| !self.finish_abort(a, false));
            if !aborting.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for req in queued {
            if let Some(r) = req.reply {
                let _ = r.send(Err(reason.clone()));
            }
        }
        let mut st = self.status.lock();
        st.state = if st.failure.is_some() {
            JobState::Failed
        } else if self.shared.cancel.load(Ordering::SeqCst) {
            JobState::Canceled
        } else {
            JobState::Finished
        };
        st.end_time_ms = Some(now_ms());
        tracing::info!(job = %self.job_id, state = st.state.as_flink(), "job ended");
        drop(st);
        self.status.changed.notify_all();
    }

    fn refuse(&self, req: TriggerRequest, reason: String) -> Option<Pending> {
        tracing::warn!(job = %self.job_id, kind = %req.kind, reason = %reason, "snapshot not taken");
        {
            let mut st = self.status.lock();
            st.snapshots.failed += 1;
            st.snapshots.latest_failure = FailedSnapshot::now(&reason);
        }
        if let Some(r) = req.reply {
            let _ = r.send(Err(reason));
        }
        None
    }

    fn trigger(&mut self, req: TriggerRequest, aborting: &mut Vec<Aborting>) -> Option<Pending> {
        if self.shared.cancel.load(Ordering::SeqCst) {
            return self.refuse(req, "the job is being cancelled".into());
        }
        if req.kind == SnapshotKind::Checkpoint
            && let Some(c) = &self.checkpoints
        {
            // A complete chk-N left by an earlier run of this job (one restored from an older
            // snapshot) is never written into, nor deleted by a failure: the ids move past it.
            for _ in 0..1000 {
                let taken = paths::checkpoint(&c.dir, &self.job_id, self.next_id)
                    .child(crate::savepoint::metadata::METADATA_FILE)
                    .is_object();
                match taken {
                    Ok(true) => {
                        tracing::warn!(job = %self.job_id, id = self.next_id,
                            "checkpoint id already taken by a complete checkpoint; skipping it");
                        self.next_id += 1;
                    }
                    Ok(false) => break,
                    Err(e) => return self.refuse(req, format!("the target is not readable: {e}")),
                }
            }
        }
        let id = self.next_id;
        let dir = match req.kind {
            SnapshotKind::Savepoint => match Store::open(&req.target) {
                Ok(s) => s.child(&paths::savepoint_name(&self.job_id)),
                Err(e) => return self.refuse(req, e.to_string()),
            },
            SnapshotKind::Checkpoint => match &self.checkpoints {
                Some(c) => paths::checkpoint(&c.dir, &self.job_id, id),
                None => return self.refuse(req, "checkpoints are not configured".into()),
            },
        };
        if let Err(e) = dir.ensure_writable() {
            return self.refuse(req, format!("the target is not writable: {e}"));
        }
        let barrier = Arc::new(Barrier {
            id,
            dir: dir.clone(),
            stop: req.stop.is_some(),
            aborted: AtomicBool::new(false),
            compression: self.graph.state_compression,
            _huge_pages_off: crate::allocator::HugePagesOff::take(),
        });
        {
            let exhausted = match self.shared.source_gate.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if *exhausted {
                drop(exhausted);
                let _ = dir.delete_all();
                return self.refuse(
                    req,
                    "the job's input is exhausted; it is finishing and takes no more snapshots"
                        .into(),
                );
            }
            for (i, s) in self.sources.iter().enumerate() {
                if s.send(Control::Trigger(barrier.clone())).is_err() {
                    drop(exhausted);
                    let reason = "a source has already ended".to_owned();
                    tracing::warn!(job = %self.job_id, kind = %req.kind, reason = %reason, "snapshot not taken");
                    if i > 0 {
                        // Sources before it took the barrier: stop-with-savepoint paused them.
                        for s in &self.sources[..i] {
                            let _ = s.send(Control::Resume);
                        }
                    }
                    self.count_failure(&reason, false);
                    aborting.push(self.abort(barrier, reason, req.reply));
                    return None;
                }
            }
        }
        self.next_id += 1;
        self.status.lock().snapshots.in_progress = 1;
        tracing::info!(job = %self.job_id, id, kind = %req.kind, location = %dir.location(), "snapshot triggered");
        Some(Pending {
            id,
            kind: req.kind,
            barrier,
            dir,
            stop: req.stop,
            reply: req.reply,
            expected: self.expected_acks(),
            acks: BTreeMap::new(),
            started: Instant::now(),
            shadow: self.shared.shadow.load(Ordering::SeqCst),
        })
    }

    /// Sends every source the same control message, under the gate triggers take, so that
    /// every source sees barriers and cut-over markers in one order.
    fn to_sources(&self, make: impl Fn() -> Control) -> Result<(), String> {
        let exhausted = match self.shared.source_gate.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if *exhausted {
            return Err("the job's input is exhausted; it is finishing".into());
        }
        for s in &self.sources {
            s.send(make())
                .map_err(|_| "a source has already ended".to_owned())?;
        }
        Ok(())
    }

    /// Fails the snapshot in flight: the job goes on; its files are deleted by `finish_abort`.
    fn fail(&self, p: Pending, reason: String) -> Aborting {
        if p.stop.is_some() {
            for s in &self.sources {
                let _ = s.send(Control::Resume);
            }
        }
        tracing::warn!(job = %self.job_id, id = p.id, kind = %p.kind, reason = %reason, "snapshot failed; the job keeps running");
        self.count_failure(&reason, true);
        self.abort(p.barrier, reason, p.reply)
    }

    fn count_failure(&self, reason: &str, was_in_progress: bool) {
        let mut st = self.status.lock();
        st.snapshots.failed += 1;
        if was_in_progress {
            st.snapshots.in_progress = 0;
        }
        st.snapshots.latest_failure = FailedSnapshot::now(reason);
    }

    /// Marks a barrier's snapshot as failed (writers skip its files from now on) and deletes
    /// what is on storage so far.
    fn abort(
        &self,
        barrier: Arc<Barrier>,
        reason: String,
        reply: Option<Sender<Result<String, String>>>,
    ) -> Aborting {
        barrier.aborted.store(true, Ordering::SeqCst);
        let _ = barrier.dir.delete_all();
        Aborting {
            barrier,
            reason,
            reply,
            deadline: Instant::now() + ABORT_GRACE.min(self.timeout),
        }
    }

    /// Deletes a failed snapshot's directory once nothing can write into it any more (no task
    /// or writer holds its barrier), then reports the failure. True when done.
    fn finish_abort(&self, a: &mut Aborting, force: bool) -> bool {
        let released = Arc::strong_count(&a.barrier) == 1;
        if !released && !force && Instant::now() < a.deadline {
            return false;
        }
        if !released {
            tracing::warn!(job = %self.job_id, id = a.barrier.id, location = %a.barrier.dir.location(),
                "a writer of a failed snapshot has not finished; deleting what is there now");
        }
        if let Err(e) = a.barrier.dir.delete_all() {
            tracing::warn!(job = %self.job_id, id = a.barrier.id, error = %e, "could not delete a failed snapshot");
        }
        if let Some(r) = a.reply.take() {
            let _ = r.send(Err(std::mem::take(&mut a.reason)));
        }
        true
    }

    fn complete(&mut self, p: Pending) {
        let mut operators = Vec::with_capacity(self.graph.nodes.len());
        for n in &self.graph.nodes {
            let mut subtasks = Vec::new();
            let mut positions = Vec::new();
            if n.is_stateful() {
                for sub in 0..n.parallelism {
                    if let Some((st, pos)) = p.acks.get(&(n.index, sub)) {
                        subtasks.push(st.clone());
                        positions.extend(pos.iter().cloned());
                    }
                }
            }
            operators.push(OperatorMetadata {
                uid: n.uid.clone(),
                name: n.name.clone(),
                kind: n.kind.to_owned(),
                parallelism: n.parallelism,
                max_parallelism: self.graph.max_parallelism,
                keyed_states: n.keyed_states.clone(),
                operator_states: n.operator_states.clone(),
                subtasks,
                source_positions: positions,
            });
        }
        let timestamp_ms = now_ms();
        let meta = SnapshotMetadata {
            format_version: FORMAT_VERSION,
            kind: p.kind,
            job_id: self.job_id.clone(),
            job_name: self.graph.name.clone(),
            snapshot_id: p.id,
            timestamp_ms,
            restored_from: self.restored_from.clone(),
            shadow: p.shadow,
            operators,
        };
        if let Err(e) = meta.write(&p.dir) {
            let reason = format!("writing _metadata failed: {e}");
            // Every state file is acknowledged: nothing else writes into the directory.
            let mut a = self.fail(p, reason);
            self.finish_abort(&mut a, true);
            return;
        }
        let location = p.dir.location();
        let done = CompletedSnapshot {
            id: p.id,
            location: location.clone(),
            timestamp_ms,
            size: meta.total_bytes(),
            duration_ms: p.started.elapsed().as_millis() as u64,
        };
        tracing::info!(job = %self.job_id, id = p.id, kind = %p.kind, location = %location,
            bytes = done.size, ms = done.duration_ms, "snapshot completed");
        {
            let mut st = self.status.lock();
            st.snapshots.completed += 1;
            st.snapshots.in_progress = 0;
            match p.kind {
                SnapshotKind::Savepoint => st.snapshots.latest_savepoint = Some(done),
                SnapshotKind::Checkpoint => st.snapshots.latest_checkpoint = Some(done),
            }
        }
        for t in &self.all_tasks {
            let _ = t.send(Control::Complete(p.id));
        }
        if let Some(drain) = p.stop {
            for s in &self.sources {
                let _ = s.send(Control::Finish { drain });
            }
        }
        if p.kind == SnapshotKind::Checkpoint {
            self.retain_checkpoints();
        }
        if let Some(r) = p.reply {
            let _ = r.send(Ok(location));
        }
    }

    /// Deletes completed checkpoints beyond the retained number, oldest first.
    fn retain_checkpoints(&self) {
        let Some(cfg) = &self.checkpoints else { return };
        let Ok(dirs) = paths::job_checkpoints(&cfg.dir, &self.job_id).list_dirs() else {
            return;
        };
        let mut ids = paths::checkpoint_ids(&dirs);
        ids.sort_unstable();
        let keep = cfg.retained.max(1) as usize;
        if ids.len() > keep {
            for id in &ids[..ids.len() - keep] {
                let _ = paths::checkpoint(&cfg.dir, &self.job_id, *id).delete_all();
            }
        }
    }
}
