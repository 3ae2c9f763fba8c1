//! Models from GGUF files (llama.cpp's naming, `convert_hf_to_gguf.py`): the architecture
//! from `general.architecture` and `{arch}.*` metadata, with what llama.cpp hard-codes per
//! architecture (Gemma's local rope base, layer patterns and attention scale) taken from
//! [`Family`].
//!
//! Quantized projections stay in their GGML blocks. llama.cpp stores the q/k projection rows of
//! `llama` models permuted for its adjacent-pair rope; they are put back in HF order here (a
//! reordering of whole packed rows, exact for every block type), so the model uses HF's rope
//! and adapters use PEFT's layout. Norm weights are used as stored: the converter already
//! folded Gemma's `(1 + w)` into them.

use crate::backend::GraftBackend;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::TensorData;

use super::assemble::{assemble, Role, WeightSource};
use super::{LoadError, LoadOptions, LoadedModel};
use crate::adapters::lora::TargetModule;
use crate::formats::gguf::{GgufFile, GgufTensorInfo, GgufValue};
use crate::model::config::InvalidConfig;
use crate::model::family::SlidingPattern;
use crate::model::proj::{BaseWeight, Proj};
use crate::model::{
    ClampedSwiglu, Family, LayerConfig, MlaConfig, ModelConfig, MoeConfig, NormSlot, RmsNorm,
    RopeConfig, RopeScaling, Routing, SharedExpert,
};
use crate::quant::{GgmlType, PackedWeight, QuantKind};
use crate::text::tokenizer::TokenizerBundle;

/// Loads a GGUF model file.
///
/// # Errors
/// File format errors, an unsupported architecture, missing tensors or keys, shapes that
/// disagree with the metadata.
pub fn load_gguf<B: GraftBackend>(
    path: &Path,
    opts: LoadOptions,
    device: &B::Device,
) -> Result<LoadedModel<B>, LoadError> {
    let file = GgufFile::open(path)?;
    let arch = file.str("general.architecture")?.to_string();
    let Some(family) = Family::from_gguf_arch(&arch) else {
        return Err(LoadError::Architecture {
            path: path.into(),
            arch,
            supported: Family::ALL
                .iter()
                .map(|f| f.gguf_arch())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    // llama.cpp writes Mixtral as `llama` with an expert count.
    let family = match file.opt_u64(&format!("{arch}.expert_count"))? {
        Some(n) if n > 0 => family.with_experts(),
        _ => family,
    };
    let config = read_config(&file, family).map_err(|e| match e {
        ConfigError::Gguf(e) => LoadError::Gguf(e),
        ConfigError::Invalid(message) => LoadError::Config {
            path: path.into(),
            message,
        },
    })?;
    let tokenizer = TokenizerBundle::from_gguf(&file).map_err(|e| LoadError::Tokenizer {
        path: path.into(),
        message: e.to_string(),
    })?;
    let l = Loader {
        file: &file,
        config: &config,
        opts,
        device,
    };
    let mut model = assemble(&l, &config, device)?;
    super::apply_options(&mut model, opts, path)?;
    let name = file
        .str("general.name")
        .map(str::to_string)
        .unwrap_or_else(|_| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    Ok(LoadedModel {
        model,
        tokenizer: Some(tokenizer),
        name,
    })
}

/// DeepSeek's multi-head latent attention from `deepseek2` metadata (older files lack the
/// `_mla` lengths and give the per-head ones as `key_length` / `value_length`).
fn read_mla(
    f: &GgufFile,
    family: Family,
    rope_dim: usize,
) -> Result<Option<MlaConfig>, ConfigError> {
    if family != Family::DeepseekV3 {
        return Ok(None);
    }
    let arch = family.gguf_arch();
    let key = |k: &str| format!("{arch}.attention.{k}");
    let either = |a: &str, b: &str| -> Result<usize, ConfigError> {
        match f.opt_u64(&key(a))? {
            Some(v) => Ok(v as usize),
            None => Ok(f.u64(&key(b))? as usize),
        }
    };
    let qk = either("key_length_mla", "key_length")?;
    if qk <= rope_dim {
        return Err(format!(
            "{} = {qk} leaves no unrotated dimensions beside rope.dimension_count {rope_dim}",
            key("key_length_mla")
        )
        .into());
    }
    Ok(Some(MlaConfig {
        q_lora_rank: f.opt_u64(&key("q_lora_rank"))?.map(|v| v as usize),
        kv_lora_rank: f.u64(&key("kv_lora_rank"))? as usize,
        qk_nope_dim: qk - rope_dim,
        qk_rope_dim: rope_dim,
        v_head_dim: either("value_length_mla", "value_length")?,
        // llama.cpp ropes deepseek2 with adjacent pairs (its converter keeps HF's order).
        rope_interleave: true,
    }))
}

/// How a sparse layer picks its experts: llama.cpp's `expert_gating_func` (1 softmax, 2
/// sigmoid; absent, softmax, as llama.cpp assumes for older deepseek2 files) and expert groups.
fn read_routing(f: &GgufFile, family: Family) -> Result<Routing, ConfigError> {
    let arch = family.gguf_arch();
    let key = |k: &str| format!("{arch}.{k}");
    let groups = f.opt_u64(&key("expert_group_count"))?.unwrap_or(1) as usize;
    let topk_groups = f
        .opt_u64(&key("expert_group_used_count"))?
        .map_or(groups, |v| v as usize);
    match f.opt_u64(&key("expert_gating_func"))? {
        None | Some(1) if groups <= 1 || topk_groups >= groups => Ok(Routing::Softmax),
        Some(2) => Ok(Routing::SigmoidGrouped {
            groups: groups.max(1),
            topk_groups: topk_groups.max(1),
        }),
        None | Some(1) => Err(format!(
            "{}: softmax routing limited to {topk_groups} of {groups} expert groups (DeepSeek-V2) \
             is not supported",
            key("expert_group_count")
        )
        .into()),
        Some(g) => Err(format!(
            "{} = {g} is not supported (1 softmax, 2 sigmoid)",
            key("expert_gating_func")
        )
        .into()),
    }
}

enum ConfigError {
    Gguf(crate::formats::gguf::GgufError),
    Invalid(String),
}

impl From<crate::formats::gguf::GgufError> for ConfigError {
    fn from(e: crate::formats::gguf::GgufError) -> Self {
        ConfigError::Gguf(e)
    }
}

impl From<String> for ConfigError {
    fn from(e: String) -> Self {
        ConfigError::Invalid(e)
    }
}

impl From<InvalidConfig> for ConfigError {
    fn from(e: InvalidConfig) -> Self {
        ConfigError::Invalid(e.0)
    }
}

fn read_config(f: &GgufFile, family: Family) -> Result<ModelConfig, ConfigError> {
    let arch = family.gguf_arch();
    let key = |k: &str| format!("{arch}.{k}");
    let usize_key = |k: &str| f.u64(&key(k)).map(|v| v as usize);
    let hidden_size = usize_key("embedding_length")?;
    let num_layers = usize_key("block_count")?;
    // Each layer has tensors: a count beyond the file's tensors is a hostile header, and would
    // size the per-layer tables below.
    if num_layers > f.tensors.len() {
        return Err(ConfigError::Invalid(format!(
            "{} = {num_layers}, but the file holds {} tensors",
            key("block_count"),
            f.tensors.len()
        )));
    }
    let num_heads = usize_key("attention.head_count")?;
    let num_kv_heads = f
        .opt_u64(&key("attention.head_count_kv"))?
        .map_or(num_heads, |v| v as usize);
    let head_dim = match f.opt_u64(&key("attention.key_length"))? {
        Some(v) => v as usize,
        None => hidden_size / num_heads.max(1),
    };
    let vocab_size = match f.opt_u64(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => f.opt_array("tokenizer.ggml.tokens")?.map_or(0, <[_]>::len),
    };
    let max_position_embeddings = usize_key("context_length")?;
    let rotary_dim = f
        .opt_u64(&key("rope.dimension_count"))?
        .map_or(head_dim, |v| v as usize);
    let mla = read_mla(f, family, rotary_dim)?;
    // Multi-head latent attention: the head size that rotates (the file's key_length is the
    // latent's width), one latent for every head.
    let (head_dim, num_kv_heads) = match &mla {
        Some(a) => (a.qk_rope_dim, 1),
        None => (head_dim, num_kv_heads),
    };
    let theta = f.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32;
    let original = f
        .opt_u64(&key("rope.scaling.original_context_length"))?
        .map(|v| v as usize);
    let factor = f.opt_f64(&key("rope.scaling.factor"))?;
    let mut scaling = match f.get(&key("rope.scaling.type")) {
        // llama.cpp reads a factor without a type as linear scaling.
        None => factor
            .filter(|f| *f != 1.0 && *f > 0.0)
            .map(|f| RopeScaling::Linear { factor: f as f32 }),
        Some(GgufValue::String(t)) => match t.as_str() {
            "none" => None,
            "linear" => Some(RopeScaling::Linear {
                factor: factor.unwrap_or(1.0) as f32,
            }),
            "yarn" => {
                let factor = factor.unwrap_or(1.0);
                Some(RopeScaling::Yarn {
                    factor: factor as f32,
                    original_max_position: original.unwrap_or(max_position_embeddings),
                    beta_fast: f
                        .opt_f64(&key("rope.scaling.yarn_beta_fast"))?
                        .unwrap_or(32.0) as f32,
                    beta_slow: f
                        .opt_f64(&key("rope.scaling.yarn_beta_slow"))?
                        .unwrap_or(1.0) as f32,
                    attention_factor: RopeScaling::yarn_mscale(factor, 1.0) as f32,
                    truncate: family.yarn_truncates(),
                })
            }
            other => {
                return Err(format!(
                    "{}: rope scaling type '{other}' is not supported (none, linear, yarn)",
                    key("rope.scaling.type")
                )
                .into())
            }
        },
        Some(v) => {
            return Err(format!("{} must be a string, got {v:?}", key("rope.scaling.type")).into())
        }
    };
    if let Some(info) = f.tensor_info("rope_freqs.weight") {
        scaling = Some(RopeScaling::Factors(dense_f32(f, info)));
    }
    if let (Some(long), Some(short)) = (
        f.tensor_info("rope_factors_long.weight"),
        f.tensor_info("rope_factors_short.weight"),
    ) {
        let original = original.ok_or_else(|| {
            format!(
                "rope_factors_long.weight needs {}",
                key("rope.scaling.original_context_length")
            )
        })?;
        let ratio = max_position_embeddings as f64 / original as f64;
        let attention_factor = match f.opt_f64(&key("rope.scaling.attn_factor"))? {
            Some(a) => a as f32,
            None => RopeScaling::longrope_attention_factor(ratio, original),
        };
        scaling = Some(RopeScaling::LongRope {
            short: dense_f32(f, short),
            long: dense_f32(f, long),
            original_max_position: original,
            attention_factor,
        });
    }
    let global = RopeConfig {
        theta,
        scaling,
        rotary_dim,
    };
    // Local (sliding) layers' own base: newer converters write it, llama.cpp's default else.
    let local_theta = f
        .opt_f64(&key("rope.freq_base_swa"))?
        .map(|v| v as f32)
        .or(family.local_rope_base());
    let local = match local_theta {
        Some(theta) => RopeConfig {
            theta,
            scaling: None,
            rotary_dim,
        },
        None => global.clone(),
    };
    let window = f
        .opt_u64(&key("attention.sliding_window"))?
        .map(|v| v as usize)
        .filter(|&w| w > 0);
    let slides: Vec<bool> = match f.get(&key("attention.sliding_window_pattern")) {
        None => (0..num_layers)
            .map(|i| family.sliding_pattern().slides(i))
            .collect(),
        Some(GgufValue::Array(a)) if a.len() == num_layers => a
            .iter()
            .map(|v| matches!(v, GgufValue::Bool(true)))
            .collect(),
        Some(v) => match f.opt_u64(&key("attention.sliding_window_pattern")) {
            Ok(Some(n)) if n > 0 => (0..num_layers)
                .map(|i| SlidingPattern::AllBut(n as usize).slides(i))
                .collect(),
            _ => {
                return Err(format!(
                    "{} {v:?} is neither a layer count nor one flag per layer",
                    key("attention.sliding_window_pattern")
                )
                .into())
            }
        },
    };
    let layers = slides
        .iter()
        .map(|&s| {
            let window = window.filter(|_| s);
            LayerConfig {
                rope: if window.is_some() {
                    local.clone()
                } else {
                    global.clone()
                },
                window,
            }
        })
        .collect();
    let scale_dim = family.gguf_query_scale_dim(num_layers, hidden_size, num_heads, head_dim);
    let feed_forward = usize_key("feed_forward_length")?;
    let sparse: Vec<bool> = (0..num_layers)
        .map(|i| {
            f.tensor_info(&format!("blk.{i}.ffn_gate_inp.weight"))
                .is_some()
        })
        .collect();
    let moe = if family.is_moe() {
        Some(MoeConfig {
            num_experts: usize_key("expert_count")?,
            top_k: usize_key("expert_used_count")?,
            expert_intermediate: f
                .opt_u64(&key("expert_feed_forward_length"))?
                .map_or(feed_forward, |v| v as usize),
            norm_topk: f
                .opt_bool(&key("expert_weights_norm"))?
                .unwrap_or(family.default_norm_topk()),
            // A layer with a router has experts; the others (dense layers first) an MLP.
            sparse: sparse.clone(),
            routing: read_routing(f, family)?,
            weights_scale: f
                .opt_f64(&key("expert_weights_scale"))?
                .map_or(1.0, |v| v as f32),
            // llama.cpp's constants for gpt-oss files, which carry none
            clamped_swiglu: (family == Family::GptOss).then_some(ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0,
            }),
            // A shared expert when the file has one (llama.cpp's `_shexp` tensors), of the
            // width the metadata gives, gated when it has `ffn_gate_inp_shexp`.
            shared: match sparse.iter().position(|&s| s) {
                Some(i)
                    if f.tensor_info(&format!("blk.{i}.ffn_gate_shexp.weight"))
                        .is_some() =>
                {
                    Some(SharedExpert {
                        // deepseek2 files give none: the tensor's rows are its width.
                        intermediate: match f.opt_u64(&key("expert_shared_feed_forward_length"))? {
                            Some(v) => v as usize,
                            None => f
                                .tensor_info(&format!("blk.{i}.ffn_gate_shexp.weight"))
                                .map_or(0, |t| t.torch_shape()[0]),
                        },
                        gated: f
                            .tensor_info(&format!("blk.{i}.ffn_gate_inp_shexp.weight"))
                            .is_some(),
                    })
                }
                _ => None,
            },
        })
    } else {
        None
    };
    if mla.is_some() && matches!(global.scaling, Some(RopeScaling::Yarn { .. })) {
        return Err(format!(
            "{}: YaRN on a deepseek2 file (llama.cpp's rope_yarn_log_mul attention scaling) is \
             not supported yet; load the HF checkpoint",
            key("rope.scaling.type")
        )
        .into());
    }
    let softcap = |k: &str| -> Result<Option<f32>, ConfigError> {
        Ok(f.opt_f64(&key(k))?.map(|v| v as f32).filter(|v| *v > 0.0))
    };
    let config = ModelConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size: feed_forward,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: f
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        max_position_embeddings,
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        attention_bias: f.tensor_info("blk.0.attn_q.bias").is_some()
            || f.tensor_info("blk.0.attn_qkv.bias").is_some(),
        layers,
        attention_scale: 1.0
            / (mla.as_ref().map_or(scale_dim, MlaConfig::qk_head_dim) as f32).sqrt(),
        attn_softcap: softcap("attn_logit_softcapping")?,
        final_softcap: softcap("final_logit_softcapping")?,
        embed_scale: family
            .scales_embeddings()
            .then(|| (hidden_size as f32).sqrt()),
        norm_placement: family.norm_placement(),
        qk_norm: family.qk_norm(),
        activation: family.activation(),
        fused_projections: family.fused_projections(),
        moe,
        mla,
    };
    config.validate()?;
    Ok(config)
}

/// Dequantizes any tensor to f32 (norms, biases, rope factors: small).
fn dense_f32(f: &GgufFile, info: &GgufTensorInfo) -> Vec<f32> {
    let mut out = vec![0f32; info.n_elements() as usize];
    info.ty.dequantize(f.tensor_bytes(info), &mut out);
    out
}

struct Loader<'a, B: GraftBackend> {
    file: &'a GgufFile,
    config: &'a ModelConfig,
    opts: LoadOptions,
    device: &'a B::Device,
}

/// llama.cpp's name of a layer's stacked experts for projection `t` (gate, up or down).
fn experts_tensor(t: TargetModule) -> &'static str {
    match t {
        TargetModule::Gate => "ffn_gate_exps",
        TargetModule::Up => "ffn_up_exps",
        _ => "ffn_down_exps",
    }
}

/// llama.cpp's name of a role's tensor (without `.weight`); a layer's experts share one.
pub(crate) fn tensor_name(role: Role, config: &ModelConfig) -> String {
    match role {
        Role::Embed => "token_embd".into(),
        Role::LmHead => "output".into(),
        Role::FinalNorm => "output_norm".into(),
        // A sparse layer's gate/up/down are its shared expert's.
        Role::Proj(i, t @ (TargetModule::Gate | TargetModule::Up | TargetModule::Down))
            if config.shared_expert(i).is_some() =>
        {
            format!("blk.{i}.{}_shexp", t.gguf_name())
        }
        Role::Proj(i, t) => format!("blk.{i}.{}", t.gguf_name()),
        Role::Norm(i, slot) => format!(
            "blk.{i}.{}",
            match slot {
                NormSlot::AttnIn => "attn_norm",
                NormSlot::AttnOut => "post_attention_norm",
                // gpt-oss files name the pre-MLP norm after attention
                NormSlot::MlpIn if config.family == Family::GptOss => "post_attention_norm",
                NormSlot::MlpIn => "ffn_norm",
                NormSlot::MlpOut => "post_ffw_norm",
            }
        ),
        Role::QNorm(i) if config.mla.is_some() => format!("blk.{i}.attn_q_a_norm"),
        Role::KNorm(i) if config.mla.is_some() => format!("blk.{i}.attn_kv_a_norm"),
        Role::QNorm(i) => format!("blk.{i}.attn_q_norm"),
        Role::KNorm(i) => format!("blk.{i}.attn_k_norm"),
        Role::Router(i) => format!("blk.{i}.ffn_gate_inp"),
        // All experts' weights are one 3-D tensor (see `experts`).
        Role::Expert(i, _, t) => format!("blk.{i}.{}", experts_tensor(t)),
    }
}

impl<B: GraftBackend> Loader<'_, B> {
    /// A tensor's blocks as a `[rows, cols]` packed weight, with llama.cpp's q/k row
    /// permutation undone when `heads` is given.
    fn packed(
        &self,
        info: &GgufTensorInfo,
        rows: usize,
        cols: usize,
        heads: Option<usize>,
    ) -> Result<PackedWeight, LoadError> {
        // Kept in the file's map unless llama.cpp's q/k row order must be undone.
        let bytes = match heads {
            Some(h) => permute_rows(self.file.tensor_bytes(info), rows, h, true).into(),
            None => self.file.tensor_data(info),
        };
        PackedWeight::ggml(info.ty, rows, cols, bytes).map_err(|e| LoadError::Tensor {
            path: self.file.path().into(),
            tensor: info.name.clone(),
            message: e.to_string(),
        })
    }

    fn info(&self, name: &str, expected: &[usize]) -> Result<&GgufTensorInfo, LoadError> {
        let path = self.file.path();
        let info = self
            .file
            .tensor_info(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: path.into(),
                tensor: name.into(),
            })?;
        let found = info.torch_shape();
        // llama.cpp keeps a one-row weight (a shared expert's gate) as a vector.
        let one_row = expected.len() == 2 && expected[0] == 1 && found == expected[1..];
        if found != expected && !one_row {
            return Err(LoadError::Shape {
                path: path.into(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found,
            });
        }
        Ok(info)
    }

    fn vector(
        &self,
        name: &str,
        len: usize,
        heads: Option<usize>,
    ) -> Result<Tensor<B, 1>, LoadError> {
        let info = self.info(name, &[len])?;
        let mut v = dense_f32(self.file, info);
        if let Some(h) = heads {
            v = permute_rows(&v, len, h, true);
        }
        Ok(Tensor::from_data(TensorData::new(v, [len]), self.device))
    }
}

impl<B: GraftBackend> Loader<'_, B> {
    /// Latent attention's `kv_b_proj` (`[heads · (qk_nope + v), kv_lora_rank]`, each head's
    /// key rows then its value rows) from the two halves llama.cpp's converter splits it into:
    /// `attn_k_b` (`[heads, kv_lora_rank, qk_nope]`, each head's key rows transposed) and
    /// `attn_v_b` (`[heads, v, kv_lora_rank]`). Held as f32 (NF4 if asked): the transposed
    /// half cannot keep its blocks.
    fn split_kv_b(&self, layer: usize, rows: usize, cols: usize) -> Result<Proj<B>, LoadError> {
        let a = self
            .config
            .mla
            .as_ref()
            .unwrap_or_else(|| unreachable!("kv_b_proj exists only with latent attention"));
        let (heads, dn, dv, r) = (self.config.num_heads, a.qk_nope_dim, a.v_head_dim, cols);
        let k_info = self.info(&format!("blk.{layer}.attn_k_b.weight"), &[heads, r, dn])?;
        let v_info = self.info(&format!("blk.{layer}.attn_v_b.weight"), &[heads, dv, r])?;
        let kb = self.packed(k_info, heads * r, dn, None)?.dequantize();
        let vb = self.packed(v_info, heads * dv, r, None)?.dequantize();
        let mut w = Vec::with_capacity(rows * cols);
        for h in 0..heads {
            let k = &kb[h * r * dn..(h + 1) * r * dn];
            for j in 0..dn {
                w.extend((0..r).map(|c| k[c * dn + j]));
            }
            w.extend_from_slice(&vb[h * dv * r..(h + 1) * dv * r]);
        }
        let base = if self.opts.quantize == QuantKind::Nf4 {
            BaseWeight::Packed(PackedWeight::nf4(rows, cols, &w))
        } else {
            BaseWeight::Dense(Tensor::from_data(
                TensorData::new(w, [rows, cols]),
                self.device,
            ))
        };
        Ok(Proj::new(base, None))
    }
}

impl<B: GraftBackend> WeightSource<B> for Loader<'_, B> {
    fn sinks(&self, layer: usize, heads: usize) -> Result<Tensor<B, 1>, LoadError> {
        self.vector(&format!("blk.{layer}.attn_sinks.weight"), heads, None)
    }

    fn score_bias(&self, layer: usize, len: usize) -> Result<Tensor<B, 1>, LoadError> {
        self.vector(&format!("blk.{layer}.exp_probs_b.bias"), len, None)
    }

    fn norm(&self, role: Role, len: usize) -> Result<RmsNorm<B>, LoadError> {
        Ok(RmsNorm {
            weight: self.vector(
                &format!("{}.weight", tensor_name(role, self.config)),
                len,
                None,
            )?,
            eps: self.config.rms_norm_eps,
        })
    }

    /// llama.cpp stacks a layer's experts in one 3-D tensor, `[experts, rows, cols]`: each
    /// expert is a view of its rows, sharing the tensor's one copy of the blocks.
    fn experts(
        &self,
        layer: usize,
        t: TargetModule,
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Proj<B>>, LoadError> {
        let name = format!("blk.{layer}.{}.weight", experts_tensor(t));
        // Some files fuse gate and up: `ffn_gate_up_exps`, each expert's gate rows then its up
        // rows (as llama.cpp splits it).
        let fused = format!("blk.{layer}.ffn_gate_up_exps.weight");
        let (info, stride, offset) = match t {
            TargetModule::Gate | TargetModule::Up
                if self.file.tensor_info(&name).is_none()
                    && self.file.tensor_info(&fused).is_some() =>
            {
                let info = self.info(&fused, &[n, 2 * rows, cols])?;
                (info, 2 * rows, if t == TargetModule::Up { rows } else { 0 })
            }
            _ => (self.info(&name, &[n, rows, cols])?, rows, 0),
        };
        let all = self.packed(info, n * stride, cols, None)?;
        let dense = matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
            || self.opts.quantize == QuantKind::None;
        let all_dense = (dense && self.opts.quantize != QuantKind::Nf4).then(|| {
            Tensor::<B, 2>::from_data(
                TensorData::new(all.dequantize(), [n * stride, cols]),
                self.device,
            )
        });
        // Per-expert biases (GPT-OSS), `[experts, rows]`.
        let bias_name = format!("blk.{layer}.{}.bias", experts_tensor(t));
        let biases = match self.file.tensor_info(&bias_name) {
            Some(_) => Some(dense_f32(self.file, self.info(&bias_name, &[n, rows])?)),
            None => None,
        };
        Ok((0..n)
            .map(|e| {
                let bias = biases.as_ref().map(|b| {
                    let v = b[e * rows..(e + 1) * rows].to_vec();
                    Tensor::from_data(TensorData::new(v, [rows]), self.device)
                });
                let first = e * stride + offset;
                let base = match (&all_dense, self.opts.quantize) {
                    (Some(w), _) => BaseWeight::Dense(w.clone().slice([first..first + rows])),
                    (None, QuantKind::Nf4) => {
                        let mut w = vec![0f32; rows * cols];
                        all.dequantize_rows(first, rows, &mut w);
                        BaseWeight::Packed(PackedWeight::nf4(rows, cols, &w))
                    }
                    (None, _) => BaseWeight::Packed(all.rows_view(first, rows)),
                };
                Proj::new(base, bias)
            })
            .collect())
    }

    fn proj(
        &self,
        role: Role,
        rows: usize,
        cols: usize,
        quantize: bool,
    ) -> Result<Proj<B>, LoadError> {
        let name = tensor_name(role, self.config);
        if let Role::Proj(layer, TargetModule::KvB) = role {
            if self.file.tensor_info(&format!("{name}.weight")).is_none() {
                return self.split_kv_b(layer, rows, cols);
            }
        }
        // llama.cpp's q/k row permutation is undone, whole rows at a time.
        let heads = match role {
            Role::Proj(_, t) => self.config.gguf_permuted_heads(t),
            _ => None,
        };
        let info = self.info(&format!("{name}.weight"), &[rows, cols])?;
        let packed = self.packed(info, rows, cols, heads)?;
        let dense = matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
            || self.opts.quantize == QuantKind::None;
        let base = match (dense, quantize && self.opts.quantize == QuantKind::Nf4) {
            // NF4 asked for (also on GGML blocks: bitsandbytes' NF4 of the dequantized weight,
            // so QLoRA-NF4 runs from any GGUF).
            (_, true) => BaseWeight::Packed(PackedWeight::nf4(rows, cols, &packed.dequantize())),
            (true, false) => BaseWeight::Dense(Tensor::from_data(
                TensorData::new(packed.dequantize(), [rows, cols]),
                self.device,
            )),
            (false, false) => BaseWeight::Packed(packed),
        };
        let bias_name = format!("{name}.bias");
        let bias = if self.file.tensor_info(&bias_name).is_some() || role.needs_bias(self.config) {
            Some(self.vector(&bias_name, rows, heads)?)
        } else {
            None
        };
        Ok(Proj::new(base, bias))
    }
}

/// llama.cpp's q/k row order for its rope (`LlamaModel.permute`): within each head of `d` rows,
/// GGUF row `2j + t` holds HF row `t·d/2 + j`. Reorders the `rows` equal-length rows of `w`
/// from HF's order to llama.cpp's, or back with `to_hf`. Works on whole rows (packed blocks or
/// values), so it is exact for every block type.
pub(crate) fn permute_rows<T: Copy + Default>(
    w: &[T],
    rows: usize,
    heads: usize,
    to_hf: bool,
) -> Vec<T> {
    let row = w.len() / rows;
    let d = rows / heads;
    let mut out = vec![T::default(); w.len()];
    for head in 0..heads {
        for t in 0..2 {
            for j in 0..d / 2 {
                let hf = head * d + t * d / 2 + j;
                let gg = head * d + 2 * j + t;
                let (src, dst) = if to_hf { (gg, hf) } else { (hf, gg) };
                out[dst * row..(dst + 1) * row].copy_from_slice(&w[src * row..(src + 1) * row]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp's permute for 2 heads of 4 rows: reshape(h, 2, d/2).swapaxes(1, 2).
        let (heads, d) = (2, 4);
        let hf: Vec<u8> = (0..8).collect();
        let mut gg = vec![0u8; 8];
        for h in 0..heads {
            for j in 0..d / 2 {
                for t in 0..2 {
                    gg[h * d + j * 2 + t] = hf[h * d + t * d / 2 + j];
                }
            }
        }
        assert_eq!(permute_rows(&gg, 8, heads, true), hf);
        assert_eq!(permute_rows(&hf, 8, heads, false), gg);
    }
}
