//! Checkpoint containers: the GGUF reader ([`gguf`]) and writer ([`gguf_write`], for
//! GGUF-LoRA adapters and merged models) and the sharded safetensors writer
//! ([`safetensors_write`], for merged HF checkpoints). Model safetensors are read through the
//! `safetensors` crate in `load::hf`; adapters through [`safetensors_read`], which reads each
//! tensor straight into its own buffer.

pub mod gguf;
pub mod gguf_write;
pub mod safetensors_read;
pub mod safetensors_write;
