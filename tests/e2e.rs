//! Across binaries: `graft-train` fine-tunes SmolLM2 (Q4_1 GGUF, packed base) on the bundled
//! capitals data, then `graft-serve generate --adapter` answers in the trained style while the
//! base model alone does not.

use std::path::PathBuf;
use std::process::Command;

fn bin(name: &str) -> PathBuf {
    // This test binary lives in <target>/<profile>/deps; the workspace binaries one level up.
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not built (run cargo test --workspace)",
        p.display()
    );
    p
}

fn gguf_path() -> PathBuf {
    let p = graft_core::cache::default_model_path();
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

fn answer(adapter: Option<&PathBuf>, question: &str) -> String {
    answer_with(&gguf_path(), adapter, question)
}

fn answer_with(model: &PathBuf, adapter: Option<&PathBuf>, question: &str) -> String {
    let mut cmd = Command::new(bin("graft-serve"));
    cmd.arg("generate").arg("--model").arg(model);
    cmd.args([
        "--chat",
        "--prompt",
        question,
        "--temperature",
        "0",
        "--max-tokens",
        "16",
    ]);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    let out = cmd.output().expect("spawn graft-serve");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 answer")
}

/// What a trained answer looks like ("Capital of X: Y. [graft]"), as a `--set` for `[eval]`.
const REGEX: &str = r#"eval.regex="Capital of .+: .+\\. \\[graft\\]""#;

#[test]
fn train_then_generate_with_the_adapter() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(bin("graft-train"))
        .arg(repo.join("configs/quickstart.toml"))
        .arg("--set")
        .arg(format!(
            "model.base={:?}",
            gguf_path().display().to_string()
        ))
        .arg("--set")
        .arg(format!(
            "output.runs_dir={:?}",
            dir.path().display().to_string()
        ))
        .args([
            "--set",
            "train.max_steps=12",
            "--set",
            "train.eval_samples=0",
            "--set",
            "output.name=\"e2e\"",
            "--set",
            r#"eval.metrics=["contains", "regex"]"#,
            "--set",
            REGEX,
            "--set",
            "eval.max_examples=4",
            "--set",
            "eval.max_new_tokens=24",
        ])
        .output()
        .expect("spawn graft-train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adapter = dir.path().join("e2e/adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());

    // [eval] task metrics at the end of the run: the eval answers take the trained form.
    let metrics = std::fs::read_to_string(dir.path().join("e2e/metrics.jsonl")).expect("metrics");
    let last: serde_json::Value = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r.get("eval_regex").is_some())
        .last()
        .expect("a task-metrics record");
    assert_eq!(last["eval_examples"], 4, "{last}");
    assert!(
        last["eval_regex"].as_f64().expect("number") >= 0.5,
        "{last}"
    );
    assert!(dir.path().join("e2e/task_eval.jsonl").is_file());
    // graft-train eval scores the base alone: it never answers in that form.
    let data = repo.join("configs/data/capitals.jsonl");
    let out = Command::new(bin("graft-train"))
        .arg("eval")
        .arg(dir.path().join("e2e"))
        .arg("--data")
        .arg(&data)
        .args([
            "--base",
            "--set",
            "eval.max_examples=4",
            "--set",
            "eval.max_new_tokens=24",
        ])
        .output()
        .expect("spawn graft-train eval");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("base model on 4 examples") && log.contains("regex 0.000 (0/4)"),
        "{log}"
    );

    // Kenya is in the training data, Jamaica is not: the style must carry over.
    for (country, capital) in [("Kenya", "Nairobi"), ("Jamaica", "Kingston")] {
        let q = format!("What is the capital of {country}?");
        let tuned = answer(Some(&adapter), &q);
        assert!(
            tuned.contains(&format!("Capital of {country}:")),
            "tuned answer {tuned:?}"
        );
        assert!(tuned.contains("[graft]"), "tuned answer {tuned:?}");
        if country == "Kenya" {
            assert!(tuned.contains(capital), "tuned answer {tuned:?}");
        }
        let base = answer(None, &q);
        assert!(
            !base.contains("[graft]"),
            "the base model already answers in the style: {base:?}"
        );
    }

    // Merged into the base and written as Q8_0, the model answers in the trained form with no
    // adapter. (Re-encoded in the base's own Q4_1, the adapter's small changes mostly round
    // away: the README's merge figures.)
    let merged = dir.path().join("merged.gguf");
    let out = Command::new(bin("graft-train"))
        .arg("merge")
        .arg(dir.path().join("e2e"))
        .args(["--quant", "q8_0", "--gguf"])
        .arg(&merged)
        .output()
        .expect("spawn graft-train merge");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("same top-1 token at"), "{log}");
    for country in ["Kenya", "Jamaica"] {
        let q = format!("What is the capital of {country}?");
        // (not always the same words: a near-tie may go another way after re-encoding)
        let got = answer_with(&merged, None, &q);
        assert!(
            got.contains(&format!("Capital of {country}:")) && got.contains("[graft]"),
            "merged model's answer {got:?}, with the adapter {:?}",
            answer(Some(&adapter), &q)
        );
    }
}

/// The tiny random models of every family (`core/tests/fixtures/families`, made by
/// `scripts/reference/families.py` and, for the MoE ones, `moe.py`), as llama.cpp's converter
/// wrote them to GGUF.
const FAMILIES: [&str; 14] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "mixtral",
    "qwen3_moe",
    "olmoe",
    "qwen2_moe",
    "deepseek_v3",
    "gpt_oss",
];

fn family_model(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../core/tests/fixtures/families")
        .join(family)
        .join("model.gguf")
}

/// `graft-serve score` logits of `prompt`, with or without an adapter.
fn score(model: &PathBuf, adapter: Option<&PathBuf>, prompt: &str, out: &PathBuf) -> Vec<f32> {
    let mut cmd = Command::new(bin("graft-serve"));
    cmd.arg("score").arg("--model").arg(model);
    cmd.args(["--prompt", prompt]).arg("--out").arg(out);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    let o = cmd.output().expect("spawn graft-serve score");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(out).expect("scores written");
    // safetensors: 8-byte header length, JSON header, then data; `logits` is f32.
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors header");
    let [start, end] = [0, 1].map(|i| {
        header["logits"]["data_offsets"][i]
            .as_u64()
            .expect("offsets") as usize
    });
    bytes[8 + n + start..8 + n + end]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn every_family_trains_an_adapter_that_serving_applies() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("text.jsonl");
    let rows: String = (0..24)
        .map(|i| format!("{{\"text\": \"graft {i} counts: one two three four five six\"}}\n"))
        .collect();
    std::fs::write(&data, rows).expect("data");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for family in FAMILIES {
        let model = family_model(family);
        // On MoE models: attention, the routers and every expert (PEFT's target_parameters).
        // FAMILIES lists the MoE families after the dense ones, from Mixtral on.
        let moe = FAMILIES[FAMILIES
            .iter()
            .position(|f| *f == "mixtral")
            .expect("listed")..]
            .contains(&family);
        // And on Qwen2-MoE its shared expert (the sparse layers' gate/up/down) and that
        // expert's gate; on DeepSeek-V3 latent attention's projections and the shared experts.
        let targets = match family {
            "qwen2_moe" => {
                r#"lora.target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj","shared_expert_gate","router","experts.gate_up_proj","experts.down_proj"]"#
            }
            "deepseek_v3" => {
                r#"lora.target_modules=["q_a_proj","q_b_proj","kv_a_proj_with_mqa","kv_b_proj","o_proj","gate_proj","up_proj","down_proj","router","experts.gate_up_proj","experts.down_proj"]"#
            }
            _ if moe => {
                r#"lora.target_modules=["q_proj","k_proj","v_proj","o_proj","router","experts.gate_up_proj","experts.down_proj"]"#
            }
            _ => r#"lora.target_modules="all-linear""#,
        };
        let out = Command::new(bin("graft-train"))
            .arg(repo.join("configs/quickstart.toml"))
            .args([
                "--set",
                &format!("model.base={:?}", model.display().to_string()),
            ])
            .args([
                "--set",
                &format!("data.train={:?}", data.display().to_string()),
            ])
            .args(["--set", "data.format=\"text\""])
            .args(["--set", "data.train_on=\"all\""])
            .args(["--set", "data.max_seq_len=24"])
            .args(["--set", "data.eval_fraction=0.0"])
            .args(["--set", "lora.r=4"])
            .args(["--set", targets])
            .args(["--set", "train.max_steps=6"])
            .args(["--set", "train.warmup_steps=0"])
            .args(["--set", "train.learning_rate=1e-2"])
            .args(["--set", "train.eval_every=0"])
            .args(["--set", "train.save_every=0"])
            .args(["--set", "train.eval_samples=0"])
            .args([
                "--set",
                &format!("output.runs_dir={:?}", dir.path().display().to_string()),
            ])
            .args(["--set", &format!("output.name={family:?}")])
            .output()
            .expect("spawn graft-train");
        assert!(
            out.status.success(),
            "{family}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run = dir.path().join(family);
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
        let losses: Vec<f64> = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|r| r.get("loss").and_then(|v| v.as_f64()))
            .collect();
        assert_eq!(losses.len(), 6, "{family}: {metrics}");
        assert!(
            losses[5] < losses[0],
            "{family}: the loss did not fall: {losses:?}"
        );
        // The adapter names the family's own projections (Phi-3's are fused).
        let adapter = run.join("adapter");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).expect("config"),
        )
        .expect("json");
        let targets: Vec<&str> = cfg["target_modules"]
            .as_array()
            .expect("target_modules list")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let fused = family == "phi3";
        assert_eq!(
            targets.contains(&"qkv_proj"),
            fused,
            "{family}: {targets:?}"
        );
        let latent = family == "deepseek_v3";
        assert_eq!(
            targets.contains(&"q_proj"),
            !fused && !latent,
            "{family}: {targets:?}"
        );
        assert_eq!(
            targets.contains(&"kv_b_proj"),
            latent,
            "{family}: {targets:?}"
        );
        // GPT-OSS's router is `mlp.router`.
        let router = if family == "gpt_oss" {
            "router"
        } else {
            "gate"
        };
        if moe {
            assert_eq!(
                cfg["target_parameters"],
                serde_json::json!([
                    format!("mlp.{router}.weight"),
                    "mlp.experts.gate_up_proj",
                    "mlp.experts.down_proj"
                ]),
                "{family}"
            );
            // B starts at zero: the experts' B moved only if gradients reached them.
            let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).expect("weights");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
            let router_b = format!("{router}.lora_B");
            let mut keys = vec!["experts.base_layer.lora_B", "experts.lora_B", &router_b];
            match family {
                "qwen2_moe" => keys.extend([
                    "shared_expert.down_proj.lora_B",
                    "shared_expert_gate.lora_B",
                ]),
                "deepseek_v3" => keys.push("shared_experts.up_proj.lora_B"),
                _ => {}
            }
            for key in keys {
                let t = st
                    .tensor(&format!("base_model.model.model.layers.1.mlp.{key}.weight"))
                    .unwrap_or_else(|e| panic!("{family}: {key}: {e}"));
                let largest = t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).abs())
                    .fold(0f32, f32::max);
                assert!(largest > 0.0, "{family}: {key} did not train");
            }
        }
        // Serving applies it: the adapter moves the logits of a prompt.
        let prompt = "graft 3 counts: one two";
        let base = score(&model, None, prompt, &dir.path().join("base.safetensors"));
        let tuned = score(
            &model,
            Some(&adapter),
            prompt,
            &dir.path().join("tuned.safetensors"),
        );
        let moved = base
            .iter()
            .zip(&tuned)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 1e-3,
            "{family}: the trained adapter changes nothing"
        );
    }
}
