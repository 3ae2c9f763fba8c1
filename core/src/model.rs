//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): RMSNorm, rotary embeddings,
//! grouped-query attention, SwiGLU MLP, tied or untied embeddings. It matches
//! `transformers.models.llama.modeling_llama` numerically (see the parity tests).
//!
//! The forward pass is ragged, as in vLLM: the tokens of every sequence in a batch are
//! concatenated into one `[tokens, hidden]` matrix, so projections (the heavy part) run once
//! for the whole batch while attention runs per sequence against that sequence's own KV cache.
//! Sequences of any lengths, prefills and single-token decode steps share one call, and rows
//! of different sequences may carry different adapters. Packed training examples are simply
//! separate sequences, so no attention crosses example boundaries.

use crate::backend::GraftBackend;
use std::ops::Range;

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::TensorData;

use crate::config::LlamaConfig;
use crate::lora::{Adapter, TargetModule};
use crate::proj::{LoraWeights, Proj};
use crate::rope::Rope;

/// Root-mean-square layer norm: `x / √(mean(x²) + ε) · w`.
#[derive(Debug, Clone)]
pub struct RmsNorm<B: GraftBackend> {
    /// `[hidden]`
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: GraftBackend> RmsNorm<B> {
    /// # Shapes
    /// `x: [n, hidden]` → `[n, hidden]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let var = (x.clone() * x.clone()).mean_dim(1);
        x * (var + self.eps).sqrt().recip() * self.weight.clone().unsqueeze::<2>()
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Block<B: GraftBackend> {
    pub input_norm: RmsNorm<B>,
    /// q, k, v, o, gate, up, down — indexed by [`TargetModule::index`].
    pub projs: [Proj<B>; 7],
    pub post_attention_norm: RmsNorm<B>,
}

impl<B: GraftBackend> Block<B> {
    pub fn proj(&self, t: TargetModule) -> &Proj<B> {
        &self.projs[t.index()]
    }
}

/// The key/value cache of one sequence: per layer `[kv_heads, len, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct SeqCache<B: GraftBackend> {
    layers: Vec<Option<(Tensor<B, 3>, Tensor<B, 3>)>>,
    len: usize,
}

impl<B: GraftBackend> SeqCache<B> {
    pub fn new() -> Self {
        SeqCache {
            layers: Vec::new(),
            len: 0,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence's part of a forward call.
pub struct SeqInput<'a, B: GraftBackend> {
    /// New tokens of the sequence (its prompt, or the last sampled token).
    pub tokens: &'a [u32],
    /// Its cache: positions start at `cache.len()`, and the new keys/values are appended.
    /// `None` runs the tokens as a fresh sequence without keeping a cache (training).
    pub cache: Option<&'a mut SeqCache<B>>,
    /// The adapter applied to this sequence's rows, if any.
    pub adapter: Option<&'a Adapter<B>>,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last new token of each sequence: `[n_seqs, vocab]`.
    Last,
    /// Every new token: `[total_tokens, vocab]`.
    All,
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama<B: GraftBackend> {
    pub config: LlamaConfig,
    pub embed_tokens: Proj<B>,
    pub layers: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    /// Shares the embedding's storage when embeddings are tied.
    pub lm_head: Proj<B>,
    rope: Rope,
    device: B::Device,
}

impl<B: GraftBackend> Llama<B> {
    pub fn new(
        config: LlamaConfig,
        embed_tokens: Proj<B>,
        layers: Vec<Block<B>>,
        norm: RmsNorm<B>,
        lm_head: Proj<B>,
        device: B::Device,
    ) -> Self {
        let rope = Rope::new(&config);
        Llama {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device,
        }
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Bytes held by the base weights (packed size for quantized projections).
    pub fn base_bytes(&self) -> usize {
        let tied = self.config.tie_word_embeddings;
        let layer_bytes: usize = self
            .layers
            .iter()
            .map(|l| {
                l.projs.iter().map(Proj::n_bytes).sum::<usize>()
                    + (l.input_norm.weight.dims()[0] + l.post_attention_norm.weight.dims()[0]) * 4
            })
            .sum();
        self.embed_tokens.n_bytes()
            + layer_bytes
            + self.config.hidden_size * 4
            + if tied { 0 } else { self.lm_head.n_bytes() }
    }

    /// Runs new tokens of several sequences through the model, appending to their caches.
    ///
    /// # Shapes
    /// → `[n_seqs, vocab]` for [`Logits::Last`], `[total_new_tokens, vocab]` for [`Logits::All`]
    ///
    /// # Panics
    /// If a sequence has no new tokens (callers check), or positions would exceed the tensor
    /// sizes the backend supports.
    pub fn forward(&self, seqs: &mut [SeqInput<'_, B>], which: Logits) -> Tensor<B, 2> {
        on_pool(|| self.forward_on_pool(seqs, which))
    }

    fn forward_on_pool(&self, seqs: &mut [SeqInput<'_, B>], which: Logits) -> Tensor<B, 2> {
        let hidden = self.final_hidden_on_pool(seqs);
        let hidden = match which {
            Logits::All => hidden,
            Logits::Last => {
                let mut last = Vec::with_capacity(seqs.len());
                let mut end = 0;
                for s in seqs.iter() {
                    end += s.tokens.len();
                    last.push(end as i32 - 1);
                }
                let idx = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(last, [seqs.len()]),
                    &self.device,
                );
                hidden.select(0, idx)
            }
        };
        self.lm_head.forward(hidden, &[])
    }

    /// Hidden states after the final norm, `[total_new_tokens, hidden]`.
    pub fn final_hidden(&self, seqs: &mut [SeqInput<'_, B>]) -> Tensor<B, 2> {
        on_pool(|| self.final_hidden_on_pool(seqs))
    }

    fn final_hidden_on_pool(&self, seqs: &mut [SeqInput<'_, B>]) -> Tensor<B, 2> {
        assert!(
            seqs.iter().all(|s| !s.tokens.is_empty()),
            "every sequence needs a new token"
        );
        let c = &self.config;
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut spans = Vec::with_capacity(seqs.len());
        let mut positions = Vec::with_capacity(tokens.len());
        let mut start = 0;
        for s in seqs.iter() {
            let past = s.cache.as_ref().map_or(0, |c| c.len);
            positions.extend(past..past + s.tokens.len());
            spans.push((start..start + s.tokens.len(), past));
            start += s.tokens.len();
        }
        let (cos_q, sin_q) = self.rope.tables::<B>(&positions, c.num_heads, &self.device);
        let (cos_k, sin_k) = self
            .rope
            .tables::<B>(&positions, c.num_kv_heads, &self.device);
        let adapters: Vec<Option<&Adapter<B>>> = seqs.iter().map(|s| s.adapter).collect();
        let masks: Vec<Option<Tensor<B, 3>>> = spans
            .iter()
            .map(|(span, past)| self.causal_mask(span.len(), *past))
            .collect();
        let mut x = self.embed_tokens.rows(&tokens, &self.device);
        for (li, layer) in self.layers.iter().enumerate() {
            let runs = |t: TargetModule| row_runs(&spans, &adapters, li, t);
            let h = layer.input_norm.forward(x.clone());
            let n = tokens.len();
            let q = layer
                .proj(TargetModule::Q)
                .forward(h.clone(), &runs(TargetModule::Q));
            let k = layer
                .proj(TargetModule::K)
                .forward(h.clone(), &runs(TargetModule::K));
            let v = layer
                .proj(TargetModule::V)
                .forward(h, &runs(TargetModule::V));
            let q = self
                .rope
                .apply(q.reshape([n, c.num_heads, c.head_dim]), &cos_q, &sin_q);
            let k = self
                .rope
                .apply(k.reshape([n, c.num_kv_heads, c.head_dim]), &cos_k, &sin_k);
            let v = v.reshape([n, c.num_kv_heads, c.head_dim]);
            let mut outs = Vec::with_capacity(seqs.len());
            for (si, (span, _)) in spans.iter().enumerate() {
                let cache = seqs[si].cache.as_deref_mut();
                let mask = masks[si].as_ref();
                outs.push(self.attend(li, span.clone(), &q, &k, &v, cache, mask));
            }
            let attn = if outs.len() == 1 {
                outs.pop().unwrap_or_else(|| unreachable!())
            } else {
                Tensor::cat(outs, 0)
            };
            x = x + layer
                .proj(TargetModule::O)
                .forward(attn, &runs(TargetModule::O));
            let h = layer.post_attention_norm.forward(x.clone());
            let gate = layer
                .proj(TargetModule::Gate)
                .forward(h.clone(), &runs(TargetModule::Gate));
            let up = layer
                .proj(TargetModule::Up)
                .forward(h, &runs(TargetModule::Up));
            x = x + layer
                .proj(TargetModule::Down)
                .forward(silu(gate) * up, &runs(TargetModule::Down));
        }
        for s in seqs.iter_mut() {
            if let Some(cache) = s.cache.as_deref_mut() {
                cache.len += s.tokens.len();
            }
        }
        self.norm.forward(x)
    }

    /// The additive causal mask of `n` new rows after `past` cached ones, in the full shape of
    /// the scores (`[kv_heads, groups·n, past + n]`, row `g·n + i` for query `i` of group `g`):
    /// built once per forward and shared by every layer, and as large as the scores so that
    /// adding it is a contiguous element-wise op. `None` for one row (it sees everything).
    fn causal_mask(&self, n: usize, past: usize) -> Option<Tensor<B, 3>> {
        if n <= 1 {
            return None;
        }
        let c = &self.config;
        let (kvh, groups, total) = (c.num_kv_heads, c.num_heads / c.num_kv_heads, past + n);
        let mut mask = vec![0f32; kvh * groups * n * total];
        for (r, row) in mask.chunks_exact_mut(total).enumerate() {
            let i = r % n;
            row[past + i + 1..].fill(f32::NEG_INFINITY);
        }
        Some(Tensor::from_data(
            TensorData::new(mask, [kvh, groups * n, total]),
            &self.device,
        ))
    }

    /// Causal attention of one sequence's new rows against its cached and new keys.
    ///
    /// # Shapes
    /// `q: [tokens, heads, hd]`, `k`, `v: [tokens, kv_heads, hd]` → `[span.len(), heads·hd]`
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        span: Range<usize>,
        q: &Tensor<B, 3>,
        k: &Tensor<B, 3>,
        v: &Tensor<B, 3>,
        cache: Option<&mut SeqCache<B>>,
        mask: Option<&Tensor<B, 3>>,
    ) -> Tensor<B, 2> {
        let c = &self.config;
        let (n, hd, kvh) = (span.len(), c.head_dim, c.num_kv_heads);
        let groups = c.num_heads / kvh;
        // [n, kv, hd] -> [kv, n, hd]
        let k_new = k.clone().slice(span.clone()).swap_dims(0, 1);
        let v_new = v.clone().slice(span.clone()).swap_dims(0, 1);
        let (k_all, v_all) = match cache {
            Some(cache) => {
                if cache.layers.len() < self.layers.len() {
                    cache.layers.resize(self.layers.len(), None);
                }
                let (k_all, v_all) = match cache.layers[layer].take() {
                    Some((kc, vc)) => (
                        Tensor::cat(vec![kc, k_new], 1),
                        Tensor::cat(vec![vc, v_new], 1),
                    ),
                    None => (k_new, v_new),
                };
                cache.layers[layer] = Some((k_all.clone(), v_all.clone()));
                (k_all, v_all)
            }
            None => (k_new, v_new),
        };
        // Query head h uses key head h / groups (transformers' repeat_kv): group the query rows
        // by key head instead of repeating keys: [n, heads, hd] -> [kv, groups·n, hd].
        let q = q
            .clone()
            .slice(span)
            .swap_dims(0, 1)
            .reshape([kvh, groups * n, hd]);
        let scores = q
            .matmul(k_all.swap_dims(1, 2))
            .mul_scalar(1.0 / (hd as f64).sqrt());
        let scores = match mask {
            Some(m) => scores + m.clone(),
            None => scores,
        };
        let out = softmax(scores, 2).matmul(v_all); // [kv, groups·n, hd]
        out.reshape([c.num_heads, n, hd])
            .swap_dims(0, 1)
            .reshape([n, c.num_heads * hd])
    }
}

/// Runs `f` on a rayon pool thread (at once if already on one). On the CPU the packed products
/// split their rows over rayon's pool; running the whole pass on a pool thread lets that thread
/// take part in each split instead of handing every product to the pool and sleeping until it
/// is done (≈ 200 hand-offs a token).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Contiguous row ranges and the adapter weights that apply to them for one projection.
fn row_runs<'a, B: GraftBackend>(
    spans: &[(Range<usize>, usize)],
    adapters: &[Option<&'a Adapter<B>>],
    layer: usize,
    target: TargetModule,
) -> Vec<(Range<usize>, Option<&'a LoraWeights<B>>)> {
    let mut runs: Vec<(Range<usize>, Option<&'a LoraWeights<B>>)> = Vec::new();
    for ((span, _), adapter) in spans.iter().zip(adapters) {
        let lora = adapter.and_then(|a| a.get(layer, target));
        match runs.last_mut() {
            Some((r, prev)) if r.end == span.start && same(*prev, lora) => r.end = span.end,
            _ => runs.push((span.clone(), lora)),
        }
    }
    runs
}

fn same<T>(a: Option<&T>, b: Option<&T>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}
