//! f32 → GGML blocks: the encoders llama.cpp's `llama-quantize` runs when it has no importance
//! matrix (`ggml-quants.c::quantize_row_*_ref`), so that a merged model written by graft holds
//! the blocks llama.cpp itself would have made from the same values.
//!
//! Each encoder keeps the reference's order of f32 operations and its rounding: `nearest_int`
//! (round half to even through the 1.5·2²³ trick), truncating casts where the C casts, `roundf`
//! (half away from zero) for Q8_0, f16/bf16 round to nearest even. The K-quants choose their
//! sub-block scales by the reference's search (`make_qkx2_quants` for Q4_K, `make_qx_quants`
//! for Q6_K).

use half::{bf16, f16};

use super::GgmlType;

const QK_K: usize = 256;
/// Below this a group counts as all zero (`GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// A tensor that cannot be written in the asked type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("graft cannot write {0:?} blocks (it writes F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K)")]
    Unsupported(GgmlType),
    #[error("{len} values are not a whole number of {ty:?} blocks of {block}")]
    PartialBlock {
        ty: GgmlType,
        len: usize,
        block: usize,
    },
}

impl GgmlType {
    /// Whether [`GgmlType::quantize`] can write this type.
    pub fn can_encode(self) -> bool {
        !matches!(
            self,
            GgmlType::Q2_K
                | GgmlType::Q3_K
                | GgmlType::Q5_K
                | GgmlType::IQ4_NL
                | GgmlType::IQ4_XS
                | GgmlType::MXFP4
        )
    }

    /// Encodes `x` (a whole number of blocks, row after row) in this type.
    ///
    /// # Errors
    /// A type graft does not write, or a length that is not a whole number of blocks.
    pub fn quantize(self, x: &[f32]) -> Result<Vec<u8>, EncodeError> {
        if !self.can_encode() {
            return Err(EncodeError::Unsupported(self));
        }
        let bs = self.block_size();
        if x.len() % bs != 0 {
            return Err(EncodeError::PartialBlock {
                ty: self,
                len: x.len(),
                block: bs,
            });
        }
        let mut out = Vec::with_capacity(x.len() / bs * self.type_size());
        match self {
            GgmlType::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
            GgmlType::F16 => out.extend(x.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes())),
            GgmlType::BF16 => out.extend(x.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes())),
            _ => {
                for block in x.chunks_exact(bs) {
                    match self {
                        GgmlType::Q4_0 => q4_0(block, &mut out),
                        GgmlType::Q4_1 => q4_1(block, &mut out),
                        GgmlType::Q5_0 => q5_0(block, &mut out),
                        GgmlType::Q5_1 => q5_1(block, &mut out),
                        GgmlType::Q8_0 => q8_0(block, &mut out),
                        GgmlType::Q4_K => q4_k(block, &mut out),
                        GgmlType::Q6_K => q6_k(block, &mut out),
                        _ => unreachable!("can_encode() filtered the others"),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// `nearest_int`: round half to even, exact for |v| < 2²².
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0f32).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend(f16::from_f32(v).to_le_bytes());
}

/// The value of largest magnitude, the first one on ties (its sign matters).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// Packs 32 codes as Q4_0/Q5_0 do: element `j` in the low nibble of byte `j`, `j + 16` in
/// its high nibble; for five-bit codes, bit 4 of element `j` is bit `j` of `qh`.
fn pack_nibbles(codes: &[u8; 32], out: &mut Vec<u8>, five_bits: bool) {
    if five_bits {
        let qh = codes
            .iter()
            .enumerate()
            .fold(0u32, |acc, (j, &c)| acc | (((c as u32 >> 4) & 1) << j));
        out.extend(qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (codes[j] & 0xF) | ((codes[j + 16] & 0xF) << 4)));
}

/// Symmetric 4/5-bit: `d = max / -2^(bits-1)`, codes `min(top, trunc(x/d + 2^(bits-1) + ½))`.
fn symmetric(x: &[f32], out: &mut Vec<u8>, half_range: f32, top: u8) {
    let d = signed_absmax(x) / -half_range;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    let codes: [u8; 32] =
        std::array::from_fn(|j| ((x[j] * id + (half_range + 0.5)) as i8).min(top as i8) as u8);
    pack_nibbles(&codes, out, top == 31);
}

fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    symmetric(x, out, 8.0, 15);
}

fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    symmetric(x, out, 16.0, 31);
}

/// With a minimum: `d = (max − min) / top`, codes `trunc((x − min)/d + ½)`.
fn with_min(x: &[f32], out: &mut Vec<u8>, top: u8) {
    let (min, max) = min_max(x);
    let d = (max - min) / top as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    put_f16(out, min);
    let codes: [u8; 32] = std::array::from_fn(|j| {
        let v = (x[j] - min) * id + 0.5;
        if top == 15 {
            (v as i8).min(15) as u8
        } else {
            v as u8
        }
    });
    pack_nibbles(&codes, out, top == 31);
}

fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    with_min(x, out, 15);
}

fn q5_1(x: &[f32], out: &mut Vec<u8>) {
    with_min(x, out, 31);
}

fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// `make_qkx2_quants`: codes `0..=nmax` with a scale and a (non-positive) min for one
/// sub-block, the weighted squared error minimised over `nstep + 1` candidate scales around
/// `nmax / (max − min)`. Writes the chosen codes to `codes` and returns `(scale, −min)`.
fn scale_and_min(
    x: &[f32],
    weights: &[f32],
    codes: &mut [u8],
    nmax: i32,
    (rmin, rdelta, nstep): (f32, f32, i32),
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        codes[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                codes[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins under f16 `d` and `dmin`.
fn q4_k(x: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut codes = [0u8; QK_K];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let sum_x2 = sub.iter().fold(0.0f32, |a, v| a + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + sub[l].abs());
        (scales[j], mins[j]) = scale_and_min(
            sub,
            &weights,
            &mut codes[32 * j..32 * j + 32],
            15,
            (-1.0, 0.1, 20),
        );
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // The reference stores nearest_int into a uint8_t before MIN(63, ·).
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls[j];
            packed[j + 4] = lm[j];
        } else {
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            packed[j - 4] |= (ls[j] >> 4) << 6;
            packed[j] |= (lm[j] >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    out.extend(packed);
    for j in 0..8 {
        let sd = d.to_f32() * ls[j] as f32;
        if sd == 0.0 {
            // The search's codes stay, as in the reference; they decode to −dmin·m anyway.
            continue;
        }
        let dm = dmin.to_f32() * lm[j] as f32;
        for i in 0..32 {
            codes[32 * j + i] = nearest_int((x[32 * j + i] + dm) / sd).clamp(0, 15) as u8;
        }
    }
    for c in codes.chunks_exact(64) {
        out.extend((0..32).map(|l| c[l] | (c[l + 32] << 4)));
    }
}

/// `make_qx_quants` with `rmse_type = 1` (weights x²): a signed scale for codes in
/// `−nmax..nmax` (written to `codes` offset by `nmax`), searched over 18 candidates around
/// `nmax / max`.
fn signed_scale(x: &[f32], codes: &mut [u8], nmax: i32) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = code(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut set = |iscale: f32| {
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = (code(iscale, v) + nmax) as u8;
        }
    };
    let iscale = -(nmax as f32) / max;
    set(iscale);
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            set(iscale);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K: 16 sub-blocks of 16 with signed 8-bit scales under one f16 `d`.
fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0.0f32; 16];
    let mut codes = [0u8; QK_K];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for (ib, s) in scales.iter_mut().enumerate() {
        *s = signed_scale(
            &x[16 * ib..16 * ib + 16],
            &mut codes[16 * ib..16 * ib + 16],
            32,
        );
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = *s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend([0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let sc: [i8; 16] = std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    for j in 0..16 {
        let sd = d.to_f32() * sc[j] as f32;
        if sd == 0.0 {
            // The search's codes stay, as in the reference; with a zero scale they decode to
            // 0 whatever they are.
            continue;
        }
        for i in 0..16 {
            codes[16 * j + i] = (nearest_int(x[16 * j + i] / sd).clamp(-32, 31) + 32) as u8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (h, c) in codes.chunks_exact(128).enumerate() {
        let (ql, qh) = (&mut ql[64 * h..], &mut qh[32 * h..]);
        for l in 0..32 {
            ql[l] = (c[l] & 0xF) | ((c[l + 64] & 0xF) << 4);
            ql[l + 32] = (c[l + 32] & 0xF) | ((c[l + 96] & 0xF) << 4);
            qh[l] = (c[l] >> 4)
                | ((c[l + 32] >> 4) << 2)
                | ((c[l + 64] >> 4) << 4)
                | ((c[l + 96] >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|s| s as u8));
    out.extend(d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                // Box–Muller
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos() * 0.02
            })
            .collect()
    }

    fn roundtrip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
        let bytes = ty.quantize(x).expect("encodable");
        assert_eq!(bytes.len(), x.len() / ty.block_size() * ty.type_size());
        let mut y = vec![0.0; x.len()];
        ty.dequantize(&bytes, &mut y);
        y
    }

    fn rel_rmse(x: &[f32], y: &[f32]) -> f64 {
        let err: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let sig: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        (err / sig).sqrt()
    }

    #[test]
    fn each_type_decodes_close_to_its_input_and_more_bits_are_closer() {
        let x = normal(4096, 7);
        // Relative RMSE on Gaussian weights, as llama.cpp's quantize-stats reports them
        // (Q4_0 ≈ 0.11, Q4_1 ≈ 0.09, Q5_0 ≈ 0.055, Q4_K ≈ 0.075, Q6_K ≈ 0.018, Q8_0 ≈ 0.004).
        let bounds = [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 5e-3),
            (GgmlType::Q8_0, 0.006),
            (GgmlType::Q6_K, 0.025),
            (GgmlType::Q5_1, 0.06),
            (GgmlType::Q5_0, 0.07),
            (GgmlType::Q4_K, 0.09),
            (GgmlType::Q4_1, 0.12),
            (GgmlType::Q4_0, 0.13),
        ];
        for (ty, bound) in bounds {
            let e = rel_rmse(&x, &roundtrip(ty, &x));
            assert!(e <= bound, "{ty:?}: relative RMSE {e} > {bound}");
        }
        assert!(
            rel_rmse(&x, &roundtrip(GgmlType::Q4_K, &x))
                < rel_rmse(&x, &roundtrip(GgmlType::Q4_0, &x))
        );
    }

    #[test]
    fn decoded_blocks_encode_to_themselves() {
        // Values that are exactly representable in a type come back unchanged: what merging a
        // zero adapter into a quantized base needs.
        let x = normal(1024, 9);
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q4_1,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let once = roundtrip(ty, &x);
            let twice = roundtrip(ty, &once);
            let e = rel_rmse(&once, &twice);
            assert!(e < 0.02, "{ty:?}: re-encoding moved the values by {e}");
        }
    }

    #[test]
    fn zeros_and_constant_blocks_are_exact() {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q4_1,
            GgmlType::Q5_1,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let zeros = vec![0.0f32; 256];
            assert_eq!(roundtrip(ty, &zeros), zeros, "{ty:?}");
            let y = roundtrip(ty, &vec![0.5f32; 256]);
            assert!(y.iter().all(|v| (v - 0.5).abs() < 2e-3), "{ty:?}: {y:?}");
        }
    }

    #[test]
    fn refuses_partial_blocks_and_types_it_cannot_write() {
        assert_eq!(
            GgmlType::Q4_K.quantize(&[0.0; 32]),
            Err(EncodeError::PartialBlock {
                ty: GgmlType::Q4_K,
                len: 32,
                block: 256
            })
        );
        assert_eq!(
            GgmlType::IQ4_XS.quantize(&[0.0; 256]),
            Err(EncodeError::Unsupported(GgmlType::IQ4_XS))
        );
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(
            [0.5f32, 1.5, 2.5, -0.5, -1.5, 2.4999, -7.6].map(nearest_int),
            [0, 2, 2, 0, -2, 2, -8]
        );
    }
}
