//! The GPU code path, run: burn-cuda when the tests are built with `cuda`
//! (`scripts/gpu-check.sh`), else burn-wgpu on whatever adapter the machine has — in CI, Mesa's
//! software Vulkan device (lavapipe); both run the same CubeCL kernels. The CPU's family checks
//! on the GPU: every family's tiny model, from safetensors (dense f32) and from GGUF (packed
//! blocks), gives transformers' logits, and cached decoding and a ragged batch give the logits
//! of one full forward; so does the real SmolLM2 (ignored by default: minutes on a software
//! device).

use graft_core::load::{load_gguf, load_hf_dir, LoadOptions};
use graft_core::quant::QuantKind;

use crate::families::{
    alone, case, check_cached_and_ragged, check_every_family, load_family_on, logits_of,
};
use crate::max_abs_diff;
use crate::reference::{fixture, read_fixture};
use crate::smollm2::{reference_diffs, reference_of};

#[cfg(feature = "cuda")]
type Gpu = graft_core::device::Cuda;
#[cfg(not(feature = "cuda"))]
type Gpu = graft_core::device::Wgpu;

#[cfg(feature = "cuda")]
fn device() -> graft_core::device::CudaDevice {
    graft_core::device::cuda_device(0)
}
#[cfg(not(feature = "cuda"))]
fn device() -> graft_core::device::WgpuDevice {
    graft_core::device::wgpu_device(None)
}

/// Looser than the CPU's 1e-4: the GPU's matrix products sum in another order (tiles).
const TOLERANCE: f32 = 1e-3;

#[test]
fn every_family_matches_transformers_on_the_gpu() {
    let report = check_every_family::<Gpu>(&device(), TOLERANCE);
    eprintln!("GPU: max |Δ| vs transformers: {report}");
}

#[test]
fn cached_decoding_and_ragged_batches_on_the_gpu_equal_one_full_forward() {
    check_cached_and_ragged::<Gpu>(
        &device(),
        &["llama", "gemma3", "qwen3_moe"],
        true,
        TOLERANCE,
    );
}

/// Two threads using one device at once (a server's engine while an adapter uploads; tests in
/// parallel) each get their own model's logits: cubecl's default of one stream per thread gave
/// values off by up to 5 here, hence `device::configure_cubecl`.
#[test]
fn two_threads_at_once_on_one_device_each_get_their_own_logits() {
    std::thread::scope(|s| {
        for family in ["llama", "gemma2"] {
            s.spawn(move || {
                let c = case(family);
                let m = load_family_on::<Gpu>(family, false, &device()).model;
                for round in 0..3 {
                    for (p, want) in c.prompts.iter().zip(&c.logits) {
                        let d = max_abs_diff(&logits_of(&m, &mut [alone(p, None)]), want);
                        assert!(d <= TOLERANCE, "{family}, round {round}: differs by {d}");
                    }
                }
            });
        }
    });
}

/// SmolLM2-135M's GGUF on the GPU: transformers' logits (last position's whole vocabulary, probe
/// ids at every position) within the CPU test's 1e-3.
#[test]
#[ignore = "minutes on a software Vulkan device: scripts/gpu-check.sh runs it on the GPU"]
fn smollm2_matches_transformers_on_the_gpu() {
    let path = graft_core::cache::default_model_path();
    let m = load_gguf::<Gpu>(&path, LoadOptions::default(), &device())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .model;
    let r = reference_of("smollm2");
    let t = read_fixture("smollm2_reference.safetensors");
    let vocab = m.config.vocab_size;
    for (i, p) in r.prompts.iter().enumerate() {
        let logits = logits_of(&m, &mut [alone(&p.input_ids, None)]);
        let (d_last, d_probe) = reference_diffs(&logits, vocab, &p.vocab_probe_ids, &t, i);
        eprintln!(
            "smollm2 on the GPU, prompt {i}: max |Δ| {d_last:.2e} (last), {d_probe:.2e} (probes)"
        );
        assert!(
            d_last <= 1e-3 && d_probe <= 1e-3,
            "prompt {i}: {d_last} / {d_probe}"
        );
    }
}

/// Loading puts the packed base on the device: the first product or training step does not
/// pay for the upload (nor meet a full device there). Placing again finds every weight there.
#[test]
fn loading_uploads_the_packed_base_to_the_device() {
    let nf4 = LoadOptions {
        quantize: QuantKind::Nf4,
        ..LoadOptions::default()
    };
    for family in ["llama", "qwen3_moe"] {
        let dir = fixture(&format!("families/{family}"));
        let mut m = load_hf_dir::<Gpu>(&dir, nf4, &device())
            .unwrap_or_else(|e| panic!("{family}: {e}"))
            .model;
        let again = m.place_weights().expect("placed");
        assert!(again.packed >= 7, "{family}: {again:?}");
        assert_eq!(again.uploaded, 0, "{family}: {again:?}");
    }
    // On the CPU there is nothing to upload.
    let dir = fixture("families/llama");
    let mut cpu = load_hf_dir::<graft_core::burn::backend::Flex>(&dir, nf4, &Default::default())
        .expect("llama")
        .model;
    let placed = cpu.place_weights().expect("placed");
    assert!(placed.packed >= 7 && placed.uploaded == 0, "{placed:?}");
}

/// f16 base products on the device (the packed base dequantized to f16 for the device's
/// GEMM; 3 rows: the direct kernel reading f16 activations): the CPU's f32 logits within f16's
/// rounding, as the CPU's own f16 run is. (bf16: not a type WGSL has; CUDA runs it in
/// scripts/gpu-check.sh.)
#[test]
fn half_precision_products_on_the_gpu_move_the_logits_by_their_rounding() {
    use crate::compute_dtype::{bound, largest, logits_in};
    use graft_core::model::ComputeDtype;
    for family in ["llama", "qwen3_moe"] {
        for len in [usize::MAX, 3] {
            let cpu = Default::default();
            let want = logits_in::<graft_core::burn::backend::Flex>(
                family,
                QuantKind::Nf4,
                ComputeDtype::F32,
                len,
                &cpu,
            );
            let got = logits_in::<Gpu>(family, QuantKind::Nf4, ComputeDtype::F16, len, &device());
            let d = max_abs_diff(&got, &want) / largest(&want);
            let rows = if len == usize::MAX {
                "the prompt's"
            } else {
                "3"
            };
            eprintln!("{family}, {rows} rows, in f16 on the GPU: max |Δ| / max |logit| = {d:.2e}");
            assert!(
                d > 0.0 && d <= bound(ComputeDtype::F16),
                "{family}, {len}: {d:.2e}"
            );
        }
    }
}

/// bf16 on a WGSL device (no such type there) is refused at load, naming the model and the
/// type, instead of failing in the first kernel.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_compute_dtype_the_device_lacks_is_a_load_error() {
    let dir = fixture("families/llama");
    let opts = LoadOptions {
        compute: graft_core::model::ComputeDtype::Bf16,
        ..LoadOptions::default()
    };
    let err = match load_hf_dir::<Gpu>(&dir, opts, &device()) {
        Ok(_) => panic!("bf16 loaded on a WGSL device"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("families/llama") && err.contains("no bf16 arithmetic"),
        "{err}"
    );
}
