//! The fast decode path against transformers: packed weights multiplied with activations
//! rounded to 8 bits per block of 32 ([`Activations::Q8`], what `graft-serve` uses unless told
//! `--activations f32`) in every decoder layer, on the three real models, decoded one token at
//! a time through the cache (prefill takes the same kernels, one row at a time the same
//! results).
//!
//! Per model: max |Δ| of the logits against transformers' f32 (last position's whole
//! vocabulary, probe ids at every position), and greedy agreement along transformers' greedy
//! continuation: every step whose top-1 margin exceeds [`DECISIVE`] must pick transformers'
//! token. The figures are printed for the README.

use graft_core::generation::sampling::argmax;
use graft_core::model::{Logits, Model, SeqCache, SeqInput};
use graft_core::quant::Activations;

use crate::reference::read_fixture;
use crate::smollm2::{reference_diffs, reference_of};
use crate::{values, B};

/// The logits after each of `tokens`, fed one at a time through the cache: `[len, vocab]`.
fn stepwise_logits(m: &Model<B>, tokens: &[u32]) -> Vec<f32> {
    let mut cache = SeqCache::new();
    tokens
        .iter()
        .flat_map(|&t| {
            values(m.forward(
                &mut [SeqInput {
                    tokens: &[t],
                    cache: Some(&mut cache),
                    adapter: None,
                }],
                Logits::Last,
            ))
        })
        .collect()
}

/// Checks `model` with 8-bit activations against fixture `prefix`: logits within `bound`, and
/// greedy picks equal wherever transformers' margin exceeds [`DECISIVE`].
fn check(model: &Model<B>, prefix: &str, bound: f32) {
    let mut m = model.clone();
    m.set_activations(Activations::Q8);
    let r = reference_of(prefix);
    let t = read_fixture(&format!("{prefix}_reference.safetensors"));
    let vocab = m.config.vocab_size;
    let (mut worst, mut steps, mut agree, mut required) = (0f32, 0, 0, 0);
    for (i, p) in r.prompts.iter().enumerate() {
        let n = p.input_ids.len();
        let tokens: Vec<u32> = p.input_ids.iter().chain(&p.greedy_ids).copied().collect();
        // the last greedy token is only an answer, never an input
        let logits = stepwise_logits(&m, &tokens[..tokens.len() - 1]);
        let (d_last, d_probe) =
            reference_diffs(&logits[..n * vocab], vocab, &p.vocab_probe_ids, &t, i);
        worst = worst.max(d_last).max(d_probe);
        for (step, (&want, &margin)) in p.greedy_ids.iter().zip(&p.greedy_margins).enumerate() {
            let at = (n - 1 + step) * vocab;
            let got = argmax(&logits[at..at + vocab]);
            steps += 1;
            agree += usize::from(got == want);
            if margin > DECISIVE {
                required += 1;
                assert_eq!(
                    got, want,
                    "{prefix} prompt {i} step {step}: margin {margin} yet a different pick"
                );
            }
        }
    }
    eprintln!(
        "{prefix} q8 activations: max |Δ| {worst:.3e} against transformers; greedy along \
         transformers' continuation {agree}/{steps} steps equal ({required} with a margin over \
         {DECISIVE} all equal)"
    );
    assert!(worst <= bound, "{prefix}: max |Δ| {worst} over {bound}");
    assert!(
        required * 2 >= steps,
        "{prefix}: too few decisive steps to mean anything"
    );
}

#[test]
fn smollm2_q4_1_with_8_bit_activations_stays_near_transformers() {
    check(&crate::smollm2::gguf_model().model, "smollm2", 3.0);
}

#[test]
fn gemma3_q4_k_m_with_8_bit_activations_stays_near_transformers() {
    check(&crate::real_models::gemma3().model, "gemma3", 1.25);
}

#[test]
fn qwen2_5_coder_q4_k_m_with_8_bit_activations_stays_near_transformers() {
    check(&crate::real_models::qwen().model, "qwen2_5_coder", 0.6);
}

/// The top-1 margin (logit units) above which 8-bit activations must not change the pick.
/// The per-model |Δ| bounds above are the measured figures (README "Performance") with ~25%
/// headroom: SmolLM2's small hidden size and outlier channels make it the most sensitive.
const DECISIVE: f32 = 1.0;
