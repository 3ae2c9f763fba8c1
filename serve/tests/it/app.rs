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

fn app() -> Started<Cpu> {
    let args = ServeArgs {
        model: Some(crate::gguf().display().to_string()),
        served_model_name: Some("smollm2".into()),
        ..ServeArgs::default()
    };
    start::<Cpu>(&args, &Default::default()).expect("server starts")
}

async fn call(
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

/// A POST whose answer is server-sent events: the JSON of every `data:` line before `[DONE]`.
async fn call_stream(s: &Started<Cpu>, path: &str, body: Value) -> Vec<Value> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_and_prompt_lists_are_decoded_together_and_counted_once() {
    let s = app();
    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 6,
                      "temperature": 1.0, "seed": 11, "n": 3});
    let (status, v) = call(&s, "POST", "/v1/completions", Some(body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    // Choice j samples with seed + j: the same request gives the same choices, and the
    // choices differ from each other. (Not compared with single requests: batches of
    // different sizes round differently, which moves samples taken far in the tail.)
    let (_, again) = call(&s, "POST", "/v1/completions", Some(body.clone())).await;
    assert_eq!(v["choices"], again["choices"]);
    assert!(
        choices[0]["text"] != choices[1]["text"] || choices[1]["text"] != choices[2]["text"],
        "{v}"
    );
    let (_, count) = call(
        &s,
        "POST",
        "/tokenize",
        Some(json!({"model": "smollm2", "prompt": "Once upon a time"})),
    )
    .await;
    let prompt_tokens = count["count"].as_u64().expect("count");
    assert_eq!(
        v["usage"]["prompt_tokens"], prompt_tokens,
        "the prompt counts once: {v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 18);
    // Two prompts × n = 2: choice k·n + j continues prompt k.
    let (status, v) = call(
        &s,
        "POST",
        "/v1/completions",
        Some(
            json!({"model": "smollm2", "prompt": ["The capital of France is", "2 + 2 ="],
                    "max_tokens": 4, "temperature": 0, "n": 2, "echo": true}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| c["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts.len(), 4);
    assert!(
        texts[0].starts_with("The capital of France is") && texts[0] == texts[1],
        "{texts:?}"
    );
    assert!(
        texts[2].starts_with("2 + 2 =") && texts[2] == texts[3],
        "{texts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_name_each_choice_and_include_usage_adds_a_last_chunk() {
    let s = app();
    let chunks = call_stream(
        &s,
        "/v1/chat/completions",
        json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
               "temperature": 0, "n": 2, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]), "{last}");
    let usage = &last["usage"];
    let mut text = [String::new(), String::new()];
    let mut finished = [false, false];
    for c in &chunks[..chunks.len() - 1] {
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().expect("index") as usize;
        if let Some(t) = choice["delta"]["content"].as_str() {
            text[i].push_str(t);
        }
        if choice["finish_reason"].is_string() {
            finished[i] = true;
        }
    }
    assert_eq!(finished, [true, true]);
    assert_eq!(text[0], text[1], "greedy choices agree");
    assert_eq!(usage["completion_tokens"], 10, "{usage}");
    // n = 1 without stream_options: the finish chunk carries the usage, as before.
    let chunks = call_stream(
        &s,
        "/v1/completions",
        json!({"model": "smollm2", "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": true}),
    )
    .await;
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_min_tokens_and_penalties_reach_the_sampler() {
    let s = app();
    let (_, t) = call(
        &s,
        "POST",
        "/tokenize",
        Some(json!({"model": "smollm2", "prompt": " lighthouse", "add_special_tokens": false})),
    )
    .await;
    let id = t["tokens"][0].as_u64().expect("token id");
    let (status, v) = call(
        &s,
        "POST",
        "/v1/completions",
        Some(
            json!({"model": "smollm2", "prompt": "The", "max_tokens": 3, "temperature": 0,
                    "logit_bias": {id.to_string(): 100}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, d) = call(
        &s,
        "POST",
        "/detokenize",
        Some(json!({"model": "smollm2", "tokens": [id, id, id]})),
    )
    .await;
    assert_eq!(
        v["choices"][0]["text"], d["prompt"],
        "every token is the biased one"
    );
    // The base answers a short question in a few tokens; min_tokens holds off its end.
    let chat = |extra: Value| {
        let mut b = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Say OK."}],
                           "max_tokens": 40, "temperature": 0});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let (_, free) = call(&s, "POST", "/v1/chat/completions", Some(chat(json!({})))).await;
    assert_eq!(free["choices"][0]["finish_reason"], "stop", "{free}");
    let k = free["usage"]["completion_tokens"].as_u64().expect("tokens");
    let (_, held) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(chat(json!({"min_tokens": k + 5}))),
    )
    .await;
    assert!(
        held["usage"]["completion_tokens"].as_u64().expect("tokens") >= k + 5,
        "{held}"
    );
    for (field, value) in [
        ("presence_penalty", json!(3)),
        ("frequency_penalty", json!(-2.5)),
        ("logit_bias", json!({"abc": 1})),
        ("min_tokens", json!(41)),
    ] {
        let (status, v) = call(
            &s,
            "POST",
            "/v1/chat/completions",
            Some(chat(json!({field: value}))),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
    let (status, _) = call(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(chat(
            json!({"frequency_penalty": 1.5, "presence_penalty": 0.5, "user": "u-1"}),
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
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

/// The answer text of a chat completion.
fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

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

fn app_with(prefix_cache_tokens: usize) -> Started<Cpu> {
    let args = ServeArgs {
        model: Some(crate::gguf().display().to_string()),
        served_model_name: Some("smollm2".into()),
        prefix_cache_tokens,
        ..ServeArgs::default()
    };
    start::<Cpu>(&args, &Default::default()).expect("server starts")
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in metrics"))
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
