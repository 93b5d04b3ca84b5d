//! The keyed state backend: one table per (state, key group), each a list of shards behind
//! `Arc`s.
//!
//! A snapshot clones the lists of `Arc`s (one pointer per shard of a few dozen entries, a few
//! milliseconds for a gigabyte of state) and hands them to a writer thread; a write to a shard
//! the writer still holds copies the one entry written (see `savepoint::grouptable`). The
//! tables themselves are owned, not shared, so a record's write checks one reference count
//! (its shard's), not two. Processing goes on while the bytes are written, and a record pays
//! for the copy of its own entry only.

use crate::savepoint::keygroups::{KeyGroupRange, key_group, key_group_of_hash};
use crate::savepoint::statefile::{GroupTable, KeyedSnapshot, StateEntry};
use crate::savepoint::value::{Key, Value};

pub struct KeyedState {
    range: KeyGroupRange,
    max_parallelism: u32,
    /// `tables[state][kg - range.start]`.
    tables: Vec<Vec<GroupTable>>,
}

impl KeyedState {
    pub fn new(range: KeyGroupRange, max_parallelism: u32, states: usize) -> KeyedState {
        let groups = range.len() as usize;
        KeyedState {
            range,
            max_parallelism,
            tables: (0..states)
                .map(|_| (0..groups).map(|_| GroupTable::default()).collect())
                .collect(),
        }
    }

    pub fn max_parallelism(&self) -> u32 {
        self.max_parallelism
    }

    /// The key group of a key, checked against this subtask's range.
    pub fn group_of(&self, key: &Value) -> Result<u32, String> {
        self.checked(key, key_group(key, self.max_parallelism))
    }

    /// `group_of` a record's key, from the hash it carries.
    pub fn group_of_key(&self, key: &Key) -> Result<u32, String> {
        self.checked(
            &key.value,
            key_group_of_hash(key.hash, self.max_parallelism),
        )
    }

    /// Asks for the memory a lookup of `key` in state `state` will read: `step` 0 the
    /// shard's header, 1 its slots (see `GroupTable::prefetch_shard`). A key outside this
    /// subtask's range is left to the lookup to report.
    #[inline]
    pub fn prefetch(&self, state: usize, key: &Key, step: u8) {
        let kg = key_group_of_hash(key.hash, self.max_parallelism);
        if !self.range.contains(kg) {
            return;
        }
        if let Some(table) = self.tables.get(state).and_then(|t| t.get(self.slot(kg))) {
            match step {
                0 => table.prefetch_shard(key.hash),
                _ => table.prefetch_slots(key.hash),
            }
        }
    }

    fn checked(&self, key: &Value, kg: u32) -> Result<u32, String> {
        if self.range.contains(kg) {
            Ok(kg)
        } else {
            Err(format!(
                "key {key} (key group {kg}) reached the subtask owning key groups {}..={}",
                self.range.start, self.range.end
            ))
        }
    }

    fn slot(&self, kg: u32) -> usize {
        (kg - self.range.start) as usize
    }

    /// The table of one state and key group (its shards are copied on write while a
    /// snapshot reads them).
    pub fn table_mut(&mut self, state: usize, kg: u32) -> &mut GroupTable {
        let slot = self.slot(kg);
        &mut self.tables[state][slot]
    }

    pub fn table(&self, state: usize, kg: u32) -> &GroupTable {
        &self.tables[state][self.slot(kg)]
    }

    /// Moves every entry out, leaving this state empty (to be freed elsewhere).
    pub fn take(&mut self) -> KeyedState {
        let empty = KeyedState::new(self.range, self.max_parallelism, 0);
        std::mem::replace(self, empty)
    }

    /// Inserts a restored key group's entries of one state, its table sized for them first.
    pub fn insert_all(&mut self, state: usize, kg: u32, entries: Vec<(Key, StateEntry)>) {
        if self.range.contains(kg) && state < self.tables.len() {
            let table = self.table_mut(state, kg);
            table.reserve(entries.len());
            for (key, entry) in entries {
                table.insert_hashed(key.hash, key.value, entry);
            }
        }
    }

    pub fn snapshot(&mut self) -> KeyedSnapshot {
        KeyedSnapshot {
            range: self.range,
            tables: self
                .tables
                .iter_mut()
                .map(|t| t.iter_mut().map(GroupTable::snapshot).collect())
                .collect(),
        }
    }

    /// Every (key group, key, entry) of one state.
    pub fn iter(&self, state: usize) -> impl Iterator<Item = (u32, &Value, &StateEntry)> {
        let start = self.range.start;
        self.tables[state]
            .iter()
            .enumerate()
            .flat_map(move |(i, t)| t.iter().map(move |(k, e)| (start + i as u32, k, e)))
    }

    pub fn len(&self) -> usize {
        self.tables.iter().flatten().map(|t| t.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::savepoint::keygroups::range_for_subtask;

    #[test]
    fn snapshot_is_isolated_from_later_writes() {
        let range = range_for_subtask(128, 1, 0);
        let mut ks = KeyedState::new(range, 128, 1);
        let key = Value::Int(5);
        let kg = ks.group_of(&key).unwrap();
        ks.table_mut(0, kg)
            .insert(key.clone(), StateEntry::Value(vec![Value::Int(1)].into()));
        let snap = ks.snapshot();
        ks.table_mut(0, kg)
            .insert(key.clone(), StateEntry::Value(vec![Value::Int(2)].into()));
        let saved = &snap.tables[0][kg as usize];
        assert_eq!(
            saved.get(&key),
            Some(&StateEntry::Value(vec![Value::Int(1)].into()))
        );
        assert_eq!(
            ks.table(0, kg).get(&key),
            Some(&StateEntry::Value(vec![Value::Int(2)].into()))
        );
    }

    #[test]
    fn keys_outside_the_range_are_refused() {
        let ks = KeyedState::new(range_for_subtask(128, 2, 0), 128, 1);
        let outside = (0..1000)
            .map(Value::Int)
            .find(|k| key_group(k, 128) >= 64)
            .unwrap();
        assert!(ks.group_of(&outside).is_err());
    }
}
