//! Tool calls in model output: the two formats open models are trained on, found in the
//! generated text, and the grammars that force a well-formed call.
//!
//! - **Hermes** (Qwen2/2.5/3, NousHermes, many fine-tunes): `<tool_call>\n{"name": …,
//!   "arguments": {…}}\n</tool_call>`, possibly several, possibly after some text.
//! - **Llama 3 JSON** (Llama 3.1+ "JSON based tool calling"): the whole answer is
//!   `{"name": …, "parameters": {…}}`, sometimes after `<|python_tag|>`.
//!
//! A model's format is read from its chat template (a template that mentions `<tool_call>`
//! is Hermes), as vLLM's `--tool-call-parser` is chosen per model family. Small Hermes models
//! often drop the tags and answer with the bare JSON call; that is taken as a call too (vLLM's
//! Hermes parser would return it as text).

use serde_json::{json, Value};

use crate::generation::constraint::Grammar;

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`.
    Hermes,
    /// `{"name": …, "parameters": {…}}` as the whole answer.
    Llama3Json,
}

/// A call found in the output: the function's name and its arguments (a JSON object).
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: Value,
}

/// A function the model may call: its name and the JSON schema of its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub parameters: Value,
}

impl ToolFormat {
    /// The format the chat template `source` teaches (Hermes when it mentions `<tool_call>`).
    pub fn for_template(source: &str) -> ToolFormat {
        if source.contains(HERMES_OPEN) {
            ToolFormat::Hermes
        } else {
            ToolFormat::Llama3Json
        }
    }

    /// Splits `text` into the text around the calls (None when only whitespace) and the calls
    /// of functions named in `tools`. Text that only looks like a call (it does not parse, or
    /// names no listed function, or — without tags — has no arguments) stays text.
    pub fn parse(self, text: &str, tools: &[String]) -> (Option<String>, Vec<ParsedCall>) {
        let (content, calls) = match self {
            ToolFormat::Hermes => match parse_hermes(text, tools) {
                (content, calls) if !calls.is_empty() => (content, calls),
                _ => parse_bare(text, tools).unwrap_or_else(|| (text.to_string(), Vec::new())),
            },
            ToolFormat::Llama3Json => {
                let t = text.trim();
                parse_bare(t.strip_prefix("<|python_tag|>").unwrap_or(t), tools)
                    .unwrap_or_else(|| (text.to_string(), Vec::new()))
            }
        };
        let content = (!content.trim().is_empty()).then_some(content);
        (content, calls)
    }

    /// Where a call may start in streamed `text`: the byte offset from which text must be held
    /// back (it is, or may become, a call), or None when all of it can be sent.
    pub fn hold_from(self, text: &str) -> Option<usize> {
        match self {
            ToolFormat::Hermes => {
                if let Some(i) = text.find(HERMES_OPEN) {
                    return Some(i);
                }
                // A bare JSON call (tags dropped) is held whole.
                if may_be_bare_call(text) {
                    return Some(0);
                }
                // A suffix that could still grow into the opening tag.
                (1..HERMES_OPEN.len())
                    .rev()
                    .find(|&n| text.len() >= n && text.ends_with(&HERMES_OPEN[..n]))
                    .map(|n| text.len() - n)
            }
            ToolFormat::Llama3Json => {
                let t = text.trim_start();
                let tagged = t.starts_with("<|python_tag|>")
                    || (!t.is_empty() && "<|python_tag|>".starts_with(t));
                (tagged || may_be_bare_call(text)).then_some(0)
            }
        }
    }

    /// A grammar whose every output is one call of one of `tools` (of `name`'s only, when
    /// given), with arguments valid under the tool's schema.
    pub fn grammar(self, tools: &[ToolSpec], name: Option<&str>) -> Grammar {
        let args_key = match self {
            ToolFormat::Hermes => "arguments",
            ToolFormat::Llama3Json => "parameters",
        };
        let alternatives: Vec<Value> = tools
            .iter()
            .filter(|t| name.is_none_or(|n| n == t.name))
            .map(|t| {
                json!({"type": "object",
                       "properties": {"name": {"const": t.name}, args_key: t.parameters},
                       "required": ["name", args_key], "additionalProperties": false})
            })
            .collect();
        let schema =
            crate::generation::constraint::with_json_defaults(json!({"anyOf": alternatives}));
        let body = format!("%json {schema}");
        Grammar::Lark(match self {
            ToolFormat::Hermes => format!(
                "start: {} call {}\ncall: {body}\n",
                serde_json::to_string(&format!("{HERMES_OPEN}\n")).unwrap_or_default(),
                serde_json::to_string(&format!("\n{HERMES_CLOSE}")).unwrap_or_default()
            ),
            ToolFormat::Llama3Json => format!("start: call\ncall: {body}\n"),
        })
    }
}

fn parse_hermes(text: &str, tools: &[String]) -> (String, Vec<ParsedCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(HERMES_OPEN) {
        let after = &rest[start + HERMES_OPEN.len()..];
        // An unclosed call at the end (cut by max_tokens) is still tried.
        let (inner, next) = match after.find(HERMES_CLOSE) {
            Some(end) => (&after[..end], &after[end + HERMES_CLOSE.len()..]),
            None => (after, ""),
        };
        match parse_call(inner.trim()).filter(|c| tools.contains(&c.name)) {
            Some(call) => {
                content.push_str(&rest[..start]);
                calls.push(call);
            }
            None => content.push_str(&rest[..start + HERMES_OPEN.len() + inner.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    (content, calls)
}

/// Whether streamed `text` so far may be the start of a bare JSON call (possibly in a
/// Markdown code fence).
fn may_be_bare_call(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty() || t.starts_with('{') || t.starts_with("```") || "```".starts_with(t)
}

/// Calls written as bare JSON objects, one after the other, possibly in a Markdown code fence
/// (what models do when they drop their format's tags); the text after them stays content.
/// None when the text does not start with a call.
fn parse_bare(text: &str, tools: &[String]) -> Option<(String, Vec<ParsedCall>)> {
    let mut t = text.trim();
    if let Some(fenced) = t.strip_prefix("```") {
        let (_, body) = fenced.split_once('\n')?;
        t = body.trim_end().strip_suffix("```").unwrap_or(body).trim();
    }
    let mut values = serde_json::Deserializer::from_str(t).into_iter::<Value>();
    let (mut calls, mut used) = (Vec::new(), 0);
    while let Some(Ok(v)) = values.next() {
        let has_args = v.get("arguments").or_else(|| v.get("parameters")).is_some();
        match call_of(v).filter(|c| has_args && tools.contains(&c.name)) {
            Some(call) => {
                calls.push(call);
                used = values.byte_offset();
            }
            None => break,
        }
    }
    (!calls.is_empty()).then(|| (t[used..].trim().to_string(), calls))
}

/// `{"name": …, "arguments" | "parameters": {…}}`.
fn parse_call(text: &str) -> Option<ParsedCall> {
    call_of(serde_json::from_str(text).ok()?)
}

fn call_of(v: Value) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    // Some models write the arguments as JSON text.
    let arguments = match arguments {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        other => other,
    };
    Some(ParsedCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_calls_are_found_between_text_and_bad_ones_stay_text() {
        let out = "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Lima\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": \"{\\\"tz\\\": \\\"UTC\\\"}\"}\n</tool_call>";
        let names = ["weather".to_string(), "time".into(), "w".into(), "f".into()];
        let (content, calls) = ToolFormat::Hermes.parse(out, &names);
        assert_eq!(content.as_deref().map(str::trim), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "weather");
        assert_eq!(calls[0].arguments, json!({"city": "Lima"}));
        assert_eq!(calls[1].arguments, json!({"tz": "UTC"}));
        let (content, calls) =
            ToolFormat::Hermes.parse("<tool_call>\nnot json\n</tool_call>", &names);
        assert!(calls.is_empty());
        assert!(content.is_some_and(|c| c.contains("not json")));
        let (content, calls) = ToolFormat::Hermes.parse("Just text.", &names);
        assert_eq!((content.as_deref(), calls.len()), (Some("Just text."), 0));
        // Tags dropped, as small models do: still a call.
        let (content, calls) = ToolFormat::Hermes.parse(
            " {\"name\": \"w\", \"arguments\": {\"city\": \"Paris\"}}",
            &names,
        );
        assert_eq!((content, calls.len()), (None, 1));
        assert_eq!(ToolFormat::Hermes.hold_from(" {\"name"), Some(0));
        let fenced = "```json\n{\"name\": \"w\", \"arguments\": {}}\n```";
        let (content, calls) = ToolFormat::Hermes.parse(fenced, &names);
        assert_eq!((content, calls.len()), (None, 1));
        assert_eq!(ToolFormat::Hermes.hold_from("``"), Some(0));
        let (content, calls) =
            ToolFormat::Hermes.parse("{\"name\": \"w\", \"arguments\": {}}\n{\"t\": 19}", &names);
        assert_eq!((content.as_deref(), calls.len()), (Some("{\"t\": 19}"), 1));
        // A JSON answer that merely has a "name", or names no listed tool, is not a call.
        let (content, calls) = ToolFormat::Hermes.parse("{\"name\": \"w\", \"age\": 3}", &names);
        assert_eq!((calls.len(), content.is_some()), (0, true));
        let (_, calls) = ToolFormat::Hermes.parse("{\"name\": \"Ada\", \"arguments\": {}}", &names);
        assert_eq!(calls.len(), 0);
    }

    #[test]
    fn llama3_json_calls_and_streaming_hold_back() {
        let names = ["f".to_string()];
        let (content, calls) = ToolFormat::Llama3Json.parse(
            "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 1}}",
            &names,
        );
        assert_eq!(content, None);
        assert_eq!(calls[0].arguments, json!({"x": 1}));
        assert_eq!(ToolFormat::Llama3Json.parse("{oops", &names).1.len(), 0);
        assert_eq!(ToolFormat::Llama3Json.hold_from("  {\"na"), Some(0));
        assert_eq!(ToolFormat::Llama3Json.hold_from("Hello"), None);
        assert_eq!(ToolFormat::Hermes.hold_from("Sure <tool"), Some(5));
        assert_eq!(ToolFormat::Hermes.hold_from("a<tool_call>{"), Some(1));
        assert_eq!(ToolFormat::Hermes.hold_from("a < b"), None);
    }

    #[test]
    fn the_format_follows_the_template() {
        assert_eq!(
            ToolFormat::for_template("{% if tools %}<tool_call>{% endif %}"),
            ToolFormat::Hermes
        );
        assert_eq!(
            ToolFormat::for_template("{{ messages }}"),
            ToolFormat::Llama3Json
        );
    }
}
