//! Where graft keeps downloaded models: `$GRAFT_CACHE` (default `~/.cache/graft`), with the
//! default model that `scripts/fetch-model.sh` places there.

use std::path::PathBuf;

/// File name of the default model, SmolLM2-135M-Instruct in Q4_1 GGUF.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$GRAFT_CACHE`, else `$HOME/.cache/graft`, else `.graft-cache` in the working directory.
pub fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("GRAFT_CACHE") {
        return PathBuf::from(c);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/graft"),
        None => PathBuf::from(".graft-cache"),
    }
}

/// Where `scripts/fetch-model.sh` puts the default model (it may not be there yet).
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}
