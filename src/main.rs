//! The `sjob` command line: parses arguments and hands each command to its module.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use sjob::engine::{self, JobOptions, JobState, spec::JobSpec};
use sjob::savepoint::{metadata::SnapshotMetadata, store::Store, tools};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "sjob",
    version,
    about = "Stateful stream jobs that survive upgrades: engine, savepoint tools and Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job file in this process (what an engine pod runs), optionally from a savepoint.
    Run(RunArgs),
    /// Offline savepoint tools.
    #[command(subcommand)]
    Savepoints(SavepointsCommand),
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SJOB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn read_job(path: &PathBuf) -> Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    JobSpec::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let spec = read_job(&args.job)?;
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
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the detached job")?;
        println!(
            "Job has been submitted with JobID {job_id} (process {}, log {})",
            child.id(),
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
            ..Default::default()
        },
    )?;
    eprintln!("Job has been submitted with JobID {}", job.id());
    let job = std::sync::Arc::new(job);
    let for_signal = job.clone();
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            });
            eprintln!("signal received: cancelling job {}", for_signal.id());
            for_signal.cancel();
        }
    });
    let state = job.wait();
    eprintln!("Job {} {}", job.id(), state.as_flink());
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
            match engine::check_restore(&spec, &path, parallelism, allow_non_restored_state) {
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
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Savepoints(cmd) => savepoints(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
