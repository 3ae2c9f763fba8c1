//! Every example config in configs/ loads, and bad configs are refused before any work with
//! the file, line, key and value.

use crate::{gguf_path, graft_train, repo_root, stderr, write_config};

#[test]
fn every_example_config_loads_and_prepares_its_data() {
    let base = format!("model.base={:?}", gguf_path().display().to_string());
    let mut n = 0;
    for entry in std::fs::read_dir(repo_root().join("configs")).expect("configs dir") {
        let path = entry.expect("entry").path();
        let serve_config = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("serve"));
        if path.extension().and_then(|e| e.to_str()) != Some("toml") || serve_config {
            continue; // serve*.toml are graft-serve's, loaded by its tests
        }
        let out = graft_train(&["data", path.to_str().expect("utf-8 path"), "--set", &base]);
        assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("trained"), "{}: {stdout}", path.display());
        n += 1;
    }
    assert!(n >= 1, "no example configs found");
}

fn refused(extra_top: &str, train_extra: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), train_extra);
    if !extra_top.is_empty() {
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(
            &path,
            text.replace("[lora]\n", &format!("[lora]\n{extra_top}\n")),
        )
        .expect("write");
    }
    let out = graft_train(&[path.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        !dir.path().join("runs").exists(),
        "a run started on a bad config"
    );
    let e = stderr(&out);
    assert!(e.contains("tiny.toml"), "file not named: {e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn bad_values_name_the_line_key_and_value() {
    // [lora] starts on line 4; the inserted key is line 5.
    let e = refused("dropout = 1.5", "");
    assert!(
        e.contains("line 5") && e.contains("lora.dropout = 1.5"),
        "{e}"
    );
    let e = refused("", "warmup_steps = -3");
    assert!(
        e.contains("train.warmup_steps = -3") && e.contains("at least 0"),
        "{e}"
    );
    let e = refused("", "learning_rate = -0.1");
    assert!(
        e.contains("train.learning_rate = -0.1") && e.contains("positive"),
        "{e}"
    );
    let e = refused("", "lr_scheduler = \"exponential\"");
    assert!(
        e.contains("lr_scheduler") && e.contains("exponential"),
        "{e}"
    );
}

#[test]
fn rank_zero_unknown_key_unknown_module_and_missing_file_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), "");
    let p = path.to_str().expect("utf-8 path");
    let out = graft_train(&[p, "--set", "lora.r=0"]);
    let e = stderr(&out);
    assert!(e.contains("lora.r = 0") && e.contains("at least 1"), "{e}");
    let out = graft_train(&[p, "--set", "lora.target_modules=[\"qkv_proj\"]"]);
    let e = stderr(&out);
    assert!(e.contains("qkv_proj") && e.contains("q_proj"), "{e}");
    let out = graft_train(&[p, "--set", "data.train=\"nowhere/*.jsonl\""]);
    let e = stderr(&out);
    assert!(
        e.contains("nowhere/*.jsonl") && e.contains("matches no file"),
        "{e}"
    );
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, text.replace("[lora]\n", "[lora]\nrank = 8\n")).expect("write");
    let out = graft_train(&[p]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        e.contains("rank") && e.contains("line 5") && e.contains("unknown field"),
        "{e}"
    );
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn a_mapped_column_that_does_not_exist_is_refused_before_training() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), "max_steps = 1");
    let p = path.to_str().expect("utf-8 path");
    let out = graft_train(&[
        p,
        "--set",
        "data.format=\"chat\"",
        "--set",
        "data.fields={ messages = \"conversation\" }",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("capitals.jsonl")
            && e.contains("no field 'conversation'")
            && e.contains("data.fields"),
        "{e}"
    );
    assert!(
        e.contains("\"messages\""),
        "the existing columns are listed: {e}"
    );
    let runs = dir.path().join("runs");
    let started = std::fs::read_dir(&runs)
        .map(|d| d.flatten().any(|r| r.path().join("metrics.jsonl").exists()))
        .unwrap_or(false);
    assert!(!started, "no training step ran");
}
