//! Request limits are enforced before any work (model resolution, adapter reads, grammar
//! compiles), each refusal naming its field.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{app, call};

fn refused(v: &Value, param: &str) {
    assert_eq!(v["error"]["param"], param, "{v}");
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_fields_are_refused_by_name_before_the_model_is_resolved() {
    let s = app();
    let base = json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2});
    let with = |field: &str, value: Value| {
        let mut b = base.clone();
        b[field] = value;
        b
    };
    let cases = [
        (with("n", json!(99)), "n"),
        (with("max_tokens", json!(1_000_000)), "max_tokens"),
        (with("stop", json!(vec!["x"; 17])), "stop"),
        (with("stop", json!(["ok", ""])), "stop[1]"),
        (with("stop", json!("y".repeat(257))), "stop[0]"),
        (
            with(
                "logit_bias",
                Value::Object((0..301).map(|i| (i.to_string(), json!(1.0))).collect()),
            ),
            "logit_bias",
        ),
        (with("logprobs", json!(21)), "logprobs"),
        (with("temperature", json!(-1)), "temperature"),
        (with("min_tokens", json!(5)), "min_tokens"),
    ];
    for (body, param) in cases {
        let (status, v) = call(&s, "POST", "/v1/completions", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        refused(&v, param);
        // The same body for a model that does not exist: still the limit, not a 404 (the
        // limits come before the name is looked up, or an adapter read from disk).
        let mut unknown = body;
        unknown["model"] = json!("no-such-adapter");
        let (status, v) = call(&s, "POST", "/v1/completions", Some(unknown)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        refused(&v, param);
    }
    let (status, v) = call(&s, "POST", "/v1/completions", Some(base)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}
