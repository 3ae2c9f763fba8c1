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

mod fault;
mod forward;
mod step;

pub use fault::{Fault, FaultHook};

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft_core::backend::GraftBackend;
use graft_core::generation::constraint::Constraint;
use graft_core::generation::generate::{Decoder, FinishReason};
use graft_core::generation::sampling::SamplingParams;
use graft_core::model::{Model, SeqCache};
use graft_core::text::tokenizer::TokenizerBundle;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;
use crate::prefix_cache::{CacheKey, PrefixCache};
use crate::registry::AdapterEntry;
use crate::scoring::TokenScore;
use fault::panic_message;
use step::Ctx;

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

/// Runs requests from `rx` until every sender is gone. A fault in one step fails only the
/// requests it concerns (see [`step`]); a panic anywhere else in the loop fails the running
/// requests and the loop starts again, so the engine thread never dies while serving.
/// `faults` (tests only) makes chosen requests meet a fault.
pub fn run<B: GraftBackend>(
    model: Arc<Model<B>>,
    tokenizer: Arc<TokenizerBundle>,
    rx: Receiver<Request<B>>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    faults: Option<FaultHook>,
) {
    let ctx = Ctx {
        model: &model,
        tokenizer: &tokenizer,
        metrics: &metrics,
        faults: faults.as_ref(),
    };
    let mut state = Queues {
        active: Vec::new(),
        held: None,
        prefixes: PrefixCache::new(config.prefix_cache_tokens),
    };
    loop {
        let served = catch_unwind(AssertUnwindSafe(|| serve(&ctx, &rx, config, &mut state)));
        let Err(payload) = served else { return };
        let cause = format!("panic: {}", panic_message(payload.as_ref()));
        metrics.engine_restarts.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            event = "engine_restarted",
            cause = %cause,
            running = state.active.len(),
            "the engine loop failed ({cause}); failing its {} running requests and going on",
            state.active.len()
        );
        let now = Instant::now();
        for mut a in state.active.drain(..) {
            step::fail(&mut a, &cause, now, &metrics);
        }
        // Kept prompts may be half-inserted: start afresh.
        state.prefixes = PrefixCache::new(config.prefix_cache_tokens);
    }
}

/// What the engine loop keeps between iterations.
struct Queues<B: GraftBackend> {
    active: Vec<Active<B>>,
    /// A request taken from the channel that waits for KV budget.
    held: Option<Request<B>>,
    prefixes: PrefixCache<B>,
}

/// The engine loop: admit, drop abandoned requests, step. Returns when every sender is gone.
fn serve<B: GraftBackend>(
    ctx: &Ctx<'_, B>,
    rx: &Receiver<Request<B>>,
    config: EngineConfig,
    q: &mut Queues<B>,
) {
    let metrics = ctx.metrics;
    loop {
        let admitted = admit(
            &mut q.active,
            &mut q.held,
            rx,
            config,
            metrics,
            ctx.tokenizer,
            &mut q.prefixes,
        );
        if !admitted {
            return;
        }
        q.active.retain(|a| {
            let open = !a.req.events.is_closed();
            if !open {
                metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            open
        });
        metrics.set_running(
            q.active.len(),
            q.active.iter().map(|a| a.req.kv_tokens()).sum(),
            q.active.iter().filter_map(|a| a.req.adapter_name()),
        );
        if q.active.is_empty() {
            continue;
        }
        if let Some(hook) = ctx.faults {
            let user = |a: &Active<B>| hook(a.req.user.as_deref());
            let engine_fault = q.active.iter().any(|a| user(a) == Some(Fault::Engine));
            assert!(!engine_fault, "injected fault in the engine loop");
        }
        metrics
            .batch_size
            .store(q.active.len() as u64, Ordering::Relaxed);
        let finished = step::step(ctx, &mut q.active, &mut q.prefixes);
        for i in finished.into_iter().rev() {
            q.active.swap_remove(i);
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
            metrics
                .prefix_cache_kept_tokens
                .store(prefixes.tokens() as u64, Ordering::Relaxed);
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

/// The weights a request's keys and values depend on: the base or its adapter version.
fn cache_key<B: GraftBackend>(req: &Request<B>) -> CacheKey<B> {
    req.adapter
        .as_ref()
        .map_or(CacheKey::Base, |a| CacheKey::Adapter(Arc::downgrade(a)))
}
