//! LoRA adapters in Hugging Face PEFT's directory format (`adapter_config.json` +
//! `adapter_model.safetensors`), read and written so that `PeftModel.from_pretrained`, vLLM and
//! graft load the same files. Only this module knows PEFT's key names:
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{q_proj…}.lora_{A|B}.weight`, with
//! `lora_A: [r, in]` and `lora_B: [out, r]`.
//!
//! On an MoE model PEFT (0.17 and later, on transformers 5's 3-D expert parameters) adapts the
//! router and the experts through `target_parameters`, one wrapper per parameter, nested when
//! one module has two: with both of the experts' parameters targeted, `gate_up_proj` is the
//! inner wrapper, saved as `mlp.experts.base_layer.lora_{A|B}.weight`, and `down_proj` the
//! outer one, `mlp.experts.lora_{A|B}.weight`; with one of them targeted, it is
//! `mlp.experts.lora_*`. The router is `mlp.gate.lora_*`. Their tensors stack one pair per
//! expert (layout in [`crate::adapters::lora`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::adapters::lora::{Adapter, LoraConfig, LoraWeights, TargetModule};
use crate::backend::GraftBackend;
use crate::formats::safetensors_read::{Header, ReadError};
use crate::load::assemble::Role;
use crate::model::{Family, Model, ModelConfig};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.model.layers.";

/// Why an adapter could not be read, written or attached to a base model.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid adapter config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("{path}: corrupt safetensors file: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: tensor '{tensor}': {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
}

/// `adapter_config.json`, the fields graft reads and writes. Other PEFT fields are accepted
/// and ignored when they hold their defaults; those that change the math are refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f32,
    #[serde(default)]
    pub lora_dropout: f32,
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    /// Parameters adapted in place (the router and experts of an MoE model), by name or dotted
    /// suffix: `mlp.gate.weight`, `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<Vec<String>>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f32>,
    #[serde(default)]
    pub inference_mode: bool,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f32 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}

impl PeftConfig {
    /// The config PEFT would write for `config` on `base_model` (a model of family `family`).
    pub fn from_lora(config: &LoraConfig, base_model: &str, family: Family) -> Self {
        let mut targets: Vec<&str> = Vec::new();
        let mut params: Vec<String> = Vec::new();
        for t in &config.target_modules {
            match param_name(*t, family) {
                Some(p) => params.push(p),
                None => targets.push(t.hf_name()),
            }
        }
        PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model.into()),
            revision: None,
            r: config.r,
            lora_alpha: config.lora_alpha,
            lora_dropout: config.lora_dropout,
            target_modules: (!targets.is_empty()).then(|| serde_json::json!(targets)),
            target_parameters: (!params.is_empty()).then_some(params),
            use_rslora: config.use_rslora,
            use_dora: false,
            fan_in_fan_out: false,
            bias: "none".into(),
            lora_bias: false,
            modules_to_save: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            inference_mode: true,
        }
    }

    /// `lora_alpha` for the module `name` (e.g. `model.layers.3.self_attn.q_proj`), honouring
    /// `alpha_pattern` keys that name the module or a dotted suffix of it.
    fn alpha_for(&self, name: &str) -> f32 {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| name == k.as_str() || name.ends_with(&format!(".{k}")))
            .map_or(self.lora_alpha, |(_, &a)| a)
    }
}

/// PEFT's `target_parameters` entry for a target that is a parameter, not a module.
fn param_name(t: TargetModule, family: Family) -> Option<String> {
    match t {
        TargetModule::Router => Some(format!("mlp.{}.weight", family.hf_router())),
        TargetModule::ExpertsGateUp => Some("mlp.experts.gate_up_proj".into()),
        TargetModule::ExpertsDown => Some("mlp.experts.down_proj".into()),
        _ => None,
    }
}

/// GPT-OSS interleaves each expert's gate and up outputs (`gate_up_proj`'s columns `2j`,
/// `2j + 1`), so PEFT's `lora_B` rows for it do too; graft keeps the gate rows, then the up
/// rows.
fn interleaves_gate_up(t: TargetModule, model: &ModelConfig) -> bool {
    t == TargetModule::ExpertsGateUp && model.family == Family::GptOss
}

/// `[out, r]` rows from graft's gate-then-up order to the interleaved one, or back.
fn interleave<B: GraftBackend>(b: Tensor<B, 2>, to_interleaved: bool) -> Tensor<B, 2> {
    let [out, r] = b.dims();
    let blocks = match to_interleaved {
        true => [2, out / 2, r],
        false => [out / 2, 2, r],
    };
    b.reshape(blocks).swap_dims(0, 1).reshape([out, r])
}

/// The module path (after `base_model.model.`) under which PEFT saves layer `layer`'s
/// adapter on `t`; `nested` says that the layer's experts have both parameters adapted.
fn module_path(model: &ModelConfig, layer: usize, t: TargetModule, nested: bool) -> String {
    let module = match t {
        TargetModule::ExpertsGateUp if nested => "experts.base_layer",
        TargetModule::Router => model.family.hf_router(),
        TargetModule::ExpertsGateUp | TargetModule::ExpertsDown => t.hf_name(),
        // A linear module: where the checkpoint has it (a shared expert's own path).
        t => return crate::load::hf::module_name(Role::Proj(layer, t), model),
    };
    format!("model.layers.{layer}.{}.{module}", t.hf_parent())
}

/// The error of an I/O failure on `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AdapterError {
    let path = path.to_path_buf();
    move |source| AdapterError::Io { path, source }
}

/// Writes `adapter` as a PEFT directory at `dir`, atomically: the files are written into a
/// temporary sibling directory that is then renamed into place (replacing an older `dir`).
///
/// # Errors
/// On any I/O failure; `dir` is then left as it was.
pub fn save<B: GraftBackend>(
    dir: &Path,
    adapter: &Adapter<B>,
    config: &PeftConfig,
    model: &ModelConfig,
) -> Result<(), AdapterError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dir
        .file_name()
        .map_or("adapter".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    // On a failed write (a full disk) the partial temporary directory goes; `dir` is untouched.
    if let Err(e) = write_files(&tmp, adapter, config, model) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(io(dir))?;
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
    }
    crate::atomic::sync_parent(dir).map_err(io(parent))
}

/// Writes the weights and config of `adapter` into `tmp`, each synced to disk.
fn write_files<B: GraftBackend>(
    tmp: &Path,
    adapter: &Adapter<B>,
    config: &PeftConfig,
    model: &ModelConfig,
) -> Result<(), AdapterError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (li, t, w) in adapter.modules() {
        let nested = adapter.get(li, TargetModule::ExpertsGateUp).is_some()
            && adapter.get(li, TargetModule::ExpertsDown).is_some();
        let key = format!("base_model.model.{}", module_path(model, li, t, nested));
        let b = match interleaves_gate_up(t, model) {
            true => interleave(w.b.clone(), true),
            false => w.b.clone(),
        };
        for (which, tensor) in [("lora_A", &w.a), ("lora_B", &b)] {
            let dims = tensor.dims().to_vec();
            let values = tensor
                .clone()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("converted to f32");
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((format!("{key}.{which}.weight"), dims, bytes));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .expect("shape and byte count agree by construction");
            (n.clone(), view)
        })
        .collect();
    let metadata = Some([("format".to_string(), "pt".to_string())].into());
    let weights = tmp.join(WEIGHTS_FILE);
    safetensors::serialize_to_file(views, metadata, &weights).map_err(|e| AdapterError::Io {
        path: weights.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let cfg_path = tmp.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(config).expect("config serializes");
    std::fs::write(&cfg_path, json).map_err(io(&cfg_path))?;
    for path in [&weights, &cfg_path] {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io(path))?;
    }
    Ok(())
}

/// Reads the PEFT adapter in `dir` and checks it against `model`: every tensor must name a
/// layer and projection the model has, with `A: [r, in]` and `B: [out, r]` of that projection.
///
/// # Errors
/// Missing or malformed files, pickled `.bin` weights, PEFT options graft does not implement
/// (DoRA, `fan_in_fan_out`, LoRA biases, `modules_to_save`), unknown tensors, shape mismatches.
pub fn load<B: GraftBackend>(
    dir: &Path,
    model: &Model<B>,
) -> Result<(Adapter<B>, PeftConfig), AdapterError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| AdapterError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let config: PeftConfig = serde_json::from_str(&text).map_err(|e| AdapterError::Config {
        path: cfg_path.clone(),
        message: e.to_string(),
    })?;
    check_supported(&cfg_path, &config)?;

    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() && dir.join("adapter_model.bin").exists() {
        return Err(AdapterError::Unsupported {
            path: dir.join("adapter_model.bin"),
            message: "pickled PyTorch weights are not loaded (they can run code); save the \
                      adapter with safe_serialization=True to get adapter_model.safetensors"
                .into(),
        });
    }
    let header = Header::read(&weights).map_err(|e| read_error(e, &weights))?;

    // Every name and shape is checked before any data is read.
    let device = model.device();
    let mut adapter = Adapter::empty(model.layers.len());
    let mut keys = Vec::new();
    for t in header.tensors() {
        let key = parse_key(t.name).ok_or_else(|| AdapterError::Tensor {
            path: weights.clone(),
            tensor: t.name.to_string(),
            message: "not a LoRA A/B weight of a decoder projection (expected \
                      base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_<A|B>.weight)"
                .into(),
        })?;
        keys.push(key);
    }
    // Layers whose experts have both parameters adapted (PEFT's nested wrappers).
    let nested: std::collections::BTreeSet<usize> = keys
        .iter()
        .filter(|&&(_, k, _)| k == Key::ExpertsInner)
        .map(|&(l, _, _)| l)
        .collect();
    let targets = resolve_experts(&keys, &nested, &header, &config, model);
    let mut placed = Vec::new();
    for ((t, &(layer, key, is_a)), target) in header.tensors().zip(&keys).zip(targets) {
        let bad = |message: String| AdapterError::Tensor {
            path: weights.clone(),
            tensor: t.name.to_string(),
            message,
        };
        let block = model.layers.get(layer).ok_or_else(|| {
            bad(format!(
                "layer {layer} but the base model has {}",
                model.layers.len()
            ))
        })?;
        let (out_f, in_f, experts) = block.adapter_shape(target).ok_or_else(|| {
            bad(format!(
                "the base model ({}) has no {target} in layer {layer}; its layers have {}",
                model.config.family,
                model
                    .config
                    .adapter_targets()
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let shape = t.shape;
        let [rows, cols] = shape[..] else {
            return Err(bad(format!("expected a matrix, found shape {shape:?}")));
        };
        let (want_other, what) = if is_a {
            (in_f, "columns (the projection's input size)")
        } else {
            (out_f, "rows (the projection's output size)")
        };
        let (other, rank_all) = if is_a { (cols, rows) } else { (rows, cols) };
        if other != want_other {
            return Err(bad(format!(
                "shape {shape:?} has {other} {what} but the base model's {target} has {want_other}"
            )));
        }
        if rank_all % experts != 0 {
            return Err(bad(format!(
                "shape {shape:?}: {rank_all} is not a multiple of the {experts} experts \
                 (PEFT stacks one rank-r pair per expert)"
            )));
        }
        if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(bad(format!(
                "dtype {:?} (expected F32, F16 or BF16)",
                t.dtype
            )));
        }
        // A linear module's key names it where the base model has it (`mlp.gate_proj` of a
        // dense layer, `mlp.shared_expert.gate_proj` of a sparse one).
        if let Key::Module(m) = key {
            let want = module_path(&model.config, layer, m, false);
            if !t.name.contains(&format!(".{want}.")) {
                return Err(bad(format!(
                    "the base model ({}) has layer {layer}'s {target} at {want}",
                    model.config.family
                )));
            }
        }
        placed.push((layer, target, is_a, experts));
    }
    let values = header.read_data().map_err(|e| read_error(e, &weights))?;
    type Pair<B> = (Option<Tensor<B, 2>>, Option<Tensor<B, 2>>, usize);
    let mut pending: BTreeMap<(usize, TargetModule), Pair<B>> = BTreeMap::new();
    for ((layer, target, is_a, experts), data) in placed.into_iter().zip(values) {
        let t = Tensor::from_data(data, device);
        let slot = pending.entry((layer, target)).or_default();
        slot.2 = experts;
        if is_a {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    for ((layer, target), (a, b, experts)) in pending {
        let module = module_path(&model.config, layer, target, nested.contains(&layer));
        let missing = |which: &str| AdapterError::Tensor {
            path: weights.clone(),
            tensor: format!("base_model.model.{module}.{which}.weight"),
            message: "missing (every adapted module needs both lora_A and lora_B)".into(),
        };
        let a = a.ok_or_else(|| missing("lora_A"))?;
        let b = b.ok_or_else(|| missing("lora_B"))?;
        let (rank_all, r_b) = (a.dims()[0], b.dims()[1]);
        if rank_all != r_b || rank_all == 0 {
            return Err(AdapterError::Tensor {
                path: weights.clone(),
                tensor: format!("base_model.model.{module}.lora_B.weight"),
                message: format!("rank {r_b} does not match lora_A's rank {rank_all}"),
            });
        }
        let b = match interleaves_gate_up(target, &model.config) {
            true => interleave(b, false),
            false => b,
        };
        let r = rank_all / experts;
        // alpha_pattern names a module, or for the experts the parameter.
        let alpha = config.alpha_for(&match target {
            TargetModule::ExpertsGateUp | TargetModule::ExpertsDown => {
                format!("model.layers.{layer}.mlp.{}", target.name())
            }
            _ => module_path(&model.config, layer, target, false),
        });
        let scale = if config.use_rslora {
            alpha / (r as f32).sqrt()
        } else {
            alpha / r as f32
        };
        adapter.layers[layer][target.index()] = Some(LoraWeights {
            a,
            b,
            scale,
            dropout: 0.0,
            experts,
        });
    }
    if adapter.modules().next().is_none() {
        return Err(AdapterError::Corrupt {
            path: weights,
            message: "no LoRA tensors".into(),
        });
    }
    Ok((adapter, config))
}

fn read_error(e: ReadError, weights: &Path) -> AdapterError {
    match e {
        ReadError::Io { path, source } => AdapterError::Io { path, source },
        ReadError::Corrupt { message, .. } => AdapterError::Corrupt {
            path: weights.to_path_buf(),
            message,
        },
        // Not the file's fault: an I/O error that a retry may not see.
        ReadError::Changed { path } => AdapterError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "the file changed while it was being read; try again",
            ),
        },
    }
}

fn check_supported(path: &Path, c: &PeftConfig) -> Result<(), AdapterError> {
    let unsupported = |message: String| AdapterError::Unsupported {
        path: path.to_path_buf(),
        message,
    };
    if c.peft_type != "LORA" {
        return Err(unsupported(format!(
            "peft_type '{}' is not LORA",
            c.peft_type
        )));
    }
    if c.use_dora {
        return Err(unsupported(
            "use_dora = true: DoRA adapters are not supported".into(),
        ));
    }
    if c.fan_in_fan_out {
        return Err(unsupported(
            "fan_in_fan_out = true is for GPT-2 Conv1D weights, not these decoders".into(),
        ));
    }
    if c.bias != "none" || c.lora_bias {
        return Err(unsupported(format!(
            "bias = '{}', lora_bias = {}: adapters with trained biases are not supported",
            c.bias, c.lora_bias
        )));
    }
    if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported(format!(
            "modules_to_save = {:?}: fully trained modules are not supported",
            c.modules_to_save.as_deref().unwrap_or_default()
        )));
    }
    if c.alpha_pattern
        .keys()
        .any(|k| k.contains(['*', '(', '[', '|']))
    {
        return Err(unsupported(
            "regular-expression alpha_pattern keys are not supported".into(),
        ));
    }
    Ok(())
}

/// What a key names, before the experts' nesting is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Module(TargetModule),
    /// `mlp.experts.lora_*`: `down_proj`, or the only adapted expert parameter.
    Experts,
    /// `mlp.experts.base_layer.lora_*`: `gate_up_proj` under an adapted `down_proj`.
    ExpertsInner,
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` → `(3, Module(Q), true)`.
fn parse_key(name: &str) -> Option<(usize, Key, bool)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (parent, rest) = rest.split_once('.')?;
    let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, true)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, false)
    };
    let key = match (parent, module) {
        ("mlp", "experts") => Key::Experts,
        ("mlp", "experts.base_layer") => Key::ExpertsInner,
        // `router` in GPT-OSS (checked against the model's layout by the caller)
        ("mlp", "gate" | "router") => Key::Module(TargetModule::Router),
        // A shared expert's projections (checked against the model's layout by the caller).
        ("mlp", module)
            if module
                .strip_prefix("shared_expert.")
                .or_else(|| module.strip_prefix("shared_experts."))
                .is_some_and(|p| ["gate_proj", "up_proj", "down_proj"].contains(&p)) =>
        {
            Key::Module(module.rsplit_once('.')?.1.parse().ok()?)
        }
        (parent, module) => {
            let target: TargetModule = module.parse().ok()?;
            if target.hf_parent() != parent || !TargetModule::linear().contains(&target) {
                return None;
            }
            Key::Module(target)
        }
    };
    Some((layer, key, is_a))
}

/// The target of each key: `mlp.experts.lora_*` is `down_proj` when the layer also has the
/// nested `base_layer` keys; alone, it is the expert parameter `target_parameters` names, or
/// failing that the one its `lora_A`'s input size fits (hidden: `gate_up_proj`).
fn resolve_experts<B: GraftBackend>(
    keys: &[(usize, Key, bool)],
    nested: &std::collections::BTreeSet<usize>,
    header: &Header,
    config: &PeftConfig,
    model: &Model<B>,
) -> Vec<TargetModule> {
    let named = |suffix: &str| {
        config
            .target_parameters
            .iter()
            .flatten()
            .any(|p| p == suffix || p.ends_with(&format!(".{suffix}")))
    };
    let only = match (named("experts.gate_up_proj"), named("experts.down_proj")) {
        (true, false) => Some(TargetModule::ExpertsGateUp),
        (false, true) => Some(TargetModule::ExpertsDown),
        _ => None,
    };
    keys.iter()
        .zip(header.tensors())
        .map(|(&(layer, key, _), t)| match key {
            Key::Module(m) => m,
            Key::ExpertsInner => TargetModule::ExpertsGateUp,
            Key::Experts => {
                if nested.contains(&layer) {
                    return TargetModule::ExpertsDown;
                }
                if let Some(only) = only {
                    return only;
                }
                // By shape: the lora_A of this layer's experts key.
                let a_cols = keys
                    .iter()
                    .zip(header.tensors())
                    .find(|((l, k, is_a), _)| *l == layer && *k == Key::Experts && *is_a)
                    .map(|(_, t)| t.shape.last().copied().unwrap_or(0))
                    .unwrap_or_else(|| t.shape.last().copied().unwrap_or(0));
                if a_cols == model.config.hidden_size {
                    TargetModule::ExpertsGateUp
                } else {
                    TargetModule::ExpertsDown
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_only_for_llama_projections() {
        assert_eq!(
            parse_key("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"),
            Some((12, Key::Module(TargetModule::Down), false))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"),
            Some((1, Key::ExpertsInner, true))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.1.mlp.experts.lora_B.weight"),
            Some((1, Key::Experts, false))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.gate.lora_A.weight"),
            Some((0, Key::Module(TargetModule::Router), true))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.gate.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.2.mlp.shared_expert.up_proj.lora_B.weight"),
            Some((2, Key::Module(TargetModule::Up), false))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.2.mlp.shared_expert_gate.lora_A.weight"),
            Some((2, Key::Module(TargetModule::SharedExpertGate), true))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.2.mlp.shared_expert.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(parse_key("base_model.model.lm_head.weight"), None);
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
            None
        );
    }
}
