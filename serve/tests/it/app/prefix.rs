//! Prefix caching in-process: reuse is counted, answers do not change, adapters never share
//! the base's prefixes.

use axum::http::StatusCode;
use graft_core::device::Cpu;
use graft_serve::config::ServeArgs;
use graft_serve::server::{start, Started};
use serde_json::json;

use super::{call, content};
use crate::metric;

fn app_with(prefix_cache_tokens: usize) -> Started<Cpu> {
    app_budget(prefix_cache_tokens, None)
}

fn app_budget(prefix_cache_tokens: usize, kv_cache_tokens: Option<usize>) -> Started<Cpu> {
    let args = ServeArgs {
        model: Some(crate::gguf().display().to_string()),
        served_model_name: Some("smollm2".into()),
        prefix_cache_tokens,
        kv_cache_tokens,
        ..ServeArgs::default()
    };
    start::<Cpu>(&args, &Default::default()).expect("server starts")
}

/// A request that repeats a long system prompt starts from its kept prefix, and answers
/// exactly as a server without the prefix cache does; an adapter never reuses the base's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_system_prompt_is_prefilled_once_and_answers_do_not_change() {
    let system = "You are a meticulous geography tutor. ".repeat(30);
    let ask = |q: &str| {
        json!({"model": "smollm2", "messages": [{"role": "system", "content": system},
               {"role": "user", "content": q}], "max_tokens": 12, "temperature": 0, "logprobs": true})
    };
    let cached = app_with(4096);
    let plain = app_with(0);
    let questions = [
        "What is the capital of France?",
        "What is the capital of Peru?",
        "Name a river.",
    ];
    for (i, q) in questions.iter().enumerate() {
        let (_, a) = call(&cached, "POST", "/v1/chat/completions", Some(ask(q))).await;
        let (_, b) = call(&plain, "POST", "/v1/chat/completions", Some(ask(q))).await;
        assert_eq!(content(&a), content(&b), "{q}");
        let la = a["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("logprobs");
        let lb = b["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("logprobs");
        for (x, y) in la.iter().zip(lb) {
            let (x, y) = (
                x["logprob"].as_f64().expect("lp"),
                y["logprob"].as_f64().expect("lp"),
            );
            assert!((x - y).abs() < 1e-3, "{q}: {x} vs {y}");
        }
        let (_, m) = call(&cached, "GET", "/metrics", None).await;
        let m = m.as_str().expect("text").to_string();
        assert_eq!(metric(&m, "graft_prefix_cache_hits_total"), i as f64, "{m}");
    }
    let (_, m) = call(&cached, "GET", "/metrics", None).await;
    let reused = metric(
        m.as_str().expect("text"),
        "graft_prefix_cache_hit_tokens_total",
    );
    assert!(
        reused >= 2.0 * 200.0,
        "the shared system prompt was reused: {reused} tokens"
    );
    let kept = metric(m.as_str().expect("text"), "graft_prefix_cache_kept_tokens");
    assert!(
        (200.0..=4096.0).contains(&kept),
        "kept prompt tokens within the budget: {kept}"
    );
    let (_, m) = call(&plain, "GET", "/metrics", None).await;
    assert_eq!(
        metric(m.as_str().expect("text"), "graft_prefix_cache_hits_total"),
        0.0
    );
    // Under an adapter the same prompt is computed afresh (its keys and values differ).
    let adapter = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../core/tests/fixtures/peft_adapter");
    let (status, v) = call(
        &cached,
        "POST",
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "a", "lora_path": adapter.display().to_string()})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut body = ask(questions[0]);
    body["model"] = json!("a");
    let (status, _) = call(&cached, "POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    let (_, m) = call(&cached, "GET", "/metrics", None).await;
    assert_eq!(
        metric(m.as_str().expect("text"), "graft_prefix_cache_hits_total"),
        2.0
    );
}

/// Kept prompts count against the KV budget: when a running request needs the room, they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_prompts_give_way_to_running_requests_under_the_kv_budget() {
    let system = "You are a meticulous geography tutor. ".repeat(30);
    let ask = |q: &str| {
        json!({"model": "smollm2", "messages": [{"role": "system", "content": system},
               {"role": "user", "content": q}], "max_tokens": 12, "temperature": 0})
    };
    // Room for one request of ~300 tokens, not for it and a kept prompt of the same size.
    let tight = app_budget(4096, Some(450));
    for q in [
        "What is the capital of France?",
        "What is the capital of Peru?",
    ] {
        let (status, v) = call(&tight, "POST", "/v1/chat/completions", Some(ask(q))).await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let (_, m) = call(&tight, "GET", "/metrics", None).await;
    assert_eq!(
        metric(m.as_str().expect("text"), "graft_prefix_cache_hits_total"),
        0.0
    );
    let kept = metric(m.as_str().expect("text"), "graft_prefix_cache_kept_tokens");
    assert!(kept <= 450.0, "kept prompts within the KV budget: {kept}");
    let roomy = app_budget(4096, Some(2000));
    for q in [
        "What is the capital of France?",
        "What is the capital of Peru?",
    ] {
        call(&roomy, "POST", "/v1/chat/completions", Some(ask(q))).await;
    }
    let (_, m) = call(&roomy, "GET", "/metrics", None).await;
    assert_eq!(
        metric(m.as_str().expect("text"), "graft_prefix_cache_hits_total"),
        1.0
    );
}

/// Kept prompts of an adapter version that was replaced or unloaded are dropped (nothing can
/// use them again), so a server that replaces adapters all day keeps only live versions'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_of_replaced_and_unloaded_adapter_versions_are_dropped() {
    let system = "You are a meticulous geography tutor. ".repeat(30);
    let ask = |model: &str, q: &str| {
        json!({"model": model, "messages": [{"role": "system", "content": system},
               {"role": "user", "content": q}], "max_tokens": 4, "temperature": 0})
    };
    let app = app_with(100_000);
    let kept =
        |m: &serde_json::Value| metric(m.as_str().expect("text"), "graft_prefix_cache_kept_tokens");
    let adapter = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../core/tests/fixtures/peft_adapter");
    let load = json!({"lora_name": "a", "lora_path": adapter.display().to_string()});
    let base_q = "What is the capital of France?";
    let (status, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(ask("smollm2", base_q)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let base_only = kept(&call(&app, "GET", "/metrics", None).await.1);
    assert!(base_only >= 200.0, "{base_only}");

    // Loads `a` (a new version each time), asks it, and returns the kept prompt tokens.
    let load_and_ask = async |app: &Started<Cpu>| {
        let (status, v) = call(app, "POST", "/v1/load_lora_adapter", Some(load.clone())).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let body = ask("a", "Name a river.");
        let (status, _) = call(app, "POST", "/v1/chat/completions", Some(body)).await;
        assert_eq!(status, StatusCode::OK);
        kept(&call(app, "GET", "/metrics", None).await.1)
    };
    let with_v1 = load_and_ask(&app).await;
    assert!(with_v1 > base_only + 200.0, "{with_v1} vs {base_only}");
    // A new version: the old one's prompt goes when the new one's is kept.
    let with_v2 = load_and_ask(&app).await;
    assert_eq!(with_v2, with_v1, "one version's prompt kept, not two");

    // Unloaded: its prompt goes at the next request.
    let (status, v) = call(
        &app,
        "POST",
        "/v1/unload_lora_adapter",
        Some(json!({"lora_name": "a"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(ask("smollm2", base_q)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let after = kept(&call(&app, "GET", "/metrics", None).await.1);
    assert_eq!(after, base_only, "the unloaded adapter's prompt is gone");
}
