//! Submitting a prepared request to the engine and answering: streamed (`super::stream`) or
//! as one JSON object, with log-probabilities, `echo`ed prompt scores and parsed tool calls
//! when asked for. A request with several prompts or `n` > 1 becomes
//! one engine request per choice (choice `k·n + j` is prompt `k`'s `j`-th), decoded together.
//! Every answer carries `x-request-id` and `x-graft-adapter` (`name@vN` or the base's name);
//! one whose adapter had to be read first carries `server-timing: adapter-load;dur=<ms>`.

use std::sync::atomic::Ordering;
use std::sync::mpsc::TrySendError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft_core::backend::GraftBackend;
use graft_core::generation::constraint::Constraint;
use graft_core::generation::sampling::SamplingParams;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::tools::ToolParse;
use super::{now_secs, ApiError, AppState};
use crate::engine::{Event, Request};
use crate::registry::AdapterEntry;
use crate::scoring::TokenScore;
use crate::wire::{
    Alternatives, AssistantMessage, ChatChoice, ChatCompletion, ChatLogprobs, ChatTokenLogprob,
    CompletionLogprobs, Header, ScoredText, TextChoice, TextCompletion, TopLogprob, Usage,
};

/// A checked request, ready but for its tokens.
pub struct Prepared<B: GraftBackend> {
    /// The name the client asked for.
    pub model_name: String,
    pub adapter: Option<Arc<AdapterEntry<B>>>,
    /// How long this request waited for its adapter to be read (it was not in memory).
    pub adapter_load: Option<Duration>,
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
        /// Parse tool calls out of the answer.
        tools: Option<ToolParse>,
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
pub(super) struct Choice {
    pub(super) index: usize,
    /// Which prompt it continues.
    pub(super) prompt: usize,
    pub(super) events: UnboundedReceiver<Event>,
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
    let choices_wanted = prompts.len() * p.n;
    if choices_wanted > s.max_queue {
        return Err(ApiError::bad_field(
            "n",
            format!(
                "{} prompts × n = {} choices: more than the server queues at once ({})",
                prompts.len(),
                choices_wanted,
                s.max_queue
            ),
        ));
    }
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
    let tools = match &answer {
        Answer::Chat { tools, .. } => tools.clone(),
        Answer::Completion { .. } => None,
    };
    let mut resp = if p.stream {
        super::stream::stream(header, choices, chat, tools, p.include_usage)
    } else {
        collect(&s, header, choices, &prompts, answer, p.top_logprobs).await?
    };
    resp.headers_mut().insert("x-graft-adapter", adapter_header);
    resp.headers_mut().insert("x-request-id", request_id);
    if let Some(took) = p.adapter_load {
        // W3C Server-Timing: clients and benchmarks see what the cold adapter cost.
        let timing = format!("adapter-load;dur={:.3}", took.as_secs_f64() * 1e3);
        if let Ok(v) = HeaderValue::from_str(&timing) {
            resp.headers_mut().insert("server-timing", v);
        }
    }
    Ok(resp)
}

/// Queues one engine request (a full queue is 429).
fn submit<B: GraftBackend>(s: &AppState<B>, req: Request<B>) -> Result<(), ApiError> {
    // Counted before the engine can finish it (the engine decrements).
    s.metrics.in_flight.fetch_add(1, Ordering::SeqCst);
    let adapter = req.adapter_name().map(str::to_string);
    s.metrics.waiting_add(adapter.as_deref());
    let refused = |s: &AppState<B>| {
        s.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
        s.metrics.waiting_remove(adapter.as_deref());
    };
    match s.engine.try_send(req) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => {
            refused(s);
            s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::TooManyRequests)
        }
        Err(TrySendError::Disconnected(_)) => {
            refused(s);
            Err(ApiError::Unavailable)
        }
    }
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
    request_id: &str,
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
            Event::Failed(message) => {
                return Err(ApiError::Failed {
                    request_id: request_id.into(),
                    message,
                })
            }
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
        let o = gather(s, c.events, answer.logprobs(), &header.id).await?;
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
                    let (content, calls) = match &tools {
                        Some(t) => t.split(&o.text),
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
