//! vLLM's `/tokenize` and `/detokenize`: the model's tokenizer (and chat template) as a
//! service, for clients that count or cut prompts. Adapters share the base's tokenizer; the
//! model name must still be one the server serves.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use graft_core::backend::GraftBackend;

use super::{check_key, ApiError, AppState};
use crate::registry::Lookup;
use crate::wire::{self, DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};

/// The base or a known adapter (they share the tokenizer); anything else is 404.
fn check_model<B: GraftBackend>(s: &AppState<B>, model: &str) -> Result<(), ApiError> {
    if model == s.base_name || !matches!(s.registry.lookup(model), Lookup::Unknown) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "the model '{model}' does not exist"
        )))
    }
}

/// `POST /tokenize`: the ids of a prompt, or of messages as the chat template renders them.
pub async fn tokenize<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<TokenizeResponse>, ApiError> {
    check_key(&headers, s.api_key.as_deref())?;
    let b: TokenizeRequest = wire::parse(&body)?;
    check_model(&s, &b.model)?;
    let (text, special) = match (b.prompt, b.messages) {
        (Some(prompt), None) => (prompt, b.add_special_tokens.unwrap_or(true)),
        (None, Some(messages)) => {
            let template = s
                .template
                .as_ref()
                .ok_or_else(|| ApiError::bad_field("messages", "the model has no chat template"))?;
            let text = template
                .render_json(
                    &super::tools::template_messages(&messages)?,
                    None,
                    b.add_generation_prompt.unwrap_or(true),
                )
                .map_err(|e| ApiError::bad_field("messages", e.to_string()))?;
            (text, b.add_special_tokens.unwrap_or(false))
        }
        _ => {
            return Err(ApiError::bad(
                "give either prompt or messages (one of them)",
            ))
        }
    };
    let tokens = s
        .tokenizer
        .encode(&text, special)
        .map_err(|e| ApiError::bad(format!("cannot tokenize: {e}")))?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: s.model.config.max_position_embeddings,
        tokens,
    }))
}

/// `POST /detokenize`: the text of token ids (special tokens kept).
pub async fn detokenize<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    check_key(&headers, s.api_key.as_deref())?;
    let b: DetokenizeRequest = wire::parse(&body)?;
    check_model(&s, &b.model)?;
    let vocab = s.model.config.vocab_size;
    if let Some((i, t)) = b
        .tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(ApiError::bad_field(
            &format!("tokens[{i}]"),
            format!("token id {t} is not below the vocabulary size {vocab}"),
        ));
    }
    let prompt = s
        .tokenizer
        .decode(&b.tokens, false)
        .map_err(|e| ApiError::bad_field("tokens", e.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
