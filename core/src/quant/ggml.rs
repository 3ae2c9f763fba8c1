//! GGML block formats as llama.cpp stores them in GGUF files (`ggml-common.h`,
//! `ggml-quants.c::dequantize_row_*`). Dequantization reproduces gguf-py's
//! `gguf.quants.dequantize` bit for bit: the same f16→f32 scale widening and the same order of
//! f32 operations.
//!
//! gguf-py's numpy computes each operation separately, rounded to f32, never as a fused
//! multiply-add: sub-block scales first (`d·sc`, `dmin·m`, once per sub-block), then their
//! product with the code, then the min subtracted or added — `(d·sc)·q − dmin·m`, `d·q + m`,
//! `(d·ls)·kvalues[q]`, not `d·(sc·q)`. The functions below keep that order (Rust does not
//! contract `a * b + c` into an FMA); integer offsets (`q − 16`, Q3_K's `− 4`) are exact.

use half::{bf16, f16};

/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// The GGML tensor types graft can keep packed and dequantize.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
    /// OCP microscaling FP4 (GPT-OSS's experts): 32 E2M1 values under one E8M0 exponent.
    MXFP4,
}

impl GgmlType {
    /// Parses a `ggml_type` id; `None` for types graft does not support.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            20 => GgmlType::IQ4_NL,
            23 => GgmlType::IQ4_XS,
            30 => GgmlType::BF16,
            39 => GgmlType::MXFP4,
            _ => return None,
        })
    }

    pub const fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::IQ4_NL => 20,
            GgmlType::IQ4_XS => 23,
            GgmlType::BF16 => 30,
            GgmlType::MXFP4 => 39,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::IQ4_NL
            | GgmlType::MXFP4 => 32,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::IQ4_XS => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::IQ4_NL => 18,
            GgmlType::IQ4_XS => 136,
            GgmlType::MXFP4 => 17,
        }
    }

    /// Bytes needed for `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        // None also when the byte count does not fit a u64 (a hostile header's dimensions).
        (n % bs == 0).then(|| (n / bs).checked_mul(self.type_size() as u64))?
    }

    /// Dequantizes `bytes` (a whole number of blocks) into `out`, which must hold exactly the
    /// blocks' element count.
    ///
    /// # Panics
    /// If `out.len()` does not match `bytes` — an invariant the callers establish from
    /// validated tensor shapes.
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        let (bs, ts) = (self.block_size(), self.type_size());
        assert_eq!(
            bytes.len() / ts * bs,
            out.len(),
            "dequantize: buffer sizes disagree"
        );
        assert_eq!(bytes.len() % ts, 0, "dequantize: partial block");
        for (b, y) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
            match self {
                GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                GgmlType::F16 => y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
                GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                GgmlType::Q4_0 => q4_0(b, y),
                GgmlType::Q4_1 => q4_1(b, y),
                GgmlType::Q5_0 => q5_0(b, y),
                GgmlType::Q5_1 => q5_1(b, y),
                GgmlType::Q8_0 => q8_0(b, y),
                GgmlType::Q2_K => q2_k(b, y),
                GgmlType::Q3_K => q3_k(b, y),
                GgmlType::Q4_K => q4_k(b, y),
                GgmlType::Q5_K => q5_k(b, y),
                GgmlType::Q6_K => q6_k(b, y),
                GgmlType::IQ4_NL => iq4_nl(b, y),
                GgmlType::IQ4_XS => iq4_xs(b, y),
                GgmlType::MXFP4 => mxfp4(b, y),
            }
        }
    }
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// `x[j] = (lo(qs[j]) - 8)·d`, `x[j+16] = (hi(qs[j]) - 8)·d`.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0xF) as i8 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i8 - 8) as f32 * d;
    }
}

/// `x[j] = lo(qs[j])·d + m`, `x[j+16] = hi(qs[j])·d + m`.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0xF) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 32 five-bit codes of a Q5_0/Q5_1 block: the low four bits as in Q4_0 (element `j` in
/// the low nibble of `qs[j]`, `j + 16` in its high nibble), the fifth is bit `j` of the
/// little-endian u32 `qh`.
fn q5_codes(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    std::array::from_fn(|j| {
        let low = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
        low | (((qh >> j) & 1) as u8) << 4
    })
}

/// `x[j] = (q[j] - 16)·d`.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (y, q) in y.iter_mut().zip(q5_codes(&b[2..6], &b[6..22])) {
        *y = (q as i8 - 16) as f32 * d;
    }
}

/// `x[j] = q[j]·d + m`.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (y, q) in y.iter_mut().zip(q5_codes(&b[4..8], &b[8..24])) {
        *y = q as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = (q as i8) as f32 * d;
    }
}

/// Six-bit scale and min `j` of a K-quant block (`get_scale_min_k4`).
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 16 two-bit codes of sub-block `i` (of 16) in a Q2_K/Q3_K `qs[64]`: two halves of 128
/// values, each four 32-value groups of bit pairs `2s` of the same 32 bytes.
fn two_bit_codes(qs: &[u8], i: usize) -> impl Iterator<Item = u8> + '_ {
    let shift = 2 * (i / 2 % 4);
    qs[32 * (i / 8) + 16 * (i % 2)..][..16]
        .iter()
        .map(move |q| (q >> shift) & 3)
}

/// Q2_K: 16 sub-blocks of 16, each with a four-bit scale and min (`scales[i]` low and high
/// nibble): `x = (d·sc)·q − dmin·m`.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    for (i, (y, &sc)) in y.chunks_exact_mut(16).zip(scales).enumerate() {
        let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
        for (y, q) in y.iter_mut().zip(two_bit_codes(qs, i)) {
            *y = dl * q as f32 - ml;
        }
    }
}

/// Six-bit signed scale `i` (of 16) of a Q3_K block, packed in 12 bytes: the low four bits in
/// the nibbles of bytes 0-7 (scales 0-7 low, 8-15 high), the high two in bit pairs of bytes 8-11.
fn q3_k_scale(sc: &[u8], i: usize) -> i8 {
    let low = (sc[i % 8] >> (4 * (i / 8))) & 0xF;
    let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
    (low | high << 4) as i8 - 32
}

/// Q3_K: 16 sub-blocks of 16, `x = (d·sc)·(q − 4·(1 − h))` with a two-bit `q` and the `hmask`
/// bit `h` (bit `e / 32` of `hmask[e % 32]`; a set bit means no offset).
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half_at(b, 108);
    for (i, y) in y.chunks_exact_mut(16).enumerate() {
        let dl = d * q3_k_scale(sc, i) as f32;
        let hm = &hmask[16 * (i % 2)..][..16];
        for ((y, q), &h) in y.iter_mut().zip(two_bit_codes(qs, i)).zip(hm) {
            let offset = if (h >> (i / 2)) & 1 == 0 { 4 } else { 0 };
            *y = dl * (q as i8 - offset) as f32;
        }
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, dm1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, dm2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        for l in 0..32 {
            y[64 * c + l] = d1 * (q[l] & 0xF) as f32 - dm1;
            y[64 * c + 32 + l] = d2 * (q[l] >> 4) as f32 - dm2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (scales, qh, ql) = (&b[4..16], &b[16..48], &b[48..176]);
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, dm1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, dm2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let q = &ql[32 * c..32 * c + 32];
        for l in 0..32 {
            let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * c + l] = d1 * ((q[l] & 0xF) + hi1) as f32 - dm1;
            y[64 * c + 32 + l] = d2 * ((q[l] >> 4) + hi2) as f32 - dm2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
        let y = &mut y[128 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// The non-linear four-bit codebook of IQ4_NL and IQ4_XS (`kvalues_iq4nl`).
pub(super) const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// 32 values `d·kvalues[code]` from 16 bytes of nibbles in Q4_0 order.
fn iq4_block(d: f32, qs: &[u8], y: &mut [f32]) {
    for (j, &q) in qs.iter().enumerate() {
        y[j] = d * IQ4_NL_VALUES[(q & 0xF) as usize] as f32;
        y[j + 16] = d * IQ4_NL_VALUES[(q >> 4) as usize] as f32;
    }
}

fn iq4_nl(b: &[u8], y: &mut [f32]) {
    iq4_block(half_at(b, 0), &b[2..18], y);
}

/// E2M1 (FP4) values, doubled so that they are integers (`kvalues_mxfp4`).
pub(super) const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// MXFP4: an E8M0 exponent byte `e`, then 16 bytes of codes in Q4_0 order;
/// `x = 2^(e − 128) · kvalues[code]` (half the scale against the doubled values), with
/// ggml's `e8m0_to_fp32_half` giving the subnormal scales of `e < 2` exactly.
fn mxfp4(b: &[u8], y: &mut [f32]) {
    let e = u32::from(b[0]);
    let bits = if e < 2 {
        0x0020_0000 << e
    } else {
        (e - 1) << 23
    };
    let d = f32::from_bits(bits);
    for (j, &q) in b[1..17].iter().enumerate() {
        y[j] = d * MXFP4_VALUES[(q & 0xF) as usize] as f32;
        y[j + 16] = d * MXFP4_VALUES[(q >> 4) as usize] as f32;
    }
}

/// IQ4_XS: 8 sub-blocks of 32, each with a six-bit signed scale (low four bits in the nibbles
/// of `scales_l`, high two in bit pairs of the u16 `scales_h`), codes as in IQ4_NL.
fn iq4_xs(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for (ib, (y, qs)) in y.chunks_exact_mut(32).zip(qs.chunks_exact(16)).enumerate() {
        let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
        let high = ((scales_h >> (2 * ib)) & 3) as u8;
        let ls = (low | high << 4) as i8 - 32;
        iq4_block(d * ls as f32, qs, y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml() {
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
        assert_eq!(GgmlType::Q3_K.bytes_for(256), Some(110));
        assert_eq!(GgmlType::IQ4_XS.bytes_for(100), None);
        for id in [0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23, 30] {
            assert_eq!(GgmlType::from_id(id).map(GgmlType::id), Some(id));
        }
        assert_eq!(GgmlType::from_id(16), None);
    }

    #[test]
    fn q8_0_known_block() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 4;
        b[3] = (-6i8) as u8;
        let mut y = [0f32; 32];
        GgmlType::Q8_0.dequantize(&b, &mut y);
        assert_eq!((y[0], y[1], y[2]), (2.0, -3.0, 0.0));
    }
}
