"""Turns the benchmark runs (one JSON object per line) into the table, results.json and
chart.png: the median of each figure over the runs, its spread (min–max), and sjob/Flink."""
import json, os, statistics, sys

raw, out = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(raw) if l.strip().startswith("{")]


def pick(bench, key, **where):
    vals = []
    for r in rows:
        if r.get("bench") == bench and all(r.get(k) == v for k, v in where.items()) and r.get(key) is not None:
            vals.append(float(r[key]))
    return vals


def stat(vals):
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": len(vals)}


# (scenario, unit, sjob figures, flink figures, better: "higher" or "lower", note)
scenarios = [
    ("1. keyed count, 100k keys, p=2", "records/s",
     pick("throughput", "records_per_s", engine="sjob"), pick("throughput", "records_per_s", engine="flink"), "higher", ""),
    ("2. savepoint of ~1 GB: duration", "s", pick("savepoint", "savepoint_s", engine="sjob"),
     pick("savepoint", "savepoint_s", engine="flink"), "lower",
     "4M keys, 240-byte string each, p=2, job running; Flink: heap (hashmap) state, canonical format, REST trigger -> COMPLETED"),
    ("2. savepoint of ~1 GB: throughput", "MB/s", pick("savepoint", "savepoint_mb_per_s", engine="sjob"),
     pick("savepoint", "savepoint_mb_per_s", engine="flink"), "higher", ""),
    ("2. stop-with-savepoint of ~1 GB", "s", pick("savepoint", "stop_savepoint_s", engine="sjob"),
     pick("savepoint", "stop_savepoint_s", engine="flink"), "lower", ""),
    ("3. restore until records flow", "s", pick("savepoint", "restore_s", engine="sjob"),
     pick("savepoint", "restore_s", engine="flink"), "lower",
     "until the keyed operator's first record; Flink: from the REST submit, by the keyed function's own clock"),
    ("4. p99 stall during the savepoint", "ms", pick("savepoint", "stall_p99_ms_during", engine="sjob"),
     pick("savepoint", "stall_p99_ms_during", engine="flink"), "lower",
     "longest stall per 5 ms window; sjob: its longest batch; Flink: longest gap between two records in the keyed "
     "function (GC pauses and waits for input included)"),
    ("4. p99 stall without a savepoint", "ms", pick("savepoint", "stall_p99_ms_baseline", engine="sjob"),
     pick("savepoint", "stall_p99_ms_baseline", engine="flink"), "lower", "the 2 s before the savepoint"),
    ("5. upgrade downtime, tiny state", "s", pick("upgrade_downtime", "until_records_flow_s", engine="sjob", keys=100000),
     pick("upgrade_downtime", "until_tasks_running_s", engine="flink", payload_bytes=0), "lower",
     "sjob: apply -> new job's records flowing, through the operator; Flink: stop request -> every task running, REST only"),
    ("5. upgrade downtime, ~100 MB state", "s", pick("upgrade_downtime", "until_records_flow_s", engine="sjob", keys=400000),
     pick("upgrade_downtime", "until_tasks_running_s", engine="flink", payload_bytes=240), "lower",
     "target < 1 s; p=1 on both; Flink: BigStateJob, 400,000 keys x 240 bytes"),
    ("6. operator RSS, idle", "MB", pick("operator_footprint", "rss_mb_idle"), [], "lower", ""),
    ("6. operator RSS, 1,000 StatefulJobs", "MB", pick("operator_footprint", "rss_mb_loaded"), [], "lower", "target < 50 MB"),
    ("6. reconciles per job per minute, idle", "1/min", pick("operator_footprint", "reconciles_per_job_per_min"), [], "lower", ""),
    ("6. API writes while nothing changes", "writes", pick("operator_footprint", "api_writes_in_window"), [], "lower", "target 0"),
    ("7. retention sweep, 10,000 savepoints", "s", pick("retention_sweep", "sweep_s"), [], "lower", ""),
    ("7. retention sweep: operator API calls", "calls", pick("retention_sweep", "operator_api_calls_total"), [], "lower", ""),
    ("8. instructions per record, keyed count", "instructions",
     pick("instructions", "instructions_per_record", workload="count"), [], "lower", "callgrind, N and 2N records"),
    ("8. instructions per record, 1,000 s windows", "instructions",
     pick("instructions", "instructions_per_record", workload="windows-1000s"), [], "lower", "firing included"),
    ("8. instructions per record, 1 ms windows", "instructions",
     pick("instructions", "instructions_per_record", workload="windows-1ms"), [], "lower", ""),
]

results = []
for name, unit, s, f, better, note in scenarios:
    ss, fs = stat(s), stat(f)
    ratio = None
    if ss and fs and ss["median"] and fs["median"]:
        # How many times better sjob is, whichever direction is better.
        ratio = ss["median"] / fs["median"] if better == "higher" else fs["median"] / ss["median"]
    results.append({"scenario": name, "unit": unit, "better": better, "sjob": ss, "flink": fs,
                    "sjob_advantage": ratio, "note": note})


def num(x):
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt(st):
    if not st:
        return "—"
    spread = f" ({num(st['min'])}–{num(st['max'])})" if st["runs"] > 1 else ""
    return num(st["median"]) + spread


print()
print(f"{'scenario':44} {'unit':>9} {'sjob median (spread)':>34} {'Flink median (spread)':>34} {'sjob ×':>7}")
for r in results:
    adv = f"{r['sjob_advantage']:.2f}" if r["sjob_advantage"] else "—"
    print(f"{r['scenario']:44} {r['unit']:>9} {fmt(r['sjob']):>34} {fmt(r['flink']):>34} {adv:>7}")
print()
print("sjob × = how many times better sjob is (above 1: better, below 1: worse). Notes:")
for r in results:
    if r["note"]:
        print(f"  {r['scenario']}: {r['note']}")

with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump({"results": results, "runs": rows}, fh, indent=2)
print(f"\nwritten: {os.path.join(out, 'results.json')}")

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("no chart: matplotlib is not installed")
    sys.exit(0)

pairs = [r for r in results if r["sjob"] and r["flink"]]
singles = [r for r in results if r["sjob"] and not r["flink"]]
fig, axes = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1, 2]})
ax = axes[0]
labels = [r["scenario"].split(". ", 1)[-1] for r in pairs]
ax.barh(labels, [r["sjob_advantage"] for r in pairs], color=["tab:green" if r["sjob_advantage"] >= 1 else "tab:red" for r in pairs])
ax.axvline(1, color="black", linewidth=1)
ax.set_xlabel("sjob advantage over Flink (× better, median)")
ax.set_title("sjob vs Flink, same machine, same run")
ax = axes[1]
ax.axis("off")
text = [[r["scenario"], r["unit"], fmt(r["sjob"])] for r in singles]
table = ax.table(cellText=text, colLabels=["scenario (sjob only)", "unit", "median (spread)"], loc="center",
                 cellLoc="left", colWidths=[0.55, 0.12, 0.33])
table.auto_set_font_size(False)
table.set_fontsize(9)
table.scale(1, 1.4)
fig.tight_layout()
path = os.path.join(out, "chart.png")
fig.savefig(path, dpi=110)
print(f"written: {path}")
