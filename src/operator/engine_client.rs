//! A client for the engine's REST API that works unchanged against Apache Flink's (the subset
//! an operator needs): overview, jobs, job details, savepoints and stop-with-savepoint with
//! trigger ids, cancel, checkpoint statistics.

use crate::savepoint::metadata::SplitPosition;
use crate::savepoint::paths;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the engine at {url}: {cause}")]
    Unreachable {
        url: String,
        cause: String,
        /// The connection was made, so the engine may have received the request and acted on
        /// it although no answer came (a timeout, a connection lost while waiting).
        maybe_received: bool,
    },
    #[error("{what} not found ({url})")]
    NotFound { what: String, url: String },
    #[error("{url} answered {status}: {message}")]
    Api {
        url: String,
        status: u16,
        message: String,
    },
    #[error("unexpected answer from {url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("savepoint failed: {0}")]
    SavepointFailed(String),
    #[error("the savepoint did not complete within {0:?}")]
    Timeout(Duration),
}

impl ClientError {
    /// Whether the engine may have received the request although no answer came: a request
    /// that changes something may have taken effect.
    pub fn maybe_received(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable {
                maybe_received: true,
                ..
            }
        )
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// The id to poll a savepoint request by, after asking under `planned`: the engine's answer, or
/// `planned` itself when no answer came but the request may have arrived (asked again, a
/// stop-with-savepoint that did stop the job would find no job left, and a savepoint taken
/// would go unrecorded). The error only when the engine answered with one or cannot have
/// received the request.
pub fn trigger_to_poll(asked: Result<String>, planned: Option<&str>) -> Result<String> {
    match (asked, planned) {
        (Err(e), Some(id)) if e.maybe_received() => {
            tracing::warn!(trigger = id, error = %e, "no answer to the savepoint request; asking the engine about it by its id");
            Ok(id.to_owned())
        }
        (asked, _) => asked,
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct JobIdStatus {
    pub id: String,
    pub status: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct JobOverview {
    pub jid: String,
    pub name: String,
    pub state: String,
    #[serde(rename = "start-time", default)]
    pub start_time: i64,
}

#[derive(Clone, Debug)]
pub struct Vertex {
    pub id: String,
    pub name: String,
    /// RUNNING once every subtask of the vertex runs.
    pub status: String,
    pub parallelism: u32,
    pub read_records: u64,
    pub write_records: u64,
}

#[derive(Clone, Debug)]
pub struct JobDetails {
    pub id: String,
    pub name: String,
    pub state: String,
    pub vertices: Vec<Vertex>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SavepointStatus {
    InProgress,
    Completed(String),
    Failed(String),
}

#[derive(Clone, Debug, Default)]
pub struct CheckpointInfo {
    pub completed: u64,
    pub failed: u64,
    pub latest_completed: Option<String>,
    pub latest_savepoint: Option<String>,
    pub restored_from: Option<String>,
}

/// An sjob engine's sources (`GET /jobs/{id}/sources`; not in Flink's API).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct SourcesInfo {
    /// Every source subtask holds at its bound (or is out of input).
    pub holding: bool,
    /// Every source subtask has carried out the newest hold or release (`overrun` is complete).
    #[serde(default)]
    pub settled: bool,
    /// Sinks write nothing until a cut-over.
    pub shadow: bool,
    pub positions: Vec<SplitPosition>,
    /// Splits already past the last hold's bound.
    #[serde(default)]
    pub overrun: Vec<String>,
    /// Why source subtasks cannot read now, while they retry.
    #[serde(default)]
    pub problems: Vec<String>,
}

#[derive(Clone)]
pub struct EngineClient {
    base: String,
    http: reqwest::Client,
    /// Each request gives up after this long.
    timeout: Duration,
    /// Sent as `Authorization: Bearer` with every request.
    token: Option<crate::engine::access::RestToken>,
}

/// The process's HTTP client for engines whose connections give up after `connect` (a handle
/// to it): building one loads the system's root certificates, ~10 ms of CPU, which the
/// operator paid at each reconcile when every `EngineClient` built its own; one per connect
/// timeout (in practice one) also shares its pool of connections among all engines.
fn shared_http(connect: Duration) -> reqwest::Client {
    static HTTP: std::sync::Mutex<Vec<(Duration, reqwest::Client)>> =
        std::sync::Mutex::new(Vec::new());
    let mut clients = HTTP.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = clients.iter().find(|(t, _)| *t == connect) {
        return c.clone();
    }
    crate::install_tls_provider();
    let client = reqwest::Client::builder()
        .connect_timeout(connect)
        // A connection is worth keeping while a reconcile or an upgrade's watch asks again
        // within milliseconds; an operator of many jobs holds no idle one beyond that.
        .pool_idle_timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(2)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new());
    clients.push((connect, client.clone()));
    client
}

/// The innermost cause of a transport error ("Connection refused", "timed out", …).
fn unreachable(url: &str, e: reqwest::Error) -> ClientError {
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let cause = if e.is_timeout() {
        format!("timed out ({cause})")
    } else {
        cause.to_string()
    };
    ClientError::Unreachable {
        url: url.to_owned(),
        cause,
        maybe_received: !(e.is_connect() || e.is_builder()),
    }
}

fn errors_of(v: &Value) -> Option<String> {
    let errs = v.get("errors")?.as_array()?;
    Some(
        errs.iter()
            .filter_map(|e| e.as_str())
            .map(|e| e.lines().next().unwrap_or(e).to_owned())
            .collect::<Vec<_>>()
            .join("; "),
    )
}

impl EngineClient {
    /// `base` is the REST endpoint, e.g. `http://127.0.0.1:8081`.
    pub fn new(base: &str) -> EngineClient {
        EngineClient::with_timeout(base, Duration::from_secs(30))
    }

    /// A client whose every request gives up after `timeout`.
    pub fn with_timeout(base: &str, timeout: Duration) -> EngineClient {
        EngineClient {
            base: base.trim_end_matches('/').to_owned(),
            // A connection attempt ends first, so a request that never left is told apart
            // from one that may have reached the engine (`ClientError::maybe_received`).
            http: shared_http(timeout.min(Duration::from_secs(2))),
            timeout,
            token: None,
        }
    }

    /// This client with the engine's bearer token.
    pub fn with_token(mut self, token: crate::engine::access::RestToken) -> EngineClient {
        self.token = Some(token);
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).timeout(self.timeout);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.secret());
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| unreachable(&url, e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| unreachable(&url, e))?;
        let v: Value = if text.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(&text).map_err(|e| ClientError::Decode {
                url: url.clone(),
                reason: format!("{e}: {}", text.chars().take(200).collect::<String>()),
            })?
        };
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(ClientError::NotFound {
                what: what.to_owned(),
                url,
            });
        }
        if !status.is_success() {
            return Err(ClientError::Api {
                url,
                status: status.as_u16(),
                message: errors_of(&v).unwrap_or(text),
            });
        }
        Ok(v)
    }

    fn decode<T: for<'de> Deserialize<'de>>(&self, v: Value, path: &str) -> Result<T> {
        serde_json::from_value(v).map_err(|e| ClientError::Decode {
            url: format!("{}{path}", self.base),
            reason: e.to_string(),
        })
    }

    pub async fn overview(&self) -> Result<Value> {
        self.call(reqwest::Method::GET, "/overview", None, "overview")
            .await
    }

    pub async fn list_jobs(&self) -> Result<Vec<JobIdStatus>> {
        let v = self
            .call(reqwest::Method::GET, "/jobs", None, "jobs")
            .await?;
        self.decode(v.get("jobs").cloned().unwrap_or(json!([])), "/jobs")
    }

    pub async fn jobs_overview(&self) -> Result<Vec<JobOverview>> {
        let v = self
            .call(reqwest::Method::GET, "/jobs/overview", None, "jobs")
            .await?;
        self.decode(
            v.get("jobs").cloned().unwrap_or(json!([])),
            "/jobs/overview",
        )
    }

    pub async fn job(&self, id: &str) -> Result<JobDetails> {
        let path = format!("/jobs/{id}");
        let v = self
            .call(reqwest::Method::GET, &path, None, &format!("job {id}"))
            .await?;
        let s = |v: &Value, k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let vertices = v
            .get("vertices")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .map(|x| Vertex {
                        id: s(x, "id"),
                        name: s(x, "name"),
                        status: s(x, "status"),
                        parallelism: x.get("parallelism").and_then(Value::as_u64).unwrap_or(0)
                            as u32,
                        read_records: x
                            .pointer("/metrics/read-records")
                            .and_then(Value::as_u64)
                            .unwrap_or(0),
                        write_records: x
                            .pointer("/metrics/write-records")
                            .and_then(Value::as_u64)
                            .unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(JobDetails {
            id: s(&v, "jid"),
            name: s(&v, "name"),
            state: s(&v, "state"),
            vertices,
        })
    }

    /// Whether the job and every one of its vertices run (a savepoint needs all tasks).
    pub async fn all_tasks_running(&self, id: &str) -> Result<bool> {
        let j = self.job(id).await?;
        Ok(j.state == "RUNNING"
            && !j.vertices.is_empty()
            && j.vertices.iter().all(|v| v.status == "RUNNING"))
    }

    fn request_id(&self, v: &Value, path: &str) -> Result<String> {
        v.get("request-id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Decode {
                url: format!("{}{path}", self.base),
                reason: "no request-id in the answer".into(),
            })
    }

    /// Triggers a savepoint; returns the trigger id to poll.
    pub async fn trigger_savepoint(
        &self,
        id: &str,
        target_dir: Option<&str>,
        cancel_job: bool,
    ) -> Result<String> {
        self.trigger_savepoint_as(id, target_dir, cancel_job, None)
            .await
    }

    /// Triggers a savepoint under the caller's trigger id (32 hex digits; None: the engine's
    /// choice). Asked again with the same id, the engine answers with the same operation.
    pub async fn trigger_savepoint_as(
        &self,
        id: &str,
        target_dir: Option<&str>,
        cancel_job: bool,
        trigger_id: Option<&str>,
    ) -> Result<String> {
        let body = json!({ "target-directory": target_dir, "cancel-job": cancel_job, "formatType": "CANONICAL" });
        self.post_trigger(id, "savepoints", with_trigger_id(body, trigger_id))
            .await
    }

    /// Stops the job with a savepoint; returns the trigger id to poll.
    pub async fn stop_with_savepoint(
        &self,
        id: &str,
        target_dir: Option<&str>,
        drain: bool,
    ) -> Result<String> {
        self.stop_with_savepoint_as(id, target_dir, drain, None)
            .await
    }

    /// Stops the job with a savepoint under the caller's trigger id, as `trigger_savepoint_as`.
    pub async fn stop_with_savepoint_as(
        &self,
        id: &str,
        target_dir: Option<&str>,
        drain: bool,
        trigger_id: Option<&str>,
    ) -> Result<String> {
        let body = json!({ "targetDirectory": target_dir, "drain": drain });
        self.post_trigger(id, "stop", with_trigger_id(body, trigger_id))
            .await
    }

    /// POSTs to an asynchronous operation of a job and returns its request id.
    async fn post_trigger(&self, id: &str, operation: &str, body: Value) -> Result<String> {
        let path = format!("/jobs/{id}/{operation}");
        let v = self
            .call(
                reqwest::Method::POST,
                &path,
                Some(body),
                &format!("job {id}"),
            )
            .await?;
        self.request_id(&v, &path)
    }

    pub async fn savepoint_status(&self, id: &str, trigger: &str) -> Result<SavepointStatus> {
        let path = format!("/jobs/{id}/savepoints/{trigger}");
        let v = self
            .call(
                reqwest::Method::GET,
                &path,
                None,
                &format!("savepoint trigger {trigger} of job {id}"),
            )
            .await?;
        match v.pointer("/status/id").and_then(Value::as_str) {
            Some("IN_PROGRESS") => Ok(SavepointStatus::InProgress),
            Some("COMPLETED") => {
                if let Some(loc) = v.pointer("/operation/location").and_then(Value::as_str) {
                    return Ok(SavepointStatus::Completed(paths::plain_location(loc)));
                }
                let cause = v.pointer("/operation/failure-cause");
                let text = cause
                    .and_then(|c| {
                        c.get("stack-trace")
                            .and_then(Value::as_str)
                            .or_else(|| c.get("class").and_then(Value::as_str))
                    })
                    .map(|t| t.lines().next().unwrap_or(t).to_owned())
                    .unwrap_or_else(|| "unknown cause".into());
                Ok(SavepointStatus::Failed(text))
            }
            other => Err(ClientError::Decode {
                url: format!("{}{path}", self.base),
                reason: format!("unknown status {other:?}"),
            }),
        }
    }

    /// Polls a savepoint trigger until it completes; returns the savepoint's location.
    pub async fn wait_savepoint(
        &self,
        id: &str,
        trigger: &str,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.savepoint_status(id, trigger).await? {
                SavepointStatus::Completed(loc) => return Ok(loc),
                SavepointStatus::Failed(cause) => return Err(ClientError::SavepointFailed(cause)),
                SavepointStatus::InProgress => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout(timeout));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    pub async fn cancel(&self, id: &str) -> Result<()> {
        let path = format!("/jobs/{id}?mode=cancel");
        self.call(reqwest::Method::PATCH, &path, None, &format!("job {id}"))
            .await
            .map(|_| ())
    }

    pub async fn checkpoints(&self, id: &str) -> Result<CheckpointInfo> {
        let path = format!("/jobs/{id}/checkpoints");
        let v = self
            .call(reqwest::Method::GET, &path, None, &format!("job {id}"))
            .await?;
        let p = |ptr: &str| {
            v.pointer(ptr)
                .and_then(Value::as_str)
                .map(paths::plain_location)
        };
        Ok(CheckpointInfo {
            completed: v
                .pointer("/counts/completed")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            failed: v
                .pointer("/counts/failed")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            latest_completed: p("/latest/completed/external_path"),
            latest_savepoint: p("/latest/savepoint/external_path"),
            restored_from: p("/latest/restored/external_path"),
        })
    }

    /// The sources' positions and whether they hold.
    pub async fn sources(&self, id: &str) -> Result<SourcesInfo> {
        let path = format!("/jobs/{id}/sources");
        let v = self
            .call(reqwest::Method::GET, &path, None, &format!("job {id}"))
            .await?;
        self.decode(v, &path)
    }

    /// Holds the sources at `at` (None: where they are now).
    pub async fn hold_sources(&self, id: &str, at: Option<&[SplitPosition]>) -> Result<()> {
        let path = format!("/jobs/{id}/sources/hold");
        let body = match at {
            Some(at) => json!({ "at": at }),
            None => json!({}),
        };
        self.call(
            reqwest::Method::POST,
            &path,
            Some(body),
            &format!("job {id}"),
        )
        .await
        .map(|_| ())
    }

    /// Lets the sources read on, after the cut-over marker with `cut_over`.
    pub async fn release_sources(&self, id: &str, cut_over: bool) -> Result<()> {
        let path = format!("/jobs/{id}/sources/release");
        self.call(
            reqwest::Method::POST,
            &path,
            Some(json!({ "cut-over": cut_over })),
            &format!("job {id}"),
        )
        .await
        .map(|_| ())
    }
}

/// A trigger request's body with Flink's `triggerId`, when the caller chose one.
fn with_trigger_id(mut body: Value, trigger_id: Option<&str>) -> Value {
    if let (Some(id), Some(fields)) = (trigger_id, body.as_object_mut()) {
        fields.insert("triggerId".into(), Value::String(id.to_owned()));
    }
    body
}
