//! `graft-train data`: counts, the loss mask on the real SmolLM2 chat template, bad rows.

use crate::{graft_train, stderr, write_config};

#[test]
fn trained_tokens_are_exactly_the_assistant_turns_with_their_end_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), "");
    let out = graft_train(&[
        "data",
        path.to_str().expect("utf-8 path"),
        "--examples",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("format: chat"), "{s}");
    assert!(s.contains("rows: 48 (0 bad"), "{s}");
    assert!(s.contains("examples: 43 train, 5 eval"), "{s}");
    // The first row, rendered by SmolLM2's template, with the trained span marked.
    assert!(
        s.contains("<|im_start|>assistant\n[[Capital of France: Paris. [graft]<|im_end|>]]\n"),
        "{s}"
    );
    let body = s
        .split("trained text in [[ ]])")
        .nth(1)
        .expect("an example is printed");
    assert_eq!(
        body.matches("[[").count(),
        1,
        "only the assistant turn is trained: {s}"
    );
}

#[test]
fn bad_rows_stop_the_run_or_are_skipped_within_the_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("mixed.jsonl");
    std::fs::write(
        &data,
        concat!(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, \n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"\"}]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}, {\"role\": \"assistant\", \"content\": \"hey\"}]}\n",
        ),
    )
    .expect("write data");
    let path = write_config(dir.path(), "");
    let p = path.to_str().expect("utf-8 path");
    let set_data = format!("data.train={:?}", data.display().to_string());
    let out = graft_train(&[
        "data",
        p,
        "--set",
        &set_data,
        "--set",
        "data.eval_fraction=0.0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("2 bad rows exceed data.max_bad_rows = 0"), "{e}");
    assert!(
        e.contains("mixed.jsonl:2") && e.contains("invalid JSON"),
        "{e}"
    );

    let out = graft_train(&[
        "data",
        p,
        "--set",
        &set_data,
        "--set",
        "data.eval_fraction=0.0",
        "--set",
        "data.max_bad_rows=2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("mixed.jsonl:3") && e.contains("empty assistant turn"),
        "{e}"
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("rows: 4 (2 bad"), "{s}");
    assert!(s.contains("examples: 2 train, 0 eval"), "{s}");
}

#[test]
fn a_named_template_replaces_the_models_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), "");
    let p = path.to_str().expect("utf-8 path");
    let out = graft_train(&[
        "data",
        p,
        "--examples",
        "1",
        "--set",
        "data.chat_template=\"alpaca\"",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("### Instruction:\nWhat is the capital of France?\n\n### Response:\n[[Capital of France: Paris. [graft]<|im_end|>]]"),
        "{s}"
    );
    let out = graft_train(&["data", p, "--set", "data.chat_template=\"vicuna\""]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("data.chat_template = \"vicuna\"") && e.contains("chatml"),
        "{e}"
    );
}

#[test]
fn csv_alpaca_rows_go_through_the_whole_pipeline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let csv = dir.path().join("tasks.csv");
    std::fs::write(
        &csv,
        "instruction,input,output\nAdd the numbers,2 and 2,4\nName a colour,,Blue\n",
    )
    .expect("write");
    let path = write_config(dir.path(), "");
    let set_data = format!("data.train={:?}", csv.display().to_string());
    let out = graft_train(&[
        "data",
        path.to_str().expect("utf-8 path"),
        "--set",
        &set_data,
        "--set",
        "data.eval_fraction=0.0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("format: alpaca") && s.contains("rows: 2 (0 bad"),
        "{s}"
    );
    assert!(s.contains("tasks.csv:row 1"), "{s}");
    assert!(
        s.contains("Add the numbers\n\n2 and 2<|im_end|>") && s.contains("[[4<|im_end|>]]"),
        "{s}"
    );
}
