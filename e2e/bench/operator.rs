//! Operator benchmarks on the local control plane (run through `e2e/bench/run.sh`, or alone):
//!
//!   cargo bench --bench operator -- footprint [JOBS] [WINDOW_SECONDS]
//!   cargo bench --bench operator -- retention [SAVEPOINTS]
//!   cargo bench --bench operator -- upgrade [KEYS] [PAYLOAD_BYTES] [lz4|none]
//!
//! `footprint`: the operator's resident memory idle and with JOBS StatefulJobs (suspended, so
//! no engine runs), and what it does per job over a window in which nothing changes:
//! reconciles, and writes to the API (there should be none).
//! `retention`: SAVEPOINTS completed Savepoint objects (each with real files) for one job,
//! then `maxCount: 3`: how long the operator takes to delete all but three, objects and files,
//! and how many API calls it makes.
//!
//! `upgrade`: a running job with KEYS keys of PAYLOAD_BYTES each in keyed state, then a
//! pipeline change through the operator: the time from the apply until the new job's tasks
//! run, and until they process records, with the old state restored. The job's
//! `stateCompression` is lz4 (the default) or none: the bench's payload (16 hex digits and
//! dots) compresses about 20-fold, so `none` shows the same state written and read in full.
//!
//! Each prints one JSON object.

use futures::{StreamExt, TryStreamExt};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use sjob::local::cluster::OPERATOR_USER;
use sjob::local::control_plane::{ControlPlane, Kind};
use sjob::operator::crd::{Phase, Savepoint, StatefulJob};
use sjob::operator::engine_client::EngineClient;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const SJOB: &str = env!("CARGO_BIN_EXE_sjob");

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// `SJOB_CONTROL_PLANE=real` runs the scenario on the real control plane (etcd,
/// kube-apiserver, kube-controller-manager); the in-process API server otherwise.
fn control_plane() -> Kind {
    match std::env::var("SJOB_CONTROL_PLANE").as_deref() {
        Ok("real") => Kind::Real,
        _ => Kind::InProcess,
    }
}

fn control_plane_name() -> &'static str {
    match control_plane() {
        Kind::Real => "real",
        Kind::InProcess => "in-process",
    }
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// VmRSS and VmHWM of a process, in MB.
fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Bench {
    cluster: ControlPlane,
    operator: Child,
    metrics_url: String,
    http: reqwest::Client,
    _root: tempfile::TempDir,
}

impl Bench {
    async fn start() -> Res<Bench> {
        let root = tempfile::tempdir()?;
        let cluster = ControlPlane::start(
            control_plane(),
            &root.path().join("cluster"),
            0,
            Path::new(SJOB),
        )
        .await?;
        let port = free_port()?;
        let log = std::fs::File::create(root.path().join("operator.log"))?;
        let operator = cluster
            .operator_command(Path::new(SJOB), &format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let bench = Bench {
            cluster,
            operator,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            http: {
                sjob::install_tls_provider();
                reqwest::Client::new()
            },
            _root: root,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while bench.metrics().await.is_err() {
            if Instant::now() > deadline {
                return Err("the operator did not serve /metrics within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(bench)
    }

    fn client(&self) -> Client {
        self.cluster.client()
    }

    /// The sum of each `sjob_operator_*` counter over its labels.
    async fn metrics(&self) -> Res<BTreeMap<String, f64>> {
        let text = self
            .http
            .get(&self.metrics_url)
            .send()
            .await?
            .text()
            .await?;
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = name.split('{').next().unwrap_or(name).to_string();
            if let Ok(v) = value.parse::<f64>() {
                *out.entry(name).or_default() += v;
            }
        }
        Ok(out)
    }

    /// The operator's API requests so far, by verb. On the real API server, which does not
    /// count by user: every client's (the operator's, the kubelet's, the controllers').
    async fn operator_requests(&self) -> Res<BTreeMap<String, u64>> {
        if self.cluster.kind() == Kind::Real {
            let req = http::Request::get("/metrics").body(Vec::new())?;
            let text = self.client().request_text(req).await?;
            let mut out = BTreeMap::new();
            for line in text
                .lines()
                .filter(|l| l.starts_with("apiserver_request_total{"))
            {
                let verb = line
                    .split("verb=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_default()
                    .to_lowercase();
                let n = line
                    .rsplit_once(' ')
                    .and_then(|(_, v)| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
                *out.entry(verb).or_default() += n as u64;
            }
            return Ok(out);
        }
        let url = format!("{}/debug/requests", self.cluster.url());
        let doc: Value = self.http.get(url).send().await?.json().await?;
        let mut out = BTreeMap::new();
        for row in doc["requests"].as_array().cloned().unwrap_or_default() {
            if row["user"] == OPERATOR_USER {
                let verb = row["verb"].as_str().unwrap_or_default().to_string();
                *out.entry(verb).or_default() += row["count"].as_u64().unwrap_or(0);
            }
        }
        Ok(out)
    }

    /// With `SJOB_BENCH_KEEP=1` the cluster's directory (the operator's log, each pod's
    /// `container.log`) is kept and its path printed on stderr, to see where the time went
    /// (with `SJOB_LOG=info`, the kubelet's steps are on stderr too).
    async fn stop(mut self) {
        let _ = self.operator.kill();
        let _ = self.operator.wait();
        self.cluster.shutdown().await;
        if std::env::var_os("SJOB_BENCH_KEEP").is_some() {
            eprintln!("kept: {}", self._root.keep().display());
        }
    }
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn writes(requests: &BTreeMap<String, u64>) -> u64 {
    ["create", "update", "patch", "delete"]
        .iter()
        .map(|v| requests.get(*v).copied().unwrap_or(0))
        .sum()
}

fn small_job(sink: &Path) -> Value {
    json!({"name": "bench", "parallelism": 1, "operators": [
        {"kind": "generator", "uid": "source", "keys": 100, "count": 100_000_000, "rate": 1_000},
        {"kind": "keyBy", "field": "key"},
        {"kind": "count", "uid": "counter"},
        {"kind": "fileSink", "uid": "out", "path": sink},
    ]})
}

async fn footprint(jobs: usize, window_s: u64) -> Res<Value> {
    let bench = Bench::start().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = bench.operator.id();
    let (idle_mb, _) = rss_mb(pid);
    let api: Api<StatefulJob> = Api::namespaced(bench.client(), "default");
    let sink = bench.cluster.dir().join("out");
    let started = Instant::now();
    futures::stream::iter(0..jobs)
        .map(|i| {
            let api = api.clone();
            let manifest = json!({
                "apiVersion": "sjob.dev/v1alpha1", "kind": "StatefulJob",
                "metadata": {"name": format!("job-{i}"), "namespace": "default"},
                "spec": {"job": small_job(&sink), "state": "suspended"},
            });
            async move {
                api.patch(
                    &format!("job-{i}"),
                    &PatchParams::apply("bench").force(),
                    &Patch::Apply(&manifest),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list = api.list(&ListParams::default()).await?;
        let settled = list
            .items
            .iter()
            .filter(|sj| sj.status.as_ref().and_then(|s| s.phase) == Some(Phase::Suspended))
            .count();
        if settled == jobs {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{settled} of {jobs} StatefulJobs settled within 600 s").into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settle_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (m0, r0) = (bench.metrics().await?, bench.operator_requests().await?);
    tokio::time::sleep(Duration::from_secs(window_s)).await;
    let (m1, r1) = (bench.metrics().await?, bench.operator_requests().await?);
    let (loaded_mb, peak_mb) = rss_mb(pid);
    let reconciles = m1["sjob_operator_reconciles_total"] - m0["sjob_operator_reconciles_total"];
    let requests = delta(&r1, &r0);
    let result = json!({
        "bench": "operator_footprint",
        "control_plane": control_plane_name(),
        "jobs": jobs,
        "rss_mb_idle": idle_mb,
        "rss_mb_loaded": loaded_mb,
        "rss_mb_peak": peak_mb,
        "settle_s": settle_s,
        "window_s": window_s,
        "reconciles_per_job_per_min": reconciles / jobs as f64 * 60.0 / window_s as f64,
        "api_requests_in_window": requests,
        "api_writes_in_window": writes(&requests),
    });
    bench.stop().await;
    Ok(result)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Applies the StatefulJob `bench` with this spec, as `kubectl apply --server-side` would.
async fn apply_bench(jobs: &Api<StatefulJob>, spec: Value) -> Result<StatefulJob, kube::Error> {
    let manifest = json!({"apiVersion": "sjob.dev/v1alpha1", "kind": "StatefulJob",
                          "metadata": {"name": "bench", "namespace": "default"}, "spec": spec});
    jobs.patch(
        "bench",
        &PatchParams::apply("bench").force(),
        &Patch::Apply(&manifest),
    )
    .await
}

async fn wait_job(
    api: &Api<StatefulJob>,
    what: &str,
    pred: impl Fn(&StatefulJob) -> bool,
) -> Res<StatefulJob> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let sj = api.get("bench").await?;
        if pred(&sj) {
            return Ok(sj);
        }
        if Instant::now() > deadline {
            return Err(format!("the job was not {what} within 120 s: {:?}", sj.status).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn retention(savepoints: usize) -> Res<Value> {
    let bench = Bench::start().await?;
    let client = bench.client();
    let jobs: Api<StatefulJob> = Api::namespaced(client.clone(), "default");
    let sps: Api<Savepoint> = Api::namespaced(client.clone(), "default");
    let dir = bench.cluster.dir().to_path_buf();
    let spec = |max_count: u64, nonce: Option<i64>| {
        let mut spec = json!({"job": small_job(&dir.join("out")),
                              "savepoints": {"retention": {"maxCount": max_count}}});
        if let Some(n) = nonce {
            spec["savepointTriggerNonce"] = json!(n);
        }
        spec
    };
    let apply = |spec: Value| apply_bench(&jobs, spec);
    apply(spec(1_000_000, None)).await?;
    wait_job(&jobs, "running", |sj| {
        sj.status.as_ref().and_then(|s| s.phase) == Some(Phase::Running)
    })
    .await?;
    apply(spec(1_000_000, Some(1))).await?;
    let sj = wait_job(&jobs, "savepointed", |sj| {
        sj.status
            .as_ref()
            .is_some_and(|s| s.last_savepoint.is_some())
    })
    .await?;
    let source = PathBuf::from(
        sj.status
            .and_then(|s| s.last_savepoint)
            .map(|l| l.path)
            .unwrap_or_default(),
    );
    let copies = dir.join("copies");
    let setup = Instant::now();
    let mut paths = Vec::with_capacity(savepoints);
    for i in 0..savepoints {
        let p = copies.join(format!("savepoint-{i:06}"));
        copy_dir(&source, &p)?;
        paths.push(p);
    }
    let now = jiff::Timestamp::now().as_second();
    futures::stream::iter(paths.iter().enumerate())
        .map(|(i, p)| {
            let sps = sps.clone();
            let obj: Result<Savepoint, _> = serde_json::from_value(json!({
                "apiVersion": "sjob.dev/v1alpha1", "kind": "Savepoint",
                "metadata": {"name": format!("sweep-{i:06}"), "namespace": "default",
                             "labels": {"sjob.dev/job": "bench"},
                             "finalizers": [sjob::operator::crd::SAVEPOINT_FINALIZER]},
                "spec": {"jobRef": "bench", "trigger": "manual", "path": p},
            }));
            let status = json!({"status": {
                "state": "Completed", "path": p, "sizeBytes": 1,
                "completed": jiff::Timestamp::from_second(now - (savepoints - i) as i64 - 60)
                    .map(|t| t.to_string()).unwrap_or_default(),
            }});
            async move {
                let obj = obj?;
                sps.create(&PostParams::default(), &obj).await?;
                sps.patch_status(
                    &obj.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await?;
                Res::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let setup_s = setup.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let total = sps.list(&ListParams::default()).await?.items.len();
    let before = bench.operator_requests().await?;
    let started = Instant::now();
    apply(spec(3, Some(1))).await?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut last_report = Instant::now();
    let left = loop {
        let left = sps.list(&ListParams::default()).await?.items.len();
        if left <= 3 {
            break left;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "retention: {left} of {total} Savepoint objects left after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        if Instant::now() > deadline {
            return Err(format!("{left} Savepoint objects left after 1800 s").into());
        }
        // Listing 10,000 objects is itself work for this machine: look every 2 s.
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let sweep_s = started.elapsed().as_secs_f64();
    let requests = delta(&bench.operator_requests().await?, &before);
    let dirs_left = std::fs::read_dir(&copies)?.count();
    let result = json!({
        "bench": "retention_sweep",
        "control_plane": control_plane_name(),
        "savepoints": total,
        "setup_s": setup_s,
        "sweep_s": sweep_s,
        "objects_left": left,
        "copies_left_on_disk": dirs_left,
        "operator_api_requests": requests,
        "operator_api_calls_total": requests.values().sum::<u64>(),
    });
    bench.stop().await;
    Ok(result)
}

fn state_job(keys: u64, payload: u64, compression: &str, with_map: bool) -> Value {
    let mut ops = vec![
        json!({"kind": "generator", "uid": "source", "keys": keys, "payloadBytes": payload}),
        json!({"kind": "keyBy", "field": "key"}),
        json!({"kind": "max", "uid": "latest", "field": "payload", "type": "string"}),
    ];
    if with_map {
        ops.push(json!({"kind": "map", "set": [{"field": "upgraded", "expr": "1"}]}));
    }
    ops.push(json!({"kind": "discardSink"}));
    json!({"name": "state", "parallelism": 1, "stateCompression": compression, "operators": ops})
}

/// The engine's view of the running job, through its REST API: (job id, every task running,
/// records read by the stateful operator).
async fn engine_progress(bench: &Bench) -> Option<(String, bool, u64)> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(bench.client(), "default");
    let list = pods.list(&ListParams::default()).await.ok()?;
    let ip = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .find_map(|p| p.status.as_ref()?.pod_ip.clone())?;
    // The engines take requests only with the job's bearer token, from the Secret the
    // operator made for it.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(bench.client(), "default");
    let secret = secrets
        .get(&sjob::operator::resources::rest_token_secret_name("bench"))
        .await
        .ok()?;
    let bytes = secret.data?.remove(sjob::operator::resources::TOKEN_KEY)?.0;
    let token = sjob::engine::access::RestToken::new(std::str::from_utf8(&bytes).ok()?)?;
    let engine = EngineClient::new(&format!("http://{ip}:8081")).with_token(token);
    let jobs = engine.list_jobs().await.ok()?;
    let id = jobs.into_iter().find(|j| j.status == "RUNNING")?.id;
    let job = engine.job(&id).await.ok()?;
    let running = job.vertices.iter().all(|v| v.status == "RUNNING");
    let read = job
        .vertices
        .iter()
        .filter(|v| v.id == sjob::engine::rest::vertex_id("latest"))
        .map(|v| v.read_records)
        .sum();
    Some((id, running, read))
}

async fn upgrade(keys: u64, payload: u64, compression: &str) -> Res<Value> {
    let bench = Bench::start().await?;
    let jobs: Api<StatefulJob> = Api::namespaced(bench.client(), "default");
    let manifest = |with_map: bool| json!({"job": state_job(keys, payload, compression, with_map)});
    let apply = |spec: Value| apply_bench(&jobs, spec);
    apply(manifest(false)).await?;
    let sj = wait_job(&jobs, "running", |sj| {
        sj.status.as_ref().and_then(|s| s.phase) == Some(Phase::Running)
    })
    .await?;
    let first = sj.status.and_then(|s| s.job_id).unwrap_or_default();
    // Every key in state, and a checkpoint of it to preflight against.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some((_, _, read)) = engine_progress(&bench).await
            && read >= keys * 2
        {
            break;
        }
        if Instant::now() > deadline {
            return Err("the job did not fill its state within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A checkpoint of it (every 10 s) for the preflight to check against.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let asked = Instant::now();
    apply(manifest(true)).await?;
    let (mut tasks_running_s, mut records_s) = (None, None);
    // When each upgrade stage was first seen, to tell where the time goes.
    let mut stages: BTreeMap<String, f64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while records_s.is_none() {
        if let Ok(sj) = jobs.get("bench").await
            && let Some(u) = sj.status.and_then(|s| s.upgrade)
        {
            let stage = format!("{:?}", u.stage).to_lowercase();
            let at = asked.elapsed().as_secs_f64();
            stages.entry(stage).or_insert(at);
        }
        if let Some((id, running, read)) = engine_progress(&bench).await
            && id != first
        {
            if running && tasks_running_s.is_none() {
                tasks_running_s = Some(asked.elapsed().as_secs_f64());
            }
            if running && read > 0 {
                records_s = Some(asked.elapsed().as_secs_f64());
            }
        }
        if Instant::now() > deadline {
            return Err("the upgrade did not complete within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sj = wait_job(&jobs, "upgraded", |sj| {
        sj.status
            .as_ref()
            .is_some_and(|s| s.upgrade.is_none() && s.job_id.as_deref() != Some(first.as_str()))
    })
    .await?;
    let status = sj.status.unwrap_or_default();
    let restored = status.restored_from.clone().unwrap_or_default();
    let sps: Api<Savepoint> = Api::namespaced(bench.client(), "default");
    let size = sps
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .find(|sp| sp.status.as_ref().and_then(|s| s.path.as_deref()) == Some(restored.as_str()))
        .and_then(|sp| sp.status.as_ref().and_then(|s| s.size_bytes))
        .unwrap_or(0);
    let result = json!({
        "bench": "upgrade_downtime",
        "control_plane": control_plane_name(),
        "engine": "sjob",
        "keys": keys,
        "compression": compression,
        "state_mb": size as f64 / 1e6,
        "until_tasks_running_s": tasks_running_s,
        "until_records_flow_s": records_s,
        "stage_first_seen_s": stages,
        "restored_from": restored,
    });
    bench.stop().await;
    Ok(result)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let num = |i: usize, default: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    // SJOB_LOG=info: the in-process control plane's kubelet logs (stderr), timestamped.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("SJOB_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let result = match args.first().map(String::as_str) {
        Some("footprint") => footprint(num(1, 1000) as usize, num(2, 30)).await,
        Some("retention") => retention(num(1, 10_000) as usize).await,
        Some("upgrade") => {
            let compression = args.get(3).map_or("lz4", String::as_str);
            upgrade(num(1, 400_000), num(2, 240), compression).await
        }
        _ => {
            eprintln!(
                "usage: cargo bench --bench operator -- footprint [JOBS] [WINDOW_S] | retention [SAVEPOINTS] | upgrade [KEYS] [PAYLOAD_BYTES] [lz4|none]"
            );
            return std::process::ExitCode::from(2);
        }
    };
    match result {
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
