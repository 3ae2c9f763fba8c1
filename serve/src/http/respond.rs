//! Submitting a prepared request to the engine and answering: as server-sent events (one
//! chunk per piece of text, then `[DONE]`) or as one JSON object, with log-probabilities and
//! `echo`ed prompt scores when asked for. A request with several prompts or `n` > 1 becomes
//! one engine request per choice (choice `k·n + j` is prompt `k`'s `j`-th), decoded together.
//! Every answer carries `x-request-id` and `x-graft-adapter` (`name@vN` or the base's name).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::mpsc::TrySendError;
use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft_core::backend::GraftBackend;
use graft_core::generation::constraint::Constraint;
use graft_core::generation::sampling::SamplingParams;
use graft_core::text::tool_calls::ToolFormat;
use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

use super::{now_secs, tools, ApiError, AppState};
use crate::engine::{Event, Request};
use crate::registry::AdapterEntry;
use crate::scoring::TokenScore;
use crate::wire::{
    Alternatives, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs,
    ChatTokenLogprob, ChunkChoice, CompletionLogprobs, Delta, Header, ScoredText, TextChoice,
    TextCompletion, ToolCall, ToolCallDelta, TopLogprob, Usage,
};

/// A checked request, ready but for its tokens.
pub struct Prepared<B: GraftBackend> {
    /// The name the client asked for.
    pub model_name: String,
    pub adapter: Option<Arc<AdapterEntry<B>>>,
    pub params: SamplingParams,
    pub stream: bool,
    /// With `stream`: a last chunk with the usage and no choices.
    pub include_usage: bool,
    /// Choices per prompt.
    pub n: usize,
    /// Alternatives reported per token.
    pub top_logprobs: usize,
    /// The end user, for the request log.
    pub user: Option<String>,
    /// Structured output: what every choice must match.
    pub constraint: Option<Constraint>,
}

/// One prompt: its tokens and its text (put before the completion with `echo`).
pub struct PromptInput {
    pub ids: Vec<u32>,
    pub text: String,
}

/// Which endpoint answers, with what it reports besides the text.
pub enum Answer {
    Chat {
        logprobs: bool,
        /// Parse tool calls out of the answer, written in this format.
        tools: Option<ToolFormat>,
    },
    Completion {
        logprobs: bool,
        /// Put the prompt before the completion (and score it, with `logprobs`).
        echo: bool,
    },
}

impl Answer {
    fn is_chat(&self) -> bool {
        matches!(self, Answer::Chat { .. })
    }

    fn logprobs(&self) -> bool {
        match self {
            Answer::Chat { logprobs, .. } | Answer::Completion { logprobs, .. } => *logprobs,
        }
    }
}

/// What answers one choice.
struct Choice {
    index: usize,
    /// Which prompt it continues.
    prompt: usize,
    events: UnboundedReceiver<Event>,
}

/// Checks the request against the context and KV budget, submits every choice to the engine
/// and answers.
pub async fn respond<B: GraftBackend>(
    s: Arc<AppState<B>>,
    p: Prepared<B>,
    prompts: Vec<PromptInput>,
    answer: Answer,
) -> Result<Response, ApiError> {
    let context = s.model.config.max_position_embeddings;
    for (i, prompt) in prompts.iter().enumerate() {
        let param = if prompts.len() > 1 {
            format!("prompt[{i}]")
        } else {
            "prompt".into()
        };
        let need = prompt.ids.len() + p.params.max_new_tokens;
        if prompt.ids.is_empty() {
            return Err(ApiError::bad_field(&param, "the prompt has no tokens"));
        }
        if need > context {
            return Err(ApiError::bad(format!(
                "the prompt has {} tokens and max_tokens is {}: more than the model's context of {context}",
                prompt.ids.len(),
                p.params.max_new_tokens
            )));
        }
        if let Some(cap) = s.kv_tokens.filter(|&cap| need > cap) {
            return Err(ApiError::bad(format!(
                "the prompt has {} tokens and max_tokens is {}: more than the KV cache budget of {cap} tokens",
                prompt.ids.len(),
                p.params.max_new_tokens
            )));
        }
    }
    let tag = match &p.adapter {
        Some(a) => {
            a.requests.fetch_add(1, Ordering::Relaxed);
            format!("{}@v{}", a.name, a.version)
        }
        None => s.base_name.clone(),
    };
    let chat = answer.is_chat();
    let header = Header {
        id: format!(
            "{}-{:016x}",
            if chat { "chatcmpl" } else { "cmpl" },
            rand::random::<u64>()
        ),
        object: if chat {
            "chat.completion"
        } else {
            "text_completion"
        }
        .into(),
        created: now_secs(),
        model: p.model_name.clone(),
        system_fingerprint: tag.clone(),
    };
    let score_prompt = matches!(
        answer,
        Answer::Completion {
            logprobs: true,
            echo: true
        }
    );
    let mut choices = Vec::with_capacity(prompts.len() * p.n);
    for (k, prompt) in prompts.iter().enumerate() {
        for j in 0..p.n {
            let (tx, rx) = unbounded_channel();
            let mut params = p.params.clone();
            params.seed = params.seed.map(|seed| seed.wrapping_add(j as u64));
            let req = Request {
                prompt: prompt.ids.clone(),
                adapter: p.adapter.clone(),
                params,
                events: tx,
                deadline: Instant::now() + s.request_timeout,
                submitted: Instant::now(),
                id: header.id.clone(),
                model: tag.clone(),
                top_logprobs: p.top_logprobs,
                score_prompt,
                user: p.user.clone(),
                constraint: p.constraint.as_ref().map(Constraint::fork),
            };
            submit(&s, req)?;
            choices.push(Choice {
                index: k * p.n + j,
                prompt: k,
                events: rx,
            });
        }
    }
    s.metrics.request_for(&p.model_name);
    let adapter_header = HeaderValue::from_str(&tag)
        .map_err(|e| ApiError::Internal(format!("adapter tag header: {e}")))?;
    let request_id = HeaderValue::from_str(&header.id)
        .map_err(|e| ApiError::Internal(format!("request id header: {e}")))?;
    let tools = match answer {
        Answer::Chat { tools, .. } => tools,
        Answer::Completion { .. } => None,
    };
    let mut resp = if p.stream {
        stream(header, choices, chat, tools, p.include_usage)
    } else {
        collect(&s, header, choices, &prompts, answer, p.top_logprobs).await?
    };
    resp.headers_mut().insert("x-graft-adapter", adapter_header);
    resp.headers_mut().insert("x-request-id", request_id);
    Ok(resp)
}

/// Queues one engine request (a full queue is 429).
fn submit<B: GraftBackend>(s: &AppState<B>, req: Request<B>) -> Result<(), ApiError> {
    // Counted before the engine can finish it (the engine decrements).
    s.metrics.in_flight.fetch_add(1, Ordering::SeqCst);
    match s.engine.try_send(req) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => {
            s.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
            s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::TooManyRequests)
        }
        Err(TrySendError::Disconnected(_)) => {
            s.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
            Err(ApiError::Unavailable)
        }
    }
}

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
    fn finish(self, format: ToolFormat) -> (Option<String>, Vec<ToolCall>) {
        let (content, calls) = format.parse(&self.text[self.sent..]);
        (content, tools::wire_calls(calls))
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
fn stream(
    mut header: Header,
    choices: Vec<Choice>,
    chat: bool,
    tools: Option<ToolFormat>,
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

async fn forward(
    chunks: Chunks,
    choices: Vec<Choice>,
    tools: Option<ToolFormat>,
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
            Event::Token { text, .. } if text.is_empty() => continue,
            Event::Token { text, .. } => match tools {
                Some(format) => {
                    if let Some(t) = held.entry(index).or_default().push(&text, format) {
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
                if let (Some(format), Some(h)) = (tools, held.remove(&index)) {
                    let (content, calls) = h.finish(format);
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
                out.push(chunks.finish(index, reason, (done == total).then_some(usage)));
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

/// What the engine produced for one choice.
struct Outcome {
    text: String,
    prompt_scores: Vec<ScoredText>,
    scores: Vec<ScoredText>,
    finish: String,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// Reads one choice's events to the end.
async fn gather<B: GraftBackend>(
    s: &AppState<B>,
    mut rx: UnboundedReceiver<Event>,
    logprobs: bool,
) -> Result<Outcome, ApiError> {
    let named = |t: &TokenScore| ScoredText {
        token: s.tokenizer.decode(&[t.id], false).unwrap_or_default(),
        logprob: t.logprob,
        top: Alternatives(
            t.top
                .iter()
                .map(|a| {
                    let token = s.tokenizer.decode(&[a.id], false).unwrap_or_default();
                    (token, a.logprob)
                })
                .collect(),
        ),
    };
    let mut out = Outcome {
        text: String::new(),
        prompt_scores: Vec::new(),
        scores: Vec::new(),
        finish: String::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::PromptScores(p) => out.prompt_scores = p.iter().map(named).collect(),
            Event::Token {
                score,
                text,
                final_piece,
            } => {
                out.text.push_str(&text);
                if logprobs && !final_piece {
                    out.scores.push(named(&score));
                }
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                out.finish = finish_reason.as_str().into();
                out.prompt_tokens = prompt_tokens;
                out.completion_tokens = completion_tokens;
                return Ok(out);
            }
        }
    }
    Err(ApiError::Internal("the engine dropped a request".into()))
}

/// One JSON answer once the engine is done with every choice.
async fn collect<B: GraftBackend>(
    s: &AppState<B>,
    header: Header,
    choices: Vec<Choice>,
    prompts: &[PromptInput],
    answer: Answer,
    top: usize,
) -> Result<Response, ApiError> {
    let mut usage = Usage::new(0, 0);
    let mut counted = vec![false; prompts.len()];
    let mut outcomes = Vec::with_capacity(choices.len());
    for c in choices {
        // The engine runs every choice at once; reading them in turn only orders the answer.
        let (index, prompt_index) = (c.index, c.prompt);
        let o = gather(s, c.events, answer.logprobs()).await?;
        let prompt = if std::mem::replace(&mut counted[prompt_index], true) {
            0
        } else {
            o.prompt_tokens
        };
        usage = Usage::new(
            usage.prompt_tokens + prompt,
            usage.completion_tokens + o.completion_tokens,
        );
        outcomes.push(((index, prompt_index), o));
    }
    Ok(match answer {
        Answer::Chat { logprobs, tools } => {
            let choices = outcomes
                .into_iter()
                .map(|((index, _), o)| {
                    let (content, calls) = match tools {
                        Some(format) => {
                            let (content, calls) = format.parse(&o.text);
                            (content, tools::wire_calls(calls))
                        }
                        None => (Some(o.text), Vec::new()),
                    };
                    ChatChoice {
                        index,
                        finish_reason: if calls.is_empty() {
                            o.finish
                        } else {
                            "tool_calls".into()
                        },
                        message: AssistantMessage {
                            role: "assistant".into(),
                            content,
                            tool_calls: (!calls.is_empty()).then_some(calls),
                        },
                        logprobs: logprobs.then(|| chat_logprobs(o.scores)),
                    }
                })
                .collect();
            Json(ChatCompletion {
                header,
                choices,
                usage,
            })
            .into_response()
        }
        Answer::Completion { logprobs, echo } => {
            let choices = outcomes
                .into_iter()
                .map(|((index, prompt), o)| {
                    let logprobs = logprobs.then(|| {
                        let mut rows = o.prompt_scores;
                        rows.extend(o.scores);
                        CompletionLogprobs::new(&rows, top)
                    });
                    let text = if echo {
                        format!("{}{}", prompts[prompt].text, o.text)
                    } else {
                        o.text
                    };
                    TextChoice {
                        index,
                        text,
                        finish_reason: Some(o.finish),
                        logprobs,
                    }
                })
                .collect();
            Json(TextCompletion {
                header,
                choices,
                usage: Some(usage),
            })
            .into_response()
        }
    })
}

fn chat_logprobs(scores: Vec<ScoredText>) -> ChatLogprobs {
    ChatLogprobs {
        content: scores
            .into_iter()
            .map(|r| ChatTokenLogprob {
                bytes: r.token.as_bytes().to_vec(),
                token: r.token,
                logprob: r.logprob.unwrap_or_default(),
                top_logprobs: r
                    .top
                    .0
                    .into_iter()
                    .map(|(t, l)| TopLogprob::new(t, l))
                    .collect(),
            })
            .collect(),
    }
}
