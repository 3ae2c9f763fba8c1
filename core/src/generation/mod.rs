//! Turning logits into text: sampling ([`sampling`]), constrained decoding ([`constraint`])
//! and the prefill/decode loop ([`generate`]) shared by `graft-serve generate` and the serving
//! engine.

pub mod constraint;
pub mod generate;
pub mod sampling;
