//! Llama-family models from GGUF files (llama.cpp's naming, `convert_hf_to_gguf.py`).
//!
//! Quantized projections stay in their GGML blocks. llama.cpp stores the q/k projection rows of
//! `llama` models permuted for its adjacent-pair rope; they are put back in HF order here (a
//! reordering of whole packed rows, exact for every block type), so the model uses HF's rope
//! and adapters use PEFT's layout.

use crate::backend::GraftBackend;
use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::TensorData;

use super::{LoadError, LoadOptions, LoadedModel};
use crate::config::{LlamaConfig, RopeScaling};
use crate::gguf::{GgufFile, GgufTensorInfo};
use crate::lora::TargetModule;
use crate::model::{Block, Llama, RmsNorm};
use crate::proj::{BaseWeight, Proj};
use crate::quant::{GgmlType, PackedWeight, QuantKind};
use crate::tokenizer::TokenizerBundle;

/// Architectures read from GGUF. `llama` files have permuted q/k rows; `qwen2` files do not.
const ARCHS: [&str; 2] = ["llama", "qwen2"];

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
    if !ARCHS.contains(&arch.as_str()) {
        return Err(LoadError::Architecture {
            path: path.into(),
            arch,
            supported: ARCHS.join(", "),
        });
    }
    let config = read_config(&file, &arch)?;
    let tokenizer = TokenizerBundle::from_gguf(&file).map_err(|message| LoadError::Tokenizer {
        path: path.into(),
        message,
    })?;
    let l = Loader {
        file: &file,
        config: &config,
        opts,
        device,
        permute_qk: arch == "llama",
    };
    let model = l.model()?;
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

fn read_config(f: &GgufFile, arch: &str) -> Result<LlamaConfig, LoadError> {
    let key = |k: &str| format!("{arch}.{k}");
    let usize_key = |k: &str| f.u64(&key(k)).map(|v| v as usize);
    let hidden_size = usize_key("embedding_length")?;
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
    let mut rope_scaling = match f.get(&key("rope.scaling.type")) {
        Some(crate::gguf::GgufValue::String(t)) if t == "linear" => Some(RopeScaling::Linear {
            factor: f.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0) as f32,
        }),
        _ => None,
    };
    if let Some(info) = f.tensor_info("rope_freqs.weight") {
        rope_scaling = Some(RopeScaling::Factors(dense_f32(f, info)));
    }
    let config = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: usize_key("feed_forward_length")?,
        num_layers: usize_key("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: f
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta: f.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
        rope_scaling,
        max_position_embeddings: usize_key("context_length")?,
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        attention_bias: f.tensor_info("blk.0.attn_q.bias").is_some(),
        architecture: arch.to_string(),
    };
    config.validate().map_err(|message| LoadError::Config {
        path: f.path().into(),
        message,
    })?;
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
    config: &'a LlamaConfig,
    opts: LoadOptions,
    device: &'a B::Device,
    permute_qk: bool,
}

impl<B: GraftBackend> Loader<'_, B> {
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
        if found != expected {
            return Err(LoadError::Shape {
                path: path.into(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found,
            });
        }
        Ok(info)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor<B, 1>, LoadError> {
        let info = self.info(name, &[len])?;
        Ok(Tensor::from_data(
            TensorData::new(dense_f32(self.file, info), [len]),
            self.device,
        ))
    }

    fn norm(&self, name: &str) -> Result<RmsNorm<B>, LoadError> {
        Ok(RmsNorm {
            weight: self.vector(name, self.config.hidden_size)?,
            eps: self.config.rms_norm_eps,
        })
    }

    /// A `[rows, cols]` weight; `heads` asks for llama.cpp's q/k row permutation to be undone.
    fn proj(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        heads: Option<usize>,
        quantize: bool,
    ) -> Result<Proj<B>, LoadError> {
        let info = self.info(&format!("{name}.weight"), &[rows, cols])?;
        let bytes = self.file.tensor_bytes(info);
        let bytes: Arc<[u8]> = match heads {
            Some(h) if self.permute_qk => permute_rows(bytes, rows, h, true).into(),
            _ => bytes.into(),
        };
        let packed = PackedWeight::ggml(info.ty, rows, cols, bytes).map_err(|message| {
            LoadError::Tensor {
                path: self.file.path().into(),
                tensor: info.name.clone(),
                message,
            }
        })?;
        let dense = matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
            || self.opts.quantize == QuantKind::None;
        let base = match (dense, quantize && self.opts.quantize == QuantKind::Nf4) {
            (true, true) => BaseWeight::Packed(PackedWeight::nf4(rows, cols, &packed.dequantize())),
            (true, false) => BaseWeight::Dense(Tensor::from_data(
                TensorData::new(packed.dequantize(), [rows, cols]),
                self.device,
            )),
            // NF4 asked for on GGML blocks: requantize (bitsandbytes' NF4 of the dequantized
            // weight), so QLoRA-NF4 runs from any GGUF.
            (false, true) => {
                BaseWeight::Packed(PackedWeight::nf4(rows, cols, &packed.dequantize()))
            }
            (false, false) => BaseWeight::Packed(packed),
        };
        let bias_name = format!("{name}.bias");
        let bias = match self.file.tensor_info(&bias_name) {
            Some(_) => Some(self.vector(&bias_name, rows)?),
            None => None,
        };
        Ok(Proj::new(base, bias))
    }

    fn model(&self) -> Result<Llama<B>, LoadError> {
        let c = self.config;
        let (h, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let embed = self.proj("token_embd", c.vocab_size, c.hidden_size, None, false)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = |t: TargetModule| format!("blk.{i}.{}", t.gguf_name());
            let projs = [
                self.proj(
                    &p(TargetModule::Q),
                    h,
                    c.hidden_size,
                    Some(c.num_heads),
                    true,
                )?,
                self.proj(
                    &p(TargetModule::K),
                    kv,
                    c.hidden_size,
                    Some(c.num_kv_heads),
                    true,
                )?,
                self.proj(&p(TargetModule::V), kv, c.hidden_size, None, true)?,
                self.proj(&p(TargetModule::O), c.hidden_size, h, None, true)?,
                self.proj(
                    &p(TargetModule::Gate),
                    c.intermediate_size,
                    c.hidden_size,
                    None,
                    true,
                )?,
                self.proj(
                    &p(TargetModule::Up),
                    c.intermediate_size,
                    c.hidden_size,
                    None,
                    true,
                )?,
                self.proj(
                    &p(TargetModule::Down),
                    c.hidden_size,
                    c.intermediate_size,
                    None,
                    true,
                )?,
            ];
            layers.push(Block {
                input_norm: self.norm(&format!("blk.{i}.attn_norm.weight"))?,
                projs,
                post_attention_norm: self.norm(&format!("blk.{i}.ffn_norm.weight"))?,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            self.proj("output", c.vocab_size, c.hidden_size, None, false)?
        };
        let norm = self.norm("output_norm.weight")?;
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
