//! The Kafka source and sink against a real Apache Kafka broker (one KRaft node started by
//! the harness from the jars of `bash e2e/kafka/install.sh`). Outputs are read back with a
//! read-committed consumer and checked against what the input implies, independently of the
//! engine.

use sjob::engine::{self, JobOptions, JobState, spec::JobSpec};
use sjob::local::kafka_server::KafkaBroker;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One broker for every test of this binary; each test has topics of its own.
fn broker() -> &'static KafkaBroker {
    static BROKER: OnceLock<(tempfile::TempDir, KafkaBroker)> = OnceLock::new();
    &BROKER
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let b = KafkaBroker::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            (dir, b)
        })
        .1
}

fn spec(yaml: &str) -> JobSpec {
    JobSpec::from_yaml(yaml).unwrap_or_else(|e| panic!("test job does not parse: {e}\n{yaml}"))
}

/// Input records `from..to`: key `k<i mod keys>`, JSON `{"key", "n"}`.
fn input(from: u64, to: u64, keys: u64) -> Vec<(String, String)> {
    (from..to)
        .map(|i| {
            let k = format!("k{}", i % keys);
            (k.clone(), format!(r#"{{"key":"{k}","n":{i}}}"#))
        })
        .collect()
}

/// Kafka in, count per key, Kafka out.
fn count_job(name: &str, input: &str, output: &str, guarantee: &str, checkpoints: &Path) -> String {
    format!(
        r#"
name: {name}
parallelism: 2
checkpoints:
  interval: 300ms
  dir: {}
operators:
  - kind: kafkaSource
    uid: in
    bootstrapServers: {bs}
    topics: [{input}]
  - kind: keyBy
    field: key
  - kind: count
    uid: counter
  - kind: kafkaSink
    uid: out
    bootstrapServers: {bs}
    topic: {output}
    keyField: key
    deliveryGuarantee: {guarantee}
"#,
        checkpoints.display(),
        bs = broker().bootstrap()
    )
}

/// Per key, every count the output holds, sorted.
fn output_counts(topic: &str) -> BTreeMap<String, Vec<u64>> {
    counts_at(broker(), topic)
}

/// Per key, every count `topic` of broker `b` holds, sorted.
fn counts_at(b: &KafkaBroker, topic: &str) -> BTreeMap<String, Vec<u64>> {
    let mut m: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, _, v) in b.read_committed(topic).unwrap_or_else(|e| panic!("{e}")) {
        let v: serde_json::Value =
            serde_json::from_str(&v).unwrap_or_else(|e| panic!("output {v:?}: {e}"));
        let (Some(k), Some(c)) = (v["key"].as_str(), v["count"].as_u64()) else {
            panic!("output without key and count: {v}");
        };
        m.entry(k.to_owned()).or_default().push(c);
    }
    for v in m.values_mut() {
        v.sort_unstable();
    }
    m
}

/// How many input records each key has among `0..total`.
fn per_key(total: u64, keys: u64) -> BTreeMap<String, u64> {
    (0..keys.min(total))
        .map(|k| {
            (
                format!("k{k}"),
                (0..total).filter(|i| i % keys == k).count() as u64,
            )
        })
        .collect()
}

/// Exactly once: each key's counts are 1, 2, …, n once each.
fn assert_exactly_once(topic: &str, total: u64, keys: u64) {
    let got = output_counts(topic);
    for (k, n) in per_key(total, keys) {
        let have = got.get(&k).cloned().unwrap_or_default();
        let want: Vec<u64> = (1..=n).collect();
        assert!(
            have == want,
            "key {k}: expected counts 1..={n} once each, got {} values (first {:?}, last {:?})",
            have.len(),
            &have[..have.len().min(5)],
            have.last()
        );
    }
    assert_eq!(got.len() as u64, keys.min(total), "keys in the output");
}

fn source_position(job: &engine::JobHandle) -> i64 {
    job.sources().positions.iter().map(|p| p.position).sum()
}

/// Waits until the job's source has read `n` records (its offsets add up to `n`).
fn wait_read(job: &engine::JobHandle, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while source_position(job) < n {
        assert!(
            Instant::now() < deadline,
            "source at {} of {n}; problems {:?}; state {:?} {:?}",
            source_position(job),
            job.sources().problems,
            job.state(),
            job.failure()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(job: &JobSpec, from: Option<&str>, p: Option<u32>) -> engine::JobHandle {
    engine::start(
        job,
        JobOptions {
            savepoint: from.map(str::to_owned),
            parallelism: p,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("start failed: {e}"))
}

/// Upgrades through stop-with-savepoint while records flow, rescaling 2 -> 3 -> 1 (input
/// partitions redistributed), then resumes once more: each input's count exactly once.
#[test]
fn exactly_once_across_savepoint_upgrades_and_rescales() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let sps = dir.path().join("sp");
    let sps = sps.to_str().unwrap();
    b.create_topic("eo-in", 5).unwrap();
    b.create_topic("eo-out", 3).unwrap();
    let keys = 37;
    b.produce("eo-in", &input(0, 4000, keys)).unwrap();
    let job_spec = spec(&count_job(
        "eo",
        "eo-in",
        "eo-out",
        "exactly-once",
        &dir.path().join("chk"),
    ));

    let job = start(&job_spec, None, Some(2));
    wait_read(&job, 1500);
    let sp1 = job.stop_with_savepoint(sps, false).unwrap();
    assert_eq!(job.wait(), JobState::Finished, "{:?}", job.failure());

    // Written while no job runs, and while the next one does.
    b.produce("eo-in", &input(4000, 6000, keys)).unwrap();
    let job = start(&job_spec, Some(&sp1), Some(3));
    let writer = std::thread::spawn(move || broker().produce("eo-in", &input(6000, 9000, keys)));
    wait_read(&job, 7000);
    let sp2 = job.stop_with_savepoint(sps, false).unwrap();
    assert_eq!(job.wait(), JobState::Finished, "{:?}", job.failure());
    writer.join().unwrap().unwrap();

    let job = start(&job_spec, Some(&sp2), Some(1));
    wait_read(&job, 9000);
    let sp3 = job.stop_with_savepoint(sps, false).unwrap();
    assert_eq!(job.wait(), JobState::Finished, "{:?}", job.failure());
    assert_exactly_once("eo-out", 9000, keys);

    // A resume with nothing new writes nothing new.
    let job = start(&job_spec, Some(&sp3), Some(2));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(source_position(&job), 9000);
    job.stop_with_savepoint(sps, false).unwrap();
    assert_eq!(job.wait(), JobState::Finished, "{:?}", job.failure());
    assert_exactly_once("eo-out", 9000, keys);
}

/// A job file for `sjob run`.
fn write_job(dir: &Path, yaml: &str) -> std::path::PathBuf {
    let p = dir.join("job.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

struct Engine(Child);

impl Engine {
    fn run(dir: &Path, job: &Path, job_id: &str) -> Engine {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("engine.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sjob"))
            .args(["run", "--rest-port", "0", "--job-id", job_id])
            .arg(job)
            .env("SJOB_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("sjob runs");
        Engine(child)
    }

    /// kill -9.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Completed checkpoints of a job under `dir`.
fn completed_checkpoints(dir: &Path, job_id: &str) -> usize {
    std::fs::read_dir(dir.join(job_id))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("_metadata").exists())
                .count()
        })
        .unwrap_or(0)
}

/// Polls the output until it holds `n` records (read committed), for up to a minute.
fn wait_output(topic: &str, n: usize, log: &Path) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = broker()
            .read_committed(topic)
            .unwrap_or_else(|e| panic!("{e}"))
            .len();
        if have >= n {
            return have;
        }
        assert!(
            Instant::now() < deadline,
            "{topic} holds {have} of {n} records; engine log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An engine process killed with SIGKILL mid-run, while a transaction is open, and started
/// again with the same job id resumes from its newest checkpoint: the transactions that
/// checkpoint staged are committed, the ones opened after it aborted, and the output holds
/// each input's count exactly once. Under at-least-once, each at least once.
#[test]
fn kill_dash_nine_recovers_from_the_newest_checkpoint() {
    for (guarantee, exact) in [("exactly-once", true), ("at-least-once", false)] {
        let b = broker();
        let dir = tempfile::tempdir().unwrap();
        let (input_topic, output) = (
            format!("kill-in-{guarantee}"),
            format!("kill-out-{guarantee}"),
        );
        b.create_topic(&input_topic, 4).unwrap();
        b.create_topic(&output, 2).unwrap();
        let keys = 23;
        b.produce(&input_topic, &input(0, 5000, keys)).unwrap();
        let chk = dir.path().join("chk");
        let job = write_job(
            dir.path(),
            &count_job("killed", &input_topic, &output, guarantee, &chk),
        );
        let job_id = "0123456789abcdef0123456789abcdef";
        let log = dir.path().join("engine.log");
        let mut engine = Engine::run(dir.path(), &job, job_id);
        // Records keep coming, a batch every 10 ms, until the engine has been killed.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = std::thread::spawn({
            let (t, stop) = (input_topic.clone(), stop.clone());
            move || {
                let mut next = 5000;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    broker().produce(&t, &input(next, next + 100, keys))?;
                    next += 100;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok::<_, String>(next)
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while completed_checkpoints(&chk, job_id) < 2 {
            assert!(
                Instant::now() < deadline,
                "no checkpoints; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_output(&output, 1, &log);
        let mut admin = sjob::engine::kafka::txn::TxnAdmin::new(b.bootstrap());
        if exact {
            // Killed while the sink has a transaction open.
            while admin
                .ongoing_with_prefix("sjob/killed/out/")
                .unwrap()
                .is_empty()
            {
                assert!(Instant::now() < deadline, "no open transaction");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        engine.kill();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let total = writer.join().unwrap().unwrap();
        let mut engine = Engine::run(dir.path(), &job, job_id);
        wait_output(&output, total as usize, &log);
        // Let a checkpoint or two more pass: nothing more may appear.
        std::thread::sleep(Duration::from_millis(1000));
        engine.kill();
        let got = output_counts(&output);
        if exact {
            assert_exactly_once(&output, total, keys);
        } else {
            for (k, n) in per_key(total, keys) {
                let have = got.get(&k).cloned().unwrap_or_default();
                for c in 1..=n {
                    assert!(have.contains(&c), "{guarantee}: key {k} lacks count {c}");
                }
            }
        }
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            log_text.contains("resuming from the newest checkpoint"),
            "the second run resumed from a checkpoint"
        );
        if exact {
            assert!(
                log_text.contains("committing a transaction the restored snapshot staged")
                    || log_text.contains("aborting a transaction an earlier run left open"),
                "the restart finished the killed run's open transactions:\n{log_text}"
            );
            assert!(
                admin
                    .ongoing_with_prefix("sjob/killed/out/")
                    .unwrap()
                    .is_empty(),
                "no transaction left open"
            );
        }
    }
}

/// Bad input: a missing topic refused at start naming it; a value that does not parse fails
/// the job naming topic, partition and offset, or is skipped and counted; a transaction
/// timeout not longer than the checkpoint interval, and exactly-once without checkpoints, are
/// refused naming the field.
#[test]
fn bad_input_is_refused_or_counted_with_its_cause() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let chk = dir.path().join("chk");
    b.create_topic("bad-in", 1).unwrap();
    b.create_topic("bad-out", 1).unwrap();

    let missing = spec(&count_job(
        "missing",
        "no-such-topic",
        "bad-out",
        "at-least-once",
        &chk,
    ));
    let e = engine::start(&missing, JobOptions::default())
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref()
            .is_some_and(|e| e.contains("topic 'no-such-topic' does not exist")
                && e.contains("kafkaSource 'in'")),
        "{e:?}"
    );

    // Brokers that do not answer at start: the job starts, and its source says why it reads
    // nothing while it retries.
    let unreachable = count_job("down", "bad-in", "bad-out", "at-least-once", &chk)
        .replace(b.bootstrap(), "127.0.0.1:1");
    let job = start(&spec(&unreachable), None, Some(1));
    let deadline = Instant::now() + Duration::from_secs(60);
    while job.sources().problems.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no problem reported for unreachable brokers"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let problems = job.sources().problems;
    assert!(
        problems
            .iter()
            .any(|p| p.contains("kafkaSource 'in'") && p.contains("127.0.0.1:1")),
        "{problems:?}"
    );
    assert_eq!(job.state(), JobState::Running);
    job.cancel();
    job.wait();

    b.produce(
        "bad-in",
        &[
            ("k1".into(), r#"{"key":"k1"}"#.into()),
            ("k2".into(), "not json".into()),
            ("k3".into(), r#"{"key":"k3"}"#.into()),
        ],
    )
    .unwrap();
    let fail = spec(&count_job(
        "fail",
        "bad-in",
        "bad-out",
        "at-least-once",
        &chk,
    ));
    let job = start(&fail, None, Some(1));
    assert_eq!(
        job.wait_timeout(Duration::from_secs(30)),
        Some(JobState::Failed)
    );
    let why = job.failure().unwrap_or_default();
    assert!(
        why.contains("bad-in-0 offset 1")
            && why.contains("invalid JSON")
            && why.contains("onParseError"),
        "{why}"
    );

    let skip_yaml = count_job("skip", "bad-in", "bad-out", "at-least-once", &chk).replace(
        "    topics: [bad-in]\n",
        "    topics: [bad-in]\n    onParseError: skip\n",
    );
    let job = start(&spec(&skip_yaml), None, Some(1));
    wait_read(&job, 3);
    assert_eq!(job.sources().skipped, 1);
    let metrics = sjob::engine::metrics::render(&job).unwrap();
    assert!(
        metrics.contains("sjob_source_skipped_records_total{") && metrics.contains("} 1"),
        "{metrics}"
    );
    job.cancel();
    job.wait();

    let short = count_job("short", "bad-in", "bad-out", "exactly-once", &chk).replace(
        "    deliveryGuarantee: exactly-once\n",
        "    deliveryGuarantee: exactly-once\n    transactionTimeout: 200ms\n",
    );
    let e = engine::graph::JobGraph::build(&spec(&short), None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("operators[3] (kafkaSink 'out'): transactionTimeout: 200ms is not longer than checkpoints.interval 300ms"),
        "{e}"
    );
    let no_chk = count_job("nochk", "bad-in", "bad-out", "exactly-once", &chk)
        .replace("checkpoints:\n  interval: 300ms\n", "")
        .replace(&format!("  dir: {}\n", chk.display()), "");
    let e = engine::graph::JobGraph::build(&spec(&no_chk), None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("deliveryGuarantee: exactly-once commits with checkpoints"),
        "{e}"
    );
}

/// A broker lost while the job runs: the source says why it cannot read (REST
/// `/jobs/:id/sources` `problems`, and /metrics) while it retries, and once the broker is
/// back the job goes on where it was, exactly once.
#[test]
fn a_lost_broker_is_reported_and_the_job_goes_on_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = KafkaBroker::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    b.create_topic("lost-in", 2).unwrap();
    b.create_topic("lost-out", 2).unwrap();
    let keys = 11;
    b.produce("lost-in", &input(0, 2000, keys)).unwrap();
    let yaml = count_job(
        "lost",
        "lost-in",
        "lost-out",
        "exactly-once",
        &dir.path().join("chk"),
    )
    .replace(broker().bootstrap(), b.bootstrap())
    .replace(
        "    topics: [lost-in]\n",
        "    topics: [lost-in]\n    discoveryInterval: 500ms\n",
    );
    let job = start(&spec(&yaml), None, Some(1));
    wait_read(&job, 2000);

    b.stop();
    let deadline = Instant::now() + Duration::from_secs(60);
    while job.sources().problems.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no problem reported with the broker down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let problems = job.sources().problems;
    assert!(
        problems.iter().any(|p| p.contains("kafkaSource 'in'")),
        "{problems:?}"
    );
    let metrics = sjob::engine::metrics::render(&job).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sjob_source_problems{") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert_eq!(job.state(), JobState::Running, "{:?}", job.failure());

    b.restart().unwrap();
    b.produce("lost-in", &input(2000, 4000, keys)).unwrap();
    wait_read(&job, 4000);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job.sources().problems.is_empty() {
        assert!(
            Instant::now() < deadline,
            "problem not cleared: {:?}",
            job.sources().problems
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    job.stop_with_savepoint(dir.path().join("sp").to_str().unwrap(), false)
        .unwrap();
    assert_eq!(job.wait(), JobState::Finished, "{:?}", job.failure());
    let got = counts_at(&b, "lost-out");
    for (k, n) in per_key(4000, keys) {
        assert_eq!(got.get(&k), Some(&(1..=n).collect::<Vec<u64>>()), "key {k}");
    }
}

/// The source's options, read back through a raw-valued sink that takes its topic from a field
/// (`deliveryGuarantee: none`): topics by pattern, raw values with key and timestamp fields, a
/// start at a time, a partition added while the job runs (read from its start), and offsets
/// committed to the group after each checkpoint.
#[test]
fn source_options_discovery_and_committed_offsets() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    b.create_topic("opt-a", 1).unwrap();
    b.create_topic("opt-b", 1).unwrap();
    b.create_topic("opt-out", 1).unwrap();
    b.produce("opt-a", &[("early".into(), "before the start".into())])
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    std::thread::sleep(Duration::from_millis(50));
    b.produce("opt-a", &[("a1".into(), "one".into())]).unwrap();
    b.produce("opt-b", &[("b1".into(), "two".into())]).unwrap();
    let yaml = format!(
        r#"
name: options
parallelism: 2
checkpoints:
  interval: 200ms
  dir: {chk}
operators:
  - kind: kafkaSource
    uid: in
    bootstrapServers: {bs}
    topicPattern: "opt-[ab]"
    startFrom: "{start_ms}"
    format: raw
    valueField: text
    keyField: user
    timestampField: at
    discoveryInterval: 300ms
    groupId: options-group
    commitOffsets: true
  - kind: map
    set:
      - {{field: dest, expr: "'opt-out'"}}
      - {{field: line, expr: "text + '|' + string(at)"}}
  - kind: kafkaSink
    uid: out
    bootstrapServers: {bs}
    topicField: dest
    keyField: user
    format: raw
    valueField: line
    deliveryGuarantee: none
"#,
        chk = dir.path().join("chk").display(),
        bs = b.bootstrap()
    );
    let job = start(&spec(&yaml), None, None);
    // "early" (before startFrom) is skipped: its offset 0 is passed over.
    wait_read(&job, 3);
    b.add_partitions("opt-b", 3).unwrap();
    b.produce(
        "opt-b",
        &(0..40)
            .map(|i| (format!("n{i}"), format!("new {i}")))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    wait_read(&job, 43);
    let positions = job.sources().positions;
    assert_eq!(
        positions
            .iter()
            .map(|p| p.split.as_str())
            .collect::<Vec<_>>(),
        ["opt-a-0", "opt-b-0", "opt-b-1", "opt-b-2"],
        "the added partitions are read: {positions:?}"
    );
    // The group's committed offsets catch up with the positions after a checkpoint.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let committed = b.committed("options-group", &["opt-a", "opt-b"]).unwrap();
        let want: Vec<(String, i64)> = positions
            .iter()
            .map(|p| (p.split.clone(), p.position))
            .collect();
        if committed == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed {committed:?}, positions {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    job.cancel();
    job.wait();
    let out = b.read_committed("opt-out").unwrap();
    // Raw values `<text>|<timestamp>`, keyed by the input's key, in the topic of `dest`.
    let mut texts: Vec<String> = out
        .iter()
        .map(|(_, k, v)| {
            let (text, at) = v.rsplit_once('|').unwrap_or_else(|| panic!("{v:?}"));
            assert!(at.parse::<u128>().is_ok_and(|t| t >= start_ms), "{v}");
            let want_key = match text {
                "one" => "a1".to_owned(),
                "two" => "b1".to_owned(),
                t => format!("n{}", t.trim_start_matches("new ")),
            };
            assert_eq!(k.as_deref(), Some(want_key.as_str()), "{v}");
            text.to_owned()
        })
        .collect();
    texts.sort();
    assert_eq!(texts.len(), 42, "{texts:?}");
    assert!(texts.contains(&"one".to_owned()) && texts.contains(&"two".to_owned()));
    assert!(!texts.contains(&"before the start".to_owned()));
}

/// Event time of the first record of a windowed test (a Kafka timestamp of 0 means "now").
const T0: i64 = 1_000_000_000;

/// Records of a windowed test: key `k<i mod keys>`, Kafka timestamp (event time)
/// `T0 + i * step_ms`.
fn timed(from: u64, to: u64, step_ms: u64, keys: u64) -> Vec<(String, String, i64)> {
    (from..to)
        .map(|i| {
            let k = format!("k{}", i % keys);
            (
                k.clone(),
                format!(r#"{{"key":"{k}"}}"#),
                T0 + (i * step_ms) as i64,
            )
        })
        .collect()
}

/// Kafka in (event time: the records' Kafka timestamps, put into `t`), 10 s windows counting per key, Kafka out (no guarantee:
/// written at once).
fn windowed_job(name: &str, input: &str, output: &str, p: u32, watermarks: &str) -> JobSpec {
    spec(&format!(
        r#"
name: {name}
parallelism: {p}
{watermarks}
operators:
  - kind: kafkaSource
    uid: in
    bootstrapServers: {bs}
    topics: [{input}]
    timestampField: t
  - kind: keyBy
    field: key
  - kind: window
    uid: windows
    size: 10s
    timeField: t
    aggregate: count
  - kind: kafkaSink
    uid: out
    bootstrapServers: {bs}
    topic: {output}
    deliveryGuarantee: none
"#,
        bs = broker().bootstrap()
    ))
}

/// (key, windowStart) -> count of every window in `topic`.
fn windows_in(topic: &str) -> BTreeMap<(String, i64), u64> {
    broker()
        .read_committed(topic)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|(_, _, v)| {
            let v: serde_json::Value = serde_json::from_str(&v).unwrap();
            (
                (
                    v["key"].as_str().unwrap().to_owned(),
                    v["windowStart"].as_i64().unwrap(),
                ),
                v["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Partition 1 of the input stays empty. Without an idle timeout it holds the watermark at its
/// start, so no window fires while the job runs; with one, the windows that partition 0's
/// records complete fire, whether both partitions are read by one subtask (per-partition
/// watermarks) or by two (the idle subtask tells downstream it is idle).
#[test]
fn an_empty_partition_holds_windows_back_only_without_an_idle_timeout() {
    let b = broker();
    b.create_topic("idle-in", 2).unwrap();
    b.produce_at("idle-in", 0, &timed(0, 300, 100, 3)).unwrap();
    let want: BTreeMap<(String, i64), u64> = [0i64, 10_000]
        .iter()
        .flat_map(|start| {
            (0..3u64).map(move |k| {
                let n = (0..300u64)
                    .filter(|i| i % 3 == k && (i * 100) as i64 / 10_000 * 10_000 == *start)
                    .count() as u64;
                ((format!("k{k}"), T0 + *start), n)
            })
        })
        .collect();
    for (case, p, watermarks) in [
        ("none-p1", 1, ""),
        ("idle-p1", 1, "watermarks: {idleTimeout: 500ms}"),
        ("idle-p2", 2, "watermarks: {idleTimeout: 500ms}"),
    ] {
        let out = format!("idle-out-{case}");
        b.create_topic(&out, 1).unwrap();
        let job = start(
            &windowed_job(case, "idle-in", &out, p, watermarks),
            None,
            None,
        );
        wait_read(&job, 300);
        let window = |job: &engine::JobHandle| {
            job.vertices()
                .into_iter()
                .find(|v| v.uid == "windows")
                .unwrap()
        };
        if watermarks.is_empty() {
            std::thread::sleep(Duration::from_secs(3));
            assert_eq!(
                window(&job).watermark,
                None,
                "{case}: the empty partition holds it"
            );
            assert!(windows_in(&out).is_empty(), "{case}: a window fired");
        } else {
            let deadline = Instant::now() + Duration::from_secs(30);
            while windows_in(&out).len() < want.len() {
                assert!(
                    Instant::now() < deadline,
                    "{case}: windows {:?}; sources {:?}; window {:?}; {:?}",
                    windows_in(&out),
                    job.sources(),
                    window(&job),
                    job.failure()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            // The last record is at 29.9 s: the window [20 s, 30 s) stays open.
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(windows_in(&out), want, "{case}");
            assert_eq!(window(&job).watermark, Some(T0 + 29_899), "{case}");
            if p == 2 {
                let idle: Vec<bool> = job.sources().subtasks.iter().map(|s| s.idle).collect();
                assert!(idle.contains(&true), "{case}: no subtask idle: {idle:?}");
            }
            let metrics = engine::metrics::render(&job).unwrap();
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with("sjob_operator_watermark_seconds")
                        && l.contains("uid=\"windows\"")
                        && l.ends_with(&format!(" {}", (T0 + 29_899) as f64 / 1000.0))),
                "{case}: {metrics}"
            );
        }
        job.cancel();
        job.wait();
    }
}

/// Partition 0 holds 1,000 s of event time already; partition 1 gets records in real time.
/// With `maxDrift: 20s` the subtask reading partition 0 waits for the other one, so it reads
/// no further than the drift (plus one poll) ahead, and the window state taken in savepoints
/// stays flat; without it, it reads everything at once.
#[test]
fn a_source_ahead_by_more_than_the_max_drift_waits_for_the_slowest() {
    let b = broker();
    b.create_topic("skew-in", 2).unwrap();
    b.produce_at("skew-in", 0, &timed(0, 100_000, 10, 1000))
        .unwrap();
    // Partition 1: 10 s of event time per second, from a thread, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                broker()
                    .produce_at("skew-in", 1, &timed(i, i + 100, 10, 1000))
                    .unwrap();
                i += 100;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let mut largest = BTreeMap::new();
    let offset_of = |job: &engine::JobHandle, split: &str| {
        job.sources()
            .positions
            .iter()
            .find(|p| p.split == split)
            .map_or(0, |p| p.position)
    };
    for (case, watermarks) in [
        ("aligned", "watermarks: {maxDrift: 20s, idleTimeout: 2s}"),
        ("unaligned", ""),
    ] {
        let out = format!("skew-out-{case}");
        b.create_topic(&out, 1).unwrap();
        let job = start(
            &windowed_job(case, "skew-in", &out, 2, watermarks),
            None,
            None,
        );
        let mut sizes = Vec::new();
        let mut furthest_ahead_ms = 0i64;
        let mut paused_seen = false;
        for round in 0..8 {
            std::thread::sleep(Duration::from_secs(1));
            let ahead = T0 + offset_of(&job, "skew-in-0") * 10;
            let behind = job
                .sources()
                .subtasks
                .iter()
                .filter_map(|s| s.watermark)
                .min()
                .unwrap_or(T0);
            furthest_ahead_ms = furthest_ahead_ms.max(ahead - behind);
            paused_seen |= job
                .sources()
                .subtasks
                .iter()
                .any(|s| s.paused_for_alignment);
            if round % 2 == 1 {
                let sp = job
                    .savepoint(dir.path().join(case).to_str().unwrap())
                    .unwrap_or_else(|e| panic!("{case}: {e} ({:?})", job.failure()));
                let store = sjob::savepoint::store::Store::open(&sp).unwrap();
                sizes.push(
                    sjob::savepoint::metadata::SnapshotMetadata::read(&store)
                        .unwrap()
                        .total_bytes(),
                );
            }
        }
        job.cancel();
        job.wait();
        largest.insert(case, *sizes.iter().max().unwrap());
        eprintln!("{case}: savepoint sizes {sizes:?}, furthest ahead {furthest_ahead_ms} ms");
        if case == "aligned" {
            // The drift, one poll of 1,024 records (10.24 s) and the sampling's own lag.
            assert!(
                furthest_ahead_ms <= 20_000 + 10_240 + 5_000,
                "{case}: partition 0 ran {furthest_ahead_ms} ms ahead"
            );
            assert!(paused_seen, "{case}: never paused");
            let smallest = *sizes.iter().min().unwrap();
            assert!(
                sizes.iter().all(|s| *s <= 2 * smallest),
                "{case}: savepoint sizes {sizes:?}"
            );
        } else {
            assert!(
                furthest_ahead_ms > 200_000,
                "{case}: partition 0 only {furthest_ahead_ms} ms ahead"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    // Without alignment the windows of all of partition 0's event time wait in state.
    assert!(
        largest["unaligned"] > 2 * largest["aligned"],
        "largest savepoints {largest:?}"
    );
}

/// Every (key, t) in the committed part files of a file sink directory.
fn file_records(dir: &Path) -> Vec<(String, i64)> {
    let mut got = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !e.path().is_file() {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            got.push((
                v["key"].as_str().unwrap().to_owned(),
                v["t"].as_i64().unwrap(),
            ));
        }
    }
    got.sort();
    got
}

/// Waits until `what` is true of the job, or fails with `why` of it.
fn wait_until(
    job: &engine::JobHandle,
    what: impl Fn(&engine::JobHandle) -> bool,
    why: impl Fn(&engine::JobHandle) -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !what(job) {
        assert!(
            Instant::now() < deadline,
            "{}; {:?}",
            why(job),
            job.failure()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Records later than a window's end go to its late sink (a file sink with checkpoints), not
/// downstream and not counted as dropped: each one exactly once across a stop with savepoint
/// and a restore from it, while the windows' counts leave through the main sink.
#[test]
fn late_records_go_to_the_late_sink_exactly_once_across_a_savepoint() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    b.create_topic("late-in", 1).unwrap();
    b.create_topic("late-out", 1).unwrap();
    b.produce_at("late-in", 0, &timed(0, 300, 100, 3)).unwrap();
    let late_dir = dir.path().join("late");
    let job_spec = spec(&format!(
        r#"
name: late
checkpoints: {{interval: 200ms, dir: {chk}}}
operators:
  - {{kind: kafkaSource, uid: in, bootstrapServers: {bs}, topics: [late-in], timestampField: t}}
  - {{kind: keyBy, field: key}}
  - kind: window
    uid: windows
    size: 10s
    timeField: t
    aggregate: count
    lateSink: {{kind: fileSink, uid: late, path: {late}}}
  - {{kind: kafkaSink, uid: out, bootstrapServers: {bs}, topic: late-out, deliveryGuarantee: none}}
"#,
        chk = dir.path().join("chk").display(),
        bs = b.bootstrap(),
        late = late_dir.display(),
    ));
    let vertex = |job: &engine::JobHandle, uid: &str| {
        job.vertices()
            .into_iter()
            .find(|v| v.uid == uid)
            .unwrap_or_else(|| panic!("no vertex {uid}"))
    };
    let watermark_past = |at: i64| {
        move |job: &engine::JobHandle| vertex(job, "windows").watermark.is_some_and(|w| w >= at)
    };
    let job = start(&job_spec, None, None);
    // Records up to 29.9 s: the windows [0, 10 s) and [10 s, 20 s) fire.
    wait_until(&job, watermark_past(T0 + 20_000), |job| {
        format!("window {:?}", vertex(job, "windows"))
    });
    // Four records for the first window, long gone.
    let late1: Vec<_> = timed(0, 4, 1000, 2);
    b.produce_at("late-in", 0, &late1).unwrap();
    let mut want: Vec<(String, i64)> = late1.iter().map(|(k, _, t)| (k.clone(), *t)).collect();
    want.sort();
    wait_until(
        &job,
        |_| file_records(&late_dir).len() >= 4,
        |job| format!("late sink {:?}", vertex(job, "late")),
    );
    assert_eq!(file_records(&late_dir), want);
    let (window, late) = (vertex(&job, "windows"), vertex(&job, "late"));
    assert_eq!(window.late_records_dropped, 0, "{window:?}");
    assert_eq!(late.records_in, 4, "{late:?}");
    assert_eq!(late.parallelism, window.parallelism);
    let sp = job
        .stop_with_savepoint(dir.path().join("sp").to_str().unwrap(), false)
        .unwrap();
    assert_eq!(job.wait(), JobState::Finished, "{:?}", job.failure());

    // Restored: a record at 45 s moves the watermark past [30 s, 40 s); then three records
    // late for [20 s, 30 s) (still open at the stop, fired since) and one in time for
    // [40 s, 50 s).
    let job = start(&job_spec, Some(&sp), None);
    b.produce_at("late-in", 0, &timed(450, 451, 100, 3))
        .unwrap();
    wait_until(&job, watermark_past(T0 + 40_000), |job| {
        format!("window {:?}", vertex(job, "windows"))
    });
    let late2: Vec<_> = (0..3)
        .map(|i| {
            (
                "k2".to_owned(),
                r#"{"key":"k2"}"#.to_owned(),
                T0 + 25_000 + i,
            )
        })
        .chain([("k0".to_owned(), r#"{"key":"k0"}"#.to_owned(), T0 + 44_000)])
        .collect();
    b.produce_at("late-in", 0, &late2).unwrap();
    want.extend(late2[..3].iter().map(|(k, _, t)| (k.clone(), *t)));
    want.sort();
    wait_until(
        &job,
        |_| file_records(&late_dir).len() >= 7,
        |job| format!("late sink {:?}", vertex(job, "late")),
    );
    job.stop_with_savepoint(dir.path().join("sp").to_str().unwrap(), true)
        .unwrap();
    assert_eq!(job.wait(), JobState::Finished, "{:?}", job.failure());
    assert_eq!(file_records(&late_dir), want, "each late record once");
    // The window [20 s, 30 s), restored, fired without the late records; [40 s, 50 s) with
    // its two records when drained.
    let windows = windows_in("late-out");
    assert_eq!(windows.get(&("k2".to_owned(), T0 + 20_000)), Some(&34));
    assert_eq!(windows.get(&("k0".to_owned(), T0 + 40_000)), Some(&2));
}

/// Each source subtask shows its partitions' offsets and the records left before the brokers'
/// last stable offsets (Flink's pendingRecords), in `sources()` and /metrics: exact while the
/// sources hold at a bound, zero once everything is read.
#[test]
fn each_source_subtask_shows_its_positions_and_pending_records() {
    let b = broker();
    b.create_topic("pending-in", 2).unwrap();
    b.create_topic("pending-out", 1).unwrap();
    let job = start(
        &spec(&format!(
            r#"
name: pending
parallelism: 2
operators:
  - {{kind: kafkaSource, uid: in, bootstrapServers: {bs}, topics: [pending-in]}}
  - {{kind: kafkaSink, uid: out, bootstrapServers: {bs}, topic: pending-out, deliveryGuarantee: none}}
"#,
            bs = b.bootstrap()
        )),
        None,
        None,
    );
    let bound: engine::sources::Bound = [
        ("pending-in-0".to_owned(), 200),
        ("pending-in-1".to_owned(), 50),
    ]
    .into_iter()
    .collect();
    job.hold_sources(Some(bound)).unwrap();
    // The input goes in once the hold is in place: written before, a busy machine's sources
    // could read past the bound before the hold reached them.
    b.produce_to("pending-in", Some(0), &input(0, 600, 3))
        .unwrap();
    b.produce_to("pending-in", Some(1), &input(600, 1000, 3))
        .unwrap();
    let pending = |job: &engine::JobHandle| {
        let mut by_split: Vec<(String, i64, Option<u64>)> = job
            .sources()
            .subtasks
            .iter()
            .flat_map(|s| {
                s.positions
                    .iter()
                    .map(|p| (p.split.clone(), p.position, s.pending_records))
                    .collect::<Vec<_>>()
            })
            .collect();
        by_split.sort();
        by_split
    };
    // One partition per subtask (the owner rule spreads two partitions over two subtasks).
    let held = vec![
        ("pending-in-0".to_owned(), 200, Some(400)),
        ("pending-in-1".to_owned(), 50, Some(350)),
    ];
    wait_until(
        &job,
        |job| pending(job) == held,
        |job| format!("{:?}", pending(job)),
    );
    let metrics = engine::metrics::render(&job).unwrap();
    let gauges: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("sjob_source_pending_records{"))
        .collect();
    assert_eq!(gauges.len(), 2, "{metrics}");
    assert!(
        gauges.iter().any(|l| l.ends_with(" 400")) && gauges.iter().any(|l| l.ends_with(" 350")),
        "{gauges:?}"
    );
    job.release_sources(false).unwrap();
    let done = vec![
        ("pending-in-0".to_owned(), 600, Some(0)),
        ("pending-in-1".to_owned(), 400, Some(0)),
    ];
    wait_until(
        &job,
        |job| pending(job) == done,
        |job| format!("{:?}", pending(job)),
    );
    job.cancel();
    job.wait();
}
