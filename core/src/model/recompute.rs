//! Activation recomputation per decoder layer (what transformers calls gradient
//! checkpointing): the training forward keeps only each layer's input, and the backward runs
//! the layers again one at a time, from the last, each with its own small graph.
//!
//! A training pass otherwise keeps every saved activation of every layer until the backward
//! (the norms', projections', rope's, attention's and the MLP's: about 16 thousand floats per
//! token and layer for SmolLM2). Here only `[tokens, hidden]` per layer outlives the forward,
//! and one layer's graph at a time lives in the backward, for one more forward pass of the
//! layers. The layers are the model's own ([`Model::layer`]); only the order of the passes
//! changes, so the gradients are the same as without recomputation up to summation order.
//!
//! LoRA dropout draws the same masks in both passes of a layer: the backend's generator is
//! seeded per layer before each (as torch's checkpoint restores its RNG state). Another thread
//! drawing from the same backend in between would break that, as it would in torch.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::{Model, Pass, SeqInput};
use crate::adapters::lora::Adapter;
use crate::backend::GraftBackend;

/// A forward pass that kept each layer's input; [`Recomputed::backward`] finishes it.
pub struct Recomputed<'m, B: AutodiffBackend + GraftBackend> {
    model: &'m Model<B>,
    tokens: Vec<Vec<u32>>,
    pass: Pass<B>,
    /// The input of every layer, outside any graph.
    inputs: Vec<Tensor<B, 2>>,
    /// The last layer's output as a gradient leaf.
    last: Tensor<B, 2>,
    /// The seed of the dropout masks ([`layer_seed`]; `None`: the adapter has no dropout).
    dropout_seed: Option<u64>,
}

impl<B: AutodiffBackend + GraftBackend> Model<B> {
    /// The final hidden states of fresh sequences `tokens` under `adapter` (whose values are
    /// the gradient leaves), `[Σ tokens, hidden]`, from a forward that keeps only each layer's
    /// input. The states are in a graph of the final norm alone: run the loss's backward on
    /// them, then [`Recomputed::backward`] for the adapter's gradients. `seed` chooses the
    /// dropout masks when the adapter has dropout.
    pub fn final_hidden_recomputed(
        &self,
        tokens: &[&[u32]],
        adapter: &Adapter<B>,
        seed: u64,
    ) -> (Tensor<B, 2>, Recomputed<'_, B>) {
        let dropout_seed = adapter
            .modules()
            .any(|(_, _, w)| w.dropout > 0.0)
            .then_some(seed);
        let detached = adapter.detached();
        let mut seqs = fresh_seqs(tokens, &detached);
        let pass = self.pass(&seqs);
        let adapters = vec![Some(&detached); seqs.len()];
        let (inputs, last) = super::on_pool(|| {
            let mut x = self.embed(&seqs);
            let mut attn_seqs = self.attn_seqs(&pass, &mut seqs);
            let mut inputs = Vec::with_capacity(self.layers.len());
            for li in 0..self.layers.len() {
                if let Some(s) = dropout_seed {
                    B::seed(&self.device, layer_seed(s, li));
                }
                inputs.push(x.clone());
                x = self.layer(li, x, &pass, &mut attn_seqs, &adapters, None);
            }
            (inputs, x)
        });
        let last = last.require_grad();
        let hidden = self.norm.forward(last.clone());
        let rec = Recomputed {
            model: self,
            tokens: tokens.iter().map(|t| t.to_vec()).collect(),
            pass,
            inputs,
            last,
            dropout_seed,
        };
        (hidden, rec)
    }
}

impl<B: AutodiffBackend + GraftBackend> Recomputed<'_, B> {
    /// Finishes the backward whose gradients so far are `head` (of a loss on the final hidden
    /// states): runs each layer again from the last with `adapter` (the one the forward was
    /// given) tracking gradients, and hands each layer's gradients to `visit(layer, grads)`.
    /// The adapter's values in layer `l` have their gradients in the `l`th call's.
    pub fn backward(
        self,
        head: &B::Gradients,
        adapter: &Adapter<B>,
        mut visit: impl FnMut(usize, &B::Gradients),
    ) {
        let model = self.model;
        let tokens: Vec<&[u32]> = self.tokens.iter().map(Vec::as_slice).collect();
        let mut grad = gradient(&self.last, head);
        for (li, input) in self.inputs.into_iter().enumerate().rev() {
            if let Some(s) = self.dropout_seed {
                B::seed(&model.device, layer_seed(s, li));
            }
            // The first layer's input is the embedding: its gradient is not needed when the
            // layer's adapter values are there to be tracked.
            let adapted = adapter
                .layers
                .get(li)
                .is_some_and(|l| l.iter().any(Option::is_some));
            let x = if li == 0 && adapted {
                input
            } else {
                input.require_grad()
            };
            let y = super::on_pool(|| {
                let mut seqs = fresh_seqs(&tokens, adapter);
                let adapters = vec![Some(adapter); seqs.len()];
                let mut attn_seqs = model.attn_seqs(&self.pass, &mut seqs);
                model.layer(li, x.clone(), &self.pass, &mut attn_seqs, &adapters, None)
            });
            let grads = (y * grad).sum().backward();
            grad = gradient(&x, &grads);
            visit(li, &grads);
        }
    }
}

/// The seed of layer `li`'s dropout masks in both of its passes.
fn layer_seed(seed: u64, li: usize) -> u64 {
    seed ^ (li as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Fresh sequences `tokens`, every one with `adapter`.
fn fresh_seqs<'a, B: GraftBackend>(
    tokens: &[&'a [u32]],
    adapter: &'a Adapter<B>,
) -> Vec<SeqInput<'a, B>> {
    tokens
        .iter()
        .map(|t| SeqInput {
            tokens: t,
            cache: None,
            adapter: Some(adapter),
        })
        .collect()
}

/// The gradient of `x` in `grads` as a constant of the next graph (zeros if it has none).
fn gradient<B: AutodiffBackend>(x: &Tensor<B, 2>, grads: &B::Gradients) -> Tensor<B, 2> {
    match x.grad(grads) {
        Some(g) => Tensor::from_inner(g),
        None => x.zeros_like().detach(),
    }
}
