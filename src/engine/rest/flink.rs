//! The bodies of Flink's REST responses, complete: every field Flink's own client
//! (`RestClusterClient`, the `flink` CLI) reads is present, and a field that means nothing for
//! this engine carries Flink's neutral value (0, -1, `false`, `{}`), never a missing key.
//! Vertices are operators; their ids are 32 hex digits derived from the uid, as Flink's are.

use crate::engine::coordinator::{CompletedSnapshot, FailedSnapshot, SnapshotStats, now_ms};
use crate::engine::graph::Partitioning;
use crate::engine::{JobHandle, JobState};
use serde_json::{Map, Value, json};

/// Flink's task states (`ExecutionState`), in its order.
const TASK_STATES: [&str; 10] = [
    "CREATED",
    "SCHEDULED",
    "DEPLOYING",
    "RUNNING",
    "FINISHED",
    "CANCELING",
    "CANCELED",
    "FAILED",
    "RECONCILING",
    "INITIALIZING",
];

/// Flink's job states (`JobStatus`).
const JOB_STATES: [&str; 11] = [
    "INITIALIZING",
    "CREATED",
    "RUNNING",
    "FAILING",
    "FAILED",
    "CANCELLING",
    "CANCELED",
    "FINISHED",
    "RESTARTING",
    "SUSPENDED",
    "RECONCILING",
];

/// A savepoint or checkpoint location as Flink reports it: local paths as `file:` URIs.
pub fn location_uri(location: &str) -> String {
    if location.starts_with('/') {
        format!("file:{location}")
    } else {
        location.to_owned()
    }
}

/// An operator's vertex id: 32 hex digits from its uid (stable across runs and upgrades).
pub fn vertex_id(uid: &str) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(uid.as_bytes()))
}

/// Counts per task state, every state present, `tasks` of them in `state`.
fn task_counts(state: &str, tasks: u32, upper: bool) -> Map<String, Value> {
    TASK_STATES
        .iter()
        .map(|s| {
            let key = if upper {
                s.to_string()
            } else {
                s.to_lowercase()
            };
            (key, json!(if *s == state { tasks } else { 0 }))
        })
        .collect()
}

/// (start, end or -1, duration) of the job in ms.
fn times(job: &JobHandle) -> (u64, i64, u64) {
    let start = job.start_time_ms();
    let end = job.end_time_ms();
    let now = end.unwrap_or_else(now_ms);
    (
        start,
        end.map(|e| e as i64).unwrap_or(-1),
        now.saturating_sub(start),
    )
}

/// The state every task of the job is in (one state for all: tasks start and end together).
fn task_state(job: &JobHandle) -> &'static str {
    job.state().as_flink()
}

/// An entry of `GET /jobs/overview`.
pub fn job_overview(job: &JobHandle) -> Value {
    let (start, end, duration) = times(job);
    let tasks: u32 = job.graph().stages.iter().map(|st| st.parallelism).sum();
    let mut counts = task_counts(task_state(job), tasks, false);
    counts.insert("total".into(), json!(tasks));
    json!({
        "jid": job.id(),
        "name": job.graph().name,
        "jobType": "STREAMING",
        "schedulerType": "Default",
        "state": job.state().as_flink(),
        "start-time": start,
        "end-time": end,
        "duration": duration,
        "last-modification": job.end_time_ms().unwrap_or(start),
        "tasks": counts,
        "pending-operators": 0,
    })
}

/// `GET /jobs/:id/plan`'s `plan`: one node per operator, each fed by the one before it (a
/// late-record sink by its window).
pub fn plan(job: &JobHandle) -> Value {
    let graph = job.graph();
    let mut strategy = vec!["FORWARD"; graph.nodes.len()];
    for stage in &graph.stages {
        if let (Some(first), Some(p)) = (stage.nodes.first(), stage.input) {
            strategy[*first] = match p {
                Partitioning::Hash => "HASH",
                Partitioning::Rebalance => "REBALANCE",
            };
        }
    }
    let nodes: Vec<Value> = graph
        .nodes
        .iter()
        .map(|n| {
            let mut node = json!({
                "id": vertex_id(&n.uid),
                "operator": n.kind,
                "parallelism": n.parallelism,
                "operator_strategy": "",
                "description": n.name,
                "optimizer_properties": {},
            });
            if let Some(input) = graph.input_of(n) {
                node["inputs"] = json!([{
                    "id": vertex_id(&input.uid),
                    "num": 0,
                    "exchange": "pipelined_bounded",
                    "ship_strategy": strategy[n.index],
                }]);
            }
            node
        })
        .collect();
    json!({ "jid": job.id(), "name": graph.name, "type": "STREAMING", "nodes": nodes })
}

/// `GET /jobs/:id/vertices/:vid/watermarks`: `[{id: "<subtask>.currentInputWatermark",
/// value}]`, values as strings (Long.MIN_VALUE before the first), as Flink's metric store
/// gives them; a source has no input, so none (as in Flink; `/jobs/:id/sources` has what
/// sources send). None: no such vertex.
pub fn vertex_watermarks(job: &JobHandle, vertex: &str) -> Option<Value> {
    let node = job
        .graph()
        .nodes
        .iter()
        .find(|n| vertex_id(&n.uid) == vertex)?;
    if node.is_source() {
        return Some(json!([]));
    }
    let v = job.vertices().into_iter().nth(node.index)?;
    Some(Value::Array(
        v.subtask_watermarks
            .iter()
            .enumerate()
            .map(|(i, w)| json!({ "id": format!("{i}.currentInputWatermark"), "value": w.to_string() }))
            .collect(),
    ))
}

/// `GET /jobs/:id`.
pub fn job_details(job: &JobHandle) -> Value {
    let (start, end, duration) = times(job);
    let status = job.state().as_flink();
    let tasks = task_state(job);
    let max_p = job.graph().max_parallelism;
    let group = vertex_id(job.id());
    let mut timestamps: Map<String, Value> = JOB_STATES
        .iter()
        .map(|s| (s.to_string(), json!(0)))
        .collect();
    for s in ["INITIALIZING", "CREATED", "RUNNING"] {
        timestamps.insert(s.into(), json!(start));
    }
    if let Some(e) = job.end_time_ms() {
        timestamps.insert(status.into(), json!(e));
    }
    let mut status_counts = task_counts(tasks, 0, true);
    let vertices: Vec<Value> = job
        .vertices()
        .into_iter()
        .map(|v| {
            *status_counts.entry(tasks).or_insert(json!(0)) =
                json!(status_counts[tasks].as_u64().unwrap_or(0) + 1);
            json!({
                "id": vertex_id(&v.uid),
                "uid": v.uid,
                "kind": v.kind,
                "slotSharingGroupId": group,
                "name": v.name,
                "maxParallelism": max_p,
                "parallelism": v.parallelism,
                "status": tasks,
                "start-time": start,
                "end-time": end,
                "duration": duration,
                "tasks": task_counts(tasks, v.parallelism, true),
                "watermark": v.watermark,
                "late-records-dropped": v.late_records_dropped,
                "metrics": {
                    "read-bytes": 0,
                    "read-bytes-complete": false,
                    "write-bytes": 0,
                    "write-bytes-complete": false,
                    "read-records": v.records_in,
                    "read-records-complete": true,
                    "write-records": v.records_out,
                    "write-records-complete": true,
                    "accumulated-backpressured-time": 0,
                    "accumulated-idle-time": 0,
                    "accumulated-busy-time": 0.0,
                },
            })
        })
        .collect();
    json!({
        "jid": job.id(),
        "application-id": job.id(),
        "name": job.graph().name,
        "isStoppable": true,
        "state": status,
        "job-type": "STREAMING",
        "schedulerType": "Default",
        "start-time": start,
        "end-time": end,
        "duration": duration,
        "maxParallelism": max_p,
        "now": now_ms(),
        "timestamps": timestamps,
        "vertices": vertices,
        "status-counts": status_counts,
        "plan": plan(job),
        "pending-operators": 0,
        "restored-from": job.restored_from().map(location_uri),
        "failure-cause": job.failure(),
    })
}

/// `GET /jobs/:id/exceptions`: the job's failure, if it failed.
pub fn exceptions(job: &JobHandle) -> Value {
    let entries: Vec<Value> = job
        .failure()
        .map(|f| {
            json!({
                "exceptionName": "sjob.JobFailure",
                "stacktrace": f,
                "timestamp": job.end_time_ms().unwrap_or_else(now_ms),
                "failureLabels": {},
                "taskName": null,
                "endpoint": null,
                "taskManagerId": null,
                "concurrentExceptions": [],
            })
        })
        .into_iter()
        .collect();
    json!({ "exceptionHistory": { "entries": entries, "truncated": false } })
}

fn completed_json(s: &CompletedSnapshot, savepoint: bool, subtasks: u32) -> Value {
    json!({
        "className": "completed",
        "id": s.id,
        "status": "COMPLETED",
        "is_savepoint": savepoint,
        "savepointFormat": if savepoint { json!("CANONICAL") } else { Value::Null },
        "trigger_timestamp": s.timestamp_ms.saturating_sub(s.duration_ms),
        "latest_ack_timestamp": s.timestamp_ms,
        "checkpointed_size": s.size,
        "state_size": s.size,
        "end_to_end_duration": s.duration_ms,
        "alignment_buffered": 0,
        "processed_data": 0,
        "persisted_data": 0,
        "num_subtasks": subtasks,
        "num_acknowledged_subtasks": subtasks,
        "checkpoint_type": if savepoint { "SAVEPOINT" } else { "CHECKPOINT" },
        "tasks": {},
        "external_path": location_uri(&s.location),
        "discarded": false,
    })
}

fn failed_json(f: &FailedSnapshot, subtasks: u32) -> Value {
    json!({
        "className": "failed",
        "id": 0,
        "status": "FAILED",
        "is_savepoint": false,
        "savepointFormat": null,
        "trigger_timestamp": f.timestamp_ms,
        "latest_ack_timestamp": -1,
        "checkpointed_size": 0,
        "state_size": 0,
        "end_to_end_duration": 0,
        "alignment_buffered": 0,
        "processed_data": 0,
        "persisted_data": 0,
        "num_subtasks": subtasks,
        "num_acknowledged_subtasks": 0,
        "checkpoint_type": "CHECKPOINT",
        "tasks": {},
        "failure_timestamp": f.timestamp_ms,
        "failure_message": f.message,
    })
}

/// Min, max, avg and percentiles of `values` (Flink's `NaN` percentiles when there are none).
fn summary(values: &[u64]) -> Value {
    if values.is_empty() {
        let nan = json!("NaN");
        return json!({ "min": 0, "max": 0, "avg": 0, "p50": nan, "p90": nan, "p95": nan, "p99": nan, "p999": nan });
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] as f64;
    json!({
        "min": v[0],
        "max": v[v.len() - 1],
        "avg": v.iter().sum::<u64>() / v.len() as u64,
        "p50": at(0.5), "p90": at(0.9), "p95": at(0.95), "p99": at(0.99), "p999": at(0.999),
    })
}

/// `GET /jobs/:id/checkpoints`: counts, the latest of each kind, and a summary and history
/// over the snapshots the engine remembers (the newest checkpoint and savepoint).
pub fn checkpoints(job: &JobHandle, st: &SnapshotStats) -> Value {
    let subtasks: u32 = job.graph().stages.iter().map(|s| s.parallelism).sum();
    let restored = job.restored_from().map(|p| {
        json!({
            "id": 0,
            "restore_timestamp": job.start_time_ms(),
            "is_savepoint": !crate::savepoint::paths::is_checkpoint(p),
            "external_path": location_uri(p),
        })
    });
    let completed: Vec<(&CompletedSnapshot, bool)> = st
        .latest_checkpoint
        .iter()
        .map(|c| (c, false))
        .chain(st.latest_savepoint.iter().map(|c| (c, true)))
        .collect();
    let sizes: Vec<u64> = completed.iter().map(|(c, _)| c.size).collect();
    let durations: Vec<u64> = completed.iter().map(|(c, _)| c.duration_ms).collect();
    let zeros = vec![0; completed.len()];
    let mut history: Vec<(u64, Value)> = completed
        .iter()
        .map(|(c, sp)| (c.id, completed_json(c, *sp, subtasks)))
        .collect();
    history.sort_by_key(|h| std::cmp::Reverse(h.0));
    let mut history: Vec<Value> = history.into_iter().map(|(_, v)| v).collect();
    if let Some(f) = &st.latest_failure {
        history.push(failed_json(f, subtasks));
    }
    json!({
        "counts": {
            "restored": u32::from(restored.is_some()),
            "total": st.completed + st.failed + st.in_progress,
            "in_progress": st.in_progress,
            "completed": st.completed,
            "failed": st.failed,
        },
        "summary": {
            "checkpointed_size": summary(&sizes),
            "state_size": summary(&sizes),
            "end_to_end_duration": summary(&durations),
            "alignment_buffered": summary(&zeros),
            "processed_data": summary(&zeros),
            "persisted_data": summary(&zeros),
        },
        "latest": {
            "completed": st.latest_checkpoint.as_ref().map(|c| completed_json(c, false, subtasks)),
            "savepoint": st.latest_savepoint.as_ref().map(|c| completed_json(c, true, subtasks)),
            "failed": st.latest_failure.as_ref().map(|f| failed_json(f, subtasks)),
            "restored": restored,
        },
        "history": history,
    })
}

/// `GET /jobs/:id/checkpoints/config`.
pub fn checkpoint_config(job: &JobHandle) -> Value {
    let interval = job
        .checkpoint_interval()
        .map(|d| d.as_millis() as i64)
        .unwrap_or(i64::MAX);
    json!({
        "mode": "exactly_once",
        "interval": interval,
        "timeout": 600_000,
        "min_pause": 0,
        "max_concurrent": 1,
        "externalization": { "enabled": job.checkpoint_interval().is_some(), "delete_on_cancellation": false },
        "state_backend": "sjob",
        "checkpoint_storage": "sjob",
        "unaligned_checkpoints": false,
        "tolerable_failed_checkpoints": 0,
        "aligned_checkpoint_timeout": 0,
        "checkpoints_after_tasks_finish": true,
        "state_changelog_enabled": false,
        "changelog_periodic_materialization_interval": 0,
        "changelog_storage": "none",
    })
}

/// `GET /config`: the dashboard configuration.
pub fn dashboard_config() -> Value {
    json!({
        "refresh-interval": 3000,
        "timezone-name": "Coordinated Universal Time",
        "timezone-offset": 0,
        "flink-version": concat!("sjob-", env!("CARGO_PKG_VERSION")),
        "flink-revision": "",
        "features": { "web-submit": false, "web-cancel": true, "web-rescale": false, "web-history": false },
    })
}

/// `GET /overview`.
pub fn cluster_overview(job: &JobHandle) -> Value {
    let state = job.state();
    let count = |s: JobState| u32::from(state == s);
    let running = u32::from(matches!(state, JobState::Created | JobState::Running));
    let slots: u32 = job
        .graph()
        .stages
        .iter()
        .map(|st| st.parallelism)
        .max()
        .unwrap_or(1);
    json!({
        "taskmanagers": 1,
        "slots-total": slots,
        "slots-available": if running > 0 { 0 } else { slots },
        "jobs-running": running,
        "jobs-finished": count(JobState::Finished),
        "jobs-cancelled": count(JobState::Canceled),
        "jobs-failed": count(JobState::Failed),
        "flink-version": concat!("sjob-", env!("CARGO_PKG_VERSION")),
        "flink-commit": "",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_locations_become_file_uris_and_others_stay() {
        assert_eq!(location_uri("/sp/savepoint-1"), "file:/sp/savepoint-1");
        assert_eq!(location_uri("s3://b/sp"), "s3://b/sp");
        assert_eq!(location_uri("file:/sp"), "file:/sp");
    }

    #[test]
    fn vertex_ids_are_32_hex_digits_and_stable() {
        let a = vertex_id("counter");
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, vertex_id("counter"));
        assert_ne!(a, vertex_id("counter2"));
    }

    #[test]
    fn summaries_have_every_percentile() {
        let s = summary(&[10, 20, 30, 40]);
        assert_eq!(s["min"], 10);
        assert_eq!(s["max"], 40);
        assert_eq!(s["avg"], 25);
        assert_eq!(s["p50"], 20.0);
        assert_eq!(s["p999"], 40.0);
        assert_eq!(summary(&[])["p90"], "NaN");
    }
}
