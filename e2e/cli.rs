//! The `sjob` binary as a user runs it: exit codes and messages for good and bad input.

use sjob::engine::{self, JobOptions, JobState, spec::JobSpec};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn sjob(dir: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    if args.first() == Some(&"run") {
        all.splice(1..1, ["--rest-port", "0"]);
    }
    Command::new(env!("CARGO_BIN_EXE_sjob"))
        .args(&all)
        .current_dir(dir)
        .env("SJOB_LOG", "warn")
        .output()
        .expect("sjob runs")
}

/// Runs `sjob` and kills it after `secs`: for a command that must fail, so that a wrongly
/// started job does not hang the test.
fn sjob_within(dir: &Path, secs: u64, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    if args.first() == Some(&"run") {
        all.splice(1..1, ["--rest-port", "0"]);
    }
    let child = Command::new(env!("CARGO_BIN_EXE_sjob"))
        .args(&all)
        .current_dir(dir)
        .env("SJOB_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sjob runs");
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().expect("sjob output"));
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !waiter.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !waiter.is_finished() {
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    }
    waiter.join().expect("sjob output")
}

/// Kills a process started by a test when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_clicks_sample_runs_to_completion_with_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/samples/jobs/clicks.yaml");
    let o = sjob(dir.path(), &["run", sample.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("FINISHED"), "{}", text(&o));
    // Final count per user = number of records i < 200000 with i % 1000 == user and
    // (i % 1000) % 10 != 0: users whose number is a multiple of 10 are all filtered out.
    let mut last = std::collections::HashMap::<String, u64>::new();
    for e in std::fs::read_dir(dir.path().join("out/clicks"))
        .unwrap()
        .flatten()
    {
        if !e.path().is_file() {
            continue;
        }
        for line in std::fs::read_to_string(e.path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let c = v["count"].as_u64().unwrap();
            let k = v["key"].as_str().unwrap().to_owned();
            let slot = last.entry(k).or_default();
            *slot = (*slot).max(c);
        }
    }
    assert_eq!(last.len(), 900);
    assert!(
        last.values().all(|&c| c == 200),
        "every remaining user clicked 200 times"
    );
}

#[test]
fn bad_input_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "name: x\noperators:\n  - kind: generator\n    uid: s\n    keys: many\n",
    )
    .unwrap();
    let o = sjob(dir.path(), &["run", "bad.yaml"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("bad.yaml: line 3") && t.contains("operators[0] (generator): keys"),
        "{t}"
    );

    std::fs::write(
        dir.path().join("kind.yaml"),
        "name: x\noperators:\n  - kind: teleport\n",
    )
    .unwrap();
    let t = text(&sjob(dir.path(), &["run", "kind.yaml"]));
    assert!(t.contains("unknown operator kind 'teleport'"), "{t}");

    std::fs::write(
        dir.path().join("ok.yaml"),
        "name: x\noperators:\n  - {kind: generator, uid: s, count: 5}\n  - {kind: discardSink}\n",
    )
    .unwrap();
    let o = sjob(dir.path(), &["run", "-s", "no/such/savepoint", "ok.yaml"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("does not exist"), "{}", text(&o));

    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let o = sjob(dir.path(), &["run", "-s", "empty", "ok.yaml"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not a complete savepoint"),
        "{}",
        text(&o)
    );

    let o = sjob(dir.path(), &["run", "missing.yaml"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("cannot read job file missing.yaml"),
        "{}",
        text(&o)
    );
}

#[test]
fn savepoint_tools_inspect_check_and_dispose() {
    let dir = tempfile::tempdir().unwrap();
    let job = |extra: &str| {
        format!(
            "name: t\nparallelism: 2\noperators:\n  - {{kind: generator, uid: src, keys: 50, rate: 20000}}\n  - {{kind: keyBy, field: key}}\n  - {{kind: count, uid: counter}}\n{extra}  - {{kind: discardSink}}\n"
        )
    };
    let v1 = job("  - {kind: keyBy, field: key}\n  - {kind: max, uid: peak, field: count}\n");
    let spec = JobSpec::from_yaml(&v1).unwrap();
    let handle = engine::start(&spec, JobOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sp = handle
        .savepoint(dir.path().join("sp").to_str().unwrap())
        .unwrap();
    handle.cancel();
    assert_eq!(handle.wait(), JobState::Canceled);

    let o = sjob(dir.path(), &["savepoints", "inspect", &sp]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for want in [
        "uid counter (count",
        "uid peak (max",
        "keyed value state 'count' {count: int}",
        "positions: 0@",
        "parallelism 2, max parallelism 128",
    ] {
        assert!(t.contains(want), "inspect lacks {want:?}:\n{t}");
    }
    let o = sjob(dir.path(), &["savepoints", "inspect", "--json", &sp]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "savepoint");

    std::fs::write(dir.path().join("v1.yaml"), &v1).unwrap();
    std::fs::write(dir.path().join("v2.yaml"), job("")).unwrap();
    let o = sjob(
        dir.path(),
        &["savepoints", "check", &sp, "v1.yaml", "-p", "3"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = sjob(dir.path(), &["savepoints", "check", &sp, "v2.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("peak"), "{}", text(&o));
    let o = sjob(
        dir.path(),
        &[
            "savepoints",
            "check",
            &sp,
            "v2.yaml",
            "--allowNonRestoredState",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("state dropped: peak"), "{}", text(&o));

    let o = sjob(dir.path(), &["savepoints", "dispose", "v1.yaml"]);
    assert!(
        !o.status.success(),
        "dispose refuses what is not a savepoint"
    );
    let o = sjob(dir.path(), &["savepoints", "dispose", &sp]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!Path::new(&sp).exists());
}

#[test]
fn remote_commands_drive_a_detached_engine() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let url = format!("http://127.0.0.1:{port}");
    std::fs::write(
        dir.path().join("job.yaml"),
        "name: remote\noperators:\n  - {kind: generator, uid: src, keys: 10, rate: 5000}\n  - {kind: keyBy, field: key}\n  - {kind: count, uid: counter}\n  - {kind: discardSink}\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sjob"))
            .args(args)
            .current_dir(dir.path())
            .env("SJOB_LOG", "warn")
            .output()
            .unwrap()
    };
    let o = run(&["run", "-d", "--rest-port", &port, "job.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let job_id = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .nth(6)
        .unwrap()
        .to_owned();
    assert_eq!(job_id.len(), 32, "{}", text(&o));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let o = run(&["list", "--url", &url]);
        if o.status.success() && text(&o).contains(&format!("{job_id} : remote (RUNNING)")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", text(&o));
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = run(&["savepoint", &job_id, "sps", "--url", &url]);
    assert!(o.status.success(), "{}", text(&o));
    let path = text(&o)
        .lines()
        .find_map(|l| l.strip_prefix("Savepoint completed. Path: "))
        .unwrap()
        .to_owned();
    assert!(Path::new(&path).join("_metadata").is_file());

    let o = run(&[
        "savepoint",
        "0123456789abcdef0123456789abcdef",
        "--url",
        &url,
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("job 0123456789abcdef0123456789abcdef not found"),
        "{}",
        text(&o)
    );

    let o = run(&["stop", "-p", "sps", &job_id, "--url", &url]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Savepoint completed. Path: "),
        "{}",
        text(&o)
    );

    // Restart from it detached (on another port: the first may still be closing), then
    // cancel with a savepoint.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let url = format!("http://127.0.0.1:{port}");
    let o = run(&[
        "run",
        "-d",
        "--rest-port",
        &port,
        "-s",
        &path,
        "--log-file",
        "second.log",
        "job.yaml",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let second = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .nth(6)
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let o = run(&["cancel", "-s", "sps", &second, "--url", &url]);
        if o.status.success() {
            assert!(
                text(&o).contains(&format!("Cancelled job {second}. Savepoint stored in")),
                "{}",
                text(&o)
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", text(&o));
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = run(&["list", "--url", "http://127.0.0.1:1"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("cannot reach the engine at http://127.0.0.1:1"),
        "{}",
        text(&o)
    );
}

/// The error `sjob` printed last ("error: …"), without the prefix.
fn error_message(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let at = err
        .rfind("error: ")
        .unwrap_or_else(|| panic!("no error in {err}"));
    err[at + "error: ".len()..].trim().to_owned()
}

#[test]
fn detached_run_fails_like_an_attached_one() {
    let dir = tempfile::tempdir().unwrap();
    let job = |extra: &str| {
        format!(
            "name: t\noperators:\n  - {{kind: generator, uid: src, keys: 20, rate: 20000}}\n  - {{kind: keyBy, field: key}}\n  - {{kind: count, uid: counter}}\n{extra}  - {{kind: discardSink}}\n"
        )
    };
    let v1 = job("  - {kind: keyBy, field: key}\n  - {kind: max, uid: peak, field: count}\n");
    let handle = engine::start(&JobSpec::from_yaml(&v1).unwrap(), JobOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let sp = handle
        .savepoint(dir.path().join("sp").to_str().unwrap())
        .unwrap();
    handle.cancel();
    handle.wait();
    std::fs::write(dir.path().join("no-peak.yaml"), job("")).unwrap();
    std::fs::write(
        dir.path().join("no-uid.yaml"),
        job("  - {kind: keyBy, field: key}\n  - {kind: max, field: count}\n"),
    )
    .unwrap();

    let cases: [(&str, Vec<&str>, &str); 2] = [
        (
            "a stateful operator without uid",
            vec!["no-uid.yaml"],
            "uid",
        ),
        (
            "a restore that drops state",
            vec!["-s", &sp, "no-peak.yaml"],
            "peak",
        ),
    ];
    for (name, args, names) in cases {
        let attached: Vec<&str> = ["run"].into_iter().chain(args.iter().copied()).collect();
        let detached: Vec<&str> = ["run", "-d"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let a = sjob(dir.path(), &attached);
        let d = sjob(dir.path(), &detached);
        if let Some(pid) = text(&d)
            .split("(process ")
            .nth(1)
            .and_then(|r| r.split(',').next())
        {
            // Wrongly started: do not leave it running.
            let _ = Command::new("kill").arg(pid).status();
        }
        assert_eq!(a.status.code(), Some(1), "{name}: {}", text(&a));
        assert_eq!(d.status.code(), Some(1), "{name}, detached: {}", text(&d));
        assert!(
            !text(&d).contains("has been submitted"),
            "{name}: {}",
            text(&d)
        );
        let message = error_message(&a);
        assert!(message.contains(names), "{name}: {message}");
        assert_eq!(error_message(&d), message, "{name}: the same message");
    }

    // A job that does start: `-d` returns once it runs, with its REST address.
    let o = sjob(
        dir.path(),
        &[
            "run",
            "-d",
            "-s",
            &sp,
            &dir.path().join("v1.yaml").display().to_string(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "no such job file: {}", text(&o));
    std::fs::write(dir.path().join("v1.yaml"), &v1).unwrap();
    let o = sjob(dir.path(), &["run", "-d", "-s", &sp, "v1.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let url = out
        .split("REST API ")
        .nth(1)
        .and_then(|r| r.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("no REST address in {out}"))
        .to_owned();
    let job_id = out.split_whitespace().nth(6).unwrap().to_owned();
    let o = Command::new(env!("CARGO_BIN_EXE_sjob"))
        .args(["cancel", &job_id, "--url", &url])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the detached job runs at {url}: {}",
        text(&o)
    );
}

/// Every kind of damage to a state file that `savepoints check` refuses, `run -s` refuses too,
/// naming the same file.
#[test]
fn restore_refuses_what_check_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = "name: t\nparallelism: 2\noperators:\n  - {kind: generator, uid: src, keys: 300, rate: 50000}\n  - {kind: keyBy, field: key}\n  - {kind: sum, uid: total, field: value}\n  - {kind: discardSink}\n";
    std::fs::write(dir.path().join("job.yaml"), v1).unwrap();
    let handle = engine::start(&JobSpec::from_yaml(v1).unwrap(), JobOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sp = handle
        .savepoint(dir.path().join("sp").to_str().unwrap())
        .unwrap();
    handle.cancel();
    handle.wait();
    let o = sjob(dir.path(), &["savepoints", "check", &sp, "job.yaml"]);
    assert!(o.status.success(), "the undamaged savepoint: {}", text(&o));

    let file_of = |root: &Path, prefix: &str| {
        std::fs::read_dir(root.join("operators"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .unwrap_or_else(|| panic!("no state file {prefix}* in {}", root.display()))
    };
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, &str, Damage); 8] = [
        ("magic", "total-0-", |b| b[0] ^= 0x01),
        ("format version", "total-0-", |b| b[5] = 1),
        ("first key-group block", "total-0-", |b| b[8] ^= 0x20),
        ("last byte of keyed state", "total-1-", |b| {
            let n = b.len();
            b[n - 1] ^= 0x01
        }),
        ("operator state", "src-1-", |b| {
            let n = b.len();
            b[n - 1] ^= 0x01
        }),
        ("truncated", "total-1-", |b| b.truncate(b.len() - 3)),
        ("a byte appended", "src-0-", |b| b.push(0)),
        ("emptied", "total-0-", |b| b.clear()),
    ];
    for (name, prefix, damage) in damages {
        let copy = dir
            .path()
            .join(format!("damaged-{}", name.replace(' ', "-")));
        copy_tree(Path::new(&sp), &copy);
        let victim = file_of(&copy, prefix);
        let mut bytes = std::fs::read(&victim).unwrap();
        damage(&mut bytes);
        std::fs::write(&victim, &bytes).unwrap();
        let copy = copy.to_str().unwrap();
        let victim = victim.display().to_string();

        let check = sjob(dir.path(), &["savepoints", "check", copy, "job.yaml"]);
        assert_eq!(
            check.status.code(),
            Some(1),
            "{name}: check: {}",
            text(&check)
        );
        assert!(
            text(&check).contains(&victim),
            "{name}: check: {}",
            text(&check)
        );
        let run = sjob_within(dir.path(), 30, &["run", "-s", copy, "job.yaml"]);
        assert_eq!(run.status.code(), Some(1), "{name}: run -s: {}", text(&run));
        assert!(
            text(&run).contains(&victim)
                && (text(&run).contains("corrupt") || text(&run).contains("truncated")),
            "{name}: run -s: {}",
            text(&run)
        );
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string()
}

/// Savepoints that fail because a state file cannot be written (here: the engine's file size
/// limit, as a full disk would) leave nothing on storage, however the writers of the other
/// subtasks answer, and the job keeps running.
#[test]
fn a_failed_savepoint_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    // Large keyed state (two files over the limit) beside many small state files that
    // succeed: a writer finishing after the first failure used to recreate the directory.
    std::fs::write(
        dir.path().join("job.yaml"),
        "name: full\nparallelism: 2\noperators:\n  - {kind: generator, uid: src, keys: 20011, rate: 200000, parallelism: 6}\n  - {kind: keyBy, field: key}\n  - {kind: sum, uid: total, field: value}\n  - {kind: map, set: [{field: bucket, expr: \"key % 7\"}]}\n  - {kind: keyBy, field: bucket}\n  - {kind: count, uid: per-bucket, parallelism: 3}\n  - {kind: discardSink}\n",
    )
    .unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let sjob_bin = env!("CARGO_BIN_EXE_sjob");
    // Writes past 64 KiB fail with EFBIG (SIGXFSZ ignored, as the limit's signal would kill).
    let engine = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 64; exec {sjob_bin} run --rest-port {port} job.yaml"
        ))
        .current_dir(dir.path())
        .env("SJOB_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _engine = KillOnDrop(engine);
    let run = |args: &[&str]| {
        Command::new(sjob_bin)
            .args(args)
            .args(["--url", &url])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let job_id = loop {
        let o = run(&["list"]);
        if let Some(id) = text(&o)
            .lines()
            .find(|l| l.contains(": full (RUNNING)"))
            .and_then(|l| l.split_whitespace().nth(2))
        {
            break id.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "{}", text(&o));
        std::thread::sleep(Duration::from_millis(100));
    };
    let target = dir.path().join("full");
    for attempt in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        let o = run(&["savepoint", &job_id, target.to_str().unwrap()]);
        assert!(!o.status.success(), "attempt {attempt}: {}", text(&o));
        assert!(
            text(&o).contains("File too large"),
            "attempt {attempt}: {}",
            text(&o)
        );
        let left: Vec<String> = std::fs::read_dir(&target)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "attempt {attempt}: the failed savepoint left {left:?} in {}",
            target.display()
        );
        let o = run(&["list"]);
        assert!(
            text(&o).contains(&format!("{job_id} : full (RUNNING)")),
            "attempt {attempt}: the job keeps running: {}",
            text(&o)
        );
    }
    let o = run(&["cancel", &job_id]);
    assert!(o.status.success(), "{}", text(&o));
}
