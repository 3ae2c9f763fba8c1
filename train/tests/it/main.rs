//! graft-train integration tests: the binary spawned as a user runs it, on the real SmolLM2
//! GGUF (made by `scripts/fetch-model.sh`; tests fail, rather than skip, when it is missing).

mod bench;
mod compute_dtype;
mod configs;
mod data;
mod dist;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod gpu;
mod library;
mod merge;
mod ollama;
mod preference;
mod recompute;
mod report;
mod resident;
mod resume;
mod task_eval;
mod tracking;
mod training;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn gguf_path() -> PathBuf {
    let p = graft_core::cache::default_model_path();
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("train/ is in the workspace")
        .to_path_buf()
}

pub fn graft_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_graft-train"))
        .args(args)
        .output()
        .expect("spawn graft-train")
}

/// `graft-train bench configs/bench.toml --steps <steps>` with each of `sets` as a `--set`;
/// its stdout, once it has succeeded.
pub fn bench_run(steps: u32, sets: &[String]) -> String {
    let config = repo_root().join("configs/bench.toml");
    let steps = steps.to_string();
    let mut args = vec!["bench", config.to_str().expect("utf-8"), "--steps", &steps];
    for s in sets {
        args.extend(["--set", s.as_str()]);
    }
    let out = graft_train(&args);
    assert!(out.status.success(), "{sets:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `loss by step:` figures a bench run printed.
pub fn bench_losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("loss by step: "))
        .unwrap_or_else(|| panic!("no losses in {stdout}"))
        .split_whitespace()
        .map(|v| v.parse().expect("a loss"))
        .collect()
}

/// The adapter-state crossings a bench run printed: tensors uploaded, tensors read back,
/// micro-batches, tensors in the adapter.
pub fn bench_crossings(stdout: &str) -> [usize; 4] {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("adapter state host<->device: "))
        .unwrap_or_else(|| panic!("no crossings in {stdout}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().expect("a count"))
        .collect();
    numbers
        .try_into()
        .unwrap_or_else(|n| panic!("four counts in {line:?}: {n:?}"))
}

/// `configs/bench.toml`'s settings moved onto the tiny Llama's GGUF (a packed base, r=4 on
/// every linear projection, micro-batch 2 × 48 tokens) on `device`, running in `runs`.
pub fn tiny_bench_sets(device: &str, runs: &Path) -> Vec<String> {
    let base = repo_root().join("core/tests/fixtures/families/llama/model.gguf");
    vec![
        format!("model.base={:?}", base.display().to_string()),
        format!("model.device={device:?}"),
        "data.max_seq_len=48".into(),
        "train.micro_batch_size=2".into(),
        "train.learning_rate=1e-2".into(),
        "lora.r=4".into(),
        format!("output.runs_dir={:?}", runs.display().to_string()),
    ]
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small, fast training config in `dir` on the bundled capitals data; `extra` is appended
/// to the `[train]` section.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let data = repo_root().join("configs/data/capitals.jsonl");
    let text = format!(
        r#"[model]
base = "{gguf}"

[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "down_proj"]

[data]
train = "{data}"
max_seq_len = 128
eval_fraction = 0.1

[train]
micro_batch_size = 2
lr_scheduler = "linear"
{defaults}{extra}

[output]
runs_dir = "runs"
"#,
        gguf = gguf_path().display(),
        data = data.display(),
        defaults = [
            "learning_rate = 1e-3",
            "eval_samples = 1",
            "sample_max_tokens = 8"
        ]
        .iter()
        .filter(|d| !extra.contains(d.split(' ').next().expect("key = value")))
        .map(|d| format!("{d}\n"))
        .collect::<String>(),
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The only run directory under `dir/runs`.
pub fn single_run(dir: &Path) -> PathBuf {
    let runs: Vec<PathBuf> = std::fs::read_dir(dir.join("runs"))
        .expect("runs dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0].clone()
}

/// All f32 values of a PEFT adapter, by tensor name.
pub fn adapter_values(dir: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).expect("adapter weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        })
        .collect()
}
