//! The CPU's gathered LoRA term (punica's BGMV): every row of a batch adds its own adapter's
//! `scale·B·(A·x)`, reading that adapter's `A` and `B` straight from their storage, with no
//! per-adapter slicing, concatenation or small matrix calls (which cost more than the
//! arithmetic at decode sizes).
//!
//! Two steps: the shrink `tᵢ = scale·A·xᵢ` and the expand `yᵢ += B·tᵢ`. Beside a packed base
//! product (decode) both run inside the product's own tasks on the pool, with no pass of their
//! own: the first outputs each task finishes make it claim pieces of the shrink, and each chunk
//! of outputs gets its expand term right after its base values. At decode sizes a separate pass (or two)
//! over the pool cost more in hand-offs than the arithmetic; one thread doing all of it left
//! the other idle. Each `t` value and each output's term is one dot product in a fixed order
//! whatever the batch or the split, so a row's result depends only on that row
//! (batch-invariant), fused or not. `A` and `B` may be stored in bf16 (`--adapter-dtype bf16`),
//! widened to f32 as they are read.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::quant::{avx2, dot};
use crate::simd;

/// One row's adapter: `A: [rank, in]` and `B: [out, rank]`, row-major.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowLora<'a> {
    pub a: Values<'a>,
    pub b: Values<'a>,
    pub scale: f32,
    pub rank: usize,
}

/// A matrix's values as stored: f32, or bf16 (its bits), widened to f32 as they are read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Values<'a> {
    fn range(self, r: Range<usize>) -> Values<'a> {
        match self {
            Values::F32(v) => Values::F32(&v[r]),
            Values::Bf16(v) => Values::Bf16(&v[r]),
        }
    }
}

/// Multiply-adds below which [`GatheredLora::add_to`] runs on the calling thread (waking the
/// pool costs more).
const PAR_MIN_VALUES: usize = 1 << 16;

/// The LoRA term of one projection for a batch `x: [n, in]` whose row `i` takes `lora[i]`.
pub(crate) struct GatheredLora<'a> {
    x: &'a [f32],
    d_in: usize,
    lora: &'a [Option<RowLora<'a>>],
    /// Row `i`'s `t` values are `offsets[i]..offsets[i + 1]` of the flat `t`.
    offsets: Vec<usize>,
    /// The row each flat `t` value belongs to.
    row_of: Vec<usize>,
    simd: bool,
    /// Shrink pieces (runs of flat `t`), claimed by the tasks of a fused product.
    pieces: Vec<Range<usize>>,
    next: AtomicUsize,
    shrunk: AtomicUsize,
    /// `t` as f32 bits while the pieces fill it, then as a plain vector.
    t_bits: Vec<AtomicU32>,
    t: OnceLock<Vec<f32>>,
}

impl<'a> GatheredLora<'a> {
    /// `None` when no row has an adapter.
    ///
    /// # Shapes
    /// `x: [n, d_in]`, `lora: [n]`
    pub(crate) fn new(x: &'a [f32], d_in: usize, lora: &'a [Option<RowLora<'a>>]) -> Option<Self> {
        let mut offsets = Vec::with_capacity(lora.len() + 1);
        offsets.push(0);
        for l in lora {
            offsets.push(offsets.last().copied().unwrap_or(0) + l.map_or(0, |l| l.rank));
        }
        let total = offsets.last().copied().unwrap_or(0);
        if total == 0 {
            return None;
        }
        let row_of = (0..lora.len())
            .flat_map(|i| std::iter::repeat_n(i, offsets[i + 1] - offsets[i]))
            .collect();
        let threads = rayon::current_num_threads().max(1);
        Some(GatheredLora {
            x,
            d_in,
            lora,
            offsets,
            row_of,
            simd: avx2(),
            pieces: split(0..total, threads),
            next: AtomicUsize::new(0),
            shrunk: AtomicUsize::new(0),
            t_bits: (0..total).map(|_| AtomicU32::new(0)).collect(),
            t: OnceLock::new(),
        })
    }

    /// Flat `t` value `at`: `scale·A[k]·x[i]` for its row `i` and rank `k`.
    fn shrink_value(&self, at: usize) -> f32 {
        let i = self.row_of[at];
        let l = self.lora[i].expect("rows with t values have an adapter");
        let k = at - self.offsets[i];
        let x = &self.x[i * self.d_in..(i + 1) * self.d_in];
        l.scale
            * match l.a.range(k * self.d_in..(k + 1) * self.d_in) {
                Values::F32(a) => simd::dot(a, x),
                Values::Bf16(a) => simd::dot_bf16(a, x),
            }
    }

    /// `ys[j·stride] += B[first + j]·t` for row `i`'s adapter (`t` that row's values).
    fn expand(&self, i: usize, first: usize, t: &[f32], ys: &mut [f32], stride: usize) {
        let Some(l) = self.lora[i] else { return };
        let r = t.len();
        let outputs = ys.len().div_ceil(stride);
        let b = l.b.range(first * r..(first + outputs) * r);
        #[cfg(target_arch = "x86_64")]
        if self.simd && r.is_multiple_of(8) {
            // SAFETY: avx2() checked AVX2 and FMA on this CPU; `b` has `r` values per output.
            return unsafe {
                match b {
                    Values::F32(b) => x86::expand(b, t, ys, stride),
                    Values::Bf16(b) => x86::expand_bf16(b, t, ys, stride),
                }
            };
        }
        let ys = ys.iter_mut().step_by(stride);
        match b {
            Values::F32(b) => {
                for (y, bo) in ys.zip(b.chunks_exact(r)) {
                    *y += dot(bo, t);
                }
            }
            Values::Bf16(b) => {
                for (y, bo) in ys.zip(b.chunks_exact(r)) {
                    *y += simd::dot_bf16(bo, t);
                }
            }
        }
    }

    /// Every `t` value: the calling task claims shrink pieces until none is left, then waits
    /// for the ones other tasks are computing (a claimed piece is in progress on a running
    /// thread, so the wait ends even if the pool runs every task on one thread).
    fn t(&self) -> &[f32] {
        if let Some(t) = self.t.get() {
            return t;
        }
        loop {
            let p = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(range) = self.pieces.get(p) else {
                break;
            };
            for at in range.clone() {
                self.t_bits[at].store(self.shrink_value(at).to_bits(), Ordering::Relaxed);
            }
            self.shrunk.fetch_add(1, Ordering::Release);
        }
        while self.shrunk.load(Ordering::Acquire) < self.pieces.len() {
            std::hint::spin_loop();
        }
        self.t.get_or_init(|| {
            self.t_bits
                .iter()
                .map(|v| f32::from_bits(v.load(Ordering::Relaxed)))
                .collect()
        })
    }

    /// Adds the term to the outputs of consecutive weight rows from `o`, `ys[j·n + i]` for
    /// weight row `o + j` and activation row `i` (the `then` of a packed product: the shrink
    /// runs in the product's tasks, the expand beside the outputs it adds to).
    pub(crate) fn add_to_outputs(&self, o: usize, ys: &mut [f32]) {
        let t = self.t();
        let n = self.lora.len();
        for i in 0..n.min(ys.len()) {
            let ti = &t[self.offsets[i]..self.offsets[i + 1]];
            self.expand(i, o, ti, &mut ys[i..], n);
        }
    }

    /// Adds the term to `y: [n, d_out]` (products without a `then`), rows in parallel when
    /// large. Each output is computed as [`Self::add_to_outputs`] computes it.
    pub(crate) fn add_to(&self, y: &mut [f32], d_out: usize) {
        let row = |(i, yi): (usize, &mut [f32])| {
            let t: Vec<f32> = (self.offsets[i]..self.offsets[i + 1])
                .map(|at| self.shrink_value(at))
                .collect();
            self.expand(i, 0, &t, yi, 1);
        };
        let total = self.t_bits.len();
        if total * (self.d_in + d_out) < PAR_MIN_VALUES {
            y.chunks_mut(d_out).enumerate().for_each(row);
        } else {
            y.par_chunks_mut(d_out).enumerate().for_each(row);
        }
    }
}

/// `range` in at most `parts` runs of nearly equal length (none empty).
fn split(range: Range<usize>, parts: usize) -> Vec<Range<usize>> {
    let len = range.len();
    let parts = parts.clamp(1, len.max(1));
    (0..parts)
        .map(|p| range.start + p * len / parts..range.start + (p + 1) * len / parts)
        .filter(|r| !r.is_empty())
        .collect()
}

/// The AVX2 + FMA expand.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::simd::{hsum, widen8};

    /// `ys[j·stride] += b[j]·t` for rows of `b` of `t.len()` values (a multiple of 8), read
    /// eight at a time by `load8`: each sum in lanes of 8, then [`hsum`].
    #[inline(always)]
    unsafe fn expand_with<T>(
        b: &[T],
        t: &[f32],
        ys: &mut [f32],
        stride: usize,
        load8: impl Fn(*const T) -> __m256,
    ) {
        let r = t.len();
        debug_assert!(r.is_multiple_of(8) && b.len() >= ys.len().div_ceil(stride) * r);
        let pt = t.as_ptr();
        for (y, bo) in ys.iter_mut().step_by(stride).zip(b.chunks_exact(r)) {
            let pb = bo.as_ptr();
            let mut s = _mm256_mul_ps(load8(pb), _mm256_loadu_ps(pt));
            for c in (8..r).step_by(8) {
                s = _mm256_fmadd_ps(load8(pb.add(c)), _mm256_loadu_ps(pt.add(c)), s);
            }
            *y += hsum(s);
        }
    }

    /// [`expand_with`] for `b` in f32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn expand(b: &[f32], t: &[f32], ys: &mut [f32], stride: usize) {
        expand_with(b, t, ys, stride, |p| _mm256_loadu_ps(p))
    }

    /// [`expand_with`] for `b` in bf16.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn expand_bf16(b: &[u16], t: &[f32], ys: &mut [f32], stride: usize) {
        expand_with(b, t, ys, stride, |p| widen8(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 1009) as f32 - 504.0) / 600.0)
            .collect()
    }

    /// Every row equals its own adapter's term computed alone in f64, and a row's result is the
    /// same bit for bit in a batch of mixed adapters and alone (sizes on both sides of the
    /// parallel threshold).
    #[test]
    fn each_row_takes_its_own_adapter_and_is_batch_invariant() {
        for bf16 in [false, true] {
            for (d_in, d_out) in [(16, 24), (576, 1536), (1536, 576)] {
                check(bf16, d_in, d_out);
            }
        }
    }

    /// The value at `i` as f64.
    fn at(v: Values<'_>, i: usize) -> f64 {
        match v {
            Values::F32(v) => f64::from(v[i]),
            Values::Bf16(v) => f64::from(crate::simd::bf16_to_f32(v[i])),
        }
    }

    fn check(bf16: bool, d_in: usize, d_out: usize) {
        {
            let (r1, r2) = (4, 16);
            let (a1, b1) = (values(r1 * d_in, 1), values(d_out * r1, 2));
            let (a2, b2) = (values(r2 * d_in, 3), values(d_out * r2, 4));
            let bits = |v: &[f32]| -> Vec<u16> {
                v.iter()
                    .map(|&x| half::bf16::from_f32(x).to_bits())
                    .collect()
            };
            let (h1, g1, h2, g2) = (bits(&a1), bits(&b1), bits(&a2), bits(&b2));
            let vals = |f: &'static str| -> Values<'_> {
                match (bf16, f) {
                    (false, "a1") => Values::F32(&a1),
                    (false, "b1") => Values::F32(&b1),
                    (false, "a2") => Values::F32(&a2),
                    (false, _) => Values::F32(&b2),
                    (true, "a1") => Values::Bf16(&h1),
                    (true, "b1") => Values::Bf16(&g1),
                    (true, "a2") => Values::Bf16(&h2),
                    (true, _) => Values::Bf16(&g2),
                }
            };
            let l1 = RowLora {
                a: vals("a1"),
                b: vals("b1"),
                scale: 2.0,
                rank: r1,
            };
            let l2 = RowLora {
                a: vals("a2"),
                b: vals("b2"),
                scale: 0.5,
                rank: r2,
            };
            let lora = [Some(l1), None, Some(l2), Some(l2), Some(l1)];
            let n = lora.len();
            let x = values(n * d_in, 5);
            let y0 = values(n * d_out, 6);
            let term = GatheredLora::new(&x, d_in, &lora).expect("rows with adapters");
            let mut y = y0.clone();
            term.add_to(&mut y, d_out);
            // The fused form (one output row at a time, as a packed product's `then` calls
            // it) gives the same bits.
            let mut fused = y0.clone();
            for (o, k) in [(0, 1), (1, 7), (8, d_out - 8)] {
                let mut ys: Vec<f32> = (o..o + k)
                    .flat_map(|o| (0..n).map(move |i| (i, o)))
                    .map(|(i, o)| fused[i * d_out + o])
                    .collect();
                term.add_to_outputs(o, &mut ys);
                for (j, v) in ys.into_iter().enumerate() {
                    fused[(j % n) * d_out + o + j / n] = v;
                }
            }
            assert_eq!(fused, y, "d_in {d_in}: fused differs");
            for (i, l) in lora.iter().enumerate() {
                let xi = &x[i * d_in..(i + 1) * d_in];
                let yi = &y[i * d_out..(i + 1) * d_out];
                let want: Vec<f64> = match l {
                    None => y0[i * d_out..(i + 1) * d_out]
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect(),
                    Some(l) => {
                        let t: Vec<f64> = (0..l.rank)
                            .map(|k| {
                                (0..d_in)
                                    .map(|c| at(l.a, k * d_in + c) * f64::from(xi[c]))
                                    .sum::<f64>()
                                    * f64::from(l.scale)
                            })
                            .collect();
                        (0..d_out)
                            .map(|o| {
                                f64::from(y0[i * d_out + o])
                                    + (0..l.rank)
                                        .map(|k| at(l.b, o * l.rank + k) * t[k])
                                        .sum::<f64>()
                            })
                            .collect()
                    }
                };
                let err = yi
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| (f64::from(a) - b).abs())
                    .fold(0f64, f64::max);
                assert!(err < 1e-3, "d_in {d_in}, row {i}: max |Δ| {err}");
                assert!(l.is_none() || yi != &y0[i * d_out..(i + 1) * d_out]);

                let mut alone = y0[i * d_out..(i + 1) * d_out].to_vec();
                if let Some(term) = GatheredLora::new(xi, d_in, &lora[i..i + 1]) {
                    term.add_to(&mut alone, d_out);
                }
                assert_eq!(
                    alone, yi,
                    "d_in {d_in}, row {i}: alone differs from batched"
                );
            }
        }
    }
}
