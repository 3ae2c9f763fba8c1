//! Mixture-of-Experts models against transformers on tiny random Mixtral, Qwen3-MoE and OLMoE
//! (`scripts/reference/moe.py`): beyond the logits (checked with the dense families in
//! `families.rs`), the router picks the experts transformers' router picks, for every token
//! of every layer, from safetensors and from llama.cpp's GGUF; the experts of a GGUF are
//! views of its one stacked tensor; and LoRA on the router and the experts is PEFT's
//! (`scripts/reference/moe_peft.py`), both ways.

use graft_core::model::proj::BaseWeight;

use crate::families::{case_of, load_family, MOE_FAMILIES};
use crate::reference::read_fixture;
use crate::B;

/// The reference's expert ids for prompt `p` at layer `l`, `[len · top_k]`.
fn reference_experts(family: &str, p: usize, l: usize) -> Vec<u32> {
    let t = read_fixture(&format!("families/{family}/reference.safetensors"));
    let b = &t[&format!("p{p}.experts{l}")];
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
        .collect()
}

/// `adapter` with every `B` set to a fixed pattern of values in ±0.15 (PEFT's init leaves it
/// zero, which would hide a misplaced `B`), reproducible without a random generator.
fn patterned(
    mut adapter: graft_core::adapters::lora::Adapter<B>,
    m: &graft_core::model::Model<B>,
) -> graft_core::adapters::lora::Adapter<B> {
    use burn::prelude::*;
    for (k, w) in adapter.layers.iter_mut().flatten().flatten().enumerate() {
        let dims = w.b.dims();
        let v: Vec<f32> = (0..dims[0] * dims[1])
            .map(|i| (((i * 7919 + k * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.3)
            .collect();
        w.b = Tensor::from_data(burn::tensor::TensorData::new(v, dims), m.device());
    }
    adapter
}

#[test]
fn routers_choose_the_experts_transformers_chooses_on_every_token() {
    for family in MOE_FAMILIES {
        let (prompts, _) = case_of(family);
        for gguf in [false, true] {
            let m = load_family(family, gguf).model;
            let moe = m.config.moe.as_ref().expect("an MoE config");
            assert_eq!((moe.num_experts, moe.top_k), (8, 2), "{family}");
            let mut tokens_checked = 0;
            // DeepSeek-V3's first layer is dense.
            let sparse = moe.sparse.iter().filter(|&&s| s).count();
            assert_eq!(
                sparse,
                m.config.num_layers - usize::from(family == "deepseek_v3"),
                "{family}: sparse layers"
            );
            for (p, prompt) in prompts.iter().enumerate() {
                let routes = m.expert_choices(prompt);
                assert_eq!(routes.len(), sparse, "{family}: routed layers");
                for (l, r) in routes.iter().enumerate() {
                    assert_eq!(r.top_k, 2);
                    assert_eq!(
                        r.experts,
                        reference_experts(family, p, l),
                        "{family} (gguf: {gguf}) prompt {p} layer {l}"
                    );
                    tokens_checked += prompt.len();
                }
            }
            assert_eq!(tokens_checked, sparse * (5 + 13 + 24));
        }
    }
}

#[test]
fn gguf_experts_share_their_stacked_tensor_and_a_dense_model_routes_nothing() {
    for family in MOE_FAMILIES {
        let hf = load_family(family, false).model;
        let gguf = load_family(family, true).model;
        let moe = hf.config.moe.as_ref().expect("moe");
        assert_eq!(
            Some(moe),
            gguf.config.moe.as_ref(),
            "{family}: same MoE config"
        );
        for (l, (a, b)) in hf.layers.iter().zip(&gguf.layers).enumerate() {
            let (Some(a), Some(b)) = (&a.experts, &b.experts) else {
                assert!(!moe.sparse[l], "{family}: layer {l} lacks its experts");
                continue;
            };
            assert_eq!(a.experts.len(), 8);
            // The f32 GGUF's experts are slices of one dense [8·rows, cols] tensor; equal
            // values to the safetensors' separate tensors.
            for (x, y) in a.experts.iter().zip(&b.experts) {
                let dev = Default::default();
                let d = crate::max_abs_diff(
                    &crate::values(x.down.weight(&dev)),
                    &crate::values(y.down.weight(&dev)),
                );
                assert_eq!(d, 0.0, "{family}");
                assert!(matches!(y.down.base, BaseWeight::Dense(_)));
            }
        }
    }
    let dense = load_family("qwen3", false).model;
    assert!(dense.config.moe.is_none());
    assert!(dense.expert_choices(&[1, 2, 3]).is_empty());
}

/// An adapter merged into an MoE base, as GGUF, as an HF directory, and from the GGUF into an
/// HF directory (config.json with the MoE keys, every expert written): each reloads to the
/// logits of the base with the adapter.
#[test]
fn merged_moe_models_compute_what_base_plus_adapter_computes() {
    use graft_core::adapters::merge::{merge_gguf, merge_hf, merge_to_hf};
    use graft_core::formats::gguf::GgufFile;
    use graft_core::formats::safetensors_write::FloatDtype;
    use graft_core::load::{load_gguf, load_hf_dir, LoadOptions};

    let dev = Default::default();
    for family in MOE_FAMILIES {
        let dir = crate::reference::fixture(&format!("families/{family}"));
        let (prompts, _) = case_of(family);
        let tokens = &prompts[2];
        for gguf in [true, false] {
            let base = load_family(family, gguf);
            let adapter = crate::families::random_adapter(&base.model, 3);
            let want = crate::all_logits(&base.model, tokens, Some(&adapter));
            let moved = crate::max_abs_diff(&crate::all_logits(&base.model, tokens, None), &want);
            assert!(
                moved > 0.05,
                "{family}: the adapter moves logits by {moved}"
            );
            let out = tempfile::tempdir().expect("temp dir");
            let mut merged = Vec::new();
            if gguf {
                let path = out.path().join("merged.gguf");
                let file = GgufFile::open(dir.join("model.gguf")).expect("GGUF");
                merge_gguf(&file, &base.model.config, &adapter, None, &path).expect("merge");
                merged.push(("gguf", load_gguf::<B>(&path, LoadOptions::default(), &dev)));
                let hf = out.path().join("hf");
                let to_hf = merge_to_hf(
                    &base.model,
                    base.tokenizer.as_ref(),
                    &adapter,
                    FloatDtype::F32,
                    &hf,
                    1 << 30,
                );
                if family == "gpt_oss" {
                    // Not written: transformers' 3-D interleaved experts (refused by name).
                    let e = to_hf.expect_err("refused").to_string();
                    assert!(e.contains("GPT-OSS"), "{e}");
                } else {
                    to_hf.unwrap_or_else(|e| panic!("{family}: {e}"));
                    merged.push((
                        "gguf → hf",
                        load_hf_dir::<B>(&hf, LoadOptions::default(), &dev),
                    ));
                }
            } else {
                let path = out.path().join("merged");
                merge_hf(
                    &dir,
                    &base.model.config,
                    &adapter,
                    Some(FloatDtype::F32),
                    &path,
                    1 << 30,
                )
                .expect("merge");
                merged.push(("hf", load_hf_dir::<B>(&path, LoadOptions::default(), &dev)));
            }
            for (how, m) in merged {
                let m = m.unwrap_or_else(|e| panic!("{family} {how}: reloads: {e}"));
                assert_eq!(m.model.config.moe, base.model.config.moe, "{family} {how}");
                let d = crate::max_abs_diff(&crate::all_logits(&m.model, tokens, None), &want);
                assert!(d <= 1e-4, "{family} {how}: merged vs unmerged {d}");
            }
        }
    }
}

/// PEFT's adapter on attention, the router and every expert (`target_parameters`, transformers
/// 5's 3-D expert parameters): graft reproduces PeftModel's logits from safetensors and from
/// GGUF, and writes back the names and shapes PEFT wrote.
#[test]
fn a_peft_adapter_on_the_router_and_experts_reproduces_peftmodel_logits() {
    use graft_core::adapters::lora::TargetModule;
    use graft_core::adapters::peft;
    for family in MOE_FAMILIES {
        let dir = crate::reference::fixture(&format!("families/{family}"));
        let (prompts, _) = case_of(family);
        let t = read_fixture(&format!("families/{family}/peft_reference.safetensors"));
        for gguf in [false, true] {
            let m = load_family(family, gguf).model;
            let (adapter, cfg) = peft::load(&dir.join("peft_adapter"), &m)
                .unwrap_or_else(|e| panic!("PEFT's adapter loads: {e}"));
            // Each layer's projections that PEFT's config names (attention, and a shared
            // expert's or dense layer's MLP), and on a sparse layer the router, gate/up and down.
            let named: Vec<String> = serde_json::from_value(cfg.target_modules.clone().unwrap())
                .expect("a list of module names");
            let moe = m.config.moe.as_ref().expect("moe");
            let expected: usize = (0..m.config.num_layers)
                .map(|l| {
                    let own = m.config.layer_targets(l).into_iter();
                    own.filter(|t| named.iter().any(|n| n == t.hf_name()))
                        .count()
                        + if moe.sparse[l] { 3 } else { 0 }
                })
                .sum();
            assert!(
                expected >= 7 * m.config.num_layers - 3,
                "{family}: {named:?}"
            );
            assert_eq!(adapter.modules().count(), expected, "{family}");
            for l in (0..m.config.num_layers).filter(|&l| moe.sparse[l]) {
                for t in [TargetModule::ExpertsGateUp, TargetModule::ExpertsDown] {
                    let w = adapter.get(l, t).expect("expert adapter");
                    assert_eq!((w.experts, w.rank(), w.scale), (8, 4, 2.0), "layer {l} {t}");
                }
                assert!(adapter.get(l, TargetModule::Router).is_some());
            }
            let mut experts_only = adapter.clone();
            for layer in &mut experts_only.layers {
                for t in TargetModule::ALL {
                    if !t.per_expert() {
                        layer[t.index()] = None;
                    }
                }
            }
            for (i, p) in prompts.iter().enumerate() {
                let got = crate::all_logits(&m, p, Some(&adapter));
                let want = crate::reference::f32s(&t[&format!("p{i}.logits")]);
                let d = crate::max_abs_diff(&got, &want);
                assert!(d <= 1e-4, "{family} gguf {gguf} prompt {i}: {d}");
                eprintln!(
                    "PEFT's expert adapter, {family}, gguf {gguf}, prompt {i}: max |Δ| {d:.1e}"
                );
                // The experts' share is not lost among the rest.
                let base = crate::all_logits(&m, p, None);
                let moved =
                    crate::max_abs_diff(&crate::all_logits(&m, p, Some(&experts_only)), &base);
                assert!(moved > 0.1, "the experts' LoRA moves logits by {moved}");
            }
            if !gguf {
                let out = tempfile::tempdir().expect("temp dir");
                peft::save(&out.path().join("a"), &adapter, &cfg, &m.config).expect("saves");
                let shapes = |d: &std::path::Path| {
                    let bytes = std::fs::read(d.join(peft::WEIGHTS_FILE)).expect("weights");
                    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
                    st.tensors()
                        .into_iter()
                        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
                        .collect::<std::collections::BTreeSet<_>>()
                };
                assert_eq!(
                    shapes(&out.path().join("a")),
                    shapes(&dir.join("peft_adapter")),
                    "{family}: graft writes back PEFT's names, shapes and values"
                );
            }
        }
    }
    // On a dense model the experts' tensors are refused by name.
    let dense = load_family("qwen3", false).model;
    let dir = crate::reference::fixture("families/qwen3_moe");
    let e = peft::load(&dir.join("peft_adapter"), &dense)
        .map(|_| ())
        .expect_err("no experts to adapt")
        .to_string();
    assert!(
        e.contains("layers.0.mlp.") && e.contains("has no") && e.contains("in layer 0"),
        "{e}"
    );
}

/// A graft-made adapter on attention, the router and the experts is the very file PEFT was
/// checked to read (`graft_adapter/`, loaded by `PeftModel.from_pretrained` with every tensor
/// in place), and graft computes PeftModel's logits with it. `GRAFT_WRITE_FIXTURES=1` rewrites
/// `graft_adapter/`; then rerun `scripts/reference/moe_peft.py`.
#[test]
fn a_graft_expert_adapter_is_the_file_peft_reads() {
    use graft_core::adapters::lora::{LoraConfig, TargetModule};
    use graft_core::adapters::peft;
    for family in MOE_FAMILIES {
        let dir = crate::reference::fixture(&format!("families/{family}"));
        let m = load_family(family, false).model;
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: match m.config.mla {
                Some(_) => [TargetModule::QA, TargetModule::KvB],
                None => [TargetModule::Q, TargetModule::V],
            }
            .into_iter()
            .chain([
                TargetModule::Router,
                TargetModule::ExpertsGateUp,
                TargetModule::ExpertsDown,
            ])
            // A shared expert's projections and gate, where there is one, but DeepSeek-V3's:
            // PEFT 0.21.2 reads gate_proj/up_proj/down_proj on deepseek_v3 as the routed
            // experts' (its transformers v4 → v5 conversion) and cannot load them.
            .chain(
                m.config
                    .moe
                    .as_ref()
                    .and_then(|x| x.shared.as_ref())
                    .filter(|s| s.gated)
                    .map_or(Vec::new(), |_| {
                        vec![
                            TargetModule::Gate,
                            TargetModule::Up,
                            TargetModule::Down,
                            TargetModule::SharedExpertGate,
                        ]
                    }),
            )
            .collect(),
            use_rslora: false,
        };
        let adapter = patterned(m.init_adapter(&cfg, 11), &m);
        let out = tempfile::tempdir().expect("temp dir");
        let written = out.path().join("a");
        let config = peft::PeftConfig::from_lora(
            &cfg,
            &format!("core/tests/fixtures/families/{family}"),
            m.config.family,
        );
        peft::save(&written, &adapter, &config, &m.config).expect("saves");
        let fixture = dir.join("graft_adapter");
        if std::env::var_os("GRAFT_WRITE_FIXTURES").is_some() {
            std::fs::create_dir_all(&fixture).expect("fixture dir");
            for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
                std::fs::copy(written.join(f), fixture.join(f)).expect("fixture written");
            }
            continue; // PEFT's logits for it come next, from moe_peft.py
        }
        for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
            assert!(
            std::fs::read(written.join(f)).expect("written")
                == std::fs::read(fixture.join(f)).expect("fixture"),
            "{family} {f}: graft no longer writes the file PEFT was checked on; rewrite it with \
             GRAFT_WRITE_FIXTURES=1 and rerun scripts/reference/moe_peft.py"
        );
        }
        let t = read_fixture(&format!("families/{family}/graft_adapter_peft.safetensors"));
        let (prompts, _) = case_of(family);
        for (i, p) in prompts.iter().enumerate() {
            let got = crate::all_logits(&m, p, Some(&adapter));
            let d = crate::max_abs_diff(&got, &crate::reference::f32s(&t[&format!("p{i}.logits")]));
            assert!(
                d <= 1e-4,
                "{family} prompt {i}: graft vs PeftModel with graft's adapter: {d}"
            );
            eprintln!("graft's expert adapter in PeftModel, {family}, prompt {i}: max |Δ| {d:.1e}");
        }
    }
}

/// GGUF-LoRA holds no router or expert adapters graft could vouch for: refused by name, and
/// the file is not written.
#[test]
fn gguf_lora_export_of_router_or_expert_adapters_is_refused() {
    use graft_core::adapters::gguf_lora;
    let m = load_family("olmoe", true).model;
    let adapter = crate::families::random_adapter(&m, 5);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("a.gguf");
    let e = gguf_lora::save(&path, &adapter, &m)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("layer 0 router") && e.contains("save as PEFT"),
        "{e}"
    );
    assert!(!path.exists());
}

/// A shared expert's adapters are ordinary GGUF-LoRA modules: exported under the names of the
/// base file's `_shexp` tensors, and read back to the same logits.
#[test]
fn gguf_lora_export_of_a_shared_expert_round_trips() {
    use graft_core::adapters::gguf_lora;
    use graft_core::adapters::lora::{LoraConfig, TargetModule};
    use graft_core::formats::gguf::GgufFile;
    let m = load_family("qwen2_moe", true).model;
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: vec![
            TargetModule::Q,
            TargetModule::Gate,
            TargetModule::Up,
            TargetModule::Down,
            TargetModule::SharedExpertGate,
        ],
        use_rslora: false,
    };
    let adapter = patterned(m.init_adapter(&cfg, 5), &m);
    assert_eq!(adapter.modules().count(), 5 * m.config.num_layers);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("a.gguf");
    gguf_lora::save(&path, &adapter, &m).expect("exports");
    let lora = GgufFile::open(&path).expect("GGUF-LoRA");
    let base =
        GgufFile::open(crate::reference::fixture("families/qwen2_moe/model.gguf")).expect("GGUF");
    for i in 0..m.config.num_layers {
        for name in [
            "ffn_gate_shexp",
            "ffn_up_shexp",
            "ffn_down_shexp",
            "ffn_gate_inp_shexp",
        ] {
            let n = format!("blk.{i}.{name}.weight");
            assert!(base.tensor_info(&n).is_some(), "{n} is not in the model");
            for half in ["lora_a", "lora_b"] {
                assert!(
                    lora.tensor_info(&format!("{n}.{half}")).is_some(),
                    "{n}.{half}"
                );
            }
        }
    }
    let back = gguf_lora::load(&path, &m).expect("reads back");
    assert_eq!(back.modules().count(), adapter.modules().count());
    let p = &case_of("qwen2_moe").0[1];
    let want = crate::all_logits(&m, p, Some(&adapter));
    let moved = crate::max_abs_diff(&crate::all_logits(&m, p, None), &want);
    assert!(moved > 0.1, "the adapter moves logits by {moved}");
    let d = crate::max_abs_diff(&crate::all_logits(&m, p, Some(&back)), &want);
    assert!(d <= 1e-5, "read back: {d}");
}

/// A quantized MoE GGUF (the tiny Qwen3-MoE re-encoded as Q8_0 by graft's merge): every
/// expert is a view of its layer's stacked tensor inside the file's memory map, not a copy,
/// and the model computes what the same file expanded to f32 computes.
#[test]
fn quantized_experts_stay_in_the_files_memory_map() {
    use graft_core::adapters::lora::Adapter;
    use graft_core::adapters::merge::merge_gguf;
    use graft_core::formats::gguf::GgufFile;
    use graft_core::load::{load_gguf, LoadOptions};
    use graft_core::quant::mix::FileType;
    let dev = Default::default();
    let base = load_family("qwen3_moe", true).model;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("q8.gguf");
    let file =
        GgufFile::open(crate::reference::fixture("families/qwen3_moe/model.gguf")).expect("GGUF");
    let none = Adapter::<B>::empty(base.layers.len());
    merge_gguf(&file, &base.config, &none, Some(FileType::Q8_0), &path).expect("re-encoded");
    let m = load_gguf::<B>(&path, LoadOptions::default(), &dev)
        .expect("loads")
        .model;
    let mut experts = 0;
    for layer in &m.layers {
        for e in &layer.experts.as_ref().expect("experts").experts {
            for p in [&e.gate, &e.up, &e.down] {
                match &p.base {
                    BaseWeight::Packed(w) => assert!(w.is_mapped(), "an expert was copied"),
                    BaseWeight::Dense(_) => panic!("a Q8_0 expert was expanded"),
                }
                experts += 1;
            }
        }
    }
    assert_eq!(experts, 2 * 8 * 3);
    let (prompts, _) = case_of("qwen3_moe");
    // The same file expanded to f32 on load: the mapped views hold the right rows.
    let dense = load_gguf::<B>(
        &path,
        LoadOptions {
            quantize: graft_core::quant::QuantKind::None,
            ..Default::default()
        },
        &dev,
    )
    .expect("loads")
    .model;
    let want = crate::all_logits(&dense, &prompts[1], None);
    let d = crate::max_abs_diff(&crate::all_logits(&m, &prompts[1], None), &want);
    assert!(d < 1e-3, "mapped Q8_0 vs the same weights in f32: {d}");

    // The same file with each layer's gate and up experts fused into one
    // `ffn_gate_up_exps` ([experts, 2·I, hidden], each expert's gate rows then its up rows)
    // loads to the same model, its experts views of the fused tensor.
    let q8 = GgufFile::open(&path).expect("GGUF");
    let fused_path = dir.path().join("fused.gguf");
    let mut specs = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for info in &q8.tensors {
        let name = &info.name;
        if name.ends_with("ffn_up_exps.weight") {
            continue;
        }
        let mut shape = info.torch_shape();
        let mut bytes = q8.tensor_bytes(info).to_vec();
        let mut out_name = name.clone();
        if name.ends_with("ffn_gate_exps.weight") {
            let up = q8
                .tensor_info(&name.replace("gate_exps", "up_exps"))
                .expect("up experts");
            let (gate, up) = (q8.tensor_bytes(info), q8.tensor_bytes(up));
            let per = gate.len() / shape[0];
            bytes = gate
                .chunks_exact(per)
                .zip(up.chunks_exact(per))
                .flat_map(|(g, u)| g.iter().chain(u).copied())
                .collect();
            shape[1] *= 2;
            out_name = name.replace("ffn_gate_exps", "ffn_gate_up_exps");
        }
        specs.push(graft_core::formats::gguf_write::TensorSpec {
            name: out_name,
            shape,
            ty: info.ty,
        });
        data.push(bytes);
    }
    let meta: Vec<_> = q8
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    graft_core::formats::gguf_write::write_with(&fused_path, &meta, &specs, |i| {
        Ok::<_, std::io::Error>(std::borrow::Cow::Borrowed(data[i].as_slice()))
    })
    .expect("fused copy written");
    let fused = load_gguf::<B>(&fused_path, LoadOptions::default(), &dev)
        .expect("loads")
        .model;
    assert!(GgufFile::open(&fused_path)
        .expect("GGUF")
        .tensor_info("blk.0.ffn_gate_up_exps.weight")
        .is_some());
    for e in &fused.layers[0].experts.as_ref().expect("experts").experts {
        assert!(matches!(&e.up.base, BaseWeight::Packed(w) if w.is_mapped()));
    }
    let d = crate::max_abs_diff(
        &crate::all_logits(&fused, &prompts[1], None),
        &crate::all_logits(&m, &prompts[1], None),
    );
    assert_eq!(d, 0.0, "fused gate/up experts");
    // Expert adapters are not merged into fused experts: refused, naming the tensor.
    let adapter = crate::families::random_adapter(&fused, 3);
    let e = merge_gguf(
        &GgufFile::open(&fused_path).expect("GGUF"),
        &fused.config,
        &adapter,
        None,
        &dir.path().join("merged.gguf"),
    )
    .expect_err("refused")
    .to_string();
    assert!(e.contains("ffn_gate_up_exps") && e.contains("fused"), "{e}");
}

/// GPT-OSS as released, experts in MXFP4 (`model_mxfp4.gguf`, re-encoded by gguf-py): the
/// blocks stay packed in the file's map, and the logits are transformers' with the experts set
/// to those MXFP4 values.
#[test]
fn mxfp4_experts_stay_packed_and_match_transformers() {
    use graft_core::load::{load_gguf, LoadOptions};
    let path = crate::reference::fixture("families/gpt_oss/model_mxfp4.gguf");
    let m = load_gguf::<B>(&path, LoadOptions::default(), &Default::default())
        .expect("loads")
        .model;
    for block in &m.layers {
        let x = block.experts.as_ref().expect("experts");
        for e in &x.experts {
            for p in [&e.gate, &e.up, &e.down] {
                let BaseWeight::Packed(w) = &p.base else {
                    panic!("an MXFP4 expert expanded to f32")
                };
                assert_eq!(w.kind_name(), "MXFP4");
                assert!(w.is_mapped(), "an expert copied out of the file's map");
            }
        }
    }
    let t = read_fixture("families/gpt_oss/reference.safetensors");
    for (i, p) in case_of("gpt_oss").0.iter().enumerate() {
        let d = crate::max_abs_diff(
            &crate::all_logits(&m, p, None),
            &crate::reference::f32s(&t[&format!("p{i}.logits_mxfp4")]),
        );
        assert!(d <= 1e-4, "prompt {i}: {d}");
        eprintln!("gpt_oss with MXFP4 experts, prompt {i}: max |Δ| {d:.1e}");
    }
}
