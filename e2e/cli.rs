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
