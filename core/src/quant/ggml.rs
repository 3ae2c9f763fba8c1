//! GGML block formats as llama.cpp stores them in GGUF files (`ggml-common.h`,
//! `ggml-quants.c::dequantize_row_*`). Dequantization reproduces gguf-py's
//! `gguf.quants.dequantize` bit for bit: the same f16→f32 scale widening and the same order of
//! f32 operations.

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
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// Parses a `ggml_type` id; `None` for types graft does not support.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// Bytes needed for `n` elements, or `None` if `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        (n % bs == 0).then(|| n / bs * self.type_size() as u64)
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
                GgmlType::Q8_0 => q8_0(b, y),
                GgmlType::Q4_K => q4_k(b, y),
                GgmlType::Q5_K => q5_k(b, y),
                GgmlType::Q6_K => q6_k(b, y),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml() {
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
        for id in [0, 1, 2, 3, 8, 12, 13, 14, 30] {
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
