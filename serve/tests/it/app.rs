//! The HTTP app built in-process (`server::start` + `http::router`) and driven with
//! `Router::oneshot`: no socket, no process. Real SmolLM2 GGUF.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use graft_core::device::Cpu;
use graft_serve::config::ServeArgs;
use graft_serve::http::router;
use graft_serve::server::{start, Started};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

mod faults;
mod limits;
mod prefix;
mod sampling;
mod structured;

pub fn app() -> Started<Cpu> {
    let args = ServeArgs {
        model: Some(crate::gguf().display().to_string()),
        served_model_name: Some("smollm2".into()),
        ..ServeArgs::default()
    };
    start::<Cpu>(&args, &Default::default()).expect("server starts")
}

pub async fn call(
    s: &Started<Cpu>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .expect("request");
    let resp = router(s.state.clone())
        .oneshot(req)
        .await
        .expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)));
    (status, v)
}

/// A POST whose answer is server-sent events: the JSON of every `data:` line before `[DONE]`.
pub async fn call_stream(s: &Started<Cpu>, path: &str, body: Value) -> Vec<Value> {
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = router(s.state.clone())
        .oneshot(req)
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect()
}

/// The answer text of a chat completion.
pub fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fields_are_refused_naming_the_param() {
    let s = app();
    let chat = |extra: Value| {
        let mut b = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    for (body, param) in [
        (chat(json!({"temperature": "hot"})), "temperature"),
        (chat(json!({"max_tokens": -5})), "max_tokens"),
        (chat(json!({"messages": "text"})), "messages"),
        (
            chat(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            "messages[0].role",
        ),
        (
            chat(json!({"top_logprobs": 50, "logprobs": true})),
            "top_logprobs",
        ),
        (chat(json!({"n": 17})), "n"),
        (chat(json!({"temperature": -1})), "temperature"),
        (chat(json!({"top_p": 0})), "top_p"),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
    ] {
        let (status, v) = call(&s, "POST", "/v1/chat/completions", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
    }
    let many: Vec<String> = (0..16).map(|i| format!("p{i}")).collect();
    let (status, v) = call(
        &s,
        "POST",
        "/v1/completions",
        Some(json!({"model": "smollm2", "prompt": many, "n": 16})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["param"], "n", "{v}");
    let (status, v) = call(
        &s,
        "POST",
        "/v1/completions",
        Some(json!({"model": "smollm2", "prompt": []})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["param"], "prompt", "{v}");
    // A runtime load of a path that is no adapter is a 404 naming it; a bad name is the
    // client's fault, in `lora_name`.
    let (status, v) = call(
        &s,
        "POST",
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "x", "lora_path": "/nonexistent/adapter"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .expect("message")
        .contains("/nonexistent/adapter"));
    let (status, v) = call(
        &s,
        "POST",
        "/v1/load_lora_adapter",
        Some(json!({"lora_name": "../x", "lora_path": "/tmp"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "lora_name", "{v}");
}

/// `top_k` is one field in `wire::Sampling` plus one line in the handler: with `top_k = 1`,
/// sampling at a high temperature with any seed is greedy decoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sampling_field_is_a_line_in_the_wire_types_plus_its_use() {
    let s = app();
    let body = |extra: Value| {
        let mut b =
            json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let text = |v: &Value| v["choices"][0]["text"].as_str().expect("text").to_string();
    let (status, greedy) = call(
        &s,
        "POST",
        "/v1/completions",
        Some(body(json!({"temperature": 0}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{greedy}");
    let mut differs = false;
    for seed in 1..4 {
        let (_, hot) = call(
            &s,
            "POST",
            "/v1/completions",
            Some(body(json!({"temperature": 1.5, "seed": seed}))),
        )
        .await;
        differs |= text(&hot) != text(&greedy);
        let (_, top1) = call(
            &s,
            "POST",
            "/v1/completions",
            Some(body(json!({"temperature": 1.5, "seed": seed, "top_k": 1}))),
        )
        .await;
        assert_eq!(text(&top1), text(&greedy), "seed {seed}");
    }
    assert!(
        differs,
        "sampling at temperature 1.5 never left the greedy path: the check is void"
    );
}

/// Prompt scoring (`echo` + `logprobs` + `max_tokens = 0`) is an engine request like any other:
/// it is counted by the engine's metrics, and its scores equal those of the same prompt scored
/// alongside a generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_goes_through_the_engine() {
    let s = app();
    let prompt = "The capital of France is Paris";
    let (status, scored) = call(
        &s,
        "POST",
        "/v1/completions",
        Some(json!({"model": "smollm2", "prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{scored}");
    let n = scored["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert_eq!(scored["usage"]["completion_tokens"], 0);
    assert_eq!(scored["choices"][0]["text"], prompt);
    let lp = &scored["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().expect("tokens").len() as u64, n);
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    assert_eq!(
        lp["top_logprobs"][1]
            .as_object()
            .expect("alternatives")
            .len(),
        2
    );
    let (_, metrics) = call(&s, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().expect("text").to_string();
    assert!(
        metrics.contains(&format!("graft_prompt_tokens_total {n}")),
        "the engine did not count the scoring request: {metrics}"
    );
    let (_, both) = call(
        &s,
        "POST",
        "/v1/completions",
        Some(json!({"model": "smollm2", "prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": true, "logprobs": 2})),
    )
    .await;
    let a = lp["token_logprobs"].as_array().expect("scores");
    let b = both["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .expect("scores");
    assert_eq!(b.len() as u64, n + 3);
    for (x, y) in a.iter().zip(b).skip(1) {
        let (x, y) = (x.as_f64().expect("number"), y.as_f64().expect("number"));
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_round_trip() {
    let s = app();
    let (status, t) = call(
        &s,
        "POST",
        "/tokenize",
        Some(json!({"model": "smollm2", "prompt": "Hello world"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["count"], t["tokens"].as_array().expect("tokens").len());
    assert_eq!(t["max_model_len"], 8192);
    let (_, d) = call(
        &s,
        "POST",
        "/detokenize",
        Some(json!({"model": "smollm2", "tokens": t["tokens"]})),
    )
    .await;
    assert_eq!(d["prompt"], "Hello world");
    let (_, m) = call(
        &s,
        "POST",
        "/tokenize",
        Some(json!({"model": "smollm2",
        "messages": [{"role": "user", "content": "Hi"}]})),
    )
    .await;
    let (_, text) = call(
        &s,
        "POST",
        "/detokenize",
        Some(json!({"model": "smollm2", "tokens": m["tokens"]})),
    )
    .await;
    let text = text["prompt"].as_str().expect("text");
    assert!(
        text.contains("<|im_start|>user\nHi<|im_end|>")
            && text.ends_with("<|im_start|>assistant\n"),
        "{text}"
    );
    let (status, _) = call(
        &s,
        "POST",
        "/tokenize",
        Some(json!({"model": "nope", "prompt": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = call(
        &s,
        "POST",
        "/detokenize",
        Some(json!({"model": "smollm2", "tokens": [1, 999999]})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["param"], "tokens[1]", "{v}");
}
