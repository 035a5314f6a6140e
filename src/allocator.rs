//! The global allocator: mimalloc, entered through its plain `mi_malloc` where the alignment
//! asked for is one that every mimalloc block of that size already has.
//!
//! The `mimalloc` crate's allocator calls `mi_malloc_aligned` for every allocation, and its
//! checks cost about 40 instructions more than `mi_malloc`'s fast path; at about 70
//! allocations a call that was 2.4k of the gateway's 89k instructions a call
//! (`bench/callgrind.sh`). Every size class of mimalloc's above 8 bytes is a multiple of 16
//! bytes (`MI_MAX_ALIGN_SIZE`; its bins round small sizes to two words), so a block is aligned
//! to 16, or to 8 in the 8-byte class: `mi_malloc` serves any alignment up to 16 that is no
//! larger than the size, the test std's `System` allocator makes for `malloc`. Larger
//! alignments (tokio's cache-padded task cells) still go to `mi_malloc_aligned`.
//!
//! One of the two places with unsafe code of ours (the other maps the journal's segments,
//! `actors/src/journal.rs`): `GlobalAlloc` is an unsafe trait, and its methods here forward to
//! mimalloc's C functions.
#![allow(unsafe_code)]

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// Every mimalloc block larger than 8 bytes is aligned to this (`MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

pub struct Allocator;

/// Whether `mi_malloc(size)` is aligned enough for `layout`: as std's `System` decides it for
/// `malloc`, since a block smaller than 16 bytes is aligned only to its size.
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: each method hands mimalloc a request it accepts for any size and alignment that a
// `Layout` can hold, and returns its answer (null on failure) unchanged; `dealloc` and
// `realloc` are given only blocks this allocator returned, as `GlobalAlloc` promises.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mi_malloc and mi_malloc_aligned take any size; the alignment is a power of
        // two, as a Layout's always is.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for alloc.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: ptr came from this allocator, so from mimalloc, which frees any of its
        // blocks, aligned or not, with mi_free.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: ptr came from this allocator with `layout`; the new block keeps its
        // alignment, by the same test on the new size.
        unsafe {
            if plain(layout.align(), new_size) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to two pages' worth of small classes, at every alignment up to 64, comes
    /// back aligned as asked, writable to its end, and reallocated with its contents kept.
    #[test]
    fn every_block_is_aligned_as_its_layout_asks() {
        let a = Allocator;
        for align in [1usize, 2, 4, 8, 16, 32, 64] {
            for size in 1..=2048usize {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: a non-zero size; the block is freed with the layout it was given.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xA5, size);
                    let q = a.realloc(p, layout, size * 3);
                    assert!(!q.is_null());
                    assert_eq!(
                        q as usize % align,
                        0,
                        "realloc of size {size} align {align}"
                    );
                    assert!((0..size).all(|i| *q.add(i) == 0xA5));
                    a.dealloc(q, Layout::from_size_align_unchecked(size * 3, align));
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
