//! Faults the engine survives: what a caught panic said, and the test-only hook that makes a
//! request meet a fault on purpose (so tests drive the real recovery paths).

use std::any::Any;
use std::sync::Arc;

/// A fault injected into the step of a chosen request.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The forward pass panics (as a kernel bug would) while the request is in the batch.
    Panic,
    /// Reading the logits back fails for the batch holding the request.
    ReadBack,
    /// The request's logits come back NaN.
    Nan,
    /// The engine loop panics outside a step while the request runs.
    Engine,
}

/// Chooses a fault for a request from its `user` field; production servers have none.
#[doc(hidden)]
pub type FaultHook = Arc<dyn Fn(Option<&str>) -> Option<Fault> + Send + Sync>;

/// The message a panic carried.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    graft_core::panic::message(payload).unwrap_or_else(|| "a panic without a message".into())
}
