//! `graft-train export`: a run's adapter (or a PEFT adapter directory) as llama.cpp's
//! GGUF-LoRA file.

use std::path::Path;

use anyhow::{Context, Result};
use graft_core::burn::backend::Flex;
use graft_core::load::{load, LoadOptions, ModelSource};

use crate::run;
use crate::setup::configs;

/// Writes the adapter of `source` (a run or a PEFT directory) to `out` as GGUF-LoRA for the
/// base `model` (default: the run's or the adapter's base).
///
/// # Errors
/// No base model to be found, an adapter that does not fit it, an unwritable output.
pub fn export_cmd(source: &Path, out: &Path, model: Option<String>) -> Result<()> {
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
    let loaded = load::<Flex>(
        &ModelSource::parse(&base)?,
        LoadOptions::default(),
        &Default::default(),
    )
    .with_context(|| format!("loading the base model {base:?}"))?;
    let (adapter, _) = graft_core::adapters::peft::load(&adapter_dir, &loaded.model)?;
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
