//! Multi-head Latent Attention (DeepSeek-V2/V3), as transformers' `DeepseekV3Attention`:
//! queries through an optional low-rank bottleneck, keys and values from one latent per token.
//!
//! A token's latent is `kv_a_proj_with_mqa(x)`: `kv_lora_rank` values, RMS-normed, and a
//! `qk_rope_dim` rotary key that every head shares. The sequence cache holds just those two
//! (in [`KvParts`]' key and value slots), never the expanded per-head keys and values: each
//! step expands the latents it attends to through `kv_b_proj` (with the sequence's adapter),
//! which costs a projection of the cached positions per step in exchange for a cache
//! `(kv_lora_rank + qk_rope_dim) / (2 · heads · head_dim)` the size of an expanded one.
//! Interleaved rope (`rope_interleave`, llama.cpp's deepseek2) is the half-split rope of the
//! rotary dimensions taken even ones first, as transformers computes it.

use std::ops::Range;

use burn::prelude::*;

use super::attention::AttnSeq;
use super::attention_blocked::Causal;
use super::block::{Block, LayerCtx, Runs};
use super::config::{MlaConfig, ModelConfig};
use crate::adapters::lora::{LoraWeights, TargetModule};
use crate::backend::GraftBackend;

/// The attention output of every sequence's new rows, before `o_proj`, appending their
/// latents to each sequence's cache.
///
/// # Shapes
/// `h: [tokens, hidden]` (normed) → `[tokens, heads · v_head_dim]`
pub(crate) fn attention<'r, B: GraftBackend>(
    block: &Block<B>,
    a: &MlaConfig,
    h: Tensor<B, 2>,
    ctx: &mut LayerCtx<'_, '_, B>,
    runs: &dyn Fn(TargetModule) -> Runs<'r, B>,
) -> Tensor<B, 2> {
    let c = ctx.config;
    let n = h.dims()[0];
    let (heads, dn, dr, r) = (c.num_heads, a.qk_nope_dim, a.qk_rope_dim, a.kv_lora_rank);
    let project = |t: TargetModule, x: Tensor<B, 2>| {
        block
            .proj(t)
            .unwrap_or_else(|| unreachable!("the loader gives latent attention its {t}"))
            .forward(x, &runs(t))
    };
    let q = match a.q_lora_rank {
        Some(_) => {
            let down = project(TargetModule::QA, h.clone());
            project(TargetModule::QB, normed(&block.q_norm, down))
        }
        None => project(TargetModule::Q, h.clone()),
    }
    .reshape([n, heads, dn + dr]);
    let latent = project(TargetModule::KvA, h);
    let kv = normed(&block.k_norm, latent.clone().slice([0..n, 0..r]));
    let k_rot = latent.slice([0..n, r..r + dr]).reshape([n, 1, dr]);
    let q_nope = q.clone().slice([0..n, 0..heads, 0..dn]);
    let mut q_rot = q.slice([0..n, 0..heads, dn..dn + dr]);
    let mut k_rot = k_rot;
    if a.rope_interleave {
        q_rot = evens_first(q_rot);
        k_rot = evens_first(k_rot);
    }
    let q_rot = ctx.rope.apply(q_rot, &ctx.q_tables.0, &ctx.q_tables.1);
    let k_rot = ctx.rope.apply(k_rot, &ctx.k_tables.0, &ctx.k_tables.1);
    let q = Tensor::cat(vec![q_nope, q_rot], 2);
    let kv_runs = runs(TargetModule::KvB);
    let kv_b = block
        .proj(TargetModule::KvB)
        .unwrap_or_else(|| unreachable!("the loader gives latent attention its kv_b_proj"));
    let layer = ctx.layer;
    let outs: Vec<Tensor<B, 2>> = ctx
        .seqs
        .iter_mut()
        .map(|s| {
            let adapter = adapter_at(&kv_runs, s.span.start);
            let expand = |latents: Tensor<B, 2>| {
                let m = latents.dims()[0];
                kv_b.forward(latents, &[(0..m, adapter)])
            };
            attend_one(c, a, layer, &q, &kv, &k_rot, s, expand)
        })
        .collect();
    super::joined(outs, 0)
}

/// The adapter of the row run that holds batch row `row`.
fn adapter_at<'r, B: GraftBackend>(runs: &Runs<'r, B>, row: usize) -> Option<&'r LoraWeights<B>> {
    runs.iter()
        .find(|(range, _)| range.contains(&row))
        .and_then(|(_, lora)| *lora)
}

fn normed<B: GraftBackend>(norm: &Option<super::RmsNorm<B>>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    match norm {
        Some(n) => n.forward(x),
        None => unreachable!("the loader gives latent attention its norms"),
    }
}

/// The last dimension reordered even indices first, then odd: adjacent rotary pairs become
/// the halves that [`super::rope::Rope::apply`] rotates together.
///
/// # Shapes
/// `[n, heads, d]` → `[n, heads, d]`
fn evens_first<B: GraftBackend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, h, d] = x.dims();
    x.reshape([n, h, d / 2, 2])
        .swap_dims(2, 3)
        .reshape([n, h, d])
}

/// One sequence: its new rows (`span` of the batch) against its cached latents and its new
/// ones, the latents expanded to keys and values by `expand`.
#[allow(clippy::too_many_arguments)]
fn attend_one<B: GraftBackend>(
    c: &ModelConfig,
    a: &MlaConfig,
    layer: usize,
    q: &Tensor<B, 3>,
    kv: &Tensor<B, 2>,
    k_rot: &Tensor<B, 3>,
    s: &mut AttnSeq<'_, B>,
    expand: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, 2> {
    let span: Range<usize> = s.span.clone();
    let n = span.len();
    let (heads, dn, dr, dv, r) = (
        c.num_heads,
        a.qk_nope_dim,
        a.qk_rope_dim,
        a.v_head_dim,
        a.kv_lora_rank,
    );
    let window = c.layers[layer].window;
    let start = s.start_for(window);
    // The cache's key slot holds the normed latents, its value slot the rotated shared keys,
    // each `[1, positions, width]`.
    let kv_new = kv.clone().slice(span.clone()).reshape([1, n, r]);
    let rot_new = k_rot.clone().slice(span.clone()).swap_dims(0, 1);
    let (latents, rots) = match s.cache.as_deref_mut() {
        Some(cache) => {
            let pieces = cache.append(c.num_layers, layer, kv_new, rot_new);
            let (ls, rs): (Vec<_>, Vec<_>) = pieces.into_iter().map(|(l, k, _)| (l, k)).unzip();
            (Tensor::cat(ls, 1), Tensor::cat(rs, 1))
        }
        None => (kv_new, rot_new),
    };
    let m = latents.dims()[1];
    let latents = latents
        .slice([0..1, start..m, 0..r])
        .reshape([m - start, r]);
    let rots = rots
        .slice([0..1, start..m, 0..dr])
        .reshape([m - start, 1, dr]);
    let keys = m - start;
    // [keys, heads, dn + dv] → key without rope, value
    let expanded = expand(latents).reshape([keys, heads, dn + dv]);
    let k_nope = expanded.clone().slice([0..keys, 0..heads, 0..dn]);
    let v = expanded
        .slice([0..keys, 0..heads, dn..dn + dv])
        .swap_dims(0, 1); // [heads, keys, dv]
    let k = Tensor::cat(vec![k_nope, rots.repeat_dim(1, heads)], 2).swap_dims(0, 1); // [heads, keys, dk]
    let q = q.clone().slice(span).swap_dims(0, 1); // [heads, n, dk]
    let causal = Causal {
        // Latent attention has no soft-cap.
        softcap: None,
        ..s.causal(c, window, 1)
    };
    B::attention_causal(q, k, v, None, &causal)
        .swap_dims(0, 1)
        .reshape([n, heads * dv])
}
