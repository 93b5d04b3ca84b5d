"""Measures Flink's throughput: runs a job of count.jar (CountJob by default; WindowJob for the
windows benchmark) on a Flink session cluster over REST and reads the keyed vertex's
read-records before and after a measured interval, and the TaskManager's peak resident memory.

    flink_count.py REST JAR [SECONDS] [KEYS] [P] [ENTRY_CLASS] [BENCH_NAME] [PROGRAM_ARGS...]"""
import json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flink_rest  # noqa: E402

REST = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8081"
JAR = sys.argv[2]
SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else 20
KEYS = int(sys.argv[4]) if len(sys.argv) > 4 else 100000
P = int(sys.argv[5]) if len(sys.argv) > 5 else 2
ENTRY = sys.argv[6] if len(sys.argv) > 6 else "demo.CountJob"
BENCH = sys.argv[7] if len(sys.argv) > 7 else "throughput"
EXTRA = sys.argv[8:]


def taskmanager_peak_rss_mb():
    return flink_rest.taskmanager_mb("VmHWM:")


def call(method, path, body=None, headers=None):
    return flink_rest.call(REST, method, path, body, headers)


def counter_vertex(job):
    j = call("GET", f"/jobs/{job}")
    # The vertex that reads the keyed stream (chained with the sink).
    return [v for v in j["vertices"] if "Source" not in v["name"]][0]


def counter_records(job):
    return counter_vertex(job)["metrics"]["read-records"]


jar_id = flink_rest.upload(REST, JAR)
run = call("POST", f"/jars/{jar_id}/run", json.dumps({"entryClass": ENTRY, "programArgsList": ["--keys", str(KEYS)] + EXTRA, "parallelism": P}).encode(),
           {"Content-Type": "application/json"})
job = run["jobid"]
try:
    for _ in range(120):
        if call("GET", f"/jobs/{job}")["state"] == "RUNNING":
            break
        time.sleep(0.5)
    def fresh(previous):
        # The web monitor refreshes metrics every few seconds: wait for a new value, and take
        # the time at which it was first seen.
        while True:
            n = counter_records(job)
            if n != previous:
                return n, time.time()
            time.sleep(0.05)

    time.sleep(5)  # warm up
    n0, t0 = fresh(fresh(counter_records(job))[0])
    time.sleep(SECONDS)
    n1, t1 = fresh(counter_records(job))
    v = counter_vertex(job)
    # A cross-check that needs no timing of metric refreshes: all records over the vertex's
    # whole running time (start-up included, so a lower bound).
    average = v["metrics"]["read-records"] / max(v["duration"] / 1000, 1e-3)
    print(json.dumps({"bench": BENCH, "engine": "flink", "keys": KEYS, "parallelism": P,
                      "args": EXTRA, "seconds": round(t1 - t0, 2),
                      "records_per_s": round((n1 - n0) / (t1 - t0)),
                      "records_per_s_since_start": round(average),
                      "peak_rss_mb": taskmanager_peak_rss_mb()}))
finally:
    call("PATCH", f"/jobs/{job}?mode=cancel")
