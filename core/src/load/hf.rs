//! HF model directories: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, tokenizer files. f32/f16/bf16 tensors; projections can be
//! quantized to NF4 on load.

use crate::backend::GraftBackend;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::assemble::{assemble, Role, WeightSource};
use super::hf_config::HfConfig;
use super::{read_json, LoadError, LoadOptions, LoadedModel};
use crate::adapters::lora::TargetModule;
use crate::model::proj::{BaseWeight, Proj};
use crate::model::{Family, Model, ModelConfig, NormPlacement, NormSlot, RmsNorm};
use crate::quant::{PackedWeight, QuantKind};
use crate::text::tokenizer::{TokenizerBundle, TokenizerError};

/// Loads an HF model directory.
///
/// # Errors
/// Missing or malformed files, unsupported architectures, missing tensors, wrong shapes or
/// dtypes.
pub fn load_hf_dir<B: GraftBackend>(
    dir: &Path,
    opts: LoadOptions,
    device: &B::Device,
) -> Result<LoadedModel<B>, LoadError> {
    let config_path = dir.join("config.json");
    // The architecture is checked before the keys, so that e.g. a multimodal Gemma 3 config
    // (settings under text_config) is named as such rather than as a missing field.
    let value: serde_json::Value = read_json(&config_path)?;
    let architectures: Vec<String> = value
        .get("architectures")
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .unwrap_or_default();
    if let Some(arch) = architectures.first() {
        if !Family::ALL.iter().any(|f| f.hf_architecture() == arch) {
            return Err(LoadError::Architecture {
                path: config_path,
                arch: arch.clone(),
                supported: Family::ALL
                    .iter()
                    .map(|f| f.hf_architecture())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let raw: HfConfig = serde_json::from_value(value).map_err(|source| LoadError::Json {
        path: config_path.clone(),
        source,
    })?;
    let config = ModelConfig::try_from(raw).map_err(|e| LoadError::Config {
        path: config_path.clone(),
        message: e.0,
    })?;
    let weights = Weights::open(dir)?;
    let l = Loader {
        weights: &weights,
        config: &config,
        opts,
        device,
    };
    let mut model = assemble(&l, &config, device)?;
    super::apply_options(&mut model, opts, dir)?;
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        Some(TokenizerBundle::from_hf_dir(dir).map_err(|e| match e {
            TokenizerError::File { path, message } => LoadError::Tokenizer { path, message },
            other => LoadError::Tokenizer {
                path: dir.join("tokenizer.json"),
                message: other.to_string(),
            },
        })?)
    } else {
        None
    };
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(LoadedModel {
        model,
        tokenizer,
        name,
    })
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The memory-mapped safetensors files of a checkpoint and which file holds each tensor.
pub(crate) struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `files`
    index: BTreeMap<String, usize>,
}

impl Weights {
    pub(crate) fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let idx: ShardIndex = read_json(&index_path)?;
            let mut shards: Vec<String> = idx.weight_map.values().cloned().collect();
            shards.sort();
            shards.dedup();
            for s in &shards {
                if s.contains('/') || s.contains("..") {
                    return Err(LoadError::Config {
                        path: index_path.clone(),
                        message: format!("shard name '{s}' leaves the model directory"),
                    });
                }
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(LoadError::MissingTensor {
                path: dir.into(),
                tensor: "model.safetensors (or model.safetensors.index.json)".into(),
            });
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in names {
            let file = File::open(&path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: read-only map of a checkpoint file that graft does not modify.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&map).map_err(|e| LoadError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, map));
        }
        Ok(Weights { files, index })
    }

    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// A tensor's dtype, shape and little-endian bytes, as stored.
    pub(crate) fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8]), LoadError> {
        let Some(&fi) = self.index.get(name) else {
            let path = self.files.first().map(|f| f.0.clone()).unwrap_or_default();
            return Err(LoadError::MissingTensor {
                path,
                tensor: name.into(),
            });
        };
        let (path, map) = &self.files[fi];
        let corrupt = |e: safetensors::SafeTensorError| LoadError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        };
        let st = SafeTensors::deserialize(map).map_err(corrupt)?;
        let view = st.tensor(name).map_err(corrupt)?;
        Ok((view.dtype(), view.shape().to_vec(), view.data()))
    }

    /// The file that holds `name`.
    pub(crate) fn path_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].0.as_path())
    }

    /// A tensor as f32 values, checked against the expected shape.
    fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let (dtype, shape, data) = self.raw(name)?;
        let path = || self.path_of(name).unwrap_or(Path::new("")).to_path_buf();
        if shape != expected {
            return Err(LoadError::Shape {
                path: path(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        to_f32(dtype, data).ok_or_else(|| LoadError::Dtype {
            path: path(),
            tensor: name.into(),
            dtype: format!("{dtype:?}"),
        })
    }
}

struct Loader<'a, B: GraftBackend> {
    weights: &'a Weights,
    config: &'a ModelConfig,
    opts: LoadOptions,
    device: &'a B::Device,
}

/// transformers' module path of a tensor (without `.weight`).
pub(crate) fn module_name(role: Role, config: &ModelConfig) -> String {
    let layer = |i: usize, rest: &str| format!("model.layers.{i}.{rest}");
    match role {
        Role::Embed => "model.embed_tokens".into(),
        Role::LmHead => "lm_head".into(),
        Role::FinalNorm => "model.norm".into(),
        Role::Proj(i, t @ (TargetModule::Gate | TargetModule::Up | TargetModule::Down))
            if config.shared_expert(i).is_some() =>
        {
            let shared = config.family.hf_shared_expert().unwrap_or_else(|| {
                unreachable!("the configs of families with a shared expert name it")
            });
            layer(i, &format!("mlp.{shared}.{}", t.hf_name()))
        }
        Role::Proj(i, t) => layer(i, &format!("{}.{}", t.hf_parent(), t.hf_name())),
        Role::Norm(i, slot) => layer(
            i,
            match slot {
                NormSlot::AttnIn => "input_layernorm",
                NormSlot::AttnOut => "post_attention_layernorm",
                // Llama's name for the pre-MLP norm is the one others use after attention.
                NormSlot::MlpIn if config.norm_placement == NormPlacement::Pre => {
                    "post_attention_layernorm"
                }
                NormSlot::MlpIn => "pre_feedforward_layernorm",
                NormSlot::MlpOut => "post_feedforward_layernorm",
            },
        ),
        Role::QNorm(i) if config.mla.is_some() => layer(i, "self_attn.q_a_layernorm"),
        Role::KNorm(i) if config.mla.is_some() => layer(i, "self_attn.kv_a_layernorm"),
        Role::QNorm(i) => layer(i, "self_attn.q_norm"),
        Role::KNorm(i) => layer(i, "self_attn.k_norm"),
        Role::Router(i) => layer(
            i,
            &format!(
                "{}.{}",
                config.family.hf_experts().0,
                config.family.hf_router()
            ),
        ),
        Role::Expert(i, e, t) => {
            let (module, [gate, up, down]) = config.family.hf_experts();
            let name = match t {
                TargetModule::Gate => gate,
                TargetModule::Up => up,
                _ => down,
            };
            layer(i, &format!("{module}.experts.{e}.{name}"))
        }
    }
}

/// transformers' name of a sparse layer's router bias (DeepSeek-V3's buffer).
fn score_bias_name(layer: usize, config: &ModelConfig) -> String {
    format!(
        "{}.e_score_correction_bias",
        module_name(Role::Router(layer), config)
    )
}

/// A tensor of a loaded model as transformers stores it.
pub(crate) enum HfTensor<'a, B: GraftBackend> {
    /// A projection's, router's, expert's or embedding's weight.
    Weight(&'a Proj<B>),
    /// A bias.
    Bias(&'a Tensor<B, 1>),
    /// A norm's multiplier, stored minus the family's offset (Gemma's `1 + w`).
    Norm(&'a RmsNorm<B>),
}

/// Every tensor of `model` under transformers' name, as [`assemble`] reads them.
pub(crate) fn hf_tensors<B: GraftBackend>(model: &Model<B>) -> Vec<(String, HfTensor<'_, B>)> {
    let c = &model.config;
    let mut out = vec![(
        format!("{}.weight", module_name(Role::Embed, c)),
        HfTensor::Weight(&model.embed_tokens),
    )];
    for (i, block) in model.layers.iter().enumerate() {
        for (t, proj) in block.targets() {
            let name = module_name(Role::Proj(i, t), c);
            out.push((format!("{name}.weight"), HfTensor::Weight(proj)));
            if let Some(b) = &proj.bias {
                out.push((format!("{name}.bias"), HfTensor::Bias(b)));
            }
        }
        for slot in NormSlot::ALL {
            if let Some(n) = &block.norms[slot.index()] {
                out.push((
                    format!("{}.weight", module_name(Role::Norm(i, slot), c)),
                    HfTensor::Norm(n),
                ));
            }
        }
        if let Some(x) = &block.experts {
            let weight = |role| format!("{}.weight", module_name(role, c));
            out.push((weight(Role::Router(i)), HfTensor::Weight(&x.router)));
            if let Some(b) = &x.score_bias {
                out.push((score_bias_name(i, c), HfTensor::Bias(b)));
            }
            for (e, ex) in x.experts.iter().enumerate() {
                for (t, p) in [
                    (TargetModule::Gate, &ex.gate),
                    (TargetModule::Up, &ex.up),
                    (TargetModule::Down, &ex.down),
                ] {
                    out.push((weight(Role::Expert(i, e, t)), HfTensor::Weight(p)));
                }
            }
        }
        if let Some(s) = &block.sinks {
            out.push((sinks_name(i), HfTensor::Bias(s)));
        }
        for (role, norm) in [
            (Role::QNorm(i), &block.q_norm),
            (Role::KNorm(i), &block.k_norm),
        ] {
            if let Some(n) = norm {
                out.push((
                    format!("{}.weight", module_name(role, c)),
                    HfTensor::Norm(n),
                ));
            }
        }
    }
    out.push((
        format!("{}.weight", module_name(Role::FinalNorm, c)),
        HfTensor::Norm(&model.norm),
    ));
    if !c.tie_word_embeddings {
        out.push((
            format!("{}.weight", module_name(Role::LmHead, c)),
            HfTensor::Weight(&model.lm_head),
        ));
    }
    out
}

impl<B: GraftBackend> Loader<'_, B> {
    fn name(&self, role: Role) -> String {
        module_name(role, self.config)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor<B, 1>, LoadError> {
        Ok(Tensor::from_data(
            TensorData::new(self.weights.f32(name, &[len])?, [len]),
            self.device,
        ))
    }
}

/// transformers' name of a layer's attention sinks (GPT-OSS's parameter).
fn sinks_name(layer: usize) -> String {
    format!("model.layers.{layer}.self_attn.sinks")
}

impl<B: GraftBackend> WeightSource<B> for Loader<'_, B> {
    fn sinks(&self, layer: usize, heads: usize) -> Result<Tensor<B, 1>, LoadError> {
        self.vector(&sinks_name(layer), heads)
    }

    /// GPT-OSS keeps a layer's experts as 3-D parameters for `x · W` (`gate_up_proj`:
    /// `[experts, hidden, 2·I]` with gate and up interleaved in its columns, `down_proj`:
    /// `[experts, I, hidden]`) with biases beside them; other families, one tensor per expert.
    fn experts(
        &self,
        layer: usize,
        t: TargetModule,
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Proj<B>>, LoadError> {
        if self.config.family != Family::GptOss {
            return super::assemble::per_expert(self, layer, t, n, rows, cols);
        }
        let pre = format!("model.layers.{layer}.mlp.experts");
        let (name, width, pick): (_, _, fn(usize, usize) -> usize) = match t {
            TargetModule::Gate => ("gate_up_proj", 2 * rows, |j, _| 2 * j),
            TargetModule::Up => ("gate_up_proj", 2 * rows, |j, _| 2 * j + 1),
            _ => ("down_proj", rows, |j, _| j),
        };
        let full = format!("{pre}.{name}");
        if !self.weights.has(&full) && self.weights.has(&format!("{full}_blocks")) {
            let tensor = format!("{full}_blocks");
            return Err(LoadError::Tensor {
                path: self
                    .weights
                    .path_of(&tensor)
                    .unwrap_or(Path::new(""))
                    .into(),
                tensor,
                message:
                    "MXFP4 experts (_blocks/_scales, as OpenAI released GPT-OSS) are not read \
                          from safetensors; convert the checkpoint with llama.cpp's converter, \
                          whose GGUF keeps them MXFP4, and load that"
                        .into(),
            });
        }
        let w = self.weights.f32(&full, &[n, cols, width])?;
        let b = self
            .weights
            .f32(&format!("{pre}.{name}_bias"), &[n, width])?;
        Ok((0..n)
            .map(|e| {
                let we = &w[e * cols * width..(e + 1) * cols * width];
                // row j of this expert's projection is column pick(j) of its `x · W` matrix
                let m: Vec<f32> = (0..rows)
                    .flat_map(|j| (0..cols).map(move |c| we[c * width + pick(j, c)]))
                    .collect();
                let bias: Vec<f32> = (0..rows).map(|j| b[e * width + pick(j, 0)]).collect();
                let base = if self.opts.quantize == QuantKind::Nf4 {
                    BaseWeight::Packed(PackedWeight::nf4(rows, cols, &m))
                } else {
                    BaseWeight::Dense(Tensor::from_data(
                        TensorData::new(m, [rows, cols]),
                        self.device,
                    ))
                };
                let bias = Tensor::from_data(TensorData::new(bias, [rows]), self.device);
                Proj::new(base, Some(bias))
            })
            .collect())
    }

    fn score_bias(&self, layer: usize, len: usize) -> Result<Tensor<B, 1>, LoadError> {
        self.vector(&score_bias_name(layer, self.config), len)
    }

    fn norm(&self, role: Role, len: usize) -> Result<RmsNorm<B>, LoadError> {
        let mut w = self
            .weights
            .f32(&format!("{}.weight", self.name(role)), &[len])?;
        let offset = self.config.family.hf_norm_offset();
        if offset != 0.0 {
            // `x·(1 + w)` in transformers' Gemma RMSNorm, computed in f32 as here.
            w.iter_mut().for_each(|v| *v += offset);
        }
        Ok(RmsNorm {
            weight: Tensor::from_data(TensorData::new(w, [len]), self.device),
            eps: self.config.rms_norm_eps,
        })
    }

    fn proj(
        &self,
        role: Role,
        rows: usize,
        cols: usize,
        quantize: bool,
    ) -> Result<Proj<B>, LoadError> {
        let name = self.name(role);
        let w = self.weights.f32(&format!("{name}.weight"), &[rows, cols])?;
        let base = if quantize && self.opts.quantize == QuantKind::Nf4 {
            BaseWeight::Packed(PackedWeight::nf4(rows, cols, &w))
        } else {
            BaseWeight::Dense(Tensor::from_data(
                TensorData::new(w, [rows, cols]),
                self.device,
            ))
        };
        let bias_name = format!("{name}.bias");
        let bias = if self.weights.has(&bias_name) || role.needs_bias(self.config) {
            Some(self.vector(&bias_name, rows)?)
        } else {
            None
        };
        Ok(Proj::new(base, bias))
    }
}

/// transformers' name of a role's weight (`model.layers.3.self_attn.q_proj.weight`).
pub(crate) fn hf_tensor(role: Role, config: &ModelConfig) -> String {
    format!("{}.weight", module_name(role, config))
}

/// Little-endian safetensors data of an F32, F16 or BF16 tensor as f32 values; `None` for other
/// dtypes.
pub(crate) fn to_f32(dtype: Dtype, b: &[u8]) -> Option<Vec<f32>> {
    Some(f32_values(dtype, b)?.collect())
}

/// The f32 values of little-endian F32, F16 or BF16 data, in order; `None` for other dtypes.
pub(crate) fn f32_values(dtype: Dtype, b: &[u8]) -> Option<impl Iterator<Item = f32> + '_> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        _ => return None,
    };
    Some(b.chunks_exact(width).map(move |c| match dtype {
        Dtype::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
        Dtype::BF16 => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
        _ => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
    }))
}
