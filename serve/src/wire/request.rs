//! Request bodies: OpenAI's `/v1/chat/completions` and `/v1/completions` (with vLLM's
//! `ignore_eos`). Unknown fields are ignored, as OpenAI-compatible servers do, so clients that
//! send newer options still work; a known field with a bad value is refused naming it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{body_value, from_value, WireError};

/// A request: the sampling fields both endpoints share, and the endpoint's own.
///
/// Serialized flat (as clients send it); parsed with [`Request::parse`], which reads the two
/// parts from the same JSON object so that errors keep their field path.
#[derive(Debug, Clone, Serialize)]
pub struct Request<T> {
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(flatten)]
    pub fields: T,
}

/// `POST /v1/chat/completions`.
pub type ChatCompletionRequest = Request<ChatFields>;
/// `POST /v1/completions`.
pub type CompletionRequest = Request<CompletionFields>;

impl<T: DeserializeOwned> Request<T> {
    /// # Errors
    /// Invalid JSON or a bad field, named in [`WireError::param`].
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let v = body_value(bytes)?;
        Ok(Request {
            sampling: from_value(&v)?,
            fields: from_value(&v)?,
        })
    }
}

/// Sampling and limits, with OpenAI's names and defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sampling {
    /// The base model's served name or an adapter's name.
    pub model: String,
    /// Tokens to generate at most. Default: 16 (completions), the server's limit capped at
    /// 1024 (chat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// Chat's newer name for `max_tokens`; wins when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<usize>,
    /// Default 1; 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// vLLM's extension: sample among the k most likely tokens (0: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// vLLM's extension: drop tokens less likely than `min_p` × the most likely one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// vLLM's extension: divide the logits of tokens already seen by this (>1 repeats less).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Same seed, same output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop before any of these strings.
    #[serde(default, skip_serializing_if = "Stop::is_none")]
    pub stop: Stop,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Choices per request; only 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// vLLM's extension: generate `max_tokens` tokens even past EOS (benchmarks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn is_none(&self) -> bool {
        *self == Stop::None
    }

    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::None => Vec::new(),
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// The chat endpoint's own fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatFields {
    pub messages: Vec<ChatMessage>,
    /// Report the sampled tokens' log-probabilities.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logprobs: bool,
    /// Alternatives reported per token (0–20; needs `logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<usize>,
}

/// One message of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// Who wrote a message (OpenAI's roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// The completions endpoint's own fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionFields {
    pub prompt: Prompt,
    /// Report log-probabilities with this many alternatives per token (0–20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<usize>,
    /// Return the prompt before the completion (with `logprobs`: scored token by token;
    /// with `max_tokens = 0` as well: only scored).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub echo: bool,
}

/// `prompt`: a string, or a list holding one string.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or a list of one string")]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

impl Prompt {
    /// The one prompt text, if there is exactly one.
    pub fn single(self) -> Option<String> {
        match self {
            Prompt::One(s) => Some(s),
            Prompt::Many(v) if v.len() == 1 => v.into_iter().next(),
            Prompt::Many(_) => None,
        }
    }
}
