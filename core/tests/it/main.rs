//! graft-core integration tests: one binary, one module per concern.

mod bad_files;
mod batch;
mod compute_dtype;
mod constraint;
mod families;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod gpu;
mod harmony;
mod hub;
mod merge;
mod mla;
mod moe;
mod peft;
mod q8_activations;
mod real_models;
mod recompute;
mod reference;
mod smollm2;
mod tiny;
mod tiny_model;

use burn::prelude::*;

pub type B = burn::backend::Flex;

/// Row-major values of a 2-D tensor.
pub fn values(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().expect("f32 tensor")
}

/// Logits of every position of `tokens`, one sequence, no cache.
pub fn all_logits(
    m: &graft_core::model::Model<B>,
    tokens: &[u32],
    adapter: Option<&graft_core::adapters::lora::Adapter<B>>,
) -> Vec<f32> {
    values(m.forward(
        &mut [graft_core::model::SeqInput {
            tokens,
            cache: None,
            adapter,
        }],
        graft_core::model::Logits::All,
    ))
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
