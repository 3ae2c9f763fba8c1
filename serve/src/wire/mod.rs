//! The HTTP API's wire format: OpenAI's chat and (legacy) completions requests, responses,
//! streamed chunks, log-probabilities and errors, vLLM's adapter management bodies, and graft's
//! adapter listing — one serde type per JSON object, shared by the handlers and by
//! `graft-serve bench`. Field names and optionality follow OpenAI's API reference; a field
//! graft accepts is a line in a request type here plus its use in `http`.
//!
//! Request bodies are parsed in two steps so that a bad value is reported with the field it
//! is in (OpenAI's `param`): the JSON text into a value (syntax errors, with line and column),
//! then each part of the request from that value through `serde_path_to_error`.

mod admin;
mod request;
mod response;

pub use admin::*;
pub use request::*;
pub use response::*;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A request body that could not be read: what is wrong and, when a field is to blame, its
/// path (`messages[1].role`, `temperature`).
#[derive(Debug, Clone, PartialEq)]
pub struct WireError {
    pub message: String,
    pub param: Option<String>,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.param {
            Some(p) => write!(f, "{p}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Parses a JSON body into a value that [`from_value`] reads parts of.
///
/// # Errors
/// Invalid JSON, or JSON that is not an object.
pub fn body_value(bytes: &[u8]) -> Result<Value, WireError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| WireError {
        message: format!("invalid request body: {e}"),
        param: None,
    })?;
    if !v.is_object() {
        return Err(WireError {
            message: "invalid request body: expected a JSON object".into(),
            param: None,
        });
    }
    Ok(v)
}

/// Reads a `T` from a parsed body, naming the field a bad value is in.
///
/// # Errors
/// A missing required field, a wrong type or an impossible value, with its path.
pub fn from_value<T: DeserializeOwned>(v: &Value) -> Result<T, WireError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let message = e.inner().to_string();
        let path = e.path().to_string();
        // A missing field is reported at its parent; name the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
            .map(|f| {
                if path == "." {
                    f.to_string()
                } else {
                    format!("{path}.{f}")
                }
            });
        WireError {
            param: missing.or((path != ".").then_some(path)),
            message: format!("invalid request body: {message}"),
        }
    })
}

/// Parses a whole JSON body as a `T`.
///
/// # Errors
/// As [`body_value`] and [`from_value`].
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    from_value(&body_value(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let e = ChatCompletionRequest::parse(
            br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#,
        )
        .expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e}");
        let e = CompletionRequest::parse(br#"{"model": "m", "prompt": "p", "max_tokens": -5}"#)
            .expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{e}");
        let e = ChatCompletionRequest::parse(br#"{"model": "m", "messages": "text"}"#)
            .expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("messages"), "{e}");
        let e = ChatCompletionRequest::parse(
            br#"{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}"#,
        )
        .expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("messages[0].role"), "{e}");
        assert!(e.message.contains("wizard"), "{e}");
        let e = ChatCompletionRequest::parse(br#"{"messages": []}"#).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("model"), "{e}");
        let e = ChatCompletionRequest::parse(b"[1]").expect_err("refused");
        assert_eq!(e.param, None);
    }
}
