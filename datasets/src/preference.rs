//! Preference rows (for DPO and ORPO), in TRL's formats:
//!
//! - explicit prompt, plain: `prompt`, `chosen`, `rejected` texts; each completion follows the
//!   prompt with no template and ends with the end-of-sequence token;
//! - explicit prompt, conversational: `prompt` a message list, `chosen` and `rejected` the
//!   message lists that follow it (usually one assistant turn each), rendered with the chat
//!   template as one conversation;
//! - implicit prompt: only `chosen` and `rejected`, both whole texts or whole conversations;
//!   the prompt is their longest common prefix (TRL's `extract_prompt`: messages compared
//!   whole; for texts, a space just before the first difference goes to the completions).
//!
//! A row becomes two examples with the same prompt, trained (scored) on the completion only.

use graft_core::text::chat::Message;
use serde_json::Value;

use crate::format::{message_list, Example, RowError};
use crate::source::{kind, Row};
use crate::tokenize::{Skip, Tokenized, Tokenizer};

/// A preference row: the prompt followed by the preferred and by the dispreferred completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Preference {
    pub chosen: Example,
    pub rejected: Example,
}

/// A tokenized preference pair: `[chosen, rejected]`, each with its completion marked trained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub sequences: [Tokenized; 2],
}

impl Pair {
    pub fn chosen(&self) -> &Tokenized {
        &self.sequences[0]
    }

    pub fn rejected(&self) -> &Tokenized {
        &self.sequences[1]
    }
}

/// Reads a preference row with the given field names.
///
/// # Errors
/// A missing or mistyped field, a prompt that is text while the completions are messages (or
/// the reverse), completions without anything to score, chosen equal to rejected.
pub fn parse(
    row: &Row,
    prompt: &str,
    chosen: &str,
    rejected: &str,
) -> Result<Preference, RowError> {
    let at = row.location();
    let get = |field: &str| row.fields.get(field).filter(|v| !v.is_null());
    let (c, r) = match (get(chosen), get(rejected)) {
        (Some(c), Some(r)) => (c, r),
        (None, _) => return Err(RowError(format!("{at}: missing field '{chosen}'"))),
        (_, None) => return Err(RowError(format!("{at}: missing field '{rejected}'"))),
    };
    let conversational = is_messages(c);
    if is_messages(r) != conversational {
        return Err(RowError(format!(
            "{at}: '{chosen}' is {} but '{rejected}' is {}; both must be texts or both message lists",
            shape(c),
            shape(r)
        )));
    }
    match get(prompt) {
        Some(p) if conversational => {
            if !is_messages(p) {
                return Err(RowError(format!(
                    "{at}: '{prompt}' is {} but the completions are message lists",
                    shape(p)
                )));
            }
            let p = message_list(&at, prompt, Some(p), true)?;
            let c = message_list(&at, chosen, Some(c), true)?;
            let r = message_list(&at, rejected, Some(r), true)?;
            exchange(&at, p, (chosen, c), (rejected, r))
        }
        Some(p) => {
            let Value::String(p) = p else {
                return Err(RowError(format!(
                    "{at}: field '{prompt}' must be a string, found {}",
                    kind(p)
                )));
            };
            let c = text(&at, chosen, c)?;
            let r = text(&at, rejected, r)?;
            segments(&at, p.clone(), (chosen, c), (rejected, r))
        }
        None if conversational => {
            let c = message_list(&at, chosen, Some(c), true)?;
            let r = message_list(&at, rejected, Some(r), true)?;
            let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if shared == 0 {
                return Err(RowError(format!(
                    "{at}: '{chosen}' and '{rejected}' share no first message, so there is no \
                     implicit prompt; give a '{prompt}' field"
                )));
            }
            if shared == c.len() || shared == r.len() {
                return Err(RowError(format!(
                    "{at}: one of '{chosen}' and '{rejected}' is a prefix of the other: nothing \
                     to compare after the shared prompt"
                )));
            }
            exchange(
                &at,
                c[..shared].to_vec(),
                (chosen, c[shared..].to_vec()),
                (rejected, r[shared..].to_vec()),
            )
        }
        None => {
            let c = text(&at, chosen, c)?;
            let r = text(&at, rejected, r)?;
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let Some(mut idx) = cc.iter().zip(&rc).position(|(a, b)| a != b) else {
                return Err(RowError(format!(
                    "{at}: one of '{chosen}' and '{rejected}' is a prefix of the other: nothing \
                     to compare after the shared prompt"
                )));
            };
            if idx > 0 && cc[idx - 1] == ' ' {
                idx -= 1;
            }
            let split = |s: &[char]| -> String { s.iter().collect() };
            segments(
                &at,
                split(&cc[..idx]),
                (chosen, split(&cc[idx..])),
                (rejected, split(&rc[idx..])),
            )
        }
    }
}

fn is_messages(v: &Value) -> bool {
    match v {
        Value::Array(_) => true,
        // a message list as JSON text (a CSV cell)
        Value::String(s) => {
            s.trim_start().starts_with("[{")
                && matches!(serde_json::from_str::<Value>(s), Ok(Value::Array(_)))
        }
        _ => false,
    }
}

fn shape(v: &Value) -> &'static str {
    if is_messages(v) {
        "a message list"
    } else {
        kind(v)
    }
}

fn text(at: &str, field: &str, v: &Value) -> Result<String, RowError> {
    match v {
        Value::String(s) if s.is_empty() => {
            Err(RowError(format!("{at}: field '{field}' is empty")))
        }
        Value::String(s) => Ok(s.clone()),
        v => Err(RowError(format!(
            "{at}: field '{field}' must be a string, found {}",
            kind(v)
        ))),
    }
}

fn exchange(
    at: &str,
    prompt: Vec<Message>,
    (chosen_field, chosen): (&str, Vec<Message>),
    (rejected_field, rejected): (&str, Vec<Message>),
) -> Result<Preference, RowError> {
    let completion = |field: &str, completion: Vec<Message>| -> Result<Example, RowError> {
        if !completion.iter().any(|m| m.role == "assistant") {
            return Err(RowError(format!(
                "{at}: '{field}' has no assistant turn to score"
            )));
        }
        Ok(Example::Exchange {
            prompt: prompt.clone(),
            completion,
        })
    };
    let chosen = completion(chosen_field, chosen)?;
    let rejected = completion(rejected_field, rejected)?;
    if chosen == rejected {
        return Err(RowError(format!(
            "{at}: '{chosen_field}' and '{rejected_field}' are the same"
        )));
    }
    Ok(Preference { chosen, rejected })
}

fn segments(
    at: &str,
    prompt: String,
    (chosen_field, chosen): (&str, String),
    (rejected_field, rejected): (&str, String),
) -> Result<Preference, RowError> {
    if chosen == rejected {
        return Err(RowError(format!(
            "{at}: '{chosen_field}' and '{rejected_field}' are the same"
        )));
    }
    Ok(Preference {
        chosen: Example::Segments(vec![(prompt.clone(), false), (chosen, true)]),
        rejected: Example::Segments(vec![(prompt, false), (rejected, true)]),
    })
}

impl Tokenizer<'_> {
    /// Both completions of a preference row, tokenized after the prompt.
    ///
    /// # Errors
    /// [`Skip`] when either gives nothing to score (too long, or not renderable).
    pub fn tokenize_pair(&self, p: &Preference) -> Result<Pair, Skip> {
        let chosen = self.tokenize(&p.chosen)?;
        let rejected = self.tokenize(&p.rejected)?;
        Ok(Pair {
            sequences: [chosen, rejected],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::row;

    fn parse_row(json: &str) -> Result<Preference, RowError> {
        parse(&row(json), "prompt", "chosen", "rejected")
    }

    #[test]
    fn explicit_prompts_plain_and_conversational() {
        let p = parse_row(r#"{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}"#)
            .expect("plain");
        assert_eq!(
            p.chosen,
            Example::Segments(vec![("The sky is".into(), false), (" blue.".into(), true)])
        );
        let p = parse_row(
            r#"{"prompt": [{"role": "user", "content": "Sky?"}],
                "chosen": [{"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "assistant", "content": "Green."}]}"#,
        )
        .expect("conversational");
        assert_eq!(
            p.rejected,
            Example::Exchange {
                prompt: vec![Message::new("user", "Sky?")],
                completion: vec![Message::new("assistant", "Green.")]
            }
        );
    }

    #[test]
    fn implicit_prompts_follow_trl_extract_prompt() {
        // texts: the space before the first difference goes to the completions
        let p = parse_row(r#"{"chosen": "The sky is blue.", "rejected": "The sky is green."}"#)
            .expect("plain");
        assert_eq!(
            p.chosen,
            Example::Segments(vec![("The sky is".into(), false), (" blue.".into(), true)])
        );
        let p = parse_row(
            r#"{"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]}"#,
        )
        .expect("conversational");
        assert_eq!(
            p.chosen,
            Example::Exchange {
                prompt: vec![Message::new("user", "Sky?")],
                completion: vec![Message::new("assistant", "Blue.")]
            }
        );
    }

    #[test]
    fn bad_rows_name_the_line_and_field() {
        for (json, expected) in [
            (
                r#"{"prompt": "a", "chosen": "b"}"#,
                "missing field 'rejected'",
            ),
            (
                r#"{"prompt": "a", "chosen": "b", "rejected": "b"}"#,
                "are the same",
            ),
            (
                r#"{"prompt": "a", "chosen": "", "rejected": "b"}"#,
                "'chosen' is empty",
            ),
            (
                r#"{"prompt": 3, "chosen": "b", "rejected": "c"}"#,
                "'prompt' must be a string, found a number",
            ),
            (
                r#"{"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "c"}"#,
                "both must be texts or both message lists",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}"#,
                "'chosen' has no assistant turn",
            ),
            (
                r#"{"chosen": "same", "rejected": "same and more"}"#,
                "is a prefix of the other",
            ),
            (
                r#"{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "x"}]}"#,
                "share no first message",
            ),
        ] {
            let e = parse_row(json).expect_err(json).0;
            assert!(
                e.starts_with("d.jsonl:7: ") && e.contains(expected),
                "{json}: {e}"
            );
        }
    }
}
