//! Structured outputs and tool calls in-process.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{app, call, call_stream, content};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_follow_the_schema_regex_and_choice() {
    let s = app();
    let schema = json!({"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24},
                       "rating": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["city", "rating"], "additionalProperties": false});
    let ask = |q: &str, extra: Value| {
        let mut b = json!({"model": "smollm2", "messages": [{"role": "user", "content": q}],
                           "max_tokens": 60, "temperature": 0.8, "seed": 3});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let format = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "city", "schema": schema, "strict": true}}, "n": 4});
    for q in [
        "Name a city you like and rate it.",
        "What is the capital of Peru?",
    ] {
        let (status, v) = call(
            &s,
            "POST",
            "/v1/chat/completions",
            Some(ask(q, format.clone())),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        for c in v["choices"].as_array().expect("choices") {
            let text = c["message"]["content"].as_str().expect("content");
            assert_eq!(c["finish_reason"], "stop", "{text:?}");
            let j: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(
                j["city"].as_str().is_some_and(|c| c.chars().count() <= 24),
                "{text}"
            );
            assert!(
                j["rating"].as_i64().is_some_and(|r| (1..=10).contains(&r)),
                "{text}"
            );
            assert_eq!(j.as_object().expect("object").len(), 2, "{text}");
        }
    }
    let (_, v) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(ask(
            "Is Paris in France?",
            json!({"guided_choice": ["yes", "no"]}),
        )),
    )
    .await;
    assert!(["yes", "no"].contains(&content(&v).as_str()), "{v}");
    let (_, v) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(ask(
            "Give a date.",
            json!({"structured_outputs": {"regex": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"}}),
        )),
    )
    .await;
    let d = content(&v);
    assert!(
        d.len() == 10 && d.starts_with("20") && d.as_bytes()[4] == b'-',
        "{d:?}"
    );
    let (_, v) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(ask(
            "Describe yourself in JSON.",
            json!({"response_format": {"type": "json_object"}, "max_tokens": 200}),
        )),
    )
    .await;
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(&content(&v)).is_ok_and(|j| j.is_object()),
            "{v}"
        );
    } else {
        assert!(content(&v).trim_start().starts_with('{'), "{v}");
    }
    // Streamed, the pieces join into the same kind of document.
    let chunks = call_stream(
        &s,
        "/v1/chat/completions",
        ask(
            "Rate Rome.",
            json!({"guided_json": schema.to_string(), "stream": true}),
        ),
    )
    .await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let j: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(j["rating"].is_i64(), "{text}");
    // Bad grammars are refused naming the field.
    for (extra, param) in [
        (json!({"guided_regex": "("}), "guided_regex"),
        (json!({"guided_json": "{not json"}), "guided_json"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_grammar": "start: ("}), "guided_grammar"),
        (
            json!({"guided_regex": "a", "guided_choice": ["b"]}),
            "guided_choice",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}),
            "response_format",
        ),
    ] {
        let (status, v) = call(
            &s,
            "POST",
            "/v1/chat/completions",
            Some(ask("x", extra.clone())),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_calls_parse_and_bad_tool_requests_name_the_field() {
    let s = app();
    let tools = json!([{"type": "function", "function": {"name": "add", "parameters": {"type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                       "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": false}}}]);
    let ask = |extra: Value| {
        let mut b = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Add 2 and 3."}],
                           "tools": tools, "max_tokens": 60, "temperature": 0});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    // SmolLM2's template has no tool syntax: the call is forced in the JSON format.
    let (status, v) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(ask(json!({"tool_choice": "required"}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let c = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(c["type"], "function");
    assert_eq!(c["function"]["name"], "add");
    let args: Value = serde_json::from_str(c["function"]["arguments"].as_str().expect("arguments"))
        .expect("json");
    assert!(args["a"].is_u64() && args["b"].is_u64(), "{args}");
    assert!(c["id"].as_str().is_some_and(|id| id.starts_with("call_")));
    for (extra, param) in [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "mul"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": [], "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}),
            "tools[0].type",
        ),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (
            json!({"tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
    ] {
        let (status, v) = call(&s, "POST", "/v1/chat/completions", Some(ask(extra.clone()))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    // Text parts are joined; tool_choice none answers in text.
    let (status, v) = call(&s, "POST", "/v1/chat/completions", Some(ask(json!({"tool_choice": "none",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}]})))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["choices"][0]["message"]["tool_calls"].is_null(), "{v}");
}
