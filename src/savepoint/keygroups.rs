//! Key groups: the unit in which keyed state is partitioned, snapshotted and rescaled.
//!
//! A job's keyed operator has `max_parallelism` key groups, fixed for the life of its state.
//! A key belongs to group `hash(key) mod max_parallelism`, where `hash` is XXH3-64 of the key's
//! payload (int and float: 8 bytes little endian; string: its UTF-8 bytes; null and bool: no
//! bytes) seeded with the key's type tag (see `codec`). Subtask `i` of `p` owns the contiguous
//! range `[(i*maxP + p - 1)/p, ((i+1)*maxP - 1)/p]`, the same rule as Flink's.

use super::value::Value;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Flink's default: `min(max(roundUpPow2(p + p/2), 128), 32768)`.
pub fn default_max_parallelism(parallelism: u32) -> u32 {
    let p = u64::from(parallelism.max(1));
    let wanted = (p + p / 2).next_power_of_two();
    wanted.clamp(128, 32768) as u32
}

pub const MAX_MAX_PARALLELISM: u32 = 32768;

pub fn key_hash(key: &Value) -> u64 {
    match key {
        Value::Null => xxh3_64_with_seed(&[], 0),
        Value::Bool(b) => xxh3_64_with_seed(&[], if *b { 2 } else { 1 }),
        Value::Int(i) => xxh3_64_with_seed(&i.to_le_bytes(), 3),
        Value::Float(f) => xxh3_64_with_seed(&f.to_le_bytes(), 4),
        Value::Str(s) => xxh3_64_with_seed(s.as_bytes(), 5),
    }
}

/// The key group a key belongs to.
pub fn key_group(key: &Value, max_parallelism: u32) -> u32 {
    key_group_of_hash(key_hash(key), max_parallelism)
}

/// The key group of a key whose `key_hash` is known.
pub fn key_group_of_hash(hash: u64, max_parallelism: u32) -> u32 {
    (hash % u64::from(max_parallelism.max(1))) as u32
}

/// An inclusive range of key groups; `end < start` is the empty range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGroupRange {
    pub start: u32,
    pub end: u32,
}

impl KeyGroupRange {
    pub fn len(&self) -> u32 {
        if self.end < self.start {
            0
        } else {
            self.end - self.start + 1
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, kg: u32) -> bool {
        kg >= self.start && kg <= self.end
    }

    pub fn intersect(&self, other: &KeyGroupRange) -> KeyGroupRange {
        KeyGroupRange {
            start: self.start.max(other.start),
            end: self.end.min(other.end),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + use<> {
        let (s, e) = (self.start, self.end);
        (s..=e).filter(move |_| e >= s)
    }
}

/// The key groups subtask `index` of `parallelism` owns.
pub fn range_for_subtask(max_parallelism: u32, parallelism: u32, index: u32) -> KeyGroupRange {
    let (m, p, i) = (
        u64::from(max_parallelism),
        u64::from(parallelism.max(1)),
        u64::from(index),
    );
    let start = (i * m).div_ceil(p);
    let end = ((i + 1) * m - 1) / p;
    KeyGroupRange {
        start: start as u32,
        end: end as u32,
    }
}

/// The subtask that owns a key group (the inverse of `range_for_subtask`).
pub fn subtask_for_key_group(max_parallelism: u32, parallelism: u32, kg: u32) -> u32 {
    (u64::from(kg) * u64::from(parallelism) / u64::from(max_parallelism.max(1))) as u32
}

/// How operator list state is handed out when a job is restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Every entry goes to exactly one subtask: entries of all old subtasks, in subtask
    /// order, are cut into `p` contiguous chunks; the first `total mod p` get one more.
    Split,
    /// Every subtask gets all entries of all old subtasks.
    Union,
    /// Every subtask gets a copy of the state (all old subtasks hold the same).
    Broadcast,
}

/// Redistributes operator list state from old subtasks (outer vec) to `new_parallelism`.
/// With an unchanged parallelism, split state stays where it was.
pub fn redistribute<T: Clone>(
    mode: Distribution,
    old: &[Vec<T>],
    new_parallelism: u32,
) -> Vec<Vec<T>> {
    let p = new_parallelism.max(1) as usize;
    match mode {
        Distribution::Split => {
            if old.len() == p {
                return old.to_vec();
            }
            let all: Vec<T> = old.iter().flatten().cloned().collect();
            let base = all.len() / p;
            let extra = all.len() % p;
            let mut out = Vec::with_capacity(p);
            let mut it = all.into_iter();
            for i in 0..p {
                let n = base + usize::from(i < extra);
                out.push(it.by_ref().take(n).collect());
            }
            out
        }
        Distribution::Union => {
            let all: Vec<T> = old.iter().flatten().cloned().collect();
            vec![all; p]
        }
        Distribution::Broadcast => {
            let first = old.first().cloned().unwrap_or_default();
            vec![first; p]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_max_parallelism_follows_flink() {
        assert_eq!(default_max_parallelism(1), 128);
        assert_eq!(default_max_parallelism(2), 128);
        assert_eq!(default_max_parallelism(100), 256); // 100 + 50 = 150 -> 256
        assert_eq!(default_max_parallelism(85), 128); // 85 + 42 = 127 -> 128
        assert_eq!(default_max_parallelism(86), 256); // 86 + 43 = 129 -> 256
        assert_eq!(default_max_parallelism(30000), 32768); // 45000 -> 65536, capped
    }

    #[test]
    fn subtask_ranges_hand_computed() {
        // maxP 128, p 3: [0,42], [43,85], [86,127]
        assert_eq!(
            range_for_subtask(128, 3, 0),
            KeyGroupRange { start: 0, end: 42 }
        );
        assert_eq!(
            range_for_subtask(128, 3, 1),
            KeyGroupRange { start: 43, end: 85 }
        );
        assert_eq!(
            range_for_subtask(128, 3, 2),
            KeyGroupRange {
                start: 86,
                end: 127
            }
        );
        // maxP 10, p 4: [0,2], [3,4], [5,7], [8,9]
        let r: Vec<_> = (0..4).map(|i| range_for_subtask(10, 4, i)).collect();
        assert_eq!(
            r,
            vec![
                KeyGroupRange { start: 0, end: 2 },
                KeyGroupRange { start: 3, end: 4 },
                KeyGroupRange { start: 5, end: 7 },
                KeyGroupRange { start: 8, end: 9 },
            ]
        );
        // p == maxP: one group each; p 1: everything.
        assert_eq!(
            range_for_subtask(4, 4, 3),
            KeyGroupRange { start: 3, end: 3 }
        );
        assert_eq!(
            range_for_subtask(128, 1, 0),
            KeyGroupRange { start: 0, end: 127 }
        );
    }

    #[test]
    fn ranges_partition_all_groups_and_match_the_owner_rule() {
        for &(m, p) in &[
            (128u32, 1u32),
            (128, 2),
            (128, 3),
            (128, 7),
            (10, 4),
            (256, 5),
            (32768, 33),
        ] {
            let mut next = 0;
            for i in 0..p {
                let r = range_for_subtask(m, p, i);
                assert_eq!(r.start, next, "maxP {m} p {p} subtask {i}");
                for kg in r.iter() {
                    assert_eq!(subtask_for_key_group(m, p, kg), i, "maxP {m} p {p} kg {kg}");
                }
                next = r.end + 1;
            }
            assert_eq!(next, m);
        }
    }

    #[test]
    fn key_groups_are_stable_and_in_range() {
        // Fixed by the format: these values must never change.
        assert_eq!(
            key_hash(&Value::Int(0)),
            xxh3_64_with_seed(&0i64.to_le_bytes(), 3)
        );
        let k = Value::from("user-17");
        assert_eq!(
            key_group(&k, 128),
            (xxh3_64_with_seed(b"user-17", 5) % 128) as u32
        );
        for i in 0..1000 {
            assert!(key_group(&Value::Int(i), 128) < 128);
        }
        // Spread: 10,000 keys over 128 groups, no group empty or more than twice the mean.
        let mut counts = [0u32; 128];
        for i in 0..10_000 {
            counts[key_group(&Value::Int(i), 128) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 0 && c < 160), "{counts:?}");
    }

    #[test]
    fn list_split_with_remainders() {
        let old = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7]];
        // 7 entries over 2: 4 + 3
        assert_eq!(
            redistribute(Distribution::Split, &old, 2),
            vec![vec![1, 2, 3, 4], vec![5, 6, 7]]
        );
        // 7 over 4: 2 2 2 1
        assert_eq!(
            redistribute(Distribution::Split, &old, 4),
            vec![vec![1, 2], vec![3, 4], vec![5, 6], vec![7]]
        );
        // 7 over 1
        assert_eq!(
            redistribute(Distribution::Split, &old, 1),
            vec![vec![1, 2, 3, 4, 5, 6, 7]]
        );
        // 2 entries over 3: one subtask empty
        assert_eq!(
            redistribute(Distribution::Split, &[vec![8], vec![9]], 3),
            vec![vec![8], vec![9], vec![]]
        );
        // same parallelism: kept in place even when uneven
        assert_eq!(redistribute(Distribution::Split, &old, 3), old);
    }

    #[test]
    fn union_and_broadcast() {
        let old = vec![vec!["a"], vec!["b", "c"]];
        assert_eq!(
            redistribute(Distribution::Union, &old, 3),
            vec![vec!["a", "b", "c"]; 3]
        );
        let same = vec![vec!["x", "y"], vec!["x", "y"]];
        assert_eq!(
            redistribute(Distribution::Broadcast, &same, 3),
            vec![vec!["x", "y"]; 3]
        );
    }
}
