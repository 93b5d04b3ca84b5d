//! Event-time timers: items with the watermark at which they are due, taken earliest first.
//!
//! Items go into buckets of 1,024 ms of due time, appended in arrival order; the buckets sit
//! in an ordered map by their start. Taking what is due takes whole buckets from the front and
//! sorts each by due time (a stable sort: items due at once come out in the order they were
//! added; and since event time mostly moves forward, a bucket is mostly sorted already). Adding
//! and taking walk memory in order: with a window per record (1 ms windows) tens of thousands
//! of timers wait between two watermarks, and a hash map from due time plus a heap of due times
//! made each add and each take a miss in the cache or several.

use std::collections::BTreeMap;

/// The width of a bucket as a power of two of milliseconds: 1,024 ms.
const BUCKET_BITS: u32 = 10;

pub struct Timers<T> {
    /// Bucket start (due >> BUCKET_BITS) -> (due, item) in the order added.
    buckets: BTreeMap<i64, Vec<(i64, T)>>,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            buckets: BTreeMap::new(),
        }
    }
}

impl<T> Timers<T> {
    pub fn add(&mut self, due: i64, item: T) {
        // Most adds go to the newest bucket; the map's search is over a few dozen buckets.
        self.buckets
            .entry(due >> BUCKET_BITS)
            .or_default()
            .push((due, item));
    }

    /// Takes every item due at or before `up_to`: earliest due time first, and items due at
    /// the same time in the order they were added.
    pub fn take_due(&mut self, up_to: i64) -> Vec<(i64, T)> {
        let mut taken = Vec::new();
        let last = up_to >> BUCKET_BITS;
        while let Some(entry) = self.buckets.first_entry() {
            let bucket = *entry.key();
            if bucket > last {
                break;
            }
            let items = if bucket < last {
                entry.remove()
            } else {
                // The bucket `up_to` falls in: its later items stay.
                let (due, keep): (Vec<_>, Vec<_>) =
                    entry.remove().into_iter().partition(|(d, _)| *d <= up_to);
                if !keep.is_empty() {
                    self.buckets.insert(bucket, keep);
                }
                due
            };
            let mut items = sorted_by_due(items, bucket << BUCKET_BITS);
            if taken.is_empty() {
                taken = items;
            } else {
                taken.append(&mut items);
            }
            if bucket == last {
                break;
            }
        }
        taken
    }

    /// Forgets every timer (a test's stand-in for a fresh operator before a restore).
    #[cfg(test)]
    pub fn clear(&mut self) {
        self.buckets.clear();
    }
}

/// One bucket's items (all due in the 1,024 ms from `base`), sorted by due time and
/// otherwise in the order added. Sorts 8-byte keys (the due's offset in the bucket above the
/// item's position) and then moves each item once, instead of moving whole items at every step
/// of the sort.
fn sorted_by_due<T>(mut items: Vec<(i64, T)>, base: i64) -> Vec<(i64, T)> {
    if items.is_sorted_by_key(|(due, _)| *due) {
        return items;
    }
    if u32::try_from(items.len()).is_err() {
        items.sort_by_key(|(due, _)| *due);
        return items;
    }
    let mut keys: Vec<u64> = items
        .iter()
        .enumerate()
        .map(|(i, (due, _))| ((due - base) as u64) << 32 | i as u64)
        .collect();
    keys.sort_unstable();
    let mut slots: Vec<Option<(i64, T)>> = items.into_iter().map(Some).collect();
    keys.iter()
        .filter_map(|k| slots[(k & u64::from(u32::MAX)) as usize].take())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(t.take_due(-3_001), []);
        assert_eq!(t.take_due(4), [(-3_000, "before zero")]);
        assert_eq!(t.take_due(20), [(5, "z"), (10, "a"), (10, "a2"), (20, "b")]);
        // A due time taken is gone; one added again later comes out again.
        t.add(10, "late");
        let items: Vec<&str> = t.take_due(i64::MAX).into_iter().map(|(_, i)| i).collect();
        assert_eq!(items, ["late", "c", "d", "far"]);
        assert!(t.take_due(i64::MAX).is_empty());
        t.add(1, "x");
        t.clear();
        assert!(t.take_due(i64::MAX).is_empty());
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
            let step = t.take_due(up_to);
            assert!(step.iter().all(|(d, _)| *d <= up_to));
            out.extend(step);
        }
        assert!(t.take_due(i64::MAX).is_empty());
        all.sort_by_key(|(d, _)| *d);
        assert_eq!(out, all);
    }
}
