//! Tasks: one thread per (stage, subtask) running a chain of operators, connected by bounded
//! channels that carry batches, watermarks, barriers and end-of-input: one channel per
//! (upstream subtask, downstream subtask), so a downstream task reads its inputs fairly and a
//! fast input fills only its own channel and is then held back (backpressure per input).
//!
//! Watermarks: a task's watermark is the smallest of its inputs' that are neither ended nor
//! idle. A source subtask without records for `watermarks.idleTimeout` sends `Idle`, so it
//! does not hold the others back; with `watermarks.maxDrift`, a source subtask whose watermark
//! runs further than that ahead of the slowest one stops reading until it catches up.
//!
//! Barriers: sources inject them when the coordinator triggers a snapshot; a task with several
//! inputs aligns them (elements from an input whose barrier has arrived are held back until
//! every input has delivered it), snapshots its operators' state synchronously (cheap: shared
//! views), forwards the barrier, and hands the views to the writer pool, which writes the state
//! files and acknowledges each to the coordinator.

use super::coordinator::CoordMsg;
use super::graph::Partitioning;
use super::operators::Operator;
use super::sources::Bound;
use super::sources::{Poll, Source};
use super::state::KeyedState;
use crate::savepoint::keygroups::{key_group_of_hash, subtask_for_key_group};
use crate::savepoint::metadata::{Compression, SplitPosition};
use crate::savepoint::paths;
use crate::savepoint::statefile::{self, SubtaskSnapshot, WriterThreads};
use crate::savepoint::store::Store;
use crate::savepoint::value::Record;
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const BATCH: usize = 1024;

pub(crate) struct Barrier {
    pub id: u64,
    pub dir: Store,
    /// Set for stop-with-savepoint: sources emit nothing after the barrier.
    pub stop: bool,
    /// Set by the coordinator when the snapshot has failed: writers skip its state files.
    pub aborted: AtomicBool,
    /// How the state files' blocks are compressed (the job's `stateCompression`).
    pub compression: Compression,
    /// Held by the snapshot until its last task and writer let go (see `HugePagesOff`).
    pub _huge_pages_off: crate::allocator::HugePagesOff,
}

pub(crate) enum Element {
    Batch(Vec<Record>),
    Watermark(i64),
    /// The sender has no records for now: its watermark holds nothing back until it sends a
    /// record or a watermark again.
    Idle,
    Barrier(Arc<Barrier>),
    /// The cut-over point of a blue-green switch: everything after it in every channel comes
    /// from input at or past the cut-over positions. Aligned like a barrier; no snapshot.
    CutOver,
    End,
}

pub(crate) type Msg = (u32, Element);

pub(crate) enum Control {
    Trigger(Arc<Barrier>),
    Complete(u64),
    /// A stop-with-savepoint failed: sources go on.
    Resume,
    /// A stop-with-savepoint completed: sources end the input (with a final watermark if drain).
    Finish {
        drain: bool,
    },
    /// Sources stop reading at these positions (None: where they are now). `epoch` numbers
    /// the hold and release commands, so a report is known to answer the newest one.
    Hold {
        bound: Option<Arc<Bound>>,
        epoch: u64,
    },
    /// Sources read on; with `cut_over`, each first sends the cut-over marker downstream.
    Release {
        cut_over: bool,
        epoch: u64,
    },
}

/// A source subtask as the REST API shows it.
#[derive(Clone, Debug, Default)]
pub(crate) struct SourceReport {
    pub positions: Vec<SplitPosition>,
    /// Held (every split with records left is at its bound) or out of input.
    pub holding: bool,
    /// Splits that were past the bound of the last hold (which was then not set).
    pub overrun: Vec<String>,
    /// The newest hold or release command this subtask has carried out.
    pub epoch: u64,
    /// Why the source cannot read now, while it retries.
    pub problem: Option<String>,
    /// Records skipped because they did not parse.
    pub skipped: u64,
    /// The subtask's watermark (None before its first, i64::MAX once out of input).
    pub watermark: Option<i64>,
    /// No records for `watermarks.idleTimeout`.
    pub idle: bool,
    /// Not reading: its watermark is more than `watermarks.maxDrift` ahead of the slowest.
    pub paused_for_alignment: bool,
    /// Records left in its splits, where the source knows.
    pub pending_records: Option<u64>,
}

/// What one task shows of itself while it runs.
pub(crate) struct TaskGauges {
    /// The smallest watermark of its inputs (a source task: the one it sends).
    pub watermark: AtomicI64,
    /// Per input (upstream subtask): how full its channel is, in thousandths.
    pub input_usage: Vec<AtomicU32>,
}

impl TaskGauges {
    pub fn new(inputs: usize) -> TaskGauges {
        TaskGauges {
            watermark: AtomicI64::new(i64::MIN),
            input_usage: (0..inputs).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

/// Counters shared by every task of a job.
pub(crate) struct Shared {
    pub cancel: AtomicBool,
    pub records_in: Vec<AtomicU64>,
    pub records_out: Vec<AtomicU64>,
    /// Source subtasks with input left; at zero the input is exhausted.
    pub active_sources: AtomicUsize,
    /// Held while a trigger is sent and while the input is declared exhausted, so a trigger is
    /// either seen by every source or refused.
    pub source_gate: Mutex<bool>,
    /// The longest time a downstream task spent processing one batch, or any task in the
    /// synchronous part of a snapshot, since the last reset, in µs.
    pub max_stall_us: AtomicU64,
    /// Per source subtask: positions and whether it holds.
    pub sources: Vec<Mutex<SourceReport>>,
    /// The threads freeing ended tasks' keyed state (see `Task::release_keyed_state`).
    pub freeing: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Sinks drop what they receive until the cut-over marker reaches them (a blue-green
    /// switch's new version before the switch). Cleared when the marker is sent.
    pub shadow: AtomicBool,
    /// The number of hold and release commands sent to the sources.
    pub source_epoch: AtomicU64,
    /// Per source subtask: its watermark for alignment (i64::MAX while idle or out of input).
    pub source_watermarks: Vec<AtomicI64>,
    /// Per node: records dropped as late.
    pub late_dropped: Vec<AtomicU64>,
    /// Per stage, per subtask.
    pub tasks: Vec<Vec<TaskGauges>>,
}

pub(crate) struct Output {
    pub partitioning: Option<Partitioning>,
    pub senders: Vec<Sender<Msg>>,
    pub index: u32,
    pub max_parallelism: u32,
    buffers: Vec<Vec<Record>>,
    /// Each record's subtask, for the batch being partitioned (kept to reuse its memory).
    targets: Vec<u32>,
    next: usize,
}

pub(crate) struct Disconnected;

impl Output {
    pub fn new(
        partitioning: Option<Partitioning>,
        senders: Vec<Sender<Msg>>,
        index: u32,
        max_parallelism: u32,
    ) -> Output {
        let n = senders.len();
        Output {
            partitioning,
            senders,
            index,
            max_parallelism,
            buffers: (0..n).map(|_| Vec::new()).collect(),
            targets: Vec::new(),
            next: index as usize,
        }
    }

    fn emit(&mut self, records: Vec<Record>) {
        let n = self.senders.len();
        if records.is_empty() || n == 0 {
            return;
        }
        match self.partitioning {
            Some(Partitioning::Hash) => {
                let p = n as u32;
                // Each record's subtask first, read where the record lies, then each record
                // copied once, straight into its buffer. Moved the plain way, a record went
                // through a copy on the stack (or two) before its buffer, and reading its key
                // from that copy waited for the copy's stores to reach the cache: in some
                // builds the partitioning took as much time as the keyed operator.
                let max = self.max_parallelism;
                self.targets.clear();
                self.targets.extend(records.iter().map(|rec| {
                    let kg = rec
                        .key
                        .as_ref()
                        .map_or(0, |k| key_group_of_hash(k.hash, max));
                    subtask_for_key_group(max, p, kg)
                }));
                let mut counts = vec![0usize; n];
                for &t in &self.targets {
                    counts[t as usize] += 1;
                }
                for (buf, &c) in self.buffers.iter_mut().zip(&counts) {
                    buf.reserve(c);
                }
                let mut records = records;
                let from = records.as_ptr();
                // SAFETY: the batch gives up its records before any is copied (`set_len(0)`),
                // so each is owned once: by the buffer it is copied into, or, should indexing
                // panic, by nobody (leaked, never dropped twice). `i` is below the batch's
                // length (one target per record), and each buffer has room reserved for the
                // records counted for it, so every write is within its capacity.
                unsafe {
                    records.set_len(0);
                    for (i, &t) in self.targets.iter().enumerate() {
                        let buf = &mut self.buffers[t as usize];
                        let len = buf.len();
                        std::ptr::copy_nonoverlapping(from.add(i), buf.as_mut_ptr().add(len), 1);
                        buf.set_len(len + 1);
                    }
                }
            }
            _ => {
                let target = self.next % n;
                self.next = self.next.wrapping_add(1);
                if self.buffers[target].is_empty() {
                    self.buffers[target] = records;
                } else {
                    self.buffers[target].extend(records);
                }
            }
        }
    }

    fn flush(&mut self) -> Result<(), Disconnected> {
        for (i, buf) in self.buffers.iter_mut().enumerate() {
            if !buf.is_empty() {
                let batch = std::mem::take(buf);
                self.senders[i]
                    .send((self.index, Element::Batch(batch)))
                    .map_err(|_| Disconnected)?;
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, make: impl Fn() -> Element) -> Result<(), Disconnected> {
        self.flush()?;
        for s in &self.senders {
            s.send((self.index, make())).map_err(|_| Disconnected)?;
        }
        Ok(())
    }
}

pub(crate) struct ChainOp {
    pub node: usize,
    pub uid: String,
    pub stateful: bool,
    pub op: Box<dyn Operator>,
    /// Late records already counted in `Shared::late_dropped`.
    pub late_counted: u64,
    /// Where this operator's side output goes: an index into `Task::side_sinks`.
    pub side: Option<usize>,
}

/// Runs `batch` through one operator of a chain into `out`: counted in, its side output into
/// its side sink, its late records counted.
fn process_one(
    c: &mut ChainOp,
    side_sinks: &mut [ChainOp],
    shared: &Shared,
    batch: Vec<Record>,
    out: &mut Vec<Record>,
) -> TaskResult {
    shared.records_in[c.node].fetch_add(batch.len() as u64, Ordering::Relaxed);
    c.op.process(batch, out)
        .map_err(|e| format!("operator '{}': {e}", c.uid))?;
    if let Some(sink) = c.side.and_then(|k| side_sinks.get_mut(k)) {
        run_side(sink, shared, c.op.take_side_output())?;
    }
    let late = c.op.late_records_dropped();
    if late != c.late_counted {
        shared.late_dropped[c.node]
            .fetch_add(late.saturating_sub(c.late_counted), Ordering::Relaxed);
        c.late_counted = late;
    }
    Ok(())
}

/// Runs `batch` through a side sink (a window's late-record sink), counting it.
fn run_side(sink: &mut ChainOp, shared: &Shared, batch: Vec<Record>) -> TaskResult {
    if batch.is_empty() {
        return Ok(());
    }
    shared.records_in[sink.node].fetch_add(batch.len() as u64, Ordering::Relaxed);
    sink.op
        .process(batch, &mut Vec::new())
        .map_err(|e| format!("operator '{}': {e}", sink.uid))
}

/// A state file for the writer pool to write.
pub(crate) struct WriteJob {
    pub barrier: Arc<Barrier>,
    pub node: usize,
    pub uid: String,
    pub subtask: u32,
    pub snapshot: SubtaskSnapshot,
    pub positions: Vec<SplitPosition>,
}

/// The writers' default nice value (see `JobOptions::writer_nice`).
pub(crate) const WRITER_NICE: i32 = 0;

/// The tasks' default nice value (see `JobOptions::task_nice`).
pub(crate) const TASK_NICE: i32 = 3;

/// Lowers the calling thread's scheduling priority to `nice` (Linux keeps it per thread; a
/// thread it starts inherits it); a thread already at that nice value or above (a process
/// started with `nice`) keeps its own. Elsewhere, or if refused, the priority stays as it was.
pub(crate) fn lower_priority(nice: i32) {
    let nice = nice.clamp(0, 19);
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: gettid, getpriority and setpriority take and return plain integers and change
    // nothing but this thread's nice value.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        if libc::getpriority(libc::PRIO_PROCESS, tid) < nice {
            libc::setpriority(libc::PRIO_PROCESS, tid, nice);
        }
    }
}

/// Starts the threads that write state files off the processing path, at `nice`.
pub(crate) fn start_writers(
    threads: usize,
    nice: i32,
    coord: Sender<CoordMsg>,
) -> (Sender<WriteJob>, Vec<std::thread::JoinHandle<()>>) {
    let (tx, rx) = crossbeam_channel::unbounded::<WriteJob>();
    let handles = (0..threads)
        .map(|i| {
            let rx = rx.clone();
            let coord = coord.clone();
            std::thread::Builder::new()
                .name(format!("sjob-writer-{i}"))
                .spawn(move || {
                    lower_priority(nice);
                    for mut job in rx {
                        if job.barrier.aborted.load(Ordering::SeqCst) {
                            // The snapshot failed already; its directory is being deleted.
                            continue;
                        }
                        let rel = paths::state_file(&job.uid, job.subtask);
                        let result = statefile::write(
                            &job.barrier.dir,
                            &rel,
                            job.subtask,
                            &mut job.snapshot,
                            job.barrier.compression,
                            // A stop-with-savepoint's tasks are idle, waiting for it.
                            if job.barrier.stop {
                                WriterThreads::Two
                            } else {
                                WriterThreads::One
                            },
                        )
                        .map(|st| (st, job.positions))
                        .map_err(|e| e.to_string());
                        let _ = coord.send(CoordMsg::Ack {
                            id: job.barrier.id,
                            node: job.node,
                            subtask: job.subtask,
                            result,
                        });
                    }
                })
                .unwrap_or_else(|e| panic!("cannot start a state writer thread: {e}"))
        })
        .collect();
    (tx, handles)
}

/// What a downstream task is aligning its inputs on.
enum Aligning {
    Barrier(Arc<Barrier>),
    CutOver,
}

/// Whether a source subtask reads.
#[derive(Default)]
struct SourceFlow {
    /// A stop-with-savepoint's barrier went out: nothing more is read.
    stopping: bool,
    /// Every split with records left is at its hold's bound.
    at_bound: bool,
    /// Out of input.
    exhausted: bool,
    /// No records for `watermarks.idleTimeout` (downstream was sent `Idle`).
    idle_input: bool,
    /// Not reading: too far ahead of the slowest source subtask (`watermarks.maxDrift`).
    paused_for_alignment: bool,
}

impl SourceFlow {
    /// Nothing to read now: wait for control messages.
    fn idle(&self) -> bool {
        self.stopping || self.at_bound || self.exhausted
    }
}

pub(crate) struct Task {
    pub stage: usize,
    pub subtask: u32,
    pub watermarks: super::spec::WatermarkConfig,
    pub source: Option<(usize, String, Box<dyn Source>)>,
    pub chain: Vec<ChainOp>,
    /// Sinks fed by the chain's side outputs (see `ChainOp::side`), outside the chain's flow.
    pub side_sinks: Vec<ChainOp>,
    /// One channel per upstream subtask (none for a source task).
    pub inputs: Vec<Receiver<Msg>>,
    pub output: Output,
    pub control: Receiver<Control>,
    pub coord: Sender<CoordMsg>,
    pub writer: Sender<WriteJob>,
    pub shared: Arc<Shared>,
}

type TaskResult = Result<(), String>;

fn disconnected(_: Disconnected) -> String {
    String::new()
}

impl Task {
    /// Runs records through the chain from operator `from` on.
    fn run_chain(&mut self, from: usize, mut batch: Vec<Record>) -> TaskResult {
        for c in &mut self.chain[from..] {
            if batch.is_empty() {
                return Ok(());
            }
            // Empty: most operators hand their (changed) input batch on as the output.
            let mut out = Vec::new();
            process_one(c, &mut self.side_sinks, &self.shared, batch, &mut out)?;
            self.shared.records_out[c.node].fetch_add(out.len() as u64, Ordering::Relaxed);
            batch = out;
        }
        self.output.emit(batch);
        Ok(())
    }

    fn gauges(&self) -> Option<&TaskGauges> {
        self.shared
            .tasks
            .get(self.stage)
            .and_then(|t| t.get(self.subtask as usize))
    }

    fn watermark(&mut self, wm: i64) -> TaskResult {
        let mut carry = Vec::new();
        for k in 0..self.chain.len() {
            let mut out = Vec::new();
            let c = &mut self.chain[k];
            if !carry.is_empty() {
                let batch = std::mem::take(&mut carry);
                process_one(c, &mut self.side_sinks, &self.shared, batch, &mut out)?;
            }
            c.op.on_watermark(wm, &mut out)
                .map_err(|e| format!("operator '{}': {e}", c.uid))?;
            self.shared.records_out[c.node].fetch_add(out.len() as u64, Ordering::Relaxed);
            carry = out;
        }
        self.output.emit(carry);
        if let Some(g) = self.gauges() {
            g.watermark.store(wm, Ordering::Relaxed);
        }
        self.output
            .broadcast(|| Element::Watermark(wm))
            .map_err(disconnected)
    }

    /// Ends this task's output: optionally a final watermark (firing every window), then the
    /// chain's end of input, then `End` downstream.
    fn end_stream(&mut self, final_watermark: bool) -> TaskResult {
        if final_watermark {
            self.watermark(i64::MAX)?;
        }
        self.finish_chain()?;
        self.output.broadcast(|| Element::End).map_err(disconnected)
    }

    fn finish_chain(&mut self) -> TaskResult {
        let mut carry = Vec::new();
        for k in 0..self.chain.len() {
            let mut out = Vec::new();
            let c = &mut self.chain[k];
            if !carry.is_empty() {
                let batch = std::mem::take(&mut carry);
                process_one(c, &mut self.side_sinks, &self.shared, batch, &mut out)?;
            }
            c.op.finish(&mut out)
                .map_err(|e| format!("operator '{}': {e}", c.uid))?;
            carry = out;
        }
        self.output.emit(carry);
        for s in &mut self.side_sinks {
            s.op.finish(&mut Vec::new())
                .map_err(|e| format!("operator '{}': {e}", s.uid))?;
        }
        Ok(())
    }

    /// Snapshots every stateful operator of the chain (and the source) for a barrier.
    fn snapshot(&mut self, barrier: &Arc<Barrier>) -> TaskResult {
        let started = Instant::now();
        if let Some((node, uid, source)) = &mut self.source {
            let job = WriteJob {
                barrier: barrier.clone(),
                node: *node,
                uid: uid.clone(),
                subtask: self.subtask,
                snapshot: SubtaskSnapshot {
                    keyed: None,
                    operator_lists: source.snapshot_lists(barrier.id),
                },
                positions: source.positions(),
            };
            let _ = self.writer.send(job);
        }
        for c in self.chain.iter_mut().chain(self.side_sinks.iter_mut()) {
            if !c.stateful {
                continue;
            }
            let snapshot =
                c.op.snapshot(barrier.id)
                    .map_err(|e| format!("operator '{}': snapshot {}: {e}", c.uid, barrier.id))?;
            let _ = self.writer.send(WriteJob {
                barrier: barrier.clone(),
                node: c.node,
                uid: c.uid.clone(),
                subtask: self.subtask,
                snapshot,
                positions: Vec::new(),
            });
        }
        self.note_stall(started);
        Ok(())
    }

    fn note_stall(&self, started: Instant) {
        let us = started.elapsed().as_micros() as u64;
        self.shared.max_stall_us.fetch_max(us, Ordering::Relaxed);
    }

    fn complete(&mut self, id: u64) -> TaskResult {
        if let Some((_, _, source)) = &mut self.source {
            source.notify_complete(id);
        }
        for c in self.chain.iter_mut().chain(self.side_sinks.iter_mut()) {
            c.op.notify_complete(id)
                .map_err(|e| format!("operator '{}': completing snapshot {id}: {e}", c.uid))?;
        }
        Ok(())
    }

    /// Hands the chain's keyed state to a thread of its own to free. Only `JobHandle::wait_freed`
    /// waits for it: a process that exits meanwhile just exits.
    pub fn release_keyed_state(&mut self) {
        let states: Vec<KeyedState> = self
            .chain
            .iter_mut()
            .filter_map(|c| c.op.keyed_state().map(KeyedState::take))
            .filter(|s| !s.is_empty())
            .collect();
        if !states.is_empty() {
            // Should the thread not start, the closure and the state are dropped here.
            if let Ok(t) = std::thread::Builder::new()
                .name("sjob-free".into())
                .spawn(move || drop(states))
            {
                match self.shared.freeing.lock() {
                    Ok(mut g) => g.push(t),
                    Err(p) => p.into_inner().push(t),
                }
            }
        }
    }

    pub fn run(&mut self) -> TaskResult {
        let r = if self.source.is_some() {
            self.run_source()
        } else {
            self.run_downstream()
        };
        if r.is_err() {
            self.shared.cancel.store(true, Ordering::SeqCst);
        }
        r
    }

    fn run_source(&mut self) -> TaskResult {
        let mut flow = SourceFlow::default();
        let mut last_wm = i64::MIN;
        let mut last_wm_sent = Instant::now();
        let mut last_records = Instant::now();
        loop {
            if self.shared.cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Control first: triggers must be answered promptly.
            let wait = if flow.idle() || flow.paused_for_alignment {
                Duration::from_millis(5)
            } else {
                Duration::ZERO
            };
            let msg = if wait.is_zero() {
                self.control.try_recv().ok()
            } else {
                self.control.recv_timeout(wait).ok()
            };
            if let Some(msg) = msg {
                if self.on_control(msg, &mut flow)? {
                    return Ok(());
                }
                continue;
            }
            if flow.stopping {
                continue;
            }
            if flow.exhausted {
                if self.shared.active_sources.load(Ordering::SeqCst) == 0 {
                    return self.end_of_input();
                }
                continue;
            }
            let Some((_, _, source)) = self.source.as_mut() else {
                return Err("source task without a source".into());
            };
            let own_wm = source.watermark();
            self.publish_watermark(&flow, own_wm);
            let paused = self.too_far_ahead(own_wm);
            if paused != flow.paused_for_alignment {
                flow.paused_for_alignment = paused;
                self.report(&flow, None);
            }
            if paused {
                // Time spent paused does not count towards idleness.
                last_records = Instant::now();
                continue;
            }
            let Some((_, _, source)) = self.source.as_mut() else {
                return Err("source task without a source".into());
            };
            let mut batch = Vec::with_capacity(BATCH);
            let outcome = source.poll(&mut batch, BATCH)?;
            let wm = source.watermark();
            let mut exact_watermark = false;
            match outcome {
                Poll::Records => flow.at_bound = false,
                Poll::Throttled(d) => {
                    flow.at_bound = false;
                    if let Ok(msg) = self.control.recv_timeout(d)
                        && self.on_control(msg, &mut flow)?
                    {
                        return Ok(());
                    }
                }
                Poll::AtBound => {
                    // Downstream must see the watermark of exactly this position, so a window
                    // is fired either before the cut-over or after it, never in between.
                    exact_watermark = !flow.at_bound;
                    flow.at_bound = true;
                }
                Poll::Exhausted => {
                    flow.exhausted = true;
                    self.shared.active_sources.fetch_sub(1, Ordering::SeqCst);
                }
            }
            if let Some((node, _, _)) = &self.source {
                self.shared.records_out[*node].fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            let had_records = !batch.is_empty();
            let woke = had_records && flow.idle_input;
            if had_records {
                last_records = Instant::now();
                flow.idle_input = false;
            }
            self.run_chain(0, batch)?;
            self.output.flush().map_err(disconnected)?;
            if wm > last_wm
                && (flow.exhausted
                    || exact_watermark
                    || woke
                    || last_wm_sent.elapsed() >= self.watermarks.interval)
            {
                last_wm = wm;
                last_wm_sent = Instant::now();
                self.watermark(wm)?;
            } else if woke {
                // Downstream counts this input again from its last watermark.
                self.output
                    .broadcast(|| Element::Watermark(last_wm))
                    .map_err(disconnected)?;
            }
            if !had_records
                && !flow.idle_input
                && !flow.exhausted
                && !flow.at_bound
                && self
                    .watermarks
                    .idle_timeout
                    .is_some_and(|t| last_records.elapsed() >= t)
            {
                flow.idle_input = true;
                self.output
                    .broadcast(|| Element::Idle)
                    .map_err(disconnected)?;
            }
            self.publish_watermark(&flow, wm);
            self.report(&flow, None);
        }
    }

    /// This source subtask's watermark as the others align to it: none while idle or out of
    /// input.
    fn publish_watermark(&self, flow: &SourceFlow, wm: i64) {
        // A subtask held at a bound waits for the others to reach theirs: it holds none back.
        let aligned = if flow.exhausted || flow.idle_input || flow.at_bound {
            i64::MAX
        } else {
            wm
        };
        if let Some(slot) = self.shared.source_watermarks.get(self.subtask as usize) {
            slot.store(aligned, Ordering::Relaxed);
        }
    }

    /// Whether `own` runs more than `watermarks.maxDrift` ahead of the slowest source subtask.
    fn too_far_ahead(&self, own: i64) -> bool {
        let Some(drift) = self.watermarks.max_drift else {
            return false;
        };
        if own == i64::MIN || own == i64::MAX {
            return false;
        }
        let slowest = self
            .shared
            .source_watermarks
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .min()
            .unwrap_or(i64::MAX);
        slowest != i64::MAX && own > slowest.saturating_add(drift)
    }

    /// Publishes this source subtask's positions and whether it holds.
    fn report(&self, flow: &SourceFlow, command: Option<(u64, Vec<String>)>) {
        let Some((_, _, source)) = &self.source else {
            return;
        };
        let Some(slot) = self.shared.sources.get(self.subtask as usize) else {
            return;
        };
        let mut r = match slot.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        r.positions = source.positions();
        r.holding = flow.at_bound || flow.exhausted;
        r.problem = source.problem();
        r.skipped = source.skipped();
        r.watermark = if flow.exhausted {
            Some(i64::MAX)
        } else {
            Some(source.watermark()).filter(|w| *w != i64::MIN)
        };
        r.idle = flow.idle_input;
        r.paused_for_alignment = flow.paused_for_alignment;
        r.pending_records = source.pending_records();
        if let Some((epoch, overrun)) = command {
            r.epoch = epoch;
            r.overrun = overrun;
        }
    }

    /// Handles a control message at a source; true when the source has ended its stream.
    fn on_control(&mut self, msg: Control, flow: &mut SourceFlow) -> Result<bool, String> {
        match msg {
            Control::Trigger(b) => {
                self.snapshot(&b)?;
                let barrier = b.clone();
                self.output
                    .broadcast(|| Element::Barrier(barrier.clone()))
                    .map_err(disconnected)?;
                if b.stop {
                    flow.stopping = true;
                }
            }
            Control::Complete(id) => self.complete(id)?,
            Control::Resume => flow.stopping = false,
            // Only sent after a stop barrier, which paused the source.
            Control::Finish { drain } if flow.stopping => {
                self.end_stream(drain)?;
                return Ok(true);
            }
            Control::Finish { .. } => {}
            Control::Hold { bound, epoch } => {
                let Some((_, _, source)) = self.source.as_mut() else {
                    return Err("source task without a source".into());
                };
                let here: Bound;
                let bound = match &bound {
                    Some(b) => b.as_ref(),
                    None => {
                        here = source
                            .positions()
                            .into_iter()
                            .map(|p| (p.split, p.position))
                            .collect();
                        &here
                    }
                };
                let overrun = source.set_bound(Some(bound));
                // Whether the new bound is reached, the next poll says.
                flow.at_bound = false;
                self.report(flow, Some((epoch, overrun)));
            }
            Control::Release { cut_over, epoch } => {
                if let Some((_, _, source)) = self.source.as_mut() {
                    source.set_bound(None);
                    source.on_resume();
                }
                flow.at_bound = false;
                if cut_over {
                    self.cut_over_chain();
                    self.output
                        .broadcast(|| Element::CutOver)
                        .map_err(disconnected)?;
                }
                self.report(flow, Some((epoch, Vec::new())));
            }
        }
        Ok(false)
    }

    /// The cut-over marker has reached this task from every input: its operators (a sink
    /// leaving shadow mode) go live.
    fn cut_over_chain(&mut self) {
        for c in self.chain.iter_mut().chain(self.side_sinks.iter_mut()) {
            c.op.on_cut_over();
        }
    }

    /// Every source subtask is done: refuse further snapshots, then end the stream.
    fn end_of_input(&mut self) -> TaskResult {
        {
            let shared = self.shared.clone();
            let mut exhausted = match shared.source_gate.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            *exhausted = true;
            while let Ok(msg) = self.control.try_recv() {
                match msg {
                    Control::Trigger(b) => {
                        let _ = self.coord.send(CoordMsg::Decline {
                            id: b.id,
                            reason: "the job's input is exhausted; it is finishing".into(),
                        });
                    }
                    Control::Complete(id) => self.complete(id)?,
                    Control::Resume
                    | Control::Finish { .. }
                    | Control::Hold { .. }
                    | Control::Release { .. } => {}
                }
            }
        }
        self.end_stream(true)
    }

    fn run_downstream(&mut self) -> TaskResult {
        let channels = std::mem::take(&mut self.inputs);
        if channels.is_empty() {
            return Err("task without input".into());
        }
        let control = self.control.clone();
        let mut inputs = Inputs::new(channels.len());
        let mut aligning: Option<Aligning> = None;
        let mut since_usage = 0u32;
        loop {
            if self.shared.cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
            since_usage += 1;
            if since_usage >= 64 {
                since_usage = 0;
                self.publish_usage(&usage(&channels));
            }
            // Inputs whose barrier (or cut-over marker) has come are not read until the
            // others' has: what they send meanwhile waits in their channels.
            let mut select = crossbeam_channel::Select::new();
            let readable: Vec<usize> = inputs.readable().collect();
            for &i in &readable {
                select.recv(&channels[i]);
            }
            let control_op = select.recv(&control);
            let op = select.select();
            if op.index() == control_op {
                match op.recv(&control) {
                    Ok(Control::Complete(id)) => self.complete(id)?,
                    Ok(_) => {}
                    Err(_) => return Ok(()),
                }
                continue;
            }
            let from = readable[op.index()];
            let element = match op.recv(&channels[from]) {
                Ok((_, element)) => element,
                // The upstream task is gone without ending its stream: the job is ending.
                Err(_) => return Ok(()),
            };
            match element {
                Element::Batch(batch) => {
                    inputs.idle[from] = false;
                    let started = Instant::now();
                    self.run_chain(0, batch)?;
                    // Processing time only: waiting on a full downstream channel is backpressure.
                    self.note_stall(started);
                    self.output.flush().map_err(disconnected)?;
                }
                Element::Watermark(w) => {
                    inputs.idle[from] = false;
                    inputs.watermarks[from] = inputs.watermarks[from].max(w);
                    self.combine_watermarks(&mut inputs)?;
                }
                Element::Idle => {
                    inputs.idle[from] = true;
                    self.combine_watermarks(&mut inputs)?;
                }
                Element::Barrier(b) => {
                    inputs.blocked[from] = true;
                    aligning = Some(Aligning::Barrier(b));
                }
                Element::CutOver => {
                    inputs.blocked[from] = true;
                    aligning = Some(Aligning::CutOver);
                }
                Element::End => {
                    inputs.ended[from] = true;
                    if inputs.ended.iter().all(|e| *e) {
                        return self.end_stream(false);
                    }
                    self.combine_watermarks(&mut inputs)?;
                }
            }
            if aligning.is_some() && inputs.all_blocked_or_ended() {
                match aligning.take() {
                    Some(Aligning::Barrier(b)) => {
                        self.snapshot(&b)?;
                        self.output
                            .broadcast(|| Element::Barrier(b.clone()))
                            .map_err(disconnected)?;
                    }
                    Some(Aligning::CutOver) => {
                        self.cut_over_chain();
                        self.output
                            .broadcast(|| Element::CutOver)
                            .map_err(disconnected)?;
                    }
                    None => {}
                }
                inputs.blocked.iter_mut().for_each(|x| *x = false);
            }
        }
    }

    /// Sends the smallest watermark of the inputs that are neither ended nor idle when it has
    /// advanced, or `Idle` when every input left is idle.
    fn combine_watermarks(&mut self, inputs: &mut Inputs) -> TaskResult {
        match inputs.combined() {
            Combined::Watermark(min) if min > inputs.current => {
                inputs.current = min;
                inputs.idle_sent = false;
                self.watermark(min)
            }
            Combined::Watermark(_) => Ok(()),
            Combined::Idle if !inputs.idle_sent => {
                inputs.idle_sent = true;
                self.output
                    .broadcast(|| Element::Idle)
                    .map_err(disconnected)
            }
            Combined::Idle => Ok(()),
        }
    }

    /// How full each input channel is, for /metrics.
    fn publish_usage(&self, usage: &[(usize, usize)]) {
        if let Some(g) = self.gauges() {
            for (slot, (len, cap)) in g.input_usage.iter().zip(usage) {
                let permille = (*len * 1000).checked_div(*cap).unwrap_or(0);
                slot.store(permille as u32, Ordering::Relaxed);
            }
        }
    }
}

/// What a downstream task knows of each of its inputs.
struct Inputs {
    blocked: Vec<bool>,
    ended: Vec<bool>,
    idle: Vec<bool>,
    watermarks: Vec<i64>,
    /// The watermark sent downstream.
    current: i64,
    /// `Idle` was sent downstream and nothing since.
    idle_sent: bool,
}

enum Combined {
    Watermark(i64),
    Idle,
}

impl Inputs {
    fn new(n: usize) -> Inputs {
        Inputs {
            blocked: vec![false; n],
            ended: vec![false; n],
            idle: vec![false; n],
            watermarks: vec![i64::MIN; n],
            current: i64::MIN,
            idle_sent: false,
        }
    }

    fn readable(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.blocked.len()).filter(|&i| !self.blocked[i] && !self.ended[i])
    }

    fn all_blocked_or_ended(&self) -> bool {
        (0..self.blocked.len()).all(|i| self.blocked[i] || self.ended[i])
    }

    fn combined(&self) -> Combined {
        let live: Vec<usize> = (0..self.ended.len()).filter(|&i| !self.ended[i]).collect();
        if live.is_empty() {
            return Combined::Watermark(i64::MAX);
        }
        live.iter()
            .filter(|&&i| !self.idle[i])
            .map(|&i| self.watermarks[i])
            .min()
            .map_or(Combined::Idle, Combined::Watermark)
    }
}

/// (queued, capacity) of each input channel.
fn usage(channels: &[Receiver<Msg>]) -> Vec<(usize, usize)> {
    channels
        .iter()
        .map(|c| (c.len(), c.capacity().unwrap_or(0)))
        .collect()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::lower_priority;

    /// This thread's nice value (Linux keeps one per thread).
    fn own_nice() -> i32 {
        // SAFETY: plain integer calls about this thread alone.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn a_writer_thread_runs_at_the_nice_value_asked_for_and_the_caller_keeps_its_own() {
        let before = own_nice();
        let (asked, inherited) = std::thread::spawn(|| {
            lower_priority(7);
            let asked = own_nice();
            // A thread a writer starts (the encoder of a two-thread write) inherits it.
            let inherited = std::thread::spawn(own_nice).join().unwrap();
            (asked, inherited)
        })
        .join()
        .unwrap();
        assert_eq!((asked, inherited), (7, 7), "the test ran at nice {before}");
        assert_eq!(own_nice(), before);
        // Never raised: a thread at 7 asked for 3 stays at 7.
        let kept = std::thread::spawn(|| {
            lower_priority(7);
            lower_priority(3);
            own_nice()
        })
        .join()
        .unwrap();
        assert_eq!(kept, 7);
    }
}
