//! Mapping a snapshot's state onto a (possibly changed) job graph, by operator uid.
//!
//! `plan` checks everything before a single byte of state is loaded and reports every problem
//! at once: saved state whose uid (or state name) the new job lacks, unless non-restored state
//! is allowed; a max parallelism that differs from the one fixed by the state; state schemas
//! that cannot be migrated; a state that changed its kind. The same function backs the engine's
//! restore and the offline `savepoints check`, so the two always agree.

use super::keygroups::{self, KeyGroupRange, redistribute};
use super::metadata::{KeyedStateMeta, OperatorMetadata, OperatorStateMeta, SnapshotMetadata};
use super::schema::{self, Compatibility, Migration};
use super::statefile::{self, StateEntry, StateFileError};
use super::store::Store;
use super::value::{Key, Row};
use std::collections::BTreeMap;
use std::fmt;

/// What the new job declares for one stateful operator.
#[derive(Clone, Debug)]
pub struct OperatorDecl {
    pub uid: String,
    pub parallelism: u32,
    /// Set when the job fixes it explicitly; otherwise the saved value is adopted.
    pub max_parallelism: Option<u32>,
    pub keyed_states: Vec<KeyedStateMeta>,
    pub operator_states: Vec<OperatorStateMeta>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RestoreProblem {
    /// Saved state that the new job has no place for.
    NotRestored {
        uids: Vec<String>,
    },
    MaxParallelism {
        uid: String,
        saved: u32,
        new: u32,
    },
    ParallelismAboveMax {
        uid: String,
        parallelism: u32,
        max: u32,
    },
    StateKind {
        uid: String,
        state: String,
        saved: String,
        new: String,
    },
    Schema {
        uid: String,
        state: String,
        field: String,
        reason: String,
    },
}

impl fmt::Display for RestoreProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreProblem::NotRestored { uids } => write!(
                f,
                "the savepoint holds state for {} that the new job does not have: {}. \
                 Restore the operator(s) with the same uid, or pass --allow-non-restored-state to drop that state",
                if uids.len() == 1 {
                    "an operator"
                } else {
                    "operators"
                },
                uids.join(", ")
            ),
            RestoreProblem::MaxParallelism { uid, saved, new } => write!(
                f,
                "operator '{uid}': max parallelism {new} differs from {saved}, fixed when its state was written; \
                 keep maxParallelism at {saved} (or leave it unset to adopt it)"
            ),
            RestoreProblem::ParallelismAboveMax {
                uid,
                parallelism,
                max,
            } => write!(
                f,
                "operator '{uid}': parallelism {parallelism} exceeds its max parallelism {max}, fixed by its state"
            ),
            RestoreProblem::StateKind {
                uid,
                state,
                saved,
                new,
            } => write!(
                f,
                "operator '{uid}', state '{state}': saved as {saved} state, declared as {new} state"
            ),
            RestoreProblem::Schema {
                uid,
                state,
                field,
                reason,
            } => write!(
                f,
                "operator '{uid}', state '{state}', field '{field}': incompatible schema change: {reason}"
            ),
        }
    }
}

/// The problems that refuse a restore, shown one per line.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreRefused(pub Vec<RestoreProblem>);

impl fmt::Display for RestoreRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the snapshot cannot be restored into this job:")?;
        for p in &self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RestoreRefused {}

/// Where a new state's rows come from.
#[derive(Clone, Debug)]
pub struct StateSource {
    pub saved_index: usize,
    pub migration: Option<Migration>,
}

/// How one operator of the new job gets its state.
#[derive(Clone, Debug)]
pub struct OperatorRestore {
    pub saved: OperatorMetadata,
    pub max_parallelism: u32,
    /// Per new keyed state: its source in the snapshot, or `None` (starts empty).
    pub keyed: Vec<Option<StateSource>>,
    /// Per new operator state: likewise.
    pub operator: Vec<Option<StateSource>>,
}

#[derive(Clone, Debug)]
pub struct RestorePlan {
    pub location: String,
    pub snapshot: SnapshotMetadata,
    pub operators: BTreeMap<String, OperatorRestore>,
    /// Saved state dropped because non-restored state was allowed (`uid` or `uid/state`).
    pub dropped: Vec<String>,
}

fn resolve_schemas(
    uid: &str,
    state: &str,
    old: &schema::StateSchema,
    new: &schema::StateSchema,
    problems: &mut Vec<RestoreProblem>,
) -> Option<Option<Migration>> {
    match schema::resolve(old, new) {
        Compatibility::AsIs => Some(None),
        Compatibility::AfterMigration(m) => Some(Some(m)),
        Compatibility::Incompatible(ps) => {
            problems.extend(ps.into_iter().map(|p| RestoreProblem::Schema {
                uid: uid.to_owned(),
                state: state.to_owned(),
                field: p.field,
                reason: p.reason,
            }));
            None
        }
    }
}

/// Checks a snapshot against the new job's stateful operators and plans the restore.
pub fn plan(
    location: &str,
    snapshot: &SnapshotMetadata,
    new_ops: &[OperatorDecl],
    allow_non_restored_state: bool,
) -> Result<RestorePlan, RestoreRefused> {
    let mut problems = Vec::new();
    let mut missing = Vec::new();
    let mut operators = BTreeMap::new();
    for saved in snapshot.operators.iter().filter(|o| o.is_stateful()) {
        let Some(decl) = new_ops.iter().find(|d| d.uid == saved.uid) else {
            missing.push(saved.uid.clone());
            continue;
        };
        let uid = &saved.uid;
        let max = match decl.max_parallelism {
            Some(m) if !saved.keyed_states.is_empty() && m != saved.max_parallelism => {
                problems.push(RestoreProblem::MaxParallelism {
                    uid: uid.clone(),
                    saved: saved.max_parallelism,
                    new: m,
                });
                m
            }
            Some(m) if saved.keyed_states.is_empty() => m,
            _ => saved.max_parallelism,
        };
        if !saved.keyed_states.is_empty() && decl.parallelism > max {
            problems.push(RestoreProblem::ParallelismAboveMax {
                uid: uid.clone(),
                parallelism: decl.parallelism,
                max,
            });
        }
        let mut keyed = Vec::new();
        for ns in &decl.keyed_states {
            let source = match saved.keyed_states.iter().position(|s| s.name == ns.name) {
                None => None,
                Some(i) => {
                    let old = &saved.keyed_states[i];
                    if old.kind != ns.kind {
                        problems.push(RestoreProblem::StateKind {
                            uid: uid.clone(),
                            state: ns.name.clone(),
                            saved: old.kind.to_string(),
                            new: ns.kind.to_string(),
                        });
                        None
                    } else {
                        resolve_schemas(uid, &ns.name, &old.schema, &ns.schema, &mut problems).map(
                            |migration| StateSource {
                                saved_index: i,
                                migration,
                            },
                        )
                    }
                }
            };
            keyed.push(source);
        }
        let mut operator = Vec::new();
        for ns in &decl.operator_states {
            let source = match saved.operator_states.iter().position(|s| s.name == ns.name) {
                None => None,
                Some(i) => {
                    let old = &saved.operator_states[i];
                    resolve_schemas(uid, &ns.name, &old.schema, &ns.schema, &mut problems).map(
                        |migration| StateSource {
                            saved_index: i,
                            migration,
                        },
                    )
                }
            };
            operator.push(source);
        }
        for old in &saved.keyed_states {
            if !decl.keyed_states.iter().any(|n| n.name == old.name) {
                missing.push(format!("{uid}/{}", old.name));
            }
        }
        for old in &saved.operator_states {
            if !decl.operator_states.iter().any(|n| n.name == old.name) {
                missing.push(format!("{uid}/{}", old.name));
            }
        }
        operators.insert(
            uid.clone(),
            OperatorRestore {
                saved: saved.clone(),
                max_parallelism: max,
                keyed,
                operator,
            },
        );
    }
    if !missing.is_empty() && !allow_non_restored_state {
        problems.insert(
            0,
            RestoreProblem::NotRestored {
                uids: missing.clone(),
            },
        );
    }
    if !problems.is_empty() {
        return Err(RestoreRefused(problems));
    }
    Ok(RestorePlan {
        location: location.to_owned(),
        snapshot: snapshot.clone(),
        operators,
        dropped: missing,
    })
}

fn migrate_entry(entry: StateEntry, m: &Migration) -> StateEntry {
    match entry {
        StateEntry::Value(row) => StateEntry::Value(m.apply(&row).into()),
        StateEntry::List(rows) => StateEntry::List(rows.iter().map(|r| m.apply(r)).collect()),
        StateEntry::Map(map) => {
            StateEntry::Map(map.into_iter().map(|(k, r)| (k, m.apply(&r))).collect())
        }
    }
}

impl RestorePlan {
    /// Checks every state file the restore reads, before any is loaded: size, header and
    /// block layout (`statefile::verify_layout`); the blocks' checksums are verified as they
    /// are read. State that is not restored (allowNonRestoredState) is not read.
    pub fn verify_files(&self, dir: &Store) -> Result<(), StateFileError> {
        for op in self.operators.values() {
            for st in &op.saved.subtasks {
                statefile::verify_layout(dir, st)?;
            }
        }
        Ok(())
    }
}

impl OperatorRestore {
    /// Loads the keyed state for the key groups `range`, calling
    /// `sink(new_state_index, key_group, entries)` with rows already migrated; each state
    /// file is decoded by `decoders` threads (`statefile::read_key_groups`).
    pub fn load_keyed(
        &self,
        dir: &Store,
        range: KeyGroupRange,
        decoders: usize,
        mut sink: impl FnMut(usize, u32, Vec<(Key, StateEntry)>),
    ) -> Result<(), StateFileError> {
        let mut by_saved: Vec<Option<(usize, Option<&Migration>)>> =
            vec![None; self.saved.keyed_states.len()];
        for (new_i, src) in self.keyed.iter().enumerate() {
            if let Some(src) = src {
                by_saved[src.saved_index] = Some((new_i, src.migration.as_ref()));
            }
        }
        if by_saved.iter().all(Option::is_none) {
            return Ok(());
        }
        for st in &self.saved.subtasks {
            statefile::read_key_groups(
                dir,
                st,
                &self.saved.keyed_states,
                range,
                decoders,
                |kg, all| {
                    for (s, entries) in all.into_iter().enumerate() {
                        match by_saved.get(s).copied().flatten() {
                            None => {}
                            Some((new_i, None)) => sink(new_i, kg, entries),
                            Some((new_i, Some(m))) => {
                                let migrated = entries
                                    .into_iter()
                                    .map(|(k, e)| (k, migrate_entry(e, m)))
                                    .collect();
                                sink(new_i, kg, migrated);
                            }
                        }
                    }
                },
            )?;
        }
        Ok(())
    }

    /// Loads and redistributes operator list state for `parallelism` new subtasks:
    /// `result[subtask][new_state_index]`.
    pub fn load_operator_lists(
        &self,
        dir: &Store,
        parallelism: u32,
        decls: &[OperatorStateMeta],
    ) -> Result<Vec<Vec<Vec<Row>>>, StateFileError> {
        let saved_count = self.saved.operator_states.len();
        let mut per_old: Vec<Vec<Vec<Row>>> = Vec::new();
        for st in &self.saved.subtasks {
            per_old.push(statefile::read_operator_lists(dir, st, saved_count)?);
        }
        let mut out = vec![vec![Vec::new(); decls.len()]; parallelism as usize];
        for (new_i, (src, decl)) in self.operator.iter().zip(decls).enumerate() {
            let Some(src) = src else { continue };
            let old: Vec<Vec<Row>> = per_old
                .iter()
                .map(|lists| {
                    let rows = lists.get(src.saved_index).cloned().unwrap_or_default();
                    match &src.migration {
                        Some(m) => rows.iter().map(|r| m.apply(r)).collect(),
                        None => rows,
                    }
                })
                .collect();
            for (sub, rows) in redistribute(decl.distribution, &old, parallelism)
                .into_iter()
                .enumerate()
            {
                out[sub][new_i] = rows;
            }
        }
        Ok(out)
    }

    pub fn range_for(&self, parallelism: u32, index: u32) -> KeyGroupRange {
        keygroups::range_for_subtask(self.max_parallelism, parallelism, index)
    }
}
