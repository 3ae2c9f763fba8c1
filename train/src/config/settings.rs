//! The checked settings of each config section, made from the raw section by `TryFrom`: every
//! number in its range, paths expanded and resolved, the dataset format with its field
//! mapping. A refusal is a [`FieldError`] naming the section, key and value; the caller adds
//! the file and line.

use std::path::{Path, PathBuf};

use graft_core::adapters::lora::{LoraConfig, TargetModule};
use graft_core::device::DeviceSpec;
use graft_core::quant::QuantKind;
use graft_datasets::format::Format;
use graft_datasets::tokenize::{TrainOn, Truncation};

use super::raw::{
    DpoLoss, Method, RawData, RawEval, RawLora, RawModel, RawOutput, RawPreference, RawTracking,
    RawTrain, Scheduler, TargetModules, TaskMetric,
};

/// A value a section cannot take.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub section: &'static str,
    pub key: &'static str,
    /// The value as written (TOML syntax).
    pub value: String,
    pub why: String,
}

impl FieldError {
    pub(super) fn new(
        section: &'static str,
        key: &'static str,
        value: impl std::fmt::Display,
        why: impl Into<String>,
    ) -> Self {
        FieldError {
            section,
            key,
            value: value.to_string(),
            why: why.into(),
        }
    }
}

/// A raw section with the directory its relative paths are relative to.
pub struct InDir<'a, T> {
    pub raw: &'a T,
    pub dir: &'a Path,
}

/// Checks one section's numbers.
struct Fields(&'static str);

impl Fields {
    fn at_least(&self, key: &'static str, v: i64, min: i64) -> Result<usize, FieldError> {
        if v >= min {
            Ok(v as usize)
        } else {
            Err(FieldError::new(
                self.0,
                key,
                v,
                format!("must be at least {min}"),
            ))
        }
    }

    fn float(
        &self,
        key: &'static str,
        v: f64,
        ok: impl Fn(f64) -> bool,
        why: &str,
    ) -> Result<f64, FieldError> {
        if v.is_finite() && ok(v) {
            Ok(v)
        } else {
            Err(FieldError::new(self.0, key, v, why))
        }
    }

    fn fraction(&self, key: &'static str, v: f64) -> Result<f64, FieldError> {
        self.float(key, v, |x| (0.0..1.0).contains(&x), "must be in [0, 1)")
    }
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

/// `[model]`, checked.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// A local path (resolved against the config's directory) or a hub id.
    pub base: String,
    pub revision: Option<String>,
    pub quantization: QuantKind,
    pub device: DeviceSpec,
}

impl TryFrom<InDir<'_, RawModel>> for ModelSettings {
    type Error = FieldError;
    fn try_from(m: InDir<'_, RawModel>) -> Result<Self, FieldError> {
        if m.raw.base.trim().is_empty() {
            return Err(FieldError::new(
                "model",
                "base",
                "\"\"",
                "name a .gguf file, an HF model directory, ollama:NAME[:TAG] or a hub id",
            ));
        }
        Ok(ModelSettings {
            base: graft_core::load::model_arg_in(m.dir, &m.raw.base),
            revision: m.raw.revision.clone(),
            quantization: m.raw.quantization,
            device: m.raw.device,
        })
    }
}

/// `[lora]`, checked: the adapter's shape. `alpha` must already be resolved (2·r when unset).
impl TryFrom<&RawLora> for LoraConfig {
    type Error = FieldError;
    fn try_from(l: &RawLora) -> Result<Self, FieldError> {
        let f = Fields("lora");
        let r = f.at_least("r", l.r, 1)?;
        let alpha = l.alpha.unwrap_or(2.0 * r as f64);
        let alpha = f.float("alpha", alpha, |x| x > 0.0, "must be positive")?;
        let dropout = f.fraction("dropout", l.dropout)?;
        let target_modules = match &l.target_modules {
            TargetModules::AllLinear => TargetModule::linear().to_vec(),
            TargetModules::List(list) if !list.is_empty() => list.clone(),
            TargetModules::List(_) => {
                return Err(FieldError::new(
                    "lora",
                    "target_modules",
                    "[]",
                    "must be \"all-linear\" or a non-empty list like [\"q_proj\", \"v_proj\"]",
                ))
            }
        };
        let on_params = target_modules
            .iter()
            .filter(|t| t.per_expert() || **t == TargetModule::Router)
            .map(|t| t.name())
            .collect::<Vec<_>>();
        if dropout > 0.0 && !on_params.is_empty() {
            return Err(FieldError::new(
                "lora",
                "dropout",
                dropout.to_string(),
                format!(
                    "must be 0 when target_modules has {}: PEFT applies an adapter on the \
                     router or the experts to the weight, where dropout has no meaning, and \
                     refuses to load such an adapter",
                    on_params.join(", ")
                ),
            ));
        }
        Ok(LoraConfig {
            r,
            lora_alpha: alpha as f32,
            lora_dropout: dropout as f32,
            target_modules,
            use_rslora: l.use_rslora,
        })
    }
}

/// `[data]`, checked: files found, format and field mapping known.
#[derive(Debug, Clone)]
pub struct DataSettings {
    pub train_files: Vec<PathBuf>,
    pub eval_files: Vec<PathBuf>,
    /// None: detected from the first row.
    pub format: Option<Format>,
    /// `tokenizer`, a template name or an inline template (None: the tokenizer's).
    pub chat_template: Option<String>,
    pub train_on: TrainOn,
    pub max_seq_len: usize,
    pub truncation: Truncation,
    pub packing: bool,
    pub eval_fraction: f64,
    /// Resolved by the caller (`train.seed` when unset).
    pub seed: u64,
    pub max_bad_rows: usize,
}

impl TryFrom<InDir<'_, RawData>> for DataSettings {
    type Error = FieldError;
    fn try_from(d: InDir<'_, RawData>) -> Result<Self, FieldError> {
        let (raw, f) = (d.raw, Fields("data"));
        let expand = |key: &'static str, patterns: &[String]| {
            graft_datasets::source::expand(patterns, d.dir)
                .map_err(|e| FieldError::new("data", key, format!("{patterns:?}"), e.to_string()))
        };
        if raw.train.patterns().is_empty() {
            return Err(FieldError::new(
                "data",
                "train",
                "[]",
                "needs a path, a glob or a list of them, e.g. \"train.jsonl\"",
            ));
        }
        let train_files = expand("train", &raw.train.patterns())?;
        let eval_files = match &raw.eval {
            Some(p) if !p.patterns().is_empty() => expand("eval", &p.patterns())?,
            _ => Vec::new(),
        };
        for file in train_files.iter().chain(&eval_files) {
            let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !graft_datasets::source::EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()) {
                return Err(FieldError::new(
                    "data",
                    "train",
                    file.display(),
                    format!(
                        "unsupported file type (expected one of {:?})",
                        graft_datasets::source::EXTENSIONS
                    ),
                ));
            }
        }
        let mut format = raw.format.map(|k| k.format());
        if let Some(fields) = &raw.fields {
            let Some(format) = format.as_mut() else {
                return Err(FieldError::new(
                    "data",
                    "fields",
                    "{…}",
                    "set data.format too, so the field names have a meaning",
                ));
            };
            for (field, column) in fields {
                format
                    .map_field(field, column)
                    .map_err(|why| FieldError::new("data", "fields", field, why.to_string()))?;
            }
        }
        if let Some(t) = &raw.chat_template {
            let inline = t.contains("{{") || t.contains("{%");
            if !inline && t != "tokenizer" && graft_core::text::chat::named_template(t).is_none() {
                return Err(FieldError::new(
                    "data",
                    "chat_template",
                    quoted(t),
                    "must be \"tokenizer\", a template name (chatml, alpaca) or an inline Jinja template",
                ));
            }
        }
        Ok(DataSettings {
            train_files,
            eval_files,
            format,
            chat_template: raw.chat_template.clone(),
            train_on: raw.train_on,
            max_seq_len: f.at_least("max_seq_len", raw.max_seq_len, 2)?,
            truncation: raw.truncation,
            packing: raw.packing,
            eval_fraction: f.fraction("eval_fraction", raw.eval_fraction)?,
            seed: raw.seed.unwrap_or_default(),
            max_bad_rows: f.at_least("max_bad_rows", raw.max_bad_rows, 0)?,
        })
    }
}

/// `[train]`, checked.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub method: Method,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub micro_batch_size: usize,
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub scheduler: Scheduler,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub betas: (f64, f64),
    pub epsilon: f64,
    pub seed: u64,
    pub eval_every: usize,
    pub save_every: usize,
    pub keep_last: usize,
    pub logging_every: usize,
    pub eval_samples: usize,
    pub sample_max_tokens: usize,
    /// The base products' float type (`Model::set_compute_dtype`).
    pub compute_dtype: graft_core::model::ComputeDtype,
    /// Recompute each layer in the backward (`Model::final_hidden_recomputed`).
    pub gradient_checkpointing: bool,
}

impl TryFrom<&RawTrain> for TrainSettings {
    type Error = FieldError;
    fn try_from(t: &RawTrain) -> Result<Self, FieldError> {
        let f = Fields("train");
        if let (Some(_), Some(ratio)) = (t.warmup_steps, t.warmup_ratio) {
            return Err(FieldError::new(
                "train",
                "warmup_ratio",
                ratio,
                "set warmup_steps or warmup_ratio, not both",
            ));
        }
        Ok(TrainSettings {
            method: t.method,
            epochs: f.at_least("epochs", t.epochs, 1)?,
            max_steps: t
                .max_steps
                .map(|v| f.at_least("max_steps", v, 1))
                .transpose()?,
            micro_batch_size: f.at_least("micro_batch_size", t.micro_batch_size, 1)?,
            grad_accum: f.at_least(
                "gradient_accumulation_steps",
                t.gradient_accumulation_steps,
                1,
            )?,
            learning_rate: f.float(
                "learning_rate",
                t.learning_rate,
                |x| x > 0.0,
                "must be positive",
            )?,
            scheduler: t.lr_scheduler,
            warmup_steps: t
                .warmup_steps
                .map(|v| f.at_least("warmup_steps", v, 0))
                .transpose()?,
            warmup_ratio: f.fraction("warmup_ratio", t.warmup_ratio.unwrap_or(0.0))?,
            weight_decay: f.float(
                "weight_decay",
                t.weight_decay,
                |x| x >= 0.0,
                "must not be negative",
            )?,
            max_grad_norm: f.float(
                "max_grad_norm",
                t.max_grad_norm,
                |x| x >= 0.0,
                "must not be negative (0 disables clipping)",
            )?,
            betas: (
                f.fraction("adam_beta1", t.adam_beta1)?,
                f.fraction("adam_beta2", t.adam_beta2)?,
            ),
            epsilon: f.float(
                "adam_epsilon",
                t.adam_epsilon,
                |x| x > 0.0,
                "must be positive",
            )?,
            seed: t.seed,
            eval_every: f.at_least("eval_every", t.eval_every, 0)?,
            save_every: f.at_least("save_every", t.save_every, 0)?,
            keep_last: f.at_least("keep_last_checkpoints", t.keep_last_checkpoints, 1)?,
            logging_every: f.at_least("logging_every", t.logging_every, 1)?,
            eval_samples: f.at_least("eval_samples", t.eval_samples, 0)?,
            sample_max_tokens: f.at_least("sample_max_tokens", t.sample_max_tokens, 1)?,
            compute_dtype: t.compute_dtype,
            gradient_checkpointing: t.gradient_checkpointing,
        })
    }
}

/// `[output]`, checked.
#[derive(Debug, Clone)]
pub struct OutputSettings {
    /// Resolved against the config's directory.
    pub runs_dir: PathBuf,
    pub name: Option<String>,
}

impl TryFrom<InDir<'_, RawOutput>> for OutputSettings {
    type Error = FieldError;
    fn try_from(o: InDir<'_, RawOutput>) -> Result<Self, FieldError> {
        if let Some(n) = &o.raw.name {
            if n.is_empty() || n.contains(['/', '\\']) || n.starts_with('.') {
                return Err(FieldError::new(
                    "output",
                    "name",
                    quoted(n),
                    "must be a plain directory name",
                ));
            }
        }
        Ok(OutputSettings {
            runs_dir: o.dir.join(&o.raw.runs_dir),
            name: o.raw.name.clone(),
        })
    }
}

/// `[tracking]`, checked, with the MLflow environment variables applied.
#[derive(Debug, Clone)]
pub struct TrackingSettings {
    /// The MLflow server, if any.
    pub mlflow: Option<String>,
    pub experiment: String,
    pub wait: std::time::Duration,
}

impl TryFrom<&RawTracking> for TrackingSettings {
    type Error = FieldError;
    fn try_from(t: &RawTracking) -> Result<Self, FieldError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mlflow = t.mlflow.clone().or_else(|| env("MLFLOW_TRACKING_URI"));
        if let Some(uri) = &mlflow {
            if !(uri.starts_with("http://") || uri.starts_with("https://")) {
                let key = if t.mlflow.is_some() {
                    "mlflow"
                } else {
                    "mlflow (from MLFLOW_TRACKING_URI)"
                };
                return Err(FieldError::new(
                    "tracking",
                    key,
                    quoted(uri),
                    "must be an MLflow server's http:// or https:// address (file stores and databricks are not supported)",
                ));
            }
        }
        let wait = t.wait_secs.unwrap_or(30.0);
        if !(wait.is_finite() && wait >= 0.0) {
            return Err(FieldError::new(
                "tracking",
                "wait_secs",
                wait.to_string(),
                "must be a number of seconds ≥ 0",
            ));
        }
        Ok(TrackingSettings {
            mlflow,
            experiment: t
                .experiment
                .clone()
                .or_else(|| env("MLFLOW_EXPERIMENT_NAME"))
                .unwrap_or_else(|| "Default".into()),
            wait: std::time::Duration::from_secs_f64(wait),
        })
    }
}

/// `[eval]`, checked: the regex compiled, the schema read.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    /// Sorted, each once; empty: no task metrics (the default).
    pub metrics: Vec<TaskMetric>,
    /// `eval.regex` anchored at both ends (the whole trimmed answer must match).
    pub regex: Option<regex::Regex>,
    /// The schema file (resolved against the config's directory) and its JSON.
    pub json_schema: Option<(PathBuf, serde_json::Value)>,
    /// Eval examples scored, the first ones (default 64).
    pub max_examples: usize,
    /// Tokens generated per answer (default 64).
    pub max_new_tokens: usize,
    /// Prompts decoded together (default 8).
    pub batch_size: usize,
}

impl TryFrom<InDir<'_, RawEval>> for EvalSettings {
    type Error = FieldError;
    fn try_from(e: InDir<'_, RawEval>) -> Result<Self, FieldError> {
        let (raw, f) = (e.raw, Fields("eval"));
        let mut metrics = raw.metrics.clone();
        metrics.sort();
        metrics.dedup();
        let regex = match &raw.regex {
            None => None,
            Some(r) => Some(
                regex::Regex::new(&format!("^(?:{r})$"))
                    .map_err(|err| FieldError::new("eval", "regex", quoted(r), err.to_string()))?,
            ),
        };
        let json_schema = match &raw.json_schema {
            None => None,
            Some(file) => {
                let path = e.dir.join(file);
                let bad = |why: String| FieldError::new("eval", "json_schema", quoted(file), why);
                let text = std::fs::read_to_string(&path)
                    .map_err(|err| bad(format!("cannot read {}: {err}", path.display())))?;
                let schema: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|err| bad(format!("{} is not JSON: {err}", path.display())))?;
                Some((path, schema))
            }
        };
        for (metric, key, missing) in [
            (TaskMetric::Regex, "regex", regex.is_none()),
            (TaskMetric::JsonSchema, "json_schema", json_schema.is_none()),
        ] {
            if metrics.contains(&metric) && missing {
                return Err(FieldError::new(
                    "eval",
                    "metrics",
                    format!("[\"{}\"]", metric.name()),
                    format!("the {} metric needs eval.{key}", metric.name()),
                ));
            }
        }
        Ok(EvalSettings {
            metrics,
            regex,
            json_schema,
            max_examples: f.at_least("max_examples", raw.max_examples, 1)?,
            max_new_tokens: f.at_least("max_new_tokens", raw.max_new_tokens, 1)?,
            batch_size: f.at_least("batch_size", raw.batch_size, 1)?,
        })
    }
}

/// `[preference]`, checked against the method it applies to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreferenceSettings {
    pub beta: f64,
    pub loss_type: DpoLoss,
    pub precompute_ref_log_probs: bool,
}

impl PreferenceSettings {
    /// The section's settings for a run of `method`.
    ///
    /// # Errors
    /// A non-positive β; a DPO-only setting on an ORPO run.
    pub fn new(raw: &RawPreference, method: Method) -> Result<Self, FieldError> {
        let f = Fields("preference");
        let beta = f.float("beta", raw.beta, |x| x > 0.0, "must be positive")?;
        if method == Method::Orpo {
            if raw.loss_type != DpoLoss::Sigmoid {
                return Err(FieldError::new(
                    "preference",
                    "loss_type",
                    "\"ipo\"",
                    "is a DPO loss; ORPO has its own (train.method = \"orpo\")",
                ));
            }
            if raw.precompute_ref_log_probs {
                return Err(FieldError::new(
                    "preference",
                    "precompute_ref_log_probs",
                    "true",
                    "ORPO has no reference model (train.method = \"orpo\")",
                ));
            }
        }
        Ok(PreferenceSettings {
            beta,
            loss_type: raw.loss_type,
            precompute_ref_log_probs: raw.precompute_ref_log_probs,
        })
    }
}

/// Checks that the data settings fit the training method: preference rows for DPO/ORPO,
/// scored on their completions only.
///
/// # Errors
/// A data format of the other kind; `train_on = "all"` with a preference method.
pub fn check_method_data(method: Method, data: &DataSettings) -> Result<(), FieldError> {
    let preference = method != Method::Sft;
    if let Some(format) = &data.format {
        if format.is_preference() != preference {
            let why = if preference {
                format!(
                    "train.method = \"{}\" trains on preference rows: data.format = \"preference\"",
                    method.name()
                )
            } else {
                "preference rows are trained with train.method = \"dpo\" or \"orpo\"".to_string()
            };
            return Err(FieldError::new(
                "data",
                "format",
                quoted(format.name()),
                why,
            ));
        }
    }
    if preference && data.train_on == TrainOn::All {
        return Err(FieldError::new(
            "data",
            "train_on",
            "\"all\"",
            format!(
                "train.method = \"{}\" scores the completions only; use \"assistant\"",
                method.name()
            ),
        ));
    }
    Ok(())
}
