//! `graft-serve score`: the logits of every position of a prompt, with or without an adapter,
//! written to a safetensors file (`input_ids`: i64 [n], `logits`: f32 [n, vocab]). Used by
//! `scripts/reference/peft_adapter.py check` to compare graft with PEFT on the same adapter.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use graft_core::burn_prelude::Tensor;
use graft_core::device::Cpu;
use graft_core::load::{load, LoadOptions, ModelSource};
use graft_core::model::{Logits, SeqInput};
use graft_core::quant::QuantKind;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Model: an HF directory, a .gguf file, ollama:NAME[:TAG], or a hub id (owner/name[@revision]).
    #[arg(long)]
    model: String,
    /// A PEFT adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The text to score (tokenized without added special tokens).
    #[arg(long)]
    prompt: String,
    /// Output file (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Base weight storage: keep, nf4 or none.
    #[arg(long, default_value = "keep")]
    quantize: QuantKind,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let source = ModelSource::parse(&args.model)?;
    let loaded = load::<Cpu>(
        &source,
        LoadOptions {
            quantize: args.quantize,
            ..Default::default()
        },
        &Default::default(),
    )
    .with_context(|| format!("loading model '{}'", args.model))?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow!("model '{}' has no tokenizer", args.model))?;
    let adapter = match &args.adapter {
        Some(dir) => Some(graft_core::adapters::peft::load(dir, &loaded.model)?.0),
        None => None,
    };
    let ids = tok
        .encode(&args.prompt, false)
        .map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
    if ids.is_empty() {
        return Err(anyhow!("the prompt has no tokens"));
    }
    let logits: Tensor<Cpu, 2> = loaded.model.forward(
        &mut [SeqInput {
            tokens: &ids,
            cache: None,
            adapter: adapter.as_ref(),
        }],
        Logits::All,
    );
    let [n, vocab] = logits.dims();
    let values = logits
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| anyhow!("reading logits: {e:?}"))?;
    let id_bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&i| i64::from(i).to_le_bytes())
        .collect();
    let logit_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "input_ids",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![n], &id_bytes)?,
        ),
        (
            "logits",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![n, vocab],
                &logit_bytes,
            )?,
        ),
    ];
    safetensors::serialize_to_file(views, None, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!("wrote logits of {n} positions to {}", args.out.display());
    Ok(())
}
