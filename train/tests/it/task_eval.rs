//! Task metrics: how answers are scored (each metric can fail), config errors named by key,
//! and `graft-train eval` on a real adapter against the base.

use graft_core::load::{load_gguf, LoadOptions};
use graft_train::config::{self, TrainConfig};
use graft_train::task_eval::Scorer;

use crate::{graft_train, repo_root, stderr};

fn eval_config(dir: &std::path::Path, eval: &str) -> Result<TrainConfig, String> {
    std::fs::write(
        dir.join("schema.json"),
        r#"{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"], "additionalProperties": false}"#,
    )
    .expect("schema");
    std::fs::write(dir.join("d.jsonl"), "{\"text\": \"hi\"}\n").expect("data");
    let path = dir.join("c.toml");
    let text = format!("[model]\nbase = \"m.gguf\"\n[data]\ntrain = \"d.jsonl\"\n[eval]\n{eval}\n");
    let (text, raws) = config::read_text(&path, text, &[]).map_err(|e| e.to_string())?;
    TrainConfig::from_raw(&path, &text, raws.into_iter().next().expect("a run"))
        .map_err(|e| e.to_string())
}

#[test]
fn each_metric_scores_what_it_names() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = eval_config(
        dir.path(),
        r##"metrics = ["exact_match", "contains", "json_valid", "json_schema", "regex"]
json_schema = "schema.json"
regex = "Capital of \\w+: \\w+\\.""##,
    )
    .expect("valid");
    let model = repo_root().join("core/tests/fixtures/families/qwen2/model.gguf");
    let loaded = load_gguf::<graft_core::burn::backend::Flex>(
        &model,
        LoadOptions::default(),
        &Default::default(),
    )
    .expect("tiny model");
    let tok = loaded.tokenizer.as_ref().expect("tokenizer");
    let s = Scorer::new(&cfg.eval, tok, loaded.model.config.vocab_size).expect("scorer");
    let hits = |answer: &str, reference: &str| -> Vec<&'static str> {
        s.score(answer, reference)
            .into_iter()
            .filter(|(_, hit)| *hit)
            .map(|(m, _)| m)
            .collect()
    };
    assert_eq!(
        hits(" Capital of Peru: Lima. ", "Capital of Peru: Lima."),
        ["contains", "exact_match", "regex"]
    );
    assert_eq!(
        hits("So: Capital of Peru: Lima. Done", "Capital of Peru: Lima."),
        ["contains"]
    );
    assert_eq!(
        hits("Capital of Peru: Cusco.", "Capital of Peru: Lima."),
        ["regex"]
    );
    assert_eq!(
        hits("{\"name\": \"Ada\", \"age\": 36}", "x"),
        ["json_schema", "json_valid"]
    );
    assert_eq!(
        hits("```json\n{\"name\": \"Ada\",\n  \"age\": 36}\n```", "x"),
        ["json_schema", "json_valid"]
    );
    assert_eq!(
        hits("{\"name\": \"Ada\", \"age\": \"36\"}", "x"),
        ["json_valid"]
    );
    assert_eq!(hits("{\"name\": \"Ada\"}", "x"), ["json_valid"]);
    assert_eq!(
        hits("{\"name\": \"Ada\", \"age\": 36", "x"),
        Vec::<&str>::new()
    );
}

#[test]
fn eval_settings_are_checked_by_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let e = eval_config(dir.path(), "metrics = [\"regex\"]").expect_err("no pattern");
    assert!(
        e.contains("eval.metrics") && e.contains("needs eval.regex"),
        "{e}"
    );
    let e =
        eval_config(dir.path(), "metrics = [\"regex\"]\nregex = \"(\"").expect_err("bad pattern");
    assert!(e.contains("eval.regex = \"(\""), "{e}");
    let e = eval_config(
        dir.path(),
        "metrics = [\"json_schema\"]\njson_schema = \"nope.json\"",
    )
    .expect_err("no file");
    assert!(
        e.contains("eval.json_schema = \"nope.json\"") && e.contains("cannot read"),
        "{e}"
    );
    let e = eval_config(dir.path(), "metrics = [\"bleu\"]").expect_err("unknown metric");
    assert!(e.contains("bleu") && e.contains("exact_match"), "{e}");
    let e = eval_config(dir.path(), "batch_size = 0").expect_err("zero batch");
    assert!(e.contains("eval.batch_size = 0"), "{e}");
}

#[test]
fn eval_without_a_metric_says_how_to_ask_for_one() {
    let adapter = repo_root().join("core/tests/fixtures/families/qwen2/peft_adapter");
    let data = repo_root().join("configs/data/capitals.jsonl");
    let o = graft_train(&[
        "eval",
        adapter.to_str().expect("utf-8"),
        "--data",
        data.to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("eval.metrics="), "{}", stderr(&o));
}

/// A run with a JSON-schema metric (the schema next to its config) computes it, and the run's
/// saved config still finds the schema when `graft-train eval` reopens the run.
#[test]
fn runs_with_a_schema_metric_can_be_reopened() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("schema.json"), r#"{"type": "object"}"#).expect("schema");
    let rows: String = (0..8)
        .map(|i| {
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"q{i}\"}}, {{\"role\": \"assistant\", \"content\": \"{{}}\"}}]}}\n"
            )
        })
        .collect();
    std::fs::write(dir.path().join("d.jsonl"), rows).expect("data");
    let model = repo_root().join("core/tests/fixtures/families/qwen2/model.gguf");
    std::fs::write(
        dir.path().join("c.toml"),
        format!(
            "[model]\nbase = {:?}\n[lora]\nr = 2\n[data]\ntrain = \"d.jsonl\"\nformat = \"chat\"\n\
             chat_template = \"chatml\"\neval_fraction = 0.25\n[train]\nmax_steps = 1\n\
             eval_samples = 0\n[output]\nruns_dir = \"runs\"\nname = \"r\"\n\
             [eval]\nmetrics = [\"json_valid\", \"json_schema\"]\njson_schema = \"schema.json\"\n\
             max_new_tokens = 4\n",
            model.display().to_string()
        ),
    )
    .expect("config");
    let o = graft_train(&[dir.path().join("c.toml").to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = dir.path().join("runs/r");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    assert!(metrics.contains("\"eval_json_schema\""), "{metrics}");
    let data = dir.path().join("d.jsonl");
    let o = graft_train(&[
        "eval",
        run.to_str().expect("utf-8"),
        "--data",
        data.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("json_schema"), "{}", stderr(&o));
}
