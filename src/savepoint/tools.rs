//! Offline tools over a snapshot directory: describe it, verify its files, dispose of it.

use super::metadata::{METADATA_FILE, MetadataError, SnapshotMetadata};
use super::statefile;
use super::store::Store;
use std::fmt::Write as _;

/// A human-readable description of a snapshot.
pub fn describe(location: &str, m: &SnapshotMetadata) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} of job {} ({})",
        m.kind, m.snapshot_id, m.job_name, m.job_id
    );
    let _ = writeln!(s, "  location:    {location}");
    let _ = writeln!(s, "  taken at:    {} ms since the epoch", m.timestamp_ms);
    if let Some(r) = &m.restored_from {
        let _ = writeln!(s, "  job restored from: {r}");
    }
    let (stored, raw) = (m.total_bytes(), m.raw_state_bytes());
    if stored == raw {
        let _ = writeln!(s, "  state bytes: {stored}");
    } else {
        let _ = writeln!(
            s,
            "  state bytes: {stored} ({raw} before compression, {:.1}x)",
            raw as f64 / stored.max(1) as f64
        );
    }
    let _ = writeln!(s, "  operators:");
    for o in &m.operators {
        let _ = writeln!(
            s,
            "    - uid {} ({}, name {}), parallelism {}, max parallelism {}{}",
            o.uid,
            o.kind,
            o.name,
            o.parallelism,
            o.max_parallelism,
            if o.is_stateful() { "" } else { ", stateless" }
        );
        for k in &o.keyed_states {
            let fields: Vec<String> = k
                .schema
                .fields
                .iter()
                .map(|f| format!("{}: {}", f.name, f.ty))
                .collect();
            let entries: u64 = o.subtasks.iter().map(|t| t.keyed_entries).sum();
            let _ = writeln!(
                s,
                "        keyed {} state '{}' {{{}}}, {entries} entries (all keyed states)",
                k.kind,
                k.name,
                fields.join(", ")
            );
        }
        for l in &o.operator_states {
            let fields: Vec<String> = l
                .schema
                .fields
                .iter()
                .map(|f| format!("{}: {}", f.name, f.ty))
                .collect();
            let _ = writeln!(
                s,
                "        operator list state '{}' ({:?}) {{{}}}",
                l.name,
                l.distribution,
                fields.join(", ")
            );
        }
        if o.is_stateful() {
            let _ = writeln!(
                s,
                "        {} bytes in {} file(s)",
                o.state_bytes(),
                o.subtasks.len()
            );
        }
        if !o.source_positions.is_empty() {
            let pos: Vec<String> = o
                .source_positions
                .iter()
                .map(|p| format!("{}@{}", p.split, p.position))
                .collect();
            let _ = writeln!(s, "        positions: {}", pos.join(" "));
        }
    }
    s
}

/// How far a check of a snapshot's state files goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileCheck {
    /// Every file exists with its recorded size (no file is read).
    Sizes,
    /// Sizes, and every file's checksum (every byte is read).
    Checksums,
}

/// Checks every state file against `_metadata`, as far as `depth` says.
pub fn verify_files(dir: &Store, m: &SnapshotMetadata, depth: FileCheck) -> Vec<String> {
    let mut problems = Vec::new();
    for o in &m.operators {
        for st in &o.subtasks {
            let checked = match depth {
                FileCheck::Sizes => statefile::verify_size(dir, st),
                FileCheck::Checksums => statefile::verify(dir, st),
            };
            if let Err(e) = checked {
                problems.push(e.to_string());
            }
        }
    }
    problems
}

#[derive(Debug, thiserror::Error)]
pub enum DisposeError {
    #[error(
        "{0} does not look like a snapshot (no _metadata and no operators/ directory); refusing to delete it"
    )]
    NotASnapshot(String),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
}

/// Deletes a snapshot directory (complete or incomplete), refusing anything else.
pub fn dispose(dir: &Store) -> Result<u64, DisposeError> {
    if dir.is_object()? {
        return Err(DisposeError::NotASnapshot(dir.location()));
    }
    let bytes = match SnapshotMetadata::read(dir) {
        Ok(m) => m.total_bytes(),
        Err(MetadataError::Incomplete(loc)) => {
            let files = dir.list()?;
            if !files
                .iter()
                .all(|f| f.starts_with("operators/") || f == METADATA_FILE)
            {
                return Err(DisposeError::NotASnapshot(loc));
            }
            0
        }
        Err(e) => return Err(e.into()),
    };
    dir.delete_all()?;
    Ok(bytes)
}
