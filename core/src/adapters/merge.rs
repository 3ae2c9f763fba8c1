//! Merging an adapter into its base for deployment (PEFT's `merge_and_unload`): every adapted
//! weight becomes `W + scale·B·A`, computed in f32 on the base file's own tensors, and the
//! model is written in the base's format —
//!
//! - a GGUF base gives a GGUF file that llama.cpp and Ollama load: the base's metadata
//!   (tokenizer, chat template) carried over, `general.file_type` set, each tensor's rows in
//!   llama.cpp's order (the delta of a Llama q/k projection is permuted as the file's rows
//!   are). A merged tensor is dequantized, gets the delta and is encoded again: in its own type
//!   (`quant = None`), or in the type llama.cpp's mix rules give it for `quant`
//!   ([`crate::quant::mix`]), which also re-encodes the tensors the adapter does not touch;
//! - an HF directory gives an HF directory: the weights in `dtype`, sharded as transformers
//!   shards them, the other files (tokenizer, generation config) copied and `config.json`'s
//!   dtype updated;
//! - a model loaded from anything (a GGUF file) gives an HF directory too ([`merge_to_hf`]):
//!   `config.json` and the tokenizer files written from what the model holds.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use rayon::prelude::*;

use crate::adapters::lora::{Adapter, LoraWeights, TargetModule};
use crate::backend::GraftBackend;
use crate::formats::gguf::{GgufError, GgufFile, GgufValue};
use crate::formats::gguf_write::{self, TensorSpec};
use crate::formats::safetensors_write::{self, FloatDtype, SafetensorSpec};
use crate::load::assemble::Role;
use crate::load::gguf::{permute_rows, tensor_name};
use crate::load::hf::{hf_tensor, hf_tensors, to_f32, HfTensor, Weights};
use crate::load::hf_config::to_hf_json;
use crate::load::LoadError;
use crate::model::ModelConfig;
use crate::model::{Family, Model};
use crate::quant::mix::{quantize_order, FileType, Mix, TensorRef};
use crate::quant::GgmlType;
use crate::text::tokenizer::TokenizerBundle;

/// Why a merge could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: cannot write: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: tensor '{tensor}': {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: tensor '{tensor}': {source}")]
    Encode {
        path: PathBuf,
        tensor: String,
        #[source]
        source: crate::quant::EncodeError,
    },
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
    #[error(transparent)]
    Tokenizer(#[from] crate::text::tokenizer::TokenizerError),
}

impl From<std::io::Error> for MergeError {
    fn from(source: std::io::Error) -> Self {
        MergeError::Io {
            path: PathBuf::new(),
            source,
        }
    }
}

impl MergeError {
    /// Names `path` in an I/O error that has no path yet.
    fn at(self, path: &Path) -> Self {
        match self {
            MergeError::Io { path: p, source } if p.as_os_str().is_empty() => MergeError::Io {
                path: path.into(),
                source,
            },
            other => other,
        }
    }
}

/// What a merge wrote.
#[derive(Debug, Clone, Default)]
pub struct MergeSummary {
    /// Files written (the GGUF file, or the shards).
    pub files: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors the adapter changed.
    pub merged: usize,
    /// Bytes of tensor data.
    pub data_bytes: u64,
    /// Tensor count per type or dtype (`Q4_K`, `F32`, …).
    pub types: BTreeMap<String, usize>,
}

/// `scale·B·A`: the adapter's change to a `[out, in]` weight, row-major f32.
pub fn delta<B: Backend>(w: &LoraWeights<B>) -> Vec<f32> {
    (w.b.clone().matmul(w.a.clone()) * w.scale)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_else(|_| unreachable!("converted to f32"))
}

/// Encodes whole rows of `cols` values in parallel.
fn encode_rows(ty: GgmlType, x: &[f32], cols: usize) -> Result<Vec<u8>, crate::quant::EncodeError> {
    let rows_per_chunk = (1 << 16) / cols.max(1) + 1;
    let parts: Vec<Vec<u8>> = x
        .par_chunks(rows_per_chunk * cols.max(1))
        .map(|c| ty.quantize(c))
        .collect::<Result<_, _>>()?;
    Ok(parts.concat())
}

/// A type graft can write for a merged tensor first stored in `ty`, which it cannot: the
/// nearest one with at least as many bits.
fn writable(ty: GgmlType, cols: usize) -> GgmlType {
    if ty.can_encode() {
        return ty;
    }
    let up = match ty {
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::IQ4_XS => GgmlType::Q4_K,
        GgmlType::Q5_K => GgmlType::Q6_K,
        _ => GgmlType::Q5_0,
    };
    crate::quant::mix::fallback(up, cols)
}

/// One piece of an adapter's change to a base tensor: rows `rows` of module
/// `(layer, target)`'s change (expert `expert`'s, for a per-expert module), added to the
/// tensor's rows from `at` on.
#[derive(Debug, Clone)]
struct Patch {
    layer: usize,
    target: TargetModule,
    expert: Option<usize>,
    rows: Range<usize>,
    at: usize,
    /// The rows are added transposed (`[in, rows]`, at rows `at..at + in`): llama.cpp's
    /// `attn_k_b` holds latent attention's key rows that way.
    transposed: bool,
    /// Column `c` of the change goes to the tensor's column `offset + c·step` (GPT-OSS's
    /// interleaved gate and up); 1 and 0 but there.
    step: usize,
    offset: usize,
}

impl Patch {
    /// `scale·B·A` of the patch's rows, `[rows, in]` row-major.
    fn delta<B: Backend>(&self, adapter: &Adapter<B>) -> Vec<f32> {
        let w = adapter
            .get(self.layer, self.target)
            .expect("patches come from modules()");
        match self.expert {
            Some(e) => delta(&w.expert(e, self.rows.clone())),
            None => {
                let all = delta(w);
                let cols = all.len() / w.b.dims()[0].max(1);
                all[self.rows.start * cols..self.rows.end * cols].to_vec()
            }
        }
    }
}

/// GPT-OSS's experts in its HF checkpoint: per layer one `[experts, hidden, 2·I]`
/// `gate_up_proj` for `x · W` with gate and up interleaved in its columns, and one
/// `[experts, I, hidden]` `down_proj`. Each expert's per-expert patch becomes a transposed
/// one into its block of the 3-D tensor, strided for gate and up.
fn gpt_oss_experts(targets: &mut BTreeMap<String, Vec<Patch>>, config: &ModelConfig) {
    let Some(m) = config
        .moe
        .as_ref()
        .filter(|_| config.family == Family::GptOss)
    else {
        return;
    };
    let (h, i) = (config.hidden_size, m.expert_intermediate);
    for layer in 0..config.num_layers {
        for e in 0..m.num_experts {
            for (t, tensor, rows_per_expert, step, offset) in [
                (TargetModule::Gate, "gate_up_proj", h, 2, 0),
                (TargetModule::Up, "gate_up_proj", h, 2, 1),
                (TargetModule::Down, "down_proj", i, 1, 0),
            ] {
                let Some(list) = targets.remove(&hf_tensor(Role::Expert(layer, e, t), config))
                else {
                    continue;
                };
                let name = format!("model.layers.{layer}.mlp.experts.{tensor}");
                for p in list {
                    targets.entry(name.clone()).or_default().push(Patch {
                        at: e * rows_per_expert,
                        transposed: true,
                        step,
                        offset,
                        ..p
                    });
                }
            }
        }
    }
}

/// Latent attention's `kv_b_proj` patches, for a file that (as llama.cpp's converter now
/// writes it) splits the tensor per head into `attn_k_b` (key rows, transposed) and
/// `attn_v_b` (value rows): each head's rows go to their own place in each.
fn split_kv_b(targets: &mut BTreeMap<String, Vec<Patch>>, base: &GgufFile, config: &ModelConfig) {
    let Some(a) = &config.mla else { return };
    let (heads, dn, dv) = (config.num_heads, a.qk_nope_dim, a.v_head_dim);
    for layer in 0..config.num_layers {
        let name = format!(
            "{}.weight",
            tensor_name(Role::Proj(layer, TargetModule::KvB), config)
        );
        if base.tensor_info(&name).is_some() {
            continue;
        }
        let Some(list) = targets.remove(&name) else {
            continue;
        };
        for p in list {
            for h in 0..heads {
                let first = h * (dn + dv);
                targets
                    .entry(format!("blk.{layer}.attn_k_b.weight"))
                    .or_default()
                    .push(Patch {
                        rows: first..first + dn,
                        at: h * a.kv_lora_rank,
                        transposed: true,
                        ..p.clone()
                    });
                targets
                    .entry(format!("blk.{layer}.attn_v_b.weight"))
                    .or_default()
                    .push(Patch {
                        rows: first + dn..first + dn + dv,
                        at: h * dv,
                        ..p.clone()
                    });
            }
        }
    }
}

/// The base tensors an adapter changes and how, by tensor name. `name` names a role's
/// tensor; with `stacked`, a layer's experts are one 3-D tensor (GGUF's `ffn_*_exps`), expert
/// `e`'s rows following those of the experts before it.
fn patches<B: Backend>(
    adapter: &Adapter<B>,
    name: impl Fn(Role) -> String,
    stacked: bool,
) -> BTreeMap<String, Vec<Patch>> {
    let mut out: BTreeMap<String, Vec<Patch>> = BTreeMap::new();
    for (layer, target, w) in adapter.modules() {
        let out_f = w.b.dims()[0];
        let mut add = |role: Role, expert: Option<usize>, rows: Range<usize>, at: usize| {
            out.entry(name(role)).or_default().push(Patch {
                layer,
                target,
                expert,
                rows,
                at,
                transposed: false,
                step: 1,
                offset: 0,
            })
        };
        match target {
            TargetModule::Router => add(Role::Router(layer), None, 0..out_f, 0),
            TargetModule::ExpertsGateUp | TargetModule::ExpertsDown => {
                let parts: &[(TargetModule, Range<usize>)] = match target {
                    TargetModule::ExpertsGateUp => &[
                        (TargetModule::Gate, 0..out_f / 2),
                        (TargetModule::Up, out_f / 2..out_f),
                    ],
                    _ => &[(TargetModule::Down, 0..out_f)],
                };
                for e in 0..w.experts {
                    for (t, rows) in parts {
                        let at = if stacked { e * rows.len() } else { 0 };
                        add(Role::Expert(layer, e, *t), Some(e), rows.clone(), at);
                    }
                }
            }
            t => add(Role::Proj(layer, t), None, 0..out_f, 0),
        }
    }
    out
}

/// Checks that each patch fits its tensor of `rows` × `cols` (`None`: the base lacks it).
fn check_patches<B: Backend>(
    patches: &BTreeMap<String, Vec<Patch>>,
    adapter: &Adapter<B>,
    shape_of: impl Fn(&str) -> Option<(Vec<usize>, usize, usize)>,
    error: impl Fn(&str, String) -> MergeError,
) -> Result<(), MergeError> {
    for (name, list) in patches {
        for p in list {
            let w = adapter.get(p.layer, p.target).expect("listed by modules()");
            let what = match p.expert {
                Some(e) => format!("layer {} {} (expert {e})", p.layer, p.target),
                None => format!("layer {} {}", p.layer, p.target),
            };
            let Some((shape, rows, cols)) = shape_of(name) else {
                return Err(error(name, format!("missing: the adapter changes {what}")));
            };
            let in_f = w.a.dims()[1];
            let (width, height) = match p.transposed {
                true => (p.rows.len(), in_f),
                false => (in_f, p.rows.len()),
            };
            if cols != width * p.step || p.at + height > rows {
                return Err(error(
                    name,
                    format!(
                        "shape {shape:?} does not hold the adapter's {what}: {} rows of {in_f} \
                         columns from row {}",
                        p.rows.len(),
                        p.at
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Adds `patches`' changes to the row-major tensor `w` of `cols` columns; `permute` maps a
/// whole module's change to the file's row order (llama.cpp's q/k rows).
fn apply<B: Backend>(
    w: &mut [f32],
    cols: usize,
    patches: &[Patch],
    adapter: &Adapter<B>,
    permute: impl Fn(&Patch, Vec<f32>) -> Vec<f32>,
) {
    for p in patches {
        let mut d = permute(p, p.delta(adapter));
        let mut height = p.rows.len();
        if p.transposed {
            let in_f = d.len() / height.max(1);
            d = (0..in_f)
                .flat_map(|c| (0..height).map(move |r| (r, c)))
                .map(|(r, c)| d[r * in_f + c])
                .collect();
            height = in_f;
        }
        let width = d.len() / height.max(1);
        for (r, row) in d.chunks_exact(width.max(1)).enumerate() {
            let base = (p.at + r) * cols + p.offset;
            for (c, v) in row.iter().enumerate() {
                w[base + c * p.step] += v;
            }
        }
    }
}

/// Writes `base` with `adapter` merged into it as the GGUF file `out`.
///
/// # Errors
/// An adapter module whose tensor the file lacks or whose shape differs, a type graft cannot
/// encode, an unwritable output (the previous `out` is then left as it was).
pub fn merge_gguf<B: Backend>(
    base: &GgufFile,
    config: &ModelConfig,
    adapter: &Adapter<B>,
    quant: Option<FileType>,
    out: &Path,
) -> Result<MergeSummary, MergeError> {
    let mut targets = patches(
        adapter,
        |role| format!("{}.weight", tensor_name(role, config)),
        true,
    );
    split_kv_b(&mut targets, base, config);
    // Experts whose gate and up share one `ffn_gate_up_exps` tensor: not patched yet.
    if let Some(name) = targets.keys().find(|n| {
        n.ends_with("ffn_gate_exps.weight")
            && base.tensor_info(n).is_none()
            && base
                .tensor_info(&n.replace("ffn_gate_exps", "ffn_gate_up_exps"))
                .is_some()
    }) {
        return Err(MergeError::Tensor {
            path: base.path().into(),
            tensor: name.replace("ffn_gate_exps", "ffn_gate_up_exps"),
            message: "merging expert adapters into fused gate/up experts is not supported; \
                      merge into the HF checkpoint"
                .into(),
        });
    }
    check_patches(
        &targets,
        adapter,
        |name| {
            let info = base.tensor_info(name)?;
            let shape = info.torch_shape();
            let cols = *shape.last().unwrap_or(&1);
            Some((shape, info.n_elements() as usize / cols.max(1), cols))
        },
        |tensor, message| MergeError::Tensor {
            path: base.path().into(),
            tensor: tensor.into(),
            message,
        },
    )?;
    // llama-quantize's order when re-encoding every tensor (its mix rules count in it), the
    // file's own otherwise.
    let names: Vec<&str> = base.tensors.iter().map(|t| t.name.as_str()).collect();
    let order: Vec<usize> = match quant {
        Some(_) => quantize_order(&names),
        None => (0..names.len()).collect(),
    };
    let mut mix = quant.map(|q| Mix::new(q, config.num_layers, names.iter().copied()));
    let mut summary = MergeSummary::default();
    let specs: Vec<TensorSpec> = order
        .iter()
        .map(|&i| {
            let info = &base.tensors[i];
            let shape = info.torch_shape();
            let cols = *shape.last().unwrap_or(&1);
            let mut ty = match &mut mix {
                Some(m) => m.tensor_type(TensorRef {
                    name: &info.name,
                    shape: &shape,
                    ty: info.ty,
                }),
                None => info.ty,
            };
            if targets.contains_key(&info.name) || ty != info.ty {
                ty = writable(ty, cols);
            }
            *summary.types.entry(format!("{ty:?}")).or_default() += 1;
            TensorSpec {
                name: info.name.clone(),
                shape,
                ty,
            }
        })
        .collect();
    let mut meta: Vec<(String, GgufValue)> = base
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut set = |key: &str, value: GgufValue| match meta.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => meta.push((key.into(), value)),
    };
    if let Some(q) = quant {
        set("general.file_type", GgufValue::U32(q.id()));
    }
    if specs.iter().any(|s| s.ty.block_size() > 1) {
        set("general.quantization_version", GgufValue::U32(2));
    }
    let result = gguf_write::write_with(out, &meta, &specs, |k| {
        let info = &base.tensors[order[k]];
        let spec = &specs[k];
        let target = targets.get(&info.name);
        let bytes = base.tensor_bytes(info);
        if target.is_none() && spec.ty == info.ty {
            return Ok(Cow::Borrowed(bytes));
        }
        let mut w = vec![0f32; info.n_elements() as usize];
        info.ty.dequantize(bytes, &mut w);
        let cols = *spec.shape.last().unwrap_or(&1);
        if let Some(list) = target {
            apply(&mut w, cols, list, adapter, |p, d| {
                match config.gguf_permuted_heads(p.target) {
                    Some(heads) if p.expert.is_none() => {
                        permute_rows(&d, p.rows.len(), heads, false)
                    }
                    _ => d,
                }
            });
        }
        encode_rows(spec.ty, &w, cols)
            .map(Cow::Owned)
            .map_err(|source| MergeError::Encode {
                path: out.into(),
                tensor: info.name.clone(),
                source,
            })
    });
    result.map_err(|e| e.at(out))?;
    summary.files = vec![out.into()];
    summary.tensors = specs.len();
    summary.merged = targets.len();
    summary.data_bytes = specs.iter().filter_map(TensorSpec::n_bytes).sum();
    Ok(summary)
}

/// Writes `model` (loaded from any format, e.g. a GGUF file) with `adapter` merged into it as
/// the HF model directory `out_dir` (new or empty): `config.json` from the model's config, the
/// weights in `dtype` as transformers names them (q/k rows in HF's order, Gemma's norms as
/// `w` of `1 + w`), and the tokenizer as `tokenizer.json`, `tokenizer_config.json` (chat
/// template, special tokens) and `generation_config.json`.
///
/// # Errors
/// A config `config.json` cannot express, a non-empty or unwritable `out_dir`.
pub fn merge_to_hf<B: GraftBackend>(
    model: &Model<B>,
    tokenizer: Option<&TokenizerBundle>,
    adapter: &Adapter<B>,
    dtype: FloatDtype,
    out_dir: &Path,
    max_shard_bytes: usize,
) -> Result<MergeSummary, MergeError> {
    let output = |message: String| MergeError::Output {
        path: out_dir.into(),
        message,
    };
    check_fresh(out_dir)?;
    let mut config = to_hf_json(&model.config).map_err(|e| output(e.0))?;
    config["torch_dtype"] = dtype.torch_name().into();
    // graft keeps no padding id; transformers' own default (Phi-3: 32000) may lie outside a
    // smaller vocabulary
    config["pad_token_id"] = serde_json::Value::Null;
    if let Some(t) = tokenizer {
        config["bos_token_id"] = t.bos_id.into();
        config["eos_token_id"] = match t.eos_ids.as_slice() {
            [one] => (*one).into(),
            many => many.into(),
        };
    }
    let device = model.device();
    let tensors = hf_tensors(model);
    let targets = patches(adapter, |role| hf_tensor(role, &model.config), false);
    let by_name: HashMap<&str, &HfTensor<'_, B>> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    check_patches(
        &targets,
        adapter,
        |name| {
            by_name.get(name).and_then(|t| match t {
                HfTensor::Weight(p) => Some((
                    vec![p.out_features, p.in_features],
                    p.out_features,
                    p.in_features,
                )),
                _ => None,
            })
        },
        |tensor, message| output(format!("tensor '{tensor}': {message}")),
    )?;
    let specs: Vec<SafetensorSpec> = tensors
        .iter()
        .map(|(name, t)| SafetensorSpec {
            name: name.clone(),
            dtype: dtype.safetensors(),
            shape: match t {
                HfTensor::Weight(p) => vec![p.out_features, p.in_features],
                HfTensor::Bias(b) => b.dims().to_vec(),
                HfTensor::Norm(n) => n.weight.dims().to_vec(),
            },
        })
        .collect();
    let offset = model.config.family.hf_norm_offset();
    let values = |t: Tensor<B, 1>| -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap_or_else(|_| unreachable!("converted to f32"))
    };
    let mut merged = 0;
    let files = into_fresh_dir(out_dir, || {
        let files = safetensors_write::write_sharded(out_dir, &specs, max_shard_bytes, |i| {
            let w: Vec<f32> = match &tensors[i].1 {
                HfTensor::Weight(p) => {
                    let mut w = values(p.weight(&device).flatten(0, 1));
                    if let Some(list) = targets.get(&tensors[i].0) {
                        apply(&mut w, p.in_features, list, adapter, |_, d| d);
                        merged += 1;
                    }
                    w
                }
                HfTensor::Bias(b) => values((*b).clone()),
                HfTensor::Norm(n) => values(n.weight.clone())
                    .into_iter()
                    .map(|v| v - offset)
                    .collect(),
            };
            Ok::<_, MergeError>(Cow::Owned(dtype.encode(&w)))
        })
        .map_err(|e| e.at(out_dir))?;
        let write_json = |name: &str, v: &serde_json::Value| -> Result<(), MergeError> {
            let path = out_dir.join(name);
            let text = serde_json::to_string_pretty(v).map_err(std::io::Error::other)?;
            crate::atomic::write_atomic(&path, text.as_bytes())
                .map_err(|source| MergeError::Io { path, source })
        };
        write_json("config.json", &config)?;
        if let Some(t) = tokenizer {
            t.write_hf_files(out_dir, model.config.max_position_embeddings)?;
        }
        Ok(files)
    })?;
    let mut summary = MergeSummary {
        files: files.iter().map(|f| out_dir.join(f)).collect(),
        tensors: specs.len(),
        merged,
        data_bytes: specs.iter().map(|s| s.n_bytes() as u64).sum(),
        types: BTreeMap::new(),
    };
    summary
        .types
        .insert(format!("{:?}", dtype.safetensors()), specs.len());
    Ok(summary)
}

/// Refuses an output directory that holds anything: a merge never mixes its files with others.
fn check_fresh(out_dir: &Path) -> Result<(), MergeError> {
    if out_dir.exists() && std::fs::read_dir(out_dir).map_or(true, |mut d| d.next().is_some()) {
        return Err(MergeError::Output {
            path: out_dir.into(),
            message: "exists and is not an empty directory; merge into a new one".into(),
        });
    }
    Ok(())
}

/// Runs `write` into the fresh directory `out_dir`; if it fails, removes what it wrote, so
/// that no half-written checkpoint is left to load (or to block a rerun).
fn into_fresh_dir<T>(
    out_dir: &Path,
    write: impl FnOnce() -> Result<T, MergeError>,
) -> Result<T, MergeError> {
    std::fs::create_dir_all(out_dir).map_err(|source| MergeError::Io {
        path: out_dir.into(),
        source,
    })?;
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(out_dir);
    }
    result
}

/// Files of an HF model directory that are weights (rewritten), not copied.
fn is_weights_file(name: &str) -> bool {
    name == "model.safetensors.index.json"
        || name == "pytorch_model.bin.index.json"
        || [".safetensors", ".bin", ".pt", ".pth", ".gguf"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

/// Writes the HF model directory `base_dir` with `adapter` merged into it as the directory
/// `out_dir` (new or empty), weights in `dtype` (default: the base's, that of its first
/// floating-point tensor), at most `max_shard_bytes` per file.
///
/// # Errors
/// A base tensor the adapter needs that is missing or has another shape, a non-empty or
/// unwritable `out_dir`, an unreadable base file.
pub fn merge_hf<B: Backend>(
    base_dir: &Path,
    config: &ModelConfig,
    adapter: &Adapter<B>,
    dtype: Option<FloatDtype>,
    out_dir: &Path,
    max_shard_bytes: usize,
) -> Result<MergeSummary, MergeError> {
    check_fresh(out_dir)?;
    let weights = Weights::open(base_dir)?;
    let mut targets = patches(adapter, |role| hf_tensor(role, config), false);
    gpt_oss_experts(&mut targets, config);
    // (name, stored dtype, shape) of every tensor, read once
    let stored = weights
        .names()
        .map(|name| weights.raw(name).map(|(src, shape, _)| (name, src, shape)))
        .collect::<Result<Vec<_>, _>>()?;
    let dtype = dtype
        .or_else(|| {
            stored
                .iter()
                .find_map(|(_, src, _)| FloatDtype::from_safetensors(*src))
        })
        .unwrap_or(FloatDtype::F32);
    let mut summary = MergeSummary::default();
    let specs: Vec<SafetensorSpec> = stored
        .into_iter()
        .map(|(name, src, shape)| {
            // floating-point tensors in `dtype`, others (integer buffers) as stored
            let dt = FloatDtype::from_safetensors(src).map_or(src, |_| dtype.safetensors());
            *summary.types.entry(format!("{dt:?}")).or_default() += 1;
            SafetensorSpec {
                name: name.to_string(),
                dtype: dt,
                shape,
            }
        })
        .collect();
    let tensor_error = |tensor: &str, message: String| MergeError::Tensor {
        path: weights
            .path_of(tensor)
            .map_or_else(|| base_dir.into(), Path::to_path_buf),
        tensor: tensor.into(),
        message,
    };
    let spec_of: HashMap<&str, &SafetensorSpec> =
        specs.iter().map(|s| (s.name.as_str(), s)).collect();
    check_patches(
        &targets,
        adapter,
        |name| {
            let s = spec_of.get(name)?;
            let cols = *s.shape.last().unwrap_or(&1);
            let rows = s.shape.iter().product::<usize>() / cols.max(1);
            Some((s.shape.clone(), rows, cols))
        },
        tensor_error,
    )?;
    let files = into_fresh_dir(out_dir, || {
        let files = safetensors_write::write_sharded(out_dir, &specs, max_shard_bytes, |i| {
            let spec = &specs[i];
            let (src, _, bytes) = weights.raw(&spec.name)?;
            let target = targets.get(&spec.name);
            if target.is_none() && src == spec.dtype {
                return Ok(Cow::Borrowed(bytes));
            }
            let mut w = to_f32(src, bytes).ok_or_else(|| {
                tensor_error(&spec.name, format!("dtype {src:?} cannot be converted"))
            })?;
            if let Some(list) = target {
                let cols = *spec.shape.last().unwrap_or(&1);
                apply(&mut w, cols, list, adapter, |_, d| d);
            }
            Ok::<_, MergeError>(Cow::Owned(dtype.encode(&w)))
        })
        .map_err(|e| e.at(out_dir))?;
        copy_side_files(base_dir, out_dir, dtype)?;
        Ok(files)
    })?;
    summary.files = files.iter().map(|f| out_dir.join(f)).collect();
    summary.tensors = specs.len();
    summary.merged = targets.len();
    summary.data_bytes = specs.iter().map(|s| s.n_bytes() as u64).sum();
    Ok(summary)
}

/// Copies the base directory's other files (tokenizer, generation config, chat template, …)
/// and writes `config.json` with the new dtype.
fn copy_side_files(base_dir: &Path, out_dir: &Path, dtype: FloatDtype) -> Result<(), MergeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MergeError::Io { path, source }
    };
    for entry in std::fs::read_dir(base_dir).map_err(io(base_dir))? {
        let entry = entry.map_err(io(base_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || is_weights_file(&name) || !entry.path().is_file() {
            continue;
        }
        let to = out_dir.join(&name);
        if name == "config.json" {
            let text = std::fs::read_to_string(entry.path()).map_err(io(&entry.path()))?;
            let mut config: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| LoadError::Json {
                    path: entry.path(),
                    source,
                })?;
            if let Some(obj) = config.as_object_mut() {
                // transformers 4 writes torch_dtype, 5 writes dtype; keep whichever is there.
                let key = if obj.contains_key("dtype") {
                    "dtype"
                } else {
                    "torch_dtype"
                };
                obj.insert(key.into(), dtype.torch_name().into());
            }
            let text = serde_json::to_string_pretty(&config).map_err(std::io::Error::other)?;
            crate::atomic::write_atomic(&to, text.as_bytes()).map_err(io(&to))?;
        } else {
            let bytes = std::fs::read(entry.path()).map_err(io(&entry.path()))?;
            crate::atomic::write_atomic(&to, &bytes).map_err(io(&to))?;
        }
    }
    Ok(())
}
