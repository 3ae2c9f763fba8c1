//! The training config: a TOML file in PEFT/axolotl vocabulary, read once at the edge.
//!
//! [`raw::RawConfig`] mirrors the file with typed values and serde defaults; each section
//! becomes checked settings by `TryFrom` ([`settings`]), so a run never starts on an
//! impossible setting, and the resolved config a run saves is the raw config serialized with
//! every default written out. Errors name the file, the line (when the key is in the file, not
//! from `--set`), the key and the value. `--set section.key=value` overrides and `[sweep]`
//! tables (key = [values], one run per combination) act on the parsed table before it is
//! checked.

pub mod raw;
pub mod settings;

use std::path::{Path, PathBuf};

use graft_core::adapters::lora::LoraConfig;
use graft_core::model::ComputeDtype;

pub use raw::TaskMetric;
pub use raw::{DpoLoss, Method, RawConfig, Scheduler};
pub use settings::{
    DataSettings, EvalSettings, FieldError, ModelSettings, OutputSettings, PreferenceSettings,
    TrackingSettings, TrainSettings,
};

use settings::InDir;

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
    read_text(path, text, overrides)
}

/// [`read`] for a config's `text` that is not (or not yet) a file; `path` names it in errors
/// and relative paths are resolved against its directory.
///
/// # Errors
/// As [`read`].
pub fn read_text(
    path: &Path,
    text: String,
    overrides: &[String],
) -> Result<(String, Vec<RawConfig>), ConfigError> {
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
            // No line numbers here: name the key instead.
            serde_path_to_error::deserialize(toml::Value::Table(t)).map_err(|e| {
                invalid(format!(
                    "after --set/sweep: {}: {}",
                    e.path(),
                    e.inner().message()
                ))
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

/// A checked config with every default resolved.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The config file (relative paths are resolved against its directory).
    pub path: PathBuf,
    /// The file's values with every default filled in (what [`TrainConfig::resolved_toml`]
    /// writes).
    pub raw: RawConfig,
    pub model: ModelSettings,
    pub lora: LoraConfig,
    /// Seed of the adapter initialization.
    pub lora_seed: u64,
    pub data: DataSettings,
    pub train: TrainSettings,
    pub output: OutputSettings,
    pub eval: EvalSettings,
    pub preference: PreferenceSettings,
    pub tracking: TrackingSettings,
}

impl TrainConfig {
    /// Checks `raw` (read from `path`, whose text is `text`) and resolves defaults.
    ///
    /// # Errors
    /// The first impossible value, with the line, key and value.
    pub fn from_raw(
        path: &Path,
        text: &str,
        mut raw: RawConfig,
    ) -> Result<TrainConfig, ConfigError> {
        let at = |e: FieldError| {
            let line = match locate(text, e.section, e.key) {
                Some(line) => format!("line {line}: "),
                None => String::new(),
            };
            ConfigError::Invalid {
                path: path.into(),
                message: format!("{line}{}.{} = {}: {}", e.section, e.key, e.value, e.why),
            }
        };
        let dir = path.parent().unwrap_or(Path::new(""));
        // The key's old place (`[model]`): taken where `[train]` leaves the default.
        if let Some(old) = raw.model.compute_dtype.take() {
            if raw.train.compute_dtype != ComputeDtype::default() && raw.train.compute_dtype != old
            {
                return Err(at(FieldError::new(
                    "model",
                    "compute_dtype",
                    format!("\"{old}\""),
                    format!(
                        "moved to train.compute_dtype, which says \"{}\": keep one",
                        raw.train.compute_dtype
                    ),
                )));
            }
            raw.train.compute_dtype = old;
        }
        // Defaults that depend on other settings.
        let seed = raw.train.seed;
        raw.lora.seed.get_or_insert(seed);
        raw.data.seed.get_or_insert(seed);
        let lora = LoraConfig::try_from(&raw.lora).map_err(at)?;
        let train: TrainSettings = (&raw.train).try_into().map_err(at)?;
        let data: DataSettings = InDir {
            raw: &raw.data,
            dir,
        }
        .try_into()
        .map_err(at)?;
        settings::check_method_data(train.method, &data).map_err(at)?;
        let preference = PreferenceSettings::new(&raw.preference, train.method).map_err(at)?;
        // The resolved config names what was trained, not a shorthand for it.
        raw.lora.alpha = Some(f64::from(lora.lora_alpha));
        raw.lora.target_modules = raw::TargetModules::List(lora.target_modules.clone());
        Ok(TrainConfig {
            path: path.into(),
            model: InDir {
                raw: &raw.model,
                dir,
            }
            .try_into()
            .map_err(at)?,
            lora_seed: raw.lora.seed.unwrap_or(seed),
            lora,
            data,
            train,
            preference,
            tracking: (&raw.tracking).try_into().map_err(at)?,
            output: InDir {
                raw: &raw.output,
                dir,
            }
            .try_into()
            .map_err(at)?,
            eval: InDir {
                raw: &raw.eval,
                dir,
            }
            .try_into()
            .map_err(at)?,
            raw,
        })
    }

    /// The resolved config as TOML, every default written out (saved with each run).
    pub fn resolved_toml(&self) -> String {
        let mut raw = self.raw.clone();
        raw.sweep = toml::Table::new();
        toml::to_string_pretty(&raw)
            .unwrap_or_else(|e| format!("# could not serialize the config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::adapters::lora::TargetModule;

    /// A config file with a one-row data file next to it.
    fn config(dir: &Path, extra_train: &str) -> PathBuf {
        std::fs::write(dir.join("d.jsonl"), "{\"text\": \"hi\"}\n").expect("write data");
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            format!(
                "[model]\nbase = \"m.gguf\"\n\n[data]\ntrain = \"d.jsonl\"\n\n[train]\n{extra_train}\n"
            ),
        )
        .expect("write config");
        path
    }

    fn load(path: &Path, set: &[&str]) -> Result<TrainConfig, ConfigError> {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        let (text, raws) = read(path, &set)?;
        let raw = raws.into_iter().next().expect("one run");
        TrainConfig::from_raw(path, &text, raw)
    }

    #[test]
    fn the_resolved_config_reads_back_to_the_same_settings() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = config(dir.path(), "lr_scheduler = \"cosine\"\nwarmup_ratio = 0.1");
        let a = load(&path, &["lora.r=4", "lora.target_modules=[\"q_proj\"]"]).expect("valid");
        let resolved = a.resolved_toml();
        // Every default is written out.
        for key in [
            "alpha = 8.0",
            "quantization = \"keep\"",
            "train_on = \"assistant\"",
            "seed = 42",
        ] {
            assert!(resolved.contains(key), "{key} missing from\n{resolved}");
        }
        let again = dir.path().join("resolved.toml");
        std::fs::write(&again, &resolved).expect("write");
        let b = load(&again, &[]).expect("the resolved config is valid");
        assert_eq!(b.resolved_toml(), resolved);
        assert_eq!(b.lora.r, 4);
        assert_eq!(b.lora.target_modules, a.lora.target_modules);
        assert_eq!(b.train.scheduler, Scheduler::Cosine);
        assert_eq!(b.data.train_files, a.data.train_files);
    }

    /// Runs recorded before the key moved to `[train]` have `[model] compute_dtype = "f32"` in
    /// their config.toml: they still resume, and the resolved config has it in `[train]`.
    #[test]
    fn the_compute_dtype_in_its_old_place_still_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = config(dir.path(), "");
        let old = load(&path, &["model.compute_dtype=\"f32\""]).expect("valid");
        assert_eq!(old.train.compute_dtype, ComputeDtype::F32);
        let moved = load(&path, &["model.compute_dtype=\"bf16\""]).expect("valid");
        assert_eq!(moved.train.compute_dtype, ComputeDtype::Bf16);
        let resolved = moved.resolved_toml();
        assert!(resolved.contains("compute_dtype = \"bf16\""), "{resolved}");
        assert_eq!(resolved.matches("compute_dtype").count(), 1, "{resolved}");
        let e = load(
            &path,
            &[
                "model.compute_dtype=\"bf16\"",
                "train.compute_dtype=\"f16\"",
            ],
        )
        .expect_err("two places disagree")
        .to_string();
        assert!(
            e.contains("model.compute_dtype") && e.contains("keep one"),
            "{e}"
        );
    }

    #[test]
    fn preference_settings_must_fit_the_method_and_the_data() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = config(dir.path(), "method = \"dpo\"");
        let ok = load(&path, &["preference.beta=0.2"]).expect("valid");
        assert_eq!(ok.train.method, Method::Dpo);
        assert_eq!(ok.preference.beta, 0.2);
        for (set, expected) in [
            (
                vec!["data.format=\"chat\""],
                "data.format = \"chat\": train.method = \"dpo\" trains on preference rows",
            ),
            (vec!["data.train_on=\"all\""], "data.train_on = \"all\""),
            (
                vec!["preference.beta=0.0"],
                "preference.beta = 0: must be positive",
            ),
            (
                vec!["train.method=\"orpo\"", "preference.loss_type=\"ipo\""],
                "is a DPO loss",
            ),
            (
                vec![
                    "train.method=\"orpo\"",
                    "preference.precompute_ref_log_probs=true",
                ],
                "ORPO has no reference model",
            ),
            (
                vec!["train.method=\"sft\"", "data.format=\"preference\""],
                "preference rows are trained with train.method = \"dpo\" or \"orpo\"",
            ),
            (vec!["train.method=\"kto\""], "kto"),
        ] {
            let e = load(&path, &set)
                .expect_err(&format!("{set:?}"))
                .to_string();
            assert!(e.contains("c.toml") && e.contains(expected), "{set:?}: {e}");
        }
    }

    #[test]
    fn enum_values_are_refused_with_the_key_and_the_allowed_values() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = config(dir.path(), "optimizer = \"sgd\"");
        let e = load(&path, &[]).expect_err("refused").to_string();
        assert!(
            e.contains("c.toml") && e.contains("line 8") && e.contains("sgd"),
            "{e}"
        );
        assert!(e.contains("adamw"), "the allowed value is named: {e}");
        let path = config(dir.path(), "");
        let e = load(&path, &["data.truncation=\"cut\""])
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("data.truncation") && e.contains("cut") && e.contains("drop"),
            "{e}"
        );
        let e = load(&path, &["model.device=\"tpu\""])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("model.device") && e.contains("tpu"), "{e}");
        let e = load(&path, &["lora.target_modules=[\"q_prj\"]"])
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("lora.target_modules") && e.contains("q_prj"),
            "{e}"
        );
        // PEFT refuses dropout on adapted parameters (the router, the experts).
        let e = load(
            &path,
            &[
                "lora.dropout=0.1",
                "lora.target_modules=[\"q_proj\", \"experts.down_proj\"]",
            ],
        )
        .expect_err("refused")
        .to_string();
        assert!(
            e.contains("lora.dropout") && e.contains("experts.down_proj"),
            "{e}"
        );
        let ok = load(
            &path,
            &["lora.target_modules=[\"router\", \"mlp.experts.gate_up_proj\"]"],
        )
        .expect("PEFT's parameter names are target names");
        assert_eq!(
            ok.lora.target_modules,
            [TargetModule::Router, TargetModule::ExpertsGateUp]
        );
    }
}
