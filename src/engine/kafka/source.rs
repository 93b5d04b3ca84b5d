//! The Kafka source. Its state is one list of `(topic, partition, next offset)` rows,
//! distributed as a union: on restore every subtask sees every partition's offset and keeps
//! the partitions it owns at the new parallelism (`super::owner`). Partitions are found by
//! asking the brokers for metadata at start and every `discoveryInterval`; one the state does
//! not know starts at `startFrom` when the job first starts, and at the earliest offset when
//! it appears later (nothing written to it is missed). It reads with `read_committed`, so a
//! transactional producer's aborted records never enter the job.

use super::{StartFrom, client_config, owner, split_name};
use crate::engine::sources::{Bound, Poll, Source};
use crate::engine::spec::{KafkaFormat, KafkaSourceSpec, ParseErrorPolicy, parse_duration};
use crate::savepoint::metadata::SplitPosition;
use crate::savepoint::value::{Name, Record, Row, Value, intern};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

type Partition = (String, i32);

/// How often librdkafka reports the brokers' offsets (for `pending_records`).
const STATS_INTERVAL_MS: &str = "1000";

/// Each partition's last stable offset on the brokers (where a read-committed consumer's
/// records end), from librdkafka's statistics, which the consumer's polls deliver.
#[derive(Clone, Default)]
struct EndOffsets(Arc<Mutex<HashMap<Partition, i64>>>);

impl ClientContext for EndOffsets {
    fn stats_raw(&self, statistics: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Stats {
            #[serde(default)]
            topics: HashMap<String, TopicStats>,
        }
        #[derive(serde::Deserialize)]
        struct TopicStats {
            #[serde(default)]
            partitions: HashMap<String, PartitionStats>,
        }
        #[derive(serde::Deserialize)]
        struct PartitionStats {
            ls_offset: i64,
        }
        let Ok(stats) = serde_json::from_slice::<Stats>(statistics) else {
            return;
        };
        let mut ends = match self.0.lock() {
            Ok(e) => e,
            Err(p) => p.into_inner(),
        };
        for (topic, t) in stats.topics {
            for (partition, p) in t.partitions {
                // Partition -1 is librdkafka's unassigned queue; offsets < 0 are unknown.
                if let Ok(id) = partition.parse::<i32>()
                    && id >= 0
                    && p.ls_offset >= 0
                {
                    ends.insert((topic.clone(), id), p.ls_offset);
                }
            }
        }
    }
}

impl ConsumerContext for EndOffsets {}

struct Owned {
    /// The offset of the next record to emit.
    next: i64,
    /// The largest record timestamp seen (for the watermark).
    max_ts: Option<i64>,
    /// A record fetched at or past the bound, held back until the bound is lifted.
    held: Option<(i64, Record, i64)>,
    paused: bool,
    /// When the partition last had a record (or was assigned), for idleness.
    last_record: Instant,
}

pub struct KafkaSource {
    uid: String,
    spec: KafkaSourceSpec,
    start: StartFrom,
    pattern: Option<regex::Regex>,
    out_of_orderness: i64,
    discovery_every: Duration,
    subtask: u32,
    parallelism: u32,
    consumer: Option<BaseConsumer<EndOffsets>>,
    end_offsets: EndOffsets,
    owned: BTreeMap<Partition, Owned>,
    /// Every partition's offset in the restored snapshot (all subtasks').
    restored: Option<HashMap<Partition, i64>>,
    /// Partitions seen by an earlier discovery (or in restored state): one that is not
    /// starts at `startFrom` only on the first discovery.
    discovered_once: bool,
    next_discovery: Instant,
    discovery_backoff: Duration,
    /// Partitions without records for this long do not hold the watermark back.
    idle_timeout: Option<Duration>,
    bound: Option<Bound>,
    problem: Option<String>,
    skipped: u64,
    /// Offsets by snapshot id, committed to the group when that snapshot completes.
    to_commit: Vec<(u64, Vec<(Partition, i64)>)>,
    names: Names,
}

struct Names {
    value: Name,
    key: Option<Name>,
    ts: Option<Name>,
}

fn kerr(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl KafkaSource {
    pub fn new(
        uid: &str,
        spec: &KafkaSourceSpec,
        subtask: u32,
        parallelism: u32,
    ) -> Result<KafkaSource, String> {
        let what = |e: String| format!("kafkaSource '{uid}': {e}");
        let start = StartFrom::parse(&spec.start_from).map_err(what)?;
        let pattern = match &spec.topic_pattern {
            Some(p) => Some(
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| what(format!("topicPattern: {e}")))?,
            ),
            None => None,
        };
        let ooo = parse_duration("maxOutOfOrderness", &spec.max_out_of_orderness).map_err(what)?;
        let every = parse_duration("discoveryInterval", &spec.discovery_interval).map_err(what)?;
        Ok(KafkaSource {
            uid: uid.to_owned(),
            spec: spec.clone(),
            start,
            pattern,
            out_of_orderness: ooo.as_millis() as i64,
            discovery_every: every.max(Duration::from_millis(100)),
            subtask,
            parallelism,
            consumer: None,
            end_offsets: EndOffsets::default(),
            owned: BTreeMap::new(),
            restored: None,
            discovered_once: false,
            next_discovery: Instant::now(),
            discovery_backoff: Duration::from_millis(250),
            idle_timeout: None,
            bound: None,
            problem: None,
            skipped: 0,
            to_commit: Vec::new(),
            names: Names {
                value: intern(&spec.value_field),
                key: spec.key_field.as_deref().map(intern),
                ts: spec.timestamp_field.as_deref().map(intern),
            },
        })
    }

    fn consumer(&mut self) -> Result<&BaseConsumer<EndOffsets>, String> {
        if self.consumer.is_none() {
            let group = self
                .spec
                .group_id
                .clone()
                .unwrap_or_else(|| format!("sjob-{}", self.uid));
            let c: BaseConsumer<EndOffsets> = client_config(
                &self.spec.bootstrap_servers,
                &[
                    ("group.id", group.as_str()),
                    ("enable.auto.commit", "false"),
                    ("enable.auto.offset.store", "false"),
                    ("isolation.level", "read_committed"),
                    ("auto.offset.reset", "earliest"),
                    ("enable.partition.eof", "false"),
                    ("statistics.interval.ms", STATS_INTERVAL_MS),
                ],
                &self.spec.properties,
            )
            .create_with_context(self.end_offsets.clone())
            .map_err(|e| format!("kafkaSource '{}': {e}", self.uid))?;
            self.consumer = Some(c);
        }
        self.consumer
            .as_ref()
            .ok_or_else(|| "kafka consumer missing".to_owned())
    }

    /// The partitions of the topics this source reads, from the brokers' metadata.
    fn fetch_partitions(&mut self) -> Result<Vec<Partition>, Fetch> {
        let uid = self.uid.clone();
        let topics = self.spec.topics.clone();
        let pattern = self.pattern.clone();
        let bootstrap = self.spec.bootstrap_servers.clone();
        let c = self.consumer().map_err(Fetch::Fatal)?;
        let md = c
            .fetch_metadata(None, METADATA_TIMEOUT)
            .map_err(|e| Fetch::Retry(format!("brokers {bootstrap}: {e}")))?;
        let mut found = Vec::new();
        for t in md.topics() {
            let named = topics.iter().any(|n| n == t.name());
            let matched = pattern.as_ref().is_some_and(|p| p.is_match(t.name()));
            if (named || matched) && t.error().is_none() {
                found.extend(t.partitions().iter().map(|p| (t.name().to_owned(), p.id())));
            }
        }
        for t in &topics {
            if !found.iter().any(|(n, _)| n == t) {
                return Err(Fetch::Fatal(format!(
                    "kafkaSource '{uid}': topic '{t}' does not exist"
                )));
            }
        }
        Ok(found)
    }

    /// The offset a partition without restored state starts at.
    fn start_offset(&mut self, (topic, partition): &Partition, first: bool) -> Result<i64, String> {
        let start = if first {
            self.start
        } else {
            StartFrom::Earliest
        };
        let c = self.consumer()?;
        let (low, high) = c
            .fetch_watermarks(topic, *partition, METADATA_TIMEOUT)
            .map_err(kerr)?;
        Ok(match start {
            StartFrom::Earliest => low,
            StartFrom::Latest => high,
            StartFrom::Committed => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, *partition);
                let got = c.committed_offsets(tpl, METADATA_TIMEOUT).map_err(kerr)?;
                match got.find_partition(topic, *partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o.clamp(low, high),
                    _ => low,
                }
            }
            StartFrom::Timestamp(ms) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, *partition, Offset::Offset(ms))
                    .map_err(kerr)?;
                let got = c.offsets_for_times(tpl, METADATA_TIMEOUT).map_err(kerr)?;
                match got.find_partition(topic, *partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => high,
                }
            }
        })
    }

    /// Finds partitions; takes the new ones this subtask owns and assigns them.
    fn discover(&mut self) -> Result<(), String> {
        let parts = match self.fetch_partitions() {
            Ok(p) => p,
            Err(Fetch::Fatal(e)) => return Err(e),
            Err(Fetch::Retry(e)) => {
                self.retry_later(e);
                return Ok(());
            }
        };
        let first = !self.discovered_once && self.restored.is_none();
        let mut added = false;
        for part in parts {
            if owner(&part.0, part.1, self.parallelism) != self.subtask
                || self.owned.contains_key(&part)
            {
                continue;
            }
            let next = match self.restored.as_ref().and_then(|r| r.get(&part)) {
                Some(o) => *o,
                None => match self.start_offset(&part, first) {
                    Ok(o) => o,
                    Err(e) => {
                        self.retry_later(format!("partition {}: {e}", split_name(&part.0, part.1)));
                        return Ok(());
                    }
                },
            };
            self.owned.insert(
                part,
                Owned {
                    next,
                    max_ts: None,
                    held: None,
                    paused: false,
                    last_record: Instant::now(),
                },
            );
            added = true;
        }
        self.discovered_once = true;
        if added {
            self.assign()?;
        }
        self.problem = None;
        self.discovery_backoff = Duration::from_millis(250);
        self.next_discovery = Instant::now() + self.discovery_every;
        Ok(())
    }

    fn retry_later(&mut self, e: String) {
        tracing::warn!(source = %self.uid, error = %e, retry_in = ?self.discovery_backoff, "kafka source cannot read; retrying");
        self.problem = Some(format!("kafkaSource '{}': {e}", self.uid));
        self.next_discovery = Instant::now() + self.discovery_backoff;
        self.discovery_backoff = (self.discovery_backoff * 2).min(Duration::from_secs(10));
    }

    /// Assigns every owned partition at its next offset (paused ones stay paused).
    fn assign(&mut self) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        let mut paused = TopicPartitionList::new();
        for ((t, p), o) in &self.owned {
            tpl.add_partition_offset(t, *p, Offset::Offset(o.next))
                .map_err(kerr)?;
            if o.paused {
                paused.add_partition(t, *p);
            }
        }
        let c = self.consumer()?;
        c.assign(&tpl).map_err(kerr)?;
        if paused.count() > 0 {
            c.pause(&paused).map_err(kerr)?;
        }
        Ok(())
    }

    fn bound_of(&self, part: &Partition) -> Option<i64> {
        self.bound
            .as_ref()
            .and_then(|b| b.get(&split_name(&part.0, part.1)).copied())
    }

    /// Pauses (or resumes) a partition's fetching.
    fn set_paused(&mut self, part: &Partition, paused: bool) {
        let Some(o) = self.owned.get_mut(part) else {
            return;
        };
        if o.paused == paused {
            return;
        }
        o.paused = paused;
        if let Some(c) = &self.consumer {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&part.0, part.1);
            let r = if paused {
                c.pause(&tpl)
            } else {
                c.resume(&tpl)
            };
            if let Err(e) = r {
                tracing::warn!(source = %self.uid, error = %e, "kafka pause/resume failed");
            }
        }
    }

    /// The record of a Kafka message, or why its value does not parse.
    fn record(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        ts: Option<i64>,
    ) -> Result<Record, String> {
        let mut rec = match self.spec.format {
            KafkaFormat::Json => match Record::from_json_slice(payload.unwrap_or_default()) {
                Ok(r) => r,
                Err(e) if e.is_data() => return Err(format!("expected a JSON object: {e}")),
                Err(e) => return Err(format!("invalid JSON: {e}")),
            },
            KafkaFormat::Raw => {
                let mut r = Record::with_capacity(3);
                let v = match payload {
                    Some(b) => Value::from(String::from_utf8_lossy(b).as_ref()),
                    None => Value::Null,
                };
                r.set(self.names.value, v);
                r
            }
        };
        if let Some(k) = self.names.key {
            let v = match key {
                Some(b) => Value::from(String::from_utf8_lossy(b).as_ref()),
                None => Value::Null,
            };
            rec.set(k, v);
        }
        if let (Some(f), Some(t)) = (self.names.ts, ts) {
            rec.set(f, Value::Int(t));
        }
        Ok(rec)
    }

    fn emit(&mut self, part: &Partition, offset: i64, rec: Record, ts: i64, out: &mut Vec<Record>) {
        if let Some(o) = self.owned.get_mut(part) {
            o.next = offset + 1;
            o.max_ts = Some(o.max_ts.map_or(ts, |m| m.max(ts)));
            o.last_record = Instant::now();
        }
        out.push(rec);
    }

    /// Emits the records held back at a bound that has since moved or been lifted.
    fn release_held(&mut self, out: &mut Vec<Record>) {
        let parts: Vec<Partition> = self
            .owned
            .iter()
            .filter(|(_, o)| o.held.is_some())
            .map(|(p, _)| p.clone())
            .collect();
        for part in parts {
            let Some((offset, _, _)) = self.owned.get(&part).and_then(|o| o.held.as_ref()) else {
                continue;
            };
            if self.bound_of(&part).is_some_and(|b| *offset >= b) {
                continue;
            }
            if let Some((offset, rec, ts)) = self.owned.get_mut(&part).and_then(|o| o.held.take()) {
                self.emit(&part, offset, rec, ts, out);
            }
            self.set_paused(&part, false);
        }
    }

    fn at_bound(&self) -> bool {
        self.bound.is_some()
            && self.discovered_once
            && self.owned.iter().all(|(part, o)| {
                self.bound_of(part)
                    .is_some_and(|b| o.held.is_some() || o.next >= b)
            })
    }
}

/// Refuses a source whose named topics the brokers say do not exist. Brokers that do not
/// answer within a few seconds are not an error here: the source retries while it runs.
pub fn check_topics(uid: &str, spec: &KafkaSourceSpec) -> Result<(), String> {
    if spec.topics.is_empty() {
        return Ok(());
    }
    let mut probe = KafkaSource::new(uid, spec, 0, 1)?;
    match probe.fetch_partitions() {
        Ok(_) => Ok(()),
        Err(Fetch::Fatal(e)) => Err(e),
        Err(Fetch::Retry(e)) => {
            tracing::warn!(source = %uid, error = %e, "kafka brokers unreachable at start; the source retries");
            Ok(())
        }
    }
}

enum Fetch {
    /// The brokers did not answer: try again later.
    Retry(String),
    /// The job cannot run as written.
    Fatal(String),
}

impl Source for KafkaSource {
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<Poll, String> {
        if Instant::now() >= self.next_discovery {
            self.discover()?;
        }
        self.release_held(out);
        let mut polled_error = None;
        while out.len() < max {
            let Some(c) = self.consumer.as_ref() else {
                break;
            };
            let msg = match c.poll(Duration::ZERO) {
                None => break,
                Some(Err(e)) => {
                    polled_error = Some(e.to_string());
                    break;
                }
                Some(Ok(m)) => m,
            };
            let part = (msg.topic().to_owned(), msg.partition());
            let offset = msg.offset();
            let Some(owned) = self.owned.get(&part) else {
                continue;
            };
            if offset < owned.next {
                continue;
            }
            let ts = msg.timestamp().to_millis().unwrap_or(0);
            let parsed = self.record(msg.key(), msg.payload(), Some(ts));
            drop(msg);
            let rec = match parsed {
                Ok(r) => r,
                Err(e) => match self.spec.on_parse_error {
                    ParseErrorPolicy::Fail => {
                        return Err(format!(
                            "kafkaSource '{}': {} offset {offset}: {e} (set onParseError: skip to drop such records)",
                            self.uid,
                            split_name(&part.0, part.1)
                        ));
                    }
                    ParseErrorPolicy::Skip => {
                        self.skipped += 1;
                        if let Some(o) = self.owned.get_mut(&part) {
                            o.next = offset + 1;
                        }
                        continue;
                    }
                },
            };
            if self.bound_of(&part).is_some_and(|b| offset >= b) {
                if let Some(o) = self.owned.get_mut(&part) {
                    o.held = Some((offset, rec, ts));
                }
                self.set_paused(&part, true);
                continue;
            }
            self.emit(&part, offset, rec, ts, out);
        }
        match polled_error {
            Some(e) => {
                self.problem = Some(format!(
                    "kafkaSource '{}': brokers {}: {e}",
                    self.uid, self.spec.bootstrap_servers
                ))
            }
            None if !out.is_empty() => self.problem = None,
            None => {}
        }
        if !out.is_empty() {
            return Ok(Poll::Records);
        }
        if self.at_bound() {
            return Ok(Poll::AtBound);
        }
        Ok(Poll::Throttled(Duration::from_micros(200)))
    }

    fn watermark(&self) -> i64 {
        if self.owned.is_empty() {
            return if self.discovered_once {
                i64::MAX
            } else {
                i64::MIN
            };
        }
        // Per partition, the newest timestamp less the allowed out-of-orderness; the
        // subtask's watermark is the smallest of the partitions that are not idle.
        let idle = |o: &Owned| {
            self.idle_timeout
                .is_some_and(|t| o.held.is_none() && o.last_record.elapsed() >= t)
        };
        let of = |o: &Owned| match o.max_ts {
            Some(t) => t.saturating_sub(self.out_of_orderness).saturating_sub(1),
            None => i64::MIN,
        };
        match self.owned.values().filter(|o| !idle(o)).map(of).min() {
            Some(wm) => wm,
            // Every partition idle: the subtask has had no records either and goes idle
            // itself; until then it stays where its partitions got to.
            None => self.owned.values().map(of).max().unwrap_or(i64::MIN),
        }
    }

    fn set_idle_timeout(&mut self, timeout: Duration) {
        self.idle_timeout = Some(timeout);
    }

    fn snapshot_lists(&mut self, id: u64) -> Vec<Vec<Row>> {
        let mut rows: Vec<Row> = self
            .owned
            .iter()
            .map(|((t, p), o)| {
                Row::from([
                    Value::from(t.as_str()),
                    Value::Int(i64::from(*p)),
                    Value::Int(o.next),
                ])
            })
            .collect();
        // Partitions restored but not (yet) found again keep their offsets.
        if let Some(r) = &self.restored {
            for ((t, p), next) in r {
                if owner(t, *p, self.parallelism) == self.subtask
                    && !self.owned.contains_key(&(t.clone(), *p))
                {
                    rows.push(Row::from([
                        Value::from(t.as_str()),
                        Value::Int(i64::from(*p)),
                        Value::Int(*next),
                    ]));
                }
            }
        }
        if self.spec.commit_offsets {
            let offsets = self
                .owned
                .iter()
                .map(|(k, o)| (k.clone(), o.next))
                .collect();
            self.to_commit.push((id, offsets));
        }
        vec![rows]
    }

    fn positions(&self) -> Vec<SplitPosition> {
        self.owned
            .iter()
            .map(|((t, p), o)| SplitPosition {
                split: split_name(t, *p),
                position: o.next,
            })
            .collect()
    }

    fn restore_lists(&mut self, lists: Vec<Vec<Row>>) -> Result<(), String> {
        let mut restored = HashMap::new();
        for row in lists.into_iter().next().unwrap_or_default() {
            match (row.first(), row.get(1), row.get(2)) {
                (Some(Value::Str(t)), Some(Value::Int(p)), Some(Value::Int(next)))
                    if *next >= 0 && i32::try_from(*p).is_ok() =>
                {
                    restored.insert((t.to_string(), *p as i32), *next);
                }
                _ => {
                    return Err(format!(
                        "kafkaSource '{}': invalid restored partition offset {row:?}",
                        self.uid
                    ));
                }
            }
        }
        self.restored = Some(restored);
        Ok(())
    }

    fn set_bound(&mut self, bound: Option<&Bound>) -> Vec<String> {
        let past = bound
            .map(|b| {
                self.positions()
                    .into_iter()
                    .filter(|p| b.get(&p.split).is_some_and(|at| p.position > *at))
                    .map(|p| p.split)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if past.is_empty() {
            self.bound = bound.cloned();
            let parts: Vec<Partition> = self.owned.keys().cloned().collect();
            for part in parts {
                let at = self.bound_of(&part);
                let next = self.owned.get(&part).map(|o| o.next).unwrap_or(0);
                let held = self.owned.get(&part).is_some_and(|o| o.held.is_some());
                self.set_paused(&part, held || at.is_some_and(|b| next >= b));
            }
        }
        past
    }

    fn notify_complete(&mut self, id: u64) {
        let Some(i) = self.to_commit.iter().position(|(s, _)| *s == id) else {
            return;
        };
        let (_, offsets) = self.to_commit.remove(i);
        self.to_commit.retain(|(s, _)| *s > id);
        let Some(c) = &self.consumer else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for ((t, p), next) in &offsets {
            if tpl
                .add_partition_offset(t, *p, Offset::Offset(*next))
                .is_err()
            {
                return;
            }
        }
        if let Err(e) = c.commit(&tpl, CommitMode::Async) {
            tracing::warn!(source = %self.uid, error = %e, "committing offsets to the group failed (monitoring only)");
        }
    }

    fn problem(&self) -> Option<String> {
        self.problem.clone()
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }

    fn pending_records(&self) -> Option<u64> {
        let ends = match self.end_offsets.0.lock() {
            Ok(e) => e,
            Err(p) => p.into_inner(),
        };
        // Unknown until the statistics have covered every owned partition.
        self.owned.iter().try_fold(0u64, |sum, (part, o)| {
            let end = *ends.get(part)?;
            Some(sum + end.saturating_sub(o.next).max(0) as u64)
        })
    }
}
