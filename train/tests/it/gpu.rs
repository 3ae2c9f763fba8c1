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

/// f16 base products on the device (bf16: not a WGSL type; CUDA runs it in
/// scripts/gpu-check.sh): the CPU's f32 losses within f16's rounding, through the device's
/// half-precision products and their backward.
#[test]
fn half_precision_products_on_the_gpu_train_with_the_f32_losses() {
    use crate::compute_dtype::{nf4_losses, relative_gap};
    let (cpu, gpu) = (nf4_losses("cpu", "f32"), nf4_losses(GPU, "f16"));
    let gap = relative_gap(&cpu, &gpu);
    eprintln!("f16 on {GPU}: losses {gpu:?} vs f32 on the CPU {cpu:?}: gap {gap:.2e}");
    assert!(gap <= 5e-3, "{gpu:?} vs {cpu:?}");
}
