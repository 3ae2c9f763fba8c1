//! `graft-train export`: a run's adapter (or a PEFT adapter directory) as llama.cpp's
//! GGUF-LoRA file; and how a command finds a run's adapter and base model.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use graft_core::adapters::lora::Adapter;
use graft_core::burn::backend::Flex;
use graft_core::load::{load, LoadOptions, LoadedModel, ModelSource};
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
            ModelSource::Gguf(_) => QuantKind::Keep,
            _ if dense => QuantKind::Keep,
            _ => QuantKind::Nf4,
        },
    };
    let loaded = load::<Flex>(source, opts, &Default::default())
        .with_context(|| format!("loading the base model {base:?}"))?;
    let (adapter, _) = graft_core::adapters::peft::load(adapter_dir, &loaded.model)?;
    Ok((loaded, adapter))
}

/// Writes the adapter of `source` (a run or a PEFT directory) to `out` as GGUF-LoRA for the
/// base `model` (default: the run's or the adapter's base).
///
/// # Errors
/// No base model to be found, an adapter that does not fit it, an unwritable output.
pub fn export_cmd(source: &Path, out: &Path, model: Option<String>) -> Result<()> {
    let (adapter_dir, base) = resolve(source, model)?;
    let (loaded, adapter) = load_pair(&ModelSource::parse(&base)?, &base, &adapter_dir, false)?;
    graft_core::adapters::gguf_lora::save(out, &adapter, &loaded.model)?;
    tracing::info!(
        "wrote {} ({} modules, architecture {}): llama-cli -m <base.gguf> --lora {}",
        out.display(),
        adapter.modules().count(),
        loaded.model.config.architecture(),
        out.display()
    );
    Ok(())
}
