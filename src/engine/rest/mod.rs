//! The engine's REST API, in the dialect of Apache Flink's (the subset an operator needs), so
//! that one client drives both: overview, jobs, job details, savepoints and stop-with-savepoint
//! with trigger ids, cancel, checkpoint statistics, Prometheus metrics and health.
//! Errors have Flink's shape: `{"errors": [...]}` with the matching status code. Every path
//! is served twice, as Flink does: unversioned and under `/v1` (where Flink's clients go).
//! Response bodies are complete enough for Flink's own client to read (see `flink`).

mod flink;
mod java_error;

pub use flink::{location_uri, vertex_id};

use super::access::{self, RestToken, SavepointRoots};
use super::{JobHandle, JobState};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, patch, post};
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
    /// Savepoint disposals, by trigger id.
    disposals: Mutex<HashMap<String, TriggerState>>,
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
            disposals: Mutex::new(HashMap::new()),
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
    let api = routes(state);
    Router::new()
        .nest_service("/v1", api.clone())
        .fallback_service(api)
}

/// What only applies to a Flink cluster, and what to use here instead.
const NOT_HERE: &[(&str, &str)] = &[
    (
        "/jars",
        "an sjob engine runs the one job it was started with: give the job file to `sjob run JOB.yaml`, or apply a StatefulJob",
    ),
    (
        "/taskmanagers",
        "an sjob engine is one process: its log is the process's (or the pod's) standard error, and its metrics are at /metrics",
    ),
    (
        "/jobmanager",
        "an sjob engine is one process: its log is the process's (or the pod's) standard error, and its metrics are at /metrics",
    ),
];

async fn not_here(uri: axum::http::Uri) -> Response {
    let path = uri.path().trim_start_matches("/v1");
    let hint = NOT_HERE
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix))
        .map(|(_, hint)| *hint)
        .unwrap_or("");
    error(
        StatusCode::NOT_IMPLEMENTED,
        format!("{path} is not served by an sjob engine: {hint}"),
    )
}

fn routes(state: Arc<RestState>) -> Router {
    let token = state.token.clone();
    Router::new()
        .route("/overview", get(overview))
        .route("/config", get(config))
        .route("/jobs", get(jobs).post(submit_job))
        .route("/jobs/overview", get(jobs_overview))
        .route("/jobs/{id}", get(job_details).patch(patch_job))
        .route("/jobs/{id}/status", get(job_status))
        .route("/jobs/{id}/plan", get(job_plan))
        .route("/jobs/{id}/exceptions", get(job_exceptions))
        .route("/jobs/{id}/savepoints", post(trigger_savepoint))
        .route("/jobs/{id}/savepoints/{trigger}", get(savepoint_status))
        .route("/jobs/{id}/stop", post(stop_job))
        .route("/jobs/{id}/rescaling", patch(rescale))
        .route("/jobs/{id}/rescaling/{trigger}", get(rescale))
        .route(
            "/jobs/{id}/vertices/{vertex}/watermarks",
            get(vertex_watermarks),
        )
        .route("/jobs/{id}/checkpoints", get(checkpoints))
        .route("/jobs/{id}/checkpoints/config", get(checkpoint_config))
        .route("/jobs/{id}/sources", get(sources))
        .route("/jobs/{id}/sources/hold", post(hold_sources))
        .route("/jobs/{id}/sources/release", post(release_sources))
        .route("/savepoint-disposal", post(trigger_disposal))
        .route("/savepoint-disposal/{trigger}", get(disposal_status))
        .route("/jars", any(not_here))
        .route("/jars/{*rest}", any(not_here))
        .route("/taskmanagers", any(not_here))
        .route("/taskmanagers/{*rest}", any(not_here))
        .route("/jobmanager/{*rest}", any(not_here))
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

async fn overview(State(s): Shared) -> Json<Value> {
    Json(flink::cluster_overview(&s.job))
}

async fn config() -> Json<Value> {
    Json(flink::dashboard_config())
}

async fn jobs(State(s): Shared) -> Json<Value> {
    Json(json!({ "jobs": [{ "id": s.job.id(), "status": s.job.state().as_flink() }] }))
}

async fn submit_job() -> Response {
    not_here(axum::http::Uri::from_static("/jars")).await
}

async fn jobs_overview(State(s): Shared) -> Json<Value> {
    Json(json!({ "jobs": [flink::job_overview(&s.job)] }))
}

/// Answers with `body(job)` for the job named in the path.
fn for_job(s: &RestState, id: &str, body: impl FnOnce(&JobHandle) -> Value) -> Response {
    match the_job(s, id) {
        Ok(job) => Json(body(job)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn job_details(State(s): Shared, Path(id): Path<String>) -> Response {
    for_job(&s, &id, flink::job_details)
}

async fn job_status(State(s): Shared, Path(id): Path<String>) -> Response {
    for_job(&s, &id, |job| json!({ "status": job.state().as_flink() }))
}

async fn job_plan(State(s): Shared, Path(id): Path<String>) -> Response {
    for_job(&s, &id, |job| json!({ "plan": flink::plan(job) }))
}

async fn job_exceptions(State(s): Shared, Path(id): Path<String>) -> Response {
    for_job(&s, &id, flink::exceptions)
}

/// Flink's `GET /jobs/:id/vertices/:vid/watermarks`: each subtask's input watermark.
async fn vertex_watermarks(
    State(s): Shared,
    Path((id, vertex)): Path<(String, String)>,
) -> Response {
    let job = match the_job(&s, &id) {
        Ok(job) => job,
        Err(e) => return e.into_response(),
    };
    match flink::vertex_watermarks(job, &vertex) {
        Some(body) => Json(body).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("No vertex with ID '{vertex}' exists."),
        ),
    }
}

async fn checkpoint_config(State(s): Shared, Path(id): Path<String>) -> Response {
    for_job(&s, &id, flink::checkpoint_config)
}

async fn rescale(State(s): Shared, Path(params): Path<Vec<String>>) -> Response {
    let id = params.first().map(String::as_str).unwrap_or_default();
    if let Err(e) = the_job(&s, id) {
        return e.into_response();
    }
    error(
        StatusCode::BAD_REQUEST,
        "Rescaling in place is not supported by an sjob engine: stop the job with a savepoint (POST /jobs/:id/stop) and start it from that savepoint with the new parallelism (a StatefulJob's spec.parallelism does both)",
    )
}

#[derive(Deserialize)]
struct SavepointRequest {
    #[serde(rename = "target-directory", default)]
    target_directory: Option<String>,
    #[serde(rename = "cancel-job", default)]
    cancel_job: bool,
    #[serde(rename = "formatType", default)]
    format_type: Option<String>,
    #[serde(rename = "triggerId", default)]
    trigger_id: Option<String>,
}

#[derive(Deserialize)]
struct StopRequest {
    #[serde(rename = "targetDirectory", default)]
    target_directory: Option<String>,
    #[serde(default)]
    drain: bool,
    #[serde(rename = "triggerId", default)]
    trigger_id: Option<String>,
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
    /// The id the client chose for the operation (Flink's `triggerId`), if any.
    pub trigger_id: Option<String>,
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
                trigger_id: req.trigger_id,
            })
        }
        TriggerKind::Stop => {
            let req: StopRequest = parse_json(body)?;
            Ok(TriggerRequest {
                target: req.target_directory,
                stop: Some(req.drain),
                trigger_id: req.trigger_id,
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
        "subtasks": v.subtasks.iter().map(|s| json!({
            "subtask": s.subtask,
            "watermark": s.watermark,
            "idle": s.idle,
            "paused-for-alignment": s.paused_for_alignment,
            "positions": s.positions,
            "pending-records": s.pending_records,
        })).collect::<Vec<_>>(),
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

/// The operation id for a request: the client's own (Flink's `triggerId`), or a new one.
fn operation_id(chosen: Option<String>) -> Result<String, ApiError> {
    match chosen {
        Some(id) if id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) => Ok(id),
        Some(id) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("Bad request, triggerId '{id}' is not a trigger id (32 hex digits)"),
        )),
        None => Ok(uuid::Uuid::new_v4().simple().to_string()),
    }
}

fn accepted(id: &str) -> Response {
    (StatusCode::ACCEPTED, Json(json!({ "request-id": id }))).into_response()
}

fn start_trigger(s: &RestState, req: TriggerRequest) -> Response {
    let id = match operation_id(req.trigger_id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    // A repeated request with the same trigger id is the same operation.
    if s.triggers.lock().is_ok_and(|t| t.contains_key(&id)) {
        return accepted(&id);
    }
    let Some(target) = req.target.or_else(|| s.default_savepoint_dir.clone()) else {
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
        let rx = s.job.trigger_savepoint(&target, req.stop);
        if let Ok(mut t) = s.triggers.lock() {
            t.insert(id.clone(), TriggerState::Pending(rx));
        }
        return accepted(&id);
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
        Ok(req) => start_trigger(s, req),
        Err(reason) => error(StatusCode::BAD_REQUEST, reason),
    }
}

/// Where an asynchronous operation stands, reading its outcome if it has come.
fn poll(entry: &mut TriggerState) -> Option<Result<String, String>> {
    if let TriggerState::Pending(rx) = entry {
        match rx.try_recv() {
            Ok(result) => *entry = TriggerState::Done(result, false),
            Err(crossbeam_channel::TryRecvError::Empty) => {}
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                *entry =
                    TriggerState::Done(Err("the operation ended before it completed".into()), false)
            }
        }
    }
    match entry {
        TriggerState::Pending(_) => None,
        TriggerState::Done(result, read) => {
            *read = true;
            Some(result.clone())
        }
    }
}

/// Flink's body of an asynchronous operation's status: in progress, or completed with
/// `operation` (its result or its failure cause).
fn operation_status(outcome: Option<Result<Value, Value>>) -> Response {
    match outcome {
        None => Json(json!({ "status": { "id": "IN_PROGRESS" } })).into_response(),
        Some(Ok(operation)) => {
            Json(json!({ "status": { "id": "COMPLETED" }, "operation": operation })).into_response()
        }
        Some(Err(cause)) => Json(json!({
            "status": { "id": "COMPLETED" },
            "operation": { "failure-cause": cause },
        }))
        .into_response(),
    }
}

fn lock_ops(
    ops: &Mutex<HashMap<String, TriggerState>>,
) -> std::sync::MutexGuard<'_, HashMap<String, TriggerState>> {
    match ops.lock() {
        Ok(t) => t,
        Err(p) => p.into_inner(),
    }
}

async fn savepoint_status(
    State(s): Shared,
    Path((id, trigger)): Path<(String, String)>,
) -> Response {
    if let Err(r) = the_job(&s, &id) {
        return r.into_response();
    }
    let mut triggers = lock_ops(&s.triggers);
    let Some(entry) = triggers.get_mut(&trigger) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("There is no savepoint operation with triggerId={trigger} for job {id}"),
        );
    };
    operation_status(poll(entry).map(|r| {
        r.map(|location| json!({ "location": location_uri(&location) }))
            .map_err(|cause| {
                java_error::failure_cause(
                    "org.apache.flink.runtime.checkpoint.CheckpointException",
                    &cause,
                )
            })
    }))
}

#[derive(Deserialize)]
struct DisposalRequest {
    #[serde(rename = "savepoint-path")]
    savepoint_path: String,
    #[serde(rename = "triggerId", default)]
    trigger_id: Option<String>,
}

/// `POST /savepoint-disposal`: deletes a savepoint's files (under the engine's savepoint roots),
/// in the background. The savepoint the running job was restored from is kept until the job
/// has a checkpoint of its own.
async fn trigger_disposal(State(s): Shared, body: axum::body::Bytes) -> Response {
    let req: DisposalRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason),
    };
    let id = match operation_id(req.trigger_id) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if lock_ops(&s.disposals).contains_key(&id) {
        return accepted(&id);
    }
    let path = match s.roots.check(&req.savepoint_path) {
        Ok(p) => p,
        Err(reason) => return error(StatusCode::FORBIDDEN, reason),
    };
    let plain = |p: &str| crate::savepoint::paths::plain_location(p.trim_end_matches('/'));
    let same = |p: &str| plain(p) == plain(&path);
    if s.job.restored_from().is_some_and(same)
        && !s.job.state().is_terminal()
        && s.job.snapshot_stats().latest_checkpoint.is_none()
    {
        return error(
            StatusCode::CONFLICT,
            format!(
                "Savepoint {path} is where the running job {} started from and it has no checkpoint of its own yet; dispose of it after the first checkpoint or once the job has ended",
                s.job.id()
            ),
        );
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let result = crate::savepoint::store::Store::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|store| {
                crate::savepoint::tools::dispose(&store)
                    .map(|_| String::new())
                    .map_err(|e| format!("Could not dispose savepoint {path}: {e}"))
            });
        let _ = tx.send(result);
    });
    lock_ops(&s.disposals).insert(id.clone(), TriggerState::Pending(rx));
    accepted(&id)
}

async fn disposal_status(State(s): Shared, Path(trigger): Path<String>) -> Response {
    let mut ops = lock_ops(&s.disposals);
    let Some(entry) = ops.get_mut(&trigger) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("There is no savepoint disposal with triggerId={trigger}"),
        );
    };
    operation_status(poll(entry).map(|r| {
        r.map(|_| json!({})).map_err(|cause| {
            java_error::failure_cause("org.apache.flink.util.FlinkException", &cause)
        })
    }))
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
        None | Some("cancel") if job.state().is_terminal() => error(
            StatusCode::CONFLICT,
            format!(
                "Job cancellation failed because the job has already reached another terminal state ({}).",
                job.state().as_flink()
            ),
        ),
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

async fn checkpoints(State(s): Shared, Path(id): Path<String>) -> Response {
    for_job(&s, &id, |job| {
        flink::checkpoints(job, &job.snapshot_stats())
    })
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
