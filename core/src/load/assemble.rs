//! Builds a [`Model`] from any checkpoint format: which tensors a layer has and their shapes
//! follow from the [`ModelConfig`] alone, written once here; each format only maps a
//! [`Role`] to its own tensor name and reads it ([`WeightSource`]).

use crate::adapters::lora::TargetModule;
use crate::backend::GraftBackend;
use crate::model::moe::{Expert, Experts};
use crate::model::proj::Proj;
use crate::model::{Block, Model, ModelConfig, NormSlot, QkNorm, RmsNorm, Routing};
use burn::prelude::Tensor;

use super::LoadError;

/// A base tensor of the model, by what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Embed,
    LmHead,
    FinalNorm,
    Proj(usize, TargetModule),
    Norm(usize, NormSlot),
    QNorm(usize),
    KNorm(usize),
    /// A sparse layer's router, `[experts, hidden]`.
    Router(usize),
    /// Expert `e`'s gate, up or down projection (`TargetModule::Gate`/`Up`/`Down`) in a
    /// sparse layer.
    Expert(usize, usize, TargetModule),
}

impl Role {
    /// The q/k/v biases the config promises (`attention_bias`, Qwen2's default): a file without
    /// them is refused, naming the tensor, instead of running without.
    pub(crate) fn needs_bias(self, c: &ModelConfig) -> bool {
        c.attention_bias
            && matches!(
                self,
                Role::Proj(
                    _,
                    TargetModule::Q | TargetModule::K | TargetModule::V | TargetModule::Qkv
                )
            )
    }
}

/// A checkpoint format's access to its tensors.
pub(crate) trait WeightSource<B: GraftBackend> {
    /// A `[rows, cols]` projection with its bias if the file has one; `quantize` says whether
    /// the load options' NF4 applies (not to embeddings and the LM head).
    fn proj(
        &self,
        role: Role,
        rows: usize,
        cols: usize,
        quantize: bool,
    ) -> Result<Proj<B>, LoadError>;

    /// An RMSNorm weight of `len` values, as the multiplier the model applies.
    fn norm(&self, role: Role, len: usize) -> Result<RmsNorm<B>, LoadError>;

    /// A sparse layer's per-expert router bias (DeepSeek-V3's `e_score_correction_bias`).
    fn score_bias(&self, layer: usize, len: usize) -> Result<Tensor<B, 1>, LoadError>;

    /// A layer's attention sinks, one per head (GPT-OSS).
    fn sinks(&self, layer: usize, heads: usize) -> Result<Tensor<B, 1>, LoadError>;

    /// Projection `t` (gate, up or down) of each of a sparse layer's `n` experts, each
    /// `[rows, cols]`: one tensor per expert unless the format stacks them.
    fn experts(
        &self,
        layer: usize,
        t: TargetModule,
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Proj<B>>, LoadError> {
        per_expert(self, layer, t, n, rows, cols)
    }
}

/// [`WeightSource::experts`] from one tensor per expert, as most checkpoints store them.
pub(crate) fn per_expert<B: GraftBackend>(
    src: &(impl WeightSource<B> + ?Sized),
    layer: usize,
    t: TargetModule,
    n: usize,
    rows: usize,
    cols: usize,
) -> Result<Vec<Proj<B>>, LoadError> {
    (0..n)
        .map(|e| src.proj(Role::Expert(layer, e, t), rows, cols, true))
        .collect()
}

/// Reads every tensor `config` implies from `src`.
///
/// # Errors
/// Whatever the source reports: a missing tensor, a wrong shape or type.
pub(crate) fn assemble<B: GraftBackend>(
    src: &impl WeightSource<B>,
    config: &ModelConfig,
    device: &B::Device,
) -> Result<Model<B>, LoadError> {
    let c = config;
    let embed = src.proj(Role::Embed, c.vocab_size, c.hidden_size, false)?;
    let (q_rows, kv_rows) = c.qkv_rows();
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let mut projs: [Option<Proj<B>>; TargetModule::COUNT] = Default::default();
        for t in c.layer_targets(i) {
            let (rows, cols) = c
                .proj_shape(i, t)
                .unwrap_or_else(|| unreachable!("targets() lists the layout's projections"));
            projs[t.index()] = Some(src.proj(Role::Proj(i, t), rows, cols, true)?);
        }
        let mut norms: [Option<RmsNorm<B>>; 4] = Default::default();
        for slot in NormSlot::ALL {
            if c.norm_placement.has(slot) {
                norms[slot.index()] = Some(src.norm(Role::Norm(i, slot), c.hidden_size)?);
            }
        }
        let (q_len, k_len) = match (c.qk_norm, &c.mla) {
            // Latent attention's norms: of the query bottleneck (if any) and of the latent.
            (_, Some(a)) => (a.q_lora_rank.unwrap_or(0), a.kv_lora_rank),
            (QkNorm::None, None) => (0, 0),
            (QkNorm::PerHead, None) => (c.head_dim, c.head_dim),
            (QkNorm::Full, None) => (q_rows, kv_rows),
        };
        let q_norm = match q_len {
            0 => None,
            n => Some(src.norm(Role::QNorm(i), n)?),
        };
        let k_norm = match k_len {
            0 => None,
            n => Some(src.norm(Role::KNorm(i), n)?),
        };
        let experts = match c.sparse_moe(i) {
            Some(m) => {
                let (h, ei) = (c.hidden_size, m.expert_intermediate);
                let part = |t, rows, cols| src.experts(i, t, m.num_experts, rows, cols);
                let gates = part(TargetModule::Gate, ei, h)?;
                let ups = part(TargetModule::Up, ei, h)?;
                let downs = part(TargetModule::Down, h, ei)?;
                Some(Experts {
                    router: src.proj(Role::Router(i), m.num_experts, h, false)?,
                    score_bias: match m.routing {
                        Routing::SigmoidGrouped { .. } => Some(src.score_bias(i, m.num_experts)?),
                        Routing::Softmax => None,
                    },
                    experts: gates
                        .into_iter()
                        .zip(ups)
                        .zip(downs)
                        .map(|((gate, up), down)| Expert { gate, up, down })
                        .collect(),
                })
            }
            None => None,
        };
        let sinks = match c.family.has_sinks() {
            true => Some(src.sinks(i, c.num_heads)?),
            false => None,
        };
        layers.push(Block {
            projs,
            norms,
            q_norm,
            k_norm,
            experts,
            sinks,
        });
    }
    let lm_head = if c.tie_word_embeddings {
        embed.clone()
    } else {
        src.proj(Role::LmHead, c.vocab_size, c.hidden_size, false)?
    };
    let norm = src.norm(Role::FinalNorm, c.hidden_size)?;
    Ok(Model::new(
        c.clone(),
        embed,
        layers,
        norm,
        lm_head,
        device.clone(),
    ))
}
