//! Task metrics (`[eval]`): the eval prompts — each example's text before its first trained
//! token — answered greedily, decoded together in batches as the serving engine batches
//! requests, and each answer scored against the example's reference (its first trained span:
//! the first answer of a conversation, special tokens dropped): `exact_match`, `contains`, `json_valid`, `json_schema`, `regex`.
//!
//! `json_schema` asks llguidance, the grammar engine behind graft-serve's structured outputs,
//! whether the schema's grammar accepts the answer's JSON (re-serialized compactly, so that
//! formatting does not count), so a schema means the same thing when scoring as when serving.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use graft_core::adapters::lora::Adapter;
use graft_core::backend::GraftBackend;
use graft_core::generation::batch::generate_batch;
use graft_core::generation::constraint::{Constraint, Grammar, GrammarCompiler};
use graft_core::generation::sampling::SamplingParams;
use graft_core::model::Model;
use graft_core::text::tokenizer::TokenizerBundle;
use graft_datasets::tokenize::Tokenized;
use serde::Serialize;

use crate::config::{EvalSettings, TaskMetric};

/// One scored answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub index: usize,
    pub prompt: String,
    pub reference: String,
    pub generated: String,
    /// Metric name → whether this answer scores.
    pub scores: BTreeMap<&'static str, bool>,
}

/// The metrics over the scored examples.
#[derive(Debug, Clone, Default)]
pub struct TaskReport {
    /// Metric → fraction of examples that score.
    pub scores: BTreeMap<TaskMetric, f64>,
    pub answers: Vec<Answer>,
    /// Answers that could not be generated (scored as misses).
    pub failed: usize,
}

impl TaskReport {
    /// `eval_<metric>` → value, for the metrics file.
    pub fn record(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut r: serde_json::Map<String, serde_json::Value> = self
            .scores
            .iter()
            .map(|(m, v)| (format!("eval_{}", m.name()), (*v).into()))
            .collect();
        r.insert("eval_examples".into(), self.answers.len().into());
        if self.failed > 0 {
            r.insert("eval_failed".into(), self.failed.into());
        }
        r
    }

    /// `exact_match 0.750 (6/8), …`
    pub fn summary(&self) -> String {
        let n = self.answers.len();
        let failed = if self.failed > 0 {
            format!(" ({} could not be generated)", self.failed)
        } else {
            String::new()
        };
        let scores = self
            .scores
            .iter()
            .map(|(m, v)| {
                format!(
                    "{} {v:.3} ({}/{n})",
                    m.name(),
                    (v * n as f64).round() as usize
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!("{scores}{failed}")
    }
}

/// Scores answers for one model's tokenizer: the regex and the schema's grammar compiled once.
pub struct Scorer<'a> {
    settings: &'a EvalSettings,
    tokenizer: &'a TokenizerBundle,
    schema: Option<Constraint>,
}

/// An answer's JSON: the trimmed text, or the inside of a ```json fence around it.
fn json_of(answer: &str) -> Option<serde_json::Value> {
    let t = answer.trim();
    let inner = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|r| r.strip_suffix("```"))
        .unwrap_or(t);
    serde_json::from_str(inner.trim()).ok()
}

impl<'a> Scorer<'a> {
    /// # Errors
    /// A schema llguidance cannot compile, naming the schema file.
    pub fn new(
        settings: &'a EvalSettings,
        tokenizer: &'a TokenizerBundle,
        vocab_size: usize,
    ) -> Result<Self> {
        let schema = match (
            &settings.json_schema,
            settings.metrics.contains(&TaskMetric::JsonSchema),
        ) {
            (Some((path, schema)), true) => {
                let compiler = GrammarCompiler::new(tokenizer, vocab_size)?;
                Some(
                    compiler
                        .compile(&Grammar::JsonSchema(schema.clone()))
                        .with_context(|| format!("eval.json_schema {}", path.display()))?,
                )
            }
            _ => None,
        };
        Ok(Scorer {
            settings,
            tokenizer,
            schema,
        })
    }

    fn fits_schema(&self, value: &serde_json::Value) -> bool {
        let Some(schema) = &self.schema else {
            return false;
        };
        let Ok(ids) = self.tokenizer.encode(&value.to_string(), false) else {
            return false;
        };
        let mut c = schema.fork();
        ids.iter().all(|&t| c.advance(t).is_ok()) && c.is_accepting()
    }

    /// Which metrics `answer` scores against `reference`.
    pub fn score(&self, answer: &str, reference: &str) -> BTreeMap<&'static str, bool> {
        let (a, r) = (answer.trim(), reference.trim());
        let json = || json_of(a);
        self.settings
            .metrics
            .iter()
            .map(|&m| {
                let hit = match m {
                    TaskMetric::ExactMatch => a == r,
                    TaskMetric::Contains => !r.is_empty() && a.contains(r),
                    TaskMetric::JsonValid => json().is_some(),
                    TaskMetric::JsonSchema => json().is_some_and(|v| self.fits_schema(&v)),
                    TaskMetric::Regex => self
                        .settings
                        .regex
                        .as_ref()
                        .is_some_and(|re| re.is_match(a)),
                };
                (m.name(), hit)
            })
            .collect()
    }
}

/// Answers the first `max_examples` of `examples` greedily with `adapter` (or the base) and
/// scores them.
///
/// # Errors
/// A schema that does not compile.
pub fn evaluate<B: GraftBackend>(
    model: &Model<B>,
    tokenizer: &TokenizerBundle,
    adapter: Option<&Adapter<B>>,
    examples: &[&Tokenized],
    settings: &EvalSettings,
) -> Result<TaskReport> {
    let scorer = Scorer::new(settings, tokenizer, model.config.vocab_size)?;
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: settings.max_new_tokens,
        ..SamplingParams::default()
    };
    // (index, prompt, reference) of the examples with a prompt before their first trained span
    // (an example trained from its first token, plain text, has no prompt to answer)
    let cases: Vec<(usize, &[u32], String)> = examples
        .iter()
        .enumerate()
        .filter_map(|(i, ex)| {
            if ex.trained.first().copied().unwrap_or(true) {
                return None;
            }
            let first = ex.trained.iter().position(|&t| t)?;
            let end = ex.trained[first..]
                .iter()
                .position(|&t| !t)
                .map_or(ex.ids.len(), |n| first + n);
            let reference = tokenizer
                .decode(&ex.ids[first..end], true)
                .unwrap_or_default();
            Some((i, &ex.ids[..first], reference))
        })
        .take(settings.max_examples)
        .collect();
    let mut report = TaskReport::default();
    for batch in cases.chunks(settings.batch_size) {
        let prompts: Vec<Vec<u32>> = batch.iter().map(|c| c.1.to_vec()).collect();
        let outs = generate_batch(model, tokenizer, adapter, &prompts, &params);
        for ((index, prompt, reference), out) in batch.iter().zip(outs) {
            // A failed generation (a prompt too long for the context) scores nothing.
            let (generated, scores) = match out {
                Ok(g) => {
                    let scores = scorer.score(&g.text, reference);
                    (g.text, scores)
                }
                Err(e) => {
                    report.failed += 1;
                    let none = settings.metrics.iter().map(|m| (m.name(), false)).collect();
                    (format!("<generation failed: {e}>"), none)
                }
            };
            report.answers.push(Answer {
                index: *index,
                prompt: tokenizer.decode(prompt, false).unwrap_or_default(),
                scores,
                reference: reference.clone(),
                generated,
            });
        }
    }
    let n = report.answers.len().max(1) as f64;
    for &m in &settings.metrics {
        let hits = report.answers.iter().filter(|a| a.scores[m.name()]).count();
        report.scores.insert(m, hits as f64 / n);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_answers_may_come_fenced() {
        assert_eq!(json_of(" {\"a\": 1} "), Some(serde_json::json!({"a": 1})));
        assert_eq!(
            json_of("```json\n[1, 2]\n```"),
            Some(serde_json::json!([1, 2]))
        );
        assert_eq!(json_of("{\"a\": "), None);
        assert_eq!(json_of("The answer is {\"a\": 1}"), None);
    }
}
