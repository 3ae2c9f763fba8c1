//! Turning logits into text: sampling ([`sampling`]) and the prefill/decode loop
//! ([`generate`]) shared by `graft-serve generate` and the serving engine.

pub mod generate;
pub mod sampling;
