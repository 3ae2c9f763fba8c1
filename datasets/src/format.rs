//! Prompt formats: how a row's fields become a conversation or a plain text with trained parts.
//!
//! - `chat`: a list of `{role, content}` messages (OpenAI / HF `messages`);
//! - `alpaca`: `instruction`, optional `input`, `output` → a user turn (instruction, a blank
//!   line, input) and an assistant turn;
//! - `completion`: `prompt` and `completion` texts, no template, the completion trained; or, as
//!   TRL's conversational prompt-completion, two message lists rendered with the template, the
//!   completion's assistant turns trained;
//! - `text`: one text field, every token trained;
//! - `preference`: TRL's preference rows, `prompt` / `chosen` / `rejected` (texts or message
//!   lists; the prompt may be implicit, shared by both): see [`crate::preference`].
//!
//! Field names are configurable; the format is detected from the first row when not given.

use graft_core::text::chat::Message;
use serde_json::Value;

use crate::source::{kind, Row};

/// A prompt format with its field names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Chat {
        messages: String,
    },
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    Completion {
        prompt: String,
        completion: String,
    },
    Text {
        text: String,
    },
    Preference {
        prompt: String,
        chosen: String,
        rejected: String,
    },
}

/// A format's name, as written in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatKind {
    Chat,
    Alpaca,
    Completion,
    Text,
    Preference,
}

impl FormatKind {
    /// The format with its default field names.
    pub fn format(self) -> Format {
        match self {
            FormatKind::Chat => Format::Chat {
                messages: "messages".into(),
            },
            FormatKind::Alpaca => Format::Alpaca {
                instruction: "instruction".into(),
                input: "input".into(),
                output: "output".into(),
            },
            FormatKind::Completion => Format::Completion {
                prompt: "prompt".into(),
                completion: "completion".into(),
            },
            FormatKind::Text => Format::Text {
                text: "text".into(),
            },
            FormatKind::Preference => Format::Preference {
                prompt: "prompt".into(),
                chosen: "chosen".into(),
                rejected: "rejected".into(),
            },
        }
    }
}

/// A row that cannot be used: its file and line, the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RowError(pub String);

/// A field mapping for a field the format does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {format} format has the fields {fields:?}")]
pub struct UnknownField {
    pub format: &'static str,
    pub fields: Vec<String>,
}

/// What one row means.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Rendered with the chat template; assistant turns are trained.
    Conversation(Vec<Message>),
    /// A conversation whose `completion` messages follow `prompt`: rendered with the chat
    /// template as one conversation; only the completion's assistant turns are trained.
    Exchange {
        prompt: Vec<Message>,
        completion: Vec<Message>,
    },
    /// Plain text in parts, each trained or not.
    Segments(Vec<(String, bool)>),
}

impl Format {
    /// The format named `name` with default field names (`messages`; `instruction`, `input`,
    /// `output`; `prompt`, `completion`; `text`).
    pub fn named(name: &str) -> Option<Format> {
        use serde::de::IntoDeserializer;
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            name.into_deserializer();
        serde::Deserialize::deserialize(de)
            .ok()
            .map(FormatKind::format)
    }

    /// Reads the field this format calls `field` (by its default name, e.g. `messages`) from
    /// the column `column`.
    ///
    /// # Errors
    /// A field this format does not have, naming the ones it has.
    pub fn map_field(&mut self, field: &str, column: &str) -> Result<(), UnknownField> {
        let slot = match (&mut *self, field) {
            (Format::Chat { messages }, "messages") => messages,
            (Format::Alpaca { instruction, .. }, "instruction") => instruction,
            (Format::Alpaca { input, .. }, "input") => input,
            (Format::Alpaca { output, .. }, "output") => output,
            (Format::Completion { prompt, .. }, "prompt") => prompt,
            (Format::Completion { completion, .. }, "completion") => completion,
            (Format::Text { text }, "text") => text,
            (Format::Preference { prompt, .. }, "prompt") => prompt,
            (Format::Preference { chosen, .. }, "chosen") => chosen,
            (Format::Preference { rejected, .. }, "rejected") => rejected,
            (f, _) => {
                return Err(UnknownField {
                    format: f.name(),
                    fields: f.fields().iter().map(|s| s.to_string()).collect(),
                })
            }
        };
        *slot = column.to_string();
        Ok(())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Format::Chat { .. } => "chat",
            Format::Alpaca { .. } => "alpaca",
            Format::Completion { .. } => "completion",
            Format::Text { .. } => "text",
            Format::Preference { .. } => "preference",
        }
    }

    /// The field names this format reads (required ones first).
    pub fn fields(&self) -> Vec<&str> {
        match self {
            Format::Chat { messages } => vec![messages],
            Format::Alpaca {
                instruction,
                input,
                output,
            } => vec![instruction, output, input],
            Format::Completion { prompt, completion } => vec![prompt, completion],
            Format::Text { text } => vec![text],
            Format::Preference {
                prompt,
                chosen,
                rejected,
            } => vec![chosen, rejected, prompt],
        }
    }

    /// What a preference row means (the `preference` format).
    ///
    /// # Errors
    /// A row that is not a usable pair, naming its file, line and field; any other format.
    pub fn preference(&self, row: &Row) -> Result<crate::preference::Preference, RowError> {
        match self {
            Format::Preference {
                prompt,
                chosen,
                rejected,
            } => crate::preference::parse(row, prompt, chosen, rejected),
            other => Err(RowError(format!(
                "{}: the {} format has no preference pairs (DPO and ORPO read prompt/chosen/rejected rows)",
                row.location(),
                other.name()
            ))),
        }
    }

    /// Whether rows are preference pairs (for DPO/ORPO) rather than single examples.
    pub fn is_preference(&self) -> bool {
        matches!(self, Format::Preference { .. })
    }

    /// The fields every row must have.
    pub fn required_fields(&self) -> Vec<&str> {
        match self {
            Format::Alpaca {
                instruction,
                output,
                ..
            } => vec![instruction, output],
            Format::Preference {
                chosen, rejected, ..
            } => vec![chosen, rejected],
            other => other.fields(),
        }
    }

    /// The format whose default fields a row has, when exactly one fits.
    ///
    /// # Errors
    /// The row's keys, when no format or several fit.
    pub fn detect(row: &Row) -> Result<Format, RowError> {
        let has = |k: &str| row.fields.contains_key(k);
        let mut fits = Vec::new();
        if has("messages") {
            fits.push("chat");
        }
        if has("instruction") && has("output") {
            fits.push("alpaca");
        }
        if has("prompt") && has("completion") {
            fits.push("completion");
        }
        if has("text") {
            fits.push("text");
        }
        if has("chosen") && has("rejected") {
            fits.push("preference");
        }
        match fits[..] {
            [one] => Ok(Format::named(one).expect("a known format name")),
            _ => {
                let keys: Vec<&String> = row.fields.keys().collect();
                Err(RowError(format!(
                    "{}: cannot tell the data format from the keys {keys:?} ({}); set data.format",
                    row.location(),
                    if fits.is_empty() {
                        "no format fits".to_string()
                    } else {
                        format!("{fits:?} all fit")
                    }
                )))
            }
        }
    }

    /// What `row` means in this format.
    ///
    /// # Errors
    /// A message naming the row's file and line, the field and what is wrong with it.
    pub fn example(&self, row: &Row) -> Result<Example, RowError> {
        let at = row.location();
        let text = |field: &str, required: bool| -> Result<Option<String>, RowError> {
            match row.fields.get(field) {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                None | Some(Value::Null) if !required => Ok(None),
                None => Err(RowError(format!("{at}: missing field '{field}'"))),
                Some(v) => Err(RowError(format!(
                    "{at}: field '{field}' must be a string, found {}",
                    kind(v)
                ))),
            }
        };
        match self {
            Format::Chat { messages } => {
                let out = message_list(&at, messages, row.fields.get(messages), true)?;
                if !out.iter().any(|m| m.role == "assistant") {
                    return Err(RowError(format!(
                        "{at}: '{messages}' has no assistant turn to learn from"
                    )));
                }
                Ok(Example::Conversation(out))
            }
            Format::Alpaca {
                instruction,
                input,
                output,
            } => {
                let ins = text(instruction, true)?.unwrap_or_default();
                let out = text(output, true)?.unwrap_or_default();
                if out.trim().is_empty() {
                    return Err(RowError(format!("{at}: field '{output}' is empty")));
                }
                let user = match text(input, false)? {
                    Some(inp) if !inp.trim().is_empty() => format!("{ins}\n\n{inp}"),
                    _ => ins,
                };
                Ok(Example::Conversation(vec![
                    Message::new("user", user),
                    Message::new("assistant", out),
                ]))
            }
            Format::Completion { prompt, completion } => {
                if let (Some(p @ Value::Array(_)), Some(c @ Value::Array(_))) =
                    (row.fields.get(prompt), row.fields.get(completion))
                {
                    // conversational prompt-completion
                    let prompt_messages = message_list(&at, prompt, Some(p), false)?;
                    let completion_messages = message_list(&at, completion, Some(c), true)?;
                    if !completion_messages.iter().any(|m| m.role == "assistant") {
                        return Err(RowError(format!(
                            "{at}: '{completion}' has no assistant turn to learn from"
                        )));
                    }
                    return Ok(Example::Exchange {
                        prompt: prompt_messages,
                        completion: completion_messages,
                    });
                }
                let p = text(prompt, true)?.unwrap_or_default();
                let c = text(completion, true)?.unwrap_or_default();
                if c.is_empty() {
                    return Err(RowError(format!("{at}: field '{completion}' is empty")));
                }
                Ok(Example::Segments(vec![(p, false), (c, true)]))
            }
            Format::Text { text: field } => {
                let t = text(field, true)?.unwrap_or_default();
                if t.trim().is_empty() {
                    return Err(RowError(format!("{at}: field '{field}' is empty")));
                }
                Ok(Example::Segments(vec![(t, true)]))
            }
            Format::Preference { .. } => Err(RowError(format!(
                "{at}: a preference row (chosen/rejected) is trained with train.method = \"dpo\" or \"orpo\""
            ))),
        }
    }
}

/// The messages in `value` (field `field` of the row at `at`): a list of `{role, content}`
/// objects, or in a text cell (CSV) that list as JSON text. `non_empty`: the list must hold a
/// message.
///
/// # Errors
/// A missing field, a value that is not a list, a message without a string role or content,
/// an unknown role, an empty assistant turn.
pub fn message_list(
    at: &str,
    field: &str,
    value: Option<&Value>,
    non_empty: bool,
) -> Result<Vec<Message>, RowError> {
    let parsed;
    let list = match value {
        Some(Value::Array(a)) => a,
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(a)) => {
                parsed = a;
                &parsed
            }
            _ => {
                return Err(RowError(format!(
                    "{at}: field '{field}' must be a list of messages (a JSON array in text cells)"
                )))
            }
        },
        None => return Err(RowError(format!("{at}: missing field '{field}'"))),
        Some(v) => {
            return Err(RowError(format!(
                "{at}: field '{field}' must be an array, found {}",
                kind(v)
            )))
        }
    };
    if non_empty && list.is_empty() {
        return Err(RowError(format!("{at}: field '{field}' is an empty list")));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let get = |k: &str| match m.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(RowError(format!(
                "{at}: {field}[{i}].{k} must be a string, found {}",
                kind(v)
            ))),
            None => Err(RowError(format!("{at}: {field}[{i}] has no '{k}'"))),
        };
        let (role, content) = (get("role")?, get("content")?);
        if !matches!(role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(RowError(format!(
                "{at}: {field}[{i}].role '{role}' is not system, user, assistant or tool"
            )));
        }
        if role == "assistant" && content.trim().is_empty() {
            return Err(RowError(format!(
                "{at}: {field}[{i}] is an empty assistant turn"
            )));
        }
        out.push(Message::new(role, content));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A row of `d.jsonl`, line 7, with the fields of the JSON object `json`.
    pub(crate) fn row(json: &str) -> Row {
        let Value::Object(fields) = serde_json::from_str(json).expect("json") else {
            panic!("object")
        };
        Row {
            file: "d.jsonl".into(),
            line: 7,
            fields,
        }
    }

    #[test]
    fn detection_and_conversion() {
        let r = row(r#"{"instruction": "Add", "input": "2+2", "output": "4"}"#);
        let f = Format::detect(&r).expect("alpaca");
        assert_eq!(f.name(), "alpaca");
        assert_eq!(
            f.example(&r).expect("valid"),
            Example::Conversation(vec![
                Message::new("user", "Add\n\n2+2"),
                Message::new("assistant", "4")
            ])
        );
        let ambiguous = row(r#"{"text": "a", "prompt": "b", "completion": "c"}"#);
        let e = Format::detect(&ambiguous).unwrap_err().0;
        assert!(e.contains("d.jsonl:7") && e.contains("all fit"), "{e}");
    }

    #[test]
    fn bad_rows_name_the_line_and_field() {
        let f = Format::named("chat").expect("known");
        let e = f
            .example(&row(r#"{"messages": [{"role": "user", "content": 3}]}"#))
            .unwrap_err()
            .0;
        assert!(
            e.contains("d.jsonl:7") && e.contains("messages[0].content") && e.contains("a number"),
            "{e}"
        );
        let e = f
            .example(&row(r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}"#))
            .unwrap_err().0;
        assert!(e.contains("empty assistant turn"), "{e}");
        let e = Format::named("completion")
            .expect("known")
            .example(&row(r#"{"prompt": "x"}"#))
            .unwrap_err()
            .0;
        assert!(e.contains("missing field 'completion'"), "{e}");
    }
}
