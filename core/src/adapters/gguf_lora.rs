//! LoRA adapters in llama.cpp's GGUF-LoRA format (`convert_lora_to_gguf.py`,
//! `llama-adapter.cpp`), written and read so that `llama-cli --lora` and `llama-server` load
//! graft's adapters.
//!
//! Metadata: `general.type = "adapter"`, `general.architecture` (the base's), `adapter.type =
//! "lora"`, `adapter.lora.alpha` (llama.cpp scales by `alpha / rank`). Tensors, f32:
//! `blk.{i}.{attn_q|…|ffn_down}.weight.lora_a` with PEFT's `A: [r, in]` (ggml ne `[in, r]`) and
//! `….lora_b` with `B: [out, r]` (ne `[r, out]`). llama.cpp stores Llama's q/k weights with
//! their rows permuted for its rope (`reshape(heads, 2, d/2).swapaxes(1, 2)`), so the rows of
//! `B` for `attn_q` / `attn_k` are permuted the same way (with the KV head count for `attn_k`).

use std::path::Path;

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::adapters::lora::{Adapter, LoraWeights, TargetModule};
use crate::adapters::peft::AdapterError;
use crate::backend::GraftBackend;
use crate::formats::gguf::{GgufFile, GgufValue};
use crate::formats::gguf_write::{self, F32Tensor};
use crate::load::assemble::Role;
use crate::load::gguf::{permute_rows, tensor_name};
use crate::model::Model;

/// Writes `adapter` (for `model`) as a GGUF-LoRA file, atomically.
///
/// # Errors
/// An adapter whose modules do not share one `alpha` (llama.cpp has a single `alpha / rank`
/// per file), or an I/O failure.
pub fn save<B: GraftBackend>(
    path: &Path,
    adapter: &Adapter<B>,
    model: &Model<B>,
) -> Result<(), AdapterError> {
    let cfg = &model.config;
    let mut alpha: Option<f32> = None;
    let mut tensors = Vec::new();
    for (layer, t, w) in adapter.modules() {
        if t.per_expert() || t == TargetModule::Router {
            return Err(AdapterError::Unsupported {
                path: path.into(),
                message: format!(
                    "layer {layer} {t}: writing adapters on a router or routed experts as \
                     GGUF-LoRA is not implemented; save as PEFT, or merge the adapter into the base"
                ),
            });
        }
        if t == TargetModule::KvB {
            return Err(AdapterError::Unsupported {
                path: path.into(),
                message: format!(
                    "layer {layer} kv_b_proj: llama.cpp's deepseek2 files split it into \
                     attn_k_b and attn_v_b, which one GGUF-LoRA pair cannot address; save as \
                     PEFT, or merge the adapter into the base"
                ),
            });
        }
        let r = w.rank();
        let a_alpha = w.scale * r as f32;
        match alpha {
            None => alpha = Some(a_alpha),
            Some(x) if (x - a_alpha).abs() <= 1e-5 * x.abs().max(1.0) => {}
            Some(x) => {
                return Err(AdapterError::Unsupported {
                    path: path.into(),
                    message: format!(
                        "layer {layer} {t}: scale·rank = {a_alpha} differs from {x}; GGUF-LoRA holds one alpha for all modules"
                    ),
                })
            }
        }
        let [out_f, _] = w.b.dims();
        let a =
            w.a.clone()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("converted to f32");
        let mut b =
            w.b.clone()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("converted to f32");
        if let Some(heads) = cfg.gguf_permuted_heads(t) {
            b = permute_rows(&b, out_f, heads, false);
        }
        let base = format!("{}.weight", tensor_name(Role::Proj(layer, t), cfg));
        tensors.push(F32Tensor {
            name: format!("{base}.lora_a"),
            shape: w.a.dims().to_vec(),
            data: a,
        });
        tensors.push(F32Tensor {
            name: format!("{base}.lora_b"),
            shape: w.b.dims().to_vec(),
            data: b,
        });
    }
    let alpha = alpha.ok_or_else(|| AdapterError::Unsupported {
        path: path.into(),
        message: "the adapter has no modules".into(),
    })?;
    let meta = vec![
        (
            "general.type".to_string(),
            GgufValue::String("adapter".into()),
        ),
        (
            "general.architecture".to_string(),
            GgufValue::String(cfg.architecture().into()),
        ),
        ("adapter.type".to_string(), GgufValue::String("lora".into())),
        ("adapter.lora.alpha".to_string(), GgufValue::F32(alpha)),
    ];
    gguf_write::write(path, &meta, &tensors).map_err(|source| AdapterError::Io {
        path: path.into(),
        source,
    })
}

/// Reads a GGUF-LoRA file for `model`, checking the architecture and every tensor's shape.
///
/// # Errors
/// Not a LoRA adapter, another architecture, unknown tensors, shape mismatches, non-f32 data.
pub fn load<B: GraftBackend>(path: &Path, model: &Model<B>) -> Result<Adapter<B>, AdapterError> {
    let f = GgufFile::open(path).map_err(|e| AdapterError::Corrupt {
        path: path.into(),
        message: e.to_string(),
    })?;
    let cfg = &model.config;
    let unsupported = |message: String| AdapterError::Unsupported {
        path: path.into(),
        message,
    };
    let text = |k: &str| match f.get(k) {
        Some(GgufValue::String(s)) => Ok(s.clone()),
        other => Err(unsupported(format!(
            "metadata {k} is {other:?}, expected a string"
        ))),
    };
    if text("general.type")? != "adapter" || text("adapter.type")? != "lora" {
        return Err(unsupported(
            "not a LoRA adapter (general.type must be 'adapter', adapter.type 'lora')".into(),
        ));
    }
    let arch = text("general.architecture")?;
    if arch != cfg.architecture() {
        return Err(unsupported(format!(
            "adapter architecture '{arch}' but the base model is '{}'",
            cfg.architecture()
        )));
    }
    let alpha = f
        .opt_f64("adapter.lora.alpha")
        .map_err(|e| unsupported(e.to_string()))?
        .unwrap_or(0.0) as f32;
    let device = model.device();
    let mut adapter = Adapter::empty(model.layers.len());
    for layer in 0..model.layers.len() {
        // The model's own layout: Phi-3's fused gate/up is `ffn_up` there.
        for t in cfg.layer_targets(layer) {
            let base = format!("{}.weight", tensor_name(Role::Proj(layer, t), cfg));
            let (ia, ib) = (
                f.tensor_info(&format!("{base}.lora_a")),
                f.tensor_info(&format!("{base}.lora_b")),
            );
            let (ia, ib) = match (ia, ib) {
                (None, None) => continue,
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(AdapterError::Tensor {
                        path: path.into(),
                        tensor: base,
                        message: "has only one of lora_a and lora_b".into(),
                    })
                }
            };
            let proj = model.layers[layer]
                .proj(t)
                .unwrap_or_else(|| unreachable!("targets() lists the layer's projections"));
            let read = |info: &crate::formats::gguf::GgufTensorInfo| -> Result<(Vec<usize>, Vec<f32>), AdapterError> {
                let shape = info.torch_shape();
                if info.ty != crate::quant::GgmlType::F32 || shape.len() != 2 {
                    return Err(AdapterError::Tensor {
                        path: path.into(),
                        tensor: info.name.clone(),
                        message: format!("{:?} {shape:?}: graft reads f32 matrices", info.ty),
                    });
                }
                let bytes = f.tensor_bytes(info);
                Ok((shape, bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
            };
            let (sa, a) = read(ia)?;
            let (sb, mut b) = read(ib)?;
            if sa[1] != proj.in_features
                || sb[0] != proj.out_features
                || sa[0] != sb[1]
                || sa[0] == 0
            {
                return Err(AdapterError::Tensor {
                    path: path.into(),
                    tensor: base,
                    message: format!(
                        "lora_a {sa:?} / lora_b {sb:?} do not fit the base projection [{}, {}] (expected [r, {}] and [{}, r])",
                        proj.out_features, proj.in_features, proj.in_features, proj.out_features
                    ),
                });
            }
            let r = sa[0];
            if let Some(heads) = cfg.gguf_permuted_heads(t) {
                b = permute_rows(&b, sb[0], heads, true);
            }
            adapter.layers[layer][t.index()] = Some(LoraWeights {
                a: Tensor::from_data(TensorData::new(a, [r, proj.in_features]), device),
                b: Tensor::from_data(TensorData::new(b, [proj.out_features, r]), device),
                scale: if alpha > 0.0 { alpha / r as f32 } else { 1.0 },
                dropout: 0.0,
                experts: 1,
            });
        }
    }
    if adapter.modules().next().is_none() {
        return Err(unsupported(
            "no blk.N.<tensor>.weight.lora_a / lora_b tensors".into(),
        ));
    }
    Ok(adapter)
}
