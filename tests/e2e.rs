//! Across binaries: `graft-train` fine-tunes SmolLM2 (Q4_1 GGUF, packed base) on the bundled
//! capitals data, then `graft-serve generate --adapter` answers in the trained style while the
//! base model alone does not.

use std::path::PathBuf;
use std::process::Command;

fn bin(name: &str) -> PathBuf {
    // This test binary lives in <target>/<profile>/deps; the workspace binaries one level up.
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not built (run cargo test --workspace)",
        p.display()
    );
    p
}

fn gguf_path() -> PathBuf {
    let p = graft_core::cache::default_model_path();
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

fn answer(adapter: Option<&PathBuf>, question: &str) -> String {
    let mut cmd = Command::new(bin("graft-serve"));
    cmd.arg("generate").arg("--model").arg(gguf_path());
    cmd.args([
        "--chat",
        "--prompt",
        question,
        "--temperature",
        "0",
        "--max-tokens",
        "16",
    ]);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    let out = cmd.output().expect("spawn graft-serve");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 answer")
}

#[test]
fn train_then_generate_with_the_adapter() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(bin("graft-train"))
        .arg(repo.join("configs/quickstart.toml"))
        .arg("--set")
        .arg(format!(
            "model.base={:?}",
            gguf_path().display().to_string()
        ))
        .arg("--set")
        .arg(format!(
            "output.runs_dir={:?}",
            dir.path().display().to_string()
        ))
        .args([
            "--set",
            "train.max_steps=12",
            "--set",
            "train.eval_samples=0",
            "--set",
            "output.name=\"e2e\"",
        ])
        .output()
        .expect("spawn graft-train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adapter = dir.path().join("e2e/adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());

    // Kenya is in the training data, Jamaica is not: the style must carry over.
    for (country, capital) in [("Kenya", "Nairobi"), ("Jamaica", "Kingston")] {
        let q = format!("What is the capital of {country}?");
        let tuned = answer(Some(&adapter), &q);
        assert!(
            tuned.contains(&format!("Capital of {country}:")),
            "tuned answer {tuned:?}"
        );
        assert!(tuned.contains("[graft]"), "tuned answer {tuned:?}");
        if country == "Kenya" {
            assert!(tuned.contains(capital), "tuned answer {tuned:?}");
        }
        let base = answer(None, &q);
        assert!(
            !base.contains("[graft]"),
            "the base model already answers in the style: {base:?}"
        );
    }
}
