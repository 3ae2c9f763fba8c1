//! NF4 with double quantization, as bitsandbytes defines it for QLoRA (Dettmers et al. 2023,
//! `bitsandbytes/functional.py::quantize_4bit`, CPU reference `backends/default/ops.py`).
//!
//! A weight is flattened row-major and cut into blocks of 64; each block stores its absmax and
//! one 4-bit code per value: the nearest entry of the NF4 codebook to `w / absmax`. Two codes
//! share a byte, the first in the HIGH nibble. With double quantization the f32 absmaxes are
//! themselves quantized: `offset = mean(absmax)`, then `absmax - offset` is quantized blockwise
//! (blocks of 256) to u8 indices into bitsandbytes' signed 8-bit dynamic map, each block with an
//! f32 scale. Dequantization: `absmax = dyn[code]·scale2 + offset`, `w = nf4[nibble]·absmax`.

/// The NF4 codebook (`get_4bit_type("nf4")`).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The code of 0.0 in [`NF4_CODE`].
const ZERO_CODE: u8 = 7;

/// Smallest absmax divided by (bitsandbytes clamps with `max(absmax, 1e-38)`).
const MIN_ABSMAX: f32 = 1e-38;

/// Values per NF4 block (bitsandbytes' default `blocksize`).
pub const BLOCK: usize = 64;
/// Absmaxes per second-level block under double quantization.
pub const NESTED_BLOCK: usize = 256;

/// The per-block scales of an NF4 tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Scales {
    /// One f32 absmax per block (`compress_statistics=False`).
    Plain(Vec<f32>),
    /// Double quantization (`compress_statistics=True`).
    Double {
        /// u8 index into [`dynamic_map`] per block.
        codes: Vec<u8>,
        /// f32 scale per group of [`NESTED_BLOCK`] codes.
        nested_absmax: Vec<f32>,
        /// Mean of the original absmaxes, added back on dequantization.
        offset: f32,
    },
}

/// A packed NF4 tensor (row-major over its logical shape).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Two codes per byte, first in the high nibble; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    pub scales: Nf4Scales,
    /// Number of values.
    pub len: usize,
}

/// Index of the nearest code in a sorted codebook; a value exactly between two codes goes to the
/// lower one (`torch.bucketize(x, midpoints)` with `right=False`).
fn nearest_sorted(code: &[f32], x: f32) -> usize {
    let mut i = 0;
    while i + 1 < code.len() && x > (code[i] + code[i + 1]) / 2.0 {
        i += 1;
    }
    i
}

impl Nf4Tensor {
    /// Quantizes `w` (row-major) to NF4, with double quantization when `double_quant`.
    pub fn quantize(w: &[f32], double_quant: bool) -> Self {
        let absmax: Vec<f32> = w
            .chunks(BLOCK)
            .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        let mut packed = vec![0u8; w.len().div_ceil(2)];
        let full_blocks = w.len() / BLOCK;
        for (bi, block) in w.chunks(BLOCK).enumerate() {
            let m = absmax[bi].max(MIN_ABSMAX);
            // bitsandbytes multiplies full blocks by the f32 reciprocal but divides the short
            // tail block; the two round differently, so both are kept.
            let recip = 1.0 / m;
            for (j, &v) in block.iter().enumerate() {
                let scaled = if bi < full_blocks { v * recip } else { v / m };
                let q = nearest_sorted(&NF4_CODE, scaled.clamp(-1.0, 1.0)) as u8;
                let idx = bi * BLOCK + j;
                packed[idx / 2] |= if idx % 2 == 0 { q << 4 } else { q };
            }
        }
        if w.len() % 2 == 1 {
            // bitsandbytes pads an odd count with 0.0, whose code is 7.
            *packed.last_mut().expect("odd length is non-empty") |= ZERO_CODE;
        }
        let scales = if double_quant {
            double_quantize(&absmax)
        } else {
            Nf4Scales::Plain(absmax)
        };
        Nf4Tensor {
            packed,
            scales,
            len: w.len(),
        }
    }

    /// The f32 absmax of every block.
    pub fn absmax(&self) -> Vec<f32> {
        match &self.scales {
            Nf4Scales::Plain(a) => a.clone(),
            Nf4Scales::Double {
                codes,
                nested_absmax,
                offset,
            } => {
                let map = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| map[c as usize] * nested_absmax[i / NESTED_BLOCK] + offset)
                    .collect()
            }
        }
    }

    /// Dequantizes values `start..start + out.len()`.
    pub fn dequantize_range(&self, absmax: &[f32], start: usize, out: &mut [f32]) {
        for (k, y) in out.iter_mut().enumerate() {
            let idx = start + k;
            let byte = self.packed[idx / 2];
            let q = if idx % 2 == 0 { byte >> 4 } else { byte & 0xF };
            *y = NF4_CODE[q as usize] * absmax[idx / BLOCK];
        }
    }

    /// Dequantizes the whole tensor.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len];
        self.dequantize_range(&self.absmax(), 0, &mut out);
        out
    }

    /// Bytes held: packed codes plus scales.
    pub fn n_bytes(&self) -> usize {
        self.packed.len()
            + match &self.scales {
                Nf4Scales::Plain(a) => a.len() * 4,
                Nf4Scales::Double {
                    codes,
                    nested_absmax,
                    ..
                } => codes.len() + nested_absmax.len() * 4 + 4,
            }
    }
}

/// Second-level quantization of the absmaxes (`quantize_blockwise(absmax - offset, blocksize=256)`
/// with the signed dynamic map; nearest code, ties to the lower index as `argmin` does).
fn double_quantize(absmax: &[f32]) -> Nf4Scales {
    let offset = absmax.iter().map(|&a| a as f64).sum::<f64>() as f32 / absmax.len().max(1) as f32;
    let map = dynamic_map();
    let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let mut codes = Vec::with_capacity(absmax.len());
    let mut nested_absmax = Vec::new();
    for block in centered.chunks(NESTED_BLOCK) {
        let scale = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        nested_absmax.push(scale);
        let m = scale.max(MIN_ABSMAX);
        codes.extend(block.iter().map(|&v| nearest_sorted(&map, v / m) as u8));
    }
    Nf4Scales::Double {
        codes,
        nested_absmax,
        offset,
    }
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`): for each exponent `e` in `-6..=0`, the midpoints of
/// `linspace(0.1, 1, 2^(e+6) + 1)` scaled by `10^e`, with both signs, plus 0 and 1; sorted.
pub fn dynamic_map() -> [f32; 256] {
    // torch multiplies the Python-float power of ten into the f32 means in f32.
    let mut data: Vec<f32> = Vec::with_capacity(256);
    let (max_exp, non_sign) = (7i32, 7i32);
    for i in 0..max_exp {
        let items = 2usize.pow((i + non_sign - max_exp) as u32) + 1;
        let bounds = linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(-(max_exp - 1) + i) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// `torch.linspace(start, end, steps, dtype=float32)` as the torch build behind our fixtures
/// computes it: `step = (end - start) / (steps - 1)` in f32, then index `i` is
/// `start + step·i` in the first half and `end - step·(steps - 1 - i)` in the second, each
/// evaluated in f64 and rounded to f32. The last ulp of bitsandbytes' dynamic map depends on it
/// (checked against the map in `core/tests/fixtures/nf4.safetensors`).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = f64::from((end - start) / (steps - 1) as f32);
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                (f64::from(start) + step * i as f64) as f32
            } else {
                (f64::from(end) - step * (steps - 1 - i) as f64) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codebook_is_sorted_and_round_trips_exact_codes() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        let w: Vec<f32> = NF4_CODE.iter().map(|c| c * 0.5).collect();
        let q = Nf4Tensor::quantize(&w, false);
        assert_eq!(q.dequantize(), w);
        // First value in the high nibble: codes 0 and 1 pack to 0x01.
        assert_eq!(q.packed[0], 0x01);
    }

    #[test]
    fn error_is_bounded_by_half_the_widest_code_gap() {
        let w: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let half_gap = NF4_CODE
            .windows(2)
            .map(|c| (c[1] - c[0]) / 2.0)
            .fold(0f32, f32::max);
        let exact = Nf4Tensor::quantize(&w, false).absmax();
        for dq in [false, true] {
            let q = Nf4Tensor::quantize(&w, dq);
            let stored = q.absmax();
            let d = q.dequantize();
            for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                let blk = i / BLOCK;
                // Rounding to the nearest code, plus the error of a double-quantized absmax.
                let bound = half_gap * exact[blk] + (exact[blk] - stored[blk]).abs() + 1e-6;
                assert!(
                    (a - b).abs() <= bound,
                    "dq={dq} {i}: {a} vs {b} (bound {bound})"
                );
            }
            if !dq {
                assert_eq!(stored, exact);
            }
        }
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map();
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert!(m.contains(&0.0));
    }
}
