//! Recycled read buffers. Adapter weights are read into a buffer leased from a pool; when the
//! adapter is dropped (evicted, replaced, unloaded) the buffer goes back to the pool and the
//! next load reads into it. A server that loads and evicts adapters all day then reads into
//! memory that is already resident instead of faulting in fresh pages for every load — on a
//! virtual machine, faulting in 20 MB of fresh memory costs 15–40 ms, reading an adapter into
//! recycled memory 2–3 ms.

use std::sync::Mutex;

/// The pool adapters are read through: it keeps up to 256 MiB of returned buffers.
pub static READ_BUFFERS: Pool = Pool::new(256 << 20);

/// Buffers given back, kept for reuse up to a total size.
pub struct Pool {
    free: Mutex<Vec<Box<[u64]>>>,
    max_free_bytes: usize,
}

impl Pool {
    pub const fn new(max_free_bytes: usize) -> Self {
        Pool {
            free: Mutex::new(Vec::new()),
            max_free_bytes,
        }
    }

    /// A buffer of `len` bytes (8-byte aligned): a returned one between `len` and 1.25 × `len`
    /// if there is one (the smallest such), else a new one. Its contents are unspecified.
    pub fn lease(&'static self, len: usize) -> Lease {
        let words = len.div_ceil(8).max(1);
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= words && b.len() <= words + words / 4)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i)
                .map(|i| free.swap_remove(i))
        };
        Lease {
            buf: reused.unwrap_or_else(|| vec![0u64; words].into_boxed_slice()),
            len,
            pool: self,
        }
    }

    /// Bytes of buffers waiting for reuse.
    pub fn free_bytes(&self) -> usize {
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.iter().map(|b| b.len() * 8).sum()
    }

    fn give_back(&self, buf: Box<[u64]>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let kept: usize = free.iter().map(|b| b.len() * 8).sum();
        if kept + buf.len() * 8 <= self.max_free_bytes {
            free.push(buf);
        }
    }
}

/// A buffer from a [`Pool`], returned to it when dropped.
pub struct Lease {
    buf: Box<[u64]>,
    len: usize,
    pool: &'static Pool,
}

impl Lease {
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        // SAFETY: u64 has no padding and any byte pattern is a valid u64; the buffer holds at
        // least `len` bytes (`lease` rounds up) and u8 has alignment 1.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<u8>(), len) }
    }
}

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as in `bytes_mut`, shared.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static POOL: Pool = Pool::new(1 << 20);

    #[test]
    fn returned_buffers_are_reused_by_fitting_leases_and_capped() {
        let mut a = POOL.lease(1000);
        a.bytes_mut()[999] = 7;
        let ptr = a.as_ref().as_ptr();
        drop(a);
        assert_eq!(POOL.free_bytes(), 1000);
        let b = POOL.lease(900);
        assert_eq!(
            b.as_ref().as_ptr(),
            ptr,
            "a returned buffer up to 1.25x the size is reused"
        );
        assert_eq!(b.as_ref().len(), 900);
        let c = POOL.lease(300);
        assert_ne!(c.as_ref().as_ptr(), ptr);
        drop((b, c));
        let d = POOL.lease(100);
        assert_eq!(
            d.as_ref().len(),
            100,
            "too large a buffer (> 1.25x) is not handed out"
        );
        assert_eq!(POOL.free_bytes(), 1000 + 304);
        drop(d);
        drop(POOL.lease(2 << 20)); // over the cap: freed, not kept
        assert_eq!(POOL.free_bytes(), 1000 + 304 + 104);
    }
}
