//! Streamed answers: server-sent events with one chunk per piece of text of each choice (chat
//! chunks open each choice with the role), the finish reason of each choice, the usage of the
//! whole request on the last, `[DONE]` at the end; tool calls held back and sent whole.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use graft_core::text::tool_calls::ToolFormat;
use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

use super::respond::Choice;
use super::tools::ToolParse;
use crate::engine::Event;
use crate::wire::{
    ChatCompletionChunk, ChunkChoice, Delta, Header, TextChoice, TextCompletion, ToolCall,
    ToolCallDelta, Usage,
};

/// Builds the streamed chunks of one answer.
struct Chunks {
    header: Header,
    chat: bool,
}

/// A streamed chat choice that may call tools: text that is (or may become) a call is held
/// back until the choice ends, then sent as `delta.tool_calls` (or as text after all).
#[derive(Default)]
struct ToolStream {
    text: String,
    /// Bytes of `text` already sent as content.
    sent: usize,
}

impl ToolStream {
    /// The text that can go out now.
    fn push(&mut self, piece: &str, format: ToolFormat) -> Option<String> {
        self.text.push_str(piece);
        let until = format
            .hold_from(&self.text)
            .unwrap_or(self.text.len())
            .max(self.sent);
        let out = self.text[self.sent..until].to_string();
        self.sent = until;
        (!out.is_empty()).then_some(out)
    }

    /// At the end: remaining text and the calls in the held part.
    fn finish(self, tools: &ToolParse) -> (Option<String>, Vec<ToolCall>) {
        tools.split(&self.text[self.sent..])
    }
}

impl Chunks {
    fn event(v: &impl Serialize) -> SseEvent {
        SseEvent::default().data(serde_json::to_string(v).unwrap_or_default())
    }

    fn chunk(
        &self,
        index: usize,
        delta: Delta,
        finish: Option<String>,
        usage: Option<Usage>,
    ) -> SseEvent {
        if self.chat {
            Self::event(&ChatCompletionChunk {
                header: self.header.clone(),
                choices: vec![ChunkChoice {
                    index,
                    delta,
                    finish_reason: finish,
                }],
                usage,
            })
        } else {
            Self::event(&TextCompletion {
                header: self.header.clone(),
                choices: vec![TextChoice {
                    index,
                    text: delta.content.unwrap_or_default(),
                    finish_reason: finish,
                    logprobs: None,
                }],
                usage,
            })
        }
    }

    /// A chat choice opens with the role and empty content.
    fn role(&self, index: usize) -> SseEvent {
        let delta = Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
            tool_calls: None,
        };
        self.chunk(index, delta, None, None)
    }

    fn text(&self, index: usize, text: String) -> SseEvent {
        let delta = Delta {
            role: None,
            content: Some(text),
            tool_calls: None,
        };
        self.chunk(index, delta, None, None)
    }

    fn finish(&self, index: usize, reason: &str, usage: Option<Usage>) -> SseEvent {
        let delta = if self.chat {
            Delta::default()
        } else {
            Delta {
                role: None,
                content: Some(String::new()),
                tool_calls: None,
            }
        };
        self.chunk(index, delta, Some(reason.into()), usage)
    }

    /// A choice's tool calls, whole.
    fn tool_calls(&self, index: usize, calls: Vec<ToolCall>) -> SseEvent {
        let delta = Delta {
            tool_calls: Some(
                calls
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| ToolCallDelta {
                        index: i,
                        id: c.id,
                        kind: c.kind,
                        function: c.function,
                    })
                    .collect(),
            ),
            ..Delta::default()
        };
        self.chunk(index, delta, None, None)
    }

    /// `stream_options.include_usage`: no choices, the request's usage.
    fn usage_only(&self, usage: Usage) -> SseEvent {
        if self.chat {
            Self::event(&ChatCompletionChunk {
                header: self.header.clone(),
                choices: Vec::new(),
                usage: Some(usage),
            })
        } else {
            Self::event(&TextCompletion {
                header: self.header.clone(),
                choices: Vec::new(),
                usage: Some(usage),
            })
        }
    }
}

/// Server-sent events: chat chunks (each choice opening with the role) or text completion
/// chunks, each naming its choice; a choice's last chunk carries its finish reason, and the
/// last of all the usage of the whole request (and, with `include_usage`, a chunk of its own
/// follows). A task forwards the engine's events; when the client goes away it stops, which
/// drops the engine's channels and frees the slots.
pub(super) fn stream(
    mut header: Header,
    choices: Vec<Choice>,
    chat: bool,
    tools: Option<ToolParse>,
    include_usage: bool,
) -> Response {
    header.object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    }
    .into();
    let (tx, rx) = unbounded_channel();
    tokio::spawn(forward(
        Chunks { header, chat },
        choices,
        tools,
        include_usage,
        tx,
    ));
    Sse::new(UnboundedReceiverStream::new(rx)).into_response()
}

/// Reads every choice's engine events and sends their chunks, until all are done or the
/// client is gone.
async fn forward(
    chunks: Chunks,
    choices: Vec<Choice>,
    tools: Option<ToolParse>,
    include_usage: bool,
    tx: UnboundedSender<Result<SseEvent, Infallible>>,
) {
    let mut held: std::collections::HashMap<usize, ToolStream> = Default::default();
    let send = |ev: SseEvent| tx.send(Ok(ev)).is_ok();
    let total = choices.len();
    // Prompt tokens count once per prompt, from its first choice.
    let mut first_of_prompt = Vec::new();
    let mut events = StreamMap::new();
    for c in choices {
        if chunks.chat && !send(chunks.role(c.index)) {
            return;
        }
        if first_of_prompt.len() <= c.prompt {
            first_of_prompt.push(c.index);
        }
        events.insert(c.index, UnboundedReceiverStream::new(c.events));
    }
    let (mut done, mut usage) = (0, Usage::new(0, 0));
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = events.next() => next,
        };
        let Some((index, ev)) = next else { break };
        let mut out = Vec::new();
        match ev {
            Event::PromptScores(_) => continue,
            Event::Failed(message) => {
                // The choice ends here (a Done follows); say why, in OpenAI's error shape.
                let error = crate::wire::ErrorResponse {
                    error: crate::wire::ErrorObject {
                        message,
                        kind: "server_error".into(),
                        param: None,
                        code: "generation_failed".into(),
                    },
                };
                out.push(Chunks::event(&error));
            }
            Event::Token { text, .. } if text.is_empty() => continue,
            Event::Token { text, .. } => match &tools {
                Some(t) => {
                    if let Some(t) = held.entry(index).or_default().push(&text, t.format) {
                        out.push(chunks.text(index, t));
                    }
                }
                None => out.push(chunks.text(index, text)),
            },
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut reason = finish_reason.as_str();
                if let (Some(t), Some(h)) = (&tools, held.remove(&index)) {
                    let (content, calls) = h.finish(t);
                    if let Some(t) = content {
                        out.push(chunks.text(index, t));
                    }
                    if !calls.is_empty() {
                        reason = "tool_calls";
                        out.push(chunks.tool_calls(index, calls));
                    }
                }
                done += 1;
                let prompt = if first_of_prompt.contains(&index) {
                    prompt_tokens
                } else {
                    0
                };
                usage = Usage::new(
                    usage.prompt_tokens + prompt,
                    usage.completion_tokens + completion_tokens,
                );
                // With include_usage the usage comes once, in its own last chunk.
                let last = done == total && !include_usage;
                out.push(chunks.finish(index, reason, last.then_some(usage)));
            }
        }
        for ev in out {
            if !send(ev) {
                return;
            }
        }
    }
    if include_usage && !send(chunks.usage_only(usage)) {
        return;
    }
    let _ = send(SseEvent::default().data("[DONE]"));
}
