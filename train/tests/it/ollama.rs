//! Ollama as users have it: a store laid out as `ollama pull` leaves it (manifest JSON +
//! sha256-named blobs, here holding the tiny Qwen2 fixture) is read through
//! `--model ollama:NAME:TAG` by training, merging and exporting, and `export --ollama` writes
//! the GGUF-LoRA with a Modelfile that names the base, the adapter, the template and the stop
//! strings.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{repo_root, stderr};

const TEMPLATE: &str = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

/// An Ollama store with `graft-test/tiny-qwen:v1` = the tiny Qwen2 GGUF, a ChatML template and
/// a stop parameter.
fn store(root: &Path) -> PathBuf {
    let store = root.join("ollama");
    let blobs = store.join("blobs");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let model = repo_root().join("core/tests/fixtures/families/qwen2/model.gguf");
    let mut layers = vec![];
    let params = r#"{"stop":["<|im_end|>","<|endoftext|>"]}"#;
    let staged = [
        ("model", std::fs::read(&model).expect("model")),
        ("template", TEMPLATE.as_bytes().to_vec()),
        ("params", params.as_bytes().to_vec()),
    ];
    for (kind, bytes) in staged {
        let tmp = blobs.join("incoming");
        std::fs::write(&tmp, &bytes).expect("blob");
        let hex = sha256(&tmp);
        std::fs::rename(&tmp, blobs.join(format!("sha256-{hex}"))).expect("rename");
        layers.push(serde_json::json!({
            "mediaType": format!("application/vnd.ollama.image.{kind}"),
            "digest": format!("sha256:{hex}"),
            "size": bytes.len(),
        }));
    }
    let dir = store.join("manifests/registry.ollama.ai/graft-test/tiny-qwen");
    std::fs::create_dir_all(&dir).expect("manifests");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "layers": layers,
    });
    std::fs::write(dir.join("v1"), manifest.to_string()).expect("manifest");
    store
}

fn run(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_graft-train"))
        .args(args)
        .env("OLLAMA_MODELS", store)
        .output()
        .expect("spawn graft-train")
}

#[test]
fn ollama_models_train_merge_and_export_with_a_modelfile() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = store(tmp.path());
    let adapter = repo_root().join("core/tests/fixtures/families/qwen2/peft_adapter");
    let a = adapter.to_str().expect("utf-8");
    let base = "ollama:graft-test/tiny-qwen:v1";

    // export --ollama: adapter.gguf + Modelfile with the Ollama model's template and stops
    let out = tmp.path().join("for-ollama");
    let o = run(
        &store,
        &[
            "export",
            a,
            "--model",
            base,
            "--ollama",
            out.to_str().expect("utf-8"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let modelfile = std::fs::read_to_string(out.join("Modelfile")).expect("Modelfile");
    assert!(
        modelfile.contains("\nFROM graft-test/tiny-qwen:v1\n"),
        "{modelfile}"
    );
    assert!(
        modelfile.contains("\nADAPTER ./adapter.gguf\n"),
        "{modelfile}"
    );
    assert!(
        modelfile.contains(&format!("\nTEMPLATE \"\"\"{TEMPLATE}\"\"\"\n")),
        "{modelfile}"
    );
    assert!(
        modelfile.contains("\nPARAMETER stop \"<|im_end|>\"\nPARAMETER stop \"<|endoftext|>\"\n"),
        "{modelfile}"
    );
    let f = graft_core::formats::gguf::GgufFile::open(out.join("adapter.gguf")).expect("GGUF-LoRA");
    assert_eq!(f.str("adapter.type").expect("type"), "lora");
    assert_eq!(f.str("general.architecture").expect("arch"), "qwen2");

    // export --ollama from a plain GGUF base: FROM its absolute path, stop = its EOS token
    let gguf = repo_root().join("core/tests/fixtures/families/qwen2/model.gguf");
    let out2 = tmp.path().join("for-ollama-2");
    let o = run(
        &store,
        &[
            "export",
            a,
            "--model",
            gguf.to_str().expect("utf-8"),
            "--ollama",
            out2.to_str().expect("utf-8"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let modelfile = std::fs::read_to_string(out2.join("Modelfile")).expect("Modelfile");
    let abs = std::path::absolute(&gguf).expect("absolute");
    assert!(
        modelfile.contains(&format!("\nFROM {}\n", abs.display())),
        "{modelfile}"
    );
    assert!(!modelfile.contains("TEMPLATE"), "{modelfile}");
    assert!(modelfile.contains("PARAMETER stop \""), "{modelfile}");

    // merge reads the Ollama blob
    let merged = tmp.path().join("m.gguf");
    let o = run(
        &store,
        &[
            "merge",
            a,
            "--model",
            base,
            "--gguf",
            merged.to_str().expect("utf-8"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("max |Δ logit| 0.0000"),
        "{}",
        stderr(&o)
    );

    // training on it (two steps)
    let data = tmp.path().join("text.jsonl");
    std::fs::write(&data, "{\"text\": \"one two three four\"}\n".repeat(8)).expect("data");
    let config = repo_root().join("configs/quickstart.toml");
    let o = run(
        &store,
        &[
            config.to_str().expect("utf-8"),
            "--set",
            &format!("model.base={base:?}"),
            "--set",
            &format!("data.train={:?}", data.display().to_string()),
            "--set",
            "data.format=\"text\"",
            "--set",
            "data.train_on=\"all\"",
            "--set",
            "data.eval_fraction=0.0",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.eval_every=0",
            "--set",
            "train.save_every=0",
            "--set",
            "train.eval_samples=0",
            "--set",
            &format!("output.runs_dir={:?}", tmp.path().display().to_string()),
            "--set",
            "output.name=\"from-ollama\"",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(tmp
        .path()
        .join("from-ollama/adapter/adapter_model.safetensors")
        .is_file());

    // a name the store does not have is refused naming the manifest it looked for
    let o = run(
        &store,
        &["merge", a, "--model", "ollama:nope", "--gguf", "x.gguf"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("manifests/registry.ollama.ai/library/nope/latest"),
        "{}",
        stderr(&o)
    );
}
