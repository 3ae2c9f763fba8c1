//! Mixture-of-Experts models against transformers on tiny random Mixtral, Qwen3-MoE and OLMoE
//! (`scripts/reference/moe.py`): beyond the logits (checked with the dense families in
//! `families.rs`), the router picks the experts transformers' router picks, for every token
//! of every layer, from safetensors and from llama.cpp's GGUF; and the experts of a GGUF are
//! views of its one stacked tensor.

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

#[test]
fn routers_choose_the_experts_transformers_chooses_on_every_token() {
    for family in MOE_FAMILIES {
        let (prompts, _) = case_of(family);
        for gguf in [false, true] {
            let m = load_family(family, gguf).model;
            let moe = m.config.moe.as_ref().expect("an MoE config");
            assert_eq!((moe.num_experts, moe.top_k), (8, 2), "{family}");
            let mut tokens_checked = 0;
            for (p, prompt) in prompts.iter().enumerate() {
                let routes = m.expert_choices(prompt);
                assert_eq!(routes.len(), m.config.num_layers, "{family}: sparse layers");
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
            assert_eq!(tokens_checked, 2 * (5 + 13 + 24));
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
        for (a, b) in hf.layers.iter().zip(&gguf.layers) {
            let (a, b) = (
                a.experts.as_ref().expect("experts"),
                b.experts.as_ref().expect("experts"),
            );
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
                merge_to_hf(
                    &base.model,
                    base.tokenizer.as_ref(),
                    &adapter,
                    FloatDtype::F32,
                    &hf,
                    1 << 30,
                )
                .unwrap_or_else(|e| panic!("{family}: {e}"));
                merged.push((
                    "gguf → hf",
                    load_hf_dir::<B>(&hf, LoadOptions::default(), &dev),
                ));
            } else {
                let path = out.path().join("merged");
                merge_hf(&dir, &adapter, Some(FloatDtype::F32), &path, 1 << 30).expect("merge");
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
