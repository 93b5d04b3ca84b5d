//! Engine benchmarks that print figures (run through `e2e/bench/run.sh`, which
//! puts them beside Flink's, or alone):
//!
//!   cargo bench --bench engine -- throughput [SECONDS] [KEYS] [PARALLELISM]
//!   cargo bench --bench engine -- windows [SECONDS] [KEYS] [PARALLELISM] [SIZE_MS]
//!   cargo bench --bench engine -- skew [SECONDS] [EVERY_S] [KEYS] [PARALLELISM] [SIZE_MS] [MAX_DRIFT]
//!   cargo bench --bench engine -- savepoint [KEYS] [PAYLOAD_BYTES] [DIR]
//!   cargo bench --bench engine -- bounded count|windows-1000s|windows-1ms [RECORDS]
//!
//! Each prints one JSON object per line.

#[global_allocator]
static GLOBAL: sjob::allocator::Allocator = sjob::allocator::Allocator;

use sjob::engine::{self, JobHandle, JobOptions, JobState, spec::JobSpec};
use std::time::{Duration, Instant};

fn records_in(job: &JobHandle, uid: &str) -> u64 {
    job.vertices()
        .iter()
        .find(|v| v.uid == uid)
        .map(|v| v.records_in)
        .unwrap_or(0)
}

/// A memory figure of this process from /proc/self/status (`VmHWM:` peak, `VmRSS:` now), in
/// MB of 10^6 bytes, the unit of the state sizes it is weighed against.
fn status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb * 1024.0 / 1e6)
        .unwrap_or(f64::NAN)
}

fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// The keyed count job: unbounded, or `count` records.
fn count_yaml(keys: u64, parallelism: u32, count: Option<u64>) -> String {
    let count = count.map(|n| format!(", count: {n}")).unwrap_or_default();
    format!(
        "name: count\nparallelism: {parallelism}\noperators:\n  - {{kind: generator, uid: source, keys: {keys}{count}}}\n  - {{kind: keyBy, field: key}}\n  - {{kind: count, uid: counter}}\n  - {{kind: discardSink}}\n"
    )
}

/// The windows job (five aggregates): unbounded, or `count` records.
fn windows_yaml(keys: u64, parallelism: u32, size_ms: u64, count: Option<u64>) -> String {
    let aggregates = "[{name: n, aggregate: count}, {name: total, aggregate: sum, field: value}, {name: low, aggregate: min, field: value}, {name: high, aggregate: max, field: value}, {name: mean, aggregate: avg, field: value}]";
    let count = count.map(|n| format!(", count: {n}")).unwrap_or_default();
    format!(
        "name: windows\nparallelism: {parallelism}\noperators:\n  - {{kind: generator, uid: source, keys: {keys}{count}}}\n  - {{kind: keyBy, field: key}}\n  - {{kind: window, uid: windows, size: {size_ms}ms, aggregates: {aggregates}}}\n  - {{kind: discardSink}}\n"
    )
}

/// Runs one workload over `records` records to its end (for `e2e/bench/instructions.sh`, which
/// counts the instructions under callgrind): `count`, `windows-1000s` or `windows-1ms`, 100,000
/// keys, p=2.
fn bounded(workload: &str, records: u64) {
    let yaml = match workload {
        "count" => count_yaml(100_000, 2, Some(records)),
        "windows-1000s" => windows_yaml(100_000, 2, 1_000_000, Some(records)),
        "windows-1ms" => windows_yaml(100_000, 2, 1, Some(records)),
        other => {
            eprintln!(
                "bounded: unknown workload '{other}'; expected count, windows-1000s or windows-1ms"
            );
            std::process::exit(2);
        }
    };
    let spec = JobSpec::from_yaml(&yaml).expect("bench job parses");
    let started = Instant::now();
    let job = engine::start(&spec, JobOptions::default()).expect("bench job starts");
    let state = job.wait();
    assert_eq!(state, JobState::Finished, "{:?}", job.failure());
    println!(
        "{{\"bench\":\"bounded\",\"workload\":\"{workload}\",\"records\":{records},\"seconds\":{:.2}}}",
        started.elapsed().as_secs_f64()
    );
}

fn throughput(seconds: u64, keys: u64, parallelism: u32) {
    let yaml = count_yaml(keys, parallelism, None);
    let (dt, rps) = records_per_s(&yaml, "counter", seconds);
    println!(
        "{{\"bench\":\"throughput\",\"engine\":\"sjob\",\"keys\":{keys},\"parallelism\":{parallelism},\"seconds\":{dt:.2},\"records_per_s\":{rps:.0},\"peak_rss_mb\":{:.1}}}",
        peak_rss_mb()
    );
}

/// Tumbling event-time windows of `size_ms` per key with five aggregates (count, sum, min, max,
/// avg of the value) over the generator's records (ts i ms, key i mod keys): with 100,000
/// keys, 1,000 s windows hold 10 records per key, 1 ms windows one record each.
fn windows(seconds: u64, keys: u64, parallelism: u32, size_ms: u64) {
    let yaml = windows_yaml(keys, parallelism, size_ms, None);
    let (dt, rps) = records_per_s(&yaml, "windows", seconds);
    println!(
        "{{\"bench\":\"windows\",\"engine\":\"sjob\",\"keys\":{keys},\"parallelism\":{parallelism},\"size_ms\":{size_ms},\"seconds\":{dt:.2},\"records_per_s\":{rps:.0},\"peak_rss_mb\":{:.1}}}",
        peak_rss_mb()
    );
}

fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// The windows job of `windows` (10 s windows by default) at full speed for `seconds`, a
/// savepoint every `every` seconds: its size, the resident memory, and how far apart the
/// source splits are (records), one JSON line per sample; then the largest sample over the
/// smallest. State that grows without bound shows as a ratio that grows with the run.
fn skew(
    seconds: u64,
    every: u64,
    keys: u64,
    parallelism: u32,
    size_ms: u64,
    max_drift: Option<&str>,
) {
    let yaml = match max_drift {
        Some(d) => windows_yaml(keys, parallelism, size_ms, None).replacen(
            "operators:",
            &format!("watermarks: {{maxDrift: {d}}}\noperators:"),
            1,
        ),
        None => windows_yaml(keys, parallelism, size_ms, None),
    };
    let spec = JobSpec::from_yaml(&yaml).expect("bench job parses");
    let dir = std::env::temp_dir().join(format!("sjob-bench-skew-{}", std::process::id()));
    let job = engine::start(&spec, JobOptions::default()).expect("bench job starts");
    let started = Instant::now();
    let (mut sizes, mut rss) = (Vec::new(), Vec::new());
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(every));
        let positions: Vec<i64> = job.sources().positions.iter().map(|p| p.position).collect();
        let gap = positions.iter().max().unwrap_or(&0) - positions.iter().min().unwrap_or(&0);
        let sp = job
            .savepoint(dir.to_str().expect("temp dir is UTF-8"))
            .expect("savepoint");
        let mb = dir_bytes(std::path::Path::new(&sp)) as f64 / 1e6;
        let _ = std::fs::remove_dir_all(&sp);
        let (r, t) = (rss_mb(), started.elapsed().as_secs());
        println!(
            "{{\"bench\":\"skew\",\"engine\":\"sjob\",\"t_s\":{t},\"savepoint_mb\":{mb:.2},\"rss_mb\":{r:.1},\"split_gap_records\":{gap},\"records_in\":{}}}",
            records_in(&job, "windows")
        );
        sizes.push(mb);
        rss.push(r);
    }
    job.cancel();
    job.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let ratio = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        hi / lo.max(1e-9)
    };
    // One savepoint's size depends on when windows last fired; growth shows in the medians.
    let growth = |v: &[f64]| {
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let (early, late) = v.split_at(v.len() / 2);
        median(late) / median(early).max(1e-9)
    };
    println!(
        "{{\"bench\":\"skew-summary\",\"engine\":\"sjob\",\"max_drift\":\"{}\",\"samples\":{},\"savepoint_max_over_min\":{:.2},\"savepoint_late_over_early_median\":{:.2},\"rss_max_over_min\":{:.2},\"rss_late_over_early_median\":{:.2}}}",
        max_drift.unwrap_or("none"),
        sizes.len(),
        ratio(&sizes),
        growth(&sizes),
        ratio(&rss),
        growth(&rss)
    );
}

/// Runs the job, and after 3 s of warm-up counts the records `uid` receives for `seconds`:
/// (measured seconds, records/s).
fn records_per_s(yaml: &str, uid: &str, seconds: u64) -> (f64, f64) {
    let spec = JobSpec::from_yaml(yaml).expect("bench job parses");
    let job = engine::start(&spec, JobOptions::default()).expect("bench job starts");
    std::thread::sleep(Duration::from_secs(3));
    let (t0, n0) = (Instant::now(), records_in(&job, uid));
    std::thread::sleep(Duration::from_secs(seconds));
    let (dt, n1) = (t0.elapsed().as_secs_f64(), records_in(&job, uid));
    job.cancel();
    job.wait();
    (dt, (n1 - n0) as f64 / dt)
}

/// Samples the longest batch (or synchronous snapshot step) per 5 ms window until `until`.
fn stalls(job: &JobHandle, mut until: impl FnMut() -> bool) -> Vec<u64> {
    let mut out = Vec::new();
    job.take_max_stall_us();
    while !until() {
        std::thread::sleep(Duration::from_millis(5));
        out.push(job.take_max_stall_us());
    }
    out
}

fn savepoint(keys: u64, payload: usize, dir: &str, compression: &str) {
    // SJOB_BENCH_PARALLELISM: the job's parallelism (2 unless set), 1 as an upgrade's job has.
    let parallelism: u32 = std::env::var("SJOB_BENCH_PARALLELISM")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(2);
    let yaml = format!(
        r#"name: big-state
parallelism: {parallelism}
stateCompression: {compression}
operators:
  - {{kind: generator, uid: source, keys: {keys}, payloadBytes: {payload}}}
  - {{kind: keyBy, field: key}}
  - {{kind: max, uid: latest, field: payload, type: string}}
  - {{kind: discardSink}}
"#
    );
    let spec = JobSpec::from_yaml(&yaml).expect("bench job parses");
    let _ = std::fs::remove_dir_all(dir);
    reset_peak_rss();
    let fill = Instant::now();
    // SJOB_BENCH_WRITER_NICE: the writers' nice value, to weigh stalls against savepoint time.
    let mut options = JobOptions::default();
    if let Some(n) = std::env::var("SJOB_BENCH_WRITER_NICE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.writer_nice = n;
    }
    // SJOB_BENCH_TASK_NICE: the tasks' nice value (the engine's default unless set).
    if let Some(n) = std::env::var("SJOB_BENCH_TASK_NICE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.task_nice = n;
    }
    let (writer_nice, task_nice) = (options.writer_nice, options.task_nice);
    let job = engine::start(&spec, options).expect("bench job starts");
    while records_in(&job, "latest") < keys + keys / 10 {
        std::thread::sleep(Duration::from_millis(50));
        if job.state() != JobState::Running {
            panic!("job ended: {:?}", job.failure());
        }
    }
    let fill_s = fill.elapsed().as_secs_f64();
    let base_start = Instant::now();
    let mut baseline = stalls(&job, || base_start.elapsed() >= Duration::from_secs(2));
    let rss_before = status_mb("VmRSS:");
    // The peak so far is the fill's (tables growing); the savepoint's comes on top of it.
    let peak_fill = peak_rss_mb();
    let t = Instant::now();
    let rx = job.trigger_savepoint(dir, None);
    let mut result = None;
    let mut during = stalls(&job, || match rx.try_recv() {
        Ok(r) => {
            result = Some(r);
            true
        }
        Err(_) => false,
    });
    let sp_s = t.elapsed().as_secs_f64();
    if std::env::var_os("SJOB_BENCH_STALLS").is_some() {
        eprintln!("stalls during the savepoint (µs per 5 ms): {during:?}");
    }
    match result {
        Some(Ok(_)) => {}
        other => panic!("savepoint failed: {other:?}"),
    }
    let rss_run = peak_rss_mb();
    // Stop with a savepoint, as an upgrade does: the sources pause at the barrier, so the
    // writers have the machine to themselves.
    let t = Instant::now();
    let path = job
        .stop_with_savepoint(dir, false)
        .expect("stop-with-savepoint");
    let stop_s = t.elapsed().as_secs_f64();
    // The stopped job's state is freed after its end, off its path; the restore is timed once
    // it is gone (an upgrade's new process has the machine to itself).
    job.wait_freed();
    drop(job);
    let meta = sjob::savepoint::metadata::SnapshotMetadata::read(
        &sjob::savepoint::store::Store::open(&path).expect("savepoint path"),
    )
    .expect("savepoint metadata");
    // Rates are of the state's encoded size, before compression: the same state gives the
    // same figure whatever the compression.
    let mb = meta.raw_state_bytes() as f64 / 1e6;
    let stored_mb = meta.total_bytes() as f64 / 1e6;

    // What the first job's allocator kept goes back to the system first: an upgrade restores
    // in a new process.
    // SAFETY: mi_collect has no preconditions; it only returns free memory.
    unsafe { libmimalloc_sys::mi_collect(true) };
    reset_peak_rss();
    let t = Instant::now();
    let job = engine::start(
        &spec,
        JobOptions {
            savepoint: Some(path.clone()),
            ..Default::default()
        },
    )
    .expect("restore starts");
    let loaded_s = t.elapsed().as_secs_f64();
    while records_in(&job, "latest") == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let restore_s = t.elapsed().as_secs_f64();
    let rss_restore = peak_rss_mb();
    job.cancel();
    job.wait();
    println!(
        "{{\"bench\":\"savepoint\",\"engine\":\"sjob\",\"keys\":{keys},\"compression\":\"{compression}\",\"writer_nice\":{writer_nice},\"task_nice\":{task_nice},\"state_mb\":{mb:.1},\"stored_mb\":{stored_mb:.1},\"fill_s\":{fill_s:.1},\"savepoint_s\":{sp_s:.3},\"savepoint_mb_per_s\":{:.0},\"stop_savepoint_s\":{stop_s:.3},\"stop_savepoint_mb_per_s\":{:.0},\"restore_s\":{restore_s:.3},\"restore_load_s\":{loaded_s:.3},\"restore_mb_per_s\":{:.0},\"stall_p99_ms_during\":{:.2},\"stall_max_ms_during\":{:.2},\"stall_p99_ms_baseline\":{:.2},\"rss_mb_before_savepoint\":{rss_before:.0},\"peak_rss_mb_fill\":{peak_fill:.0},\"peak_rss_mb_running\":{rss_run:.0},\"peak_rss_mb_restore\":{rss_restore:.0},\"path\":\"{path}\"}}",
        mb / sp_s,
        mb / stop_s,
        mb / restore_s,
        percentile(&mut during, 0.99) as f64 / 1000.0,
        during.iter().max().copied().unwrap_or(0) as f64 / 1000.0,
        percentile(&mut baseline, 0.99) as f64 / 1000.0,
    );
}

/// The state-file writer alone: 2M entries of a 240-byte string, written once.
fn write_only(dir: &str, compression: &str, threads: &str) {
    let compression: sjob::savepoint::metadata::Compression =
        serde_yaml::from_str(compression).expect("compression: lz4 or none");
    use sjob::savepoint::keygroups::{key_group, range_for_subtask};
    use sjob::savepoint::statefile::{
        GroupTable, KeyedSnapshot, StateEntry, SubtaskSnapshot, WriterThreads,
    };
    let threads = match threads {
        "2" => WriterThreads::Two,
        _ => WriterThreads::One,
    };
    use sjob::savepoint::value::Value;
    let range = range_for_subtask(128, 1, 0);
    let mut groups: Vec<GroupTable> = (0..128).map(|_| GroupTable::default()).collect();
    for i in 0..2_000_000i64 {
        let k = Value::Int(i);
        let kg = key_group(&k, 128) as usize;
        let payload = format!("{i:016x}{}", ".".repeat(224));
        groups[kg].insert(
            k,
            StateEntry::Value(vec![Value::from(payload.as_str()), Value::Int(i)].into()),
        );
    }
    let t = Instant::now();
    let copies: Vec<GroupTable> = groups.to_vec();
    eprintln!(
        "copy-on-write cost: cloning {} entries took {:?}",
        copies.iter().map(|g| g.len()).sum::<usize>(),
        t.elapsed()
    );
    drop(copies);
    let mut snap = SubtaskSnapshot {
        keyed: Some(KeyedSnapshot {
            range,
            tables: vec![groups],
        }),
        operator_lists: vec![],
    };
    let _ = std::fs::remove_dir_all(dir);
    let store = sjob::savepoint::store::Store::open(dir).expect("store");
    // The job's live tables keep their entries while a writer lets go of its views: kept
    // here too, so the timing is the write's and not the freeing of the state.
    let live = snap.clone();
    let t = Instant::now();
    let st = sjob::savepoint::statefile::write(
        &store,
        "operators/x-0-y",
        0,
        &mut snap,
        compression,
        threads,
    )
    .expect("write");
    let s = t.elapsed().as_secs_f64();
    println!(
        "{{\"bench\":\"write\",\"compression\":\"{compression}\",\"threads\":\"{threads:?}\",\"mb\":{:.0},\"stored_mb\":{:.0},\"seconds\":{s:.3},\"mb_per_s\":{:.0}}}",
        st.raw_bytes() as f64 / 1e6,
        st.size as f64 / 1e6,
        st.raw_bytes() as f64 / 1e6 / s
    );
    drop(live);
}

/// The state tables alone, without a job: `keys` entries of one string of `payload` bytes,
/// inserted as a keyed `max` does, spread over 128 key groups. Prints the process's memory per
/// entry, to weigh against the savepoint bench's running and restoring figures.
fn memory(keys: u64, payload: usize) {
    use sjob::savepoint::statefile::{GroupTable, StateEntry};
    use sjob::savepoint::value::Value;
    let rss0 = status_mb("VmRSS:");
    let mut groups: Vec<GroupTable> = (0..128).map(|_| GroupTable::default()).collect();
    for i in 0..keys {
        let k = Value::Int(i as i64);
        let kg = sjob::savepoint::keygroups::key_group(&k, 128) as usize;
        let mut p = format!("{i:016x}");
        p.extend(std::iter::repeat_n('.', payload.saturating_sub(p.len())));
        groups[kg].insert(k, StateEntry::Value(vec![Value::from(p.as_str())].into()));
    }
    let rss = status_mb("VmRSS:") - rss0;
    println!(
        "{{\"bench\":\"memory\",\"keys\":{keys},\"payload\":{payload},\"rss_mb\":{rss:.0},\"bytes_per_entry\":{:.0},\"slot_bytes\":{}}}",
        rss * 1e6 / keys as f64,
        std::mem::size_of::<(Value, StateEntry)>()
    );
    drop(groups);
}

fn main() {
    // As the `sjob` binary does (MIMALLOC_ALLOW_THP=0 or 1 fixes them, to compare).
    sjob::allocator::manage_huge_pages();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("throughput") => throughput(num(1, 20), num(2, 100_000), num(3, 2) as u32),
        Some("windows") => windows(
            num(1, 20),
            num(2, 100_000),
            num(3, 2) as u32,
            num(4, 1_000_000),
        ),
        Some("skew") => skew(
            num(1, 600),
            num(2, 30),
            num(3, 100_000),
            num(4, 2) as u32,
            num(5, 10_000),
            args.get(6).map(String::as_str),
        ),
        Some("bounded") => bounded(
            args.get(1).map(String::as_str).unwrap_or("count"),
            num(2, 500_000),
        ),
        Some("write") => write_only(
            args.get(1)
                .map(String::as_str)
                .unwrap_or("/tmp/sjob-bench-write"),
            args.get(2).map(String::as_str).unwrap_or("lz4"),
            args.get(3).map(String::as_str).unwrap_or("1"),
        ),
        Some("memory") => memory(num(1, 4_000_000), num(2, 240) as usize),
        Some("savepoint") => savepoint(
            num(1, 4_000_000),
            num(2, 240) as usize,
            args.get(3)
                .map(String::as_str)
                .unwrap_or("/tmp/sjob-bench-savepoints"),
            args.get(4).map(String::as_str).unwrap_or("lz4"),
        ),
        _ => eprintln!(
            "usage: engine throughput [SECONDS] [KEYS] [P] | windows [SECONDS] [KEYS] [P] [SIZE_MS] | skew [SECONDS] [EVERY_S] [KEYS] [P] [SIZE_MS] [MAX_DRIFT] | savepoint [KEYS] [PAYLOAD_BYTES] [DIR] [lz4|none] | memory [KEYS] [PAYLOAD_BYTES] | bounded WORKLOAD [RECORDS] | write [DIR] [lz4|none] [1|2 threads]"
        ),
    }
}
