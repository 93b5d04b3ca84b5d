//! Kafka -> keyBy -> count -> Kafka (exactly-once, checkpoints every 10 s) on sjob and on
//! Apache Flink 2.3 with flink-connector-kafka, against one real broker, one topic's data,
//! one run (through `e2e/bench/kafka.sh`, which starts Flink and builds its job):
//!
//!   cargo bench --bench kafka -- [RECORDS] [KEYS] [RATE] [SECONDS]
//!
//! 1. Throughput: RECORDS JSON records (KEYS keys) are written to the input topic first; each
//!    engine reads them from the earliest offset; records/s from its first record read to its
//!    last, then the committed output is checked to hold one count per input.
//! 2. Latency: records written at RATE/s for SECONDS into a topic of the engine's own; a
//!    read-committed consumer of its output takes, for each output `(key, count)`, the time
//!    since the key's count-th record was written (produce to committed-visible): p50, p99.
//!
//! Env: FLINK=0 (sjob alone), SJOB_KAFKA_LIBS (the broker), FLINK_REST (http://127.0.0.1:8081, a running Flink
//! session cluster), FLINK_KAFKA_JAR (`bash e2e/flink/flink-local.sh kafka-job`). Prints one
//! JSON object per line and a table.

#[global_allocator]
static GLOBAL: sjob::allocator::Allocator = sjob::allocator::Allocator;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{Value, json};
use sjob::engine::{self, JobOptions, spec::JobSpec};
use sjob::local::kafka_server::KafkaBroker;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PARALLELISM: u32 = 2;
const PARTITIONS: i32 = 2;

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .filter(|a| !a.starts_with("--"))
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn value(i: u64, keys: u64) -> (String, String) {
    let k = format!("k{}", i % keys);
    (k.clone(), format!(r#"{{"key":"{k}","n":{i}}}"#))
}

fn sjob_job(bootstrap: &str, input: &str, output: &str, chk: &std::path::Path) -> JobSpec {
    let yaml = format!(
        "name: kafka-bench-{input}\nparallelism: {PARALLELISM}\ncheckpoints: {{interval: 10s, dir: {}}}\noperators:\n  \
         - {{kind: kafkaSource, uid: in, bootstrapServers: '{bootstrap}', topics: [{input}]}}\n  \
         - {{kind: keyBy, field: key}}\n  - {{kind: count, uid: counter}}\n  \
         - {{kind: kafkaSink, uid: out, bootstrapServers: '{bootstrap}', topic: {output}, keyField: key, deliveryGuarantee: exactly-once}}\n",
        chk.display()
    );
    JobSpec::from_yaml(&yaml).expect("bench job parses")
}

/// A running job of either engine.
trait Engine {
    /// Records its counter has read.
    fn read(&self) -> u64;
    fn stop(self: Box<Self>);
}

struct Sjob(engine::JobHandle);

impl Engine for Sjob {
    fn read(&self) -> u64 {
        self.0
            .vertices()
            .iter()
            .find(|v| v.uid == "counter")
            .map(|v| v.records_in)
            .unwrap_or(0)
    }
    fn stop(self: Box<Self>) {
        self.0.cancel();
        self.0.wait();
    }
}

fn start_sjob(
    b: &KafkaBroker,
    input: &str,
    output: &str,
    dir: &std::path::Path,
) -> Box<dyn Engine> {
    let spec = sjob_job(
        b.bootstrap(),
        input,
        output,
        &dir.join(format!("chk-{input}")),
    );
    Box::new(Sjob(
        engine::start(&spec, JobOptions::default()).expect("sjob job starts"),
    ))
}

/// Flink over its REST API.
struct Flink {
    rest: String,
    job: String,
    rt: Arc<tokio::runtime::Runtime>,
    http: reqwest::Client,
}

impl Flink {
    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.rest);
        self.rt.block_on(async {
            let mut r = self.http.request(method, &url);
            if let Some(b) = body {
                r = r.json(&b);
            }
            let resp = r.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
            let text = resp.text().await.unwrap_or_default();
            serde_json::from_str(&text).unwrap_or(Value::Null)
        })
    }
}

impl Engine for Flink {
    fn read(&self) -> u64 {
        let j = self.call(reqwest::Method::GET, &format!("/jobs/{}", self.job), None);
        j["vertices"]
            .as_array()
            .into_iter()
            .flatten()
            // The keyed vertex: "KeyedProcess -> Sink: Writer -> Sink: Committer".
            .find(|v| v["name"].as_str().is_some_and(|n| !n.starts_with("Source")))
            .and_then(|v| v["metrics"]["read-records"].as_u64())
            .unwrap_or(0)
    }
    fn stop(self: Box<Self>) {
        self.call(
            reqwest::Method::PATCH,
            &format!("/jobs/{}?mode=cancel", self.job),
            None,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let j = self.call(reqwest::Method::GET, &format!("/jobs/{}", self.job), None);
            if j["state"] == "CANCELED" {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn start_flink(b: &KafkaBroker, input: &str, output: &str, jar_id: &str) -> Box<dyn Engine> {
    let rest = std::env::var("FLINK_REST").unwrap_or_else(|_| "http://127.0.0.1:8081".into());
    let rt = Arc::new(tokio::runtime::Runtime::new().expect("runtime"));
    let mut f = Flink {
        rest,
        job: String::new(),
        rt,
        http: reqwest::Client::new(),
    };
    let run = f.call(
        reqwest::Method::POST,
        &format!("/jars/{jar_id}/run"),
        Some(json!({
            "entryClass": "demo.KafkaCountJob",
            "parallelism": PARALLELISM,
            "programArgsList": ["--bootstrap", b.bootstrap(), "--input", input, "--output", output,
                                "--txn-prefix", format!("flink-{input}")],
        })),
    );
    f.job = run["jobid"]
        .as_str()
        .unwrap_or_else(|| panic!("Flink did not run the job: {run}"))
        .to_owned();
    Box::new(f)
}

fn upload_flink_jar() -> String {
    let rest = std::env::var("FLINK_REST").unwrap_or_else(|_| "http://127.0.0.1:8081".into());
    let jar = std::env::var("FLINK_KAFKA_JAR")
        .expect("FLINK_KAFKA_JAR: build it with `bash e2e/flink/flink-local.sh kafka-job`");
    let bytes = std::fs::read(&jar).unwrap_or_else(|e| panic!("{jar}: {e}"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let v: Value = rt.block_on(async {
        let part = reqwest::multipart::Part::bytes(bytes)
            .file_name("kafka-count.jar")
            .mime_str("application/x-java-archive")
            .expect("mime");
        let form = reqwest::multipart::Form::new().part("jarfile", part);
        let r = reqwest::Client::new()
            .post(format!("{rest}/jars/upload"))
            .multipart(form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{rest}: {e} (is Flink running?)"));
        r.json().await.expect("upload answer")
    });
    let name = v["filename"].as_str().expect("uploaded jar name");
    name.rsplit('/').next().unwrap_or(name).to_owned()
}

/// Records/s from the first record read to the last of `records`, and the wall time.
fn throughput(engine: &dyn Engine, records: u64) -> (f64, f64) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut first = None;
    loop {
        let n = engine.read();
        if n > 0 && first.is_none() {
            first = Some((Instant::now(), n));
        }
        if n >= records {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {records} read in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let end = Instant::now();
    let (t0, n0) = first.unwrap_or((started, 0));
    let secs = end.duration_since(t0).as_secs_f64().max(1e-3);
    (
        (records - n0) as f64 / secs,
        end.duration_since(started).as_secs_f64(),
    )
}

fn consumer(b: &KafkaBroker, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer")
}

/// Waits until the committed output holds `n` records.
fn wait_output(b: &KafkaBroker, topic: &str, n: u64) {
    let c = consumer(b, &format!("bench-check-{topic}"));
    c.subscribe(&[topic]).expect("subscribe");
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen < n {
        assert!(
            Instant::now() < deadline,
            "{topic}: {seen} of {n} committed after 5 minutes"
        );
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            seen += 1;
        }
    }
}

/// Writes `rate` records/s for `seconds` to `input` while reading `output`; the latency of
/// each output `(key, count)` from the key's count-th write.
fn latency(
    b: &KafkaBroker,
    engine: Box<dyn Engine>,
    input: &str,
    output: &str,
    keys: u64,
    rate: u64,
    seconds: u64,
) -> (f64, f64, usize) {
    // Running before the clock starts: wait for the first checkpoint-free second.
    std::thread::sleep(Duration::from_secs(5));
    let sent: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let total = rate * seconds;
    let writer = std::thread::spawn({
        let (sent, bootstrap, input) = (sent.clone(), b.bootstrap().to_owned(), input.to_owned());
        move || {
            let p: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("linger.ms", "1")
                .set("enable.idempotence", "true")
                .create()
                .expect("producer");
            let start = Instant::now();
            for i in 0..total {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let (k, v) = value(i, keys);
                sent.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(k.clone())
                    .or_default()
                    .push(Instant::now());
                let mut rec = BaseRecord::to(&input).key(&k).payload(&v);
                loop {
                    match p.send(rec) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            rec = back;
                            p.poll(Duration::from_millis(1));
                        }
                    }
                }
                p.poll(Duration::ZERO);
            }
            let _ = p.flush(Duration::from_secs(30));
        }
    });
    let c = consumer(b, &format!("bench-latency-{output}"));
    c.subscribe(&[output]).expect("subscribe");
    let mut lat = Vec::with_capacity(total as usize);
    let deadline = Instant::now() + Duration::from_secs(seconds + 120);
    while (lat.len() as u64) < total && Instant::now() < deadline {
        let Some(Ok(m)) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let now = Instant::now();
        let v: Value =
            serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
        let (Some(k), Some(n)) = (v["key"].as_str(), v["count"].as_u64()) else {
            continue;
        };
        let at = sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(k)
            .and_then(|t| t.get(n as usize - 1).copied());
        if let Some(at) = at {
            lat.push(now.duration_since(at).as_secs_f64() * 1000.0);
        }
    }
    let _ = writer.join();
    engine.stop();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (pct(0.5), pct(0.99), lat.len())
}

fn main() {
    sjob::allocator::manage_huge_pages();
    sjob::install_tls_provider();
    let records = arg(1, 2_000_000);
    let keys = arg(2, 10_000);
    let rate = arg(3, 5_000);
    let seconds = arg(4, 30);
    let dir = tempfile::tempdir().expect("tempdir");
    let b = KafkaBroker::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    for t in [
        "in",
        "out-sjob",
        "out-flink",
        "lat-in-sjob",
        "lat-out-sjob",
        "lat-in-flink",
        "lat-out-flink",
    ] {
        b.create_topic(t, PARTITIONS).expect("topic");
    }
    eprintln!("kafka bench: writing {records} records over {keys} keys");
    let t = Instant::now();
    let batch = 100_000;
    for from in (0..records).step_by(batch as usize) {
        let recs: Vec<_> = (from..(from + batch).min(records))
            .map(|i| value(i, keys))
            .collect();
        b.produce("in", &recs).expect("produce");
    }
    eprintln!("kafka bench: written in {:.1} s", t.elapsed().as_secs_f64());
    let with_flink = std::env::var("FLINK").map_or(true, |v| v != "0");
    let jar = if with_flink {
        upload_flink_jar()
    } else {
        String::new()
    };

    let start = |name: &str, input: &str, output: &str| -> Box<dyn Engine> {
        if name == "sjob" {
            start_sjob(&b, input, output, dir.path())
        } else {
            start_flink(&b, input, output, &jar)
        }
    };
    let mut rows = Vec::new();
    let engines: &[&str] = if with_flink {
        &["sjob", "flink"]
    } else {
        &["sjob"]
    };
    for name in engines {
        let name = *name;
        eprintln!("kafka bench: {name} throughput");
        let out = format!("out-{name}");
        let engine = start(name, "in", &out);
        let (rps, wall) = throughput(engine.as_ref(), records);
        wait_output(&b, &out, records);
        engine.stop();
        eprintln!("kafka bench: {name} latency at {rate}/s for {seconds} s");
        let (input, output) = (format!("lat-in-{name}"), format!("lat-out-{name}"));
        let (p50, p99, n) = latency(
            &b,
            start(name, &input, &output),
            &input,
            &output,
            keys,
            rate,
            seconds,
        );
        let row = json!({"bench": "kafka", "engine": name, "records": records, "keys": keys,
            "records_per_s": rps.round(), "wall_s": (wall * 10.0).round() / 10.0,
            "latency_rate": rate, "latency_samples": n,
            "latency_p50_ms": p50.round(), "latency_p99_ms": p99.round()});
        println!("{row}");
        rows.push(row);
    }
    let (Some(s), Some(f)) = (rows.first(), rows.get(1)) else {
        return;
    };
    let ratio = |k: &str| s[k].as_f64().unwrap_or(f64::NAN) / f[k].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "\n| Kafka -> keyBy -> count -> Kafka (exactly-once, 10 s checkpoints) | sjob | Flink 2.3 | sjob / Flink |\n|---|---|---|---|\n\
         | throughput, records/s ({records} records, {keys} keys, p {PARALLELISM}) | {} | {} | {:.2} |\n\
         | latency p50, ms (produce to committed-visible, {rate}/s) | {} | {} | {:.2} |\n\
         | latency p99, ms | {} | {} | {:.2} |",
        s["records_per_s"],
        f["records_per_s"],
        ratio("records_per_s"),
        s["latency_p50_ms"],
        f["latency_p50_ms"],
        ratio("latency_p50_ms"),
        s["latency_p99_ms"],
        f["latency_p99_ms"],
        ratio("latency_p99_ms"),
    );
}
