//! `train.compute_dtype`: half-precision base products train the f32 run's losses within their
//! rounding (the adapter's parameters and AdamW's moments stay f32), and a type graft does
//! not have is refused with the key and the value.

use crate::{bench_losses, bench_run, graft_train, repo_root, stderr, tiny_bench_sets};

/// The losses of a 4-step bench run on `device` of the tiny Llama quantized to NF4 on load,
/// its base products in `dtype`.
pub fn nf4_losses(device: &str, dtype: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sets = tiny_bench_sets(device, dir.path());
    sets.push("model.quantization=\"nf4\"".into());
    sets.push(format!("train.compute_dtype={dtype:?}"));
    bench_losses(&bench_run(4, &sets))
}

/// The largest |Δ| between two loss curves relative to the first's values.
pub fn relative_gap(want: &[f64], got: &[f64]) -> f64 {
    assert_eq!(want.len(), got.len());
    want.iter()
        .zip(got)
        .map(|(w, g)| (w - g).abs() / w.abs())
        .fold(0.0, f64::max)
}

#[test]
fn half_precision_products_train_with_the_f32_losses() {
    let f32s = nf4_losses("cpu", "f32");
    assert!(f32s[3] < f32s[0], "the adapter learns: {f32s:?}");
    for (dtype, bound) in [("bf16", 2e-2), ("f16", 5e-3)] {
        let half = nf4_losses("cpu", dtype);
        let gap = relative_gap(&f32s, &half);
        eprintln!("{dtype}: losses {half:?} vs f32 {f32s:?}: largest relative gap {gap:.2e}");
        assert!(gap > 0.0, "{dtype}: the same losses as f32, bit for bit");
        assert!(gap <= bound, "{dtype}: {half:?} vs f32 {f32s:?}");
    }
}

#[test]
fn an_unknown_compute_dtype_is_refused_with_its_key() {
    let config = repo_root().join("configs/bench.toml");
    let out = graft_train(&[
        "bench",
        config.to_str().expect("utf-8"),
        "--steps",
        "1",
        "--set",
        "train.compute_dtype=\"fp8\"",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("compute_dtype") && err.contains("fp8"),
        "{err}"
    );
}
