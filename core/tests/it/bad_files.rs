//! Bad checkpoints give typed errors that name the file and the tensor or key; none panics or
//! allocates what a header merely claims.

use graft_core::formats::gguf::GgufError;
use graft_core::load::{load_gguf, load_hf_dir, LoadError, LoadOptions};

use crate::tiny::*;
use crate::B;

fn tiny_gguf(
    dir: &std::path::Path,
    meta: Vec<(&'static str, Kv)>,
    ty_override: Option<u32>,
) -> std::path::PathBuf {
    let path = dir.join("m.gguf");
    let mut entries = f32_entries(&TinyWeights::random(2).gguf_tensors());
    if let Some(ty) = ty_override {
        entries[0].2 = ty;
    }
    write_gguf(&path, &meta, &entries);
    path
}

fn gguf_err(path: &std::path::Path) -> LoadError {
    match load_gguf::<B>(path, LoadOptions::default(), &Default::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

fn hf_err(dir: &std::path::Path) -> String {
    match load_hf_dir::<B>(dir, LoadOptions::default(), &Default::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_gguf() {
    let d = tempfile::tempdir().unwrap();
    let p = tiny_gguf(d.path(), tiny_metadata(), None);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = gguf_err(&p);
    assert!(
        matches!(e, LoadError::Gguf(GgufError::Truncated { .. })),
        "{e}"
    );
    assert!(
        e.to_string().contains("m.gguf") && e.to_string().contains("tensor '"),
        "{e}"
    );
    // Cut inside the metadata as well.
    std::fs::write(&p, &bytes[..200]).unwrap();
    assert!(matches!(
        gguf_err(&p),
        LoadError::Gguf(GgufError::Truncated { .. })
    ));
}

#[test]
fn wrong_magic_and_huge_counts() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.gguf");
    std::fs::write(&p, b"GGMLxxxxxxxxxxxxxxxxxxxxxxxx").unwrap();
    assert!(matches!(
        gguf_err(&p),
        LoadError::Gguf(GgufError::BadMagic { .. })
    ));
    // A header claiming 2^64-1 metadata entries must be refused before allocating.
    let mut h = Vec::new();
    h.extend(0x4655_4747u32.to_le_bytes());
    h.extend(3u32.to_le_bytes());
    h.extend(0u64.to_le_bytes());
    h.extend(u64::MAX.to_le_bytes());
    std::fs::write(&p, &h).unwrap();
    let e = gguf_err(&p);
    assert!(
        matches!(e, LoadError::Gguf(GgufError::Truncated { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("metadata count"), "{e}");
}

#[test]
fn unsupported_block_type_names_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let p = tiny_gguf(d.path(), tiny_metadata(), Some(16)); // IQ2_XXS
    let e = gguf_err(&p).to_string();
    assert!(
        e.contains("unsupported GGML type id 16") && e.contains("tensor '"),
        "{e}"
    );
}

#[test]
fn unknown_architecture() {
    let d = tempfile::tempdir().unwrap();
    let mut meta = tiny_metadata();
    meta[0] = ("general.architecture", Kv::Str("gpt2".into()));
    let e = gguf_err(&tiny_gguf(d.path(), meta, None)).to_string();
    assert!(e.contains("architecture 'gpt2'"), "{e}");
    let w = TinyWeights::random(2);
    w.write_hf_dir(d.path(), false);
    let cfg = w
        .config_json()
        .replace("\"llama\"", "\"gpt2\"")
        .replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    let e = hf_err(d.path());
    assert!(
        e.contains("GPT2LMHeadModel") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn shape_that_disagrees_with_the_config() {
    let d = tempfile::tempdir().unwrap();
    let w = TinyWeights::random(2);
    w.write_hf_dir(d.path(), false);
    let cfg = w
        .config_json()
        .replace("\"intermediate_size\":128", "\"intermediate_size\":100");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    let e = hf_err(d.path());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[128, 64]")
            && e.contains("[100, 64]"),
        "{e}"
    );
}

#[test]
fn missing_tensor_and_missing_key() {
    let d = tempfile::tempdir().unwrap();
    let mut w = TinyWeights::random(2);
    w.tensors.remove("model.norm.weight");
    w.write_hf_dir(d.path(), false);
    let e = hf_err(d.path());
    assert!(
        e.contains("'model.norm.weight' is missing") && e.contains("model.safetensors"),
        "{e}"
    );
    let mut meta = tiny_metadata();
    meta.retain(|(k, _)| *k != "llama.block_count");
    let e = gguf_err(&tiny_gguf(d.path(), meta, None)).to_string();
    assert!(e.contains("'llama.block_count' is missing"), "{e}");
}

#[test]
fn corrupt_safetensors_header() {
    let d = tempfile::tempdir().unwrap();
    TinyWeights::random(2).write_hf_dir(d.path(), false);
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = hf_err(d.path());
    assert!(
        e.contains("corrupt safetensors") && e.contains("model.safetensors"),
        "{e}"
    );
    std::fs::write(d.path().join("config.json"), "{not json").unwrap();
    assert!(hf_err(d.path()).contains("config.json: invalid JSON"));
}
