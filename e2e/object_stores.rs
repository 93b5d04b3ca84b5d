//! Savepoints and checkpoints on real object store servers: S3 (versitygw, built by `bash
//! e2e/s3/install.sh`; `.ci/run` exports `SJOB_VERSITYGW_BIN`) and Azure Blob Storage
//! (Azurite, installed by `bash e2e/azure/install.sh`; `SJOB_AZURITE_BLOB`): the snapshot
//! store's own guarantees, a job that savepoints, stops, rescales and survives a kill -9 with
//! nothing but the bucket shared between its engine processes, and the errors users meet.

use bytes::Bytes;
use sjob::local::azure_server::{ACCOUNT_KEY, AzureServer};
use sjob::local::s3_server::{ACCESS_KEY, S3Server, SECRET_KEY};
use sjob::local::sink_check::CountLog;
use sjob::savepoint::store::Store;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BUCKET: &str = "bkt";
const SECRET: &str = SECRET_KEY;

/// One server of each kind for the whole test binary (tests use prefixes of their own).
struct Served<T> {
    server: T,
    _dir: tempfile::TempDir,
}

/// Starts a server once and sets its environment for the Store used in this process (child
/// processes get theirs from `sjob`).
fn serve<T>(
    cell: &'static OnceLock<Served<T>>,
    start: impl FnOnce(&Path) -> Result<T, String>,
    env: impl FnOnce(&T) -> Vec<(&'static str, String)>,
) -> &'static T {
    &cell
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let server = start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            // SAFETY: set once, before this process reads them anywhere else.
            unsafe {
                for (k, v) in env(&server) {
                    std::env::set_var(k, v);
                }
            }
            Served { server, _dir: dir }
        })
        .server
}

fn s3() -> &'static S3Server {
    static SERVER: OnceLock<Served<S3Server>> = OnceLock::new();
    serve(
        &SERVER,
        |d| S3Server::start(d, &[BUCKET]),
        |s| s.env(SECRET),
    )
}

fn azure() -> &'static AzureServer {
    static SERVER: OnceLock<Served<AzureServer>> = OnceLock::new();
    serve(
        &SERVER,
        |d| AzureServer::start(d, &[BUCKET]),
        |s| s.env(ACCOUNT_KEY),
    )
}

/// The object store a test runs against.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Remote {
    S3,
    Azure,
}

impl Remote {
    /// The bucket's (container's) URL, with the server started.
    fn root(self) -> String {
        match self {
            Remote::S3 => {
                s3();
                format!("s3://{BUCKET}")
            }
            Remote::Azure => {
                azure();
                format!("az://{BUCKET}")
            }
        }
    }

    /// The environment that reaches the server, `secret` as the secret key.
    fn env(self, secret: &str) -> Vec<(&'static str, String)> {
        match self {
            Remote::S3 => s3().env(secret),
            Remote::Azure => azure().env(secret),
        }
    }

    fn secret(self) -> &'static str {
        match self {
            Remote::S3 => SECRET,
            Remote::Azure => ACCOUNT_KEY,
        }
    }

    /// Uploads begun and neither completed nor aborted under `key` (S3: ListMultipartUploads
    /// of the bucket; Azure: the blob's uncommitted blocks).
    fn open_uploads(self, key: &str) -> usize {
        match self {
            Remote::S3 => open_multipart_uploads().len(),
            Remote::Azure => azure()
                .uncommitted_blocks(BUCKET, key)
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }
}

/// What points a process at either server (removed before one of them is given).
const STORE_ENV: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AZURE_STORAGE_USE_EMULATOR",
    "AZURITE_BLOB_STORAGE_URL",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
];

/// `sjob` in `dir` with `remote`'s environment (`secret` lets a test use a wrong one).
fn sjob(dir: &Path, remote: Remote, secret: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sjob"));
    c.current_dir(dir).env("SJOB_LOG", "warn");
    for k in STORE_ENV {
        c.env_remove(k);
    }
    if let Some(secret) = secret {
        c.envs(remote.env(secret));
    }
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// ListMultipartUploads of the bucket, signed by curl: the keys of uploads not completed
/// or aborted.
fn open_multipart_uploads() -> Vec<String> {
    let o = Command::new("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
        ])
        .args(["--user", &format!("{ACCESS_KEY}:{SECRET}")])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg(format!("{}/{BUCKET}?uploads=", s3().endpoint()))
        .output()
        .expect("curl runs (apt-get install curl)");
    let body = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "ListMultipartUploads: {}", text(&o));
    assert!(body.contains("ListMultipartUploadsResult"), "{body}");
    body.split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_store_writes_whole_objects_multipart_and_commit_markers_once_on_s3() {
    store_guarantees(Remote::S3);
    assert!(
        !s3()
            .bucket_dir(BUCKET)
            .join("store-test/big/state.bin")
            .exists()
    );
}

#[test]
fn the_store_writes_whole_objects_in_blocks_and_commit_markers_once_on_azure() {
    store_guarantees(Remote::Azure);
}

fn store_guarantees(remote: Remote) {
    let root = remote.root();
    let store = Store::open(&format!("{root}/store-test/")).unwrap();
    assert_eq!(store.location(), format!("{root}/store-test"));
    store.ensure_writable().unwrap();
    store
        .put("a/b.bin", Bytes::from_static(b"hello world"))
        .unwrap();
    assert_eq!(&store.get("a/b.bin").unwrap()[..], b"hello world");
    assert_eq!(&store.get_range("a/b.bin", 6..11).unwrap()[..], b"world");
    assert_eq!(store.size("a/b.bin").unwrap(), Some(11));
    assert_eq!(store.size("nope").unwrap(), None);

    // 20 MiB in 1 MiB writes: three parts, invisible until finished.
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let mut w = store.writer("big/state.bin");
    let mut crc = 0;
    for _ in 0..20 {
        w.write(&chunk).unwrap();
        crc = crc32c::crc32c_append(crc, &chunk);
    }
    assert_eq!(store.size("big/state.bin").unwrap(), None);
    // Parts go up in the background while the writer takes more.
    let deadline = Instant::now() + Duration::from_secs(10);
    while remote.open_uploads("store-test/big/state.bin") == 0 {
        assert!(Instant::now() < deadline, "no upload in parts");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(w.finish().unwrap(), (20 << 20, crc));
    assert_eq!(store.size("big/state.bin").unwrap(), Some(20 << 20));
    let back = store
        .get_range("big/state.bin", (19 << 20)..(20 << 20))
        .unwrap();
    assert_eq!(&back[..], &chunk[..]);

    // A writer dropped unfinished (a cancelled snapshot) leaves no object and no upload.
    let mut w = store.writer("big/cancelled.bin");
    for _ in 0..12 {
        w.write(&chunk).unwrap();
    }
    drop(w);
    assert_eq!(store.size("big/cancelled.bin").unwrap(), None);
    if remote == Remote::S3 {
        // Azure has no abort: staged blocks of a blob never committed expire on their own
        // (after a week); they are never visible as an object.
        assert_eq!(remote.open_uploads("store-test/big/cancelled.bin"), 0);
    }

    // The commit marker is written once.
    store
        .put_new("_metadata", Bytes::from_static(b"1"))
        .unwrap();
    let e = store
        .put_new("_metadata", Bytes::from_static(b"2"))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("{root}/store-test/_metadata")),
        "{e}"
    );
    assert_eq!(&store.get("_metadata").unwrap()[..], b"1");

    let mut names = store.list().unwrap();
    names.sort();
    assert_eq!(names, ["_metadata", "a/b.bin", "big/state.bin"]);
    let mut dirs = store.list_dirs().unwrap();
    dirs.sort();
    assert_eq!(dirs, ["a", "big"]);
    assert!(store.exists().unwrap() && !store.is_object().unwrap());
    store.delete_all().unwrap();
    assert!(store.list().unwrap().is_empty() && !store.exists().unwrap());
    let e = Store::open(&format!("{root}/a/../b")).unwrap_err();
    assert!(e.to_string().contains("'..'"), "{e}");
}

fn count_job(out: &Path, root: &str, records: u64, rate: u64) -> String {
    format!(
        r#"
name: counts
parallelism: 2
checkpoints:
  interval: 500ms
  dir: {root}/ck
operators:
  - kind: generator
    uid: source
    keys: 10
    count: {records}
    rate: {rate}
  - kind: keyBy
    field: key
  - kind: count
    uid: counter
  - kind: fileSink
    uid: out
    path: {}
"#,
        out.display()
    )
}

/// Starts `sjob run -d` in `dir`; the job id and the REST URL.
fn run_detached(dir: &Path, remote: Remote, extra: &[&str]) -> (String, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let o = sjob(dir, remote, Some(remote.secret()))
        .args(["run", "-d", "--rest-port", &port])
        .args(extra)
        .arg("job.yaml")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let job_id = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .find(|w| w.len() == 32 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no job id in: {}", text(&o)))
        .to_owned();
    (job_id, format!("http://127.0.0.1:{port}"))
}

fn savepoint_path(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    text(o)
        .lines()
        .find_map(|l| l.strip_prefix("Savepoint completed. Path: "))
        .unwrap_or_else(|| panic!("no savepoint path in: {}", text(o)))
        .to_owned()
}

fn wait_exactly_once(out: &Path, records: u64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let problems = CountLog::read(out)
            .map(|l| l.exactly_once(10, (records / 10) as i64))
            .unwrap_or_else(|e| vec![e]);
        if problems.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{problems:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_job_savepoints_stops_rescales_and_survives_a_kill_through_s3_only() {
    job_through(Remote::S3);
    assert_eq!(open_multipart_uploads(), Vec::<String>::new());
}

#[test]
fn a_job_savepoints_stops_rescales_and_survives_a_kill_through_azure_only() {
    job_through(Remote::Azure);
}

fn job_through(remote: Remote) {
    let root = format!("{}/job-test", remote.root());
    let secret = Some(remote.secret());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let records = 150_000;
    let job = count_job(&out, &root, records, 10_000);
    // Each engine process has an empty working directory of its own.
    let dirs: Vec<PathBuf> = (0..3)
        .map(|i| {
            let d = work.path().join(format!("engine-{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("job.yaml"), &job).unwrap();
            d
        })
        .collect();

    // 1. Parallelism 2, checkpoints on S3; a savepoint, then stop with one.
    let (job_id, url) = run_detached(&dirs[0], remote, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let sp_dir = format!("{root}/sp");
    let o = sjob(&dirs[0], remote, secret)
        .args(["savepoint", &job_id, &sp_dir, "--url", &url])
        .output()
        .unwrap();
    let first = savepoint_path(&o);
    assert!(
        first.starts_with(&format!("{sp_dir}/savepoint-")),
        "{first}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let o = sjob(&dirs[0], remote, secret)
        .args(["stop", "-p", &sp_dir, &job_id, "--url", &url])
        .output()
        .unwrap();
    let stopped = savepoint_path(&o);
    let o = sjob(&dirs[0], remote, secret)
        .args(["savepoints", "inspect", &stopped])
        .output()
        .unwrap();
    assert!(
        o.status.success() && text(&o).contains("counter"),
        "{}",
        text(&o)
    );

    // 2. Rescaled to 3 from it, in another empty directory; killed -9 after a checkpoint.
    let fixed_id = "0123456789abcdef0123456789abcdef";
    let mut engine = sjob(&dirs[1], remote, secret)
        .args(["run", "--rest-port", "0", "-p", "3", "--job-id", fixed_id])
        .args(["-s", &stopped, "job.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = Store::open(&format!("{root}/ck/{fixed_id}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !checkpoints
        .list()
        .unwrap()
        .iter()
        .any(|f| f.ends_with("/_metadata"))
    {
        assert!(Instant::now() < deadline, "no checkpoint in {root}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(700));
    engine.kill().unwrap();
    engine.wait().unwrap();

    // 3. The same job id in a third directory resumes from its newest S3 checkpoint.
    let o = sjob(&dirs[2], remote, secret)
        .args([
            "run",
            "--rest-port",
            "0",
            "-p",
            "3",
            "--job-id",
            fixed_id,
            "job.yaml",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    wait_exactly_once(&out, records, 30);
    assert!(
        std::fs::read_dir(&dirs[2]).unwrap().all(|e| {
            let name = e.unwrap().file_name();
            name == "job.yaml" || name.to_string_lossy().ends_with(".log")
        }),
        "the engine wrote snapshots next to itself"
    );
    // 4. Disposed: nothing left under the savepoint's prefix.
    let o = sjob(&dirs[0], remote, secret)
        .args(["savepoints", "dispose", &first])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(Store::open(&first).unwrap().list().unwrap().is_empty());
}

#[test]
fn bad_credentials_a_missing_bucket_and_no_credentials_are_named_on_s3() {
    bad_input_named(
        Remote::S3,
        "wrong-secret",
        "no S3 credentials",
        "AWS_ACCESS_KEY_ID",
    );
}

#[test]
fn bad_credentials_a_missing_container_and_no_credentials_are_named_on_azure() {
    // A key of the right form (base64) that is not the account's.
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ==";
    bad_input_named(
        Remote::Azure,
        wrong,
        "no Azure credentials",
        "AZURE_STORAGE_ACCOUNT_KEY",
    );
}

fn bad_input_named(remote: Remote, wrong: &str, none: &str, variable: &str) {
    let root = remote.root();
    let dir = tempfile::tempdir().unwrap();
    let sp = format!("{root}/cred-test/sp-1");
    let store = Store::open(&sp).unwrap();
    store.put("_metadata", Bytes::from_static(b"x")).unwrap();
    let inspect = |secret: Option<&str>, path: &str| {
        sjob(dir.path(), remote, secret)
            .args(["savepoints", "inspect", path])
            .output()
            .unwrap()
    };
    let o = inspect(Some(wrong), &sp);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains(&format!("{sp}/_metadata")), "{t}");
    assert!(!t.contains(remote.secret()) && !t.contains(wrong), "{t}");
    let o = inspect(None, &sp);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains(none) && t.contains(variable),
        "{t}"
    );
    let missing = sp.replace(&format!("://{BUCKET}/"), "://no-such-bucket/");
    let o = inspect(Some(remote.secret()), &missing);
    let t = text(&o);
    assert!(!o.status.success() && t.contains(&missing), "{t}");
}

/// A TCP proxy in front of the S3 server that can answer `503 SlowDown` (throttling) or
/// drop every connection (the server gone).
struct FaultProxy {
    port: u16,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

const FORWARD: u8 = 0;
const THROTTLE: u8 = 1;
const DOWN: u8 = 2;

impl FaultProxy {
    fn start(upstream: &str) -> FaultProxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(FORWARD));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (m, o) = (mode.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                match m.load(Ordering::SeqCst) {
                    THROTTLE => {
                        let mut client = client;
                        // Read the request head, answer as S3 does when throttling.
                        let mut buf = [0u8; 4096];
                        let _ = client.read(&mut buf);
                        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                        let _ = write!(
                            client,
                            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    DOWN => drop(client),
                    _ => {
                        let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                            continue;
                        };
                        let (mut c_in, mut s_in) =
                            (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let (mut c_out, mut s_out) = (client, server);
                        {
                            let mut open = o.lock().unwrap();
                            open.push(c_in.try_clone().unwrap());
                            open.push(s_in.try_clone().unwrap());
                        }
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut c_in, &mut s_out);
                            let _ = s_out.shutdown(std::net::Shutdown::Both);
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut s_in, &mut c_out);
                            let _ = c_out.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        FaultProxy { port, mode, open }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
        if mode != FORWARD {
            // Connections in flight (uploads in the middle) break, as when a server dies.
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[test]
fn throttling_is_retried_and_an_outage_fails_checkpoints_while_the_job_runs_on() {
    use sjob::operator::engine_client::EngineClient;
    s3();
    let proxy = FaultProxy::start(s3().endpoint());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    // 50 s of records: the job must outlast a first checkpoint, the throttling, an outage longer
    // than the store's retries (up to 20 s) and two checkpoints after it, on a loaded machine too.
    let records = 500_000;
    std::fs::write(
        work.path().join("job.yaml"),
        count_job(&out, &format!("s3://{BUCKET}/fault-test"), records, 10_000),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let job_id = "fedcba9876543210fedcba9876543210";
    let mut engine = sjob(work.path(), Remote::S3, Some(SECRET))
        .env("AWS_ENDPOINT_URL", proxy.endpoint())
        .args(["run", "--rest-port", &port.to_string(), "--job-id", job_id])
        .arg("job.yaml")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = EngineClient::new(&format!("http://127.0.0.1:{port}"));
    let counts = || {
        rt.block_on(client.checkpoints(job_id))
            .map(|c| (c.completed, c.failed))
            .unwrap_or((0, 0))
    };
    let wait_for = |what: &str, pred: &dyn Fn((u64, u64)) -> bool| {
        // Longer than the store's retries (at most 20 s) last.
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let c = counts();
            if pred(c) {
                return c;
            }
            assert!(Instant::now() < deadline, "{what}: checkpoints {c:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("a first checkpoint", &|(ok, _)| ok >= 1);

    // Throttled for 2 s: requests are retried with back-off, checkpoints still complete.
    proxy.set(THROTTLE);
    std::thread::sleep(Duration::from_secs(2));
    proxy.set(FORWARD);
    let (ok, failed_before) = wait_for("checkpoints after throttling", &|(ok, _)| ok >= 3);
    let why = rt.block_on(async {
        sjob::install_tls_provider();
        reqwest::get(format!("http://127.0.0.1:{port}/jobs/{job_id}/checkpoints"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert_eq!(
        failed_before, 0,
        "a checkpoint failed while throttled: {why}"
    );

    // The server gone for longer than the retries last: checkpoints fail, the job runs on.
    proxy.set(DOWN);
    let (_, failed) = wait_for("a failed checkpoint", &|(_, f)| f > failed_before);
    assert!(failed > failed_before);
    assert!(
        engine.try_wait().unwrap().is_none(),
        "the engine exited while the server was down"
    );
    proxy.set(FORWARD);
    wait_for("checkpoints after the outage", &|(o, _)| o > ok + 1);
    let status = engine.wait().unwrap();
    assert!(status.success(), "the job did not finish");
    wait_exactly_once(&out, records, 10);
    // Failed checkpoints left no snapshot behind that a restore could mistake for one.
    let checkpoints = Store::open(&format!("s3://{BUCKET}/fault-test/ck/{job_id}")).unwrap();
    for dir in checkpoints.list_dirs().unwrap() {
        let files = checkpoints.child(&dir).list().unwrap();
        assert!(
            files.is_empty() || files.iter().any(|f| f == "_metadata"),
            "{dir}: {files:?}"
        );
    }
}
