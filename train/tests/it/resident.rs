//! The training state stays on the device: the adapter's values, gradients and AdamW moments
//! cross between host and device a fixed number of times per run (the initial upload, the
//! checkpoint, the written adapters), however many micro-batches it trains.

use crate::{bench_crossings, bench_run, tiny_bench_sets};

/// The crossings of a bench run of `steps` steps of `grad_accum` micro-batches on the CPU.
fn crossings(steps: u32, grad_accum: usize) -> [usize; 4] {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut sets = tiny_bench_sets("cpu", dir.path());
    sets.push(format!("train.gradient_accumulation_steps={grad_accum}"));
    bench_crossings(&bench_run(steps, &sets))
}

#[test]
fn adapter_state_crosses_to_the_host_only_for_checkpoints_and_written_adapters() {
    let [up, down, micro, tensors] = crossings(2, 1);
    let [up_many, down_many, micro_many, tensors_many] = crossings(4, 3);
    assert_eq!((micro, micro_many), (2, 12));
    assert_eq!(tensors, tensors_many);
    // 7 projections × 2 layers, A and B each
    assert_eq!(tensors, 28);
    assert_eq!(
        (up_many, down_many),
        (up, down),
        "6× the micro-batches, the same crossings"
    );
    // Up: PEFT's initial values, made on the host — in a bench run twice, once for the
    // initial adapter it writes for PEFT to start from, once to train.
    assert_eq!(up, 2 * tensors);
    // Read back: that initial adapter, the last step's
    // checkpoint (values, both moments, its adapter directory) and the run's adapter.
    assert_eq!(down, 6 * tensors);
}
