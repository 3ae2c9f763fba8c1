//! Loading a model from where people keep one: an HF model directory (safetensors), a GGUF
//! file, or a Hub id resolved through the HF cache. Only these modules know checkpoint key
//! names; the model sees [`crate::model::Model`] parts.

pub(crate) mod assemble;
pub(crate) mod gguf;
pub(crate) mod hf;
pub mod hf_config;
pub mod hub;
pub mod ollama;

use crate::backend::GraftBackend;
use std::path::{Path, PathBuf};

use crate::formats::gguf::GgufError;
use crate::model::{ComputeDtype, Model};
use crate::quant::{Activations, QuantKind};
use crate::text::tokenizer::TokenizerBundle;

pub use gguf::load_gguf;
pub use hf::load_hf_dir;

/// Errors loading a model; each names the file and the tensor or key involved.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: corrupt safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: cannot put the base weights on the device: {message}")]
    Device { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    ComputeDtype { path: PathBuf, message: String },
    #[error("{path}: tensor '{tensor}' is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor '{tensor}' has shape {found:?}, the config implies {expected:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor '{tensor}' has dtype {dtype}, graft loads f32, f16 and bf16")]
    Dtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: tensor '{tensor}': {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: architecture '{arch}' is not supported (graft runs: {supported})")]
    Architecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("hub model '{repo}': {message}")]
    Hub { repo: String, message: String },
    #[error("ollama model '{name}': {message}")]
    Ollama { name: String, message: String },
    #[error("'{0}' is neither a model directory, a .gguf file, an ollama:NAME[:TAG] nor a hub id (owner/name)")]
    Source(String),
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An HF model directory (config.json + safetensors).
    HfDir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hub repository id with an optional revision (`owner/name@rev`).
    Hub {
        repo: String,
        revision: Option<String>,
    },
    /// A model pulled by Ollama (`ollama:NAME[:TAG]`), read from its local store.
    Ollama(String),
}

/// A model as written in a config file in `dir`: `~/` is the home directory; a relative path
/// that exists next to the file is taken from there; anything else (a hub id, an absolute
/// path, a path that does not exist yet) is kept as written.
pub fn model_arg_in(dir: &Path, arg: &str) -> String {
    if let (Some(rest), Some(home)) = (arg.strip_prefix("~/"), std::env::var_os("HOME")) {
        return Path::new(&home).join(rest).display().to_string();
    }
    let local = dir.join(arg);
    if Path::new(arg).is_relative() && local.exists() {
        return local.display().to_string();
    }
    arg.to_string()
}

impl ModelSource {
    /// Interprets a `--model` argument: `ollama:NAME[:TAG]`, an existing directory or `.gguf`
    /// file, else a hub id.
    ///
    /// # Errors
    /// [`LoadError::Source`] when it is none of these.
    pub fn parse(s: &str) -> Result<Self, LoadError> {
        if let Some(name) = s.strip_prefix("ollama:") {
            ollama::OllamaName::parse(name).map_err(|message| LoadError::Ollama {
                name: name.into(),
                message,
            })?;
            return Ok(ModelSource::Ollama(name.into()));
        }
        let p = Path::new(s);
        if p.is_dir() {
            return Ok(ModelSource::HfDir(p.to_path_buf()));
        }
        if p.is_file() || s.ends_with(".gguf") {
            return Ok(ModelSource::Gguf(p.to_path_buf()));
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (s, None),
        };
        let valid = repo.split('/').count() == 2
            && repo.split('/').all(|part| {
                !part.is_empty()
                    && part != ".."
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            });
        if valid {
            Ok(ModelSource::Hub {
                repo: repo.to_string(),
                revision,
            })
        } else {
            Err(LoadError::Source(s.to_string()))
        }
    }
}

/// Options for loading.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// How to store the projections' base weights.
    pub quantize: QuantKind,
    /// What packed weights' products round activations to ([`Model::set_activations`]).
    pub activations: Activations,
    /// The float type of the base products ([`Model::set_compute_dtype`]).
    pub compute: ComputeDtype,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quantize: QuantKind::Keep,
            activations: Activations::F32,
            compute: ComputeDtype::F32,
        }
    }
}

/// A loaded model with what generation needs beside it.
pub struct LoadedModel<B: GraftBackend> {
    pub model: Model<B>,
    /// Tokenizer, chat template and special tokens; `None` only for an HF directory that ships
    /// no `tokenizer.json`.
    pub tokenizer: Option<TokenizerBundle>,
    /// A name for the model (hub id, file stem).
    pub name: String,
}

/// Loads a model from any [`ModelSource`].
///
/// # Errors
/// See [`LoadError`].
pub fn load<B: GraftBackend>(
    source: &ModelSource,
    opts: LoadOptions,
    device: &B::Device,
) -> Result<LoadedModel<B>, LoadError> {
    match source {
        ModelSource::HfDir(dir) => load_hf_dir(dir, opts, device),
        ModelSource::Gguf(path) => load_gguf(path, opts, device),
        ModelSource::Hub { repo, revision } => {
            let dir = hub::resolve(repo, revision.as_deref(), &hub::HubSettings::from_env())?;
            let mut loaded = load_hf_dir(&dir, opts, device)?;
            loaded.name = repo.clone();
            Ok(loaded)
        }
        ModelSource::Ollama(name) => {
            let m = ollama::resolve(name, &ollama::store_dir())?;
            let mut loaded = load_gguf(&m.gguf, opts, device)?;
            loaded.name = m.name.short();
            Ok(loaded)
        }
    }
}

impl ModelSource {
    /// The GGUF file this source reads, if it is one (a `.gguf` path or an Ollama blob).
    ///
    /// # Errors
    /// An Ollama name that cannot be resolved.
    pub fn gguf_file(&self) -> Result<Option<PathBuf>, LoadError> {
        Ok(match self {
            ModelSource::Gguf(p) => Some(p.clone()),
            ModelSource::Ollama(name) => Some(ollama::resolve(name, &ollama::store_dir())?.gguf),
            ModelSource::HfDir(_) | ModelSource::Hub { .. } => None,
        })
    }
}

/// What both loaders do to an assembled model: `opts`' activations and compute dtype, then the
/// packed base placed on the device. `path`: the model's file or directory, for errors.
fn apply_options<B: GraftBackend>(
    model: &mut Model<B>,
    opts: LoadOptions,
    path: &Path,
) -> Result<(), LoadError> {
    model.set_activations(opts.activations);
    model
        .set_compute_dtype(opts.compute)
        .map_err(|message| LoadError::ComputeDtype {
            path: path.into(),
            message,
        })?;
    model.place_weights().map_err(|message| LoadError::Device {
        path: path.into(),
        message,
    })?;
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.into(),
        source,
    })
}
