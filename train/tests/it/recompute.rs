//! `train.gradient_checkpointing`: recomputing each layer in the backward trains with the
//! losses of the plain run, and with LoRA dropout its masks are drawn from the run's seed, so a
//! run repeats exactly.

use crate::compute_dtype::relative_gap;
use crate::{bench_losses, bench_run, tiny_bench_sets};

/// The losses of a 4-step bench run of the tiny Llama (its GGUF blocks) with `extra` settings.
fn losses(extra: &[&str]) -> Vec<f64> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sets = tiny_bench_sets("cpu", dir.path());
    sets.extend(extra.iter().map(|s| s.to_string()));
    bench_losses(&bench_run(4, &sets))
}

#[test]
fn recomputed_layers_train_with_the_plain_losses() {
    let plain = losses(&[]);
    let recomputed = losses(&["train.gradient_checkpointing=true"]);
    assert!(plain[3] < plain[0], "the adapter learns: {plain:?}");
    let gap = relative_gap(&plain, &recomputed);
    assert!(gap <= 1e-5, "{recomputed:?} vs plain {plain:?}");
}

#[test]
fn recomputed_dropout_repeats_and_learns() {
    let sets = ["train.gradient_checkpointing=true", "lora.dropout=0.2"];
    let first = losses(&sets);
    let again = losses(&sets);
    assert_eq!(first, again, "dropout masks come from the run's seed");
    assert!(first[3] < first[0], "the adapter learns: {first:?}");
    let without = losses(&["train.gradient_checkpointing=true"]);
    assert_ne!(first, without, "dropout is applied");
}
