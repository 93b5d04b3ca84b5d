"""Flink's side of the savepoint benchmarks (scenarios 2-4), the same steps as sjob's
`cargo bench --bench engine -- savepoint`: run BigStateJob (KEYS keys, a PAYLOAD-byte string
per key in heap state, parallelism 2) on a session cluster until every key was seen, take a
savepoint, stop with a savepoint, restore from it, over REST. Prints one JSON line.

  flink_savepoint.py REST JAR [KEYS] [PAYLOAD] [TARGET]

TARGET: where the savepoints go (default: the cluster's state.savepoints.dir); an s3://bucket/
prefix needs the cluster started with FLINK_S3_ENDPOINT (flink-local.sh) and S3_ROOT set to the
directory the S3 server keeps its buckets in (versitygw's posix root), to measure and delete them.

- savepoint_s: POST /jobs/:id/savepoints until the trigger reads COMPLETED (polled every 20 ms);
  savepoint_flink_s is Flink's own figure (trigger to last acknowledgement).
- state_mb: bytes in the savepoint directory (1 MB = 1e6 bytes, as sjob counts).
- restore_s: POST /jars/:id/run with savepointPath until the keyed function processes its first
  record (its own clock, in the job's stats file); restore_rest_s is when the keyed vertex's
  read-records over REST first moved (later by up to the metric refresh, 200 ms in flink-local.sh).
  Most of it is reading the state: Flink 2.3 reads a local savepoint in tiny unbuffered reads
  (about 26 bytes per read syscall, seen in /proc/<taskmanager>/io).
- stall_*: the longest gap between two records in the keyed function, per 5 ms window (see
  BigStateJob.java), p99 and max over the windows while the savepoint was written, and p99 over 2 s
  before it. sjob's figure is its longest batch per 5 ms window: both are "how long did keyed
  processing stand still", Flink's also counts time spent waiting for input.

Needs the TaskManager on this machine: the job writes its stall samples to a local file, and the
savepoint directories are measured and deleted here.
"""
import json, os, shutil, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flink_rest  # noqa: E402

REST = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8081"
JAR = sys.argv[2]
KEYS = int(sys.argv[3]) if len(sys.argv) > 3 else 4000000
PAYLOAD = int(sys.argv[4]) if len(sys.argv) > 4 else 240
TARGET = sys.argv[5] if len(sys.argv) > 5 else None
if TARGET and TARGET.startswith("s3://") and not os.environ.get("S3_ROOT"):
    raise SystemExit("flink_savepoint.py: an s3:// TARGET needs S3_ROOT (the S3 server's bucket root)")
P = 2


def call(method, path, body=None):
    return flink_rest.call(REST, method, path, body)


def run(jar_id, stats, savepoint=None):
    # Flink 2 reads arguments from programArgsList only (it ignores the old string programArgs).
    body = {"entryClass": "demo.BigStateJob", "parallelism": P,
            "programArgsList": ["--keys", str(KEYS), "--payload", str(PAYLOAD), "--stats", stats]}
    if savepoint:
        body["savepointPath"] = savepoint
    return call("POST", f"/jars/{jar_id}/run", body)["jobid"]


def keyed_records(job):
    j = call("GET", f"/jobs/{job}")
    if j["state"] in ("FAILED", "CANCELED", "FINISHED"):
        raise SystemExit(f"flink: job {job} is {j['state']}")
    return [v for v in j["vertices"] if v["name"].startswith("latest")][0]["metrics"]["read-records"]


def savepoint(job, path, body):
    if TARGET:
        body = {**body, "target-directory": TARGET}
    return flink_rest.savepoint(REST, job, path, body)


def samples(stats):
    """(epoch seconds, gap ms) per 5 ms window, and the first record's epoch seconds or None."""
    windows, first = [], None
    if os.path.exists(stats):
        for line in open(stats):
            a, b = line.split()
            if a == "first":
                first = int(b) / 1000
            else:
                windows.append((int(a) / 1000, int(b) / 1000))
    return windows, first


def p99(vals):
    vals = sorted(vals)
    return vals[round((len(vals) - 1) * 0.99)] if vals else 0.0


tmp = tempfile.mkdtemp(prefix="flink-bigstate-")
jar_id = flink_rest.upload(REST, JAR)
jobs, locations = [], []
try:
    t_fill = time.time()
    job = run(jar_id, f"{tmp}/fill.txt")
    jobs.append(job)
    while keyed_records(job) < KEYS + KEYS // 10:  # every key seen once (records interleave keys)
        time.sleep(0.2)
    fill_s = time.time() - t_fill
    b0 = time.time()
    time.sleep(2)
    b1 = time.time()

    t0 = time.time()
    location, sp_s = savepoint(job, "savepoints", {"cancel-job": False})
    t1 = time.time()
    locations.append(location)
    time.sleep(0.1)  # the sampler's last windows reach the file
    windows, _ = samples(f"{tmp}/fill.txt")
    during = [g for t, g in windows if t0 < t <= t1]
    baseline = [g for t, g in windows if b0 < t <= b1]
    stats = [c for c in call("GET", f"/jobs/{job}/checkpoints")["history"] if c.get("external_path") == location]
    sp_flink_s = stats[0]["end_to_end_duration"] / 1000 if stats else None
    fmt = stats[0].get("savepointFormat") if stats else None
    mb = flink_rest.dir_bytes(location) / 1e6

    # Stop with a savepoint, as an upgrade does; completes when the job has finished.
    stop_location, stop_s = savepoint(job, "stop", {"drain": False})
    locations.append(stop_location)

    t_sub = time.time()
    restored = run(jar_id, f"{tmp}/restore.txt", stop_location)
    jobs.append(restored)
    while keyed_records(restored) == 0:
        time.sleep(0.02)
    restore_rest_s = time.time() - t_sub
    _, first = samples(f"{tmp}/restore.txt")
    for _ in range(100):  # the sampler writes the first record's time within 5 ms
        if first:
            break
        time.sleep(0.02)
        _, first = samples(f"{tmp}/restore.txt")
    if first is None:
        raise SystemExit("flink: the restored job's stats file has no first record")
    restore_s = first - t_sub

    print(json.dumps({
        "bench": "savepoint", "engine": "flink", "keys": KEYS, "payload_bytes": PAYLOAD, "parallelism": P,
        "target": TARGET or "file", "state_backend": "hashmap", "savepoint_format": fmt, "state_mb": round(mb, 1),
        "fill_s": round(fill_s, 1),
        "savepoint_s": round(sp_s, 3), "savepoint_flink_s": sp_flink_s, "savepoint_mb_per_s": round(mb / sp_s),
        "stop_savepoint_s": round(stop_s, 3), "stop_savepoint_mb_per_s": round(mb / stop_s),
        "restore_s": round(restore_s, 3), "restore_rest_s": round(restore_rest_s, 3),
        "restore_mb_per_s": round(mb / restore_s),
        "stall_p99_ms_during": round(p99(during), 2), "stall_max_ms_during": round(max(during, default=0), 2),
        "stall_p99_ms_baseline": round(p99(baseline), 2), "stall_windows_during": len(during)}))
finally:
    for j in jobs:
        try:
            call("PATCH", f"/jobs/{j}?mode=cancel")
        except Exception:
            pass
    time.sleep(1)  # cancelled tasks let go of their stats files
    for loc in locations:
        shutil.rmtree(flink_rest.local_path(loc), ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
