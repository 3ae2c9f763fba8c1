//! The one projection type of the model: a frozen base weight (dense, GGUF blocks or NF4) plus
//! optional low-rank adapters applied beside it, never merged into it:
//!
//! `y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ`, with `scale = lora_alpha / r` (or `/ √r` for rsLoRA),
//! `A: [r, in]`, `B: [out, r]` (PEFT's `lora_A` / `lora_B` layout).
//!
//! Rows of one call may belong to different adapters (a serving batch mixes requests); the base
//! product runs once for all rows and each adapter adds its term to its own rows.

use burn::prelude::*;
use burn::tensor::{FloatDType, TensorData};

use crate::adapters::lora::RowAdapters;
use crate::backend::GraftBackend;
use crate::quant::{Activations, PackedWeight};

/// A frozen base weight of shape `[out, in]`.
#[derive(Debug, Clone)]
pub enum BaseWeight<B: GraftBackend> {
    /// f32 on the device (dense checkpoints, loaded without quantization).
    Dense(Tensor<B, 2>),
    /// Packed in host memory, dequantized one projection at a time during the forward.
    Packed(PackedWeight),
}

/// A linear projection without activation.
#[derive(Debug, Clone)]
pub struct Proj<B: GraftBackend> {
    pub base: BaseWeight<B>,
    /// `[out]` (Qwen2-style q/k/v biases).
    pub bias: Option<Tensor<B, 1>>,
    pub out_features: usize,
    pub in_features: usize,
    /// The float type of the base product ([`Proj::set_compute_dtype`]).
    pub compute: FloatDType,
}

impl<B: GraftBackend> Proj<B> {
    pub fn new(base: BaseWeight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        let (out_features, in_features) = match &base {
            BaseWeight::Dense(w) => {
                let [o, i] = w.dims();
                (o, i)
            }
            BaseWeight::Packed(p) => (p.rows, p.cols),
        };
        Proj {
            base,
            bias,
            out_features,
            in_features,
            compute: FloatDType::F32,
        }
    }

    /// The base weight as a dense `[out, in]` tensor (dequantized if packed).
    pub fn weight(&self, device: &B::Device) -> Tensor<B, 2> {
        match &self.base {
            BaseWeight::Dense(w) => w.clone(),
            BaseWeight::Packed(p) => {
                let data = TensorData::new(p.dequantize(), [p.rows, p.cols]);
                Tensor::from_data(data, device)
            }
        }
    }

    /// Rows `ids` of the weight, e.g. an embedding lookup. Packed weights dequantize only
    /// those rows.
    ///
    /// # Shapes
    /// → `[ids.len(), in]`
    pub fn rows(&self, ids: &[u32], device: &B::Device) -> Tensor<B, 2> {
        match &self.base {
            BaseWeight::Dense(w) => {
                let idx: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
                let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [ids.len()]), device);
                w.clone().select(0, idx)
            }
            BaseWeight::Packed(p) => {
                let mut out = vec![0f32; ids.len() * p.cols];
                for (k, &id) in ids.iter().enumerate() {
                    p.dequantize_rows(id as usize, 1, &mut out[k * p.cols..(k + 1) * p.cols]);
                }
                Tensor::from_data(TensorData::new(out, [ids.len(), p.cols]), device)
            }
        }
    }

    /// Makes a packed base's products take `activations` (dense bases are
    /// unaffected).
    pub fn set_activations(&mut self, activations: Activations) {
        if let BaseWeight::Packed(p) = &mut self.base {
            *p = p.clone().with_activations(activations);
        }
    }

    /// Runs the base product in `dtype` ([`crate::model::ComputeDtype`]): the input is rounded
    /// to it, a packed weight is dequantized to it (a dense one cast per product), the product
    /// comes back as f32; the adapter term stays in f32 beside it.
    pub fn set_compute_dtype(&mut self, dtype: FloatDType) {
        self.compute = dtype;
    }

    /// Bytes held by the base weight and bias.
    pub fn n_bytes(&self) -> usize {
        let base = match &self.base {
            BaseWeight::Dense(_) => self.out_features * self.in_features * 4,
            BaseWeight::Packed(p) => p.n_bytes(),
        };
        base + self.bias.as_ref().map_or(0, |_| self.out_features * 4)
    }

    /// `x·Wᵀ + b`, plus each row range's adapter term (added before the bias: a packed
    /// base's product adds it beside each output as it computes them).
    ///
    /// # Shapes
    /// `x: [n, in]` → `[n, out]`
    pub fn forward(&self, x: Tensor<B, 2>, adapters: &RowAdapters<'_, B>) -> Tensor<B, 2> {
        let y = match (&self.base, self.compute) {
            (BaseWeight::Dense(w), FloatDType::F32) => {
                let y = x.clone().matmul(w.clone().transpose());
                B::lora_rows(y, x, adapters)
            }
            (BaseWeight::Packed(p), FloatDType::F32) => B::packed_matmul_lora(x, p, adapters),
            (base, dtype) => {
                let xc = x.clone().cast(dtype);
                let y = match base {
                    BaseWeight::Dense(w) => xc.matmul(w.clone().cast(dtype).transpose()),
                    BaseWeight::Packed(p) => B::packed_matmul(xc, p),
                };
                B::lora_rows(y.cast(FloatDType::F32), x, adapters)
            }
        };
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }
}
