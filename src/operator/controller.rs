//! The controller: for each StatefulJob it observes the engine (Deployment, pod, the engine's
//! REST API, savepoints), asks the pure planner for the next step and carries it out; for each
//! Savepoint it takes user-requested savepoints and disposes the files of deleted ones.
//!
//! Progress lives in the StatefulJob's status, which is written (with the resourceVersion read,
//! so a concurrent writer makes this reconcile fail and retry) before the side effects of a
//! step, so an operator restarted at any point finds the step it was in.

use super::crd::{
    PendingSavepoint, SAVEPOINT_FINALIZER, Savepoint, SavepointSpec, SavepointState,
    SavepointStatus, SavepointTrigger, StatefulJob, StatefulJobStatus, UpgradeStage,
};
use super::engine_client::{self, CheckpointInfo, ClientError, EngineClient};
use super::metrics::Metrics;
use super::planner::{self, Action as Step, EngineObs, Observed, SavepointObs, TriggerObs};
use super::resources::{self, EngineSettings, LABEL_JOB, LABEL_SPEC_HASH};
use crate::savepoint::metadata::SnapshotMetadata;
use crate::savepoint::store::Store;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalize, finalizer};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Finalizer on StatefulJobs: their savepoints are disposed (or kept) before the object goes.
pub const JOB_FINALIZER: &str = "sjob.dev/savepoints";
/// Field manager of the operator's server-side applies.
pub const FIELD_MANAGER: &str = "sjob-operator";
/// A trigger id that records that the request itself failed (the engine refused or could not
/// be reached), so the failure goes through the planner's retry and backoff like any other.
const FAILED_TRIGGER: &str = "failed: ";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Engine(#[from] ClientError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Finalizer(String),
    /// A deleted Savepoint whose files a job still needs: kept, retried later.
    #[error("savepoint {name} is kept: {reason}")]
    InUse { name: String, reason: String },
}

/// What the controller needs besides the client.
pub struct Context {
    pub client: Client,
    pub engine: EngineSettings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Timeout of each call to an engine.
    pub engine_timeout: Duration,
}

impl Context {
    pub fn new(
        client: Client,
        engine: EngineSettings,
        metrics: Arc<Metrics>,
        identity: &str,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.to_owned()),
            },
        );
        Context {
            client,
            engine,
            metrics,
            recorder,
            engine_timeout: Duration::from_secs(5),
        }
    }
}

fn now_s() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn rfc3339_now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Reconciles run at once per controller.
const RECONCILE_CONCURRENCY: u16 = 8;

/// Runs the StatefulJob and Savepoint controllers until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (jobs, deployments, savepoints): (Api<StatefulJob>, Api<Deployment>, Api<Savepoint>) =
        match &namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                break;
            }
        }
    };
    // Bounded concurrency: a burst of changes (1,000 jobs applied at once) is worked through a
    // few at a time rather than holding a request, a connection and its buffers per job.
    let config = || controller::Config::default().concurrency(RECONCILE_CONCURRENCY);
    let job_controller = Controller::new(jobs, watcher::Config::default())
        .with_config(config())
        .owns(deployments, watcher::Config::default())
        .graceful_shutdown_on(stopped(stop_rx.clone()))
        .run(reconcile_job, job_error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "job reconcile");
            }
        });
    let savepoint_controller = Controller::new(savepoints, watcher::Config::default())
        .with_config(config())
        .graceful_shutdown_on(stopped(stop_rx))
        .run(reconcile_savepoint, savepoint_error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "savepoint reconcile");
            }
        });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    futures::join!(job_controller, savepoint_controller);
}

fn job_error_policy(sj: Arc<StatefulJob>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    tracing::warn!(job = %sj.name_any(), namespace = ?sj.namespace(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(3))
}

fn savepoint_error_policy(sp: Arc<Savepoint>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    tracing::warn!(savepoint = %sp.name_any(), error = %err, "savepoint reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn finalizer_error<E: std::error::Error + 'static>(e: kube::runtime::finalizer::Error<E>) -> Error {
    Error::Finalizer(e.to_string())
}

async fn reconcile_job(sj: Arc<StatefulJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<StatefulJob> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, JOB_FINALIZER, sj, |event| async {
        match event {
            Finalize::Apply(sj) => apply_job(&sj, &ctx).await,
            Finalize::Cleanup(sj) => cleanup_job(&sj, &ctx).await,
        }
    })
    .await
    .map_err(finalizer_error);
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// The engine as observed, with what is needed to act on it.
struct EngineView {
    obs: EngineObs,
    client: Option<EngineClient>,
    job_id: Option<String>,
    checkpoints: Option<CheckpointInfo>,
    /// The spec hash the Deployment runs.
    deployed_hash: Option<String>,
}

fn key(sj: &StatefulJob) -> String {
    format!("{}/{}", sj.namespace().unwrap_or_default(), sj.name_any())
}

async fn apply_job(sj: &StatefulJob, ctx: &Context) -> Result<Action, Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let name = sj.name_any();
    let api: Api<StatefulJob> = Api::namespaced(ctx.client.clone(), &ns);
    let status = sj.status.clone().unwrap_or_default();
    let generation = sj.metadata.generation.unwrap_or(0);

    let mut view = observe_engine(ctx, &ns, &name).await?;
    repair_rollout(sj, ctx, &status, &mut view).await?;
    let trigger = observe_trigger(&status, &view).await;
    let preflight = preflight(sj, ctx, &status, &view).await;
    let savepoints = list_savepoints(ctx, &ns, &name).await?;
    let observed = Observed {
        now_s: now_s(),
        engine: view.obs.clone(),
        trigger: trigger.clone(),
        preflight,
        latest_checkpoint: view
            .checkpoints
            .as_ref()
            .and_then(|c| c.latest_completed.clone()),
        savepoints: savepoints
            .iter()
            .filter_map(|sp| {
                let st = sp.status.as_ref()?;
                if st.state != Some(SavepointState::Completed) {
                    return None;
                }
                Some(SavepointObs {
                    name: sp.name_any(),
                    path: st.path.clone()?,
                    completed_s: st
                        .completed
                        .as_deref()
                        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                        .map(|t| t.as_second())
                        .unwrap_or(0),
                })
            })
            .collect(),
    };
    let plan = planner::plan(&sj.spec, generation, &status, &observed);
    let mut next = plan.status;
    if next.upgrade.is_some()
        || matches!(
            trigger,
            Some(TriggerObs::Completed { .. } | TriggerObs::Failed { .. })
        )
    {
        // An upgrade supersedes a manual or periodic savepoint in flight; a finished one has
        // been recorded by the planner.
        if status.upgrade.is_none() {
            next.pending_savepoint = None;
        }
    }
    let mut current = sj.clone();
    if next != status {
        current = write_status(&api, ctx, current, &next).await?;
    }
    let mut events = Vec::new();
    for step in plan.actions {
        match step {
            Step::Event {
                warning,
                reason,
                message,
            } => events.push((warning, reason, message)),
            step => act(sj, ctx, &view, &mut next, step).await?,
        }
    }
    if current.status.as_ref() != Some(&next) {
        write_status(&api, ctx, current, &next).await?;
    }
    for (warning, reason, message) in events {
        match reason.as_str() {
            "UpgradeComplete" => ctx.metrics.upgrades.with_label_values(&["completed"]).inc(),
            "RollingBack" => ctx
                .metrics
                .upgrades
                .with_label_values(&["rolled_back"])
                .inc(),
            "UpgradeBlocked" => ctx.metrics.upgrades.with_label_values(&["blocked"]).inc(),
            _ => {}
        }
        publish(ctx, sj, warning, &reason, &message).await;
    }
    ctx.metrics
        .set_phase(&key(sj), next.phase.map(|p| format!("{p:?}")));
    Ok(Action::requeue(Duration::from_millis(
        plan.requeue_ms.max(100),
    )))
}

/// Writes the status with the resourceVersion read, so that a concurrent change of the spec or
/// the status fails the write and the reconcile starts over from what is there now. A conflict
/// caused by metadata alone (labels, annotations: a GitOps tool, a user's kubectl annotate) does
/// not: the write is retried on the fresh object as long as its generation and status are
/// the ones this step was planned from, so a busy writer cannot starve the upgrade.
async fn write_status(
    api: &Api<StatefulJob>,
    ctx: &Context,
    mut current: StatefulJob,
    status: &StatefulJobStatus,
) -> Result<StatefulJob, Error> {
    let planned_from = (current.metadata.generation, current.status.clone());
    for _ in 0..10 {
        let mut next = current.clone();
        next.status = Some(status.clone());
        next.metadata.managed_fields = None;
        ctx.metrics.api_writes.with_label_values(&["status"]).inc();
        match api
            .replace_status(&next.name_any(), &PostParams::default(), &next)
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let fresh = api.get(&current.name_any()).await?;
                if (fresh.metadata.generation, fresh.status.clone()) != planned_from {
                    return Err(kube::Error::Api(e).into());
                }
                tracing::debug!(job = %key(&current), "status write met a metadata-only change; writing again");
                current = fresh;
            }
            other => return Ok(other?),
        }
    }
    Err(Error::Invalid(format!(
        "StatefulJob {}: the status write kept conflicting with other writers",
        key(&current)
    )))
}

async fn publish(ctx: &Context, sj: &StatefulJob, warning: bool, reason: &str, message: &str) {
    if warning {
        tracing::warn!(job = %key(sj), reason, "{message}");
    } else {
        tracing::info!(job = %key(sj), reason, "{message}");
    }
    ctx.metrics.api_writes.with_label_values(&["event"]).inc();
    let mut note = message.to_owned();
    note.truncate(1000);
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(note),
        action: reason.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &sj.object_ref(&())).await {
        tracing::warn!(job = %key(sj), error = %e, "cannot publish event {reason}");
    }
}

fn container_problem(pod: &Pod) -> Option<String> {
    let cs = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
    // One crash is recovered from (the engine resumes from its newest checkpoint); three in a
    // row without becoming ready is a crash loop.
    if cs.restart_count < 3 || cs.ready {
        return None;
    }
    let last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| {
            format!(
                "exit code {}{}",
                t.exit_code,
                t.message
                    .as_deref()
                    .map(|m| format!(": {}", m.trim()))
                    .unwrap_or_default()
            )
        })
        .unwrap_or_else(|| "unknown".into());
    Some(format!(
        "the engine pod {} restarted {} times (last exit: {last})",
        pod.name_any(),
        cs.restart_count
    ))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn observe_engine(ctx: &Context, ns: &str, name: &str) -> Result<EngineView, Error> {
    let mut view = EngineView {
        obs: EngineObs::Absent,
        client: None,
        job_id: None,
        checkpoints: None,
        deployed_hash: None,
    };
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let Some(deploy) = deployments.get_opt(&resources::engine_name(name)).await? else {
        return Ok(view);
    };
    if deploy.metadata.deletion_timestamp.is_some() {
        return Ok(view);
    }
    let spec_hash = deploy
        .annotations()
        .get(LABEL_SPEC_HASH)
        .cloned()
        .unwrap_or_default();
    view.deployed_hash = Some(spec_hash.clone());
    view.obs = EngineObs::Starting {
        spec_hash: spec_hash.clone(),
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!("{LABEL_JOB}={name},{LABEL_SPEC_HASH}={spec_hash}");
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    let Some(pod) = list
        .items
        .iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
    else {
        return Ok(view);
    };
    if let Some(reason) = container_problem(pod) {
        view.obs = EngineObs::Broken { spec_hash, reason };
        return Ok(view);
    }
    let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
        return Ok(view);
    };
    let mut client = EngineClient::with_timeout(
        &format!("http://{ip}:{}", ctx.engine.port),
        ctx.engine_timeout,
    );
    if ctx.engine.rest_token
        && let Some(token) = rest_token(ctx, ns, name).await?
    {
        client = client.with_token(token);
    }
    view.client = Some(client.clone());
    if !pod_ready(pod) {
        return Ok(view);
    }
    let jobs = match client.jobs_overview().await {
        Ok(jobs) => jobs,
        Err(e) => {
            tracing::debug!(job = name, error = %e, "engine not answering yet");
            return Ok(view);
        }
    };
    let Some(job) = jobs.into_iter().max_by_key(|j| j.start_time) else {
        return Ok(view);
    };
    view.job_id = Some(job.jid.clone());
    match job.state.as_str() {
        "RUNNING" => {
            if !client.all_tasks_running(&job.jid).await.unwrap_or(false) {
                return Ok(view);
            }
            let cp = client.checkpoints(&job.jid).await.ok();
            view.obs = EngineObs::Running {
                spec_hash,
                job_id: job.jid.clone(),
                restored_from: cp.as_ref().and_then(|c| c.restored_from.clone()),
            };
            view.checkpoints = cp;
        }
        "FINISHED" | "CANCELED" => {
            view.checkpoints = client.checkpoints(&job.jid).await.ok();
            view.obs = EngineObs::Ended { spec_hash };
        }
        "FAILED" => {
            view.obs = EngineObs::Broken {
                spec_hash,
                reason: format!("job {} failed", job.jid),
            }
        }
        _ => {}
    }
    Ok(view)
}

/// While a new version (or the rollback) is being verified, the Deployment must run it: after
/// an operator restart between writing the status and applying the Deployment, apply it now.
async fn repair_rollout(
    sj: &StatefulJob,
    ctx: &Context,
    status: &StatefulJobStatus,
    view: &mut EngineView,
) -> Result<(), Error> {
    let Some(u) = &status.upgrade else {
        return Ok(());
    };
    if !matches!(u.stage, UpgradeStage::Verifying | UpgradeStage::RollingBack)
        || view.deployed_hash.as_deref() == Some(u.target_spec_hash.as_str())
    {
        return Ok(());
    }
    let spec = if planner::spec_hash(&sj.spec) == u.target_spec_hash {
        sj.spec.clone()
    } else if let Some(stable) = &status.last_stable_spec {
        (**stable).clone()
    } else {
        return Ok(());
    };
    tracing::info!(job = %key(sj), spec = %u.target_spec_hash, "applying the engine of the stage in progress");
    deploy(sj, ctx, &spec, &u.target_spec_hash, u.savepoint.as_deref()).await?;
    view.obs = EngineObs::Starting {
        spec_hash: u.target_spec_hash.clone(),
    };
    Ok(())
}

/// The bearer token of the job's engines, from their Secret (none before it is created).
async fn rest_token(
    ctx: &Context,
    ns: &str,
    job: &str,
) -> Result<Option<crate::engine::access::RestToken>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = secrets
        .get_opt(&resources::rest_token_secret_name(job))
        .await?;
    Ok(secret
        .and_then(|s| s.data?.remove(resources::TOKEN_KEY))
        .and_then(|b| crate::engine::access::RestToken::new(&String::from_utf8_lossy(&b.0))))
}

/// Creates the job's REST token Secret unless it exists: a token, once made, is never
/// replaced, since running engines and the operator must keep agreeing on it.
async fn ensure_rest_token(sj: &StatefulJob, ctx: &Context, ns: &str) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if secrets
        .get_metadata_opt(&resources::rest_token_secret_name(&sj.name_any()))
        .await?
        .is_some()
    {
        return Ok(());
    }
    let secret =
        resources::rest_token_secret(sj, &resources::new_rest_token()).map_err(Error::Invalid)?;
    ctx.metrics.api_writes.with_label_values(&["create"]).inc();
    match secrets.create(&PostParams::default(), &secret).await {
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        other => other.map(|_| ()).map_err(Error::from),
    }
}

async fn snapshot_time_ms(path: &str) -> Option<u64> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let store = Store::open(&path).ok()?;
        SnapshotMetadata::read(&store).ok().map(|m| m.timestamp_ms)
    })
    .await
    .ok()
    .flatten()
}

/// The newest savepoint of the engine's job, if it completed after `since` (RFC 3339): how a
/// savepoint whose trigger id was lost (operator restarted, engine restarted) is found again.
async fn recovered_savepoint(view: &EngineView, since: &str) -> Option<TriggerObs> {
    let path = view.checkpoints.as_ref()?.latest_savepoint.clone()?;
    let since_ms = since
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
        .unwrap_or(0);
    let taken = snapshot_time_ms(&path).await? as i64;
    // Timestamps are to the second in the status: allow for the rounding.
    (taken + 1000 >= since_ms).then_some(TriggerObs::Completed { path })
}

async fn observe_trigger(status: &StatefulJobStatus, view: &EngineView) -> Option<TriggerObs> {
    let (trigger_id, since) = match (&status.upgrade, &status.pending_savepoint) {
        (Some(u), _) if u.stage == UpgradeStage::Savepointing => {
            (u.trigger_id.clone(), u.stage_started.clone())
        }
        (Some(_), _) => return None,
        (None, Some(p)) => (Some(p.trigger_id.clone()), p.started.clone()),
        (None, None) => return None,
    };
    let Some(id) = trigger_id else {
        if matches!(view.obs, EngineObs::Ended { .. }) {
            return recovered_savepoint(view, &since).await;
        }
        return None;
    };
    if let Some(cause) = id.strip_prefix(FAILED_TRIGGER) {
        return Some(TriggerObs::Failed {
            cause: cause.to_owned(),
        });
    }
    let (Some(client), Some(job_id)) = (&view.client, &view.job_id) else {
        return None;
    };
    match client.savepoint_status(job_id, &id).await {
        Ok(engine_client::SavepointStatus::InProgress) => Some(TriggerObs::InProgress),
        Ok(engine_client::SavepointStatus::Completed(path)) => Some(TriggerObs::Completed { path }),
        Ok(engine_client::SavepointStatus::Failed(cause)) => Some(TriggerObs::Failed { cause }),
        Err(ClientError::NotFound { .. }) => match recovered_savepoint(view, &since).await {
            Some(found) => Some(found),
            None => Some(TriggerObs::Failed {
                cause: format!("the engine no longer knows savepoint request {id} (it restarted)"),
            }),
        },
        Err(e) => {
            tracing::debug!(error = %e, "savepoint status unknown for now");
            None
        }
    }
}

async fn preflight(
    sj: &StatefulJob,
    ctx: &Context,
    status: &StatefulJobStatus,
    view: &EngineView,
) -> Option<Vec<String>> {
    let u = status.upgrade.as_ref()?;
    if u.stage != UpgradeStage::Preflight {
        return None;
    }
    let snapshot = view
        .checkpoints
        .as_ref()
        .and_then(|c| c.latest_completed.clone())
        .or_else(|| status.last_savepoint.as_ref().map(|s| s.path.clone()))?;
    let job = resources::engine_job(&sj.spec, &ctx.engine);
    let parallelism = sj.spec.parallelism;
    let allow = sj.spec.upgrade.allow_non_restored_state;
    let checked = snapshot.clone();
    let result = tokio::task::spawn_blocking(move || {
        // Metadata and file sizes only: the stop savepoint, not this checkpoint, is what the
        // new version restores, and the restore verifies its checksums.
        crate::engine::check_restore(
            &job,
            &checked,
            parallelism,
            allow,
            crate::engine::FileCheck::Sizes,
        )
    })
    .await;
    Some(match result {
        Ok(Ok(_)) => Vec::new(),
        Ok(Err(problems)) => problems,
        Err(e) => vec![format!("the preflight check of {snapshot} crashed: {e}")],
    })
}

async fn list_savepoints(ctx: &Context, ns: &str, job: &str) -> Result<Vec<Savepoint>, Error> {
    let api: Api<Savepoint> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|sp| sp.spec.job_ref == job && sp.metadata.deletion_timestamp.is_none())
        .collect())
}

async fn apply<K>(api: &Api<K>, ctx: &Context, obj: &K) -> Result<(), Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    ctx.metrics.api_writes.with_label_values(&["apply"]).inc();
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

async fn deploy(
    sj: &StatefulJob,
    ctx: &Context,
    spec: &super::crd::StatefulJobSpec,
    spec_hash: &str,
    restore_from: Option<&str>,
) -> Result<(), Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let (cm, deploy, svc) =
        resources::engine_objects(sj, spec, spec_hash, restore_from, None, &ctx.engine)
            .map_err(Error::Invalid)?;
    if ctx.engine.rest_token {
        ensure_rest_token(sj, ctx, &ns).await?;
    }
    apply(
        &Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns),
        ctx,
        &cm,
    )
    .await?;
    apply(
        &Api::<Service>::namespaced(ctx.client.clone(), &ns),
        ctx,
        &svc,
    )
    .await?;
    apply(
        &Api::<Deployment>::namespaced(ctx.client.clone(), &ns),
        ctx,
        &deploy,
    )
    .await?;
    Ok(())
}

fn ignore_not_found(r: Result<(), kube::Error>) -> Result<(), Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => Ok(other?),
    }
}

async fn act(
    sj: &StatefulJob,
    ctx: &Context,
    view: &EngineView,
    next: &mut StatefulJobStatus,
    step: Step,
) -> Result<(), Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let name = sj.name_any();
    let sp_dir = resources::savepoint_dir(&sj.spec, &ctx.engine);
    match step {
        Step::Deploy {
            spec,
            spec_hash,
            restore_from,
        } => deploy(sj, ctx, &spec, &spec_hash, restore_from.as_deref()).await?,
        Step::RemoveEngine => {
            let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
            ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
            ignore_not_found(
                api.delete(&resources::engine_name(&name), &DeleteParams::background())
                    .await
                    .map(|_| ()),
            )?;
        }
        Step::RestartEngine => {
            // The Deployment brings up a new pod; the same job id resumes from its checkpoints.
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let list = pods
                .list(&ListParams::default().labels(&format!("{LABEL_JOB}={name}")))
                .await?;
            for pod in list.items {
                ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
                ignore_not_found(
                    pods.delete(&pod.name_any(), &DeleteParams::default())
                        .await
                        .map(|_| ()),
                )?;
            }
        }
        Step::Preflight { .. } => {
            // Checked on the next reconcile, when the stage is in the status.
        }
        Step::StopWithSavepoint => {
            let id = match (&view.client, &view.job_id) {
                (Some(c), Some(job)) => c
                    .stop_with_savepoint(job, sp_dir.as_deref(), false)
                    .await
                    .unwrap_or_else(|e| format!("{FAILED_TRIGGER}{e}")),
                _ => format!("{FAILED_TRIGGER}the engine is not running a job"),
            };
            if let Some(u) = next.upgrade.as_mut() {
                u.trigger_id = Some(id);
            }
        }
        Step::TriggerSavepoint { trigger } => {
            if let (Some(c), Some(job)) = (&view.client, &view.job_id) {
                let id = c
                    .trigger_savepoint(job, sp_dir.as_deref(), false)
                    .await
                    .unwrap_or_else(|e| format!("{FAILED_TRIGGER}{e}"));
                next.pending_savepoint = Some(PendingSavepoint {
                    trigger_id: id,
                    trigger,
                    started: rfc3339_now(),
                });
            }
        }
        Step::RecordSavepoint {
            name: sp_name,
            path,
            trigger,
        } => {
            let started = match trigger {
                SavepointTrigger::Upgrade | SavepointTrigger::Suspend => sj
                    .status
                    .as_ref()
                    .and_then(|s| s.upgrade.as_ref())
                    .map(|u| u.stage_started.clone()),
                _ => sj
                    .status
                    .as_ref()
                    .and_then(|s| s.pending_savepoint.as_ref())
                    .map(|p| p.started.clone()),
            };
            record_savepoint(sj, ctx, &sp_name, &path, trigger, view, started).await?;
        }
        Step::DeleteSavepoint { name: sp_name } => {
            let api: Api<Savepoint> = Api::namespaced(ctx.client.clone(), &ns);
            ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
            ignore_not_found(
                api.delete(&sp_name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
            )?;
        }
        Step::Event { .. } => {}
    }
    Ok(())
}

async fn snapshot_bytes(path: &str) -> Option<u64> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let store = Store::open(&path).ok()?;
        SnapshotMetadata::read(&store).ok().map(|m| m.total_bytes())
    })
    .await
    .ok()
    .flatten()
}

async fn record_savepoint(
    sj: &StatefulJob,
    ctx: &Context,
    name: &str,
    path: &str,
    trigger: SavepointTrigger,
    view: &EngineView,
    started: Option<String>,
) -> Result<(), Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Savepoint> = Api::namespaced(ctx.client.clone(), &ns);
    let mut sp = Savepoint::new(
        name,
        SavepointSpec {
            job_ref: sj.name_any(),
            trigger,
            spec_hash: view.deployed_hash.clone(),
            // Set at creation, so the Savepoint controller never mistakes it for a request.
            path: Some(path.to_owned()),
        },
    );
    sp.metadata.labels = Some([(LABEL_JOB.to_owned(), sj.name_any())].into());
    sp.metadata.finalizers = Some(vec![SAVEPOINT_FINALIZER.to_owned()]);
    apply(&api, ctx, &sp).await?;
    let size = snapshot_bytes(path).await;
    let completed = rfc3339_now();
    if let Some(s) = started
        .as_deref()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
    {
        let secs = (jiff::Timestamp::now() - s)
            .total(jiff::Unit::Second)
            .unwrap_or(0.0);
        ctx.metrics.savepoint_duration.observe(secs.max(0.0));
    }
    if let Some(b) = size {
        ctx.metrics.savepoint_size.observe(b as f64);
    }
    let status = SavepointStatus {
        state: Some(SavepointState::Completed),
        path: Some(path.to_owned()),
        size_bytes: size,
        trigger_id: None,
        started,
        completed: Some(completed),
        failure: None,
    };
    ctx.metrics.api_writes.with_label_values(&["status"]).inc();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    Ok(())
}

async fn cleanup_job(sj: &StatefulJob, ctx: &Context) -> Result<Action, Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let name = sj.name_any();
    ctx.metrics.set_phase(&key(sj), None);
    if sj.spec.savepoints.dispose_on_delete {
        let api: Api<Savepoint> = Api::namespaced(ctx.client.clone(), &ns);
        for sp in list_savepoints(ctx, &ns, &name).await? {
            ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
            ignore_not_found(
                api.delete(&sp.name_any(), &DeleteParams::default())
                    .await
                    .map(|_| ()),
            )?;
        }
        tracing::info!(job = %key(sj), "deleted: its savepoints are disposed (disposeOnDelete)");
    } else {
        tracing::info!(job = %key(sj), "deleted: its savepoints are kept (disposeOnDelete is false)");
    }
    // The engine's Deployment, Service and ConfigMap go by owner reference.
    Ok(Action::await_change())
}

async fn reconcile_savepoint(sp: Arc<Savepoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let ns = sp.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Savepoint> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, SAVEPOINT_FINALIZER, sp, |event| async {
        match event {
            Finalize::Apply(sp) => take_requested_savepoint(&sp, &ctx).await,
            Finalize::Cleanup(sp) => dispose_savepoint(&sp, &ctx).await,
        }
    })
    .await
    .map_err(finalizer_error)
}

async fn set_savepoint_status(
    ctx: &Context,
    sp: &Savepoint,
    status: SavepointStatus,
) -> Result<(), Error> {
    let api: Api<Savepoint> =
        Api::namespaced(ctx.client.clone(), &sp.namespace().unwrap_or_default());
    ctx.metrics.api_writes.with_label_values(&["status"]).inc();
    api.patch_status(
        &sp.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// A Savepoint object created by a user: take the savepoint on the job's engine (or, with
/// `spec.path`, register an existing one after checking it is complete).
async fn take_requested_savepoint(sp: &Savepoint, ctx: &Context) -> Result<Action, Error> {
    let status = sp.status.clone().unwrap_or_default();
    let ns = sp.namespace().unwrap_or_else(|| "default".into());
    match status.state {
        Some(SavepointState::Completed) | Some(SavepointState::Failed) => {
            Ok(Action::await_change())
        }
        None | Some(SavepointState::Pending) => {
            if let Some(path) = &sp.spec.path {
                let status = match snapshot_time_ms(path).await {
                    Some(ms) => SavepointStatus {
                        state: Some(SavepointState::Completed),
                        path: Some(path.clone()),
                        size_bytes: snapshot_bytes(path).await,
                        completed: jiff::Timestamp::from_millisecond(ms as i64)
                            .ok()
                            .map(|t| t.to_string()),
                        ..Default::default()
                    },
                    None => SavepointStatus {
                        state: Some(SavepointState::Failed),
                        path: Some(path.clone()),
                        failure: Some(format!(
                            "spec.path: {path} is not a complete savepoint (no readable _metadata)"
                        )),
                        ..Default::default()
                    },
                };
                set_savepoint_status(ctx, sp, status).await?;
                return Ok(Action::await_change());
            }
            let view = observe_engine(ctx, &ns, &sp.spec.job_ref).await?;
            let (Some(client), Some(job_id), EngineObs::Running { .. }) =
                (&view.client, &view.job_id, &view.obs)
            else {
                let status = SavepointStatus {
                    state: Some(SavepointState::Pending),
                    failure: Some(format!(
                        "spec.jobRef: StatefulJob {} has no running engine; waiting",
                        sp.spec.job_ref
                    )),
                    ..Default::default()
                };
                if sp.status.as_ref() != Some(&status) {
                    set_savepoint_status(ctx, sp, status).await?;
                }
                return Ok(Action::requeue(Duration::from_secs(5)));
            };
            let jobs: Api<StatefulJob> = Api::namespaced(ctx.client.clone(), &ns);
            let dir = match jobs.get_opt(&sp.spec.job_ref).await? {
                Some(sj) => resources::savepoint_dir(&sj.spec, &ctx.engine),
                None => ctx.engine.default_savepoint_dir.clone(),
            };
            let status = match client
                .trigger_savepoint(job_id, dir.as_deref(), false)
                .await
            {
                Ok(id) => SavepointStatus {
                    state: Some(SavepointState::InProgress),
                    trigger_id: Some(format!("{job_id}/{id}")),
                    started: Some(rfc3339_now()),
                    ..Default::default()
                },
                Err(e) => SavepointStatus {
                    state: Some(SavepointState::Failed),
                    failure: Some(e.to_string()),
                    ..Default::default()
                },
            };
            set_savepoint_status(ctx, sp, status).await?;
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Some(SavepointState::InProgress) => {
            let Some((job_id, trigger)) =
                status.trigger_id.as_deref().and_then(|t| t.split_once('/'))
            else {
                return Ok(Action::await_change());
            };
            let view = observe_engine(ctx, &ns, &sp.spec.job_ref).await?;
            let Some(client) = view.client else {
                return Ok(Action::requeue(Duration::from_secs(2)));
            };
            let next = match client.savepoint_status(job_id, trigger).await {
                Ok(engine_client::SavepointStatus::InProgress) => {
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
                Ok(engine_client::SavepointStatus::Completed(path)) => SavepointStatus {
                    state: Some(SavepointState::Completed),
                    size_bytes: snapshot_bytes(&path).await,
                    path: Some(path),
                    completed: Some(rfc3339_now()),
                    ..status
                },
                Ok(engine_client::SavepointStatus::Failed(cause)) => SavepointStatus {
                    state: Some(SavepointState::Failed),
                    failure: Some(cause),
                    ..status
                },
                Err(ClientError::NotFound { .. }) => SavepointStatus {
                    state: Some(SavepointState::Failed),
                    failure: Some(format!(
                        "the engine no longer knows savepoint request {trigger} (it restarted)"
                    )),
                    ..status
                },
                Err(e) => {
                    tracing::debug!(error = %e, "savepoint status unknown for now");
                    return Ok(Action::requeue(Duration::from_secs(2)));
                }
            };
            set_savepoint_status(ctx, sp, next).await?;
            Ok(Action::await_change())
        }
    }
}

/// Deletes a savepoint's files before its object goes, unless its job still needs them: then
/// the object stays (deleting, with its finalizer) until the job no longer does.
async fn dispose_savepoint(sp: &Savepoint, ctx: &Context) -> Result<Action, Error> {
    let Some(path) = sp
        .status
        .as_ref()
        .and_then(|s| s.path.clone())
        .or_else(|| sp.spec.path.clone())
    else {
        return Ok(Action::await_change());
    };
    let ns = sp.namespace().unwrap_or_else(|| "default".into());
    let jobs: Api<StatefulJob> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(sj) = jobs.get_opt(&sp.spec.job_ref).await? {
        let view = observe_engine(ctx, &ns, &sp.spec.job_ref).await?;
        let has_checkpoint = view
            .checkpoints
            .as_ref()
            .is_some_and(|c| c.latest_completed.is_some());
        if let Some(reason) =
            planner::disposal_blocker(&path, sj.status.as_ref(), &view.obs, has_checkpoint)
        {
            let ev = Event {
                type_: EventType::Warning,
                reason: "DisposalDeferred".into(),
                note: Some(reason.clone()),
                action: "Dispose".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&ev, &sp.object_ref(&())).await {
                tracing::warn!(savepoint = %sp.name_any(), error = %e, "cannot publish event DisposalDeferred");
            }
            return Err(Error::InUse {
                name: sp.name_any(),
                reason,
            });
        }
    }
    let where_ = path.clone();
    let result = tokio::task::spawn_blocking(move || {
        let store = Store::open(&path).map_err(|e| e.to_string())?;
        crate::savepoint::tools::dispose(&store).map_err(|e| e.to_string())
    })
    .await;
    match result {
        Ok(Ok(bytes)) => {
            tracing::info!(savepoint = %sp.name_any(), path = %where_, bytes, "disposed");
            Ok(Action::await_change())
        }
        Ok(Err(e)) if e.contains("does not exist") => Ok(Action::await_change()),
        Ok(Err(e)) => Err(Error::Invalid(format!("cannot dispose {where_}: {e}"))),
        Err(e) => Err(Error::Invalid(format!("cannot dispose {where_}: {e}"))),
    }
}
