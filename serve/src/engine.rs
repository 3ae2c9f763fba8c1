//! The batching engine: one thread owns the model and runs every active request together.
//!
//! Continuous batching at token boundaries: each iteration admits waiting requests (up to
//! `max_batch` running), then makes ONE forward call over all of them — new requests
//! contribute their whole prompt (prefill), running ones their last token (decode) — with each
//! sequence's own KV cache and adapter. The model's ragged forward runs every base projection
//! once for all rows and adds each adapter's low-rank term to its own rows, so requests for
//! different adapters share the batch. A request whose client went away is dropped at the next
//! iteration, freeing its slot.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft_core::backend::GraftBackend;
use graft_core::generation::generate::{Decoder, FinishReason, Step};
use graft_core::generation::sampling::SamplingParams;
use graft_core::model::{Logits, Model, SeqCache, SeqInput};
use graft_core::text::tokenizer::TokenizerBundle;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;
use crate::registry::AdapterEntry;

/// What the engine sends back for a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token, the text it makes final (possibly empty) and its log-probability
    /// under the model; `final_piece` marks the held-back text flushed at the end (no new token).
    Token {
        id: u32,
        text: String,
        logprob: f32,
        /// The most likely tokens at this step (as many as the request asked for).
        top: Vec<(u32, f32)>,
        final_piece: bool,
    },
    /// Generation ended.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// One generation request.
pub struct Request<B: GraftBackend> {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<AdapterEntry<B>>>,
    pub params: SamplingParams,
    pub events: UnboundedSender<Event>,
    /// Give up (finish_reason "length") after this long.
    pub deadline: Instant,
    /// When the server accepted it (for time to first token).
    pub submitted: Instant,
    /// The id returned to the client (`x-request-id`, the response `id`), for logs.
    pub id: String,
    /// `base` or `adapter@vN`, for logs.
    pub model: String,
    /// Alternatives reported with each sampled token's log-probability.
    pub top_logprobs: usize,
}

struct Active<B: GraftBackend> {
    req: Request<B>,
    cache: SeqCache<B>,
    decoder: Decoder,
    /// Tokens to feed next: the prompt at first, then the last sampled token.
    next: Vec<u32>,
    last_token_at: Option<Instant>,
}

/// Runs requests from `rx` until every sender is gone.
pub fn run<B: GraftBackend>(
    model: Arc<Model<B>>,
    tokenizer: Arc<TokenizerBundle>,
    rx: Receiver<Request<B>>,
    max_batch: usize,
    metrics: Arc<Metrics>,
    kv_tokens: Option<usize>,
) {
    let mut active: Vec<Active<B>> = Vec::new();
    let mut held: Option<Request<B>> = None;
    loop {
        // Admit: block only when idle.
        while active.len() < max_batch {
            let next = if let Some(r) = held.take() {
                Some(r)
            } else if active.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                rx.try_recv().ok()
            };
            let Some(req) = next else { break };
            if req.events.is_closed() {
                metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            // KV cache budget: a request whose prompt and max_tokens do not fit next to the
            // running ones waits (held here, so the channel still bounds the queue).
            let need = req.prompt.len() + req.params.max_new_tokens;
            let reserved: usize = active
                .iter()
                .map(|a| a.req.prompt.len() + a.req.params.max_new_tokens)
                .sum();
            if kv_tokens.is_some_and(|cap| reserved + need > cap) && !active.is_empty() {
                held = Some(req);
                break;
            }
            let decoder = Decoder::new(&req.prompt, &req.params, &tokenizer);
            active.push(Active {
                cache: SeqCache::new(),
                decoder,
                next: req.prompt.clone(),
                last_token_at: None,
                req,
            });
        }
        active.retain(|a| {
            let open = !a.req.events.is_closed();
            if !open {
                metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            open
        });
        if active.is_empty() {
            continue;
        }
        metrics
            .batch_size
            .store(active.len() as u64, Ordering::Relaxed);
        let logits = {
            let mut seqs: Vec<SeqInput<'_, B>> = active
                .iter_mut()
                .map(|a| SeqInput {
                    tokens: &a.next,
                    cache: Some(&mut a.cache),
                    adapter: a.req.adapter.as_ref().map(|e| &e.adapter),
                })
                .collect();
            model.forward(&mut seqs, Logits::Last)
        };
        let vocab = model.config.vocab_size;
        let rows: Vec<f32> = logits.into_data().to_vec().unwrap_or_default();
        let now = Instant::now();
        let mut finished = Vec::new();
        for (i, a) in active.iter_mut().enumerate() {
            let mut row = rows[i * vocab..(i + 1) * vocab].to_vec();
            let logprob_base = crate::scoring::log_sum_exp(&row);
            let top = crate::scoring::top_k(&row, a.req.top_logprobs, logprob_base);
            let step = match a.decoder.step(&mut row, &tokenizer) {
                Ok(step) => step,
                // Undecodable output ends the request rather than the server.
                Err(_) => Step {
                    id: 0,
                    is_token: false,
                    text: String::new(),
                    finish: Some(FinishReason::Stop),
                },
            };
            let logprob = rows[i * vocab + step.id as usize] - logprob_base;
            match a.last_token_at {
                None => metrics
                    .ttft
                    .observe(now.duration_since(a.req.submitted).as_secs_f64()),
                Some(t) => metrics.itl.observe(now.duration_since(t).as_secs_f64()),
            }
            a.last_token_at = Some(now);
            if step.is_token {
                let _ = a.req.events.send(Event::Token {
                    id: step.id,
                    text: step.text,
                    logprob,
                    top,
                    final_piece: false,
                });
            }
            let finish = step
                .finish
                .or((now >= a.req.deadline).then_some(FinishReason::Length));
            let id = step.id;
            match finish {
                Some(reason) => {
                    let tail = a.decoder.tail();
                    if !tail.is_empty() {
                        let _ = a.req.events.send(Event::Token {
                            id,
                            text: tail,
                            logprob: 0.0,
                            top: Vec::new(),
                            final_piece: true,
                        });
                    }
                    // Count before answering, so a client that reads /metrics next sees it.
                    metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
                    metrics
                        .prompt_tokens
                        .fetch_add(a.req.prompt.len() as u64, Ordering::SeqCst);
                    metrics
                        .generated_tokens
                        .fetch_add(a.decoder.generated.len() as u64, Ordering::SeqCst);
                    log_done(a, reason, now);
                    let _ = a.req.events.send(Event::Done {
                        finish_reason: reason,
                        prompt_tokens: a.req.prompt.len(),
                        completion_tokens: a.decoder.generated.len(),
                    });
                    finished.push(i);
                }
                None => a.next = vec![id],
            }
        }
        for i in finished.into_iter().rev() {
            active.swap_remove(i);
        }
    }
}

/// One structured log line (JSON on stderr) per finished request.
fn log_done<B: GraftBackend>(a: &Active<B>, reason: FinishReason, now: Instant) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let line = serde_json::json!({
        "ts": ts, "level": "info", "event": "request_done", "request_id": a.req.id, "model": a.req.model,
        "prompt_tokens": a.req.prompt.len(), "completion_tokens": a.decoder.generated.len(),
        "finish_reason": reason.as_str(), "total_ms": now.duration_since(a.req.submitted).as_secs_f64() * 1e3,
    });
    eprintln!("{line}");
}
