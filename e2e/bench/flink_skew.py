"""Flink's side of the skew benchmark: WindowJob (--size-ms SIZE, five aggregates per key) at
full speed for SECONDS, a savepoint every EVERY seconds: its size in MB (1e6 bytes), the
TaskManager's resident memory, one JSON line per sample; then the largest sample over the
smallest, as `cargo bench --bench engine -- skew` prints for sjob. Savepoints are deleted
after measuring.

    flink_skew.py REST JAR [SECONDS] [EVERY] [KEYS] [P] [SIZE_MS]"""
import json, os, shutil, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flink_rest  # noqa: E402

REST = sys.argv[1]
JAR = sys.argv[2]
SECONDS = int(sys.argv[3]) if len(sys.argv) > 3 else 600
EVERY = int(sys.argv[4]) if len(sys.argv) > 4 else 30
KEYS = int(sys.argv[5]) if len(sys.argv) > 5 else 100000
P = int(sys.argv[6]) if len(sys.argv) > 6 else 2
SIZE_MS = int(sys.argv[7]) if len(sys.argv) > 7 else 10000


def taskmanager_rss_mb():
    return flink_rest.taskmanager_mb("VmRSS:")


jar_id = flink_rest.upload(REST, JAR)
run = flink_rest.call(REST, "POST", f"/jars/{jar_id}/run", {
    "entryClass": "demo.WindowJob", "parallelism": P,
    "programArgsList": ["--keys", str(KEYS), "--size-ms", str(SIZE_MS)]})
job = run["jobid"]
sizes, rss = [], []
try:
    for _ in range(120):
        if flink_rest.call(REST, "GET", f"/jobs/{job}")["state"] == "RUNNING":
            break
        time.sleep(0.5)
    started = time.time()
    while time.time() - started < SECONDS:
        time.sleep(EVERY)
        location, _ = flink_rest.savepoint(REST, job, "savepoints", {"cancel-job": False})
        mb = flink_rest.dir_bytes(location) / 1e6
        shutil.rmtree(flink_rest.local_path(location), ignore_errors=True)
        r = taskmanager_rss_mb()
        print(json.dumps({"bench": "skew", "engine": "flink", "t_s": round(time.time() - started),
                          "savepoint_mb": round(mb, 2), "rss_mb": r}), flush=True)
        sizes.append(mb)
        rss.append(r)
finally:
    flink_rest.call(REST, "PATCH", f"/jobs/{job}?mode=cancel")
ratio = lambda v: max(v) / max(min(v), 1e-9) if v else 0


def growth(v):
    # One savepoint's size depends on when windows last fired; growth shows in the medians.
    early, late = sorted(v[:len(v) // 2]), sorted(v[len(v) // 2:])
    return late[len(late) // 2] / max(early[len(early) // 2], 1e-9) if early else 0


print(json.dumps({"bench": "skew-summary", "engine": "flink", "samples": len(sizes),
                  "savepoint_max_over_min": round(ratio(sizes), 2),
                  "savepoint_late_over_early_median": round(growth(sizes), 2),
                  "rss_max_over_min": round(ratio(rss), 2),
                  "rss_late_over_early_median": round(growth(rss), 2)}))
