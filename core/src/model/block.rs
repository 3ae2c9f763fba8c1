//! One decoder layer, assembled from what [`ModelConfig`] says: up to four norm slots around
//! attention and MLP (pre, sandwich or post placement), split or fused projections, optional
//! q/k norm, and a SiLU or GELU-tanh gated MLP or routed experts ([`super::moe`]), plus on
//! such a sparse layer an optional shared expert (the layer's own gate/up/down projections,
//! optionally scaled by a sigmoid gate). Matches transformers' `*DecoderLayer`s.

use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu};

use super::attention::{attend, AttnSeq};
use super::config::{Activation, ModelConfig, NormSlot, QkNorm};
use super::moe::{Experts, Routes};
use super::norm::RmsNorm;
use super::rope::Rope;
use crate::adapters::lora::TargetModule;
use crate::adapters::lora::{LoraWeights, RowAdapters};
use crate::backend::GraftBackend;
use crate::model::proj::Proj;

/// Row runs of a batch and the adapter weights that apply to each, for one projection.
pub(crate) type Runs<'r, B> = Vec<(std::ops::Range<usize>, Option<&'r LoraWeights<B>>)>;

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct Block<B: GraftBackend> {
    /// Indexed by [`TargetModule::index`]; only the projections of the layout exist (`q_proj`…
    /// or Phi-3's `qkv_proj`, `gate_up_proj`).
    pub projs: [Option<Proj<B>>; TargetModule::COUNT],
    /// Indexed by [`NormSlot::index`].
    pub norms: [Option<RmsNorm<B>>; 4],
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    /// Routed experts in place of the MLP's projections (a sparse layer of an MoE model).
    pub experts: Option<Experts<B>>,
    /// `[heads]`: each head's attention sink, a logit that joins every softmax (GPT-OSS).
    pub sinks: Option<Tensor<B, 1>>,
}

/// What a layer's forward needs besides its input.
pub(crate) struct LayerCtx<'a, 'b, B: GraftBackend> {
    pub config: &'a ModelConfig,
    pub layer: usize,
    pub rope: &'a Rope,
    /// `(cos, sin)` for queries and for keys.
    pub q_tables: &'a (Tensor<B, 2>, Tensor<B, 2>),
    pub k_tables: &'a (Tensor<B, 2>, Tensor<B, 2>),
    pub seqs: &'a mut [AttnSeq<'b, B>],
    /// Where a sparse layer records its tokens' expert choices, when asked.
    pub routes: Option<&'a mut Vec<Routes>>,
}

impl<B: GraftBackend> Block<B> {
    /// The projection for `t`, if this layer has it.
    pub fn proj(&self, t: TargetModule) -> Option<&Proj<B>> {
        self.projs[t.index()].as_ref()
    }

    /// `(out, in, experts)` of an adapter on `t` in this layer (`experts` is 1 but for the
    /// stacked per-expert targets), or `None` when the layer has no `t`.
    pub fn adapter_shape(&self, t: TargetModule) -> Option<(usize, usize, usize)> {
        if let Some(p) = self.proj(t) {
            return Some((p.out_features, p.in_features, 1));
        }
        let x = self.experts.as_ref()?;
        let first = x.experts.first()?;
        let n = x.experts.len();
        match t {
            TargetModule::Router => Some((x.router.out_features, x.router.in_features, 1)),
            TargetModule::ExpertsGateUp => {
                Some((2 * first.gate.out_features, first.gate.in_features, n))
            }
            TargetModule::ExpertsDown => Some((first.down.out_features, first.down.in_features, n)),
            _ => None,
        }
    }

    /// The projections this layer has, in [`TargetModule`] order.
    pub fn targets(&self) -> impl Iterator<Item = (TargetModule, &Proj<B>)> {
        TargetModule::ALL
            .into_iter()
            .filter_map(|t| self.proj(t).map(|p| (t, p)))
    }

    pub fn norm(&self, slot: NormSlot) -> Option<&RmsNorm<B>> {
        self.norms[slot.index()].as_ref()
    }

    fn normed(&self, slot: NormSlot, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self.norm(slot) {
            Some(n) => n.forward(x),
            None => x,
        }
    }

    /// Bytes held by the base weights and norms.
    pub fn n_bytes(&self) -> usize {
        self.projs
            .iter()
            .flatten()
            .map(Proj::n_bytes)
            .sum::<usize>()
            + self
                .norms
                .iter()
                .chain([&self.q_norm, &self.k_norm])
                .flatten()
                .map(RmsNorm::n_bytes)
                .sum::<usize>()
            + self.experts.as_ref().map_or(0, Experts::n_bytes)
            + self.sinks.as_ref().map_or(0, |s| s.dims()[0] * 4)
    }

    /// `f` on each of the layer's projections, experts' included.
    pub fn for_each_proj(&mut self, f: &mut dyn FnMut(&mut Proj<B>)) {
        for p in self.projs.iter_mut().flatten() {
            f(p);
        }
        if let Some(x) = &mut self.experts {
            x.for_each_proj(f);
        }
    }

    /// `proj(t)·x` with each row run's adapter; a layout without `t` is a loader bug.
    fn project(&self, t: TargetModule, x: Tensor<B, 2>, runs: &RowAdapters<'_, B>) -> Tensor<B, 2> {
        self.proj(t)
            .unwrap_or_else(|| unreachable!("the loader gives every layer its layout's {t}"))
            .forward(x, runs)
    }

    /// The residual stream after this layer.
    ///
    /// # Shapes
    /// `x: [n, hidden]` → `[n, hidden]`
    pub(crate) fn forward<'r>(
        &self,
        x: Tensor<B, 2>,
        mut ctx: LayerCtx<'_, '_, B>,
        runs: &dyn Fn(TargetModule) -> Runs<'r, B>,
    ) -> Tensor<B, 2> {
        let c = ctx.config;
        let h = self.normed(NormSlot::AttnIn, x.clone());
        let attn = match &c.mla {
            Some(a) => super::mla::attention(self, a, h, &mut ctx, runs),
            None => self.attention(h, &mut ctx, runs),
        };
        let attn = self.project(TargetModule::O, attn, &runs(TargetModule::O));
        let x = x + self.normed(NormSlot::AttnOut, attn);
        let h = self.normed(NormSlot::MlpIn, x.clone());
        if let (Some(experts), Some(moe)) = (&self.experts, c.sparse_moe(ctx.layer)) {
            let lora = super::moe::ExpertRuns {
                router: runs(TargetModule::Router),
                gate_up: runs(TargetModule::ExpertsGateUp),
                down: runs(TargetModule::ExpertsDown),
            };
            let (mut mlp, routes) = experts.forward(h.clone(), moe, c.activation, &lora);
            if let Some(r) = ctx.routes {
                r.push(routes);
            }
            if let Some(shared) = &moe.shared {
                let mut y = self.mlp(h.clone(), c, runs);
                if shared.gated {
                    let t = TargetModule::SharedExpertGate;
                    y = y * sigmoid(self.project(t, h, &runs(t)));
                }
                mlp = mlp + y;
            }
            return x + self.normed(NormSlot::MlpOut, mlp);
        }
        let mlp = self.mlp(h, c, runs);
        x + self.normed(NormSlot::MlpOut, mlp)
    }

    /// The gated MLP of this layer's own projections (a sparse layer's shared expert).
    ///
    /// # Shapes
    /// `h: [n, hidden]` → `[n, hidden]`
    fn mlp<'r>(
        &self,
        h: Tensor<B, 2>,
        c: &ModelConfig,
        runs: &dyn Fn(TargetModule) -> Runs<'r, B>,
    ) -> Tensor<B, 2> {
        let n = h.dims()[0];
        let (gate, up) = if c.fused_projections {
            let gu = self.project(TargetModule::GateUp, h, &runs(TargetModule::GateUp));
            let i = gu.dims()[1] / 2;
            (gu.clone().slice([0..n, 0..i]), gu.slice([0..n, i..2 * i]))
        } else {
            (
                self.project(TargetModule::Gate, h.clone(), &runs(TargetModule::Gate)),
                self.project(TargetModule::Up, h, &runs(TargetModule::Up)),
            )
        };
        let act = match c.activation {
            Activation::Silu => silu(gate),
            Activation::GeluTanh => gelu_tanh(gate),
        };
        self.project(TargetModule::Down, act * up, &runs(TargetModule::Down))
    }

    /// Grouped-query attention of the new rows, before `o_proj`.
    ///
    /// # Shapes
    /// `h: [n, hidden]` (normed) → `[n, heads · head_dim]`
    fn attention<'r>(
        &self,
        h: Tensor<B, 2>,
        ctx: &mut LayerCtx<'_, '_, B>,
        runs: &dyn Fn(TargetModule) -> Runs<'r, B>,
    ) -> Tensor<B, 2> {
        let c = ctx.config;
        let n = h.dims()[0];
        let (qr, kvr) = c.qkv_rows();
        let (q, k, v) = if c.fused_projections {
            let qkv = self.project(TargetModule::Qkv, h, &runs(TargetModule::Qkv));
            (
                qkv.clone().slice([0..n, 0..qr]),
                qkv.clone().slice([0..n, qr..qr + kvr]),
                qkv.slice([0..n, qr + kvr..qr + 2 * kvr]),
            )
        } else {
            (
                self.project(TargetModule::Q, h.clone(), &runs(TargetModule::Q)),
                self.project(TargetModule::K, h.clone(), &runs(TargetModule::K)),
                self.project(TargetModule::V, h, &runs(TargetModule::V)),
            )
        };
        let (q, k) = match c.qk_norm {
            QkNorm::Full => (
                self.qk_normed(&self.q_norm, q),
                self.qk_normed(&self.k_norm, k),
            ),
            _ => (q, k),
        };
        let hd = c.head_dim;
        let (q, k) = match c.qk_norm {
            QkNorm::PerHead => (
                self.qk_normed(&self.q_norm, q.reshape([n * c.num_heads, hd])),
                self.qk_normed(&self.k_norm, k.reshape([n * c.num_kv_heads, hd])),
            ),
            _ => (q, k),
        };
        let q = ctx.rope.apply(
            q.reshape([n, c.num_heads, hd]),
            &ctx.q_tables.0,
            &ctx.q_tables.1,
        );
        let k = ctx.rope.apply(
            k.reshape([n, c.num_kv_heads, hd]),
            &ctx.k_tables.0,
            &ctx.k_tables.1,
        );
        let v = v.reshape([n, c.num_kv_heads, hd]);
        attend(c, ctx.layer, &q, &k, &v, self.sinks.as_ref(), ctx.seqs)
    }

    fn qk_normed(&self, norm: &Option<RmsNorm<B>>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match norm {
            Some(n) => n.forward(x),
            None => unreachable!("the loader gives q/k-norm layouts both norms"),
        }
    }
}

/// GELU with the tanh approximation, as PyTorch's `gelu(approximate="tanh")`:
/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub(crate) fn gelu_tanh<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar(k);
    x.clone().mul_scalar(0.5) * (inner.tanh() + 1.0)
}
