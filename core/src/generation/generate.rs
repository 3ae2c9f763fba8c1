//! Autoregressive generation for one request: prefill the prompt, then decode one token at a
//! time with the KV cache, handing every token (and the text it completes) to a callback so a
//! caller can stream. Stops on EOS / stop ids, stop strings, or the token budget.

use crate::backend::GraftBackend;
use std::time::Instant;

use crate::adapters::lora::Adapter;
use crate::generation::constraint::{Constraint, ConstraintError};
use crate::generation::sampling::{Sampler, SamplingParams};
use crate::model::{Logits, Model, SeqCache, SeqInput};
use crate::text::tokenizer::TokenizerBundle;

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated token as delivered to the callback.
#[derive(Debug, Clone)]
pub struct TokenEvent<'a> {
    pub id: u32,
    /// Text this token makes final (may be empty while a multi-byte character or a possible
    /// stop string is incomplete).
    pub text: &'a str,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Errors during generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt of {prompt} tokens plus max_tokens {max_new} exceeds the model's context of {context}")]
    TooLong {
        prompt: usize,
        max_new: usize,
        context: usize,
    },
    #[error("invalid sampling parameters: {0}")]
    Params(#[from] crate::generation::sampling::SamplingError),
    #[error(transparent)]
    Decode(#[from] crate::text::tokenizer::TokenizerError),
    #[error(transparent)]
    Constraint(#[from] crate::generation::constraint::ConstraintError),
}

/// Generates a continuation of `prompt`.
///
/// # Errors
/// See [`GenerateError`].
pub fn generate<B: GraftBackend>(
    model: &Model<B>,
    tokenizer: &TokenizerBundle,
    adapter: Option<&Adapter<B>>,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_token: impl FnMut(TokenEvent<'_>),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    params.validate()?;
    let context = model.config.max_position_embeddings;
    if prompt.len() + params.max_new_tokens > context {
        return Err(GenerateError::TooLong {
            prompt: prompt.len(),
            max_new: params.max_new_tokens,
            context,
        });
    }
    let mut decoder = Decoder::new(prompt, params, tokenizer);
    if params.max_new_tokens == 0 {
        return Ok(Generation {
            tokens: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens: prompt.len(),
            prefill_secs: 0.0,
            decode_secs: 0.0,
        });
    }
    let mut cache = SeqCache::new();
    let start = Instant::now();
    let mut prefill_secs = 0.0;
    let mut next_input = prompt.to_vec();
    let finish = loop {
        let logits = model.forward(
            &mut [SeqInput {
                tokens: &next_input,
                cache: Some(&mut cache),
                adapter,
            }],
            Logits::Last,
        );
        let mut row: Vec<f32> = logits.into_data().to_vec().unwrap_or_default();
        if decoder.generated.is_empty() {
            prefill_secs = start.elapsed().as_secs_f64();
        }
        let step = decoder.step(&mut row, tokenizer)?;
        if step.is_token {
            on_token(TokenEvent {
                id: step.id,
                text: &step.text,
            });
        }
        if let Some(reason) = step.finish {
            break reason;
        }
        next_input = vec![step.id];
    };
    let tail = decoder.tail();
    if !tail.is_empty() {
        on_token(TokenEvent {
            id: *decoder.generated.last().unwrap_or(&0),
            text: &tail,
        });
    }
    Ok(Generation {
        text: decoder.stream.emitted,
        tokens: decoder.generated,
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: start.elapsed().as_secs_f64() - prefill_secs,
    })
}

/// One decoding step's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The sampled token.
    pub id: u32,
    /// Whether it is part of the output (false for an end-of-sequence or stop token).
    pub is_token: bool,
    /// Text this token makes final (may be empty).
    pub text: String,
    /// Set when generation ends with this step.
    pub finish: Option<FinishReason>,
}

/// The per-request state of decoding, shared by [`generate`] and the serving engine: sampling
/// with its history, end-of-sequence and stop ids, stop strings and the token budget, one step
/// per logits row of the request's last position.
pub struct Decoder {
    sampler: Sampler,
    /// Prompt and sampled tokens (for repetition penalties).
    context: Vec<u32>,
    /// Output tokens so far (without a final stop token).
    pub generated: Vec<u32>,
    stream: TextStream,
    stop_ids: Vec<u32>,
    max_new: usize,
    /// End-of-sequence and stop ids are masked until this many tokens are out.
    min_new: usize,
    /// What the output must match (structured outputs), if anything.
    constraint: Option<Constraint>,
}

impl Decoder {
    pub fn new(prompt: &[u32], params: &SamplingParams, tokenizer: &TokenizerBundle) -> Self {
        let mut stop_ids = if params.ignore_eos {
            Vec::new()
        } else {
            tokenizer.eos_ids.clone()
        };
        stop_ids.extend(&params.stop_token_ids);
        Decoder {
            sampler: Sampler::new(params.clone()),
            context: prompt.to_vec(),
            generated: Vec::new(),
            stream: TextStream::new(&params.stop_strings),
            stop_ids,
            max_new: params.max_new_tokens,
            min_new: params.min_tokens,
            constraint: None,
        }
    }

    /// Computes the constraint's next mask ahead of [`Decoder::step`] (e.g. on another thread
    /// while the forward pass runs); without a constraint, nothing to do.
    pub fn prepare(&mut self) {
        if let Some(c) = &mut self.constraint {
            c.prepare();
        }
    }

    /// Whether a constraint decides which tokens may come next.
    pub fn is_constrained(&self) -> bool {
        self.constraint.is_some()
    }

    /// Only outputs `constraint` accepts; generation ends when one is complete.
    pub fn with_constraint(mut self, constraint: Option<Constraint>) -> Self {
        self.constraint = constraint;
        self
    }

    /// Samples the next token from `row` (the sampler may modify it) and advances.
    ///
    /// # Errors
    /// [`GenerateError::Decode`] when the tokenizer cannot decode the output.
    pub fn step(
        &mut self,
        row: &mut [f32],
        tokenizer: &TokenizerBundle,
    ) -> Result<Step, GenerateError> {
        // The scans of the whole row below run only when something masks it.
        let mut masked = false;
        if let Some(c) = &mut self.constraint {
            c.mask(row)?;
            masked = true;
        }
        // min_tokens holds off the end, unless ending is all the constraint allows.
        if self.generated.len() < self.min_new
            && row
                .iter()
                .enumerate()
                .any(|(t, l)| l.is_finite() && !self.stop_ids.contains(&(t as u32)))
        {
            for &t in &self.stop_ids {
                if let Some(l) = row.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            masked = true;
        }
        if masked && !row.iter().any(|l| l.is_finite()) {
            return Err(GenerateError::Constraint(ConstraintError::Failed(
                "no token can continue the output".into(),
            )));
        }
        let id = self.sampler.sample(row, &self.context, &self.generated);
        self.context.push(id);
        if self.stop_ids.contains(&id) {
            return Ok(Step {
                id,
                is_token: false,
                text: String::new(),
                finish: Some(FinishReason::Stop),
            });
        }
        self.generated.push(id);
        let complete = match &mut self.constraint {
            Some(c) => {
                c.advance(id)?;
                c.is_finished()
            }
            None => false,
        };
        let full = tokenizer
            .decode(&self.generated, true)
            .map_err(GenerateError::Decode)?;
        let (text, stopped) = self.stream.push(&full);
        let finish = if stopped || complete {
            Some(FinishReason::Stop)
        } else if self.generated.len() >= self.max_new {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(Step {
            id,
            is_token: true,
            text,
            finish,
        })
    }

    /// The output text released so far.
    pub fn text(&self) -> &str {
        &self.stream.emitted
    }

    /// Text held back when generation ended other than by a stop string.
    pub fn tail(&mut self) -> String {
        self.stream.finish()
    }
}

/// Turns the growing decoded text into final pieces: holds back an incomplete UTF-8 character
/// (decoded as U+FFFD) and any suffix that could still become a stop string, and cuts the text
/// at the first stop string.
pub struct TextStream {
    stops: Vec<String>,
    pub emitted: String,
    stopped: bool,
    pending: String,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        TextStream {
            stops: stops.to_vec(),
            emitted: String::new(),
            stopped: false,
            pending: String::new(),
        }
    }

    /// Given the full text so far, returns the new final piece and whether a stop string hit.
    pub fn push(&mut self, full: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        let mut text = full;
        if let Some(cut) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text = &text[..cut];
            self.stopped = true;
        }
        let mut safe = text.len();
        if !self.stopped {
            if text.ends_with('\u{FFFD}') {
                safe = text.trim_end_matches('\u{FFFD}').len();
            }
            // Hold back the longest suffix that is a prefix of some stop string.
            for s in &self.stops {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && text[..safe].ends_with(&s[..k]) {
                        safe = safe.min(safe - k);
                        break;
                    }
                }
            }
        }
        if safe < self.emitted.len()
            || !text.is_char_boundary(safe)
            || !text.starts_with(&self.emitted)
        {
            self.pending = text.to_string();
            return (String::new(), self.stopped);
        }
        let piece = text[self.emitted.len()..safe].to_string();
        self.emitted.push_str(&piece);
        self.pending = text.to_string();
        (piece, self.stopped)
    }

    /// What was held back when generation ends without a stop.
    pub fn finish(&mut self) -> String {
        if self.stopped || !self.pending.starts_with(&self.emitted) {
            return String::new();
        }
        let rest = self.pending[self.emitted.len()..].to_string();
        self.emitted.push_str(&rest);
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_hold_back_prefixes() {
        let stops = vec!["END".to_string()];
        let mut s = TextStream::new(&stops);
        assert_eq!(s.push("Hello E"), ("Hello ".to_string(), false));
        assert_eq!(s.push("Hello EN"), (String::new(), false));
        assert_eq!(s.push("Hello ENx"), ("ENx".to_string(), false));
        assert_eq!(s.push("Hello ENx END more"), (" ".to_string(), true));
        assert_eq!(s.emitted, "Hello ENx ");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn incomplete_characters_wait() {
        let mut s = TextStream::new(&[]);
        assert_eq!(s.push("caf\u{FFFD}"), ("caf".to_string(), false));
        assert_eq!(s.push("café"), ("é".to_string(), false));
        assert_eq!(s.finish(), "");
    }
}
