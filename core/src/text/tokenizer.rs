//! Tokenizers as `tokenizers::Tokenizer`, from an HF directory (`tokenizer.json` +
//! `tokenizer_config.json`) or built from GGUF metadata the way transformers' GGUF loader and
//! llama.cpp read it: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) or SentencePiece
//! (`"llama"`), special tokens from the token types, and the chat template.

use std::path::Path;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::formats::gguf::{GgufFile, GgufValue};

/// GGUF token types (`gguf-py` `TokenType`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// A tokenizer that cannot be built (naming its file or GGUF key), or text it cannot encode or
/// ids it cannot decode.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    File {
        path: std::path::PathBuf,
        message: String,
    },
    /// GGUF `tokenizer.*` metadata that is missing or malformed.
    #[error("GGUF tokenizer metadata: {0}")]
    Metadata(String),
    #[error("cannot encode the text: {0}")]
    Encode(String),
    #[error("cannot decode token ids: {0}")]
    Decode(String),
}

/// A tokenizer with the special tokens and chat template that come with it.
#[derive(Clone)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    /// Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Encodings with special tokens start with the BOS id (GGUF `add_bos_token`; for an HF
    /// tokenizer.json, whether its post-processor prepends BOS).
    pub add_bos: bool,
    pub bos_id: Option<u32>,
    /// Token ids that end generation (EOS, end-of-turn, generation_config's list).
    pub eos_ids: Vec<u32>,
}

impl std::fmt::Debug for TokenizerBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerBundle")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl TokenizerBundle {
    /// Token ids of `text`; with `add_special_tokens`, the BOS token where the model uses one.
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] with the tokenizer's own error text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos {
            if let Some(bos) = self.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Token ids of `text` (no special tokens added) with each token's byte range in `text`.
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] with the tokenizer's own error text.
    pub fn encode_with_offsets(
        &self,
        text: &str,
    ) -> Result<(Vec<u32>, Vec<(usize, usize)>), TokenizerError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`, with or without special tokens.
    ///
    /// # Errors
    /// [`TokenizerError::Decode`] with the tokenizer's own error text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The id of a token's exact text.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Loads `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` of an HF
    /// model directory.
    ///
    /// # Errors
    /// Unreadable or malformed files.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| TokenizerError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let read_json = |path: &Path| -> Result<Value, TokenizerError> {
            let fail = |message: String| TokenizerError::File {
                path: path.to_path_buf(),
                message,
            };
            let text =
                std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
            serde_json::from_str(&text).map_err(|e| fail(format!("invalid JSON: {e}")))
        };
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.is_file() {
            read_json(&cfg_path)?
        } else {
            json!({})
        };
        let token_str = |k: &str| match cfg.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let (bos_token, eos_token) = (token_str("bos_token"), token_str("eos_token"));
        let mut eos_ids: Vec<u32> = eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
            .into_iter()
            .collect();
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let gen = read_json(&gen_path)?;
            match gen.get("eos_token_id") {
                Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(Value::as_u64).map(|v| v as u32))
                }
                _ => {}
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let bos_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        // Whether the post-processor starts an encoding with BOS (text encoded without
        // special tokens, e.g. the parts of a training example, then gets it prepended).
        let first = |special| {
            tokenizer
                .encode("a", special)
                .ok()
                .and_then(|e| e.get_ids().first().copied())
        };
        let add_bos = bos_id.is_some() && first(true) == bos_id && first(false) != bos_id;
        Ok(TokenizerBundle {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            add_bos,
            bos_id,
            eos_ids,
        })
    }

    /// Writes the tokenizer as an HF model directory holds it: `tokenizer.json` (with a
    /// post-processor that adds BOS when this tokenizer adds one, as transformers expects),
    /// `tokenizer_config.json` (special tokens, chat template, `model_max_length` = `max_len`)
    /// and `generation_config.json` (BOS and EOS ids); each file atomically.
    ///
    /// # Errors
    /// [`TokenizerError::File`] naming the file that could not be made or written.
    pub fn write_hf_files(&self, dir: &Path, max_len: usize) -> Result<(), TokenizerError> {
        let fail = |name: &str, message: String| TokenizerError::File {
            path: dir.join(name),
            message,
        };
        let mut tok = self.tokenizer.clone();
        if let (true, Some(bos), Some(bos_id)) = (self.add_bos, &self.bos_token, self.bos_id) {
            let post = tokenizers::processors::template::TemplateProcessing::builder()
                .try_single(format!("{bos}:0 $A:0"))
                .and_then(|b| b.try_pair(format!("{bos}:0 $A:0 {bos}:1 $B:1")))
                .map_err(|e| fail("tokenizer.json", e.to_string()))?
                .special_tokens(vec![(bos.clone(), bos_id)])
                .build()
                .map_err(|e| fail("tokenizer.json", e.to_string()))?;
            tok.with_post_processor(Some(post));
        }
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_len,
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": false,
        });
        for (key, value) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("chat_template", &self.chat_template),
        ] {
            if let Some(v) = value {
                cfg[key] = v.clone().into();
            }
        }
        let generation = json!({"bos_token_id": self.bos_id, "eos_token_id": self.eos_ids});
        let files = [
            (
                "tokenizer.json",
                tok.to_string(false)
                    .map_err(|e| fail("tokenizer.json", e.to_string()))?,
            ),
            ("tokenizer_config.json", format!("{cfg:#}")),
            ("generation_config.json", format!("{generation:#}")),
        ];
        for (name, text) in files {
            crate::atomic::write_atomic(&dir.join(name), text.as_bytes())
                .map_err(|e| fail(name, format!("cannot write: {e}")))?;
        }
        Ok(())
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    ///
    /// # Errors
    /// A message naming the missing or malformed key.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TokenizerError> {
        let meta = |e: crate::formats::gguf::GgufError| TokenizerError::Metadata(e.to_string());
        let model = f.str("tokenizer.ggml.model").map_err(meta)?;
        let tokens = f.string_array("tokenizer.ggml.tokens").map_err(meta)?;
        let types: Vec<i64> = match f.opt_array("tokenizer.ggml.token_type").map_err(meta)? {
            Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
            None => vec![1; tokens.len()],
        };
        let id_key = |k: &str| f.opt_u64(k).ok().flatten().map(|v| v as u32);
        let bos_id = id_key("tokenizer.ggml.bos_token_id");
        let eos_id = id_key("tokenizer.ggml.eos_token_id");
        let eot_id = id_key("tokenizer.ggml.eot_token_id");
        let unk_id = id_key("tokenizer.ggml.unknown_token_id");
        let name = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .map(|s| s.to_string())
        };
        let added: Vec<Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &t))| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(id, (tok, &t))| {
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": t == TOKEN_USER_DEFINED, "special": t == TOKEN_CONTROL})
            })
            .collect();
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let (spec, add_bos_default) = match model {
            "gpt2" => {
                let merges = f.string_array("tokenizer.ggml.merges").map_err(meta)?;
                let pre = f.str("tokenizer.ggml.pre").unwrap_or("default");
                (byte_level_bpe(vocab, &merges, pre, &added), false)
            }
            "llama" => {
                let scores: Vec<f32> = match f.opt_array("tokenizer.ggml.scores").map_err(meta)? {
                    Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                    None => vec![0.0; tokens.len()],
                };
                let unk = name(unk_id).unwrap_or_else(|| "<unk>".into());
                // Gemma's SentencePiece model adds no dummy prefix (llama.cpp's key).
                let space_prefix = f
                    .opt_bool("tokenizer.ggml.add_space_prefix")
                    .ok()
                    .flatten()
                    .unwrap_or(true);
                (
                    sentencepiece_bpe(vocab, &tokens, &scores, &unk, &added, space_prefix),
                    true,
                )
            }
            other => {
                return Err(TokenizerError::Metadata(format!(
                    "tokenizer.ggml.model '{other}' is not supported (gpt2, llama)"
                )))
            }
        };
        let tokenizer: Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| TokenizerError::Metadata(format!("building tokenizer: {e}")))?;
        let add_bos = f
            .opt_bool("tokenizer.ggml.add_bos_token")
            .ok()
            .flatten()
            .unwrap_or(add_bos_default);
        let chat_template = match f.get("tokenizer.chat_template") {
            Some(GgufValue::String(s)) => Some(s.clone()),
            _ => None,
        };
        let mut eos_ids: Vec<u32> = eos_id.into_iter().chain(eot_id).collect();
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(TokenizerBundle {
            tokenizer,
            chat_template,
            bos_token: name(bos_id),
            eos_token: name(eos_id),
            add_bos,
            bos_id,
            eos_ids,
        })
    }
}

/// GPT-2 style byte-level BPE; the pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre`.
fn byte_level_bpe(
    vocab: serde_json::Map<String, Value>,
    merges: &[&str],
    pre: &str,
    added: &[Value],
) -> Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match pre {
        // llama.cpp's "smollm": digits one by one, then GPT-2's regex.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        _ => byte_level(true),
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

/// SentencePiece BPE (Llama 1/2, Mistral, Gemma): merges recovered from the vocabulary, each
/// pair ranked by the score of the piece it forms (as transformers' `SentencePieceExtractor`).
/// `space_prefix`: the text gets a leading `▁` (SentencePiece's dummy prefix), which decoding
/// strips again; Gemma has none.
fn sentencepiece_bpe(
    vocab: serde_json::Map<String, Value>,
    tokens: &[&str],
    scores: &[f32],
    unk: &str,
    added: &[Value],
    space_prefix: bool,
) -> Value {
    let index: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f32, usize, usize, Value)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    li,
                    ri,
                    // A pair, not "l r": Gemma's pieces may hold spaces.
                    json!([l, r]),
                ));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<Value> = merges.into_iter().map(|m| m.3).collect();
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let mut normalizers = vec![replace];
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if space_prefix {
        normalizers.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}
