//! `graft-train bench`: a short real run that prints its figures and records its workload
//! (steps as token ids and loss masks, initial adapter) for other trainers to replay.

use crate::{bench_losses, bench_run, gguf_path};

#[test]
fn bench_prints_figures_and_records_the_workload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sets = [
        format!("model.base={:?}", gguf_path().display().to_string()),
        "data.max_seq_len=24".into(),
        "train.micro_batch_size=2".into(),
        "lora.r=2".into(),
        format!("output.runs_dir={:?}", dir.path().display().to_string()),
    ];
    let stdout = bench_run(3, &sets);
    let num = |prefix: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {stdout}"));
        line[prefix.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number after {prefix:?}: {line}"))
    };
    assert!(num("throughput: ") > 0.0, "{stdout}");
    assert!(num("peak RSS: ") > 100.0, "{stdout}");
    assert!(
        stdout.contains("forward") && stdout.contains("optimizer"),
        "{stdout}"
    );
    assert!(stdout.contains("\"r\":2"), "settings are printed: {stdout}");
    let losses = bench_losses(&stdout);
    assert_eq!(losses.len(), 3);
    let run = stdout
        .lines()
        .find_map(|l| l.strip_prefix("run: "))
        .expect("run directory");
    let run = std::path::Path::new(run);

    // The recorded workload is what the run trained on: 3 steps of one micro-batch of two
    // 24-token examples, and the first step's loss is the loss the metrics logged.
    let inputs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("bench-inputs.json")).expect("bench-inputs.json"),
    )
    .expect("JSON");
    let steps = inputs["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 3);
    for step in steps {
        let mbs = step.as_array().expect("micro-batches");
        assert_eq!(mbs.len(), 1);
        for ex in mbs[0].as_array().expect("examples") {
            assert_eq!(ex["ids"].as_array().map(Vec::len), Some(24));
            assert_eq!(ex["trained"].as_array().map(Vec::len), Some(24));
        }
        assert_eq!(mbs[0].as_array().map(Vec::len), Some(2));
    }
    assert_eq!(inputs["settings"]["micro_batch_size"], 2);
    assert!(run.join("init-adapter/adapter_config.json").is_file());
    assert!(run.join("init-adapter/adapter_model.safetensors").is_file());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let first: serde_json::Value =
        serde_json::from_str(metrics.lines().next().expect("a step")).expect("JSON");
    assert!((first["loss"].as_f64().expect("loss") - losses[0]).abs() < 1e-4);
    for k in ["forward_secs", "backward_secs", "optimizer_secs"] {
        assert!(first[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {first}");
    }
}
