//! Training with layer recomputation (`Model::final_hidden_recomputed`) and the fused LM head
//! and log-softmax (`Model::token_logps`) gives the gradients of the plain graph: every
//! adapter value's, on a ragged batch, for families with a soft-capped head (Gemma 2), routed
//! experts (Qwen3-MoE), sinks and sliding windows (GPT-OSS), latent attention (DeepSeek-V3)
//! and a packed NF4 base (Llama).

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Distribution, TensorData};
use graft_core::adapters::lora::{Adapter, LoraConfig, LoraWeights, TargetModule};
use graft_core::load::{load_hf_dir, LoadOptions};
use graft_core::model::{Model, SeqInput};
use graft_core::quant::QuantKind;

use crate::reference::fixture;

type Ad = Autodiff<burn::backend::Flex>;
type LoraWeightsAd = LoraWeights<Ad>;

/// The gradient of every A and B of `adapter` (layer, then target order; A before B).
type Grads = Vec<Vec<f32>>;

fn host(t: Option<Tensor<burn::backend::Flex, 2>>, like: &Tensor<Ad, 2>) -> Vec<f32> {
    match t {
        Some(g) => g.into_data().to_vec::<f32>().expect("f32"),
        None => vec![0.0; like.shape().num_elements()],
    }
}

/// Two sequences of the family's vocabulary, 9 and 5 tokens: each token's target is the next.
fn batch(vocab: usize) -> Vec<Vec<u32>> {
    let seq = |len: usize, seed: usize| -> Vec<u32> {
        (0..len)
            .map(|i| ((i * 7 + seed * 13 + 1) % vocab) as u32)
            .collect()
    };
    vec![seq(9, 1), seq(5, 2)]
}

/// `Σ_rows w_row · log p(next token)` over the batch's hidden states, rows weighted unevenly,
/// through the fused head or, with `plain`, `log_softmax` of the full logits.
fn loss(m: &Model<Ad>, hidden: Tensor<Ad, 2>, tokens: &[Vec<u32>], plain: bool) -> Tensor<Ad, 1> {
    let dev = m.device();
    let (mut rows, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0;
    for t in tokens {
        for i in 0..t.len() - 1 {
            rows.push((offset + i) as i32);
            targets.push(t[i + 1] as i32);
            weights.push(1.0 + (rows.len() % 3) as f32 * 0.5);
        }
        offset += t.len();
    }
    let n = rows.len();
    let hidden = hidden.select(0, Tensor::from_data(TensorData::new(rows, [n]), dev));
    let targets = Tensor::<Ad, 2, Int>::from_data(TensorData::new(targets, [n, 1]), dev);
    let picked = if plain {
        log_softmax(m.logits(hidden), 1)
            .gather(1, targets)
            .reshape([n])
    } else {
        m.token_logps(hidden, targets)
    };
    (picked * Tensor::from_data(TensorData::new(weights, [n]), dev)).sum()
}

/// The adapter's gradients from one plain graph (unfused head) or with recomputation.
fn gradients(m: &Model<Ad>, adapter: &Adapter<Ad>, tokens: &[Vec<u32>], recompute: bool) -> Grads {
    let all: Vec<(&LoraWeightsAd, usize)> = adapter.modules().map(|(l, _, w)| (w, l)).collect();
    let mut out: Grads = Vec::new();
    if recompute {
        let slices: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
        let (hidden, rec) = m.final_hidden_recomputed(&slices, adapter, 7);
        let g = loss(m, hidden, tokens, false).backward();
        let mut found = vec![Vec::new(); 2 * all.len()];
        rec.backward(&g, adapter, |layer, grads| {
            for (i, (w, l)) in all.iter().enumerate() {
                if *l == layer {
                    found[2 * i] = host(w.a.grad(grads), &w.a);
                    found[2 * i + 1] = host(w.b.grad(grads), &w.b);
                }
            }
        });
        out.extend(found);
    } else {
        let mut seqs: Vec<SeqInput<'_, Ad>> = tokens
            .iter()
            .map(|t| SeqInput {
                tokens: t,
                cache: None,
                adapter: Some(adapter),
            })
            .collect();
        let hidden = m.final_hidden(&mut seqs);
        let g = loss(m, hidden, tokens, true).backward();
        for (w, _) in &all {
            out.push(host(w.a.grad(&g), &w.a));
            out.push(host(w.b.grad(&g), &w.b));
        }
    }
    out
}

/// An adapter on every target the family has, with random A and B (PEFT's B = 0 would leave
/// A without a gradient), tracked.
fn adapter(m: &Model<Ad>) -> Adapter<Ad> {
    let config = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    };
    let mut a = m.init_adapter(&config, 3);
    for layer in &mut a.layers {
        for w in layer.iter_mut().flatten() {
            w.b = Tensor::random(w.b.shape(), Distribution::Uniform(-0.2, 0.2), m.device());
            w.a = w.a.clone().require_grad();
            w.b = w.b.clone().require_grad();
        }
    }
    a
}

fn check(family: &str, quantize: QuantKind) {
    let dir = fixture(&format!("families/{family}"));
    let opts = LoadOptions {
        quantize,
        ..LoadOptions::default()
    };
    let m = load_hf_dir::<Ad>(&dir, opts, &Default::default())
        .unwrap_or_else(|e| panic!("{family}: {e}"))
        .model;
    let a = adapter(&m);
    let tokens = batch(m.config.vocab_size);
    let plain = gradients(&m, &a, &tokens, false);
    let recomputed = gradients(&m, &a, &tokens, true);
    let scale = plain.iter().flatten().fold(0f32, |s, v| s.max(v.abs()));
    assert!(
        scale > 1e-4,
        "{family}: the gradients are not trivial ({scale})"
    );
    let mut worst = 0f32;
    for (p, r) in plain.iter().zip(&recomputed) {
        assert_eq!(p.len(), r.len());
        worst = p
            .iter()
            .zip(r)
            .fold(worst, |w, (x, y)| w.max((x - y).abs()));
    }
    eprintln!("{family}: max |Δ gradient| {worst:.1e} of {scale:.1e}");
    assert!(
        worst <= 1e-4 * scale,
        "{family}: recomputed gradients differ by {worst} (largest {scale})"
    );
    assert!(
        recomputed.iter().flatten().any(|v| *v != 0.0),
        "{family}: no gradient reached the adapter"
    );
}

#[test]
fn recomputed_layers_and_fused_head_give_the_plain_gradients() {
    check("llama", QuantKind::Nf4);
    check("gemma2", QuantKind::None);
    check("qwen3_moe", QuantKind::None);
    check("gpt_oss", QuantKind::None);
    check("deepseek_v3", QuantKind::None);
}

/// The fused head's log-probabilities are the plain ones, untracked too (evaluation and
/// the DPO reference run without autodiff).
#[test]
fn fused_head_equals_log_softmax_without_autodiff() {
    type F = burn::backend::Flex;
    let dir = fixture("families/gemma2");
    let m = load_hf_dir::<F>(&dir, LoadOptions::default(), &Default::default())
        .expect("gemma2")
        .model;
    assert!(m.config.final_softcap.is_some(), "the case has a soft-cap");
    let dev = m.device();
    let n = 6;
    let hidden = Tensor::<F, 2>::random(
        [n, m.config.hidden_size],
        Distribution::Normal(0.0, 1.0),
        dev,
    );
    let t: Vec<i32> = (0..n as i32)
        .map(|i| i * 5 % m.config.vocab_size as i32)
        .collect();
    let targets = Tensor::<F, 2, Int>::from_data(TensorData::new(t, [n, 1]), dev);
    let fused = m.token_logps(hidden.clone(), targets.clone());
    let plain = log_softmax(m.logits(hidden), 1)
        .gather(1, targets)
        .reshape([n]);
    let (a, b) = (
        crate::values(fused.reshape([1, n])),
        crate::values(plain.reshape([1, n])),
    );
    assert!(crate::max_abs_diff(&a, &b) < 1e-4, "{a:?} vs {b:?}");
}
