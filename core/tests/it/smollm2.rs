//! Parity with transformers on the real SmolLM2-135M-Instruct (Q4_1 GGUF): logits of the GGUF
//! and HF-safetensors paths, greedy continuations, tokenizer ids and the chat template.
//!
//! The model comes from `scripts/fetch-model.sh`; the HF directory from `scripts/gguf_to_hf.py`
//! (`scripts/test.sh` makes both). These tests fail, rather than skip, when either is missing.

use std::path::PathBuf;
use std::sync::OnceLock;

use graft_core::generation::sampling::argmax;
use graft_core::load::{load_gguf, load_hf_dir, LoadOptions, LoadedModel};
use graft_core::model::{Logits, Model, SeqCache, SeqInput};
use graft_core::text::chat::{ChatTemplate, Message};
use serde::Deserialize;

use crate::reference::{f32s, fixture, read_fixture};
use crate::{max_abs_diff, values, B};

const TOLERANCE: f32 = 1e-3;
pub const NEAR_TIE: f32 = 0.05;

fn gguf_path() -> PathBuf {
    let p = graft_core::cache::default_model_path();
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-model.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

fn hf_dir() -> PathBuf {
    let p = graft_core::cache::cache_dir().join("models/SmolLM2-135M-Instruct-f32-sharded");
    assert!(
        p.join("config.json").is_file(),
        "{} is missing: run scripts/gguf_to_hf.py (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn gguf_model() -> &'static LoadedModel<B> {
    static M: OnceLock<LoadedModel<B>> = OnceLock::new();
    M.get_or_init(|| {
        load_gguf::<B>(&gguf_path(), LoadOptions::default(), &Default::default()).unwrap()
    })
}

#[derive(Deserialize)]
pub struct Reference {
    pub prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
pub struct Prompt {
    pub text: String,
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// transformers' top-1 minus top-2 logit at each greedy step.
    pub greedy_margins: Vec<f32>,
    pub vocab_probe_ids: Vec<usize>,
}

fn reference() -> Reference {
    reference_of("smollm2")
}

/// `<prefix>_reference.json`, as `scripts/reference/make_fixtures.py` (SmolLM2) and
/// `real_models.py` (Gemma 3, Qwen2.5-Coder) write it.
pub fn reference_of(prefix: &str) -> Reference {
    serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{prefix}_reference.json"))).unwrap(),
    )
    .unwrap()
}

fn check_logits(model: &Model<B>, label: &str) {
    check_logits_of(model, "smollm2", label, TOLERANCE);
}

/// Logits of every reference prompt of fixture `prefix` against transformers (f32): the last
/// position's whole vocabulary and the probe ids at every position, within `tolerance`.
pub fn check_logits_of(model: &Model<B>, prefix: &str, label: &str, tolerance: f32) {
    let r = reference_of(prefix);
    let t = read_fixture(&format!("{prefix}_reference.safetensors"));
    let vocab = model.config.vocab_size;
    for (i, p) in r.prompts.iter().enumerate() {
        let logits = values(model.forward(
            &mut [SeqInput {
                tokens: &p.input_ids,
                cache: None,
                adapter: None,
            }],
            Logits::All,
        ));
        let n = p.input_ids.len();
        let (d_last, d_probe) = reference_diffs(&logits, vocab, &p.vocab_probe_ids, &t, i);
        eprintln!("{label} prompt {i}: max |Δ| last position {d_last:.2e}, probe ids at all {n} positions {d_probe:.2e}");
        assert!(
            d_last <= tolerance && d_probe <= tolerance,
            "{label} prompt {i} ({:?}): {d_last} / {d_probe}",
            p.text
        );
    }
}

/// Max |Δ| between `logits` (`[positions, vocab]`) and a reference fixture's prompt `i`: over
/// the last position's whole vocabulary (`p{i}.last_logits`) and over the probe ids at every
/// position (`p{i}.probe_logits`).
pub fn reference_diffs(
    logits: &[f32],
    vocab: usize,
    probe_ids: &[usize],
    t: &std::collections::BTreeMap<String, Vec<u8>>,
    i: usize,
) -> (f32, f32) {
    let n = logits.len() / vocab;
    let d_last = max_abs_diff(
        &logits[(n - 1) * vocab..],
        &f32s(&t[&format!("p{i}.last_logits")]),
    );
    let probe: Vec<f32> = (0..n)
        .flat_map(|pos| probe_ids.iter().map(move |&v| logits[pos * vocab + v]))
        .collect();
    (
        d_last,
        max_abs_diff(&probe, &f32s(&t[&format!("p{i}.probe_logits")])),
    )
}

#[test]
fn gguf_logits_match_transformers() {
    check_logits(&gguf_model().model, "gguf");
}

#[test]
fn hf_safetensors_logits_match_transformers() {
    let m = load_hf_dir::<B>(&hf_dir(), LoadOptions::default(), &Default::default()).unwrap();
    check_logits(&m.model, "hf-safetensors (sharded)");
}

#[test]
fn greedy_continuations_match_up_to_the_first_near_tie() {
    check_greedy_of(&gguf_model().model, "smollm2");
}

/// Greedy continuations of fixture `prefix`'s prompts equal transformers' token for token up
/// to the first step whose top-2 margin is below [`NEAR_TIE`].
pub fn check_greedy_of(model: &Model<B>, prefix: &str) {
    for p in reference_of(prefix).prompts {
        let mut cache = SeqCache::new();
        let mut input = p.input_ids.clone();
        let mut compared = 0;
        for (step, (&want, &margin)) in p.greedy_ids.iter().zip(&p.greedy_margins).enumerate() {
            let row = values(model.forward(
                &mut [SeqInput {
                    tokens: &input,
                    cache: Some(&mut cache),
                    adapter: None,
                }],
                Logits::Last,
            ));
            let got = argmax(&row);
            if margin < NEAR_TIE {
                break;
            }
            assert_eq!(got, want, "{prefix} prompt {:?}: step {step}", p.text);
            compared += 1;
            input = vec![want];
        }
        eprintln!(
            "{prefix} greedy {:?}: {compared} tokens equal before a near-tie or the end",
            p.text
        );
        assert!(compared > 0 || p.greedy_margins[0] < NEAR_TIE);
    }
}

#[derive(Deserialize)]
struct Tokenization {
    cases: Vec<TokCase>,
    pretokenizer_divergent_cases: Vec<DivergentCase>,
}

/// Texts where transformers' GGUF tokenizer (plain ByteLevel pre-tokenizer) and SmolLM2's own
/// `tokenizer.json` (Digits(individual) then ByteLevel; llama.cpp's `smollm` pre-tokenizer)
/// disagree. graft follows the model's own tokenizer, which the model was trained with.
#[derive(Deserialize)]
struct DivergentCase {
    text: String,
    ids: Vec<u32>,
    ids_smollm_pretokenizer: Vec<u32>,
}

#[derive(Deserialize)]
pub struct TokCase {
    pub text: String,
    pub ids: Vec<u32>,
    pub decoded: String,
}

#[test]
fn tokenizer_from_gguf_matches_transformers() {
    let tok = gguf_model().tokenizer.as_ref().unwrap();
    let t: Tokenization =
        serde_json::from_str(&std::fs::read_to_string(fixture("tokenization.json")).unwrap())
            .unwrap();
    for c in &t.cases {
        assert_eq!(tok.encode(&c.text, false).unwrap(), c.ids, "{:?}", c.text);
        assert_eq!(tok.decode(&c.ids, false).unwrap(), c.decoded);
    }
    for c in &t.pretokenizer_divergent_cases {
        assert_ne!(
            c.ids, c.ids_smollm_pretokenizer,
            "{:?} is listed as divergent",
            c.text
        );
        assert_eq!(
            tok.encode(&c.text, false).unwrap(),
            c.ids_smollm_pretokenizer,
            "{:?}",
            c.text
        );
        assert_eq!(
            tok.decode(&c.ids_smollm_pretokenizer, false).unwrap(),
            c.text
        );
    }
    for r in reference().prompts {
        assert_eq!(
            tok.encode(&r.text, false).unwrap(),
            r.input_ids,
            "{:?}",
            r.text
        );
    }
    assert_eq!(tok.eos_ids, vec![2], "<|im_end|> ends a turn");
}

#[derive(Deserialize)]
pub struct ChatCase {
    pub messages: serde_json::Value,
    #[serde(default)]
    pub tools: Option<serde_json::Value>,
    pub add_generation_prompt: bool,
    pub rendered: String,
}

#[test]
fn chat_template_matches_transformers() {
    let tok = gguf_model().tokenizer.as_ref().unwrap();
    let tmpl = ChatTemplate::new(
        tok.chat_template.as_deref().unwrap(),
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )
    .unwrap();
    let cases: Vec<ChatCase> =
        serde_json::from_str(&std::fs::read_to_string(fixture("chat_template.json")).unwrap())
            .unwrap();
    for c in cases {
        let messages: Vec<Message> = serde_json::from_value(c.messages.clone()).unwrap();
        assert_eq!(
            tmpl.render(&messages, c.add_generation_prompt).unwrap(),
            c.rendered
        );
        assert_eq!(
            tmpl.render_json(&c.messages, None, c.add_generation_prompt)
                .unwrap(),
            c.rendered
        );
    }
}

#[test]
fn quantized_base_stays_near_its_packed_size() {
    let m = &gguf_model().model;
    let file = std::fs::metadata(gguf_path()).unwrap().len() as usize;
    let base = m.base_bytes();
    eprintln!(
        "base weights in memory: {:.1} MiB (GGUF file {:.1} MiB; f32 would be {:.1} MiB)",
        base as f64 / 1048576.0,
        file as f64 / 1048576.0,
        m.config.n_params() as f64 * 4.0 / 1048576.0
    );
    assert!(base <= file, "{base} bytes held for a {file}-byte file");
    assert!(base * 5 < m.config.n_params() * 4);
}
