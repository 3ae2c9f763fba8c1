//! Rotary position embeddings in HF transformers' convention (`rotate_half`: dimension `i` is
//! paired with `i + rotary_dim/2`), with the inverse frequencies computed in f32 exactly as
//! transformers' `ROPE_INIT_FUNCTIONS` do: default, linear, llama3, longrope (Phi-3) and yarn,
//! and partial rotary (only the first `rotary_dim` dimensions of a head rotate).

use burn::prelude::*;
use burn::tensor::TensorData;

use super::config::{RopeConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[rotary_dim / 2]`
    inv_freq: Vec<f32>,
    /// Longrope: the frequencies for sequences longer than the given length.
    long: Option<(usize, Vec<f32>)>,
    /// Positions are divided by this (linear scaling), 1 otherwise.
    position_divisor: f32,
    /// cos and sin are multiplied by this (longrope, yarn), 1 otherwise.
    attention_factor: f32,
    rotary_dim: usize,
    head_dim: usize,
}

impl Rope {
    pub fn new(c: &RopeConfig, head_dim: usize) -> Self {
        let d = c.rotary_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| c.theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let mut inv_freq: Vec<f32> = base.iter().map(|b| 1.0 / b).collect();
        let (mut position_divisor, mut attention_factor, mut long) = (1.0, 1.0, None);
        match &c.scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => position_divisor = *factor,
            Some(RopeScaling::Factors(f)) => inv_freq.iter_mut().zip(f).for_each(|(v, f)| *v /= f),
            Some(RopeScaling::LongRope {
                short,
                long: long_factors,
                original_max_position,
                attention_factor: af,
            }) => {
                // transformers: inv_freq = 1 / (ext_factors · base^(2i/d)).
                let with = |f: &[f32]| base.iter().zip(f).map(|(b, f)| 1.0 / (f * b)).collect();
                inv_freq = with(short);
                long = Some((*original_max_position, with(long_factors)));
                attention_factor = *af;
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            }) => {
                // transformers' `_compute_llama3_parameters`.
                let old = *original_max_position as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for v in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *v;
                    let scaled = if wavelen > low_wavelen {
                        *v / factor
                    } else {
                        *v
                    };
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    *v = if medium {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position,
                beta_fast,
                beta_slow,
                attention_factor: af,
                truncate,
            }) => {
                // transformers' `_compute_yarn_parameters` (Python floats are f64 there for
                // the correction range; the ramp and frequencies are f32 tensors).
                let dim = d as f64;
                let ln_base = (c.theta as f64).ln();
                let correction = |rot: f32| {
                    dim * (*original_max_position as f64
                        / (rot as f64 * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * ln_base)
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
                if low == high {
                    high += 0.001;
                }
                for (i, v) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    let interpolation = 1.0 / (factor * base[i]);
                    *v = interpolation * (1.0 - extrapolation) + *v * extrapolation;
                }
                attention_factor = *af;
            }
        }
        Rope {
            inv_freq,
            long,
            position_divisor,
            attention_factor,
            rotary_dim: d,
            head_dim,
        }
    }

    /// `cos` and `sin` tables for the new positions `past..past + n` of each sequence, repeated
    /// for each of `heads` heads so that applying them is a contiguous element-wise product (a
    /// broadcast over the middle dimension takes the CPU backend's slow strided path).
    /// Dimensions past `rotary_dim` get `cos = 1, sin = 0`, which passes them through exactly.
    ///
    /// # Shapes
    /// → two `[Σn · heads, head_dim]` tensors.
    pub fn tables<B: Backend>(
        &self,
        seqs: &[(usize, usize)],
        heads: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let d = self.head_dim;
        let total: usize = seqs.iter().map(|s| s.1).sum();
        let mut cos = Vec::with_capacity(total * heads * d);
        let mut sin = Vec::with_capacity(total * heads * d);
        for &(past, n) in seqs {
            // transformers picks longrope's factors by the sequence's length so far.
            let inv_freq = match &self.long {
                Some((orig, long)) if past + n > *orig => long,
                _ => &self.inv_freq,
            };
            for p in past..past + n {
                let p = p as f32 / self.position_divisor;
                let start = cos.len();
                for _ in 0..2 {
                    for f in inv_freq {
                        let a = p * f;
                        cos.push(a.cos() * self.attention_factor);
                        sin.push(a.sin() * self.attention_factor);
                    }
                }
                cos.resize(start + d, 1.0);
                sin.resize(start + d, 0.0);
                for _ in 1..heads {
                    cos.extend_from_within(start..start + d);
                    sin.extend_from_within(start..start + d);
                }
            }
        }
        debug_assert_eq!(cos.len(), total * heads * d);
        let shape = [total * heads, d];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }

    /// `x·cos + rotate_half(x)·sin` over the rotary dimensions; the others pass through.
    ///
    /// # Shapes
    /// `x: [n, heads, head_dim]`, tables `[n · heads, head_dim]` → `[n, heads, head_dim]`
    pub fn apply<B: Backend>(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        let [n, h, d] = x.dims();
        let r = self.rotary_dim;
        let x = x.reshape([n * h, d]);
        let x1 = x.clone().slice([0..n * h, 0..r / 2]);
        let x2 = x.clone().slice([0..n * h, r / 2..r]);
        let mut parts = vec![x2.neg(), x1];
        if r < d {
            // Multiplied by sin = 0: any finite values do.
            parts.push(x.clone().slice([0..n * h, r..d]));
        }
        let rotated = Tensor::cat(parts, 1);
        (x * cos.clone() + rotated * sin.clone()).reshape([n, h, d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::hf_config::HfConfig;
    use crate::model::ModelConfig;

    /// YaRN as transformers computes it (`scripts/reference/rope.py`): Qwen2.5's long-context
    /// setting read from a transformers-5 `rope_parameters`.
    #[test]
    fn yarn_frequencies_match_transformers() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rope_yarn.json");
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut cfg = fx["config"].clone();
        for (k, v) in [
            ("vocab_size", 16),
            ("intermediate_size", 8),
            ("num_hidden_layers", 1),
        ] {
            cfg[k] = v.into();
        }
        let hf: HfConfig = serde_json::from_value(cfg).unwrap();
        let c = ModelConfig::try_from(hf).unwrap();
        let rope = Rope::new(&c.layers[0].rope, c.head_dim);
        let want: Vec<f32> = serde_json::from_value(fx["inv_freq"].clone()).unwrap();
        assert_eq!(rope.inv_freq.len(), want.len());
        for (i, (g, w)) in rope.inv_freq.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "inv_freq[{i}]: {g} vs {w}"
            );
        }
        let af = fx["attention_factor"].as_f64().unwrap() as f32;
        assert!(
            (rope.attention_factor - af).abs() < 1e-6,
            "{} vs {af}",
            rope.attention_factor
        );
    }
}
