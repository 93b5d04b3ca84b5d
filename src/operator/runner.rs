//! `sjob operator`: health and metrics endpoints, leader election, the controllers, and a
//! graceful stop on SIGTERM.

use super::controller::{self, Context};
use super::lease::LeaderLease;
use super::metrics::Metrics;
use super::resources::EngineSettings;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use kube::Client;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;

pub struct LeaderElection {
    pub namespace: String,
    pub lease_name: String,
    pub duration: Duration,
}

pub struct OperatorOptions {
    /// Watch one namespace, or all.
    pub namespace: Option<String>,
    pub engine: EngineSettings,
    /// This replica's name (its pod name in a cluster).
    pub identity: String,
    pub leader_election: Option<LeaderElection>,
    /// Where /metrics, /healthz and /readyz are served.
    pub http_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot serve health and metrics on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("leader election: {0}")]
    Lease(#[from] super::lease::LeaseError),
    #[error("lost the leader lease {0}; stopping so that only one replica acts")]
    LostLease(String),
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the operator until `shutdown` resolves (or the lease is lost).
pub async fn run(
    client: Client,
    opts: OperatorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(opts.http_addr)
        .await
        .map_err(|source| RunError::Listen {
            addr: opts.http_addr,
            source,
        })?;
    let bound = listener.local_addr().unwrap_or(opts.http_addr);
    let app = {
        let metrics = metrics.clone();
        let ready = ready.clone();
        Router::new()
            .route("/metrics", get(move || async move { metrics.render() }))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || async move {
                    if ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }),
            )
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(wait_true(stop_rx))
                .await;
        });
    }
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        });
    }
    ready.store(true, Ordering::Relaxed);

    let lease = opts.leader_election.as_ref().map(|le| {
        Arc::new(LeaderLease::new(
            client.clone(),
            &le.namespace,
            &le.lease_name,
            &opts.identity,
            le.duration,
        ))
    });
    if let Some(lease) = &lease {
        let mut announced = false;
        loop {
            if *stop_rx.borrow() {
                return Ok(());
            }
            match lease.try_acquire().await {
                Ok(true) => break,
                Ok(false) => {
                    if !announced {
                        tracing::info!(identity = %opts.identity, "standby: another replica holds the leader lease");
                        announced = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the leader lease"),
            }
            tokio::select! {
                _ = tokio::time::sleep(lease.duration() / 4) => {},
                _ = wait_true(stop_rx.clone()) => return Ok(()),
            }
        }
        tracing::info!(identity = %opts.identity, "leader: acting on StatefulJobs");
    }

    // The lease is renewed while the controllers run; failing to renew it within its
    // duration stops them.
    let lost = Arc::new(AtomicBool::new(false));
    if let Some(lease) = lease.clone() {
        let stop_tx = stop_tx.clone();
        let lost = lost.clone();
        let stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut last_renewed = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(lease.duration() / 4) => {},
                    _ = wait_true(stop_rx.clone()) => return,
                }
                match lease.try_acquire().await {
                    Ok(true) => last_renewed = tokio::time::Instant::now(),
                    Ok(false) => {
                        lost.store(true, Ordering::Relaxed);
                        let _ = stop_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the leader lease");
                        if last_renewed.elapsed() > lease.duration() * 3 / 4 {
                            lost.store(true, Ordering::Relaxed);
                            let _ = stop_tx.send(true);
                            return;
                        }
                    }
                }
            }
        });
    }

    let ctx = Arc::new(Context::new(
        client.clone(),
        opts.engine.clone(),
        metrics,
        &opts.identity,
    ));
    controller::run(ctx, opts.namespace.clone(), wait_true(stop_rx)).await;
    if let Some(lease) = &lease {
        if lost.load(Ordering::Relaxed) {
            return Err(RunError::LostLease(
                opts.leader_election
                    .as_ref()
                    .map(|l| l.lease_name.clone())
                    .unwrap_or_default(),
            ));
        }
        lease.release().await?;
    }
    Ok(())
}
