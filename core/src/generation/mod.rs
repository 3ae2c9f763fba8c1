//! Turning logits into text: sampling ([`sampling`]), constrained decoding ([`constraint`]),
//! the prefill/decode loop ([`generate`]) shared by `graft-serve generate` and the serving
//! engine, and many prompts decoded together ([`batch`]).

pub mod batch;
pub mod constraint;
pub mod generate;
pub mod sampling;
