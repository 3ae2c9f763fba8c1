//! RMSNorm (Zhang & Sennrich 2019): `x / √(mean(x²) + ε) · w`. The weight is the effective
//! multiplier: loaders fold a checkpoint's `(1 + w)` convention (Gemma) into it.

use burn::prelude::*;

use crate::backend::GraftBackend;

#[derive(Debug, Clone)]
pub struct RmsNorm<B: GraftBackend> {
    /// `[dim]`
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: GraftBackend> RmsNorm<B> {
    /// Normalizes each row over its `dim` values.
    ///
    /// # Shapes
    /// `x: [n, dim]` → `[n, dim]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let var = (x.clone() * x.clone()).mean_dim(1);
        x * (var + self.eps).sqrt().recip() * self.weight.clone().unsqueeze::<2>()
    }

    /// Bytes held by the weight.
    pub fn n_bytes(&self) -> usize {
        self.weight.dims()[0] * 4
    }
}
