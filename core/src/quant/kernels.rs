//! Fused dequantize-and-dot kernels: `y[r, o] = Σ_k W[o, k]·x[r, k]` computed straight from the
//! packed blocks, never writing an f32 weight anywhere (the weight is read once from memory per
//! call, which is what bounds decode speed).
//!
//! Activations stay f32 (llama.cpp instead rounds them to Q8 for integer dot products; graft keeps
//! the f32 reference numerics its parity tests hold it to). The block formats are the ones in
//! `ggml.rs` and `nf4.rs`; each kernel factors the block scale out of its sum the way the format
//! defines it, e.g. Q4_1 `Σ (q·d + m)·x = d·Σ q·x + m·Σ x` with `Σ x` per 32-block computed once
//! per call and shared by every weight row.
//!
//! x86-64 with AVX2, FMA and F16C (detected at run time) gets SIMD kernels for Q4_0, Q4_1, Q5_0,
//! Q8_0, Q4_K, Q5_K, Q6_K and NF4; other CPUs and block types (Q5_1, Q2_K, Q3_K, IQ4_NL, IQ4_XS)
//! use the portable path in `mod.rs`. Work is split over output rows on rayon's pool (the one
//! burn's CPU backend uses). Each output is computed by one kernel call in a fixed order, so a
//! row's result does not depend on the batch it is in.

use rayon::prelude::*;

use super::{GgmlType, PackedData, PackedWeight};

/// A SIMD kernel: the dot products of one packed weight row with `out.len()` (at most
/// [`MAX_ROWS`]) activation rows, each block unpacked once for all of them. `xs` holds the rows
/// one after another (for NF4, de-interleaved); `scales` is the weight row's NF4 absmaxes (empty
/// for GGML types); `aux` holds each activation row's per-32 sums (the types with an offset or
/// a min: Q4_0, Q4_1, Q5_0, Q4_K, Q5_K). Every row's sum runs in the same order whatever the
/// number of rows, so results are batch-invariant.
type RowKernel = unsafe fn(row: &[u8], scales: &[f32], xs: &[f32], aux: &[f32], out: &mut [f32]);

/// Activation rows one kernel call takes.
pub(super) const MAX_ROWS: usize = 8;

/// What a kernel needs from the activations besides `x` itself.
#[derive(Clone, Copy, PartialEq)]
enum Aux {
    None,
    Sums32,
    Nf4Deinterleave,
}

/// The SIMD kernel for `w`, if this CPU and `w`'s layout have one.
fn select(w: &PackedWeight) -> Option<(RowKernel, Aux)> {
    #[cfg(target_arch = "x86_64")]
    {
        if !avx2() {
            return None;
        }
        return match &w.data {
            PackedData::Ggml { ty, .. } => match ty {
                GgmlType::Q4_0 => Some((avx2::q4_0 as RowKernel, Aux::Sums32)),
                GgmlType::Q4_1 => Some((avx2::q4_1 as RowKernel, Aux::Sums32)),
                GgmlType::Q5_0 => Some((avx2::q5_0 as RowKernel, Aux::Sums32)),
                GgmlType::Q8_0 => Some((avx2::q8_0 as RowKernel, Aux::None)),
                GgmlType::Q4_K => Some((avx2::q4_k as RowKernel, Aux::Sums32)),
                GgmlType::Q5_K => Some((avx2::q5_k as RowKernel, Aux::Sums32)),
                GgmlType::Q6_K => Some((avx2::q6_k as RowKernel, Aux::None)),
                _ => None,
            },
            // NF4 blocks run over the flattened weight: rows must start on a block.
            PackedData::Nf4 { .. } if w.cols % super::nf4::BLOCK == 0 => {
                Some((avx2::nf4 as RowKernel, Aux::Nf4Deinterleave))
            }
            PackedData::Nf4 { .. } => None,
        };
    }
    #[allow(unreachable_code)]
    {
        let _ = w;
        None
    }
}

/// Names the path used for `w`: `"avx2"` or `"portable"`.
#[cfg(test)]
fn kernel_name(w: &PackedWeight) -> &'static str {
    if select(w).is_some() {
        "avx2"
    } else {
        "portable"
    }
}

/// Products smaller than this (weight values × rows of `x`) run on the calling thread.
const PAR_MIN_VALUES: usize = 1 << 16;

/// Whether this CPU has AVX2, FMA and F16C (and `GRAFT_NO_SIMD` is unset): the SIMD kernels'
/// requirement, detected once.
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        // (The variable too is read once: small kernels call this per dot product.)
        *AVX2.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
                && std::env::var_os("GRAFT_NO_SIMD").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// What a product runs on its outputs right after computing them, in the same task:
/// `then(o, ys)` with `ys` the outputs of consecutive weight rows from `o` (relative to the
/// weight), `n` per row (`ys[j·n + i]`: weight row `o + j`, activation row `i`). Used to add a
/// LoRA term while the outputs are hot and without a second pass over the pool.
pub(crate) type Then<'a> = Option<&'a (dyn Fn(usize, &mut [f32]) + Sync)>;

/// The product `[n, rows]` of `n` activation rows with every row of `w`, computed by weight
/// row: `each(o, bytes, ys)` gets weight row `o` (relative to `w`), its packed bytes, and its
/// `n` outputs to fill (then `then` on the task's rows, if any). Rows are split over rayon's
/// pool unless the product is small; each output is computed by one call in a fixed order, so
/// results do not depend on the split.
pub(super) fn by_rows(
    w: &PackedWeight,
    n: usize,
    each: impl Fn(usize, &[u8], &mut [f32]) + Sync,
    then: Then<'_>,
) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    let (bytes, row_bytes): (&[u8], usize) = match &w.data {
        PackedData::Ggml { ty, bytes } => (bytes, ty.bytes_for(cols as u64).unwrap_or(0) as usize),
        PackedData::Nf4 { q, .. } => (&q.packed, cols / 2),
    };
    // Outputs by weight row (`[rows, n]`), so that each rayon task owns a contiguous slice.
    let mut by_row = vec![0f32; rows * n];
    let threads = rayon::current_num_threads().max(1);
    let chunk_rows = rows.div_ceil(threads * 4).clamp(8, 256);
    let work = |(c, part): (usize, &mut [f32])| {
        let first = c * chunk_rows;
        for (i, ys) in part.chunks_exact_mut(n).enumerate() {
            let o = first + i;
            let at = (w.first_row + o) * row_bytes;
            each(o, &bytes[at..at + row_bytes], ys);
        }
        if let Some(then) = then {
            then(first, part);
        }
    };
    // Waking the pool costs more than it saves on small products.
    if rows * cols * n < PAR_MIN_VALUES {
        by_row.chunks_mut(chunk_rows * n).enumerate().for_each(work);
    } else {
        by_row
            .par_chunks_mut(chunk_rows * n)
            .enumerate()
            .for_each(work);
    }
    super::outputs_by_x_row(by_row, rows, n)
}

/// `x·Wᵀ` (`x: [n, cols]` → `[n, rows]`) with the SIMD kernel, or `None` when there is none
/// for this CPU or block type.
pub(super) fn matmul_t(w: &PackedWeight, x: &[f32], n: usize, then: Then<'_>) -> Option<Vec<f32>> {
    let (kernel, aux_kind) = select(w)?;
    let cols = w.cols;
    let aux_len = match aux_kind {
        Aux::None => 0,
        Aux::Sums32 => cols / 32,
        Aux::Nf4Deinterleave => cols,
    };
    // Per activation row: the per-32 sums or the NF4 de-interleaving.
    let mut aux = vec![0f32; n * aux_len];
    for (xr, ar) in x
        .chunks_exact(cols)
        .zip(aux.chunks_exact_mut(aux_len.max(1)))
    {
        match aux_kind {
            Aux::None => {}
            Aux::Sums32 => {
                for (s, xb) in ar.iter_mut().zip(xr.chunks_exact(32)) {
                    *s = xb.iter().sum();
                }
            }
            Aux::Nf4Deinterleave => {
                for (a, xb) in ar.chunks_exact_mut(64).zip(xr.chunks_exact(64)) {
                    for j in 0..32 {
                        a[j] = xb[2 * j];
                        a[32 + j] = xb[2 * j + 1];
                    }
                }
            }
        }
    }
    let absmax: &[f32] = match &w.data {
        PackedData::Ggml { .. } => &[],
        PackedData::Nf4 { absmax, .. } => absmax,
    };
    let row_scales = |o: usize| -> &[f32] {
        if absmax.is_empty() {
            &[]
        } else {
            let per = cols / super::nf4::BLOCK;
            &absmax[o * per..(o + 1) * per]
        }
    };
    let xs: &[f32] = if aux_kind == Aux::Nf4Deinterleave {
        &aux
    } else {
        x
    };
    let sums: &[f32] = if aux_kind == Aux::Sums32 { &aux } else { &[] };
    Some(by_rows(
        w,
        n,
        |o, row, ys| {
            let sc = row_scales(w.first_row + o);
            for (g, out) in ys.chunks_mut(MAX_ROWS).enumerate() {
                let r0 = g * MAX_ROWS;
                let r1 = r0 + out.len();
                let x_rows = &xs[r0 * cols..r1 * cols];
                let s_rows = if sums.is_empty() {
                    sums
                } else {
                    &sums[r0 * aux_len..r1 * aux_len]
                };
                // SAFETY: `select` returned this kernel only after detecting its CPU features,
                // and the slices have the lengths the block layout implies (checked when the
                // `PackedWeight` was built).
                unsafe { kernel(row, sc, x_rows, s_rows, out) };
            }
        },
        then,
    ))
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    //! AVX2 + FMA (+ F16C for block scales) row kernels. Each reads its blocks with unaligned
    //! loads (GGUF data is only byte-aligned), widens codes to i32 lanes, converts them to f32
    //! once per block, and multiplies-adds them with every activation row.

    use std::arch::x86_64::*;

    use super::super::ggml::scale_min_k4;
    use super::super::nf4::NF4_CODE;
    use super::MAX_ROWS;

    /// Bytes ahead of the block being read that the kernels ask the cache for.
    const PREFETCH: usize = 1024;

    /// The little-endian f16 at `p`, widened with F16C (inlined: a call inside the block loops
    /// would spill the vector registers).
    #[inline(always)]
    pub(in crate::quant) unsafe fn half_at(p: *const u8) -> f32 {
        // A broadcast, not an insert into lane 0: LLVM would insert into whatever register it
        // knows to have zero upper lanes — often an accumulator — and chain every block's
        // scale conversion to the previous block's sum.
        let bits = i16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits)))
    }

    #[inline(always)]
    pub(in crate::quant) unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
    }

    /// 8 bytes → 8 i32 lanes (zero-extended).
    #[inline(always)]
    unsafe fn u8x8(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }

    /// 8 bytes → 8 f32 lanes (sign-extended).
    #[inline(always)]
    unsafe fn i8x8(p: *const u8) -> __m256 {
        f(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    #[inline(always)]
    unsafe fn f(v: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(v)
    }

    #[inline(always)]
    unsafe fn ld(x: *const f32) -> __m256 {
        _mm256_loadu_ps(x)
    }

    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `Σ w·x` over 32 values held as four 8-lane vectors.
    #[inline(always)]
    unsafe fn dot32(w: &[__m256; 4], x: *const f32) -> __m256 {
        let mut s = _mm256_mul_ps(w[0], ld(x));
        s = _mm256_fmadd_ps(w[1], ld(x.add(8)), s);
        s = _mm256_fmadd_ps(w[2], ld(x.add(16)), s);
        _mm256_fmadd_ps(w[3], ld(x.add(24)), s)
    }

    /// The low nibbles, then the high nibbles, of `G` groups of 8 bytes, as i32 lanes (for
    /// `G = 4`, a K-quant chunk of 64 codes).
    #[inline(always)]
    unsafe fn nibbles<const G: usize>(q: *const u8) -> [[__m256i; G]; 2] {
        let m = _mm256_set1_epi32(0xF);
        let v: [__m256i; G] = std::array::from_fn(|g| u8x8(q.add(8 * g)));
        [
            v.map(|v| _mm256_and_si256(v, m)),
            v.map(|v| _mm256_srli_epi32(v, 4)),
        ]
    }

    /// The 32 codes of a block stored as 16 bytes of nibbles, as i32 in `x` order: element `j`
    /// in the low nibble of byte `j`, element `j + 16` in its high nibble (Q4_0, Q4_1, Q5_0).
    #[inline(always)]
    unsafe fn nibbles32(q: *const u8) -> [__m256i; 4] {
        let [lo, hi] = nibbles::<2>(q);
        [lo[0], lo[1], hi[0], hi[1]]
    }

    /// A five-bit code: `low | ((bits >> shift) & 1) << 4`, shifts per lane (Q5_0, Q5_K).
    #[inline(always)]
    unsafe fn with_bit4(low: __m256i, bits: __m256i, shift: __m256i) -> __m256 {
        let bit = _mm256_and_si256(_mm256_srlv_epi32(bits, shift), _mm256_set1_epi32(1));
        f(_mm256_or_si256(low, _mm256_slli_epi32(bit, 4)))
    }

    /// Row accumulators: a vector sum and a scalar offset per activation row.
    struct Acc {
        v: [__m256; MAX_ROWS],
        off: [f32; MAX_ROWS],
    }

    impl Acc {
        #[inline(always)]
        unsafe fn new() -> Self {
            Acc {
                v: [_mm256_setzero_ps(); MAX_ROWS],
                off: [0.0; MAX_ROWS],
            }
        }

        #[inline(always)]
        unsafe fn store(&self, out: &mut [f32]) {
            for (r, o) in out.iter_mut().enumerate() {
                *o = hsum(self.v[r]) + self.off[r];
            }
        }
    }

    /// 32-value blocks of `block_bytes` bytes with an offset or a min (Q4_0, Q4_1, Q5_0):
    /// `Σ (q·d + m)·x = d·Σ q·x + m·Σ x`, with `(d, m, q)` read by `block` from the block start.
    #[inline(always)]
    unsafe fn q32_rows(
        row: &[u8],
        xs: &[f32],
        sums: &[f32],
        out: &mut [f32],
        block_bytes: usize,
        block: impl Fn(*const u8) -> (f32, f32, [__m256; 4]),
    ) {
        let (n, cols) = (out.len(), xs.len() / out.len());
        let nb = cols / 32;
        let mut acc = Acc::new();
        for (b, blk) in row.chunks_exact(block_bytes).enumerate() {
            prefetch(blk.as_ptr());
            let (d, m, w) = block(blk.as_ptr());
            for r in 0..n {
                let s = dot32(&w, xs.as_ptr().add(r * cols + 32 * b));
                acc.v[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc.v[r]);
                acc.off[r] += m * sums[r * nb + b];
            }
        }
        acc.store(out);
    }

    /// Q4_0: codes offset by 8, so `m = −8d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_0(row: &[u8], _: &[f32], xs: &[f32], sums: &[f32], out: &mut [f32]) {
        q32_rows(row, xs, sums, out, 18, |p| {
            let d = half_at(p);
            (d, -8.0 * d, nibbles32(p.add(2)).map(|q| f(q)))
        });
    }

    /// Q4_1: `d` and `m` stored as two f16.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1(row: &[u8], _: &[f32], xs: &[f32], sums: &[f32], out: &mut [f32]) {
        q32_rows(row, xs, sums, out, 20, |p| {
            (
                half_at(p),
                half_at(p.add(2)),
                nibbles32(p.add(4)).map(|q| f(q)),
            )
        });
    }

    /// Q5_0: five-bit codes offset by 16 (`m = −16d`), the fifth bit of element `j` being bit
    /// `j` of the u32 after `d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q5_0(row: &[u8], _: &[f32], xs: &[f32], sums: &[f32], out: &mut [f32]) {
        q32_rows(row, xs, sums, out, 22, |p| {
            let d = half_at(p);
            let qh = _mm256_set1_epi32(i32::from_le_bytes([
                *p.add(2),
                *p.add(3),
                *p.add(4),
                *p.add(5),
            ]));
            let low = nibbles32(p.add(6));
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let w = std::array::from_fn(|g| {
                let shift = _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * g as i32));
                with_bit4(low[g], qh, shift)
            });
            (d, -16.0 * d, w)
        });
    }

    /// Q8_0: `d·Σ q·x` with signed bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0(row: &[u8], _: &[f32], xs: &[f32], _: &[f32], out: &mut [f32]) {
        let (n, cols) = (out.len(), xs.len() / out.len());
        let mut acc = Acc::new();
        for (b, blk) in row.chunks_exact(34).enumerate() {
            prefetch(blk.as_ptr());
            let d = half_at(blk.as_ptr());
            let q = blk.as_ptr().add(2);
            let w = [i8x8(q), i8x8(q.add(8)), i8x8(q.add(16)), i8x8(q.add(24))];
            for r in 0..n {
                let s = dot32(&w, xs.as_ptr().add(r * cols + 32 * b));
                acc.v[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc.v[r]);
            }
        }
        acc.store(out);
    }

    /// Q4_K and Q5_K blocks of `block_bytes` bytes (`d`, `dmin` and the 12 bytes of six-bit
    /// scales and mins first): per 32-value sub-block `d·sc·Σ q·x − dmin·m·Σ x`. `codes` reads
    /// chunk `c` (of 4) of 64 codes from the block start: the first 32, then the next 32.
    #[inline(always)]
    unsafe fn k_rows(
        row: &[u8],
        xs: &[f32],
        sums: &[f32],
        out: &mut [f32],
        block_bytes: usize,
        codes: impl Fn(*const u8, usize) -> [[__m256; 4]; 2],
    ) {
        let (n, cols) = (out.len(), xs.len() / out.len());
        let nb = cols / 32;
        let mut acc = Acc::new();
        for (b, blk) in row.chunks_exact(block_bytes).enumerate() {
            prefetch(blk.as_ptr());
            let (d, dmin) = (half_at(blk.as_ptr()), half_at(blk.as_ptr().add(2)));
            let scales = &blk[4..16];
            for c in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * c, scales);
                let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
                let [lo, hi] = codes(blk.as_ptr(), c);
                let (d1, d2) = (
                    _mm256_set1_ps(d * sc1 as f32),
                    _mm256_set1_ps(d * sc2 as f32),
                );
                let (dm1, dm2) = (dmin * m1 as f32, dmin * m2 as f32);
                for r in 0..n {
                    let xb = xs.as_ptr().add(r * cols + 256 * b + 64 * c);
                    let s1 = dot32(&lo, xb);
                    let s2 = dot32(&hi, xb.add(32));
                    acc.v[r] = _mm256_fmadd_ps(d1, s1, acc.v[r]);
                    acc.v[r] = _mm256_fmadd_ps(d2, s2, acc.v[r]);
                    let sb = r * nb + 8 * b + 2 * c;
                    acc.off[r] -= dm1 * sums[sb] + dm2 * sums[sb + 1];
                }
            }
        }
        acc.store(out);
    }

    /// Q4_K: chunk `c` of 64 values keeps its first 32 in the low nibbles of 32 bytes and the
    /// next 32 in the high nibbles.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_k(row: &[u8], _: &[f32], xs: &[f32], sums: &[f32], out: &mut [f32]) {
        k_rows(row, xs, sums, out, 144, |blk, c| {
            nibbles::<4>(blk.add(16 + 32 * c)).map(|h| h.map(|q| f(q)))
        });
    }

    /// Q5_K: Q4_K's nibbles (after 32 bytes of `qh`) plus a fifth bit: bit `2c` of `qh[l]` for
    /// value `l` of chunk `c`'s first 32, bit `2c + 1` for its next 32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q5_k(row: &[u8], _: &[f32], xs: &[f32], sums: &[f32], out: &mut [f32]) {
        k_rows(row, xs, sums, out, 176, |blk, c| {
            let [lo, hi] = nibbles::<4>(blk.add(48 + 32 * c));
            let qh = [0, 1, 2, 3].map(|g| u8x8(blk.add(16 + 8 * g)));
            let (s1, s2) = (
                _mm256_set1_epi32(2 * c as i32),
                _mm256_set1_epi32(2 * c as i32 + 1),
            );
            [
                [0, 1, 2, 3].map(|g| with_bit4(lo[g], qh[g], s1)),
                [0, 1, 2, 3].map(|g| with_bit4(hi[g], qh[g], s2)),
            ]
        });
    }

    /// Six-bit Q6_K codes minus 32: `low | ((hb >> shift) & 3) << 4`.
    #[inline(always)]
    unsafe fn six_bit(low: __m256i, hb: __m256i, shift: __m128i) -> __m256 {
        let high = _mm256_and_si256(_mm256_srl_epi32(hb, shift), _mm256_set1_epi32(3));
        f(_mm256_sub_epi32(
            _mm256_or_si256(low, _mm256_slli_epi32(high, 4)),
            _mm256_set1_epi32(32),
        ))
    }

    /// Q6_K: six-bit codes (low four bits in `ql`, high two in `qh`) minus 32, times a signed
    /// eight-bit scale per 16 values, times `d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6_k(row: &[u8], _: &[f32], xs: &[f32], _: &[f32], out: &mut [f32]) {
        let (n, cols) = (out.len(), xs.len() / out.len());
        let m4 = _mm256_set1_epi32(0xF);
        let mut acc = Acc::new();
        for (b, blk) in row.chunks_exact(210).enumerate() {
            prefetch(blk.as_ptr());
            let d = half_at(blk.as_ptr().add(208));
            for h in 0..2 {
                let ql = blk.as_ptr().add(64 * h);
                let qh = blk.as_ptr().add(128 + 32 * h);
                let sc = &blk[192 + 8 * h..200 + 8 * h];
                for g in 0..4 {
                    let l = 8 * g;
                    let is = l / 16;
                    let (a, c, hb) = (u8x8(ql.add(l)), u8x8(ql.add(l + 32)), u8x8(qh.add(l)));
                    let parts = [
                        (
                            six_bit(_mm256_and_si256(a, m4), hb, _mm_set_epi64x(0, 0)),
                            0,
                            is,
                        ),
                        (
                            six_bit(_mm256_and_si256(c, m4), hb, _mm_set_epi64x(0, 2)),
                            32,
                            is + 2,
                        ),
                        (
                            six_bit(_mm256_srli_epi32(a, 4), hb, _mm_set_epi64x(0, 4)),
                            64,
                            is + 4,
                        ),
                        (
                            six_bit(_mm256_srli_epi32(c, 4), hb, _mm_set_epi64x(0, 6)),
                            96,
                            is + 6,
                        ),
                    ];
                    for r in 0..n {
                        let xh = xs.as_ptr().add(r * cols + 256 * b + 128 * h);
                        for &(q, xo, s) in &parts {
                            let t = _mm256_mul_ps(q, ld(xh.add(l + xo)));
                            let scale = _mm256_set1_ps(d * (sc[s] as i8) as f32);
                            acc.v[r] = _mm256_fmadd_ps(scale, t, acc.v[r]);
                        }
                    }
                }
            }
        }
        acc.store(out);
    }

    /// `table[i]` for 16-entry `table = t_lo ++ t_hi`: two 8-lane permutes blended on bit 3.
    #[inline(always)]
    unsafe fn lookup16(t_lo: __m256, t_hi: __m256, i: __m256i) -> __m256 {
        let sel = _mm256_castsi256_ps(_mm256_slli_epi32(i, 28));
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(t_lo, i),
            _mm256_permutevar8x32_ps(t_hi, i),
            sel,
        )
    }

    /// NF4: `absmax·Σ code[q]·x` per 64-value block. Byte `k` holds element `2k` in its high
    /// nibble and `2k + 1` in its low one; `x` arrives de-interleaved (even elements of the block,
    /// then odd), so both nibbles of 8 bytes meet 8 contiguous activations.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn nf4(row: &[u8], absmax: &[f32], xs: &[f32], _: &[f32], out: &mut [f32]) {
        let (n, cols) = (out.len(), xs.len() / out.len());
        let (t_lo, t_hi) = (ld(NF4_CODE.as_ptr()), ld(NF4_CODE.as_ptr().add(8)));
        let m = _mm256_set1_epi32(0xF);
        let mut acc = Acc::new();
        for (b, blk) in row.chunks_exact(32).enumerate() {
            prefetch(blk.as_ptr());
            let v = [0, 1, 2, 3].map(|g| u8x8(blk.as_ptr().add(8 * g)));
            let even = v.map(|v| lookup16(t_lo, t_hi, _mm256_srli_epi32(v, 4)));
            let odd = v.map(|v| lookup16(t_lo, t_hi, _mm256_and_si256(v, m)));
            let a = _mm256_set1_ps(absmax[b]);
            for r in 0..n {
                let xb = xs.as_ptr().add(r * cols + 64 * b);
                let mut s = _mm256_setzero_ps();
                for g in 0..4 {
                    s = _mm256_fmadd_ps(even[g], ld(xb.add(8 * g)), s);
                    s = _mm256_fmadd_ps(odd[g], ld(xb.add(32 + 8 * g)), s);
                }
                acc.v[r] = _mm256_fmadd_ps(a, s, acc.v[r]);
            }
        }
        acc.store(out);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use half::f16;

    use super::*;

    /// A deterministic pseudo-random byte stream.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    /// Random GGML blocks whose f16 scale fields hold small finite values.
    pub(in crate::quant) fn ggml_weight(ty: GgmlType, rows: usize, cols: usize) -> PackedWeight {
        let row_bytes = ty.bytes_for(cols as u64).expect("whole blocks") as usize;
        let mut b = bytes(rows * row_bytes, ty.id() as u64);
        let halves: &[usize] = match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::MXFP4 => &[],
        };
        for (i, blk) in b.chunks_exact_mut(ty.type_size()).enumerate() {
            if ty == GgmlType::MXFP4 {
                // an E8M0 exponent: scales 2^-10 … 2^-6
                blk[0] = 118 + (i % 5) as u8;
            }
            for (k, &at) in halves.iter().enumerate() {
                let v = 0.01 + ((i * 7 + k * 3) % 11) as f32 * 0.003;
                blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        PackedWeight::ggml(ty, rows, cols, Arc::<[u8]>::from(b).into()).expect("consistent sizes")
    }

    pub(in crate::quant) fn activations(n: usize, cols: usize) -> Vec<f32> {
        bytes(n * cols, 99)
            .into_iter()
            .map(|v| (v as f32 - 127.5) / 64.0)
            .collect()
    }

    /// The GGML block types with AVX2 kernels, f32 and 8-bit activations alike.
    pub(in crate::quant) const SIMD_TYPES: [GgmlType; 7] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    pub(in crate::quant) const ROWS: usize = 150;
    pub(in crate::quant) const COLS: usize = 512; // ROWS·COLS is above PAR_MIN_VALUES: the pool path

    /// `w.matmul_t` agrees with dequantize-then-dot (in f64) to f32 rounding of the products
    /// for 1, 3 and 9 activation rows, and a row's output is the same alone and in a batch.
    fn check_matmul_t(w: &PackedWeight) {
        let (rows, cols) = (w.rows, w.cols);
        let name = w.kind_name();
        let wd = w.dequantize();
        for n in [1, 3, 9] {
            let x = activations(n, cols);
            let y = w.matmul_t(&x, n);
            for r in 0..n {
                for o in 0..rows {
                    let (xr, wr) = (&x[r * cols..(r + 1) * cols], &wd[o * cols..(o + 1) * cols]);
                    let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let scale: f64 = xr
                        .iter()
                        .zip(wr)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    let got = y[r * rows + o] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * scale + 1e-6,
                        "{name} n={n} row {r} out {o}: {got} vs {exact}"
                    );
                }
            }
            let alone = w.matmul_t(&x[(n - 1) * cols..], 1);
            assert_eq!(&alone[..], &y[(n - 1) * rows..], "{name}: batch-invariant");
        }
    }

    #[test]
    fn simd_kernels_match_dequantize_then_dot() {
        let mut weights: Vec<PackedWeight> = SIMD_TYPES
            .into_iter()
            .map(|ty| ggml_weight(ty, ROWS, COLS))
            .collect();
        let dense: Vec<f32> = activations(ROWS, COLS).iter().map(|v| v / 3.0).collect();
        weights.push(PackedWeight::nf4(ROWS, COLS, &dense));
        for w in &weights {
            if kernel_name(w) == "portable" {
                eprintln!(
                    "{}: no SIMD kernel on this CPU; the portable path is tested",
                    w.kind_name()
                );
            }
            check_matmul_t(w);
        }
    }

    /// Block types without a SIMD kernel go through the portable path of `matmul_t`.
    #[test]
    fn other_types_use_the_portable_path() {
        for ty in [
            GgmlType::Q5_1,
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
            GgmlType::MXFP4,
        ] {
            let w = ggml_weight(ty, ROWS, COLS);
            assert_eq!(kernel_name(&w), "portable", "{ty:?}");
            check_matmul_t(&w);
        }
    }

    /// A view of some rows (one expert of a stacked expert tensor) computes what those rows of
    /// the whole weight compute, on the SIMD and the portable paths, and holds its share of
    /// the bytes.
    #[test]
    fn a_rows_view_is_those_rows_of_the_whole_weight() {
        let dense: Vec<f32> = activations(ROWS, COLS).iter().map(|v| v / 3.0).collect();
        for w in [
            ggml_weight(GgmlType::Q4_K, ROWS, COLS),
            ggml_weight(GgmlType::Q8_0, ROWS, COLS),
            ggml_weight(GgmlType::Q3_K, ROWS, COLS),
            PackedWeight::nf4(ROWS, COLS, &dense),
        ] {
            let (start, n) = (50, 30);
            let view = w.rows_view(start, n);
            let x = activations(3, COLS);
            let whole = w.matmul_t(&x, 3);
            let part = view.matmul_t(&x, 3);
            let portable = view.matmul_t_portable(&x, 3);
            for r in 0..3 {
                let want = &whole[r * ROWS + start..r * ROWS + start + n];
                assert_eq!(&part[r * n..(r + 1) * n], want, "{}", w.kind_name());
                for (a, b) in portable[r * n..(r + 1) * n].iter().zip(want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "{}",
                        w.kind_name()
                    );
                }
            }
            assert_eq!(
                view.dequantize(),
                w.dequantize()[start * COLS..(start + n) * COLS]
            );
            assert_eq!(
                view.rows_view(10, 5).dequantize(),
                w.rows_view(60, 5).dequantize()
            );
            assert_eq!(w.n_bytes() * n / ROWS, view.n_bytes(), "{}", w.kind_name());
        }
    }
}
