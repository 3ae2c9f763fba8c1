//! The CPU kernel for attention of query rows that see every key (a decode step: one new token
//! per sequence, no mask), over keys and values read in place from the cache's pieces.
//!
//! As tensor ops this was a handful of small products per layer (3 query rows per key head
//! against the whole cache), a softmax and a concatenation of scores, run far below memory
//! bandwidth: at 2,100 tokens of context SmolLM2's decode fell from ~130 to ~34 tokens/s. Here
//! each key and value row is read once per key head for all of that head's query rows, and the
//! keys are split into chunks so both cores work on one head (flash-decoding): each chunk
//! keeps its own running maximum, sum of exponentials and weighted sum of values, merged
//! afterwards in chunk order. The chunks start at fixed
//! positions, so a sequence's result does not depend on the batch it is in.

use rayon::prelude::*;

use crate::quant::avx2;
use crate::simd::{axpy, dot};

/// Keys per chunk (a chunk's keys and values, 2 × 32 KB at head size 64, stay in L2; 64 to
/// 1,024 measured within noise of each other).
const CHUNK: usize = 128;

/// Multiply-adds below which the kernel runs on the calling thread.
const PAR_MIN_VALUES: usize = 1 << 15;

/// One piece of a cache's keys or values, `[kv_heads, len, head_dim]` with row stride and head
/// stride in elements (values of one row contiguous) inside `data`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvView<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub head_stride: usize,
    pub row_stride: usize,
    pub len: usize,
}

impl KvView<'_> {
    fn row(&self, h: usize, j: usize, hd: usize) -> &[f32] {
        let at = self.offset + h * self.head_stride + j * self.row_stride;
        &self.data[at..at + hd]
    }
}

/// The query rows and the score options.
pub(crate) struct Queries<'a> {
    /// `[kv_heads, rows, head_dim]`: each key head's query rows.
    pub q: &'a [f32],
    pub kv_heads: usize,
    pub rows: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    /// One extra logit per query row (`[kv_heads·rows]`) that joins the softmax and is dropped.
    pub sinks: Option<&'a [f32]>,
}

/// `softmax(q·Kᵀ·scale)·V` for every query row, keys and values given as consecutive pieces
/// (`(keys, values)`, equal lengths).
///
/// # Shapes
/// → `[kv_heads, rows, head_dim]`
pub(crate) fn attend(qs: &Queries<'_>, pieces: &[(KvView<'_>, KvView<'_>)]) -> Vec<f32> {
    let (kvh, rows, hd) = (qs.kv_heads, qs.rows, qs.head_dim);
    let total: usize = pieces.iter().map(|(k, _)| k.len).sum();
    let chunks = total.div_ceil(CHUNK).max(1);
    // Per (head, chunk): per row its maximum, its sum of exponentials, its weighted values.
    let task = |t: usize| -> Vec<f32> {
        let (h, c) = (t / chunks, t % chunks);
        chunk(qs, pieces, h, c * CHUNK..((c + 1) * CHUNK).min(total))
    };
    let partials: Vec<Vec<f32>> = if kvh * total * rows * hd < PAR_MIN_VALUES {
        (0..kvh * chunks).map(task).collect()
    } else {
        (0..kvh * chunks).into_par_iter().map(task).collect()
    };
    let mut out = vec![0f32; kvh * rows * hd];
    let per = 2 + hd;
    for h in 0..kvh {
        let parts = &partials[h * chunks..(h + 1) * chunks];
        for r in 0..rows {
            let sink = qs.sinks.map(|s| s[h * rows + r]);
            let at = |p: &Vec<f32>| p[r * per];
            let m = parts
                .iter()
                .map(at)
                .chain(sink)
                .fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[(h * rows + r) * hd..(h * rows + r + 1) * hd];
            let mut sum = sink.map_or(0.0, |s| (s - m).exp());
            for p in parts {
                let part = &p[r * per..(r + 1) * per];
                let w = (part[0] - m).exp();
                sum += w * part[1];
                axpy(o, w, &part[2..]);
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
        }
    }
    out
}

/// One head's query rows against keys `keys` (global positions across the pieces): per row
/// `[max, Σ exp, Σ exp·v (head_dim)]`.
fn chunk(
    qs: &Queries<'_>,
    pieces: &[(KvView<'_>, KvView<'_>)],
    h: usize,
    keys: std::ops::Range<usize>,
) -> Vec<f32> {
    let (rows, hd) = (qs.rows, qs.head_dim);
    let n = keys.len();
    let q = &qs.q[h * rows * hd..(h + 1) * rows * hd];
    // The chunk's rows of each piece: (piece, first local row, count).
    let mut spans = Vec::new();
    let mut first = 0;
    for (p, (k, _)) in pieces.iter().enumerate() {
        let (a, b) = (keys.start.max(first), keys.end.min(first + k.len));
        if a < b {
            spans.push((p, a - first, b - a));
        }
        first += k.len;
    }
    let simd = avx2();
    let mut scores = vec![0f32; rows * n];
    let mut j = 0;
    for &(p, from, count) in &spans {
        let k = &pieces[p].0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: avx2() checked AVX2 and FMA on this CPU; the view's rows are in bounds
            // (checked by `KvView::row` on each access).
            unsafe { x86::scores(q, rows, hd, k, h, from..from + count, &mut scores, n, j) };
            j += count;
            continue;
        }
        for l in from..from + count {
            let kr = k.row(h, l, hd);
            for r in 0..rows {
                scores[r * n + j] = dot(&q[r * hd..(r + 1) * hd], kr);
            }
            j += 1;
        }
    }
    for s in scores.iter_mut() {
        *s *= qs.scale;
        if let Some(cap) = qs.softcap {
            *s = (*s / cap).tanh() * cap;
        }
    }
    let per = 2 + hd;
    let mut out = vec![0f32; rows * per];
    for r in 0..rows {
        let s = &mut scores[r * n..(r + 1) * n];
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in s.iter_mut() {
            *v = (*v - m).exp();
            sum += *v;
        }
        let o = &mut out[r * per..(r + 1) * per];
        o[0] = m;
        o[1] = sum;
        let mut j = 0;
        for &(p, from, count) in &spans {
            let v = &pieces[p].1;
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: as above.
                unsafe { x86::weighted_sum(&s[j..j + count], v, h, from, hd, &mut o[2..]) };
                j += count;
                continue;
            }
            for l in from..from + count {
                axpy(&mut o[2..], s[j], v.row(h, l, hd));
                j += 1;
            }
        }
    }
    out
}

/// AVX2 + FMA loops over a piece's rows (the per-row helpers of `crate::simd` would be a call
/// per key: they cannot inline into code compiled without the features).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::KvView;
    use crate::simd::hsum;

    /// `out[r·n + j + i] = q[r]·k[keys.start + i]` for each query row `r` and key `i`: four
    /// keys at a time per row (four independent sums, not one chain of dependent FMAs).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(
        q: &[f32],
        rows: usize,
        hd: usize,
        k: &KvView<'_>,
        h: usize,
        keys: std::ops::Range<usize>,
        out: &mut [f32],
        n: usize,
        j: usize,
    ) {
        let blocks = hd / 8;
        let count = keys.len();
        for r in 0..rows {
            let qr = &q[r * hd..(r + 1) * hd];
            let tail = |acc: f32, kr: &[f32]| (8 * blocks..hd).fold(acc, |s, d| s + qr[d] * kr[d]);
            let mut i = 0;
            while i + 4 <= count {
                let kr = [
                    k.row(h, keys.start + i, hd),
                    k.row(h, keys.start + i + 1, hd),
                    k.row(h, keys.start + i + 2, hd),
                    k.row(h, keys.start + i + 3, hd),
                ];
                let mut acc = [_mm256_setzero_ps(); 4];
                for b in 0..blocks {
                    let qv = _mm256_loadu_ps(qr.as_ptr().add(8 * b));
                    for u in 0..4 {
                        acc[u] =
                            _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[u].as_ptr().add(8 * b)), acc[u]);
                    }
                }
                for u in 0..4 {
                    out[r * n + j + i + u] = tail(hsum(acc[u]), kr[u]);
                }
                i += 4;
            }
            while i < count {
                let kr = k.row(h, keys.start + i, hd);
                let mut acc = _mm256_setzero_ps();
                for b in 0..blocks {
                    acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(qr.as_ptr().add(8 * b)),
                        _mm256_loadu_ps(kr.as_ptr().add(8 * b)),
                        acc,
                    );
                }
                out[r * n + j + i] = tail(hsum(acc), kr);
                i += 1;
            }
        }
    }

    /// `o += Σᵢ p[i]·v[from + i]`: 64 of `o`'s values at a time held in registers over all the
    /// keys (a load and store of `o` per key would chain every FMA through memory).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum(
        p: &[f32],
        v: &KvView<'_>,
        h: usize,
        from: usize,
        hd: usize,
        o: &mut [f32],
    ) {
        let wide = hd / 64;
        for c in 0..wide {
            let po = o.as_mut_ptr().add(64 * c);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (b, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(po.add(8 * b));
            }
            for (i, &w) in p.iter().enumerate() {
                let pv = v.row(h, from + i, hd).as_ptr().add(64 * c);
                let wv = _mm256_set1_ps(w);
                for (b, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(pv.add(8 * b)), *a);
                }
            }
            for (b, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(po.add(8 * b), *a);
            }
        }
        // The rest of a head size that is not a multiple of 64.
        for (i, &w) in p.iter().enumerate() {
            let vr = v.row(h, from + i, hd);
            for d in 64 * wide..hd {
                o[d] += w * vr[d];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((((i + seed) * 7919) % 1009) as f32 - 504.0) / 300.0)
            .collect()
    }

    /// Against the textbook formula in f64 over the concatenated keys: pieces of several
    /// lengths (one strided like a slice of a longer cache), more than one chunk, with and
    /// without soft-cap and sinks.
    #[test]
    fn pieces_and_chunks_equal_one_softmax_over_all_keys() {
        // Head sizes below, at and past the kernels' 64-wide blocks; 3 to 5 query rows (the
        // keys' groups of 4 and their tails).
        for (hd, rows) in [(16, 3), (64, 5), (72, 4)] {
            check_against_f64(hd, rows);
        }
    }

    fn check_against_f64(hd: usize, rows: usize) {
        let kvh = 2;
        let lens = [200, 1, 70];
        // The first piece sits inside a longer buffer (cap 260 rows, starting at row 5).
        let cap = 260;
        let big = values(kvh * cap * hd, 1);
        let big_v = values(kvh * cap * hd, 2);
        let small: Vec<(Vec<f32>, Vec<f32>)> = lens[1..]
            .iter()
            .enumerate()
            .map(|(i, &l)| (values(kvh * l * hd, 10 + i), values(kvh * l * hd, 20 + i)))
            .collect();
        let view = |data: &'static [f32], offset, head_stride, len| KvView {
            data,
            offset,
            head_stride,
            row_stride: hd,
            len,
        };
        let leak = |v: Vec<f32>| -> &'static [f32] { Box::leak(v.into_boxed_slice()) };
        let (big, big_v) = (leak(big), leak(big_v));
        let mut pieces = vec![(
            view(big, 5 * hd, cap * hd, lens[0]),
            view(big_v, 5 * hd, cap * hd, lens[0]),
        )];
        for ((k, v), &l) in small.into_iter().zip(&lens[1..]) {
            pieces.push((view(leak(k), 0, l * hd, l), view(leak(v), 0, l * hd, l)));
        }
        let q = values(kvh * rows * hd, 3);
        let sinks = values(kvh * rows, 4);
        for (softcap, sinks) in [(None, None), (Some(5.0), Some(&sinks[..]))] {
            let qs = Queries {
                q: &q,
                kv_heads: kvh,
                rows,
                head_dim: hd,
                scale: 0.25,
                softcap,
                sinks,
            };
            let got = attend(&qs, &pieces);
            for h in 0..kvh {
                for r in 0..rows {
                    let qr = &q[(h * rows + r) * hd..(h * rows + r + 1) * hd];
                    let mut logits = Vec::new();
                    let mut vals = Vec::new();
                    for (k, v) in &pieces {
                        for j in 0..k.len {
                            let s: f64 = qr
                                .iter()
                                .zip(k.row(h, j, hd))
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum::<f64>()
                                * 0.25;
                            logits.push(
                                softcap
                                    .map_or(s, |c: f32| (s / f64::from(c)).tanh() * f64::from(c)),
                            );
                            vals.push(v.row(h, j, hd));
                        }
                    }
                    let sink = sinks.map(|s| f64::from(s[h * rows + r]));
                    let m = logits.iter().copied().chain(sink).fold(f64::MIN, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - m).exp()).sum::<f64>()
                        + sink.map_or(0.0, |s| (s - m).exp());
                    for d in 0..hd {
                        let want: f64 = logits
                            .iter()
                            .zip(&vals)
                            .map(|(l, v)| (l - m).exp() / z * f64::from(v[d]))
                            .sum();
                        let g = f64::from(got[(h * rows + r) * hd + d]);
                        assert!(
                            (g - want).abs() < 1e-4,
                            "hd {hd} h {h} r {r} d {d}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
