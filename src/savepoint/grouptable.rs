//! One keyed state's entries in one key group, as the engine holds them while it runs and as a
//! snapshot hands them to the writer.
//!
//! The entries are spread over shards of at most a few hundred entries, each a flat hash map
//! behind an `Arc`. A snapshot clones the `Arc`s; the first write to a shard that a writer
//! still reads copies that one shard. So the copying after a barrier is spread over the records
//! that follow, a few hundred entries at most per record, while a lookup outside snapshots
//! costs one flat hash probe (a persistent trie, the alternative, costs a pointer hop per level
//! on every lookup, snapshot or not).

use super::statefile::StateEntry;
use super::value::Value;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

/// A table splits its shards in two (all at once) when they hold more than this on average, so
/// a copy after a barrier is of at most about this many entries per record processed, whatever
/// the state size, and a small table stays one flat map.
const SPLIT_ABOVE: usize = 128;

type Shard = HashMap<Value, StateEntry, foldhash::fast::RandomState>;

#[derive(Clone, Default)]
pub struct GroupTable {
    /// A power of two long (or empty before the first write). A key's shard is picked by the
    /// top bits of a fixed hash of it, so doubling the shards splits each one in two.
    shards: Vec<Arc<Shard>>,
    len: usize,
}

/// The shard of `key` among `shards` (a power of two): the top bits of a fixed hash, so the
/// same key always picks the same shard. (The shard's own map hashes with another seed.)
fn shard_index(key: &Value, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let hash = foldhash::fast::FixedState::with_seed(0x5eed_0f5a_0b5e).hash_one(key);
    (hash >> (64 - shards.trailing_zeros())) as usize
}

impl GroupTable {
    fn index(&self, key: &Value) -> usize {
        shard_index(key, self.shards.len())
    }

    fn shard(&self, key: &Value) -> Option<&Shard> {
        self.shards.get(self.index(key)).map(|s| s.as_ref())
    }

    /// The shard of `key`, copied first if a snapshot still reads it.
    fn shard_mut(&mut self, key: &Value) -> &mut Shard {
        if self.shards.is_empty() {
            self.shards.push(Arc::default());
        }
        let i = self.index(key);
        Arc::make_mut(&mut self.shards[i])
    }

    /// Doubles the shards once they hold more than `SPLIT_ABOVE` on average. Amortised like a
    /// hash map's growth; a shard a snapshot still reads is copied, not moved.
    fn maybe_split(&mut self) {
        let n = self.shards.len();
        if self.len <= n * SPLIT_ABOVE {
            return;
        }
        let mut next: Vec<Shard> = (0..n * 2).map(|_| Shard::default()).collect();
        let mut place = |k: Value, e: StateEntry| {
            next[shard_index(&k, n * 2)].insert(k, e);
        };
        for shard in std::mem::take(&mut self.shards) {
            match Arc::try_unwrap(shard) {
                Ok(owned) => owned.into_iter().for_each(|(k, e)| place(k, e)),
                Err(shared) => shared.iter().for_each(|(k, e)| place(k.clone(), e.clone())),
            }
        }
        self.shards = next.into_iter().map(Arc::new).collect();
    }

    pub fn get(&self, key: &Value) -> Option<&StateEntry> {
        self.shard(key)?.get(key)
    }

    pub fn contains_key(&self, key: &Value) -> bool {
        self.get(key).is_some()
    }

    pub fn get_mut(&mut self, key: &Value) -> Option<&mut StateEntry> {
        let i = self.index(key);
        let shard = self.shards.get_mut(i)?;
        // No copy of a shard a snapshot still reads just to find the key absent.
        if Arc::get_mut(shard).is_none() && !shard.contains_key(key) {
            return None;
        }
        Arc::make_mut(shard).get_mut(key)
    }

    pub fn insert(&mut self, key: Value, entry: StateEntry) -> Option<StateEntry> {
        let old = self.shard_mut(&key).insert(key, entry);
        if old.is_none() {
            self.len += 1;
            self.maybe_split();
        }
        old
    }

    /// The entry of `key`, inserted from `make` if absent.
    pub fn get_or_insert_with(
        &mut self,
        key: Value,
        make: impl FnOnce() -> StateEntry,
    ) -> &mut StateEntry {
        if !self.contains_key(&key) {
            self.len += 1;
            self.maybe_split();
        }
        self.shard_mut(&key).entry(key).or_insert_with(make)
    }

    pub fn remove(&mut self, key: &Value) -> Option<StateEntry> {
        if !self.contains_key(key) {
            return None;
        }
        let old = self.shard_mut(key).remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Value, &StateEntry)> {
        self.shards.iter().flat_map(|s| s.iter())
    }
}

impl std::fmt::Debug for GroupTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::savepoint::value::Row;

    fn entry(n: i64) -> StateEntry {
        StateEntry::Value(Row::from([Value::Int(n)]))
    }

    #[test]
    fn a_clone_is_isolated_from_later_writes_and_shares_untouched_shards() {
        let mut live = GroupTable::default();
        for k in 0..1_000 {
            live.insert(Value::Int(k), entry(k));
        }
        let snapshot = live.clone();
        // One write: only its shard is copied.
        if let Some(StateEntry::Value(row)) = live.get_mut(&Value::Int(7)) {
            Arc::make_mut(row)[0] = Value::Int(-7);
        }
        live.insert(Value::Int(5_000), entry(5_000));
        live.remove(&Value::Int(8));
        assert_eq!(snapshot.get(&Value::Int(7)), Some(&entry(7)));
        assert_eq!(snapshot.get(&Value::Int(8)), Some(&entry(8)));
        assert_eq!(snapshot.get(&Value::Int(5_000)), None);
        assert_eq!(snapshot.len(), 1_000);
        assert_eq!(live.get(&Value::Int(7)), Some(&entry(-7)));
        assert_eq!(live.get(&Value::Int(8)), None);
        assert_eq!(live.len(), 1_000);
        let shared = live
            .shards
            .iter()
            .zip(&snapshot.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert!(
            live.shards.len() >= 4,
            "1,000 entries are split over shards"
        );
        assert!(
            shared >= live.shards.len() - 3,
            "only written shards are copied: {shared} of {} shared",
            live.shards.len()
        );
        // Looking up or removing an absent key copies nothing.
        let before = live.clone();
        let mut probe = before.clone();
        assert!(probe.get_mut(&Value::Int(99_999)).is_none());
        assert!(probe.remove(&Value::Int(99_999)).is_none());
        assert!(
            probe
                .shards
                .iter()
                .zip(&before.shards)
                .all(|(a, b)| Arc::ptr_eq(a, b))
        );
    }

    #[test]
    fn iterates_every_entry_once() {
        let mut t = GroupTable::default();
        assert!(t.is_empty() && t.iter().next().is_none());
        for k in 0..500 {
            t.insert(Value::from(format!("k{k}").as_str()), entry(k));
        }
        let mut seen: Vec<i64> = t
            .iter()
            .map(|(_, e)| match e {
                StateEntry::Value(r) => match r[0] {
                    Value::Int(n) => n,
                    _ => -1,
                },
                _ => -1,
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        assert_eq!(t.len(), 500);
    }
}
