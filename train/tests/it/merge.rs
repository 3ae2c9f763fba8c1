//! `graft-train merge` as users run it: on the tiny Qwen2 fixture (a GGUF and an HF directory
//! of the same f32 weights, with an adapter made by HF PEFT) the merged model's logits equal
//! the base with the adapter, GGUF → GGUF, HF → HF and GGUF → HF; a target the base cannot
//! give, a bad quantization name and an occupied output directory are refused by name.

use std::path::PathBuf;

use graft_train::merge::{merge_cmd, MergeTarget};

use crate::{graft_train, repo_root, stderr};

fn family(name: &str) -> PathBuf {
    repo_root().join("core/tests/fixtures/families").join(name)
}

#[test]
fn merges_check_themselves_against_the_adapter_on_both_formats() {
    let dir = family("qwen2");
    let adapter = dir.join("peft_adapter");
    let out = tempfile::tempdir().expect("temp dir");
    let gguf = MergeTarget::Gguf {
        path: out.path().join("m.gguf"),
        quant: None,
    };
    let hf = |name: &str| MergeTarget::Hf {
        dir: out.path().join(name),
        dtype: Some(graft_core::formats::safetensors_write::FloatDtype::F32),
        max_shard_bytes: 1 << 30,
    };
    for (target, base) in [
        (gguf, dir.join("model.gguf")),
        (hf("hf"), dir.clone()),
        (hf("hf-from-gguf"), dir.join("model.gguf")),
    ] {
        let (summary, check) =
            merge_cmd(&adapter, &target, Some(base.display().to_string()), true).expect("merge");
        let check = check.expect("checked");
        assert_eq!(summary.merged, 14, "7 projections × 2 layers");
        assert!(check.max_abs <= 1e-4, "{target:?}: {check:?}");
        assert_eq!(check.top1_same, check.positions, "{target:?}");
    }
}

#[test]
fn impossible_merges_are_refused_by_name() {
    let dir = family("qwen2");
    let adapter = dir.join("peft_adapter");
    let out = tempfile::tempdir().expect("temp dir");
    let a = adapter.to_str().expect("utf-8");
    let hf_out = out.path().join("hf");
    // the rope factors of the tiny Llama's GGUF have no config.json form
    let llama = family("llama");
    let o = graft_train(&[
        "merge",
        llama.join("peft_adapter").to_str().expect("utf-8"),
        "--model",
        llama.join("model.gguf").to_str().expect("utf-8"),
        "--out",
        hf_out.to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("rope_freqs"), "{}", stderr(&o));
    let o = graft_train(&[
        "merge",
        a,
        "--model",
        dir.to_str().expect("utf-8"),
        "--gguf",
        "x.gguf",
    ]);
    assert!(
        stderr(&o).contains("needs a GGUF base model"),
        "{}",
        stderr(&o)
    );
    let o = graft_train(&["merge", a, "--gguf", "x.gguf", "--quant", "q3_k_s"]);
    assert!(
        stderr(&o).contains("unknown GGUF quantization 'q3_k_s'"),
        "{}",
        stderr(&o)
    );
    let o = graft_train(&["merge", a]);
    assert!(stderr(&o).contains("--gguf"), "{}", stderr(&o));
    std::fs::create_dir_all(&hf_out).expect("dir");
    std::fs::write(hf_out.join("keep.txt"), "user file").expect("file");
    let o = graft_train(&[
        "merge",
        a,
        "--model",
        dir.to_str().expect("utf-8"),
        "--out",
        hf_out.to_str().expect("utf-8"),
        "--no-check",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not an empty directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(hf_out.join("keep.txt")).expect("still there"),
        "user file"
    );
}
