//! Output arrays of batch and record reads, kept for later reads once their user has let
//! them go.
//!
//! A training loop reads a batch, trains on it for a while and drops it. By then the
//! allocator has handed the batch's pages back to the OS (mimalloc purges memory that stays
//! free for about 100 ms), so the next batch of about the same size is written into fresh
//! pages: a page fault and a page zeroed by the kernel for every page it touches (46% of
//! the time of padded reads in a loop with 250 ms steps; benches/README.md). A
//! [`Store`](crate::reader::Store) takes its batches' arrays from a pool, and whoever owns
//! a batch's arrays (the Python bindings: the numpy array's base object) gives each one
//! back when its last user is done with it.

use std::sync::Mutex;

/// How many free arrays of one element type a pool keeps whatever their size. A batch
/// takes two or three i32 arrays and one f32 array, and a loop holds one batch while it
/// reads the next, so four cover a batch in use plus the one given back.
pub const KEPT_PER_TYPE: usize = 4;
/// Beyond [`KEPT_PER_TYPE`] arrays, a pool keeps more while they total at most this many
/// bytes per element type: single records come three arrays each, and a DataLoader worker
/// holds a batch of them (tens of records) before collating.
pub const KEPT_BYTES_PER_TYPE: usize = 64 << 20;

/// Free arrays of one element type.
#[derive(Debug, Default)]
pub struct Shelf<T> {
    free: Mutex<Vec<Vec<T>>>,
}

impl<T: Copy> Shelf<T> {
    /// An empty array with room for `n` elements: the smallest kept one that is big
    /// enough (so small arrays do not take the big ones), else a new allocation.
    fn take(&self, n: usize) -> Vec<T> {
        if let Ok(mut free) = self.free.lock() {
            let fits = free
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= n)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            if let Some(i) = fits {
                let mut v = free.swap_remove(i);
                v.clear();
                return v;
            }
        }
        Vec::with_capacity(n)
    }

    /// Keep `v` for a later read: while fewer than [`KEPT_PER_TYPE`] arrays are kept, or
    /// while the kept ones and `v` total at most [`KEPT_BYTES_PER_TYPE`]. Else, with just
    /// [`KEPT_PER_TYPE`] kept, `v` replaces the smallest if it is bigger (a bigger array
    /// serves every smaller batch); otherwise it is freed. So a pool holds at most the
    /// larger of that byte budget and four of the biggest arrays it was given.
    fn give(&self, mut v: Vec<T>) {
        if v.capacity() == 0 {
            return;
        }
        v.clear();
        let Ok(mut free) = self.free.lock() else {
            return;
        };
        let bytes = |n: usize| n.saturating_mul(std::mem::size_of::<T>());
        let kept: usize = free.iter().map(|b| bytes(b.capacity())).sum();
        if free.len() < KEPT_PER_TYPE
            || kept.saturating_add(bytes(v.capacity())) <= KEPT_BYTES_PER_TYPE
        {
            free.push(v);
            return;
        }
        if free.len() == KEPT_PER_TYPE
            && let Some(smallest) = free.iter_mut().min_by_key(|b| b.capacity())
            && smallest.capacity() < v.capacity()
        {
            *smallest = v;
        }
    }

    fn kept(&self) -> Vec<usize> {
        self.free.lock().map(|f| f.iter().map(Vec::capacity).collect()).unwrap_or_default()
    }
}

/// Free output arrays of a store's reads, by element type.
#[derive(Debug, Default)]
pub struct BufferPool {
    i32s: Shelf<i32>,
    u32s: Shelf<u32>,
    f32s: Shelf<f32>,
}

/// Element types a [`BufferPool`] keeps.
pub trait Pooled: Copy + Sized {
    fn shelf(pool: &BufferPool) -> &Shelf<Self>;
}

impl Pooled for i32 {
    fn shelf(pool: &BufferPool) -> &Shelf<i32> {
        &pool.i32s
    }
}

impl Pooled for u32 {
    fn shelf(pool: &BufferPool) -> &Shelf<u32> {
        &pool.u32s
    }
}

impl Pooled for f32 {
    fn shelf(pool: &BufferPool) -> &Shelf<f32> {
        &pool.f32s
    }
}

impl BufferPool {
    /// An empty array with capacity for at least `n` elements.
    pub fn take<T: Pooled>(&self, n: usize) -> Vec<T> {
        T::shelf(self).take(n)
    }

    /// Give back an array its user is done with (its contents are dropped).
    pub fn give<T: Pooled>(&self, v: Vec<T>) {
        T::shelf(self).give(v)
    }

    /// Capacities of the kept arrays of one type (for tests and diagnostics).
    pub fn kept<T: Pooled>(&self) -> Vec<usize> {
        T::shelf(self).kept()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_prefers_the_smallest_array_that_fits() {
        let pool = BufferPool::default();
        for n in [100, 10, 1000] {
            pool.give::<i32>(Vec::with_capacity(n));
        }
        let v = pool.take::<i32>(50);
        assert!(v.is_empty() && (100..1000).contains(&v.capacity()), "{}", v.capacity());
        let mut kept = pool.kept::<i32>();
        kept.sort_unstable();
        assert_eq!(kept.len(), 2);
        assert!(kept[0] < 100 && kept[1] >= 1000);
        // Nothing big enough: a new array, the kept ones stay.
        let big = pool.take::<i32>(5000);
        assert!(big.capacity() >= 5000);
        assert_eq!(pool.kept::<i32>().len(), 2);
        // Types do not mix.
        assert!(pool.kept::<f32>().is_empty());
    }

    #[test]
    fn a_full_shelf_keeps_the_biggest_arrays() {
        // Arrays of a quarter of the byte budget each: four fill the shelf.
        let unit = KEPT_BYTES_PER_TYPE / 4 / std::mem::size_of::<f32>();
        let pool = BufferPool::default();
        for n in 1..=KEPT_PER_TYPE {
            pool.give::<f32>(Vec::with_capacity(n * unit));
        }
        pool.give::<f32>(Vec::with_capacity(unit / 2));
        let mut kept = pool.kept::<f32>();
        kept.sort_unstable();
        assert_eq!(kept.len(), KEPT_PER_TYPE);
        assert!(kept[0] >= unit, "the smaller array given to a full shelf was kept: {kept:?}");
        pool.give::<f32>(Vec::with_capacity(10 * unit));
        let mut kept = pool.kept::<f32>();
        kept.sort_unstable();
        assert_eq!(kept.len(), KEPT_PER_TYPE);
        assert!(kept[0] >= 2 * unit && kept[KEPT_PER_TYPE - 1] >= 10 * unit, "{kept:?}");
    }

    #[test]
    fn small_arrays_are_kept_up_to_the_byte_budget() {
        let pool = BufferPool::default();
        let each = 1 << 20; // bytes
        for _ in 0..100 {
            pool.give::<u32>(Vec::with_capacity(each / 4));
        }
        let kept = pool.kept::<u32>();
        let bytes: usize = kept.iter().sum::<usize>() * 4;
        assert!(kept.len() > KEPT_PER_TYPE, "{}", kept.len());
        assert!(bytes <= KEPT_BYTES_PER_TYPE && bytes + each > KEPT_BYTES_PER_TYPE, "{bytes}");
        // Past the budget with more than four kept, a bigger array is not kept either.
        pool.give::<u32>(Vec::with_capacity(each));
        assert_eq!(pool.kept::<u32>(), kept);
    }

    #[test]
    fn given_arrays_come_back_empty_with_their_allocation() {
        let pool = BufferPool::default();
        let v: Vec<i32> = (0..1000).collect();
        let ptr = v.as_ptr();
        pool.give(v);
        let w = pool.take::<i32>(1000);
        assert!(w.is_empty());
        assert_eq!(w.as_ptr(), ptr);
        pool.give::<i32>(Vec::new());
        assert!(pool.kept::<i32>().is_empty(), "an array without allocation was kept");
    }
}
