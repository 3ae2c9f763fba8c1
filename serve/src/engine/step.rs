//! One engine step: a forward over every active request, then one token (or the prompt
//! scores) for each. A request whose step fails — its forward panicked alone, its logits are
//! not finite, its sampling panicked — ends with [`Event::Failed`] (a 500 with its request id);
//! the others go on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Instant;

use graft_core::backend::GraftBackend;
use graft_core::generation::generate::{FinishReason, Step};
use graft_core::model::Model;
use graft_core::text::tokenizer::TokenizerBundle;

use super::fault::{panic_message, FaultHook};
use super::forward::{forward, rows_of, Outputs};
use super::{cache_key, Active, Event};
use crate::metrics::Metrics;
use crate::prefix_cache::PrefixCache;
use crate::scoring::{log_sum_exp, top_k, TokenScore};

/// What the engine needs besides the requests.
pub(super) struct Ctx<'a, B: GraftBackend> {
    pub model: &'a Model<B>,
    pub tokenizer: &'a TokenizerBundle,
    pub metrics: &'a Metrics,
    pub faults: Option<&'a FaultHook>,
}

/// Runs one step. Returns the indices of the requests that finished.
pub(super) fn step<B: GraftBackend>(
    ctx: &Ctx<'_, B>,
    active: &mut [Active<B>],
    prefixes: &mut PrefixCache<B>,
) -> Vec<usize> {
    let scoring: Vec<bool> = active
        .iter()
        .map(|a| a.prefill && a.req.score_prompt)
        .collect();
    let outputs = forward(ctx.model, active, &scoring, ctx.faults, ctx.metrics);
    let vocab = ctx.model.config.vocab_size;
    let now = Instant::now();
    let mut finished = Vec::new();
    let mut at = 0; // first logits row of the current request (batched outputs)
    for (i, a) in active.iter_mut().enumerate() {
        let n_rows = rows_of(a, scoring[i]);
        let mine: Result<&[f32], String> = match &outputs {
            Outputs::Batch(rows) => {
                at += n_rows;
                Ok(&rows[(at - n_rows) * vocab..at * vocab])
            }
            Outputs::Each(each) => each[i].as_deref().map_err(Clone::clone),
        };
        let mine = mine.and_then(|rows| {
            if rows.iter().all(|v| v.is_finite()) {
                Ok(rows)
            } else {
                Err("the model produced non-finite logits".to_string())
            }
        });
        let done = match mine {
            Ok(rows) => catch_unwind(AssertUnwindSafe(|| {
                advance(ctx, a, rows, n_rows, scoring[i], now, prefixes)
            }))
            .unwrap_or_else(|payload| {
                fail(
                    a,
                    &format!("panic: {}", panic_message(payload.as_ref())),
                    now,
                    ctx.metrics,
                );
                true
            }),
            Err(cause) => {
                fail(a, &cause, now, ctx.metrics);
                true
            }
        };
        if done {
            finished.push(i);
        }
    }
    finished
}

/// Takes a request's logits rows: keeps its prompt for reuse, reports its prompt scores,
/// samples its next token. Returns whether it finished.
fn advance<B: GraftBackend>(
    ctx: &Ctx<'_, B>,
    a: &mut Active<B>,
    rows: &[f32],
    n_rows: usize,
    scored: bool,
    now: Instant,
    prefixes: &mut PrefixCache<B>,
) -> bool {
    let vocab = ctx.model.config.vocab_size;
    if a.prefill {
        prefixes.insert(cache_key(&a.req), &a.req.prompt, &a.cache);
        ctx.metrics
            .prefix_cache_kept_tokens
            .store(prefixes.tokens() as u64, Ordering::Relaxed);
    }
    a.prefill = false;
    if scored {
        let scores = score_rows(&a.req.prompt, rows, vocab, a.req.top_logprobs);
        let _ = a.req.events.send(Event::PromptScores(scores));
    }
    let finish = if a.req.params.max_new_tokens == 0 {
        Some((FinishReason::Length, 0))
    } else {
        let last = &rows[(n_rows - 1) * vocab..];
        sample(a, last, ctx.tokenizer, now, ctx.metrics)
    };
    match finish {
        Some((reason, id)) => {
            finish_request(a, reason, id, now, ctx.metrics);
            true
        }
        None => false,
    }
}

/// Ends a request the engine could not carry on: the client gets a 500 (or an error event)
/// carrying its request id; the cause goes to the log.
pub(super) fn fail<B: GraftBackend>(
    a: &mut Active<B>,
    cause: &str,
    now: Instant,
    metrics: &Metrics,
) {
    metrics.failed.fetch_add(1, Ordering::Relaxed);
    tracing::error!(
        event = "request_failed",
        request_id = %a.req.id,
        model = %a.req.model,
        cause = %cause,
        "request {} failed in the engine: {cause}",
        a.req.id
    );
    // The cause stays in the log; the client gets the id to report.
    let _ = a.req.events.send(Event::Failed(format!(
        "internal error in the engine while running request {}",
        a.req.id
    )));
    // Not through the decoder (its state may be what failed).
    done(a, FinishReason::Stop, now, metrics);
}

/// Samples the next token of `a` from its last logits row and reports it. Returns the finish
/// reason and last token id when the request is done.
fn sample<B: GraftBackend>(
    a: &mut Active<B>,
    last: &[f32],
    tokenizer: &TokenizerBundle,
    now: Instant,
    metrics: &Metrics,
) -> Option<(FinishReason, u32)> {
    let mut row = last.to_vec();
    let lse = log_sum_exp(&row);
    let top = top_k(&row, a.req.top_logprobs, lse);
    let step = a.decoder.step(&mut row, tokenizer).unwrap_or_else(|e| {
        // Undecodable output or a failed constraint ends the request, not the server.
        tracing::warn!(event = "decode_failed", request_id = %a.req.id, error = %e, "{e}");
        let _ = a.req.events.send(Event::Failed(e.to_string()));
        Step {
            id: 0,
            is_token: false,
            text: String::new(),
            finish: Some(FinishReason::Stop),
        }
    });
    match a.last_token_at {
        None => metrics
            .ttft
            .observe(now.duration_since(a.req.submitted).as_secs_f64()),
        Some(t) => metrics.itl.observe(now.duration_since(t).as_secs_f64()),
    }
    a.last_token_at = Some(now);
    if step.is_token {
        let _ = a.req.events.send(Event::Token {
            score: TokenScore {
                id: step.id,
                logprob: Some(last[step.id as usize] - lse),
                top,
            },
            text: step.text,
            final_piece: false,
        });
    }
    let finish = step
        .finish
        .or((now >= a.req.deadline).then_some(FinishReason::Length));
    match finish {
        Some(reason) => Some((reason, step.id)),
        None => {
            a.next = vec![step.id];
            None
        }
    }
}

/// Flushes held-back text, counts the request and sends `Done`.
fn finish_request<B: GraftBackend>(
    a: &mut Active<B>,
    reason: FinishReason,
    last_id: u32,
    now: Instant,
    metrics: &Metrics,
) {
    let tail = a.decoder.tail();
    if !tail.is_empty() {
        let _ = a.req.events.send(Event::Token {
            score: TokenScore {
                id: last_id,
                logprob: None,
                top: Vec::new(),
            },
            text: tail,
            final_piece: true,
        });
    }
    done(a, reason, now, metrics);
}

/// Counts a finished request, logs it and sends `Done`.
fn done<B: GraftBackend>(a: &Active<B>, reason: FinishReason, now: Instant, metrics: &Metrics) {
    // Count before answering, so a client that reads /metrics next sees it.
    metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
    metrics
        .prompt_tokens
        .fetch_add(a.req.prompt.len() as u64, Ordering::SeqCst);
    metrics
        .generated_tokens
        .fetch_add(a.decoder.generated.len() as u64, Ordering::SeqCst);
    tracing::info!(
        event = "request_done",
        request_id = %a.req.id,
        model = %a.req.model,
        user = a.req.user.as_deref(),
        prompt_tokens = a.req.prompt.len(),
        completion_tokens = a.decoder.generated.len(),
        finish_reason = reason.as_str(),
        total_ms = now.duration_since(a.req.submitted).as_secs_f64() * 1e3,
        "request done"
    );
    let _ = a.req.events.send(Event::Done {
        finish_reason: reason,
        prompt_tokens: a.req.prompt.len(),
        completion_tokens: a.decoder.generated.len(),
    });
}

/// For each prompt token: its log-probability given the tokens before it (`None` for the
/// first) and the `top` most likely tokens at that position, from the prompt's logits rows.
fn score_rows(prompt: &[u32], rows: &[f32], vocab: usize, top: usize) -> Vec<TokenScore> {
    let mut out = Vec::with_capacity(prompt.len());
    out.push(TokenScore {
        id: prompt[0],
        logprob: None,
        top: Vec::new(),
    });
    for t in 1..prompt.len() {
        let row = &rows[(t - 1) * vocab..t * vocab];
        let lse = log_sum_exp(row);
        out.push(TokenScore {
            id: prompt[t],
            logprob: Some(row[prompt[t] as usize] - lse),
            top: top_k(row, top, lse),
        });
    }
    out
}
