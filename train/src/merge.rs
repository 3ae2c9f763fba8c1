//! `graft-train merge`: a run's adapter (or a PEFT adapter directory) merged into its base
//! model — one GGUF file for llama.cpp / Ollama from a GGUF base, an HF directory for
//! transformers / vLLM from either — then loaded back and compared with the base plus the
//! adapter on a fixed text, so that the cost of re-quantizing is printed with the result.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use graft_core::adapters::lora::Adapter;
use graft_core::adapters::merge::{self, MergeSummary};
use graft_core::burn::backend::Flex;
use graft_core::formats::gguf::GgufFile;
use graft_core::formats::safetensors_write::FloatDtype;
use graft_core::load::{hub, load, LoadOptions, LoadedModel, ModelSource};
use graft_core::model::{Logits, Model, SeqInput};
use graft_core::quant::mix::FileType;

use crate::export::{load_pair, resolve};

/// Where `graft-train merge` writes.
#[derive(Debug, Clone)]
pub enum MergeTarget {
    /// A GGUF file (from a GGUF base).
    Gguf {
        path: PathBuf,
        /// Every tensor in this file type's mix; `None`: merged tensors keep their type.
        quant: Option<FileType>,
    },
    /// An HF model directory (new or empty).
    Hf {
        dir: PathBuf,
        /// The weights' dtype; `None`: an HF base's own, bf16 from a GGUF base.
        dtype: Option<FloatDtype>,
        /// Largest safetensors shard in bytes (the CLI's default: 5 GB).
        max_shard_bytes: usize,
    },
}

/// Merges the adapter of `source` into its base and writes `target`.
///
/// # Errors
/// No base model, an adapter that does not fit it, a target the base's format cannot give
/// (an HF directory from a GGUF base, or the reverse), an unwritable output.
pub fn merge_cmd(
    source: &Path,
    target: &MergeTarget,
    model: Option<String>,
    check: bool,
) -> Result<(MergeSummary, Option<MergeCheck>)> {
    let (adapter_dir, base) = resolve(source, model)?;
    let src = ModelSource::parse(&base)?;
    let (loaded, adapter) = load_pair(&src, &base, &adapter_dir, check)?;
    let summary = match (target, src.gguf_file()?) {
        (MergeTarget::Gguf { path, quant }, Some(gguf)) => {
            let file = GgufFile::open(&gguf)?;
            merge::merge_gguf(&file, &loaded.model.config, &adapter, *quant, path).with_context(
                || format!("merging {} into {}", adapter_dir.display(), gguf.display()),
            )?
        }
        (
            MergeTarget::Hf {
                dir,
                dtype,
                max_shard_bytes,
            },
            None,
        ) => {
            let base_dir = match &src {
                ModelSource::HfDir(d) => d.clone(),
                ModelSource::Hub { repo, revision } => {
                    hub::resolve(repo, revision.as_deref(), &hub::HubSettings::from_env())?
                }
                ModelSource::Gguf(_) | ModelSource::Ollama(_) => {
                    unreachable!("gguf_file() is Some for these")
                }
            };
            merge::merge_hf(
                &base_dir,
                &loaded.model.config,
                &adapter,
                *dtype,
                dir,
                *max_shard_bytes,
            )
            .with_context(|| {
                format!(
                    "merging {} into {}",
                    adapter_dir.display(),
                    base_dir.display()
                )
            })?
        }
        (
            MergeTarget::Hf {
                dir,
                dtype,
                max_shard_bytes,
            },
            Some(gguf),
        ) => merge::merge_to_hf(
            &loaded.model,
            loaded.tokenizer.as_ref(),
            &adapter,
            dtype.unwrap_or(FloatDtype::BF16),
            dir,
            *max_shard_bytes,
        )
        .with_context(|| {
            format!(
                "merging {} into {} as an HF directory",
                adapter_dir.display(),
                gguf.display()
            )
        })?,
        (MergeTarget::Gguf { .. }, None) => bail!(
            "--gguf needs a GGUF base model, and {base} is an HF model: merge with --out DIR, \
             then convert that directory with llama.cpp's convert_hf_to_gguf.py"
        ),
    };
    let types: Vec<String> = summary
        .types
        .iter()
        .map(|(t, n)| format!("{t} ×{n}"))
        .collect();
    tracing::info!(
        "merged {} of {} tensors ({} modules of {}) into {} ({:.1} MiB of weights: {})",
        summary.merged,
        summary.tensors,
        adapter.modules().count(),
        adapter_dir.display(),
        summary
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        summary.data_bytes as f64 / (1 << 20) as f64,
        types.join(", ")
    );
    if !check {
        return Ok((summary, None));
    }
    let merged = match target {
        MergeTarget::Gguf { path, .. } => ModelSource::Gguf(path.clone()),
        MergeTarget::Hf { dir, .. } => ModelSource::HfDir(dir.clone()),
    };
    let c = check_merge(&loaded, &adapter, &merged)?;
    tracing::info!(
        "check on {} tokens of text: merged vs base + adapter, max |Δ logit| {:.4}, mean {:.5}, same top-1 token at {}/{} positions",
        c.positions,
        c.max_abs,
        c.mean_abs,
        c.top1_same,
        c.positions
    );
    if c.top1_same * 20 < c.positions * 19 {
        tracing::warn!(
            "the merged model picks another next token at {} of {} positions: re-encoding in \
             few bits rounds much of the adapter's change away; --quant q8_0 (or f16) keeps it, \
             or serve the adapter unmerged (graft-train export --gguf for llama.cpp)",
            c.positions - c.top1_same,
            c.positions
        );
    }
    Ok((summary, Some(c)))
}

/// Text the check runs: plain prose that every tokenizer splits into ordinary tokens.
const PROBE: &str = "The history of the printing press begins in the fifteenth century, when \
    Johannes Gutenberg combined movable metal type, oil-based ink and a wooden press. Within \
    fifty years, printers in more than two hundred cities had produced millions of books, and \
    the price of a copy fell so far that ordinary readers could own one.";

/// How far a merged model's logits are from its base with the adapter.
#[derive(Debug, Clone, Copy)]
pub struct MergeCheck {
    pub positions: usize,
    pub max_abs: f32,
    pub mean_abs: f32,
    /// Positions where both pick the same most likely next token.
    pub top1_same: usize,
}

/// Runs [`PROBE`] through the merged model and through the base with the adapter.
///
/// # Errors
/// The merged model does not load, or the text does not tokenize.
pub fn check_merge(
    base: &LoadedModel<Flex>,
    adapter: &Adapter<Flex>,
    merged: &ModelSource,
) -> Result<MergeCheck> {
    let tokens = match &base.tokenizer {
        Some(t) => t.encode(PROBE, true)?,
        None => (0..64)
            .map(|i| (i * 131 + 7) % base.model.config.vocab_size as u32)
            .collect(),
    };
    let run = |m: &Model<Flex>, adapter: Option<&Adapter<Flex>>| -> Vec<f32> {
        m.forward(
            &mut [SeqInput {
                tokens: &tokens,
                cache: None,
                adapter,
            }],
            Logits::All,
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap_or_else(|_| unreachable!("f32 logits"))
    };
    let want = run(&base.model, Some(adapter));
    let m = load::<Flex>(merged, LoadOptions::default(), &Default::default())
        .context("loading the merged model back")?;
    let got = run(&m.model, None);
    let vocab = base.model.config.vocab_size;
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0
    };
    let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
    Ok(MergeCheck {
        positions: tokens.len(),
        max_abs: diffs.iter().copied().fold(0.0, f32::max),
        mean_abs: diffs.iter().sum::<f32>() / diffs.len().max(1) as f32,
        top1_same: got
            .chunks_exact(vocab)
            .zip(want.chunks_exact(vocab))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count(),
    })
}
