//! Tasks: one thread per (stage, subtask) running a chain of operators, connected by bounded
//! channels that carry batches, watermarks, barriers and end-of-input.
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
use crate::savepoint::keygroups::{key_group, subtask_for_key_group};
use crate::savepoint::metadata::SplitPosition;
use crate::savepoint::paths;
use crate::savepoint::statefile::{self, SubtaskSnapshot};
use crate::savepoint::store::Store;
use crate::savepoint::value::Record;
use crossbeam_channel::{Receiver, Sender, select};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
}

pub(crate) enum Element {
    Batch(Vec<Record>),
    Watermark(i64),
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
    /// Sinks drop what they receive until the cut-over marker reaches them (a blue-green
    /// switch's new version before the switch). Cleared when the marker is sent.
    pub shadow: AtomicBool,
    /// The number of hold and release commands sent to the sources.
    pub source_epoch: AtomicU64,
}

pub(crate) struct Output {
    pub partitioning: Option<Partitioning>,
    pub senders: Vec<Sender<Msg>>,
    pub index: u32,
    pub max_parallelism: u32,
    buffers: Vec<Vec<Record>>,
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
                for rec in records {
                    let kg = match &rec.key {
                        Some(k) => key_group(k, self.max_parallelism),
                        None => 0,
                    };
                    let target = subtask_for_key_group(self.max_parallelism, p, kg) as usize;
                    self.buffers[target].push(rec);
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

/// Starts the threads that write state files off the processing path.
pub(crate) fn start_writers(
    threads: usize,
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
                    for job in rx {
                        if job.barrier.aborted.load(Ordering::SeqCst) {
                            // The snapshot failed already; its directory is being deleted.
                            continue;
                        }
                        let rel = paths::state_file(&job.uid, job.subtask);
                        let result =
                            statefile::write(&job.barrier.dir, &rel, job.subtask, &job.snapshot)
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
}

impl SourceFlow {
    /// Nothing to read now: wait for control messages.
    fn idle(&self) -> bool {
        self.stopping || self.at_bound || self.exhausted
    }
}

pub(crate) struct Task {
    pub subtask: u32,
    pub source: Option<(usize, String, Box<dyn Source>)>,
    pub chain: Vec<ChainOp>,
    pub input: Option<(Receiver<Msg>, u32)>,
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
            self.shared.records_in[c.node].fetch_add(batch.len() as u64, Ordering::Relaxed);
            // Empty: most operators hand their (changed) input batch on as the output.
            let mut out = Vec::new();
            c.op.process(batch, &mut out)
                .map_err(|e| format!("operator '{}': {e}", c.uid))?;
            self.shared.records_out[c.node].fetch_add(out.len() as u64, Ordering::Relaxed);
            batch = out;
        }
        self.output.emit(batch);
        Ok(())
    }

    fn watermark(&mut self, wm: i64) -> TaskResult {
        let mut carry = Vec::new();
        for k in 0..self.chain.len() {
            let mut out = Vec::new();
            let c = &mut self.chain[k];
            if !carry.is_empty() {
                self.shared.records_in[c.node].fetch_add(carry.len() as u64, Ordering::Relaxed);
                c.op.process(std::mem::take(&mut carry), &mut out)
                    .map_err(|e| format!("operator '{}': {e}", c.uid))?;
            }
            c.op.on_watermark(wm, &mut out)
                .map_err(|e| format!("operator '{}': {e}", c.uid))?;
            self.shared.records_out[c.node].fetch_add(out.len() as u64, Ordering::Relaxed);
            carry = out;
        }
        self.output.emit(carry);
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
                c.op.process(std::mem::take(&mut carry), &mut out)
                    .map_err(|e| format!("operator '{}': {e}", c.uid))?;
            }
            c.op.finish(&mut out)
                .map_err(|e| format!("operator '{}': {e}", c.uid))?;
            carry = out;
        }
        self.output.emit(carry);
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
        for c in &mut self.chain {
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
        for c in &mut self.chain {
            c.op.notify_complete(id)
                .map_err(|e| format!("operator '{}': completing snapshot {id}: {e}", c.uid))?;
        }
        Ok(())
    }

    pub fn run(mut self) -> TaskResult {
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
        loop {
            if self.shared.cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Control first: triggers must be answered promptly.
            let wait = if flow.idle() {
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
            self.run_chain(0, batch)?;
            self.output.flush().map_err(disconnected)?;
            if wm > last_wm
                && (flow.exhausted
                    || exact_watermark
                    || last_wm_sent.elapsed() >= Duration::from_millis(20))
            {
                last_wm = wm;
                last_wm_sent = Instant::now();
                self.watermark(wm)?;
            }
            self.report(&flow, None);
        }
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
        for c in &mut self.chain {
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
        let Some((input, n)) = self.input.take() else {
            return Err("task without input".into());
        };
        let n = n as usize;
        let mut blocked = vec![false; n];
        let mut ended = vec![false; n];
        let mut watermarks = vec![i64::MIN; n];
        let mut current_wm = i64::MIN;
        let mut aligning: Option<Aligning> = None;
        let mut held: VecDeque<Msg> = VecDeque::new();
        let mut replay: VecDeque<Msg> = VecDeque::new();
        loop {
            if self.shared.cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
            let (from, element) = match replay.pop_front() {
                Some(m) => m,
                None => {
                    select! {
                        recv(input) -> m => match m {
                            Ok(m) => m,
                            Err(_) => return Ok(()),
                        },
                        recv(self.control) -> c => {
                            match c {
                                Ok(Control::Complete(id)) => self.complete(id)?,
                                Ok(_) => {}
                                Err(_) => return Ok(()),
                            }
                            continue;
                        }
                    }
                }
            };
            let from_i = from as usize;
            if from_i >= n {
                return Err(format!("message from unknown input {from}"));
            }
            if blocked[from_i] {
                held.push_back((from, element));
                continue;
            }
            match element {
                Element::Batch(batch) => {
                    let started = Instant::now();
                    self.run_chain(0, batch)?;
                    // Processing time only: waiting on a full downstream channel is backpressure.
                    self.note_stall(started);
                    self.output.flush().map_err(disconnected)?;
                }
                Element::Watermark(w) => {
                    watermarks[from_i] = watermarks[from_i].max(w);
                    let min = (0..n)
                        .map(|i| if ended[i] { i64::MAX } else { watermarks[i] })
                        .min()
                        .unwrap_or(i64::MAX);
                    if min > current_wm {
                        current_wm = min;
                        self.watermark(min)?;
                    }
                }
                Element::Barrier(b) => {
                    blocked[from_i] = true;
                    aligning = Some(Aligning::Barrier(b));
                }
                Element::CutOver => {
                    blocked[from_i] = true;
                    aligning = Some(Aligning::CutOver);
                }
                Element::End => {
                    ended[from_i] = true;
                    if ended.iter().all(|e| *e) {
                        return self.end_stream(false);
                    }
                }
            }
            if aligning.is_some() && (0..n).all(|i| blocked[i] || ended[i]) {
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
                blocked.iter_mut().for_each(|x| *x = false);
                replay.extend(held.drain(..));
            }
        }
    }
}
