//! The training config: a TOML file in PEFT/axolotl vocabulary, read once at the edge.
//!
//! `RawConfig` mirrors the file (`deny_unknown_fields`, so a misspelt key is an error that
//! names it); [`TrainConfig::from_raw`] checks every value and resolves defaults, so a run
//! never starts on an impossible setting. Errors name the file, the line (when the key is in
//! the file, not from `--set`), the key and the value. `--set section.key=value` overrides and
//! `[sweep]` tables (key = [values], one run per combination) act on the parsed table before
//! it is checked.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use graft_core::adapters::lora::TargetModule;
use graft_core::quant::QuantKind;

/// A config that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file as written. Every field documents its unit and default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// `key = [values]`: one run per combination (keys as in `--set`, e.g. `"lora.r"`).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub sweep: toml::Table,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// A local HF directory, a `.gguf` file or a hub id `owner/name`. Required.
    pub base: String,
    /// Hub revision (branch, tag or commit). Default: `main`.
    pub revision: Option<String>,
    /// Base weight storage: `nf4` (quantize on load, double quantization), `keep` (as shipped:
    /// GGUF blocks stay packed) or `none` (dense f32). Default: `keep`.
    pub quantization: Option<String>,
    /// Compute dtype. Only `f32` today. Default: `f32`.
    pub compute_dtype: Option<String>,
    /// `cpu` or `cuda:N`. Default: `cpu`.
    pub device: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLora {
    /// Rank. Default: 16.
    pub r: Option<i64>,
    /// `lora_alpha`; the update is scaled by alpha / r. Default: 2·r.
    #[serde(alias = "lora_alpha")]
    pub alpha: Option<f64>,
    /// Dropout on the adapter input, in [0, 1). Default: 0.
    #[serde(alias = "lora_dropout")]
    pub dropout: Option<f64>,
    /// Module names (`q_proj` … `down_proj`) or `"all-linear"`. Default: `"all-linear"`.
    pub target_modules: Option<toml::Value>,
    /// rsLoRA scaling alpha / √r. Default: false.
    pub use_rslora: Option<bool>,
    /// `peft` (A kaiming-uniform, B = 0). Default: `peft`.
    pub init: Option<String>,
    /// Seed of the adapter initialization. Default: `train.seed`.
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    /// Training files or globs, relative to the config file. Required.
    pub train: Option<toml::Value>,
    /// Evaluation files or globs. Default: none (see `eval_fraction`).
    pub eval: Option<toml::Value>,
    /// `chat`, `alpaca`, `completion` or `text`. Default: detected from the first row.
    pub format: Option<String>,
    /// Field names, e.g. `{ messages = "conversations" }`. Default: the format's own names.
    pub fields: Option<toml::Table>,
    /// `tokenizer` (the model's own, the default), a name (`chatml`, `alpaca`) or an inline
    /// Jinja template.
    pub chat_template: Option<String>,
    /// `assistant` (loss on assistant turns and their end-of-turn token) or `all`.
    /// Default: `assistant`.
    pub train_on: Option<String>,
    /// Longest example in tokens. Default: 2048.
    pub max_seq_len: Option<i64>,
    /// `truncate` (keep the first max_seq_len tokens) or `drop`. Default: `truncate`.
    pub truncation: Option<String>,
    /// Fill micro-batches with whole examples up to micro_batch_size × max_seq_len tokens.
    /// Default: false.
    pub packing: Option<bool>,
    /// Fraction of training rows held out for evaluation, in [0, 1). Default: 0 (0.1 is common).
    pub eval_fraction: Option<f64>,
    /// Seed of the hold-out split and epoch shuffles. Default: `train.seed`.
    pub seed: Option<u64>,
    /// Bad rows skipped (and reported) before the run stops. Default: 0.
    pub max_bad_rows: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrain {
    /// Passes over the training data. Default: 1 (ignored when max_steps is set).
    pub epochs: Option<i64>,
    /// Optimizer steps; overrides epochs. Default: unset.
    pub max_steps: Option<i64>,
    /// Examples per forward pass. Default: 4.
    pub micro_batch_size: Option<i64>,
    /// Micro-batches per optimizer step. Default: 1.
    pub gradient_accumulation_steps: Option<i64>,
    /// Peak learning rate. Default: 2e-4.
    pub learning_rate: Option<f64>,
    /// `constant`, `linear` or `cosine` (decay to 0 after warmup). Default: `linear`.
    pub lr_scheduler: Option<String>,
    /// Warmup steps (linear from 0). Default: 0.
    pub warmup_steps: Option<i64>,
    /// Warmup as a fraction of the total steps; exclusive with warmup_steps.
    pub warmup_ratio: Option<f64>,
    /// AdamW decoupled weight decay. Default: 0.
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this; 0 disables. Default: 1.0.
    pub max_grad_norm: Option<f64>,
    /// Only `adamw`. Default: `adamw`.
    pub optimizer: Option<String>,
    /// AdamW β1, β2, ε. Defaults: 0.9, 0.999, 1e-8.
    pub adam_beta1: Option<f64>,
    pub adam_beta2: Option<f64>,
    pub adam_epsilon: Option<f64>,
    /// Seed of everything not seeded elsewhere. Default: 42.
    pub seed: Option<u64>,
    /// Evaluate every N steps (and at the end); 0 = only at the end. Default: 0.
    pub eval_every: Option<i64>,
    /// Checkpoint every N steps (and at the end); 0 = only at the end. Default: 0.
    pub save_every: Option<i64>,
    /// Checkpoints kept. Default: 2.
    pub keep_last_checkpoints: Option<i64>,
    /// Log metrics every N steps. Default: 1.
    pub logging_every: Option<i64>,
    /// Eval prompts answered greedily at each evaluation. Default: 2.
    pub eval_samples: Option<i64>,
    /// Tokens per eval sample. Default: 48.
    pub sample_max_tokens: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    /// Directory holding one directory per run, relative to the config file. Default: `runs`.
    pub runs_dir: Option<String>,
    /// Run name. Default: the config file's stem plus a UTC timestamp.
    pub name: Option<String>,
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Constant,
    Linear,
    Cosine,
}

/// A checked config with every default resolved.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The config file (relative paths are resolved against its directory).
    pub path: PathBuf,
    pub raw: RawConfig,
    pub base: String,
    pub revision: Option<String>,
    pub quantization: QuantKind,
    pub device: graft_core::device::DeviceSpec,
    pub lora: graft_core::adapters::lora::LoraConfig,
    pub lora_seed: u64,
    pub train_files: Vec<PathBuf>,
    pub eval_files: Vec<PathBuf>,
    pub format: Option<graft_datasets::format::Format>,
    pub chat_template: Option<String>,
    pub train_on: graft_datasets::tokenize::TrainOn,
    pub max_seq_len: usize,
    pub truncation: graft_datasets::tokenize::Truncation,
    pub packing: bool,
    pub eval_fraction: f64,
    pub data_seed: u64,
    pub max_bad_rows: usize,
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
    pub runs_dir: PathBuf,
    pub name: Option<String>,
}

/// Reads `path`, applies `--set` overrides and expands `[sweep]` into one raw config per run.
///
/// # Errors
/// Unreadable file, TOML syntax, unknown keys or wrong types (with line and column), a
/// malformed override or sweep.
pub fn read(path: &Path, overrides: &[String]) -> Result<(String, Vec<RawConfig>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.into(),
        source,
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.into(),
        message,
    };
    // Deserializing from the text first reports unknown keys and wrong types with positions.
    let parsed: RawConfig =
        toml::from_str(&text).map_err(|e| invalid(e.to_string().trim_end().to_string()))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| invalid(format!("--set '{o}' is not key=value (e.g. lora.r=32)")))?;
        set_key(&mut table, key.trim(), parse_value(value.trim())).map_err(invalid)?;
    }
    let sweep = match table.remove("sweep") {
        Some(toml::Value::Table(t)) => t,
        Some(other) => {
            return Err(invalid(format!(
                "[sweep] must be a table, found {}",
                other.type_str()
            )))
        }
        None => toml::Table::new(),
    };
    let mut tables = vec![table];
    for (key, values) in &sweep {
        let toml::Value::Array(values) = values else {
            return Err(invalid(format!(
                "sweep.\"{key}\" must be a list of values, found {values}"
            )));
        };
        if values.is_empty() {
            return Err(invalid(format!("sweep.\"{key}\" is an empty list")));
        }
        let mut next = Vec::new();
        for t in &tables {
            for v in values {
                let mut t = t.clone();
                set_key(&mut t, key, v.clone()).map_err(|e| invalid(format!("sweep: {e}")))?;
                next.push(t);
            }
        }
        tables = next;
    }
    let mut raws = Vec::with_capacity(tables.len());
    for t in tables {
        let raw: RawConfig = if overrides.is_empty() && sweep.is_empty() {
            parsed.clone()
        } else {
            t.try_into().map_err(|e: toml::de::Error| {
                invalid(format!("after --set/sweep: {}", e.message()))
            })?
        };
        raws.push(raw);
    }
    Ok((text, raws))
}

fn parse_value(s: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {s}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(s.into())),
        Err(_) => toml::Value::String(s.into()),
    }
}

fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!("key '{key}' must be section.key (e.g. lora.r)"));
    }
    let section = table
        .entry(parts[0])
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section) = section else {
        return Err(format!("'{}' is not a section", parts[0]));
    };
    section.insert(parts[1].to_string(), value);
    Ok(())
}

/// The line (1-based) of `key` inside `[section]` of a TOML text, when written there plainly.
pub fn locate(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(h) = l.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            current = h.trim().to_string();
            continue;
        }
        if current == section {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

/// `~/…` expands to the home directory; a relative path that exists next to the config is
/// taken from there; anything else (a hub id, an absolute path) is kept.
fn resolve_base(base: &str, config_dir: &Path) -> String {
    if let Some(rest) = base.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return Path::new(&home).join(rest).display().to_string();
        }
    }
    let local = config_dir.join(base);
    if Path::new(base).is_relative() && local.exists() {
        return local.display().to_string();
    }
    base.to_string()
}

/// Checks values one by one; the first bad one becomes the error.
struct Check<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Check<'_> {
    fn fail<T: std::fmt::Display + ?Sized>(
        &self,
        section: &str,
        key: &str,
        value: &T,
        why: &str,
    ) -> ConfigError {
        let at = match locate(self.text, section, key) {
            Some(line) => format!("line {line}: "),
            None => String::new(),
        };
        ConfigError::Invalid {
            path: self.path.into(),
            message: format!("{at}{section}.{key} = {value}: {why}"),
        }
    }

    fn count(
        &self,
        section: &str,
        key: &str,
        v: Option<i64>,
        default: usize,
        min: i64,
    ) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(x) if x >= min => Ok(x as usize),
            Some(x) => Err(self.fail(section, key, &x, &format!("must be at least {min}"))),
        }
    }

    fn float(
        &self,
        section: &str,
        key: &str,
        v: Option<f64>,
        default: f64,
        ok: impl Fn(f64) -> bool,
        why: &str,
    ) -> Result<f64, ConfigError> {
        match v {
            None => Ok(default),
            Some(x) if x.is_finite() && ok(x) => Ok(x),
            Some(x) => Err(self.fail(section, key, &x, why)),
        }
    }
}

impl TrainConfig {
    /// Checks `raw` (read from `path`, whose text is `text`) and resolves defaults.
    ///
    /// # Errors
    /// The first impossible value, with the line, key and value.
    pub fn from_raw(path: &Path, text: &str, raw: RawConfig) -> Result<TrainConfig, ConfigError> {
        let c = Check { path, text };
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let m = &raw.model;
        if m.base.trim().is_empty() {
            return Err(c.fail(
                "model",
                "base",
                "\"\"",
                "name a .gguf file, an HF model directory or a hub id",
            ));
        }
        let quantization = match m.quantization.as_deref() {
            None => QuantKind::Keep,
            Some(q) => q
                .parse()
                .map_err(|e: String| c.fail("model", "quantization", &format!("\"{q}\""), &e))?,
        };
        if let Some(d) = &m.compute_dtype {
            if d != "f32" {
                return Err(c.fail(
                    "model",
                    "compute_dtype",
                    &format!("\"{d}\""),
                    "only f32 is supported",
                ));
            }
        }
        let device = match m.device.as_deref() {
            None => graft_core::device::DeviceSpec::Cpu,
            Some(d) => d
                .parse()
                .map_err(|e: String| c.fail("model", "device", &format!("\"{d}\""), &e))?,
        };

        let l = &raw.lora;
        let r = c.count("lora", "r", l.r, 16, 1)?;
        let alpha = c.float(
            "lora",
            "alpha",
            l.alpha,
            2.0 * r as f64,
            |x| x > 0.0,
            "must be positive",
        )?;
        let dropout = c.float(
            "lora",
            "dropout",
            l.dropout,
            0.0,
            |x| (0.0..1.0).contains(&x),
            "must be in [0, 1)",
        )?;
        let target_modules = match &l.target_modules {
            None => TargetModule::ALL.to_vec(),
            Some(toml::Value::String(s)) if s == "all-linear" => TargetModule::ALL.to_vec(),
            Some(toml::Value::Array(items)) if !items.is_empty() => {
                let mut out = Vec::new();
                for item in items {
                    let name = item.as_str().ok_or_else(|| {
                        c.fail(
                            "lora",
                            "target_modules",
                            item,
                            "must be a list of module names",
                        )
                    })?;
                    out.push(name.parse().map_err(|e: String| {
                        c.fail("lora", "target_modules", &format!("\"{name}\""), &e)
                    })?);
                }
                out
            }
            Some(v) => {
                return Err(c.fail(
                    "lora",
                    "target_modules",
                    v,
                    "must be \"all-linear\" or a non-empty list like [\"q_proj\", \"v_proj\"]",
                ))
            }
        };
        if let Some(init) = &l.init {
            if init != "peft" {
                return Err(c.fail(
                    "lora",
                    "init",
                    &format!("\"{init}\""),
                    "only \"peft\" (A kaiming-uniform, B = 0) is supported",
                ));
            }
        }

        let d = &raw.data;
        let patterns = |key: &str, v: &Option<toml::Value>| -> Result<Vec<String>, ConfigError> {
            match v {
                None => Ok(Vec::new()),
                Some(toml::Value::String(s)) => Ok(vec![s.clone()]),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| c.fail("data", key, x, "must be a file path or glob"))
                    })
                    .collect(),
                Some(other) => Err(c.fail(
                    "data",
                    key,
                    other,
                    "must be a path, a glob or a list of them",
                )),
            }
        };
        let train_patterns = patterns("train", &d.train)?;
        if train_patterns.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.into(),
                message: "[data] needs train = \"file.jsonl\" (a path, glob or list)".into(),
            });
        }
        let expand = |key: &str, p: &[String]| {
            graft_datasets::source::expand(p, &base_dir)
                .map_err(|e| c.fail("data", key, &format!("{p:?}"), &e.to_string()))
        };
        let train_files = expand("train", &train_patterns)?;
        let eval_patterns = patterns("eval", &d.eval)?;
        let eval_files = if eval_patterns.is_empty() {
            Vec::new()
        } else {
            expand("eval", &eval_patterns)?
        };
        for f in train_files.iter().chain(&eval_files) {
            let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !graft_datasets::source::EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()) {
                return Err(c.fail(
                    "data",
                    "train",
                    &f.display(),
                    &format!(
                        "unsupported file type (expected one of {:?})",
                        graft_datasets::source::EXTENSIONS
                    ),
                ));
            }
        }
        let mut format = match &d.format {
            None => None,
            Some(name) => Some(graft_datasets::format::Format::named(name).ok_or_else(|| {
                c.fail(
                    "data",
                    "format",
                    &format!("\"{name}\""),
                    "must be chat, alpaca, completion or text",
                )
            })?),
        };
        if let Some(fields) = &d.fields {
            let Some(f) = format.as_mut() else {
                return Err(c.fail(
                    "data",
                    "fields",
                    &"{…}",
                    "set data.format too, so the field names have a meaning",
                ));
            };
            for (k, v) in fields {
                let name = v
                    .as_str()
                    .ok_or_else(|| c.fail("data", "fields", v, "field names must be strings"))?
                    .to_string();
                use graft_datasets::format::Format as F;
                let slot = match (&mut *f, k.as_str()) {
                    (F::Chat { messages }, "messages") => messages,
                    (F::Alpaca { instruction, .. }, "instruction") => instruction,
                    (F::Alpaca { input, .. }, "input") => input,
                    (F::Alpaca { output, .. }, "output") => output,
                    (F::Completion { prompt, .. }, "prompt") => prompt,
                    (F::Completion { completion, .. }, "completion") => completion,
                    (F::Text { text }, "text") => text,
                    (f, _) => {
                        return Err(c.fail(
                            "data",
                            "fields",
                            k,
                            &format!("the {} format has the fields {:?}", f.name(), f.fields()),
                        ))
                    }
                };
                *slot = name;
            }
        }
        use graft_datasets::tokenize::{TrainOn, Truncation};
        let train_on = match d.train_on.as_deref() {
            None | Some("assistant") => TrainOn::Assistant,
            Some("all") => TrainOn::All,
            Some(o) => {
                return Err(c.fail(
                    "data",
                    "train_on",
                    &format!("\"{o}\""),
                    "must be \"assistant\" or \"all\"",
                ))
            }
        };
        let truncation = match d.truncation.as_deref() {
            None | Some("truncate") => Truncation::Truncate,
            Some("drop") => Truncation::Drop,
            Some(o) => {
                return Err(c.fail(
                    "data",
                    "truncation",
                    &format!("\"{o}\""),
                    "must be \"truncate\" or \"drop\"",
                ))
            }
        };
        if let Some(t) = &d.chat_template {
            let inline = t.contains("{{") || t.contains("{%");
            if !inline && t != "tokenizer" && graft_core::text::chat::named_template(t).is_none() {
                return Err(c.fail(
                    "data",
                    "chat_template",
                    &format!("\"{t}\""),
                    "must be \"tokenizer\", a template name (chatml, alpaca) or an inline Jinja template",
                ));
            }
        }
        let max_seq_len = c.count("data", "max_seq_len", d.max_seq_len, 2048, 2)?;
        let eval_fraction = c.float(
            "data",
            "eval_fraction",
            d.eval_fraction,
            0.0,
            |x| (0.0..1.0).contains(&x),
            "must be in [0, 1)",
        )?;

        let t = &raw.train;
        let seed = t.seed.unwrap_or(42);
        let scheduler = match t.lr_scheduler.as_deref() {
            None | Some("linear") => Scheduler::Linear,
            Some("constant") => Scheduler::Constant,
            Some("cosine") => Scheduler::Cosine,
            Some(o) => {
                return Err(c.fail(
                    "train",
                    "lr_scheduler",
                    &format!("\"{o}\""),
                    "must be constant, linear or cosine",
                ))
            }
        };
        if let Some(o) = &t.optimizer {
            if o.to_ascii_lowercase() != "adamw" {
                return Err(c.fail(
                    "train",
                    "optimizer",
                    &format!("\"{o}\""),
                    "only \"adamw\" is supported",
                ));
            }
        }
        if t.warmup_steps.is_some() && t.warmup_ratio.is_some() {
            return Err(c.fail(
                "train",
                "warmup_ratio",
                &t.warmup_ratio.unwrap_or_default(),
                "set warmup_steps or warmup_ratio, not both",
            ));
        }
        let max_steps = match t.max_steps {
            None => None,
            Some(_) => Some(c.count("train", "max_steps", t.max_steps, 0, 1)?),
        };
        let runs_dir = base_dir.join(raw.output.runs_dir.as_deref().unwrap_or("runs"));
        if let Some(n) = &raw.output.name {
            if n.is_empty() || n.contains(['/', '\\']) || n.starts_with('.') {
                return Err(c.fail(
                    "output",
                    "name",
                    &format!("\"{n}\""),
                    "must be a plain directory name",
                ));
            }
        }
        let base = resolve_base(&m.base, &base_dir);
        Ok(TrainConfig {
            path: path.into(),
            base,
            revision: m.revision.clone(),
            quantization,
            device,
            lora: graft_core::adapters::lora::LoraConfig {
                r,
                lora_alpha: alpha as f32,
                lora_dropout: dropout as f32,
                target_modules,
                use_rslora: l.use_rslora.unwrap_or(false),
            },
            lora_seed: l.seed.unwrap_or(seed),
            train_files,
            eval_files,
            format,
            chat_template: d.chat_template.clone(),
            train_on,
            max_seq_len,
            truncation,
            packing: d.packing.unwrap_or(false),
            eval_fraction,
            data_seed: d.seed.unwrap_or(seed),
            max_bad_rows: c.count("data", "max_bad_rows", d.max_bad_rows, 0, 0)?,
            epochs: c.count("train", "epochs", t.epochs, 1, 1)?,
            max_steps,
            micro_batch_size: c.count("train", "micro_batch_size", t.micro_batch_size, 4, 1)?,
            grad_accum: c.count(
                "train",
                "gradient_accumulation_steps",
                t.gradient_accumulation_steps,
                1,
                1,
            )?,
            learning_rate: c.float(
                "train",
                "learning_rate",
                t.learning_rate,
                2e-4,
                |x| x > 0.0,
                "must be positive",
            )?,
            scheduler,
            warmup_steps: match t.warmup_steps {
                None => None,
                Some(_) => Some(c.count("train", "warmup_steps", t.warmup_steps, 0, 0)?),
            },
            warmup_ratio: c.float(
                "train",
                "warmup_ratio",
                t.warmup_ratio,
                0.0,
                |x| (0.0..1.0).contains(&x),
                "must be in [0, 1)",
            )?,
            weight_decay: c.float(
                "train",
                "weight_decay",
                t.weight_decay,
                0.0,
                |x| x >= 0.0,
                "must not be negative",
            )?,
            max_grad_norm: c.float(
                "train",
                "max_grad_norm",
                t.max_grad_norm,
                1.0,
                |x| x >= 0.0,
                "must not be negative (0 disables clipping)",
            )?,
            betas: (
                c.float(
                    "train",
                    "adam_beta1",
                    t.adam_beta1,
                    0.9,
                    |x| (0.0..1.0).contains(&x),
                    "must be in [0, 1)",
                )?,
                c.float(
                    "train",
                    "adam_beta2",
                    t.adam_beta2,
                    0.999,
                    |x| (0.0..1.0).contains(&x),
                    "must be in [0, 1)",
                )?,
            ),
            epsilon: c.float(
                "train",
                "adam_epsilon",
                t.adam_epsilon,
                1e-8,
                |x| x > 0.0,
                "must be positive",
            )?,
            seed,
            eval_every: c.count("train", "eval_every", t.eval_every, 0, 0)?,
            save_every: c.count("train", "save_every", t.save_every, 0, 0)?,
            keep_last: c.count(
                "train",
                "keep_last_checkpoints",
                t.keep_last_checkpoints,
                2,
                1,
            )?,
            logging_every: c.count("train", "logging_every", t.logging_every, 1, 1)?,
            eval_samples: c.count("train", "eval_samples", t.eval_samples, 2, 0)?,
            sample_max_tokens: c.count("train", "sample_max_tokens", t.sample_max_tokens, 48, 1)?,
            runs_dir,
            name: raw.output.name.clone(),
            raw,
        })
    }

    /// The resolved config as TOML, every default written out (saved with each run).
    pub fn resolved_toml(&self) -> String {
        let mut raw = self.raw.clone();
        let m = &mut raw.model;
        m.quantization = Some(
            match self.quantization {
                QuantKind::Keep => "keep",
                QuantKind::Nf4 => "nf4",
                QuantKind::None => "none",
            }
            .into(),
        );
        m.compute_dtype = Some("f32".into());
        m.device = Some(self.device.to_string());
        let l = &mut raw.lora;
        l.r = Some(self.lora.r as i64);
        l.alpha = Some(f64::from(self.lora.lora_alpha));
        l.dropout = Some(f64::from(self.lora.lora_dropout));
        l.target_modules = Some(toml::Value::Array(
            self.lora
                .target_modules
                .iter()
                .map(|t| toml::Value::String(t.hf_name().into()))
                .collect(),
        ));
        l.use_rslora = Some(self.lora.use_rslora);
        l.init = Some("peft".into());
        l.seed = Some(self.lora_seed);
        let d = &mut raw.data;
        d.train_on = Some(
            match self.train_on {
                graft_datasets::tokenize::TrainOn::All => "all",
                _ => "assistant",
            }
            .into(),
        );
        d.max_seq_len = Some(self.max_seq_len as i64);
        d.truncation = Some(
            match self.truncation {
                graft_datasets::tokenize::Truncation::Drop => "drop",
                _ => "truncate",
            }
            .into(),
        );
        d.packing = Some(self.packing);
        d.eval_fraction = Some(self.eval_fraction);
        d.seed = Some(self.data_seed);
        d.max_bad_rows = Some(self.max_bad_rows as i64);
        let t = &mut raw.train;
        t.epochs = Some(self.epochs as i64);
        t.micro_batch_size = Some(self.micro_batch_size as i64);
        t.gradient_accumulation_steps = Some(self.grad_accum as i64);
        t.learning_rate = Some(self.learning_rate);
        t.lr_scheduler = Some(format!("{:?}", self.scheduler).to_lowercase());
        t.weight_decay = Some(self.weight_decay);
        t.max_grad_norm = Some(self.max_grad_norm);
        t.optimizer = Some("adamw".into());
        t.adam_beta1 = Some(self.betas.0);
        t.adam_beta2 = Some(self.betas.1);
        t.adam_epsilon = Some(self.epsilon);
        t.seed = Some(self.seed);
        t.eval_every = Some(self.eval_every as i64);
        t.save_every = Some(self.save_every as i64);
        t.keep_last_checkpoints = Some(self.keep_last as i64);
        t.logging_every = Some(self.logging_every as i64);
        t.eval_samples = Some(self.eval_samples as i64);
        t.sample_max_tokens = Some(self.sample_max_tokens as i64);
        raw.sweep = toml::Table::new();
        toml::to_string_pretty(&raw)
            .unwrap_or_else(|e| format!("# could not serialize the config: {e}\n"))
    }
}
