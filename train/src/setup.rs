//! What every command needs before it works: the checked configs of a file, the model with
//! its chat template, and the tokenized data.

use std::path::Path;

use anyhow::{Context, Result};
use graft_core::backend::GraftBackend;
use graft_core::load::{load, LoadOptions, ModelSource};
use graft_core::text::chat::ChatTemplate;
use graft_datasets::prepare::{prepare, DataSpec, Prepared, Sample};
use graft_datasets::tokenize::Tokenizer;

use crate::config::{self, TrainConfig};

/// Reads and checks every run of a config before any work starts.
///
/// # Errors
/// An unreadable or invalid config, naming the file, line, key and value.
pub fn configs(path: &Path, set: &[String]) -> Result<Vec<TrainConfig>> {
    let (text, raws) = config::read(path, set)?;
    raws.into_iter()
        .map(|raw| TrainConfig::from_raw(path, &text, raw).map_err(Into::into))
        .collect()
}

/// A base model ready to train on, with the chat template its data is rendered with.
pub struct Loaded<B: GraftBackend> {
    pub model: graft_core::load::LoadedModel<B>,
    pub template: Option<ChatTemplate>,
}

/// Loads `model.base` (quantized as configured) and the chat template `data.chat_template`
/// names.
///
/// # Errors
/// A model that does not load or has no tokenizer; a template that does not compile.
pub fn load_model<B: GraftBackend>(cfg: &TrainConfig, device: &B::Device) -> Result<Loaded<B>> {
    let mut source = ModelSource::parse(&cfg.model.base)
        .with_context(|| format!("model.base = {:?}", cfg.model.base))?;
    if let (ModelSource::Hub { revision, .. }, Some(r)) = (&mut source, &cfg.model.revision) {
        *revision = Some(r.clone());
    }
    let model = load::<B>(
        &source,
        LoadOptions {
            quantize: cfg.model.quantization,
            compute: cfg.train.compute_dtype,
            ..Default::default()
        },
        device,
    )
    .with_context(|| format!("loading model.base = {:?}", cfg.model.base))?;
    let tok = model
        .tokenizer
        .as_ref()
        .with_context(|| format!("{}: the model has no tokenizer", cfg.model.base))?;
    let source = match cfg.data.chat_template.as_deref() {
        None | Some("tokenizer") => tok.chat_template.as_deref(),
        Some(name_or_inline) => {
            Some(graft_core::text::chat::named_template(name_or_inline).unwrap_or(name_or_inline))
        }
    };
    let template = match source {
        Some(s) => Some(
            ChatTemplate::new(s, tok.bos_token.as_deref(), tok.eos_token.as_deref())
                .with_context(|| format!("{}: data.chat_template", cfg.path.display()))?,
        ),
        None => None,
    };
    Ok(Loaded { model, template })
}

/// Reads, formats and tokenizes the data into samples of kind `T` (single examples or
/// preference pairs), reporting skipped bad rows.
///
/// # Errors
/// Unreadable files, rows of the other kind, more bad rows than `data.max_bad_rows`, no usable
/// example.
pub fn prepare_data<B: GraftBackend, T: Sample>(
    cfg: &TrainConfig,
    loaded: &Loaded<B>,
) -> Result<Prepared<T>> {
    let tok = loaded
        .model
        .tokenizer
        .as_ref()
        .expect("checked by load_model");
    let tokenizer = Tokenizer {
        tokenizer: tok,
        template: loaded.template.as_ref(),
        train_on: cfg.data.train_on,
        max_seq_len: cfg.data.max_seq_len,
        truncation: cfg.data.truncation,
    };
    let spec = DataSpec {
        train_files: cfg.data.train_files.clone(),
        eval_files: cfg.data.eval_files.clone(),
        format: cfg.data.format.clone(),
        eval_fraction: cfg.data.eval_fraction,
        seed: cfg.data.seed,
        max_bad_rows: cfg.data.max_bad_rows,
    };
    let data =
        prepare(&spec, &tokenizer).with_context(|| format!("{}: [data]", cfg.path.display()))?;
    for bad in &data.stats.bad_rows {
        tracing::warn!("skipped bad row: {bad}");
    }
    Ok(data)
}
