//! A local cluster: the in-process API server (with the operator's RBAC enforced), the CRDs
//! installed, the process kubelet, and kubeconfigs for users and for the operator. State lives
//! under one directory, so a second start picks up where the first stopped.

use super::apiserver::{self, ApiServer, ApiServerOptions, User};
use super::kubelet::{Kubelet, KubeletOptions};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::{Api, Client};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The operator's RBAC rules, as the Helm chart grants them.
pub const OPERATOR_RBAC: &str = include_str!("../../config/rbac/role.yaml");

/// The service account the operator runs as.
pub const OPERATOR_USER: &str = "system:serviceaccount:sjob-system:sjob-operator";

pub struct LocalOptions {
    /// Where the API server's objects, kubeconfigs, pods and savepoints live.
    pub dir: PathBuf,
    /// The API server's address (port 0: any free port).
    pub api_addr: SocketAddr,
    /// The `sjob` binary engine pods run.
    pub sjob_exe: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API server: {0}")]
    ApiServer(#[from] apiserver::ApiServerError),
    #[error("kubeconfig: {0}")]
    Config(String),
    #[error("installing the CRDs: {0}")]
    Crds(String),
}

pub struct LocalCluster {
    api: ApiServer,
    kubelet: Kubelet,
    client: Client,
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Io {
        path: path.to_owned(),
        source,
    }
}

fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A client from kubeconfig text.
pub async fn client_from_kubeconfig(yaml: &str) -> Result<Client, LocalError> {
    let kc =
        kube::config::Kubeconfig::from_yaml(yaml).map_err(|e| LocalError::Config(e.to_string()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| LocalError::Config(e.to_string()))?;
    Client::try_from(config).map_err(|e| LocalError::Config(e.to_string()))
}

fn write_file(path: &Path, text: &str) -> Result<(), LocalError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl LocalCluster {
    pub async fn start(opts: LocalOptions) -> Result<LocalCluster, LocalError> {
        let dir = opts.dir.clone();
        for sub in ["api", "pods", "savepoints"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let admin = token();
        let operator = token();
        let rules = apiserver::rules_from_yaml(OPERATOR_RBAC)?;
        let api = ApiServer::start(ApiServerOptions {
            addr: opts.api_addr,
            data_dir: Some(dir.join("api")),
            users: vec![
                User {
                    token: admin.clone(),
                    name: "admin".into(),
                    rules: None,
                },
                User {
                    token: operator.clone(),
                    name: OPERATOR_USER.into(),
                    rules: Some(rules),
                },
            ],
            // The API server listens on loopback only; kubectl there sends no token over HTTP.
            anonymous: Some("admin".into()),
        })
        .await?;
        let admin_kc = api.kubeconfig_yaml(&admin, "default");
        write_file(&dir.join("kubeconfig"), &admin_kc)?;
        write_file(
            &dir.join("operator.kubeconfig"),
            &api.kubeconfig_yaml(&operator, "default"),
        )?;
        let client = client_from_kubeconfig(&admin_kc).await?;
        install_crds(&client).await?;
        let kubelet = Kubelet::start(
            client.clone(),
            KubeletOptions::new(opts.sjob_exe, dir.join("pods"), None),
        );
        Ok(LocalCluster {
            api,
            kubelet,
            client,
            dir,
        })
    }

    pub fn url(&self) -> String {
        self.api.url()
    }

    /// An administrator's client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the engine processes, then the API server (its objects are kept on disk).
    pub async fn shutdown(self) {
        self.kubelet.shutdown().await;
        self.api.shutdown().await;
    }
}

pub(crate) async fn install_crds(client: &Client) -> Result<(), LocalError> {
    let yaml = crate::operator::crd::crds_yaml().map_err(|e| LocalError::Crds(e.to_string()))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let mut crd = CustomResourceDefinition::deserialize(doc)
            .map_err(|e| LocalError::Crds(e.to_string()))?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        match api
            .get_opt(&name)
            .await
            .map_err(|e| LocalError::Crds(format!("{name}: {e}")))?
        {
            None => {
                api.create(&PostParams::default(), &crd)
                    .await
                    .map_err(|e| LocalError::Crds(format!("{name}: {e}")))?;
            }
            Some(existing) => {
                crd.metadata.resource_version = existing.metadata.resource_version;
                api.replace(&name, &PostParams::default(), &crd)
                    .await
                    .map_err(|e| LocalError::Crds(format!("{name}: {e}")))?;
            }
        }
    }
    Ok(())
}

use serde::Deserialize;
