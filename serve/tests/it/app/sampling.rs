//! The OpenAI/vLLM sampling surface in-process: n choices, prompt lists, streamed choices and
//! usage, logit bias, min_tokens and penalties.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{app, call, call_stream};

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
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null()),
        "usage comes once, in the last chunk"
    );
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
