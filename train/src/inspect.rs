//! `graft-train data`: what the data of a config becomes — row and token counts, the trained
//! fraction, and examples with the trained text marked.

use std::path::Path;

use anyhow::Result;
use graft_core::burn::backend::Flex;

use graft_datasets::preference::Pair;
use graft_datasets::prepare::{Prepared, Sample};
use graft_datasets::tokenize::Tokenized;

use crate::config::Method;
use crate::setup::{configs, load_model, prepare_data, Loaded};

/// Prints the data statistics of the config's first run and `n_examples` rendered examples.
///
/// # Errors
/// As [`crate::setup::configs`], [`crate::setup::load_model`] and
/// [`crate::setup::prepare_data`].
pub fn data_cmd(path: &Path, set: &[String], n_examples: usize) -> Result<()> {
    let cfg = configs(path, set)?
        .into_iter()
        .next()
        .expect("at least one run");
    let loaded = load_model::<Flex>(&cfg, &Default::default())?;
    if cfg.train.method == Method::Sft {
        show(
            &loaded,
            prepare_data::<_, Tokenized>(&cfg, &loaded)?,
            n_examples,
        );
    } else {
        show(&loaded, prepare_data::<_, Pair>(&cfg, &loaded)?, n_examples);
    }
    Ok(())
}

fn show<T: Sample>(loaded: &Loaded<Flex>, data: Prepared<T>, n_examples: usize) {
    let s = &data.stats;
    println!("format: {}", data.format.name());
    println!(
        "rows: {} ({} bad, {} too long, {} truncated)",
        s.rows,
        s.bad_rows.len(),
        s.too_long,
        s.truncated
    );
    println!(
        "{}: {} train, {} eval",
        if T::PAIRED { "pairs" } else { "examples" },
        data.train.len(),
        data.eval.len()
    );
    println!(
        "tokens: {} ({} trained, {:.1}%)",
        s.tokens,
        s.trained_tokens,
        100.0 * s.trained_tokens as f64 / s.tokens.max(1) as f64
    );
    let tok = loaded
        .model
        .tokenizer
        .as_ref()
        .expect("checked by load_model");
    for (sample, row) in data.train.iter().zip(&data.train_rows).take(n_examples) {
        let seqs = sample.sequences();
        for (k, ex) in seqs.iter().enumerate() {
            let role = match (T::PAIRED, k) {
                (false, _) => String::new(),
                (true, 0) => "chosen, ".into(),
                (true, _) => "rejected, ".into(),
            };
            let kind = if T::PAIRED { "scored" } else { "trained" };
            println!(
                "\n--- {} ({role}{} tokens, {} {kind}; {kind} text in [[ ]])",
                row.location(),
                ex.ids.len(),
                ex.n_trained(),
            );
            println!("{}", marked(tok, ex));
        }
    }
}

/// The example's text with trained runs wrapped in `[[ ]]`.
fn marked(
    tok: &graft_core::text::tokenizer::TokenizerBundle,
    ex: &graft_datasets::tokenize::Tokenized,
) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ex.ids.len() {
        let t = ex.trained[i] && i > 0;
        let mut j = i;
        while j < ex.ids.len() && (ex.trained[j] && j > 0) == t {
            j += 1;
        }
        let text = tok.decode(&ex.ids[i..j], false).unwrap_or_default();
        if t {
            out.push_str(&format!("[[{text}]]"));
        } else {
            out.push_str(&text);
        }
        i = j;
    }
    out
}
