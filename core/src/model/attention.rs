//! Causal grouped-query attention of the new rows of each sequence against its cached and new
//! keys, with the per-layer sliding window, score scale and soft-cap of [`ModelConfig`]
//! (transformers' `eager_attention_forward` with its causal / sliding-window masks).

use std::ops::Range;

use burn::prelude::*;

use super::attention_blocked::{softmax_with_sinks, Causal};
use super::config::ModelConfig;
use super::SeqCache;
use crate::backend::GraftBackend;

/// One sequence's part of an attention call.
pub(crate) struct AttnSeq<'b, B: GraftBackend> {
    /// Its rows in the batch.
    pub span: Range<usize>,
    /// Tokens already in its cache.
    pub past: usize,
    pub cache: Option<&'b mut SeqCache<B>>,
    /// Per distinct window of the model's layers: the first key position any new row sees.
    pub starts: Vec<(Option<usize>, usize)>,
}

impl<B: GraftBackend> AttnSeq<'_, B> {
    /// The first key position any new row of the layers with `window` sees.
    pub fn start_for(&self, window: Option<usize>) -> usize {
        self.starts
            .iter()
            .find(|m| m.0 == window)
            .map(|m| m.1)
            .unwrap_or_else(|| unreachable!("starts are found for every layer's window"))
    }

    /// The first key positions for each window in `windows`, once per forward.
    pub fn build_starts(&mut self, windows: &[Option<usize>]) {
        let past = self.past;
        self.starts = windows
            .iter()
            .map(|&w| (w, w.map_or(0, |w| (past + 1).saturating_sub(w))))
            .collect();
    }

    /// What the new rows of the layers with `window` see (blocks chosen by size).
    pub fn causal(&self, c: &ModelConfig, window: Option<usize>, groups: usize) -> Causal {
        Causal {
            scale: c.attention_scale,
            softcap: c.attn_softcap,
            groups,
            past: self.past,
            start: self.start_for(window),
            window,
            block_rows: None,
        }
    }
}

/// Attention of every sequence's new rows in layer `layer`, appending the new keys and values
/// to each sequence's cache.
///
/// # Shapes
/// `q: [tokens, heads, hd]`, `k`, `v: [tokens, kv_heads, hd]` → `[tokens, heads·hd]`
pub(crate) fn attend<B: GraftBackend>(
    c: &ModelConfig,
    layer: usize,
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    sinks: Option<&Tensor<B, 1>>,
    seqs: &mut [AttnSeq<'_, B>],
) -> Tensor<B, 2> {
    let window = c.layers[layer].window;
    let outs: Vec<Tensor<B, 2>> = seqs
        .iter_mut()
        .map(|s| {
            let causal = s.causal(c, window, c.num_heads / c.num_kv_heads);
            attend_one(
                c,
                layer,
                s.span.clone(),
                q,
                k,
                v,
                s.cache.as_deref_mut(),
                &causal,
                sinks,
            )
        })
        .collect();
    super::joined(outs, 0)
}

/// One sequence: its new rows against keys `start..` of its cache plus its new keys.
#[allow(clippy::too_many_arguments)]
fn attend_one<B: GraftBackend>(
    c: &ModelConfig,
    layer: usize,
    span: Range<usize>,
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    cache: Option<&mut SeqCache<B>>,
    causal: &Causal,
    sinks: Option<&Tensor<B, 1>>,
) -> Tensor<B, 2> {
    let start = causal.start;
    let (n, hd, kvh) = (span.len(), c.head_dim, c.num_kv_heads);
    let groups = c.num_heads / kvh;
    // [n, kv, hd] -> [kv, n, hd]
    let k_new = k.clone().slice(span.clone()).swap_dims(0, 1);
    let v_new = v.clone().slice(span.clone()).swap_dims(0, 1);
    // Query head h uses key head h / groups (transformers' repeat_kv): group the query rows
    // by key head instead of repeating keys: [n, heads, hd] -> [kv, groups·n, hd].
    let q = q
        .clone()
        .slice(span)
        .swap_dims(0, 1)
        .reshape([kvh, groups * n, hd]);
    // The keys and values in pieces (the cache's frozen part and tail, the new rows appended),
    // each cut to the positions `start..` the rows may see. A decode step's scores are joined
    // across pieces, so the cached keys are read in place, never copied into one tensor.
    let pieces: Vec<(Tensor<B, 3>, Tensor<B, 3>)> = match cache {
        Some(cache) => cache
            .append(c.num_layers, layer, k_new, v_new)
            .into_iter()
            .filter_map(|(k, v, at)| {
                let len = k.dims()[1];
                let from = start.saturating_sub(at);
                (from < len).then(|| {
                    (
                        k.slice([0..kvh, from..len, 0..hd]),
                        v.slice([0..kvh, from..len, 0..hd]),
                    )
                })
            })
            .collect(),
        None => {
            let len = k_new.dims()[1];
            vec![(
                k_new.slice([0..kvh, start..len, 0..hd]),
                v_new.slice([0..kvh, start..len, 0..hd]),
            )]
        }
    };
    let out = if n == 1 {
        one_row(c, &q, pieces, sinks)
    } else {
        // Prefill or training: the pieces joined (a cached prefix is copied once per layer,
        // next to the scores' n × keys work), then blocks of query positions.
        let (ks, vs): (Vec<_>, Vec<_>) = pieces.into_iter().unzip();
        B::attention_causal(q, super::joined(ks, 1), super::joined(vs, 1), sinks, causal)
    };
    // [kv, groups·n, hd]
    out.reshape([c.num_heads, n, hd])
        .swap_dims(0, 1)
        .reshape([n, c.num_heads * hd])
}

/// One new row per query head (a decode step): it sees every key of the pieces (`start`
/// already cut what it may not), read in place.
///
/// # Shapes
/// `q: [kv_heads, groups, hd]` → `[kv_heads, groups, hd]`
fn one_row<B: GraftBackend>(
    c: &ModelConfig,
    q: &Tensor<B, 3>,
    pieces: Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
    sinks: Option<&Tensor<B, 1>>,
) -> Tensor<B, 3> {
    let [kvh, groups, _] = q.dims();
    // Row g is query head kv·groups + g: the sinks are in row order already.
    let fused = B::attention_unmasked(q, &pieces, c.attention_scale, c.attn_softcap, sinks);
    if let Some(out) = fused {
        return out;
    }
    let widths: Vec<usize> = pieces.iter().map(|(k, _)| k.dims()[1]).collect();
    let scores: Vec<Tensor<B, 3>> = pieces
        .iter()
        .map(|(k, _)| q.clone().matmul(k.clone().swap_dims(1, 2)))
        .collect();
    let mut scores = super::joined(scores, 2).mul_scalar(c.attention_scale);
    if let Some(cap) = c.attn_softcap {
        scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
    }
    let probs = softmax_with_sinks(scores, sinks, kvh, groups, 1);
    let mut at = 0;
    let mut out: Option<Tensor<B, 3>> = None;
    for ((_, v), w) in pieces.into_iter().zip(widths) {
        let p = probs.clone().slice([0..kvh, 0..groups, at..at + w]);
        at += w;
        let part = p.matmul(v);
        out = Some(match out {
            Some(o) => o + part,
            None => part,
        });
    }
    out.unwrap_or_else(|| unreachable!("a row always sees itself"))
}
