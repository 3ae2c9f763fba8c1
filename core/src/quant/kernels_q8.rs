//! Products with 8-bit activations: each activation row is rounded to `i8` per block of
//! 32 values with one f32 scale (`x ≈ d·q`, `d = max|x| / 127`), and every packed block meets
//! it in integer dot products (`maddubs`: 32 byte products summed in pairs, then in fours),
//! one conversion to f32 per 32 values. This is what llama.cpp does, and about twice the
//! speed of the f32 kernels in `kernels.rs`, which unpack every code to f32 first.
//!
//! Every term of a block's formula uses the same rounded activations, including its offset or
//! min: Q4_1 `Σ (d·q + m)·x ≈ d·d_x·Σ q·q_x + m·s_x` with `s_x = d_x·Σ q_x`, so the result is
//! exactly `Σ w·x̂` for `x̂ = d_x·q_x` up to f32 rounding (what the tests check). Rounding
//! `x` is the only approximation; its size against transformers is measured in
//! `core/tests/it/q8_activations.rs`.
//!
//! Kernels: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K and Q6_K on x86-64 with AVX2 (detected at run
//! time). Other types and CPUs fall back to the f32 path. Like the f32 kernels, each output
//! is one call in a fixed order, so a row's result does not depend on its batch.

use super::kernels::{by_rows, Then, MAX_ROWS};
use super::{GgmlType, PackedData, PackedWeight};

/// Activation rows rounded to 8 bits per 32 values.
pub(super) struct Q8Rows {
    /// `[n, cols]` codes in `-127..=127`.
    pub q: Vec<i8>,
    /// `[n, cols / 32]` scales: `x ≈ d·q`.
    pub d: Vec<f32>,
    /// `[n, cols / 32]` `d·Σ q` per block (the rounded block sum, for offsets and mins).
    pub s: Vec<f32>,
}

impl Q8Rows {
    /// Rounds `x` (rows of a multiple of 32 values) block by block. A block holding a NaN gets
    /// a NaN scale, so the NaN reaches the outputs as it would in f32.
    pub(super) fn quantize(x: &[f32]) -> Q8Rows {
        debug_assert_eq!(x.len() % 32, 0);
        let blocks = x.len() / 32;
        let mut out = Q8Rows {
            q: vec![0; x.len()],
            d: vec![0.0; blocks],
            s: vec![0.0; blocks],
        };
        #[cfg(target_arch = "x86_64")]
        if super::kernels::avx2() {
            // SAFETY: the CPU features were detected; the lengths are the ones set above.
            unsafe { avx2::quantize(x, &mut out.q, &mut out.d, &mut out.s) };
            return out;
        }
        for (b, (xb, qb)) in x
            .chunks_exact(32)
            .zip(out.q.chunks_exact_mut(32))
            .enumerate()
        {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = (v * id).round() as i8;
                sum += i32::from(*q);
            }
            let nan = xb.iter().any(|v| v.is_nan());
            out.d[b] = if nan { f32::NAN } else { d };
            out.s[b] = out.d[b] * sum as f32;
        }
        out
    }
}

/// A kernel: the dot products of one packed weight row with `out.len()` (at most
/// [`MAX_ROWS`]) rounded activation rows (`q` one row after another, `d` and `s` per 32).
type Q8Kernel = unsafe fn(row: &[u8], q: &[i8], d: &[f32], s: &[f32], out: &mut [f32]);

/// The integer kernel for `w`, if this CPU and `w`'s block type have one.
fn select(w: &PackedWeight) -> Option<Q8Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if !super::kernels::avx2() {
            return None;
        }
        return match &w.data {
            PackedData::Ggml { ty, .. } => match ty {
                GgmlType::Q4_0 => Some(avx2::q4_0 as Q8Kernel),
                GgmlType::Q4_1 => Some(avx2::q4_1 as Q8Kernel),
                GgmlType::Q5_0 => Some(avx2::q5_0 as Q8Kernel),
                GgmlType::Q8_0 => Some(avx2::q8_0 as Q8Kernel),
                GgmlType::Q4_K => Some(avx2::q4_k as Q8Kernel),
                GgmlType::Q5_K => Some(avx2::q5_k as Q8Kernel),
                GgmlType::Q6_K => Some(avx2::q6_k as Q8Kernel),
                _ => None,
            },
            PackedData::Nf4 { .. } => None,
        };
    }
    #[allow(unreachable_code)]
    {
        let _ = w;
        None
    }
}

/// Whether this CPU and `w`'s block type have an integer kernel.
pub(super) fn available(w: &PackedWeight) -> bool {
    select(w).is_some()
}

/// `x·Wᵀ` (`x: [n, cols]` → `[n, rows]`) with `x` rounded to 8 bits, or `None` when this CPU
/// or block type has no integer kernel.
pub(super) fn matmul_t(w: &PackedWeight, x: &[f32], n: usize, then: Then<'_>) -> Option<Vec<f32>> {
    let kernel = select(w)?;
    let (cols, nb) = (w.cols, w.cols / 32);
    let a = Q8Rows::quantize(x);
    Some(by_rows(
        w,
        n,
        |_, row, ys| {
            for (g, out) in ys.chunks_mut(MAX_ROWS).enumerate() {
                let (r0, r1) = (g * MAX_ROWS, g * MAX_ROWS + out.len());
                // SAFETY: `select` returned this kernel only after detecting its CPU features;
                // the row has the bytes its block type implies (checked when the weight was
                // built) and the activations `cols` values per row.
                unsafe {
                    kernel(
                        row,
                        &a.q[r0 * cols..r1 * cols],
                        &a.d[r0 * nb..r1 * nb],
                        &a.s[r0 * nb..r1 * nb],
                        out,
                    )
                };
            }
        },
        then,
    ))
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // `r` indexes several per-row arrays at once
mod avx2 {
    //! AVX2 integer kernels. Codes are unpacked to 32 bytes in activation order; unsigned codes
    //! meet the signed activations in `maddubs` (`u8·i8` pairs summed to i16: at most
    //! 2·63·127, no saturation), signed Q8_0 codes through the sign trick.

    use std::arch::x86_64::*;

    use super::super::ggml::scale_min_k4;
    use super::super::kernels::avx2::{half_at, hsum, prefetch};
    use super::MAX_ROWS;

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Σ of `u8·i8` products in 8 groups of 4, as i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    /// Σ of `i8·i8` products in 8 groups of 4: `|w|·(x with w's sign)`.
    #[inline(always)]
    unsafe fn dot_i8(w: __m256i, x: __m256i) -> __m256i {
        dot_u8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
    }

    /// The 32 four-bit codes of 16 bytes in activation order: element `j` in the low nibble of
    /// byte `j`, element `j + 16` in its high nibble (Q4_0, Q4_1, Q5_0).
    #[inline(always)]
    unsafe fn nibbles32(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
        _mm256_and_si256(both, _mm256_set1_epi8(0xF))
    }

    /// 16 where bit `j` of the 32 bits at `p` is set, per byte `j` (Q5_0's fifth bits).
    #[inline(always)]
    unsafe fn bits32_as_16(p: *const u8) -> __m256i {
        let v = _mm256_set1_epi32(i32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]));
        // byte j ← byte j / 8 of the word, then every bit but bit j % 8 set
        let spread = _mm256_shuffle_epi8(
            v,
            _mm256_setr_epi64x(
                0x0000_0000_0000_0000,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            ),
        );
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1));
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }

    /// 16 where `qh & bit` is set, per byte (Q5_K's fifth bits).
    #[inline(always)]
    unsafe fn bit_as_16(qh: __m256i, bit: i8) -> __m256i {
        let m = _mm256_set1_epi8(bit);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, m), m);
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }

    /// `rows!(n, f[G…](args…))` calls `f::<G…, N>(args…)` with `N = n` rows (1 to [`MAX_ROWS`]): each row count gets a
    /// body of its own, unrolled, with its accumulators in registers.
    macro_rules! rows {
        ($n:expr, $f:ident [$($g:tt),*] ($($a:expr),*)) => {
            match $n {
                1 => $f::<$($g,)* 1>($($a),*),
                2 => $f::<$($g,)* 2>($($a),*),
                3 => $f::<$($g,)* 3>($($a),*),
                4 => $f::<$($g,)* 4>($($a),*),
                5 => $f::<$($g,)* 5>($($a),*),
                6 => $f::<$($g,)* 6>($($a),*),
                7 => $f::<$($g,)* 7>($($a),*),
                8 => $f::<$($g,)* 8>($($a),*),
                n => unreachable!("{n} rows in one call; at most {MAX_ROWS}"),
            }
        };
    }

    /// [`super::Q8Rows::quantize`]: per block of 32, `d = max|x| / 127`, `q = round(x / d)`
    /// (ties to even), `s = d·Σ q`; a NaN in the block makes `d` NaN.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
        let sign = _mm256_set1_ps(-0.0);
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let v: [__m256; 4] = std::array::from_fn(|g| _mm256_loadu_ps(xb.as_ptr().add(8 * g)));
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
            let nan = v
                .iter()
                .any(|&v| _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0);
            let db = amax / 127.0;
            let id = _mm256_set1_ps(if db > 0.0 { 1.0 / db } else { 0.0 });
            let i = v.map(|v| {
                _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_mul_ps(v, id),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                ))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let sum = hsum(_mm256_cvtepi32_ps(sum));
            // i32 → i16 → i8 packs work per 128-bit lane; the permute restores the order
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            let ordered =
                _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr().add(32 * b) as *mut __m256i, ordered);
            d[b] = if nan { f32::NAN } else { db };
            s[b] = d[b] * sum;
        }
    }

    /// Row accumulators: the products' vector sum, and the offsets' (block mins times
    /// activation sums) kept apart in a vector of their own, so that no scalar sum chains one
    /// block to the next.
    struct Acc<const N: usize> {
        v: [__m256; N],
        off: [__m256; N],
    }

    impl<const N: usize> Acc<N> {
        #[inline(always)]
        unsafe fn new() -> Self {
            Acc {
                v: [_mm256_setzero_ps(); N],
                off: [_mm256_setzero_ps(); N],
            }
        }

        /// `v[r] += scale[k] · p`, `p` an i32 vector of partial dot products and `scale` eight
        /// blocks' combined scales.
        #[inline(always)]
        unsafe fn add(&mut self, r: usize, scales: __m256, k: usize, p: __m256i) {
            let scale = _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(k as i32));
            self.v[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), self.v[r]);
        }

        /// `v − off` per row, summed.
        #[inline(always)]
        unsafe fn store(&self, out: &mut [f32]) {
            for (r, o) in out.iter_mut().enumerate() {
                *o = hsum(self.v[r]) - hsum(self.off[r]);
            }
        }
    }

    /// Eight f16 values `stride` bytes apart from `p` (the first `k` of them; zeros after), as
    /// f32 lanes: one conversion for eight blocks' scales.
    #[inline(always)]
    unsafe fn halves8(p: *const u8, stride: usize, k: usize) -> __m256 {
        // built in registers: eight two-byte stores read back as one vector would stall on
        // store forwarding
        let h = |i: usize| -> i16 {
            if i < k {
                i16::from_le_bytes([*p.add(i * stride), *p.add(i * stride + 1)])
            } else {
                0
            }
        };
        _mm256_cvtph_ps(_mm_setr_epi16(
            h(0),
            h(1),
            h(2),
            h(3),
            h(4),
            h(5),
            h(6),
            h(7),
        ))
    }

    /// Eight f32 from `p` (the first `k`; zeros after, and nothing past them read).
    #[inline(always)]
    unsafe fn floats8(p: *const f32, k: usize) -> __m256 {
        if k == 8 {
            return _mm256_loadu_ps(p);
        }
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(k as i32), lanes))
    }

    /// 32-value blocks of `block_bytes` with `d` as their first f16 (Q4_0, Q4_1, Q5_0, Q8_0):
    /// per block and row `d·d_x·Σ q·q_x`, plus `m·s_x` where `MIN` (Q4_1's `Σ (d·q + m)·x`,
    /// `m` the f16 at byte 2). `codes` reads a block's 32 codes: signed without `MIN`,
    /// unsigned with it. Blocks go eight at a time, so
    /// that their scales convert and combine in one vector.
    #[inline(always)]
    unsafe fn q32_rows<const MIN: bool>(
        row: &[u8],
        q: &[i8],
        d: &[f32],
        s: &[f32],
        out: &mut [f32],
        block_bytes: usize,
        codes: impl Fn(*const u8) -> __m256i,
    ) {
        rows!(
            out.len(),
            q32_n[MIN](row, q, d, s, out, block_bytes, &codes)
        );
    }

    #[inline(always)]
    unsafe fn q32_n<const MIN: bool, const N: usize>(
        row: &[u8],
        q: &[i8],
        d: &[f32],
        s: &[f32],
        out: &mut [f32],
        block_bytes: usize,
        codes: &impl Fn(*const u8) -> __m256i,
    ) {
        let cols = q.len() / N;
        let nb = cols / 32;
        let mut acc = Acc::<N>::new();
        // whole groups of eight blocks (a constant count: no checks in the unrolled body),
        // then the rest
        for g in (0..nb - nb % 8).step_by(8) {
            q32_group::<MIN, N>(&mut acc, row, q, d, s, g, 8, block_bytes, codes);
        }
        if !nb.is_multiple_of(8) {
            q32_group::<MIN, N>(
                &mut acc,
                row,
                q,
                d,
                s,
                nb - nb % 8,
                nb % 8,
                block_bytes,
                codes,
            );
        }
        acc.store(out);
    }

    /// Blocks `g..g + k` (`k ≤ 8`) of [`q32_n`].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q32_group<const MIN: bool, const N: usize>(
        acc: &mut Acc<N>,
        row: &[u8],
        q: &[i8],
        d: &[f32],
        s: &[f32],
        g: usize,
        k: usize,
        block_bytes: usize,
        codes: &impl Fn(*const u8) -> __m256i,
    ) {
        let cols = q.len() / N;
        let nb = cols / 32;
        let p = row.as_ptr().add(g * block_bytes);
        prefetch(p);
        prefetch(p.add(64));
        let dw = halves8(p, block_bytes, k);
        let mw = if MIN {
            halves8(p.add(2), block_bytes, k)
        } else {
            dw
        };
        let mut dd = [_mm256_setzero_ps(); N];
        for r in 0..N {
            let at = r * nb + g;
            dd[r] = _mm256_mul_ps(dw, floats8(d.as_ptr().add(at), k));
            if MIN {
                // `store` subtracts the offsets
                let sx = floats8(s.as_ptr().add(at), k);
                acc.off[r] = _mm256_fnmadd_ps(mw, sx, acc.off[r]);
            }
        }
        for i in 0..k {
            let w = codes(p.add(i * block_bytes));
            for r in 0..N {
                let x = load(q.as_ptr().add(r * cols + 32 * (g + i)) as *const u8);
                let prod = if MIN { dot_u8(w, x) } else { dot_i8(w, x) };
                acc.add(r, dd[r], i, prod);
            }
        }
    }

    /// Q4_0: codes offset by 8, made signed.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_0(row: &[u8], q: &[i8], d: &[f32], s: &[f32], out: &mut [f32]) {
        q32_rows::<false>(row, q, d, s, out, 18, |p| {
            _mm256_sub_epi8(nibbles32(p.add(2)), _mm256_set1_epi8(8))
        });
    }

    /// Q4_1: `d` and `m` stored as two f16, codes unsigned.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1(row: &[u8], q: &[i8], d: &[f32], s: &[f32], out: &mut [f32]) {
        q32_rows::<true>(row, q, d, s, out, 20, |p| nibbles32(p.add(4)));
    }

    /// Q5_0: five-bit codes offset by 16 (made signed), the fifth bit of element `j` being
    /// bit `j` of the u32 after `d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q5_0(row: &[u8], q: &[i8], d: &[f32], s: &[f32], out: &mut [f32]) {
        q32_rows::<false>(row, q, d, s, out, 22, |p| {
            let w = _mm256_or_si256(nibbles32(p.add(6)), bits32_as_16(p.add(2)));
            _mm256_sub_epi8(w, _mm256_set1_epi8(16))
        });
    }

    /// Q8_0: signed bytes times `d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0(row: &[u8], q: &[i8], d: &[f32], s: &[f32], out: &mut [f32]) {
        q32_rows::<false>(row, q, d, s, out, 34, |p| load(p.add(2)));
    }

    /// Q4_K and Q5_K blocks of `block_bytes` (`d`, `dmin` and 12 bytes of six-bit scales and
    /// mins first): per 32-value sub-block `j` and row, `d·sc_j·d_x·Σ q·q_x − dmin·m_j·s_x`.
    /// `codes(blk, c)` gives chunk `c`'s (of 4) 64 codes: its first 32, then the next 32.
    #[inline(always)]
    unsafe fn k_rows(
        row: &[u8],
        q: &[i8],
        d: &[f32],
        s: &[f32],
        out: &mut [f32],
        block_bytes: usize,
        codes: impl Fn(*const u8, usize) -> [__m256i; 2],
    ) {
        rows!(out.len(), k_n[](row, q, d, s, out, block_bytes, &codes));
    }

    #[inline(always)]
    unsafe fn k_n<const N: usize>(
        row: &[u8],
        q: &[i8],
        d: &[f32],
        s: &[f32],
        out: &mut [f32],
        block_bytes: usize,
        codes: &impl Fn(*const u8, usize) -> [__m256i; 2],
    ) {
        let cols = q.len() / N;
        let nb = cols / 32;
        let mut acc = Acc::<N>::new();
        for (b, blk) in row.chunks_exact(block_bytes).enumerate() {
            prefetch(blk.as_ptr());
            let (dw, dmin) = (half_at(blk.as_ptr()), half_at(blk.as_ptr().add(2)));
            let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
            for j in 0..8 {
                (sc[j], mn[j]) = scale_min_k4(j, &blk[4..16]);
            }
            let u8s = |v: &[u8; 8]| {
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(v.as_ptr() as _)))
            };
            let scales = _mm256_mul_ps(_mm256_set1_ps(dw), u8s(&sc));
            let mins = _mm256_mul_ps(_mm256_set1_ps(dmin), u8s(&mn));
            let mut dd = [_mm256_setzero_ps(); N];
            for r in 0..N {
                let at = r * nb + 8 * b;
                dd[r] = _mm256_mul_ps(scales, _mm256_loadu_ps(d.as_ptr().add(at)));
                acc.off[r] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(s.as_ptr().add(at)), acc.off[r]);
            }
            for c in 0..4 {
                let [lo, hi] = codes(blk.as_ptr(), c);
                for r in 0..N {
                    let xb = q.as_ptr().add(r * cols + 256 * b + 64 * c) as *const u8;
                    acc.add(r, dd[r], 2 * c, dot_u8(lo, load(xb)));
                    acc.add(r, dd[r], 2 * c + 1, dot_u8(hi, load(xb.add(32))));
                }
            }
        }
        acc.store(out);
    }

    /// Q4_K: chunk `c` keeps its first 32 codes in the low nibbles of 32 bytes, the next 32 in
    /// the high nibbles.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_k(row: &[u8], q: &[i8], d: &[f32], s: &[f32], out: &mut [f32]) {
        k_rows(row, q, d, s, out, 144, |blk, c| {
            let v = load(blk.add(16 + 32 * c));
            let m = _mm256_set1_epi8(0xF);
            [
                _mm256_and_si256(v, m),
                _mm256_and_si256(_mm256_srli_epi16(v, 4), m),
            ]
        });
    }

    /// Q5_K: Q4_K's nibbles (after 32 bytes of `qh`) plus a fifth bit: bit `2c` of `qh[l]`
    /// for value `l` of chunk `c`'s first 32, bit `2c + 1` for its next 32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q5_k(row: &[u8], q: &[i8], d: &[f32], s: &[f32], out: &mut [f32]) {
        k_rows(row, q, d, s, out, 176, |blk, c| {
            let v = load(blk.add(48 + 32 * c));
            let qh = load(blk.add(16));
            let m = _mm256_set1_epi8(0xF);
            [
                _mm256_or_si256(
                    _mm256_and_si256(v, m),
                    bit_as_16(qh, (1u8 << (2 * c)) as i8),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), m),
                    bit_as_16(qh, (1u8 << (2 * c + 1)) as i8),
                ),
            ]
        });
    }

    /// Q6_K: six-bit codes minus 32 (low four bits in `ql`, high two in `qh`) times a signed
    /// eight-bit scale per 16 values, times `d`. Per 32 values and row: `(q − 32)·q_x` summed
    /// in pairs as `maddubs(q, q_x) − maddubs(32, q_x)`, each half of 16 multiplied by its
    /// scale in `madd`, then `d·d_x` once.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6_k(row: &[u8], q: &[i8], d: &[f32], _: &[f32], out: &mut [f32]) {
        rows!(out.len(), q6_k_n[](row, q, d, out));
    }

    #[inline(always)]
    unsafe fn q6_k_n<const N: usize>(row: &[u8], q: &[i8], d: &[f32], out: &mut [f32]) {
        let cols = q.len() / N;
        let nb = cols / 32;
        let (m4, m2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
        let k32 = _mm256_set1_epi8(32);
        let mut acc = Acc::<N>::new();
        for (b, blk) in row.chunks_exact(210).enumerate() {
            prefetch(blk.as_ptr());
            let dw = _mm256_set1_ps(half_at(blk.as_ptr().add(208)));
            let mut dd = [_mm256_setzero_ps(); N];
            for r in 0..N {
                dd[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(d.as_ptr().add(r * nb + 8 * b)));
            }
            for h in 0..2 {
                let p = blk.as_ptr();
                let (a, c) = (load(p.add(64 * h)), load(p.add(64 * h + 32)));
                let hb = load(p.add(128 + 32 * h));
                // the two high bits of values 0-31, 32-63, 64-95 and 96-127 of this half
                let high = [
                    hb,
                    _mm256_srli_epi16(hb, 2),
                    _mm256_srli_epi16(hb, 4),
                    _mm256_srli_epi16(hb, 6),
                ]
                .map(|v| _mm256_slli_epi16(_mm256_and_si256(v, m2), 4));
                let low = [
                    _mm256_and_si256(a, m4),
                    _mm256_and_si256(c, m4),
                    _mm256_and_si256(_mm256_srli_epi16(a, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(c, 4), m4),
                ];
                let sc = &blk[192 + 8 * h..200 + 8 * h];
                for g in 0..4 {
                    let w = _mm256_or_si256(low[g], high[g]);
                    let scales = _mm256_set_m128i(
                        _mm_set1_epi16(i16::from(sc[2 * g + 1] as i8)),
                        _mm_set1_epi16(i16::from(sc[2 * g] as i8)),
                    );
                    for r in 0..N {
                        let x = load(q.as_ptr().add(r * cols + 256 * b + 128 * h + 32 * g) as _);
                        let pairs = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(w, x),
                            _mm256_maddubs_epi16(k32, x),
                        );
                        acc.add(r, dd[r], 4 * h + g, _mm256_madd_epi16(pairs, scales));
                    }
                }
            }
        }
        acc.store(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::kernels::tests::{activations, ggml_weight, COLS, ROWS, SIMD_TYPES};

    #[test]
    fn rounding_is_within_half_a_step_and_keeps_nan() {
        let mut x = activations(3, 64);
        x[70] = 40.0;
        let a = Q8Rows::quantize(&x);
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((a.d[b] - amax / 127.0).abs() <= 1e-7 * amax);
            let mut sum = 0i32;
            for (j, v) in xb.iter().enumerate() {
                let q = a.q[32 * b + j];
                assert!(q.unsigned_abs() <= 127);
                assert!((a.d[b] * f32::from(q) - v).abs() <= 0.5 * a.d[b] * 1.0001);
                sum += i32::from(q);
            }
            assert_eq!(a.s[b], a.d[b] * sum as f32);
        }
        let zeros = Q8Rows::quantize(&[0.0; 32]);
        assert_eq!((zeros.d[0], zeros.s[0]), (0.0, 0.0));
        let mut x = vec![1.0; 32];
        x[5] = f32::NAN;
        assert!(Q8Rows::quantize(&x).d[0].is_nan());
    }

    /// Each integer kernel computes `Σ w·x̂` for the rounded activations `x̂ = d·q` (in f64
    /// from the dequantized weight) to f32 rounding, for 1 to 17 rows, and a row's output
    /// is the same alone and in a batch.
    #[test]
    fn integer_kernels_multiply_the_rounded_activations_exactly() {
        for ty in SIMD_TYPES {
            // 32-value blocks also with a tail of 1 and 2 blocks past the groups of 8
            // (SmolLM2's hidden size is 576 = 18 blocks)
            let all_cols: &[usize] = match ty.block_size() {
                256 => &[COLS, 768],
                _ => &[COLS, 544, 576],
            };
            if select(&ggml_weight(ty, ROWS, COLS)).is_none() {
                eprintln!("{ty:?}: no integer kernel on this CPU; nothing to check");
                continue;
            }
            for &cols in all_cols {
                check_exact(ty, cols);
            }
            let w = ggml_weight(ty, ROWS, COLS);
            // and through the weight's own product, once asked for
            let x = activations(2, COLS);
            assert_eq!(
                w.clone()
                    .with_activations(super::super::Activations::Q8)
                    .matmul_t(&x, 2),
                matmul_t(&w, &x, 2, None).expect("a kernel"),
                "{ty:?}"
            );
        }
    }

    /// [`integer_kernels_multiply_the_rounded_activations_exactly`] for one block type and
    /// width, 1 to 17 activation rows.
    fn check_exact(ty: GgmlType, cols: usize) {
        let w = ggml_weight(ty, ROWS, cols);
        let wd = w.dequantize();
        for n in 1..=17 {
            let x = activations(n, cols);
            let a = Q8Rows::quantize(&x);
            let y = matmul_t(&w, &x, n, None).expect("a kernel");
            for r in 0..n {
                for o in 0..ROWS {
                    let (mut exact, mut scale) = (0f64, 0f64);
                    for k in 0..cols {
                        let xh = f64::from(a.d[(r * cols + k) / 32]) * f64::from(a.q[r * cols + k]);
                        let p = f64::from(wd[o * cols + k]) * xh;
                        exact += p;
                        scale += p.abs();
                    }
                    let got = f64::from(y[r * ROWS + o]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * scale + 1e-6,
                        "{ty:?} cols={cols} n={n} row {r} out {o}: {got} vs {exact}"
                    );
                }
            }
            let alone = matmul_t(&w, &x[(n - 1) * cols..], 1, None).expect("a kernel");
            assert_eq!(&alone[..], &y[(n - 1) * ROWS..], "{ty:?}: batch-invariant");
        }
    }

    /// A view's rows give what those rows of the whole weight give.
    #[test]
    fn a_rows_view_uses_its_own_rows() {
        let w = ggml_weight(GgmlType::Q4_K, ROWS, COLS);
        if select(&w).is_none() {
            return;
        }
        let x = activations(2, COLS);
        let whole = matmul_t(&w, &x, 2, None).expect("a kernel");
        let part = matmul_t(&w.rows_view(40, 20), &x, 2, None).expect("a kernel");
        for r in 0..2 {
            assert_eq!(
                &part[r * 20..(r + 1) * 20],
                &whole[r * ROWS + 40..r * ROWS + 60]
            );
        }
    }
}

#[cfg(test)]
mod throughput {
    use super::*;
    use crate::quant::kernels::tests::{activations, ggml_weight};
    use crate::quant::Activations;

    /// Weight bytes per second of one-row products, f32 and 8-bit activations, per block type
    /// (`cargo test --release -p graft-core --lib kernel_throughput -- --ignored --nocapture`).
    #[test]
    #[ignore = "prints figures; run by hand"]
    fn kernel_throughput() {
        let (rows, cols) = (1536, 768);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            for ty in [
                GgmlType::Q4_0,
                GgmlType::Q4_1,
                GgmlType::Q8_0,
                GgmlType::Q4_K,
                GgmlType::Q6_K,
            ] {
                let w = ggml_weight(ty, rows, cols);
                let x = activations(1, cols);
                for a in [Activations::F32, Activations::Q8] {
                    let w = w.clone().with_activations(a);
                    // the best of 7 trials: this machine is shared and noisy
                    let reps = 300;
                    let s = pool.install(|| {
                        (0..7)
                            .map(|_| {
                                let t0 = std::time::Instant::now();
                                for _ in 0..reps {
                                    std::hint::black_box(w.matmul_t(&x, 1));
                                }
                                t0.elapsed().as_secs_f64()
                            })
                            .fold(f64::INFINITY, f64::min)
                    });
                    eprintln!(
                        "{threads} threads {ty:?} {a}: {:.1} µs per product, {:.1} GB/s",
                        s / reps as f64 * 1e6,
                        (w.n_bytes() * reps) as f64 / s / 1e9
                    );
                }
            }
        }
    }
}
