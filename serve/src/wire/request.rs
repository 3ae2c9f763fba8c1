//! Request bodies: OpenAI's `/v1/chat/completions` and `/v1/completions` (with vLLM's
//! `ignore_eos`). Unknown fields are ignored, as OpenAI-compatible servers do, so clients that
//! send newer options still work; a known field with a bad value is refused naming it.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// OpenAI: subtracted once from the logit of every token already generated (-2 to 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// OpenAI: subtracted per time a token was generated (-2 to 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// OpenAI: token id (as a string) → bias added to its logit (-100 to 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// vLLM: no end of sequence before this many tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<usize>,
    /// Same seed, same output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop before any of these strings.
    #[serde(default, skip_serializing_if = "Stop::is_none")]
    pub stop: Stop,
    /// Answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Choices per prompt (1 to 16); with a seed, choice i samples with seed + i.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// With `stream`: `include_usage` adds a last chunk with no choices and the usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// OpenAI: an id of the end user, written to the request log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// OpenAI: `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {…}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// vLLM: one of `json`, `regex`, `choice`, `grammar`, `json_object`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured_outputs: Option<StructuredOutputs>,
    /// vLLM (older names): a JSON schema (object, or JSON text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_json: Option<Value>,
    /// vLLM: a regular expression the whole output matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_regex: Option<String>,
    /// vLLM: the output is exactly one of these strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_choice: Option<Vec<String>>,
    /// vLLM: a Lark grammar (llguidance's dialect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_grammar: Option<String>,
    /// vLLM's extension: generate `max_tokens` tokens even past EOS (benchmarks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The schema (OpenAI allows it absent: any JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// Accepted; graft always follows the schema exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StructuredOutputs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choice: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_object: Option<bool>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
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
    /// Functions the model may call (rendered by the chat template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// Default: `auto` with tools, `none` without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
}

/// One message of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// Text, or a list of text parts; may be null on an assistant message with tool calls.
    #[serde(default)]
    pub content: Option<Content>,
    /// The calls an assistant message made (sent back with the tools' results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On a `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: Some(Content::Text(text.into())),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// `content`: a string, or parts of which graft reads the `text` ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or a list of content parts")]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content (`{"type": "text", "text": …}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// A call of a function, as the assistant made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI's convention).
    pub arguments: String,
}

/// A tool the model may call (`{"type": "function", "function": {…}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON schema of the arguments (none: no arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or one function by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}"
)]
pub enum ToolChoice {
    Mode(ToolMode),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolMode {
    None,
    Auto,
    Required,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedFunction {
    pub name: String,
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

/// `prompt`: a string, or a list of strings (one choice set per prompt).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

impl Prompt {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Prompt::One(s) => vec![s],
            Prompt::Many(v) => v,
        }
    }
}
