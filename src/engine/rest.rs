//! The engine's REST API, in the dialect of Apache Flink's (the subset an operator needs), so
//! that one client drives both: overview, jobs, job details, savepoints and stop-with-savepoint
//! with trigger ids, cancel, checkpoint statistics, Prometheus metrics and health.
//! Errors have Flink's shape: `{"errors": [...]}` with the matching status code.

use super::access::{self, RestToken, SavepointRoots};
use super::{JobHandle, JobState};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

enum TriggerState {
    Pending(crossbeam_channel::Receiver<Result<String, String>>),
    /// The outcome, and whether a client has read it.
    Done(Result<String, String>, bool),
}

pub struct RestState {
    job: Arc<JobHandle>,
    /// Where savepoints go when a request names no directory.
    default_savepoint_dir: Option<String>,
    /// Where savepoints may go.
    roots: SavepointRoots,
    /// The bearer token of job-facing requests, if any.
    token: Option<RestToken>,
    triggers: Mutex<HashMap<String, TriggerState>>,
}

impl RestState {
    pub fn new(
        job: Arc<JobHandle>,
        default_savepoint_dir: Option<String>,
        roots: SavepointRoots,
        token: Option<RestToken>,
    ) -> Arc<RestState> {
        Arc::new(RestState {
            job,
            default_savepoint_dir,
            roots,
            token,
            triggers: Mutex::new(HashMap::new()),
        })
    }
}

impl RestState {
    /// Whether a savepoint outcome has not been read by a client yet.
    pub fn has_unread_outcomes(&self) -> bool {
        match self.triggers.lock() {
            Ok(t) => t
                .values()
                .any(|s| !matches!(s, TriggerState::Done(_, true))),
            Err(_) => false,
        }
    }
}

type Shared = State<Arc<RestState>>;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    ApiError(status, msg.into()).into_response()
}

/// An error in Flink's shape: `{"errors": [message]}` with a status code.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "errors": [self.1] }))).into_response()
    }
}

/// The job, or Flink's 404 for an unknown id (400 for one that is not a job id at all).
fn the_job<'a>(state: &'a RestState, id: &str) -> Result<&'a JobHandle, ApiError> {
    if id.len() != 32 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "Bad request, could not parse parameter jobid: '{id}' is not a job id (32 hex digits)"
            ),
        ));
    }
    if id != state.job.id() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("Job {id} not found"),
        ));
    }
    Ok(&state.job)
}

pub fn router(state: Arc<RestState>) -> Router {
    let token = state.token.clone();
    Router::new()
        .route("/overview", get(overview))
        .route("/config", get(config))
        .route("/jobs", get(jobs))
        .route("/jobs/overview", get(jobs_overview))
        .route("/jobs/{id}", get(job_details).patch(patch_job))
        .route("/jobs/{id}/savepoints", post(trigger_savepoint))
        .route("/jobs/{id}/savepoints/{trigger}", get(savepoint_status))
        .route("/jobs/{id}/stop", post(stop_job))
        .route("/jobs/{id}/checkpoints", get(checkpoints))
        .route("/jobs/{id}/sources", get(sources))
        .route("/jobs/{id}/sources/hold", post(hold_sources))
        .route("/jobs/{id}/sources/release", post(release_sources))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .fallback(|uri: axum::http::Uri| async move {
            error(StatusCode::NOT_FOUND, format!("Not found: {}", uri.path()))
        })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            token,
            access::require_token,
        ))
}

fn state_counts(job: &JobHandle) -> (u32, u32, u32, u32) {
    match job.state() {
        JobState::Created | JobState::Running => (1, 0, 0, 0),
        JobState::Finished => (0, 1, 0, 0),
        JobState::Canceled => (0, 0, 1, 0),
        JobState::Failed => (0, 0, 0, 1),
    }
}

async fn overview(State(s): Shared) -> Json<Value> {
    let (running, finished, cancelled, failed) = state_counts(&s.job);
    let slots: u32 = s
        .job
        .graph()
        .stages
        .iter()
        .map(|st| st.parallelism)
        .max()
        .unwrap_or(1);
    Json(json!({
        "taskmanagers": 1,
        "slots-total": slots,
        "slots-available": if running > 0 { 0 } else { slots },
        "jobs-running": running,
        "jobs-finished": finished,
        "jobs-cancelled": cancelled,
        "jobs-failed": failed,
        "flink-version": concat!("sjob-", env!("CARGO_PKG_VERSION")),
        "flink-commit": "",
    }))
}

async fn config() -> Json<Value> {
    Json(json!({ "flink-version": concat!("sjob-", env!("CARGO_PKG_VERSION")), "features": {} }))
}

async fn jobs(State(s): Shared) -> Json<Value> {
    Json(json!({ "jobs": [{ "id": s.job.id(), "status": s.job.state().as_flink() }] }))
}

fn times(job: &JobHandle) -> (u64, i64, u64) {
    let start = job.start_time_ms();
    let end = job.end_time_ms();
    let now = end.unwrap_or_else(super::coordinator::now_ms);
    (
        start,
        end.map(|e| e as i64).unwrap_or(-1),
        now.saturating_sub(start),
    )
}

async fn jobs_overview(State(s): Shared) -> Json<Value> {
    let job = &s.job;
    let (start, end, duration) = times(job);
    let tasks: u32 = job.graph().stages.iter().map(|st| st.parallelism).sum();
    let running = if job.state() == JobState::Running {
        tasks
    } else {
        0
    };
    Json(json!({ "jobs": [{
        "jid": job.id(),
        "name": job.graph().name,
        "state": job.state().as_flink(),
        "start-time": start,
        "end-time": end,
        "duration": duration,
        "last-modification": start,
        "tasks": { "total": tasks, "running": running },
    }]}))
}

async fn job_details(State(s): Shared, Path(id): Path<String>) -> Response {
    let job = match the_job(&s, &id) {
        Ok(j) => j,
        Err(r) => return r.into_response(),
    };
    let (start, end, duration) = times(job);
    let status = job.state().as_flink();
    let max_p = job.graph().max_parallelism;
    let vertices: Vec<Value> = job
        .vertices()
        .into_iter()
        .map(|v| {
            json!({
                "id": v.uid,
                "uid": v.uid,
                "name": v.name,
                "kind": v.kind,
                "parallelism": v.parallelism,
                "maxParallelism": max_p,
                "status": status,
                "metrics": {
                    "read-records": v.records_in,
                    "read-records-complete": true,
                    "write-records": v.records_out,
                    "write-records-complete": true,
                },
            })
        })
        .collect();
    Json(json!({
        "jid": job.id(),
        "name": job.graph().name,
        "isStoppable": true,
        "state": status,
        "start-time": start,
        "end-time": end,
        "duration": duration,
        "now": super::coordinator::now_ms(),
        "vertices": vertices,
        "restored-from": job.restored_from(),
        "failure-cause": job.failure(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct SavepointRequest {
    #[serde(rename = "target-directory", default)]
    target_directory: Option<String>,
    #[serde(rename = "cancel-job", default)]
    cancel_job: bool,
    #[serde(rename = "formatType", default)]
    format_type: Option<String>,
}

#[derive(Deserialize)]
struct StopRequest {
    #[serde(rename = "targetDirectory", default)]
    target_directory: Option<String>,
    #[serde(default)]
    drain: bool,
}

/// Which savepoint request a body belongs to.
#[derive(Clone, Copy, Debug)]
pub enum TriggerKind {
    /// `POST /jobs/{id}/savepoints`
    Savepoint,
    /// `POST /jobs/{id}/stop`
    Stop,
}

/// A savepoint request as the engine carries it out.
#[derive(Debug, PartialEq)]
pub struct TriggerRequest {
    /// The directory named in the request, if any.
    pub target: Option<String>,
    /// None: the job keeps running; Some(drain): the job stops (draining first or not).
    pub stop: Option<bool>,
}

/// Parses the body of a savepoint or stop request (an empty body is `{}`), or says what is
/// wrong with it in the words of Flink's 400 replies.
pub fn parse_trigger(kind: TriggerKind, body: &[u8]) -> Result<TriggerRequest, String> {
    match kind {
        TriggerKind::Savepoint => {
            let req: SavepointRequest = parse_json(body)?;
            if let Some(f) = &req.format_type
                && !matches!(f.as_str(), "CANONICAL" | "NATIVE" | "DEFAULT")
            {
                return Err(format!(
                    "Bad request, formatType '{f}' is not one of CANONICAL, NATIVE"
                ));
            }
            Ok(TriggerRequest {
                target: req.target_directory,
                stop: req.cancel_job.then_some(false),
            })
        }
        TriggerKind::Stop => {
            let req: StopRequest = parse_json(body)?;
            Ok(TriggerRequest {
                target: req.target_directory,
                stop: Some(req.drain),
            })
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldRequest {
    #[serde(default)]
    at: Option<Vec<crate::savepoint::metadata::SplitPosition>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    #[serde(rename = "cut-over", default)]
    cut_over: bool,
}

/// Parses the body of `POST /jobs/{id}/sources/hold`: `{"at": [{"split", "position"}]}` holds
/// the sources there, `{}` where they are. A split named twice is an error.
pub fn parse_hold(body: &[u8]) -> Result<Option<super::sources::Bound>, String> {
    let req: HoldRequest = parse_json(body)?;
    let Some(at) = req.at else {
        return Ok(None);
    };
    let mut bound = super::sources::Bound::new();
    for p in at {
        if bound.insert(p.split.clone(), p.position).is_some() {
            return Err(format!(
                "Bad request, split '{}' is named twice in 'at'",
                p.split
            ));
        }
    }
    Ok(Some(bound))
}

/// Parses the body of `POST /jobs/{id}/sources/release`: `{"cut-over": true}` sends the
/// cut-over marker first.
pub fn parse_release(body: &[u8]) -> Result<bool, String> {
    parse_json::<ReleaseRequest>(body).map(|r| r.cut_over)
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| format!("Bad request, could not parse the request body: {e}"))
}

async fn sources(State(s): Shared, Path(id): Path<String>) -> Response {
    let job = match the_job(&s, &id) {
        Ok(j) => j,
        Err(r) => return r.into_response(),
    };
    let v = job.sources();
    Json(json!({
        "holding": v.holding,
        "settled": v.settled,
        "shadow": v.shadow,
        "positions": v.positions,
        "overrun": v.overrun,
        "problems": v.problems,
        "skipped": v.skipped,
    }))
    .into_response()
}

/// Runs a source command off the async runtime (it waits for the coordinator).
async fn source_command(
    s: Arc<RestState>,
    command: impl FnOnce(&JobHandle) -> Result<(), String> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(move || command(&s.job)).await {
        Ok(Ok(())) => (StatusCode::ACCEPTED, Json(json!({}))).into_response(),
        Ok(Err(reason)) => error(StatusCode::CONFLICT, reason),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn hold_sources(
    State(s): Shared,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = the_job(&s, &id) {
        return r.into_response();
    }
    match parse_hold(&body) {
        Ok(bound) => source_command(s, move |job| job.hold_sources(bound)).await,
        Err(reason) => error(StatusCode::BAD_REQUEST, reason),
    }
}

async fn release_sources(
    State(s): Shared,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = the_job(&s, &id) {
        return r.into_response();
    }
    match parse_release(&body) {
        Ok(cut_over) => source_command(s, move |job| job.release_sources(cut_over)).await,
        Err(reason) => error(StatusCode::BAD_REQUEST, reason),
    }
}

fn start_trigger(s: &RestState, target: Option<String>, stop: Option<bool>) -> Response {
    let Some(target) = target.or_else(|| s.default_savepoint_dir.clone()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "No savepoint directory given and no default one configured (target-directory / targetDirectory, or sjob run --savepoint-dir)",
        );
    };
    let target = match s.roots.check(&target) {
        Ok(t) => t,
        Err(reason) => return error(StatusCode::FORBIDDEN, reason),
    };
    if !s.job.state().is_terminal() {
        let rx = s.job.trigger_savepoint(&target, stop);
        let id = uuid::Uuid::new_v4().simple().to_string();
        if let Ok(mut t) = s.triggers.lock() {
            t.insert(id.clone(), TriggerState::Pending(rx));
        }
        return (StatusCode::ACCEPTED, Json(json!({ "request-id": id }))).into_response();
    }
    error(
        StatusCode::CONFLICT,
        format!(
            "Job {} is {} and takes no savepoints",
            s.job.id(),
            s.job.state().as_flink()
        ),
    )
}

async fn trigger_savepoint(
    State(s): Shared,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    trigger(&s, &id, TriggerKind::Savepoint, &body)
}

async fn stop_job(State(s): Shared, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    trigger(&s, &id, TriggerKind::Stop, &body)
}

fn trigger(s: &RestState, id: &str, kind: TriggerKind, body: &[u8]) -> Response {
    if let Err(r) = the_job(s, id) {
        return r.into_response();
    }
    match parse_trigger(kind, body) {
        Ok(req) => start_trigger(s, req.target, req.stop),
        Err(reason) => error(StatusCode::BAD_REQUEST, reason),
    }
}

async fn savepoint_status(
    State(s): Shared,
    Path((id, trigger)): Path<(String, String)>,
) -> Response {
    if let Err(r) = the_job(&s, &id) {
        return r.into_response();
    }
    let mut triggers = match s.triggers.lock() {
        Ok(t) => t,
        Err(p) => p.into_inner(),
    };
    let Some(entry) = triggers.get_mut(&trigger) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("There is no savepoint operation with triggerId={trigger} for job {id}"),
        );
    };
    if let TriggerState::Pending(rx) = entry {
        match rx.try_recv() {
            Ok(result) => *entry = TriggerState::Done(result, false),
            Err(crossbeam_channel::TryRecvError::Empty) => {}
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                *entry = TriggerState::Done(
                    Err("the job ended before the savepoint completed".into()),
                    false,
                )
            }
        }
    }
    if let TriggerState::Done(_, read) = entry {
        *read = true;
    }
    match entry {
        TriggerState::Pending(_) => {
            Json(json!({ "status": { "id": "IN_PROGRESS" } })).into_response()
        }
        TriggerState::Done(Ok(location), _) => Json(json!({
            "status": { "id": "COMPLETED" },
            "operation": { "location": location },
        }))
        .into_response(),
        TriggerState::Done(Err(cause), _) => Json(json!({
            "status": { "id": "COMPLETED" },
            "operation": { "failure-cause": {
                "class": "sjob.SavepointFailure",
                "stack-trace": cause,
                "serialized-throwable": "",
            }},
        }))
        .into_response(),
    }
}

#[derive(Deserialize)]
struct PatchQuery {
    mode: Option<String>,
}

async fn patch_job(
    State(s): Shared,
    Path(id): Path<String>,
    Query(q): Query<PatchQuery>,
) -> Response {
    let job = match the_job(&s, &id) {
        Ok(j) => j,
        Err(r) => return r.into_response(),
    };
    match q.mode.as_deref() {
        None | Some("cancel") => {
            job.cancel();
            (StatusCode::ACCEPTED, Json(json!({}))).into_response()
        }
        Some(other) => error(
            StatusCode::BAD_REQUEST,
            format!("Bad request, mode '{other}' is not supported; use mode=cancel"),
        ),
    }
}

fn snapshot_json(s: &super::CompletedSnapshot, savepoint: bool) -> Value {
    json!({
        "id": s.id,
        "status": "COMPLETED",
        "is_savepoint": savepoint,
        "latest_ack_timestamp": s.timestamp_ms,
        "trigger_timestamp": s.timestamp_ms.saturating_sub(s.duration_ms),
        "end_to_end_duration": s.duration_ms,
        "state_size": s.size,
        "checkpointed_size": s.size,
        "external_path": s.location,
    })
}

async fn checkpoints(State(s): Shared, Path(id): Path<String>) -> Response {
    let job = match the_job(&s, &id) {
        Ok(j) => j,
        Err(r) => return r.into_response(),
    };
    let st = job.snapshot_stats();
    let restored = job.restored_from().map(|p| {
        json!({ "external_path": p, "is_savepoint": !crate::savepoint::paths::is_checkpoint(p), "restore_timestamp": job.start_time_ms() })
    });
    Json(json!({
        "counts": {
            "restored": u32::from(restored.is_some()),
            "total": st.completed + st.failed + st.in_progress,
            "in_progress": st.in_progress,
            "completed": st.completed,
            "failed": st.failed,
        },
        "latest": {
            "completed": st.latest_checkpoint.as_ref().map(|c| snapshot_json(c, false)),
            "savepoint": st.latest_savepoint.as_ref().map(|c| snapshot_json(c, true)),
            "failed": st.latest_failure.as_ref().map(|f| json!({ "failure_message": f })),
            "restored": restored,
        },
        "history": [],
    }))
    .into_response()
}

async fn ready(State(s): Shared) -> Response {
    if s.job.state() == JobState::Running {
        "ready".into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("job is {}", s.job.state().as_flink()),
        )
    }
}

async fn metrics(State(s): Shared) -> Response {
    match super::metrics::render(&s.job) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    state: Arc<RestState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
