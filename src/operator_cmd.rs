//! `sjob operator`: flags to options, a Kubernetes client, and the operator's runner.

use anyhow::{Context, Result};
use clap::Args;
use sjob::operator::resources::EngineSettings;
use sjob::operator::runner::{self, LeaderElection, OperatorOptions};
use std::process::ExitCode;

#[derive(Args)]
pub struct OperatorArgs {
    /// Kubeconfig to use; in-cluster configuration when absent.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Watch only this namespace (all namespaces when absent).
    #[arg(long, env = "SJOB_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Image of engine pods when a StatefulJob names none.
    #[arg(
        long,
        env = "SJOB_ENGINE_IMAGE",
        default_value = "ghcr.io/sjob-dev/sjob:latest"
    )]
    engine_image: String,
    /// Savepoint directory when a StatefulJob names none.
    #[arg(long, env = "SJOB_DEFAULT_SAVEPOINT_DIR")]
    default_savepoint_dir: Option<String>,
    /// The engines' REST port.
    #[arg(long, default_value_t = 8081)]
    engine_port: u16,
    /// Engines require a bearer token on their REST API: a random one per StatefulJob, kept in
    /// the Secret `<job>-rest-token` (`--engine-rest-token=false`: no token).
    #[arg(long, env = "SJOB_ENGINE_REST_TOKEN", default_value_t = true, action = clap::ArgAction::Set)]
    engine_rest_token: bool,
    /// A Secret in each job's namespace whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION, AWS_ENDPOINT_URL, …; AZURE_STORAGE_ACCOUNT_NAME, …) engine pods get as
    /// environment: the credentials of s3:// and az:// savepoint and checkpoint locations. The operator reads snapshots with its own
    /// environment (the chart gives it the same Secret).
    #[arg(long, env = "SJOB_ENGINE_STORAGE_SECRET")]
    engine_storage_secret: Option<String>,
    /// This replica's name (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Elect a leader on a Lease so that only one replica acts.
    #[arg(long, env = "SJOB_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "sjob-operator")]
    lease_name: String,
    /// How long a leader's lease lasts without renewal, e.g. `15s`.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: std::time::Duration,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "SJOB_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: std::net::SocketAddr,
}

fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    sjob::engine::spec::parse_duration("--lease-duration", s)
}

async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given (--kubeconfig / KUBECONFIG) and not in a cluster")?,
    };
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

pub fn run(args: OperatorArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_park(return_freed_memory)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let client = client(args.kubeconfig.as_deref()).await?;
        let identity = args.identity.unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "sjob-operator".into()),
                std::process::id()
            )
        });
        let opts = OperatorOptions {
            namespace: args.namespace,
            engine: EngineSettings {
                image: args.engine_image,
                default_savepoint_dir: args.default_savepoint_dir,
                port: args.engine_port,
                rest_token: args.engine_rest_token,
                storage_secret: args.engine_storage_secret,
            },
            identity,
            leader_election: args.leader_elect.then_some(LeaderElection {
                namespace: args.lease_namespace,
                lease_name: args.lease_name,
                duration: args.lease_duration,
            }),
            http_addr: args.http_addr,
        };
        runner::run(client, opts, runner::termination()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Called when a runtime thread goes idle: at most once a second per thread, asks the allocator
/// to hand that thread's freed pages back to the system. The allocator otherwise keeps them
/// until the thread allocates again, so the memory of a burst of work (1,000 StatefulJobs
/// applied at once) stays resident while the operator idles.
fn return_freed_memory() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        if last
            .get()
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        last.set(Some(Instant::now()));
        // SAFETY: mi_collect only releases memory the allocator holds unused; it takes no
        // pointers and may be called from any thread at any time.
        unsafe { libmimalloc_sys::mi_collect(false) };
    });
}
