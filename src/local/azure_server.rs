//! A real Azure Blob Storage server for the tests: Azurite, Microsoft's emulator (installed
//! from npm by `e2e/azure/install.sh`, whose output `SJOB_AZURITE_BLOB` names), on a free
//! loopback port, with its files under a directory of the test's. It checks Shared Key
//! signatures, stages and commits blocks, and honours conditional writes.

use super::server_process::ServerProcess;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The emulator's well-known account and key (public; Azurite accepts nothing else).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct AzureServer {
    endpoint: String,
    port: u16,
    _process: ServerProcess,
}

impl AzureServer {
    /// Starts Azurite's Blob service with `containers` created.
    pub fn start(dir: &Path, containers: &[&str]) -> Result<AzureServer, String> {
        let main = std::env::var("SJOB_AZURITE_BLOB").map_err(|_| {
            "SJOB_AZURITE_BLOB is not set: install Azurite with \
             `export SJOB_AZURITE_BLOB=$(bash e2e/azure/install.sh)` (what .ci/run does)"
                .to_owned()
        })?;
        let data = dir.join("azurite");
        std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let process = ServerProcess::start("azurite", dir, Duration::from_secs(30), |port| {
            let mut c = Command::new("node");
            c.arg(&main)
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .arg("--location")
                .arg(&data)
                .args(["--silent", "--skipApiVersionCheck", "--disableTelemetry"]);
            c
        })
        .map_err(|e| format!("{e} (Azurite runs on node: apt-get install -y nodejs)"))?;
        let port = process.port;
        let server = AzureServer {
            endpoint: format!("http://127.0.0.1:{port}/{ACCOUNT}"),
            port,
            _process: process,
        };
        for c in containers {
            server.create_container(c)?;
        }
        Ok(server)
    }

    /// The Blob service's URL (path-style: the account is the first segment).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The environment that points `az://` locations at this server, with `key` as the
    /// account key (a wrong one lets a test see the error).
    pub fn env(&self, key: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            (
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT.into()),
            ("AZURE_STORAGE_ACCOUNT_KEY", key.into()),
        ]
    }

    /// Creates a container (Create Container, signed with the account's Shared Key).
    fn create_container(&self, name: &str) -> Result<(), String> {
        let (status, body) =
            self.signed("PUT", &format!("/{name}"), &[("restype", "container")])?;
        match status {
            201 | 409 => Ok(()),
            _ => Err(format!("creating container {name}: HTTP {status}: {body}")),
        }
    }

    /// Lists the blocks staged for a blob and not committed (Get Block List), as the count
    /// of `<Block>` entries: what an aborted or unfinished upload leaves behind.
    pub fn uncommitted_blocks(&self, container: &str, blob: &str) -> Result<usize, String> {
        let (status, body) = self.signed(
            "GET",
            &format!("/{container}/{blob}"),
            &[("blocklisttype", "uncommitted"), ("comp", "blocklist")],
        )?;
        match status {
            200 => Ok(body
                .split("<UncommittedBlocks>")
                .nth(1)
                .map_or(0, |s| s.matches("<Block>").count())),
            404 => Ok(0),
            _ => Err(format!(
                "Get Block List {container}/{blob}: HTTP {status}: {body}"
            )),
        }
    }

    /// One request without a body, signed with Shared Key; the status and the body.
    fn signed(
        &self,
        verb: &str,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<(u16, String), String> {
        use base64::Engine as _;
        let date = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&jiff::Timestamp::now())
            .map_err(|e| e.to_string())?;
        let version = "2021-08-06";
        // Query parameters sorted by name, as the canonicalized resource wants them.
        let mut sorted = query.to_vec();
        sorted.sort();
        let canonical_query: String = sorted.iter().map(|(k, v)| format!("\n{k}:{v}")).collect();
        let to_sign = format!(
            "{verb}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}{path}{canonical_query}"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(ACCOUNT_KEY)
            .map_err(|e| e.to_string())?;
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            to_sign.as_bytes(),
        );
        let signature = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
        let query_string: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let request = format!(
            "{verb} /{ACCOUNT}{path}?{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{signature}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            query_string.join("&"),
            self.port
        );
        let mut conn =
            TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| format!("azurite: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        conn.write_all(request.as_bytes())
            .map_err(|e| format!("azurite: {e}"))?;
        let mut response = String::new();
        conn.read_to_string(&mut response)
            .map_err(|e| format!("azurite: {e}"))?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("azurite: not an HTTP answer: {response}"))?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }
}
