//! The stream engine: runs one job graph in this process, takes barrier-aligned asynchronous
//! snapshots (checkpoints and savepoints), and restores from them by operator uid, at any
//! parallelism. `start` is the whole public surface; `JobHandle` controls a running job.

pub mod access;
pub mod coordinator;
pub mod expr;
pub mod graph;
pub mod kafka;
pub mod metrics;
pub mod operators;
pub mod rest;
mod runtime;
pub mod sinks;
pub mod sources;
pub mod spec;
pub mod state;
mod timers;
mod window;

use coordinator::{CheckpointConfig, CoordMsg, Coordinator, Status, StatusCell, TriggerRequest};
pub use coordinator::{CompletedSnapshot, JobState, SnapshotStats};
use graph::{GraphError, JobGraph};
use runtime::{ChainOp, Output, Shared, Task};
use spec::{JobSpec, OperatorSpec};

use crate::savepoint::keygroups::range_for_subtask;
use crate::savepoint::metadata::{MetadataError, SnapshotKind, SnapshotMetadata};
use crate::savepoint::paths;
use crate::savepoint::restore::{self, RestorePlan, RestoreRefused};
use crate::savepoint::store::{Store, StoreError};
pub use crate::savepoint::tools::FileCheck;
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Snapshot(#[from] MetadataError),
    #[error(transparent)]
    Refused(#[from] RestoreRefused),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("restoring from {location}: {reason}")]
    Restore { location: String, reason: String },
    #[error("{0}")]
    Setup(String),
}

#[derive(Clone, Debug)]
pub struct JobOptions {
    /// 32 hex digits; random when absent. A restarted engine keeps its job id so that it finds
    /// its own checkpoints.
    pub job_id: Option<String>,
    /// Start from this savepoint (or checkpoint) directory.
    pub savepoint: Option<String>,
    pub allow_non_restored_state: bool,
    /// Overrides the job's default parallelism.
    pub parallelism: Option<u32>,
    /// How long a snapshot may take before it is abandoned.
    pub snapshot_timeout: Duration,
    /// Threads writing state files.
    pub writer_threads: usize,
    /// The writer threads' nice value (0..=19; Linux; 0 by default, below the tasks'
    /// `task_nice`). Raised to the tasks' or past it, when the cores are busy a task's batch
    /// waits less behind a writer, and a savepoint of a running job takes longer and holds more
    /// copied state meanwhile; with a core to spare it changes nothing.
    pub writer_nice: i32,
    /// The task threads' nice value (0..=19; Linux; 3 by default), and so that of the threads
    /// they start. Above the engine's other threads (the writers at `writer_nice`, the
    /// coordinator, the REST API's): when the cores are busy, a savepoint of a running job is
    /// written sooner, so it holds less copied state meanwhile, and the engine answers its
    /// controller without waiting behind the tasks. Among themselves the tasks share the cores
    /// as before. Savepoint bench, 1 GB at p=2, alternating: at 0 the savepoint took
    /// 1.33-1.59 s, the peak was 1,549-1,561 MB and the p99 stall 12.6-14.4 ms; at 3,
    /// 0.85-0.96 s, 1,477-1,505 MB and 16.5-18.1 ms (the tasks wait more behind the writers);
    /// keyed-count throughput alike.
    pub task_nice: i32,
    /// Sinks drop their records until a cut-over (the new version of a blue-green switch,
    /// catching up beside the old one). A restart from a checkpoint of this job taken after
    /// the cut-over writes again.
    pub shadow: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            job_id: None,
            savepoint: None,
            allow_non_restored_state: false,
            parallelism: None,
            snapshot_timeout: Duration::from_secs(600),
            writer_threads: 2,
            writer_nice: runtime::WRITER_NICE,
            task_nice: runtime::TASK_NICE,
            shadow: false,
        }
    }
}

/// The sources of a job as the REST API shows them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourcesView {
    /// Every source subtask holds at its bound (or is out of input).
    pub holding: bool,
    /// Every source subtask has carried out the newest hold or release command (so
    /// `overrun` is complete).
    pub settled: bool,
    /// Sinks drop their records until the cut-over.
    pub shadow: bool,
    pub positions: Vec<crate::savepoint::metadata::SplitPosition>,
    /// Splits that were already past the last hold's bound.
    pub overrun: Vec<String>,
    /// Why source subtasks cannot read now (e.g. brokers unreachable), while they retry.
    pub problems: Vec<String>,
    /// Records the sources skipped because they did not parse.
    pub skipped: u64,
    /// Each source subtask's watermark and flow.
    pub subtasks: Vec<SourceSubtaskView>,
}

/// One source subtask as the REST API and /metrics show it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceSubtaskView {
    pub subtask: u32,
    /// None before its first record (and once out of input: i64::MAX).
    pub watermark: Option<i64>,
    /// No records for `watermarks.idleTimeout`.
    pub idle: bool,
    /// Not reading: more than `watermarks.maxDrift` ahead of the slowest source subtask.
    pub paused_for_alignment: bool,
    /// Its splits and the position of each.
    pub positions: Vec<crate::savepoint::metadata::SplitPosition>,
    /// Records left in its splits (Kafka: to the brokers' last stable offsets), where the
    /// source knows.
    pub pending_records: Option<u64>,
}

/// Counters of one operator.
#[derive(Clone, Debug)]
pub struct VertexStats {
    pub uid: String,
    pub name: String,
    pub kind: String,
    pub parallelism: u32,
    pub records_in: u64,
    pub records_out: u64,
    /// The smallest watermark among its subtasks' inputs (a source: the one it sends); None
    /// before the first.
    pub watermark: Option<i64>,
    /// Each subtask's input watermark (i64::MIN before its first), as Flink's
    /// `currentInputWatermark`.
    pub subtask_watermarks: Vec<i64>,
    /// Records dropped as later than the watermark allows.
    pub late_records_dropped: u64,
    /// Per subtask, per input: how full the input channel is (0 to 1).
    pub input_usage: Vec<Vec<f64>>,
}

/// A running (or ended) job.
pub struct JobHandle {
    id: String,
    graph: Arc<JobGraph>,
    coord: Sender<CoordMsg>,
    shared: Arc<Shared>,
    status: Arc<StatusCell>,
    restored_from: Option<String>,
    /// How often checkpoints are taken, if they are.
    checkpoint_interval: Option<Duration>,
    start_time_ms: u64,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// The two ends of a channel between tasks.
type Channel = (Sender<runtime::Msg>, Receiver<runtime::Msg>);

/// Batches buffered towards a downstream subtask, shared out over its inputs…
const INPUT_BATCHES: usize = 16;
/// …but at least this many per input.
const MIN_INPUT_BATCHES: usize = 4;

pub fn new_job_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Finds the newest completed checkpoint of a job under a checkpoint directory.
pub fn latest_checkpoint(
    dir: &Store,
    job_id: &str,
) -> Result<Option<SnapshotMetadata>, StartError> {
    let mut ids = paths::checkpoint_ids(&paths::job_checkpoints(dir, job_id).list_dirs()?);
    ids.sort_unstable_by(|a, b| b.cmp(a));
    for id in ids {
        match SnapshotMetadata::read(&paths::checkpoint(dir, job_id, id)) {
            Ok(m) => return Ok(Some(m)),
            Err(MetadataError::Incomplete(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Which snapshot a starting job restores from: the newest completed checkpoint of the same
/// job when it is newer than the given savepoint, else the savepoint.
fn choose_snapshot(
    spec: &JobSpec,
    job_id: &str,
    savepoint: Option<&str>,
) -> Result<Option<(Store, SnapshotMetadata)>, StartError> {
    let from_savepoint = match savepoint {
        Some(path) => {
            let store = Store::open(path)?;
            let meta = SnapshotMetadata::read(&store)?;
            Some((store, meta))
        }
        None => None,
    };
    let checkpoint = match &spec.checkpoints {
        Some(c) => {
            let dir = Store::open(&c.dir)?;
            latest_checkpoint(&dir, job_id)?
                .map(|m| (paths::checkpoint(&dir, job_id, m.snapshot_id), m))
        }
        None => None,
    };
    Ok(match (from_savepoint, checkpoint) {
        (Some(sp), Some(ck)) if ck.1.timestamp_ms > sp.1.timestamp_ms => {
            tracing::info!(checkpoint = %ck.0.location(), savepoint = %sp.0.location(),
                "a newer checkpoint of this job exists; resuming from it instead of the savepoint");
            Some(ck)
        }
        (Some(sp), _) => Some(sp),
        (None, Some(ck)) => {
            tracing::info!(checkpoint = %ck.0.location(), "resuming from the newest checkpoint of this job");
            Some(ck)
        }
        (None, None) => None,
    })
}

struct Restored {
    dir: Store,
    plan: RestorePlan,
}

fn restore_err(dir: &Store, reason: impl ToString) -> StartError {
    StartError::Restore {
        location: dir.location(),
        reason: reason.to_string(),
    }
}

/// Validates, restores and starts a job. Returns once every task has its state loaded, or
/// with the first error (nothing keeps running then).
pub fn start(spec: &JobSpec, opts: JobOptions) -> Result<JobHandle, StartError> {
    let mut graph = JobGraph::build(spec, opts.parallelism)?;
    let job_id = opts.job_id.clone().unwrap_or_else(new_job_id);
    if job_id.len() != 32 || !job_id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(StartError::Setup(format!(
            "job id '{job_id}' must be 32 hex digits"
        )));
    }
    let restored = match choose_snapshot(spec, &job_id, opts.savepoint.as_deref())? {
        None => None,
        Some((dir, meta)) => {
            if let Some(saved) = meta
                .operators
                .iter()
                .find(|o| !o.keyed_states.is_empty() && graph.nodes.iter().any(|n| n.uid == o.uid))
            {
                graph.adopt_max_parallelism(saved.max_parallelism);
            }
            let plan = restore::plan(
                &dir.location(),
                &meta,
                &graph.operator_decls(),
                opts.allow_non_restored_state,
            )?;
            for dropped in &plan.dropped {
                tracing::warn!(state = %dropped, "saved state not restored (allowNonRestoredState)");
            }
            plan.verify_files(&dir).map_err(|e| restore_err(&dir, e))?;
            Some(Arc::new(Restored { dir, plan }))
        }
    };
    let restored_from = restored.as_ref().map(|r| r.dir.location());
    // Shadow mode as asked for, unless this job resumes from its own checkpoint: then as it
    // was when that checkpoint was taken (before or after its cut-over).
    let shadow = match &restored {
        Some(r)
            if r.plan.snapshot.job_id == job_id
                && r.plan.snapshot.kind == SnapshotKind::Checkpoint =>
        {
            r.plan.snapshot.shadow
        }
        _ => opts.shadow,
    };
    if shadow {
        tracing::info!(job = %job_id, "shadow mode: sinks write nothing until the cut-over");
    }
    if let Some(r) = &restored {
        tracing::info!(job = %job_id, from = %r.dir.location(), kind = %r.plan.snapshot.kind,
            snapshot = r.plan.snapshot.snapshot_id, "restoring job state");
        // The generator's splits must match: their positions are strides of the split count.
        for n in &graph.nodes {
            if let (OperatorSpec::Generator(g), Some(op)) = (&n.spec, r.plan.operators.get(&n.uid))
            {
                let lists = op
                    .load_operator_lists(&r.dir, 1, &n.operator_states)
                    .map_err(|e| restore_err(&r.dir, e))?;
                let total = lists
                    .first()
                    .and_then(|l| l.first())
                    .map(Vec::len)
                    .unwrap_or(0);
                if total != g.splits as usize {
                    return Err(restore_err(
                        &r.dir,
                        format!(
                            "generator '{}': the snapshot has {total} splits, the job declares {}; the number of splits cannot change while state exists",
                            n.uid, g.splits
                        ),
                    ));
                }
            }
        }
    }
    // A Kafka topic that does not exist is refused now, while the brokers can say so.
    for n in &graph.nodes {
        if let OperatorSpec::KafkaSource(k) = &n.spec {
            kafka::source::check_topics(&n.uid, k).map_err(StartError::Setup)?;
        }
    }
    // Sinks that commit with snapshots: commit what the restored snapshot staged, and drop
    // (file sink) or abort (exactly-once Kafka sink) what an earlier run left after it. In
    // shadow mode the old version, still running, owns both.
    for n in graph.nodes.iter().filter(|_| !shadow) {
        match &n.spec {
            OperatorSpec::FileSink(f) => {
                let rows = staged_rows(restored.as_deref(), n)?;
                sinks::prepare_file_sink(&f.path, &n.uid, &job_id, &rows)
                    .map_err(StartError::Setup)?;
            }
            OperatorSpec::KafkaSink(k) => {
                let rows = staged_rows(restored.as_deref(), n)?;
                let prefix = kafka::sink::prefix_of(k, &graph.name, &n.uid);
                kafka::sink::prepare(k, &prefix, &n.uid, &rows).map_err(StartError::Setup)?;
            }
            _ => {}
        }
    }
    let checkpoints = match &spec.checkpoints {
        Some(c) => Some(CheckpointConfig {
            interval: spec::parse_duration("checkpoints.interval", &c.interval)
                .map_err(StartError::Setup)?,
            dir: Store::open(&c.dir)?,
            retained: c.retained,
        }),
        None => None,
    };
    let checkpoint_interval = checkpoints.as_ref().map(|c| c.interval);
    let graph = Arc::new(graph);
    let n_nodes = graph.nodes.len();
    let source_stage = &graph.stages[0];
    let shared = Arc::new(Shared {
        cancel: AtomicBool::new(false),
        records_in: (0..n_nodes).map(|_| AtomicU64::new(0)).collect(),
        records_out: (0..n_nodes).map(|_| AtomicU64::new(0)).collect(),
        active_sources: AtomicUsize::new(source_stage.parallelism as usize),
        source_gate: Mutex::new(false),
        max_stall_us: AtomicU64::new(0),
        freeing: Mutex::new(Vec::new()),
        sources: (0..source_stage.parallelism)
            .map(|_| Mutex::new(runtime::SourceReport::default()))
            .collect(),
        shadow: AtomicBool::new(shadow),
        source_epoch: AtomicU64::new(0),
        source_watermarks: (0..source_stage.parallelism)
            .map(|_| AtomicI64::new(i64::MIN))
            .collect(),
        late_dropped: (0..n_nodes).map(|_| AtomicU64::new(0)).collect(),
        tasks: graph
            .stages
            .iter()
            .enumerate()
            .map(|(si, st)| {
                let inputs = match si {
                    0 => 0,
                    _ => graph.stages[si - 1].parallelism as usize,
                };
                (0..st.parallelism)
                    .map(|_| runtime::TaskGauges::new(inputs))
                    .collect()
            })
            .collect(),
    });
    let status = Arc::new(StatusCell {
        status: Mutex::new(Status {
            state: JobState::Created,
            failure: None,
            snapshots: SnapshotStats::default(),
            end_time_ms: None,
        }),
        changed: Condvar::new(),
    });
    let (coord_tx, coord_rx) = crossbeam_channel::unbounded::<CoordMsg>();
    let (writer_tx, mut threads) = runtime::start_writers(
        opts.writer_threads.max(1),
        opts.writer_nice,
        coord_tx.clone(),
    );

    // Channels: per stage but the first, one per (subtask, upstream subtask), so that each
    // input is read fairly and a fast one is held back by its own full channel.
    // [stage][subtask][upstream subtask]
    let mut inputs: Vec<Vec<Vec<Channel>>> = Vec::new();
    for (si, stage) in graph.stages.iter().enumerate() {
        let upstream = match si {
            0 => 0,
            _ => graph.stages[si - 1].parallelism as usize,
        };
        let capacity = (INPUT_BATCHES / upstream.max(1)).max(MIN_INPUT_BATCHES);
        inputs.push(
            (0..stage.parallelism)
                .map(|_| {
                    (0..upstream)
                        .map(|_| crossbeam_channel::bounded(capacity))
                        .collect()
                })
                .collect(),
        );
    }
    let mut tasks = Vec::new();
    let mut source_controls = Vec::new();
    let mut all_controls = Vec::new();
    for (si, stage) in graph.stages.iter().enumerate() {
        let next = graph.stages.get(si + 1);
        for sub in 0..stage.parallelism {
            let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
            all_controls.push(ctl_tx.clone());
            if si == 0 {
                source_controls.push(ctl_tx);
            }
            // To each subtask of the next stage, through its channel from this subtask.
            let output = Output::new(
                next.and_then(|n| n.input),
                next.map(|_| {
                    inputs[si + 1]
                        .iter()
                        .map(|from| from[sub as usize].0.clone())
                        .collect()
                })
                .unwrap_or_default(),
                sub,
                graph.max_parallelism,
            );
            let input: Vec<Receiver<runtime::Msg>> = inputs[si][sub as usize]
                .iter()
                .map(|(_, rx)| rx.clone())
                .collect();
            tasks.push((si, sub, input, output, ctl_rx));
        }
    }
    drop(inputs);

    let (init_tx, init_rx) = crossbeam_channel::unbounded::<Result<(), String>>();
    let task_count = tasks.len();
    let decoders = restore_decoders(&graph, restored.as_deref());
    let task_nice = opts.task_nice;
    for (si, sub, input, output, ctl_rx) in tasks {
        let graph = graph.clone();
        let shared = shared.clone();
        let coord = coord_tx.clone();
        let writer = writer_tx.clone();
        let restored = restored.clone();
        let init_tx = init_tx.clone();
        let task_job_id = job_id.clone();
        let handle = std::thread::Builder::new()
            .name(format!("sjob-task-{si}-{sub}"))
            .spawn(move || {
                runtime::lower_priority(task_nice);
                let built = build_task(
                    &graph,
                    si,
                    sub,
                    restored.as_deref(),
                    decoders,
                    &task_job_id,
                    shadow,
                );
                let (source, chain, side_sinks) = match built {
                    Ok(parts) => {
                        let _ = init_tx.send(Ok(()));
                        parts
                    }
                    Err(e) => {
                        let _ = init_tx.send(Err(e.clone()));
                        let _ = coord.send(CoordMsg::TaskDone { result: Err(e) });
                        return;
                    }
                };
                drop(init_tx);
                let mut task = Task {
                    stage: si,
                    subtask: sub,
                    watermarks: graph.watermarks,
                    source,
                    chain,
                    side_sinks,
                    inputs: input,
                    output,
                    control: ctl_rx,
                    coord: coord.clone(),
                    writer,
                    shared,
                };
                let result = task.run();
                // Sinks are dropped here (a Kafka sink aborts its open transaction), keyed
                // state elsewhere: freeing a large state takes a pointer chase per entry, and
                // the job's end (a stopped upgrade's old process) does not wait for it.
                task.release_keyed_state();
                drop(task);
                let _ = coord.send(CoordMsg::TaskDone { result });
            })
            .map_err(|e| StartError::Setup(format!("cannot start a task thread: {e}")))?;
        threads.push(handle);
    }
    drop(writer_tx);
    drop(init_tx);

    let coordinator = Coordinator {
        job_id: job_id.clone(),
        graph: graph.clone(),
        shared: shared.clone(),
        status: status.clone(),
        sources: source_controls,
        all_tasks: all_controls,
        tasks_running: task_count,
        next_id: restored
            .as_ref()
            .map(|r| r.plan.snapshot.snapshot_id + 1)
            .unwrap_or(1),
        timeout: opts.snapshot_timeout,
        checkpoints,
        restored_from: restored_from.clone(),
    };
    threads.push(
        std::thread::Builder::new()
            .name("sjob-coordinator".into())
            .spawn(move || coordinator.run(coord_rx))
            .map_err(|e| StartError::Setup(format!("cannot start the coordinator: {e}")))?,
    );

    let handle = JobHandle {
        id: job_id,
        graph,
        coord: coord_tx,
        shared,
        status,
        restored_from,
        checkpoint_interval,
        start_time_ms: coordinator::now_ms(),
        threads: Mutex::new(threads),
    };
    let mut first_error = None;
    for _ in 0..task_count {
        match init_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => break,
        }
    }
    if let Some(e) = first_error {
        handle.cancel();
        handle.wait();
        let location = handle.restored_from.clone().unwrap_or_default();
        return Err(if location.is_empty() {
            StartError::Setup(e)
        } else {
            StartError::Restore {
                location,
                reason: e,
            }
        });
    }
    {
        let mut st = handle.status.lock();
        if st.state == JobState::Created {
            st.state = JobState::Running;
        }
    }
    tracing::info!(job = %handle.id, name = %handle.graph.name, restored_from = ?handle.restored_from, "job running");
    Ok(handle)
}

/// A sink's restored list state (what it staged), every subtask's rows in one list.
fn staged_rows(
    restored: Option<&Restored>,
    node: &graph::Node,
) -> Result<Vec<crate::savepoint::value::Row>, StartError> {
    let Some((r, op)) = restored.and_then(|r| r.plan.operators.get(&node.uid).map(|op| (r, op)))
    else {
        return Ok(Vec::new());
    };
    Ok(op
        .load_operator_lists(&r.dir, 1, &node.operator_states)
        .map_err(|e| restore_err(&r.dir, e))?
        .into_iter()
        .next()
        .and_then(|l| l.into_iter().next())
        .unwrap_or_default())
}

type Parts = (
    Option<(usize, String, Box<dyn sources::Source>)>,
    Vec<ChainOp>,
    Vec<ChainOp>,
);

/// How many threads each restoring task decodes its keyed state with: the cores shared
/// among the tasks that restore keyed state at once (all build at the same time), at least
/// one. An upgrade's job at parallelism 1 so decodes on two cores, its one task inserting on
/// a third thread (100 MB of state: 80-93 ms of restore bound by the one decoding thread).
fn restore_decoders(graph: &JobGraph, restored: Option<&Restored>) -> usize {
    let Some(r) = restored else {
        return 1;
    };
    let restoring: usize = graph
        .stages
        .iter()
        .filter(|stage| {
            stage.nodes.iter().any(|&ni| {
                let node = &graph.nodes[ni];
                !node.keyed_states.is_empty() && r.plan.operators.contains_key(&node.uid)
            })
        })
        .map(|stage| stage.parallelism as usize)
        .sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / restoring.max(1)).max(1)
}

/// Builds one task's source and operators and loads their restored state.
fn build_task(
    graph: &JobGraph,
    si: usize,
    sub: u32,
    restored: Option<&Restored>,
    decoders: usize,
    job_id: &str,
    shadow: bool,
) -> Result<Parts, String> {
    let stage = &graph.stages[si];
    let p = stage.parallelism;
    let range = range_for_subtask(graph.max_parallelism, p, sub);
    let mut source = None;
    let mut chain: Vec<ChainOp> = Vec::new();
    let mut side_sinks = Vec::new();
    for &ni in &stage.nodes {
        let node = &graph.nodes[ni];
        let saved = restored.and_then(|r| r.plan.operators.get(&node.uid).map(|op| (r, op)));
        let lists = match saved {
            Some((r, op)) if !node.operator_states.is_empty() => op
                .load_operator_lists(&r.dir, p, &node.operator_states)
                .map_err(|e| e.to_string())?
                .into_iter()
                .nth(sub as usize),
            _ => None,
        };
        if node.is_source() {
            let mut s = sources::build(node, sub, p)?;
            if let Some(t) = graph.watermarks.idle_timeout {
                s.set_idle_timeout(t);
            }
            if let Some(lists) = lists {
                s.restore_lists(lists)?;
            }
            source = Some((ni, node.uid.clone(), s));
            continue;
        }
        let mut op: Box<dyn operators::Operator> = match &node.spec {
            OperatorSpec::FileSink(f) => Box::new(sinks::FileSink::new(
                &f.path, &node.uid, sub, job_id, shadow,
            )),
            OperatorSpec::KafkaSink(k) => Box::new(kafka::sink::KafkaSink::new(
                &node.uid,
                k,
                &graph.name,
                sub,
                shadow,
            )?),
            OperatorSpec::StdoutSink(_) => Box::new(sinks::StdoutSink { shadow }),
            OperatorSpec::DiscardSink(_) => Box::new(sinks::DiscardSink),
            _ => operators::build(node, range, graph.max_parallelism)?,
        };
        if let Some((r, saved_op)) = saved {
            if let Some(ks) = op.keyed_state() {
                saved_op
                    .load_keyed(&r.dir, range, decoders, |s, kg, entries| {
                        ks.insert_all(s, kg, entries)
                    })
                    .map_err(|e| e.to_string())?;
            }
            // File sinks had their staged files committed before the tasks started.
            if !matches!(
                node.spec,
                OperatorSpec::FileSink(_) | OperatorSpec::KafkaSink(_)
            ) && let Some(lists) = lists
            {
                op.restore_lists(lists)?;
            }
            op.restored();
        }
        let built = ChainOp {
            node: ni,
            uid: node.uid.clone(),
            stateful: node.is_stateful(),
            op,
            late_counted: 0,
            side: None,
        };
        match node.side_of {
            None => chain.push(built),
            Some(window) => {
                let producer = chain
                    .iter_mut()
                    .find(|c: &&mut ChainOp| c.node == window)
                    .ok_or_else(|| format!("'{}': its window is not in this task", node.uid))?;
                producer.side = Some(side_sinks.len());
                side_sinks.push(built);
            }
        }
    }
    Ok((source, chain, side_sinks))
}

impl JobHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn graph(&self) -> &JobGraph {
        &self.graph
    }

    pub fn state(&self) -> JobState {
        self.status.lock().state
    }

    pub fn failure(&self) -> Option<String> {
        self.status.lock().failure.clone()
    }

    pub fn restored_from(&self) -> Option<&str> {
        self.restored_from.as_deref()
    }

    /// How often checkpoints are taken (none: only savepoints).
    pub fn checkpoint_interval(&self) -> Option<Duration> {
        self.checkpoint_interval
    }

    pub fn start_time_ms(&self) -> u64 {
        self.start_time_ms
    }

    pub fn end_time_ms(&self) -> Option<u64> {
        self.status.lock().end_time_ms
    }

    pub fn snapshot_stats(&self) -> SnapshotStats {
        self.status.lock().snapshots.clone()
    }

    pub fn vertices(&self) -> Vec<VertexStats> {
        self.graph
            .nodes
            .iter()
            .map(|n| {
                let stage = self
                    .graph
                    .stages
                    .iter()
                    .position(|st| st.nodes.contains(&n.index));
                let tasks = stage
                    .and_then(|si| self.shared.tasks.get(si))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                // The stage's input is its first operator's.
                let heads_stage =
                    stage.is_some_and(|si| self.graph.stages[si].nodes.first() == Some(&n.index));
                let subtask_watermarks: Vec<i64> = tasks
                    .iter()
                    .map(|t| t.watermark.load(Ordering::Relaxed))
                    .collect();
                let watermark = subtask_watermarks
                    .iter()
                    .copied()
                    .min()
                    .filter(|w| *w != i64::MIN);
                VertexStats {
                    uid: n.uid.clone(),
                    name: n.name.clone(),
                    kind: n.kind.to_owned(),
                    parallelism: n.parallelism,
                    records_in: self.shared.records_in[n.index].load(Ordering::Relaxed),
                    records_out: self.shared.records_out[n.index].load(Ordering::Relaxed),
                    watermark,
                    subtask_watermarks,
                    late_records_dropped: self.shared.late_dropped[n.index].load(Ordering::Relaxed),
                    input_usage: tasks
                        .iter()
                        .filter(|_| heads_stage)
                        .map(|t| {
                            t.input_usage
                                .iter()
                                .map(|u| f64::from(u.load(Ordering::Relaxed)) / 1000.0)
                                .collect()
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// The longest time one batch or one synchronous snapshot step took since the last call,
    /// in microseconds (resets it).
    pub fn take_max_stall_us(&self) -> u64 {
        self.shared.max_stall_us.swap(0, Ordering::Relaxed)
    }

    fn trigger(
        &self,
        kind: SnapshotKind,
        target: &str,
        stop: Option<bool>,
    ) -> Receiver<Result<String, String>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let req = TriggerRequest {
            kind,
            target: target.to_owned(),
            stop,
            reply: Some(tx),
        };
        if let Err(e) = self.coord.send(CoordMsg::Trigger(req))
            && let CoordMsg::Trigger(req) = e.into_inner()
            && let Some(r) = req.reply
        {
            let _ = r.send(Err("the job has ended".into()));
        }
        rx
    }

    /// Triggers a savepoint into `target_dir`; the receiver yields its path or the cause of
    /// its failure. With `stop`, the job ends once it completes (`Some(drain)`).
    pub fn trigger_savepoint(
        &self,
        target_dir: &str,
        stop: Option<bool>,
    ) -> Receiver<Result<String, String>> {
        self.trigger(SnapshotKind::Savepoint, target_dir, stop)
    }

    /// Holds the sources at `bound` (None: where they are now). Splits already past the bound
    /// show in `sources().overrun`, and are then not held.
    pub fn hold_sources(&self, bound: Option<sources::Bound>) -> Result<(), String> {
        self.source_command(|reply| CoordMsg::Hold {
            bound: bound.map(Arc::new),
            reply,
        })
    }

    /// Lets the sources read on; with `cut_over`, first sends the cut-over marker that takes
    /// the sinks out of shadow mode.
    pub fn release_sources(&self, cut_over: bool) -> Result<(), String> {
        self.source_command(|reply| CoordMsg::Release { cut_over, reply })
    }

    fn source_command(
        &self,
        make: impl FnOnce(Sender<Result<(), String>>) -> CoordMsg,
    ) -> Result<(), String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.coord
            .send(make(tx))
            .map_err(|_| "the job has ended".to_owned())?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the job did not answer (it is ending)".to_owned())?
    }

    /// The sources' positions, whether every one holds, and the splits past the last bound.
    pub fn sources(&self) -> SourcesView {
        let mut view = SourcesView {
            holding: true,
            settled: true,
            shadow: self.shared.shadow.load(Ordering::SeqCst),
            ..SourcesView::default()
        };
        // A subtask that has not carried out the newest command yet does not hold by it.
        let epoch = self.shared.source_epoch.load(Ordering::SeqCst);
        for (subtask, slot) in self.shared.sources.iter().enumerate() {
            let r = match slot.lock() {
                Ok(r) => r.clone(),
                Err(p) => p.into_inner().clone(),
            };
            view.subtasks.push(SourceSubtaskView {
                subtask: subtask as u32,
                watermark: r.watermark,
                idle: r.idle,
                paused_for_alignment: r.paused_for_alignment,
                positions: r.positions.clone(),
                pending_records: r.pending_records,
            });
            view.holding &= r.holding && r.epoch == epoch;
            view.settled &= r.epoch == epoch;
            view.positions.extend(r.positions);
            view.overrun.extend(r.overrun);
            view.problems.extend(r.problem);
            view.skipped += r.skipped;
        }
        view.positions.sort_by(|a, b| a.split.cmp(&b.split));
        view
    }

    /// Triggers a checkpoint now (checkpoints must be configured).
    pub fn trigger_checkpoint(&self) -> Receiver<Result<String, String>> {
        self.trigger(SnapshotKind::Checkpoint, "", None)
    }

    /// Takes a savepoint and waits for it.
    pub fn savepoint(&self, target_dir: &str) -> Result<String, String> {
        self.trigger_savepoint(target_dir, None)
            .recv()
            .map_err(|_| "the job ended before the savepoint completed".to_owned())?
    }

    /// Takes a savepoint, then ends the job; waits for both.
    pub fn stop_with_savepoint(&self, target_dir: &str, drain: bool) -> Result<String, String> {
        let path = self
            .trigger_savepoint(target_dir, Some(drain))
            .recv()
            .map_err(|_| "the job ended before the savepoint completed".to_owned())??;
        self.wait();
        Ok(path)
    }

    /// Cancels the job: no output after the last completed snapshot is committed.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
    }

    /// Waits until the job ends and returns its final state.
    pub fn wait(&self) -> JobState {
        let mut st = self.status.lock();
        while !st.state.is_terminal() {
            st = match self.status.changed.wait(st) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        let state = st.state;
        drop(st);
        let threads: Vec<_> = match self.threads.lock() {
            Ok(mut g) => g.drain(..).collect(),
            Err(p) => p.into_inner().drain(..).collect(),
        };
        for t in threads {
            let _ = t.join();
        }
        state
    }

    /// Waits for the job's end (`wait`) and then until its keyed state is freed, which
    /// happens after the end, off its path: for a measurement of what comes next in this
    /// process (a restore's time or memory) that the freeing would disturb.
    pub fn wait_freed(&self) -> JobState {
        let state = self.wait();
        let freeing: Vec<_> = match self.shared.freeing.lock() {
            Ok(mut g) => g.drain(..).collect(),
            Err(p) => p.into_inner().drain(..).collect(),
        };
        for t in freeing {
            let _ = t.join();
        }
        state
    }

    /// Waits up to `timeout`; `None` if the job is still running then.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<JobState> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.status.lock();
        while !st.state.is_terminal() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            st = match self.status.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        drop(st);
        Some(self.wait())
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        if !self.state().is_terminal() {
            self.cancel();
        }
    }
}

/// The outcome of checking a snapshot against a job without running it.
pub struct RestoreCheck {
    pub metadata: SnapshotMetadata,
    pub plan: RestorePlan,
}

/// Would this snapshot restore into this job? The same planning as `start`, plus a check of
/// the state files as deep as `files` says. Errors list every problem.
pub fn check_restore(
    spec: &JobSpec,
    location: &str,
    parallelism: Option<u32>,
    allow_non_restored_state: bool,
    files: FileCheck,
) -> Result<RestoreCheck, Vec<String>> {
    let mut graph = JobGraph::build(spec, parallelism).map_err(|e| e.0)?;
    let dir = Store::open(location).map_err(|e| vec![e.to_string()])?;
    let meta = SnapshotMetadata::read(&dir).map_err(|e| vec![e.to_string()])?;
    if let Some(saved) = meta
        .operators
        .iter()
        .find(|o| !o.keyed_states.is_empty() && graph.nodes.iter().any(|n| n.uid == o.uid))
    {
        graph.adopt_max_parallelism(saved.max_parallelism);
    }
    let mut problems = Vec::new();
    let plan = match restore::plan(
        &dir.location(),
        &meta,
        &graph.operator_decls(),
        allow_non_restored_state,
    ) {
        Ok(p) => Some(p),
        Err(refused) => {
            problems.extend(refused.0.iter().map(|p| p.to_string()));
            None
        }
    };
    problems.extend(crate::savepoint::tools::verify_files(&dir, &meta, files));
    match plan {
        Some(plan) if problems.is_empty() => Ok(RestoreCheck {
            metadata: meta,
            plan,
        }),
        _ => Err(problems),
    }
}
