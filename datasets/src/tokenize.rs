//! From an [`Example`] to token ids and a loss mask.
//!
//! Conversations are rendered once with the chat template and tokenized once. The assistant
//! turns are located in the rendered text, not by tokenizing fragments: for assistant message
//! `i`, the template rendered for `messages[..i]` with the generation prompt, and for
//! `messages[..=i]`, must both be prefixes of the full rendering; the text between them is that
//! turn. Tokens that start inside a turn are trained, up to and including the turn's first
//! end-of-turn token (what follows it, e.g. a newline, is not). A template for which these
//! renderings are not prefixes is reported, never guessed around.

use graft_core::text::chat::{ChatTemplate, Message};
use graft_core::text::tokenizer::TokenizerBundle;

use crate::format::Example;

/// Which tokens carry loss (`train_on` in configs: `assistant` or `all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Assistant turns, each with its end-of-turn token (segments marked as trained).
    Assistant,
    /// Every token.
    All,
}

/// What to do with an example longer than `max_seq_len` (`truncate` or `drop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Keep the first `max_seq_len` tokens (dropped if no trained token is left).
    Truncate,
    /// Skip the example.
    Drop,
}

/// A tokenized example: `trained[t]` says whether predicting `ids[t]` from `ids[..t]` counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
    /// Whether tokens were cut off at the end.
    pub truncated: bool,
}

impl Tokenized {
    /// Number of tokens with loss (the first token is never predicted).
    pub fn n_trained(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Turns examples into token ids and masks.
pub struct Tokenizer<'a> {
    pub tokenizer: &'a TokenizerBundle,
    pub template: Option<&'a ChatTemplate>,
    pub train_on: TrainOn,
    pub max_seq_len: usize,
    pub truncation: Truncation,
}

/// Why an example yields no training tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Longer than `max_seq_len` under [`Truncation::Drop`], or nothing trained survives
    /// truncation: the example's token count.
    TooLong(usize),
    /// The example cannot be tokenized (message says why).
    Invalid(String),
}

/// Why an example cannot be rendered as text.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the tokenizer has no chat template; set data.chat_template")]
    NoTemplate,
    #[error(transparent)]
    Template(#[from] graft_core::text::chat::TemplateError),
    /// The template renders a conversation's prefixes differently from the whole (say why).
    #[error("{0}")]
    NotPrefixStable(String),
}

impl Tokenizer<'_> {
    /// The rendered text of an example (for previews) and its byte spans that carry loss.
    ///
    /// # Errors
    /// A template failure or a template whose renderings are not prefix-stable.
    pub fn render(&self, example: &Example) -> Result<(String, Vec<(usize, usize)>), RenderError> {
        match example {
            Example::Conversation(messages) => self.conversation(messages, 0),
            Example::Exchange { prompt, completion } => {
                let messages: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
                self.conversation(&messages, prompt.len())
            }
            Example::Segments(parts) => {
                let mut text = String::new();
                let mut spans = Vec::new();
                for (part, trained) in parts {
                    if *trained {
                        spans.push((text.len(), text.len() + part.len()));
                    }
                    text.push_str(part);
                }
                Ok((text, spans))
            }
        }
    }

    /// The rendered conversation and the byte spans of its assistant turns from message
    /// `first` on.
    fn conversation(
        &self,
        messages: &[Message],
        first: usize,
    ) -> Result<(String, Vec<(usize, usize)>), RenderError> {
        let tmpl = self.template.ok_or(RenderError::NoTemplate)?;
        let full = tmpl.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate().skip(first) {
            if m.role != "assistant" {
                continue;
            }
            let before = tmpl.render(&messages[..i], true)?;
            let through = tmpl.render(&messages[..=i], false)?;
            if !full.starts_with(&before)
                || !full.starts_with(&through)
                || through.len() < before.len()
            {
                return Err(RenderError::NotPrefixStable(prefix_error(messages, i)));
            }
            spans.push((before.len(), through.len()));
        }
        Ok((full, spans))
    }

    /// Token ids and loss mask of an example.
    ///
    /// # Errors
    /// [`Skip`] when the example gives nothing to train on.
    pub fn tokenize(&self, example: &Example) -> Result<Tokenized, Skip> {
        let (text, spans) = self
            .render(example)
            .map_err(|e| Skip::Invalid(e.to_string()))?;
        let (mut ids, offsets) = self
            .tokenizer
            .encode_with_offsets(&text)
            .map_err(|e| Skip::Invalid(e.to_string()))?;
        let eos = &self.tokenizer.eos_ids;
        let mut trained = vec![false; ids.len()];
        for &(start, end) in &spans {
            for (t, &(s, _)) in offsets.iter().enumerate() {
                if s >= start && s < end {
                    trained[t] = true;
                    if eos.contains(&ids[t]) {
                        break;
                    }
                }
            }
        }
        if let Example::Segments(_) = example {
            // Plain text has no template to end it: add the end-of-sequence token, trained
            // when the last segment is.
            if let Some(&e) = eos.first() {
                let last_trained = trained.last().copied().unwrap_or(false);
                ids.push(e);
                trained.push(last_trained);
            }
            if self.tokenizer.add_bos {
                if let Some(b) = self.tokenizer.bos_id {
                    ids.insert(0, b);
                    trained.insert(0, false);
                }
            }
        }
        if self.train_on == TrainOn::All {
            trained.iter_mut().for_each(|t| *t = true);
        }
        let n = ids.len();
        let mut truncated = false;
        if n > self.max_seq_len {
            match self.truncation {
                Truncation::Drop => return Err(Skip::TooLong(n)),
                Truncation::Truncate => {
                    ids.truncate(self.max_seq_len);
                    trained.truncate(self.max_seq_len);
                    truncated = true;
                }
            }
        }
        let out = Tokenized {
            ids,
            trained,
            truncated,
        };
        if out.n_trained() == 0 {
            return Err(Skip::TooLong(n));
        }
        Ok(out)
    }
}

fn prefix_error(messages: &[Message], i: usize) -> String {
    format!(
        "the chat template's rendering of the first {i} messages is not a prefix of the whole \
         conversation ({} messages), so assistant turn {i} cannot be located exactly; use a \
         prefix-stable template (data.chat_template) or train_on = \"all\"",
        messages.len()
    )
}
