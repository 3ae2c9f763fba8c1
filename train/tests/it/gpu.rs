//! Training on the GPU code path: `graft-train bench` with `model.device = "wgpu"` (Mesa's
//! software Vulkan device in CI; `cuda` in a build with it) trains QLoRA on the tiny Llama's GGUF (packed base, r=4 on every
//! linear projection) with the losses of the same run on the CPU, step by step.

use crate::{bench_losses, bench_run, tiny_bench_sets};

/// The GPU backend the tests were built with (`cuda` where both are).
const GPU: &str = if cfg!(feature = "cuda") {
    "cuda"
} else {
    "wgpu"
};

/// What a 4-step bench run on `device` printed.
fn bench(device: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    bench_run(4, &tiny_bench_sets(device, dir.path()))
}

#[test]
fn qlora_on_the_gpu_trains_with_the_cpu_losses() {
    let (cpu, gpu) = (bench_losses(&bench("cpu")), bench_losses(&bench(GPU)));
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
