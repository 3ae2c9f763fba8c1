//! f32 vector helpers shared by the CPU kernels that are not packed-weight products (the
//! gathered LoRA term, decode attention): AVX2 + FMA when the CPU has them (detected once, as
//! the packed kernels do), a portable loop otherwise. Each function sums in one fixed order
//! for a given length, so results do not depend on where a value sits in a batch.

use crate::quant::{avx2, dot as portable_dot};

/// `Σ a·b` over the common length.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: avx2() checked AVX2 and FMA on this CPU.
        return unsafe { x86::dot(a, b) };
    }
    portable_dot(a, b)
}

/// `Σ a·b` for `a` in bf16 (its bits) over the common length.
#[inline]
pub(crate) fn dot_bf16(a: &[u16], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: avx2() checked AVX2 and FMA on this CPU.
        return unsafe { x86::dot_bf16(a, b) };
    }
    a.iter().zip(b).map(|(&a, b)| bf16_to_f32(a) * b).sum()
}

/// A bf16 (its bits) as f32.
#[inline]
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

/// `y += s·x` over the common length.
#[inline]
pub(crate) fn axpy(y: &mut [f32], s: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: as above.
        return unsafe { x86::axpy(y, s, x) };
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += s * x;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub(crate) use crate::quant::hsum;

    /// `Σ a·b` for `a` read eight values at a time by `load8` (and one at a time by `load1`
    /// past the last 8): four accumulators of 8 lanes, then 8 at a time, then the rest.
    #[inline(always)]
    unsafe fn dot_with<T>(
        a: &[T],
        b: &[f32],
        load8: impl Fn(*const T) -> __m256,
        load1: impl Fn(&T) -> f32,
    ) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, s) in acc.iter_mut().enumerate() {
                let o = i + 8 * k;
                *s = _mm256_fmadd_ps(load8(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *s);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load8(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum(v);
        while i < n {
            sum += load1(&a[i]) * b[i];
            i += 1;
        }
        sum
    }

    /// `Σ a·b`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot_with(a, b, |p| _mm256_loadu_ps(p), |&v| v)
    }

    /// Eight bf16 values (bits) at `p` widened to f32 (a bf16 is the top half of an f32).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn widen8(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    /// `Σ a·b` with `a` in bf16.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot_bf16(a: &[u16], b: &[f32]) -> f32 {
        dot_with(a, b, |p| widen8(p), |&v| super::bf16_to_f32(v))
    }

    /// `y += s·x`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn axpy(y: &mut [f32], s: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let sv = _mm256_set1_ps(s);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(sv, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            y[i] += s * x[i];
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{hsum, widen8};

#[cfg(test)]
mod tests {
    /// Both helpers agree with f64 sums, at lengths around the vector widths.
    #[test]
    fn dot_and_axpy_match_f64() {
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!(
                (f64::from(super::dot(&a, &b)) - want).abs() < 1e-4,
                "dot, n={n}"
            );
            let mut y = b.clone();
            super::axpy(&mut y, 0.5, &a);
            for i in 0..n {
                let w = f64::from(b[i]) + 0.5 * f64::from(a[i]);
                assert!((f64::from(y[i]) - w).abs() < 1e-6, "axpy, n={n}, i={i}");
            }
        }
    }
}
