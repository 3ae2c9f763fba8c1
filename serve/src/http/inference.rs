//! `/v1/completions` and `/v1/chat/completions`: read the request, resolve the model name to
//! the base or an adapter (reloading an evicted one), check the limits, tokenize, and hand
//! the request to [`super::respond`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use graft_core::backend::GraftBackend;
use graft_core::generation::sampling::SamplingParams;

use super::respond::{respond, Answer, Prepared, PromptInput};
use super::{check_key, structured, tools, ApiError, AppState};
use crate::registry::Lookup;
use crate::wire::{ChatCompletionRequest, CompletionRequest, Sampling};

/// Most alternatives a request may ask for per token (OpenAI's limit).
const MAX_TOP_LOGPROBS: usize = 20;
/// Most choices per prompt, and most prompts per completions request.
const MAX_N: usize = 16;
/// Most stop strings, and the longest one in bytes.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
/// Most `logit_bias` entries (OpenAI's limit).
const MAX_LOGIT_BIAS: usize = 300;

/// The adapter `model` names (None for the base), and how long reading it took if this
/// request had to.
async fn resolve<B: GraftBackend>(
    s: &Arc<AppState<B>>,
    model: &str,
) -> Result<
    (
        Option<Arc<crate::registry::AdapterEntry<B>>>,
        Option<Duration>,
    ),
    ApiError,
>
where
    B::Device: Send + Sync,
{
    if model == s.base_name {
        return Ok((None, None));
    }
    match s.registry.lookup(model) {
        Lookup::Loaded(e) => Ok((Some(e), None)),
        Lookup::Unknown => {
            let Some(resolver) = s.resolver.clone() else {
                return Err(ApiError::NotFound(format!(
                    "the model '{model}' does not exist"
                )));
            };
            // Downloaded off the async runtime, so other requests go on.
            let (state, name) = (s.clone(), model.to_string());
            let t0 = Instant::now();
            let found = tokio::task::spawn_blocking(move || {
                resolver.resolve(&name, &state.registry, &state.model)
            })
            .await
            .map_err(|e| ApiError::Internal(format!("adapter fetch task: {e}")))?
            .map_err(|e| ApiError::from(e).in_field("model"))?;
            match found {
                Some(e) => Ok((Some(e), Some(t0.elapsed()))),
                None => Err(ApiError::NotFound(format!(
                    "the model '{model}' does not exist (looked for in {})",
                    s.resolver
                        .as_ref()
                        .map_or(String::new(), |r| r.locations(model))
                ))),
            }
        }
        Lookup::OnDisk => {
            // Indexed or evicted: read it, off the async runtime, so other requests go on.
            let (state, name) = (s.clone(), model.to_string());
            let t0 = Instant::now();
            let e = tokio::task::spawn_blocking(move || state.registry.reload(&name, &state.model))
                .await
                .map_err(|e| ApiError::Internal(format!("adapter reload task: {e}")))?
                .map_err(|e| ApiError::from(e).in_field("model"))?;
            let took = t0.elapsed();
            s.metrics.adapter_load_secs.observe(took.as_secs_f64());
            Ok((Some(e), Some(took)))
        }
    }
}

/// Checks the sampling fields, then resolves the model and compiles any output grammar: a
/// request ready but for its tokens. The limits are checked first, so a refused request costs
/// no adapter read and no grammar compile.
async fn prepare<B: GraftBackend>(
    s: &Arc<AppState<B>>,
    sp: Sampling,
    default_max: usize,
) -> Result<Prepared<B>, ApiError>
where
    B::Device: Send + Sync,
{
    let n = sp.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::bad_field(
            "n",
            format!("n = {n} must be between 1 and {MAX_N}"),
        ));
    }
    let vocab = s.model.config.vocab_size;
    let bias_entries = sp.logit_bias.as_ref().map_or(0, |b| b.len());
    if bias_entries > MAX_LOGIT_BIAS {
        return Err(ApiError::bad_field(
            "logit_bias",
            format!("logit_bias has {bias_entries} entries; at most {MAX_LOGIT_BIAS}"),
        ));
    }
    let stop_strings = sp.stop.clone().into_vec();
    check_stops(&stop_strings)?;
    let mut logit_bias = Vec::new();
    for (token, &bias) in sp.logit_bias.iter().flatten() {
        match token.parse::<u32>() {
            Ok(id) if (id as usize) < vocab => logit_bias.push((id, bias)),
            _ => {
                return Err(ApiError::bad_field(
                    "logit_bias",
                    format!("logit_bias key '{token}' is not a token id below {vocab}"),
                ))
            }
        }
    }
    let max_tokens = sp
        .max_completion_tokens
        .or(sp.max_tokens)
        .unwrap_or(default_max);
    if max_tokens == 0 || max_tokens > s.max_tokens_limit {
        return Err(ApiError::bad_field(
            "max_tokens",
            format!(
                "max_tokens = {max_tokens} must be between 1 and {}",
                s.max_tokens_limit
            ),
        ));
    }
    let params = SamplingParams {
        temperature: sp.temperature.unwrap_or(1.0),
        top_p: sp.top_p.unwrap_or(1.0),
        top_k: sp.top_k.unwrap_or(0),
        min_p: sp.min_p.unwrap_or(0.0),
        repetition_penalty: sp.repetition_penalty.unwrap_or(1.0),
        presence_penalty: sp.presence_penalty.unwrap_or(0.0),
        frequency_penalty: sp.frequency_penalty.unwrap_or(0.0),
        logit_bias,
        min_tokens: sp.min_tokens.unwrap_or(0),
        seed: sp.seed,
        max_new_tokens: max_tokens,
        stop_strings,
        ignore_eos: sp.ignore_eos,
        ..SamplingParams::default()
    };
    params
        .validate()
        .map_err(|e| ApiError::bad_field(e.field, e.to_string()))?;
    let grammar = structured::requested(&sp)?;
    let (adapter, adapter_load) = resolve(s, &sp.model).await?;
    let constraint = match grammar {
        Some((grammar, param)) => Some(structured::compile(s, grammar, param).await?),
        None => None,
    };
    Ok(Prepared {
        model_name: sp.model,
        adapter,
        adapter_load,
        params,
        stream: sp.stream,
        include_usage: sp.stream_options.is_some_and(|o| o.include_usage),
        n,
        top_logprobs: 0,
        user: sp.user,
        constraint,
    })
}

/// Stop strings: a few, short, none empty (an empty one would end every answer at once).
fn check_stops(stops: &[String]) -> Result<(), ApiError> {
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad_field(
            "stop",
            format!("{} stop strings; at most {MAX_STOPS}", stops.len()),
        ));
    }
    for (i, stop) in stops.iter().enumerate() {
        if stop.is_empty() || stop.len() > MAX_STOP_BYTES {
            return Err(ApiError::bad_field(
                &format!("stop[{i}]"),
                format!(
                    "stop string of {} bytes; each must have 1 to {MAX_STOP_BYTES}",
                    stop.len()
                ),
            ));
        }
    }
    Ok(())
}

pub async fn completions<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError>
where
    B::Device: Send + Sync,
{
    check_key(&headers, s.api_key.as_deref())?;
    let CompletionRequest {
        mut sampling,
        fields: b,
    } = CompletionRequest::parse(&body)?;
    let prompts = b.prompt.into_vec();
    if prompts.is_empty() || prompts.len() > MAX_N {
        return Err(ApiError::bad_field(
            "prompt",
            format!("a list of 1 to {MAX_N} prompts, got {}", prompts.len()),
        ));
    }
    let top = b.logprobs.unwrap_or(0);
    if top > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad_field(
            "logprobs",
            format!("logprobs = {top} must be at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    if b.echo && sampling.stream {
        return Err(ApiError::bad_field(
            "echo",
            "echo is not supported with stream",
        ));
    }
    // `echo` with `max_tokens = 0` scores the prompt and generates nothing; the request is
    // checked like any other first.
    let scoring_only = b.echo && sampling.max_tokens == Some(0);
    if scoring_only {
        sampling.max_tokens = Some(1);
    }
    let mut p = prepare(&s, sampling, 16).await?;
    if scoring_only {
        p.params.max_new_tokens = 0;
    }
    p.top_logprobs = top;
    let mut inputs = Vec::with_capacity(prompts.len());
    for (i, text) in prompts.into_iter().enumerate() {
        let ids = s.tokenizer.encode(&text, true).map_err(|e| {
            ApiError::bad_field(&format!("prompt[{i}]"), format!("cannot tokenize: {e}"))
        })?;
        inputs.push(PromptInput { ids, text });
    }
    let answer = Answer::Completion {
        logprobs: b.logprobs.is_some(),
        echo: b.echo,
    };
    respond(s, p, inputs, answer).await
}

pub async fn chat<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError>
where
    B::Device: Send + Sync,
{
    check_key(&headers, s.api_key.as_deref())?;
    let ChatCompletionRequest {
        sampling,
        fields: b,
    } = ChatCompletionRequest::parse(&body)?;
    if b.messages.is_empty() {
        return Err(ApiError::bad_field(
            "messages",
            "messages must not be empty",
        ));
    }
    let mut p = prepare(&s, sampling, s.max_tokens_limit.min(1024)).await?;
    let top = b.top_logprobs.unwrap_or(0);
    if top > MAX_TOP_LOGPROBS || (top > 0 && !b.logprobs) {
        return Err(ApiError::bad_field(
            "top_logprobs",
            format!("top_logprobs must be at most {MAX_TOP_LOGPROBS} and needs logprobs = true"),
        ));
    }
    p.top_logprobs = top;
    let template = s.template.as_ref().ok_or_else(|| {
        ApiError::bad(
            "the model has no chat template: use /v1/completions, or start graft-serve with \
             --chat-template",
        )
    })?;
    let plan = tools::plan(&b, s.tool_format)?;
    if let Some(grammar) = plan.grammar {
        if p.constraint.is_some() {
            return Err(ApiError::bad_field(
                "tool_choice",
                "a forced tool call cannot be combined with a structured output",
            ));
        }
        p.constraint = Some(structured::compile(&s, grammar, "tool_choice").await?);
    }
    let rendered = if plan.rendered.is_some() || tools::uses_tools(&b.messages) {
        template.render_json(
            &tools::template_messages(&b.messages)?,
            plan.rendered.as_ref(),
            true,
        )
    } else {
        template.render(&tools::plain_messages(&b.messages)?, true)
    };
    let text = rendered.map_err(|e| ApiError::bad_field("messages", e.to_string()))?;
    let ids = s.tokenizer.encode(&text, false).map_err(|e| {
        ApiError::bad_field("messages", format!("cannot tokenize the messages: {e}"))
    })?;
    respond(
        s,
        p,
        vec![PromptInput { ids, text }],
        Answer::Chat {
            logprobs: b.logprobs,
            tools: plan.parse,
        },
    )
    .await
}
