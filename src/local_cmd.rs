//! `sjob local` and `sjob local demo`: a local control plane, the operator against it, and
//! (demo) the whole upgrade story with its proof that no state was lost.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use sjob::local::control_plane::{ControlPlane, Kind};
use sjob::local::sink_check::CountLog;
use sjob::operator::crd::{Phase, StatefulJob};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct LocalArgs {
    /// Where the cluster's objects, engine pods, logs and savepoints live; a second run with
    /// the same directory continues where the first stopped.
    #[arg(long, default_value = ".sjob-local", global = true)]
    dir: PathBuf,
    /// The in-process API server's port (a real one takes any free port).
    #[arg(long, default_value_t = 6443, global = true)]
    port: u16,
    /// `in-process`: sjob's own API server, nothing to install. `real`: etcd, kube-apiserver
    /// and kube-controller-manager, built by `bash e2e/k8s/install.sh` (or found in
    /// SJOB_K8S_BIN); the operator runs under its own ServiceAccount and RBAC.
    #[arg(long, value_enum, default_value = "in-process", global = true)]
    control_plane: Kind,
    #[command(subcommand)]
    command: Option<LocalCommand>,
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Deploy a sample job, let it count, change its pipeline, watch the savepoint-based
    /// upgrade, and show that every key's count went on from where it was.
    Demo,
}

fn spawn_operator(cluster: &ControlPlane, exe: &Path) -> Result<Child> {
    let log_path = cluster.dir().join("operator.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    cluster
        .operator_command(exe, "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the operator")
}

fn stop_child(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn run(args: LocalArgs) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the sjob executable")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let dir =
        std::path::absolute(&args.dir).with_context(|| format!("--dir {}", args.dir.display()))?;
    rt.block_on(async move {
        if args.control_plane == Kind::Real {
            // The real control plane's etcd starts empty: no objects of an earlier run.
            let _ = std::fs::remove_dir_all(dir.join("etcd"));
        }
        let cluster = ControlPlane::start(args.control_plane, &dir, args.port, &exe)
            .await
            .with_context(|| {
                format!("cannot start the local control plane in {}", dir.display())
            })?;
        let mut operator = spawn_operator(&cluster, &exe)?;
        let result = match args.command {
            None => serve(&cluster).await,
            Some(LocalCommand::Demo) => demo(&cluster).await,
        };
        stop_child(&mut operator);
        cluster.shutdown().await;
        result
    })
}

async fn serve(cluster: &ControlPlane) -> Result<ExitCode> {
    let kc = cluster.kubeconfig();
    println!(
        "sjob local: API server on {}, state in {}",
        cluster.url(),
        cluster.dir().display()
    );
    println!(
        "  operator log:  {}",
        cluster.dir().join("operator.log").display()
    );
    println!(
        "  engine pods:   {}/pods/<namespace>/<pod>/container.log",
        cluster.dir().display()
    );
    println!();
    println!("Try:");
    println!("  export KUBECONFIG={}", kc.display());
    println!("  kubectl apply -f config/samples/statefuljob.yaml");
    println!("  kubectl get sjob            # phase, job id, last savepoint");
    println!("  kubectl get savepoints");
    println!("  kubectl get pods,deployments");
    println!();
    println!(
        "Ctrl-C stops everything; objects and savepoints stay in {}.",
        cluster.dir().display()
    );
    sjob::operator::runner::termination().await;
    println!("stopping");
    Ok(ExitCode::SUCCESS)
}

const DEMO_KEYS: i64 = 20;
const DEMO_RECORDS: i64 = 600_000;

/// Applies the demo StatefulJob, as `kubectl apply --server-side` would.
/// Version 0 counts; 1 adds a map (rolled out as recreate); 2 changes the map and is rolled
/// out blue-green.
async fn apply_demo(api: &Api<StatefulJob>, sink: &Path, version: u8) -> Result<()> {
    let strategy = if version >= 2 {
        "blue-green"
    } else {
        "recreate"
    };
    let manifest = serde_json::json!({
        "apiVersion": "sjob.dev/v1alpha1", "kind": "StatefulJob",
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": {"job": demo_job(sink, version),
                 "upgrade": {"strategy": strategy, "blueGreen": {"maxLag": 100_000}},
                 "savepoints": {"retention": {"maxCount": 4}}},
    });
    api.patch(
        "demo",
        &PatchParams::apply("sjob-demo").force(),
        &Patch::Apply(&manifest),
    )
    .await
    .context("applying the StatefulJob demo")?;
    Ok(())
}

fn demo_job(sink: &Path, version: u8) -> serde_json::Value {
    let mut ops = vec![
        serde_json::json!({"kind": "generator", "uid": "source", "keys": DEMO_KEYS, "keyPrefix": "user-", "count": DEMO_RECORDS, "rate": 20000}),
        serde_json::json!({"kind": "keyBy", "field": "key"}),
        serde_json::json!({"kind": "count", "uid": "counter"}),
    ];
    match version {
        0 => {}
        1 => ops.push(
            serde_json::json!({"kind": "map", "set": [{"field": "doubled", "expr": "count * 2"}]}),
        ),
        _ => ops.push(
            serde_json::json!({"kind": "map", "set": [{"field": "tripled", "expr": "count * 3"}]}),
        ),
    }
    ops.push(serde_json::json!({"kind": "fileSink", "uid": "out", "path": sink}));
    serde_json::json!({"name": "demo", "parallelism": 2, "operators": ops})
}

async fn wait_phase(
    api: &Api<StatefulJob>,
    name: &str,
    timeout: Duration,
    mut done: impl FnMut(&StatefulJob) -> bool,
) -> Result<StatefulJob> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let sj = api
            .get(name)
            .await
            .with_context(|| format!("StatefulJob {name}"))?;
        let st = sj.status.clone().unwrap_or_default();
        let now = format!(
            "{:?}{}",
            st.phase,
            st.upgrade
                .as_ref()
                .map(|u| format!(" / {:?}", u.stage))
                .unwrap_or_default()
        );
        if now != last {
            println!(
                "  [{}] phase {}",
                jiff::Timestamp::now().strftime("%H:%M:%S"),
                now.replace("Some(", "").replace(')', "")
            );
            last = now;
        }
        if done(&sj) {
            return Ok(sj);
        }
        if Instant::now() > deadline {
            bail!(
                "StatefulJob {name} did not get there within {timeout:?} (last phase {last}); see the operator log"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn demo(cluster: &ControlPlane) -> Result<ExitCode> {
    let started = Instant::now();
    let api: Api<StatefulJob> = Api::namespaced(cluster.client(), "default");
    let sink = cluster.dir().join("out/demo");
    if api.get_opt("demo").await?.is_some() {
        println!("removing the StatefulJob 'demo' of an earlier run");
        api.delete("demo", &Default::default()).await?;
        while api.get_opt("demo").await?.is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let _ = std::fs::remove_dir_all(&sink);
    println!(
        "1. deploying StatefulJob 'demo': {DEMO_RECORDS} clicks over {DEMO_KEYS} users, counted per user, written exactly once to {}",
        sink.display()
    );
    apply_demo(&api, &sink, 0).await?;
    let sj = wait_phase(&api, "demo", Duration::from_secs(60), |sj| {
        sj.status.as_ref().and_then(|s| s.phase) == Some(Phase::Running)
    })
    .await?;
    let first_job = sj.status.and_then(|s| s.job_id).unwrap_or_default();
    println!("   running as engine job {first_job}");
    println!("2. letting it count for 8 seconds");
    tokio::time::sleep(Duration::from_secs(8)).await;
    println!("3. changing the pipeline: a map after the count (kubectl apply of the new spec)");
    let asked = Instant::now();
    apply_demo(&api, &sink, 1).await?;
    let sj = wait_phase(&api, "demo", Duration::from_secs(60), |sj| {
        let st = sj.status.as_ref();
        st.and_then(|s| s.phase) == Some(Phase::Running)
            && st.and_then(|s| s.job_id.as_deref()) != Some(first_job.as_str())
            && st.is_some_and(|s| s.upgrade.is_none())
    })
    .await?;
    let st = sj.status.clone().unwrap_or_default();
    let savepoint = st.restored_from.clone().unwrap_or_default();
    println!(
        "   upgraded in {:.1}s: the new job {} restored from {savepoint}",
        asked.elapsed().as_secs_f64(),
        st.job_id.as_deref().unwrap_or_default()
    );
    // The stop-with-savepoint committed the old job's output up to the savepoint: the sink
    // shows the per-key state the savepoint holds.
    let before = CountLog::read(&sink).map_err(anyhow::Error::msg)?.latest();
    println!(
        "4. changing it again, blue-green this time: the new version starts beside the running one, catches up without writing, and takes over at a source position both hold at"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second_job = st.job_id.clone().unwrap_or_default();
    let asked = Instant::now();
    apply_demo(&api, &sink, 2).await?;
    let sj = wait_phase(&api, "demo", Duration::from_secs(60), |sj| {
        let st = sj.status.as_ref();
        let ended = st.and_then(|s| s.phase) == Some(Phase::Suspended);
        ended
            || (st.and_then(|s| s.phase) == Some(Phase::Running)
                && st.and_then(|s| s.job_id.as_deref()) != Some(second_job.as_str())
                && st.is_some_and(|s| s.upgrade.is_none()))
    })
    .await?;
    let st = sj.status.clone().unwrap_or_default();
    match st.live {
        Some(color) if st.phase == Some(Phase::Running) => println!(
            "   switched in {:.1}s: the {} engine (job {}) writes from the cut-over on; the old one wrote up to it, never stopped before",
            asked.elapsed().as_secs_f64(),
            color.as_str(),
            st.job_id.unwrap_or_default()
        ),
        _ => println!(
            "   the job read all its input before the switch; the old version wrote it all"
        ),
    }
    println!("5. waiting for the job to finish its {DEMO_RECORDS} records");
    wait_phase(&api, "demo", Duration::from_secs(90), |sj| {
        sj.status.as_ref().and_then(|s| s.phase) == Some(Phase::Suspended)
    })
    .await?;
    let log = CountLog::read(&sink).map_err(anyhow::Error::msg)?;
    let after = log.latest();
    println!("\n   user        at the savepoint   at the end");
    for (key, n) in after.iter().take(6) {
        println!(
            "   {key:<10}  {:>16}   {n:>10}",
            before.get(key).copied().unwrap_or(0)
        );
    }
    println!("   … ({} users)\n", after.len());
    let problems = log.exactly_once(DEMO_KEYS as usize, DEMO_RECORDS / DEMO_KEYS);
    if !problems.is_empty() {
        bail!("state was lost or doubled:\n  {}", problems.join("\n  "));
    }
    println!(
        "6. every user's count went on from the savepoint and across the switch: 1..{} written exactly once per user, nothing lost, nothing twice ({:.0}s in all)",
        DEMO_RECORDS / DEMO_KEYS,
        started.elapsed().as_secs_f64()
    );
    let sps: Api<sjob::operator::crd::Savepoint> = Api::namespaced(cluster.client(), "default");
    for sp in sps.list(&Default::default()).await?.items {
        println!(
            "   Savepoint {}: {:?} {}",
            sp.name_any(),
            sp.spec.trigger,
            sp.status.and_then(|s| s.path).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
