//! graft-serve integration tests: the binary spawned as a user runs it, and the HTTP app
//! driven in-process.

mod app;
mod generate_cli;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod gpu;
mod replicas;
mod server;
mod sources;

/// The SmolLM2 GGUF from `scripts/fetch-model.sh`; the tests fail, rather than skip, without it.
pub fn gguf() -> std::path::PathBuf {
    let p = graft_core::cache::default_model_path();
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// The value of an unlabelled Prometheus sample `name` in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        .parse()
        .expect("number")
}
