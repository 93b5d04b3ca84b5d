//! End to end: the real `sjob operator` binary against a real Kubernetes control plane (etcd,
//! kube-apiserver, kube-controller-manager; the operator under its own ServiceAccount and the
//! chart's RBAC; the process kubelet as the node running real `sjob run` engines), checking the
//! per-key results in the file sinks. `SJOB_CONTROL_PLANE=in-process` runs the same scenarios
//! on sjob's own API server.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use sjob::local::control_plane::{ControlPlane, Kind};
use sjob::local::sink_check::CountLog;
use sjob::operator::crd::{Phase, Savepoint, StatefulJob};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const SJOB: &str = env!("CARGO_BIN_EXE_sjob");

/// The control plane the scenarios run on: the real one (etcd, kube-apiserver,
/// kube-controller-manager from `bash e2e/k8s/install.sh`) unless SJOB_CONTROL_PLANE says
/// `in-process`.
fn control_plane() -> Kind {
    match std::env::var("SJOB_CONTROL_PLANE").as_deref() {
        Ok("in-process") => Kind::InProcess,
        Ok("real") | Err(_) => Kind::Real,
        Ok(other) => panic!("SJOB_CONTROL_PLANE={other}: use `real` or `in-process`"),
    }
}

struct Env {
    cluster: Option<ControlPlane>,
    root: tempfile::TempDir,
    operators: Vec<Child>,
    /// Environment of operators spawned from now on.
    operator_env: Vec<(&'static str, String)>,
}

impl Env {
    /// The local control plane with one operator.
    async fn start() -> Env {
        let mut env = Env::without_operator().await;
        env.spawn_operator(&[]);
        env
    }

    /// The control plane alone.
    async fn without_operator() -> Env {
        Env::on(control_plane()).await
    }

    /// This kind of control plane alone.
    async fn on(kind: Kind) -> Env {
        let root = tempfile::tempdir().unwrap();
        let cluster = ControlPlane::start(kind, &root.path().join("cluster"), 0, Path::new(SJOB))
            .await
            .unwrap_or_else(|e| panic!("control plane: {e}"));
        Env {
            cluster: Some(cluster),
            root,
            operators: Vec::new(),
            operator_env: Vec::new(),
        }
    }

    fn cluster(&self) -> &ControlPlane {
        self.cluster.as_ref().unwrap()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn spawn_operator(&mut self, extra: &[&str]) -> usize {
        let n = self.operators.len();
        let log = std::fs::File::create(self.path(&format!("operator-{n}.log"))).unwrap();
        let child = self
            .cluster()
            .operator_command(Path::new(SJOB), "127.0.0.1:0")
            .args(extra)
            .env("SJOB_LOG", "info,sjob=debug")
            .envs(self.operator_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.operators.push(child);
        n
    }

    fn operator_log(&self) -> String {
        let mut out = String::new();
        for n in 0..self.operators.len() {
            let text = std::fs::read_to_string(self.path(&format!("operator-{n}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- operator-{n}.log (tail)\n"));
            out.push_str(&lines[lines.len().saturating_sub(40)..].join("\n"));
            out.push('\n');
        }
        out
    }

    fn jobs(&self) -> Api<StatefulJob> {
        Api::namespaced(self.cluster().client(), "default")
    }

    async fn apply(&self, name: &str, spec: Value) {
        let manifest = json!({
            "apiVersion": "sjob.dev/v1alpha1", "kind": "StatefulJob",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        });
        self.jobs()
            .patch(
                name,
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(&manifest),
            )
            .await
            .unwrap();
    }

    /// Applies the spec and waits for the job to run.
    async fn apply_running(&self, name: &str, spec: Value) -> StatefulJob {
        self.apply(name, spec).await;
        self.wait(name, "Running", 60, |sj| phase(sj) == Some(Phase::Running))
            .await
    }

    /// Runs the counting job at 15,000 records/s, lets it count for 2 s, then applies the
    /// version with a `map` added (an upgrade through a savepoint); the first version's job id.
    async fn count_then_upgrade(&self, sink: &Path, records: i64, keys: i64) -> String {
        let sj = self
            .apply_running(
                "counting",
                json!({"job": counting_job(sink, records, keys, 15_000, vec![])}),
            )
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let map = json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]});
        self.apply(
            "counting",
            json!({"job": counting_job(sink, records, keys, 15_000, vec![map])}),
        )
        .await;
        job_id(&sj)
    }

    /// Waits for the bounded counting job to end (within `timeout_s`), checks that every key
    /// was counted exactly once across all its versions, and stops the environment.
    async fn finishes_exactly_once(self, sink: &Path, keys: i64, records: i64, timeout_s: u64) {
        self.wait("counting", "finished", timeout_s, |sj| {
            phase(sj) == Some(Phase::Suspended)
        })
        .await;
        assert_exactly_once(sink, keys, records);
        self.stop().await;
    }

    async fn wait(
        &self,
        name: &str,
        what: &str,
        timeout_s: u64,
        pred: impl Fn(&StatefulJob) -> bool,
    ) -> StatefulJob {
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        loop {
            let sj = self.jobs().get(name).await.unwrap();
            if pred(&sj) {
                return sj;
            }
            if Instant::now() > deadline {
                panic!(
                    "{name}: not {what} within {timeout_s}s; status: {}\n{}",
                    serde_json::to_string_pretty(&sj.status).unwrap(),
                    self.operator_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(mut self) {
        for c in &mut self.operators {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(c) = self.cluster.take() {
            c.shutdown().await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.operators {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn phase(sj: &StatefulJob) -> Option<Phase> {
    sj.status.as_ref().and_then(|s| s.phase)
}

fn job_id(sj: &StatefulJob) -> String {
    sj.status
        .as_ref()
        .and_then(|s| s.job_id.clone())
        .unwrap_or_default()
}

fn condition(sj: &StatefulJob, kind: &str) -> Option<(String, String, String)> {
    sj.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == kind)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    })
}

/// A bounded keyed count: `records` over `keys` keys at `rate`/s, into a file sink at `sink`.
fn counting_job(sink: &Path, records: i64, keys: i64, rate: i64, extra: Vec<Value>) -> Value {
    let mut ops = vec![
        json!({"kind": "generator", "uid": "source", "keys": keys, "count": records, "rate": rate}),
        json!({"kind": "keyBy", "field": "key"}),
        json!({"kind": "count", "uid": "counter"}),
    ];
    ops.extend(extra);
    ops.push(json!({"kind": "fileSink", "uid": "out", "path": sink}));
    json!({"name": "counting", "parallelism": 2, "operators": ops})
}

fn assert_exactly_once(sink: &Path, keys: i64, records: i64) {
    let log = CountLog::read(sink).unwrap();
    let problems = log.exactly_once(keys as usize, records / keys);
    assert!(
        problems.is_empty(),
        "output of {}: {problems:?}",
        sink.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_and_upgrades_through_a_savepoint_without_losing_a_count() {
    let env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (300_000, 50);
    // 1. Deployed: Ready, a job id in the status.
    let sj = env
        .apply_running(
            "counting",
            json!({"job": counting_job(&sink, records, keys, 20_000, vec![])}),
        )
        .await;
    let first = job_id(&sj);
    assert_eq!(first.len(), 32, "{:?}", sj.status);
    assert_eq!(condition(&sj, "Ready").unwrap().0, "True");
    // The operator runs without transparent huge pages (a small heap: 4 KB pages keep its
    // resident memory near what it uses); the kernel reports the process's flag.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", env.operators[0].id())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["THP_enabled:", "0"])),
        "THP_enabled of the operator process:\n{status}"
    );
    let deploy: Api<Deployment> = Api::namespaced(env.cluster().client(), "default");
    let d = deploy.get("counting-engine").await.unwrap();
    assert_eq!(d.owner_references()[0].name, "counting");
    if env.cluster().kind() == Kind::Real {
        assert_admitted_only_under_the_restricted_profile(&env).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 2. Change the pipeline: upgraded through a savepoint.
    let map = json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]});
    env.apply(
        "counting",
        json!({"job": counting_job(&sink, records, keys, 20_000, vec![map])}),
    )
    .await;
    let sj = env
        .wait("counting", "upgraded", 90, |sj| {
            phase(sj) == Some(Phase::Running)
                && job_id(sj) != first
                && sj.status.as_ref().is_some_and(|s| s.upgrade.is_none())
        })
        .await;
    let st = sj.status.clone().unwrap();
    let restored = st
        .restored_from
        .clone()
        .expect("restored from the savepoint");
    assert_eq!(
        st.last_savepoint.as_ref().map(|s| s.path.as_str()),
        Some(restored.as_str())
    );
    let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
    let recorded = sps.list(&ListParams::default()).await.unwrap().items;
    let sp = recorded
        .iter()
        .find(|s| s.status.as_ref().and_then(|s| s.path.as_deref()) == Some(restored.as_str()))
        .unwrap_or_else(|| panic!("no Savepoint object for {restored}: {recorded:?}"));
    assert_eq!(format!("{:?}", sp.spec.trigger), "Upgrade");
    assert!(Path::new(&restored).join("_metadata").exists());

    // The job runs to its end: every key counted exactly once across both versions.
    env.wait("counting", "finished", 90, |sj| {
        phase(sj) == Some(Phase::Suspended)
    })
    .await;
    assert_exactly_once(&sink, keys, records);
    let log = CountLog::read(&sink).unwrap();
    assert!(
        std::fs::read_dir(&sink)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains("doubled")),
        "the new version's output is there: {:?}",
        log.latest().len()
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_stateful_operator_is_blocked_until_allowed() {
    let env = Env::start().await;
    let sink = env.path("out");
    let sj = env
        .apply_running(
            "counting",
            json!({"job": counting_job(&sink, 10_000_000, 50, 5_000, vec![])}),
        )
        .await;
    let first = job_id(&sj);
    // Without the count, the state of uid "counter" has nowhere to go.
    let without_count = json!({"name": "counting", "parallelism": 2, "operators": [
        {"kind": "generator", "uid": "source", "keys": 50, "count": 10_000_000, "rate": 5_000},
        {"kind": "fileSink", "uid": "out", "path": sink},
    ]});
    env.apply("counting", json!({"job": without_count.clone()}))
        .await;
    let sj = env
        .wait("counting", "Blocked", 60, |sj| {
            phase(sj) == Some(Phase::Blocked)
        })
        .await;
    let (status, reason, message) = condition(&sj, "Degraded").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "PreflightFailed"),
        "{message}\n{}",
        env.operator_log()
    );
    assert!(message.contains("counter"), "{message}");
    assert_eq!(job_id(&sj), first, "the old job keeps running");
    let pods: Api<Pod> = Api::namespaced(env.cluster().client(), "default");
    let running = pods.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(running.len(), 1, "one engine pod, untouched");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(job_id(&env.jobs().get("counting").await.unwrap()), first);

    // Allowed: it proceeds, dropping the counter's state.
    env.apply(
        "counting",
        json!({"job": without_count, "upgrade": {"allowNonRestoredState": true}}),
    )
    .await;
    let sj = env
        .wait("counting", "upgraded", 90, |sj| {
            phase(sj) == Some(Phase::Running)
                && job_id(sj) != first
                && sj.status.as_ref().is_some_and(|s| s.upgrade.is_none())
        })
        .await;
    assert!(sj.status.unwrap().restored_from.is_some());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_version_is_rolled_back_from_the_same_savepoint() {
    let env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (250_000, 20);
    let spec = |extra: Vec<Value>| {
        json!({"job": counting_job(&sink, records, keys, 15_000, extra),
               "upgrade": {"readyTimeout": "60s"}})
    };
    env.apply("counting", spec(vec![])).await;
    let sj = env
        .wait("counting", "Running", 60, |sj| {
            phase(sj) == Some(Phase::Running)
        })
        .await;
    let first = job_id(&sj);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Divides by zero on its first record: fails on every start.
    let crash = json!({"kind": "map", "set": [{"field": "x", "expr": "count / (count - count)"}]});
    env.apply("counting", spec(vec![crash])).await;
    let sj = env
        .wait("counting", "rolled back", 120, |sj| {
            let st = sj.status.as_ref();
            // Blocked: the last stable spec runs, the desired one is rejected.
            phase(sj) == Some(Phase::Blocked)
                && job_id(sj) != first
                && st.is_some_and(|s| s.upgrade.is_none() && s.rejected_spec_hash.is_some())
        })
        .await;
    let st = sj.status.clone().unwrap();
    let (status, reason, message) = condition(&sj, "Degraded").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "UpgradeFailed"),
        "{message}"
    );
    assert_eq!(
        st.restored_from,
        st.last_savepoint.as_ref().map(|s| s.path.clone()),
        "the rollback starts from the upgrade's savepoint"
    );
    assert_eq!(st.running_spec_hash, st.last_stable_spec_hash);
    env.finishes_exactly_once(&sink, keys, records, 90).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_resumes_from_its_newest_checkpoint() {
    let env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (250_000, 20);
    let mut job = counting_job(&sink, records, keys, 15_000, vec![]);
    job["checkpoints"] = json!({"interval": "1s", "dir": env.path("checkpoints")});
    let sj = env.apply_running("counting", json!({"job": job})).await;
    let id = job_id(&sj);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let killed = std::process::Command::new("pkill")
        .args(["-9", "-f", &format!("job-id {id}")])
        .status()
        .unwrap();
    assert!(killed.success(), "the engine process was found and killed");
    let pods: Api<Pod> = Api::namespaced(env.cluster().client(), "default");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pod = pods.list(&ListParams::default()).await.unwrap().items;
        let restarted = pod.iter().any(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .is_some_and(|c| c.restart_count >= 1 && c.ready)
        });
        if restarted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the engine was not restarted: {pod:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sj = env
        .wait("counting", "running again", 60, |sj| {
            phase(sj) == Some(Phase::Running)
                && sj
                    .status
                    .as_ref()
                    .and_then(|s| s.restored_from.as_deref())
                    .is_some_and(|r| r.contains("chk-"))
        })
        .await;
    assert_eq!(job_id(&sj), id, "the same job resumed");
    env.finishes_exactly_once(&sink, keys, records, 90).await;
}

fn upgraded_from(first: String) -> impl Fn(&StatefulJob) -> bool {
    move |sj| {
        phase(sj) == Some(Phase::Running)
            && job_id(sj) != first
            && sj.status.as_ref().is_some_and(|s| s.upgrade.is_none())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescales_two_to_four_to_one_with_every_count_kept() {
    let env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (320_000, 64);
    let job = counting_job(&sink, records, keys, 15_000, vec![]);
    let sj = env
        .apply_running("counting", json!({"job": job.clone(), "parallelism": 2}))
        .await;
    let mut id = job_id(&sj);
    for p in [4, 1] {
        tokio::time::sleep(Duration::from_secs(2)).await;
        env.apply("counting", json!({"job": job.clone(), "parallelism": p}))
            .await;
        let sj = env
            .wait("counting", "rescaled", 90, upgraded_from(id.clone()))
            .await;
        id = job_id(&sj);
        let d: Api<Deployment> = Api::namespaced(env.cluster().client(), "default");
        let args = d
            .get("counting-engine")
            .await
            .unwrap()
            .spec
            .template
            .spec
            .unwrap()
            .containers[0]
            .args
            .clone()
            .unwrap()
            .join(" ");
        assert!(args.contains(&format!("--parallelism {p}")), "{args}");
    }
    env.finishes_exactly_once(&sink, keys, records, 120).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_savepoint_target_keeps_the_old_job_until_fixed() {
    let env = Env::start().await;
    let sink = env.path("out");
    let good = env.path("savepoints");
    let (records, keys) = (300_000, 20);
    let sj = env
        .apply_running(
            "counting",
            json!({"job": counting_job(&sink, records, keys, 10_000, vec![]),
               "savepoints": {"dir": good}}),
        )
        .await;
    let first = job_id(&sj);
    // A directory under a regular file cannot be created, not even by root.
    let blocker = env.path("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    let map = json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]});
    let new_job = counting_job(&sink, records, keys, 10_000, vec![map]);
    env.apply(
        "counting",
        json!({"job": new_job.clone(), "savepoints": {"dir": blocker.join("sp")}}),
    )
    .await;
    let sj = env
        .wait("counting", "Degraded by the savepoint", 60, |sj| {
            condition(sj, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "SavepointFailed")
        })
        .await;
    assert_eq!(job_id(&sj), first, "the old job keeps running");
    assert_eq!(phase(&sj), Some(Phase::Upgrading));
    let attempts = sj
        .status
        .as_ref()
        .and_then(|s| s.upgrade.as_ref())
        .map(|u| u.attempts);
    assert!(attempts >= Some(1), "{attempts:?}");
    // Fixed: the retry goes through.
    env.apply(
        "counting",
        json!({"job": new_job, "savepoints": {"dir": good}}),
    )
    .await;
    env.wait("counting", "upgraded", 120, upgraded_from(first))
        .await;
    env.finishes_exactly_once(&sink, keys, records, 120).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_mid_upgrade_finishes_it_after_restart() {
    let mut env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (300_000, 20);
    let first = env.count_then_upgrade(&sink, records, keys).await;
    let sj = env
        .wait("counting", "in an upgrade stage", 60, |sj| {
            sj.status.as_ref().is_some_and(|s| s.upgrade.is_some())
        })
        .await;
    let stage = sj
        .status
        .as_ref()
        .and_then(|s| s.upgrade.as_ref())
        .map(|u| u.stage);
    let _ = env.operators[0].kill();
    let _ = env.operators[0].wait();
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.spawn_operator(&[]);
    let sj = env
        .wait("counting", "upgraded", 90, upgraded_from(first))
        .await;
    assert!(
        sj.status.unwrap().restored_from.is_some(),
        "killed in {stage:?}"
    );
    env.finishes_exactly_once(&sink, keys, records, 90).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_and_the_restored_from() {
    let env = Env::start().await;
    let sink = env.path("out");
    let dir = env.path("savepoints");
    let job = counting_job(&sink, 10_000_000, 20, 5_000, vec![]);
    let sj = env
        .apply_running(
            "counting",
            json!({"job": job.clone(), "savepoints": {"dir": dir}}),
        )
        .await;
    // An upgrade: the new job restores from its savepoint, which retention must keep.
    let map = json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]});
    let job2 = counting_job(&sink, 10_000_000, 20, 5_000, vec![map]);
    env.apply(
        "counting",
        json!({"job": job2.clone(), "savepoints": {"dir": dir}}),
    )
    .await;
    let sj = env
        .wait("counting", "upgraded", 90, upgraded_from(job_id(&sj)))
        .await;
    let restored = sj.status.unwrap().restored_from.unwrap();
    env.apply(
        "counting",
        json!({"job": job2, "savepoints": {"dir": dir, "periodic": "1s", "retention": {"maxCount": 3}}}),
    )
    .await;
    let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < 6 {
        for sp in sps.list(&ListParams::default()).await.unwrap().items {
            seen.insert(sp.name_any());
        }
        assert!(
            Instant::now() < deadline,
            "savepoints seen: {seen:?}\n{}",
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Stop taking savepoints, let retention settle.
    env.apply("counting", json!({"job": counting_job(&sink, 10_000_000, 20, 5_000, vec![json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]})]), "savepoints": {"dir": dir, "retention": {"maxCount": 3}}}))
        .await;
    // Retention deletes the objects beyond maxCount and then disposes of their files, one
    // deleted object at a time: wait until what is on disk is what the objects name (a
    // savepoint in flight when the periodic ones stopped is recorded, then retained or not).
    let on_disk = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path().display().to_string())
            .filter(|p| p.contains("savepoint-"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<Savepoint> = sps.list(&ListParams::default()).await.unwrap().items;
        let mut paths: Vec<String> = left
            .iter()
            .filter_map(|s| s.status.as_ref().and_then(|s| s.path.clone()))
            .collect();
        let mut files = on_disk();
        paths.sort();
        files.sort();
        if left.len() == 3 && paths == files {
            assert!(paths.contains(&restored), "{restored} kept: {paths:?}");
            break;
        }
        if Instant::now() > deadline {
            let status = env.jobs().get("counting").await.unwrap().status;
            panic!(
                "after 60 s, {} objects ({paths:?}) and on disk {files:?}; the files of deleted savepoints are disposed\nstatus: {status:?}\n{}",
                left.len(),
                env.operator_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspends_resumes_and_deletes_with_its_savepoints() {
    let env = Env::start().await;
    let sink = env.path("out");
    let dir = env.path("savepoints");
    let job = counting_job(&sink, 10_000_000, 20, 5_000, vec![]);
    let spec = |state: &str| {
        json!({"job": job.clone(), "state": state,
               "savepoints": {"dir": dir, "disposeOnDelete": true}})
    };
    env.apply("counting", spec("running")).await;
    let sj = env
        .wait("counting", "Running", 60, |sj| {
            phase(sj) == Some(Phase::Running)
        })
        .await;
    let first = job_id(&sj);
    env.apply("counting", spec("suspended")).await;
    let sj = env
        .wait("counting", "Suspended", 60, |sj| {
            phase(sj) == Some(Phase::Suspended)
        })
        .await;
    let saved = sj.status.unwrap().last_savepoint.unwrap().path;
    let deploys: Api<Deployment> = Api::namespaced(env.cluster().client(), "default");
    assert!(deploys.get_opt("counting-engine").await.unwrap().is_none());
    env.apply("counting", spec("running")).await;
    let sj = env
        .wait("counting", "resumed", 60, upgraded_from(first))
        .await;
    assert_eq!(sj.status.unwrap().restored_from, Some(saved.clone()));

    env.jobs()
        .delete("counting", &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job_left = env.jobs().get_opt("counting").await.unwrap().is_some();
        let engine_left = deploys.get_opt("counting-engine").await.unwrap().is_some();
        let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
        let left = sps.list(&ListParams::default()).await.unwrap().items.len();
        if !job_left && !engine_left && left == 0 && !Path::new(&saved).exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left: StatefulJob {job_left}, engine Deployment {engine_left}, {left} savepoints, {saved} exists: {}\n{}",
            Path::new(&saved).exists(),
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_operator_replicas_only_the_leader_acts() {
    let mut env = Env::start().await;
    // The default operator runs without election; replace it with two electing replicas.
    let _ = env.operators[0].kill();
    let _ = env.operators[0].wait();
    let elect = ["--leader-elect", "--lease-duration", "3s"];
    let a = env.spawn_operator(&[&elect[..], &["--identity", "op-a"]].concat());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = env.spawn_operator(&[&elect[..], &["--identity", "op-b"]].concat());
    let sink = env.path("out");
    let sj = env
        .apply_running(
            "counting",
            json!({"job": counting_job(&sink, 10_000_000, 20, 5_000, vec![])}),
        )
        .await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.cluster().client(), "default");
    let holder = leases
        .get("sjob-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    assert_eq!(holder, "op-a");
    let log_b = std::fs::read_to_string(env.path(&format!("operator-{b}.log"))).unwrap();
    assert!(log_b.contains("standby"), "{log_b}");
    assert!(!log_b.contains("leader: acting"), "{log_b}");
    // The leader is killed (SIGKILL) in the middle of an upgrade: the standby takes over and
    // finishes it, exactly once.
    let map = json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]});
    env.apply(
        "counting",
        json!({"job": counting_job(&sink, 10_000_000, 20, 5_000, vec![map])}),
    )
    .await;
    let mid = env
        .wait("counting", "an upgrade in flight", 30, |sj| {
            sj.status.as_ref().is_some_and(|s| s.upgrade.is_some())
        })
        .await;
    let _ = env.operators[a].kill();
    let _ = env.operators[a].wait();
    let stage = mid.status.unwrap().upgrade.unwrap().stage;
    let done = env
        .wait(
            "counting",
            "upgraded by op-b",
            90,
            upgraded_from(job_id(&sj)),
        )
        .await;
    let log_b = std::fs::read_to_string(env.path(&format!("operator-{b}.log"))).unwrap();
    assert!(log_b.contains("leader: acting"), "{log_b}");
    // One savepoint (object and directory), the one the new job restored from.
    let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
    let objects = sps.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(
        objects.len(),
        1,
        "leader killed at stage {stage:?}: {objects:?}"
    );
    let restored = done.status.unwrap().restored_from.unwrap();
    assert_eq!(
        objects[0].status.as_ref().unwrap().path.as_deref(),
        Some(restored.as_str())
    );
    let dirs: Vec<_> = std::fs::read_dir(env.cluster().savepoint_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("savepoint-"))
        .collect();
    assert_eq!(dirs.len(), 1, "leader killed at stage {stage:?}");
    if env.cluster().kind() == Kind::Real {
        // The real Deployment controller made one new ReplicaSet for the one new version.
        let sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
            Api::namespaced(env.cluster().client(), "default");
        let sets = sets.list(&ListParams::default()).await.unwrap().items;
        assert_eq!(
            sets.len(),
            2,
            "the old and the new version's ReplicaSets: {:?}",
            sets.iter().map(|r| r.name_any()).collect::<Vec<_>>()
        );
    }
    env.stop().await;
}

/// Runs kubectl, asserts that it succeeded, and returns its standard output.
fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl(kubeconfig, args).unwrap();
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kubectl that `e2e/k8s/install.sh` builds with the control plane (the same version).
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Option<std::process::Output> {
    let exe = sjob::local::real::bin_dir()
        .map(|d| d.join("kubectl"))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(&exe)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (bash e2e/k8s/install.sh builds it)", exe.display()));
    Some(out)
}

/// A real kubectl against the local control plane: apply, get (server-side tables), JSON
/// output, and the operator's RBAC refusing what the chart does not grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_against_the_control_plane() {
    let env = Env::without_operator().await;
    let cluster = env.cluster();
    let admin = cluster.kubeconfig();
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/samples/statefuljob.yaml"
    );
    let out = kubectl(&admin, &["apply", "-f", sample]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl(&admin, &["get", "sjob"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("PHASE") && table.contains("LAST SAVEPOINT") && table.contains("clicks"),
        "{table}"
    );
    let out = kubectl(&admin, &["get", "statefuljob", "clicks", "-o", "json"]).unwrap();
    let obj: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(obj["metadata"]["generation"], 1);
    // Applying the same file again changes nothing: same generation.
    let out = kubectl(&admin, &["apply", "-f", sample]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl(&admin, &["get", "crd", "-o", "name"]).unwrap();
    let crds = String::from_utf8_lossy(&out.stdout);
    assert!(
        crds.contains("statefuljobs.sjob.dev") && crds.contains("savepoints.sjob.dev"),
        "{crds}"
    );
    // As the operator's service account (kubectl sends no token over plain HTTP, so
    // impersonation): what the chart does not grant is refused.
    let as_op = format!("--as={}", sjob::local::cluster::OPERATOR_USER);
    let out = kubectl(&admin, &[&as_op, "delete", "crd", "savepoints.sjob.dev"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("forbidden"), "{err}");
    let out = kubectl(&admin, &[&as_op, "get", "secrets"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("forbidden"), "{err}");
    let out = kubectl(&admin, &[&as_op, "get", "statefuljobs", "-o", "name"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("statefuljob.sjob.dev/clicks"));
    let out = kubectl(&admin, &["delete", "-f", sample]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.stop().await;
}

/// Manual savepoints: by `savepointTriggerNonce`, and by creating a Savepoint object; both end
/// as completed Savepoint objects whose files are a complete savepoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_savepoints_by_nonce_and_by_a_savepoint_object() {
    use sjob::operator::crd::{SavepointState, SavepointTrigger};
    let env = Env::start().await;
    let sink = env.path("out");
    let job = counting_job(&sink, 10_000_000, 20, 5_000, vec![]);
    env.apply_running("counting", json!({"job": job.clone()}))
        .await;
    env.apply(
        "counting",
        json!({"job": job.clone(), "savepointTriggerNonce": 1}),
    )
    .await;
    let sj = env
        .wait("counting", "savepoint recorded", 60, |sj| {
            sj.status.as_ref().is_some_and(|s| {
                s.last_savepoint.is_some() && s.observed_savepoint_trigger_nonce == Some(1)
            })
        })
        .await;
    let by_nonce = sj.status.unwrap().last_savepoint.unwrap();
    assert!(Path::new(&by_nonce.path).join("_metadata").is_file());
    let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
    let recorded = sps.get(&by_nonce.name).await.unwrap();
    assert_eq!(recorded.spec.trigger, SavepointTrigger::Manual);
    assert_eq!(recorded.spec.job_ref, "counting");

    let by_hand: Savepoint = serde_json::from_value(json!({
        "apiVersion": "sjob.dev/v1alpha1", "kind": "Savepoint",
        "metadata": {"name": "by-hand", "namespace": "default"},
        "spec": {"jobRef": "counting", "trigger": "manual"},
    }))
    .unwrap();
    sps.create(&Default::default(), &by_hand).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let sp = sps.get("by-hand").await.unwrap();
        let st = sp.status.clone().unwrap_or_default();
        if st.state == Some(SavepointState::Completed) {
            break st;
        }
        assert!(
            st.state != Some(SavepointState::Failed) && Instant::now() < deadline,
            "{st:?}\n{}",
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let path = done.path.unwrap();
    assert_ne!(path, by_nonce.path);
    assert!(Path::new(&path).join("_metadata").is_file(), "{path}");
    assert!(done.size_bytes.unwrap_or(0) > 0);
    env.stop().await;
}

/// What only the real API server does: it refuses invalid StatefulJobs itself (the schema's
/// bounds, enums and patterns, and the CRD's CEL rules), naming the field; `kubectl explain`
/// shows the descriptions; `kubectl get` prints the columns; the Helm chart installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_api_server_validates_explains_and_installs_the_chart() {
    let env = Env::on(Kind::Real).await;
    let admin = env.cluster().kubeconfig();
    let job = counting_job(&env.path("out"), 1_000, 10, 1_000, vec![]);
    let with = |extra: Value| {
        let mut spec = json!({"job": job.clone()});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        spec
    };
    let cases = [
        (
            "parallelism 0",
            with(json!({"parallelism": 0})),
            "spec.parallelism",
        ),
        (
            "an unknown upgrade mode",
            with(json!({"upgrade": {"mode": "yolo"}})),
            "spec.upgrade.mode",
        ),
        (
            "a malformed duration",
            with(json!({"upgrade": {"savepointTimeout": "ten minutes"}})),
            "spec.upgrade.savepointTimeout",
        ),
        (
            "maxCount 0",
            with(json!({"savepoints": {"retention": {"maxCount": 0}}})),
            "spec.savepoints.retention.maxCount",
        ),
        (
            "restoreFrom with a stateless upgrade mode",
            with(json!({"restoreFrom": "/sp/savepoint-x", "upgrade": {"mode": "stateless"}})),
            "spec.restoreFrom",
        ),
        (
            "parallelism above maxParallelism",
            with(json!({"parallelism": 8, "maxParallelism": 4})),
            "spec.parallelism",
        ),
    ];
    for (i, (name, spec, field)) in cases.into_iter().enumerate() {
        // Untyped: the typed client would refuse some of these before sending them.
        let obj: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "sjob.dev/v1alpha1", "kind": "StatefulJob",
            "metadata": {"name": format!("bad-{i}"), "namespace": "default"},
            "spec": spec,
        }))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
            env.cluster().client(),
            "default",
            &kube::api::ApiResource::erase::<StatefulJob>(&()),
        );
        match api.create(&Default::default(), &obj).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{name}: {status:?}");
                assert!(
                    status.message.contains(field),
                    "{name}: the refusal names {field}: {}",
                    status.message
                );
            }
            other => panic!("{name}: the API server must refuse it, got {other:?}"),
        }
    }

    let text = kubectl_ok(&admin, &["explain", "statefuljob.spec.upgrade"]);
    for want in [
        "How spec changes are rolled out",
        "savepointTimeout",
        "How long the savepoint before an upgrade may take",
        "allowNonRestoredState",
    ] {
        assert!(
            text.contains(want),
            "kubectl explain lacks {want:?}:\n{text}"
        );
    }

    env.apply("good", json!({"job": job, "state": "suspended"}))
        .await;
    let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
    let sp: Savepoint = serde_json::from_value(json!({
        "apiVersion": "sjob.dev/v1alpha1", "kind": "Savepoint",
        "metadata": {"name": "by-hand", "namespace": "default"},
        "spec": {"jobRef": "good", "trigger": "manual", "path": "/sp/savepoint-by-hand"},
    }))
    .unwrap();
    sps.create(&Default::default(), &sp).await.unwrap();
    let table = kubectl_ok(&admin, &["get", "sjob,sjsp"]);
    for want in [
        "PHASE",
        "JOB ID",
        "LAST SAVEPOINT",
        "statefuljob.sjob.dev/good",
        "JOB",
        "TRIGGER",
        "STATE",
        "PATH",
        "savepoint.sjob.dev/by-hand",
        "manual",
    ] {
        assert!(
            table.contains(want),
            "kubectl get sjob,sjsp lacks {want:?}:\n{table}"
        );
    }

    // The chart, installed by helm into the real API server (its CRDs are there already).
    let helm = std::env::var_os("SJOB_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("helm"));
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/sjob");
    let out = std::process::Command::new(&helm)
        .args([
            "install",
            "e2e",
            chart,
            "--namespace",
            "helm-e2e",
            "--create-namespace",
        ])
        .arg("--kubeconfig")
        .arg(&admin)
        .output()
        .unwrap_or_else(|e| panic!("helm: {e}: install it with `bash e2e/helm/install-helm.sh`"));
    assert!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deploys: Api<Deployment> = Api::namespaced(env.cluster().client(), "helm-e2e");
    let d = deploys.get("e2e-sjob").await.unwrap();
    assert_eq!(
        d.spec
            .template
            .spec
            .unwrap()
            .service_account_name
            .as_deref(),
        Some("e2e-sjob")
    );
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(env.cluster().client());
    let installed = roles.get("e2e-sjob").await.unwrap();
    let shipped: k8s_openapi::api::rbac::v1::ClusterRole =
        serde_yaml::from_str(sjob::local::cluster::OPERATOR_RBAC).unwrap();
    assert_eq!(
        installed.rules, shipped.rules,
        "the chart grants config/rbac/role.yaml"
    );
    let out = std::process::Command::new(&helm)
        .args(["uninstall", "e2e", "--namespace", "helm-e2e", "--wait"])
        .arg("--kubeconfig")
        .arg(&admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.stop().await;
}

/// The GitOps health checker (`e2e/health`: kstatus as Flux computes it, and the Argo CD Lua
/// checks of `config/argocd/`): `SJOB_HEALTH_BIN`, or built by `e2e/health/build.sh`.
fn health_checker() -> PathBuf {
    if let Some(bin) = std::env::var_os("SJOB_HEALTH_BIN") {
        return PathBuf::from(bin);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/health/build.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .unwrap_or_else(|e| panic!("bash {script}: {e}"));
    assert!(
        out.status.success(),
        "bash {script} (needs Go; `bash .ci/run` builds it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// kstatus and Argo CD's health of one object as the API server returns it.
fn health_of(
    checker: &Path,
    dir: &Path,
    name: &str,
    obj: &impl serde::Serialize,
) -> (String, String) {
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec(obj).unwrap()).unwrap();
    let out = std::process::Command::new(checker)
        .arg("--argocd-dir")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/argocd"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["kstatus"].as_str().unwrap_or_default().to_owned(),
        v["argocd"].as_str().unwrap_or_default().to_owned(),
    )
}

/// GitOps health as the real tools judge it, at each phase of a StatefulJob's life: in
/// progress while deploying and upgrading, current when running or suspended, failed when an
/// upgrade is blocked or the spec cannot be deployed; Savepoints healthy once completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kstatus_and_argo_cd_agree_with_every_phase() {
    let checker = health_checker();
    let env = Env::start().await;
    let snapshots = env.path("health");
    std::fs::create_dir_all(&snapshots).unwrap();
    let sink = env.path("out");
    let job = counting_job(&sink, 10_000_000, 20, 5_000, vec![]);
    // Every version of the object the API server sends: short phases (Deploying, Upgrading)
    // are judged as written, however fast they pass.
    let history = std::sync::Arc::new(std::sync::Mutex::new(Vec::<StatefulJob>::new()));
    let recorder = tokio::spawn({
        use futures::StreamExt;
        let history = history.clone();
        let jobs = env.jobs();
        async move {
            let mut events = std::pin::pin!(kube::runtime::watcher(
                jobs,
                kube::runtime::watcher::Config::default()
            ));
            while let Some(event) = events.next().await {
                if let Ok(kube::runtime::watcher::Event::Apply(sj)) = event {
                    history.lock().unwrap().push(sj);
                }
            }
        }
    });

    env.apply("counting", json!({"job": job.clone()})).await;
    let sj = env
        .wait("counting", "Running", 60, |sj| {
            phase(sj) == Some(Phase::Running)
        })
        .await;
    let first = job_id(&sj);

    let map = json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]});
    let v2 = counting_job(&sink, 10_000_000, 20, 5_000, vec![map]);
    env.apply("counting", json!({"job": v2.clone()})).await;
    env.wait("counting", "upgraded", 90, upgraded_from(first))
        .await;

    // Removing the stateful count without allowNonRestoredState: blocked, the job runs on.
    let mut v3 = counting_job(&sink, 10_000_000, 20, 5_000, vec![]);
    v3["operators"].as_array_mut().unwrap().remove(2);
    v3["operators"].as_array_mut().unwrap().remove(1);
    env.apply("counting", json!({"job": v3})).await;
    env.wait("counting", "Blocked", 60, |sj| {
        phase(sj) == Some(Phase::Blocked)
    })
    .await;

    env.apply("counting", json!({"job": v2, "state": "suspended"}))
        .await;
    env.wait("counting", "Suspended", 90, |sj| {
        phase(sj) == Some(Phase::Suspended)
    })
    .await;
    let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
    let completed = sps.list(&ListParams::default()).await.unwrap().items;
    let sp_health = health_of(&checker, &snapshots, "savepoint", &completed[0]);

    // A job graph that cannot run (a count without its keyBy), never deployed: Failed.
    let mut broken = counting_job(&sink, 1_000, 20, 5_000, vec![]);
    broken["operators"].as_array_mut().unwrap().remove(1);
    env.apply("broken", json!({"job": broken})).await;
    env.wait("broken", "Failed", 30, |sj| {
        phase(sj) == Some(Phase::Failed)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    recorder.abort();

    // The first version written in each phase, as the API server returned it.
    let history = history.lock().unwrap().clone();
    let mut seen: Vec<(String, (String, String))> = Vec::new();
    for want in [
        Phase::Deploying,
        Phase::Running,
        Phase::Upgrading,
        Phase::Blocked,
        Phase::Suspended,
        Phase::Failed,
    ] {
        let name = format!("{want:?}");
        let sj = history
            .iter()
            .find(|sj| phase(sj) == Some(want))
            .unwrap_or_else(|| panic!("no version of a StatefulJob in phase {name}"));
        seen.push((name.clone(), health_of(&checker, &snapshots, &name, sj)));
    }

    let want = |k: &str, a: &str| (k.to_owned(), a.to_owned());
    let expected = vec![
        ("Deploying".to_owned(), want("InProgress", "Progressing")),
        ("Running".to_owned(), want("Current", "Healthy")),
        ("Upgrading".to_owned(), want("InProgress", "Progressing")),
        ("Blocked".to_owned(), want("Failed", "Degraded")),
        ("Suspended".to_owned(), want("Current", "Suspended")),
        ("Failed".to_owned(), want("Failed", "Degraded")),
    ];
    assert_eq!(seen, expected, "(kstatus, Argo CD) per phase");
    assert_eq!(
        sp_health,
        want("Current", "Healthy"),
        "a completed Savepoint"
    );
    env.stop().await;
}

/// The process kubelet as a node of the real control plane: it registers its Node and Lease,
/// runs pods bound to it with Secret volumes (and emptyDirs), reports exits in
/// `containerStatuses` (`restartCount`, `lastState.terminated`), follows `restartPolicy`, and
/// removes a deleted pod's object once its process has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_kubelet_is_a_node_of_the_real_control_plane() {
    use k8s_openapi::api::core::v1::{Node, Secret};
    let env = Env::on(Kind::Real).await;
    let client = env.cluster().client();
    let nodes: Api<Node> = Api::all(client.clone());
    let node_name = sjob::local::real::NODE_NAME;
    let node = nodes.get(node_name).await.unwrap();
    let ready = node.status.unwrap().conditions.unwrap_or_default();
    assert!(
        ready
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-node-lease");
    let lease = leases.get(node_name).await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(node_name)
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |name: &str, policy: &str, args: Vec<&str>| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "restartPolicy": policy,
                "terminationGracePeriodSeconds": 20,
                // The namespace enforces Pod Security "restricted".
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "engine", "image": "sjob", "command": ["sjob"], "args": args,
                    "securityContext": {"allowPrivilegeEscalation": false,
                                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "job", "mountPath": "/etc/job"},
                                     {"name": "scratch", "mountPath": "/scratch"}]}],
                "volumes": [{"name": "job", "secret": {"secretName": "job"}},
                            {"name": "scratch", "emptyDir": {}}],
            },
        }))
        .unwrap()
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let bounded = "name: bounded\noperators:\n  - {kind: generator, uid: src, keys: 5, count: 500}\n  - {kind: keyBy, field: key}\n  - {kind: count, uid: counter}\n  - {kind: fileSink, uid: out, path: out}\n";
    let endless = "name: endless\noperators:\n  - {kind: generator, uid: src, keys: 5, rate: 100}\n  - {kind: discardSink}\n";
    secrets
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "job", "namespace": "default"},
                "stringData": {"bounded.yaml": bounded, "endless.yaml": endless},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let args = |file: &'static str| vec!["run", "--rest-port", "0", file];
    for p in [
        pod("finishes", "Never", args("/etc/job/bounded.yaml")),
        pod("crashes", "OnFailure", args("/etc/job/missing.yaml")),
        pod("runs", "Always", args("/etc/job/endless.yaml")),
    ] {
        pods.create(&Default::default(), &p).await.unwrap();
    }
    let wait_pod = |name: &'static str, what: &'static str, pred: fn(&Pod) -> bool| {
        let pods = pods.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let p = pods.get(name).await.unwrap();
                if pred(&p) {
                    return p;
                }
                assert!(
                    Instant::now() < deadline,
                    "pod {name}: not {what}: {:?}",
                    p.status
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let phase_of = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
    let container = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .and_then(|c| c.into_iter().next())
    };
    // A bounded job from a Secret, writing into an emptyDir: Succeeded, not restarted.
    let done = wait_pod("finishes", "Succeeded", |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
    })
    .await;
    assert_eq!(
        done.spec.as_ref().unwrap().node_name.as_deref(),
        Some(node_name)
    );
    let c = container(&done).unwrap();
    assert_eq!(c.restart_count, 0);
    assert_eq!(c.state.unwrap().terminated.unwrap().exit_code, 0);
    // Its output, in its working directory (the pod's); the emptyDir a directory beside it.
    let pod_dir = env.cluster().dir().join("pods/default/finishes");
    assert!(pod_dir.join("volumes/scratch").is_dir());
    let out = pod_dir.join("out");
    assert!(
        std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("part-")),
        "the job's output in {}",
        out.display()
    );
    // A failing container under OnFailure: restarted, its last exit reported.
    let crashed = wait_pod("crashes", "restarted", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .is_some_and(|c| {
                c.restart_count >= 1
                    && c.last_state
                        .as_ref()
                        .is_some_and(|l| l.terminated.is_some())
            })
    })
    .await;
    let last = container(&crashed)
        .unwrap()
        .last_state
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(last.exit_code, 1);
    assert!(
        last.message
            .as_deref()
            .unwrap_or_default()
            .contains("missing.yaml"),
        "{last:?}"
    );
    assert_eq!(phase_of(&crashed).as_deref(), Some("Running"));
    // A running pod deleted with a grace period: SIGTERM, the process exits, the object goes.
    wait_pod("runs", "ready", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await;
    let asked = Instant::now();
    pods.delete("runs", &Default::default()).await.unwrap();
    let held = pods.get_opt("runs").await.unwrap();
    assert!(
        held.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        "a bound pod stays, terminating, until its process has stopped"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while pods.get_opt("runs").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the deleted pod's object was not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(env.cluster().dir().join("pods/default/runs/container.log"))
        .unwrap();
    assert!(
        log.contains("signal received"),
        "stopped by SIGTERM, not killed: {log}"
    );
    println!("deleted pod gone after {:?}", asked.elapsed());
    env.stop().await;
}

/// The real API server's PodSecurity admission enforces "restricted" in the jobs' namespace
/// (so the engine pod now running there was admitted under it) and refuses a pod that is not.
async fn assert_admitted_only_under_the_restricted_profile(env: &Env) {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.cluster().client());
    let ns = namespaces.get("default").await.unwrap();
    assert_eq!(
        ns.labels()
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted")
    );
    let pods: Api<Pod> = Api::namespaced(env.cluster().client(), "default");
    let engines = pods
        .list(&ListParams::default().labels("sjob.dev/job=counting"))
        .await
        .unwrap();
    assert!(!engines.items.is_empty(), "no engine pod");
    let plain: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap();
    match pods.create(&Default::default(), &plain).await {
        Err(kube::Error::Api(e)) => assert!(
            e.code == 403 && e.message.contains("violates PodSecurity \"restricted"),
            "{e:?}"
        ),
        other => panic!("a pod outside the restricted profile was admitted: {other:?}"),
    }
}

/// Savepoint objects of `job`, deleted or not.
async fn savepoint_objects(env: &Env, trigger: &str) -> Vec<Savepoint> {
    let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
    sps.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| format!("{:?}", s.spec.trigger) == trigger)
        .collect()
}

fn stage(sj: &StatefulJob) -> Option<String> {
    sj.status
        .as_ref()
        .and_then(|s| s.upgrade.as_ref())
        .map(|u| format!("{:?}", u.stage))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_outlives_the_api_server_going_away_for_30_seconds() {
    let mut env = Env::on(Kind::Real).await;
    env.spawn_operator(&[]);
    let sink = env.path("out");
    let (records, keys) = (900_000, 20);
    let first = env.count_then_upgrade(&sink, records, keys).await;
    let sj = env
        .wait("counting", "savepointing", 60, |sj| {
            stage(sj).is_some_and(|s| s != "Preflight")
        })
        .await;
    let during = stage(&sj);
    env.cluster
        .as_mut()
        .unwrap()
        .interrupt_api_server(Duration::from_secs(30))
        .await
        .unwrap();
    let sj = env
        .wait("counting", "upgraded", 120, upgraded_from(first))
        .await;
    assert!(
        sj.status.unwrap().restored_from.is_some(),
        "stopped in {during:?}"
    );
    for (n, op) in env.operators.iter_mut().enumerate() {
        assert!(op.try_wait().unwrap().is_none(), "operator {n} exited");
    }
    let recorded = savepoint_objects(&env, "Upgrade").await;
    assert_eq!(
        recorded.len(),
        1,
        "one upgrade, one savepoint: {recorded:?}"
    );
    env.finishes_exactly_once(&sink, keys, records, 120).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_finishes_once_through_status_write_conflicts_at_every_stage() {
    let env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (300_000, 20);
    let first = env.count_then_upgrade(&sink, records, keys).await;
    // Another writer changes the object every 20 ms, so the operator's status writes (made
    // with the resourceVersion it read) keep meeting conflicts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (jobs, stop) = (env.jobs(), stop.clone());
        tokio::spawn(async move {
            let mut stages = std::collections::BTreeSet::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let patch = json!({"metadata": {"annotations": {"e2e/touched": n.to_string()}}});
                if let Ok(sj) = jobs
                    .patch("counting", &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    stages.insert(stage(&sj).unwrap_or_else(|| "none".into()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (n, stages)
        })
    };
    env.wait("counting", "upgraded", 120, upgraded_from(first))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (writes, stages) = writer.await.unwrap();
    let log = env.operator_log();
    // Conflicts the operator met: written again on the fresh object, or a reconcile retried.
    let text = std::fs::read_to_string(env.path("operator-0.log")).unwrap();
    let conflicts = text
        .matches("status write met a metadata-only change")
        .count()
        + text.matches("the object has been modified").count();
    assert!(conflicts > 0, "no conflict met in {writes} writes:\n{log}");
    for want in ["Savepointing", "Verifying"] {
        assert!(
            stages.contains(want),
            "the writer never saw {want}: {stages:?}"
        );
    }
    let recorded = savepoint_objects(&env, "Upgrade").await;
    assert_eq!(
        recorded.len(),
        1,
        "one upgrade, one savepoint: {recorded:?}\n{log}"
    );
    env.wait("counting", "finished", 90, |sj| {
        phase(sj) == Some(Phase::Suspended)
    })
    .await;
    assert_exactly_once(&sink, keys, records);
    println!("{writes} competing writes, {conflicts} conflicts, stages {stages:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_periodic_savepoint_is_recorded_through_status_write_conflicts() {
    let env = Env::start().await;
    let sink = env.path("out");
    let dir = env.path("savepoints");
    let job = counting_job(&sink, 10_000_000, 20, 5_000, vec![]);
    env.apply_running(
        "counting",
        json!({"job": job.clone(),
               "savepoints": {"dir": dir, "periodic": "1s", "retention": {"maxCount": 50}}}),
    )
    .await;
    // Another writer changes the status (a field this job does not use) every 100 ms: the
    // operator's status writes keep meeting conflicts it must plan again after. A savepoint
    // asked for whose status write is refused must still be recorded, not asked for again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (jobs, stop) = (env.jobs(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let patch = json!({"status": {"observedPromoteNonce": n}});
                let _ = jobs
                    .patch_status("counting", &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        })
    };
    let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
    let deadline = Instant::now() + Duration::from_secs(90);
    while sps.list(&ListParams::default()).await.unwrap().items.len() < 8 {
        assert!(Instant::now() < deadline, "{}", env.operator_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    env.apply(
        "counting",
        json!({"job": job, "savepoints": {"dir": dir, "retention": {"maxCount": 50}}}),
    )
    .await;
    // Once no savepoint is pending, every one on disk has its Savepoint object.
    let on_disk = || -> Vec<String> {
        let mut found: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path().display().to_string())
            .filter(|p| p.contains("savepoint-"))
            .collect();
        found.sort();
        found
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending = env
            .jobs()
            .get("counting")
            .await
            .unwrap()
            .status
            .and_then(|s| s.pending_savepoint);
        let mut recorded: Vec<String> = sps
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter_map(|s| s.status.as_ref().and_then(|s| s.path.clone()))
            .collect();
        recorded.sort();
        let files = on_disk();
        if pending.is_none() && recorded == files {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s, {} recorded and {} on disk (pending {pending:?}):\nrecorded {recorded:?}\non disk {files:?}\n{}",
            recorded.len(),
            files.len(),
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = std::fs::read_to_string(env.path("operator-0.log")).unwrap();
    let conflicts = text.matches("the object has been modified").count();
    assert!(conflicts > 0, "no conflict met in {writes} writes");
    println!(
        "{writes} competing status writes, {conflicts} conflicts, {} savepoints",
        on_disk().len()
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_deleted_mid_upgrade_is_kept_until_the_rollback_no_longer_needs_it() {
    let env = Env::start().await;
    let sink = env.path("out");
    // Long enough for the rolled-back job to take checkpoints of its own.
    let (records, keys) = (750_000, 20);
    let spec = |extra: Vec<Value>| {
        json!({"job": counting_job(&sink, records, keys, 15_000, extra),
               "upgrade": {"readyTimeout": "60s"}})
    };
    let sj = env.apply_running("counting", spec(vec![])).await;
    let first = job_id(&sj);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Fails on every start: the upgrade rolls back from its savepoint.
    let crash = json!({"kind": "map", "set": [{"field": "x", "expr": "count / (count - count)"}]});
    env.apply("counting", spec(vec![crash])).await;
    // A user deletes the upgrade's Savepoint as soon as it is recorded.
    let sps: Api<Savepoint> = Api::namespaced(env.cluster().client(), "default");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (name, path) = loop {
        let found = savepoint_objects(&env, "Upgrade").await;
        if let Some(sp) = found.first()
            && let Some(path) = sp.status.as_ref().and_then(|s| s.path.clone())
        {
            break (sp.name_any(), path);
        }
        assert!(
            Instant::now() < deadline,
            "no upgrade savepoint recorded\n{}",
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sps.delete(&name, &Default::default()).await.unwrap();
    let sj = env
        .wait("counting", "rolled back", 120, |sj| {
            phase(sj) == Some(Phase::Blocked)
                && job_id(sj) != first
                && sj.status.as_ref().is_some_and(|s| s.upgrade.is_none())
        })
        .await;
    assert_eq!(
        sj.status
            .as_ref()
            .and_then(|s| s.restored_from.clone())
            .as_deref(),
        Some(path.as_str()),
        "the rollback started from the deleted Savepoint's files"
    );
    // Kept while the rolled-back job has no checkpoint of its own, then disposed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match sps.get_opt(&name).await.unwrap() {
            None => break,
            Some(sp) => assert!(sp.metadata.deletion_timestamp.is_some()),
        }
        assert!(
            Instant::now() < deadline,
            "{name} never disposed\n{}",
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!Path::new(&path).exists(), "{path} still there");
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.cluster().client(), "default");
    let deferred: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("DisposalDeferred")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
        })
        .filter_map(|e| e.note)
        .collect();
    assert!(
        deferred.iter().any(|n| n.contains(&path)),
        "no DisposalDeferred event for {name}: {deferred:?}"
    );
    env.finishes_exactly_once(&sink, keys, records, 90).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_upgrade_takes_over_without_a_stop_and_counts_every_record_once() {
    let env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (600_000, 20);
    let spec = |extra: Vec<Value>| {
        json!({"job": counting_job(&sink, records, keys, 15_000, extra),
               "upgrade": {"strategy": "blue-green", "blueGreen": {"maxLag": 200_000}}})
    };
    let sj = env.apply_running("counting", spec(vec![])).await;
    let first = job_id(&sj);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let map = json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]});
    env.apply("counting", spec(vec![map])).await;
    let sj = env
        .wait("counting", "switched to green", 120, upgraded_from(first))
        .await;
    let st = sj.status.clone().unwrap();
    assert_eq!(st.live, Some(sjob::operator::crd::Color::Green), "{st:?}");
    assert!(st.candidate.is_none());
    let deployments: Api<Deployment> = Api::namespaced(env.cluster().client(), "default");
    assert!(
        deployments
            .get_opt("counting-engine-green")
            .await
            .unwrap()
            .is_some()
    );
    // The REST Service selects green's pods.
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(env.cluster().client(), "default");
    let svc = services.get("counting-rest").await.unwrap();
    let selector = svc.spec.and_then(|s| s.selector).unwrap_or_default();
    assert_eq!(
        selector.get("sjob.dev/color").map(String::as_str),
        Some("green"),
        "{selector:?}"
    );
    let recorded = savepoint_objects(&env, "Upgrade").await;
    assert_eq!(
        recorded.len(),
        2,
        "the savepoint green starts from and blue's stop at the cut-over: {recorded:?}"
    );
    env.finishes_exactly_once(&sink, keys, records, 120).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_green_is_deleted_and_blue_never_stops() {
    let env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (450_000, 20);
    let spec = |extra: Vec<Value>| {
        json!({"job": counting_job_500ms(&env, &sink, records, keys, extra),
               "upgrade": {"strategy": "blue-green", "readyTimeout": "60s"}})
    };
    let sj = env.apply_running("counting", spec(vec![])).await;
    let first = job_id(&sj);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Divides by zero on its first record: fails on every start.
    let crash = json!({"kind": "map", "set": [{"field": "x", "expr": "count / (count - count)"}]});
    let watch = OutputWatch::start(&sink);
    let (from, before) = (Instant::now(), committed_bytes(&sink));
    env.apply("counting", spec(vec![crash])).await;
    let sj = env
        .wait("counting", "abandoned", 120, |sj| {
            phase(sj) == Some(Phase::Blocked)
                && sj.status.as_ref().is_some_and(|s| s.upgrade.is_none())
        })
        .await;
    let grew = watch.finish();
    assert!(
        committed_bytes(&sink) > before,
        "blue wrote on while green crash-looped"
    );
    println!(
        "longest pause in blue's committed output while green crash-looped (checkpoints every 500 ms): {:.2} s over {:.1} s",
        longest_gap(&grew, from, Instant::now()).as_secs_f64(),
        from.elapsed().as_secs_f64()
    );
    let pods: Api<Pod> = Api::namespaced(env.cluster().client(), "default");
    for pod in pods
        .list(&ListParams::default().labels("sjob.dev/color=blue"))
        .await
        .unwrap()
    {
        let restarts: i32 = pod
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .map(|c| c.restart_count)
            .sum();
        assert_eq!(restarts, 0, "blue's pod {} restarted", pod.name_any());
    }
    let (status, reason, message) = condition(&sj, "Degraded").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "UpgradeFailed")
    );
    assert!(message.contains("never stopped"), "{message}");
    // Blue is the job that ran from the start: never stopped, never restarted.
    assert_eq!(job_id(&sj), first);
    assert_ne!(
        sj.status.as_ref().unwrap().live,
        Some(sjob::operator::crd::Color::Green)
    );
    let deployments: Api<Deployment> = Api::namespaced(env.cluster().client(), "default");
    let deadline = Instant::now() + Duration::from_secs(30);
    while deployments
        .get_opt("counting-engine-green")
        .await
        .unwrap()
        .is_some()
    {
        assert!(Instant::now() < deadline, "green was not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.finishes_exactly_once(&sink, keys, records, 120).await;
}

/// When a file sink's committed output grew: sampled every 50 ms on a thread of its own.
struct OutputWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Instant>>,
}

impl OutputWatch {
    fn start(sink: &Path) -> OutputWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (dir, flag) = (sink.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut grew = Vec::new();
            let mut last = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let bytes = committed_bytes(&dir);
                if bytes > last {
                    last = bytes;
                    grew.push(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            grew
        });
        OutputWatch { stop, thread }
    }

    fn finish(self) -> Vec<Instant> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The size of a file sink's committed part files.
fn committed_bytes(sink: &Path) -> u64 {
    std::fs::read_dir(sink)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("part-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The longest stretch within `from..to` in which the output did not grow.
fn longest_gap(grew: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut edges = vec![from];
    edges.extend(grew.iter().copied().filter(|t| *t > from && *t < to));
    edges.push(to);
    edges
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// The counting job with a checkpoint (so a commit of the file sink) every 500 ms.
fn counting_job_500ms(env: &Env, sink: &Path, records: i64, keys: i64, extra: Vec<Value>) -> Value {
    let mut job = counting_job(sink, records, keys, 15_000, extra);
    job["checkpoints"] = json!({"interval": "500ms", "dir": env.path("checkpoints")});
    job
}

fn live(sj: &StatefulJob) -> sjob::operator::crd::Color {
    sj.status.as_ref().and_then(|s| s.live).unwrap_or_default()
}

/// Switched: running, no upgrade in flight, the other color live.
fn switched_to(color: sjob::operator::crd::Color) -> impl Fn(&StatefulJob) -> bool {
    move |sj| {
        phase(sj) == Some(Phase::Running)
            && live(sj) == color
            && sj.status.as_ref().is_some_and(|s| s.upgrade.is_none())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_pauses_of_recreate_and_blue_green_and_a_manual_promotion() {
    use sjob::operator::crd::Color;
    let env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (900_000, 20);
    let spec = |extra: Vec<Value>, upgrade: Value| json!({"job": counting_job_500ms(&env, &sink, records, keys, extra), "upgrade": upgrade});
    let watch = OutputWatch::start(&sink);
    let sj = env
        .apply_running("counting", spec(vec![], json!({"strategy": "recreate"})))
        .await;
    let first = job_id(&sj);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Recreate: the old version stops, then the new one starts.
    let map =
        |n: i64| json!({"kind": "map", "set": [{"field": "n", "expr": format!("count * {n}")}]});
    let recreate_from = Instant::now();
    env.apply(
        "counting",
        spec(vec![map(2)], json!({"strategy": "recreate"})),
    )
    .await;
    let sj = env
        .wait("counting", "upgraded (recreate)", 90, upgraded_from(first))
        .await;
    let recreate_to = Instant::now() + Duration::from_secs(3);
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Blue-green with manual promotion: the new version catches up beside the live one and
    // waits for the nonce; the live one writes on meanwhile.
    let manual = |nonce: Option<i64>| {
        json!({"strategy": "blue-green",
               "blueGreen": {"promotion": "manual", "maxLag": 200_000, "promoteNonce": nonce}})
    };
    let second = job_id(&sj);
    let blue_green_from = Instant::now();
    env.apply("counting", spec(vec![map(3)], manual(None)))
        .await;
    env.wait("counting", "waiting for the promotion", 90, |sj| {
        condition(sj, "Progressing").is_some_and(|(_, _, m)| m.contains("promoteNonce"))
    })
    .await;
    let before = committed_bytes(&sink);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        committed_bytes(&sink) > before,
        "the live version writes on while the new one waits"
    );
    let sj = env.jobs().get("counting").await.unwrap();
    let st = sj.status.clone().unwrap();
    assert_eq!(job_id(&sj), second, "the live version was not stopped");
    assert_eq!(live(&sj), Color::Blue);
    let candidate = st.candidate.clone().expect("the candidate in the status");
    assert_eq!(candidate.color, Color::Green);
    assert!(
        candidate.job_id.is_some() && candidate.lag.is_some(),
        "{candidate:?}"
    );
    assert_eq!(
        st.upgrade.as_ref().map(|u| u.stage),
        Some(sjob::operator::crd::UpgradeStage::CatchingUp),
        "no switch before the nonce"
    );
    env.apply("counting", spec(vec![map(3)], manual(Some(1))))
        .await;
    let sj = env
        .wait(
            "counting",
            "switched to green",
            90,
            switched_to(Color::Green),
        )
        .await;
    assert_eq!(
        sj.status.as_ref().and_then(|s| s.observed_promote_nonce),
        Some(1)
    );
    let blue_green_to = Instant::now() + Duration::from_secs(3);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let grew = watch.finish();
    let recreate_gap = longest_gap(&grew, recreate_from, recreate_to);
    let blue_green_gap = longest_gap(&grew, blue_green_from, blue_green_to);
    // A figure, not a bound: on the process kubelet an engine pod starts in a fraction of a
    // second, on a real node scheduling and the image pull add to recreate's pause.
    println!(
        "longest pause in the committed output (checkpoints every 500 ms): recreate {:.2} s, blue-green {:.2} s",
        recreate_gap.as_secs_f64(),
        blue_green_gap.as_secs_f64()
    );
    env.finishes_exactly_once(&sink, keys, records, 120).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_in_each_blue_green_stage_finishes_the_switch_once() {
    use futures::StreamExt;
    use kube::runtime::watcher;
    use sjob::operator::crd::UpgradeStage;
    let mut env = Env::start().await;
    let sink = env.path("out");
    let (records, keys) = (1_200_000, 20);
    let spec = |n: i64| {
        let extra = if n == 0 {
            vec![]
        } else {
            vec![json!({"kind": "map", "set": [{"field": "n", "expr": format!("count * {n}")}]})]
        };
        json!({"job": counting_job(&sink, records, keys, 15_000, extra),
               "upgrade": {"strategy": "blue-green", "blueGreen": {"maxLag": 200_000}},
               "savepoints": {"retention": {"maxCount": 20}}})
    };
    env.apply_running("counting", spec(0)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stages = [
        UpgradeStage::Savepointing,
        UpgradeStage::Verifying,
        UpgradeStage::CatchingUp,
        UpgradeStage::Switching,
    ];
    for (n, stage) in stages.into_iter().enumerate() {
        let from = live(&env.jobs().get("counting").await.unwrap());
        let events = watcher(
            env.jobs(),
            watcher::Config::default().fields("metadata.name=counting"),
        );
        let mut events = std::pin::pin!(events);
        env.apply("counting", spec(n as i64 + 1)).await;
        // Every status write is an event: the operator is killed on the one that enters the
        // stage, before it acts on it.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = tokio::time::timeout(left, events.next())
                .await
                .unwrap_or_else(|_| panic!("stage {stage:?} not seen\n{}", env.operator_log()));
            if let Some(Ok(watcher::Event::Apply(sj) | watcher::Event::InitApply(sj))) = event
                && sj
                    .status
                    .as_ref()
                    .and_then(|s| s.upgrade.as_ref())
                    .map(|u| u.stage)
                    == Some(stage)
            {
                break;
            }
        }
        let killed = Instant::now();
        let last = env.operators.len() - 1;
        let _ = env.operators[last].kill();
        let _ = env.operators[last].wait();
        tokio::time::sleep(Duration::from_secs(1)).await;
        env.spawn_operator(&[]);
        let sj = env
            .wait(
                "counting",
                &format!("switched after a kill in {stage:?}"),
                90,
                switched_to(from.other()),
            )
            .await;
        let deployments: Api<Deployment> = Api::namespaced(env.cluster().client(), "default");
        let old = sjob::operator::resources::engine_name("counting", from);
        let deadline = Instant::now() + Duration::from_secs(30);
        while deployments.get_opt(&old).await.unwrap().is_some() {
            assert!(
                Instant::now() < deadline,
                "{old} not removed after {stage:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(sj.status.unwrap().candidate.is_none());
        println!(
            "killed in {stage:?}: switched to {} {:.1} s after the kill",
            from.other().as_str(),
            killed.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Each switch recorded the candidate's start and the live version's stop, once.
    let recorded = savepoint_objects(&env, "Upgrade").await;
    let names: Vec<String> = recorded.iter().map(|s| s.name_any()).collect();
    assert_eq!(
        recorded.len(),
        2 * stages.len(),
        "{names:?}\n{}",
        env.operator_log()
    );
    env.finishes_exactly_once(&sink, keys, records, 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_and_retention_with_savepoints_and_checkpoints_on_s3() {
    use k8s_openapi::api::core::v1::Secret;
    use sjob::local::s3_server::{S3Server, SECRET_KEY};
    let mut env = Env::without_operator().await;
    let s3 = S3Server::start(&env.path("s3-server"), &["bkt"]).unwrap_or_else(|e| panic!("{e}"));
    // The engines' credentials: a Secret in the job's namespace, taken as environment.
    let secrets: Api<Secret> = Api::namespaced(env.cluster().client(), "default");
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("s3-credentials".into()),
            ..Default::default()
        },
        data: Some(
            s3.env(SECRET_KEY)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    };
    secrets
        .create(&kube::api::PostParams::default(), &secret)
        .await
        .unwrap();
    env.operator_env = s3.env(SECRET_KEY);
    env.spawn_operator(&["--engine-storage-secret", "s3-credentials"]);

    let sink = env.path("out");
    let (records, keys) = (300_000, 20);
    let spec = |n: i64| {
        let extra = (0..n)
            .map(|i| json!({"kind": "map", "set": [{"field": format!("f{i}"), "expr": "count * 2"}]}))
            .collect();
        json!({"job": counting_job(&sink, records, keys, 10_000, extra),
               "savepoints": {"dir": "s3://bkt/sp", "retention": {"maxCount": 2}}})
    };
    let mut sj = env.apply_running("counting", spec(0)).await;
    for n in 1..=3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        env.apply("counting", spec(n)).await;
        sj = env
            .wait("counting", "upgraded", 90, upgraded_from(job_id(&sj)))
            .await;
        let restored = sj.status.as_ref().and_then(|s| s.restored_from.clone());
        assert!(
            restored
                .as_deref()
                .is_some_and(|r| r.starts_with("s3://bkt/sp/savepoint-")),
            "{restored:?}"
        );
    }
    // Retention: the Savepoint objects and the objects in the bucket agree, at most 2.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let objects = savepoint_objects(&env, "Upgrade").await;
        let mut recorded: Vec<String> = objects
            .iter()
            .filter_map(|s| s.status.as_ref().and_then(|s| s.path.clone()))
            .filter_map(|p| p.rsplit('/').next().map(str::to_owned))
            .collect();
        let mut in_bucket: Vec<String> = std::fs::read_dir(s3.bucket_dir("bkt").join("sp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("savepoint-"))
            .collect();
        recorded.sort();
        in_bucket.sort();
        if recorded.len() == 2 && recorded == in_bucket {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "recorded {recorded:?}, in the bucket {in_bucket:?}\n{}",
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Checkpoints went to the bucket too (next to the savepoints).
    assert!(s3.bucket_dir("bkt").join("sp/checkpoints").is_dir());
    env.finishes_exactly_once(&sink, keys, records, 90).await;
}

/// A StatefulJob that reads and writes Kafka (exactly-once sink, checkpoints every 500 ms) is
/// upgraded twice while records flow, through a savepoint (recreate) and then blue-green: a
/// read-committed consumer of the output sees every input's count exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_job_upgraded_while_records_flow_counts_each_record_once() {
    use sjob::local::kafka_server::KafkaBroker;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::start().await;
    let kafka = Arc::new(KafkaBroker::start(&env.path("kafka")).unwrap_or_else(|e| panic!("{e}")));
    kafka.create_topic("events", 4).unwrap();
    kafka.create_topic("counts", 2).unwrap();
    let keys = 17u64;
    let record = move |i: u64| {
        let k = format!("k{}", i % keys);
        (k.clone(), format!(r#"{{"key":"{k}","n":{i}}}"#))
    };
    kafka
        .produce("events", &(0..5000).map(record).collect::<Vec<_>>())
        .unwrap();
    let job = |extra: Vec<Value>| {
        let mut ops = vec![
            json!({"kind": "kafkaSource", "uid": "events", "bootstrapServers": kafka.bootstrap(),
                   "topics": ["events"]}),
            json!({"kind": "keyBy", "field": "key"}),
            json!({"kind": "count", "uid": "counter"}),
        ];
        ops.extend(extra);
        ops.push(
            json!({"kind": "kafkaSink", "uid": "out", "bootstrapServers": kafka.bootstrap(),
                        "topic": "counts", "keyField": "key", "deliveryGuarantee": "exactly-once"}),
        );
        json!({"job": {"name": "counting", "parallelism": 2,
                       "checkpoints": {"interval": "500ms", "dir": env.path("checkpoints")},
                       "operators": ops},
               "upgrade": {"strategy": "recreate"}})
    };
    let sj = env.apply_running("counting", job(vec![])).await;
    let first = job_id(&sj);

    // Records keep coming, about 2,000 a second, through both upgrades.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = std::thread::spawn({
        let (kafka, stop) = (kafka.clone(), stop.clone());
        move || {
            let mut next = 5000;
            while !stop.load(Ordering::SeqCst) {
                kafka.produce(
                    "events",
                    &(next..next + 100).map(record).collect::<Vec<_>>(),
                )?;
                next += 100;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok::<_, String>(next)
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let map = json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]});
    env.apply("counting", job(vec![map.clone()])).await;
    let sj = env
        .wait("counting", "upgraded", 120, upgraded_from(first))
        .await;
    let second = job_id(&sj);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut spec = job(vec![map]);
    spec["upgrade"] = json!({"strategy": "blue-green", "blueGreen": {"maxLag": 100_000}});
    spec["job"]["operators"][3]["set"][0]["expr"] = json!("count * 3");
    env.apply("counting", spec).await;
    let sj = env
        .wait("counting", "switched to green", 120, upgraded_from(second))
        .await;
    assert_eq!(
        sj.status.as_ref().and_then(|s| s.live),
        Some(sjob::operator::crd::Color::Green)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let total = writer.join().unwrap().unwrap();

    // Every input's count, once: per key 1, 2, …, n.
    let deadline = Instant::now() + Duration::from_secs(120);
    let out = loop {
        let out = tokio::task::block_in_place(|| kafka.read_committed("counts")).unwrap();
        if out.len() as u64 >= total || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut counts: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut tripled = 0;
    for (_, _, v) in &out {
        let v: Value = serde_json::from_str(v).unwrap();
        counts
            .entry(v["key"].as_str().unwrap().to_owned())
            .or_default()
            .push(v["count"].as_u64().unwrap());
        tripled += usize::from(v.get("doubled") == Some(&json!(v["count"].as_u64().unwrap() * 3)));
    }
    for k in 0..keys {
        let n = (0..total).filter(|i| i % keys == k).count() as u64;
        let mut have = counts.remove(&format!("k{k}")).unwrap_or_default();
        have.sort_unstable();
        assert!(
            have == (1..=n).collect::<Vec<_>>(),
            "key k{k}: want 1..={n} once each, have {} values, first {:?}, last {:?}",
            have.len(),
            &have[..have.len().min(5)],
            have.last()
        );
    }
    assert!(tripled > 0, "green's output is there");
    env.stop().await;
}

/// A StatefulJob whose Kafka brokers go away: `Degraded` says why (reason SourceUnavailable,
/// the source's own words) while the job keeps running, and clears when they are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_kafka_broker_shows_in_the_conditions_until_it_is_back() {
    use sjob::local::kafka_server::KafkaBroker;
    let env = Env::start().await;
    let mut kafka = KafkaBroker::start(&env.path("kafka")).unwrap_or_else(|e| panic!("{e}"));
    kafka.create_topic("events", 1).unwrap();
    let spec = json!({"job": {"name": "reading", "operators": [
        {"kind": "kafkaSource", "uid": "events", "bootstrapServers": kafka.bootstrap(),
         "topics": ["events"], "discoveryInterval": "500ms"},
        {"kind": "discardSink"}]}});
    env.apply_running("reading", spec).await;
    tokio::task::block_in_place(|| kafka.stop());
    let sj = env
        .wait("reading", "degraded", 90, |sj| {
            condition(sj, "Degraded")
                .is_some_and(|(on, reason, _)| on == "True" && reason == "SourceUnavailable")
        })
        .await;
    let (_, _, msg) = condition(&sj, "Degraded").unwrap();
    assert!(msg.contains("kafkaSource 'events'"), "{msg}");
    assert_eq!(phase(&sj), Some(Phase::Running));
    assert_eq!(condition(&sj, "Ready").unwrap().0, "True");
    tokio::task::block_in_place(|| kafka.restart()).unwrap();
    env.wait("reading", "healthy again", 90, |sj| {
        condition(sj, "Degraded").is_some_and(|(on, _, _)| on == "False")
    })
    .await;
    env.stop().await;
}
