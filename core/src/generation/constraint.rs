//! Constrained decoding: outputs that match a JSON schema, a regular expression, one of a list
//! of strings, or a Lark grammar, through **llguidance** (the library vLLM, SGLang and
//! llama.cpp use). Before each sampling step the constraint masks every token that cannot
//! continue a valid output; after it, the sampled token advances the grammar. Masks are
//! computed from the model's own vocabulary (the bytes of every token, read from its
//! tokenizer), so any tokenizer graft loads works, byte-level BPE and SentencePiece alike.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::text::tokenizer::TokenizerBundle;

/// Whitespace allowed between JSON tokens unless a schema says otherwise (`x-guidance`):
/// enough for pretty-printed JSON several levels deep, but bounded, so a model cannot loop on
/// whitespace forever inside a constrained answer.
const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,32}";

/// A schema with graft's whitespace bound, unless it sets llguidance's options itself.
pub(crate) fn with_json_defaults(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object` mode).
    JsonObject,
    /// A JSON document valid under this schema.
    JsonSchema(Value),
    /// A match of this regular expression (the whole output).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar in llguidance's dialect (`start: …`).
    Lark(String),
}

/// A grammar that cannot be used, or a failure while following one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// The model's vocabulary could not be read into token bytes.
    #[error("cannot build the token table for constrained decoding: {0}")]
    Vocabulary(String),
    /// The schema, regex, choice list or grammar is invalid (llguidance's message).
    #[error("invalid {kind}: {message}")]
    Invalid { kind: &'static str, message: String },
    /// The grammar reached a state no token can leave (reported, never silently ignored).
    #[error("constrained decoding failed: {0}")]
    Failed(String),
}

/// Compiles grammars for one model's vocabulary (build once per model; cheap to share).
#[derive(Clone)]
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").finish_non_exhaustive()
    }
}

/// The vocabulary as llguidance sees it: a trie of token bytes, with our tokenizer for the
/// rare text it must tokenize itself.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

impl GrammarCompiler {
    /// Reads the bytes of every token of `tokenizer` (padded to the model's `vocab_size` with
    /// unreachable placeholders).
    ///
    /// # Errors
    /// [`ConstraintError::Vocabulary`] when the tokenizer's vocabulary cannot be read.
    pub fn new(
        tokenizer: &TokenizerBundle,
        vocab_size: usize,
    ) -> Result<GrammarCompiler, ConstraintError> {
        let vocab = |e: String| ConstraintError::Vocabulary(e);
        let json: Value = serde_json::from_str(
            &tokenizer
                .tokenizer
                .to_string(false)
                .map_err(|e| vocab(e.to_string()))?,
        )
        .map_err(|e| vocab(e.to_string()))?;
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| vocab(e.to_string()))?;
        if words.len() > vocab_size {
            return Err(vocab(format!(
                "the tokenizer has {} tokens, the model {vocab_size}",
                words.len()
            )));
        }
        while words.len() < vocab_size {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let eos = tokenizer.eos_ids.first().copied().ok_or_else(|| {
            vocab("the tokenizer names no end-of-sequence token, so an output cannot end".into())
        })?;
        let mut info = TokRxInfo::new(vocab_size as u32, eos);
        info.tok_bos = tokenizer.bos_id;
        let mut trie = TokTrie::from(&info, &words);
        if tokenizer.eos_ids.len() > 1 {
            trie = trie.with_eos_tokens(&tokenizer.eos_ids);
        }
        let env: TokEnv = Arc::new(Vocabulary {
            trie,
            tokenizer: tokenizer.tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| vocab(e.to_string()))?;
        factory.quiet();
        Ok(GrammarCompiler {
            factory: Arc::new(factory),
        })
    }

    /// A fresh constraint that accepts the outputs `grammar` describes.
    ///
    /// # Errors
    /// [`ConstraintError::Invalid`] with llguidance's reason (an unsupported schema keyword,
    /// a regex that does not parse, an empty choice list, a grammar syntax error).
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, ConstraintError> {
        let (kind, top) = match grammar {
            Grammar::JsonObject => (
                "JSON object mode",
                TopLevelGrammar::from_json_schema(with_json_defaults(
                    serde_json::json!({"type": "object"}),
                )),
            ),
            Grammar::JsonSchema(schema) => (
                "JSON schema",
                TopLevelGrammar::from_json_schema(with_json_defaults(schema.clone())),
            ),
            Grammar::Regex(rx) => ("regex", TopLevelGrammar::from_regex(rx)),
            Grammar::Choice(options) => {
                if options.is_empty() {
                    return Err(ConstraintError::Invalid {
                        kind: "choice",
                        message: "the list of choices is empty".into(),
                    });
                }
                // Each option a quoted literal (JSON string syntax is Lark's).
                let alternatives: Vec<String> = options
                    .iter()
                    .map(|o| serde_json::to_string(o).unwrap_or_default())
                    .collect();
                (
                    "choice",
                    TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | "))),
                )
            }
            Grammar::Lark(g) => ("grammar", TopLevelGrammar::from_lark(g.clone())),
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| ConstraintError::Invalid {
                kind,
                message: e.to_string(),
            })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Invalid { kind, message: e });
        }
        Ok(Constraint {
            matcher,
            ready: None,
        })
    }
}

/// One request's constraint: masks logits, advances with each sampled token.
pub struct Constraint {
    matcher: Matcher,
    /// The mask for the next token, when computed ahead ([`Constraint::prepare`]).
    ready: Option<toktrie::SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    /// An independent copy in the same state (one per choice of a request).
    pub fn fork(&self) -> Constraint {
        Constraint {
            matcher: self.matcher.deep_clone(),
            ready: self.ready.clone(),
        }
    }

    /// Sets the logit of every token that cannot come next to −∞ (once the output is
    /// complete, every token but end-of-sequence).
    ///
    /// # Errors
    /// [`ConstraintError::Failed`] when the grammar is in an error state.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let allowed = match self.ready.take() {
            Some(allowed) => allowed,
            None => self.allowed()?,
        };
        for (t, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(t as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Computes the next mask ahead of time (while the model runs its forward pass), so that
    /// [`Constraint::mask`] only applies it. A failure is left for `mask` to report.
    pub fn prepare(&mut self) {
        if self.ready.is_none() {
            self.ready = self.allowed().ok();
        }
    }

    fn allowed(&mut self) -> Result<toktrie::SimpleVob, ConstraintError> {
        self.matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Failed(e.to_string()))
    }

    /// Advances past `token` (which [`Constraint::mask`] allowed).
    ///
    /// # Errors
    /// [`ConstraintError::Failed`] for a token the grammar does not accept.
    pub fn advance(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.ready = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Failed(e.to_string()))
    }

    /// Whether the output is complete and nothing may follow it.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the output so far is a complete match (end-of-sequence is allowed).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}
