//! The validated description of a decoder that the model is assembled from: sizes, and every
//! way the supported families differ, as data (norm placement, q/k norm, activation, fused
//! projections, per-layer attention window and rope, soft-caps, embedding scale). Built from a
//! checkpoint's `config.json` (`load::hf_config`) or GGUF metadata (`load::gguf`) with the help
//! of [`Family`]; the model itself never asks which family it is.

use super::family::Family;
use crate::adapters::lora::TargetModule;

/// A model description graft cannot run, naming the field (as `config.json` or the GGUF
/// metadata spells it) and its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfig(pub String);

impl From<String> for InvalidConfig {
    fn from(message: String) -> Self {
        InvalidConfig(message)
    }
}

impl From<&str> for InvalidConfig {
    fn from(message: &str) -> Self {
        InvalidConfig(message.into())
    }
}

/// Rotary-embedding frequency scaling (transformers' `rope_type`s).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1 "llama3" scaling (per-frequency interpolation).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    },
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Per-frequency divisors given explicitly (llama.cpp's `rope_freqs.weight`).
    Factors(Vec<f32>),
    /// Phi-3 "longrope": per-frequency divisors, `short` while a sequence fits in
    /// `original_max_position` tokens and `long` beyond, with cos/sin scaled by
    /// `attention_factor`.
    LongRope {
        short: Vec<f32>,
        long: Vec<f32>,
        original_max_position: usize,
        attention_factor: f32,
    },
    /// YaRN (Peng et al. 2023) as transformers' `_compute_yarn_parameters`.
    Yarn {
        factor: f32,
        original_max_position: usize,
        beta_fast: f32,
        beta_slow: f32,
        /// cos/sin multiplier (`0.1·ln(factor) + 1` unless given).
        attention_factor: f32,
        /// Round the correction range outward (transformers' `truncate`, default true).
        truncate: bool,
    },
}

impl RopeScaling {
    /// Longrope's default cos/sin multiplier for a context extended by `factor` over
    /// `original` positions (transformers' `_compute_longrope_parameters`, llama.cpp's
    /// converter): `√(1 + ln(factor) / ln(original))`, 1 without extension.
    pub fn longrope_attention_factor(factor: f64, original: usize) -> f32 {
        if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original as f64).ln()).sqrt() as f32
        }
    }

    /// YaRN's `get_mscale`: `0.1·m·ln(scale) + 1`, 1 without extension.
    pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    }
}

/// The rotary embedding of one attention layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base of the inverse frequencies (`rope_theta`).
    pub theta: f32,
    pub scaling: Option<RopeScaling>,
    /// Leading dimensions of each head that rotate (`head_dim · partial_rotary_factor`); the
    /// rest pass through.
    pub rotary_dim: usize,
}

/// The attention of one decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConfig {
    /// Sliding window: a query at position `p` sees keys at positions `> p − window`
    /// (transformers' and llama.cpp's convention); `None` for global attention.
    pub window: Option<usize>,
    pub rope: RopeConfig,
}

/// Where a decoder layer normalizes (which of the four norm slots it has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// Before attention and before the MLP (Llama).
    Pre,
    /// Before and after each of attention and MLP (Gemma 2/3).
    Sandwich,
    /// After attention and after the MLP, before the residual sum (OLMo 2).
    Post,
}

/// The norm slots of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NormSlot {
    AttnIn,
    AttnOut,
    MlpIn,
    MlpOut,
}

impl NormSlot {
    pub const ALL: [NormSlot; 4] = [
        NormSlot::AttnIn,
        NormSlot::AttnOut,
        NormSlot::MlpIn,
        NormSlot::MlpOut,
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

impl NormPlacement {
    /// The slots a layer with this placement has.
    pub fn has(self, slot: NormSlot) -> bool {
        match self {
            NormPlacement::Pre => matches!(slot, NormSlot::AttnIn | NormSlot::MlpIn),
            NormPlacement::Sandwich => true,
            NormPlacement::Post => matches!(slot, NormSlot::AttnOut | NormSlot::MlpOut),
        }
    }
}

/// RMSNorm of queries and keys before rope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` values, one weight shared by all heads (Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection output (OLMo 2).
    Full,
}

/// The gate activation of the MLP: `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
}

/// The routed experts that replace the MLP of a Mixture-of-Experts layer: a router scores
/// every expert for each token, the `top_k` best run, and their outputs are summed weighted by
/// the router's softmax probabilities (renormalized over the chosen ones when `norm_topk`).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts run per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Intermediate size of each expert (`moe_intermediate_size`).
    pub expert_intermediate: usize,
    /// Renormalize the chosen experts' weights to sum to 1 (`norm_topk_prob`; always in
    /// Mixtral).
    pub norm_topk: bool,
    /// Per layer: routed experts (`true`) or the dense MLP of `intermediate_size`.
    pub sparse: Vec<bool>,
    /// An MLP every token runs beside the routed experts (Qwen2-MoE's `shared_expert`).
    pub shared: Option<SharedExpert>,
    pub routing: Routing,
    /// The chosen experts' weights are multiplied by this (`routed_scaling_factor`), 1 but for
    /// DeepSeek-V3.
    pub weights_scale: f32,
    /// GPT-OSS's expert activation in place of the plain gated one.
    pub clamped_swiglu: Option<ClampedSwiglu>,
}

/// GPT-OSS's expert activation: `gate` clamped above at `limit`, `up` to `±limit`, then
/// `(up + 1) · gate · sigmoid(alpha · gate)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClampedSwiglu {
    pub alpha: f32,
    pub limit: f32,
}

/// The always-active expert of a sparse layer: a gated MLP of its own width whose output is
/// added to the routed experts' sum, scaled by `sigmoid(shared_expert_gate · x)` when `gated`
/// (Qwen2-MoE). Its projections are the layer's `gate_proj`/`up_proj`/`down_proj` targets.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpert {
    /// `shared_expert_intermediate_size`.
    pub intermediate: usize,
    /// A `[1, hidden]` gate scales the output per token (`shared_expert_gate`).
    pub gated: bool,
}

/// How a sparse layer's router scores experts and picks a token's `top_k`.
#[derive(Debug, Clone, PartialEq)]
pub enum Routing {
    /// Softmax over all experts; the `top_k` largest probabilities (Mixtral, Qwen-MoE, OLMoE).
    Softmax,
    /// DeepSeek-V3 (`noaux_tc`): sigmoid scores; the choice adds the router's per-expert bias
    /// (`e_score_correction_bias`) and keeps to the `topk_groups` of `groups` equal groups of
    /// experts whose two best biased scores sum highest. The weights are the unbiased scores.
    SigmoidGrouped { groups: usize, topk_groups: usize },
}

/// Multi-head Latent Attention (DeepSeek-V2/V3): queries through an optional low-rank
/// bottleneck (`q_a_proj`, its norm, `q_b_proj`); keys and values from one latent per token
/// (`kv_a_proj_with_mqa` → `kv_lora_rank` values, normed, plus a `qk_rope_dim` rotary key
/// shared by all heads), expanded per head by `kv_b_proj`. The cache holds the latent and the
/// rotary key, not the expanded keys and values. Each head's query/key is `qk_nope_dim`
/// unrotated dimensions then `qk_rope_dim` rotated ones (the config's `head_dim`).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_dim: usize,
    pub qk_rope_dim: usize,
    pub v_head_dim: usize,
    /// The rotary dimensions pair up adjacent (`rope_interleave`, llama.cpp's deepseek2), not
    /// `i` with `i + d/2`.
    pub rope_interleave: bool,
}

impl MlaConfig {
    /// Query/key width of a head: unrotated plus rotary dimensions.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_dim + self.qk_rope_dim
    }
}

/// Validated hyper-parameters of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// One entry per layer.
    pub layers: Vec<LayerConfig>,
    /// Multiplies `q·k` before the softmax: `1/√head_dim`, or `1/√query_pre_attn_scalar`.
    pub attention_scale: f32,
    /// `cap·tanh(s/cap)` on attention scores (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// `cap·tanh(l/cap)` on the output logits (Gemma 2).
    pub final_softcap: Option<f32>,
    /// Embeddings are multiplied by this (`√hidden` for Gemma).
    pub embed_scale: Option<f32>,
    pub norm_placement: NormPlacement,
    pub qk_norm: QkNorm,
    pub activation: Activation,
    /// q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
    /// Routed experts in place of the MLP (on the layers it marks sparse).
    pub moe: Option<MoeConfig>,
    /// Multi-head Latent Attention in place of q/k/v projections (DeepSeek); `head_dim` is
    /// then its rotary width and `num_kv_heads` 1 (the latent every head reads).
    pub mla: Option<MlaConfig>,
}

impl ModelConfig {
    /// llama.cpp's architecture name (`general.architecture` of GGUF files of this model and of
    /// its GGUF-LoRA adapters).
    pub fn architecture(&self) -> &'static str {
        self.family.gguf_arch()
    }

    /// Checks the relations the model relies on.
    ///
    /// # Errors
    /// A message naming the offending field and value.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(InvalidConfig(format!("{name} must be positive, got 0")));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(InvalidConfig(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !(self.rms_norm_eps > 0.0) || !self.rms_norm_eps.is_finite() {
            return Err(InvalidConfig(format!(
                "rms_norm_eps must be positive, got {}",
                self.rms_norm_eps
            )));
        }
        if self.family.gguf_permutes_qk() && self.head_dim % 2 != 0 {
            return Err(InvalidConfig(format!(
                "head_dim {} must be even for {} (rotary pairs)",
                self.head_dim, self.family
            )));
        }
        if self.layers.len() != self.num_layers {
            return Err(InvalidConfig(format!(
                "{} layer descriptions (layer_types) for num_hidden_layers {}",
                self.layers.len(),
                self.num_layers
            )));
        }
        for (cap, v) in [
            ("attn_logit_softcapping", self.attn_softcap),
            ("final_logit_softcapping", self.final_softcap),
        ] {
            if let Some(v) = v {
                if !(v > 0.0) || !v.is_finite() {
                    return Err(InvalidConfig(format!("{cap} must be positive, got {v}")));
                }
            }
        }
        if !(self.attention_scale > 0.0) || !self.attention_scale.is_finite() {
            return Err(InvalidConfig(format!(
                "the attention scale must be positive, got {} (query_pre_attn_scalar)",
                self.attention_scale
            )));
        }
        if let Some(m) = &self.moe {
            if m.num_experts == 0 || m.expert_intermediate == 0 {
                return Err(InvalidConfig(format!(
                    "num_experts ({}) and moe_intermediate_size ({}) must be positive",
                    m.num_experts, m.expert_intermediate
                )));
            }
            if m.top_k == 0 || m.top_k > m.num_experts {
                return Err(InvalidConfig(format!(
                    "num_experts_per_tok must be in 1..={}, got {}",
                    m.num_experts, m.top_k
                )));
            }
            if let Routing::SigmoidGrouped {
                groups,
                topk_groups,
            } = m.routing
            {
                if groups == 0 || m.num_experts % groups != 0 || topk_groups == 0 {
                    return Err(InvalidConfig(format!(
                        "n_group {groups} must divide the {} experts, and topk_group ({topk_groups}) be positive",
                        m.num_experts
                    )));
                }
                if topk_groups > groups || topk_groups * (m.num_experts / groups) < m.top_k {
                    return Err(InvalidConfig(format!(
                        "topk_group {topk_groups} of n_group {groups} leaves fewer than \
                         num_experts_per_tok {} experts to choose from",
                        m.top_k
                    )));
                }
            }
            if !(m.weights_scale > 0.0) || !m.weights_scale.is_finite() {
                return Err(InvalidConfig(format!(
                    "routed_scaling_factor must be positive, got {}",
                    m.weights_scale
                )));
            }
            if m.shared.as_ref().is_some_and(|s| s.intermediate == 0) {
                return Err("shared_expert_intermediate_size must be positive, got 0".into());
            }
            if m.sparse.len() != self.num_layers {
                return Err(InvalidConfig(format!(
                    "{} layers marked sparse or dense for num_hidden_layers {}",
                    m.sparse.len(),
                    self.num_layers
                )));
            }
        }
        if let Some(a) = &self.mla {
            let dims = [
                ("kv_lora_rank", a.kv_lora_rank),
                ("qk_nope_head_dim", a.qk_nope_dim),
                ("qk_rope_head_dim", a.qk_rope_dim),
                ("v_head_dim", a.v_head_dim),
                ("q_lora_rank", a.q_lora_rank.unwrap_or(1)),
            ];
            for (name, v) in dims {
                if v == 0 {
                    return Err(InvalidConfig(format!("{name} must be positive, got 0")));
                }
            }
            if self.head_dim != a.qk_rope_dim || self.num_kv_heads != 1 {
                return Err(InvalidConfig(format!(
                    "multi-head latent attention reads head_dim {} as qk_rope_head_dim {} and \
                     one latent key head, not {}",
                    self.head_dim, a.qk_rope_dim, self.num_kv_heads
                )));
            }
            if self.fused_projections || self.attention_bias || self.qk_norm != QkNorm::None {
                return Err(
                    "multi-head latent attention has no fused projections, biases or \
                            q/k norm"
                        .into(),
                );
            }
        }
        for (i, l) in self.layers.iter().enumerate() {
            if l.window == Some(0) {
                return Err(InvalidConfig(format!(
                    "layer {i}: sliding_window must be positive, got 0"
                )));
            }
            validate_rope(&l.rope, self.head_dim).map_err(|e| format!("layer {i}: {e}"))?;
        }
        Ok(())
    }

    /// Output rows of the q, k and v projections.
    pub fn qkv_rows(&self) -> (usize, usize) {
        (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
    }

    /// Parameter count of the base model.
    pub fn n_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = self.qkv_rows();
        let attn = match &self.mla {
            Some(_) => self
                .targets()
                .iter()
                .filter_map(|&t| {
                    self.proj_shape(0, t)
                        .filter(|_| t.hf_parent() == "self_attn")
                })
                .map(|(o, i)| o * i)
                .sum::<usize>(),
            None => h * q + 2 * h * kv + q * h,
        };
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let norms = NormSlot::ALL
            .iter()
            .filter(|s| self.norm_placement.has(**s))
            .count()
            * h;
        let qk_norm = match self.qk_norm {
            QkNorm::None => self
                .mla
                .as_ref()
                .map_or(0, |a| a.kv_lora_rank + a.q_lora_rank.unwrap_or(0)),
            QkNorm::PerHead => 2 * self.head_dim,
            QkNorm::Full => q + kv,
        };
        let layer = attn + bias + norms + qk_norm;
        let mlps: usize = (0..self.num_layers)
            .map(|l| match self.sparse_moe(l) {
                Some(m) => {
                    let shared = m
                        .shared
                        .as_ref()
                        .map_or(0, |s| 3 * h * s.intermediate + usize::from(s.gated) * h);
                    let bias = match m.routing {
                        Routing::SigmoidGrouped { .. } => m.num_experts,
                        Routing::Softmax => 0,
                    };
                    m.num_experts * (3 * h * m.expert_intermediate + h) + shared + bias
                }
                None => 3 * h * i,
            })
            .sum();
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + mlps + h + head
    }

    /// The routed experts of layer `layer`, if it has them (else it has the dense MLP).
    pub fn sparse_moe(&self, layer: usize) -> Option<&MoeConfig> {
        self.moe
            .as_ref()
            .filter(|m| m.sparse.get(layer).copied().unwrap_or(false))
    }

    /// The shared expert of layer `layer`, if it is a sparse layer with one: its
    /// `gate_proj`/`up_proj`/`down_proj` are then the shared expert's.
    pub fn shared_expert(&self, layer: usize) -> Option<&SharedExpert> {
        self.sparse_moe(layer)?.shared.as_ref()
    }
}

fn validate_rope(r: &RopeConfig, head_dim: usize) -> Result<(), InvalidConfig> {
    if !(r.theta > 0.0) {
        return Err(InvalidConfig(format!(
            "rope_theta must be positive, got {}",
            r.theta
        )));
    }
    if r.rotary_dim == 0 || r.rotary_dim % 2 != 0 || r.rotary_dim > head_dim {
        return Err(InvalidConfig(format!(
            "the rotary dimension {} must be even and in 2..={head_dim} (head_dim · \
             partial_rotary_factor)",
            r.rotary_dim
        )));
    }
    let half = r.rotary_dim / 2;
    let check = |what: &str, f: &[f32]| {
        if f.len() != half {
            Err(InvalidConfig(format!(
                "rope {what} has {} entries, expected rotary_dim/2 = {half}",
                f.len()
            )))
        } else if let Some(v) = f.iter().find(|v| !(**v > 0.0) || !v.is_finite()) {
            Err(InvalidConfig(format!(
                "rope {what} must be positive, found {v}"
            )))
        } else {
            Ok(())
        }
    };
    let positive_factor = |a: f32| {
        if a > 0.0 && a.is_finite() {
            Ok(())
        } else {
            Err(InvalidConfig(format!(
                "rope_scaling.attention_factor must be positive, got {a}"
            )))
        }
    };
    match &r.scaling {
        Some(RopeScaling::Factors(f)) => check("frequency factors", f),
        Some(RopeScaling::LongRope {
            short,
            long,
            attention_factor,
            ..
        }) => {
            check("short_factor", short)?;
            check("long_factor", long)?;
            positive_factor(*attention_factor)
        }
        Some(RopeScaling::Linear { factor })
        | Some(RopeScaling::Llama3 { factor, .. })
        | Some(RopeScaling::Yarn { factor, .. })
            if !(*factor > 0.0) =>
        {
            Err(InvalidConfig(format!(
                "rope_scaling.factor must be positive, got {factor}"
            )))
        }
        Some(RopeScaling::Llama3 {
            low_freq_factor,
            high_freq_factor,
            ..
        }) if !(high_freq_factor > low_freq_factor) => Err(InvalidConfig(format!(
            "rope_scaling.high_freq_factor {high_freq_factor} must exceed low_freq_factor \
             {low_freq_factor}"
        ))),
        Some(RopeScaling::Yarn {
            attention_factor, ..
        }) => positive_factor(*attention_factor),
        _ => Ok(()),
    }
}

impl ModelConfig {
    /// The projections of every layer: Phi-3's fused layout or the split one.
    pub fn targets(&self) -> &'static [TargetModule] {
        if let Some(a) = &self.mla {
            return match a.q_lora_rank {
                Some(_) => &[
                    TargetModule::QA,
                    TargetModule::QB,
                    TargetModule::KvA,
                    TargetModule::KvB,
                    TargetModule::O,
                    TargetModule::Gate,
                    TargetModule::Up,
                    TargetModule::Down,
                ],
                None => &[
                    TargetModule::Q,
                    TargetModule::KvA,
                    TargetModule::KvB,
                    TargetModule::O,
                    TargetModule::Gate,
                    TargetModule::Up,
                    TargetModule::Down,
                ],
            };
        }
        if self.fused_projections {
            &[
                TargetModule::Qkv,
                TargetModule::O,
                TargetModule::GateUp,
                TargetModule::Down,
            ]
        } else {
            &[
                TargetModule::Q,
                TargetModule::K,
                TargetModule::V,
                TargetModule::O,
                TargetModule::Gate,
                TargetModule::Up,
                TargetModule::Down,
            ]
        }
    }

    /// Everything an adapter can target on this model: [`Self::targets`], and on an MoE model
    /// the router and the routed experts.
    pub fn adapter_targets(&self) -> Vec<TargetModule> {
        let mut out = self.targets().to_vec();
        if let Some(m) = &self.moe {
            if m.shared.as_ref().is_some_and(|s| s.gated) {
                out.push(TargetModule::SharedExpertGate);
            }
            out.extend([
                TargetModule::Router,
                TargetModule::ExpertsGateUp,
                TargetModule::ExpertsDown,
            ]);
        }
        out
    }

    /// The projections of layer `layer`: [`Self::targets`], without the MLP's on a layer of
    /// routed experts (those are per expert, see [`MoeConfig`]) unless a shared expert has
    /// them, and with the shared expert's gate when it has one.
    pub fn layer_targets(&self, layer: usize) -> Vec<TargetModule> {
        let all = self.targets();
        let Some(m) = self.sparse_moe(layer) else {
            return all.to_vec();
        };
        let mlp = if self.fused_projections { 2 } else { 3 };
        let mut out = all[..all.len() - mlp].to_vec();
        if let Some(s) = &m.shared {
            out.extend_from_slice(&all[all.len() - mlp..]);
            if s.gated {
                out.push(TargetModule::SharedExpertGate);
            }
        }
        out
    }

    /// `[out, in]` of projection `t` in layer `layer` (on a sparse layer the MLP's are the
    /// shared expert's), or `None` when the layer has no `t`.
    pub fn proj_shape(&self, layer: usize, t: TargetModule) -> Option<(usize, usize)> {
        if !self.layer_targets(layer).contains(&t) {
            return None;
        }
        let h = self.hidden_size;
        let i = self
            .shared_expert(layer)
            .map_or(self.intermediate_size, |s| s.intermediate);
        let (q, kv) = self.qkv_rows();
        if let Some(a) = &self.mla {
            let (heads, r) = (self.num_heads, a.kv_lora_rank);
            match t {
                TargetModule::QA => return Some((a.q_lora_rank?, h)),
                TargetModule::QB => return Some((heads * a.qk_head_dim(), a.q_lora_rank?)),
                TargetModule::Q => return Some((heads * a.qk_head_dim(), h)),
                TargetModule::KvA => return Some((r + a.qk_rope_dim, h)),
                TargetModule::KvB => {
                    return Some((heads * (a.qk_nope_dim + a.v_head_dim), r));
                }
                TargetModule::O => return Some((h, heads * a.v_head_dim)),
                _ => {}
            }
        }
        Some(match t {
            TargetModule::Q => (q, h),
            TargetModule::K | TargetModule::V => (kv, h),
            TargetModule::Qkv => (q + 2 * kv, h),
            TargetModule::O => (h, q),
            TargetModule::Gate | TargetModule::Up => (i, h),
            TargetModule::GateUp => (2 * i, h),
            TargetModule::Down => (h, i),
            TargetModule::SharedExpertGate => (1, h),
            TargetModule::QA | TargetModule::QB | TargetModule::KvA | TargetModule::KvB => {
                return None
            }
            TargetModule::Router | TargetModule::ExpertsGateUp | TargetModule::ExpertsDown => {
                return None
            }
        })
    }

    /// Heads whose rows llama.cpp permutes in a GGUF file of this family (q and k of Llama).
    pub fn gguf_permuted_heads(&self, t: TargetModule) -> Option<usize> {
        match t {
            _ if !self.family.gguf_permutes_qk() => None,
            TargetModule::Q => Some(self.num_heads),
            TargetModule::K => Some(self.num_kv_heads),
            _ => None,
        }
    }
}
