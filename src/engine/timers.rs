//! Event-time timers: items with the watermark at which they are due, taken earliest first.
//!
//! Items go into buckets of 1,024 ms of due time, appended in arrival order; the buckets sit
//! in an ordered map by their start. Taking what is due takes whole buckets from the front, one
//! at a time, and sorts each by due time (a stable counting sort: items due at once come out in
//! the order they were added; and since event time mostly moves forward, a bucket is often
//! sorted already). Adding
//! and taking walk memory in order: with a window per record (1 ms windows) tens of thousands
//! of timers wait between two watermarks, and a hash map from due time plus a heap of due times
//! made each add and each take a miss in the cache or several.

use std::collections::BTreeMap;

/// The width of a bucket as a power of two of milliseconds: 1,024 ms.
const BUCKET_BITS: u32 = 10;

pub struct Timers<T> {
    /// Bucket start (due >> BUCKET_BITS) -> (due, item) in the order added.
    buckets: BTreeMap<i64, Vec<(i64, T)>>,
    /// The length of the bucket taken last, whole: a new newest bucket is made that large at
    /// once (up to `PRESIZE_LIMIT`), so that a steady stream of timers does not grow it step
    /// by step, copying its items at each step.
    last_taken: usize,
}

/// Below this many items a bucket is sorted by comparison: counting costs a pass over the
/// bucket's 1,024 offsets.
const COUNTING_SORT_MIN: usize = 64;

/// The most items a new bucket is made room for ahead (48 KB of 48-byte items).
const PRESIZE_LIMIT: usize = 1024;

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            buckets: BTreeMap::new(),
            last_taken: 0,
        }
    }
}

impl<T> Timers<T> {
    pub fn add(&mut self, due: i64, item: T) {
        let bucket = due >> BUCKET_BITS;
        // Most adds go to the newest bucket: reached without a search (the map's path to its
        // last leaf), the search through the buckets' keys only for the others.
        if let Some(mut newest) = self.buckets.last_entry()
            && *newest.key() == bucket
        {
            newest.get_mut().push((due, item));
            return;
        }
        if let Some(items) = self.buckets.get_mut(&bucket) {
            items.push((due, item));
            return;
        }
        // Only a bucket past all others is sized by the last one taken: a bucket behind them
        // holds stragglers.
        let newest = self
            .buckets
            .last_key_value()
            .is_none_or(|(b, _)| *b < bucket);
        let room = if newest {
            self.last_taken.min(PRESIZE_LIMIT)
        } else {
            0
        };
        let mut items = Vec::with_capacity(room.max(1));
        items.push((due, item));
        self.buckets.insert(bucket, items);
    }

    /// How many items the buckets that `take_next_due(up_to)` would go through hold: an upper
    /// bound of what is due, for sizing the output once.
    pub fn len_up_to(&self, up_to: i64) -> usize {
        self.buckets
            .range(..=up_to >> BUCKET_BITS)
            .map(|(_, items)| items.len())
            .sum()
    }

    /// Takes the items of the earliest bucket that are due at or before `up_to`, earliest due
    /// time first and items due at the same time in the order they were added; `None` when
    /// nothing is due. Taken bucket by bucket, not gathered into one list: each item is moved
    /// once, and an item added while the earlier ones are handled (due already) comes out next.
    pub fn take_next_due(&mut self, up_to: i64) -> Option<Vec<(i64, T)>> {
        let last = up_to >> BUCKET_BITS;
        let entry = self.buckets.first_entry()?;
        let bucket = *entry.key();
        if bucket > last {
            return None;
        }
        let base = bucket << BUCKET_BITS;
        if bucket < last {
            let items = entry.remove();
            self.last_taken = items.len();
            return Some(sorted_by_due(items, base));
        }
        // The bucket `up_to` falls in: its later items stay, in the bucket's own memory.
        let mut items = sorted_by_due(entry.remove(), base);
        let split = items.partition_point(|(d, _)| *d <= up_to);
        if split == items.len() {
            return Some(items);
        }
        let due: Vec<(i64, T)> = items.drain(..split).collect();
        self.buckets.insert(bucket, items);
        (!due.is_empty()).then_some(due)
    }

    /// Forgets every timer (a test's stand-in for a fresh operator before a restore).
    #[cfg(test)]
    pub fn clear(&mut self) {
        self.buckets.clear();
    }
}

/// One bucket's items (all due in the 1,024 ms from `base`), sorted by due time and
/// otherwise in the order added. A counting sort by the due's offset in the bucket: linear in
/// the items, each moved twice (a comparison sort of the offsets took about 140 instructions
/// per item on a 1 ms window job's buckets, its two inputs interleaved). A few items are
/// sorted in place.
fn sorted_by_due<T>(mut items: Vec<(i64, T)>, base: i64) -> Vec<(i64, T)> {
    if items.is_sorted_by_key(|(due, _)| *due) {
        return items;
    }
    if items.len() < COUNTING_SORT_MIN {
        items.sort_by_key(|(due, _)| *due);
        return items;
    }
    let offset = |due: i64| (due - base) as usize;
    // Where the items of each offset go, from the counts of the offsets before it.
    let mut next = vec![0usize; (1 << BUCKET_BITS) + 1];
    for (due, _) in &items {
        next[offset(*due) + 1] += 1;
    }
    for i in 1..next.len() {
        next[i] += next[i - 1];
    }
    let mut slots: Vec<Option<(i64, T)>> = (0..items.len()).map(|_| None).collect();
    for item in items {
        let at = &mut next[offset(item.0)];
        slots[*at] = Some(item);
        *at += 1;
    }
    // Sized first: collected through `flatten`, the list would grow step by step, copying.
    let mut sorted = Vec::with_capacity(slots.len());
    sorted.extend(slots.into_iter().flatten());
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything due at or before `up_to`, bucket by bucket.
    fn take_due<T>(t: &mut Timers<T>, up_to: i64) -> Vec<(i64, T)> {
        let mut all = Vec::new();
        while let Some(items) = t.take_next_due(up_to) {
            assert!(!items.is_empty(), "an empty take");
            all.extend(items);
        }
        all
    }

    #[test]
    fn items_come_out_by_due_time_in_order_added_and_only_once_due() {
        let mut t = Timers::default();
        for (due, item) in [
            (30, "c"),
            (10, "a"),
            (20, "b"),
            (10, "a2"),
            (40, "d"),
            (5, "z"),
            (5_000, "far"),
            (-3_000, "before zero"),
        ] {
            t.add(due, item);
        }
        // Every item of the buckets up to 20's: 20's own (six) and the one before zero.
        assert_eq!(t.len_up_to(20), 7);
        assert_eq!(take_due(&mut t, -3_001), []);
        assert_eq!(take_due(&mut t, 4), [(-3_000, "before zero")]);
        assert_eq!(
            take_due(&mut t, 20),
            [(5, "z"), (10, "a"), (10, "a2"), (20, "b")]
        );
        // A due time taken is gone; one added again later comes out again.
        t.add(10, "late");
        let items: Vec<&str> = take_due(&mut t, i64::MAX)
            .into_iter()
            .map(|(_, i)| i)
            .collect();
        assert_eq!(items, ["late", "c", "d", "far"]);
        assert!(take_due(&mut t, i64::MAX).is_empty());
        t.add(1, "x");
        t.clear();
        assert!(take_due(&mut t, i64::MAX).is_empty());
    }

    #[test]
    fn a_take_across_many_buckets_matches_a_full_sort() {
        // Due times out of order over several buckets (two inputs interleaved, as a window's
        // subtask sees them), taken in steps: what comes out is each step's items sorted.
        let mut t = Timers::default();
        let mut all = Vec::new();
        for i in 0..20_000i64 {
            let due = if i % 2 == 0 { i } else { 15_000 - i / 2 };
            t.add(due, i);
            all.push((due, i));
        }
        let mut out = Vec::new();
        for up_to in [-1, 0, 999, 1_023, 1_024, 7_777, 12_000, 19_999] {
            let step = take_due(&mut t, up_to);
            assert!(step.iter().all(|(d, _)| *d <= up_to));
            out.extend(step);
        }
        assert!(take_due(&mut t, i64::MAX).is_empty());
        all.sort_by_key(|(d, _)| *d);
        assert_eq!(out, all);
    }
}
