//! Training on the GPU code path: `graft-train bench` with `model.device = "wgpu"` (Mesa's
//! software Vulkan device in CI; `cuda` in a build with it) trains QLoRA on the tiny Llama's GGUF (packed base, r=4 on every
//! linear projection) with the losses of the same run on the CPU, step by step.

use crate::{bench_losses, bench_run, repo_root};

/// The GPU backend the tests were built with (`cuda` where both are).
const GPU: &str = if cfg!(feature = "cuda") {
    "cuda"
} else {
    "wgpu"
};

/// The loss of each step of a 4-step bench run on `device`.
fn losses(device: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = repo_root().join("core/tests/fixtures/families/llama/model.gguf");
    let sets = [
        format!("model.base={:?}", base.display().to_string()),
        format!("model.device={device:?}"),
        "data.max_seq_len=48".into(),
        "train.micro_batch_size=2".into(),
        "train.learning_rate=1e-2".into(),
        "lora.r=4".into(),
        format!("output.runs_dir={:?}", dir.path().display().to_string()),
    ];
    bench_losses(&bench_run(4, &sets))
}

#[test]
fn qlora_on_the_gpu_trains_with_the_cpu_losses() {
    let cpu = losses("cpu");
    let gpu = losses(GPU);
    assert_eq!(cpu.len(), 4);
    assert_eq!(gpu.len(), 4);
    // The adapter learns (B starts at zero, so step 1 is the base's loss on both).
    assert!(cpu[3] < cpu[0], "{cpu:?}");
    for (c, g) in cpu.iter().zip(&gpu) {
        assert!(
            (c - g).abs() <= 1e-3 * c.abs(),
            "cpu {cpu:?} vs {GPU} {gpu:?}"
        );
    }
}
