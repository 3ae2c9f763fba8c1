//! Checkpoint containers: the GGUF reader ([`gguf`]) and writer ([`gguf_write`], for
//! GGUF-LoRA adapters and merged models) and the sharded safetensors writer
//! ([`safetensors_write`], for merged HF checkpoints). Safetensors is read through the
//! `safetensors` crate in `load::hf`.

pub mod gguf;
pub mod gguf_write;
pub mod safetensors_write;
