//! Engine faults injected through the test-only hook: a panic in the forward pass, a failed
//! read-back, NaN logits, a panic in the engine loop. The faulty request gets a 500 carrying
//! its request id; a request running in the same batch finishes with the text it gets alone;
//! the server goes on answering.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use graft_core::device::Cpu;
use graft_serve::config::ServeArgs;
use graft_serve::engine::{Fault, FaultHook};
use graft_serve::http::router;
use graft_serve::server::{start_with_faults, Started};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::call;

fn faulty_app() -> Started<Cpu> {
    let hook: FaultHook = Arc::new(|user| match user {
        Some("fault:panic") => Some(Fault::Panic),
        Some("fault:readback") => Some(Fault::ReadBack),
        Some("fault:nan") => Some(Fault::Nan),
        Some("fault:engine") => Some(Fault::Engine),
        _ => None,
    });
    let args = ServeArgs {
        model: Some(crate::gguf().display().to_string()),
        served_model_name: Some("smollm2".into()),
        ..ServeArgs::default()
    };
    start_with_faults::<Cpu>(&args, &Default::default(), Some(hook)).expect("server starts")
}

const PROMPT: &str = "The capital of France is";

fn greedy(max_tokens: usize, user: Option<&str>, stream: bool) -> Value {
    let mut body = json!({"model": "smollm2", "prompt": PROMPT, "max_tokens": max_tokens,
                          "temperature": 0, "stream": stream});
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    body
}

fn post(body: &Value) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

/// The text of a streamed completion (the `data:` chunks' text, in order).
fn streamed_text(sse: &str) -> String {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect()
}

/// Streams a long greedy completion; once its first token is out, sends a request that meets
/// `fault`. Returns the faulty request's status, `x-request-id` and body, and the stream's text.
async fn fault_beside_a_stream(
    s: &Started<Cpu>,
    fault: &str,
) -> (StatusCode, String, Value, String) {
    let resp = router(s.state.clone())
        .oneshot(post(&greedy(24, None, true)))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut sse = String::new();
    while !sse.contains("\"text\"") {
        let frame = body.frame().await.expect("a first chunk").expect("frame");
        if let Some(data) = frame.data_ref() {
            sse.push_str(&String::from_utf8_lossy(data));
        }
    }
    let faulty = router(s.state.clone())
        .oneshot(post(&greedy(8, Some(fault), false)))
        .await
        .expect("infallible");
    let status = faulty.status();
    let id = faulty
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().expect("ascii").to_string())
        .unwrap_or_default();
    let bytes = faulty.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&bytes).expect("json error body");
    let rest = body.collect().await.expect("rest of the stream").to_bytes();
    sse.push_str(&String::from_utf8_lossy(&rest));
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    (status, id, v, streamed_text(&sse))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_in_one_request_fails_it_alone_with_its_request_id() {
    let s = faulty_app();
    let (status, alone) = call(&s, "POST", "/v1/completions", Some(greedy(24, None, false))).await;
    assert_eq!(status, StatusCode::OK, "{alone}");
    let alone = alone["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    for fault in ["fault:panic", "fault:readback", "fault:nan"] {
        let (status, id, v, beside) = fault_beside_a_stream(&s, fault).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{fault}: {v}");
        assert!(id.starts_with("cmpl-"), "{fault}: request id header {id:?}");
        assert_eq!(v["error"]["code"], "internal_error", "{fault}: {v}");
        let message = v["error"]["message"].as_str().expect("message");
        assert!(message.contains(&id), "{fault}: {message} names {id}");
        assert_eq!(
            beside, alone,
            "{fault}: the request batched with the fault must finish as it does alone"
        );
    }
    // The server goes on; the faults are counted.
    let (status, again) = call(&s, "POST", "/v1/completions", Some(greedy(24, None, false))).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["choices"][0]["text"], alone.as_str());
    let (_, metrics) = call(&s, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().expect("text").to_string();
    assert_eq!(crate::metric(&metrics, "graft_requests_failed_total"), 3.0);
    // Panic and read-back fail the whole batch, which is then run a request at a time.
    assert!(
        crate::metric(&metrics, "graft_engine_step_faults_total") >= 2.0,
        "{metrics}"
    );
    assert_eq!(crate::metric(&metrics, "graft_requests_in_flight"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_engine_loop_fails_its_requests_and_the_engine_goes_on() {
    let s = faulty_app();
    let (status, v) = call(
        &s,
        "POST",
        "/v1/completions",
        Some(greedy(8, Some("fault:engine"), false)),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"]["code"], "internal_error", "{v}");
    let (status, v) = call(&s, "POST", "/v1/completions", Some(greedy(8, None, false))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = call(&s, "GET", "/health", None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, metrics) = call(&s, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().expect("text").to_string();
    assert_eq!(crate::metric(&metrics, "graft_engine_restarts_total"), 1.0);
    assert_eq!(crate::metric(&metrics, "graft_requests_in_flight"), 0.0);
}
