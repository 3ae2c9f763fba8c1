//! Rotary position embeddings in HF transformers' convention (`rotate_half`: dimension `i` is
//! paired with `i + d/2`), with the inverse frequencies computed in f32 exactly as
//! `LlamaRotaryEmbedding` does, including Llama-3 and linear scaling.

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::config::{LlamaConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[head_dim / 2]`
    inv_freq: Vec<f32>,
    /// Positions are divided by this (linear scaling), 1 otherwise.
    position_divisor: f32,
    head_dim: usize,
}

impl Rope {
    pub fn new(c: &LlamaConfig) -> Self {
        let d = c.head_dim;
        let mut inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let mut position_divisor = 1.0;
        match &c.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => position_divisor = *factor,
            Some(RopeScaling::Factors(f)) => inv_freq.iter_mut().zip(f).for_each(|(v, f)| *v /= f),
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
        }
        Rope {
            inv_freq,
            position_divisor,
            head_dim: d,
        }
    }

    /// `cos` and `sin` tables for the given positions, repeated for each of `heads` heads so
    /// that applying them is a contiguous element-wise product (a broadcast over the middle
    /// dimension takes the CPU backend's slow strided path).
    ///
    /// # Shapes
    /// → two `[positions.len() · heads, head_dim]` tensors.
    pub fn tables<B: Backend>(
        &self,
        positions: &[usize],
        heads: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let d = self.head_dim;
        let mut cos = Vec::with_capacity(positions.len() * heads * d);
        let mut sin = Vec::with_capacity(positions.len() * heads * d);
        for &p in positions {
            let p = p as f32 / self.position_divisor;
            let start = cos.len();
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let a = p * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
            for _ in 1..heads {
                cos.extend_from_within(start..start + d);
                sin.extend_from_within(start..start + d);
            }
        }
        let shape = [positions.len() * heads, d];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }

    /// `x·cos + rotate_half(x)·sin`.
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
        let x = x.reshape([n * h, d]);
        let x1 = x.clone().slice([0..n * h, 0..d / 2]);
        let x2 = x.clone().slice([0..n * h, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 1);
        (x * cos.clone() + rotated * sin.clone()).reshape([n, h, d])
    }
}
