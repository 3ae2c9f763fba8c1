//! Merging an adapter into its base (`adapters::merge`): the merged model computes what the
//! base with the adapter computes, in every family and both formats; a merged GGUF in a
//! llama.cpp type mix reads back in gguf-py with the bytes gguf-py's own quantizer writes; the
//! Q4_K_M mix rules reproduce the tensor types of real llama.cpp Q4_K_M files.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use graft_core::adapters::merge::{merge_gguf, merge_hf, merge_to_hf};
use graft_core::adapters::peft;
use graft_core::formats::gguf::GgufFile;
use graft_core::formats::safetensors_write::FloatDtype;
use graft_core::load::{load_gguf, load_hf_dir, LoadOptions};
use graft_core::model::Model;
use graft_core::quant::mix::{FileType, Mix, TensorRef};
use graft_core::quant::GgmlType;
use serde_json::Value;

use crate::families::{load_family, FAMILIES};
use crate::reference::{f32s, fixture, read_fixture};
use crate::{all_logits, max_abs_diff, values, B};

fn prompt(m: &Model<B>) -> Vec<u32> {
    (0..24)
        .map(|i| (i * 37 + 5) % m.config.vocab_size as u32)
        .collect()
}

#[test]
fn merged_models_compute_what_base_plus_adapter_computes_in_every_family() {
    let dev = Default::default();
    for family in FAMILIES {
        let dir = fixture(&format!("families/{family}"));
        for gguf in [true, false] {
            let base = load_family(family, gguf).model;
            let (adapter, _) = peft::load(&dir.join("peft_adapter"), &base).expect("adapter");
            let tokens = prompt(&base);
            let want = all_logits(&base, &tokens, Some(&adapter));
            let out = tempfile::tempdir().expect("temp dir");
            let merged = if gguf {
                let path = out.path().join("merged.gguf");
                let file = GgufFile::open(dir.join("model.gguf")).expect("base GGUF");
                let s = merge_gguf(&file, &base.config, &adapter, None, &path).expect("merge");
                assert_eq!(s.merged, adapter.modules().count());
                assert_eq!(
                    s.types.keys().collect::<Vec<_>>(),
                    ["F32"],
                    "{family}: kept F32"
                );
                load_gguf::<B>(&path, LoadOptions::default(), &dev)
            } else {
                let path = out.path().join("merged");
                let s = merge_hf(
                    &dir,
                    &base.config,
                    &adapter,
                    Some(FloatDtype::F32),
                    &path,
                    1 << 30,
                )
                .expect("merge");
                assert_eq!(s.files, [path.join("model.safetensors")]);
                for f in ["config.json", "tokenizer.json", "generation_config.json"] {
                    assert!(path.join(f).is_file(), "{family}: {f} copied");
                }
                load_hf_dir::<B>(&path, LoadOptions::default(), &dev)
            }
            .unwrap_or_else(|e| panic!("{family}: the merged model loads: {e}"));
            let got = all_logits(&merged.model, &tokens, None);
            let d = max_abs_diff(&got, &want);
            assert!(d <= 1e-4, "{family} (gguf {gguf}): merged vs unmerged {d}");
            // and the merge did something: the base alone is far from it
            let moved = max_abs_diff(&all_logits(&base, &tokens, None), &want);
            assert!(
                moved > 0.05,
                "{family}: the adapter moves logits by {moved}"
            );
        }
    }
}

/// A GGUF base merged into an HF directory (config.json and tokenizer files written from the
/// model) loads back to the same logits as the GGUF with the adapter, in every family whose
/// config.json can say what the GGUF holds; Llama's GGUF keeps llama3 rope scaling only as
/// per-frequency factors, which is refused by name.
#[test]
fn gguf_bases_merge_into_hf_directories() {
    let dev = Default::default();
    for family in FAMILIES {
        let dir = fixture(&format!("families/{family}"));
        let base = load_family(family, true);
        let (adapter, _) = peft::load(&dir.join("peft_adapter"), &base.model).expect("adapter");
        let out = tempfile::tempdir().expect("temp dir");
        let path = out.path().join("hf");
        let r = merge_to_hf(
            &base.model,
            base.tokenizer.as_ref(),
            &adapter,
            FloatDtype::F32,
            &path,
            1 << 30,
        );
        if family == "llama" {
            let e = r.expect_err("rope factors").to_string();
            assert!(e.contains("rope_freqs"), "{e}");
            continue;
        }
        let s = r.unwrap_or_else(|e| panic!("{family}: {e}"));
        assert_eq!(s.merged, adapter.modules().count(), "{family}");
        let merged = load_hf_dir::<B>(&path, LoadOptions::default(), &dev)
            .unwrap_or_else(|e| panic!("{family}: the HF directory loads: {e}"));
        // config.json writes the GGUF's f32 epsilon as the decimal it came from
        let (mut got, want) = (merged.model.config.clone(), base.model.config.clone());
        assert!((got.rms_norm_eps - want.rms_norm_eps).abs() <= 1e-6 * want.rms_norm_eps);
        got.rms_norm_eps = want.rms_norm_eps;
        assert_eq!(
            format!("{got:?}"),
            format!("{want:?}"),
            "{family}: config.json says what the GGUF said"
        );
        let tokens = prompt(&base.model);
        let d = max_abs_diff(
            &all_logits(&merged.model, &tokens, None),
            &all_logits(&base.model, &tokens, Some(&adapter)),
        );
        assert!(d <= 1e-4, "{family}: {d}");
        let (t0, t1) = (
            base.tokenizer.as_ref().expect("GGUF tokenizer"),
            merged.tokenizer.as_ref().expect("tokenizer.json written"),
        );
        let text = "Hello world, graft merges adapters.";
        assert_eq!(
            t1.encode(text, true).expect("encodes"),
            t0.encode(text, true).expect("encodes"),
            "{family}: same ids, BOS included"
        );
        assert_eq!(t1.eos_ids, t0.eos_ids, "{family}");
        assert_eq!(t1.chat_template, t0.chat_template, "{family}");
    }
}

/// graft's merged weights are PEFT's `merge_and_unload` weights (`scripts/reference/peft_merge.py`),
/// from the HF directory and, with llama.cpp's q/k row order undone, from the GGUF.
#[test]
fn merged_weights_equal_peft_merge_and_unload() {
    let dev = Default::default();
    for family in ["llama", "phi3", "qwen2"] {
        let dir = fixture(&format!("families/{family}"));
        let want = read_fixture(&format!("families/{family}/peft_merged.safetensors"));
        let base = load_family(family, false).model;
        let (adapter, _) = peft::load(&dir.join("peft_adapter"), &base).expect("adapter");
        let out = tempfile::tempdir().expect("temp dir");
        merge_hf(
            &dir,
            &base.config,
            &adapter,
            Some(FloatDtype::F32),
            &out.path().join("hf"),
            1 << 30,
        )
        .expect("HF merge");
        let got = std::fs::read(out.path().join("hf/model.safetensors")).expect("merged");
        let got = safetensors::SafeTensors::deserialize(&got).expect("safetensors");
        let gguf_path = out.path().join("m.gguf");
        let file = GgufFile::open(dir.join("model.gguf")).expect("base GGUF");
        merge_gguf(&file, &base.config, &adapter, None, &gguf_path).expect("GGUF merge");
        let from_gguf = load_gguf::<B>(&gguf_path, LoadOptions::default(), &dev).expect("loads");
        let mut weights = 0;
        for (name, bytes) in &want {
            let peft = f32s(bytes);
            let ours = f32s(got.tensor(name).expect("same tensor names").data());
            let d = max_abs_diff(&ours, &peft);
            assert!(d <= 1e-5, "{family} {name} (HF): {d}");
            let Some(stem) = name.strip_suffix(".weight") else {
                continue;
            };
            // model.layers.{i}.{self_attn|mlp}.{module}
            let parts: Vec<&str> = stem.split('.').collect();
            let layer: usize = parts[2].parse().expect("layer");
            let t = parts[4].parse().expect("a target module");
            let w = from_gguf.model.layers[layer]
                .proj(t)
                .expect("projection")
                .weight(&dev);
            let d = max_abs_diff(&values(w), &peft);
            assert!(d <= 1e-5, "{family} {name} (GGUF): {d}");
            weights += 1;
        }
        assert_eq!(weights, adapter.modules().count(), "{family}");
    }
}

#[test]
fn hf_merges_shard_and_convert_dtype() {
    let dir = fixture("families/qwen2");
    let dev = Default::default();
    let base = load_family("qwen2", false).model;
    let (adapter, _) = peft::load(&dir.join("peft_adapter"), &base).expect("adapter");
    let out = tempfile::tempdir().expect("temp dir");
    let path = out.path().join("merged");
    let s = merge_hf(
        &dir,
        &base.config,
        &adapter,
        Some(FloatDtype::BF16),
        &path,
        100_000,
    )
    .expect("merge");
    assert!(s.files.len() > 1, "{:?}", s.files);
    assert_eq!(s.types.keys().collect::<Vec<_>>(), ["BF16"]);
    let config: Value =
        serde_json::from_slice(&std::fs::read(path.join("config.json")).expect("config"))
            .expect("json");
    let key = if config.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    assert_eq!(config[key], "bfloat16");
    let merged = load_hf_dir::<B>(&path, LoadOptions::default(), &dev).expect("loads");
    let tokens = prompt(&base);
    let want = all_logits(&base, &tokens, Some(&adapter));
    let d = max_abs_diff(&all_logits(&merged.model, &tokens, None), &want);
    // bf16 weights (8 bits of mantissa, norms and embeddings too): within 2% of the logits'
    // range (measured 1.3%)
    let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    assert!(
        d < 0.02 * scale,
        "bf16 merge moved logits by {d} (largest {scale})"
    );
    // Each bf16 value is the f32 merge rounded to nearest even.
    let f32_path = out.path().join("f32");
    merge_hf(
        &dir,
        &base.config,
        &adapter,
        Some(FloatDtype::F32),
        &f32_path,
        1 << 30,
    )
    .expect("f32 merge");
    let f32_bytes = std::fs::read(f32_path.join("model.safetensors")).expect("f32 file");
    let exact = safetensors::SafeTensors::deserialize(&f32_bytes).expect("safetensors");
    let mut checked = 0;
    for shard in &s.files {
        let bytes = std::fs::read(shard).expect("shard");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        for (name, t) in st.tensors() {
            let x = exact.tensor(&name).expect("same tensors");
            let want: Vec<u8> = x
                .data()
                .chunks_exact(4)
                .flat_map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
                })
                .collect();
            assert_eq!(t.data(), &want[..], "{name}");
            checked += 1;
        }
    }
    assert_eq!(checked, s.tensors);
    // A second merge into the same, now non-empty, directory is refused by name.
    let err = merge_hf(&dir, &base.config, &adapter, None, &path, 1 << 30).expect_err("not empty");
    assert!(err.to_string().contains("not an empty directory"), "{err}");
}

fn gguf_py(args: &[&Path]) -> Value {
    let python = graft_core::cache::cache_dir().join("venv-tools/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/prepare-test-models.sh",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/gguf_readback.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "gguf_readback.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from gguf_readback.py")
}

#[test]
fn quantized_merges_read_back_in_gguf_py_with_its_own_bytes() {
    let dir = fixture("families/llama");
    let file = GgufFile::open(dir.join("model.gguf")).expect("base GGUF");
    let base = load_family("llama", true).model;
    let (adapter, _) = peft::load(&dir.join("peft_adapter"), &base).expect("adapter");
    let out = tempfile::tempdir().expect("temp dir");
    let f32_path = out.path().join("f32.gguf");
    merge_gguf(
        &file,
        &base.config,
        &adapter,
        Some(FileType::F32),
        &f32_path,
    )
    .expect("f32");
    for quant in [
        FileType::Q8_0,
        FileType::Q5_1,
        FileType::Q5_0,
        FileType::Q4_1,
        FileType::Q4_0,
        FileType::F16,
        FileType::BF16,
    ] {
        let path = out.path().join(format!("{quant}.gguf"));
        let s = merge_gguf(&file, &base.config, &adapter, Some(quant), &path).expect("merge");
        let ours = GgufFile::open(&path).expect("graft reads it");
        let py = gguf_py(&[&path, &f32_path]);
        // Metadata carried over: the same keys as the base, file type set.
        let keys: Vec<&String> = py["metadata"].as_object().expect("object").keys().collect();
        for k in file
            .metadata
            .keys()
            .filter(|k| k.as_str() != "general.alignment")
        {
            assert!(keys.contains(&k), "{quant}: metadata {k} lost");
        }
        assert_eq!(py["metadata"]["general.file_type"], quant.id());
        assert_eq!(
            ours.tensors.len(),
            py["tensors"].as_object().expect("object").len()
        );
        let mut types = BTreeMap::new();
        for info in &ours.tensors {
            let t = &py["tensors"][&info.name];
            assert_eq!(
                t["type"],
                format!("{:?}", info.ty),
                "{quant}: {}",
                info.name
            );
            assert_eq!(t["shape"], serde_json::json!(info.torch_shape()));
            *types.entry(format!("{:?}", info.ty)).or_insert(0) += 1;
            if info.ty != GgmlType::F32 {
                // gguf-py writes Q8_0, Q5_x, Q4_x, F16 and BF16 itself: the bytes must agree.
                assert_eq!(
                    t["same_bytes_as_gguf_py"], true,
                    "{quant}: {} ({:?}) differs from gguf-py's quantize",
                    info.name, info.ty
                );
            }
        }
        assert_eq!(
            types,
            s.types.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            "{quant}"
        );
        assert!(
            types.contains_key(&format!("{:?}", quant.default_type())),
            "{quant}: {types:?}"
        );
        // The norms stay F32, as llama-quantize leaves them.
        assert_eq!(
            ours.tensor_info("blk.0.attn_norm.weight").expect("norm").ty,
            GgmlType::F32
        );
    }
}

/// The Q4_K_M rules applied to a real llama.cpp Q4_K_M file's own tensors give back each
/// tensor's type in that file. (That graft's order is today's llama-quantize's is checked by
/// `scripts/reference/merged_gguf_llama_cpp.sh`: byte-identical files.)
#[test]
fn q4_k_m_rules_reproduce_real_llama_cpp_q4_k_m_files() {
    for name in [
        "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        "gemma-3-270m-Q4_K_M.gguf",
    ] {
        let path = graft_core::cache::cache_dir().join("models").join(name);
        let f = GgufFile::open(&path)
            .unwrap_or_else(|e| panic!("{e}: run scripts/prepare-test-models.sh"));
        let arch = f.str("general.architecture").expect("arch").to_string();
        let layers = f.u64(&format!("{arch}.block_count")).expect("layers") as usize;
        let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
        let mut mix = Mix::new(FileType::Q4_K_M, layers, names.iter().copied());
        let mut seen = BTreeMap::new();
        // These files were made by a llama-quantize that visited tensors in file order (today's
        // sorts them by layer number first, which graft follows when it writes: see
        // quantize_order); the rules are the same, so file order reproduces them.
        for t in &f.tensors {
            let shape = t.torch_shape();
            let ty = mix.tensor_type(TensorRef {
                name: &t.name,
                shape: &shape,
                // what the converter wrote before quantizing: F32 for 1-D tensors
                ty: if shape.len() == 1 {
                    t.ty
                } else {
                    GgmlType::F32
                },
            });
            assert_eq!(ty, t.ty, "{name}: {} {shape:?}", t.name);
            *seen.entry(format!("{ty:?}")).or_insert(0) += 1;
        }
        assert!(
            seen.contains_key("Q6_K") && seen.len() >= 3,
            "{name}: {seen:?}"
        );
    }
}
