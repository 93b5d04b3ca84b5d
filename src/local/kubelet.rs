//! A process kubelet: each pod's container is a local process of the `sjob` binary, restarted
//! by the pod's `restartPolicy` with backoff, probed for readiness, its state reported in the
//! pod's status, stopped with SIGTERM and then SIGKILL after the grace period.
//!
//! Two modes. Against the in-process API server it also plays the Deployment controller (pods
//! for each Deployment, Recreate: the old pod's process is gone before the new one starts).
//! Against a real control plane it is a node (`KubeletOptions::node`): it registers the Node
//! and renews its heartbeat Lease, binds pending pods to itself (there is no scheduler), runs
//! the pods bound to it, and removes a deleted pod's object once its process has stopped;
//! Deployments and ReplicaSets are the real controllers' work.
//!
//! Each pod gets its own loopback address (127.x.y.z) as its pod IP, so every engine listens
//! on the same port as in a cluster and the operator reaches it the same way. ConfigMap
//! volumes are written under the pod's directory and their mount paths rewritten in the
//! container's arguments and environment.

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct KubeletOptions {
    /// The executable run for a container whose command is `sjob`.
    pub sjob_exe: PathBuf,
    /// Pods' files and logs go to `<dir>/<namespace>/<pod>/`.
    pub pods_dir: PathBuf,
    /// How often pods and processes are synced.
    pub sync_every: Duration,
    /// Longest pause between restarts of a crashing container.
    pub max_backoff: Duration,
    /// Join a real control plane as this Node (see the module's doc); `None` against the
    /// in-process API server.
    pub node: Option<String>,
}

impl KubeletOptions {
    /// The defaults both control planes use: sync every 250 ms, back-off up to 5 s.
    pub fn new(sjob_exe: PathBuf, pods_dir: PathBuf, node: Option<String>) -> KubeletOptions {
        KubeletOptions {
            sjob_exe,
            pods_dir,
            sync_every: Duration::from_millis(250),
            max_backoff: Duration::from_secs(5),
            node,
        }
    }
}

pub struct Kubelet {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    pub fn start(client: Client, opts: KubeletOptions) -> Kubelet {
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        // A change to any Deployment (the operator rolling out a new version) wakes the sync
        // at once instead of at the next tick.
        let changed = std::sync::Arc::new(tokio::sync::Notify::new());
        let watch = tokio::spawn({
            let changed = changed.clone();
            let client = client.clone();
            let node_mode = opts.node.is_some();
            async move {
                // As a node: pods (created, bound, deleted by the real controllers). Otherwise
                // Deployments, whose pods this kubelet makes. Backoff: while the API server is
                // away, no busy loop of failed watches.
                if node_mode {
                    let pods: Api<Pod> = Api::all(client);
                    let mut events =
                        std::pin::pin!(watcher(pods, watcher::Config::default()).default_backoff());
                    while events.next().await.is_some() {
                        changed.notify_one();
                    }
                } else {
                    let deployments: Api<Deployment> = Api::all(client);
                    let mut events = std::pin::pin!(
                        watcher(deployments, watcher::Config::default()).default_backoff()
                    );
                    while events.next().await.is_some() {
                        changed.notify_one();
                    }
                }
            }
        });
        crate::install_tls_provider();
        let task = tokio::spawn(async move {
            let mut state = State {
                client,
                opts,
                procs: HashMap::new(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(1))
                    .build()
                    .unwrap_or_default(),
                next_ip: rand::random::<u32>() % 60_000,
                last_heartbeat: None,
                node_ready_since: None,
            };
            // A container process that exits (a Recreate rollout's old one, stopped) wakes the
            // sync at once: the new one starts as soon as the old one is gone.
            let mut child_exited =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
            loop {
                if *rx.borrow() {
                    break;
                }
                if let Err(e) = state.sync().await {
                    tracing::debug!(error = %e, "kubelet sync");
                }
                // While a process is stopping or about to start, look again soon: a Recreate
                // rollout waits on each of those steps.
                let pause = if state.settling() {
                    SETTLING_SYNC.min(state.opts.sync_every)
                } else {
                    state.opts.sync_every
                };
                let exited = async {
                    let got = match child_exited.as_mut() {
                        Some(signal) => signal.recv().await.is_some(),
                        None => false,
                    };
                    if !got {
                        // No signal stream (or it ended): the sync period alone.
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = changed.notified() => {}
                    _ = rx.changed() => {}
                    _ = exited => {}
                }
            }
            watch.abort();
            state.stop_all().await;
        });
        Kubelet { stop, task }
    }

    /// Stops every container process (SIGTERM, then SIGKILL after the grace period).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A pod's container process.
struct Proc {
    namespace: String,
    pod: String,
    owner_uid: String,
    ip: String,
    child: Option<Child>,
    started_at: Option<String>,
    /// When the current process was spawned.
    spawned: Option<Instant>,
    restart_count: i32,
    restart_at: Option<Instant>,
    last_exit: Option<serde_json::Value>,
    ready: bool,
    /// Set when the pod went away: the process is being stopped.
    terminating_since: Option<Instant>,
    grace: Duration,
    dir: PathBuf,
    /// The container's exit code once it has exited for good (restartPolicy Never, or
    /// OnFailure after a success).
    done: Option<i32>,
    /// The status last written, so an unchanged one is not written again.
    reported: Option<serde_json::Value>,
}

struct State {
    client: Client,
    opts: KubeletOptions,
    /// By pod uid.
    procs: HashMap<String, Proc>,
    http: reqwest::Client,
    next_ip: u32,
    /// When the Node's status and Lease were last renewed (node mode).
    last_heartbeat: Option<Instant>,
    /// Since when the Node is Ready (its condition's transition time).
    node_ready_since: Option<serde_json::Value>,
}

/// How often a node renews its Lease and Ready condition.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Now, as the API server stores it (whole seconds).
fn now_time() -> serde_json::Value {
    let now = jiff::Timestamp::now();
    let secs = jiff::Timestamp::from_second(now.as_second()).unwrap_or(now);
    serde_json::to_value(Time(secs)).unwrap_or_default()
}

fn template_hash(d: &Deployment) -> String {
    let template = Some(&d.spec.template);
    let bytes = serde_json::to_vec(&template).unwrap_or_default();
    format!(
        "{:010x}",
        xxhash_rust::xxh3::xxh3_64(&bytes) & 0xff_ffff_ffff
    )
}

fn owner_uid(pod: &Pod) -> Option<String> {
    pod.owner_references()
        .iter()
        .find(|o| o.kind == "Deployment")
        .map(|o| o.uid.clone())
}

fn signal(child: &Child, sig: i32) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a pid this process spawned and still owns (not yet reaped).
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The sync period while a rollout step is in flight.
const SETTLING_SYNC: Duration = Duration::from_millis(25);
/// How long a new process that is not ready yet keeps the sync at `SETTLING_SYNC`.
const SETTLING_READY: Duration = Duration::from_secs(10);

impl State {
    /// Is a process stopping, due to start, or just started and not yet ready?
    fn settling(&self) -> bool {
        let soon = Instant::now() + self.opts.sync_every;
        self.procs.values().any(|p| {
            p.terminating_since.is_some()
                || (p.child.is_none() && p.restart_at.is_some_and(|t| t <= soon))
                || (p.child.is_some()
                    && !p.ready
                    && p.spawned.is_some_and(|t| t.elapsed() < SETTLING_READY))
        })
    }

    async fn sync(&mut self) -> Result<(), kube::Error> {
        // Processes that have exited since the last sync no longer hold a Recreate rollout.
        self.reap_terminating();
        if let Some(node) = self.opts.node.clone() {
            return self.sync_node(&node).await;
        }
        let deployments: Api<Deployment> = Api::all(self.client.clone());
        let pods_all: Api<Pod> = Api::all(self.client.clone());
        let deploys = deployments.list(&ListParams::default()).await?.items;
        let mut pods = pods_all.list(&ListParams::default()).await?.items;
        for d in &deploys {
            self.sync_deployment(d, &pods).await?;
        }
        pods = pods_all.list(&ListParams::default()).await?.items;
        self.sync_processes(&pods).await;
        for d in &deploys {
            self.report_deployment(d, &pods).await?;
        }
        Ok(())
    }

    /// As a node: heartbeat, bind pending pods, run the pods bound here, and remove the objects
    /// of deleted pods whose processes have stopped.
    async fn sync_node(&mut self, node: &str) -> Result<(), kube::Error> {
        if self.last_heartbeat.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
            self.heartbeat(node).await?;
            self.last_heartbeat = Some(Instant::now());
        }
        let pods_all: Api<Pod> = Api::all(self.client.clone());
        let mut pods = pods_all.list(&ListParams::default()).await?.items;
        for pod in pods.iter_mut() {
            let unbound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_none());
            if unbound && pod.metadata.deletion_timestamp.is_none() {
                self.bind(pod, node).await;
            }
        }
        let ours: Vec<Pod> = pods
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .collect();
        self.sync_processes(&ours).await;
        self.reap_terminating();
        // A deleted pod's object goes once its process is gone (the real kubelet's final
        // delete with grace period 0; the uid precondition spares a pod of the same name).
        for pod in &ours {
            let (Some(uid), Some(ns)) = (pod.uid(), pod.namespace()) else {
                continue;
            };
            if pod.metadata.deletion_timestamp.is_some() && !self.procs.contains_key(&uid) {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                if let Err(e) = api.delete(&pod.name_any(), &dp).await {
                    tracing::debug!(pod = %pod.name_any(), error = %e, "deleted pod not removed");
                }
            }
        }
        Ok(())
    }

    /// Binds a pending pod to this node (what a scheduler would do).
    async fn bind(&self, pod: &mut Pod, node: &str) {
        let (Some(ns), name) = (pod.namespace(), pod.name_any()) else {
            return;
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": ns},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        match api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %name, node, "pod bound to this node");
                if let Some(spec) = pod.spec.as_mut() {
                    spec.node_name = Some(node.to_owned());
                }
            }
            Err(e) => tracing::debug!(pod = %name, error = %e, "pod not bound"),
        }
    }

    /// Registers the Node (once) and renews its Ready condition and its heartbeat Lease.
    async fn heartbeat(&mut self, node: &str) -> Result<(), kube::Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let pp = PatchParams::apply("sjob-kubelet").force();
        if nodes.get_opt(node).await?.is_none() {
            nodes
                .patch(
                    node,
                    &pp,
                    &Patch::Apply(json!({
                        "apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": node, "labels": {
                            "kubernetes.io/hostname": node, "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": std::env::consts::ARCH,
                        }},
                    })),
                )
                .await?;
            tracing::info!(node, "node registered");
        }
        let now = now_time();
        let since = self.node_ready_since.clone().unwrap_or_else(|| now.clone());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let status = json!({"status": {
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "sjob process kubelet is posting ready status",
                "lastHeartbeatTime": now, "lastTransitionTime": since,
            }],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": node}],
            "capacity": {"cpu": cpus.to_string(), "pods": "110"},
            "allocatable": {"cpu": cpus.to_string(), "pods": "110"},
            "nodeInfo": {
                "kubeletVersion": concat!("sjob-", env!("CARGO_PKG_VERSION")),
                "kubeProxyVersion": "", "containerRuntimeVersion": "sjob-process://1",
                "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
                "osImage": "", "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": "",
            },
        }});
        nodes
            .patch_status(node, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        self.node_ready_since = Some(since);
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let renew = serde_json::to_value(MicroTime(jiff::Timestamp::now())).unwrap_or_default();
        leases
            .patch(
                node,
                &pp,
                &Patch::Apply(json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": node, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": renew},
                })),
            )
            .await?;
        Ok(())
    }

    /// The Deployment controller's part: old pods out first, then the new pod in.
    async fn sync_deployment(&mut self, d: &Deployment, pods: &[Pod]) -> Result<(), kube::Error> {
        let (Some(uid), Some(ns)) = (d.uid(), d.namespace()) else {
            return Ok(());
        };
        if d.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let hash = template_hash(d);
        let replicas = d.spec.replicas.unwrap_or(1).max(0) as usize;
        let owned: Vec<&Pod> = pods
            .iter()
            .filter(|p| owner_uid(p).as_deref() == Some(uid.as_str()))
            .collect();
        let (current, old): (Vec<&Pod>, Vec<&Pod>) = owned
            .into_iter()
            .partition(|p| p.labels().get("pod-template-hash") == Some(&hash));
        for p in &old {
            api.delete(&p.name_any(), &DeleteParams::default())
                .await
                .ok();
        }
        for p in current.iter().skip(replicas) {
            api.delete(&p.name_any(), &DeleteParams::default())
                .await
                .ok();
        }
        // Recreate: nothing new while a process of this Deployment is still stopping.
        let stopping = self
            .procs
            .values()
            .any(|p| p.owner_uid == uid && p.terminating_since.is_some());
        if !old.is_empty() || stopping || current.len() >= replicas {
            return Ok(());
        }
        let Some(template) = Some(d.spec.template.clone()) else {
            return Ok(());
        };
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert("pod-template-hash".into(), hash.clone());
        for _ in current.len()..replicas {
            let suffix: String = (0..5)
                .map(|_| (b'a' + rand::random::<u8>() % 26) as char)
                .collect();
            let pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": format!("{}-{hash}-{suffix}", d.name_any()),
                    "labels": labels,
                    "annotations": template.metadata.as_ref().and_then(|m| m.annotations.clone()),
                    "ownerReferences": [{
                        "apiVersion": "apps/v1", "kind": "Deployment", "name": d.name_any(),
                        "uid": uid, "controller": true, "blockOwnerDeletion": true,
                    }],
                },
                "spec": template.spec,
                "status": {"phase": "Pending"},
            });
            match serde_json::from_value::<Pod>(pod) {
                Ok(pod) => {
                    api.create(&PostParams::default(), &pod).await?;
                }
                Err(e) => {
                    tracing::warn!(deployment = %d.name_any(), error = %e, "cannot build a pod")
                }
            }
        }
        Ok(())
    }

    async fn report_deployment(&self, d: &Deployment, pods: &[Pod]) -> Result<(), kube::Error> {
        let (Some(uid), Some(ns)) = (d.uid(), d.namespace()) else {
            return Ok(());
        };
        let hash = template_hash(d);
        let owned: Vec<&Pod> = pods
            .iter()
            .filter(|p| owner_uid(p).as_deref() == Some(uid.as_str()))
            .collect();
        let updated = owned
            .iter()
            .filter(|p| p.labels().get("pod-template-hash") == Some(&hash))
            .count() as i32;
        let ready = owned
            .iter()
            .filter(|p| {
                p.labels().get("pod-template-hash") == Some(&hash)
                    && self
                        .procs
                        .get(&p.uid().unwrap_or_default())
                        .is_some_and(|pr| pr.ready)
            })
            .count() as i32;
        let status = json!({
            "observedGeneration": d.metadata.generation,
            "replicas": owned.len() as i32,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
        });
        let current = serde_json::to_value(&d.status).unwrap_or_default();
        if current == status {
            return Ok(());
        }
        let mut next = d.clone();
        next.status = serde_json::from_value(status).ok();
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &ns);
        api.replace_status(&d.name_any(), &PostParams::default(), &next)
            .await
            .map(|_| ())
    }

    fn allocate_ip(&mut self) -> String {
        loop {
            self.next_ip = (self.next_ip + 1) % 65_000;
            let n = self.next_ip + 256;
            let ip = format!("127.{}.{}.{}", 100 + (n >> 16), (n >> 8) & 0xff, n & 0xff);
            if n & 0xff != 0 && n & 0xff != 255 && !self.procs.values().any(|p| p.ip == ip) {
                return ip;
            }
        }
    }

    async fn sync_processes(&mut self, pods: &[Pod]) {
        let live: HashMap<String, &Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.uid().map(|u| (u, p)))
            .collect();
        // Pods that went away (or are being deleted): stop their processes, within the
        // deletion's grace period where it has one.
        for (uid, proc_) in self.procs.iter_mut() {
            if !live.contains_key(uid) && proc_.terminating_since.is_none() {
                proc_.terminating_since = Some(Instant::now());
                if let Some(secs) = pods
                    .iter()
                    .find(|p| p.uid().as_deref() == Some(uid.as_str()))
                    .and_then(|p| p.metadata.deletion_grace_period_seconds)
                {
                    proc_.grace = Duration::from_secs(secs.max(0) as u64);
                }
                if let Some(child) = &proc_.child {
                    tracing::info!(pod = %proc_.pod, "pod deleted: stopping its process");
                    signal(child, libc::SIGTERM);
                }
            }
        }
        self.reap_terminating();
        // New pods: a process slot each.
        for (uid, pod) in &live {
            if !self.procs.contains_key(uid) {
                let ip = self.allocate_ip();
                let ns = pod.namespace().unwrap_or_default();
                let dir = self.opts.pods_dir.join(&ns).join(pod.name_any());
                let grace = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
                    .unwrap_or(30)
                    .clamp(1, 30) as u64;
                self.procs.insert(
                    uid.clone(),
                    Proc {
                        namespace: ns,
                        pod: pod.name_any(),
                        owner_uid: owner_uid(pod).unwrap_or_default(),
                        ip,
                        child: None,
                        started_at: None,
                        spawned: None,
                        restart_count: 0,
                        restart_at: Some(Instant::now()),
                        last_exit: None,
                        ready: false,
                        terminating_since: None,
                        grace: Duration::from_secs(grace),
                        dir,
                        done: None,
                        reported: None,
                    },
                );
            }
        }
        let uids: Vec<String> = live.keys().cloned().collect();
        for uid in uids {
            let pod = live[&uid];
            self.tend(&uid, pod).await;
            self.report_pod(&uid, pod).await;
        }
    }

    fn reap_terminating(&mut self) {
        let mut gone = Vec::new();
        for (uid, p) in self.procs.iter_mut() {
            let Some(since) = p.terminating_since else {
                continue;
            };
            match p.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) => {
                    if since.elapsed() > p.grace
                        && let Some(c) = p.child.as_mut()
                    {
                        let _ = c.kill();
                        let _ = c.wait();
                        gone.push(uid.clone());
                    }
                }
                _ => gone.push(uid.clone()),
            }
        }
        for uid in gone {
            self.procs.remove(&uid);
        }
    }

    /// Starts, watches and restarts one pod's container process.
    async fn tend(&mut self, uid: &str, pod: &Pod) {
        let max_backoff = self.opts.max_backoff;
        let exe = self.opts.sjob_exe.clone();
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .cloned();
        let configmaps = match &container {
            Some(c) => match self.env_from(pod, c).await {
                Ok(env) => self.volumes(pod).await.map(|v| (v, env)),
                Err(e) => Err(e),
            },
            None => Ok((Vec::new(), Vec::new())),
        };
        let Some(p) = self.procs.get_mut(uid) else {
            return;
        };
        if let Some(child) = p.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let code = status.code().unwrap_or(137);
            let log = p.dir.join("container.log");
            p.last_exit = Some(json!({"terminated": {
                "exitCode": code,
                "reason": if code == 0 { "Completed" } else { "Error" },
                "message": log_tail(&log, 3),
                "startedAt": p.started_at,
                "finishedAt": now_time(),
            }}));
            p.child = None;
            p.ready = false;
            let policy = pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref());
            let restart = match policy {
                Some("Never") => false,
                Some("OnFailure") => code != 0,
                _ => true,
            };
            if !restart {
                tracing::info!(pod = %p.pod, code, "container exited; not restarted (restartPolicy {policy:?})");
                p.done = Some(code);
                return;
            }
            p.restart_count += 1;
            let backoff =
                Duration::from_millis(500 << p.restart_count.clamp(1, 8) as u32).min(max_backoff);
            p.restart_at = Some(Instant::now() + backoff);
            tracing::info!(pod = %p.pod, code, restarts = p.restart_count, "container exited; restarting after {backoff:?}");
        }
        if p.child.is_none() && p.restart_at.is_some_and(|t| Instant::now() >= t) {
            p.restart_at = None;
            let Some(container) = container else {
                return;
            };
            match configmaps
                .and_then(|(vols, env)| start_container(&exe, p, pod, &container, &vols, &env))
            {
                Ok(child) => {
                    p.child = Some(child);
                    p.started_at = Some(now_time().as_str().unwrap_or_default().to_owned());
                    p.spawned = Some(Instant::now());
                }
                Err(e) => {
                    tracing::warn!(pod = %p.pod, error = %e, "cannot start the container");
                    p.last_exit = Some(
                        json!({"terminated": {"exitCode": 128, "reason": "StartError", "message": e}}),
                    );
                    p.restart_count += 1;
                    p.restart_at = Some(Instant::now() + max_backoff);
                }
            }
        }
        // Readiness.
        let probe = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.readiness_probe.as_ref())
            .and_then(|r| r.http_get.as_ref())
            .map(|h| {
                let port = match &h.port {
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_) => 8081,
                };
                format!("http://{}:{port}{}", p.ip, h.path.as_deref().unwrap_or("/"))
            });
        let running = p.child.is_some();
        let ready = match (running, probe) {
            (false, _) => false,
            (true, None) => true,
            (true, Some(url)) => self
                .http
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
        };
        if let Some(p) = self.procs.get_mut(uid) {
            p.ready = ready;
        }
    }

    /// The environment a container takes from Secrets (`envFrom: secretRef`), in order.
    async fn env_from(&self, pod: &Pod, c: &Container) -> Result<Vec<(String, String)>, String> {
        let ns = pod.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let mut out = Vec::new();
        for from in c.env_from.clone().unwrap_or_default() {
            let Some(r) = from.secret_ref else {
                return Err(format!(
                    "container {}: only envFrom secretRef is served",
                    c.name
                ));
            };
            let secret = match secrets.get_opt(&r.name).await {
                Ok(Some(s)) => s,
                Ok(None) if r.optional == Some(true) => continue,
                Ok(None) => return Err(format!("envFrom: Secret {} not found", r.name)),
                Err(e) => return Err(format!("envFrom: Secret {}: {e}", r.name)),
            };
            for (k, v) in secret.data.unwrap_or_default() {
                let v = String::from_utf8(v.0)
                    .map_err(|_| format!("envFrom: Secret {}: key {k} is not UTF-8", r.name))?;
                out.push((format!("{}{k}", from.prefix.as_deref().unwrap_or("")), v));
            }
        }
        Ok(out)
    }

    /// The pod's volumes this kubelet serves: ConfigMaps and Secrets as files, emptyDirs.
    async fn volumes(&self, pod: &Pod) -> Result<Vec<(String, Volume)>, String> {
        let ns = pod.namespace().unwrap_or_default();
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let mut out = Vec::new();
        for v in pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default()
        {
            if let Some(cm) = v.config_map {
                let data = configmaps
                    .get(&cm.name)
                    .await
                    .map_err(|e| format!("volume {}: ConfigMap {}: {e}", v.name, cm.name))?;
                let files = data
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, t)| (k, t.into_bytes()))
                    .collect();
                out.push((v.name, Volume::Files(files)));
            } else if let Some(secret) = v.secret {
                let name = secret.secret_name.unwrap_or_default();
                let data = secrets
                    .get(&name)
                    .await
                    .map_err(|e| format!("volume {}: Secret {name}: {e}", v.name))?;
                let files = data
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, b)| (k, b.0))
                    .collect();
                out.push((v.name, Volume::Files(files)));
            } else if v.empty_dir.is_some() {
                out.push((v.name, Volume::EmptyDir));
            }
        }
        Ok(out)
    }

    async fn report_pod(&mut self, uid: &str, pod: &Pod) {
        let Some(p) = self.procs.get(uid) else {
            return;
        };
        let exit = p.last_exit.clone().unwrap_or_else(|| json!({}));
        let state = if p.child.is_some() {
            json!({"running": {"startedAt": p.started_at}})
        } else if p.done.is_some() {
            exit.clone()
        } else if p.restart_count > 0 {
            json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting the failed container of pod {}", p.pod)}})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        let phase = match p.done {
            Some(0) => "Succeeded",
            Some(_) => "Failed",
            None if p.child.is_some() || p.restart_count > 0 => "Running",
            None => "Pending",
        };
        let ready = if p.ready { "True" } else { "False" };
        let container = pod.spec.as_ref().and_then(|s| s.containers.first());
        let since = |kind: &str, status: &str| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == kind))
                .filter(|c| c.status == status)
                .and_then(|c| c.last_transition_time.clone())
                .map(|t| serde_json::to_value(t).unwrap_or_default())
                .unwrap_or_else(now_time)
        };
        let condition = |kind: &str, status: &str| json!({"type": kind, "status": status, "lastTransitionTime": since(kind, status)});
        let status = json!({
            "phase": phase,
            "podIP": p.ip,
            "podIPs": [{"ip": p.ip}],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "conditions": [
                condition("PodScheduled", "True"),
                condition("Initialized", "True"),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "containerStatuses": [{
                "name": container.map(|c| c.name.clone()).unwrap_or_default(),
                "image": container.and_then(|c| c.image.clone()).unwrap_or_default(),
                "imageID": "",
                "ready": p.ready,
                "started": p.child.is_some(),
                "restartCount": p.restart_count,
                "state": state,
                "lastState": if p.done.is_some() { json!({}) } else { exit },
            }],
            "startTime": pod.status.as_ref().and_then(|s| s.start_time.clone()).map(|t| serde_json::to_value(t).unwrap_or_default()).unwrap_or_else(now_time),
        });
        if p.reported.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &p.namespace);
        // A merge patch: fields the API server keeps in the status (qosClass) stay.
        let written = api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await;
        let Some(p) = self.procs.get_mut(uid) else {
            return;
        };
        match written {
            Ok(_) => p.reported = Some(status),
            Err(e) => tracing::debug!(pod = %p.pod, error = %e, "pod status not written"),
        }
    }

    async fn stop_all(&mut self) {
        for p in self.procs.values_mut() {
            if let Some(c) = &p.child {
                signal(c, libc::SIGTERM);
            }
            p.terminating_since = Some(Instant::now());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.procs.is_empty() && Instant::now() < deadline {
            self.reap_terminating();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for p in self.procs.values_mut() {
            if let Some(c) = p.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.procs.clear();
    }
}

/// A volume as this kubelet serves it: a directory under the pod's.
enum Volume {
    /// A ConfigMap's or Secret's keys as files.
    Files(HashMap<String, Vec<u8>>),
    EmptyDir,
}

/// Starts a container as a local process: `sjob` is this machine's binary; volumes are
/// directories under the pod's, mount paths in arguments and environment rewritten to them;
/// the downward API gives the pod IP, name, namespace; `envFrom` Secrets their keys.
fn start_container(
    exe: &Path,
    p: &Proc,
    pod: &Pod,
    c: &Container,
    volumes: &[(String, Volume)],
    env_from: &[(String, String)],
) -> Result<Child, String> {
    let command = c.command.clone().unwrap_or_else(|| vec!["sjob".into()]);
    if command.first().map(String::as_str) != Some("sjob") {
        return Err(format!(
            "container {}: command {:?}: this local kubelet runs only `sjob`",
            c.name, command
        ));
    }
    std::fs::create_dir_all(&p.dir).map_err(|e| format!("{}: {e}", p.dir.display()))?;
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in c.volume_mounts.clone().unwrap_or_default() {
        let Some((_, volume)) = volumes.iter().find(|(n, _)| *n == m.name) else {
            continue;
        };
        let local = p.dir.join("volumes").join(&m.name);
        std::fs::create_dir_all(&local).map_err(|e| format!("{}: {e}", local.display()))?;
        if let Volume::Files(data) = volume {
            for (file, bytes) in data {
                let path = local.join(file);
                let tmp = local.join(format!(".{file}.tmp"));
                std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
                std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        mounts.push((m.mount_path.trim_end_matches('/').to_owned(), local));
    }
    let rewrite = |s: &str| -> String {
        for (mount, local) in &mounts {
            if let Some(rest) = s.strip_prefix(mount.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return format!("{}{rest}", local.display());
            }
        }
        s.to_owned()
    };
    let mut cmd = Command::new(exe);
    cmd.args(command[1..].iter().map(|a| rewrite(a)));
    cmd.args(
        c.args
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|a| rewrite(a)),
    );
    // As in Kubernetes: `env` wins over `envFrom`.
    for (k, v) in env_from {
        cmd.env(k, v);
    }
    for e in c.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => rewrite(v),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("status.podIP") => p.ip.clone(),
                Some("metadata.name") => pod.name_any(),
                Some("metadata.namespace") => pod.namespace().unwrap_or_default(),
                other => return Err(format!("env {}: unsupported valueFrom {other:?}", e.name)),
            },
            (None, None) => String::new(),
        };
        cmd.env(&e.name, value);
    }
    let log_path = p.dir.join("container.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let err = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    cmd.current_dir(&p.dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .env_remove("KUBECONFIG");
    // The engines die with the kubelet's process, even when it is killed.
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec here.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    tracing::info!(pod = %p.pod, ip = %p.ip, "starting container {}", c.name);
    cmd.spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))
}
