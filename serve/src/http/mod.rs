//! The OpenAI-compatible HTTP API (and vLLM's adapter management endpoints): the shared state,
//! the router, and authentication. Bodies are the types in [`crate::wire`]; requests go to the
//! engine thread through a bounded queue.

mod admin;
mod error;
mod inference;
mod respond;
mod stream;
mod structured;
mod tokens;
mod tools;

pub use error::ApiError;

use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::Router;
use graft_core::backend::GraftBackend;
use graft_core::generation::constraint::GrammarCompiler;
use graft_core::model::Model;
use graft_core::text::chat::ChatTemplate;
use graft_core::text::tokenizer::TokenizerBundle;
use graft_core::text::tool_calls::ToolFormat;

use crate::engine::Request;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// Everything the handlers share.
pub struct AppState<B: GraftBackend> {
    pub model: Arc<Model<B>>,
    pub tokenizer: Arc<TokenizerBundle>,
    /// For chat requests; None answers them with 400.
    pub template: Option<ChatTemplate>,
    /// Compiles structured-output grammars for the model's vocabulary (or why it cannot).
    pub grammars: Result<GrammarCompiler, String>,
    /// How the model writes tool calls (from its chat template).
    pub tool_format: ToolFormat,
    pub registry: Arc<Registry<B>>,
    /// The engine's queue (bounded: a full queue answers 429).
    pub engine: SyncSender<Request<B>>,
    /// The base model's name in requests.
    pub base_name: String,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Engine requests that can wait at once (a request's choices must fit).
    pub max_queue: usize,
    /// KV cache budget in tokens (a request needing more can never run).
    pub kv_tokens: Option<usize>,
    pub request_timeout: Duration,
    /// Unix seconds at start (`created` of the model cards).
    pub started: u64,
    pub metrics: Arc<Metrics>,
    /// What `/metrics` reports under vLLM's names for the inference gateway.
    pub gateway: crate::gateway::GatewayLabels,
    /// Resolves adapters the server does not know from `--adapter-source`s.
    pub resolver: Option<Arc<crate::source::resolver::Resolver>>,
}

/// The HTTP app over `state`; serve it with `axum::serve`, or drive it in tests with
/// `tower::ServiceExt::oneshot`.
pub fn router<B: GraftBackend>(state: Arc<AppState<B>>) -> Router
where
    B::Device: Send + Sync,
{
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(admin::metrics::<B>))
        .route("/v1/models", get(admin::models::<B>))
        .route("/v1/completions", post(inference::completions::<B>))
        .route("/v1/chat/completions", post(inference::chat::<B>))
        .route("/v1/load_lora_adapter", post(admin::load_adapter::<B>))
        .route("/v1/unload_lora_adapter", post(admin::unload_adapter::<B>))
        .route("/v1/adapters", get(admin::adapters::<B>))
        .route("/v1/adapters/{name}", get(admin::adapter::<B>))
        .route("/tokenize", post(tokens::tokenize::<B>))
        .route("/detokenize", post(tokens::detokenize::<B>))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// `Authorization: Bearer <key>` when a key is set. The key is compared in constant time
/// (`subtle`): how long a refusal takes says nothing about how much of a guess was right.
fn check_key(headers: &HeaderMap, key: Option<&str>) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let Some(key) = key else { return Ok(()) };
    let given = headers
        .get("authorization")
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if bool::from(given.ct_eq(key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Unix time in seconds (OpenAI's `created`).
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
