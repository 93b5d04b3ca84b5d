//! The `sjob` command line: parses arguments and hands each command to its module.

#[global_allocator]
static GLOBAL: sjob::allocator::Allocator = sjob::allocator::Allocator;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use sjob::engine::{self, JobOptions, JobState, spec::JobSpec};
use sjob::savepoint::{metadata::SnapshotMetadata, store::Store, tools};
use std::path::PathBuf;
use std::process::ExitCode;

mod local_cmd;
mod operator_cmd;

#[derive(Parser)]
#[command(
    name = "sjob",
    version,
    about = "Stateful stream jobs that survive upgrades: engine, savepoint tools and Kubernetes operator"
)]
struct Cli {
    /// Log format: `text`, or `json` (one object per line, for log collectors).
    #[arg(long, global = true, env = "SJOB_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job file in this process (what an engine pod runs), optionally from a savepoint.
    Run(RunArgs),
    /// List the jobs of an engine (or a Flink cluster) over REST.
    List(Endpoint),
    /// Trigger a savepoint of a running job and wait for its path.
    Savepoint {
        job_id: String,
        /// Where to put it (the engine's default savepoint directory if absent).
        target_directory: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Cancel a job, optionally taking a savepoint first (`-s DIR`).
    Cancel {
        job_id: String,
        #[arg(short = 's', long = "with-savepoint", num_args = 0..=1, default_missing_value = "")]
        savepoint: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Stop a job with a savepoint (its output up to the savepoint is committed).
    Stop {
        job_id: String,
        #[arg(short = 'p', long = "savepoint-path", visible_alias = "savepointPath")]
        savepoint_path: Option<String>,
        /// Emit the final watermark first, firing every pending window.
        #[arg(short = 'd', long)]
        drain: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Offline savepoint tools.
    #[command(subcommand)]
    Savepoints(SavepointsCommand),
    /// Print the CustomResourceDefinitions (StatefulJob, Savepoint) as YAML.
    Crd {
        /// Print the field reference (README's Reference section) as Markdown instead.
        #[arg(long)]
        reference: bool,
    },
    /// Run the Kubernetes operator (in a cluster, or against any kubeconfig).
    Operator(operator_cmd::OperatorArgs),
    /// A local control plane with the operator and engine processes on this machine, no
    /// cluster needed; `sjob local demo` plays the whole upgrade story.
    Local(local_cmd::LocalArgs),
}

#[derive(Args)]
struct Endpoint {
    /// The REST endpoint of the engine or Flink cluster.
    #[arg(long, env = "SJOB_URL", default_value = "http://127.0.0.1:8081")]
    url: String,
    /// How long to wait for a savepoint.
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    timeout: std::time::Duration,
    /// A file holding the engine's bearer token (an engine run with --rest-token-file).
    #[arg(long, env = "SJOB_REST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl Endpoint {
    fn client(&self) -> Result<sjob::operator::engine_client::EngineClient> {
        let client = sjob::operator::engine_client::EngineClient::new(&self.url);
        Ok(match &self.token_file {
            Some(path) => client.with_token(engine::access::RestToken::from_file(path)?),
            None => client,
        })
    }
}

fn parse_timeout(s: &str) -> std::result::Result<std::time::Duration, String> {
    engine::spec::parse_duration("--timeout", s)
}

#[derive(Args)]
struct RunArgs {
    /// The job file (YAML).
    job: PathBuf,
    /// Restore from this savepoint or checkpoint directory.
    #[arg(short = 's', long = "from-savepoint", visible_alias = "fromSavepoint")]
    savepoint: Option<String>,
    /// Start even if the savepoint holds state the job has no operator (uid) for; that state is dropped.
    #[arg(
        short = 'n',
        long = "allow-non-restored-state",
        visible_alias = "allowNonRestoredState"
    )]
    allow_non_restored_state: bool,
    /// Default parallelism of the job's operators.
    #[arg(short = 'p', long)]
    parallelism: Option<u32>,
    /// Run in the background; prints the job id and the process id.
    #[arg(short = 'd', long)]
    detached: bool,
    /// The job id (32 hex digits); a restarted engine reuses it to find its checkpoints.
    #[arg(long, env = "SJOB_JOB_ID")]
    job_id: Option<String>,
    /// Where a detached job writes its log.
    #[arg(long, default_value = "sjob-run.log")]
    log_file: PathBuf,
    /// REST port (0: any free port); the API speaks Flink's REST dialect.
    #[arg(long, env = "SJOB_REST_PORT", default_value_t = 8081)]
    rest_port: u16,
    /// REST bind address.
    #[arg(long, env = "SJOB_REST_ADDRESS", default_value = "127.0.0.1")]
    rest_address: String,
    /// Default directory for savepoints triggered without one.
    #[arg(long, env = "SJOB_SAVEPOINT_DIR")]
    savepoint_dir: Option<String>,
    /// Savepoints requested over REST may only be written under these directories (repeat
    /// the flag, or separate with commas); others are refused with 403. None: anywhere.
    #[arg(
        long = "savepoint-root",
        env = "SJOB_SAVEPOINT_ROOTS",
        value_delimiter = ','
    )]
    savepoint_roots: Vec<String>,
    /// Sinks write nothing until a cut-over (`POST /jobs/ID/sources/release {"cut-over":
    /// true}`): the new version of a blue-green switch, catching up beside the old one.
    #[arg(long)]
    shadow: bool,
    /// Job-facing REST requests must carry `Authorization: Bearer <the file's content>`
    /// (health, readiness, metrics and the overview stay open).
    #[arg(long, env = "SJOB_REST_TOKEN_FILE")]
    rest_token_file: Option<PathBuf>,
    /// After the job ends, the REST API stays up until clients have read every savepoint
    /// outcome, for at most this many seconds.
    #[arg(long, default_value_t = 30)]
    linger: u64,
    /// After the job ends, keep serving REST until SIGTERM (how engine pods run: a restarted
    /// process would otherwise resume a job that was stopped on purpose).
    #[arg(long)]
    keep_running: bool,
    /// Set by `run -d` for the process it starts: where to write the REST address once the
    /// job has started (state restored, REST API up).
    #[arg(long, hide = true)]
    ready_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SavepointsCommand {
    /// Show what a savepoint holds: operators, uids, parallelism, states and schemas, sizes, positions.
    Inspect {
        path: String,
        /// Print the metadata as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Will this savepoint restore into this job? Lists every problem; exit 1 if any.
    Check {
        path: String,
        job: PathBuf,
        #[arg(short = 'p', long)]
        parallelism: Option<u32>,
        #[arg(
            short = 'n',
            long = "allow-non-restored-state",
            visible_alias = "allowNonRestoredState"
        )]
        allow_non_restored_state: bool,
    },
    /// Delete a savepoint (or an incomplete one) and its state files.
    Dispose { path: String },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SJOB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

fn read_job(path: &PathBuf) -> Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    JobSpec::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A detached job that has started.
struct Started {
    pid: u32,
    url: String,
}

impl std::fmt::Display for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Written to a temporary name and renamed: the parent never reads half an address.
fn write_ready_file(path: &std::path::Path, url: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, url)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Waits until the detached process has started its job (validated, state restored, REST
/// API up) or has exited; then the job's own error, from its log, is this command's error.
fn wait_until_started(
    mut child: std::process::Child,
    ready_file: &std::path::Path,
    log_file: &std::path::Path,
) -> Result<Started> {
    let begun = std::time::Instant::now();
    let mut next_note = begun + std::time::Duration::from_secs(10);
    loop {
        if let Ok(url) = std::fs::read_to_string(ready_file) {
            let _ = std::fs::remove_file(ready_file);
            return Ok(Started {
                pid: child.id(),
                url,
            });
        }
        if let Some(status) = child.try_wait().context("cannot watch the detached job")? {
            // `main` prints the error last, as "error: …" (possibly over several lines).
            let log = std::fs::read_to_string(log_file).unwrap_or_default();
            let error = log
                .rfind("\nerror: ")
                .map(|i| &log[i + 1..])
                .or_else(|| log.strip_prefix("error: ").map(|_| log.as_str()))
                .map(|e| e.trim_start_matches("error: ").trim())
                .unwrap_or_default();
            if error.is_empty() {
                anyhow::bail!(
                    "the job exited ({status}) before it started; see {}",
                    log_file.display()
                );
            }
            anyhow::bail!("{error}");
        }
        if std::time::Instant::now() >= next_note {
            eprintln!(
                "waiting for the job to start ({}s; restoring state?), log {}",
                begun.elapsed().as_secs(),
                log_file.display()
            );
            next_note += std::time::Duration::from_secs(10);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The REST API's access settings, checked before the job starts.
fn rest_access(
    args: &RunArgs,
) -> Result<(
    engine::access::SavepointRoots,
    Option<engine::access::RestToken>,
)> {
    let roots =
        engine::access::SavepointRoots::new(&args.savepoint_roots).context("--savepoint-root")?;
    if let Some(dir) = &args.savepoint_dir {
        roots
            .check(dir)
            .map_err(|e| anyhow::anyhow!("--savepoint-dir: {e}"))?;
    }
    let token = match &args.rest_token_file {
        Some(path) => {
            Some(engine::access::RestToken::from_file(path).context("--rest-token-file")?)
        }
        None => None,
    };
    Ok((roots, token))
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let spec = read_job(&args.job)?;
    let (roots, token) = rest_access(&args)?;
    if args.detached {
        let job_id = args.job_id.clone().unwrap_or_else(engine::new_job_id);
        let exe = std::env::current_exe().context("cannot find the sjob executable")?;
        let log = std::fs::File::create(&args.log_file)
            .with_context(|| format!("cannot create log file {}", args.log_file.display()))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("run").arg(&args.job).arg("--job-id").arg(&job_id);
        if let Some(s) = &args.savepoint {
            cmd.arg("-s").arg(s);
        }
        if args.allow_non_restored_state {
            cmd.arg("--allow-non-restored-state");
        }
        if let Some(p) = args.parallelism {
            cmd.arg("-p").arg(p.to_string());
        }
        cmd.arg("--rest-port").arg(args.rest_port.to_string());
        cmd.arg("--rest-address").arg(&args.rest_address);
        cmd.arg("--linger").arg(args.linger.to_string());
        if args.keep_running {
            cmd.arg("--keep-running");
        }
        if let Some(d) = &args.savepoint_dir {
            cmd.arg("--savepoint-dir").arg(d);
        }
        for root in &args.savepoint_roots {
            cmd.arg("--savepoint-root").arg(root);
        }
        if let Some(t) = &args.rest_token_file {
            cmd.arg("--rest-token-file").arg(t);
        }
        if args.shadow {
            cmd.arg("--shadow");
        }
        let ready_file = std::env::temp_dir().join(format!(
            "sjob-ready-{job_id}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        cmd.arg("--ready-file").arg(&ready_file);
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the detached job")?;
        let rest = wait_until_started(child, &ready_file, &args.log_file)?;
        println!(
            "Job has been submitted with JobID {job_id} (process {}, log {}, REST API {rest})",
            rest.pid,
            args.log_file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let job = engine::start(
        &spec,
        JobOptions {
            job_id: args.job_id,
            savepoint: args.savepoint,
            allow_non_restored_state: args.allow_non_restored_state,
            parallelism: args.parallelism,
            shadow: args.shadow,
            ..Default::default()
        },
    )?;
    eprintln!("Job has been submitted with JobID {}", job.id());
    let job = std::sync::Arc::new(job);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the REST runtime")?;
    let addr = format!("{}:{}", args.rest_address, args.rest_port);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| {
            format!("cannot listen on {addr} for the REST API (--rest-port / --rest-address)")
        })?;
    let bound = listener.local_addr()?;
    eprintln!("REST API on http://{bound}");
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &format!("http://{bound}"))?;
    }
    let state = engine::rest::RestState::new(job.clone(), args.savepoint_dir.clone(), roots, token);
    let rest_state = state.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(engine::rest::serve(state, listener, async move {
        let _ = stop_rx.await;
    }));
    let for_signal = job.clone();
    let (term_tx, mut term_rx) = tokio::sync::watch::channel(false);
    rt.spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        eprintln!("signal received: cancelling job {}", for_signal.id());
        let _ = term_tx.send(true);
        for_signal.cancel();
    });
    let waiter = job.clone();
    let state =
        rt.block_on(async move { tokio::task::spawn_blocking(move || waiter.wait()).await })?;
    eprintln!("Job {} {}", job.id(), state.as_flink());
    if args.keep_running {
        eprintln!("the job has ended; serving REST until SIGTERM (--keep-running)");
        rt.block_on(async {
            while !*term_rx.borrow_and_update() {
                if term_rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    // Linger so a client can read the outcome of a savepoint it asked for, unless the process
    // was told to stop (a pod being deleted: nobody is waiting for it any more).
    let terminated = *term_rx.borrow();
    let linger_until = std::time::Instant::now() + std::time::Duration::from_secs(args.linger);
    while !terminated
        && rest_state.has_unread_outcomes()
        && std::time::Instant::now() < linger_until
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    match state {
        JobState::Failed => {
            bail!(
                "job {} failed: {}",
                job.id(),
                job.failure().unwrap_or_default()
            )
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn client_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the client runtime")
}

fn remote(cmd: Command) -> Result<ExitCode> {
    let rt = client_runtime()?;
    rt.block_on(async move {
        match cmd {
            Command::List(ep) => {
                let client = ep.client()?;
                let jobs = client.jobs_overview().await?;
                let (running, other): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| {
                    matches!(
                        j.state.as_str(),
                        "RUNNING" | "RESTARTING" | "CREATED" | "INITIALIZING"
                    )
                });
                println!("------------------ Running/Restarting Jobs -------------------");
                if running.is_empty() {
                    println!("No running jobs.");
                }
                for j in &running {
                    println!("{} : {} : {} ({})", j.start_time, j.jid, j.name, j.state);
                }
                if !other.is_empty() {
                    println!("---------------------- Terminated Jobs -----------------------");
                    for j in &other {
                        println!("{} : {} : {} ({})", j.start_time, j.jid, j.name, j.state);
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Savepoint {
                job_id,
                target_directory,
                endpoint,
            } => {
                let client = endpoint.client()?;
                eprintln!("Triggering savepoint for job {job_id}.");
                let trigger = client
                    .trigger_savepoint(&job_id, target_directory.as_deref(), false)
                    .await?;
                eprintln!("Waiting for response...");
                let path = client
                    .wait_savepoint(&job_id, &trigger, endpoint.timeout)
                    .await?;
                println!("Savepoint completed. Path: {path}");
                Ok(ExitCode::SUCCESS)
            }
            Command::Cancel {
                job_id,
                savepoint,
                endpoint,
            } => {
                let client = endpoint.client()?;
                match savepoint {
                    Some(dir) => {
                        let dir = (!dir.is_empty()).then_some(dir);
                        let trigger = client
                            .trigger_savepoint(&job_id, dir.as_deref(), true)
                            .await?;
                        let path = client
                            .wait_savepoint(&job_id, &trigger, endpoint.timeout)
                            .await?;
                        println!("Cancelled job {job_id}. Savepoint stored in {path}.");
                    }
                    None => {
                        client.cancel(&job_id).await?;
                        println!("Cancelled job {job_id}.");
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Stop {
                job_id,
                savepoint_path,
                drain,
                endpoint,
            } => {
                let client = endpoint.client()?;
                eprintln!("Suspending job \"{job_id}\" with a savepoint.");
                let trigger = client
                    .stop_with_savepoint(&job_id, savepoint_path.as_deref(), drain)
                    .await?;
                let path = client
                    .wait_savepoint(&job_id, &trigger, endpoint.timeout)
                    .await?;
                println!("Savepoint completed. Path: {path}");
                Ok(ExitCode::SUCCESS)
            }
            _ => bail!("not a remote command"),
        }
    })
}

fn savepoints(cmd: SavepointsCommand) -> Result<ExitCode> {
    match cmd {
        SavepointsCommand::Inspect { path, json } => {
            let dir = Store::open(&path)?;
            let meta = SnapshotMetadata::read(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&meta)?);
            } else {
                print!("{}", tools::describe(&dir.location(), &meta));
            }
            Ok(ExitCode::SUCCESS)
        }
        SavepointsCommand::Check {
            path,
            job,
            parallelism,
            allow_non_restored_state,
        } => {
            let spec = read_job(&job)?;
            match engine::check_restore(
                &spec,
                &path,
                parallelism,
                allow_non_restored_state,
                engine::FileCheck::Checksums,
            ) {
                Ok(check) => {
                    println!(
                        "OK: {} restores into job '{}' ({} stateful operator(s) restored{})",
                        path,
                        spec.name,
                        check.plan.operators.len(),
                        if check.plan.dropped.is_empty() {
                            String::new()
                        } else {
                            format!(", state dropped: {}", check.plan.dropped.join(", "))
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(problems) => {
                    eprintln!("{path} cannot be restored into job '{}':", spec.name);
                    for p in problems {
                        eprintln!("  - {p}");
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        SavepointsCommand::Dispose { path } => {
            let dir = Store::open(&path)?;
            let bytes = tools::dispose(&dir)?;
            println!("disposed {} ({bytes} bytes of state)", dir.location());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    sjob::allocator::manage_huge_pages();
    sjob::install_tls_provider();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Savepoints(cmd) => savepoints(cmd),
        Command::Crd { reference: true } => {
            print!("{}", sjob::operator::reference::reference_markdown());
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd { reference: false } => sjob::operator::crd::crds_yaml()
            .map(|y| {
                print!("{y}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Operator(args) => {
            sjob::allocator::huge_pages_off_for_good();
            operator_cmd::run(args)
        }
        Command::Local(args) => local_cmd::run(args),
        cmd => remote(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
