//! Response bodies and streamed chunks of the two generation endpoints, with OpenAI's
//! log-probability objects (the chat form, and the legacy completions form that `echo`
//! scoring uses).

use serde::{Deserialize, Serialize};

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// What every response object starts with. `model` is the name the client asked for;
/// `system_fingerprint` says what answered (`base` or `adapter@vN`). Read leniently (missing
/// fields default), so `graft-serve bench` also reads other servers' answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Header {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
}

/// `chat.completion`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletion {
    #[serde(flatten)]
    pub header: Header,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub finish_reason: String,
    pub logprobs: Option<ChatLogprobs>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: String,
    /// Null when the answer is only tool calls.
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<super::ToolCall>>,
}

/// `chat.completion.chunk`: the first carries the role, the last the finish reason and usage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    #[serde(flatten)]
    pub header: Header,
    /// Empty in a usage-only chunk (OpenAI's `stream_options.include_usage`).
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A streamed tool call (graft sends each call whole, in one chunk).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: super::FunctionCall,
}

/// `text_completion`, whole or as a streamed chunk (chunks carry no usage until the last).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextCompletion {
    #[serde(flatten)]
    pub header: Header,
    pub choices: Vec<TextChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    pub finish_reason: Option<String>,
    pub logprobs: Option<CompletionLogprobs>,
}

/// Chat log-probabilities: one entry per generated token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl TopLogprob {
    pub fn new(token: String, logprob: f32) -> Self {
        let bytes = token.as_bytes().to_vec();
        TopLogprob {
            token,
            logprob,
            bytes,
        }
    }
}

/// Legacy completions log-probabilities, column-wise. The first prompt token of an `echo`
/// has no log-probability (`null`), nor alternatives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    /// `null` when no alternatives were asked for.
    pub top_logprobs: Option<Vec<Option<Alternatives>>>,
    pub text_offset: Vec<usize>,
}

/// A token text's score with its most likely alternatives, as graft computes them.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredText {
    pub token: String,
    /// `None` for the first token of a prompt (nothing precedes it).
    pub logprob: Option<f32>,
    pub top: Alternatives,
}

impl CompletionLogprobs {
    /// Columns of `rows`, with alternatives when `top > 0`.
    pub fn new(rows: &[ScoredText], top: usize) -> Self {
        let mut offset = 0;
        let text_offset = rows
            .iter()
            .map(|r| {
                let at = offset;
                offset += r.token.len();
                at
            })
            .collect();
        CompletionLogprobs {
            tokens: rows.iter().map(|r| r.token.clone()).collect(),
            token_logprobs: rows.iter().map(|r| r.logprob).collect(),
            top_logprobs: (top > 0).then(|| {
                rows.iter()
                    .map(|r| r.logprob.map(|_| r.top.clone()))
                    .collect()
            }),
            text_offset,
        }
    }
}

/// Alternatives as OpenAI writes them: a JSON object from token text to log-probability,
/// most likely first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Alternatives(pub Vec<(String, f32)>);

impl Serialize for Alternatives {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(t, l)| (t, l)))
    }
}

impl<'de> Deserialize<'de> for Alternatives {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        map.into_iter()
            .map(|(t, v)| {
                v.as_f64()
                    .map(|l| (t, l as f32))
                    .ok_or_else(|| serde::de::Error::custom("a log-probability must be a number"))
            })
            .collect::<Result<_, _>>()
            .map(Alternatives)
    }
}
