//! The one decoder of graft, for every supported family (Llama 2/3, SmolLM, Mistral, Qwen2/2.5,
//! Qwen3, Gemma 2/3, Phi-3/4-mini, OLMo 2). A family is data: [`ModelConfig`] (built by the
//! loaders with [`Family`]) says which norm slots, q/k norm, projections layout, activation,
//! per-layer window and rope, soft-caps and embedding scale the layers have; [`Block`] and
//! [`attention`] read it. It matches transformers' modeling files numerically (see the parity
//! tests of each family).
//!
//! The forward pass is ragged, as in vLLM: the tokens of every sequence in a batch are
//! concatenated into one `[tokens, hidden]` matrix, so projections (the heavy part) run once
//! for the whole batch while attention runs per sequence against that sequence's own KV cache.
//! Sequences of any lengths, prefills and single-token decode steps share one call, and rows
//! of different sequences may carry different adapters. Packed training examples are simply
//! separate sequences, so no attention crosses example boundaries.

mod attention;
pub(crate) mod attention_blocked;
pub(crate) mod attention_cpu;
mod block;
mod compute;
pub mod config;
pub mod family;
mod mla;
pub mod moe;
mod norm;
pub mod proj;
mod recompute;
mod rope;
pub(crate) mod token_logps;

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::adapters::lora::{Adapter, LoraConfig, LoraShape, LoraWeights, TargetModule};
use crate::backend::GraftBackend;
use crate::model::proj::{BaseWeight, Proj};
use crate::quant::Activations;
use attention::AttnSeq;
pub use attention_blocked::Causal;
pub use block::Block;
use block::{LayerCtx, Runs};
pub use compute::ComputeDtype;
pub use config::{
    Activation, ClampedSwiglu, LayerConfig, MlaConfig, ModelConfig, MoeConfig, NormPlacement,
    NormSlot, QkNorm, RopeConfig, RopeScaling, Routing, SharedExpert,
};
pub use family::Family;
pub use norm::RmsNorm;
pub use recompute::Recomputed;
use rope::Rope;

/// What [`Model::place_weights`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placement {
    /// Packed projections seen (the LM head and the layers'; a tied head counts as its own).
    pub packed: usize,
    /// Of them, those whose storage this call uploaded.
    pub uploaded: usize,
}

/// The key/value cache of one sequence, per layer. Keys and values (`[kv_heads, len,
/// head_dim]`) are kept in two parts: a long frozen prefix and a short tail that new tokens are
/// appended to; the tail joins the prefix every [`KvParts::TAIL`] tokens. Appending a token
/// thus copies the tail, not the whole cache, and attention reads the two parts in place.
#[derive(Debug, Clone, Default)]
pub struct SeqCache<B: GraftBackend> {
    layers: Vec<Option<KvParts<B>>>,
    len: usize,
}

/// One layer's keys and values: `frozen` then `tail`, each `[kv_heads, n, head_dim]`.
#[derive(Debug, Clone)]
pub(crate) struct KvParts<B: GraftBackend> {
    pub frozen: Option<(Tensor<B, 3>, Tensor<B, 3>)>,
    pub tail: Option<(Tensor<B, 3>, Tensor<B, 3>)>,
}

fn positions<B: GraftBackend>(part: &Option<(Tensor<B, 3>, Tensor<B, 3>)>) -> usize {
    part.as_ref().map_or(0, |(k, _)| k.dims()[1])
}

fn first<B: GraftBackend>(t: &Tensor<B, 3>, n: usize) -> Tensor<B, 3> {
    let [h, _, d] = t.dims();
    t.clone().slice([0..h, 0..n, 0..d])
}

impl<B: GraftBackend> KvParts<B> {
    /// Tail length at which the tail joins the frozen part.
    pub const TAIL: usize = 128;

    /// Appends new keys and values (`[kv_heads, n, head_dim]`).
    pub fn append(parts: Option<Self>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Self {
        let mut parts = parts.unwrap_or(KvParts {
            frozen: None,
            tail: None,
        });
        let tail = match parts.tail.take() {
            Some((tk, tv)) => (Tensor::cat(vec![tk, k], 1), Tensor::cat(vec![tv, v], 1)),
            None => (k, v),
        };
        if tail.0.dims()[1] >= Self::TAIL {
            parts.frozen = Some(match parts.frozen.take() {
                Some((fk, fv)) => (
                    Tensor::cat(vec![fk, tail.0], 1),
                    Tensor::cat(vec![fv, tail.1], 1),
                ),
                None => tail,
            });
        } else {
            parts.tail = Some(tail);
        }
        parts
    }

    /// The parts as (keys, values, first position), in order.
    pub fn pieces(&self) -> Vec<(Tensor<B, 3>, Tensor<B, 3>, usize)> {
        let mut out = Vec::with_capacity(2);
        if let Some((k, v)) = &self.frozen {
            out.push((k.clone(), v.clone(), 0));
        }
        if let Some((k, v)) = &self.tail {
            out.push((k.clone(), v.clone(), positions(&self.frozen)));
        }
        out
    }

    /// The first `n` positions.
    fn prefix(&self, n: usize) -> Self {
        let frozen_len = positions(&self.frozen);
        if n <= frozen_len {
            KvParts {
                frozen: self
                    .frozen
                    .as_ref()
                    .map(|(k, v)| (first(k, n), first(v, n))),
                tail: None,
            }
        } else {
            KvParts {
                frozen: self.frozen.clone(),
                tail: self
                    .tail
                    .as_ref()
                    .map(|(k, v)| (first(k, n - frozen_len), first(v, n - frozen_len))),
            }
        }
    }
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

    /// Appends layer `layer`'s new keys and values (`[kv_heads, n, width]` each; latent
    /// attention's latents and rotary keys) and returns the layer's pieces, as
    /// [`KvParts::pieces`].
    pub(crate) fn append(
        &mut self,
        num_layers: usize,
        layer: usize,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
    ) -> Vec<(Tensor<B, 3>, Tensor<B, 3>, usize)> {
        if self.layers.len() < num_layers {
            self.layers.resize(num_layers, None);
        }
        let parts = KvParts::append(self.layers[layer].take(), k, v);
        let pieces = parts.pieces();
        self.layers[layer] = Some(parts);
        pieces
    }

    /// Values held over all layers: keys and values, or latent attention's latents and
    /// rotary keys.
    pub fn n_values(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flat_map(KvParts::pieces)
            .map(|(k, v, _)| {
                k.dims().iter().product::<usize>() + v.dims().iter().product::<usize>()
            })
            .sum()
    }

    /// The cache of the first `n` tokens (keys and values of a position depend only on the
    /// tokens up to it, so this is what those tokens alone would have made).
    ///
    /// # Panics
    /// If `n` exceeds [`SeqCache::len`].
    pub fn prefix(&self, n: usize) -> SeqCache<B> {
        assert!(
            n <= self.len,
            "prefix of {n} tokens from a cache of {}",
            self.len
        );
        SeqCache {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|p| p.prefix(n)))
                .collect(),
            len: n,
        }
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logits {
    /// Only the last new token of each sequence: `[n_seqs, vocab]`.
    Last,
    /// Every new token: `[total_tokens, vocab]`.
    All,
    /// Every new token of the sequences flagged `true`, the last new token of the others, in
    /// sequence order: `[Σ (flag ? new tokens : 1), vocab]`. Lets one batched forward score a
    /// whole prompt for one request while the others only sample.
    Mixed(Vec<bool>),
}

/// A decoder-only causal language model.
#[derive(Debug, Clone)]
pub struct Model<B: GraftBackend> {
    pub config: ModelConfig,
    pub embed_tokens: Proj<B>,
    pub layers: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    /// Shares the embedding's storage when embeddings are tied. Use [`Model::logits`], which
    /// also applies the family's final soft-cap.
    pub lm_head: Proj<B>,
    /// The distinct rotary embeddings and, per layer, which one it uses.
    ropes: Vec<Rope>,
    layer_rope: Vec<usize>,
    /// The distinct sliding windows of the layers.
    windows: Vec<Option<usize>>,
    device: B::Device,
}

impl<B: GraftBackend> Model<B> {
    pub fn new(
        config: ModelConfig,
        embed_tokens: Proj<B>,
        layers: Vec<Block<B>>,
        norm: RmsNorm<B>,
        lm_head: Proj<B>,
        device: B::Device,
    ) -> Self {
        let mut rope_configs: Vec<&RopeConfig> = Vec::new();
        let mut layer_rope = Vec::with_capacity(config.layers.len());
        let mut windows = Vec::new();
        for l in &config.layers {
            let i = match rope_configs.iter().position(|r| **r == l.rope) {
                Some(i) => i,
                None => {
                    rope_configs.push(&l.rope);
                    rope_configs.len() - 1
                }
            };
            layer_rope.push(i);
            if !windows.contains(&l.window) {
                windows.push(l.window);
            }
        }
        let ropes = rope_configs
            .iter()
            .map(|r| Rope::new(r, config.head_dim))
            .collect();
        Model {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            ropes,
            layer_rope,
            windows,
            device,
        }
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The adapter shape of each module in `targets` that the layers have, in layer then
    /// target order: the order of adapters' modules and of the trainer's parameters. Targets
    /// the layout lacks (`q_proj` on Phi-3's fused layout, the experts of a dense layer) are
    /// skipped, as PEFT does.
    pub fn adapter_shapes(&self, targets: &[TargetModule]) -> Vec<LoraShape> {
        let mut targets = targets.to_vec();
        targets.sort();
        targets.dedup();
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(li, l)| {
                targets.iter().filter_map(move |&t| {
                    l.adapter_shape(t).map(|(o, i, e)| LoraShape {
                        layer: li,
                        target: t,
                        out_features: o,
                        in_features: i,
                        experts: e,
                    })
                })
            })
            .collect()
    }

    /// A fresh PEFT-initialized adapter for this model ([`Adapter::init_peft`]).
    pub fn init_adapter(&self, config: &LoraConfig, seed: u64) -> Adapter<B> {
        Adapter::init_peft(
            self.layers.len(),
            &self.adapter_shapes(&config.target_modules),
            config,
            seed,
            &self.device,
        )
    }

    /// Makes every packed projection (embeddings, layers, experts, LM head) take
    /// `activations`: [`Activations::Q8`] for llama.cpp's speed and numerics,
    /// [`Activations::F32`] (what loading gives) for the reference numerics.
    pub fn set_activations(&mut self, activations: Activations) {
        self.for_each_proj(&mut |p| p.set_activations(activations));
    }

    /// Runs the layers' projections' base products in `dtype` ([`ComputeDtype`]; loading
    /// applies [`crate::load::LoadOptions::compute`]). The LM head and MoE routers stay f32:
    /// bitsandbytes leaves the LM head unquantized in the model's type, and a rounded router
    /// could pick other experts.
    ///
    /// # Errors
    /// A type the model's device has no arithmetic for (bf16 on a WGSL device).
    pub fn set_compute_dtype(&mut self, dtype: ComputeDtype) -> Result<(), String> {
        if !B::supports_float(dtype.dtype(), &self.device) {
            return Err(format!(
                "compute_dtype = \"{dtype}\": the device has no {dtype} arithmetic (f32{} works)",
                if dtype == ComputeDtype::Bf16 {
                    ", and f16 where the device has it,"
                } else {
                    ""
                }
            ));
        }
        for l in &mut self.layers {
            l.for_each_proj(&mut |p| p.set_compute_dtype(dtype.dtype()));
            if let Some(x) = &mut l.experts {
                x.router.set_compute_dtype(burn::tensor::FloatDType::F32);
            }
        }
        Ok(())
    }

    /// Puts every packed base weight that products read on the model's device
    /// ([`GraftBackend::place_packed`]: a GPU backend uploads it now, so loading pays for it,
    /// not the first request or step, and a device without room fails here). The embeddings
    /// are read by rows on the host and stay there (a tied LM head uploads their storage).
    ///
    /// # Errors
    /// The first weight the device could not take, with the device's message.
    pub fn place_weights(&mut self) -> Result<Placement, String> {
        let device = self.device.clone();
        let mut result = Ok(Placement::default());
        let mut place = |p: &mut Proj<B>| {
            if let (Ok(placed), BaseWeight::Packed(w)) = (&mut result, &p.base) {
                match B::place_packed(w, &device) {
                    Ok(now) => {
                        placed.packed += 1;
                        placed.uploaded += usize::from(now);
                    }
                    Err(e) => {
                        result = Err(format!(
                            "a {}×{} {} weight: {e}",
                            w.rows,
                            w.cols,
                            w.kind_name()
                        ))
                    }
                }
            }
        };
        place(&mut self.lm_head);
        for l in &mut self.layers {
            l.for_each_proj(&mut place);
        }
        result
    }

    /// `f` on every projection: embeddings, LM head, each layer's (experts' included).
    fn for_each_proj(&mut self, f: &mut dyn FnMut(&mut Proj<B>)) {
        f(&mut self.embed_tokens);
        f(&mut self.lm_head);
        for l in &mut self.layers {
            l.for_each_proj(f);
        }
    }

    /// Bytes held by the base weights (packed size for quantized projections).
    pub fn base_bytes(&self) -> usize {
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.n_bytes()
        };
        self.embed_tokens.n_bytes()
            + self.layers.iter().map(Block::n_bytes).sum::<usize>()
            + self.norm.n_bytes()
            + head
    }

    /// Runs new tokens of several sequences through the model, appending to their caches.
    ///
    /// # Shapes
    /// → `[n_seqs, vocab]` for [`Logits::Last`], `[total_new_tokens, vocab]` for [`Logits::All`],
    /// and for [`Logits::Mixed`] the flagged sequences' rows of `All` and the others' of `Last`,
    /// in sequence order
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
            Logits::Last => self.select_rows(hidden, seqs, &vec![false; seqs.len()]),
            Logits::Mixed(all) => self.select_rows(hidden, seqs, &all),
        };
        self.logits(hidden)
    }

    /// The rows of `hidden` for every token of the sequences flagged in `all` and the last
    /// token of the others.
    fn select_rows(
        &self,
        hidden: Tensor<B, 2>,
        seqs: &[SeqInput<'_, B>],
        all: &[bool],
    ) -> Tensor<B, 2> {
        let mut rows = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for (i, s) in seqs.iter().enumerate() {
            let end = start + s.tokens.len();
            if all.get(i).copied().unwrap_or(false) {
                rows.extend(start as i32..end as i32);
            } else {
                rows.push(end as i32 - 1);
            }
            start = end;
        }
        let n = rows.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &self.device);
        hidden.select(0, idx)
    }

    /// Logits of final hidden states: the LM head, then the family's soft-cap if it has one.
    /// Training and generation both go through here.
    ///
    /// # Shapes
    /// `hidden: [n, hidden]` → `[n, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        let logits = self.lm_head.forward(hidden, &[]);
        match self.config.final_softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    /// `log softmax(logits(hidden))[t]` for each row and its target token: what a loss on
    /// [`Model::logits`] needs, without the `[n, vocab]` logits ([`GraftBackend::token_logps`]).
    ///
    /// # Shapes
    /// `hidden: [n, hidden]`, `targets: [n, 1]` → `[n]`
    pub fn token_logps(&self, hidden: Tensor<B, 2>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        B::token_logps(hidden, &self.lm_head, self.config.final_softcap, targets)
    }

    /// Hidden states after the final norm, `[total_new_tokens, hidden]`.
    pub fn final_hidden(&self, seqs: &mut [SeqInput<'_, B>]) -> Tensor<B, 2> {
        on_pool(|| self.final_hidden_on_pool(seqs))
    }

    /// The experts each sparse layer chooses for each of `tokens` (run as one fresh
    /// sequence): per sparse layer in order, `top_k` expert ids per token by descending
    /// weight. Empty for a dense model.
    pub fn expert_choices(&self, tokens: &[u32]) -> Vec<moe::Routes> {
        let mut routes = Vec::new();
        on_pool(|| {
            self.hidden_traced(
                &mut [SeqInput {
                    tokens,
                    cache: None,
                    adapter: None,
                }],
                Some(&mut routes),
            )
        });
        routes
    }

    fn final_hidden_on_pool(&self, seqs: &mut [SeqInput<'_, B>]) -> Tensor<B, 2> {
        self.hidden_traced(seqs, None)
    }

    fn hidden_traced(
        &self,
        seqs: &mut [SeqInput<'_, B>],
        mut routes: Option<&mut Vec<moe::Routes>>,
    ) -> Tensor<B, 2> {
        let pass = self.pass(seqs);
        let adapters: Vec<Option<&Adapter<B>>> = seqs.iter().map(|s| s.adapter).collect();
        let mut x = self.embed(seqs);
        let mut attn_seqs = self.attn_seqs(&pass, seqs);
        for li in 0..self.layers.len() {
            x = self.layer(
                li,
                x,
                &pass,
                &mut attn_seqs,
                &adapters,
                routes.as_deref_mut(),
            );
        }
        drop(attn_seqs);
        for s in seqs.iter_mut() {
            if let Some(cache) = s.cache.as_deref_mut() {
                cache.len += s.tokens.len();
            }
        }
        self.norm.forward(x)
    }

    /// What every layer of one pass over `seqs` shares: each sequence's rows and cached length,
    /// and the rope tables.
    fn pass(&self, seqs: &[SeqInput<'_, B>]) -> Pass<B> {
        assert!(
            seqs.iter().all(|s| !s.tokens.is_empty()),
            "every sequence needs a new token"
        );
        let c = &self.config;
        let mut spans = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for s in seqs {
            let past = s.cache.as_ref().map_or(0, |c| c.len);
            spans.push((start..start + s.tokens.len(), past));
            start += s.tokens.len();
        }
        let lens: Vec<(usize, usize)> = spans.iter().map(|(s, past)| (*past, s.len())).collect();
        let tables = self
            .ropes
            .iter()
            .map(|r| {
                (
                    r.tables::<B>(&lens, c.num_heads, &self.device),
                    r.tables::<B>(&lens, c.num_kv_heads, &self.device),
                )
            })
            .collect();
        Pass { spans, tables }
    }

    /// The embedded new tokens of `seqs`, `[total_new_tokens, hidden]`.
    fn embed(&self, seqs: &[SeqInput<'_, B>]) -> Tensor<B, 2> {
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let x = self.embed_tokens.rows(&tokens, &self.device);
        match self.config.embed_scale {
            Some(s) => x.mul_scalar(s),
            None => x,
        }
    }

    /// Each sequence's attention view: its rows, its cache, the first key each window sees.
    fn attn_seqs<'s>(
        &self,
        pass: &Pass<B>,
        seqs: &'s mut [SeqInput<'_, B>],
    ) -> Vec<AttnSeq<'s, B>> {
        seqs.iter_mut()
            .zip(&pass.spans)
            .map(|(s, (span, past))| {
                let mut a = AttnSeq {
                    span: span.clone(),
                    past: *past,
                    cache: s.cache.as_deref_mut(),
                    starts: Vec::new(),
                };
                a.build_starts(&self.windows);
                a
            })
            .collect()
    }

    /// Decoder layer `li` on `x`, the rows of sequence `i` with `adapters[i]`.
    fn layer(
        &self,
        li: usize,
        x: Tensor<B, 2>,
        pass: &Pass<B>,
        attn_seqs: &mut [AttnSeq<'_, B>],
        adapters: &[Option<&Adapter<B>>],
        routes: Option<&mut Vec<moe::Routes>>,
    ) -> Tensor<B, 2> {
        let ri = self.layer_rope[li];
        let ctx = LayerCtx {
            config: &self.config,
            layer: li,
            rope: &self.ropes[ri],
            q_tables: &pass.tables[ri].0,
            k_tables: &pass.tables[ri].1,
            seqs: attn_seqs,
            routes,
        };
        let runs = |t: TargetModule| row_runs(&pass.spans, adapters, li, t);
        self.layers[li].forward(x, ctx, &runs)
    }
}

/// What every layer of one forward pass shares ([`Model::pass`]).
struct Pass<B: GraftBackend> {
    /// Each sequence's rows in the batch, and the tokens already in its cache.
    spans: Vec<(Range<usize>, usize)>,
    /// Per distinct rope: `(cos, sin)` tables for the queries and for the keys.
    #[allow(clippy::type_complexity)]
    tables: Vec<((Tensor<B, 2>, Tensor<B, 2>), (Tensor<B, 2>, Tensor<B, 2>))>,
}

/// The parts joined along `dim` (the one part as it is: no copy).
pub(crate) fn joined<B: Backend, const D: usize>(
    mut parts: Vec<Tensor<B, D>>,
    dim: usize,
) -> Tensor<B, D> {
    if parts.len() == 1 {
        parts.pop().unwrap_or_else(|| unreachable!())
    } else {
        Tensor::cat(parts, dim)
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
) -> Runs<'a, B> {
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
