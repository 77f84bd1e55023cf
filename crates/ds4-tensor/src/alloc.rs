//! Heap memory helpers: a global allocator that puts every large heap block on a cache-line
//! boundary, and per-thread scratch reuse ([`with_thread_local`]).
//!
//! The SIMD kernels read activation rows with 64-byte loads. glibc returns large blocks
//! (served by `mmap`) 16 bytes past a page boundary, so every such load of a `Vec<f32>`
//! activation buffer straddles two cache lines; on Zen 4 that measured 25-35 % slower in
//! the F16 multi-token kernel. Results never depend on alignment, only speed does. The
//! binaries install [`CacheLineAlloc`] with `#[global_allocator]`; a program embedding the
//! library may do the same.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of at least this many bytes get 64-byte alignment (smaller ones are left to
/// the system allocator's fast paths).
const LARGE: usize = 4096;

/// Cache-line size the large blocks are aligned to.
const LINE: usize = 64;

/// [`System`] with large blocks aligned to 64 bytes (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheLineAlloc;

impl CacheLineAlloc {
    /// The layout actually requested from the system allocator for `layout`.
    #[inline]
    fn widen(layout: Layout) -> Layout {
        if layout.size() >= LARGE && layout.align() < LINE {
            // Cannot fail: LINE is a power of two and the size is unchanged and was valid
            // with a smaller alignment; rounding it up to LINE cannot overflow isize here
            // because sizes that large fail in the system allocator first.
            Layout::from_size_align(layout.size(), LINE).unwrap_or(layout)
        } else {
            layout
        }
    }
}

// SAFETY: every method forwards to `System` with a layout that differs only in a larger
// alignment, and `dealloc`/`realloc` recompute the same widened layout from the caller's
// layout, so each block is freed with the layout it was allocated with.
unsafe impl GlobalAlloc for CacheLineAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract (non-zero size, as the caller guarantees).
        unsafe { System.alloc(Self::widen(layout)) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(Self::widen(layout)) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` with the widened form of `layout`.
        unsafe { System.dealloc(ptr, Self::widen(layout)) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = Self::widen(layout);
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let new = Self::widen(new);
        if old.align() == new.align() {
            // SAFETY: same alignment on both sides: the system realloc keeps it.
            unsafe { System.realloc(ptr, old, new_size) }
        } else {
            // Crossing the LARGE threshold changes the alignment: move by hand.
            // SAFETY: `new` has a non-zero size (new_size >= 1 per the contract); the copy
            // covers the smaller of the two live sizes; `ptr` is freed with its own layout.
            unsafe {
                let p = System.alloc(new);
                if !p.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, p, old.size().min(new_size));
                    System.dealloc(ptr, old);
                }
                p
            }
        }
    }
}

/// Runs `f` on the value of a thread-local `Cell`, taken out for the call and put back
/// after it: a per-thread scratch buffer reused across calls, without a `RefCell` borrow.
/// A call nested inside `f` on the same thread (rayon work stealing while `f` waits) finds
/// the default value and works on its own; the outer value is put back last.
pub fn with_thread_local<T: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut v = key.take();
    let r = f(&mut v);
    key.set(v);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_cache_line_aligned_and_survive_realloc() {
        let a = CacheLineAlloc;
        let small = Layout::from_size_align(100, 4).expect("layout");
        let big = Layout::from_size_align(1 << 20, 4).expect("layout");
        // SAFETY: non-zero sizes; every block is freed with the layout it has.
        unsafe {
            let p = a.alloc(big);
            assert!(!p.is_null());
            assert_eq!(p as usize % LINE, 0);
            p.write_bytes(7, big.size());
            // Shrink below the threshold and grow back: contents kept, alignment right.
            let q = a.realloc(p, big, 100);
            assert!(!q.is_null());
            assert_eq!(*q.add(99), 7);
            let r = a.realloc(q, small, 1 << 21);
            assert!(!r.is_null());
            assert_eq!(r as usize % LINE, 0);
            assert_eq!(*r.add(99), 7);
            a.dealloc(r, Layout::from_size_align(1 << 21, 4).expect("layout"));
            let z = a.alloc_zeroed(big);
            assert_eq!(z as usize % LINE, 0);
            assert!(
                std::slice::from_raw_parts(z, big.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            a.dealloc(z, big);
        }
    }
}
