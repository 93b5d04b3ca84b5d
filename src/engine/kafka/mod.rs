//! Kafka: a source whose partition offsets are operator state, and a sink that writes with
//! transactions committed when checkpoints complete. Both use librdkafka (through `rdkafka`);
//! `txn` finishes the transactions an earlier run of a job left open. README.md "Kafka" is
//! the reference.

pub mod sink;
pub mod source;
pub mod txn;

use super::spec::{self, DeliveryGuarantee, JobSpec, KafkaSinkSpec, KafkaSourceSpec, OperatorSpec};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::time::Duration;

/// Where a partition without restored state starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
    Committed,
    /// The first record at or after this time (epoch milliseconds).
    Timestamp(i64),
}

impl StartFrom {
    pub fn parse(text: &str) -> Result<StartFrom, String> {
        let t = text.trim();
        match t {
            "earliest" => return Ok(StartFrom::Earliest),
            "latest" => return Ok(StartFrom::Latest),
            "committed" => return Ok(StartFrom::Committed),
            _ => {}
        }
        if let Ok(ms) = t.parse::<i64>() {
            return Ok(StartFrom::Timestamp(ms));
        }
        t.parse::<jiff::Timestamp>()
            .map(|ts| StartFrom::Timestamp(ts.as_millisecond()))
            .map_err(|_| {
                format!(
                    "startFrom: '{text}' is not earliest, latest, committed, an RFC 3339 time or epoch milliseconds"
                )
            })
    }
}

/// librdkafka settings: ours, then the job's `properties` (which win).
fn client_config(
    bootstrap: &str,
    ours: &[(&str, &str)],
    extra: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    // Back off quickly at first: a broker that comes back is used again within a second.
    c.set("reconnect.backoff.ms", "100");
    c.set("reconnect.backoff.max.ms", "5000");
    for (k, v) in ours {
        c.set(*k, *v);
    }
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

/// The job's checkpoint interval, if it has checkpoints.
fn checkpoint_interval(job: &JobSpec) -> Option<Duration> {
    job.checkpoints
        .as_ref()
        .and_then(|c| spec::parse_duration("checkpoints.interval", &c.interval).ok())
}

/// Problems with a Kafka operator's settings, each naming the field at fault.
pub fn check(op: &OperatorSpec, job: &JobSpec, what: &str, problems: &mut Vec<String>) {
    match op {
        OperatorSpec::KafkaSource(k) => check_source(k, what, problems),
        OperatorSpec::KafkaSink(k) => check_sink(k, job, what, problems),
        _ => {}
    }
}

fn check_source(k: &KafkaSourceSpec, what: &str, problems: &mut Vec<String>) {
    if k.bootstrap_servers.trim().is_empty() {
        problems.push(format!(
            "{what}: bootstrapServers: must name at least one broker"
        ));
    }
    if k.topics.is_empty() && k.topic_pattern.is_none() {
        problems.push(format!(
            "{what}: topics: name at least one topic, or set topicPattern"
        ));
    }
    if let Some(p) = &k.topic_pattern
        && let Err(e) = regex::Regex::new(p)
    {
        problems.push(format!("{what}: topicPattern: {e}"));
    }
    match StartFrom::parse(&k.start_from) {
        Ok(StartFrom::Committed) if k.group_id.is_none() => problems.push(format!(
            "{what}: startFrom: committed needs groupId (whose offsets to start from)"
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("{what}: {e}")),
    }
    if k.commit_offsets && k.group_id.is_none() {
        problems.push(format!(
            "{what}: commitOffsets needs groupId (the group to commit to)"
        ));
    }
    for (field, text) in [
        ("maxOutOfOrderness", &k.max_out_of_orderness),
        ("discoveryInterval", &k.discovery_interval),
    ] {
        if let Err(e) = spec::parse_duration(field, text) {
            problems.push(format!("{what}: {e}"));
        }
    }
}

fn check_sink(k: &KafkaSinkSpec, job: &JobSpec, what: &str, problems: &mut Vec<String>) {
    if k.bootstrap_servers.trim().is_empty() {
        problems.push(format!(
            "{what}: bootstrapServers: must name at least one broker"
        ));
    }
    match (&k.topic, &k.topic_field) {
        (None, None) => problems.push(format!("{what}: topic: set topic or topicField")),
        (Some(_), Some(_)) => problems.push(format!(
            "{what}: topic and topicField: set one of them, not both"
        )),
        _ => {}
    }
    let timeout = match spec::parse_duration("transactionTimeout", &k.transaction_timeout) {
        Ok(t) => t,
        Err(e) => {
            problems.push(format!("{what}: {e}"));
            return;
        }
    };
    if k.delivery_guarantee == DeliveryGuarantee::ExactlyOnce {
        match checkpoint_interval(job) {
            None => problems.push(format!(
                "{what}: deliveryGuarantee: exactly-once commits with checkpoints; set checkpoints.interval (or use at-least-once)"
            )),
            Some(interval) if timeout <= interval => problems.push(format!(
                "{what}: transactionTimeout: {} is not longer than checkpoints.interval {}; the broker would abort transactions before their checkpoint completes",
                k.transaction_timeout, job.checkpoints.as_ref().map(|c| c.interval.as_str()).unwrap_or("")
            )),
            Some(_) => {}
        }
    }
}

/// The stable hash of a topic name that spreads partitions over subtasks.
fn topic_hash(topic: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(topic.as_bytes())
}

/// The subtask (of `parallelism`) that reads `partition` of `topic`: a topic's partitions
/// go round-robin, starting at a subtask its name picks.
pub fn owner(topic: &str, partition: i32, parallelism: u32) -> u32 {
    let p = u64::from(parallelism.max(1));
    ((topic_hash(topic) % p + partition.max(0) as u64) % p) as u32
}

/// The split name of a partition in positions, bounds and the REST API.
pub fn split_name(topic: &str, partition: i32) -> String {
    format!("{topic}-{partition}")
}

/// The default transactional id prefix of a sink.
pub fn default_prefix(job_name: &str, uid: &str) -> String {
    format!("sjob/{job_name}/{uid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_positions_parse() {
        assert_eq!(StartFrom::parse("earliest"), Ok(StartFrom::Earliest));
        assert_eq!(
            StartFrom::parse("1700000000000"),
            Ok(StartFrom::Timestamp(1_700_000_000_000))
        );
        assert_eq!(
            StartFrom::parse("2026-01-02T03:04:05Z"),
            Ok(StartFrom::Timestamp(1_767_323_045_000))
        );
        let e = StartFrom::parse("yesterday").unwrap_err();
        assert!(e.contains("startFrom: 'yesterday'"), "{e}");
    }

    #[test]
    fn partitions_spread_evenly_over_subtasks() {
        for p in 1..5u32 {
            let mut n = vec![0; p as usize];
            for part in 0..(3 * p as i32) {
                n[owner("orders", part, p) as usize] += 1;
            }
            assert!(n.iter().all(|c| *c == 3), "{p}: {n:?}");
        }
    }
}
