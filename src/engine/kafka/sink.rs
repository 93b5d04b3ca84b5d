//! The Kafka sink.
//!
//! `exactly-once` is a two-phase commit tied to snapshots, as Flink's KafkaSink does it: the
//! records between two barriers go into one transaction of a producer of their own, whose
//! transactional id (`<prefix>/<subtask>-<run>-<n>`) is used once. At a barrier the
//! transaction is flushed and staged: its id is the sink's state in that snapshot. When the
//! snapshot completes, the staged transactions are committed. A job that starts from a
//! snapshot first commits what that snapshot staged (its earlier run may have died before
//! committing) and aborts every other open transaction under the prefix (what that run wrote
//! after the snapshot), before any subtask writes: `prepare`.
//!
//! `at-least-once` flushes at every barrier and fails the snapshot if a record was not
//! delivered; `none` only flushes when the input ends.

use super::txn::TxnAdmin;
use super::{client_config, default_prefix};
use crate::engine::operators::Operator;
use crate::engine::spec::{DeliveryGuarantee, KafkaFormat, KafkaSinkSpec, parse_duration};
use crate::savepoint::statefile::SubtaskSnapshot;
use crate::savepoint::value::{Name, Record, Row, Value, intern};
use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// Remembers the first record the brokers did not take.
#[derive(Clone, Default)]
pub struct DeliveryContext {
    failed: Arc<Mutex<Option<String>>>,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let mut f = match self.failed.lock() {
                Ok(f) => f,
                Err(p) => p.into_inner(),
            };
            f.get_or_insert_with(|| e.to_string());
        }
    }
}

impl DeliveryContext {
    fn take_failure(&self) -> Option<String> {
        match self.failed.lock() {
            Ok(mut f) => f.take(),
            Err(p) => p.into_inner().take(),
        }
    }
}

type Kp = BaseProducer<DeliveryContext>;

/// A transaction with records in it, flushed and waiting for its snapshot to complete.
struct Staged {
    id: String,
    snapshot: u64,
    producer: Kp,
}

pub struct KafkaSink {
    uid: String,
    spec: KafkaSinkSpec,
    prefix: String,
    /// Tells this task's transactional ids from those of other runs.
    run: String,
    subtask: u32,
    seq: u64,
    ctx: DeliveryContext,
    /// The open transaction's id and producer (exactly-once), or the one producer.
    current: Option<(String, Kp)>,
    staged: Vec<Staged>,
    shadow: bool,
    timeout_ms: String,
    /// `topicField`, `keyField` and `valueField`, interned.
    topic_field: Option<Name>,
    key_field: Option<Name>,
    value_field: Name,
}

fn transactional(spec: &KafkaSinkSpec) -> bool {
    spec.delivery_guarantee == DeliveryGuarantee::ExactlyOnce
}

/// The transactional id prefix of a sink.
pub fn prefix_of(spec: &KafkaSinkSpec, job_name: &str, uid: &str) -> String {
    spec.transactional_id_prefix
        .clone()
        .unwrap_or_else(|| default_prefix(job_name, uid))
}

impl KafkaSink {
    pub fn new(
        uid: &str,
        spec: &KafkaSinkSpec,
        job_name: &str,
        subtask: u32,
        shadow: bool,
    ) -> Result<KafkaSink, String> {
        let timeout = parse_duration("transactionTimeout", &spec.transaction_timeout)
            .map_err(|e| format!("kafkaSink '{uid}': {e}"))?;
        let run = uuid::Uuid::new_v4().simple().to_string();
        Ok(KafkaSink {
            uid: uid.to_owned(),
            spec: spec.clone(),
            prefix: prefix_of(spec, job_name, uid),
            run: run[..8].to_owned(),
            subtask,
            seq: 0,
            ctx: DeliveryContext::default(),
            current: None,
            staged: Vec::new(),
            shadow,
            timeout_ms: timeout.as_millis().to_string(),
            topic_field: spec.topic_field.as_deref().map(intern),
            key_field: spec.key_field.as_deref().map(intern),
            value_field: intern(&spec.value_field),
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> String {
        format!("kafkaSink '{}': {what}: {e}", self.uid)
    }

    /// The producer to send with, opening a transaction first under exactly-once.
    fn producer(&mut self) -> Result<&Kp, String> {
        if self.current.is_none() {
            let (id, p) = if transactional(&self.spec) {
                let id = format!("{}/{}-{}-{}", self.prefix, self.subtask, self.run, self.seq);
                self.seq += 1;
                let p: Kp = client_config(
                    &self.spec.bootstrap_servers,
                    &[
                        ("transactional.id", id.as_str()),
                        ("transaction.timeout.ms", self.timeout_ms.as_str()),
                        ("enable.idempotence", "true"),
                        ("linger.ms", "5"),
                    ],
                    &self.spec.properties,
                )
                .create_with_context(self.ctx.clone())
                .map_err(|e| self.err("creating a producer", e))?;
                p.init_transactions(FLUSH_TIMEOUT)
                    .map_err(|e| self.err(&format!("initialising transactions of {id}"), e))?;
                p.begin_transaction()
                    .map_err(|e| self.err(&format!("beginning transaction {id}"), e))?;
                (id, p)
            } else {
                let idempotent = if self.spec.delivery_guarantee == DeliveryGuarantee::None {
                    "false"
                } else {
                    "true"
                };
                let p: Kp = client_config(
                    &self.spec.bootstrap_servers,
                    &[("enable.idempotence", idempotent), ("linger.ms", "5")],
                    &self.spec.properties,
                )
                .create_with_context(self.ctx.clone())
                .map_err(|e| self.err("creating a producer", e))?;
                (String::new(), p)
            };
            self.current = Some((id, p));
        }
        match &self.current {
            Some((_, p)) => Ok(p),
            None => Err(self.err("producer", "missing")),
        }
    }

    fn encode(&self, rec: &Record) -> Result<(String, Option<String>, Vec<u8>), String> {
        let topic = match (&self.spec.topic, self.topic_field) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => match rec.get(f) {
                Some(Value::Str(s)) => s.to_string(),
                Some(v) if !matches!(v, Value::Null) => v.to_json().to_string(),
                _ => {
                    return Err(self.err(
                        "topicField",
                        format!("record has no '{f}': {}", rec.to_json()),
                    ));
                }
            },
            (None, None) => return Err(self.err("topic", "not set")),
        };
        let key = self.key_field.and_then(|f| match rec.get(f) {
            Some(Value::Str(s)) => Some(s.to_string()),
            Some(Value::Null) | None => None,
            Some(v) => Some(v.to_json().to_string()),
        });
        let value = match self.spec.format {
            KafkaFormat::Json => {
                let mut out = Vec::with_capacity(64);
                rec.write_json(&mut out).map_err(|e| self.err("json", e))?;
                out
            }
            KafkaFormat::Raw => match rec.get(self.value_field) {
                Some(Value::Str(s)) => s.as_bytes().to_vec(),
                Some(Value::Null) | None => Vec::new(),
                Some(v) => v.to_json().to_string().into_bytes(),
            },
        };
        Ok((topic, key, value))
    }

    fn check_delivered(&self) -> Result<(), String> {
        match self.ctx.take_failure() {
            Some(e) => Err(self.err("a record was not delivered", e)),
            None => Ok(()),
        }
    }

    fn flush(&self, p: &Kp) -> Result<(), String> {
        p.flush(FLUSH_TIMEOUT)
            .map_err(|e| self.err("flushing", e))?;
        self.check_delivered()
    }

    /// Commits the staged transactions of snapshots up to `snapshot`.
    fn commit_up_to(&mut self, snapshot: u64) -> Result<(), String> {
        let (done, keep): (Vec<_>, Vec<_>) =
            self.staged.drain(..).partition(|s| s.snapshot <= snapshot);
        self.staged = keep;
        for s in done {
            s.producer
                .commit_transaction(FLUSH_TIMEOUT)
                .map_err(|e| self.err(&format!("committing transaction {}", s.id), e))?;
        }
        Ok(())
    }
}

impl Operator for KafkaSink {
    fn process(&mut self, input: Vec<Record>, _out: &mut Vec<Record>) -> Result<(), String> {
        if input.is_empty() || self.shadow {
            return Ok(());
        }
        let encoded = input
            .iter()
            .map(|r| self.encode(r))
            .collect::<Result<Vec<_>, _>>()?;
        let uid = self.uid.clone();
        let p = self.producer()?;
        for (topic, key, value) in &encoded {
            let mut rec = BaseRecord::to(topic).payload(value);
            if let Some(k) = key {
                rec = rec.key(k);
            }
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        p.poll(Duration::from_millis(1));
                    }
                    Err((e, _)) => {
                        return Err(format!("kafkaSink '{uid}': sending to {topic}: {e}"));
                    }
                }
            }
        }
        p.poll(Duration::ZERO);
        self.check_delivered()
    }

    fn snapshot(&mut self, snapshot_id: u64) -> Result<SubtaskSnapshot, String> {
        match self.spec.delivery_guarantee {
            DeliveryGuarantee::ExactlyOnce => {
                if let Some((id, p)) = self.current.take() {
                    self.flush(&p)?;
                    self.staged.push(Staged {
                        id,
                        snapshot: snapshot_id,
                        producer: p,
                    });
                }
            }
            DeliveryGuarantee::AtLeastOnce => {
                if let Some((_, p)) = &self.current {
                    self.flush(p)?;
                }
            }
            DeliveryGuarantee::None => {}
        }
        Ok(SubtaskSnapshot {
            keyed: None,
            operator_lists: vec![
                self.staged
                    .iter()
                    .map(|s| Row::from([Value::from(s.id.as_str()), Value::Int(s.snapshot as i64)]))
                    .collect(),
            ],
        })
    }

    fn notify_complete(&mut self, snapshot_id: u64) -> Result<(), String> {
        self.commit_up_to(snapshot_id)
    }

    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), String> {
        if let Some((id, p)) = self.current.take() {
            self.flush(&p)?;
            if transactional(&self.spec) {
                self.staged.push(Staged {
                    id,
                    snapshot: 0,
                    producer: p,
                });
            }
        }
        self.commit_up_to(u64::MAX)
    }

    fn on_cut_over(&mut self) {
        self.shadow = false;
    }
}

impl Drop for KafkaSink {
    /// The open transaction belongs to no snapshot: abort it, so read-committed readers are
    /// not held up until the broker's timeout. Staged ones stay open for a restore to commit.
    /// Without transactions, what is buffered is sent before the producer goes.
    fn drop(&mut self) {
        let Some((id, p)) = self.current.take() else {
            return;
        };
        if !transactional(&self.spec) {
            let _ = p.flush(Duration::from_secs(5));
        } else if let Err(e) = p.abort_transaction(Duration::from_secs(5)) {
            tracing::warn!(sink = %self.uid, txn = %id, error = %e, "aborting an open transaction failed; the broker aborts it after transactionTimeout");
        }
    }
}

/// Before an exactly-once sink's subtasks start from a snapshot: commits the transactions
/// it staged and aborts every other open transaction under the prefix. `staged` are the
/// restored rows of every subtask (none on a fresh start).
pub fn prepare(
    spec: &KafkaSinkSpec,
    prefix: &str,
    uid: &str,
    staged: &[Row],
) -> Result<(), String> {
    if !transactional(spec) {
        return Ok(());
    }
    let mut admin = TxnAdmin::new(&spec.bootstrap_servers);
    let mut keep = Vec::new();
    for row in staged {
        let Some(Value::Str(id)) = row.first() else {
            return Err(format!(
                "kafkaSink '{uid}': invalid restored transaction {row:?}"
            ));
        };
        let id = id.to_string();
        let t = admin.describe(&id)?;
        match t.state.as_str() {
            "Ongoing" => {
                tracing::info!(sink = %uid, txn = %id, "committing a transaction the restored snapshot staged");
                admin.end(&id, &t, true)?;
            }
            "PrepareCommit" | "CompleteCommit" => {}
            "Empty" | "NotFound" => {
                tracing::warn!(sink = %uid, txn = %id, state = %t.state, "a staged transaction is no longer known to the broker; taken as committed")
            }
            other => {
                tracing::error!(sink = %uid, txn = %id, state = %other,
                    "a staged transaction was aborted by the broker (the job was down longer than transactionTimeout): its records are lost");
            }
        }
        keep.push(id);
    }
    for id in admin.ongoing_with_prefix(&format!("{prefix}/"))? {
        if keep.contains(&id) {
            continue;
        }
        let t = admin.describe(&id)?;
        if t.state == "Ongoing" {
            tracing::info!(sink = %uid, txn = %id, "aborting a transaction an earlier run left open");
            admin.end(&id, &t, false)?;
        }
    }
    Ok(())
}
