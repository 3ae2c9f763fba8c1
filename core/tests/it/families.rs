//! Every family against transformers on tiny random models (`scripts/reference/families.py`):
//! the HF-safetensors directory and the GGUF that llama.cpp's own converter made from it give
//! transformers' f32 logits at every position; cached decoding and a ragged batch of all
//! prompts give the same logits as one full forward.

use graft_core::backend::GraftBackend;
use graft_core::load::{load_gguf, load_hf_dir, LoadOptions, LoadedModel};
use graft_core::model::{Logits, Model, RopeScaling, SeqCache, SeqInput};
use serde::Deserialize;

use crate::reference::{f32s, fixture, read_fixture};
use crate::{all_logits, max_abs_diff, values, B};

/// The dense families with a tiny reference model (directory names under
/// `fixtures/families`, made by `scripts/reference/families.py`).
pub const FAMILIES: [&str; 8] = [
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2",
];

/// The Mixture-of-Experts families with a tiny reference model (`scripts/reference/moe.py`).
pub const MOE_FAMILIES: [&str; 6] = [
    "mixtral",
    "qwen3_moe",
    "olmoe",
    "qwen2_moe",
    "deepseek_v3",
    "gpt_oss",
];

/// Dense and MoE families.
pub fn all_families() -> impl Iterator<Item = &'static str> {
    FAMILIES.into_iter().chain(MOE_FAMILIES)
}

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<Vec<u32>>,
}

pub(crate) struct Case {
    pub prompts: Vec<Vec<u32>>,
    /// Per prompt, `[len, vocab]` row-major.
    pub logits: Vec<Vec<f32>>,
    /// What the GGUF must compute where llama.cpp's converter drops a feature: Mistral's
    /// sliding window is not written to GGUF (llama.cpp runs those files with full attention),
    /// so the reference also has the logits without the window.
    pub gguf_logits: Vec<Vec<f32>>,
}

pub(crate) fn case(family: &str) -> Case {
    let dir = format!("families/{family}");
    let r: Reference = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{dir}/reference.json"))).unwrap(),
    )
    .unwrap();
    let t = read_fixture(&format!("{dir}/reference.safetensors"));
    let logits: Vec<Vec<f32>> = (0..r.prompts.len())
        .map(|i| f32s(&t[&format!("p{i}.logits")]))
        .collect();
    let gguf_logits = (0..r.prompts.len())
        .map(|i| match t.get(&format!("p{i}.logits_no_window")) {
            Some(b) => f32s(b),
            None => logits[i].clone(),
        })
        .collect();
    Case {
        prompts: r.prompts,
        logits,
        gguf_logits,
    }
}

pub(crate) fn case_of(family: &str) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let c = case(family);
    (c.prompts, c.logits)
}

pub fn load_family(family: &str, gguf: bool) -> LoadedModel<B> {
    load_family_on::<B>(family, gguf, &Default::default())
}

/// A family's tiny model on any backend's device (the GPU tests use these checks too).
pub fn load_family_on<Bk: GraftBackend>(
    family: &str,
    gguf: bool,
    dev: &Bk::Device,
) -> LoadedModel<Bk> {
    let dir = fixture(&format!("families/{family}"));
    if gguf {
        load_gguf::<Bk>(&dir.join("model.gguf"), LoadOptions::default(), dev)
    } else {
        load_hf_dir::<Bk>(&dir, LoadOptions::default(), dev)
    }
    .unwrap_or_else(|e| panic!("{family} (gguf: {gguf}): {e}"))
}

/// Row-major logits of every position of `seqs`.
pub fn logits_of<Bk: GraftBackend>(m: &Model<Bk>, seqs: &mut [SeqInput<'_, Bk>]) -> Vec<f32> {
    m.forward(seqs, Logits::All)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 tensor")
}

pub fn alone<'a, Bk: GraftBackend>(
    tokens: &'a [u32],
    cache: Option<&'a mut SeqCache<Bk>>,
) -> SeqInput<'a, Bk> {
    SeqInput {
        tokens,
        cache,
        adapter: None,
    }
}

/// Every family's model from safetensors and from GGUF on `dev` gives transformers' logits
/// within `tolerance`; returns the max |Δ| per model.
pub fn check_every_family<Bk: GraftBackend>(dev: &Bk::Device, tolerance: f32) -> String {
    let mut report = Vec::new();
    for family in all_families() {
        let c = case(family);
        for gguf in [false, true] {
            let m = load_family_on::<Bk>(family, gguf, dev).model;
            let mut worst = 0f32;
            let reference = if gguf { &c.gguf_logits } else { &c.logits };
            for (p, want) in c.prompts.iter().zip(reference) {
                let got = logits_of(&m, &mut [alone(p, None)]);
                worst = worst.max(max_abs_diff(&got, want));
            }
            report.push(format!(
                "{family} {}: {worst:.2e}",
                if gguf { "gguf" } else { "hf" }
            ));
            assert!(
                worst <= tolerance,
                "{family} (gguf: {gguf}): logits differ from transformers by {worst}"
            );
        }
    }
    report.join(", ")
}

/// For each of `families` (safetensors or GGUF): its longest prompt prefilled a third, then
/// decoded one token at a time (crossing the windows), and all prompts in one ragged call, give
/// transformers' logits within `tolerance`.
pub fn check_cached_and_ragged<Bk: GraftBackend>(
    dev: &Bk::Device,
    families: &[&str],
    gguf: bool,
    tolerance: f32,
) {
    for &family in families {
        let c = case(family);
        let reference = if gguf { &c.gguf_logits } else { &c.logits };
        let m = load_family_on::<Bk>(family, gguf, dev).model;
        let vocab = m.config.vocab_size;
        // Longrope switches every position's frequencies once a sequence outgrows the original
        // context, so a cache made before that (in transformers too) holds other keys than a
        // full forward: stay within it there.
        let limit = match &m.config.layers[0].rope.scaling {
            Some(RopeScaling::LongRope {
                original_max_position,
                ..
            }) => *original_max_position,
            _ => usize::MAX,
        };
        let (p, want) = c
            .prompts
            .iter()
            .zip(reference)
            .filter(|(p, _)| p.len() <= limit)
            .max_by_key(|(p, _)| p.len())
            .unwrap();
        let mut cache = SeqCache::new();
        let split = p.len() / 3;
        let mut got = logits_of(&m, &mut [alone(&p[..split], Some(&mut cache))]);
        for t in split..p.len() {
            got.extend(logits_of(&m, &mut [alone(&p[t..t + 1], Some(&mut cache))]));
        }
        let d = max_abs_diff(&got, want);
        assert!(d <= tolerance, "{family}: cached decoding differs by {d}");
        let mut seqs: Vec<SeqInput<'_, Bk>> = c.prompts.iter().map(|p| alone(p, None)).collect();
        let batch = logits_of(&m, &mut seqs);
        let mut off = 0;
        for (p, want) in c.prompts.iter().zip(reference) {
            let d = max_abs_diff(&batch[off..off + p.len() * vocab], want);
            assert!(d <= tolerance, "{family}: ragged batch row differs by {d}");
            off += p.len() * vocab;
        }
    }
}

#[test]
fn every_family_matches_transformers_from_safetensors_and_gguf() {
    let report = check_every_family::<B>(&Default::default(), TOLERANCE);
    eprintln!("max |Δ| vs transformers: {report}");
}

#[test]
fn cached_decoding_and_ragged_batches_equal_one_full_forward() {
    let families: Vec<&str> = all_families().collect();
    check_cached_and_ragged::<B>(&Default::default(), &families, false, TOLERANCE);
}

/// Past the cache's tail length ([`KvParts::TAIL`] = 128) the cached keys live in two pieces;
/// decoding 300 tokens one at a time (crossing the join twice, and the sliding windows all
/// along) gives the logits of one forward over the whole sequence.
#[test]
fn long_cached_decoding_across_the_cache_joins_equals_one_full_forward() {
    for family in all_families() {
        let m = load_family(family, false).model;
        if matches!(
            m.config.layers[0].rope.scaling,
            Some(RopeScaling::LongRope { .. })
        ) {
            continue; // its frequencies change with the length (see above)
        }
        let vocab = m.config.vocab_size as u64;
        let mut state = 7u64;
        let tokens: Vec<u32> = (0..300)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((state >> 33) % vocab) as u32
            })
            .collect();
        let want = all_logits(&m, &tokens, None);
        let mut cache = SeqCache::new();
        let mut got = values(m.forward(
            &mut [SeqInput {
                tokens: &tokens[..40],
                cache: Some(&mut cache),
                adapter: None,
            }],
            Logits::All,
        ));
        for t in 40..tokens.len() {
            got.extend(values(m.forward(
                &mut [SeqInput {
                    tokens: &tokens[t..t + 1],
                    cache: Some(&mut cache),
                    adapter: None,
                }],
                Logits::Last,
            )));
        }
        let d = max_abs_diff(&got, &want);
        assert!(
            d <= 1e-3,
            "{family}: cached decoding over 300 tokens differs by {d}"
        );
        // A prefix of the cache is what the prefix alone makes.
        let mut again = cache.prefix(200);
        let next = values(m.forward(
            &mut [SeqInput {
                tokens: &tokens[200..201],
                cache: Some(&mut again),
                adapter: None,
            }],
            Logits::Last,
        ));
        let row = 200 * vocab as usize;
        let d = max_abs_diff(&next, &want[row..row + vocab as usize]);
        assert!(
            d <= 1e-3,
            "{family}: decoding from a cache prefix differs by {d}"
        );
    }
}

/// A PEFT-initialized adapter on every projection of the model's layout (and the routers and
/// experts of an MoE model), with `B` drawn too so that it changes the output.
pub fn random_adapter(m: &Model<B>, seed: u64) -> graft_core::adapters::lora::Adapter<B> {
    use burn::prelude::*;
    use graft_core::adapters::lora::{LoraConfig, TargetModule};
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
        use_rslora: false,
    };
    let mut a = m.init_adapter(&cfg, seed);
    for layer in a.layers.iter_mut() {
        for w in layer.iter_mut().flatten() {
            let [o, r] = w.b.dims();
            w.b = Tensor::random(
                [o, r],
                burn::tensor::Distribution::Uniform(-0.5, 0.5),
                m.device(),
            );
        }
    }
    a
}

#[test]
fn mixed_adapter_batches_equal_each_request_alone_in_every_family() {
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), 7);
    for family in all_families() {
        let c = case(family);
        let m = load_family(family, false).model;
        // Every projection of every layer (attention, the router and the experts on a layer
        // of routed experts).
        let layout: usize = (0..m.config.num_layers)
            .map(|l| {
                m.config.layer_targets(l).len() + 3 * usize::from(m.config.sparse_moe(l).is_some())
            })
            .sum();
        let (a1, a2) = (random_adapter(&m, 1), random_adapter(&m, 2));
        assert_eq!(a1.modules().count(), layout, "{family}");
        let adapters = [Some(&a1), None, Some(&a2)];
        let mut seqs: Vec<SeqInput<'_, B>> = c
            .prompts
            .iter()
            .zip(adapters)
            .map(|(p, adapter)| SeqInput {
                tokens: p,
                cache: None,
                adapter,
            })
            .collect();
        let batch = values(m.forward(&mut seqs, Logits::Last));
        let vocab = m.config.vocab_size;
        for (i, (p, adapter)) in c.prompts.iter().zip(adapters).enumerate() {
            let alone = values(m.forward(
                &mut [SeqInput {
                    tokens: p,
                    cache: None,
                    adapter,
                }],
                Logits::Last,
            ));
            let d = max_abs_diff(&batch[i * vocab..(i + 1) * vocab], &alone);
            assert!(d < 1e-4, "{family} request {i}: {d}");
            if adapter.is_some() {
                let base = all_logits(&m, p, None);
                let moved = max_abs_diff(&base[(p.len() - 1) * vocab..], &alone);
                assert!(
                    moved > 1e-2,
                    "{family}: the adapter changes nothing ({moved})"
                );
            }
        }
    }
}

/// Tensor names and shapes of a safetensors file.
fn tensor_shapes(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect()
}

#[test]
fn peft_adapters_of_every_family_load_both_ways() {
    use graft_core::adapters::peft;
    for family in FAMILIES {
        let dir = fixture(&format!("families/{family}"));
        let c = case(family);
        let t = read_fixture(&format!("families/{family}/peft_reference.safetensors"));
        for gguf in [false, true] {
            // PEFT-made adapter → graft reproduces PeftModel's logits.
            let m = load_family(family, gguf).model;
            let (adapter, _) = peft::load(&dir.join("peft_adapter"), &m)
                .unwrap_or_else(|e| panic!("{family}: {e}"));
            assert_eq!(
                adapter.modules().count(),
                m.config.targets().len() * m.config.num_layers,
                "{family}: all-linear covers every projection"
            );
            for (i, p) in c.prompts.iter().enumerate() {
                let got = values(m.forward(
                    &mut [SeqInput {
                        tokens: p,
                        cache: None,
                        adapter: Some(&adapter),
                    }],
                    Logits::All,
                ));
                let want = f32s(&t[&format!("p{i}.logits")]);
                // Mistral's GGUF has no window: compare the positions it does not reach.
                let vocab = m.config.vocab_size;
                let n = match c.logits[i]
                    .iter()
                    .zip(&c.gguf_logits[i])
                    .position(|(a, b)| a != b)
                {
                    Some(first) if gguf => first / vocab * vocab,
                    _ => got.len(),
                };
                assert!(n > 0);
                let d = max_abs_diff(&got[..n], &want[..n]);
                assert!(d <= TOLERANCE, "{family} (gguf {gguf}) prompt {i}: {d}");
            }
            // graft's adapter → the names and shapes PEFT writes for this model.
            if !gguf {
                let out = tempfile::tempdir().unwrap();
                let cfg = peft::PeftConfig::from_lora(
                    &graft_core::adapters::lora::LoraConfig {
                        r: 4,
                        lora_alpha: 8.0,
                        lora_dropout: 0.0,
                        target_modules: m.config.targets().to_vec(),
                        use_rslora: false,
                    },
                    family,
                    m.config.family,
                );
                peft::save(&out.path().join("a"), &adapter, &cfg, &m.config).unwrap();
                assert_eq!(
                    tensor_shapes(&out.path().join("a/adapter_model.safetensors")),
                    tensor_shapes(&dir.join("peft_adapter/adapter_model.safetensors")),
                    "{family}"
                );
            }
        }
    }
}

#[test]
fn gguf_lora_export_uses_each_familys_llama_cpp_names_and_round_trips() {
    use graft_core::adapters::gguf_lora;
    use graft_core::formats::gguf::GgufFile;
    for family in FAMILIES {
        let m = load_family(family, true).model;
        let adapter = random_adapter(&m, 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        gguf_lora::save(&path, &adapter, &m).unwrap();
        // Every lora_a/lora_b pair names a weight of the model file llama.cpp's converter wrote.
        let lora = GgufFile::open(&path).unwrap();
        let base = GgufFile::open(&fixture(&format!("families/{family}/model.gguf"))).unwrap();
        assert_eq!(
            lora.str("general.architecture").unwrap(),
            base.str("general.architecture").unwrap()
        );
        let names: Vec<String> = (0..m.config.num_layers)
            .flat_map(|i| {
                m.config
                    .targets()
                    .iter()
                    .map(move |t| format!("blk.{i}.{}.weight", t.gguf_name()))
            })
            .collect();
        for n in &names {
            assert!(
                base.tensor_info(n).is_some(),
                "{family}: {n} is not in the model"
            );
            assert!(
                lora.tensor_info(&format!("{n}.lora_a")).is_some(),
                "{family}: {n}.lora_a missing"
            );
        }
        let back = gguf_lora::load(&path, &m).unwrap();
        let p = &case(family).prompts[1];
        let run = |a| {
            values(m.forward(
                &mut [SeqInput {
                    tokens: p,
                    cache: None,
                    adapter: Some(a),
                }],
                Logits::All,
            ))
        };
        let d = max_abs_diff(&run(&adapter), &run(&back));
        assert!(
            d <= 1e-5,
            "{family}: GGUF-LoRA round trip changed logits by {d}"
        );
    }
}

#[test]
fn a_config_promising_biases_the_weights_lack_is_refused_by_tensor_name() {
    let src = fixture("families/llama");
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["attention_bias"] = true.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = load_hf_dir::<B>(dir.path(), LoadOptions::default(), &Default::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.bias") && e.contains("missing"),
        "{e}"
    );
}
