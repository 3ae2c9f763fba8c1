//! The OpenAI-compatible HTTP API (and vLLM's adapter management endpoints).
//!
//! Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a stable
//! code per [`ApiError`] variant; 5xx bodies say nothing about internals.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use graft_core::backend::GraftBackend;
use graft_core::generation::sampling::SamplingParams;
use graft_core::model::Model;
use graft_core::text::chat::{ChatTemplate, Message};
use graft_core::text::tokenizer::TokenizerBundle;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::unbounded_channel;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::engine::{Event, Request};
use crate::registry::{AdapterEntry, Registry, RegistryError};

/// Everything the handlers share.
pub struct AppState<B: GraftBackend> {
    pub model: Arc<Model<B>>,
    pub tokenizer: Arc<TokenizerBundle>,
    pub template: Option<ChatTemplate>,
    pub registry: Registry<B>,
    pub engine: SyncSender<Request<B>>,
    pub base_name: String,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// KV cache budget in tokens (a request needing more can never run).
    pub kv_tokens: Option<usize>,
    pub request_timeout: Duration,
    pub started: u64,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// An API failure: HTTP status, OpenAI error type and a stable code.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    NotFound(String),
    TooManyRequests,
    Unavailable,
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, code, message) = match self {
            ApiError::BadRequest(m) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad_request",
                m,
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                "missing or wrong API key".into(),
            ),
            ApiError::NotFound(m) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                m,
            ),
            ApiError::TooManyRequests => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                "the server is at capacity; retry shortly".into(),
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "unavailable",
                "the server is shutting down".into(),
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                "internal error".into(),
            ),
        };
        let body =
            Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}}));
        let mut resp = (status, body).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(_) => ApiError::NotFound(e.to_string()),
            _ => ApiError::BadRequest(e.to_string()),
        }
    }
}

pub fn router<B: GraftBackend>(state: Arc<AppState<B>>) -> Router
where
    B::Device: Send + Sync,
{
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics::<B>))
        .route("/v1/models", get(models::<B>))
        .route("/v1/completions", post(completions::<B>))
        .route("/v1/chat/completions", post(chat::<B>))
        .route("/v1/load_lora_adapter", post(load_adapter::<B>))
        .route("/v1/unload_lora_adapter", post(unload_adapter::<B>))
        .route("/v1/adapters", get(adapters::<B>))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

fn check_key(headers: &HeaderMap, key: &Option<String>) -> Result<(), ApiError> {
    let Some(key) = key else { return Ok(()) };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn adapter_json<B: GraftBackend>(e: &AdapterEntry<B>) -> Value {
    json!({
        "name": e.name, "version": e.version, "source": e.source, "format": e.format,
        "rank": e.info.rank, "target_modules": e.info.target_modules, "modules": e.info.modules,
        "bytes": e.info.bytes, "location": "memory", "requests": e.requests.load(Ordering::Relaxed),
    })
}

/// Every known adapter, in memory or evicted to disk.
fn catalog_json<B: GraftBackend>(s: &AppState<B>) -> Vec<Value> {
    s.registry
        .catalog()
        .into_iter()
        .map(|(name, version, source, info, requests, in_memory)| {
            let mut v = json!({"name": name, "version": version, "source": source, "requests": requests,
                               "location": if in_memory { "memory" } else { "disk" }});
            if let Some(i) = info {
                v["rank"] = json!(i.rank);
                v["target_modules"] = json!(i.target_modules);
                v["modules"] = json!(i.modules);
                v["bytes"] = json!(i.bytes);
            }
            v
        })
        .collect()
}

async fn metrics<B: GraftBackend>(State(s): State<Arc<AppState<B>>>) -> Response {
    let r = &s.registry;
    let body = s.metrics.render(
        r.list().len(),
        r.loaded_bytes(),
        r.evictions.load(Ordering::Relaxed),
        r.reloads.load(Ordering::Relaxed),
    );
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

async fn models<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_key(&headers, &s.api_key)?;
    let mut data = vec![
        json!({"id": s.base_name, "object": "model", "created": s.started, "owned_by": "graft", "root": s.base_name, "parent": null}),
    ];
    for a in catalog_json(&s) {
        data.push(json!({"id": a["name"], "object": "model", "created": s.started, "owned_by": "graft", "root": a["source"], "parent": s.base_name, "adapter": a}));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn adapters<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_key(&headers, &s.admin_key.clone().or_else(|| s.api_key.clone()))?;
    Ok(Json(json!({"object": "list", "data": catalog_json(&s)})))
}

#[derive(Deserialize)]
struct LoadBody {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadBody {
    lora_name: String,
}

async fn load_adapter<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError>
where
    B::Device: Send + Sync,
{
    check_key(&headers, &s.admin_key)?;
    let b: LoadBody = parse(&body)?;
    let state = s.clone();
    // Reading and validating the files must not stall the async runtime.
    let entry = tokio::task::spawn_blocking(move || {
        state.registry.load(
            &b.lora_name,
            std::path::Path::new(&b.lora_path),
            &state.model,
        )
    })
    .await
    .map_err(|_| ApiError::Internal)??;
    Ok(Json(adapter_json(&entry)))
}

async fn unload_adapter<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    check_key(&headers, &s.admin_key)?;
    let b: UnloadBody = parse(&body)?;
    if s.registry.unload(&b.lora_name) {
        s.metrics.adapter_unloads.fetch_add(1, Ordering::Relaxed);
        Ok(Json(json!({"name": b.lora_name, "unloaded": true})))
    } else {
        Err(ApiError::NotFound(format!(
            "no adapter named '{}'",
            b.lora_name
        )))
    }
}

/// `stop` may be a string or a list of strings.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::None => Vec::new(),
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// The sampling fields shared by both endpoints (OpenAI names and defaults).
#[derive(Deserialize)]
struct Sampling {
    model: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Stop,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    n: Option<usize>,
    /// vLLM's extension: generate `max_tokens` tokens even past EOS (benchmarks).
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    sampling: Sampling,
    prompt: Value,
    /// Return the sampled tokens' log-probabilities (OpenAI: an int, the number of
    /// alternatives; graft returns the sampled token's only).
    #[serde(default)]
    logprobs: Option<u32>,
    /// Return the prompt before the completion (with `logprobs`: scored token by token).
    #[serde(default)]
    echo: bool,
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    sampling: Sampling,
    messages: Vec<Message>,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<u32>,
}

/// A validated request ready for the engine.
struct Prepared<B: GraftBackend> {
    model_name: String,
    adapter: Option<Arc<AdapterEntry<B>>>,
    params: SamplingParams,
    stream: bool,
}

async fn prepare<B: GraftBackend>(
    s: &Arc<AppState<B>>,
    sp: Sampling,
    default_max: usize,
) -> Result<Prepared<B>, ApiError>
where
    B::Device: Send + Sync,
{
    use crate::registry::Lookup;
    let adapter = if sp.model == s.base_name {
        None
    } else {
        match s.registry.lookup(&sp.model) {
            Lookup::Loaded(e) => Some(e),
            Lookup::Unknown => {
                return Err(ApiError::NotFound(format!(
                    "the model '{}' does not exist",
                    sp.model
                )))
            }
            Lookup::OnDisk => {
                // Evicted: read it again, off the async runtime, so other requests go on.
                let (state, name) = (s.clone(), sp.model.clone());
                let t0 = Instant::now();
                let e =
                    tokio::task::spawn_blocking(move || state.registry.reload(&name, &state.model))
                        .await
                        .map_err(|_| ApiError::Internal)??;
                s.metrics
                    .adapter_load_secs
                    .observe(t0.elapsed().as_secs_f64());
                Some(e)
            }
        }
    };
    if sp.n.is_some_and(|n| n != 1) {
        return Err(ApiError::BadRequest("only n = 1 is supported".into()));
    }
    let max_tokens = sp
        .max_completion_tokens
        .or(sp.max_tokens)
        .unwrap_or(default_max);
    if max_tokens == 0 || max_tokens > s.max_tokens_limit {
        return Err(ApiError::BadRequest(format!(
            "max_tokens = {max_tokens} must be between 1 and {}",
            s.max_tokens_limit
        )));
    }
    let params = SamplingParams {
        temperature: sp.temperature.unwrap_or(1.0),
        top_p: sp.top_p.unwrap_or(1.0),
        seed: sp.seed,
        max_new_tokens: max_tokens,
        stop_strings: sp.stop.into_vec(),
        ignore_eos: sp.ignore_eos,
        ..SamplingParams::default()
    };
    params.validate().map_err(ApiError::BadRequest)?;
    Ok(Prepared {
        model_name: sp.model,
        adapter,
        params,
        stream: sp.stream,
    })
}

async fn completions<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_key(&headers, &s.api_key)?;
    let b: CompletionBody = parse(&body)?;
    let prompt = match b.prompt {
        Value::String(p) => p,
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => return Err(ApiError::BadRequest("prompt must be a string".into())),
    };
    let top = b.logprobs.unwrap_or(0) as usize;
    if top > 20 {
        return Err(ApiError::BadRequest(format!(
            "logprobs = {top} must be at most 20"
        )));
    }
    let scoring_only = b.echo && b.sampling.max_tokens == Some(0);
    let mut sampling = b.sampling;
    if scoring_only {
        sampling.max_tokens = Some(1); // validated like any request; nothing is generated
    }
    if b.echo && sampling.stream {
        return Err(ApiError::BadRequest(
            "echo is not supported with stream".into(),
        ));
    }
    let mut p = prepare(&s, sampling, 16).await?;
    let ids = s
        .tokenizer
        .encode(&prompt, true)
        .map_err(|e| ApiError::BadRequest(format!("cannot tokenize the prompt: {e}")))?;
    let mut report = Report {
        logprobs: b.logprobs.is_some(),
        top,
        echo: None,
    };
    if b.echo {
        let scores = if report.logprobs {
            let (state, adapter, ids2) = (s.clone(), p.adapter.clone(), ids.clone());
            let raw = tokio::task::spawn_blocking(move || {
                crate::scoring::score_prompt(
                    &state.model,
                    adapter.as_ref().map(|e| &e.adapter),
                    &ids2,
                    top,
                )
            })
            .await
            .map_err(|_| ApiError::Internal)?;
            let name = |id: u32| s.tokenizer.decode(&[id], false).unwrap_or_default();
            ids.iter()
                .zip(raw)
                .map(|(&id, (lp, alts))| {
                    (
                        name(id),
                        lp,
                        alts.into_iter().map(|(a, l)| (name(a), l)).collect(),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        report.echo = Some((prompt.clone(), scores));
    }
    if scoring_only {
        return Ok(echo_only(&s, p.model_name, ids.len(), report));
    }
    p.params.max_new_tokens = p.params.max_new_tokens.max(1);
    run(s, p, ids, false, report).await
}

async fn chat<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_key(&headers, &s.api_key)?;
    let b: ChatBody = parse(&body)?;
    if b.messages.is_empty() {
        return Err(ApiError::BadRequest("messages must not be empty".into()));
    }
    let p = prepare(&s, b.sampling, s.max_tokens_limit.min(1024)).await?;
    let template = s.template.as_ref().ok_or_else(|| {
        ApiError::BadRequest(
            "the model has no chat template: use /v1/completions, or start graft-serve with \
             --chat-template"
                .into(),
        )
    })?;
    let text = template
        .render(&b.messages, true)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let ids = s
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::BadRequest(format!("cannot tokenize the messages: {e}")))?;
    let top = b.top_logprobs.unwrap_or(0) as usize;
    if top > 20 || (top > 0 && !b.logprobs) {
        return Err(ApiError::BadRequest(
            "top_logprobs must be at most 20 and needs logprobs = true".into(),
        ));
    }
    run(
        s,
        p,
        ids,
        true,
        Report {
            logprobs: b.logprobs,
            top,
            echo: None,
        },
    )
    .await
}

/// OpenAI's legacy completions `logprobs` object.
fn completion_logprobs(rows: &[(String, Option<f32>, Vec<(String, f32)>)], top: usize) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::new();
    for (t, _, _) in rows {
        offsets.push(offset);
        offset += t.len();
    }
    json!({
        "tokens": rows.iter().map(|r| &r.0).collect::<Vec<_>>(),
        "token_logprobs": rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        "top_logprobs": if top == 0 { Value::Null } else {
            Value::Array(rows.iter().map(|r| if r.1.is_none() { Value::Null } else {
                Value::Object(r.2.iter().map(|(a, l)| (a.clone(), json!(l))).collect())
            }).collect())
        },
        "text_offset": offsets,
    })
}

/// A completions answer that only scores the prompt (`echo`, `max_tokens = 0`).
fn echo_only<B: GraftBackend>(
    s: &AppState<B>,
    model: String,
    prompt_tokens: usize,
    report: Report,
) -> Response {
    let (text, rows) = report.echo.unwrap_or_default();
    let lp = if report.logprobs {
        completion_logprobs(&rows, report.top)
    } else {
        Value::Null
    };
    Json(json!({"id": format!("cmpl-{:016x}", rand::random::<u64>()), "object": "text_completion", "created": now_secs(), "model": model,
                "system_fingerprint": s.base_name, "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": lp}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}))
    .into_response()
}

/// What a response reports besides the text.
#[derive(Default)]
struct Report {
    logprobs: bool,
    /// Alternatives per token.
    top: usize,
    /// Completions `echo`: the prompt text and, with logprobs, its scores.
    echo: Option<(String, Vec<(String, Option<f32>, Vec<(String, f32)>)>)>,
}

/// Submits to the engine and answers, streaming or not.
async fn run<B: GraftBackend>(
    s: Arc<AppState<B>>,
    p: Prepared<B>,
    ids: Vec<u32>,
    chat: bool,
    report: Report,
) -> Result<Response, ApiError> {
    let logprobs = report.logprobs;
    let context = s.model.config.max_position_embeddings;
    if ids.is_empty() {
        return Err(ApiError::BadRequest("the prompt has no tokens".into()));
    }
    if ids.len() + p.params.max_new_tokens > context {
        return Err(ApiError::BadRequest(format!(
            "the prompt has {} tokens and max_tokens is {}: more than the model's context of {context}",
            ids.len(),
            p.params.max_new_tokens
        )));
    }
    if let Some(cap) = s.kv_tokens {
        if ids.len() + p.params.max_new_tokens > cap {
            return Err(ApiError::BadRequest(format!(
                "the prompt has {} tokens and max_tokens is {}: more than the KV cache budget of {cap} tokens",
                ids.len(),
                p.params.max_new_tokens
            )));
        }
    }
    let (tx, rx) = unbounded_channel();
    let tag = match &p.adapter {
        Some(a) => {
            a.requests.fetch_add(1, Ordering::Relaxed);
            format!("{}@v{}", a.name, a.version)
        }
        None => s.base_name.clone(),
    };
    let id = format!(
        "{}-{:016x}",
        if chat { "chatcmpl" } else { "cmpl" },
        rand::random::<u64>()
    );
    let req = Request {
        prompt: ids,
        adapter: p.adapter,
        params: p.params,
        events: tx,
        deadline: Instant::now() + s.request_timeout,
        submitted: Instant::now(),
        id: id.clone(),
        model: tag.clone(),
        top_logprobs: report.top,
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
    let created = now_secs();
    let model = p.model_name;
    let header = HeaderValue::from_str(&tag).map_err(|_| ApiError::Internal)?;
    let request_id = HeaderValue::from_str(&id).map_err(|_| ApiError::Internal)?;
    if p.stream {
        let (id2, model2, tag2) = (id.clone(), model.clone(), tag.clone());
        let first = chat.then(|| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": tag,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
        });
        let events = UnboundedReceiverStream::new(rx).filter_map(move |ev| {
            let chunk = match ev {
                Event::Token { text, .. } if text.is_empty() => return None,
                Event::Token { text, .. } if chat => json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2, "system_fingerprint": tag2,
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}),
                Event::Token { text, .. } => json!({"id": id2, "object": "text_completion", "created": created, "model": model2, "system_fingerprint": tag2,
                    "choices": [{"index": 0, "text": text, "finish_reason": null, "logprobs": null}]}),
                Event::Done { finish_reason, prompt_tokens, completion_tokens } => {
                    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
                    if chat {
                        json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2, "system_fingerprint": tag2,
                               "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason.as_str()}], "usage": usage})
                    } else {
                        json!({"id": id2, "object": "text_completion", "created": created, "model": model2, "system_fingerprint": tag2,
                               "choices": [{"index": 0, "text": "", "finish_reason": finish_reason.as_str(), "logprobs": null}], "usage": usage})
                    }
                }
            };
            Some(chunk)
        });
        let head = tokio_stream::iter(first);
        let body = head
            .chain(events)
            .map(|v| Ok::<_, Infallible>(SseEvent::default().data(v.to_string())))
            .chain(tokio_stream::once(Ok(SseEvent::default().data("[DONE]"))));
        let mut resp = Sse::new(body).into_response();
        resp.headers_mut().insert("x-graft-adapter", header);
        resp.headers_mut().insert("x-request-id", request_id);
        return Ok(resp);
    }
    let mut rx = rx;
    let mut text = String::new();
    let mut done = None;
    let report = report;
    let mut token_logprobs: Vec<(String, f32, Vec<(String, f32)>)> = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token {
                text: t,
                id,
                logprob,
                top,
                final_piece,
            } => {
                text.push_str(&t);
                if logprobs && !final_piece {
                    let name = |id: u32| s.tokenizer.decode(&[id], false).unwrap_or_default();
                    token_logprobs.push((
                        name(id),
                        logprob,
                        top.into_iter().map(|(a, l)| (name(a), l)).collect(),
                    ));
                }
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                done = Some((finish_reason, prompt_tokens, completion_tokens));
                break;
            }
        }
    }
    let (finish, prompt_tokens, completion_tokens) = done.ok_or(ApiError::Internal)?;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
    let lp = if !logprobs {
        Value::Null
    } else if chat {
        json!({"content": token_logprobs.iter().map(|(t, l, alts)| json!({"token": t, "logprob": l, "bytes": t.as_bytes(),
            "top_logprobs": alts.iter().map(|(a, al)| json!({"token": a, "logprob": al, "bytes": a.as_bytes()})).collect::<Vec<_>>()})).collect::<Vec<_>>()})
    } else {
        let mut rows: Vec<(String, Option<f32>, Vec<(String, f32)>)> = report
            .echo
            .as_ref()
            .map(|e| e.1.clone())
            .unwrap_or_default();
        rows.extend(
            token_logprobs
                .iter()
                .map(|(t, l, alts)| (t.clone(), Some(*l), alts.clone())),
        );
        completion_logprobs(&rows, report.top)
    };
    if let Some((prompt_text, _)) = &report.echo {
        text = format!("{prompt_text}{text}");
    }
    let body = if chat {
        json!({"id": id, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": tag,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.as_str(), "logprobs": lp}], "usage": usage})
    } else {
        json!({"id": id, "object": "text_completion", "created": created, "model": model, "system_fingerprint": tag,
               "choices": [{"index": 0, "text": text, "finish_reason": finish.as_str(), "logprobs": lp}], "usage": usage})
    };
    let mut resp = Json(body).into_response();
    resp.headers_mut().insert("x-graft-adapter", header);
    resp.headers_mut().insert("x-request-id", request_id);
    Ok(resp)
}
