//! Greedy (or sampled) continuations of many prompts decoded together, as the serving engine
//! batches requests: one ragged forward per step over every unfinished sequence, each with its
//! own KV cache and [`Decoder`]. What graft-train's task metrics use to answer the eval prompts.

use std::time::Instant;

use crate::adapters::lora::Adapter;
use crate::backend::GraftBackend;
use crate::generation::generate::{Decoder, FinishReason, GenerateError, Generation};
use crate::generation::sampling::SamplingParams;
use crate::model::{Logits, Model, SeqCache, SeqInput};
use crate::text::tokenizer::TokenizerBundle;

struct Seq<'a, B: GraftBackend> {
    prompt: &'a [u32],
    decoder: Decoder,
    cache: SeqCache<B>,
    next: Vec<u32>,
    done: Option<Result<FinishReason, GenerateError>>,
    prefill_secs: f64,
}

/// Continues each of `prompts` under `params`, all in one batch; the results are in the
/// prompts' order, each as [`crate::generation::generate::generate`] would give it alone.
pub fn generate_batch<B: GraftBackend>(
    model: &Model<B>,
    tokenizer: &TokenizerBundle,
    adapter: Option<&Adapter<B>>,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Vec<Result<Generation, GenerateError>> {
    let context = model.config.max_position_embeddings;
    let start = Instant::now();
    let mut seqs: Vec<Seq<'_, B>> = prompts
        .iter()
        .map(|p| {
            let done = if p.is_empty() {
                Some(Err(GenerateError::EmptyPrompt))
            } else if let Err(e) = params.validate() {
                Some(Err(e.into()))
            } else if p.len() + params.max_new_tokens > context {
                Some(Err(GenerateError::TooLong {
                    prompt: p.len(),
                    max_new: params.max_new_tokens,
                    context,
                }))
            } else if params.max_new_tokens == 0 {
                Some(Ok(FinishReason::Length))
            } else {
                None
            };
            Seq {
                prompt: p,
                decoder: Decoder::new(p, params, tokenizer),
                cache: SeqCache::new(),
                next: p.clone(),
                done,
                prefill_secs: 0.0,
            }
        })
        .collect();
    loop {
        let mut active: Vec<&mut Seq<'_, B>> =
            seqs.iter_mut().filter(|s| s.done.is_none()).collect();
        if active.is_empty() {
            break;
        }
        let tokens: Vec<Vec<u32>> = active
            .iter_mut()
            .map(|s| std::mem::take(&mut s.next))
            .collect();
        let mut inputs: Vec<SeqInput<'_, B>> = active
            .iter_mut()
            .zip(&tokens)
            .map(|(s, t)| SeqInput {
                tokens: t,
                cache: Some(&mut s.cache),
                adapter,
            })
            .collect();
        let logits = model.forward(&mut inputs, Logits::Last);
        drop(inputs);
        let vocab = model.config.vocab_size;
        let mut rows: Vec<f32> = logits
            .into_data()
            .to_vec()
            .unwrap_or_else(|_| unreachable!("the model's logits are f32"));
        debug_assert_eq!(rows.len(), active.len() * vocab);
        for (s, row) in active.iter_mut().zip(rows.chunks_exact_mut(vocab)) {
            if s.decoder.generated.is_empty() && s.prefill_secs == 0.0 {
                s.prefill_secs = start.elapsed().as_secs_f64();
            }
            match s.decoder.step(row, tokenizer) {
                Ok(step) => match step.finish {
                    Some(reason) => s.done = Some(Ok(reason)),
                    None => s.next = vec![step.id],
                },
                Err(e) => s.done = Some(Err(e)),
            }
        }
    }
    let total = start.elapsed().as_secs_f64();
    seqs.into_iter()
        .map(|mut s| {
            let reason = s.done.take().unwrap_or(Ok(FinishReason::Length))?;
            // tail() releases text held back for a possible stop string into the output
            s.decoder.tail();
            Ok(Generation {
                text: s.decoder.text().to_string(),
                tokens: std::mem::take(&mut s.decoder.generated),
                finish_reason: reason,
                prompt_tokens: s.prompt.len(),
                prefill_secs: s.prefill_secs,
                decode_secs: total - s.prefill_secs,
            })
        })
        .collect()
}
