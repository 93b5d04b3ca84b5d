//! A real S3 server for the end-to-end tests: versitygw (built by `bash e2e/s3/install.sh`,
//! path in `SJOB_VERSITYGW_BIN`) serving a local directory, each bucket a sub-directory. It
//! checks SigV4 signatures and serves multipart uploads and conditional writes as S3 does.

use super::server_process::ServerProcess;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The access key of the test server.
pub const ACCESS_KEY: &str = "sjobtestkey";
/// Its secret key.
pub const SECRET_KEY: &str = "sjob-test-secret-0123456789";

pub struct S3Server {
    endpoint: String,
    root: PathBuf,
    _process: ServerProcess,
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
        let process = ServerProcess::start("versitygw", dir, Duration::from_secs(20), |port| {
            let mut c = Command::new(&bin);
            c.args(["--access", ACCESS_KEY, "--secret", SECRET_KEY])
                .args(["--port", &format!("127.0.0.1:{port}"), "--quiet", "posix"])
                .arg(&root);
            c
        })?;
        Ok(S3Server {
            endpoint: format!("http://127.0.0.1:{}", process.port),
            root,
            _process: process,
        })
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
