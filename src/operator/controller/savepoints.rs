//! The Savepoint controller: takes the savepoints users ask for with a Savepoint object (or
//! registers an existing one), and disposes the files of deleted ones unless a job still needs
//! them.

use super::observe::{observe_engine, snapshot_bytes, snapshot_time_ms};
use super::status::publish;
use super::{Context, Error, finalizer_error, rfc3339_now};
use crate::operator::crd::{Color, SAVEPOINT_FINALIZER, Savepoint, SavepointStatus, StatefulJob};
use crate::operator::engine_client::{self, ClientError};
use crate::operator::planner::{self, EngineObs, Reason, RequestObs, SavepointNeed, TriggerObs};
use crate::operator::resources;
use crate::savepoint::store::Store;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalize, finalizer};
use kube::{Api, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

pub(super) async fn reconcile_savepoint(
    sp: Arc<Savepoint>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
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

pub(super) async fn set_savepoint_status(
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
/// `spec.path`, register an existing one after checking it is complete). The I/O of the
/// steps that `planner::savepoint_need` and `planner::savepoint_decision` decide.
pub(super) async fn take_requested_savepoint(
    sp: &Savepoint,
    ctx: &Context,
) -> Result<Action, Error> {
    let status = sp.status.clone().unwrap_or_default();
    let ns = sp.namespace().unwrap_or_else(|| "default".into());
    let obs = match planner::savepoint_need(&sp.spec, &status) {
        SavepointNeed::Nothing => return Ok(Action::await_change()),
        SavepointNeed::Register { path } => {
            let found = match snapshot_time_ms(&path).await {
                Some(ms) => Some((ms, snapshot_bytes(&path).await)),
                None => None,
            };
            RequestObs::Registered(found)
        }
        SavepointNeed::Trigger => {
            let color = live_color(ctx, &ns, &sp.spec.job_ref).await?;
            let view = observe_engine(ctx, &ns, &sp.spec.job_ref, color).await?;
            match (&view.client, &view.job_id, &view.obs) {
                (Some(client), Some(job_id), EngineObs::Running { .. }) => {
                    let jobs: Api<StatefulJob> = Api::namespaced(ctx.client.clone(), &ns);
                    let dir = match jobs.get_opt(&sp.spec.job_ref).await? {
                        Some(sj) => resources::savepoint_dir(&sj.spec, &ctx.engine),
                        None => ctx.engine.default_savepoint_dir.clone(),
                    };
                    // Asked under an id of this object's own: a request whose status write is
                    // lost is the same request when asked again, not a second savepoint.
                    let trigger_id = sp.uid().map(|u| u.replace('-', ""));
                    // No answer, but the request may have arrived: polled by its id (a
                    // savepoint taken without its object recorded would never be deleted).
                    let asked = client
                        .trigger_savepoint_as(job_id, dir.as_deref(), false, trigger_id.as_deref())
                        .await;
                    let result = engine_client::trigger_to_poll(asked, trigger_id.as_deref())
                        .map_err(|e| e.to_string());
                    RequestObs::Triggered {
                        job_id: job_id.clone(),
                        result,
                    }
                }
                _ => RequestObs::NoEngine,
            }
        }
        SavepointNeed::Poll { job_id, trigger } => {
            let color = live_color(ctx, &ns, &sp.spec.job_ref).await?;
            let view = observe_engine(ctx, &ns, &sp.spec.job_ref, color).await?;
            let outcome = match &view.client {
                None => None,
                Some(client) => match client.savepoint_status(&job_id, &trigger).await {
                    Ok(engine_client::SavepointStatus::InProgress) => Some(TriggerObs::InProgress),
                    Ok(engine_client::SavepointStatus::Completed(path)) => {
                        Some(TriggerObs::Completed { path })
                    }
                    Ok(engine_client::SavepointStatus::Failed(cause)) => {
                        Some(TriggerObs::Failed { cause })
                    }
                    Err(ClientError::NotFound { .. }) => Some(TriggerObs::Failed {
                        cause: format!(
                            "the engine does not know savepoint request {trigger}: it never received it, or has restarted since"
                        ),
                    }),
                    Err(e) => {
                        tracing::debug!(error = %e, "savepoint status unknown for now");
                        None
                    }
                },
            };
            let bytes = match &outcome {
                Some(TriggerObs::Completed { path }) => snapshot_bytes(path).await,
                _ => None,
            };
            RequestObs::Outcome { outcome, bytes }
        }
    };
    let decision = planner::savepoint_decision(&sp.spec, &status, obs, &rfc3339_now());
    if let Some(next) = decision.status {
        set_savepoint_status(ctx, sp, next).await?;
    }
    Ok(match decision.requeue_s {
        Some(s) => Action::requeue(Duration::from_secs(s)),
        None => Action::await_change(),
    })
}

/// The color of the job's serving engine (blue when the job is gone or never switched).
async fn live_color(ctx: &Context, ns: &str, job: &str) -> Result<Color, Error> {
    let jobs: Api<StatefulJob> = Api::namespaced(ctx.client.clone(), ns);
    Ok(jobs
        .get_opt(job)
        .await?
        .and_then(|sj| sj.status?.live)
        .unwrap_or_default())
}

/// Deletes a savepoint's files before its object goes, unless its job still needs them: then
/// the object stays (deleting, with its finalizer) until the job no longer does.
pub(super) async fn dispose_savepoint(sp: &Savepoint, ctx: &Context) -> Result<Action, Error> {
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
    // A job being deleted restarts from nothing: its savepoints go with it (disposeOnDelete).
    let job = jobs
        .get_opt(&sp.spec.job_ref)
        .await?
        .filter(|sj| sj.metadata.deletion_timestamp.is_none());
    if let Some(sj) = job {
        let (engine, has_checkpoint) = if planner::disposal_needs_engine(&path, sj.status.as_ref())
        {
            let color = sj.status.as_ref().and_then(|s| s.live).unwrap_or_default();
            let view = observe_engine(ctx, &ns, &sp.spec.job_ref, color).await?;
            let has_checkpoint = view
                .checkpoints
                .as_ref()
                .is_some_and(|c| c.latest_completed.is_some());
            (view.obs, has_checkpoint)
        } else {
            (EngineObs::Absent, false)
        };
        let deleted = planner::DeletedSavepoint {
            path: &path,
            trigger: sp.spec.trigger,
            completed_s: sp
                .status
                .as_ref()
                .and_then(|s| s.completed.as_deref())
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map(|t| t.as_second()),
        };
        if let Some(reason) =
            planner::disposal_blocker(&deleted, sj.status.as_ref(), &engine, has_checkpoint)
        {
            publish(
                ctx,
                &sp.object_ref(&()),
                &format!("{ns}/{}", sp.name_any()),
                true,
                Reason::DisposalDeferred,
                &reason,
            )
            .await;
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
        Ok(Err(e)) => Err(Error::Dispose {
            path: where_,
            reason: e,
        }),
        Err(e) => Err(Error::Dispose {
            path: where_,
            reason: e.to_string(),
        }),
    }
}
