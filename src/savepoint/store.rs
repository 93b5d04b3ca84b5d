//! Snapshot storage through `object_store`: local paths, `file://` URLs, S3
//! (`s3://bucket/prefix`, configured by the `AWS_*` environment variables) and Azure Blob
//! Storage (`az://container/prefix`, configured by the `AZURE_*` ones).
//!
//! All calls block; they run the object store on a small I/O runtime of their own, so engine
//! threads (not async tasks) call them. Async callers use `spawn_blocking`.
//!
//! In an object store an object appears whole or not at all: a small one is one PUT, a large
//! one a multipart upload (on Azure: staged blocks) that is completed last (and aborted when its
//! writer is dropped), and a snapshot's `_metadata` is written with `If-None-Match: *`, so a
//! complete snapshot is never overwritten.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig, WriteMultipart,
};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The part size of multipart uploads (S3 wants at least 5 MiB but for the last part).
const PART_BYTES: usize = 8 << 20;
/// Parts of one object uploaded at once.
const PARTS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "unsupported storage location '{0}': use a local path, a file:// URL, s3://bucket/prefix or az://container/prefix"
    )]
    Unsupported(String),
    #[error("{location}: no {cloud} credentials: set {variables}")]
    NoCredentials {
        location: String,
        cloud: &'static str,
        variables: &'static str,
    },
    #[error("{location}: a complete snapshot is already there (written by another writer)")]
    AlreadyExists { location: String },
    #[error("invalid storage location '{location}': {reason}")]
    Invalid { location: String, reason: String },
    #[error("{op} {location}: {source}")]
    Io {
        op: &'static str,
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{op} {location}: {source}")]
    Local {
        op: &'static str,
        location: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            StoreError::Io {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }
}

fn io_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sjob-io")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the storage I/O runtime: {e}"))
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(|| io_runtime().block_on(f)),
        Err(_) => io_runtime().block_on(f),
    }
}

/// Which kind of store a location is in.
#[derive(Clone, Debug)]
enum Backend {
    /// The local directory, for display and for operations object stores lack.
    Local(std::path::PathBuf),
    /// A bucket (an Azure container) of an object store.
    Remote { cloud: Cloud, bucket: String },
}

/// The object stores served besides the local file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Cloud {
    S3,
    Azure,
}

impl Cloud {
    /// The URL scheme locations are written with (and its other spellings).
    fn schemes(self) -> &'static [&'static str] {
        match self {
            Cloud::S3 => &["s3", "s3a"],
            Cloud::Azure => &["az", "azure"],
        }
    }

    fn bucket_word(self) -> &'static str {
        match self {
            Cloud::S3 => "bucket",
            Cloud::Azure => "container",
        }
    }
}

/// Throttling (503 SlowDown, 429) and dropped connections are retried 10 times, 0.5 to 2 s
/// apart (jittered: 5 to 20 s in all): a throttled burst is ridden out, a server that is gone
/// fails the snapshot in bounded time.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(20),
    }
}

/// The client of a bucket: one per process (clients pool connections and cache
/// credentials), configured from the environment.
fn client(cloud: Cloud, bucket: &str, location: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    type Clients = Mutex<HashMap<(Cloud, String), Arc<dyn ObjectStore>>>;
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = clients.get(&(cloud, bucket.to_owned())) {
        return Ok(c.clone());
    }
    crate::install_tls_provider();
    let client = match cloud {
        Cloud::S3 => s3_client(bucket, location)?,
        Cloud::Azure => azure_client(bucket, location)?,
    };
    clients.insert((cloud, bucket.to_owned()), client.clone());
    Ok(client)
}

fn env_set(k: &str) -> bool {
    std::env::var_os(k).is_some_and(|v| !v.is_empty())
}

fn build_err(location: &str, e: object_store::Error) -> StoreError {
    StoreError::Invalid {
        location: location.to_owned(),
        reason: e.to_string(),
    }
}

/// A directory-like location in an object store.
#[derive(Clone)]
pub struct Store {
    os: Arc<dyn ObjectStore>,
    base: Path,
    backend: Backend,
}

fn s3_client(bucket: &str, location: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    // Without any of these object_store falls back to the EC2 instance metadata service:
    // slow to fail anywhere else, so refuse with the variables to set instead.
    if !(env_set("AWS_ACCESS_KEY_ID") && env_set("AWS_SECRET_ACCESS_KEY")
        || env_set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || env_set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        || env_set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"))
    {
        return Err(StoreError::NoCredentials {
            location: location.to_owned(),
            cloud: "S3",
            variables: "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, or AWS_CONTAINER_CREDENTIALS_FULL_URI)",
        });
    }
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(false)
        .with_retry(retry_config());
    if std::env::var_os("AWS_UNSIGNED_PAYLOAD").is_none() {
        // Bodies are not hashed for the signature (a second pass over every byte, on both
        // sides): state files and `_metadata` carry their own CRC32C, checked on restore, and
        // TLS guards them on the way. AWS_UNSIGNED_PAYLOAD=false signs them too.
        builder = builder.with_unsigned_payload(true);
    }
    let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok());
    if endpoint.is_some_and(|e| e.starts_with("http://")) {
        // A custom endpoint named with http:// means plain HTTP (a server in the cluster).
        builder = builder.with_allow_http(true);
    }
    Ok(Arc::new(
        builder.build().map_err(|e| build_err(location, e))?,
    ))
}

fn azure_client(container: &str, location: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    // Without any of these object_store falls back to the Azure instance metadata service
    // (managed identity): slow to fail anywhere else. AZURE_MSI_ENDPOINT opts into it.
    let emulator = std::env::var("AZURE_STORAGE_USE_EMULATOR").is_ok_and(|v| v == "true");
    let key = ["AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY"]
        .iter()
        .any(|k| env_set(k));
    let sas = [
        "AZURE_STORAGE_SAS_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_STORAGE_TOKEN",
    ]
    .iter()
    .any(|k| env_set(k));
    let identity = [
        "AZURE_CLIENT_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_MSI_ENDPOINT",
    ]
    .iter()
    .any(|k| env_set(k));
    if !(emulator || identity || (env_set("AZURE_STORAGE_ACCOUNT_NAME") && (key || sas))) {
        return Err(StoreError::NoCredentials {
            location: location.to_owned(),
            cloud: "Azure",
            variables: "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN (or AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET or AZURE_FEDERATED_TOKEN_FILE; AZURE_STORAGE_USE_EMULATOR=true for Azurite)",
        });
    }
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_container_name(container)
        .with_retry(retry_config());
    if emulator {
        // Azurite speaks plain HTTP on loopback (AZURITE_BLOB_STORAGE_URL).
        builder = builder.with_allow_http(true);
    }
    Ok(Arc::new(
        builder.build().map_err(|e| build_err(location, e))?,
    ))
}

/// `s3://bucket/a/b` (or `s3a://`), `az://container/a/b` (or `azure://`): the store, the
/// bucket and the key prefix, checked.
fn parse_remote(location: &str) -> Option<Result<(Cloud, String, Path), StoreError>> {
    let (cloud, rest) = [Cloud::S3, Cloud::Azure].into_iter().find_map(|cloud| {
        cloud.schemes().iter().find_map(|scheme| {
            location
                .strip_prefix(scheme)
                .and_then(|r| r.strip_prefix("://"))
                .map(|rest| (cloud, rest))
        })
    })?;
    let invalid = |reason: &str| {
        Some(Err(StoreError::Invalid {
            location: location.to_owned(),
            reason: reason.to_owned(),
        }))
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        let (word, scheme) = (cloud.bucket_word(), cloud.schemes()[0]);
        return invalid(&format!("no {word}: write {scheme}://{word}/prefix"));
    }
    let segments: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
    if prefix.trim_end_matches('/').is_empty() {
        return Some(Ok((cloud, bucket.to_owned(), Path::default())));
    }
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return invalid("empty, '.' or '..' segments are not allowed in a key prefix");
    }
    match Path::parse(segments.join("/")) {
        Ok(p) => Some(Ok((cloud, bucket.to_owned(), p))),
        Err(e) => invalid(&e.to_string()),
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.location())
    }
}

impl Store {
    /// Opens a location: a local path (absolute or relative to the working directory) or a
    /// `file://` URL.
    pub fn open(location: &str) -> Result<Store, StoreError> {
        if let Some(parsed) = parse_remote(location) {
            let (cloud, bucket, base) = parsed?;
            let os = client(cloud, &bucket, location)?;
            return Ok(Store {
                os,
                base,
                backend: Backend::Remote { cloud, bucket },
            });
        }
        let path_text = if let Some(rest) = location.strip_prefix("file://") {
            rest.to_owned()
        } else if let Some(rest) = location.strip_prefix("file:") {
            // Flink's spelling: file:/path
            rest.to_owned()
        } else if location.contains("://") {
            return Err(StoreError::Unsupported(location.to_owned()));
        } else {
            location.to_owned()
        };
        if path_text.is_empty() {
            return Err(StoreError::Invalid {
                location: location.to_owned(),
                reason: "the path is empty".into(),
            });
        }
        let local = std::path::absolute(&path_text).map_err(|e| StoreError::Local {
            op: "resolving",
            location: location.to_owned(),
            source: e,
        })?;
        let base = Path::from_absolute_path(&local).map_err(|e| StoreError::Invalid {
            location: location.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Store {
            os: Arc::new(LocalFileSystem::new()),
            base,
            backend: Backend::Local(local),
        })
    }

    /// The location as users write it.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Local(local) => local.display().to_string(),
            Backend::Remote { cloud, bucket } if self.base.as_ref().is_empty() => {
                format!("{}://{bucket}", cloud.schemes()[0])
            }
            Backend::Remote { cloud, bucket } => {
                format!("{}://{bucket}/{}", cloud.schemes()[0], self.base)
            }
        }
    }

    /// Whether the location is on the local file system.
    pub fn is_local(&self) -> bool {
        matches!(self.backend, Backend::Local(_))
    }

    pub fn child(&self, name: &str) -> Store {
        Store {
            os: self.os.clone(),
            base: self.path(name),
            backend: match &self.backend {
                Backend::Local(local) => Backend::Local(local.join(name)),
                remote => remote.clone(),
            },
        }
    }

    fn path(&self, rel: &str) -> Path {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.base.clone(), |p, part| p.join(part))
    }

    fn display(&self, rel: &str) -> String {
        match &self.backend {
            Backend::Local(local) => local.join(rel).display().to_string(),
            Backend::Remote { .. } => format!("{}/{rel}", self.location()),
        }
    }

    /// Writes an object that must not exist yet (a snapshot's commit marker): on S3 with
    /// `If-None-Match: *`, so two writers never both complete the same snapshot.
    pub fn put_new(&self, rel: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.path(rel);
        let payload = PutPayload::from(bytes.clone());
        match block_on(self.os.put_opts(&path, payload, PutMode::Create.into())) {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(StoreError::AlreadyExists {
                location: self.display(rel),
            }),
            Err(object_store::Error::NotImplemented { .. }) => {
                // AWS_CONDITIONAL_PUT=disabled: a server without conditional writes.
                tracing::warn!(location = %self.display(rel), "conditional writes are disabled: writing without If-None-Match");
                self.put(rel, bytes)
            }
            Err(source) => Err(StoreError::Io {
                op: "writing",
                location: self.display(rel),
                source,
            }),
        }
    }

    /// Whether anything is stored at or below this location.
    pub fn exists(&self) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Local(local) => Ok(local.exists()),
            Backend::Remote { .. } => {
                let first = block_on(async { self.os.list(Some(&self.base)).next().await });
                match first {
                    None => Ok(false),
                    Some(Ok(_)) => Ok(true),
                    Some(Err(source)) => Err(StoreError::Io {
                        op: "listing",
                        location: self.location(),
                        source,
                    }),
                }
            }
        }
    }

    /// Whether this location is itself one object (a file), not a directory of them.
    pub fn is_object(&self) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Local(local) => Ok(local.is_file()),
            Backend::Remote { .. } if self.base.as_ref().is_empty() => Ok(false),
            Backend::Remote { .. } => match block_on(self.os.head(&self.base)) {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(source) => Err(StoreError::Io {
                    op: "reading",
                    location: self.location(),
                    source,
                }),
            },
        }
    }

    /// Writes an object atomically: readers see all of it or nothing.
    pub fn put(&self, rel: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.path(rel);
        block_on(self.os.put(&path, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|source| StoreError::Io {
                op: "writing",
                location: self.display(rel),
                source,
            })
    }

    pub fn get(&self, rel: &str) -> Result<Bytes, StoreError> {
        let path = self.path(rel);
        block_on(async { self.os.get(&path).await?.bytes().await }).map_err(|source| {
            StoreError::Io {
                op: "reading",
                location: self.display(rel),
                source,
            }
        })
    }

    /// Reads `range` of an object into `buf`, which keeps its memory from call to call: a
    /// restore reads a local file through one buffer a thread, in memory already touched,
    /// instead of fresh pages the kernel must zero first (in a new process, as much as the
    /// state). Other backends fetch the range and copy it in (`get_range` spares the copy).
    pub fn read_range_into(
        &self,
        rel: &str,
        range: Range<u64>,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let len = (range.end - range.start) as usize;
        let Backend::Local(local) = &self.backend else {
            let bytes = self.get_range(rel, range)?;
            buf.clear();
            buf.extend_from_slice(&bytes);
            return Ok(());
        };
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf.truncate(len);
        use std::os::unix::fs::FileExt;
        std::fs::File::open(local.join(rel))
            .and_then(|f| f.read_exact_at(buf, range.start))
            .map_err(|source| StoreError::Local {
                op: "reading",
                location: self.display(rel),
                source,
            })
    }

    pub fn get_range(&self, rel: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let path = self.path(rel);
        block_on(self.os.get_range(&path, range)).map_err(|source| StoreError::Io {
            op: "reading",
            location: self.display(rel),
            source,
        })
    }

    /// The size of an object, or `None` when it does not exist.
    pub fn size(&self, rel: &str) -> Result<Option<u64>, StoreError> {
        let path = self.path(rel);
        match block_on(self.os.head(&path)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(StoreError::Io {
                op: "reading",
                location: self.display(rel),
                source,
            }),
        }
    }

    /// Relative paths of every object below this location.
    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        if let Backend::Local(local) = &self.backend
            && !local.exists()
        {
            return Ok(Vec::new());
        }
        let prefix = self.base.clone();
        let metas: Vec<object_store::ObjectMeta> =
            block_on(self.os.list(Some(&prefix)).try_collect()).map_err(|source| {
                StoreError::Io {
                    op: "listing",
                    location: self.location(),
                    source,
                }
            })?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                m.location.prefix_match(&prefix).map(|parts| {
                    parts
                        .map(|p| p.as_ref().to_owned())
                        .collect::<Vec<_>>()
                        .join("/")
                })
            })
            .collect())
    }

    /// Names of the immediate sub-directories (common prefixes).
    pub fn list_dirs(&self) -> Result<Vec<String>, StoreError> {
        if let Backend::Local(local) = &self.backend
            && !local.exists()
        {
            return Ok(Vec::new());
        }
        let prefix = self.base.clone();
        let listing = block_on(self.os.list_with_delimiter(Some(&prefix))).map_err(|source| {
            StoreError::Io {
                op: "listing",
                location: self.location(),
                source,
            }
        })?;
        Ok(listing
            .common_prefixes
            .into_iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// Deletes everything below this location, and the directory itself.
    pub fn delete_all(&self) -> Result<(), StoreError> {
        let local = match &self.backend {
            Backend::Local(local) => local,
            Backend::Remote { .. } => {
                if self.base.as_ref().is_empty() {
                    return Err(StoreError::Invalid {
                        location: self.location(),
                        reason: "refusing to delete a whole bucket (container)".into(),
                    });
                }
                // Bulk deletes (DeleteObjects, 1,000 keys a request) of everything listed.
                let os = self.os.clone();
                let listed = os.list(Some(&self.base)).map_ok(|m| m.location).boxed();
                let deleted: Result<Vec<Path>, _> = block_on(
                    os.delete_stream(listed)
                        .or_else(|e| async move {
                            match e {
                                object_store::Error::NotFound { path, .. } => Ok(Path::from(path)),
                                e => Err(e),
                            }
                        })
                        .try_collect(),
                );
                return deleted.map(|_| ()).map_err(|source| StoreError::Io {
                    op: "deleting",
                    location: self.location(),
                    source,
                });
            }
        };
        match std::fs::remove_dir_all(local) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Local {
                op: "deleting",
                location: self.location(),
                source,
            }),
        }
    }

    /// Makes sure the location can be written to, creating it if needed. On S3 a small
    /// object is written and deleted, so a missing bucket or a denied write shows before a
    /// snapshot starts.
    pub fn ensure_writable(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(local) => {
                std::fs::create_dir_all(local).map_err(|source| StoreError::Local {
                    op: "creating",
                    location: self.location(),
                    source,
                })
            }
            Backend::Remote { .. } => {
                let probe = ".sjob-write-check";
                self.put(probe, Bytes::new())?;
                block_on(self.os.delete(&self.path(probe))).map_err(|source| StoreError::Io {
                    op: "deleting",
                    location: self.display(probe),
                    source,
                })
            }
        }
    }

    /// A streaming writer whose object appears only when `finish` succeeds.
    ///
    /// On the local file system it writes a temporary file beside the target and renames it
    /// (what `object_store`'s local multipart upload does too, without its copies through the
    /// async runtime, which halve the write rate of large state files).
    pub fn writer(&self, rel: &str) -> StoreWriter {
        let local = match &self.backend {
            Backend::Local(local) => local,
            Backend::Remote { .. } => {
                return StoreWriter {
                    sink: Some(Sink::Remote {
                        os: self.os.clone(),
                        path: self.path(rel),
                        buf: Vec::new(),
                        upload: None,
                    }),
                    location: self.display(rel),
                    crc: 0,
                    written: 0,
                };
            }
        };
        let target = local.join(rel);
        let temp = target.with_file_name(format!(
            ".{}.{}.tmp",
            target
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            uuid::Uuid::new_v4().simple()
        ));
        let file = target
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|_| std::fs::File::create(&temp))
            .map(|f| std::io::BufWriter::with_capacity(4 << 20, f));
        StoreWriter {
            sink: Some(Sink::Local {
                file: Some(file),
                temp,
                target,
                writeback_from: 0,
            }),
            location: self.display(rel),
            crc: 0,
            written: 0,
        }
    }
}

/// How many bytes of a local file are written before the disk is asked to take them.
const WRITEBACK_BYTES: u64 = 8 << 20;

/// A local file takes a piece at least this large straight from the caller's memory (a state
/// file's key group block), not copied through its 4 MB buffer first; smaller pieces gather
/// there.
const DIRECT_WRITE_BYTES: usize = 256 << 10;

/// Asks the kernel to start writing `from..to` of the file to the disk without waiting, so the
/// `fdatasync` that completes the file waits for its last few megabytes only instead of all of
/// it: the disk works while the rest is encoded. Only a hint: a failure shows at the sync.
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on an open descriptor, with no memory passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _from: u64, _to: u64) {}

/// Where a writer's bytes go.
enum Sink {
    /// A temporary file renamed into place.
    Local {
        file: Option<std::io::Result<std::io::BufWriter<std::fs::File>>>,
        temp: std::path::PathBuf,
        target: std::path::PathBuf,
        /// Where the bytes not yet handed to the disk start (see `start_writeback`).
        writeback_from: u64,
    },
    /// Buffered up to a part; one PUT if it stays that small, else a multipart upload
    /// started with the first full part.
    Remote {
        os: Arc<dyn ObjectStore>,
        path: Path,
        buf: Vec<u8>,
        upload: Option<WriteMultipart>,
    },
}

/// Writes one object in pieces, keeping its size and CRC-32C.
pub struct StoreWriter {
    /// `None` once finished.
    sink: Option<Sink>,
    location: String,
    crc: u32,
    written: u64,
}

impl StoreWriter {
    fn err(&self, source: std::io::Error) -> StoreError {
        StoreError::Local {
            op: "writing",
            location: self.location.clone(),
            source,
        }
    }

    fn remote_err(&self, source: object_store::Error) -> StoreError {
        StoreError::Io {
            op: "writing",
            location: self.location.clone(),
            source,
        }
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.write_checksummed(data, crc32c::crc32c(data))
    }

    /// Writes `data` whose CRC-32C the caller has computed already (`crc`), so the file's
    /// checksum is combined from it rather than computed over the bytes a second time.
    pub fn write_checksummed(&mut self, data: &[u8], crc: u32) -> Result<(), StoreError> {
        use std::io::Write;
        let location = self.location.clone();
        match &mut self.sink {
            None => return Err(self.err(std::io::Error::other("writer already finished"))),
            Some(Sink::Local {
                file,
                writeback_from,
                ..
            }) => {
                let res = match file.as_mut() {
                    Some(Ok(w)) => if data.len() >= DIRECT_WRITE_BYTES {
                        // What is buffered goes first, then the piece as it is.
                        w.flush().and_then(|()| w.get_mut().write_all(data))
                    } else {
                        w.write_all(data)
                    }
                    .map(|()| {
                        let in_file = self.written + data.len() as u64 - w.buffer().len() as u64;
                        if in_file - *writeback_from >= WRITEBACK_BYTES {
                            start_writeback(w.get_ref(), *writeback_from, in_file);
                            *writeback_from = in_file;
                        }
                    }),
                    Some(Err(e)) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    None => Err(std::io::Error::other("writer already finished")),
                };
                res.map_err(|source| StoreError::Local {
                    op: "writing",
                    location,
                    source,
                })?;
            }
            Some(Sink::Remote {
                os,
                path,
                buf,
                upload,
            }) => {
                let remote_err = |source| StoreError::Io {
                    op: "writing",
                    location: location.clone(),
                    source,
                };
                buf.extend_from_slice(data);
                if buf.len() >= PART_BYTES {
                    if upload.is_none() {
                        let started = block_on(os.put_multipart(path));
                        *upload = Some(WriteMultipart::new_with_chunk_size(
                            started.map_err(remote_err)?,
                            PART_BYTES,
                        ));
                    }
                    if let Some(w) = upload.as_mut() {
                        // Back-pressure: at most PARTS_IN_FLIGHT parts uploading at once.
                        let waited = block_on(w.wait_for_capacity(PARTS_IN_FLIGHT));
                        let full = Bytes::from(std::mem::take(buf));
                        let _rt = io_runtime().enter();
                        w.put(full);
                        waited.map_err(remote_err)?;
                    }
                }
            }
        }
        self.crc = crc32c::crc32c_combine(self.crc, crc, data.len());
        self.written += data.len() as u64;
        Ok(())
    }

    pub fn position(&self) -> u64 {
        self.written
    }

    /// Where the object goes, for messages.
    pub fn location(&self) -> String {
        self.location.clone()
    }

    /// Completes the object (locally: data synced, then renamed into place; on S3: one PUT,
    /// or the multipart upload completed); returns its size and CRC-32C.
    pub fn finish(mut self) -> Result<(u64, u32), StoreError> {
        let Some(sink) = self.sink.take() else {
            return Err(self.err(std::io::Error::other("writer already finished")));
        };
        match sink {
            Sink::Local {
                mut file,
                temp,
                target,
                ..
            } => {
                let result = match file.take() {
                    Some(Ok(w)) => w
                        .into_inner()
                        .map_err(|e| e.into_error())
                        .and_then(|f| f.sync_data())
                        .and_then(|_| std::fs::rename(&temp, &target)),
                    Some(Err(e)) => Err(e),
                    None => Err(std::io::Error::other("writer already finished")),
                };
                if let Err(e) = result {
                    let _ = std::fs::remove_file(&temp);
                    return Err(self.err(e));
                }
            }
            Sink::Remote {
                os,
                path,
                buf,
                upload,
            } => {
                let done = match upload {
                    None => block_on(os.put(&path, PutPayload::from(buf))).map(|_| ()),
                    Some(mut w) => {
                        {
                            let _rt = io_runtime().enter();
                            w.put(Bytes::from(buf));
                        }
                        // Aborts the upload itself when a part failed.
                        block_on(w.finish()).map(|_| ())
                    }
                };
                done.map_err(|e| self.remote_err(e))?;
            }
        }
        Ok((self.written, self.crc))
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        match &mut self.sink {
            None => {}
            // Never finished (finish takes the sink): the temporary file goes.
            Some(Sink::Local { temp, .. }) => {
                let _ = std::fs::remove_file(temp);
            }
            Some(Sink::Remote { upload, .. }) => {
                // Never completed: abort, so no parts are left behind.
                if let Some(w) = upload.take()
                    && let Err(e) = block_on(w.abort())
                {
                    tracing::warn!(location = %self.location, error = %e, "cannot abort the multipart upload");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_range_list_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().join("sp").display())).unwrap();
        store
            .put("a/b.bin", Bytes::from_static(b"hello world"))
            .unwrap();
        assert_eq!(&store.get("a/b.bin").unwrap()[..], b"hello world");
        assert_eq!(&store.get_range("a/b.bin", 6..11).unwrap()[..], b"world");
        assert_eq!(store.size("a/b.bin").unwrap(), Some(11));
        assert_eq!(store.size("nope").unwrap(), None);
        let mut w = store.writer("c.bin");
        w.write(b"abc").unwrap();
        w.write(b"def").unwrap();
        let (size, crc) = w.finish().unwrap();
        assert_eq!((size, crc), (6, crc32c::crc32c(b"abcdef")));
        // Small pieces gather in the buffer, large ones go straight to the file, in order.
        let large: Vec<u8> = (0..DIRECT_WRITE_BYTES + 7).map(|i| i as u8).collect();
        let mut w = store.writer("d.bin");
        w.write(b"head").unwrap();
        w.write(&large).unwrap();
        w.write_checksummed(b"tail", crc32c::crc32c(b"tail"))
            .unwrap();
        let expected = [&b"head"[..], &large, b"tail"].concat();
        let (size, crc) = w.finish().unwrap();
        assert_eq!(
            (size, crc),
            (expected.len() as u64, crc32c::crc32c(&expected))
        );
        assert!(store.get("d.bin").unwrap()[..] == expected[..]);
        std::fs::remove_file(dir.path().join("sp").join("d.bin")).unwrap();
        let mut names = store.list().unwrap();
        names.sort();
        assert_eq!(names, vec!["a/b.bin".to_owned(), "c.bin".to_owned()]);
        assert_eq!(store.list_dirs().unwrap(), vec!["a".to_owned()]);
        store.delete_all().unwrap();
        assert!(!dir.path().join("sp").exists());
        let e = Store::open("gs://bucket/x").unwrap_err().to_string();
        assert!(e.contains("gs://bucket/x") && e.contains("s3://"), "{e}");
        let e = Store::open("s3:///x").unwrap_err().to_string();
        assert!(e.contains("no bucket"), "{e}");
        let e = Store::open("s3://b/a//c").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }
}
