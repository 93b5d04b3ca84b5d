//! The engine's savepoints, end to end: real engine threads, real savepoint files, real
//! output files. Each test computes the expected results independently of the engine.

use sjob::engine::{self, JobOptions, JobState, spec::JobSpec};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn spec(yaml: &str) -> JobSpec {
    JobSpec::from_yaml(yaml).unwrap_or_else(|e| panic!("test job does not parse: {e}\n{yaml}"))
}

/// A keyed count over a bounded generator: `count` records over `keys` keys.
fn count_job(out: &Path, count: u64, keys: u64, rate: u64, parallelism: u32, extra: &str) -> String {
    format!(
        r#"
name: counts
parallelism: {parallelism}
operators:
  - kind: generator
    uid: source
    keys: {keys}
    count: {count}
    rate: {rate}
  - kind: keyBy
    field: key
  - kind: count
    uid: counter
{extra}  - kind: fileSink
    uid: out
    path: {}
"#,
        out.display()
    )
}

/// Every committed output line, as JSON objects.
fn output_lines(dir: &Path) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return lines };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("part-") || !e.path().is_file() {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        for l in text.lines() {
            lines.push(serde_json::from_str(l).unwrap_or_else(|err| panic!("bad line {l:?}: {err}")));
        }
    }
    lines
}

/// Per key, every count the counter emitted, sorted.
fn emitted_counts(dir: &Path) -> BTreeMap<i64, Vec<u64>> {
    let mut m: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    for v in output_lines(dir) {
        let (Some(k), Some(c)) = (v["key"].as_i64(), v["count"].as_u64()) else {
            continue;
        };
        m.entry(k).or_default().push(c);
    }
    for v in m.values_mut() {
        v.sort_unstable();
    }
    m
}

/// Exactly once: each key emitted 1, 2, …, n once each, where n is its true count.
fn assert_exactly_once(dir: &Path, count: u64, keys: u64) {
    let got = emitted_counts(dir);
    assert_eq!(got.len() as u64, keys.min(count), "keys with output");
    for k in 0..keys.min(count) {
        let n = (0..count).filter(|i| i % keys == k).count() as u64;
        let want: Vec<u64> = (1..=n).collect();
        let have = got.get(&(k as i64)).cloned().unwrap_or_default();
        assert!(have == want, "key {k}: expected counts 1..={n} once each, got {} values (first {:?})", have.len(), &have[..have.len().min(10)]);
    }
}

fn wait_for_progress(job: &engine::JobHandle, uid: &str, at_least: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = job.vertices().into_iter().find(|v| v.uid == uid).unwrap();
        if v.records_in >= at_least {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no progress on {uid}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn exactly_once_across_a_savepoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sps = dir.path().join("savepoints");
    let (count, keys) = (60_000, 97);
    let job_spec = spec(&count_job(&out, count, keys, 40_000, 2, ""));
    let job = engine::start(&job_spec, JobOptions::default()).unwrap();
    wait_for_progress(&job, "counter", 10_000);
    let sp = job.savepoint(sps.to_str().unwrap()).unwrap();
    wait_for_progress(&job, "counter", 20_000);
    job.cancel();
    assert_eq!(job.wait(), JobState::Canceled);

    let meta = sjob::savepoint::metadata::SnapshotMetadata::read(
        &sjob::savepoint::store::Store::open(&sp).unwrap(),
    )
    .unwrap();
    let positions: i64 = meta.operator("source").unwrap().source_positions.iter().map(|p| p.position).sum();
    assert!(positions > 0, "the savepoint was taken mid-run");
    assert!(Path::new(&sp).join("_metadata").exists());

    let job = engine::start(
        &job_spec,
        JobOptions {
            savepoint: Some(sp.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(job.restored_from(), Some(sp.as_str()));
    assert_eq!(job.wait(), JobState::Finished, "{:?}", job.failure());
    assert_exactly_once(&out, count, keys);
}
