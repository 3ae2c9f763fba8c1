//! Causal grouped-query attention of the new rows of each sequence against its cached and new
//! keys, with the per-layer sliding window, score scale and soft-cap of [`ModelConfig`]
//! (transformers' `eager_attention_forward` with its causal / sliding-window masks).

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::TensorData;

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
    /// Per distinct window of the model's layers: the first key position any new row sees,
    /// and the additive mask over keys `start..past + n` (`None` when every row sees them all).
    pub masks: Vec<(Option<usize>, usize, Option<Tensor<B, 3>>)>,
}

impl<B: GraftBackend> AttnSeq<'_, B> {
    /// The first key position and the mask of the layers with `window`.
    pub fn mask_for(&self, window: Option<usize>) -> (usize, Option<Tensor<B, 3>>) {
        self.masks
            .iter()
            .find(|m| m.0 == window)
            .map(|m| (m.1, m.2.clone()))
            .unwrap_or_else(|| unreachable!("masks are built for every layer's window"))
    }

    /// Builds the masks for each window in `windows`, once per forward, shared by every layer.
    pub fn build_masks(&mut self, c: &ModelConfig, windows: &[Option<usize>], device: &B::Device) {
        let (n, past) = (self.span.len(), self.past);
        self.masks = windows
            .iter()
            .map(|&w| {
                let start = w.map_or(0, |w| (past + 1).saturating_sub(w));
                (w, start, causal_mask(c, n, past, start, w, device))
            })
            .collect();
    }
}

/// The additive mask of `n` new rows after `past` cached ones over keys `start..past + n`, in
/// the full shape of the scores (`[kv_heads, groups·n, keys]`, row `g·n + i` for query `i` of
/// group `g`), so adding it is a contiguous element-wise op. Row `i` (position `past + i`) sees
/// key `j` when `j ≤ past + i` and, with a window, `j > past + i − window`. `None` for one row:
/// `start` already excludes what it cannot see.
fn causal_mask<B: GraftBackend>(
    c: &ModelConfig,
    n: usize,
    past: usize,
    start: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Option<Tensor<B, 3>> {
    if n <= 1 {
        return None;
    }
    let (kvh, groups, keys) = (
        c.num_kv_heads,
        c.num_heads / c.num_kv_heads,
        past + n - start,
    );
    let mut mask = vec![0f32; kvh * groups * n * keys];
    for (r, row) in mask.chunks_exact_mut(keys).enumerate() {
        let pos = past + r % n;
        row[pos + 1 - start..].fill(f32::NEG_INFINITY);
        if let Some(w) = window {
            // keys at positions ≤ pos − w
            let hidden = (pos + 1).saturating_sub(w).saturating_sub(start);
            row[..hidden].fill(f32::NEG_INFINITY);
        }
    }
    Some(Tensor::from_data(
        TensorData::new(mask, [kvh, groups * n, keys]),
        device,
    ))
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
    let mut outs: Vec<Tensor<B, 2>> = seqs
        .iter_mut()
        .map(|s| {
            let (start, mask) = s.mask_for(window);
            attend_one(
                c,
                layer,
                s.span.clone(),
                q,
                k,
                v,
                s.cache.as_deref_mut(),
                start,
                mask,
                sinks,
            )
        })
        .collect();
    if outs.len() == 1 {
        outs.pop().unwrap_or_else(|| unreachable!())
    } else {
        Tensor::cat(outs, 0)
    }
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
    start: usize,
    mask: Option<Tensor<B, 3>>,
    sinks: Option<&Tensor<B, 1>>,
) -> Tensor<B, 2> {
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
    // each cut to the positions `start..` the rows may see; scores are joined across pieces,
    // so the cached keys are read in place, never copied into one tensor.
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
    let rows = groups * n;
    if mask.is_none() {
        // Per row, its head's sink (row g·n + i is query i of head group g).
        let sink_rows = sinks.map(|s| {
            s.clone()
                .reshape([kvh, groups, 1])
                .repeat_dim(2, n)
                .reshape([kvh * rows])
        });
        let fused = B::attention_unmasked(
            &q,
            &pieces,
            c.attention_scale,
            c.attn_softcap,
            sink_rows.as_ref(),
        );
        if let Some(out) = fused {
            return out
                .reshape([c.num_heads, n, hd])
                .swap_dims(0, 1)
                .reshape([n, c.num_heads * hd]);
        }
    }
    let widths: Vec<usize> = pieces.iter().map(|(k, _)| k.dims()[1]).collect();
    let scores: Vec<Tensor<B, 3>> = pieces
        .iter()
        .map(|(k, _)| q.clone().matmul(k.clone().swap_dims(1, 2)))
        .collect();
    let mut scores = if scores.len() == 1 {
        scores.into_iter().next().unwrap_or_else(|| unreachable!())
    } else {
        Tensor::cat(scores, 2)
    }
    .mul_scalar(c.attention_scale);
    if let Some(cap) = c.attn_softcap {
        scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
    }
    if let Some(m) = mask {
        scores = scores + m;
    }
    let probs = match sinks {
        // Each head's sink joins its rows' softmax as one more logit, then is dropped.
        Some(s) => {
            let keys = scores.dims()[2];
            let column = s
                .clone()
                .reshape([kvh, groups, 1])
                .repeat_dim(2, n)
                .reshape([kvh, rows, 1]);
            B::softmax_last(Tensor::cat(vec![scores, column], 2)).slice([0..kvh, 0..rows, 0..keys])
        }
        None => B::softmax_last(scores),
    };
    let mut at = 0;
    let mut out: Option<Tensor<B, 3>> = None;
    for ((_, v), w) in pieces.into_iter().zip(widths) {
        let p = probs.clone().slice([0..kvh, 0..rows, at..at + w]);
        at += w;
        let part = p.matmul(v);
        out = Some(match out {
            Some(o) => o + part,
            None => part,
        });
    }
    let out = out.unwrap_or_else(|| unreachable!("a row always sees itself")); // [kv, groups·n, hd]
    out.reshape([c.num_heads, n, hd])
        .swap_dims(0, 1)
        .reshape([n, c.num_heads * hd])
}
