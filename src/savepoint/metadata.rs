//! `_metadata`: the file that makes a directory a snapshot.
//!
//! It is JSON followed by a trailer line `#crc32c:<8 hex digits>` over the JSON bytes, and is
//! written last and atomically, after every state file is complete. A directory without it is
//! not a snapshot. State files are referenced by paths relative to the snapshot directory, so
//! a snapshot can be moved or copied as a whole.

use super::keygroups::{Distribution, KeyGroupRange};
use super::schema::StateSchema;
use super::store::{Store, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The format this build writes. Version 2 added compressed blocks; version 1 files (no
/// compression) read as before.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
pub const METADATA_FILE: &str = "_metadata";
/// State files live below this directory of a snapshot.
pub const OPERATORS_DIR: &str = "operators";
/// Every state file starts with these bytes and a little-endian u16 format version.
pub const STATE_FILE_MAGIC: &[u8; 4] = b"SJST";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    Savepoint,
    Checkpoint,
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotKind::Savepoint => "savepoint",
            SnapshotKind::Checkpoint => "checkpoint",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMetadata {
    pub format_version: u32,
    pub kind: SnapshotKind,
    pub job_id: String,
    pub job_name: String,
    pub snapshot_id: u64,
    pub timestamp_ms: u64,
    /// The snapshot the job that wrote this one had restored from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// Taken while the job's sinks were in shadow mode (the new version of a blue-green
    /// switch before the cut-over): a restart from it stays in shadow mode.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// Every operator of the job graph, stateful or not, in pipeline order.
    pub operators: Vec<OperatorMetadata>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyedStateKind {
    Value,
    List,
    Map,
}

impl std::fmt::Display for KeyedStateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyedStateKind::Value => "value",
            KeyedStateKind::List => "list",
            KeyedStateKind::Map => "map",
        })
    }
}

/// A keyed state an operator declares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyedStateMeta {
    pub name: String,
    pub kind: KeyedStateKind,
    pub schema: StateSchema,
}

/// An operator list state an operator declares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperatorStateMeta {
    pub name: String,
    pub distribution: Distribution,
    pub schema: StateSchema,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorMetadata {
    pub uid: String,
    pub name: String,
    pub kind: String,
    pub parallelism: u32,
    pub max_parallelism: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyed_states: Vec<KeyedStateMeta>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operator_states: Vec<OperatorStateMeta>,
    /// One entry per subtask for stateful operators; empty for stateless ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subtasks: Vec<SubtaskState>,
    /// For sources: where each split will resume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_positions: Vec<SplitPosition>,
}

impl OperatorMetadata {
    pub fn is_stateful(&self) -> bool {
        !self.keyed_states.is_empty() || !self.operator_states.is_empty()
    }

    pub fn state_bytes(&self) -> u64 {
        self.subtasks.iter().map(|s| s.size).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPosition {
    pub split: String,
    pub position: i64,
}

/// How the blocks of a state file are compressed. Each block is stored compressed only when
/// that saves at least an eighth of its bytes; one that does not is stored as it is.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Blocks stored as they are encoded.
    None,
    /// LZ4 block format, per block.
    #[default]
    Lz4,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
        })
    }
}

/// A byte range of a state file with its checksum (over the stored bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Block {
    pub offset: u64,
    pub len: u64,
    pub crc32c: u32,
    /// Set when the block is stored compressed (by the file's `compression`): its length
    /// once decompressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_len: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubtaskState {
    pub index: u32,
    /// Relative to the snapshot directory: `operators/<uid>-<subtask>-<uuid>`.
    pub file: String,
    pub size: u64,
    pub crc32c: u32,
    /// The key groups this subtask owned and, for each, where its entries are in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_groups: Option<KeyGroupsIndex>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_state: Option<Block>,
    /// Keyed entries in the file (all states), for inspection.
    #[serde(default)]
    pub keyed_entries: u64,
    /// How blocks with a `rawLen` are compressed; absent when none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
}

impl SubtaskState {
    /// The file's size with every compressed block counted at its decompressed length.
    pub fn raw_bytes(&self) -> u64 {
        let blocks = self
            .key_groups
            .iter()
            .flat_map(|k| k.blocks.iter())
            .chain(self.operator_state.iter());
        blocks.fold(self.size, |n, b| match b.raw_len {
            Some(raw) => n.saturating_sub(b.len).saturating_add(raw),
            None => n,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyGroupsIndex {
    pub range: KeyGroupRange,
    /// `blocks[i]` holds key group `range.start + i`.
    pub blocks: Vec<Block>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("savepoint path {0} does not exist")]
    NotFound(String),
    #[error(
        "{0} is not a complete savepoint: it has no _metadata (the snapshot was never completed, or this is not a snapshot directory)"
    )]
    Incomplete(String),
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error(
        "{path} has format version {found}; this sjob reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
    )]
    Version { path: String, found: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SnapshotMetadata {
    pub fn operator(&self, uid: &str) -> Option<&OperatorMetadata> {
        self.operators.iter().find(|o| o.uid == uid)
    }

    pub fn total_bytes(&self) -> u64 {
        self.operators.iter().map(|o| o.state_bytes()).sum()
    }

    /// The state files' size before compression.
    pub fn raw_state_bytes(&self) -> u64 {
        self.operators
            .iter()
            .flat_map(|o| o.subtasks.iter())
            .map(SubtaskState::raw_bytes)
            .sum()
    }

    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut body = serde_json::to_vec_pretty(self)?;
        body.push(b'\n');
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(format!("#crc32c:{crc:08x}\n").as_bytes());
        Ok(body)
    }

    pub fn decode(bytes: &[u8], path: &str) -> Result<SnapshotMetadata, MetadataError> {
        let corrupt = |reason: String| MetadataError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| corrupt("not UTF-8 text".into()))?;
        let trimmed = text.strip_suffix('\n').unwrap_or(text);
        let (body, trailer) = match trimmed.rfind('\n') {
            Some(i) => (&text[..=i], &trimmed[i + 1..]),
            None => {
                return Err(corrupt(
                    "the checksum trailer is missing (truncated?)".into(),
                ));
            }
        };
        let want = trailer
            .strip_prefix("#crc32c:")
            .and_then(|h| u32::from_str_radix(h.trim(), 16).ok())
            .ok_or_else(|| corrupt("the checksum trailer is missing (truncated?)".into()))?;
        let got = crc32c::crc32c(body.as_bytes());
        if got != want {
            return Err(corrupt(format!(
                "checksum mismatch (recorded {want:08x}, computed {got:08x})"
            )));
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct VersionOnly {
            format_version: u32,
        }
        let v: VersionOnly =
            serde_json::from_str(body).map_err(|e| corrupt(format!("invalid JSON: {e}")))?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&v.format_version) {
            return Err(MetadataError::Version {
                path: path.to_owned(),
                found: v.format_version,
            });
        }
        serde_json::from_str(body).map_err(|e| corrupt(format!("invalid contents: {e}")))
    }

    /// Writes `_metadata` into a snapshot directory: the commit point of the snapshot.
    pub fn write(&self, dir: &Store) -> Result<(), MetadataError> {
        let bytes = self.encode().map_err(|e| MetadataError::Corrupt {
            path: dir.location(),
            reason: format!("cannot encode metadata: {e}"),
        })?;
        // The commit marker: written last, once (never over a complete snapshot).
        dir.put_new(METADATA_FILE, Bytes::from(bytes))?;
        Ok(())
    }

    /// Reads the `_metadata` of a snapshot directory, telling a missing path from an
    /// incomplete snapshot.
    pub fn read(dir: &Store) -> Result<SnapshotMetadata, MetadataError> {
        let path = format!("{}/{METADATA_FILE}", dir.location());
        match dir.get(METADATA_FILE) {
            Ok(bytes) => SnapshotMetadata::decode(&bytes, &path),
            Err(e) if e.is_not_found() => {
                if dir.exists()? {
                    Err(MetadataError::Incomplete(dir.location()))
                } else {
                    Err(MetadataError::NotFound(dir.location()))
                }
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotMetadata {
        SnapshotMetadata {
            format_version: FORMAT_VERSION,
            kind: SnapshotKind::Savepoint,
            job_id: "a".repeat(32),
            job_name: "demo".into(),
            snapshot_id: 4,
            timestamp_ms: 1,
            restored_from: None,
            shadow: false,
            operators: vec![],
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let m = sample();
        let bytes = m.encode().unwrap();
        assert_eq!(SnapshotMetadata::decode(&bytes, "x").unwrap(), m);
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        let err = SnapshotMetadata::decode(&bad, "x/_metadata")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x/_metadata is corrupt: checksum mismatch"),
            "{err}"
        );
        let err = SnapshotMetadata::decode(&bytes[..bytes.len() / 2], "x").unwrap_err();
        assert!(err.to_string().contains("trailer is missing"), "{err}");
    }

    #[test]
    fn version_1_reads_and_a_newer_version_is_refused() {
        let mut m = sample();
        m.format_version = 1;
        let bytes = m.encode().unwrap();
        assert_eq!(SnapshotMetadata::decode(&bytes, "x").unwrap(), m);
        m.format_version = FORMAT_VERSION + 1;
        let err = SnapshotMetadata::decode(&m.encode().unwrap(), "old/_metadata")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("old/_metadata has format version 3")
                && err.contains("reads versions 1 to 2"),
            "{err}"
        );
    }

    #[test]
    fn missing_and_incomplete_directories_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Store::open(&dir.path().join("nope").display().to_string()).unwrap();
        assert!(matches!(
            SnapshotMetadata::read(&missing),
            Err(MetadataError::NotFound(_))
        ));
        let incomplete = Store::open(&dir.path().display().to_string()).unwrap();
        let err = SnapshotMetadata::read(&incomplete).unwrap_err();
        assert!(
            err.to_string().contains("is not a complete savepoint"),
            "{err}"
        );
        sample().write(&incomplete).unwrap();
        assert_eq!(SnapshotMetadata::read(&incomplete).unwrap(), sample());
    }
}
