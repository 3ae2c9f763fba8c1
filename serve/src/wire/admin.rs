//! `/v1/models` (OpenAI, with vLLM's `root` and `parent`), graft's `/v1/adapters`, vLLM's
//! `load_lora_adapter` / `unload_lora_adapter` bodies, and the error object every endpoint
//! answers failures with.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `{"object": "list", "data": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List<T> {
    pub object: String,
    pub data: Vec<T>,
}

impl<T> List<T> {
    pub fn new(data: Vec<T>) -> Self {
        List {
            object: "list".into(),
            data,
        }
    }
}

/// A servable model: the base, or an adapter on it (`parent` = the base). Fields other than
/// `id` default when absent (other servers' cards).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    #[serde(default)]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub owned_by: String,
    /// The base's name, or the adapter's source path.
    #[serde(default)]
    pub root: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterCard>,
}

/// What the server knows about an adapter. Shape facts are absent for an adapter known only
/// by name (never loaded successfully).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterCard {
    pub name: String,
    pub version: u64,
    pub source: PathBuf,
    /// `peft` or `gguf` (in load answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Vec<String>>,
    /// Adapted projections (layers × targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<usize>,
    /// `memory`, `disk` (indexed or evicted: read when requested) or `broken` (its files are
    /// not a valid adapter; requests are refused until they change).
    pub location: String,
    /// Why its files could not be read: a broken adapter's, or, for one in memory, changed
    /// files the watcher did not take (the version in memory stays in service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Requests served by every version under this name.
    pub requests: u64,
}

/// `POST /v1/load_lora_adapter`: load, or replace with a new version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadLoraAdapterRequest {
    pub lora_name: String,
    /// A PEFT directory or a GGUF-LoRA file.
    pub lora_path: String,
}

/// `POST /v1/unload_lora_adapter`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnloadLoraAdapterRequest {
    pub lora_name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnloadResponse {
    pub name: String,
    pub unloaded: bool,
}

/// vLLM's `POST /tokenize`: a prompt, or messages rendered with the chat template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizeRequest {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<super::ChatMessage>>,
    /// Default: true for a prompt, false for messages (the template writes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_special_tokens: Option<bool>,
    /// With messages: end with the assistant's turn opening. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

/// vLLM's `POST /detokenize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetokenizeRequest {
    pub model: String,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// OpenAI's error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, e.g. `messages[0].role`.
    pub param: Option<String>,
    /// Stable, machine-readable.
    pub code: String,
}
