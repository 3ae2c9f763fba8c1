//! PEFT adapters: an adapter made by HF PEFT (scripts/reference/peft_adapter.py) loads into
//! graft and gives PeftModel's logits on SmolLM2; malformed or unsupported adapters are refused
//! with the file, tensor and shapes.

use graft_core::adapters::peft::{self, AdapterError};
use graft_core::model::{Logits, SeqInput};
use serde::Deserialize;

use crate::reference::{f32s, fixture, read_fixture};
use crate::smollm2::{gguf_model, reference_diffs};
use crate::{max_abs_diff, values};

const TOLERANCE: f32 = 1e-3;

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    text: String,
    input_ids: Vec<u32>,
    vocab_probe_ids: Vec<usize>,
    max_abs_adapter_effect: f32,
}

#[test]
fn peft_made_adapter_reproduces_peftmodel_logits() {
    let m = &gguf_model().model;
    let (adapter, cfg) = peft::load(&fixture("peft_adapter"), m).expect("PEFT's adapter loads");
    assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
    assert_eq!(
        adapter.modules().count(),
        4 * 7,
        "layers 0, 1, 14, 29 × 7 projections"
    );
    let r: Reference =
        serde_json::from_str(&std::fs::read_to_string(fixture("peft_reference.json")).unwrap())
            .unwrap();
    let t = read_fixture("peft_reference.safetensors");
    let vocab = m.config.vocab_size;
    for (i, p) in r.prompts.iter().enumerate() {
        assert!(
            p.max_abs_adapter_effect > 0.1,
            "the fixture adapter must matter"
        );
        let run = |with: bool| {
            values(m.forward(
                &mut [SeqInput {
                    tokens: &p.input_ids,
                    cache: None,
                    adapter: with.then_some(&adapter),
                }],
                Logits::All,
            ))
        };
        let logits = run(true);
        let n = p.input_ids.len();
        let last_ref = f32s(&t[&format!("p{i}.last_logits")]);
        let (d_last, d_probe) = reference_diffs(&logits, vocab, &p.vocab_probe_ids, &t, i);
        let d_base = max_abs_diff(&run(false)[(n - 1) * vocab..], &last_ref);
        eprintln!("PEFT adapter, prompt {i}: max |Δ| last {d_last:.2e}, probes {d_probe:.2e}; without the adapter {d_base:.2e}");
        assert!(
            d_last <= TOLERANCE && d_probe <= TOLERANCE,
            "prompt {i} ({:?}): {d_last} / {d_probe}",
            p.text
        );
        assert!(
            d_base > 10.0 * TOLERANCE,
            "the base alone must not match: {d_base}"
        );
    }
}

/// A copy of the fixture adapter in a temp dir, with `edit` applied to its config JSON.
fn variant(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("peft_adapter/adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("peft_adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    dir
}

#[test]
fn unsupported_and_malformed_adapters_are_refused_by_name() {
    let m = &gguf_model().model;
    let err = |dir: &std::path::Path| peft::load(dir, m).err().expect("refused").to_string();

    let dora = variant(|c| c["use_dora"] = true.into());
    assert!(err(dora.path()).contains("DoRA"), "{}", err(dora.path()));

    let pickled = variant(|_| {});
    std::fs::rename(
        pickled.path().join("adapter_model.safetensors"),
        pickled.path().join("adapter_model.bin"),
    )
    .unwrap();
    let e = err(pickled.path());
    assert!(
        e.contains("adapter_model.bin") && e.contains("safetensors"),
        "{e}"
    );

    let bad_json = variant(|_| {});
    std::fs::write(
        bad_json.path().join("adapter_config.json"),
        "{\"peft_type\": ",
    )
    .unwrap();
    assert!(matches!(
        peft::load(bad_json.path(), m),
        Err(AdapterError::Config { .. })
    ));

    // A rank-4 q_proj A matrix given 100 input columns: named with both shapes' meaning.
    let wrong = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("peft_adapter/adapter_config.json"),
        wrong.path().join("adapter_config.json"),
    )
    .unwrap();
    let a = vec![0u8; 4 * 100 * 4];
    let b = vec![0u8; 576 * 4 * 4];
    let key = "base_model.model.model.layers.0.self_attn.q_proj";
    let views = vec![
        (
            format!("{key}.lora_A.weight"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 100], &a)
                .unwrap(),
        ),
        (
            format!("{key}.lora_B.weight"),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![576, 4], &b)
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &wrong.path().join("adapter_model.safetensors"))
        .unwrap();
    let e = err(wrong.path());
    assert!(
        e.contains("q_proj.lora_A.weight") && e.contains("[4, 100]") && e.contains("576"),
        "{e}"
    );

    let truncated = variant(|_| {});
    let w = truncated.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(truncated.path());
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("corrupt"),
        "{e}"
    );
}

#[test]
fn graft_saves_what_it_loads() {
    let m = &gguf_model().model;
    let (adapter, cfg) = peft::load(&fixture("peft_adapter"), m).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy");
    peft::save(&out, &adapter, &cfg, &m.config).unwrap();
    let (again, _) = peft::load(&out, m).unwrap();
    for ((l1, t1, w1), (l2, t2, w2)) in adapter.modules().zip(again.modules()) {
        assert_eq!((l1, t1), (l2, t2));
        assert_eq!(values(w1.a.clone()), values(w2.a.clone()));
        assert_eq!(values(w1.b.clone()), values(w2.b.clone()));
        assert_eq!(w1.scale, w2.scale);
    }
    // Saving again over an existing adapter replaces it atomically.
    peft::save(&out, &again, &cfg, &m.config).unwrap();
    assert!(out.join("adapter_model.safetensors").is_file());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary directories left"
    );
}

#[test]
fn gguf_lora_export_round_trips_with_permuted_qk_rows() {
    use graft_core::adapters::gguf_lora;
    use graft_core::formats::gguf::{GgufFile, GgufValue};
    let m = &gguf_model().model;
    let (adapter, _) = peft::load(&fixture("peft_adapter"), m).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.gguf");
    gguf_lora::save(&path, &adapter, m).unwrap();

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.str("general.type").unwrap(), "adapter");
    assert_eq!(f.str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get("adapter.lora.alpha"), Some(&GgufValue::F32(8.0)));
    let a = f
        .tensor_info("blk.14.ffn_down.weight.lora_a")
        .expect("down A");
    assert_eq!(a.torch_shape(), vec![4, 1536], "lora_a is PEFT's [r, in]");
    let b = f.tensor_info("blk.14.attn_k.weight.lora_b").expect("k B");
    assert_eq!(b.torch_shape(), vec![192, 4], "lora_b is PEFT's [out, r]");
    assert!(
        f.tensor_info("blk.2.attn_q.weight.lora_a").is_none(),
        "only the adapted layers"
    );

    // q/k rows of B are in llama.cpp's order: row 1 of head 0 is HF row d/2 = 32.
    let qb = f.tensor_info("blk.0.attn_q.weight.lora_b").unwrap();
    let file_rows = f32s(f.tensor_bytes(qb));
    let peft_rows = values(
        adapter
            .get(0, graft_core::adapters::lora::TargetModule::Q)
            .unwrap()
            .b
            .clone(),
    );
    assert_eq!(&file_rows[4..8], &peft_rows[32 * 4..33 * 4]);
    assert_ne!(file_rows, peft_rows);

    let back = graft_core::adapters::gguf_lora::load(&path, m).unwrap();
    let p = &[1u32, 504, 1235, 314, 2683];
    let run = |ad| {
        values(m.forward(
            &mut [SeqInput {
                tokens: p,
                cache: None,
                adapter: Some(ad),
            }],
            Logits::All,
        ))
    };
    let d = max_abs_diff(&run(&adapter), &run(&back));
    assert!(d <= 1e-5, "GGUF round trip changed logits by {d}");
}
