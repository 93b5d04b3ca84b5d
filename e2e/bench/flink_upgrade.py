"""Measures Flink's upgrade downtime the way a Flink user upgrades without an operator: run a
job on a session cluster, stop it with a savepoint over REST, submit the job again from that
savepoint, and time from the stop request until every task of the new job runs (a task is
RUNNING once its state is restored).

  flink_upgrade.py REST JAR [KEYS] [PARALLELISM] [PAYLOAD]

Without PAYLOAD (or 0): CountJob, a count per key (tiny state). With PAYLOAD: BigStateJob,
a PAYLOAD-byte string per key (KEYS * PAYLOAD bytes of state)."""
import json, os, shutil, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flink_rest  # noqa: E402

REST = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8081"
JAR = sys.argv[2]
KEYS = int(sys.argv[3]) if len(sys.argv) > 3 else 100000
P = int(sys.argv[4]) if len(sys.argv) > 4 else 2
PAYLOAD = int(sys.argv[5]) if len(sys.argv) > 5 else 0


def call(method, path, body=None, headers=None):
    return flink_rest.call(REST, method, path, body, headers)


def run(jar_id, savepoint=None):
    if PAYLOAD:
        job_args = {"entryClass": "demo.BigStateJob", "programArgsList": ["--keys", str(KEYS), "--payload", str(PAYLOAD)]}
    else:
        job_args = {"entryClass": "demo.CountJob", "programArgsList": ["--keys", str(KEYS)]}
    body = {**job_args, "parallelism": P}
    if savepoint:
        body["savepointPath"] = savepoint
    return call("POST", f"/jars/{jar_id}/run", body)["jobid"]


def all_running(job):
    j = call("GET", f"/jobs/{job}")
    return j["state"] == "RUNNING" and all(v["status"] == "RUNNING" for v in j["vertices"])


def wait(pred, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise SystemExit(f"flink: not {what} within {timeout}s")


jar_id = flink_rest.upload(REST, JAR)
job = run(jar_id)
new = location = None
try:
    wait(lambda: all_running(job), "running")
    time.sleep(10)  # every key in state
    t0 = time.time()
    location, _ = flink_rest.savepoint(REST, job, "stop", {"drain": False})
    t_saved = time.time()
    new = run(jar_id, location)
    wait(lambda: all_running(new), "running again")
    t1 = time.time()
    state_mb = flink_rest.dir_bytes(location) / 1e6 if location.startswith("file:") else None
    print(json.dumps({"bench": "upgrade_downtime", "engine": "flink", "keys": KEYS, "parallelism": P,
                      "payload_bytes": PAYLOAD, "state_mb": state_mb,
                      "stop_with_savepoint_s": round(t_saved - t0, 3),
                      "until_tasks_running_s": round(t1 - t0, 3), "savepoint": location}))
finally:
    for j in (job, new):
        if j:
            try:
                call("PATCH", f"/jobs/{j}?mode=cancel")
            except Exception:
                pass
    if location and location.startswith("file:"):
        time.sleep(1)  # the cancelled job lets go of its files
        shutil.rmtree(flink_rest.local_path(location), ignore_errors=True)
