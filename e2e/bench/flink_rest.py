"""Calls to a Flink session cluster's REST API that the benchmark scripts share."""
import json, os, time, urllib.request


def call(rest, method, path, body=None, headers=None):
    """A REST call; a dict body goes as JSON. Returns the decoded JSON answer."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = headers or ({"Content-Type": "application/json"} if isinstance(body, dict) else {})
    req = urllib.request.Request(rest + path, data=data, method=method, headers=hdrs)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"{}")


def upload(rest, jar):
    """Uploads a job jar; returns its id for /jars/<id>/run."""
    boundary = "sjobbench"
    data = open(jar, "rb").read()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"jarfile\"; filename=\"count.jar\"\r\n"
            f"Content-Type: application/x-java-archive\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    r = call(rest, "POST", "/jars/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return r["filename"].split("/")[-1]


def savepoint(rest, job, path, body):
    """Triggers a savepoint (path "savepoints") or a stop-with-savepoint ("stop") and waits for
    it; returns (location, seconds from the request to completion)."""
    t0 = time.time()
    trigger = call(rest, "POST", f"/jobs/{job}/{path}", body)["request-id"]
    while True:
        st = call(rest, "GET", f"/jobs/{job}/savepoints/{trigger}")
        if st["status"]["id"] == "COMPLETED":
            op = st.get("operation", {})
            if "failure-cause" in op:
                raise SystemExit(f"flink: {path} failed: {str(op['failure-cause'])[:2000]}")
            return op["location"], time.time() - t0
        time.sleep(0.02)


def local_path(location):
    """The directory of a savepoint location on this machine's file system: file:..., or
    s3://bucket/key under S3_ROOT (the local S3 server's bucket root)."""
    for scheme in ("s3://", "s3a://", "s3p://"):
        if location.startswith(scheme):
            return os.path.join(os.environ["S3_ROOT"], location.removeprefix(scheme))
    return location.removeprefix("file:").removeprefix("//")


def dir_bytes(location):
    """The bytes of every file of a savepoint directory."""
    d = local_path(location)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def taskmanager_mb(field):
    """A memory figure of the TaskManager started by flink-local.sh from /proc/<pid>/status
    (`VmHWM:` peak, `VmRSS:` now), in MB; 0 when it cannot be read."""
    try:
        home = os.environ.get("FLINK_HOME", "/tmp/sjob-flink")
        pid = open(os.path.join(home, "taskmanager.pid")).read().strip()
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0
