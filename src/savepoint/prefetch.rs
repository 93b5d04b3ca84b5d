//! Cache prefetch hints for walking state entries.
//!
//! State entries and the strings they hold sit at scattered heap addresses, so touching one
//! (to encode it, or to take a reference to its row when a shard is copied) waits on memory,
//! and waits that follow one another cannot overlap. Asking for the memory of entries a few
//! places ahead lets those waits run side by side.

use super::statefile::StateEntry;
use super::value::Value;

/// Hints the CPU to load the cache line at `p`. Never faults, whatever the address.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: the `sse` feature this needs is enabled (checked by the cfg above), and a
        // prefetch only hints the cache: it reads nothing and never faults, whatever `p` is.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse")))]
    let _ = p;
}

fn prefetch_value(v: &Value) {
    if let Value::Str(s) = v {
        // The header and the first lines of the text; the rest streams after them.
        let p = s.as_ptr();
        prefetch(p);
        prefetch(p.wrapping_add(64));
        prefetch(p.wrapping_add(128));
    }
}

/// First stage: the key's string and the entry's row, both reached from the table itself.
pub fn prefetch_outer(key: &Value, entry: &StateEntry) {
    prefetch_value(key);
    prefetch_row(entry);
}

/// The row (or list) of an entry in its own allocation: what a copy of the entry touches.
pub fn prefetch_row(entry: &StateEntry) {
    match entry {
        StateEntry::Value(row) => match row.heap() {
            Some(heap) => prefetch(heap.cast()),
            None => row.iter().for_each(prefetch_value),
        },
        StateEntry::List(rows) => prefetch(rows.as_ptr().cast()),
        StateEntry::Map(_) => {}
    }
}

/// Second stage, once a shared row is in cache: the strings it points to (a one-field row's
/// string was asked for in the first stage, from the table itself).
pub fn prefetch_inner(entry: &StateEntry) {
    if let StateEntry::Value(row) = entry
        && row.heap().is_some()
    {
        row.iter().take(4).for_each(prefetch_value);
    }
}
