//! One handle on either control plane the operator runs against: the in-process API server
//! (the default of `sjob local`: instant, nothing to install) or a real Kubernetes control
//! plane (what the end-to-end tests prove the operator on). Both lay out their directory the
//! same way: `kubeconfig` (administrator), `operator.kubeconfig` (the operator's own
//! credentials, held to `config/rbac/role.yaml`), `pods/`, `savepoints/`.

use super::cluster::{LocalCluster, LocalError, LocalOptions};
use super::real::{RealCluster, RealError, RealOptions};
use kube::Client;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// sjob's own API server, in this process.
    InProcess,
    /// etcd, kube-apiserver and kube-controller-manager (`bash e2e/k8s/install.sh`).
    Real,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(transparent)]
    InProcess(#[from] LocalError),
    #[error(transparent)]
    Real(#[from] RealError),
}

pub enum ControlPlane {
    InProcess(LocalCluster),
    Real(RealCluster),
}

impl ControlPlane {
    /// Starts a control plane with its state under `dir`. `port` is the in-process API
    /// server's (0: any free port); the real one always takes a free port.
    pub async fn start(
        kind: Kind,
        dir: &Path,
        port: u16,
        sjob_exe: &Path,
    ) -> Result<ControlPlane, ControlPlaneError> {
        Ok(match kind {
            Kind::InProcess => ControlPlane::InProcess(
                LocalCluster::start(LocalOptions {
                    dir: dir.to_owned(),
                    api_addr: ([127, 0, 0, 1], port).into(),
                    sjob_exe: sjob_exe.to_owned(),
                })
                .await?,
            ),
            Kind::Real => ControlPlane::Real(
                RealCluster::start(RealOptions {
                    dir: dir.to_owned(),
                    sjob_exe: sjob_exe.to_owned(),
                })
                .await?,
            ),
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            ControlPlane::InProcess(_) => Kind::InProcess,
            ControlPlane::Real(_) => Kind::Real,
        }
    }

    pub fn url(&self) -> String {
        match self {
            ControlPlane::InProcess(c) => c.url(),
            ControlPlane::Real(c) => c.url(),
        }
    }

    /// An administrator's client.
    pub fn client(&self) -> Client {
        match self {
            ControlPlane::InProcess(c) => c.client(),
            ControlPlane::Real(c) => c.client(),
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            ControlPlane::InProcess(c) => c.dir(),
            ControlPlane::Real(c) => c.dir(),
        }
    }

    /// The administrator's kubeconfig (for kubectl).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir().join("kubeconfig")
    }

    /// The operator's kubeconfig: its calls are held to the chart's RBAC rules.
    pub fn operator_kubeconfig(&self) -> PathBuf {
        self.dir().join("operator.kubeconfig")
    }

    /// Where savepoints go when a StatefulJob names no directory.
    pub fn savepoint_dir(&self) -> PathBuf {
        self.dir().join("savepoints")
    }

    /// `sjob operator` against this control plane, with the default savepoint directory set.
    pub fn operator_command(&self, sjob_exe: &Path, http_addr: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(sjob_exe);
        cmd.arg("operator")
            .arg("--kubeconfig")
            .arg(self.operator_kubeconfig())
            .arg("--http-addr")
            .arg(http_addr)
            .arg("--default-savepoint-dir")
            .arg(self.savepoint_dir())
            .arg("--lease-namespace")
            .arg("default");
        cmd
    }

    /// Stops the engine processes, then the servers.
    /// Stops the API server for `pause` and starts it again (the real control plane only).
    pub async fn interrupt_api_server(
        &mut self,
        pause: std::time::Duration,
    ) -> Result<(), ControlPlaneError> {
        match self {
            ControlPlane::Real(c) => Ok(c.interrupt_api_server(pause).await?),
            ControlPlane::InProcess(_) => Err(RealError::Setup(
                "stopping the API server needs the real control plane".into(),
            )
            .into()),
        }
    }

    pub async fn shutdown(self) {
        match self {
            ControlPlane::InProcess(c) => c.shutdown().await,
            ControlPlane::Real(c) => c.shutdown().await,
        }
    }
}
