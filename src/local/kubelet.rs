//! A process kubelet for the local control plane: it plays the Deployment controller (pods for
//! each Deployment, Recreate: the old pod's process is gone before the new one starts) and the
//! kubelet (each pod's container is a local process of the `sjob` binary, restarted with
//! backoff when it exits, probed for readiness, its state reported in the pod's status).
//!
//! Each pod gets its own loopback address (127.x.y.z) as its pod IP, so every engine listens
//! on the same port as in a cluster and the operator reaches it the same way. ConfigMap
//! volumes are written under the pod's directory and their mount paths rewritten in the
//! container's arguments and environment.

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
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
            let deployments: Api<Deployment> = Api::all(client.clone());
            async move {
                // Backoff: while the API server is away, no busy loop of failed watches.
                let mut events = std::pin::pin!(
                    watcher(deployments, watcher::Config::default()).default_backoff()
                );
                while events.next().await.is_some() {
                    changed.notify_one();
                }
            }
        });
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
            };
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
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = changed.notified() => {}
                    _ = rx.changed() => {}
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
    pod_uid: String,
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
}

struct State {
    client: Client,
    opts: KubeletOptions,
    /// By pod uid.
    procs: HashMap<String, Proc>,
    http: reqwest::Client,
    next_ip: u32,
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
        // Pods that went away: stop their processes.
        for (uid, proc_) in self.procs.iter_mut() {
            if !live.contains_key(uid) && proc_.terminating_since.is_none() {
                proc_.terminating_since = Some(Instant::now());
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
                        pod_uid: uid.clone(),
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
            Some(_) => self.volumes(pod).await,
            None => Ok(Vec::new()),
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
                "finishedAt": jiff::Timestamp::now().to_string(),
            }}));
            p.child = None;
            p.ready = false;
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
            match configmaps.and_then(|vols| start_container(&exe, p, pod, &container, &vols)) {
                Ok(child) => {
                    p.child = Some(child);
                    p.started_at = Some(jiff::Timestamp::now().to_string());
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

    async fn volumes(&self, pod: &Pod) -> Result<Vec<(String, HashMap<String, String>)>, String> {
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        let mut out = Vec::new();
        for v in pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default()
        {
            if let Some(cm) = v.config_map {
                let data = api
                    .get(&cm.name)
                    .await
                    .map_err(|e| format!("volume {}: ConfigMap {}: {e}", v.name, cm.name))?;
                out.push((v.name, data.data.unwrap_or_default().into_iter().collect()));
            }
        }
        Ok(out)
    }

    async fn report_pod(&self, uid: &str, pod: &Pod) {
        let Some(p) = self.procs.get(uid) else {
            return;
        };
        let state = if p.child.is_some() {
            json!({"running": {"startedAt": p.started_at}})
        } else if p.restart_count > 0 {
            json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting the failed container of pod {}", p.pod)}})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        let ready = if p.ready { "True" } else { "False" };
        let name = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let transition = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .filter(|c| c.status == ready)
            .and_then(|c| c.last_transition_time.clone())
            .map(|t| serde_json::to_value(t).unwrap_or_default())
            .unwrap_or_else(|| json!(jiff::Timestamp::now().to_string()));
        let status = json!({
            "phase": if p.child.is_some() || p.restart_count > 0 { "Running" } else { "Pending" },
            "podIP": p.ip,
            "podIPs": [{"ip": p.ip}],
            "hostIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": transition}],
            "containerStatuses": [{
                "name": name,
                "image": pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.clone()).unwrap_or_default(),
                "imageID": "",
                "ready": p.ready,
                "started": p.child.is_some(),
                "restartCount": p.restart_count,
                "state": state,
                "lastState": p.last_exit.clone().unwrap_or_else(|| json!({})),
            }],
            "startTime": pod.status.as_ref().and_then(|s| s.start_time.clone()).map(|t| serde_json::to_value(t).unwrap_or_default()).unwrap_or_else(|| json!(jiff::Timestamp::now().to_string())),
        });
        let current = serde_json::to_value(&pod.status).unwrap_or_default();
        if current == status {
            return;
        }
        let mut next = pod.clone();
        next.status = serde_json::from_value(status).ok();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &p.namespace);
        if let Err(e) = api
            .replace_status(&pod.name_any(), &PostParams::default(), &next)
            .await
        {
            tracing::debug!(pod = %p.pod, error = %e, "pod status not written");
        }
        let _ = &p.pod_uid;
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

/// Starts a container as a local process: `sjob` is this machine's binary; ConfigMap volumes
/// are files under the pod's directory; the downward API gives the pod IP, name, namespace.
fn start_container(
    exe: &Path,
    p: &Proc,
    pod: &Pod,
    c: &Container,
    volumes: &[(String, HashMap<String, String>)],
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
        let Some((_, data)) = volumes.iter().find(|(n, _)| *n == m.name) else {
            continue;
        };
        let local = p.dir.join("volumes").join(&m.name);
        std::fs::create_dir_all(&local).map_err(|e| format!("{}: {e}", local.display()))?;
        for (file, text) in data {
            let path = local.join(file);
            let tmp = local.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
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
