//! `graft-train export`: a run's adapter (or a PEFT adapter directory) as llama.cpp's
//! GGUF-LoRA file, alone or with an Ollama `Modelfile` that `ollama create` takes; and how a
//! command finds a run's adapter and base model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use graft_core::adapters::lora::Adapter;
use graft_core::burn::backend::Flex;
use graft_core::load::{load, ollama, LoadOptions, LoadedModel, ModelSource};
use graft_core::quant::QuantKind;

use crate::run;
use crate::setup::configs;

/// The adapter directory of `source` (a run or a PEFT directory) and its base model: `model`
/// if given, else the run's `model.base`, else the adapter's `base_model_name_or_path`.
///
/// # Errors
/// An unreadable run config or adapter config, no base to be found.
pub fn resolve(source: &Path, model: Option<String>) -> Result<(PathBuf, String)> {
    let (adapter_dir, run_base) = if source.join(run::CONFIG_FILE).is_file() {
        let cfg = configs(&source.join(run::CONFIG_FILE), &[])?
            .into_iter()
            .next()
            .expect("at least one run");
        (source.join("adapter"), Some(cfg.model.base))
    } else {
        (source.to_path_buf(), None)
    };
    let base = match model.or(run_base) {
        Some(b) => b,
        None => {
            let cfg_path = adapter_dir.join(graft_core::adapters::peft::CONFIG_FILE);
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?;
            let cfg: graft_core::adapters::peft::PeftConfig = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", cfg_path.display()))?;
            cfg.base_model_name_or_path.with_context(|| {
                format!(
                    "{}: no base_model_name_or_path; pass --model",
                    cfg_path.display()
                )
            })?
        }
    };
    Ok((adapter_dir, base))
}

/// Loads `base` and the adapter; `dense` keeps an HF base's weights as they are, else they are
/// held as NF4 (when only the config and shapes are used). GGUF blocks stay packed.
pub(crate) fn load_pair(
    source: &ModelSource,
    base: &str,
    adapter_dir: &Path,
    dense: bool,
) -> Result<(LoadedModel<Flex>, Adapter<Flex>)> {
    let opts = LoadOptions {
        quantize: match source {
            ModelSource::Gguf(_) | ModelSource::Ollama(_) => QuantKind::Keep,
            _ if dense => QuantKind::Keep,
            _ => QuantKind::Nf4,
        },
        ..Default::default()
    };
    let loaded = load::<Flex>(source, opts, &Default::default())
        .with_context(|| format!("loading the base model {base:?}"))?;
    let (adapter, _) = graft_core::adapters::peft::load(adapter_dir, &loaded.model)?;
    Ok((loaded, adapter))
}

/// What `graft-train export` writes.
#[derive(Debug, Clone)]
pub enum ExportTarget {
    /// llama.cpp's GGUF-LoRA file.
    GgufLora(PathBuf),
    /// A directory with `adapter.gguf` (GGUF-LoRA) and a `Modelfile` for `ollama create`.
    Ollama(PathBuf),
}

/// Writes the adapter of `source` (a run or a PEFT directory) for the base `model` (default:
/// the run's or the adapter's base) as `target`.
///
/// # Errors
/// No base model to be found, an adapter that does not fit it, an Ollama export of a base
/// that is not GGUF, an unwritable output.
pub fn export_cmd(source: &Path, target: &ExportTarget, model: Option<String>) -> Result<()> {
    let (adapter_dir, base) = resolve(source, model)?;
    let src = ModelSource::parse(&base)?;
    if matches!(target, ExportTarget::Ollama(_))
        && !matches!(src, ModelSource::Gguf(_) | ModelSource::Ollama(_))
    {
        bail!(
            "Ollama runs GGUF models, and {base} is an HF model: export for a GGUF base \
             (--model FILE.gguf or --model ollama:NAME)"
        );
    }
    let (loaded, adapter) = load_pair(&src, &base, &adapter_dir, false)?;
    let file = match target {
        ExportTarget::GgufLora(f) => f.clone(),
        ExportTarget::Ollama(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.join("adapter.gguf")
        }
    };
    graft_core::adapters::gguf_lora::save(&file, &adapter, &loaded.model)?;
    let ExportTarget::Ollama(dir) = target else {
        tracing::info!(
            "wrote {} ({} modules, architecture {}): llama-cli -m <base.gguf> --lora {}",
            file.display(),
            adapter.modules().count(),
            loaded.model.config.architecture(),
            file.display()
        );
        return Ok(());
    };
    let text = match &src {
        ModelSource::Ollama(name) => {
            let m = ollama::resolve(name, &ollama::store_dir())?;
            modelfile(
                &m.name.short(),
                m.template.as_deref(),
                m.system.as_deref(),
                &m.params,
            )?
        }
        ModelSource::Gguf(path) => {
            let path = std::path::absolute(path)
                .with_context(|| format!("resolving {}", path.display()))?;
            // Ollama derives the prompt template from the GGUF's own chat template; the stop
            // string is the model's end-of-sequence token.
            let mut params = serde_json::Map::new();
            if let Some(eos) = loaded.tokenizer.as_ref().and_then(|t| t.eos_token.clone()) {
                params.insert("stop".into(), vec![eos].into());
            }
            modelfile(&path.display().to_string(), None, None, &params)?
        }
        _ => unreachable!("refused above"),
    };
    let path = dir.join("Modelfile");
    graft_core::atomic::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(
        "wrote {} and {}: ollama create <name> -f {}",
        file.display(),
        path.display(),
        path.display()
    );
    Ok(())
}

/// An Ollama Modelfile: `FROM` the base, `ADAPTER` the GGUF-LoRA next to it, the template,
/// system prompt and parameters (one `PARAMETER stop` line per stop string).
///
/// # Errors
/// A template or system prompt holding `"""`, which a Modelfile cannot quote.
pub fn modelfile(
    from: &str,
    template: Option<&str>,
    system: Option<&str>,
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<String> {
    let mut out = format!(
        "# Written by graft-train export: ollama create <name> -f Modelfile\nFROM {from}\nADAPTER ./adapter.gguf\n"
    );
    for (key, text) in [("TEMPLATE", template), ("SYSTEM", system)] {
        if let Some(t) = text {
            if t.contains("\"\"\"") {
                bail!("the {key} holds \"\"\", which a Modelfile cannot quote");
            }
            out += &format!("{key} \"\"\"{t}\"\"\"\n");
        }
    }
    for (key, value) in params {
        let values = match value {
            serde_json::Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        for v in values {
            // Strings quoted (JSON escapes), numbers and booleans as they are.
            out += &format!("PARAMETER {key} {v}\n");
        }
    }
    Ok(out)
}
