//! One keyed state's entries in one key group, as the engine holds them while it runs and as a
//! snapshot hands them to the writer.
//!
//! The entries are spread over shards of at most a few hundred entries, each a flat hash map
//! behind an `Arc`. A snapshot clones the `Arc`s; the first write to a shard that a writer
//! still reads copies that one shard. So the copying after a barrier is spread over the records
//! that follow, a few hundred entries at most per record, while a lookup outside snapshots
//! costs one flat hash probe (a persistent trie, the alternative, costs a pointer hop per level
//! on every lookup, snapshot or not).

use super::keygroups::key_hash;
use super::prefetch::prefetch_row;
use super::statefile::StateEntry;
use super::value::Value;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use std::sync::Arc;

/// A table splits its shards in two (all at once) when they hold more than this on average, so
/// a copy after a barrier is of at most about this many entries per record processed, whatever
/// the state size, and a small table stays one flat map.
const SPLIT_ABOVE: usize = 64;

/// Entries are found by the key's `key_hash`, the hash that picked its key group: a record
/// carries it from the partitioner (`Key`), so a lookup hashes nothing.
type Shard = HashTable<(Value, StateEntry)>;

#[derive(Clone, Default)]
pub struct GroupTable {
    /// A power of two long (or empty before the first write). A key's shard is picked by the
    /// top bits of its hash, so doubling the shards splits each one in two.
    shards: Vec<Arc<Shard>>,
    len: usize,
}

/// The shard of a key hash among `shards` (a power of two): its top bits.
fn shard_index(hash: u64, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    (hash >> (64 - shards.trailing_zeros())) as usize
}

/// The hash a shard's table places an entry by. The keys of one table share the low bits of
/// `key_hash` (their key group) and those of one shard its top bits, so the bits are mixed
/// first (the finaliser of MurmurHash3).
fn slot_hash(hash: u64) -> u64 {
    let mut h = hash;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn entry_hash(entry: &(Value, StateEntry)) -> u64 {
    slot_hash(key_hash(&entry.0))
}

/// A shard to write to: copied first if a snapshot still reads it. The copy takes a
/// reference to every entry's row, each at its own heap address: those are asked for all at
/// once before copying, so the misses overlap (the copy is what a task pays right after a
/// barrier).
fn writable(shard: &mut Arc<Shard>) -> &mut Shard {
    // A plain load, no atomic read-modify-write on the hot path: shards have no `Weak`
    // references, so a count of one is the only owner (and a count above one that falls
    // meanwhile costs only these hints).
    if Arc::strong_count(shard) > 1 {
        shard.iter().for_each(|(_, e)| prefetch_row(e));
    }
    Arc::make_mut(shard)
}

impl GroupTable {
    /// The shard `hash` goes to, ready for one more entry: the shards are doubled first once
    /// they hold `SPLIT_ABOVE` on average (amortised like a hash map's growth; a shard a
    /// snapshot still reads is copied, not moved). Doubling before knowing whether the key is
    /// new lets the caller insert or update with a single probe.
    fn shard_for_write(&mut self, hash: u64) -> usize {
        let n = self.shards.len();
        if n == 0 {
            self.shards.push(Arc::default());
        } else if self.len >= n * SPLIT_ABOVE {
            self.split_into(n * 2);
        }
        shard_index(hash, self.shards.len())
    }

    /// Spreads the entries over `count` shards (a power of two, more than there are).
    fn split_into(&mut self, count: usize) {
        let mut next: Vec<Shard> = (0..count).map(|_| Shard::new()).collect();
        let mut place = |k: Value, e: StateEntry| {
            let h = key_hash(&k);
            next[shard_index(h, count)].insert_unique(slot_hash(h), (k, e), entry_hash);
        };
        for shard in std::mem::take(&mut self.shards) {
            match Arc::try_unwrap(shard) {
                Ok(owned) => owned.into_iter().for_each(|(k, e)| place(k, e)),
                Err(shared) => shared.iter().for_each(|(k, e)| place(k.clone(), e.clone())),
            }
        }
        self.shards = next.into_iter().map(Arc::new).collect();
    }

    /// Makes room for `additional` more entries at once (a restore knows a key group's count):
    /// the shards they will need, each sized for its share, instead of growing and splitting
    /// entry by entry.
    pub fn reserve(&mut self, additional: usize) {
        let want = self.len + additional;
        let mut count = self.shards.len().max(1);
        while want > count * SPLIT_ABOVE {
            count *= 2;
        }
        if count > self.shards.len() {
            self.split_into(count);
        }
        // Keys spread unevenly: an eighth more than the average share.
        let share = want.div_ceil(count);
        let share = share + share / 8;
        for shard in &mut self.shards {
            let shard = writable(shard);
            shard.reserve(share.saturating_sub(shard.len()), entry_hash);
        }
    }

    pub fn get(&self, key: &Value) -> Option<&StateEntry> {
        self.get_hashed(key_hash(key), key)
    }

    /// `get` of a key whose `key_hash` is known.
    pub fn get_hashed(&self, hash: u64, key: &Value) -> Option<&StateEntry> {
        let shard = self.shards.get(shard_index(hash, self.shards.len()))?;
        shard
            .find(slot_hash(hash), |(k, _)| k == key)
            .map(|(_, e)| e)
    }

    pub fn get_mut(&mut self, key: &Value) -> Option<&mut StateEntry> {
        self.get_mut_hashed(key_hash(key), key)
    }

    /// `get_mut` of a key whose `key_hash` is known.
    pub fn get_mut_hashed(&mut self, hash: u64, key: &Value) -> Option<&mut StateEntry> {
        let i = shard_index(hash, self.shards.len());
        let shard = self.shards.get_mut(i)?;
        let slot = slot_hash(hash);
        // No copy of a shard a snapshot still reads just to find the key absent.
        if Arc::get_mut(shard).is_none() && shard.find(slot, |(k, _)| k == key).is_none() {
            return None;
        }
        writable(shard)
            .find_mut(slot, |(k, _)| k == key)
            .map(|(_, e)| e)
    }

    pub fn insert(&mut self, key: Value, entry: StateEntry) -> Option<StateEntry> {
        self.insert_hashed(key_hash(&key), key, entry)
    }

    /// `insert` of a key whose `key_hash` is known.
    pub fn insert_hashed(
        &mut self,
        hash: u64,
        key: Value,
        entry: StateEntry,
    ) -> Option<StateEntry> {
        let i = self.shard_for_write(hash);
        match writable(&mut self.shards[i]).entry(slot_hash(hash), |(k, _)| *k == key, entry_hash) {
            Entry::Occupied(mut found) => Some(std::mem::replace(&mut found.get_mut().1, entry)),
            Entry::Vacant(free) => {
                free.insert((key, entry));
                self.len += 1;
                None
            }
        }
    }

    /// The entry of a key whose `key_hash` is known, inserted from `make` if absent (the key
    /// cloned only then).
    pub fn get_or_insert_with_hashed(
        &mut self,
        hash: u64,
        key: &Value,
        make: impl FnOnce() -> StateEntry,
    ) -> &mut StateEntry {
        let i = self.shard_for_write(hash);
        let len = &mut self.len;
        match writable(&mut self.shards[i]).entry(slot_hash(hash), |(k, _)| k == key, entry_hash) {
            Entry::Occupied(found) => &mut found.into_mut().1,
            Entry::Vacant(free) => {
                *len += 1;
                &mut free.insert((key.clone(), make())).into_mut().1
            }
        }
    }

    pub fn remove(&mut self, key: &Value) -> Option<StateEntry> {
        self.remove_hashed(key_hash(key), key)
    }

    /// `remove` of a key whose `key_hash` is known.
    pub fn remove_hashed(&mut self, hash: u64, key: &Value) -> Option<StateEntry> {
        // Absent: no copy of a shard a snapshot still reads.
        self.get_hashed(hash, key)?;
        let i = shard_index(hash, self.shards.len());
        let found = writable(&mut self.shards[i])
            .find_entry(slot_hash(hash), |(k, _)| k == key)
            .ok()?;
        let ((_, old), _) = found.remove();
        self.len -= 1;
        Some(old)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Value, &StateEntry)> {
        self.shards
            .iter()
            .flat_map(|s| s.iter().map(|(k, e)| (k, e)))
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
    fn a_reserved_table_holds_its_entries_without_splitting_again() {
        let mut t = GroupTable::default();
        t.reserve(3_000);
        let shards = t.shards.len();
        assert!(
            shards * SPLIT_ABOVE >= 3_000 && shards.is_power_of_two(),
            "{shards}"
        );
        for k in 0..3_000 {
            t.insert(Value::Int(k), entry(k));
        }
        assert_eq!(t.shards.len(), shards);
        assert_eq!(t.len(), 3_000);
        assert!((0..3_000).all(|k| t.get(&Value::Int(k)) == Some(&entry(k))));
        // Reserving more for a table with entries keeps them.
        t.reserve(10_000);
        assert!(t.shards.len() > shards);
        assert!((0..3_000).all(|k| t.get(&Value::Int(k)) == Some(&entry(k))));
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
