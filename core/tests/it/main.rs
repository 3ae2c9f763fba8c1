//! graft-core integration tests: one binary, one module per concern.

mod bad_files;
mod batch;
mod constraint;
mod families;
mod hub;
mod merge;
mod peft;
mod real_models;
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

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
