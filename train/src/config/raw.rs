//! The config file as written: one serde struct per TOML section, in PEFT/axolotl vocabulary,
//! with `deny_unknown_fields` (a misspelt key is an error naming it) and typed values (a bad
//! enum value is refused by serde with the line, key and the values allowed). Defaults are
//! serde defaults, declared once here, so a parsed file already holds every setting and the
//! resolved config a run saves is this same type serialized.

use std::collections::BTreeMap;

use graft_core::adapters::lora::TargetModule;
use graft_core::device::DeviceSpec;
use graft_core::model::ComputeDtype;
use graft_core::quant::QuantKind;
use graft_datasets::format::FormatKind;
use graft_datasets::tokenize::{TrainOn, Truncation};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub model: RawModel,
    #[serde(default)]
    pub lora: RawLora,
    pub data: RawData,
    #[serde(default)]
    pub train: RawTrain,
    #[serde(default)]
    pub output: RawOutput,
    #[serde(default)]
    pub eval: RawEval,
    /// DPO/ORPO settings (`train.method = "dpo"` or `"orpo"`).
    #[serde(default)]
    pub preference: RawPreference,
    /// An experiment tracker to report the run to, beside its run directory.
    #[serde(default)]
    pub tracking: RawTracking,
    /// `key = [values]`: one run per combination (keys as in `--set`, e.g. `"lora.r"`).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub sweep: toml::Table,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// A local HF directory, a `.gguf` file, `ollama:NAME[:TAG]` (a model Ollama pulled) or a
    /// hub id `owner/name`. Required.
    pub base: String,
    /// Hub revision (branch, tag or commit). Default: `main`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Base weight storage: `nf4` (quantize on load, double quantization), `keep` (as shipped:
    /// GGUF blocks stay packed) or `none` (dense f32). Default: `keep`.
    #[serde(default = "defaults::quantization")]
    pub quantization: QuantKind,
    /// Where `train.compute_dtype` was before it moved to `[train]` (runs recorded then have
    /// `compute_dtype = "f32"` here): still read, moved to `[train]` on resolving.
    #[serde(default, skip_serializing)]
    pub compute_dtype: Option<ComputeDtype>,
    /// `cpu`, `cuda`, `cuda:N`, `wgpu` or `wgpu:N`. Default: `cpu`.
    #[serde(default = "defaults::device")]
    pub device: DeviceSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLora {
    /// Rank. Default: 16.
    #[serde(default = "defaults::r")]
    pub r: i64,
    /// `lora_alpha`; the update is scaled by alpha / r. Default: 2·r.
    #[serde(alias = "lora_alpha", default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Dropout on the adapter input, in [0, 1). Default: 0.
    #[serde(alias = "lora_dropout", default)]
    pub dropout: f64,
    /// Module names (`q_proj` … `down_proj`) or `"all-linear"`. Default: `"all-linear"`.
    #[serde(default)]
    pub target_modules: TargetModules,
    /// rsLoRA scaling alpha / √r. Default: false.
    #[serde(default)]
    pub use_rslora: bool,
    /// `peft` (A kaiming-uniform, B = 0). Default: `peft`.
    #[serde(default)]
    pub init: LoraInit,
    /// Seed of the adapter initialization. Default: `train.seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Default for RawLora {
    fn default() -> Self {
        toml::from_str("").expect("every [lora] key has a default")
    }
}

/// `target_modules`: `"all-linear"` or a list of module names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TargetModules {
    #[default]
    AllLinear,
    List(Vec<TargetModule>),
}

impl Serialize for TargetModules {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModules::AllLinear => s.serialize_str("all-linear"),
            TargetModules::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TargetModules;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"all-linear\" or a list like [\"q_proj\", \"v_proj\"]")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<TargetModules, E> {
                match s {
                    "all-linear" => Ok(TargetModules::AllLinear),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TargetModules, A::Error> {
                let mut out = Vec::new();
                while let Some(t) = seq.next_element::<TargetModule>()? {
                    out.push(t);
                }
                Ok(TargetModules::List(out))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// How the adapter is initialized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// PEFT's: A kaiming-uniform, B = 0.
    #[default]
    Peft,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    /// Training files or globs, relative to the config file. Required.
    pub train: Paths,
    /// Evaluation files or globs. Default: none (see `eval_fraction`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<Paths>,
    /// `chat`, `alpaca`, `completion` or `text`. Default: detected from the first row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FormatKind>,
    /// Field names, e.g. `{ messages = "conversations" }`. Default: the format's own names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, String>>,
    /// `tokenizer` (the model's own, the default), a name (`chatml`, `alpaca`) or an inline
    /// Jinja template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// `assistant` (loss on assistant turns and their end-of-turn token) or `all`.
    /// Default: `assistant`.
    #[serde(default = "defaults::train_on")]
    pub train_on: TrainOn,
    /// Longest example in tokens. Default: 2048.
    #[serde(default = "defaults::max_seq_len")]
    pub max_seq_len: i64,
    /// `truncate` (keep the first max_seq_len tokens) or `drop`. Default: `truncate`.
    #[serde(default = "defaults::truncation")]
    pub truncation: Truncation,
    /// Fill micro-batches with whole examples up to micro_batch_size × max_seq_len tokens.
    /// Default: false.
    #[serde(default)]
    pub packing: bool,
    /// Fraction of training rows held out for evaluation, in [0, 1). Default: 0 (0.1 is common).
    #[serde(default)]
    pub eval_fraction: f64,
    /// Seed of the hold-out split and epoch shuffles. Default: `train.seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Bad rows skipped (and reported) before the run stops. Default: 0.
    #[serde(default)]
    pub max_bad_rows: i64,
}

/// A path or glob, or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a path, a glob or a list of them")]
pub enum Paths {
    One(String),
    Many(Vec<String>),
}

impl Paths {
    pub fn patterns(&self) -> Vec<String> {
        match self {
            Paths::One(p) => vec![p.clone()],
            Paths::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrain {
    /// `sft` (supervised: cross-entropy on the trained tokens), `dpo` (direct preference
    /// optimization against the base as reference) or `orpo` (odds-ratio preference
    /// optimization, no reference). DPO and ORPO read preference rows. Default: `sft`.
    #[serde(default)]
    pub method: Method,
    /// Passes over the training data. Default: 1 (ignored when max_steps is set).
    #[serde(default = "defaults::one")]
    pub epochs: i64,
    /// Optimizer steps; overrides epochs. Default: unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<i64>,
    /// Examples per forward pass. Default: 4.
    #[serde(default = "defaults::micro_batch_size")]
    pub micro_batch_size: i64,
    /// Micro-batches per optimizer step. Default: 1.
    #[serde(default = "defaults::one")]
    pub gradient_accumulation_steps: i64,
    /// Peak learning rate. Default: 2e-4.
    #[serde(default = "defaults::learning_rate")]
    pub learning_rate: f64,
    /// `constant`, `linear` or `cosine` (decay to 0 after warmup). Default: `linear`.
    #[serde(default)]
    pub lr_scheduler: Scheduler,
    /// Warmup steps (linear from 0). Default: 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<i64>,
    /// Warmup as a fraction of the total steps; exclusive with warmup_steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// AdamW decoupled weight decay. Default: 0.
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 disables. Default: 1.0.
    #[serde(default = "defaults::max_grad_norm")]
    pub max_grad_norm: f64,
    /// Only `adamw`. Default: `adamw`.
    #[serde(default)]
    pub optimizer: Optimizer,
    /// AdamW β1. Default: 0.9.
    #[serde(default = "defaults::adam_beta1")]
    pub adam_beta1: f64,
    /// AdamW β2. Default: 0.999.
    #[serde(default = "defaults::adam_beta2")]
    pub adam_beta2: f64,
    /// AdamW ε. Default: 1e-8.
    #[serde(default = "defaults::adam_epsilon")]
    pub adam_epsilon: f64,
    /// Seed of everything not seeded elsewhere. Default: 42.
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// Evaluate every N steps (and at the end); 0 = only at the end. Default: 0.
    #[serde(default)]
    pub eval_every: i64,
    /// Checkpoint every N steps (and at the end); 0 = only at the end. Default: 0.
    #[serde(default)]
    pub save_every: i64,
    /// Checkpoints kept. Default: 2.
    #[serde(default = "defaults::keep_last_checkpoints")]
    pub keep_last_checkpoints: i64,
    /// Log metrics every N steps. Default: 1.
    #[serde(default = "defaults::one")]
    pub logging_every: i64,
    /// Eval prompts answered greedily at each evaluation. Default: 2.
    #[serde(default = "defaults::eval_samples")]
    pub eval_samples: i64,
    /// Tokens per eval sample. Default: 48.
    #[serde(default = "defaults::sample_max_tokens")]
    pub sample_max_tokens: i64,
    /// The float type of the base projections' products: `f32`, `bf16` or `f16` (see
    /// `ComputeDtype`: a half type runs a GPU's half-precision GEMM; the LoRA parameters,
    /// gradients and AdamW's moments stay f32, master weights). Default: `f32`.
    #[serde(default)]
    pub compute_dtype: ComputeDtype,
    /// Recompute each decoder layer's activations in the backward instead of keeping them
    /// (transformers' `gradient_checkpointing`): far less memory for one more forward pass of
    /// the layers. Default: false.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl Default for RawTrain {
    fn default() -> Self {
        toml::from_str("").expect("every [train] key has a default")
    }
}

/// `[eval]`: task metrics. At each evaluation the eval prompts (each example's text before its
/// first trained token) are answered greedily, in batches, and each answer is scored against
/// the example's reference (its trained text).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEval {
    /// Metrics to compute: `exact_match` (answer = reference, whitespace-trimmed), `contains`
    /// (the answer contains the reference), `json_valid` (the answer parses as JSON),
    /// `json_schema` (… and fits `json_schema`), `regex` (the whole answer matches `regex`).
    /// Default: none.
    #[serde(default)]
    pub metrics: Vec<TaskMetric>,
    /// For `regex`: the pattern (Rust `regex` syntax) the whole trimmed answer must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// For `json_schema`: a JSON Schema file, relative to the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<String>,
    /// Eval examples scored (the first N). Default: 64.
    #[serde(default = "defaults::eval_max_examples")]
    pub max_examples: i64,
    /// Tokens generated per answer. Default: 64.
    #[serde(default = "defaults::eval_max_new_tokens")]
    pub max_new_tokens: i64,
    /// Prompts decoded together. Default: 8.
    #[serde(default = "defaults::eval_batch_size")]
    pub batch_size: i64,
}

impl Default for RawEval {
    fn default() -> Self {
        toml::from_str("").expect("every [eval] key has a default")
    }
}

/// `[preference]`: DPO and ORPO, as TRL's `DPOConfig` / `ORPOConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPreference {
    /// DPO: the β of the implicit reward β·log(π/π_ref) (for `ipo`, the τ of the target
    /// margin 1/(2τ)); ORPO: the λ weighting the odds-ratio term. Default: 0.1.
    #[serde(default = "defaults::beta")]
    pub beta: f64,
    /// DPO loss: `sigmoid` (−log σ(β·Δ)) or `ipo` ((Δ/len − 1/(2β))², length-normalized as
    /// TRL). Default: `sigmoid`.
    #[serde(default)]
    pub loss_type: DpoLoss,
    /// DPO: compute the reference log-probabilities of every pair once before training
    /// instead of in every step (one forward per step less). Default: false.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
}

impl Default for RawPreference {
    fn default() -> Self {
        toml::from_str("").expect("every [preference] key has a default")
    }
}

/// The training objective.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Sft,
    Dpo,
    Orpo,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Orpo => "orpo",
        }
    }
}

/// The DPO loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    #[default]
    Sigmoid,
    Ipo,
}

/// A task metric of `[eval]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskMetric {
    ExactMatch,
    Contains,
    JsonValid,
    JsonSchema,
    Regex,
}

impl TaskMetric {
    /// The name in configs and the metrics file (`eval_<name>`).
    pub fn name(self) -> &'static str {
        match self {
            TaskMetric::ExactMatch => "exact_match",
            TaskMetric::Contains => "contains",
            TaskMetric::JsonValid => "json_valid",
            TaskMetric::JsonSchema => "json_schema",
            TaskMetric::Regex => "regex",
        }
    }
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// The optimizer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Optimizer {
    /// Decoupled weight decay (Loshchilov & Hutter), as `torch.optim.AdamW`.
    #[default]
    #[serde(
        rename = "adamw",
        alias = "AdamW",
        alias = "Adamw",
        alias = "adamW",
        alias = "ADAMW"
    )]
    AdamW,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    /// Directory holding one directory per run, relative to the config file. Default: `runs`.
    #[serde(default = "defaults::runs_dir")]
    pub runs_dir: String,
    /// Run name. Default: the config file's stem plus a UTC timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracking {
    /// An MLflow tracking server (`http://host:5000`). Default: the `MLFLOW_TRACKING_URI`
    /// environment variable; neither: no tracker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<String>,
    /// The MLflow experiment. Default: `MLFLOW_EXPERIMENT_NAME`, else `Default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// Seconds the run waits at its end for an unreachable tracker to take what is queued.
    /// Default: 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_secs: Option<f64>,
}

impl Default for RawOutput {
    fn default() -> Self {
        toml::from_str("").expect("every [output] key has a default")
    }
}

/// The defaults the fields above document.
mod defaults {
    use super::*;

    pub fn beta() -> f64 {
        0.1
    }
    pub fn eval_max_examples() -> i64 {
        64
    }
    pub fn eval_max_new_tokens() -> i64 {
        64
    }
    pub fn eval_batch_size() -> i64 {
        8
    }

    pub fn quantization() -> QuantKind {
        QuantKind::Keep
    }
    pub fn device() -> DeviceSpec {
        DeviceSpec::Cpu
    }
    pub fn r() -> i64 {
        16
    }
    pub fn train_on() -> TrainOn {
        TrainOn::Assistant
    }
    pub fn max_seq_len() -> i64 {
        2048
    }
    pub fn truncation() -> Truncation {
        Truncation::Truncate
    }
    pub fn one() -> i64 {
        1
    }
    pub fn micro_batch_size() -> i64 {
        4
    }
    pub fn learning_rate() -> f64 {
        2e-4
    }
    pub fn max_grad_norm() -> f64 {
        1.0
    }
    pub fn adam_beta1() -> f64 {
        0.9
    }
    pub fn adam_beta2() -> f64 {
        0.999
    }
    pub fn adam_epsilon() -> f64 {
        1e-8
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn keep_last_checkpoints() -> i64 {
        2
    }
    pub fn eval_samples() -> i64 {
        2
    }
    pub fn sample_max_tokens() -> i64 {
        48
    }
    pub fn runs_dir() -> String {
        "runs".into()
    }
}
