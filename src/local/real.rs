//! A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver (TLS, RBAC,
//! service-account tokens) and kube-controller-manager (Deployment, ReplicaSet, garbage
//! collector, namespace and service-account controllers), built from the Go module proxy by
//! `e2e/k8s/install.sh`. The process kubelet joins it as a node. The operator runs as the
//! `sjob-operator` ServiceAccount bound to `config/rbac/role.yaml`, with a token from the
//! TokenRequest API: never as an administrator.

use super::cluster::{OPERATOR_RBAC, client_from_kubeconfig, install_crds};
use super::kubelet::{Kubelet, KubeletOptions};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned versions `e2e/k8s/install.sh` builds (one file for both).
const VERSIONS: &str = include_str!("../../e2e/k8s/versions.env");

/// The name of the process kubelet's Node.
pub const NODE_NAME: &str = "sjob-local-node";

const OPERATOR_NAMESPACE: &str = "sjob-system";
const OPERATOR_ACCOUNT: &str = "sjob-operator";

#[derive(Debug, thiserror::Error)]
pub enum RealError {
    #[error(
        "the real Kubernetes control plane is not installed: {0}. Install it with `bash e2e/k8s/install.sh` \
         (builds etcd, kube-apiserver, kube-controller-manager and kubectl from the Go module proxy; \
         about 20 minutes the first time) or point SJOB_K8S_BIN at a directory with those binaries"
    )]
    NotInstalled(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificates: {0}")]
    Certs(#[from] rcgen::Error),
    #[error("{what} did not become ready within {secs} s; its log: {log}")]
    NotReady {
        what: &'static str,
        secs: u64,
        log: String,
    },
    #[error("{0}")]
    Setup(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RealError + '_ {
    move |source| RealError::Io {
        path: path.to_owned(),
        source,
    }
}

fn version(key: &str) -> &'static str {
    VERSIONS
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .unwrap_or("")
}

/// The Kubernetes version the project pins.
pub fn kubernetes_version() -> &'static str {
    version("K8S_VERSION")
}

/// Where the binaries are: `SJOB_K8S_BIN`, or the cache `install.sh` fills.
pub fn bin_dir() -> Result<PathBuf, RealError> {
    let dir = match std::env::var_os("SJOB_K8S_BIN") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = match (
                std::env::var_os("SJOB_K8S_CACHE"),
                std::env::var_os("XDG_CACHE_HOME"),
            ) {
                (Some(c), _) => PathBuf::from(c),
                (None, Some(x)) => PathBuf::from(x).join("sjob/k8s"),
                (None, None) => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/sjob/k8s"),
            };
            cache
                .join(format!(
                    "{}-etcd{}",
                    kubernetes_version(),
                    version("ETCD_VERSION").trim_start_matches('v')
                ))
                .join("bin")
        }
    };
    for b in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        if !dir.join(b).is_file() {
            return Err(RealError::NotInstalled(format!(
                "{} is missing",
                dir.join(b).display()
            )));
        }
    }
    Ok(dir)
}

pub struct RealOptions {
    /// Certificates, etcd's data, logs, kubeconfigs, pods and savepoints go here.
    pub dir: PathBuf,
    /// The `sjob` binary engine pods run.
    pub sjob_exe: PathBuf,
}

pub struct RealCluster {
    /// etcd, kube-apiserver, kube-controller-manager: stopped in reverse order.
    servers: Vec<(&'static str, Child)>,
    kubelet: Option<Kubelet>,
    client: Client,
    dir: PathBuf,
    url: String,
    /// How the API server was started, to start it again (`interrupt_api_server`).
    bin: PathBuf,
    api_args: Vec<String>,
}

/// Free ports on 127.0.0.1, all bound at once so none repeats.
fn free_ports(n: usize) -> Result<Vec<u16>, RealError> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(io(Path::new("127.0.0.1:0")))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(io(Path::new("127.0.0.1:0")))
}

fn write(path: &Path, text: &str) -> Result<(), RealError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The control plane's PKI: a CA, the API server's serving certificate, client certificates
/// (an administrator in `system:masters`, the controller manager), the service-account key.
fn write_pki(pki: &Path) -> Result<(), RealError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    std::fs::create_dir_all(pki).map_err(io(pki))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sjob-local-ca");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    write(&pki.join("ca.crt"), &ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |name: &str, cn: &str, org: Option<&str>, server: bool| -> Result<(), RealError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(if server {
            vec!["localhost".to_owned(), "kubernetes.default.svc".to_owned()]
        } else {
            Vec::new()
        })?;
        if server {
            p.subject_alt_names
                .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        }
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            p.distinguished_name.push(DnType::OrganizationName, o);
        }
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        write(
            &pki.join(format!("{name}.crt")),
            &p.signed_by(&key, &issuer)?.pem(),
        )?;
        write(&pki.join(format!("{name}.key")), &key.serialize_pem())
    };
    leaf("apiserver", "kube-apiserver", None, true)?;
    leaf("admin", "admin", Some("system:masters"), false)?;
    leaf("kcm", "system:kube-controller-manager", None, false)?;
    // The API server reads verification keys only as public keys (or PKCS#1/SEC1), not PKCS#8.
    let sa = KeyPair::generate()?;
    write(&pki.join("sa.pub"), &sa.public_key_pem())?;
    write(&pki.join("sa.key"), &sa.serialize_pem())
}

fn cert_kubeconfig(url: &str, pki: &Path, user: &str, namespace: &str) -> String {
    let p = |f: &str| pki.join(f).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sjob-real\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: sjob-real\n  context:\n    cluster: sjob-real\n    user: {user}\n    namespace: {namespace}\ncurrent-context: sjob-real\n",
        ca = p("ca.crt"),
        crt = p(&format!("{user}.crt")),
        key = p(&format!("{user}.key")),
    )
}

fn token_kubeconfig(url: &str, pki: &Path, user: &str, token: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sjob-real\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: sjob-real\n  context:\n    cluster: sjob-real\n    user: {user}\n    namespace: {namespace}\ncurrent-context: sjob-real\n",
        ca = pki.join("ca.crt").display()
    )
}

/// Starts a server process with its output in `<logs>/<name>.log`; it dies with this
/// process's thread that started it (the test's or `sjob local`'s runtime).
fn spawn(bin: &Path, name: &'static str, args: &[String], logs: &Path) -> Result<Child, RealError> {
    let log_path = logs.join(format!("{name}.log"));
    // Appended to: a restarted server keeps its earlier log.
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(&log_path))?;
    let err = log.try_clone().map_err(io(&log_path))?;
    let exe = bin.join(name);
    let mut cmd = Command::new(&exe);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec here.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map_err(io(&exe))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Polls `ready` every 100 ms until it holds, the process exits, or `secs` pass.
async fn wait_ready<F, Fut>(
    what: &'static str,
    child: &mut Child,
    log: &Path,
    secs: u64,
    mut ready: F,
) -> Result<(), RealError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if ready().await {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(RealError::Setup(format!(
                "{what} exited ({status}); its log: {}",
                log_tail(log)
            )));
        }
        if Instant::now() >= deadline {
            return Err(RealError::NotReady {
                what,
                secs,
                log: log_tail(log),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn tcp_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

async fn readyz(client: &Client) -> bool {
    let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    client
        .request_text(req)
        .await
        .is_ok_and(|t| t.trim() == "ok")
}

impl RealCluster {
    /// Starts etcd, the API server, the controller manager and the kubelet node; installs the
    /// CRDs and the operator's ServiceAccount and RBAC; writes `kubeconfig` (administrator)
    /// and `operator.kubeconfig` (the operator's ServiceAccount token).
    pub async fn start(opts: RealOptions) -> Result<RealCluster, RealError> {
        let bin = bin_dir()?;
        let dir = opts.dir.clone();
        let pki = dir.join("pki");
        let logs = dir.join("logs");
        for d in [&dir, &logs, &dir.join("pods"), &dir.join("savepoints")] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        write_pki(&pki)?;
        let ports = free_ports(3)?;
        let (etcd_port, peer_port, api_port) = (ports[0], ports[1], ports[2]);
        let url = format!("https://127.0.0.1:{api_port}");
        let p = |f: &str| pki.join(f).display().to_string();
        let mut servers: Vec<(&'static str, Child)> = Vec::new();
        let cluster_guard = StopOnDrop(&mut servers);

        let started = Instant::now();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = spawn(
            &bin,
            "etcd",
            &[
                "--name=sjob".into(),
                format!("--data-dir={}", dir.join("etcd").display()),
                "--log-level=warn".into(),
                // The data is thrown away with the directory; fsync dominates on slow disks.
                "--unsafe-no-fsync".into(),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=sjob={peer_url}"),
            ],
            &logs,
        )?;
        let res = wait_ready("etcd", &mut etcd, &logs.join("etcd.log"), 30, || {
            tcp_open(etcd_port)
        })
        .await;
        cluster_guard.0.push(("etcd", etcd));
        res?;

        let api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-account-issuer={url}"),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            // The "kubernetes" Service's endpoints may not be a loopback address.
            "--endpoint-reconciler-type=none".into(),
            format!("--cert-dir={}", pki.join("generated").display()),
        ];
        let mut api = spawn(&bin, "kube-apiserver", &api_args, &logs)?;
        let admin_kc = cert_kubeconfig(&url, &pki, "admin", "default");
        write(&dir.join("kubeconfig"), &admin_kc)?;
        let client = client_from_kubeconfig(&admin_kc)
            .await
            .map_err(|e| RealError::Setup(e.to_string()))?;
        let res = wait_ready(
            "kube-apiserver",
            &mut api,
            &logs.join("kube-apiserver.log"),
            90,
            || readyz(&client),
        )
        .await;
        cluster_guard.0.push(("kube-apiserver", api));
        res?;
        tracing::info!(url = %url, secs = started.elapsed().as_secs_f64(), "kube-apiserver ready");

        write(
            &dir.join("kcm.kubeconfig"),
            &cert_kubeconfig(&url, &pki, "kcm", "kube-system"),
        )?;
        let kcm_kc = dir.join("kcm.kubeconfig").display().to_string();
        let kcm = spawn(
            &bin,
            "kube-controller-manager",
            &[
                format!("--kubeconfig={kcm_kc}"),
                format!("--authentication-kubeconfig={kcm_kc}"),
                format!("--authorization-kubeconfig={kcm_kc}"),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
                "--controllers=deployment-controller,replicaset-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller".into(),
                // Each controller runs as its own ServiceAccount, as in a real cluster.
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={}", p("ca.crt")),
                // Sync quickly: tests and the demo wait on rollouts.
                "--concurrent-deployment-syncs=5".into(),
            ],
            &logs,
        )?;
        cluster_guard.0.push(("kube-controller-manager", kcm));

        install_crds(&client)
            .await
            .map_err(|e| RealError::Setup(e.to_string()))?;
        wait_crds_established(&client).await?;
        let token = operator_account(&client).await?;
        write(
            &dir.join("operator.kubeconfig"),
            &token_kubeconfig(&url, &pki, OPERATOR_ACCOUNT, &token, "default"),
        )?;
        let kubelet = Kubelet::start(
            client.clone(),
            KubeletOptions::new(opts.sjob_exe, dir.join("pods"), Some(NODE_NAME.to_owned())),
        );
        wait_node_ready(&client).await?;
        restrict_pod_security(&client, "default").await?;
        let servers = std::mem::take(cluster_guard.0);
        tracing::info!(url = %url, secs = started.elapsed().as_secs_f64(), "real control plane up");
        Ok(RealCluster {
            servers,
            kubelet: Some(kubelet),
            client,
            dir,
            url,
            bin,
            api_args,
        })
    }

    /// Stops the API server, waits `pause`, and starts it again on the same port and etcd:
    /// an outage as clients see it (connections refused, then everything back).
    pub async fn interrupt_api_server(&mut self, pause: Duration) -> Result<(), RealError> {
        let Some(at) = self
            .servers
            .iter()
            .position(|(n, _)| *n == "kube-apiserver")
        else {
            return Err(RealError::Setup("the API server is not running".into()));
        };
        let (name, mut child) = self.servers.remove(at);
        let _ = child.kill();
        let _ = child.wait();
        tracing::info!(secs = pause.as_secs_f64(), "kube-apiserver stopped");
        tokio::time::sleep(pause).await;
        let logs = self.dir.join("logs");
        let mut api = spawn(&self.bin, name, &self.api_args, &logs)?;
        let res = wait_ready(name, &mut api, &logs.join("kube-apiserver.log"), 90, || {
            readyz(&self.client)
        })
        .await;
        self.servers.insert(at, (name, api));
        res?;
        tracing::info!("kube-apiserver back");
        Ok(())
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the engines, then the controller manager, the API server and etcd.
    pub async fn shutdown(mut self) {
        if let Some(k) = self.kubelet.take() {
            k.shutdown().await;
        }
        stop_servers(&mut self.servers);
    }
}

/// Stops the servers started so far if `start` fails half way.
struct StopOnDrop<'a>(&'a mut Vec<(&'static str, Child)>);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        stop_servers(self.0);
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        stop_servers(&mut self.servers);
    }
}

/// SIGTERM newest first (the API server's graceful shutdown hangs once etcd is gone), then
/// SIGKILL what is still there after 5 s.
fn stop_servers(servers: &mut Vec<(&'static str, Child)>) {
    while let Some((name, mut child)) = servers.pop() {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = child.try_wait() {
            tracing::debug!(server = name, "did not stop on SIGTERM; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The kubelet has registered its Node and reports it Ready: pods can be bound to it.
async fn wait_node_ready(client: &Client) -> Result<(), RealError> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = nodes
            .get_opt(NODE_NAME)
            .await
            .ok()
            .flatten()
            .is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RealError::Setup(format!(
                "the process kubelet did not register Node {NODE_NAME} within 30 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_crds_established(client: &Client) -> Result<(), RealError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in ["statefuljobs.sjob.dev", "savepoints.sjob.dev"] {
        loop {
            let established = api.get_opt(name).await.ok().flatten().is_some_and(|crd| {
                crd.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            if Instant::now() >= deadline {
                return Err(RealError::Setup(format!("CRD {name} not established")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Pods in `namespace` are admitted only under the Pod Security "restricted" profile, as in
/// config/manager's sjob-system: every engine pod the operator creates there must comply.
async fn restrict_pod_security(client: &Client, namespace: &str) -> Result<(), RealError> {
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.patch(
        namespace,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted",
        }}})),
    )
    .await
    .map_err(|e| RealError::Setup(format!("namespace {namespace}: {e}")))?;
    Ok(())
}

/// The operator's namespace, ServiceAccount, ClusterRole (`config/rbac/role.yaml`) and its
/// binding; returns a token for the ServiceAccount.
async fn operator_account(client: &Client) -> Result<String, RealError> {
    let setup = |what: &str, e: kube::Error| RealError::Setup(format!("{what}: {e}"));
    let pp = PatchParams::apply("sjob-local").force();
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.patch(
        OPERATOR_NAMESPACE,
        &pp,
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}})),
    )
    .await
    .map_err(|e| setup("namespace", e))?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    sas.patch(
        OPERATOR_ACCOUNT,
        &pp,
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}})),
    )
    .await
    .map_err(|e| setup("service account", e))?;
    let role: ClusterRole = serde_yaml::from_str(OPERATOR_RBAC)
        .map_err(|e| RealError::Setup(format!("config/rbac/role.yaml: {e}")))?;
    let role_name = role.metadata.name.clone().unwrap_or_default();
    let roles: Api<ClusterRole> = Api::all(client.clone());
    roles
        .patch(&role_name, &pp, &Patch::Apply(&role))
        .await
        .map_err(|e| setup("cluster role", e))?;
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    bindings
        .patch(
            &role_name,
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": role_name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
                "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}],
            })),
        )
        .await
        .map_err(|e| setup("cluster role binding", e))?;
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 86_400},
    }))
    .map_err(|e| RealError::Setup(format!("token request: {e}")))?;
    let token: TokenRequest = sas
        .create_subresource::<_, TokenRequest>(
            "token",
            OPERATOR_ACCOUNT,
            &PostParams::default(),
            &request,
        )
        .await
        .map_err(|e| setup("token request", e))?;
    token
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| RealError::Setup("the token request returned no token".into()))
}
