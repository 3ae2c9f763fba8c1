//! LoRA adapters: the weights ([`lora`]) and the files they come in — HF PEFT directories
//! ([`peft`]) and llama.cpp's GGUF-LoRA ([`gguf_lora`]).

pub mod gguf_lora;
pub mod lora;
pub mod peft;
