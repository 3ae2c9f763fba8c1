//! LoRA adapters: the weights ([`lora`]), the files they come in — HF PEFT directories
//! ([`peft`]) and llama.cpp's GGUF-LoRA ([`gguf_lora`]) — and merging one into its base model
//! ([`merge`]).

pub(crate) mod gathered;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) mod gathered_gpu;
pub mod gguf_lora;
pub mod lora;
pub mod merge;
pub mod peft;
