//! graft-core: one decoder model for every supported family, with quantized frozen projections
//! and LoRA adapters, checkpoint loaders (GGUF, HF safetensors, Hub), tokenizers and chat
//! templates, sampling and generation. `graft-train` and `graft-serve` are built on this
//! crate's public API.
//!
//! The folders follow the layers of the architecture:
//! - [`model`]: the decoder (families as data, attention, rope, norms) and its one projection
//!   type; [`backend`]: the burn backend extension the projections run on;
//! - [`quant`]: frozen base-weight storage (GGML blocks, NF4) and their CPU kernels;
//! - [`adapters`]: LoRA weights and their file formats (PEFT, GGUF-LoRA);
//! - [`formats`]: the GGUF reader and writer; [`load`]: models from GGUF, HF directories, Hub;
//! - [`text`]: tokenizers and chat templates; [`generation`]: sampling and the decode loop;
//! - small system pieces: [`atomic`] writes, the [`cache`] directory, [`clock`], [`device`]
//!   names, [`process`] memory.

pub mod adapters;
pub mod alloc;
pub mod atomic;
pub mod backend;
pub mod cache;
pub mod clock;
pub mod device;
pub mod formats;
pub mod generation;
pub mod load;
pub mod logging;
pub mod model;
pub mod panic;
pub mod process;
pub mod quant;
pub mod recycle;
mod serde_str;
mod simd;
pub mod text;

/// The burn this crate is built on, for dependents that need more than the prelude.
pub use burn;

/// burn's prelude, re-exported so dependents use the same burn without naming it.
pub mod burn_prelude {
    pub use burn::prelude::*;
}
