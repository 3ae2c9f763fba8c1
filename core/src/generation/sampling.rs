//! Next-token selection: logit bias, repetition penalty (CTRL / transformers'
//! `RepetitionPenaltyLogitsProcessor`), OpenAI's presence and frequency penalties (on the
//! generated tokens, as vLLM applies them), temperature, top-k, top-p, min-p, and a seeded RNG
//! so that the same seed gives the same output. Temperature 0 is greedy.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings; OpenAI's names where they exist.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy. Default 1.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p ×` the most likely one; 0 = off.
    pub min_p: f32,
    /// > 1 discourages tokens already in the context; 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated; in [-2, 2], 0 = off.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated; in [-2, 2], 0 = off.
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before anything else; each in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// End-of-sequence and stop ids cannot end generation before this many tokens.
    pub min_tokens: usize,
    /// RNG seed; `None` draws one from the OS.
    pub seed: Option<u64>,
    pub max_new_tokens: usize,
    /// Extra ids that end generation (the model's EOS ids always do).
    pub stop_token_ids: Vec<u32>,
    /// Generation ends when the text contains one of these; it is not part of the output.
    pub stop_strings: Vec<String>,
    /// Keep generating past the model's EOS tokens (vLLM's `ignore_eos`; for benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            seed: None,
            max_new_tokens: 256,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// A sampling setting out of its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} must be {range}, got {value}")]
pub struct SamplingError {
    /// The setting's name (OpenAI's, where it has one): `temperature`, `top_p`, …
    pub field: &'static str,
    /// The allowed values, e.g. `in (0, 1]`.
    pub range: &'static str,
    pub value: f64,
}

impl SamplingParams {
    /// Checks ranges.
    ///
    /// # Errors
    /// The first setting out of range, with its name and value.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bias = self
            .logit_bias
            .iter()
            .map(|b| b.1)
            .find(|b| !(-100.0..=100.0).contains(b))
            .unwrap_or(0.0);
        let checks: [(&'static str, &'static str, f32, bool); 7] = [
            (
                "temperature",
                ">= 0",
                self.temperature,
                self.temperature >= 0.0 && self.temperature.is_finite(),
            ),
            (
                "top_p",
                "in (0, 1]",
                self.top_p,
                self.top_p > 0.0 && self.top_p <= 1.0,
            ),
            (
                "min_p",
                "in [0, 1]",
                self.min_p,
                (0.0..=1.0).contains(&self.min_p),
            ),
            (
                "repetition_penalty",
                "> 0",
                self.repetition_penalty,
                self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
            ),
            (
                "presence_penalty",
                "in [-2, 2]",
                self.presence_penalty,
                (-2.0..=2.0).contains(&self.presence_penalty),
            ),
            (
                "frequency_penalty",
                "in [-2, 2]",
                self.frequency_penalty,
                (-2.0..=2.0).contains(&self.frequency_penalty),
            ),
            (
                "logit_bias",
                "in [-100, 100]",
                bias,
                (-100.0..=100.0).contains(&bias),
            ),
        ];
        if self.min_tokens > self.max_new_tokens {
            return Err(SamplingError {
                field: "min_tokens",
                range: "at most max_tokens",
                value: self.min_tokens as f64,
            });
        }
        match checks.into_iter().find(|c| !c.3) {
            Some((field, range, value, _)) => Err(SamplingError {
                field,
                range,
                value: f64::from(value),
            }),
            None => Ok(()),
        }
    }
}

/// Picks tokens according to [`SamplingParams`].
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from one row of logits; `context` is every token so far
    /// (prompt and generated, for the repetition penalty), `generated` the generated ones
    /// (for the presence and frequency penalties).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32], generated: &[u32]) -> u32 {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = generated.to_vec();
            counts.sort_unstable();
            for run in counts.chunk_by(|a, b| a == b) {
                if let Some(l) = logits.get_mut(run[0] as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
                }
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for i in 0..keep {
            r -= probs[i];
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

/// Index of the largest logit (the first on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax_and_penalty_can_flip_it() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], &[], &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.2,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9], &[1], &[]), 2);
    }

    #[test]
    fn openai_penalties_and_logit_bias_shift_the_logits_as_documented() {
        // presence 0.5 + frequency 0.3 × count, on generated tokens only.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            ..params(0.0)
        });
        let mut row = [1.0f32, 2.0, 1.5, 0.0];
        // Token 1 was generated twice: 2.0 - 0.5 - 0.6 = 0.9; token 2 once: 1.5 - 0.8 = 0.7;
        // the prompt's token 0 is not penalized and now wins.
        assert_eq!(s.sample(&mut row, &[0, 1, 1, 2], &[1, 1, 2]), 0);
        assert!(
            (row[1] - 0.9).abs() < 1e-6 && (row[2] - 0.7).abs() < 1e-6,
            "{row:?}"
        );
        assert_eq!(row[0], 1.0);
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(3, 100.0), (1, -100.0)],
            ..params(1.0)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [1.0, 2.0, 1.5, 0.0], &[], &[]), 3);
        }
        let bad = SamplingParams {
            logit_bias: vec![(3, 101.0)],
            ..params(1.0)
        };
        assert_eq!(bad.validate().expect_err("refused").field, "logit_bias");
        let bad = SamplingParams {
            min_tokens: 9,
            max_new_tokens: 8,
            ..params(1.0)
        };
        assert_eq!(bad.validate().expect_err("refused").field, "min_tokens");
    }

    #[test]
    fn same_seed_same_tokens_and_filters_hold() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..40)
                .map(|_| s.sample(&mut logits.clone(), &[], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(params(1.0)), draw(params(1.0)));
        assert_ne!(
            draw(params(1.0)),
            draw(SamplingParams {
                seed: Some(8),
                ..params(1.0)
            })
        );
        let mut order: Vec<usize> = (0..50).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top3: Vec<u32> = order[..3].iter().map(|&i| i as u32).collect();
        assert!(draw(SamplingParams {
            top_k: 3,
            ..params(1.0)
        })
        .iter()
        .all(|t| top3.contains(t)));
        assert!(draw(SamplingParams {
            top_p: 1e-6,
            ..params(1.0)
        })
        .iter()
        .all(|&t| t == top3[0]));
        assert!(draw(SamplingParams {
            min_p: 1.0,
            ..params(1.0)
        })
        .iter()
        .all(|&t| t == top3[0]));
    }

    #[test]
    fn validation_names_the_field() {
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string()
        .contains("top_p"));
    }
}
