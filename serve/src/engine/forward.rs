//! One step's forward pass, guarded: a panic in the model or a failed read-back of the logits
//! fails the batch, never the engine. The batch's caches are put back as they were and each
//! request is run alone, so only the request that causes the fault loses its step.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use graft_core::backend::GraftBackend;
use graft_core::model::{Logits, Model, SeqCache, SeqInput};

use super::fault::{panic_message, Fault, FaultHook};
use super::Active;
use crate::metrics::Metrics;

/// The logits of one step.
pub(super) enum Outputs {
    /// One forward for all requests: their rows in order (see [`rows_of`]).
    Batch(Vec<f32>),
    /// The batched forward failed; each request was run alone: its rows or why it failed.
    Each(Vec<Result<Vec<f32>, String>>),
}

/// Logits rows a request gets: every prompt row when its prompt is scored, else the last.
pub(super) fn rows_of<B: GraftBackend>(a: &Active<B>, scoring: bool) -> usize {
    if scoring {
        a.next.len()
    } else {
        1
    }
}

/// Runs the model over `active` (`scoring[i]`: request i gets every prompt row).
pub(super) fn forward<B: GraftBackend>(
    model: &Model<B>,
    active: &mut [Active<B>],
    scoring: &[bool],
    faults: Option<&FaultHook>,
    metrics: &Metrics,
) -> Outputs {
    let saved: Vec<SeqCache<B>> = active.iter().map(|a| a.cache.clone()).collect();
    let cause = match guarded(model, active, scoring, faults) {
        Ok(rows) => return Outputs::Batch(rows),
        Err(cause) => cause,
    };
    metrics.step_faults.fetch_add(1, Ordering::Relaxed);
    let ids: Vec<&str> = active.iter().map(|a| a.req.id.as_str()).collect();
    tracing::error!(
        event = "step_failed",
        requests = ?ids,
        cause = %cause,
        "a batched step failed ({cause}); running each of its {} requests alone",
        ids.len()
    );
    for (a, cache) in active.iter_mut().zip(saved) {
        a.cache = cache;
    }
    if active.len() == 1 {
        return Outputs::Each(vec![Err(cause)]);
    }
    let each = active
        .chunks_mut(1)
        .zip(scoring)
        .map(|(one, &scored)| {
            let saved = one[0].cache.clone();
            let rows = guarded(model, one, &[scored], faults);
            if rows.is_err() {
                one[0].cache = saved;
            }
            rows
        })
        .collect();
    Outputs::Each(each)
}

/// One forward over `active` and the logits read back, or what went wrong.
fn guarded<B: GraftBackend>(
    model: &Model<B>,
    active: &mut [Active<B>],
    scoring: &[bool],
    faults: Option<&FaultHook>,
) -> Result<Vec<f32>, String> {
    let injected: Vec<Option<Fault>> = active
        .iter()
        .map(|a| faults.and_then(|hook| hook(a.req.user.as_deref())))
        .collect();
    let which = if scoring.contains(&true) {
        Logits::Mixed(scoring.to_vec())
    } else {
        Logits::Last
    };
    let run = catch_unwind(AssertUnwindSafe(|| {
        let logits = run_model(model, active, which, injected.contains(&Some(Fault::Panic)));
        if injected.contains(&Some(Fault::ReadBack)) {
            return Err("reading the logits back failed (injected fault)".to_string());
        }
        logits
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| format!("reading the logits back failed: {e:?}"))
    }));
    let mut rows = match run {
        Ok(rows) => rows?,
        Err(payload) => return Err(format!("panic: {}", panic_message(payload.as_ref()))),
    };
    let vocab = model.config.vocab_size;
    let mut at = 0;
    for ((a, &scored), fault) in active.iter().zip(scoring).zip(&injected) {
        let n = rows_of(a, scored) * vocab;
        if *fault == Some(Fault::Nan) {
            rows[at..at + n].fill(f32::NAN);
        }
        at += n;
    }
    if rows.len() != at {
        return Err(format!(
            "the model returned {} logits for {at} expected",
            rows.len()
        ));
    }
    Ok(rows)
}

/// The forward call itself. Structured outputs' next masks are computed on another thread
/// while it runs (they depend only on the tokens so far).
fn run_model<B: GraftBackend>(
    model: &Model<B>,
    active: &mut [Active<B>],
    which: Logits,
    inject_panic: bool,
) -> graft_core::burn::tensor::Tensor<B, 2> {
    std::thread::scope(|scope| {
        let mut constrained = Vec::new();
        let mut seqs: Vec<SeqInput<'_, B>> = Vec::with_capacity(active.len());
        for a in active.iter_mut() {
            let Active {
                req,
                cache,
                decoder,
                next,
                ..
            } = a;
            if decoder.is_constrained() {
                constrained.push(decoder);
            }
            seqs.push(SeqInput {
                tokens: next,
                cache: Some(cache),
                adapter: req.adapter.as_ref().map(|e| &e.adapter),
            });
        }
        let masks = (!constrained.is_empty())
            .then(|| scope.spawn(move || constrained.into_iter().for_each(|d| d.prepare())));
        let logits = model.forward(&mut seqs, which);
        // After the caches took this step's keys and values: recovery must put them back.
        assert!(!inject_panic, "injected fault in the forward pass");
        if let Some(m) = masks {
            // A panic there would only lose precomputed masks; the decoder computes them again.
            let _ = m.join();
        }
        logits
    })
}
