//! Sinks. The file sink is exactly once: records go to an in-progress part file under
//! `<path>/.pending/`; a snapshot closes it (staged, listed in the sink's state); when the
//! snapshot completes the staged files are renamed into `<path>/` where readers see them. On
//! restore, files staged in the restored snapshot are committed and every other pending file
//! this job left is deleted, so the output holds each record exactly once. Part file names
//! carry the job id: two versions of a job (a blue-green switch) write the same directory
//! without touching each other's files.
//!
//! In shadow mode (the new version of a blue-green switch before the cut-over) a sink drops
//! what it receives; the cut-over marker takes it out of shadow mode.

use super::operators::Operator;
use crate::savepoint::statefile::SubtaskSnapshot;
use crate::savepoint::value::{Record, Row, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

const PENDING: &str = ".pending";

pub struct FileSink {
    dir: PathBuf,
    prefix: String,
    attempt: String,
    seq: u64,
    current: Option<(String, BufWriter<File>)>,
    /// Closed part files waiting for their snapshot to complete: (name, snapshot id).
    staged: Vec<(String, i64)>,
    /// Drop records until the cut-over.
    shadow: bool,
}

/// The part of a part file's name that says which job wrote it.
fn job_tag(job_id: &str) -> &str {
    &job_id[..8.min(job_id.len())]
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("fileSink: {what} {}: {e}", path.display())
}

impl FileSink {
    pub fn new(dir: &str, uid: &str, subtask: u32, job_id: &str, shadow: bool) -> FileSink {
        let attempt = uuid::Uuid::new_v4().simple().to_string();
        FileSink {
            dir: PathBuf::from(dir),
            prefix: format!("part-{uid}-{subtask}-{}", job_tag(job_id)),
            attempt: attempt[..8].to_owned(),
            seq: 0,
            current: None,
            staged: Vec::new(),
            shadow,
        }
    }

    fn open(&mut self) -> Result<&mut BufWriter<File>, String> {
        if self.current.is_none() {
            let name = format!("{}-{}-{:06}.jsonl", self.prefix, self.attempt, self.seq);
            self.seq += 1;
            let path = self.dir.join(PENDING).join(&name);
            let f = File::create(&path).map_err(|e| io_err("cannot create", &path, e))?;
            self.current = Some((name, BufWriter::with_capacity(1 << 16, f)));
        }
        match self.current.as_mut() {
            Some((_, w)) => Ok(w),
            None => Err("fileSink: no open part file".into()),
        }
    }

    fn close_current(&mut self, snapshot_id: i64) -> Result<(), String> {
        if let Some((name, mut w)) = self.current.take() {
            let path = self.dir.join(PENDING).join(&name);
            w.flush().map_err(|e| io_err("cannot write", &path, e))?;
            let f = w
                .into_inner()
                .map_err(|e| io_err("cannot write", &path, e.into_error()))?;
            f.sync_data().map_err(|e| io_err("cannot sync", &path, e))?;
            self.staged.push((name, snapshot_id));
        }
        Ok(())
    }

    fn commit_up_to(&mut self, snapshot_id: i64) -> Result<(), String> {
        let (done, keep): (Vec<_>, Vec<_>) = self
            .staged
            .drain(..)
            .partition(|(_, id)| *id <= snapshot_id);
        self.staged = keep;
        for (name, _) in done {
            commit(&self.dir, &name)?;
        }
        Ok(())
    }
}

/// Moves a staged part file into view; already committed is fine.
fn commit(dir: &Path, name: &str) -> Result<(), String> {
    let from = dir.join(PENDING).join(name);
    let to = dir.join(name);
    match std::fs::rename(&from, &to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => Ok(()),
        Err(e) => Err(io_err("cannot commit", &from, e)),
    }
}

/// Before the sink's subtasks start: commit the files staged in the restored snapshot and
/// delete every other pending file of this sink (output of attempts after that snapshot).
pub fn prepare_file_sink(
    dir: &str,
    uid: &str,
    job_id: &str,
    restored: &[Row],
) -> Result<(), String> {
    let dir = PathBuf::from(dir);
    let pending = dir.join(PENDING);
    std::fs::create_dir_all(&pending).map_err(|e| io_err("cannot create", &pending, e))?;
    let mut keep = std::collections::HashSet::new();
    for row in restored {
        if let Some(Value::Str(name)) = row.first() {
            if !dir.join(PENDING).join(&**name).exists() && !dir.join(&**name).exists() {
                return Err(format!(
                    "fileSink '{uid}': part file {} staged in the restored snapshot is gone from {} and {}; its records would be lost",
                    name,
                    pending.display(),
                    dir.display()
                ));
            }
            commit(&dir, name)?;
            keep.insert(name.to_string());
        }
    }
    let prefix = format!("part-{uid}-");
    let tag = format!("-{}-", job_tag(job_id));
    let entries = std::fs::read_dir(&pending).map_err(|e| io_err("cannot list", &pending, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let this_jobs = name.starts_with(&prefix) && name[prefix.len()..].contains(&tag);
        if this_jobs && !keep.contains(&name) {
            std::fs::remove_file(entry.path())
                .map_err(|e| io_err("cannot delete", &entry.path(), e))?;
        }
    }
    Ok(())
}

impl Operator for FileSink {
    fn process(&mut self, input: Vec<Record>, _out: &mut Vec<Record>) -> Result<(), String> {
        if input.is_empty() || self.shadow {
            return Ok(());
        }
        let w = self.open()?;
        for rec in input {
            serde_json::to_writer(&mut *w, &rec.to_json()).map_err(|e| format!("fileSink: {e}"))?;
            w.write_all(b"\n").map_err(|e| format!("fileSink: {e}"))?;
        }
        Ok(())
    }

    fn snapshot(&mut self, snapshot_id: u64) -> Result<SubtaskSnapshot, String> {
        self.close_current(snapshot_id as i64)?;
        Ok(SubtaskSnapshot {
            keyed: None,
            operator_lists: vec![
                self.staged
                    .iter()
                    .map(|(n, id)| Row::from([Value::from(n.as_str()), Value::Int(*id)]))
                    .collect(),
            ],
        })
    }

    fn notify_complete(&mut self, snapshot_id: u64) -> Result<(), String> {
        self.commit_up_to(snapshot_id as i64)
    }

    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), String> {
        self.close_current(i64::MAX)?;
        self.commit_up_to(i64::MAX)
    }

    fn on_cut_over(&mut self) {
        self.shadow = false;
    }
}

pub struct StdoutSink {
    /// Drop records until the cut-over.
    pub shadow: bool,
}

impl Operator for StdoutSink {
    fn process(&mut self, input: Vec<Record>, _out: &mut Vec<Record>) -> Result<(), String> {
        if self.shadow {
            return Ok(());
        }
        let stdout = std::io::stdout();
        let mut lock = stdout.lock();
        for rec in input {
            let _ = writeln!(lock, "{}", rec.to_json());
        }
        let _ = lock.flush();
        Ok(())
    }

    fn on_cut_over(&mut self) {
        self.shadow = false;
    }
}

pub struct DiscardSink;

impl Operator for DiscardSink {
    fn process(&mut self, _input: Vec<Record>, _out: &mut Vec<Record>) -> Result<(), String> {
        Ok(())
    }
}
