//! Structured outputs: which grammar a request asks for (OpenAI's `response_format`, vLLM's
//! `structured_outputs` and `guided_*` fields; at most one of them), compiled for the model's
//! vocabulary off the async runtime. A schema, regex or grammar that does not compile is a 400
//! naming the field and llguidance's reason.

use std::sync::Arc;

use graft_core::backend::GraftBackend;
use graft_core::generation::constraint::{Constraint, Grammar};
use serde_json::Value;

use super::{ApiError, AppState};
use crate::wire::{ResponseFormat, Sampling, StructuredOutputs};

/// The grammar `sp` asks for, with the field that asked.
pub fn requested(sp: &Sampling) -> Result<Option<(Grammar, &'static str)>, ApiError> {
    let mut found: Vec<(Grammar, &'static str)> = Vec::new();
    match &sp.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => found.push((Grammar::JsonObject, "response_format")),
        Some(ResponseFormat::JsonSchema { json_schema }) => found.push((
            match &json_schema.schema {
                Some(schema) => Grammar::JsonSchema(schema.clone()),
                None => Grammar::JsonObject,
            },
            "response_format",
        )),
    }
    if let Some(so) = &sp.structured_outputs {
        push_structured(&mut found, so, |_| "structured_outputs")?;
    }
    // vLLM's older per-kind fields are the same choices under their own names.
    let guided = StructuredOutputs {
        json: sp.guided_json.clone(),
        regex: sp.guided_regex.clone(),
        choice: sp.guided_choice.clone(),
        grammar: sp.guided_grammar.clone(),
        json_object: None,
    };
    push_structured(&mut found, &guided, |kind| match kind {
        "json" => "guided_json",
        "regex" => "guided_regex",
        "choice" => "guided_choice",
        _ => "guided_grammar",
    })?;
    if found.len() > 1 {
        return Err(ApiError::bad_field(
            found[1].1,
            format!(
                "ask for one structured output, not several ({})",
                found.iter().map(|f| f.1).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    Ok(found.pop())
}

/// Adds the grammars `so` asks for, each with the field `param(kind)` that asked.
fn push_structured(
    found: &mut Vec<(Grammar, &'static str)>,
    so: &StructuredOutputs,
    param: impl Fn(&str) -> &'static str,
) -> Result<(), ApiError> {
    if let Some(j) = &so.json {
        let p = param("json");
        found.push((Grammar::JsonSchema(schema_value(j, p)?), p));
    }
    if let Some(r) = &so.regex {
        found.push((Grammar::Regex(r.clone()), param("regex")));
    }
    if let Some(c) = &so.choice {
        found.push((Grammar::Choice(c.clone()), param("choice")));
    }
    if let Some(g) = &so.grammar {
        found.push((Grammar::Lark(g.clone()), param("grammar")));
    }
    if so.json_object == Some(true) {
        found.push((Grammar::JsonObject, param("json_object")));
    }
    Ok(())
}

/// A schema given as an object, or as JSON text (vLLM accepts both).
fn schema_value(v: &Value, param: &str) -> Result<Value, ApiError> {
    match v {
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| ApiError::bad_field(param, format!("the schema is not JSON: {e}"))),
        other => Ok(other.clone()),
    }
}

/// Compiles `grammar` for the model (off the async runtime: large schemas take a while).
pub async fn compile<B: GraftBackend>(
    s: &Arc<AppState<B>>,
    grammar: Grammar,
    param: &'static str,
) -> Result<Constraint, ApiError> {
    let compiler = match &s.grammars {
        Ok(c) => c.clone(),
        Err(why) => {
            return Err(ApiError::bad_field(
                param,
                format!("structured outputs are unavailable for this model: {why}"),
            ))
        }
    };
    tokio::task::spawn_blocking(move || compiler.compile(&grammar))
        .await
        .map_err(|e| ApiError::Internal(format!("grammar compile task: {e}")))?
        .map_err(|e| ApiError::bad_field(param, e.to_string()))
}
