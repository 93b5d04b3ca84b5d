//! Where snapshots live, in one place: every directory and file name of the layout is made and
//! parsed here (README.md, "Layout").
//!
//! ```text
//! <savepoint dir>/savepoint-<job id, 6 digits>-<12 random digits>/_metadata
//!                                                                /operators/<uid>-<subtask>-<uuid>
//! <checkpoint dir>/<job id>/chk-<n>/…          (the same inside)
//! <savepoint dir>/checkpoints                  the operator's checkpoint dir for a job that sets none
//! ```

use super::metadata::OPERATORS_DIR;
use super::store::Store;

const CHECKPOINT_PREFIX: &str = "chk-";

/// A location as the engine names it: local `file:` URIs (`file:/sp/x`, `file:///sp/x`, as
/// Flink reports them) as plain paths; other locations as they are.
pub fn plain_location(location: &str) -> String {
    match location.strip_prefix("file:") {
        Some(rest) if rest.starts_with('/') => format!("/{}", rest.trim_start_matches('/')),
        _ => location.to_owned(),
    }
}

/// A new savepoint's directory name for job `job_id`.
pub fn savepoint_name(job_id: &str) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "savepoint-{}-{}",
        &job_id[..6.min(job_id.len())],
        &suffix[..12]
    )
}

/// The directory of a job's checkpoints under a checkpoint directory.
pub fn job_checkpoints(dir: &Store, job_id: &str) -> Store {
    dir.child(job_id)
}

/// Checkpoint `id` of a job.
pub fn checkpoint(dir: &Store, job_id: &str, id: u64) -> Store {
    job_checkpoints(dir, job_id).child(&format!("{CHECKPOINT_PREFIX}{id}"))
}

/// The checkpoint ids among directory names (`chk-<n>`), in no particular order.
pub fn checkpoint_ids(names: &[String]) -> Vec<u64> {
    names
        .iter()
        .filter_map(|d| d.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok())
        .collect()
}

/// Whether a snapshot location is a checkpoint's (else a savepoint's).
pub fn is_checkpoint(location: &str) -> bool {
    location
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .is_some_and(|last| checkpoint_ids(&[last.to_owned()]).len() == 1)
}

/// A new state file's path inside a snapshot, for operator `uid`'s subtask.
pub fn state_file(uid: &str, subtask: u32) -> String {
    format!(
        "{OPERATORS_DIR}/{uid}-{subtask}-{}",
        uuid::Uuid::new_v4().simple()
    )
}

/// The checkpoint directory the operator gives a job whose spec sets none.
pub fn default_checkpoint_dir(savepoint_dir: &str) -> String {
    format!("{}/checkpoints", savepoint_dir.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {

    #[test]
    fn file_uris_become_paths_and_other_locations_stay() {
        assert_eq!(plain_location("file:/sp/savepoint-1"), "/sp/savepoint-1");
        assert_eq!(plain_location("file:///sp/savepoint-1"), "/sp/savepoint-1");
        assert_eq!(plain_location("/sp/savepoint-1"), "/sp/savepoint-1");
        assert_eq!(plain_location("s3://b/sp"), "s3://b/sp");
    }

    use super::*;

    #[test]
    fn names_parse_back() {
        let name = savepoint_name("0123456789abcdef");
        assert!(name.starts_with("savepoint-012345-"), "{name}");
        assert_eq!(name.len(), "savepoint-012345-".len() + 12);
        assert_eq!(
            checkpoint_ids(&["chk-7".into(), "chk-x".into(), "savepoint-1".into()]),
            [7]
        );
        assert!(is_checkpoint("/cp/0123/chk-12/"));
        assert!(!is_checkpoint("/sp/savepoint-0123-abc"));
        assert!(state_file("counter", 3).starts_with("operators/counter-3-"));
        assert_eq!(default_checkpoint_dir("/sp/"), "/sp/checkpoints");
    }
}
