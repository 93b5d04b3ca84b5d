//! The engine's REST API through the client, against real `sjob run` processes, and the same
//! scripted sequence against a real Apache Flink 2.3 session cluster (started by the test from
//! PyPI through e2e/flink/flink-local.sh; needs Java 17).

use sjob::operator::engine_client::{ClientError, EngineClient, SavepointStatus, SourcesInfo};
use sjob::savepoint::metadata::SplitPosition;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `sjob run` process, killed when dropped.
struct Engine {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Engine {
    fn start(dir: &Path, job: &Path, extra: &[&str]) -> Engine {
        let port = free_port();
        let log = dir.join(format!("engine-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_sjob"))
            .arg("run")
            .arg(job)
            .args(["--rest-port", &port.to_string(), "--savepoint-dir"])
            .arg(dir.join("default-savepoints"))
            .args(extra)
            .env_remove("MIMALLOC_ALLOW_THP")
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let engine = Engine { child, port, log };
        engine.wait_ready();
        engine
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "engine did not open its REST port; log:\n{}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "engine did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_job(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p
}

fn unbounded_count_job(out: &Path) -> String {
    format!(
        "name: rest-count\nparallelism: 2\noperators:\n  - {{kind: generator, uid: source, keys: 100, rate: 20000}}\n  - {{kind: keyBy, field: key}}\n  - {{kind: count, uid: counter}}\n  - {{kind: fileSink, uid: out, path: {}}}\n",
        out.display()
    )
}

/// An engine running an unbounded keyed count, a client for it, and its job id.
async fn start_count_engine(dir: &Path) -> (Engine, EngineClient, String) {
    let job = write_job(dir, "job.yaml", &unbounded_count_job(&dir.join("out")));
    let engine = Engine::start(dir, &job, &[]);
    let client = EngineClient::new(&engine.url());
    let id = only_job(&client).await;
    (engine, client, id)
}

async fn only_job(client: &EngineClient) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = client.list_jobs().await.unwrap();
        if let Some(j) = jobs.iter().find(|j| j.status == "RUNNING") {
            return j.id.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no running job at {}: {jobs:?}",
            client.base()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_state(client: &EngineClient, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.job(id).await {
            Ok(j) if j.state == want => return,
            Ok(j) => assert!(
                Instant::now() < deadline,
                "job {id} is {} not {want}",
                j.state
            ),
            // The engine process may be gone once its job has ended.
            Err(ClientError::Unreachable { .. }) if want != "RUNNING" => return,
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn local_path(location: &str) -> PathBuf {
    PathBuf::from(format!(
        "/{}",
        location.trim_start_matches("file:").trim_start_matches('/')
    ))
}

/// The scripted sequence an operator performs. `restart` starts the job again from a
/// savepoint and returns a client for it and the new job's id.
async fn conformance<F, Fut>(client: &EngineClient, sp_dir: &Path, restart: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = (EngineClient, String)>,
{
    let overview = client.overview().await.unwrap();
    assert!(overview["flink-version"].is_string(), "{overview}");
    assert!(
        overview["jobs-running"].as_u64().unwrap() >= 1,
        "{overview}"
    );
    let id = only_job(client).await;
    assert!(
        client
            .jobs_overview()
            .await
            .unwrap()
            .iter()
            .any(|j| j.jid == id && j.state == "RUNNING")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.all_tasks_running(&id).await.unwrap() {
        assert!(Instant::now() < deadline, "tasks of {id} not running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let details = client.job(&id).await.unwrap();
    assert_eq!(details.state, "RUNNING");
    assert!(details.vertices.iter().all(|v| v.parallelism >= 1) && !details.vertices.is_empty());

    // Savepoint, polled to completion.
    let trigger = client
        .trigger_savepoint(&id, Some(sp_dir.to_str().unwrap()), false)
        .await
        .unwrap();
    let sp = client
        .wait_savepoint(&id, &trigger, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(local_path(&sp).join("_metadata").is_file(), "{sp}");
    assert_eq!(
        client.savepoint_status(&id, &trigger).await.unwrap(),
        SavepointStatus::Completed(sp.clone())
    );

    // Asked again under the client's own trigger id (a caller whose answer was lost): the
    // same operation, one savepoint more on disk, not two.
    let chosen = "5a7e00000000000000000000000c0de1";
    let savepoints_on_disk = || {
        std::fs::read_dir(sp_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("savepoint-"))
            })
            .count()
    };
    let before = savepoints_on_disk();
    let target = Some(sp_dir.to_str().unwrap());
    for _ in 0..2 {
        let asked = client
            .trigger_savepoint_as(&id, target, false, Some(chosen))
            .await
            .unwrap();
        assert_eq!(asked, chosen);
    }
    let again = client
        .wait_savepoint(&id, chosen, Duration::from_secs(120))
        .await
        .unwrap();
    let asked = client
        .trigger_savepoint_as(&id, target, false, Some(chosen))
        .await
        .unwrap();
    assert_eq!(asked, chosen, "asked once more after it completed");
    assert_eq!(
        client.savepoint_status(&id, chosen).await.unwrap(),
        SavepointStatus::Completed(again.clone())
    );
    assert_eq!(savepoints_on_disk(), before + 1, "{again}");

    // Unknown ids are told apart.
    let unknown = "0123456789abcdef0123456789abcdef";
    assert!(matches!(
        client.job(unknown).await,
        Err(ClientError::NotFound { .. })
    ));
    assert!(matches!(
        client.savepoint_status(&id, "f00").await,
        Err(ClientError::NotFound { .. }) | Err(ClientError::Api { .. })
    ));

    // Stop with a savepoint; the job finishes.
    let trigger = client
        .stop_with_savepoint(&id, Some(sp_dir.to_str().unwrap()), false)
        .await
        .unwrap();
    let stopped = client
        .wait_savepoint(&id, &trigger, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(
        local_path(&stopped).join("_metadata").is_file(),
        "{stopped}"
    );
    wait_state(client, &id, "FINISHED").await;

    // Start from it; it says where it restored from; cancel it.
    let (client2, id2) = restart(stopped.clone()).await;
    wait_state(&client2, &id2, "RUNNING").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while client2
        .checkpoints(&id2)
        .await
        .unwrap()
        .restored_from
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "job {id2} does not report a restore"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let info = client2.checkpoints(&id2).await.unwrap();
    let restored = info.restored_from.expect("restored-from reported");
    assert_eq!(local_path(&restored), local_path(&stopped));
    client2.cancel(&id2).await.unwrap();
    wait_state(&client2, &id2, "CANCELED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_sjob() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(
        dir.path(),
        "job.yaml",
        &unbounded_count_job(&dir.path().join("out")),
    );
    let mut first = Engine::start(dir.path(), &job, &[]);
    let client = EngineClient::new(&first.url());
    let d = dir.path().to_owned();
    let job2 = job.clone();
    let holder = std::sync::Arc::new(std::sync::Mutex::new(None));
    let h = holder.clone();
    conformance(&client, &dir.path().join("sp"), move |sp| async move {
        let engine = Engine::start(&d, &job2, &["-s", &sp]);
        let c = EngineClient::new(&engine.url());
        let id = only_job(&c).await;
        *h.lock().unwrap() = Some(engine);
        (c, id)
    })
    .await;
    assert!(first.wait_exit(Duration::from_secs(30)).success());
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_flinks_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _, id) = start_count_engine(dir.path()).await;
    let http = http_client();
    let cases = [
        (
            reqwest::Method::GET,
            "/jobs/0123456789abcdef0123456789abcdef".to_owned(),
            None,
            404,
        ),
        (
            reqwest::Method::GET,
            "/jobs/not-a-job".to_owned(),
            None,
            400,
        ),
        (
            reqwest::Method::GET,
            format!("/jobs/{id}/savepoints/nope"),
            None,
            404,
        ),
        (
            reqwest::Method::POST,
            format!("/jobs/{id}/savepoints"),
            Some("{not json"),
            400,
        ),
        (
            reqwest::Method::POST,
            format!("/jobs/{id}/stop"),
            Some("{\"drain\": \"yes\"}"),
            400,
        ),
        (reqwest::Method::GET, "/no/such/route".to_owned(), None, 404),
    ];
    for (method, path, body, status) in cases {
        let mut req = http.request(method.clone(), format!("{}{path}", engine.url()));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert!(
            v["errors"].as_array().is_some_and(|e| !e.is_empty()),
            "{method} {path}: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_savepoint_leaves_the_job_running() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, client, id) = start_count_engine(dir.path()).await;
    for stop in [false, true] {
        let trigger = if stop {
            client
                .stop_with_savepoint(&id, Some("/proc/sjob-not-writable"), false)
                .await
                .unwrap()
        } else {
            client
                .trigger_savepoint(&id, Some("/proc/sjob-not-writable"), false)
                .await
                .unwrap()
        };
        let err = client
            .wait_savepoint(&id, &trigger, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("/proc/sjob-not-writable"),
            "the cause names the target: {err}"
        );
        assert!(!Path::new("/proc/sjob-not-writable").exists());
        let before = client.job(&id).await.unwrap();
        assert_eq!(before.state, "RUNNING");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = client.job(&id).await.unwrap();
        let total = |j: &sjob::operator::engine_client::JobDetails| {
            j.vertices.iter().map(|v| v.read_records).sum::<u64>()
        };
        assert!(
            total(&after) > total(&before),
            "records keep flowing after the failed savepoint"
        );
    }
    let info = client.checkpoints(&id).await.unwrap();
    assert_eq!(info.failed, 2);
    // A later savepoint to a good target succeeds; one with no target uses the default dir.
    let trigger = client.trigger_savepoint(&id, None, false).await.unwrap();
    let sp = client
        .wait_savepoint(&id, &trigger, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        sp.starts_with(dir.path().join("default-savepoints").to_str().unwrap()),
        "{sp}"
    );
    assert!(Path::new(&sp).join("_metadata").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, client, id) = start_count_engine(dir.path()).await;
    let t = client.trigger_savepoint(&id, None, false).await.unwrap();
    client
        .wait_savepoint(&id, &t, Duration::from_secs(60))
        .await
        .unwrap();
    let text = reqwest::get(format!("{}/metrics", engine.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "sjob_operator_records_in_total{",
        "sjob_snapshots_completed_total{",
        "sjob_last_savepoint_size_bytes{",
        "sjob_job_state{",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}: install it with `apt-get install prometheus` (or run `bash .ci/run`, which does)")
        });
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn crash_recovery_resumes_from_the_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (count, keys) = (60_000u64, 37u64);
    let yaml = format!(
        "name: crashy\nparallelism: 2\ncheckpoints: {{interval: 200ms, dir: {}, retained: 2}}\noperators:\n  - {{kind: generator, uid: source, keys: {keys}, count: {count}, rate: 15000}}\n  - {{kind: keyBy, field: key}}\n  - {{kind: count, uid: counter}}\n  - {{kind: fileSink, uid: out, path: {}}}\n",
        dir.path().join("chk").display(),
        out.display()
    );
    let job = write_job(dir.path(), "job.yaml", &yaml);
    let job_id = "00000000000000000000000000c0ffee";
    let args = ["--job-id", job_id];
    let mut first = Engine::start(dir.path(), &job, &args);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = EngineClient::new(&first.url());
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.checkpoints(job_id).await.unwrap().completed < 3 {
            assert!(Instant::now() < deadline, "no checkpoints");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // kill -9, mid-run.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let kept: Vec<_> = std::fs::read_dir(dir.path().join("chk").join(job_id))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        kept.len() <= 3,
        "old checkpoints are deleted (2 retained, one may be in progress)"
    );

    let mut second = Engine::start(dir.path(), &job, &args);
    assert!(
        second.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        second.log_text()
    );
    let log = second.log_text();
    assert!(log.contains("resuming from the newest checkpoint"), "{log}");

    // Exactly once: each key's counts 1..=n once each.
    let mut per_key: std::collections::BTreeMap<i64, Vec<u64>> = Default::default();
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        if !e.path().is_file() {
            continue;
        }
        for l in std::fs::read_to_string(e.path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            per_key
                .entry(v["key"].as_i64().unwrap())
                .or_default()
                .push(v["count"].as_u64().unwrap());
        }
    }
    for k in 0..keys {
        let n = (0..count).filter(|i| i % keys == k).count() as u64;
        let mut have = per_key.remove(&(k as i64)).unwrap_or_default();
        have.sort_unstable();
        assert_eq!(have, (1..=n).collect::<Vec<_>>(), "key {k}");
    }
}

/// A Flink session cluster for the conformance test, started once through the ported script.
fn flink_cluster() -> (String, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/flink/flink-local.sh");
    let home = std::env::var("FLINK_HOME").unwrap_or_else(|_| "/tmp/sjob-flink".into());
    let port = std::env::var("FLINK_REST_PORT").unwrap_or_else(|_| free_port().to_string());
    let run = |cmd: &str| {
        let out = Command::new("bash")
            .arg(&script)
            .arg(cmd)
            .env("FLINK_HOME", &home)
            .env("FLINK_REST_PORT", &port)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "flink-local.sh {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned()
    };
    run("start");
    let jar = run("job");
    (format!("http://127.0.0.1:{port}"), PathBuf::from(jar))
}

fn stop_flink() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/flink/flink-local.sh");
    let home = std::env::var("FLINK_HOME").unwrap_or_else(|_| "/tmp/sjob-flink".into());
    let _ = Command::new("bash")
        .arg(&script)
        .arg("stop")
        .env("FLINK_HOME", &home)
        .output();
}

async fn flink_run(
    http: &reqwest::Client,
    url: &str,
    jar: &Path,
    savepoint: Option<&str>,
) -> String {
    let form = reqwest::multipart::Form::new().part(
        "jarfile",
        reqwest::multipart::Part::bytes(std::fs::read(jar).unwrap())
            .file_name("count.jar")
            .mime_str("application/x-java-archive")
            .unwrap(),
    );
    let up: serde_json::Value = http
        .post(format!("{url}/jars/upload"))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jar_id = up["filename"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let mut body = serde_json::json!({"entryClass": "demo.CountJob", "programArgsList": ["--keys", "1000"], "parallelism": 2});
    if let Some(sp) = savepoint {
        body["savepointPath"] = serde_json::json!(sp);
    }
    let run: serde_json::Value = http
        .post(format!("{url}/jars/{jar_id}/run"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    run["jobid"]
        .as_str()
        .unwrap_or_else(|| panic!("run failed: {run}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_flink() {
    let (url, jar) = tokio::task::spawn_blocking(flink_cluster).await.unwrap();
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            stop_flink();
        }
    }
    let _stop = Stop;
    let http = http_client();
    let client = EngineClient::new(&url);
    for j in client
        .list_jobs()
        .await
        .unwrap()
        .iter()
        .filter(|j| j.status == "RUNNING")
    {
        client.cancel(&j.id).await.unwrap();
    }
    let first = flink_run(&http, &url, &jar, None).await;
    wait_state(&client, &first, "RUNNING").await;
    let dir = tempfile::tempdir().unwrap();
    let url2 = url.clone();
    conformance(&client, dir.path(), move |sp| async move {
        let http = http_client();
        let id = flink_run(&http, &url2, &jar, Some(&sp)).await;
        (EngineClient::new(&url2), id)
    })
    .await;
}

/// An engine pod's process (`--keep-running`) that is told to stop exits at once, even with a
/// savepoint outcome nobody read: it must not hold a Recreate rollout for its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_running_engine_exits_on_sigterm_with_unread_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(
        dir.path(),
        "job.yaml",
        &unbounded_count_job(&dir.path().join("out")),
    );
    let mut engine = Engine::start(dir.path(), &job, &["--keep-running", "--linger", "60"]);
    let client = EngineClient::new(&engine.url());
    let id = only_job(&client).await;
    client.stop_with_savepoint(&id, None, false).await.unwrap();
    wait_state(&client, &id, "FINISHED").await;
    // A savepoint of the ended job fails; its outcome is left unread.
    let _ = client.trigger_savepoint(&id, None, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        engine.child.try_wait().unwrap().is_none(),
        "serves REST after the job ended"
    );
    let pid = engine.child.id() as i32;
    // A snapshot turns transparent huge pages off while it is taken; once it is done they
    // are on again (the kernel reports the process's flag).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["THP_enabled:", "1"])),
        "THP_enabled of the engine process:\n{status}"
    );
    // SAFETY: kill(2) on our own child process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    // Well under the 60 s it would linger for an unread outcome.
    engine.wait_exit(Duration::from_secs(15));
}

/// `sjob` with its arguments; (exit code, stdout, stderr).
fn sjob(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sjob"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_down_engine_takes_savepoints_only_under_its_roots_and_only_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = d.join("default-savepoints");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    std::os::unix::fs::symlink(d.join("elsewhere"), root.join("escape")).unwrap();
    let token_file = d.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let job = write_job(d, "job.yaml", &unbounded_count_job(&d.join("out")));

    // Refused before the job starts: a relative root, a default directory outside the roots,
    // an empty token file (with -d as well).
    let job_arg = job.to_str().unwrap();
    let root_arg = root.to_str().unwrap();
    let empty = d.join("empty");
    std::fs::write(&empty, "").unwrap();
    for (extra, names) in [
        (vec!["--savepoint-root", "relative"], "--savepoint-root"),
        (
            vec!["--savepoint-root", root_arg, "--savepoint-dir", "/tmp"],
            "--savepoint-dir",
        ),
        (
            vec!["--rest-token-file", empty.to_str().unwrap()],
            "is empty",
        ),
    ] {
        for detached in [false, true] {
            let mut args = vec!["run", job_arg, "--rest-port", "0"];
            args.extend(&extra);
            if detached {
                args.push("-d");
            }
            let (code, _, err) = sjob(&args);
            assert_eq!(code, 1, "{args:?}: {err}");
            assert!(err.contains(names), "{args:?}: {err}");
        }
    }

    let engine = Engine::start(
        d,
        &job,
        &[
            "--savepoint-root",
            root_arg,
            "--rest-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let url = engine.url();
    let http = http_client();
    // Open: health, readiness, metrics and the overview (what probes and scrapers read).
    for path in ["/healthz", "/overview", "/metrics", "/config"] {
        let r = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    // Everything about the job needs the token.
    let anonymous = EngineClient::new(&url);
    let e = anonymous.list_jobs().await.unwrap_err().to_string();
    assert!(e.contains("401") && e.contains("bearer token"), "{e}");
    for (method, path) in [
        (reqwest::Method::GET, "/jobs/overview"),
        (
            reqwest::Method::POST,
            "/jobs/0123456789abcdef0123456789abcdef/stop",
        ),
        (
            reqwest::Method::PATCH,
            "/jobs/0123456789abcdef0123456789abcdef",
        ),
    ] {
        for auth in [None, Some("Bearer wrong"), Some("s3cret-token")] {
            let mut req = http.request(method.clone(), format!("{url}{path}"));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status().as_u16(), 401, "{method} {path} {auth:?}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            let v: serde_json::Value = r.json().await.unwrap();
            assert!(
                v["errors"][0].as_str().unwrap().starts_with("Unauthorized"),
                "{v}"
            );
        }
    }
    let token = sjob::engine::access::RestToken::from_file(&token_file).unwrap();
    let client = EngineClient::new(&url).with_token(token);
    let id = only_job(&client).await;

    // Targets outside the roots are refused with the reason; the job keeps running.
    let outside = [
        d.join("elsewhere").display().to_string(),
        format!("{}/../elsewhere", root.display()),
        format!("{}/escape/sp", root.display()),
        format!("file://{}/elsewhere", d.display()),
        "relative".to_owned(),
    ];
    for target in &outside {
        let e = client
            .trigger_savepoint(&id, Some(target), false)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("403") && e.contains(target.as_str()),
            "{target}: {e}"
        );
        let e = client
            .stop_with_savepoint(&id, Some(target), false)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("403") && e.contains("savepoint roots"),
            "{target}: {e}"
        );
    }
    assert_eq!(client.job(&id).await.unwrap().state, "RUNNING");
    assert_eq!(std::fs::read_dir(d.join("elsewhere")).unwrap().count(), 0);

    // Inside the roots, with the token: through the client and through the CLI.
    let inside = root.join("by-client");
    let trigger = client
        .trigger_savepoint(&id, Some(inside.to_str().unwrap()), false)
        .await
        .unwrap();
    let location = client
        .wait_savepoint(&id, &trigger, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(local_path(&location).starts_with(&inside), "{location}");
    let (code, out, err) = sjob(&["savepoint", &id, "--url", &url]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("bearer token"), "{err}");
    let (code, out, err) = sjob(&[
        "savepoint",
        &id,
        "--url",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(root_arg), "{out}");
    let (code, _, err) = sjob(&[
        "savepoint",
        &id,
        "/etc",
        "--url",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("'/etc' is outside"), "{err}");
    drop(engine);
}

/// Polls until every source of the job holds (at its bound, or out of input).
async fn wait_holding(client: &EngineClient, id: &str) -> SourcesInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = client.sources(id).await.unwrap();
        assert!(
            !s.settled || s.overrun.is_empty(),
            "{}: overrun {:?}",
            client.base(),
            s.overrun
        );
        if s.holding {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} never held: {s:?}",
            client.base()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Per split, the larger of two positions.
fn furthest(a: &[SplitPosition], b: &[SplitPosition]) -> Vec<SplitPosition> {
    let mut at: std::collections::BTreeMap<String, i64> =
        a.iter().map(|p| (p.split.clone(), p.position)).collect();
    for p in b {
        let e = at.entry(p.split.clone()).or_insert(p.position);
        *e = (*e).max(p.position);
    }
    at.into_iter()
        .map(|(split, position)| SplitPosition { split, position })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_over_between_two_versions_writes_every_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sink = d.join("out");
    let (keys, records) = (50, 600_000);
    let job = |extra: &str| {
        format!(
            "name: counting\nparallelism: 2\noperators:\n  - {{kind: generator, uid: source, keys: {keys}, count: {records}, rate: 30000}}\n  - {{kind: keyBy, field: key}}\n  - {{kind: count, uid: counter}}\n{extra}  - {{kind: fileSink, uid: out, path: {}}}\n",
            sink.display()
        )
    };
    // Blue runs; a savepoint is taken without stopping it; green starts from it in shadow
    // mode, beside blue, on the same sink directory.
    let blue_job = write_job(d, "blue.yaml", &job(""));
    let blue = Engine::start(d, &blue_job, &[]);
    let blue_client = EngineClient::new(&blue.url());
    let blue_id = only_job(&blue_client).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let trigger = blue_client
        .trigger_savepoint(&blue_id, None, false)
        .await
        .unwrap();
    let savepoint = blue_client
        .wait_savepoint(&blue_id, &trigger, Duration::from_secs(60))
        .await
        .unwrap();
    let green_job = write_job(
        d,
        "green.yaml",
        &job("  - {kind: map, set: [{field: doubled, expr: \"count * 2\"}]}\n"),
    );
    let green = Engine::start(d, &green_job, &["-s", &savepoint, "--shadow"]);
    let green_client = EngineClient::new(&green.url());
    let green_id = only_job(&green_client).await;
    assert!(green_client.sources(&green_id).await.unwrap().shadow);
    // Blue is not in shadow mode: it has nothing to cut over.
    let e = blue_client
        .release_sources(&blue_id, true)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("409") && e.contains("shadow"), "{e}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The switch: both hold; the cut-over is the furthest of their positions; both read up
    // to it and hold there; blue stops with a savepoint there; green goes on from it, live.
    let switch = Instant::now();
    blue_client.hold_sources(&blue_id, None).await.unwrap();
    green_client.hold_sources(&green_id, None).await.unwrap();
    let at_blue = wait_holding(&blue_client, &blue_id).await;
    let at_green = wait_holding(&green_client, &green_id).await;
    let cut = furthest(&at_blue.positions, &at_green.positions);
    // A bound behind a source is refused for the splits it has passed.
    let behind: Vec<SplitPosition> = cut
        .iter()
        .map(|p| SplitPosition {
            split: p.split.clone(),
            position: 0,
        })
        .collect();
    blue_client
        .hold_sources(&blue_id, Some(&behind))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let s = blue_client.sources(&blue_id).await.unwrap();
        if s.settled {
            break s;
        }
        assert!(Instant::now() < deadline, "never settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(refused.overrun.len(), cut.len(), "{refused:?}");
    blue_client
        .hold_sources(&blue_id, Some(&cut))
        .await
        .unwrap();
    green_client
        .hold_sources(&green_id, Some(&cut))
        .await
        .unwrap();
    assert_eq!(wait_holding(&blue_client, &blue_id).await.positions, cut);
    assert_eq!(wait_holding(&green_client, &green_id).await.positions, cut);
    let stop = blue_client
        .stop_with_savepoint(&blue_id, None, false)
        .await
        .unwrap();
    let final_savepoint = blue_client
        .wait_savepoint(&blue_id, &stop, Duration::from_secs(60))
        .await
        .unwrap();
    green_client.release_sources(&green_id, true).await.unwrap();
    let switched = switch.elapsed();
    assert!(!green_client.sources(&green_id).await.unwrap().shadow);
    let meta = sjob::savepoint::metadata::SnapshotMetadata::read(
        &sjob::savepoint::store::Store::open(&final_savepoint).unwrap(),
    )
    .unwrap();
    let stopped_at: Vec<SplitPosition> = meta
        .operators
        .iter()
        .flat_map(|o| o.source_positions.clone())
        .collect();
    let mut stopped_at = stopped_at;
    stopped_at.sort_by(|a, b| a.split.cmp(&b.split));
    assert_eq!(stopped_at, cut, "blue stopped exactly at the cut-over");

    wait_state(&green_client, &green_id, "FINISHED").await;
    let log = sjob::local::sink_check::CountLog::read(&sink).unwrap();
    let problems = log.exactly_once(keys, records as i64 / keys as i64);
    assert!(problems.is_empty(), "{problems:?}");
    // Both versions wrote: blue up to the cut-over, green (with its new field) after it.
    let files: Vec<String> = std::fs::read_dir(&sink)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(files.iter().any(|f| f.contains("doubled")));
    assert!(
        files
            .iter()
            .any(|f| !f.is_empty() && !f.contains("doubled"))
    );
    println!("cut-over at {cut:?}, switch took {switched:?}");
    drop((blue, green));
}

fn http_client() -> reqwest::Client {
    sjob::install_tls_provider();
    reqwest::Client::new()
}

/// Runs `flink-local.sh` with `args` (Flink from PyPI, installed once); (exit code, stdout and
/// stderr together).
fn flink_local(args: &[&str]) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/flink/flink-local.sh");
    let home = std::env::var("FLINK_HOME").unwrap_or_else(|_| "/tmp/sjob-flink".into());
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("FLINK_HOME", &home)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Flink 2.3's own `flink` command line against an engine; (exit code, its output).
fn flink_cli(engine: &Engine, args: &[&str]) -> (i32, String) {
    let address = format!("127.0.0.1:{}", engine.port);
    let (verb, rest) = args.split_first().unwrap();
    let mut full = vec!["cli", verb, "-m", &address];
    full.extend_from_slice(rest);
    flink_local(&full)
}

/// An engine that keeps serving after its job ends (as in a pod), running a keyed count
/// with checkpoints every second.
async fn kept_count_engine(dir: &Path) -> (Engine, EngineClient, String) {
    let job = format!(
        "{}checkpoints: {{interval: 1s, dir: {}}}\n",
        unbounded_count_job(&dir.join("out")),
        dir.join("chk").display()
    );
    let engine = Engine::start(dir, &write_job(dir, "job.yaml", &job), &["--keep-running"]);
    let client = EngineClient::new(&engine.url());
    let id = only_job(&client).await;
    wait_state(&client, &id, "RUNNING").await;
    (engine, client, id)
}

/// The path in "Savepoint completed. Path: file:/..." of Flink's CLI.
fn completed_path(out: &str) -> PathBuf {
    let uri = out
        .lines()
        .find_map(|l| l.strip_prefix("Savepoint completed. Path: "))
        .unwrap_or_else(|| panic!("no savepoint path in:\n{out}"));
    assert!(uri.starts_with("file:/"), "{uri}");
    local_path(uri)
}

fn assert_flink_error(code: i32, out: &str, needle: &str) {
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("The program finished with the following exception") && out.contains(needle),
        "expected Flink's error output with {needle:?}:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flinks_own_cli_lists_takes_disposes_stops_and_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (engine, client, id) = kept_count_engine(d).await;
    let flink = |args: &[&str]| flink_cli(&engine, args);

    let (code, out) = flink(&["list", "-r"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Running/Restarting Jobs"), "{out}");
    assert!(
        out.contains(&format!(": {id} : rest-count (RUNNING)")),
        "{out}"
    );
    let (code, out) = flink(&["list", "-a"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{id} : rest-count (RUNNING)")),
        "{out}"
    );

    // A savepoint, in the directory named, reported as a file: URI; then disposed of.
    let sp_dir = d.join("sp");
    let (code, out) = flink(&["savepoint", &id, sp_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let sp = completed_path(&out);
    assert!(
        sp.starts_with(&sp_dir) && sp.join("_metadata").is_file(),
        "{out}"
    );
    let uri = format!("file:{}", sp.display());
    let (code, out) = flink(&["savepoint", "-d", &uri]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("Savepoint '{uri}' disposed.")),
        "{out}"
    );
    assert!(!sp.exists(), "disposed savepoint still on disk");

    // Errors: a target that cannot be written, an unknown job, a path that is no savepoint.
    std::fs::write(d.join("a-file"), "x").unwrap();
    let unwritable = d.join("a-file/sp");
    let (code, out) = flink(&["savepoint", &id, unwritable.to_str().unwrap()]);
    assert_flink_error(code, &out, "CheckpointException");
    assert!(out.contains("a-file/sp"), "{out}");
    let unknown = "0123456789abcdef0123456789abcdef";
    let (code, out) = flink(&["savepoint", unknown, sp_dir.to_str().unwrap()]);
    assert_flink_error(code, &out, &format!("Job {unknown} not found"));
    let (code, out) = flink(&["savepoint", "-d", d.join("out").to_str().unwrap()]);
    assert_flink_error(code, &out, "Could not dispose savepoint");

    // Stop with a savepoint: the job finishes, its end listed with the terminated jobs.
    let (code, out) = flink(&["stop", "-p", sp_dir.to_str().unwrap(), &id]);
    assert_eq!(code, 0, "{out}");
    let last = completed_path(&out);
    assert!(last.join("_metadata").is_file(), "{out}");
    wait_state(&client, &id, "FINISHED").await;
    let (code, out) = flink(&["list", "-a"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Terminated Jobs") && out.contains(&format!("{id} : rest-count (FINISHED)")),
        "{out}"
    );
    let (code, out) = flink(&["cancel", &id]);
    assert_flink_error(
        code,
        &out,
        "already reached another terminal state (FINISHED)",
    );
    drop(engine);

    // Stop with drain, and cancel, each on an engine of its own.
    let d2 = d.join("drained");
    std::fs::create_dir_all(&d2).unwrap();
    let (engine, client, id) = kept_count_engine(&d2).await;
    let (code, out) = flink_cli(
        &engine,
        &["stop", "-d", "-p", sp_dir.to_str().unwrap(), &id],
    );
    assert_eq!(code, 0, "{out}");
    assert!(completed_path(&out).join("_metadata").is_file());
    wait_state(&client, &id, "FINISHED").await;
    drop(engine);
    let d3 = d.join("cancelled");
    std::fs::create_dir_all(&d3).unwrap();
    let (engine, client, id) = kept_count_engine(&d3).await;
    let (code, out) = flink_cli(&engine, &["cancel", &id]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("Cancelled job {id}.")), "{out}");
    wait_state(&client, &id, "CANCELED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flinks_rest_cluster_client_reads_every_response_and_drives_savepoints() {
    let (code, classpath) = flink_local(&["clients"]);
    assert_eq!(code, 0, "{classpath}");
    let classpath = classpath.trim().lines().last().unwrap().to_owned();
    let java = |args: &[&str]| {
        let out = Command::new("java")
            .args(["-cp", &classpath, "demo.FlinkClients"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "FlinkClients {args:?}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (engine, client, id) = kept_count_engine(d).await;
    let port = engine.port.to_string();
    // A checkpoint and a savepoint first, so that the statistics have entries to read.
    let sp = client
        .trigger_savepoint(&id, Some(d.join("sp").to_str().unwrap()), false)
        .await
        .unwrap();
    client
        .wait_savepoint(&id, &sp, Duration::from_secs(30))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .checkpoints(&id)
        .await
        .unwrap()
        .latest_completed
        .is_none()
    {
        assert!(Instant::now() < deadline, "no checkpoint in 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let out = java(&["read", "127.0.0.1", &port, &id]);
    for line in [
        format!("ok listJobs {id} rest-count RUNNING"),
        "ok getJobStatus RUNNING".to_owned(),
        "ok getJobDetails rest-count RUNNING vertices=4".to_owned(),
        "ok /overview ClusterOverviewWithVersion".to_owned(),
        "ok /config DashboardConfiguration".to_owned(),
        "ok /jobs JobIdsWithStatusOverview".to_owned(),
        "ok /jobs/overview MultipleJobsDetails".to_owned(),
        "ok /jobs/:id JobDetailsInfo".to_owned(),
        "ok /jobs/:id/status JobStatusInfo".to_owned(),
        "ok /jobs/:id/plan JobPlanInfo".to_owned(),
        "ok /jobs/:id/exceptions JobExceptionsInfoWithHistory".to_owned(),
        "ok /jobs/:id/checkpoints CheckpointingStatistics".to_owned(),
        "ok /jobs/:id/checkpoints/config CheckpointConfigInfo".to_owned(),
        // A source has no input watermark, as in Flink.
        "ok watermarks generator".to_owned(),
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
    }
    // The counter's two subtasks, each with the generator's event time (ts = index).
    let counter = out
        .lines()
        .find_map(|l| l.strip_prefix("ok watermarks count "))
        .unwrap_or_else(|| panic!("no watermarks of the counter in:\n{out}"));
    let marks: Vec<(&str, i64)> = counter
        .split(' ')
        .map(|m| {
            let (id, v) = m.split_once('=').unwrap();
            (id, v.parse().unwrap())
        })
        .collect();
    assert_eq!(
        marks.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        ["0.currentInputWatermark", "1.currentInputWatermark"],
        "{out}"
    );
    assert!(marks.iter().all(|(_, w)| *w > 0), "{out}");

    std::fs::write(d.join("a-file"), "x").unwrap();
    let sp_dir = d.join("sp2");
    let out = java(&[
        "lifecycle",
        "127.0.0.1",
        &port,
        &id,
        sp_dir.to_str().unwrap(),
        d.join("a-file/sp").to_str().unwrap(),
    ]);
    let taken = out
        .lines()
        .find_map(|l| l.strip_prefix("ok triggerSavepoint file:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        !Path::new(taken).exists(),
        "disposed savepoint still there:\n{out}"
    );
    assert!(out.contains("ok disposeSavepoint"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok triggerSavepoint refused") && l.contains("a-file/sp")),
        "{out}"
    );
    let stopped = out
        .lines()
        .find_map(|l| l.strip_prefix("ok stopWithSavepoint file:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(Path::new(stopped).join("_metadata").is_file(), "{out}");
    assert!(out.contains("ok getJobStatus FINISHED"), "{out}");
    drop(engine);

    let d2 = d.join("cancelled");
    std::fs::create_dir_all(&d2).unwrap();
    let (engine, _client, id) = kept_count_engine(&d2).await;
    let out = java(&["cancel", "127.0.0.1", &engine.port.to_string(), &id]);
    assert!(
        out.contains("ok cancel") && out.contains("ok getJobStatus CANCELED"),
        "{out}"
    );
}

/// Paths only a Flink cluster has answer in Flink's error shape, saying what to use instead;
/// every path is also served under /v1, as Flink's clients call it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flink_only_paths_say_what_to_use_and_v1_paths_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _client, id) = start_count_engine(dir.path()).await;
    let http = http_client();
    let url = engine.url();
    for (method, path, status, needle) in [
        ("GET", "/v1/jars".to_owned(), 501, "sjob run"),
        ("POST", "/jars/upload".to_owned(), 501, "sjob run"),
        ("POST", "/v1/jobs".to_owned(), 501, "sjob run"),
        (
            "GET",
            "/v1/taskmanagers/tm-1/log".to_owned(),
            501,
            "standard error",
        ),
        ("GET", "/jobmanager/logs".to_owned(), 501, "standard error"),
        (
            "PATCH",
            format!("/v1/jobs/{id}/rescaling?parallelism=3"),
            400,
            "spec.parallelism",
        ),
        (
            "GET",
            format!("/jobs/{id}/vertices/0123456789abcdef0123456789abcdef/watermarks"),
            404,
            "No vertex with ID '0123456789abcdef0123456789abcdef' exists.",
        ),
    ] {
        let resp = http
            .request(method.parse().unwrap(), format!("{url}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        let body: serde_json::Value = resp.json().await.unwrap();
        let msg = body["errors"][0].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{method} {path}: {body}");
    }
    for path in ["/v1/jobs/overview", "/jobs/overview", "/v1/overview"] {
        let resp = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
    }
    let resp = http.get(format!("{url}/v1/nothing")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

/// A TCP proxy to `target` that passes each request on but never passes an answer back: once
/// the engine starts answering, it closes the client's connection (an answer lost on the way).
async fn answer_dropping_proxy(target: u16) -> u16 {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(engine) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let (mut from_client, to_client) = client.into_split();
                let (mut from_engine, mut to_engine) = engine.into_split();
                let forward = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_engine).await;
                });
                let mut first = [0u8; 1];
                let _ = from_engine.read(&mut first).await;
                // Both halves of the client's socket dropped: closed, unanswered.
                forward.abort();
                drop(to_client);
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_savepoint_whose_answer_is_lost_is_found_by_its_trigger_id() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, client, id) = kept_count_engine(dir.path()).await;
    let proxy = answer_dropping_proxy(engine.port).await;
    let lossy = EngineClient::with_timeout(
        &format!("http://127.0.0.1:{proxy}"),
        Duration::from_secs(10),
    );
    let planned = "5e1f0c3a9b7d4e2f8a6c1b0d3e5f7a9c";
    let sp_dir = dir.path().join("savepoints");
    let err = lossy
        .stop_with_savepoint_as(&id, sp_dir.to_str(), false, Some(planned))
        .await
        .unwrap_err();
    // The request arrived (the engine answered, the answer was lost): not a refused
    // connection, so the operator keeps the id and asks about it instead of failing it.
    assert!(err.maybe_received(), "{err}");
    let path = client
        .wait_savepoint(&id, planned, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(Path::new(&path).join("_metadata").is_file(), "{path}");
    assert!(path.starts_with(sp_dir.to_str().unwrap()), "{path}");
    wait_state(&client, &id, "FINISHED").await;
    // A refused connection cannot have reached the engine.
    let closed = EngineClient::new(&format!("http://127.0.0.1:{}", free_port()));
    let err = closed
        .stop_with_savepoint_as(&id, None, false, Some(planned))
        .await
        .unwrap_err();
    assert!(!err.maybe_received(), "{err}");
}
