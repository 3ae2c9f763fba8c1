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

use super::{read_json, LoadError, LoadOptions, LoadedModel};
use crate::config::{HfConfig, LlamaConfig};
use crate::lora::TargetModule;
use crate::model::{Block, Llama, RmsNorm};
use crate::proj::{BaseWeight, Proj};
use crate::quant::{PackedWeight, QuantKind};
use crate::tokenizer::TokenizerBundle;

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
    let raw: HfConfig = read_json(&config_path)?;
    if let Some(arch) = raw.architectures.first() {
        let known = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];
        if !known.contains(&arch.as_str()) {
            return Err(LoadError::Architecture {
                path: config_path,
                arch: arch.clone(),
                supported: known.join(", "),
            });
        }
    }
    let config = LlamaConfig::try_from(raw).map_err(|message| LoadError::Config {
        path: config_path.clone(),
        message,
    })?;
    let weights = Weights::open(dir)?;
    let l = Loader {
        weights: &weights,
        config: &config,
        opts,
        device,
    };
    let model = l.model()?;
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        Some(TokenizerBundle::from_hf_dir(dir)?)
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
struct Weights {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `files`
    index: BTreeMap<String, usize>,
}

impl Weights {
    fn open(dir: &Path) -> Result<Self, LoadError> {
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

    /// A tensor as f32 values, checked against the expected shape.
    fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let Some(&fi) = self.index.get(name) else {
            let path = self.files.first().map(|f| f.0.clone()).unwrap_or_default();
            return Err(LoadError::MissingTensor {
                path,
                tensor: name.into(),
            });
        };
        let (path, map) = &self.files[fi];
        let st = SafeTensors::deserialize(map).map_err(|e| LoadError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let view = st.tensor(name).map_err(|e| LoadError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if view.shape() != expected {
            return Err(LoadError::Shape {
                path: path.clone(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        to_f32(view.dtype(), view.data()).ok_or_else(|| LoadError::Dtype {
            path: path.clone(),
            tensor: name.into(),
            dtype: format!("{:?}", view.dtype()),
        })
    }
}

struct Loader<'a, B: GraftBackend> {
    weights: &'a Weights,
    config: &'a LlamaConfig,
    opts: LoadOptions,
    device: &'a B::Device,
}

impl<B: GraftBackend> Loader<'_, B> {
    fn vector(&self, name: &str, len: usize) -> Result<Tensor<B, 1>, LoadError> {
        Ok(Tensor::from_data(
            TensorData::new(self.weights.f32(name, &[len])?, [len]),
            self.device,
        ))
    }

    fn norm(&self, name: &str) -> Result<RmsNorm<B>, LoadError> {
        Ok(RmsNorm {
            weight: self.vector(name, self.config.hidden_size)?,
            eps: self.config.rms_norm_eps,
        })
    }

    fn proj(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        quantize: bool,
    ) -> Result<Proj<B>, LoadError> {
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
        let bias = if self.weights.has(&bias_name) {
            Some(self.vector(&bias_name, rows)?)
        } else {
            None
        };
        Ok(Proj::new(base, bias))
    }

    fn model(&self) -> Result<Llama<B>, LoadError> {
        let c = self.config;
        let (h, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let embed = self.proj("model.embed_tokens", c.vocab_size, c.hidden_size, false)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = |t: TargetModule| format!("model.layers.{i}.{}.{}", t.hf_parent(), t.hf_name());
            let shape = |t: TargetModule| match t {
                TargetModule::Q => (h, c.hidden_size),
                TargetModule::K | TargetModule::V => (kv, c.hidden_size),
                TargetModule::O => (c.hidden_size, h),
                TargetModule::Gate | TargetModule::Up => (c.intermediate_size, c.hidden_size),
                TargetModule::Down => (c.hidden_size, c.intermediate_size),
            };
            let mk = |t: TargetModule| {
                let (r, cols) = shape(t);
                self.proj(&p(t), r, cols, true)
            };
            let projs = [
                mk(TargetModule::Q)?,
                mk(TargetModule::K)?,
                mk(TargetModule::V)?,
                mk(TargetModule::O)?,
                mk(TargetModule::Gate)?,
                mk(TargetModule::Up)?,
                mk(TargetModule::Down)?,
            ];
            layers.push(Block {
                input_norm: self.norm(&format!("model.layers.{i}.input_layernorm.weight"))?,
                projs,
                post_attention_norm: self
                    .norm(&format!("model.layers.{i}.post_attention_layernorm.weight"))?,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            self.proj("lm_head", c.vocab_size, c.hidden_size, false)?
        };
        let norm = self.norm("model.norm.weight")?;
        Ok(Llama::new(
            c.clone(),
            embed,
            layers,
            norm,
            lm_head,
            self.device.clone(),
        ))
    }
}

/// Little-endian safetensors data of an F32, F16 or BF16 tensor as f32 values; `None` for other
/// dtypes.
pub(crate) fn to_f32(dtype: Dtype, b: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}
