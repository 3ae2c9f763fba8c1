//! Model and adapter listing, vLLM's runtime adapter loading and unloading, and Prometheus
//! metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft_core::backend::GraftBackend;

use super::{check_key, ApiError, AppState};
use crate::metrics::AdapterFigures;
use crate::registry::CatalogEntry;
use crate::wire::{
    self, AdapterCard, List, LoadLoraAdapterRequest, ModelCard, UnloadLoraAdapterRequest,
    UnloadResponse,
};

impl From<CatalogEntry> for AdapterCard {
    fn from(e: CatalogEntry) -> Self {
        AdapterCard {
            name: e.name,
            version: e.version,
            source: e.source,
            format: e.format.map(str::to_string),
            rank: e.info.as_ref().map(|i| i.rank),
            target_modules: e.info.as_ref().map(|i| i.target_modules.clone()),
            modules: e.info.as_ref().map(|i| i.modules),
            bytes: e.info.as_ref().map(|i| i.bytes),
            location: match (e.in_memory, &e.broken) {
                (true, _) => "memory",
                (false, None) => "disk",
                (false, Some(_)) => "broken",
            }
            .into(),
            error: e.broken,
            requests: e.requests,
        }
    }
}

fn catalog<B: GraftBackend>(s: &AppState<B>) -> Vec<AdapterCard> {
    s.registry
        .catalog()
        .into_iter()
        .map(AdapterCard::from)
        .collect()
}

pub async fn metrics<B: GraftBackend>(State(s): State<Arc<AppState<B>>>) -> Response {
    let r = &s.registry;
    let body = s.metrics.render(&AdapterFigures {
        known: r.known_count(),
        loaded: r.list().len(),
        bytes: r.loaded_bytes(),
        evictions: r.evictions.load(Ordering::Relaxed),
        reloads: r.reloads.load(Ordering::Relaxed),
        first_loads: r.first_loads.load(Ordering::Relaxed),
        fetched: fetches(&s, |c| &c.fetched),
        fetch_missing: fetches(&s, |c| &c.missing),
        fetch_failed: fetches(&s, |c| &c.failed),
    }) + &crate::gateway::render(&s.metrics, &s.gateway, unix_time());
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

/// A count of the adapter-source resolver (0 without sources).
fn fetches<B: GraftBackend>(
    s: &AppState<B>,
    which: impl Fn(&crate::source::resolver::FetchCounts) -> &AtomicU64,
) -> u64 {
    s.resolver
        .as_ref()
        .map_or(0, |r| which(&r.counts).load(Ordering::Relaxed))
}

/// Unix time in seconds, with its fraction (`vllm:lora_requests_info`).
fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub async fn models<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
) -> Result<Json<List<ModelCard>>, ApiError> {
    check_key(&headers, s.api_key.as_deref())?;
    let card = |id: String, root: String, parent: Option<String>, adapter| ModelCard {
        id,
        object: "model".into(),
        created: s.started,
        owned_by: "graft".into(),
        root,
        parent,
        adapter,
    };
    let mut data = vec![card(s.base_name.clone(), s.base_name.clone(), None, None)];
    for a in catalog(&s) {
        data.push(card(
            a.name.clone(),
            a.source.display().to_string(),
            Some(s.base_name.clone()),
            Some(a),
        ));
    }
    Ok(Json(List::new(data)))
}

pub async fn adapters<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
) -> Result<Json<List<AdapterCard>>, ApiError> {
    check_key(&headers, s.admin_key.as_deref().or(s.api_key.as_deref()))?;
    Ok(Json(List::new(catalog(&s))))
}

/// One adapter's card (cheaper than the whole list when thousands are known).
pub async fn adapter<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<AdapterCard>, ApiError> {
    check_key(&headers, s.admin_key.as_deref().or(s.api_key.as_deref()))?;
    s.registry
        .catalog_entry(&name)
        .map(|e| Json(e.into()))
        .ok_or_else(|| ApiError::NotFound(format!("no adapter named '{name}'")))
}

pub async fn load_adapter<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<AdapterCard>, ApiError>
where
    B::Device: Send + Sync,
{
    check_key(&headers, s.admin_key.as_deref())?;
    let b: LoadLoraAdapterRequest = wire::parse(&body)?;
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
    .map_err(|e| ApiError::Internal(format!("adapter load task: {e}")))?
    .map_err(|e| ApiError::from(e).in_field("lora_path"))?;
    Ok(Json(entry.entry().into()))
}

pub async fn unload_adapter<B: GraftBackend>(
    State(s): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<UnloadResponse>, ApiError> {
    check_key(&headers, s.admin_key.as_deref())?;
    let b: UnloadLoraAdapterRequest = wire::parse(&body)?;
    if s.registry.unload(&b.lora_name) {
        s.metrics.adapter_unloads.fetch_add(1, Ordering::Relaxed);
        Ok(Json(UnloadResponse {
            name: b.lora_name,
            unloaded: true,
        }))
    } else {
        Err(ApiError::NotFound(format!(
            "no adapter named '{}'",
            b.lora_name
        )))
    }
}
