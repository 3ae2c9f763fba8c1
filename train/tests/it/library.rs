//! graft-train used as a library, without a process: configs checked and a short run trained
//! in-process through the same functions the binary calls.

use crate::write_config;

#[test]
fn a_run_trains_in_process_through_the_library() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), "max_steps = 2");
    let cfgs = graft_train::setup::configs(&path, &["lora.r=2".into()]).expect("valid config");
    assert_eq!(cfgs.len(), 1);
    assert_eq!(cfgs[0].lora.r, 2);
    assert_eq!(cfgs[0].train.max_steps, Some(2));
    graft_train::launch::train_cmd(&path, &["lora.r=2".into()]).expect("training runs");
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("runs"))
        .expect("runs dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(runs[0].join("summary.json")).expect("summary"),
    )
    .expect("json");
    assert_eq!(summary["steps"], 2);
    assert!(runs[0].join("adapter/adapter_model.safetensors").is_file());
    // The saved config is the resolved one and reads back as the same settings.
    let again = graft_train::setup::configs(&runs[0].join("config.toml"), &[]).expect("resolved");
    assert_eq!(again[0].lora, cfgs[0].lora);
    assert_eq!(again[0].train.learning_rate, cfgs[0].train.learning_rate);
}
