//! Snapshot storage through `object_store`: local paths and `file://` URLs.
//!
//! All calls block; they run the object store on a small I/O runtime of their own, so engine
//! threads (not async tasks) call them. Async callers use `spawn_blocking`.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::ops::Range;
use std::sync::{Arc, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported storage location '{0}': use a local path or a file:// URL")]
    Unsupported(String),
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

/// A directory-like location in an object store.
#[derive(Clone)]
pub struct Store {
    os: Arc<dyn ObjectStore>,
    base: Path,
    /// The local directory, for display and for operations object stores lack.
    local: std::path::PathBuf,
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
            local,
        })
    }

    /// The location as users write it.
    pub fn location(&self) -> String {
        self.local.display().to_string()
    }

    pub fn child(&self, name: &str) -> Store {
        Store {
            os: self.os.clone(),
            base: self.path(name),
            local: self.local.join(name),
        }
    }

    fn path(&self, rel: &str) -> Path {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.base.clone(), |p, part| p.join(part))
    }

    fn display(&self, rel: &str) -> String {
        self.local.join(rel).display().to_string()
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
        if !self.local.exists() {
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
        if !self.local.exists() {
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
        match std::fs::remove_dir_all(&self.local) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Local {
                op: "deleting",
                location: self.location(),
                source,
            }),
        }
    }

    /// Makes sure the location can be written to, creating it if needed.
    pub fn ensure_writable(&self) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.local).map_err(|source| StoreError::Local {
            op: "creating",
            location: self.location(),
            source,
        })
    }

    /// A streaming writer whose object appears only when `finish` succeeds.
    ///
    /// On the local file system it writes a temporary file beside the target and renames it
    /// (what `object_store`'s local multipart upload does too, without its copies through the
    /// async runtime, which halve the write rate of large state files).
    pub fn writer(&self, rel: &str) -> StoreWriter {
        let target = self.local.join(rel);
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
            inner: Some(file),
            temp,
            target,
            location: self.display(rel),
            crc: 0,
            written: 0,
        }
    }
}

/// Writes one object in pieces, keeping its size and CRC-32C.
pub struct StoreWriter {
    inner: Option<std::io::Result<std::io::BufWriter<std::fs::File>>>,
    temp: std::path::PathBuf,
    target: std::path::PathBuf,
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

    pub fn write(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        use std::io::Write;
        let res = match self.inner.as_mut() {
            Some(Ok(w)) => w.write_all(buf),
            Some(Err(e)) => Err(std::io::Error::new(e.kind(), e.to_string())),
            None => Err(std::io::Error::other("writer already finished")),
        };
        res.map_err(|e| self.err(e))?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        self.written += buf.len() as u64;
        Ok(())
    }

    pub fn position(&self) -> u64 {
        self.written
    }

    /// Completes the object (data synced, then renamed into place); returns its size and
    /// CRC-32C.
    pub fn finish(mut self) -> Result<(u64, u32), StoreError> {
        let result = match self.inner.take() {
            Some(Ok(w)) => w
                .into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_data())
                .and_then(|_| std::fs::rename(&self.temp, &self.target)),
            Some(Err(e)) => Err(e),
            None => Err(std::io::Error::other("writer already finished")),
        };
        if let Err(e) = result {
            let _ = std::fs::remove_file(&self.temp);
            return Err(self.err(e));
        }
        Ok((self.written, self.crc))
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if self.inner.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
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
        let mut names = store.list().unwrap();
        names.sort();
        assert_eq!(names, vec!["a/b.bin".to_owned(), "c.bin".to_owned()]);
        assert_eq!(store.list_dirs().unwrap(), vec!["a".to_owned()]);
        store.delete_all().unwrap();
        assert!(!dir.path().join("sp").exists());
        assert!(Store::open("s3://bucket/x").is_err());
    }
}
