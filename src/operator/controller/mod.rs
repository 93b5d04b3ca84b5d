//! The controller: for each StatefulJob it observes the engine (Deployment, pod, the engine's
//! REST API, savepoints), asks the pure planner for the next step and carries it out; for each
//! Savepoint it takes user-requested savepoints and disposes the files of deleted ones.
//!
//! Progress lives in the StatefulJob's status, which is written (with the resourceVersion read,
//! so a concurrent writer makes this reconcile fail and retry) before the side effects of a
//! step, so an operator restarted at any point finds the step it was in.

mod act;
mod error;
mod observe;
mod savepoints;
mod status;

pub use error::Error;

use self::act::{act, ignore_not_found};
use self::observe::list_savepoints;
use self::savepoints::reconcile_savepoint;
use self::status::{publish, write_status};
use super::crd::{Savepoint, StatefulJob};
use super::metrics::Metrics;
use super::planner::{self, Action as Step, TriggerObs};
use super::resources::EngineSettings;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::DeleteParams;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
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

/// What the controller needs besides the client.
pub struct Context {
    pub client: Client,
    pub engine: EngineSettings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Timeout of each call to an engine.
    pub engine_timeout: Duration,
    /// Jobs whose cached copy was found behind the API server (a status write conflicted with
    /// a newer status): read afresh on each reconcile until the cache has caught up.
    stale: std::sync::Mutex<std::collections::HashSet<String>>,
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
            stale: Default::default(),
        }
    }

    fn stale(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.stale.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The backoff of the controllers' watches after an error: 0.5 s doubling to at most 5 s, from
/// the start again after a minute without errors. (kube's default grows to 30 s and resets only
/// after 2 minutes, so an API server away for half a minute left the cache that long behind.)
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(5);

    fn policy() -> kube::runtime::utils::ResetTimerBackoff<WatchBackoff> {
        kube::runtime::utils::ResetTimerBackoff::new(
            WatchBackoff { next: Self::FIRST },
            Duration::from_secs(60),
        )
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (now * 2).min(Self::MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

fn now_s() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn rfc3339_now() -> String {
    jiff::Timestamp::now().to_string()
}

/// The soonest a job is looked at again, whatever the planner asks: a floor against a busy loop.
/// Below the planner's quickest poll (25 ms, a savepoint in flight), which is downtime.
const MIN_REQUEUE_MS: u64 = 20;

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
        .trigger_backoff(WatchBackoff::policy())
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
        .trigger_backoff(WatchBackoff::policy())
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
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.category()])
        .inc();
    tracing::warn!(job = %sj.name_any(), namespace = ?sj.namespace(), category = err.category(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(3))
}

fn savepoint_error_policy(sp: Arc<Savepoint>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.category()])
        .inc();
    tracing::warn!(savepoint = %sp.name_any(), category = err.category(), error = %err, "savepoint reconcile failed; retrying");
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
    let sj = match fresh_if_stale(&api, &ctx, sj).await {
        Ok(Some(sj)) => sj,
        Ok(None) => return Ok(Action::await_change()),
        Err(e) => return Err(e),
    };
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

/// The object to reconcile: the cached one, or, while the cache is known to be behind (see
/// `Context::stale`), the one the API server has now (None: it is gone).
async fn fresh_if_stale(
    api: &Api<StatefulJob>,
    ctx: &Context,
    cached: Arc<StatefulJob>,
) -> Result<Option<Arc<StatefulJob>>, Error> {
    let k = key(&cached);
    if !ctx.stale().contains(&k) {
        return Ok(Some(cached));
    }
    let Some(fresh) = api.get_opt(&cached.name_any()).await? else {
        ctx.stale().remove(&k);
        return Ok(None);
    };
    if fresh.metadata.resource_version == cached.metadata.resource_version {
        ctx.stale().remove(&k);
    }
    Ok(Some(Arc::new(fresh)))
}

fn key(sj: &StatefulJob) -> String {
    format!("{}/{}", sj.namespace().unwrap_or_default(), sj.name_any())
}

/// One step of a StatefulJob: observe, plan (a pure function), write the status the plan
/// leads to, act, report.
async fn apply_job(sj: &StatefulJob, ctx: &Context) -> Result<Action, Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<StatefulJob> = Api::namespaced(ctx.client.clone(), &ns);
    let status = sj.status.clone().unwrap_or_default();
    let generation = sj.metadata.generation.unwrap_or(0);

    // Each phase's time, logged at debug level: where an upgrade's seconds go.
    let started = Instant::now();
    let (views, mut observed) = observe::observe(sj, ctx, &status, now_s()).await?;
    let observed_at = started.elapsed();
    let mut plan = planner::plan(&sj.spec, generation, &status, &observed);
    if observed.preflight.is_none() && plan.asks_preflight() {
        // The preflight check only reads, so it is done now and planned on at once rather
        // than on the next reconcile: an upgrade's old job is stopped that much sooner.
        if let Some(problems) = observe::preflight(sj, ctx, &plan.status, &views.live).await {
            observed.preflight = Some(problems);
            let next = planner::plan(&sj.spec, generation, &plan.status, &observed);
            plan = plan.then(next);
        }
    }
    if plan.watch_trigger
        && let Some(ended) = observe::watch_trigger(&status, &views.live).await
    {
        // Seen the moment it ends, not at the next reconcile: the stopped job's downtime.
        observed.trigger = Some(ended);
        observed.now_s = now_s();
        plan = planner::plan(&sj.spec, generation, &status, &observed);
    }
    let mut next = plan.status;
    let trigger_ended = matches!(
        observed.trigger,
        Some(TriggerObs::Completed { .. } | TriggerObs::Failed { .. })
    );
    if (next.upgrade.is_some() || trigger_ended)
        && status.upgrade.is_none()
        && next.pending_savepoint == status.pending_savepoint
    {
        // An upgrade supersedes a manual or periodic savepoint in flight; a finished one has
        // been recorded by the planner. (One the plan has just asked for stays.)
        next.pending_savepoint = None;
    }
    // A savepoint is recorded before the status that moves past it is written: an operator
    // stopped in between derives the same record again (its name comes from the path, so
    // recording twice is one object); the other way round the record would be lost.
    let (records, steps): (Vec<Step>, Vec<Step>) = plan
        .actions
        .into_iter()
        .partition(|s| matches!(s, Step::RecordSavepoint { .. }));
    for step in records {
        act(sj, ctx, &views, &mut next, step).await?;
    }
    let planned_at = started.elapsed();
    let mut current = sj.clone();
    if next != status {
        current = write_status(&api, ctx, current, &next).await?;
    }
    let written_at = started.elapsed();
    let mut events = Vec::new();
    for step in steps {
        match step {
            Step::Event {
                warning,
                reason,
                message,
            } => events.push((warning, reason, message)),
            step => act(sj, ctx, &views, &mut next, step).await?,
        }
    }
    let acted_at = started.elapsed();
    if current.status.as_ref() != Some(&next) {
        write_status(&api, ctx, current, &next).await?;
    }
    tracing::debug!(
        job = %key(sj),
        observe_ms = observed_at.as_secs_f64() * 1e3,
        plan_ms = (planned_at - observed_at).as_secs_f64() * 1e3,
        status_ms = (written_at - planned_at).as_secs_f64() * 1e3,
        act_ms = (acted_at - written_at).as_secs_f64() * 1e3,
        total_ms = started.elapsed().as_secs_f64() * 1e3,
        "reconciled"
    );
    for (warning, reason, message) in events {
        if let Some(outcome) = reason.upgrade_outcome() {
            ctx.metrics.upgrades.with_label_values(&[outcome]).inc();
        }
        publish(
            ctx,
            &sj.object_ref(&()),
            &key(sj),
            warning,
            reason,
            &message,
        )
        .await;
    }
    ctx.metrics
        .set_phase(&key(sj), next.phase.map(|p| format!("{p:?}")));
    Ok(Action::requeue(Duration::from_millis(
        plan.requeue_ms.max(MIN_REQUEUE_MS),
    )))
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
    // The engines go now, not when the garbage collector gets to them (it may not yet know
    // the StatefulJob's kind, and an engine left running keeps writing checkpoints); the
    // Service, ConfigMaps and Secret go by owner reference.
    for color in [
        crate::operator::crd::Color::Blue,
        crate::operator::crd::Color::Green,
    ] {
        act::remove_engine(ctx, &ns, &name, color).await?;
    }
    Ok(Action::await_change())
}
