//! Carrying out the planner's actions: server-side applies of the engine's objects, the REST
//! token Secret, savepoint requests to the engine, Savepoint objects recorded and deleted.

use super::observe::{EngineView, Views, snapshot_bytes};
use super::{Context, Error, FAILED_TRIGGER, FIELD_MANAGER, key, rfc3339_now};
use crate::operator::crd::{
    Color, SAVEPOINT_FINALIZER, Savepoint, SavepointSpec, SavepointState, SavepointStatus,
    SavepointTrigger, StatefulJob, StatefulJobSpec, StatefulJobStatus, UpgradeStage,
};
use crate::operator::planner::{self, Action as Step, EngineObs};
use crate::operator::resources::{self, Instance, LABEL_COLOR, LABEL_JOB};
use crate::savepoint::metadata::SplitPosition;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};

/// While a new version (or the rollback) is being verified, the Deployment must run it: after
/// an operator restart between writing the status and applying the Deployment, apply it now.
/// (A blue-green candidate likewise, while it starts.)
pub(super) async fn repair_rollout(
    sj: &StatefulJob,
    ctx: &Context,
    status: &StatefulJobStatus,
    views: &mut Views,
) -> Result<(), Error> {
    let Some(u) = &status.upgrade else {
        return Ok(());
    };
    if u.blue_green {
        let (Some(c), Some(view), Some(savepoint)) =
            (&status.candidate, views.candidate.as_mut(), &u.savepoint)
        else {
            return Ok(());
        };
        if u.stage == UpgradeStage::Verifying
            && view.deployed_hash.as_deref() != Some(u.target_spec_hash.as_str())
            && planner::spec_hash(&sj.spec) == u.target_spec_hash
        {
            tracing::info!(job = %key(sj), spec = %u.target_spec_hash, "applying the blue-green candidate in progress");
            let instance = Instance {
                color: c.color,
                shadow: true,
            };
            deploy(
                sj,
                ctx,
                &sj.spec,
                &u.target_spec_hash,
                Some(savepoint),
                instance,
            )
            .await?;
            view.obs = EngineObs::Starting {
                spec_hash: u.target_spec_hash.clone(),
            };
        }
        return Ok(());
    }
    let view = &mut views.live;
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
    let instance = Instance {
        color: status.live.unwrap_or_default(),
        shadow: false,
    };
    deploy(
        sj,
        ctx,
        &spec,
        &u.target_spec_hash,
        u.savepoint.as_deref(),
        instance,
    )
    .await?;
    view.obs = EngineObs::Starting {
        spec_hash: u.target_spec_hash.clone(),
    };
    Ok(())
}

/// Creates the job's REST token Secret unless it exists: a token, once made, is never
/// replaced, since running engines and the operator must keep agreeing on it.
pub(super) async fn ensure_rest_token(
    sj: &StatefulJob,
    ctx: &Context,
    ns: &str,
) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if secrets
        .get_metadata_opt(&resources::rest_token_secret_name(&sj.name_any()))
        .await?
        .is_some()
    {
        return Ok(());
    }
    let secret = resources::rest_token_secret(sj, &resources::new_rest_token())?;
    ctx.metrics.api_writes.with_label_values(&["create"]).inc();
    match secrets.create(&PostParams::default(), &secret).await {
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        other => other.map(|_| ()).map_err(Error::from),
    }
}

pub(super) async fn apply<K>(api: &Api<K>, ctx: &Context, obj: &K) -> Result<(), Error>
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

/// Applies the engine `instance`; a live one (not in shadow mode) is also made the one the
/// REST Service selects.
pub(super) async fn deploy(
    sj: &StatefulJob,
    ctx: &Context,
    spec: &StatefulJobSpec,
    spec_hash: &str,
    restore_from: Option<&str>,
    instance: Instance,
) -> Result<(), Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let (cm, deploy, svc) = resources::engine_objects(
        sj,
        spec,
        spec_hash,
        restore_from,
        None,
        instance,
        &ctx.engine,
    )?;
    if ctx.engine.rest_token {
        ensure_rest_token(sj, ctx, &ns).await?;
    }
    apply(
        &Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns),
        ctx,
        &cm,
    )
    .await?;
    if !instance.shadow {
        apply(
            &Api::<Service>::namespaced(ctx.client.clone(), &ns),
            ctx,
            &svc,
        )
        .await?;
    }
    apply(
        &Api::<Deployment>::namespaced(ctx.client.clone(), &ns),
        ctx,
        &deploy,
    )
    .await?;
    Ok(())
}

pub(super) fn ignore_not_found(r: Result<(), kube::Error>) -> Result<(), Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => Ok(other?),
    }
}

/// What the status keeps of a savepoint request after asking the engine: the id to poll it by
/// (`engine_client::trigger_to_poll`; the next reconcile asks about it: done, in progress, or
/// unknown to the engine, then failed), or the failure.
fn trigger_kept(
    asked: Result<String, crate::operator::engine_client::ClientError>,
    planned: &str,
) -> String {
    crate::operator::engine_client::trigger_to_poll(asked, Some(planned))
        .unwrap_or_else(|e| format!("{FAILED_TRIGGER}{e}"))
}

pub(super) async fn remove_engine(
    ctx: &Context,
    ns: &str,
    name: &str,
    color: Color,
) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    ctx.metrics.api_writes.with_label_values(&["delete"]).inc();
    ignore_not_found(
        api.delete(
            &resources::engine_name(name, color),
            &DeleteParams::background(),
        )
        .await
        .map(|_| ()),
    )
}

pub(super) async fn act(
    sj: &StatefulJob,
    ctx: &Context,
    views: &Views,
    next: &mut StatefulJobStatus,
    step: Step,
) -> Result<(), Error> {
    let ns = sj.namespace().unwrap_or_else(|| "default".into());
    let name = sj.name_any();
    let sp_dir = resources::savepoint_dir(&sj.spec, &ctx.engine);
    let view = &views.live;
    let live = next.live.unwrap_or_default();
    match step {
        Step::Deploy {
            spec,
            spec_hash,
            restore_from,
        } => {
            let instance = Instance {
                color: live,
                shadow: false,
            };
            deploy(
                sj,
                ctx,
                &spec,
                &spec_hash,
                restore_from.as_deref(),
                instance,
            )
            .await?
        }
        Step::RemoveEngine => remove_engine(ctx, &ns, &name, live).await?,
        Step::DeployCandidate {
            spec,
            spec_hash,
            restore_from,
            color,
        } => {
            let instance = Instance {
                color,
                shadow: true,
            };
            deploy(sj, ctx, &spec, &spec_hash, Some(&restore_from), instance).await?
        }
        Step::RemoveColor { color } => remove_engine(ctx, &ns, &name, color).await?,
        Step::SavepointLive { trigger_id } => {
            let id = match (&view.client, &view.job_id) {
                (Some(c), Some(job)) => trigger_kept(
                    c.trigger_savepoint_as(job, sp_dir.as_deref(), false, Some(&trigger_id))
                        .await,
                    &trigger_id,
                ),
                _ => format!("{FAILED_TRIGGER}the engine is not running a job"),
            };
            if let Some(u) = next.upgrade.as_mut() {
                u.trigger_id = Some(id);
            }
        }
        Step::HoldSources { candidate, at } => {
            if let Some((c, job)) = views.job(candidate) {
                let at: Option<Vec<SplitPosition>> = at.map(|at| {
                    at.into_iter()
                        .map(|p| SplitPosition {
                            split: p.split,
                            position: p.position,
                        })
                        .collect()
                });
                if let Err(e) = c.hold_sources(job, at.as_deref()).await {
                    // The planner sends it again if the sources do not hold.
                    tracing::warn!(job = %key(sj), candidate, error = %e, "cannot hold the sources");
                }
            }
        }
        Step::ReleaseSources {
            candidate,
            cut_over,
        } => {
            if let Some((c, job)) = views.job(candidate)
                && let Err(e) = c.release_sources(job, cut_over).await
            {
                tracing::warn!(job = %key(sj), candidate, cut_over, error = %e, "cannot release the sources");
            }
        }
        Step::Serve { color } => {
            let svc = resources::rest_service(sj, color, &ctx.engine)?;
            apply(
                &Api::<Service>::namespaced(ctx.client.clone(), &ns),
                ctx,
                &svc,
            )
            .await?;
        }
        Step::RestartEngine => {
            // The Deployment brings up a new pod; the same job id resumes from its checkpoints.
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let list = pods
                .list(&ListParams::default().labels(&format!(
                    "{LABEL_JOB}={name},{}",
                    match live {
                        // Blue is also the engine of pods from before engines had colors.
                        Color::Blue => format!("{LABEL_COLOR}!=green"),
                        Color::Green => format!("{LABEL_COLOR}=green"),
                    }
                )))
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
        Step::StopWithSavepoint { trigger_id } => {
            let id = match (&view.client, &view.job_id) {
                (Some(c), Some(job)) => trigger_kept(
                    c.stop_with_savepoint_as(job, sp_dir.as_deref(), false, Some(&trigger_id))
                        .await,
                    &trigger_id,
                ),
                _ => format!("{FAILED_TRIGGER}the engine is not running a job"),
            };
            if let Some(u) = next.upgrade.as_mut() {
                u.trigger_id = Some(id);
            }
        }
        Step::TriggerSavepoint { trigger_id, .. } => {
            // The plan put the request in the status, written before this step.
            let asked = match (&view.client, &view.job_id) {
                (Some(c), Some(job)) => Some(trigger_kept(
                    c.trigger_savepoint_as(job, sp_dir.as_deref(), false, Some(&trigger_id))
                        .await,
                    &trigger_id,
                )),
                _ => None,
            };
            match (asked, next.pending_savepoint.as_mut()) {
                (Some(id), Some(p)) => p.trigger_id = id,
                // No job to ask: nothing pending (asked again when there is one).
                (None, _) => next.pending_savepoint = None,
                (Some(_), None) => {}
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

pub(super) async fn record_savepoint(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::engine_client::ClientError;

    #[test]
    fn a_request_that_may_have_arrived_keeps_its_planned_id() {
        let planned = "0123456789abcdef0123456789abcdef";
        assert_eq!(trigger_kept(Ok(planned.to_owned()), planned), planned);
        let lost = ClientError::Unreachable {
            url: "http://engine:8081/jobs/j/stop".into(),
            cause: "timed out".into(),
            maybe_received: true,
        };
        assert_eq!(trigger_kept(Err(lost), planned), planned);
        let refused = ClientError::Unreachable {
            url: "http://engine:8081/jobs/j/stop".into(),
            cause: "Connection refused".into(),
            maybe_received: false,
        };
        let kept = trigger_kept(Err(refused), planned);
        assert!(kept.starts_with(FAILED_TRIGGER), "{kept}");
        assert!(kept.contains("Connection refused"), "{kept}");
        let answered = ClientError::Api {
            url: "http://engine:8081/jobs/j/stop".into(),
            status: 409,
            message: "the job is not running".into(),
        };
        let kept = trigger_kept(Err(answered), planned);
        assert!(kept.contains("the job is not running"), "{kept}");
    }
}
