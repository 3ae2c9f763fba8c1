//! The batching engine: one thread owns the model and runs every active request together.
//!
//! Continuous batching at token boundaries: each iteration admits waiting requests (up to
//! `max_batch` running, within the KV budget), then makes ONE forward call over all of them —
//! new requests contribute their whole prompt (prefill), running ones their last token
//! (decode) — with each sequence's own KV cache and adapter. The model's ragged forward runs
//! every base projection once for all rows and adds each adapter's low-rank term to its own
//! rows, so requests for different adapters share the batch. A request that asks for its
//! prompt to be scored (`echo` with `logprobs`) gets logits for every prompt position in the
//! same forward; one with nothing to generate ends after it. A request whose client went away
//! is dropped at the next iteration, freeing its slot.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft_core::backend::GraftBackend;
use graft_core::generation::constraint::Constraint;
use graft_core::generation::generate::{Decoder, FinishReason, Step};
use graft_core::generation::sampling::SamplingParams;
use graft_core::model::{Logits, Model, SeqCache, SeqInput};
use graft_core::text::tokenizer::TokenizerBundle;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;
use crate::prefix_cache::{CacheKey, PrefixCache};
use crate::registry::AdapterEntry;
use crate::scoring::{log_sum_exp, top_k, TokenScore};

/// What the engine sends back for a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt's tokens scored (requests with [`Request::score_prompt`]), before any token.
    PromptScores(Vec<TokenScore>),
    /// A generated token, the text it makes final (possibly empty) and its log-probability
    /// with the most likely alternatives; `final_piece` marks the held-back text flushed at
    /// the end (no new token).
    Token {
        score: TokenScore,
        text: String,
        final_piece: bool,
    },
    /// Generation failed (a constraint with no way forward, undecodable output); a `Done`
    /// follows.
    Failed(String),
    /// Generation ended.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

/// One request. `params.max_new_tokens == 0` only scores the prompt.
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
    /// Alternatives reported with each log-probability.
    pub top_logprobs: usize,
    /// Score every prompt token ([`Event::PromptScores`]).
    pub score_prompt: bool,
    /// The end user the client named (OpenAI's `user`), for the log.
    pub user: Option<String>,
    /// What the output must match (structured outputs).
    pub constraint: Option<Constraint>,
}

impl<B: GraftBackend> Request<B> {
    /// The adapter's name (None for the base).
    pub fn adapter_name(&self) -> Option<&str> {
        self.adapter.as_ref().map(|a| a.name.as_str())
    }

    /// KV cache positions the request may fill.
    fn kv_tokens(&self) -> usize {
        self.prompt.len() + self.params.max_new_tokens
    }
}

/// The engine's settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Requests decoded together.
    pub max_batch: usize,
    /// KV cache budget in tokens over all running requests (None: unlimited).
    pub kv_tokens: Option<usize>,
    /// Tokens of recent prompts kept for reuse by requests that start the same way (0: off).
    pub prefix_cache_tokens: usize,
}

struct Active<B: GraftBackend> {
    req: Request<B>,
    cache: SeqCache<B>,
    decoder: Decoder,
    /// Tokens to feed next: the prompt at first, then the last sampled token.
    next: Vec<u32>,
    /// Whether this iteration feeds the prompt (prefill).
    prefill: bool,
    last_token_at: Option<Instant>,
}

/// Runs requests from `rx` until every sender is gone.
pub fn run<B: GraftBackend>(
    model: Arc<Model<B>>,
    tokenizer: Arc<TokenizerBundle>,
    rx: Receiver<Request<B>>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) {
    let mut active: Vec<Active<B>> = Vec::new();
    let mut held: Option<Request<B>> = None;
    let mut prefixes = PrefixCache::new(config.prefix_cache_tokens);
    loop {
        let admitted = admit(
            &mut active,
            &mut held,
            &rx,
            config,
            &metrics,
            &tokenizer,
            &mut prefixes,
        );
        if !admitted {
            return;
        }
        active.retain(|a| {
            let open = !a.req.events.is_closed();
            if !open {
                metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            open
        });
        metrics.set_running(
            active.len(),
            active.iter().map(|a| a.req.kv_tokens()).sum(),
            active.iter().filter_map(|a| a.req.adapter_name()),
        );
        if active.is_empty() {
            continue;
        }
        metrics
            .batch_size
            .store(active.len() as u64, Ordering::Relaxed);
        let finished = step(&model, &tokenizer, &mut active, &metrics, &mut prefixes);
        for i in finished.into_iter().rev() {
            active.swap_remove(i);
        }
    }
}

/// Moves waiting requests into `active`: blocks only when idle. Returns false once every
/// sender is gone and nothing is left.
fn admit<B: GraftBackend>(
    active: &mut Vec<Active<B>>,
    held: &mut Option<Request<B>>,
    rx: &Receiver<Request<B>>,
    config: EngineConfig,
    metrics: &Metrics,
    tokenizer: &TokenizerBundle,
    prefixes: &mut PrefixCache<B>,
) -> bool {
    while active.len() < config.max_batch.max(1) {
        let next = if let Some(r) = held.take() {
            Some(r)
        } else if active.is_empty() {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        } else {
            rx.try_recv().ok()
        };
        let Some(mut req) = next else { break };
        if req.events.is_closed() {
            metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            metrics.waiting_remove(req.adapter_name());
            continue;
        }
        // KV cache budget: a request whose prompt and max_tokens do not fit next to the
        // running ones waits (held here, so the channel still bounds the queue).
        let reserved: usize = active.iter().map(|a| a.req.kv_tokens()).sum();
        if let Some(cap) = config.kv_tokens {
            let need = reserved + req.kv_tokens();
            // Kept prompts give way to running requests.
            prefixes.shrink_to(cap.saturating_sub(need));
            if need > cap && !active.is_empty() {
                *held = Some(req);
                break;
            }
        }
        metrics.waiting_remove(req.adapter_name());
        let constraint = req.constraint.take();
        // Scoring needs logits at every prompt position: it always prefills in full.
        let reused = (!req.score_prompt)
            .then(|| prefixes.lookup(&cache_key(&req), &req.prompt))
            .flatten();
        let (cache, next) = match reused {
            Some((cache, n)) => {
                metrics.prefix_cache_hits.fetch_add(1, Ordering::Relaxed);
                metrics
                    .prefix_cache_tokens
                    .fetch_add(n as u64, Ordering::Relaxed);
                (cache, req.prompt[n..].to_vec())
            }
            None => (SeqCache::new(), req.prompt.clone()),
        };
        active.push(Active {
            cache,
            decoder: Decoder::new(&req.prompt, &req.params, tokenizer).with_constraint(constraint),
            next,
            prefill: true,
            last_token_at: None,
            req,
        });
    }
    true
}

/// One forward over every active request, then one token (or the prompt scores) for each.
/// Returns the indices of the requests that finished.
fn step<B: GraftBackend>(
    model: &Model<B>,
    tokenizer: &TokenizerBundle,
    active: &mut [Active<B>],
    metrics: &Metrics,
    prefixes: &mut PrefixCache<B>,
) -> Vec<usize> {
    let scoring: Vec<bool> = active
        .iter()
        .map(|a| a.prefill && a.req.score_prompt)
        .collect();
    let which = if scoring.contains(&true) {
        Logits::Mixed(scoring.clone())
    } else {
        Logits::Last
    };
    // Structured outputs: the next masks are computed on another thread while the forward
    // pass runs (they depend only on the tokens so far).
    let logits = std::thread::scope(|scope| {
        let mut constrained = Vec::new();
        let mut seqs: Vec<SeqInput<'_, B>> = Vec::with_capacity(active.len());
        for a in active.iter_mut() {
            let Active {
                req,
                cache,
                decoder,
                next,
                ..
            } = a;
            if decoder.is_constrained() {
                constrained.push(decoder);
            }
            seqs.push(SeqInput {
                tokens: next,
                cache: Some(cache),
                adapter: req.adapter.as_ref().map(|e| &e.adapter),
            });
        }
        let masks = (!constrained.is_empty())
            .then(|| scope.spawn(move || constrained.into_iter().for_each(|d| d.prepare())));
        let logits = model.forward(&mut seqs, which);
        if let Some(m) = masks {
            // A panic there would only lose precomputed masks; `step` computes them again.
            let _ = m.join();
        }
        logits
    });
    let vocab = model.config.vocab_size;
    let rows: Vec<f32> = logits.into_data().to_vec().unwrap_or_default();
    let now = Instant::now();
    let mut finished = Vec::new();
    let mut at = 0; // first logits row of the current request
    for (i, a) in active.iter_mut().enumerate() {
        let n_rows = if scoring[i] { a.next.len() } else { 1 };
        let mine = &rows[at * vocab..(at + n_rows) * vocab];
        at += n_rows;
        if a.prefill {
            prefixes.insert(cache_key(&a.req), &a.req.prompt, &a.cache);
        }
        a.prefill = false;
        if scoring[i] {
            let scores = score_rows(&a.req.prompt, mine, vocab, a.req.top_logprobs);
            let _ = a.req.events.send(Event::PromptScores(scores));
        }
        let finish = if a.req.params.max_new_tokens == 0 {
            Some((FinishReason::Length, 0))
        } else {
            let last = &mine[(n_rows - 1) * vocab..];
            sample(a, last, tokenizer, now, metrics)
        };
        if let Some((reason, id)) = finish {
            finish_request(a, reason, id, now, metrics);
            finished.push(i);
        }
    }
    finished
}

/// The weights a request's keys and values depend on: the base or its adapter version.
fn cache_key<B: GraftBackend>(req: &Request<B>) -> CacheKey {
    req.adapter.as_ref().map(|a| (a.name.clone(), a.version))
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
