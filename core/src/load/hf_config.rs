//! `config.json` of an HF checkpoint as serde reads it ([`HfConfig`]), its translation into
//! the model's [`ModelConfig`] with the family's defaults, and back ([`to_hf_json`], for
//! writing a model loaded from GGUF as an HF checkpoint). Reads both transformers 4's keys
//! (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`) and
//! transformers 5's (`rope_parameters`, per layer type for Gemma 3; `layer_types`). A key whose
//! value graft cannot honour is refused by name, never ignored.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::config::InvalidConfig;
use crate::model::family::{supported_model_types, Family};
use crate::model::{
    Activation, ClampedSwiglu, LayerConfig, MlaConfig, ModelConfig, MoeConfig, RopeConfig,
    RopeScaling, Routing, SharedExpert,
};

/// The keys graft reads (others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Qwen2-MoE's name for `attention_bias`.
    #[serde(default)]
    pub qkv_bias: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub hidden_activation: Option<String>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    /// Routed experts: Mixtral's and transformers 5's name, and Qwen3-MoE's and OLMoE's.
    #[serde(default)]
    pub num_local_experts: Option<usize>,
    #[serde(default)]
    pub num_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub decoder_sparse_step: Option<usize>,
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
    #[serde(default)]
    pub shared_expert_intermediate_size: Option<usize>,
    /// DeepSeek-V3's routed and shared experts and their routing.
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    #[serde(default)]
    pub routed_scaling_factor: Option<f64>,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    #[serde(default)]
    pub first_k_dense_replace: Option<usize>,
    #[serde(default)]
    pub scoring_func: Option<String>,
    #[serde(default)]
    pub topk_method: Option<String>,
    /// DeepSeek's multi-head latent attention; `q_lora_rank` may be null (no query bottleneck):
    /// `None` when absent, `Some(Null)` when null.
    #[serde(default, deserialize_with = "present")]
    pub q_lora_rank: Option<Value>,
    #[serde(default)]
    pub kv_lora_rank: Option<usize>,
    #[serde(default)]
    pub qk_nope_head_dim: Option<usize>,
    #[serde(default)]
    pub qk_rope_head_dim: Option<usize>,
    #[serde(default)]
    pub v_head_dim: Option<usize>,
    #[serde(default)]
    pub rope_interleave: Option<bool>,
    /// GPT-OSS's clamped SwiGLU.
    #[serde(default)]
    pub swiglu_alpha: Option<f64>,
    #[serde(default)]
    pub swiglu_limit: Option<f64>,
    #[serde(default)]
    pub clip_qkv: Option<f64>,
}

/// A key that is present, even as `null` (serde's `Option` alone reads `null` as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

impl TryFrom<HfConfig> for ModelConfig {
    type Error = InvalidConfig;

    fn try_from(c: HfConfig) -> Result<Self, InvalidConfig> {
        let model_type = c.model_type.clone().unwrap_or_else(|| "llama".into());
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            format!(
                "model_type '{model_type}' is not an architecture graft supports (supported: {})",
                supported_model_types()
            )
        })?;
        let (act_key, act) = match (&c.hidden_activation, &c.hidden_act) {
            (Some(a), _) => ("hidden_activation", a.as_str()),
            (None, Some(a)) => ("hidden_act", a.as_str()),
            (None, None) => ("hidden_act", family.default_hidden_act()),
        };
        let activation = match act {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => {
                return Err(InvalidConfig(format!(
                    "{act_key} '{other}' is not supported for {family} (silu, gelu_pytorch_tanh)"
                )))
            }
        };
        if c.use_bidirectional_attention == Some(true) {
            return Err("use_bidirectional_attention = true (an embedding model) is not supported: graft runs causal decoders".into());
        }
        let mla = mla_config(&c, family)?;
        // Multi-head latent attention: the rotary width is the configured head size (as
        // transformers sets it), and one latent serves every head.
        let head_dim = match &mla {
            Some(a) => a.qk_rope_dim,
            None => c
                .head_dim
                .unwrap_or(c.hidden_size / c.num_attention_heads.max(1)),
        };
        // transformers 5 keeps it in rope_parameters.
        let partial = c.partial_rotary_factor.or_else(|| {
            c.rope_parameters
                .as_ref()
                .and_then(|p| p.get("partial_rotary_factor"))
                .and_then(Value::as_f64)
        });
        let rotary_dim = match partial {
            Some(f) if !(f > 0.0 && f <= 1.0) => {
                return Err(InvalidConfig(format!(
                    "partial_rotary_factor must be in (0, 1], got {f}"
                )))
            }
            // transformers: int(head_dim * partial_rotary_factor)
            Some(f) => (head_dim as f64 * f) as usize,
            None => head_dim,
        };
        let ropes = Ropes::read(&c, family, rotary_dim)?;
        let windows = layer_windows(&c, family)?;
        let layers = windows
            .into_iter()
            .map(|window| LayerConfig {
                rope: if window.is_some() {
                    ropes.local.clone()
                } else {
                    ropes.global.clone()
                },
                window,
            })
            .collect();
        if let Some(v) = c.clip_qkv {
            return Err(InvalidConfig(format!(
                "clip_qkv = {v} is not supported (OLMoE checkpoints leave it null)"
            )));
        }
        let moe = moe_config(&c, family)?;
        let cfg = ModelConfig {
            family,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: match &mla {
                Some(_) => 1,
                None => c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            },
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c
                .tie_word_embeddings
                .unwrap_or(family.default_tied_embeddings()),
            attention_bias: match family.attention_bias_key() {
                "qkv_bias" => c.qkv_bias,
                _ => c.attention_bias,
            }
            .unwrap_or(family.default_attention_bias()),
            layers,
            attention_scale: match &mla {
                Some(a) => mla_attention_scale(&c, a),
                None => (1.0 / c.query_pre_attn_scalar.unwrap_or(head_dim as f64).sqrt()) as f32,
            },
            attn_softcap: c.attn_logit_softcapping.map(|v| v as f32),
            final_softcap: c.final_logit_softcapping.map(|v| v as f32),
            embed_scale: family
                .scales_embeddings()
                .then(|| (c.hidden_size as f32).sqrt()),
            norm_placement: family.norm_placement(),
            qk_norm: family.qk_norm(),
            activation,
            fused_projections: family.fused_projections(),
            moe,
            mla,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The routed experts of an MoE family's config: all layers sparse, except Qwen3-MoE's
/// `mlp_only_layers` and those `decoder_sparse_step` skips (transformers' rule: layer `i` is
/// sparse when `(i + 1) % step == 0`).
fn moe_config(c: &HfConfig, family: Family) -> Result<Option<MoeConfig>, InvalidConfig> {
    let experts = c.num_local_experts.or(c.num_experts).or(c.n_routed_experts);
    if !family.is_moe() {
        return match experts {
            Some(n) if n > 0 => Err(InvalidConfig(format!(
                "num_experts = {n}: {family} has no routed experts in graft"
            ))),
            _ => Ok(None),
        };
    }
    let num_experts = experts.ok_or("num_local_experts (or num_experts) is missing")?;
    let top_k = c
        .num_experts_per_tok
        .ok_or("num_experts_per_tok is missing")?;
    if family == Family::DeepseekV3 {
        return deepseek_experts(c, num_experts, top_k).map(Some);
    }
    let step = c.decoder_sparse_step.unwrap_or(1);
    if step == 0 {
        return Err("decoder_sparse_step must be positive, got 0".into());
    }
    let dense = c.mlp_only_layers.clone().unwrap_or_default();
    if let Some(l) = dense.iter().find(|&&l| l >= c.num_hidden_layers) {
        return Err(InvalidConfig(format!(
            "mlp_only_layers names layer {l} of {}",
            c.num_hidden_layers
        )));
    }
    Ok(Some(MoeConfig {
        num_experts,
        top_k,
        // Mixtral's experts are `intermediate_size` wide.
        expert_intermediate: c.moe_intermediate_size.unwrap_or(c.intermediate_size),
        norm_topk: match family {
            // GPT-OSS: the softmax of the top-k logits
            Family::Mixtral | Family::GptOss => true,
            _ => c.norm_topk_prob.unwrap_or(false),
        },
        sparse: (0..c.num_hidden_layers)
            .map(|i| !dense.contains(&i) && (i + 1) % step == 0)
            .collect(),
        // transformers' Qwen2-MoE class default width.
        shared: family.hf_shared_expert().map(|_| SharedExpert {
            intermediate: c.shared_expert_intermediate_size.unwrap_or(5632),
            gated: true,
        }),
        routing: Routing::Softmax,
        weights_scale: 1.0,
        // transformers' GPT-OSS class defaults
        clamped_swiglu: (family == Family::GptOss).then(|| ClampedSwiglu {
            alpha: c.swiglu_alpha.unwrap_or(1.702) as f32,
            limit: c.swiglu_limit.unwrap_or(7.0) as f32,
        }),
    }))
}

/// DeepSeek-V3's experts (transformers' class defaults where the config is silent): dense
/// layers before `first_k_dense_replace`, `n_shared_experts` ungated shared experts as one
/// MLP, sigmoid scores chosen by group (`noaux_tc`), weights scaled by
/// `routed_scaling_factor`.
fn deepseek_experts(
    c: &HfConfig,
    num_experts: usize,
    top_k: usize,
) -> Result<MoeConfig, InvalidConfig> {
    if let Some(f) = c.scoring_func.as_deref().filter(|f| *f != "sigmoid") {
        return Err(InvalidConfig(format!(
            "scoring_func '{f}' is not supported for deepseek_v3 (sigmoid)"
        )));
    }
    if let Some(m) = c.topk_method.as_deref().filter(|m| *m != "noaux_tc") {
        return Err(InvalidConfig(format!(
            "topk_method '{m}' is not supported for deepseek_v3 (noaux_tc)"
        )));
    }
    let expert_intermediate = c.moe_intermediate_size.unwrap_or(2048);
    let dense = c.first_k_dense_replace.unwrap_or(3);
    Ok(MoeConfig {
        num_experts,
        top_k,
        expert_intermediate,
        norm_topk: c.norm_topk_prob.unwrap_or(true),
        sparse: (0..c.num_hidden_layers).map(|i| i >= dense).collect(),
        shared: match c.n_shared_experts.unwrap_or(1) {
            0 => None,
            n => Some(SharedExpert {
                intermediate: n * expert_intermediate,
                gated: false,
            }),
        },
        routing: Routing::SigmoidGrouped {
            groups: c.n_group.unwrap_or(8),
            topk_groups: c.topk_group.unwrap_or(4),
        },
        weights_scale: c.routed_scaling_factor.unwrap_or(2.5) as f32,
        clamped_swiglu: None,
    })
}

/// DeepSeek's multi-head latent attention (transformers' class defaults where the config is
/// silent), `None` for other families.
fn mla_config(c: &HfConfig, family: Family) -> Result<Option<MlaConfig>, InvalidConfig> {
    if family != Family::DeepseekV3 {
        return Ok(None);
    }
    if c.attention_bias == Some(true) {
        return Err("attention_bias = true is not supported for deepseek_v3".into());
    }
    let q_lora_rank =
        match &c.q_lora_rank {
            None => Some(1536),
            Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                InvalidConfig(format!("q_lora_rank must be a count or null, got {v}"))
            })? as usize),
        };
    Ok(Some(MlaConfig {
        q_lora_rank,
        kv_lora_rank: c.kv_lora_rank.unwrap_or(512),
        qk_nope_dim: c.qk_nope_head_dim.unwrap_or(128),
        qk_rope_dim: c.qk_rope_head_dim.unwrap_or(64),
        v_head_dim: c.v_head_dim.unwrap_or(128),
        rope_interleave: c.rope_interleave.unwrap_or(true),
    }))
}

/// `1/√qk_head_dim`, times YaRN's `mscale(factor, mscale_all_dim)²` when the rope is YaRN with
/// `mscale_all_dim` (transformers' `yarn_apply_mscale`).
fn mla_attention_scale(c: &HfConfig, a: &MlaConfig) -> f32 {
    let base = 1.0 / (a.qk_head_dim() as f64).sqrt();
    let rope = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
    let yarn = rope.filter(|r| {
        r.get("rope_type")
            .or_else(|| r.get("type"))
            .and_then(Value::as_str)
            == Some("yarn")
    });
    let m = yarn.and_then(|r| {
        let all = r.get("mscale_all_dim").and_then(Value::as_f64)?;
        let factor = r.get("factor").and_then(Value::as_f64)?;
        (all != 0.0).then(|| RopeScaling::yarn_mscale(factor, all))
    });
    (base * m.map_or(1.0, |m| m * m)) as f32
}

/// The sliding window of each layer: `layer_types` when given, else the family's pattern
/// (Qwen2/3: only with `use_sliding_window`, from layer `max_window_layers` on).
fn layer_windows(c: &HfConfig, family: Family) -> Result<Vec<Option<usize>>, InvalidConfig> {
    let n = c.num_hidden_layers;
    // Qwen2/3 configs carry a window that is off unless use_sliding_window says otherwise.
    let on = c
        .use_sliding_window
        .unwrap_or(family.sliding_window_by_default());
    let window = if on { c.sliding_window } else { None };
    if let Some(types) = &c.layer_types {
        if types.len() != n {
            return Err(InvalidConfig(format!(
                "layer_types has {} entries for num_hidden_layers {n}",
                types.len()
            )));
        }
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => window.map(Some).ok_or_else(|| {
                    InvalidConfig(format!(
                        "layer_types[{i}] is 'sliding_attention' but sliding_window is not set"
                    ))
                }),
                other => Err(InvalidConfig(format!(
                    "layer_types[{i}] '{other}' is not supported (full_attention, sliding_attention)"
                ))),
            })
            .collect();
    }
    let Some(w) = window else {
        return Ok(vec![None; n]);
    };
    let first = match (c.use_sliding_window, c.max_window_layers) {
        (Some(true), Some(m)) => m,
        _ => 0,
    };
    let pattern = match c.sliding_window_pattern {
        Some(0) => return Err("sliding_window_pattern must be positive, got 0".into()),
        Some(p) => crate::model::family::SlidingPattern::AllBut(p),
        None => family.sliding_pattern(),
    };
    Ok((0..n)
        .map(|i| (i >= first && pattern.slides(i)).then_some(w))
        .collect())
}

/// The rotary embedding of global layers and of local (sliding-window) layers.
struct Ropes {
    global: RopeConfig,
    local: RopeConfig,
}

impl Ropes {
    fn read(c: &HfConfig, family: Family, rotary_dim: usize) -> Result<Self, InvalidConfig> {
        let one = |params: Option<&Value>,
                   theta: Option<f64>,
                   key: &str|
         -> Result<RopeConfig, InvalidConfig> {
            let theta = params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .or(theta)
                .unwrap_or(10_000.0);
            let scaling = match params {
                None | Some(Value::Null) => None,
                Some(p) => parse_rope_scaling(p, c, family, key)?,
            };
            Ok(RopeConfig {
                theta: theta as f32,
                scaling,
                rotary_dim,
            })
        };
        match &c.rope_parameters {
            // transformers 5, one dict per layer type (Gemma 3)
            Some(p) if p.get("full_attention").is_some() => {
                let global = one(
                    p.get("full_attention"),
                    None,
                    "rope_parameters.full_attention",
                )?;
                let local = match p.get("sliding_attention") {
                    Some(l) => one(Some(l), None, "rope_parameters.sliding_attention")?,
                    None => global.clone(),
                };
                Ok(Ropes { global, local })
            }
            Some(p) => {
                let global = one(Some(p), c.rope_theta, "rope_parameters")?;
                Ok(Ropes {
                    local: global.clone(),
                    global,
                })
            }
            None => {
                let global = one(c.rope_scaling.as_ref(), c.rope_theta, "rope_scaling")?;
                let local = match c
                    .rope_local_base_freq
                    .or(family.local_rope_base().map(f64::from))
                {
                    Some(theta) => RopeConfig {
                        theta: theta as f32,
                        scaling: None,
                        rotary_dim,
                    },
                    None => global.clone(),
                };
                Ok(Ropes { global, local })
            }
        }
    }
}

/// A `rope_scaling` / `rope_parameters` dict; `None` for the default rope.
fn parse_rope_scaling(
    v: &Value,
    c: &HfConfig,
    family: Family,
    key: &str,
) -> Result<Option<RopeScaling>, InvalidConfig> {
    let kind = match v.get("rope_type").or_else(|| v.get("type")) {
        None => return Ok(None),
        Some(t) => t
            .as_str()
            .ok_or_else(|| InvalidConfig(format!("{key}.rope_type must be a string, got {t}")))?,
    };
    // Phi-3's config renames its early "su" and "yarn" to longrope (they carry its factors).
    let kind = if family.longrope_aliases().contains(&kind) {
        "longrope"
    } else {
        kind
    };
    let num = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| InvalidConfig(format!("{key}.{k} is missing or not a number in {v}")))
    };
    let opt_num = |k: &str| v.get(k).and_then(Value::as_f64);
    let list = |k: &str| -> Result<Vec<f32>, InvalidConfig> {
        v.get(k)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect())
            .ok_or_else(|| InvalidConfig(format!("{key}.{k} is missing or not a list of numbers")))
    };
    let original = v
        .get("original_max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .or(c.original_max_position_embeddings);
    Ok(Some(match kind {
        "default" => return Ok(None),
        "linear" => RopeScaling::Linear {
            factor: num("factor")? as f32,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position: original.unwrap_or(c.max_position_embeddings),
        },
        "longrope" => {
            let original = original.ok_or_else(|| {
                InvalidConfig(format!(
                    "{key}: longrope needs original_max_position_embeddings"
                ))
            })?;
            // transformers' `_compute_longrope_parameters`
            let factor =
                opt_num("factor").unwrap_or(c.max_position_embeddings as f64 / original as f64);
            let attention_factor = opt_num("attention_factor")
                .map(|a| a as f32)
                .unwrap_or_else(|| RopeScaling::longrope_attention_factor(factor, original));
            RopeScaling::LongRope {
                short: list("short_factor")?,
                long: list("long_factor")?,
                original_max_position: original,
                attention_factor,
            }
        }
        "yarn" => {
            let factor = num("factor")?;
            // transformers' `_compute_yarn_parameters`: get_mscale
            let mscale = RopeScaling::yarn_mscale;
            let attention_factor = match (
                opt_num("attention_factor"),
                opt_num("mscale"),
                opt_num("mscale_all_dim"),
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                    mscale(factor, m) / mscale(factor, ma)
                }
                _ => mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor: factor as f32,
                original_max_position: original.unwrap_or(c.max_position_embeddings),
                beta_fast: opt_num("beta_fast").unwrap_or(32.0) as f32,
                beta_slow: opt_num("beta_slow").unwrap_or(1.0) as f32,
                attention_factor: attention_factor as f32,
                truncate: v.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            }
        }
        other => {
            return Err(InvalidConfig(format!(
            "{key}.rope_type '{other}' is not supported (default, linear, llama3, longrope, yarn)"
        )))
        }
    }))
}

/// A `rope_scaling` dict, or `None` for the plain rope.
fn rope_json(r: &RopeConfig) -> Result<Option<Value>, InvalidConfig> {
    Ok(Some(match &r.scaling {
        None => return Ok(None),
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        }) => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position,
        }),
        Some(RopeScaling::LongRope {
            short,
            long,
            original_max_position,
            attention_factor,
        }) => json!({
            "rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": original_max_position,
            "attention_factor": attention_factor,
        }),
        Some(RopeScaling::Yarn {
            factor,
            original_max_position,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        }) => json!({
            "rope_type": "yarn", "factor": factor,
            "original_max_position_embeddings": original_max_position,
            "beta_fast": beta_fast, "beta_slow": beta_slow,
            "attention_factor": attention_factor, "truncate": truncate,
        }),
        Some(RopeScaling::Factors(_)) => {
            return Err(InvalidConfig(
                "the rope's per-frequency factors (a GGUF's rope_freqs tensor, e.g. Llama 3.1's \
                 llama3 scaling) have no config.json form: merge from the HF checkpoint instead"
                    .into(),
            ))
        }
    }))
}

/// The `config.json` (transformers 4 keys, which transformers 5 and graft also read) of a model
/// with `config`, every family default written out.
///
/// # Errors
/// A setting `config.json` cannot express (rope factors given per frequency).
pub fn to_hf_json(c: &ModelConfig) -> Result<Value, InvalidConfig> {
    if c.family == Family::GptOss {
        return Err(
            "writing GPT-OSS as an HF directory is not supported: transformers keeps its \
                    experts as 3-D parameters with gate and up interleaved"
                .into(),
        );
    }
    let global = c
        .layers
        .iter()
        .find(|l| l.window.is_none())
        .or(c.layers.first())
        .map(|l| l.rope.clone())
        .ok_or_else(|| InvalidConfig("a model without layers".into()))?;
    let act = match c.activation {
        Activation::Silu => "silu",
        Activation::GeluTanh => "gelu_pytorch_tanh",
    };
    let mut j = json!({
        "architectures": [c.family.hf_architecture()],
        "model_type": c.family.model_type(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        // a GGUF's f32 epsilon as the decimal it was written from (1e-5, not 9.99999974e-6)
        "rms_norm_eps": (c.rms_norm_eps as f32).to_string().parse::<f64>().unwrap_or(c.rms_norm_eps),
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": act,
        "hidden_activation": act,
        "rope_theta": global.theta,
        "rope_scaling": rope_json(&global)?,
    });
    let obj = j.as_object_mut().expect("an object");
    obj.insert(
        c.family.attention_bias_key().into(),
        json!(c.attention_bias),
    );
    if global.rotary_dim != c.head_dim {
        obj.insert(
            "partial_rotary_factor".into(),
            json!(global.rotary_dim as f64 / c.head_dim as f64),
        );
    }
    if let Some(RopeScaling::LongRope {
        original_max_position,
        ..
    }) = &global.scaling
    {
        obj.insert(
            "original_max_position_embeddings".into(),
            json!(original_max_position),
        );
    }
    let window = c.layers.iter().find_map(|l| l.window);
    if let Some(w) = window {
        if let Some(local) = c.layers.iter().find(|l| l.window.is_some()) {
            obj.insert("rope_local_base_freq".into(), json!(local.rope.theta));
        }
        obj.insert("sliding_window".into(), json!(w));
        obj.insert("use_sliding_window".into(), json!(true));
        obj.insert("max_window_layers".into(), json!(0));
        obj.insert(
            "layer_types".into(),
            json!(c
                .layers
                .iter()
                .map(|l| if l.window.is_some() {
                    "sliding_attention"
                } else {
                    "full_attention"
                })
                .collect::<Vec<_>>()),
        );
    } else {
        obj.insert("sliding_window".into(), Value::Null);
        obj.insert("use_sliding_window".into(), json!(false));
    }
    // Written out even when they are the defaults graft assumes: transformers' own class
    // defaults differ (Gemma 2: query_pre_attn_scalar 256, soft-caps 50 and 30).
    let scalar = 1.0 / (c.attention_scale as f64).powi(2);
    let whole = scalar.round();
    // f32 noise aside, the scalar is a whole number (head_dim, or hidden / heads)
    // (transformers' Gemma configs insist on an integer)
    let scalar = if (scalar - whole).abs() < 1e-3 * whole {
        json!(whole as u64)
    } else {
        json!(scalar)
    };
    obj.insert("query_pre_attn_scalar".into(), scalar);
    obj.insert("attn_logit_softcapping".into(), json!(c.attn_softcap));
    obj.insert("final_logit_softcapping".into(), json!(c.final_softcap));
    if let Some(m) = &c.moe {
        obj.insert("num_local_experts".into(), json!(m.num_experts));
        obj.insert("num_experts".into(), json!(m.num_experts));
        obj.insert("num_experts_per_tok".into(), json!(m.top_k));
        obj.insert("moe_intermediate_size".into(), json!(m.expert_intermediate));
        obj.insert("norm_topk_prob".into(), json!(m.norm_topk));
        obj.insert("decoder_sparse_step".into(), json!(1));
        let dense: Vec<usize> = (0..c.num_layers).filter(|&l| !m.sparse[l]).collect();
        obj.insert("mlp_only_layers".into(), json!(dense));
        if let Some(s) = &m.clamped_swiglu {
            obj.insert("swiglu_alpha".into(), json!(s.alpha));
            obj.insert("swiglu_limit".into(), json!(s.limit));
        }
        if let Some(s) = &m.shared {
            obj.insert(
                "shared_expert_intermediate_size".into(),
                json!(s.intermediate),
            );
        }
        if c.family == Family::DeepseekV3 {
            deepseek_json(c, m, obj)?;
        }
        if c.family == Family::Mixtral {
            // Mixtral's experts are `intermediate_size` wide.
            obj.insert("intermediate_size".into(), json!(m.expert_intermediate));
        }
    }
    Ok(j)
}

/// DeepSeek-V3's own keys: latent attention (one key head in graft is every head to
/// transformers), routing and the leading dense layers.
fn deepseek_json(
    c: &ModelConfig,
    m: &MoeConfig,
    obj: &mut serde_json::Map<String, Value>,
) -> Result<(), InvalidConfig> {
    let dense = m.sparse.iter().take_while(|s| !**s).count();
    if m.sparse[dense..].iter().any(|s| !s) {
        return Err("deepseek_v3 has its dense layers first (first_k_dense_replace)".into());
    }
    let Routing::SigmoidGrouped {
        groups,
        topk_groups,
    } = m.routing
    else {
        return Err("deepseek_v3 routes with sigmoid scores (scoring_func)".into());
    };
    let shared = m
        .shared
        .as_ref()
        .map_or(0, |s| s.intermediate / m.expert_intermediate.max(1));
    for (k, v) in [
        ("n_routed_experts", json!(m.num_experts)),
        ("n_shared_experts", json!(shared)),
        ("routed_scaling_factor", json!(m.weights_scale)),
        ("n_group", json!(groups)),
        ("topk_group", json!(topk_groups)),
        ("first_k_dense_replace", json!(dense)),
        ("scoring_func", json!("sigmoid")),
        ("topk_method", json!("noaux_tc")),
    ] {
        obj.insert(k.into(), v);
    }
    if let Some(a) = &c.mla {
        for (k, v) in [
            ("num_key_value_heads", json!(c.num_heads)),
            ("q_lora_rank", json!(a.q_lora_rank)),
            ("kv_lora_rank", json!(a.kv_lora_rank)),
            ("qk_nope_head_dim", json!(a.qk_nope_dim)),
            ("qk_rope_head_dim", json!(a.qk_rope_dim)),
            ("v_head_dim", json!(a.v_head_dim)),
            ("rope_interleave", json!(a.rope_interleave)),
        ] {
            obj.insert(k.into(), v);
        }
        // YaRN's `mscale_all_dim` lives in graft's score scale as mscale(factor, all)²:
        // written back so that the directory reloads with the same scale.
        let global = c.layers.iter().map(|l| &l.rope).next();
        if let Some(RopeScaling::Yarn { factor, .. }) = global.and_then(|r| r.scaling.as_ref()) {
            let m = (c.attention_scale as f64 * (a.qk_head_dim() as f64).sqrt()).sqrt();
            let ln = (*factor as f64).ln();
            if (m - 1.0).abs() > 1e-6 && ln > 0.0 {
                if let Some(r) = obj.get_mut("rope_scaling").and_then(Value::as_object_mut) {
                    r.insert("mscale_all_dim".into(), json!((m - 1.0) / (0.1 * ln)));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> HfConfig {
        serde_json::from_str(
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,
            "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,
            "num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,
            "rope_theta":100000.0,"max_position_embeddings":8192,"tie_word_embeddings":true}"#,
        )
        .unwrap()
    }

    fn deepseek(extra: &str) -> HfConfig {
        serde_json::from_str(&format!(
            r#"{{"model_type":"deepseek_v3","vocab_size":512,"hidden_size":64,
            "intermediate_size":128,"moe_intermediate_size":32,"num_hidden_layers":3,
            "num_attention_heads":4,"n_routed_experts":8,"num_experts_per_tok":2,"n_group":4,
            "topk_group":2,"first_k_dense_replace":1,"kv_lora_rank":32,"qk_nope_head_dim":16,
            "qk_rope_head_dim":8,"v_head_dim":16{extra}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn deepseek_q_lora_rank_null_means_no_query_bottleneck_and_absent_the_default() {
        let c = ModelConfig::try_from(deepseek(r#","q_lora_rank":null"#)).unwrap();
        assert_eq!(c.mla.as_ref().unwrap().q_lora_rank, None);
        let c = ModelConfig::try_from(deepseek("")).unwrap();
        assert_eq!(c.mla.as_ref().unwrap().q_lora_rank, Some(1536));
        // and what graft writes reads back the same
        for extra in [r#","q_lora_rank":null"#, r#","q_lora_rank":48"#] {
            let c = ModelConfig::try_from(deepseek(extra)).unwrap();
            let back: HfConfig = serde_json::from_value(to_hf_json(&c).unwrap()).unwrap();
            assert_eq!(ModelConfig::try_from(back).unwrap().mla, c.mla, "{extra}");
        }
    }

    #[test]
    fn deepseek_yarn_score_scale_survives_writing_config_json() {
        let c = ModelConfig::try_from(deepseek(
            r#","q_lora_rank":48,"max_position_embeddings":163840,"rope_parameters":{
            "rope_type":"yarn","rope_theta":10000,"factor":40,"mscale":1.0,"mscale_all_dim":1.0,
            "original_max_position_embeddings":4096,"beta_fast":32,"beta_slow":1}"#,
        ))
        .unwrap();
        let plain = 1.0 / 24f32.sqrt();
        assert!(c.attention_scale > 1.8 * plain, "mscale² = 1.87");
        let back: HfConfig = serde_json::from_value(to_hf_json(&c).unwrap()).unwrap();
        let back = ModelConfig::try_from(back).unwrap();
        assert!((back.attention_scale / c.attention_scale - 1.0).abs() < 1e-5);
        assert_eq!(back.layers[0].rope, c.layers[0].rope);
    }

    #[test]
    fn smollm2_parameter_count_matches_transformers() {
        let c = ModelConfig::try_from(smollm()).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.n_params(), 134_515_008);
        assert_eq!(c.layers[0].window, None);
        assert_eq!(c.layers[0].rope.theta, 100_000.0);
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = smollm();
        c.num_key_value_heads = Some(4);
        let e = ModelConfig::try_from(c).unwrap_err().0;
        assert!(e.contains("num_key_value_heads 4"), "{e}");
        let mut c = smollm();
        c.model_type = Some("gpt2".into());
        assert!(ModelConfig::try_from(c).unwrap_err().0.contains("'gpt2'"));
        let mut c = smollm();
        c.rope_scaling = Some(serde_json::json!({"rope_type": "dynamic", "factor": 2.0}));
        let e = ModelConfig::try_from(c).unwrap_err().0;
        assert!(e.contains("rope_scaling.rope_type 'dynamic'"), "{e}");
        let mut c = smollm();
        c.hidden_act = Some("relu".into());
        assert!(ModelConfig::try_from(c)
            .unwrap_err()
            .0
            .contains("hidden_act 'relu'"));
    }

    #[test]
    fn llama3_rope_scaling_parses() {
        let mut c = smollm();
        c.rope_scaling = Some(serde_json::json!({"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}));
        let m = ModelConfig::try_from(c).unwrap();
        assert_eq!(
            m.layers[3].rope.scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192
            })
        );
    }

    #[test]
    fn windows_follow_the_family_and_the_config() {
        // Mistral: every layer; Qwen2 with use_sliding_window false: none.
        let mut c = smollm();
        c.model_type = Some("mistral".into());
        c.sliding_window = Some(4096);
        let m = ModelConfig::try_from(c.clone()).unwrap();
        assert!(m.layers.iter().all(|l| l.window == Some(4096)));
        c.model_type = Some("qwen2".into());
        c.use_sliding_window = Some(false);
        let m = ModelConfig::try_from(c.clone()).unwrap();
        assert!(m.layers.iter().all(|l| l.window.is_none()));
        assert!(m.attention_bias);
        // Gemma 3 (transformers 4 keys): 5 local layers with their own base, then a global one.
        let mut c = smollm();
        c.model_type = Some("gemma3_text".into());
        c.sliding_window = Some(512);
        c.rope_theta = Some(1e6);
        c.rope_local_base_freq = Some(1e4);
        c.num_hidden_layers = 6;
        let m = ModelConfig::try_from(c).unwrap();
        let w: Vec<_> = m.layers.iter().map(|l| l.window).collect();
        assert_eq!(
            w,
            [Some(512), Some(512), Some(512), Some(512), Some(512), None]
        );
        assert_eq!(m.layers[0].rope.theta, 1e4);
        assert_eq!(m.layers[5].rope.theta, 1e6);
        assert!(m.tie_word_embeddings);
        assert_eq!(m.activation, Activation::GeluTanh);
        assert_eq!(m.embed_scale, Some(24.0));
    }

    #[test]
    fn phi3_su_is_longrope_and_qwen_windows_are_off_unless_asked() {
        let mut c = smollm();
        c.model_type = Some("phi3".into());
        c.original_max_position_embeddings = Some(4096);
        c.max_position_embeddings = 131072;
        let half = vec![1.0; 32];
        c.rope_scaling = Some(serde_json::json!({"type": "su", "short_factor": half,
            "long_factor": half}));
        let m = ModelConfig::try_from(c).unwrap();
        match &m.layers[0].rope.scaling {
            Some(RopeScaling::LongRope {
                original_max_position,
                attention_factor,
                ..
            }) => {
                assert_eq!(*original_max_position, 4096);
                // √(1 + ln 32 / ln 4096), Phi-3-mini-128k's factor.
                assert!(
                    (attention_factor - 1.190_238_1).abs() < 1e-6,
                    "{attention_factor}"
                );
            }
            other => panic!("{other:?}"),
        }
        let mut c = smollm();
        c.model_type = Some("qwen2".into());
        c.sliding_window = Some(32768);
        let m = ModelConfig::try_from(c).unwrap();
        assert!(m.layers.iter().all(|l| l.window.is_none()));
    }

    #[test]
    fn layer_types_must_name_known_kinds() {
        let mut c = smollm();
        c.num_hidden_layers = 2;
        c.layer_types = Some(vec!["full_attention".into(), "chunked_attention".into()]);
        let e = ModelConfig::try_from(c).unwrap_err().0;
        assert!(e.contains("layer_types[1] 'chunked_attention'"), "{e}");
    }
}
