//! The GPU code path, run: burn-wgpu's CubeCL kernels (the ones burn-cuda compiles for NVIDIA)
//! on whatever wgpu adapter the machine has — in CI, Mesa's software Vulkan device (lavapipe).
//! Every family's tiny model, from safetensors (dense f32) and from GGUF (packed blocks), gives
//! transformers' logits there, and cached decoding and a ragged batch give the logits of one
//! full forward, as on the CPU.

use burn::prelude::*;
use graft_core::device::{wgpu_device, Wgpu};
use graft_core::load::{load_gguf, load_hf_dir, LoadOptions};
use graft_core::model::{Logits, Model, SeqCache, SeqInput};

use crate::families::{all_families, case};
use crate::max_abs_diff;
use crate::reference::fixture;

/// Looser than the CPU's 1e-4: the GPU's matrix products sum in another order (tiles).
const TOLERANCE: f32 = 1e-3;

fn values(t: Tensor<Wgpu, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().expect("f32 tensor")
}

fn load(family: &str, gguf: bool) -> Model<Wgpu> {
    let dir = fixture(&format!("families/{family}"));
    let dev = wgpu_device(None);
    if gguf {
        load_gguf::<Wgpu>(&dir.join("model.gguf"), LoadOptions::default(), &dev)
    } else {
        load_hf_dir::<Wgpu>(&dir, LoadOptions::default(), &dev)
    }
    .unwrap_or_else(|e| panic!("{family} (gguf: {gguf}) on wgpu: {e}"))
    .model
}

fn forward(m: &Model<Wgpu>, seqs: &mut [SeqInput<'_, Wgpu>]) -> Vec<f32> {
    values(m.forward(seqs, Logits::All))
}

#[test]
fn every_family_matches_transformers_on_wgpu() {
    let mut report = Vec::new();
    for family in all_families() {
        let c = case(family);
        for gguf in [false, true] {
            let m = load(family, gguf);
            let reference = if gguf { &c.gguf_logits } else { &c.logits };
            let mut worst = 0f32;
            for (p, want) in c.prompts.iter().zip(reference) {
                let got = forward(
                    &m,
                    &mut [SeqInput {
                        tokens: p,
                        cache: None,
                        adapter: None,
                    }],
                );
                worst = worst.max(max_abs_diff(&got, want));
            }
            report.push(format!(
                "{family} {}: {worst:.2e}",
                if gguf { "gguf" } else { "hf" }
            ));
            assert!(
                worst <= TOLERANCE,
                "{family} (gguf: {gguf}) on wgpu: logits differ from transformers by {worst}"
            );
        }
    }
    eprintln!("wgpu: max |Δ| vs transformers: {}", report.join(", "));
}

#[test]
fn cached_decoding_and_ragged_batches_on_wgpu_equal_one_full_forward() {
    for family in ["llama", "gemma3", "qwen3_moe"] {
        let c = case(family);
        let m = load(family, true);
        let vocab = m.config.vocab_size;
        let p = c.prompts.iter().max_by_key(|p| p.len()).unwrap();
        let full = forward(
            &m,
            &mut [SeqInput {
                tokens: p,
                cache: None,
                adapter: None,
            }],
        );
        let mut cache = SeqCache::new();
        let split = p.len() / 3;
        let mut got = forward(
            &m,
            &mut [SeqInput {
                tokens: &p[..split],
                cache: Some(&mut cache),
                adapter: None,
            }],
        );
        for t in split..p.len() {
            got.extend(forward(
                &m,
                &mut [SeqInput {
                    tokens: &p[t..t + 1],
                    cache: Some(&mut cache),
                    adapter: None,
                }],
            ));
        }
        let d = max_abs_diff(&got, &full);
        assert!(
            d <= TOLERANCE,
            "{family} on wgpu: cached decoding differs by {d}"
        );
        let mut seqs: Vec<SeqInput<'_, Wgpu>> = c
            .prompts
            .iter()
            .map(|p| SeqInput {
                tokens: p,
                cache: None,
                adapter: None,
            })
            .collect();
        let batch = forward(&m, &mut seqs);
        let mut off = 0;
        for (p, want) in c.prompts.iter().zip(&c.gguf_logits) {
            let d = max_abs_diff(&batch[off..off + p.len() * vocab], want);
            assert!(
                d <= TOLERANCE,
                "{family} on wgpu: ragged batch row differs by {d}"
            );
            off += p.len() * vocab;
        }
    }
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
                let m = load(family, false);
                for round in 0..3 {
                    for (p, want) in c.prompts.iter().zip(&c.logits) {
                        let got = forward(
                            &m,
                            &mut [SeqInput {
                                tokens: p,
                                cache: None,
                                adapter: None,
                            }],
                        );
                        let d = max_abs_diff(&got, want);
                        assert!(d <= TOLERANCE, "{family}, round {round}: differs by {d}");
                    }
                }
            });
        }
    });
}
