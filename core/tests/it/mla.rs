//! Multi-head latent attention (the tiny DeepSeek-V3 of `scripts/reference/moe.py`): the
//! cache holds each token's latent and rotary key, not per-head keys and values. (Logits,
//! cached decoding and ragged batches against transformers are in `families.rs`.)

use graft_core::model::{Logits, SeqCache, SeqInput};

use crate::families::{case_of, load_family};
use crate::reference::{f32s, fixture, read_fixture};
use crate::{all_logits, max_abs_diff, B};

#[test]
fn the_cache_holds_latents_not_expanded_keys_and_values() {
    for gguf in [false, true] {
        let m = load_family("deepseek_v3", gguf).model;
        let c = &m.config;
        let a = c.mla.as_ref().expect("latent attention");
        let prompt = &case_of("deepseek_v3").0[1];
        let mut cache = SeqCache::new();
        m.forward(
            &mut [SeqInput {
                tokens: prompt,
                cache: Some(&mut cache),
                adapter: None,
            }],
            Logits::Last,
        );
        let per_token = a.kv_lora_rank + a.qk_rope_dim;
        assert_eq!(
            cache.n_values(),
            prompt.len() * c.num_layers * per_token,
            "gguf {gguf}"
        );
        // What expanded keys and values would hold instead: 4× as much here, 71× for
        // DeepSeek-V3's 128 heads of 192 + 128 over a 512 + 64 latent.
        let expanded = c.num_heads * (a.qk_nope_dim + a.qk_rope_dim + a.v_head_dim);
        assert_eq!(expanded, 4 * per_token);
    }
}

/// DeepSeek-V3's YaRN (`mscale_all_dim` scales the attention scores by `mscale²` besides the
/// rope's own attention factor): the tiny model with YaRN rope parameters in its `config.json`
/// gives transformers' logits for them.
#[test]
fn yarn_with_mscale_all_dim_matches_transformers() {
    use graft_core::load::{load_hf_dir, LoadOptions};
    let dir = fixture("families/deepseek_v3");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"),
    )
    .expect("json");
    let yarn = reference["yarn"]["rope_parameters"].clone();
    assert_eq!(yarn["rope_type"], "yarn");
    let tmp = tempfile::tempdir().expect("temp dir");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).expect("copied");
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).expect("config.json"),
    )
    .expect("json");
    config["rope_parameters"] = yarn;
    std::fs::write(tmp.path().join("config.json"), config.to_string()).expect("written");
    let m = load_hf_dir::<B>(tmp.path(), LoadOptions::default(), &Default::default())
        .expect("loads")
        .model;
    let plain = 1.0 / 24f32.sqrt();
    assert!(m.config.attention_scale > plain * 1.2, "mscale² applies");
    let t = read_fixture("families/deepseek_v3/reference.safetensors");
    for (i, p) in case_of("deepseek_v3").0.iter().enumerate() {
        let d = max_abs_diff(
            &all_logits(&m, p, None),
            &f32s(&t[&format!("p{i}.logits_yarn")]),
        );
        assert!(d <= 1e-4, "prompt {i}: {d}");
        eprintln!("deepseek_v3 with YaRN, prompt {i}: max |Δ| {d:.1e}");
    }
}
