//! Sources: where records enter, and whose positions are operator list state (one row per
//! split), so a restored job resumes exactly where the snapshot was taken.

use super::graph::Node;
use super::spec::{FileFormat, OperatorSpec};
use crate::savepoint::metadata::SplitPosition;
use crate::savepoint::value::{Fields, Name, Record, Row, Value, intern};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::time::{Duration, Instant};

pub enum Poll {
    /// Records were appended (possibly none, if the source is between splits).
    Records,
    /// Rate-limited: nothing is due before this much time has passed.
    Throttled(Duration),
    /// Every split this subtask owns is done.
    Exhausted,
    /// Every split with records left has reached its bound (see `Source::set_bound`).
    AtBound,
}

/// Positions by split that a source must not read past: records at smaller positions are
/// read, the one at the bound is not.
pub type Bound = std::collections::HashMap<String, i64>;

pub trait Source: Send {
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<Poll, String>;
    /// Every record with a smaller or equal timestamp has been emitted.
    fn watermark(&self) -> i64;
    /// The positions as operator list state (one list: the splits), for snapshot `id`.
    fn snapshot_lists(&mut self, id: u64) -> Vec<Vec<Row>>;
    fn positions(&self) -> Vec<SplitPosition>;
    /// Replaces the initial assignment with restored splits.
    fn restore_lists(&mut self, lists: Vec<Vec<Row>>) -> Result<(), String>;
    /// Reads no split past its position in `bound` (None: no bound; a split the bound does
    /// not name is not bounded). Returns the splits already past their bound: their bound is
    /// not set, and the caller must not take the bound as reached.
    fn set_bound(&mut self, bound: Option<&Bound>) -> Vec<String>;
    /// Reading starts again after a pause (rate limits start afresh rather than catch up).
    fn on_resume(&mut self) {}
    /// Splits without records for this long do not hold the subtask's watermark back (for
    /// sources whose splits advance independently, such as Kafka partitions).
    fn set_idle_timeout(&mut self, _timeout: Duration) {}
    /// Snapshot `id`, which included this source's positions, is complete.
    fn notify_complete(&mut self, _id: u64) {}
    /// Why the source cannot read now (e.g. its brokers are unreachable), while it retries.
    fn problem(&self) -> Option<String> {
        None
    }
    /// Records dropped because they did not parse (`onParseError: skip`).
    fn skipped(&self) -> u64 {
        0
    }
    /// Records between this subtask's positions and the end of its splits (Flink's
    /// `pendingRecords`), where the source knows it.
    fn pending_records(&self) -> Option<u64> {
        None
    }
}

/// The splits of `positions` already past their position in `bound`.
fn overrun(positions: &[SplitPosition], bound: &Bound) -> Vec<String> {
    positions
        .iter()
        .filter(|p| bound.get(&p.split).is_some_and(|b| p.position > *b))
        .map(|p| p.split.clone())
        .collect()
}

pub fn build(node: &Node, subtask: u32, parallelism: u32) -> Result<Box<dyn Source>, String> {
    match &node.spec {
        OperatorSpec::Generator(g) => {
            let splits = g.splits;
            let owned = (0..splits)
                .filter(|s| s % parallelism == subtask)
                .map(|s| (s, u64::from(s)))
                .collect();
            Ok(Box::new(Generator {
                uid: node.uid.clone(),
                keys: g.keys,
                count: g.count,
                splits: u64::from(splits),
                step: g.timestamp_step_ms,
                key_prefix: g.key_prefix.clone(),
                payload_bytes: g.payload_bytes,
                rate: g.rate,
                parallel_splits: splits,
                owned,
                cursor: 0,
                started: None,
                emitted: 0,
                bound: Vec::new(),
                names: [
                    intern("seq"),
                    intern("key"),
                    intern("value"),
                    intern("ts"),
                    intern("payload"),
                ],
            }))
        }
        OperatorSpec::FileSource(f) => {
            let files =
                list_files(&f.path).map_err(|e| format!("fileSource '{}': {e}", node.uid))?;
            let owned = files
                .into_iter()
                .enumerate()
                .filter(|(i, _)| (*i as u32) % parallelism == subtask)
                .map(|(_, p)| (p, 0u64))
                .collect();
            Ok(Box::new(FileSource {
                uid: node.uid.clone(),
                format: f.format,
                owned,
                current: None,
                line: intern("line"),
                bound: None,
            }))
        }
        OperatorSpec::KafkaSource(k) => Ok(Box::new(super::kafka::source::KafkaSource::new(
            &node.uid,
            k,
            subtask,
            parallelism,
        )?)),
        other => Err(format!("{other:?} is not a source")),
    }
}

struct Generator {
    uid: String,
    keys: u64,
    count: Option<u64>,
    splits: u64,
    step: i64,
    key_prefix: Option<String>,
    payload_bytes: Option<usize>,
    rate: Option<f64>,
    parallel_splits: u32,
    /// (split, next record index of that split).
    owned: Vec<(u32, u64)>,
    cursor: usize,
    started: Option<Instant>,
    emitted: u64,
    names: [Name; 5],
    /// Per owned split (same order as `owned`): the index it must not read past.
    bound: Vec<Option<u64>>,
}

impl Generator {
    fn live(&self, next: u64) -> bool {
        self.count.is_none_or(|c| next < c)
    }

    /// Whether owned split `c` has a record to read now: live and below its bound.
    fn readable(&self, c: usize, next: u64) -> bool {
        self.live(next)
            && self
                .bound
                .get(c)
                .copied()
                .flatten()
                .is_none_or(|b| next < b)
    }

    fn record(&self, i: u64) -> Record {
        let k = i % self.keys;
        let key = match &self.key_prefix {
            Some(p) => Value::from(format!("{p}{k}").as_str()),
            None => Value::Int(k as i64),
        };
        let mut fields = Fields::with_capacity(5);
        fields.push((self.names[0], Value::Int(i as i64)));
        fields.push((self.names[1], key));
        fields.push((self.names[2], Value::Int((i % 1000) as i64)));
        fields.push((
            self.names[3],
            Value::Int((i as i64).saturating_mul(self.step)),
        ));
        if let Some(n) = self.payload_bytes {
            // Unique per record: the index in hex, padded to the requested size.
            let mut p = format!("{i:016x}");
            p.truncate(n);
            p.extend(std::iter::repeat_n('.', n.saturating_sub(p.len())));
            fields.push((self.names[4], Value::from(p.as_str())));
        }
        Record { fields, key: None }
    }
}

impl Source for Generator {
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<Poll, String> {
        if !self.owned.iter().any(|(_, next)| self.live(*next)) {
            return Ok(Poll::Exhausted);
        }
        if !(0..self.owned.len()).any(|c| self.readable(c, self.owned[c].1)) {
            return Ok(Poll::AtBound);
        }
        let mut budget = max;
        if let Some(total_rate) = self.rate {
            let share =
                total_rate * self.owned.len() as f64 / f64::from(self.parallel_splits.max(1));
            let started = *self.started.get_or_insert_with(Instant::now);
            let due = (started.elapsed().as_secs_f64() * share) as u64;
            let allowed = due.saturating_sub(self.emitted);
            if allowed == 0 {
                let wait = Duration::from_secs_f64((1.0 / share.max(1e-9)).min(0.05));
                return Ok(Poll::Throttled(wait));
            }
            budget = budget.min(allowed as usize);
        }
        // Deal from the owned splits in turn, a slice at a time, so that event time advances
        // evenly across splits and the watermark keeps up.
        let slice = (budget / self.owned.len().max(1)).clamp(1, 256) as u64;
        let mut idle_rounds = 0;
        while budget > 0 && idle_rounds < self.owned.len() {
            let c = self.cursor % self.owned.len();
            self.cursor = self.cursor.wrapping_add(1);
            let (_, next) = self.owned[c];
            if !self.readable(c, next) {
                idle_rounds += 1;
                continue;
            }
            idle_rounds = 0;
            let mut i = next;
            let mut n = 0;
            while n < slice && budget > 0 && self.readable(c, i) {
                out.push(self.record(i));
                i += self.splits;
                n += 1;
                budget -= 1;
            }
            self.owned[c].1 = i;
            self.emitted += n;
        }
        Ok(Poll::Records)
    }

    fn watermark(&self) -> i64 {
        self.owned
            .iter()
            .filter(|(_, next)| self.live(*next))
            .map(|(_, next)| (*next as i64).saturating_mul(self.step) - 1)
            .min()
            .unwrap_or(i64::MAX)
    }

    fn snapshot_lists(&mut self, _id: u64) -> Vec<Vec<Row>> {
        vec![
            self.owned
                .iter()
                .map(|(s, next)| Row::from([Value::Int(i64::from(*s)), Value::Int(*next as i64)]))
                .collect(),
        ]
    }

    fn positions(&self) -> Vec<SplitPosition> {
        self.owned
            .iter()
            .map(|(s, next)| SplitPosition {
                split: s.to_string(),
                position: *next as i64,
            })
            .collect()
    }

    fn restore_lists(&mut self, lists: Vec<Vec<Row>>) -> Result<(), String> {
        let rows = lists.into_iter().next().unwrap_or_default();
        let mut owned = Vec::with_capacity(rows.len());
        for row in rows {
            match (row.first(), row.get(1)) {
                (Some(Value::Int(s)), Some(Value::Int(next)))
                    if *s >= 0
                        && (*s as u64) < self.splits
                        && *next >= 0
                        && (*next as u64) % self.splits == *s as u64 =>
                {
                    owned.push((*s as u32, *next as u64));
                }
                _ => {
                    return Err(format!(
                        "generator '{}': restored split {row:?} does not fit {} splits (the number of splits cannot change while state exists)",
                        self.uid, self.splits
                    ));
                }
            }
        }
        self.owned = owned;
        self.bound.clear();
        Ok(())
    }

    fn set_bound(&mut self, bound: Option<&Bound>) -> Vec<String> {
        let Some(bound) = bound else {
            self.bound.clear();
            return Vec::new();
        };
        let past = overrun(&self.positions(), bound);
        if past.is_empty() {
            self.bound = self
                .owned
                .iter()
                .map(|(s, _)| bound.get(&s.to_string()).map(|b| (*b).max(0) as u64))
                .collect();
        }
        past
    }

    fn on_resume(&mut self) {
        self.started = None;
        self.emitted = 0;
    }

    /// A bounded generator's records left: split `s` holds indices `s, s + splits, …` below
    /// `count`. Unbounded: none known.
    fn pending_records(&self) -> Option<u64> {
        let count = self.count?;
        Some(
            self.owned
                .iter()
                .map(|(_, next)| count.saturating_sub(*next).div_ceil(self.splits.max(1)))
                .sum(),
        )
    }
}

fn list_files(path: &str) -> Result<Vec<String>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| format!("cannot list {path}: {e}"))? {
        let entry = entry.map_err(|e| format!("cannot list {path}: {e}"))?;
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            files.push(entry.path().display().to_string());
        }
    }
    files.sort();
    Ok(files)
}

struct FileSource {
    uid: String,
    format: FileFormat,
    /// (file, byte offset of the next unread line).
    owned: Vec<(String, u64)>,
    /// Index into `owned` and an open reader positioned at its offset.
    current: Option<(usize, BufReader<std::fs::File>)>,
    line: Name,
    bound: Option<Bound>,
}

impl FileSource {
    /// Whether file `i` may be read at its offset now (below its bound, if it has one).
    fn below_bound(&self, i: usize) -> bool {
        let (path, off) = &self.owned[i];
        self.bound
            .as_ref()
            .and_then(|b| b.get(path))
            .is_none_or(|b| (*off as i64) < *b)
    }
}

impl Source for FileSource {
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<Poll, String> {
        let mut buf = String::new();
        while out.len() < max {
            if self.current.is_none() {
                let has_data = |(p, off): &(String, u64)| {
                    std::fs::metadata(p)
                        .map(|m| *off < m.len())
                        .unwrap_or(false)
                };
                let Some(i) = (0..self.owned.len())
                    .find(|i| has_data(&self.owned[*i]) && self.below_bound(*i))
                else {
                    return Ok(if !out.is_empty() {
                        Poll::Records
                    } else if self.owned.iter().any(has_data) {
                        Poll::AtBound
                    } else {
                        Poll::Exhausted
                    });
                };
                let (path, off) = &self.owned[i];
                let mut f = std::fs::File::open(path)
                    .map_err(|e| format!("fileSource '{}': cannot open {path}: {e}", self.uid))?;
                f.seek(SeekFrom::Start(*off))
                    .map_err(|e| format!("fileSource '{}': cannot seek {path}: {e}", self.uid))?;
                self.current = Some((i, BufReader::with_capacity(1 << 16, f)));
            }
            let Some((i, _)) = &self.current else {
                continue;
            };
            let i = *i;
            if !self.below_bound(i) {
                self.current = None;
                continue;
            }
            let Some((_, reader)) = self.current.as_mut() else {
                continue;
            };
            buf.clear();
            let n = reader.read_line(&mut buf).map_err(|e| {
                format!(
                    "fileSource '{}': reading {}: {e}",
                    self.uid, self.owned[i].0
                )
            })?;
            if n == 0 {
                // Mark the file done even if it is shorter than its recorded offset.
                self.owned[i].1 = self.owned[i].1.max(
                    std::fs::metadata(&self.owned[i].0)
                        .map(|m| m.len())
                        .unwrap_or(0),
                );
                self.current = None;
                continue;
            }
            let at = self.owned[i].1;
            self.owned[i].1 += n as u64;
            let text = buf.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            let rec = match self.format {
                FileFormat::Text => Record {
                    fields: smallvec::smallvec![(self.line, Value::from(text))],
                    key: None,
                },
                FileFormat::Json => match serde_json::from_str::<serde_json::Value>(text) {
                    Ok(serde_json::Value::Object(obj)) => Record::from_json_object(&obj),
                    Ok(_) => {
                        return Err(format!(
                            "fileSource '{}': {} at byte {at}: expected a JSON object per line",
                            self.uid, self.owned[i].0
                        ));
                    }
                    Err(e) => {
                        return Err(format!(
                            "fileSource '{}': {} at byte {at}: invalid JSON: {e}",
                            self.uid, self.owned[i].0
                        ));
                    }
                },
            };
            out.push(rec);
        }
        Ok(Poll::Records)
    }

    fn watermark(&self) -> i64 {
        let done = self.current.is_none()
            && self.owned.iter().all(|(p, off)| {
                std::fs::metadata(p)
                    .map(|m| *off >= m.len())
                    .unwrap_or(true)
            });
        if done { i64::MAX } else { i64::MIN }
    }

    fn snapshot_lists(&mut self, _id: u64) -> Vec<Vec<Row>> {
        vec![
            self.owned
                .iter()
                .map(|(p, off)| Row::from([Value::from(p.as_str()), Value::Int(*off as i64)]))
                .collect(),
        ]
    }

    fn positions(&self) -> Vec<SplitPosition> {
        self.owned
            .iter()
            .map(|(p, off)| SplitPosition {
                split: p.clone(),
                position: *off as i64,
            })
            .collect()
    }

    fn restore_lists(&mut self, lists: Vec<Vec<Row>>) -> Result<(), String> {
        let rows = lists.into_iter().next().unwrap_or_default();
        let mut owned = Vec::new();
        for row in rows {
            match (row.first(), row.get(1)) {
                (Some(Value::Str(p)), Some(Value::Int(off))) if *off >= 0 => {
                    owned.push((p.to_string(), *off as u64))
                }
                _ => {
                    return Err(format!(
                        "fileSource '{}': invalid restored position {row:?}",
                        self.uid
                    ));
                }
            }
        }
        self.owned = owned;
        self.current = None;
        Ok(())
    }

    fn set_bound(&mut self, bound: Option<&Bound>) -> Vec<String> {
        let past = bound
            .map(|b| overrun(&self.positions(), b))
            .unwrap_or_default();
        if past.is_empty() {
            self.bound = bound.cloned();
        }
        past
    }
}
