"""Turns the benchmark runs (one JSON object per line) into the table, results.json and
chart.png: the median of each figure over the runs, its spread (min–max), and sjob/Flink."""
import json, os, statistics, sys

raw, out = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(raw) if l.strip().startswith("{")]


def window_ms(r):
    """A windows run's window size: sjob prints size_ms, Flink's script its program's args."""
    if r.get("size_ms") is not None:
        return int(r["size_ms"])
    args = r.get("args") or []
    return int(args[args.index("--size-ms") + 1]) if "--size-ms" in args else None


def matches(r, bench, where):
    if r.get("bench") != bench:
        return False
    for k, v in where.items():
        if k == "window_ms":
            if window_ms(r) != v:
                return False
        elif r.get(k) != v:
            return False
    return True


def pick(bench, key, **where):
    return [float(r[key]) for r in rows if matches(r, bench, where) and r.get(key) is not None]


def pick_over(bench, key, over, **where):
    """One figure over another in the same run (peak memory over the state's size)."""
    return [float(r[key]) / float(r[over]) for r in rows
            if matches(r, bench, where) and r.get(key) is not None and r.get(over)]


def stat(vals):
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": len(vals)}


# (scenario, unit, sjob figures, flink figures, better: "higher" or "lower", note, target)
# A target is ("x", n): sjob at least n times better than Flink; or (op, n) on sjob's median
# with op one of "<", "<=", ">=".
scenarios = [
    ("1. keyed count, 100k keys, p=2", "records/s",
     pick("throughput", "records_per_s", engine="sjob"), pick("throughput", "records_per_s", engine="flink"), "higher", "",
     ("x", 2)),
    ("1. windows of 1,000 s, 100k keys, p=2", "records/s",
     pick("windows", "records_per_s", engine="sjob", window_ms=1000000),
     pick("windows", "records_per_s", engine="flink", window_ms=1000000), "higher",
     "tumbling event-time windows, count/sum/min/max/avg per key and window, 10 records per key and window; Flink: WindowJob",
     ("x", 2)),
    ("1. windows of 1 ms, 100k keys, p=2", "records/s",
     pick("windows", "records_per_s", engine="sjob", window_ms=1),
     pick("windows", "records_per_s", engine="flink", window_ms=1), "higher", "one record per window, each fired",
     ("x", 2)),
    ("2. savepoint of ~1 GB: duration", "s", pick("savepoint", "savepoint_s", engine="sjob"),
     pick("savepoint", "savepoint_s", engine="flink"), "lower",
     "4M keys, 240-byte string each, p=2, job running; sjob: lz4 blocks (its default); Flink: heap (hashmap) state, "
     "canonical format, its default (no compression) unless started with FLINK_SNAPSHOT_COMPRESSION=true; "
     "REST trigger -> COMPLETED",
     ("x", 3)),
    ("2. savepoint of ~1 GB: throughput", "MB/s", pick("savepoint", "savepoint_mb_per_s", engine="sjob"),
     pick("savepoint", "savepoint_mb_per_s", engine="flink"), "higher", "MB of state before compression", (">=", 500)),
    ("2. stop-with-savepoint of ~1 GB", "s", pick("savepoint", "stop_savepoint_s", engine="sjob"),
     pick("savepoint", "stop_savepoint_s", engine="flink"), "lower", "", None),
    ("3. restore until records flow", "s", pick("savepoint", "restore_s", engine="sjob"),
     pick("savepoint", "restore_s", engine="flink"), "lower",
     "until the keyed operator's first record; Flink: from the REST submit, by the keyed function's own clock",
     ("x", 3)),
    ("4. p99 stall during the savepoint", "ms", pick("savepoint", "stall_p99_ms_during", engine="sjob"),
     pick("savepoint", "stall_p99_ms_during", engine="flink"), "lower",
     "longest stall per 5 ms window; sjob: its longest batch; Flink: longest gap between two records in the keyed "
     "function (GC pauses and waits for input included)",
     ("<", 20)),
    ("4. p99 stall without a savepoint", "ms", pick("savepoint", "stall_p99_ms_baseline", engine="sjob"),
     pick("savepoint", "stall_p99_ms_baseline", engine="flink"), "lower", "the 2 s before the savepoint", None),
    ("4. peak memory running ÷ state", "×", pick_over("savepoint", "peak_rss_mb_running", "state_mb", engine="sjob"),
     [], "lower", "the process's peak resident MB while the job runs and its savepoint is written, over the "
     "state's serialized MB", ("<=", 1.5)),
    ("4. peak memory filling ÷ state", "×", pick_over("savepoint", "peak_rss_mb_fill", "state_mb", engine="sjob"),
     [], "lower", "the peak before the savepoint (the tables growing to the full state); the running peak above "
     "is this plus what the savepoint costs", None),
    ("4. peak memory restoring ÷ state", "×", pick_over("savepoint", "peak_rss_mb_restore", "state_mb", engine="sjob"),
     [], "lower", "measured from a process that has returned the first job's memory", ("<=", 1.5)),
    ("5. upgrade downtime, tiny state", "s", pick("upgrade_downtime", "until_records_flow_s", engine="sjob", keys=100000),
     pick("upgrade_downtime", "until_tasks_running_s", engine="flink", payload_bytes=0), "lower",
     "sjob: apply -> new job's records flowing, through the operator; Flink: stop request -> every task running, REST only",
     None),
    ("5. upgrade downtime, ~100 MB state", "s",
     pick("upgrade_downtime", "until_records_flow_s", engine="sjob", keys=400000, compression="lz4"),
     pick("upgrade_downtime", "until_tasks_running_s", engine="flink", payload_bytes=240), "lower",
     "recreate upgrade; p=1 on both; Flink: BigStateJob, 400,000 keys x 240 bytes; sjob's state files lz4 "
     "(its default; ~5 MB stored), Flink's uncompressed (its default)",
     ("<", 0.25)),
    ("5. upgrade downtime, ~100 MB, uncompressed", "s",
     pick("upgrade_downtime", "until_records_flow_s", engine="sjob", keys=400000, compression="none"),
     pick("upgrade_downtime", "until_tasks_running_s", engine="flink", payload_bytes=240), "lower",
     "the same with stateCompression: none on sjob's side: ~101 MB written and read on both sides",
     ("<", 0.25)),
    ("6. operator RSS, idle", "MB", pick("operator_footprint", "rss_mb_idle"), [], "lower", "", None),
    ("6. operator RSS, 1,000 StatefulJobs", "MB", pick("operator_footprint", "rss_mb_loaded"), [], "lower", "",
     ("<", 50)),
    ("6. reconciles per job per minute, idle", "1/min", pick("operator_footprint", "reconciles_per_job_per_min"), [],
     "lower", "", None),
    ("6. API writes while nothing changes", "writes", pick("operator_footprint", "api_writes_in_window"), [], "lower", "",
     ("<=", 0)),
    ("7. retention sweep, 10,000 savepoints", "s", pick("retention_sweep", "sweep_s"), [], "lower", "", None),
    ("7. retention sweep: operator API calls", "calls", pick("retention_sweep", "operator_api_calls_total"), [], "lower",
     "", None),
    ("8. instructions per record, keyed count", "instructions",
     pick("instructions", "instructions_per_record", workload="count"), [], "lower", "callgrind, N and 2N records", None),
    ("8. instructions per record, 1,000 s windows", "instructions",
     pick("instructions", "instructions_per_record", workload="windows-1000s"), [], "lower", "firing included", None),
    ("8. instructions per record, 1 ms windows", "instructions",
     pick("instructions", "instructions_per_record", workload="windows-1ms"), [], "lower", "", None),
]


def verdict(target, sjob, ratio):
    """(target as text, "met" / "not met" / "—")."""
    if target is None:
        return "", "—"
    op, n = target
    if op == "x":
        text = f"≥ {n}× Flink"
        value = ratio
    else:
        text = f"{op} {n:g}"
        value = sjob["median"] if sjob else None
    if value is None:
        return text, "—"
    met = {"x": value >= n, "<": value < n, "<=": value <= n, ">=": value >= n}[op]
    return text, "met" if met else "not met"


results = []
for name, unit, s, f, better, note, target in scenarios:
    ss, fs = stat(s), stat(f)
    ratio = None
    if ss and fs and ss["median"] and fs["median"]:
        # How many times better sjob is, whichever direction is better.
        ratio = ss["median"] / fs["median"] if better == "higher" else fs["median"] / ss["median"]
    target_text, met = verdict(target, ss, ratio)
    results.append({"scenario": name, "unit": unit, "better": better, "sjob": ss, "flink": fs,
                    "sjob_advantage": ratio, "target": target_text, "target_met": met, "note": note})


def num(x):
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f} M"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt(st):
    if not st:
        return "—"
    spread = f" ({num(st['min'])}–{num(st['max'])})" if st["runs"] > 1 else ""
    return num(st["median"]) + spread


print()
print(f"{'scenario':44} {'unit':>12} {'sjob median (spread)':>30} {'Flink median (spread)':>30} {'sjob ×':>7}"
      f"  {'target':>12} {'':8}")
for r in results:
    adv = f"{r['sjob_advantage']:.2f}" if r["sjob_advantage"] else "—"
    print(f"{r['scenario']:44} {r['unit']:>12} {fmt(r['sjob']):>30} {fmt(r['flink']):>30} {adv:>7}"
          f"  {r['target']:>12} {r['target_met'] if r['target'] else '':8}")
missed = [r["scenario"] for r in results if r["target_met"] == "not met"]
print(f"\ntargets: {sum(r['target_met'] == 'met' for r in results)} met, {len(missed)} not met"
      + (": " + "; ".join(missed) if missed else ""))
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
