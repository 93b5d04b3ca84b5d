//! Where a map state's sorted entries live: a `ThinVec`, whose length and capacity sit in its
//! heap block, so the map is one pointer in the table's slot (a `Vec` is three). With the other
//! kinds of state as small, a state table's slot is 32 bytes instead of 48, which is memory for
//! every key of every keyed state. `litemap` keeps the entries sorted over any store that
//! implements its traits; these delegate to the `ThinVec`.

use litemap::store::{
    Store, StoreBulkMut, StoreConstEmpty, StoreFromIterable, StoreFromIterator, StoreIntoIterator,
    StoreIterable, StoreIterableMut, StoreMut,
};
use std::cmp::Ordering;
use thin_vec::ThinVec;

/// A map state's entries, sorted by key (see the module's doc).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ThinStore<K, V>(ThinVec<(K, V)>);

type Pair<'a, K, V> = (&'a K, &'a V);

fn pair<K, V>((k, v): &(K, V)) -> Pair<'_, K, V> {
    (k, v)
}

fn pair_mut<K, V>((k, v): &mut (K, V)) -> (&K, &mut V) {
    (k, v)
}

impl<K, V> StoreConstEmpty<K, V> for ThinStore<K, V> {
    const EMPTY: Self = ThinStore(ThinVec::new());
}

impl<K, V> Store<K, V> for ThinStore<K, V> {
    fn lm_len(&self) -> usize {
        self.0.len()
    }

    fn lm_get(&self, index: usize) -> Option<(&K, &V)> {
        self.0.get(index).map(pair)
    }

    fn lm_binary_search_by<F>(&self, mut cmp: F) -> Result<usize, usize>
    where
        F: FnMut(&K) -> Ordering,
    {
        self.0.binary_search_by(|(k, _)| cmp(k))
    }
}

impl<K, V> StoreMut<K, V> for ThinStore<K, V> {
    fn lm_with_capacity(capacity: usize) -> Self {
        ThinStore(ThinVec::with_capacity(capacity))
    }

    fn lm_reserve(&mut self, additional: usize) {
        self.0.reserve(additional)
    }

    fn lm_get_mut(&mut self, index: usize) -> Option<(&K, &mut V)> {
        self.0.get_mut(index).map(pair_mut)
    }

    fn lm_push(&mut self, key: K, value: V) {
        self.0.push((key, value))
    }

    fn lm_insert(&mut self, index: usize, key: K, value: V) {
        self.0.insert(index, (key, value))
    }

    fn lm_remove(&mut self, index: usize) -> (K, V) {
        self.0.remove(index)
    }

    fn lm_clear(&mut self) {
        self.0.clear()
    }
}

impl<K: Ord, V> StoreBulkMut<K, V> for ThinStore<K, V> {
    fn lm_retain<F>(&mut self, mut predicate: F)
    where
        F: FnMut(&K, &V) -> bool,
    {
        self.0.retain(|(k, v)| predicate(k, v))
    }

    /// Appends, then sorts by key and keeps the last of equal keys, as an insert would.
    fn lm_extend<I>(&mut self, other: I)
    where
        I: IntoIterator<Item = (K, V)>,
    {
        self.0.extend(other);
        if self.0.windows(2).all(|w| w[0].0 < w[1].0) {
            return;
        }
        // Stable: of equal keys, the one added last ends up last.
        self.0.sort_by(|a, b| a.0.cmp(&b.0));
        let entries = std::mem::take(&mut self.0);
        let mut out: ThinVec<(K, V)> = ThinVec::with_capacity(entries.len());
        for (k, v) in entries {
            match out.last_mut() {
                Some(last) if last.0 == k => *last = (k, v),
                _ => out.push((k, v)),
            }
        }
        self.0 = out;
    }
}

impl<K: Ord, V> StoreFromIterable<K, V> for ThinStore<K, V> {
    fn lm_sort_from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut store = ThinStore(ThinVec::new());
        store.lm_extend(iter);
        store
    }
}

impl<'a, K: 'a, V: 'a> StoreIterable<'a, K, V> for ThinStore<K, V> {
    type KeyValueIter =
        std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> Pair<'a, K, V>>;

    fn lm_iter(&'a self) -> Self::KeyValueIter {
        self.0.iter().map(pair as fn(&'a (K, V)) -> Pair<'a, K, V>)
    }
}

impl<'a, K: 'a, V: 'a> StoreIterableMut<'a, K, V> for ThinStore<K, V> {
    type KeyValueIterMut =
        std::iter::Map<std::slice::IterMut<'a, (K, V)>, fn(&'a mut (K, V)) -> (&'a K, &'a mut V)>;

    fn lm_iter_mut(&'a mut self) -> Self::KeyValueIterMut {
        self.0
            .iter_mut()
            .map(pair_mut as fn(&'a mut (K, V)) -> (&'a K, &'a mut V))
    }
}

impl<K, V> StoreIntoIterator<K, V> for ThinStore<K, V> {
    type KeyValueIntoIter = thin_vec::IntoIter<(K, V)>;

    fn lm_into_iter(self) -> Self::KeyValueIntoIter {
        self.0.into_iter()
    }
}

impl<K, V> FromIterator<(K, V)> for ThinStore<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        ThinStore(iter.into_iter().collect())
    }
}

impl<K, V> StoreFromIterator<K, V> for ThinStore<K, V> {}

#[cfg(test)]
mod tests {
    use super::*;
    use litemap::LiteMap;

    type Map = LiteMap<i64, &'static str, ThinStore<i64, &'static str>>;

    #[test]
    fn a_map_over_it_stays_sorted_and_is_one_pointer() {
        assert_eq!(std::mem::size_of::<Map>(), std::mem::size_of::<usize>());
        let mut m = Map::new();
        assert!(m.is_empty());
        for (k, v) in [(5, "e"), (1, "a"), (3, "c"), (3, "C")] {
            m.insert(k, v);
        }
        assert_eq!(
            m.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [(1, "a"), (3, "C"), (5, "e")]
        );
        *m.entry(7).or_insert_with(|| "g") = "G";
        assert_eq!(m.get(&7), Some(&"G"));
        assert_eq!(m.get_indexed(0), Some((&1, &"a")));
        assert_eq!(m.remove(&1), Some("a"));
        assert_eq!(m.len(), 3);
        // Collected out of order, with a repeated key: sorted, the last value kept.
        let c: Map = [(9, "x"), (2, "b"), (9, "y"), (4, "d")]
            .into_iter()
            .collect();
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            [(2, "b"), (4, "d"), (9, "y")]
        );
    }
}
