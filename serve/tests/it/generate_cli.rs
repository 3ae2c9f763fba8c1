//! `graft-serve generate` end to end on the real SmolLM2 GGUF (made by `scripts/fetch-model.sh`;
//! the test fails, rather than skips, when it is missing).

use std::process::Command;

use crate::gguf as gguf_path;

fn graft_serve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_graft-serve"))
}

/// `graft-serve generate --chat` on "What is the capital of France?", greedy, with `extra`.
fn ask_france(max_tokens: &str, extra: &[&str]) -> std::process::Output {
    graft_serve()
        .arg("generate")
        .arg("--model")
        .arg(gguf_path())
        .args(["--chat", "--prompt", "What is the capital of France?"])
        .args(["--max-tokens", max_tokens, "--temperature", "0"])
        .args(extra)
        .output()
        .expect("spawn graft-serve")
}

#[test]
fn chat_answers_the_capital_of_france_and_reports_speed() {
    let out = ask_france("24", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {stderr}",
        out.status
    );
    assert!(stdout.contains("Paris"), "answer without Paris: {stdout:?}");
    assert!(
        !stdout.contains("<|im_end|>"),
        "end-of-turn token leaked: {stdout:?}"
    );
    assert!(
        stderr.contains("tokens/s"),
        "no speed figures on stderr: {stderr}"
    );
}

/// `--ignore-eos` decodes exactly `--max-tokens` tokens where the answer would stop at EOS.
#[test]
fn ignore_eos_decodes_every_requested_token() {
    let run = |extra: &[&str]| {
        let out = ask_france("30", extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let normal = run(&[]);
    assert!(normal.contains("finish: stop"), "{normal}");
    let forced = run(&["--ignore-eos"]);
    assert!(
        forced.contains("decode: 30 tokens") && forced.contains("finish: length"),
        "{forced}"
    );
    assert!(forced.contains("GB/s of base weights"), "{forced}");
}

#[test]
fn same_seed_gives_same_sampled_text() {
    let run = || {
        let out = graft_serve()
            .arg("generate")
            .arg("--model")
            .arg(gguf_path())
            .args(["--prompt", "Once upon a time", "--max-tokens", "12"])
            .args(["--temperature", "0.9", "--seed", "7"])
            .output()
            .expect("spawn graft-serve");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    };
    let first = run();
    assert!(!first.trim().is_empty());
    assert_eq!(first, run());
}

#[test]
fn missing_model_file_is_a_clear_error() {
    let out = graft_serve()
        .args([
            "generate",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
        ])
        .output()
        .expect("spawn graft-serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("/nonexistent/model.gguf"),
        "path not named: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_the_feature_is_a_clear_error() {
    let out = graft_serve()
        .arg("generate")
        .arg("--model")
        .arg(gguf_path())
        .args(["--prompt", "hi", "--device", "cuda:0"])
        .output()
        .expect("spawn graft-serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("cuda"), "{stderr}");
    assert!(
        stderr.contains("--features cuda"),
        "no hint how to enable it: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `--activations q8` (8-bit activations, llama.cpp's numerics) completes a plain prompt as the
/// f32 path does; an unknown precision is a clear error naming it.
#[test]
fn eight_bit_activations_complete_the_prompt_and_bad_values_are_named() {
    let run = |a: &str| {
        graft_serve()
            .arg("generate")
            .arg("--model")
            .arg(gguf_path())
            .args(["--prompt", "The capital of France is", "--max-tokens", "3"])
            .args(["--temperature", "0", "--activations", a])
            .output()
            .expect("spawn graft-serve")
    };
    for a in ["f32", "q8"] {
        let out = run(a);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{a}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.starts_with(" Paris"), "{a}: {stdout:?}");
    }
    let out = run("q4");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("'q4'") && stderr.contains("q8"), "{stderr}");
}
