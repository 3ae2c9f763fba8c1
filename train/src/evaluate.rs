//! `graft-train eval`: task metrics for an adapter (or the base alone) on a data file, without
//! training. A run's own config says how the data is formatted and which metrics to compute;
//! for a bare adapter directory the defaults apply (format detected, the model's chat
//! template); `--set eval.metrics=[…]` and the other `--set` keys override either.

use std::path::Path;

use anyhow::{Context, Result};
use graft_core::burn::backend::Flex;

use graft_datasets::format::Format;
use graft_datasets::preference::Pair;
use graft_datasets::tokenize::Tokenized;

use crate::config::{self, Method, TrainConfig};
use crate::export::resolve;
use crate::run;
use crate::setup::{load_model, prepare_data};
use crate::task_eval::{evaluate, TaskReport};

/// Scores `source`'s adapter (a run or a PEFT directory; `base_only`: no adapter) on every
/// example of `data`; writes each answer to `out` (JSON Lines) if given.
///
/// # Errors
/// An unreadable config, data or model; an adapter that does not fit; no metric asked for.
pub fn eval_cmd(
    source: &Path,
    data: &Path,
    model: Option<String>,
    base_only: bool,
    set: &[String],
    out: Option<&Path>,
) -> Result<TaskReport> {
    let data = std::path::absolute(data).with_context(|| format!("{}", data.display()))?;
    let mut overrides = vec![
        format!("data.train={:?}", data.display().to_string()),
        "data.eval=[]".to_string(),
        "data.eval_fraction=0.0".to_string(),
    ];
    let run_config = source.join(run::CONFIG_FILE);
    let (path, text) = if run_config.is_file() {
        let text = std::fs::read_to_string(&run_config)
            .with_context(|| format!("reading {}", run_config.display()))?;
        (run_config, text)
    } else {
        let (_, base) = resolve(source, model.clone())?;
        (
            source.join("graft-eval.toml"),
            format!("[model]\nbase = {base:?}\n[data]\ntrain = []\n"),
        )
    };
    if let Some(m) = &model {
        overrides.push(format!("model.base={m:?}"));
    }
    // A schema named on the command line is relative to where the command runs.
    for s in set {
        match s.split_once('=') {
            Some((key, value)) if key.trim() == "eval.json_schema" => {
                let file = value.trim().trim_matches(['"', '\'']);
                let file = std::path::absolute(file).unwrap_or_else(|_| file.into());
                overrides.push(format!("eval.json_schema={:?}", file.display().to_string()));
            }
            _ => overrides.push(s.clone()),
        }
    }
    let build = |overrides: &[String]| -> Result<TrainConfig> {
        let (text, raws) = config::read_text(&path, text.clone(), overrides)?;
        let raw = raws.into_iter().next().context("the config has no run")?;
        Ok(TrainConfig::from_raw(&path, &text, raw)?)
    };
    let mut cfg = build(&overrides)?;
    // Preference rows are scored on their chosen completion; the method only says which kind
    // of rows the data holds.
    let paired = match &cfg.data.format {
        Some(f) => f.is_preference(),
        None => {
            let (rows, _) = graft_datasets::source::read_file(&data)?;
            rows.first()
                .and_then(|r| Format::detect(r).ok())
                .is_some_and(|f| f.is_preference())
        }
    };
    if paired != (cfg.train.method != Method::Sft) {
        overrides.push(format!(
            "train.method={:?}",
            if paired { "dpo" } else { "sft" }
        ));
        cfg = build(&overrides)?;
    }
    if cfg.eval.metrics.is_empty() {
        anyhow::bail!(
            "no task metric to compute: add --set 'eval.metrics=[\"exact_match\", \"contains\"]' \
             (exact_match, contains, json_valid, json_schema with eval.json_schema, regex with eval.regex)"
        );
    }
    let device = Default::default();
    let loaded = load_model::<Flex>(&cfg, &device)?;
    let examples: Vec<Tokenized> = if paired {
        prepare_data::<_, Pair>(&cfg, &loaded)?
            .train
            .into_iter()
            .map(|p| p.chosen().clone())
            .collect()
    } else {
        prepare_data::<_, Tokenized>(&cfg, &loaded)?.train
    };
    let adapter = if base_only {
        None
    } else {
        let dir = if source.join(run::CONFIG_FILE).is_file() {
            source.join("adapter")
        } else {
            source.to_path_buf()
        };
        Some(graft_core::adapters::peft::load(&dir, &loaded.model.model)?.0)
    };
    let tokenizer = loaded
        .model
        .tokenizer
        .as_ref()
        .expect("load_model checks the tokenizer");
    let report = evaluate(
        &loaded.model.model,
        tokenizer,
        adapter.as_ref(),
        &examples.iter().collect::<Vec<_>>(),
        &cfg.eval,
    )?;
    if let Some(out) = out {
        let lines: String = report
            .answers
            .iter()
            .map(|a| serde_json::to_string(a).unwrap_or_default() + "\n")
            .collect();
        graft_core::atomic::write_atomic(out, lines.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    tracing::info!(
        "{} on {} examples of {} ({}): {}",
        if base_only { "base model" } else { "adapter" },
        report.answers.len(),
        data.display(),
        cfg.model.base,
        report.summary()
    );
    Ok(report)
}
