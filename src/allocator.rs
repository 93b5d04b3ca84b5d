//! The global allocator of the `sjob` binary and the benchmarks: mimalloc, asked for plain
//! blocks whenever a plain block is aligned enough.
//!
//! Rust passes an alignment with every request. The `mimalloc` crate's allocator hands each one
//! to `mi_malloc_aligned`, and mimalloc 3 serves that from its fast path only while the size
//! class's free list is not empty; otherwise it takes a plain block only if the class size is a
//! power of two, and for any other size allocates `size + align - 1` bytes. A request of exactly
//! a class size (48, 112, 192 bytes: a window's row, a record's spilled fields) then lands one
//! class up (64, 128, 224) and pays the slow path every time, because its own class's page is
//! never collected. Every mimalloc block is aligned to 8 bytes, and a request of a multiple of
//! 16 bytes gets a class that is one too (classes are exact up to 64 bytes and multiples of 16
//! above) in a page whose first block is 16-aligned, so such requests go to `mi_malloc` and the
//! rest to the aligned functions.
//!
//! [`manage_huge_pages`] lets the engine turn the kernel's transparent huge pages off while a
//! snapshot is taken ([`HugePagesOff`]). A task thread that touches a fresh 2 MB page waits
//! while the kernel zeroes it (on a VM whose memory the host backs lazily, 512 host faults in
//! one: 6-10 ms of one batch), and a snapshot is when the tasks touch fresh memory: the entries
//! they write beside those the writers still read. Outside snapshots the huge pages stay: the
//! state's lookups miss the TLB less with them. Savepoint bench on this project's 2-core VM
//! (1 GB of state): p99 stall while the savepoint is written 22-35 ms with huge pages, 12-14 ms
//! without; with them off throughout, the keyed count lost up to 12 % in some sets of runs.
//!
//! The operator has them off throughout ([`huge_pages_off_for_good`]): it gains nothing from
//! them and each one makes 2 MB of its small heap resident.

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::sync::Mutex;

/// Whether [`HugePagesOff`] guards turn huge pages off (set by [`manage_huge_pages`]), and
/// how many are held.
static HUGE_PAGES: Mutex<(bool, usize)> = Mutex::new((false, 0));

/// Lets [`HugePagesOff`] turn transparent huge pages off for this process while one is held,
/// unless `MIMALLOC_ALLOW_THP` is set (mimalloc reads it itself: `0` keeps them off
/// throughout, `1` on throughout). Call it first thing in `main`; a process that does not
/// (a library's user, the tests) keeps the kernel's setting. Returns whether it manages them.
pub fn manage_huge_pages() -> bool {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() || !cfg!(target_os = "linux") {
        return false;
    }
    lock_huge_pages().0 = true;
    true
}

/// Turns transparent huge pages off for the rest of this process's life (and the processes it
/// starts), unless `MIMALLOC_ALLOW_THP` is set. For the operator: its heap is small and
/// scattered, and a huge page makes 2 MB resident where it uses a few kilobytes (operator bench,
/// 1,000 StatefulJobs: 47-51 MB resident with them, 31-32 MB without). Returns whether it did.
pub fn huge_pages_off_for_good() -> bool {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() || !cfg!(target_os = "linux") {
        return false;
    }
    // Guards taken from now on leave the flag alone.
    lock_huge_pages().0 = false;
    set_huge_pages_disabled(true);
    true
}

fn lock_huge_pages() -> std::sync::MutexGuard<'static, (bool, usize)> {
    HUGE_PAGES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets the process's `PR_SET_THP_DISABLE` flag (inherited by the processes it starts).
fn set_huge_pages_disabled(disabled: bool) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(2) with PR_SET_THP_DISABLE sets a flag of this process; no pointers.
    unsafe {
        libc::prctl(
            libc::PR_SET_THP_DISABLE,
            libc::c_ulong::from(disabled),
            0,
            0,
            0,
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = disabled;
}

/// While at least one is held (and [`manage_huge_pages`] was called), memory the process
/// touches for the first time comes in 4 KB pages. A snapshot holds one from its barrier until
/// its last writer lets go.
pub struct HugePagesOff {
    managed: bool,
}

impl HugePagesOff {
    pub fn take() -> HugePagesOff {
        let mut state = lock_huge_pages();
        if let Some(disabled) = count_guard(&mut state, true) {
            set_huge_pages_disabled(disabled);
        }
        HugePagesOff { managed: state.0 }
    }
}

impl Drop for HugePagesOff {
    fn drop(&mut self) {
        if !self.managed {
            return;
        }
        let mut state = lock_huge_pages();
        if let Some(disabled) = count_guard(&mut state, false) {
            set_huge_pages_disabled(disabled);
        }
    }
}

/// Counts a guard taken or dropped in `(managed, held)`; the flag to set when that turns huge
/// pages off (the first guard) or on again (the last).
fn count_guard(state: &mut (bool, usize), taken: bool) -> Option<bool> {
    let (managed, held) = state;
    if !*managed {
        return None;
    }
    if taken {
        *held += 1;
        (*held == 1).then_some(true)
    } else {
        *held = held.saturating_sub(1);
        (*held == 0).then_some(false)
    }
}

impl std::fmt::Debug for HugePagesOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugePagesOff")
            .field("managed", &self.managed)
            .finish()
    }
}

/// mimalloc without the aligned slow path for ordinary alignments.
pub struct Allocator;

/// Whether a plain mimalloc block of `size` bytes is aligned to `align`.
#[inline]
fn plain_is_aligned(size: usize, align: usize) -> bool {
    align <= 8 || (align == 16 && size.is_multiple_of(16))
}

// SAFETY: every block comes from mimalloc and goes back to it through `mi_free` or
// `mi_realloc*`; a block is plain only when `plain_is_aligned` holds for its layout, which
// mimalloc's size classes guarantee (see the module's doc), otherwise it is asked for with the
// layout's alignment.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions take any size and a power-of-two alignment.
        unsafe { block(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { block(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; the new block keeps the layout's alignment.
        unsafe {
            if plain_is_aligned(new_size, layout.align()) {
                mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

/// A block for `layout`: `plain(size)` when a plain block is aligned enough, else
/// `aligned(size, align)`.
///
/// # Safety
/// As `GlobalAlloc::alloc`; `plain` and `aligned` are mimalloc's allocation functions.
#[inline]
unsafe fn block(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    // SAFETY: the caller's: mimalloc functions with a size and a power-of-two alignment.
    unsafe {
        if plain_is_aligned(layout.size(), layout.align()) {
            plain(layout.size()) as *mut u8
        } else {
            aligned(layout.size(), layout.align()) as *mut u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_guard_turns_huge_pages_off_and_the_last_on() {
        let mut state = (true, 0);
        assert_eq!(count_guard(&mut state, true), Some(true));
        assert_eq!(count_guard(&mut state, true), None);
        assert_eq!(count_guard(&mut state, false), None, "one is still held");
        assert_eq!(count_guard(&mut state, false), Some(false));
        let mut unmanaged = (false, 0);
        assert_eq!(count_guard(&mut unmanaged, true), None);
        assert_eq!(count_guard(&mut unmanaged, false), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn the_process_flag_follows() {
        // No test in this process calls `manage_huge_pages`: no guard flips the flag meanwhile.
        // SAFETY: prctl(2) reads a flag of this process.
        let disabled = || unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) } == 1;
        let before = disabled();
        set_huge_pages_disabled(true);
        assert!(disabled());
        set_huge_pages_disabled(false);
        assert!(!disabled());
        set_huge_pages_disabled(before);
    }

    #[test]
    fn every_block_has_its_alignment_and_a_class_size_request_its_own_class() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in (1..=2048).chain([4095, 4096, 65_536, 1 << 20]) {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: a non-zero size; the block is written within its size and freed once.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null(), "{size} bytes, aligned {align}");
                    assert_eq!(p as usize % align, 0, "{size} bytes, aligned {align}");
                    p.write_bytes(0xab, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert_eq!(
                        q as usize % align,
                        0,
                        "grown to {} aligned {align}",
                        size * 3
                    );
                    assert_eq!(*q.add(size - 1), 0xab);
                    a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
        // A 48-byte request (a window row of two values, say) gets a 48-byte block, not the
        // 64 the aligned path would give it once its class's free list runs dry.
        let layout = Layout::from_size_align(48, 8).unwrap();
        // SAFETY: allocated, measured and freed here.
        unsafe {
            let blocks: Vec<*mut u8> = (0..10_000).map(|_| a.alloc(layout)).collect();
            for &p in &blocks {
                assert_eq!(mi::mi_usable_size(p as *const c_void), 48);
            }
            for p in blocks {
                a.dealloc(p, layout);
            }
        }
    }
}
