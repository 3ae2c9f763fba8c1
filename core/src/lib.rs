//! graft-core: one decoder model for every supported family, with quantized frozen projections and LoRA adapters,
//! checkpoint loaders (GGUF, HF safetensors, Hub), tokenizer and chat templates, sampling and
//! generation. `graft-train` and `graft-serve` are built on this crate's public API.

pub mod atomic;
pub mod backend;
pub mod cache;
pub mod chat;
pub mod clock;
pub mod device;
pub mod generate;
pub mod gguf;
pub mod gguf_lora;
pub mod gguf_write;
pub mod load;
pub mod lora;
pub mod model;
pub mod peft;
pub mod process;
pub mod proj;
pub mod quant;
pub mod sampling;
pub mod tokenizer;

/// The burn this crate is built on, for dependents that need more than the prelude.
pub use burn;

/// burn's prelude, re-exported so dependents use the same burn without naming it.
pub mod burn_prelude {
    pub use burn::prelude::*;
}
