//! Event-time timers: items grouped by the watermark at which they are due, taken earliest
//! first.
//!
//! A hash map from due time to its items, and a min-heap of the distinct due times. Adding to a
//! due time already known is one hash probe; a new one is also pushed on the heap, which for
//! due times arriving in increasing order (the usual case: event time moves forward) is one
//! comparison. An ordered tree instead searches from its root on every add.

use smallvec::{SmallVec, smallvec};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::collections::hash_map::{Entry, HashMap};

/// The items due at one time; most due times have one (a window per key and end).
pub type DueItems<T> = SmallVec<[T; 1]>;

pub struct Timers<T> {
    by_due: HashMap<i64, DueItems<T>, foldhash::fast::RandomState>,
    /// Each due time of `by_due` once.
    order: BinaryHeap<Reverse<i64>>,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            by_due: HashMap::default(),
            order: BinaryHeap::new(),
        }
    }
}

impl<T> Timers<T> {
    pub fn add(&mut self, due: i64, item: T) {
        match self.by_due.entry(due) {
            Entry::Occupied(mut found) => found.get_mut().push(item),
            Entry::Vacant(free) => {
                free.insert(smallvec![item]);
                self.order.push(Reverse(due));
            }
        }
    }

    /// Takes every item due at or before `up_to`, earliest due time first.
    pub fn take_due(&mut self, up_to: i64) -> Vec<(i64, DueItems<T>)> {
        let mut taken = Vec::new();
        while let Some(&Reverse(due)) = self.order.peek() {
            if due > up_to {
                break;
            }
            self.order.pop();
            if let Some(items) = self.by_due.remove(&due) {
                taken.push((due, items));
            }
        }
        taken
    }

    /// Forgets every timer (a test's stand-in for a fresh operator before a restore).
    #[cfg(test)]
    pub fn clear(&mut self) {
        self.by_due.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_out_by_due_time_grouped_and_only_once_due() {
        let mut t = Timers::default();
        for (due, item) in [
            (30, "c"),
            (10, "a"),
            (20, "b"),
            (10, "a2"),
            (40, "d"),
            (5, "z"),
        ] {
            t.add(due, item);
        }
        assert!(t.take_due(4).is_empty());
        let taken = t.take_due(20);
        let dues: Vec<i64> = taken.iter().map(|(d, _)| *d).collect();
        assert_eq!(dues, [5, 10, 20]);
        assert_eq!(taken[1].1.as_slice(), ["a", "a2"]);
        // A due time taken is gone; one added again later comes out again.
        t.add(10, "late");
        let taken = t.take_due(i64::MAX);
        let items: Vec<&str> = taken.iter().flat_map(|(_, i)| i.iter().copied()).collect();
        assert_eq!(items, ["late", "c", "d"]);
        assert!(t.take_due(i64::MAX).is_empty());
        t.add(1, "x");
        t.clear();
        assert!(t.take_due(i64::MAX).is_empty());
    }
}
