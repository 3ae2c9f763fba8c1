//! A short QLoRA run on the packed Q4_1 base: the run directory is complete, the loss falls,
//! the adapter is a PEFT directory that graft-serve loads, and sweeps give one run each.

use crate::{adapter_values, graft_train, single_run, stderr, write_config};

#[test]
fn a_short_run_writes_a_complete_run_directory_and_learns() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), "max_steps = 8\nsave_every = 4\neval_every = 4\nkeep_last_checkpoints = 1\nlearning_rate = 3e-3");
    let out = graft_train(&[path.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = single_run(dir.path());
    for f in [
        "config.toml",
        "metrics.jsonl",
        "metrics.parquet",
        "report.html",
        "samples.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(run.join(f).is_file(), "{f} missing in {}", run.display());
    }
    // keep_last_checkpoints = 1: only the final checkpoint remains.
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .expect("checkpoints")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(ckpts, vec![std::ffi::OsString::from("step-000008")]);

    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let losses: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.get("loss").and_then(|v| v.as_f64()))
        .collect();
    let evals: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.get("eval_loss").and_then(|v| v.as_f64()))
        .collect();
    assert_eq!(losses.len(), 8, "{metrics}");
    assert_eq!(evals.len(), 2, "{metrics}");
    let first: f64 = losses[..2].iter().sum::<f64>() / 2.0;
    let last: f64 = losses[6..].iter().sum::<f64>() / 2.0;
    assert!(last < 0.75 * first, "loss did not fall: {losses:?}");
    assert!(rows[0]["tokens_per_sec"].as_f64().unwrap_or(0.0) > 0.0);

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary"))
            .expect("json");
    assert_eq!(summary["steps"], 8);
    assert!(summary["peak_rss_mib"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(
        summary["best_eval_loss"].as_f64(),
        evals.iter().copied().reduce(f64::min)
    );

    // PEFT layout: only the targeted modules, A [r, in] and B [out, r].
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("adapter/adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    let values = adapter_values(&run.join("adapter"));
    assert_eq!(values.len(), 30 * 3 * 2);
    assert_eq!(
        values["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].len(),
        4 * 576
    );
    assert_eq!(
        values["base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"].len(),
        576 * 4
    );
    assert!(!values.contains_key("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"));
    assert!(
        values["base_model.model.model.layers.5.self_attn.v_proj.lora_B.weight"]
            .iter()
            .any(|v| *v != 0.0),
        "B was trained"
    );
    let samples = std::fs::read_to_string(run.join("samples.jsonl")).expect("samples");
    assert_eq!(samples.lines().count(), 2, "{samples}");

    // metrics.parquet: the same rows as metrics.jsonl, with typed columns.
    let file = std::fs::File::open(run.join("metrics.parquet")).expect("parquet");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("valid parquet")
        .build()
        .expect("reader");
    let batches: Vec<_> = reader.map(|b| b.expect("batch")).collect();
    assert_eq!(
        batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        rows.len()
    );
    let schema = batches[0].schema();
    for col in [
        "step",
        "loss",
        "eval_loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
    ] {
        assert!(schema.field_with_name(col).is_ok(), "column {col}");
    }
    let html = std::fs::read_to_string(run.join("report.html")).expect("report");
    assert!(
        html.contains("<svg") && html.contains("eval loss") && html.contains("Capital of"),
        "report lacks curves or samples"
    );
    assert!(!html.contains("<script"), "self-contained, no scripts");

    // Export for llama.cpp: 30 layers × 3 modules × (lora_a, lora_b), alpha from the config.
    let gguf = dir.path().join("adapter.gguf");
    let out = graft_train(&[
        "export",
        run.to_str().expect("utf-8 path"),
        "--gguf",
        gguf.to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let f = graft_core::formats::gguf::GgufFile::open(&gguf).expect("a valid GGUF file");
    assert_eq!(f.str("general.type").expect("type"), "adapter");
    assert_eq!(
        f.get("adapter.lora.alpha"),
        Some(&graft_core::formats::gguf::GgufValue::F32(8.0))
    );
    assert_eq!(
        f.tensor_info("blk.29.ffn_down.weight.lora_b")
            .expect("down B")
            .torch_shape(),
        vec![576, 4]
    );
}

#[test]
fn a_sweep_runs_every_combination_with_its_own_resolved_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), "max_steps = 1\neval_samples = 0");
    let text = std::fs::read_to_string(&path).expect("config") + "\n[sweep]\n\"lora.r\" = [2, 3]\n";
    std::fs::write(&path, text).expect("write");
    let out = graft_train(&[path.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut runs: Vec<_> = std::fs::read_dir(dir.path().join("runs"))
        .expect("runs")
        .map(|e| e.expect("entry").path())
        .collect();
    runs.sort();
    assert_eq!(runs.len(), 2);
    for (run, r) in runs.iter().zip([2, 3]) {
        let resolved = std::fs::read_to_string(run.join("config.toml")).expect("resolved config");
        assert!(resolved.contains(&format!("r = {r}\n")), "{resolved}");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("adapter/adapter_config.json")).expect("config"),
        )
        .expect("json");
        assert_eq!(cfg["r"], r);
    }
}
