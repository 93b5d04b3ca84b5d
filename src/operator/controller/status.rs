//! Reporting: the StatefulJob's status (written so that no concurrent change is lost) and
//! its events.

use super::{Context, Error, key};
use crate::operator::crd::{StatefulJob, StatefulJobStatus};
use crate::operator::planner::Reason;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::PostParams;
use kube::runtime::events::{Event, EventType};
use kube::{Api, ResourceExt};

/// Writes the status with the resourceVersion read, so that a concurrent change of the spec or
/// the status fails the write and the reconcile starts over from what is there now. A conflict
/// caused by metadata alone (labels, annotations: a GitOps tool, a user's kubectl annotate) does
/// not: the write is retried on the fresh object as long as its generation and status are
/// the ones this step was planned from, so a busy writer cannot starve the upgrade.
pub(super) async fn write_status(
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
                    // Planned from an older object than there is (a spec change, or a status
                    // written before that the cache has not caught up with): plan again from
                    // the object as the API server has it.
                    ctx.stale().insert(key(&current));
                    return Err(kube::Error::Api(e).into());
                }
                tracing::debug!(job = %key(&current), "status write met a metadata-only change; writing again");
                current = fresh;
            }
            other => return Ok(other?),
        }
    }
    Err(Error::StatusConflict { job: key(&current) })
}

/// Logs and publishes an event about `object` (`who` names it in the log).
pub(super) async fn publish(
    ctx: &Context,
    object: &ObjectReference,
    who: &str,
    warning: bool,
    reason: Reason,
    message: &str,
) {
    if warning {
        tracing::warn!(object = who, reason = reason.as_str(), "{message}");
    } else {
        tracing::info!(object = who, reason = reason.as_str(), "{message}");
    }
    ctx.metrics.api_writes.with_label_values(&["event"]).inc();
    // Event notes are limited to 1 kB; cut at a character boundary.
    let cut = (0..=message.len().min(1000))
        .rev()
        .find(|i| message.is_char_boundary(*i))
        .unwrap_or(0);
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.as_str().to_owned(),
        note: Some(message[..cut].to_owned()),
        action: reason.as_str().to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, object).await {
        tracing::warn!(object = who, error = %e, "cannot publish event {reason}");
    }
}
