//! DPO and ORPO against TRL: on the fixture batch of `train/tests/fixtures/preference_reference.*`
//! (written by `scripts/reference/trl_preference.py`: TRL 1.16's DPOTrainer and ORPOTrainer on
//! the tiny Llama fixture with its PEFT adapter as the policy), graft tokenizes the same pairs to
//! the same ids and completion masks, and its loss, reward metrics and every LoRA gradient equal
//! TRL's within 1e-4.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use graft_core::burn::backend::{Autodiff, Flex};
use graft_core::burn::prelude::*;
use graft_datasets::preference::Pair;
use graft_train::setup::{configs, load_model, prepare_data};
use graft_train::trainer::Trainer;
use serde_json::Value;

use crate::repo_root;

type B = Autodiff<Flex>;

fn fixture() -> (Value, Vec<u8>) {
    let dir = repo_root().join("train/tests/fixtures");
    let json = std::fs::read_to_string(dir.join("preference_reference.json")).expect("fixture");
    let grads = std::fs::read(dir.join("preference_reference.safetensors")).expect("fixture");
    (serde_json::from_str(&json).expect("json"), grads)
}

fn write_case(dir: &Path, pairs: &Value, method: &str, extra: &str) -> std::path::PathBuf {
    let data = dir.join("pairs.jsonl");
    let lines: String = pairs
        .as_array()
        .expect("pairs")
        .iter()
        .map(|p| p.to_string() + "\n")
        .collect();
    std::fs::write(&data, lines).expect("write data");
    let model = repo_root().join("core/tests/fixtures/families/llama");
    let path = dir.join(format!("{method}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"[model]
base = {model:?}

[lora]
r = 4
alpha = 8

[data]
train = {data:?}
max_seq_len = 64

[train]
method = "{method}"
micro_batch_size = 3

[preference]
{extra}
"#
        ),
    )
    .expect("write config");
    path
}

fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: graft {got} vs TRL {want} (|Δ| {:.2e} > {tol:.0e})",
        (got - want).abs()
    );
}

fn check_case(case: &str, method: &str, extra: &str) {
    check_case_with(case, method, extra, &[]);
}

/// [`check_case`] with `sets` (`KEY=VALUE`) applied to the config.
fn check_case_with(case: &str, method: &str, extra: &str, sets: &[String]) {
    let (reference, grad_bytes) = fixture();
    let want = &reference["cases"][case];
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_case(dir.path(), &reference["pairs"], method, extra);
    let cfg = configs(&path, sets).expect("config").remove(0);
    let device = Default::default();
    let loaded = load_model::<B>(&cfg, &device).expect("model");
    let data = prepare_data::<B, Pair>(&cfg, &loaded).expect("pairs");

    // Same token ids and completion masks as TRL's tokenization of the rows.
    assert_eq!(data.train.len(), 3);
    for (i, pair) in data.train.iter().enumerate() {
        for (k, side) in ["chosen", "rejected"].into_iter().enumerate() {
            let seq = &pair.sequences[k];
            let trl = &want[side][i];
            let ids: Vec<u32> = serde_json::from_value(trl["ids"].clone()).expect("ids");
            let mask: Vec<u8> = serde_json::from_value(trl["completion"].clone()).expect("mask");
            assert_eq!(seq.ids, ids, "{case} pair {i} {side} ids");
            let ours: Vec<u8> = seq.trained.iter().map(|&t| u8::from(t)).collect();
            assert_eq!(ours, mask, "{case} pair {i} {side} completion mask");
        }
    }

    // The policy: the fixture's PEFT adapter, in the trainer's parameter order.
    let model = &loaded.model.model;
    let adapter_dir = repo_root().join("core/tests/fixtures/families/llama/peft_adapter");
    let (adapter, _) = graft_core::adapters::peft::load(&adapter_dir, model).expect("adapter");
    let stop = AtomicBool::new(false);
    let tok = loaded.model.tokenizer.as_ref().expect("tokenizer");
    let trainer = Trainer::new(
        &cfg,
        model,
        tok,
        &data,
        dir.path().join("run"),
        "tiny-llama".into(),
        &stop,
    );
    let host = |t: &Tensor<B, 2>| t.clone().into_data().to_vec::<f32>().expect("f32");
    let params: Vec<Vec<f32>> = adapter
        .modules()
        .flat_map(|(_, _, w)| [host(&w.a), host(&w.b)])
        .collect();
    assert_eq!(params.len(), trainer.param_names().len());
    trainer.precompute_reference(); // with precompute_ref_log_probs only

    let got = trainer.gradients(&trainer.upload(params).expect("shapes"), &[vec![0, 1, 2]]);
    assert_close(
        &format!("{case} loss"),
        got.loss,
        want["loss"].as_f64().expect("loss"),
        1e-4,
    );
    let means = got.pairs.means("");
    let mut compared = 0;
    for (key, value) in want["metrics"].as_object().expect("metrics") {
        // TRL also logs token counts, entropy and mean logits, which graft does not compute
        let Some(ours) = means.get(key) else { continue };
        let v = value.as_f64().expect("number");
        // log-prob sums are O(10–100): compare them relative to their size
        assert_close(
            &format!("{case} {key}"),
            ours.as_f64().expect("number"),
            v,
            1e-4 * v.abs().max(1.0),
        );
        compared += 1;
    }
    let expected = if method == "orpo" { 9 } else { 6 };
    assert_eq!(compared, expected, "{case}: metrics compared");

    let st = safetensors::SafeTensors::deserialize(&grad_bytes).expect("safetensors");
    let mut worst: f64 = 0.0;
    for (name, g) in trainer.param_names().iter().zip(got.grads) {
        let g = g.into_data().to_vec::<f32>().expect("f32");
        let t = st
            .tensor(&format!("{case}.{name}"))
            .expect("gradient in fixture");
        let trl: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(trl.len(), g.len(), "{name}");
        for (a, b) in g.iter().zip(&trl) {
            worst = worst.max(f64::from((a - b).abs()));
        }
    }
    assert!(worst <= 1e-4, "{case}: max |Δ gradient| {worst:.2e}");
    eprintln!(
        "{case}: loss {:.6} (TRL {}), max |Δ gradient| {worst:.2e}",
        got.loss, want["loss"]
    );
}

#[test]
fn dpo_sigmoid_equals_trl() {
    check_case("dpo_sigmoid", "dpo", "beta = 0.1\nloss_type = \"sigmoid\"");
}

#[test]
fn dpo_ipo_equals_trl() {
    check_case("dpo_ipo", "dpo", "beta = 0.5\nloss_type = \"ipo\"");
}

#[test]
fn dpo_with_precomputed_reference_equals_trl() {
    // the same numbers when the reference pass runs once before training
    check_case(
        "dpo_sigmoid",
        "dpo",
        "beta = 0.1\nprecompute_ref_log_probs = true",
    );
}

#[test]
fn orpo_equals_trl() {
    check_case("orpo", "orpo", "beta = 0.2");
}

/// With each layer recomputed in the backward (and the fused LM head), DPO's and ORPO's losses
/// and gradients are TRL's still.
#[test]
fn dpo_and_orpo_with_recomputed_layers_equal_trl() {
    let sets = ["train.gradient_checkpointing=true".to_string()];
    check_case_with(
        "dpo_sigmoid",
        "dpo",
        "beta = 0.1\nloss_type = \"sigmoid\"",
        &sets,
    );
    check_case_with("orpo", "orpo", "beta = 0.2", &sets);
}

/// `configs/dpo.toml` on the real SmolLM2 (16 steps): on the held-out pairs the base ranks the
/// plain sentence above the house style, the trained adapter the other way round.
#[test]
fn a_dpo_run_on_the_real_model_learns_the_held_out_preference() {
    crate::gguf_path();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = repo_root().join("configs/dpo.toml");
    let out = crate::graft_train(&[
        config.to_str().expect("utf-8"),
        "--set",
        &format!("output.runs_dir={:?}", dir.path().display().to_string()),
    ]);
    assert!(out.status.success(), "{}", crate::stderr(&out));
    let run = std::fs::read_dir(dir.path())
        .expect("runs")
        .next()
        .expect("one run")
        .expect("entry")
        .path();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let rows: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let first = &rows[0];
    assert_eq!(first["step"], 1);
    // at the start the policy is the reference: every reward is 0, the loss ln 2
    assert!((first["loss"].as_f64().expect("loss") - std::f64::consts::LN_2).abs() < 1e-4);
    assert_eq!(first["rewards/margins"].as_f64(), Some(0.0));
    let eval = rows
        .iter()
        .rev()
        .find(|r| r.get("eval_loss").is_some())
        .expect("an eval record");
    let get = |k: &str| eval[k].as_f64().unwrap_or_else(|| panic!("{k} in {eval}"));
    assert!(get("eval_ref_logps/accuracies") < 0.5, "{eval}");
    assert!(get("eval_logps/accuracies") >= 0.9, "{eval}");
    assert!(get("eval_rewards/accuracies") >= 0.9, "{eval}");
    assert!(get("eval_rewards/margins") > 1.0, "{eval}");
    assert!(get("eval_loss") < 0.3, "{eval}");
    // the parquet file and the report carry the preference metrics
    assert!(run.join("adapter/adapter_model.safetensors").is_file());
    let report = std::fs::read_to_string(run.join("report.html")).expect("report");
    assert!(
        report.contains("<title>Rewards</title>")
            && report.contains("<title>Reward accuracy</title>")
    );
    eprintln!("held-out after the run: {eval}");
}
