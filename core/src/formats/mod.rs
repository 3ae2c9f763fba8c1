//! The GGUF container: a validating reader ([`gguf`]) and a writer ([`gguf_write`]) used for
//! GGUF-LoRA export. Safetensors is read through the `safetensors` crate in `load::hf`.

pub mod gguf;
pub mod gguf_write;
