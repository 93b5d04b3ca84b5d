//! Observing a StatefulJob's world: its engine (Deployment, pod, the engine's REST API), the
//! savepoint request in flight, the preflight check of a new version, its Savepoint objects.
//! Only reads; what it finds goes into the planner's `Observed`.

use super::act::repair_rollout;
use super::{Context, Error, FAILED_TRIGGER};
use crate::operator::crd::{
    Color, CutOverPosition, Savepoint, SavepointState, StatefulJob, StatefulJobStatus, UpgradeStage,
};
use crate::operator::engine_client::{self, CheckpointInfo, ClientError, EngineClient};
use crate::operator::planner::{EngineObs, Observed, SavepointObs, SourcesObs, TriggerObs};
use crate::operator::resources::{self, LABEL_COLOR, LABEL_JOB, LABEL_SPEC_HASH};
use crate::savepoint::metadata::SnapshotMetadata;
use crate::savepoint::store::Store;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use std::time::{Duration, Instant};

/// The engine as observed, with what is needed to act on it.
pub(super) struct EngineView {
    pub(super) obs: EngineObs,
    pub(super) client: Option<EngineClient>,
    pub(super) job_id: Option<String>,
    pub(super) checkpoints: Option<CheckpointInfo>,
    /// The spec hash the Deployment runs.
    pub(super) deployed_hash: Option<String>,
}

pub(super) fn container_problem(pod: &Pod) -> Option<String> {
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

pub(super) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub(super) async fn observe_engine(
    ctx: &Context,
    ns: &str,
    name: &str,
    color: Color,
) -> Result<EngineView, Error> {
    let mut view = EngineView {
        obs: EngineObs::Absent,
        client: None,
        job_id: None,
        checkpoints: None,
        deployed_hash: None,
    };
    // The Deployment, its pods and the engines' token are read at once: each reconcile of an
    // upgrade in flight waits for these reads, and the apply-to-savepoint time is its downtime's
    // first part. Pods are listed by job and color and matched to the Deployment's spec hash
    // here.
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    // Blue is also the engine of pods from before engines had colors.
    let color_term = match color {
        Color::Blue => format!("{LABEL_COLOR}!=green"),
        Color::Green => format!("{LABEL_COLOR}=green"),
    };
    let selector = format!("{LABEL_JOB}={name},{color_term}");
    let engine_name = resources::engine_name(name, color);
    let pod_params = ListParams::default().labels(&selector);
    let (deploy, list, token) = futures::join!(
        deployments.get_opt(&engine_name),
        pods.list(&pod_params),
        async {
            if ctx.engine.rest_token {
                rest_token(ctx, ns, name).await
            } else {
                Ok(None)
            }
        },
    );
    let Some(deploy) = deploy? else {
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
    let list = list?;
    let Some(pod) = list.items.iter().find(|p| {
        p.metadata.deletion_timestamp.is_none()
            && p.labels().get(LABEL_SPEC_HASH) == Some(&spec_hash)
    }) else {
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
    if let Some(token) = token? {
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
            // Asked together: a busy engine answers each after a few milliseconds.
            let (all_running, cp) = futures::join!(
                client.all_tasks_running(&job.jid),
                client.checkpoints(&job.jid)
            );
            if !all_running.unwrap_or(false) {
                return Ok(view);
            }
            let cp = cp.ok();
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

/// The bearer token of the job's engines, from their Secret (none before it is created).
pub(super) async fn rest_token(
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

pub(super) async fn snapshot_time_ms(path: &str) -> Option<u64> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let store = Store::open(&path).ok()?;
        SnapshotMetadata::read(&store).ok().map(|m| m.timestamp_ms)
    })
    .await
    .ok()
    .flatten()
}

pub(super) async fn snapshot_bytes(path: &str) -> Option<u64> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let store = Store::open(&path).ok()?;
        SnapshotMetadata::read(&store).ok().map(|m| m.total_bytes())
    })
    .await
    .ok()
    .flatten()
}

/// The newest savepoint of the engine's job, if it completed after `since` (RFC 3339): how a
/// savepoint whose trigger id was lost (operator restarted, engine restarted) is found again.
pub(super) async fn recovered_savepoint(view: &EngineView, since: &str) -> Option<TriggerObs> {
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

/// For how long a reconcile watches a savepoint request that is an upgrade's downtime, and how
/// often it looks meanwhile: a stop-with-savepoint of a small state completes within tens of
/// milliseconds, and the new version starts as soon as it is seen complete.
const WATCH_TRIGGER_FOR: Duration = Duration::from_secs(1);
const WATCH_TRIGGER_EVERY: Duration = Duration::from_millis(5);

/// The outcome of the savepoint request in flight, looked at every few milliseconds until it
/// ends; None if it has not within `WATCH_TRIGGER_FOR` (the next reconcile looks again).
pub(super) async fn watch_trigger(
    status: &StatefulJobStatus,
    view: &EngineView,
) -> Option<TriggerObs> {
    let until = Instant::now() + WATCH_TRIGGER_FOR;
    while Instant::now() < until {
        tokio::time::sleep(WATCH_TRIGGER_EVERY).await;
        match observe_trigger(status, view).await {
            Some(TriggerObs::InProgress) | None => {}
            ended => return ended,
        }
    }
    None
}

pub(super) async fn observe_trigger(
    status: &StatefulJobStatus,
    view: &EngineView,
) -> Option<TriggerObs> {
    let (trigger_id, since) = match (&status.upgrade, &status.pending_savepoint) {
        (Some(u), _) if u.stage == UpgradeStage::Savepointing => {
            (u.trigger_id.clone(), u.stage_started.clone())
        }
        (Some(u), _) if u.stage == UpgradeStage::Switching && u.trigger_id.is_some() => {
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
                cause: format!(
                    "the engine does not know savepoint request {id}: it never received it, or has restarted since"
                ),
            }),
        },
        Err(e) => {
            tracing::debug!(error = %e, "savepoint status unknown for now");
            None
        }
    }
}

pub(super) async fn preflight(
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

pub(super) async fn list_savepoints(
    ctx: &Context,
    ns: &str,
    job: &str,
) -> Result<Vec<Savepoint>, Error> {
    let api: Api<Savepoint> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|sp| sp.spec.job_ref == job && sp.metadata.deletion_timestamp.is_none())
        .collect())
}

/// The job's engines as seen: the live one, and a blue-green candidate.
pub(super) struct Views {
    pub(super) live: EngineView,
    pub(super) candidate: Option<EngineView>,
}

impl Views {
    /// The client and job id of the candidate's engine (or the live one's), if it runs one.
    pub(super) fn job(&self, candidate: bool) -> Option<(&EngineClient, &str)> {
        let view = if candidate {
            self.candidate.as_ref()?
        } else {
            &self.live
        };
        Some((view.client.as_ref()?, view.job_id.as_deref()?))
    }
}

/// Everything the planner needs about `sj`, and the engines as seen (to act on them). Repairs
/// a rollout an operator restart interrupted first, so the engine observed is the stage's.
pub(super) async fn observe(
    sj: &StatefulJob,
    ctx: &Context,
    status: &StatefulJobStatus,
    now_s: i64,
) -> Result<(Views, Observed), Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let name = sj.name_any();
    let live_color = status.live.unwrap_or_default();
    let mut views = Views {
        live: observe_engine(ctx, &ns, &name, live_color).await?,
        candidate: match &status.candidate {
            Some(c) => Some(observe_engine(ctx, &ns, &name, c.color).await?),
            None => None,
        },
    };
    repair_rollout(sj, ctx, status, &mut views).await?;
    let switching = status
        .upgrade
        .as_ref()
        .is_some_and(|u| matches!(u.stage, UpgradeStage::CatchingUp | UpgradeStage::Switching));
    let (live_sources, candidate_sources) = if switching {
        let candidate = async {
            match &views.candidate {
                Some(v) => sources(v).await,
                None => None,
            }
        };
        futures::join!(sources(&views.live), candidate)
    } else {
        (None, None)
    };
    // Asked at once: while an engine writes a savepoint on every core its answers are slow,
    // and each reconcile of an upgrade in flight waits for all of them.
    let (trigger, preflight, savepoints, source_problems) = futures::join!(
        observe_trigger(status, &views.live),
        preflight(sj, ctx, status, &views.live),
        list_savepoints(ctx, &ns, &name),
        source_problems(&views.live),
    );
    let savepoints = savepoints?;
    let observed = Observed {
        now_s,
        engine: views.live.obs.clone(),
        candidate: views
            .candidate
            .as_ref()
            .map_or(EngineObs::Absent, |v| v.obs.clone()),
        live_sources,
        candidate_sources,
        trigger,
        preflight,
        latest_checkpoint: views
            .live
            .checkpoints
            .as_ref()
            .and_then(|c| c.latest_completed.clone()),
        savepoints: savepoints.iter().filter_map(completed_savepoint).collect(),
        source_problems,
        new_trigger_id: uuid::Uuid::new_v4().simple().to_string(),
    };
    Ok((views, observed))
}

/// Why a running engine's sources cannot read now (none if it does not answer).
async fn source_problems(view: &EngineView) -> Vec<String> {
    match (&view.obs, &view.client, &view.job_id) {
        (EngineObs::Running { .. }, Some(client), Some(job_id)) => client
            .sources(job_id)
            .await
            .map(|s| s.problems)
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// An engine's sources, if it answers.
async fn sources(view: &EngineView) -> Option<SourcesObs> {
    let (Some(client), Some(job_id)) = (&view.client, &view.job_id) else {
        return None;
    };
    match client.sources(job_id).await {
        Ok(s) => Some(SourcesObs {
            holding: s.holding,
            shadow: s.shadow,
            positions: s
                .positions
                .into_iter()
                .map(|p| CutOverPosition {
                    split: p.split,
                    position: p.position,
                })
                .collect(),
            overrun: s.overrun,
        }),
        Err(e) => {
            tracing::debug!(error = %e, "sources unknown for now");
            None
        }
    }
}

/// A completed Savepoint object as retention sees it.
fn completed_savepoint(sp: &Savepoint) -> Option<SavepointObs> {
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
}
