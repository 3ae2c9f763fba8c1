//! Submitting a prepared request to the engine and answering: as server-sent events (one
//! chunk per piece of text, then `[DONE]`) or as one JSON object, with log-probabilities and
//! `echo`ed prompt scores when asked for. Every answer carries `x-request-id` and
//! `x-graft-adapter` (`name@vN` or the base's name).

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
use graft_core::generation::sampling::SamplingParams;
use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use super::{now_secs, ApiError, AppState};
use crate::engine::{Event, Request};
use crate::registry::AdapterEntry;
use crate::scoring::TokenScore;
use crate::wire::{
    Alternatives, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs,
    ChatTokenLogprob, ChunkChoice, CompletionLogprobs, Delta, Header, ScoredText, TextChoice,
    TextCompletion, TopLogprob, Usage,
};

/// A checked request, ready but for its tokens.
pub struct Prepared<B: GraftBackend> {
    /// The name the client asked for.
    pub model_name: String,
    pub adapter: Option<Arc<AdapterEntry<B>>>,
    pub params: SamplingParams,
    pub stream: bool,
    /// Alternatives reported per token.
    pub top_logprobs: usize,
}

/// Which endpoint answers, with what it reports besides the text.
pub enum Answer {
    Chat {
        logprobs: bool,
    },
    Completion {
        logprobs: bool,
        /// `echo`: the prompt text, put before the completion (and scored with `logprobs`).
        echo: Option<String>,
    },
}

impl Answer {
    fn is_chat(&self) -> bool {
        matches!(self, Answer::Chat { .. })
    }

    fn logprobs(&self) -> bool {
        match self {
            Answer::Chat { logprobs } | Answer::Completion { logprobs, .. } => *logprobs,
        }
    }
}

/// Checks the request against the context and KV budget, submits it to the engine and
/// answers.
pub async fn respond<B: GraftBackend>(
    s: Arc<AppState<B>>,
    p: Prepared<B>,
    ids: Vec<u32>,
    answer: Answer,
) -> Result<Response, ApiError> {
    let need = ids.len() + p.params.max_new_tokens;
    if ids.is_empty() {
        return Err(ApiError::bad("the prompt has no tokens"));
    }
    let context = s.model.config.max_position_embeddings;
    if need > context {
        return Err(ApiError::bad(format!(
            "the prompt has {} tokens and max_tokens is {}: more than the model's context of {context}",
            ids.len(),
            p.params.max_new_tokens
        )));
    }
    if let Some(cap) = s.kv_tokens.filter(|&cap| need > cap) {
        return Err(ApiError::bad(format!(
            "the prompt has {} tokens and max_tokens is {}: more than the KV cache budget of {cap} tokens",
            ids.len(),
            p.params.max_new_tokens
        )));
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
    let (tx, rx) = unbounded_channel();
    let req = Request {
        prompt: ids,
        adapter: p.adapter,
        params: p.params,
        events: tx,
        deadline: Instant::now() + s.request_timeout,
        submitted: Instant::now(),
        id: header.id.clone(),
        model: tag.clone(),
        top_logprobs: p.top_logprobs,
        score_prompt: matches!(
            answer,
            Answer::Completion {
                logprobs: true,
                echo: Some(_)
            }
        ),
    };
    // Counted before the engine can finish it (the engine decrements).
    s.metrics.in_flight.fetch_add(1, Ordering::SeqCst);
    match s.engine.try_send(req) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            s.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
            s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::TooManyRequests);
        }
        Err(TrySendError::Disconnected(_)) => {
            s.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::Unavailable);
        }
    }
    s.metrics.request_for(&p.model_name);
    let adapter_header = HeaderValue::from_str(&tag)
        .map_err(|e| ApiError::Internal(format!("adapter tag header: {e}")))?;
    let request_id = HeaderValue::from_str(&header.id)
        .map_err(|e| ApiError::Internal(format!("request id header: {e}")))?;
    let mut resp = if p.stream {
        stream(header, rx, chat)
    } else {
        collect(&s, header, rx, answer, p.top_logprobs).await?
    };
    resp.headers_mut().insert("x-graft-adapter", adapter_header);
    resp.headers_mut().insert("x-request-id", request_id);
    Ok(resp)
}

/// Server-sent events: chat chunks (the first with the role) or text completion chunks; the
/// last carries the finish reason and usage.
fn stream(mut header: Header, rx: UnboundedReceiver<Event>, chat: bool) -> Response {
    fn sse(v: &impl Serialize) -> Result<SseEvent, Infallible> {
        Ok(SseEvent::default().data(serde_json::to_string(v).unwrap_or_default()))
    }
    header.object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    }
    .into();
    let chat_chunk = |header: &Header, delta: Delta, finish: Option<String>, usage| {
        sse(&ChatCompletionChunk {
            header: header.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish,
            }],
            usage,
        })
    };
    let text_chunk = |header: &Header, text: String, finish: Option<String>, usage| {
        sse(&TextCompletion {
            header: header.clone(),
            choices: vec![TextChoice {
                index: 0,
                text,
                finish_reason: finish,
                logprobs: None,
            }],
            usage,
        })
    };
    let first = chat.then(|| {
        let delta = Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        };
        chat_chunk(&header, delta, None, None)
    });
    let events = UnboundedReceiverStream::new(rx).filter_map(move |ev| match ev {
        Event::PromptScores(_) => None,
        Event::Token { text, .. } if text.is_empty() => None,
        Event::Token { text, .. } if chat => {
            let delta = Delta {
                role: None,
                content: Some(text),
            };
            Some(chat_chunk(&header, delta, None, None))
        }
        Event::Token { text, .. } => Some(text_chunk(&header, text, None, None)),
        Event::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
        } => {
            let finish = Some(finish_reason.as_str().to_string());
            let usage = Some(Usage::new(prompt_tokens, completion_tokens));
            Some(if chat {
                chat_chunk(&header, Delta::default(), finish, usage)
            } else {
                text_chunk(&header, String::new(), finish, usage)
            })
        }
    });
    let body = tokio_stream::iter(first)
        .chain(events)
        .chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]"))));
    Sse::new(body).into_response()
}

/// One JSON answer once the engine is done.
async fn collect<B: GraftBackend>(
    s: &AppState<B>,
    header: Header,
    mut rx: UnboundedReceiver<Event>,
    answer: Answer,
    top: usize,
) -> Result<Response, ApiError> {
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
    let mut text = String::new();
    let mut prompt_scores = Vec::new();
    let mut scores = Vec::new();
    let mut done = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::PromptScores(p) => prompt_scores = p.iter().map(named).collect(),
            Event::Token {
                score,
                text: t,
                final_piece,
            } => {
                text.push_str(&t);
                if answer.logprobs() && !final_piece {
                    scores.push(named(&score));
                }
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                done = Some((finish_reason, Usage::new(prompt_tokens, completion_tokens)));
                break;
            }
        }
    }
    let (finish, usage) =
        done.ok_or_else(|| ApiError::Internal("the engine dropped a request".into()))?;
    let finish = finish.as_str().to_string();
    Ok(match answer {
        Answer::Chat { logprobs } => {
            let logprobs = logprobs.then(|| ChatLogprobs {
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
            });
            Json(ChatCompletion {
                header,
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: text,
                    },
                    finish_reason: finish,
                    logprobs,
                }],
                usage,
            })
            .into_response()
        }
        Answer::Completion { logprobs, echo } => {
            let logprobs = logprobs.then(|| {
                let mut rows = prompt_scores;
                rows.extend(scores);
                CompletionLogprobs::new(&rows, top)
            });
            if let Some(prompt) = echo {
                text = format!("{prompt}{text}");
            }
            Json(TextCompletion {
                header,
                choices: vec![TextChoice {
                    index: 0,
                    text,
                    finish_reason: Some(finish),
                    logprobs,
                }],
                usage: Some(usage),
            })
            .into_response()
        }
    })
}
