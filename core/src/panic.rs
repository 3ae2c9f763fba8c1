//! What a caught panic said.

use std::any::Any;

/// The message a panic carried (`panic!` payloads are `&str` or `String`), if any.
pub fn message(payload: &(dyn Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}
