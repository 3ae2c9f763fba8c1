//! Conversations with tools: messages (with `tool_calls`, `tool` results, content parts) turned
//! into what chat templates read, the tool plan of a request (render the tools, parse calls
//! out of the answer, force a call with a grammar for `required` or a named function), and
//! parsed calls turned into OpenAI's `tool_calls`.

use graft_core::generation::constraint::Grammar;
use graft_core::text::chat::Message;
use graft_core::text::tool_calls::{ParsedCall, ToolFormat, ToolSpec};
use serde_json::{json, Value};

use super::ApiError;
use crate::wire::{
    ChatFields, ChatMessage, Content, FunctionCall, Role, ToolCall, ToolChoice, ToolMode,
};

/// The text of message `i` (text parts joined); None for null content.
fn text_of(m: &ChatMessage, i: usize) -> Result<Option<String>, ApiError> {
    match &m.content {
        None => Ok(None),
        Some(Content::Text(t)) => Ok(Some(t.clone())),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::bad_field(
                            &format!("messages[{i}].content[{j}]"),
                            format!(
                                "content parts of type '{}' are not supported (text only)",
                                p.kind
                            ),
                        ))
                    }
                }
            }
            Ok(Some(out))
        }
    }
}

/// Whether the conversation needs the template's full JSON form (tool calls, tool results).
pub fn uses_tools(messages: &[ChatMessage]) -> bool {
    messages
        .iter()
        .any(|m| m.tool_calls.is_some() || m.role == Role::Tool || m.tool_call_id.is_some())
}

/// Plain messages for the template (role and text).
pub fn plain_messages(messages: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let text = text_of(m, i)?.ok_or_else(|| {
                ApiError::bad_field(&format!("messages[{i}].content"), "content is required")
            })?;
            Ok(Message::new(m.role.as_str(), text))
        })
        .collect()
}

/// Messages as transformers' `apply_chat_template` takes them: tool call arguments as objects.
pub fn template_messages(messages: &[ChatMessage]) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let text = text_of(m, i)?;
        if text.is_none() && !(m.role == Role::Assistant && m.tool_calls.is_some()) {
            return Err(ApiError::bad_field(
                &format!("messages[{i}].content"),
                "content is required (it may be null only on an assistant message with tool_calls)",
            ));
        }
        let mut v = json!({"role": m.role.as_str(), "content": text});
        if let Some(calls) = &m.tool_calls {
            let calls: Vec<Value> = calls
                .iter()
                .map(|c| {
                    let args = serde_json::from_str::<Value>(&c.function.arguments)
                        .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
                    json!({"id": c.id, "type": "function",
                           "function": {"name": c.function.name, "arguments": args}})
                })
                .collect();
            v["tool_calls"] = Value::Array(calls);
        }
        if let Some(id) = &m.tool_call_id {
            v["tool_call_id"] = json!(id);
        }
        if let Some(name) = &m.name {
            v["name"] = json!(name);
        }
        out.push(v);
    }
    Ok(Value::Array(out))
}

/// How to find calls in an answer: the model's format and the functions it may call.
#[derive(Debug, Clone)]
pub struct ToolParse {
    pub format: ToolFormat,
    pub names: Vec<String>,
}

impl ToolParse {
    /// The text around the calls and the calls, as OpenAI's `tool_calls`.
    pub fn split(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        let (content, calls) = self.format.parse(text, &self.names);
        (content, wire_calls(calls))
    }
}

/// What a request does with tools.
pub struct ToolPlan {
    /// The `tools` list for the template, when there are tools.
    pub rendered: Option<Value>,
    /// Parse calls of these functions out of the answer in this format (not for
    /// `tool_choice: none`).
    pub parse: Option<ToolParse>,
    /// The grammar that forces a call (`required`, or a named function).
    pub grammar: Option<Grammar>,
}

/// The tool plan of a chat request for a model whose template writes `format`.
pub fn plan(b: &ChatFields, format: ToolFormat) -> Result<ToolPlan, ApiError> {
    let tools = b.tools.as_deref().unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::bad_field(
                &format!("tools[{i}].type"),
                format!("tool type '{}' is not supported (function)", t.kind),
            ));
        }
    }
    let specs: Vec<ToolSpec> = tools
        .iter()
        .map(|t| ToolSpec {
            name: t.function.name.clone(),
            parameters: t
                .function
                .parameters
                .clone()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        })
        .collect();
    let default = if tools.is_empty() {
        ToolMode::None
    } else {
        ToolMode::Auto
    };
    let (mode, name) = match &b.tool_choice {
        None => (default, None),
        Some(ToolChoice::Mode(m)) => (*m, None),
        Some(ToolChoice::Named { function, .. }) => {
            (ToolMode::Required, Some(function.name.clone()))
        }
    };
    if mode != ToolMode::None && tools.is_empty() {
        return Err(ApiError::bad_field(
            "tool_choice",
            "tool_choice needs tools",
        ));
    }
    if let Some(n) = &name {
        if !specs.iter().any(|s| &s.name == n) {
            return Err(ApiError::bad_field(
                "tool_choice",
                format!("tool_choice names '{n}', which is not in tools"),
            ));
        }
    }
    Ok(ToolPlan {
        rendered: (!tools.is_empty()).then(|| serde_json::to_value(tools).unwrap_or(Value::Null)),
        parse: (mode != ToolMode::None).then(|| ToolParse {
            format,
            names: specs.iter().map(|s| s.name.clone()).collect(),
        }),
        grammar: (mode == ToolMode::Required).then(|| format.grammar(&specs, name.as_deref())),
    })
}

/// Parsed calls as OpenAI's `tool_calls`, with fresh ids.
fn wire_calls(calls: Vec<ParsedCall>) -> Vec<ToolCall> {
    calls
        .into_iter()
        .map(|c| ToolCall {
            id: format!("call_{:016x}", rand::random::<u64>()),
            kind: "function".into(),
            function: FunctionCall {
                name: c.name,
                arguments: c.arguments.to_string(),
            },
        })
        .collect()
}
