//! Does a decode step of a Mixture-of-Experts model cost what its active parameters cost, or
//! what all its parameters cost? A tiny-but-wide random Qwen3-MoE (64 experts, top-2) against
//! a dense Qwen3 of the same active size (its MLP as wide as two experts), both written as GGUF
//! in the same block type and loaded as graft loads any GGUF (experts kept packed, each a view
//! of its layer's stacked tensor). Prints single-stream decode tokens/s of each, alternating
//! the models round by round, as medians with the range.
//!
//! ```text
//! cargo run --release -p graft-core --example moe_active -- [--rounds 5] [--tokens 64] [--type Q4_K]
//! ```
//!
//! If a step read every expert, the MoE would run about (total / active weight bytes) times
//! slower than the dense model; if it reads only the chosen experts, about as fast.

use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;

use burn::backend::Flex as B;
use graft_core::formats::gguf::GgufValue;
use graft_core::formats::gguf_write::{self, TensorSpec};
use graft_core::load::{load_gguf, LoadOptions};
use graft_core::model::{Logits, Model, SeqCache, SeqInput};
use graft_core::quant::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

const HIDDEN: usize = 512;
const LAYERS: usize = 8;
const HEADS: usize = 8;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 4096;
const EXPERTS: usize = 64;
const TOP_K: usize = 2;
const EXPERT_FF: usize = 256;

/// One model's GGUF: `moe` gives Qwen3-MoE layers, otherwise Qwen3 with an MLP of
/// `TOP_K · EXPERT_FF`.
fn write_model(path: &Path, moe: bool, ty: GgmlType) {
    let arch = if moe { "qwen3moe" } else { "qwen3" };
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |v: usize| GgufValue::U32(v as u32);
    let mut meta = vec![
        (
            "general.architecture".into(),
            GgufValue::String(arch.into()),
        ),
        (
            "general.name".into(),
            GgufValue::String(format!("wide-{arch}")),
        ),
        (key("context_length"), u32v(4096)),
        (key("embedding_length"), u32v(HIDDEN)),
        (key("block_count"), u32v(LAYERS)),
        (key("feed_forward_length"), u32v(TOP_K * EXPERT_FF)),
        (key("attention.head_count"), u32v(HEADS)),
        (key("attention.head_count_kv"), u32v(KV_HEADS)),
        (key("attention.key_length"), u32v(HEAD_DIM)),
        (key("attention.value_length"), u32v(HEAD_DIM)),
        (
            key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-6),
        ),
        (key("rope.freq_base"), GgufValue::F32(1e6)),
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(
                (0..VOCAB)
                    .map(|i| GgufValue::String(format!("t{i}")))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array((0..VOCAB).map(|_| GgufValue::I32(1)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), GgufValue::Array(Vec::new())),
        ("tokenizer.ggml.eos_token_id".into(), u32v(1)),
    ];
    if moe {
        meta.push((key("expert_count"), u32v(EXPERTS)));
        meta.push((key("expert_used_count"), u32v(TOP_K)));
        meta.push((key("expert_feed_forward_length"), u32v(EXPERT_FF)));
    }
    // (name, torch shape, quantized?)
    let mut tensors: Vec<(String, Vec<usize>, bool)> = vec![
        ("token_embd.weight".into(), vec![VOCAB, HIDDEN], true),
        ("output_norm.weight".into(), vec![HIDDEN], false),
        ("output.weight".into(), vec![VOCAB, HIDDEN], true),
    ];
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for l in 0..LAYERS {
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        tensors.extend([
            (t("attn_norm"), vec![HIDDEN], false),
            (t("attn_q"), vec![q, HIDDEN], true),
            (t("attn_k"), vec![kv, HIDDEN], true),
            (t("attn_v"), vec![kv, HIDDEN], true),
            (t("attn_output"), vec![HIDDEN, q], true),
            (t("attn_q_norm"), vec![HEAD_DIM], false),
            (t("attn_k_norm"), vec![HEAD_DIM], false),
            (t("ffn_norm"), vec![HIDDEN], false),
        ]);
        if moe {
            tensors.extend([
                (t("ffn_gate_inp"), vec![EXPERTS, HIDDEN], false),
                (t("ffn_gate_exps"), vec![EXPERTS, EXPERT_FF, HIDDEN], true),
                (t("ffn_up_exps"), vec![EXPERTS, EXPERT_FF, HIDDEN], true),
                (t("ffn_down_exps"), vec![EXPERTS, HIDDEN, EXPERT_FF], true),
            ]);
        } else {
            let ff = TOP_K * EXPERT_FF;
            tensors.extend([
                (t("ffn_gate"), vec![ff, HIDDEN], true),
                (t("ffn_up"), vec![ff, HIDDEN], true),
                (t("ffn_down"), vec![HIDDEN, ff], true),
            ]);
        }
    }
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, shape, quantized)| TensorSpec {
            name: name.clone(),
            shape: shape.clone(),
            ty: if *quantized { ty } else { GgmlType::F32 },
        })
        .collect();
    // Random values, each tensor from its own seed (norms 1), encoded in parallel.
    let data: Vec<Vec<u8>> = tensors
        .par_iter()
        .enumerate()
        .map(|(i, (name, shape, quantized))| {
            let n: usize = shape.iter().product();
            if name.contains("norm") {
                return (0..n).flat_map(|_| 1f32.to_le_bytes()).collect();
            }
            let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
            let bound = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            if *quantized {
                ty.quantize(&v).expect("an encodable block type")
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        })
        .collect();
    gguf_write::write_with::<std::io::Error>(path, &meta, &specs, |i| {
        Ok(Cow::Borrowed(&data[i][..]))
    })
    .expect("GGUF written");
}

/// Decode tokens/s of one stream: a 4-token prompt, then `tokens` single-token steps.
fn decode_rate(m: &Model<B>, tokens: usize, seed: u64) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut token = || rng.random_range(2..VOCAB as u32);
    let mut cache = SeqCache::new();
    let prompt: Vec<u32> = (0..4).map(|_| token()).collect();
    let step = |ids: &[u32], cache: &mut SeqCache<B>| {
        let logits = m.forward(
            &mut [SeqInput {
                tokens: ids,
                cache: Some(cache),
                adapter: None,
            }],
            Logits::Last,
        );
        // Reading the logits back ends the step.
        logits
            .into_data()
            .to_vec::<f32>()
            .expect("f32 logits")
            .len()
    };
    step(&prompt, &mut cache);
    let t = Instant::now();
    for _ in 0..tokens {
        step(&[token()], &mut cache);
    }
    tokens as f64 / t.elapsed().as_secs_f64()
}

fn median_and_range(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.1} tok/s ({:.1}–{:.1})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    )
}

fn main() {
    let mut rounds = 5;
    let mut tokens = 64;
    let mut ty = GgmlType::Q4_K;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or_default();
        match pair[0].as_str() {
            "--rounds" => rounds = value.parse().expect("--rounds N"),
            "--tokens" => tokens = value.parse().expect("--tokens N"),
            "--type" => {
                ty = (0..64)
                    .filter_map(GgmlType::from_id)
                    .find(|t| format!("{t:?}") == value)
                    .unwrap_or_else(|| panic!("--type {value}: not a GGML type name"))
            }
            other => panic!("unknown argument {other} (--rounds N, --tokens N, --type Q4_K)"),
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dev = Default::default();
    let mut models = Vec::new();
    for moe in [true, false] {
        let path = dir.path().join(if moe { "moe.gguf" } else { "dense.gguf" });
        let t = Instant::now();
        write_model(&path, moe, ty);
        let m = load_gguf::<B>(&path, LoadOptions::default(), &dev)
            .expect("loads")
            .model;
        let file = std::fs::metadata(&path).expect("written").len();
        println!(
            "{}: {} layers, hidden {HIDDEN}, {}; {} weights, {:.1} MiB held ({:.1} MiB file), made in {:.1}s",
            if moe { "MoE  " } else { "dense" },
            LAYERS,
            if moe {
                format!("{EXPERTS} experts of {EXPERT_FF}, top-{TOP_K}")
            } else {
                format!("MLP {}", TOP_K * EXPERT_FF)
            },
            format!("{ty:?}"),
            m.base_bytes() as f64 / (1 << 20) as f64,
            file as f64 / (1 << 20) as f64,
            t.elapsed().as_secs_f64()
        );
        models.push(m);
    }
    // What a decode step must read: everything but the unchosen experts and the embedding
    // table (one row of it).
    let expert_bytes: usize = models[0]
        .layers
        .iter()
        .filter_map(|l| l.experts.as_ref())
        .map(|x| x.experts.iter().map(|e| e.n_bytes()).sum::<usize>())
        .sum();
    let embed = models[0].embed_tokens.n_bytes();
    let moe_total = models[0].base_bytes() - embed;
    let moe_active = moe_total - expert_bytes + expert_bytes * TOP_K / EXPERTS;
    let dense_active = models[1].base_bytes() - models[1].embed_tokens.n_bytes();
    println!(
        "bytes a decode step reads (no embedding table): MoE {:.1} MiB of {:.1} MiB ({:.1}× less), dense {:.1} MiB",
        moe_active as f64 / (1 << 20) as f64,
        moe_total as f64 / (1 << 20) as f64,
        moe_total as f64 / moe_active as f64,
        dense_active as f64 / (1 << 20) as f64
    );
    decode_rate(&models[0], 4, 0); // warm the pages and the pool
    decode_rate(&models[1], 4, 0);
    let (mut moe, mut dense) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // Alternate which model goes first.
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let rate = decode_rate(&models[i], tokens, r as u64 + 1);
            if i == 0 { &mut moe } else { &mut dense }.push(rate);
        }
    }
    let ratios: Vec<f64> = moe.iter().zip(&dense).map(|(m, d)| m / d).collect();
    println!(
        "decode, 1 stream, {tokens} tokens, {rounds} alternating rounds, {} threads:",
        rayon::current_num_threads()
    );
    println!("  MoE   {}", median_and_range(moe));
    println!("  dense {}", median_and_range(dense));
    let mut r = ratios.clone();
    r.sort_by(f64::total_cmp);
    println!(
        "  MoE / dense: {:.2}× (per-round {:.2}–{:.2}); reading every expert would make it about {:.2}×",
        r[r.len() / 2],
        r[0],
        r[r.len() - 1],
        dense_active as f64 / moe_total as f64
    );
}
