//! A real Apache Kafka broker for the end-to-end tests: one KRaft node (broker and controller
//! in one process) from the jars `bash e2e/kafka/install.sh` fetches (their directory in
//! `SJOB_KAFKA_LIBS`), formatted afresh and started on free loopback ports. Also the test
//! clients: topics made, records produced, and everything committed read back.

use super::server_process::ServerProcess;
use base64::Engine;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct KafkaBroker {
    bootstrap: String,
    process: Option<ServerProcess>,
    libs: String,
    config: std::path::PathBuf,
    dir: std::path::PathBuf,
    /// Processes started so far (each logs to `kafka-<n>.log`).
    starts: u32,
}

/// A free port below Linux's ephemeral range (32768 and up), so that after the broker is
/// stopped no outgoing connection or `bind(0)` of another process takes it before a restart
/// on the same port.
fn free_port() -> Result<u16, String> {
    for _ in 0..200 {
        let port = rand::random_range(20_000..32_000u16);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port between 20000 and 32000".into())
}

/// The last lines of a server log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn java_command(libs: &str) -> Command {
    let mut c = Command::new("java");
    c.args(["-Xmx512m", "-XX:+UseSerialGC", "-cp", &format!("{libs}/*")]);
    c
}

/// A record read back: (partition, key, value).
pub type Read = (i32, Option<String>, String);

impl KafkaBroker {
    /// Formats a new node under `dir` and starts it.
    pub fn start(dir: &Path) -> Result<KafkaBroker, String> {
        let libs = std::env::var("SJOB_KAFKA_LIBS").map_err(|_| {
            "SJOB_KAFKA_LIBS is not set: fetch the broker with \
             `export SJOB_KAFKA_LIBS=$(bash e2e/kafka/install.sh)` (what .ci/run does)"
                .to_owned()
        })?;
        let data = dir.join("kafka-data");
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let broker = free_port()?;
        let controller = free_port()?;
        let config = dir.join("kafka.properties");
        let props = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{broker},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{broker}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={}\n\
             num.partitions=1\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=1\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=false\n",
            data.display()
        );
        std::fs::write(&config, props).map_err(|e| format!("{}: {e}", config.display()))?;
        // Kafka's own ids never start with '-': the storage tool would read one as an option.
        let cluster_id = std::iter::repeat_with(|| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes())
        })
        .find(|id| !id.starts_with('-'))
        .unwrap_or_default();
        let out = java_command(&libs)
            .args(["kafka.tools.StorageTool", "format", "-t", &cluster_id, "-c"])
            .arg(&config)
            .output()
            .map_err(|e| format!("formatting the Kafka node (is java installed?): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "formatting the Kafka node failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut b = KafkaBroker {
            bootstrap: format!("127.0.0.1:{broker}"),
            process: None,
            libs,
            config,
            dir: dir.to_owned(),
            starts: 0,
        };
        b.run(broker)?;
        Ok(b)
    }

    /// Starts the (formatted) node's process on its broker port.
    fn run(&mut self, port: u16) -> Result<(), String> {
        let (libs, config) = (self.libs.clone(), self.config.clone());
        self.starts += 1;
        let name = format!("kafka-{}", self.starts);
        let p = ServerProcess::start_on(&name, &self.dir, port, Duration::from_secs(90), || {
            let mut c = java_command(&libs);
            c.arg("kafka.Kafka").arg(&config);
            c
        })
        .map_err(|e| {
            let log = self.dir.join(format!("{name}.log"));
            format!("{e}\n{}", log_tail(&log))
        })?;
        self.process = Some(p);
        self.wait_ready()
    }

    /// Waits until the broker answers metadata requests.
    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let c: BaseConsumer = self.client().create().map_err(|e| e.to_string())?;
        loop {
            match c.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(md) if !md.brokers().is_empty() => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(format!("Kafka at {} did not become ready", self.bootstrap));
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Kills the broker (a lost broker); `restart` brings it back on the same port.
    pub fn stop(&mut self) {
        self.process = None;
    }

    pub fn restart(&mut self) -> Result<(), String> {
        let port = self
            .bootstrap
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or("bad bootstrap")?;
        self.run(port)
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, String> {
        self.client().create().map_err(|e| e.to_string())
    }

    fn block<T>(f: impl std::future::Future<Output = T>) -> Result<T, String> {
        Ok(futures::executor::block_on(f))
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        let admin = self.admin()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let r = Self::block(admin.create_topics([&topic], &AdminOptions::new()))?
            .map_err(|e| format!("creating topic {name}: {e}"))?;
        for t in r {
            t.map_err(|(n, e)| format!("creating topic {n}: {e}"))?;
        }
        Ok(())
    }

    /// Grows a topic to `partitions` partitions.
    pub fn add_partitions(&self, name: &str, partitions: usize) -> Result<(), String> {
        let admin = self.admin()?;
        let np = NewPartitions::new(name, partitions);
        let r = Self::block(admin.create_partitions([&np], &AdminOptions::new()))?
            .map_err(|e| format!("adding partitions to {name}: {e}"))?;
        for t in r {
            t.map_err(|(n, e)| format!("adding partitions to {n}: {e}"))?;
        }
        Ok(())
    }

    /// Produces `(key, value)` records (partitioned by key), and waits until all are written.
    pub fn produce(&self, topic: &str, records: &[(String, String)]) -> Result<(), String> {
        self.produce_to(topic, None, records)
    }

    /// Produces `(key, value)` records to `partition` (by key when None), and waits until all
    /// are written.
    pub fn produce_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        records: &[(String, String)],
    ) -> Result<(), String> {
        let timed: Vec<(&str, &str, Option<i64>)> = records
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str(), None))
            .collect();
        self.send(topic, partition, &timed)
    }

    /// Produces `(key, value, timestamp ms)` records to `partition`, and waits until all are
    /// written.
    pub fn produce_at(
        &self,
        topic: &str,
        partition: i32,
        records: &[(String, String, i64)],
    ) -> Result<(), String> {
        let timed: Vec<(&str, &str, Option<i64>)> = records
            .iter()
            .map(|(k, v, t)| (k.as_str(), v.as_str(), Some(*t)))
            .collect();
        self.send(topic, Some(partition), &timed)
    }

    fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        records: &[(&str, &str, Option<i64>)],
    ) -> Result<(), String> {
        let p: BaseProducer = self
            .client()
            .set("linger.ms", "5")
            .create()
            .map_err(|e| e.to_string())?;
        for (k, v, ts) in records {
            let mut rec = BaseRecord::to(topic).key(*k).payload(*v);
            if let Some(part) = partition {
                rec = rec.partition(part);
            }
            if let Some(ts) = ts {
                rec = rec.timestamp(*ts);
            }
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        rec = back;
                        p.poll(Duration::from_millis(10));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(30))
            .map_err(|e| format!("producing to {topic}: {e}"))
    }

    /// The offsets `group` has committed for every partition of `topics`, as
    /// `("<topic>-<partition>", offset)` sorted; partitions without one are left out.
    pub fn committed(&self, group: &str, topics: &[&str]) -> Result<Vec<(String, i64)>, String> {
        let c: BaseConsumer = self
            .client()
            .set("group.id", group)
            .create()
            .map_err(|e| e.to_string())?;
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            let md = c
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            for mt in md.topics() {
                for p in mt.partitions() {
                    tpl.add_partition(t, p.id());
                }
            }
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let mut out: Vec<(String, i64)> = got
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((format!("{}-{}", e.topic(), e.partition()), o)),
                _ => None,
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Everything committed to `topic` now, as a read-committed consumer sees it.
    pub fn read_committed(&self, topic: &str) -> Result<Vec<Read>, String> {
        let c: BaseConsumer = self
            .client()
            .set("group.id", "sjob-test-reader")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| e.to_string())?;
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let mut ends = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            for p in t.partitions() {
                // The end a read-committed reader can reach: the last stable offset.
                let (_, high) = c
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                ends.push((p.id(), high));
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .map_err(|e| e.to_string())?;
            }
        }
        c.assign(&tpl).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pos = c.position().map_err(|e| e.to_string())?;
            let done = ends.iter().all(|(p, high)| {
                *high == 0
                    || pos
                        .find_partition(topic, *p)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o >= *high),
                            _ => None,
                        })
                        .unwrap_or(false)
            });
            if done {
                return Ok(out);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "reading {topic}: not at the end ({ends:?}) after 30 s; position {pos:?} (an open transaction holds it?)"
                ));
            }
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push((
                    m.partition(),
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                )),
                Some(Err(e)) => return Err(format!("reading {topic}: {e}")),
                None => {}
            }
        }
    }
}
