//! A real S3 server for the end-to-end tests: versitygw (built by `bash e2e/s3/install.sh`,
//! path in `SJOB_VERSITYGW_BIN`) serving a local directory, each bucket a sub-directory. It
//! checks SigV4 signatures and serves multipart uploads and conditional writes as S3 does.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// The access key of the test server.
pub const ACCESS_KEY: &str = "sjobtestkey";
/// Its secret key.
pub const SECRET_KEY: &str = "sjob-test-secret-0123456789";

pub struct S3Server {
    endpoint: String,
    root: PathBuf,
    child: Child,
}

impl S3Server {
    /// Starts the server on a free loopback port with these buckets, serving `dir`.
    pub fn start(dir: &Path, buckets: &[&str]) -> Result<S3Server, String> {
        let bin = std::env::var("SJOB_VERSITYGW_BIN").map_err(|_| {
            "SJOB_VERSITYGW_BIN is not set: build the S3 server with \
             `export SJOB_VERSITYGW_BIN=$(bash e2e/s3/install.sh)` (what .ci/run does)"
                .to_owned()
        })?;
        let root = dir.join("s3");
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).map_err(|e| format!("{b}: {e}"))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let log_path = dir.join("versitygw.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let child = Command::new(&bin)
            .args(["--access", ACCESS_KEY, "--secret", SECRET_KEY])
            .args(["--port", &format!("127.0.0.1:{port}"), "--quiet", "posix"])
            .arg(&root)
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {bin}: {e}"))?;
        kill_at_exit(&child);
        let mut server = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "versitygw exited ({status}); see {}",
                    log_path.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("versitygw did not listen on {port} within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The directory that holds a bucket's objects.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    /// The `AWS_*` variables a client of this server needs (with this secret key: tests
    /// pass a wrong one too).
    pub fn env(&self, secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", secret.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        reaped(&self.child);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Servers to kill when this process exits.
static AT_EXIT: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Kills `child` when this process exits, if nothing did before: a test binary keeps its
/// servers in statics, which are never dropped.
pub(crate) fn kill_at_exit(child: &Child) {
    static HOOK: Once = Once::new();
    extern "C" fn kill_all() {
        for &pid in AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    }
    // SAFETY: registers a plain function with no captured state.
    HOOK.call_once(|| unsafe {
        libc::atexit(kill_all);
    });
}

/// Takes `child` off the exit list before it is reaped (its pid may be reused after).
pub(crate) fn reaped(child: &Child) {
    let pid = i32::try_from(child.id()).unwrap_or(-1);
    AT_EXIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}
