//! A served request on the GPU code path: graft-serve with `--device wgpu` (Mesa's software
//! Vulkan device in CI; `cuda` in a build with it) answers greedy completions on the tiny Llama with and without its PEFT
//! adapter, token for token as the CPU server does, with the same log-probabilities.

use serde_json::{json, Value};

use crate::server::{fixture, post, start_model};

/// The GPU backend the tests were built with (`cuda` where both are).
const GPU: &str = if cfg!(feature = "cuda") {
    "cuda"
} else {
    "wgpu"
};

/// `(tokens, logprobs)` of a greedy completion from `model` (the base or an adapter's name).
fn greedy(s: &crate::server::Server, model: &str) -> (Vec<String>, Vec<f64>) {
    let (status, v, _) = post(
        s,
        "/v1/completions",
        &json!({"model": model, "prompt": "the quick brown fox", "max_tokens": 8,
                "temperature": 0, "logprobs": 1}),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let list = |key: &str| -> Vec<Value> { lp[key].as_array().expect(key).clone() };
    (
        list("tokens")
            .iter()
            .map(|t| t.as_str().expect("token").to_string())
            .collect(),
        list("token_logprobs")
            .iter()
            .map(|t| t.as_f64().expect("logprob"))
            .collect(),
    )
}

#[test]
fn a_served_request_on_the_gpu_answers_as_on_the_cpu_with_and_without_an_adapter() {
    let model = fixture("families/llama/model.gguf");
    let adapter = format!("peft={}", fixture("families/llama/peft_adapter").display());
    let answers = |device: &str| {
        let s = start_model(&model, "tiny", &["--device", device, "--adapter", &adapter]);
        [greedy(&s, "tiny"), greedy(&s, "peft")]
    };
    let cpu = answers("cpu");
    let gpu = answers(GPU);
    assert_ne!(cpu[0].0, cpu[1].0, "the adapter changes the answer");
    for (c, g) in cpu.iter().zip(&gpu) {
        assert_eq!(c.0, g.0, "{GPU} picked other tokens");
        assert_eq!(c.0.len(), 8);
        for (a, b) in c.1.iter().zip(&g.1) {
            assert!((a - b).abs() < 1e-3, "logprob {a} on the cpu, {b} on {GPU}");
        }
    }
}
