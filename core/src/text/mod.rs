//! Text in and out of the model: tokenizers from `tokenizer.json` or GGUF metadata
//! ([`tokenizer`]) and chat templates rendered as transformers does ([`chat`]).

pub mod chat;
pub mod tokenizer;
pub mod tool_calls;
