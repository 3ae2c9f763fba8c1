//! Model invariants on the tiny random model: HF and GGUF loaders agree, KV-cache decode equals
//! a full forward, ragged batches equal sequences alone, LoRA with B = 0 is the base model,
//! mixed-adapter batches equal per-sequence results, NF4 on load stays close and small.

use burn::prelude::*;
use burn::tensor::TensorData;
use graft_core::adapters::lora::{Adapter, LoraWeights, TargetModule};
use graft_core::load::{load_gguf, load_hf_dir, LoadOptions};
use graft_core::model::{Logits, Model, SeqCache, SeqInput};
use graft_core::quant::QuantKind;

use crate::tiny::*;
use crate::{all_logits, max_abs_diff, values, B};

fn models() -> (tempfile::TempDir, Model<B>, Model<B>) {
    let dir = tempfile::tempdir().unwrap();
    let w = TinyWeights::random(1);
    w.write_hf_dir(&dir.path().join("hf"), false);
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &tiny_metadata(), &f32_entries(&w.gguf_tensors()));
    let dev = Default::default();
    let hf = load_hf_dir::<B>(&dir.path().join("hf"), LoadOptions::default(), &dev)
        .unwrap()
        .model;
    let gg = load_gguf::<B>(&gguf, LoadOptions::default(), &dev)
        .unwrap()
        .model;
    (dir, hf, gg)
}

const PROMPT: [u32; 9] = [5, 17, 42, 3, 88, 61, 9, 9, 30];

#[test]
fn gguf_with_permuted_qk_equals_hf_directory() {
    let (_d, hf, gg) = models();
    let d = max_abs_diff(
        &all_logits(&hf, &PROMPT, None),
        &all_logits(&gg, &PROMPT, None),
    );
    assert!(d < 1e-5, "max |Δ| = {d}");
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    let (_d, m, _) = models();
    let full = all_logits(&m, &PROMPT, None);
    let mut cache = SeqCache::new();
    let mut stepped = values(m.forward(
        &mut [SeqInput {
            tokens: &PROMPT[..4],
            cache: Some(&mut cache),
            adapter: None,
        }],
        Logits::All,
    ));
    for t in &PROMPT[4..] {
        stepped.extend(values(m.forward(
            &mut [SeqInput {
                tokens: &[*t],
                cache: Some(&mut cache),
                adapter: None,
            }],
            Logits::All,
        )));
    }
    assert_eq!(cache.len(), PROMPT.len());
    let d = max_abs_diff(&full, &stepped);
    assert!(d < 1e-4, "max |Δ| = {d}");
}

#[test]
fn ragged_batch_equals_each_sequence_alone() {
    let (_d, m, _) = models();
    let (a, b) = (&PROMPT[..], &[7u32, 8, 9][..]);
    // b continues from a cached prefix, a starts fresh: different positions and lengths.
    let mut cache_b = SeqCache::new();
    m.forward(
        &mut [SeqInput {
            tokens: &[1, 2],
            cache: Some(&mut cache_b),
            adapter: None,
        }],
        Logits::Last,
    );
    let mut cache_b_alone = cache_b.clone();
    let batch = values(m.forward(
        &mut [
            SeqInput {
                tokens: a,
                cache: None,
                adapter: None,
            },
            SeqInput {
                tokens: b,
                cache: Some(&mut cache_b),
                adapter: None,
            },
        ],
        Logits::Last,
    ));
    let alone_a = values(m.forward(
        &mut [SeqInput {
            tokens: a,
            cache: None,
            adapter: None,
        }],
        Logits::Last,
    ));
    let alone_b = values(m.forward(
        &mut [SeqInput {
            tokens: b,
            cache: Some(&mut cache_b_alone),
            adapter: None,
        }],
        Logits::Last,
    ));
    assert!(max_abs_diff(&batch[..VOCAB], &alone_a) < 1e-4);
    assert!(max_abs_diff(&batch[VOCAB..], &alone_b) < 1e-4);
}

fn adapter(m: &Model<B>, seed: u64, zero_b: bool) -> Adapter<B> {
    let dev = m.device().clone();
    let mut a = Adapter::empty(LAYERS);
    let r = 4;
    for (li, layer) in m.layers.iter().enumerate() {
        for t in [TargetModule::Q, TargetModule::V, TargetModule::Down] {
            let p = layer.proj(t).unwrap();
            let rnd = |n: usize, s: u64| -> Vec<f32> {
                (0..n)
                    .map(|i| {
                        (((i as u64 * 2654435761 + s * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.2
                    })
                    .collect()
            };
            let av = rnd(r * p.in_features, seed + li as u64);
            let bv = if zero_b {
                vec![0.0; p.out_features * r]
            } else {
                rnd(p.out_features * r, seed + 11)
            };
            a.layers[li][t.index()] = Some(LoraWeights {
                a: Tensor::from_data(TensorData::new(av, [r, p.in_features]), &dev),
                b: Tensor::from_data(TensorData::new(bv, [p.out_features, r]), &dev),
                scale: 2.0,
                dropout: 0.0,
                experts: 1,
            });
        }
    }
    a
}

#[test]
fn lora_with_zero_b_is_the_base_model_and_nonzero_b_changes_it() {
    let (_d, m, _) = models();
    let base = all_logits(&m, &PROMPT, None);
    assert_eq!(
        max_abs_diff(&base, &all_logits(&m, &PROMPT, Some(&adapter(&m, 3, true)))),
        0.0
    );
    assert!(
        max_abs_diff(
            &base,
            &all_logits(&m, &PROMPT, Some(&adapter(&m, 3, false)))
        ) > 1e-3
    );
}

#[test]
fn mixed_adapter_batch_equals_each_request_alone() {
    let (_d, m, _) = models();
    let (a1, a2) = (adapter(&m, 1, false), adapter(&m, 2, false));
    let seqs: [(&[u32], Option<&Adapter<B>>); 4] = [
        (&PROMPT, Some(&a1)),
        (&[4, 5], None),
        (&[6, 7, 8], Some(&a2)),
        (&[9], Some(&a1)),
    ];
    let mut inputs: Vec<SeqInput<B>> = seqs
        .iter()
        .map(|(t, a)| SeqInput {
            tokens: t,
            cache: None,
            adapter: *a,
        })
        .collect();
    let batch = values(m.forward(&mut inputs, Logits::Last));
    for (i, (t, a)) in seqs.iter().enumerate() {
        let alone = values(m.forward(
            &mut [SeqInput {
                tokens: t,
                cache: None,
                adapter: *a,
            }],
            Logits::Last,
        ));
        let d = max_abs_diff(&batch[i * VOCAB..(i + 1) * VOCAB], &alone);
        assert!(d < 1e-4, "sequence {i}: max |Δ| = {d}");
    }
}

#[test]
fn nf4_on_load_is_close_and_smaller() {
    let dir = tempfile::tempdir().unwrap();
    TinyWeights::random(1).write_hf_dir(dir.path(), true);
    let dev = Default::default();
    let dense = load_hf_dir::<B>(dir.path(), LoadOptions::default(), &dev)
        .unwrap()
        .model;
    let nf4 = load_hf_dir::<B>(
        dir.path(),
        LoadOptions {
            quantize: QuantKind::Nf4,
            ..Default::default()
        },
        &dev,
    )
    .unwrap()
    .model;
    let proj_bytes = |m: &Model<B>| {
        m.layers
            .iter()
            .flat_map(|l| l.projs.iter().flatten())
            .map(|p| p.n_bytes())
            .sum::<usize>()
    };
    let (db, qb) = (proj_bytes(&dense), proj_bytes(&nf4));
    // 4 bits + one f32 absmax per 64 values (kept expanded) + the packed scales: ≈ 0.16 of f32.
    assert!(
        (qb as f64) < 0.2 * db as f64,
        "nf4 {qb} bytes vs dense {db}"
    );
    let (a, b) = (
        all_logits(&dense, &PROMPT, None),
        all_logits(&nf4, &PROMPT, None),
    );
    let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_abs_diff(&a, &b);
    assert!(
        d > 0.0 && d < 0.25 * spread,
        "max |Δ| {d} vs logit range {spread}"
    );
}
