//! The HTTP server spawned as a user runs it, on the real SmolLM2 GGUF, driven over HTTP.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::metric;

fn gguf() -> PathBuf {
    let p = graft_core::cache::default_model_path();
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../core/tests/fixtures")
        .join(name)
}

/// A running `graft-serve`; killed on drop.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start(extra: &[&str]) -> Server {
    start_model(&gguf(), "smollm2", extra)
}

/// A server on SmolLM2 with `env` added to its environment.
pub(crate) fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
    spawn_server(&gguf(), "smollm2", extra, None, env)
}

/// A server started in the directory `cwd` (relative paths in `extra` are relative to it).
fn start_in(cwd: &std::path::Path, extra: &[&str]) -> Server {
    spawn_server(&gguf(), "smollm2", extra, Some(cwd), &[])
}

/// A server on `model`, answering to `name`.
pub(crate) fn start_model(model: &std::path::Path, name: &str, extra: &[&str]) -> Server {
    spawn_server(model, name, extra, None, &[])
}

fn spawn_server(
    model: &std::path::Path,
    name: &str,
    extra: &[&str],
    cwd: Option<&std::path::Path>,
    env: &[(&str, &str)],
) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graft-serve"));
    cmd.envs(env.iter().copied());
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd
        .arg("--model")
        .arg(model)
        .args(["--served-model-name", name, "--port", "0"])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn graft-serve");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("graft-serve exited before it was ready")
            .expect("stderr line");
        if let Some(rest) = line.split("ready on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .expect("an address")
                .to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, url }
}

pub(crate) fn get_text(s: &Server, path: &str) -> String {
    ureq::get(&format!("{}{path}", s.url))
        .call()
        .expect("GET")
        .into_string()
        .expect("body")
}

pub(crate) fn get_json(s: &Server, path: &str) -> Value {
    serde_json::from_str(&get_text(s, path)).expect("json")
}

/// The value of an unlabelled Prometheus sample `name` in `text`.

pub(crate) fn post(
    s: &Server,
    path: &str,
    body: &Value,
    key: Option<&str>,
) -> (u16, Value, Option<String>) {
    let mut req = ureq::post(&format!("{}{path}", s.url)).timeout(Duration::from_secs(300));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match req
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let tag = resp.header("x-graft-adapter").map(str::to_string);
    let text = resp.into_string().expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        tag,
    )
}

pub(crate) fn chat_body(model: &str, question: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 12})
}

pub(crate) fn answer(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no answer in {v}"))
        .to_string()
}

#[test]
fn openai_endpoints_answer_and_stream() {
    let s = start(&[
        "--adapter",
        &format!("peft={}", fixture("peft_adapter").display()),
    ]);
    let health = ureq::get(&format!("{}/health", s.url))
        .call()
        .expect("health");
    assert_eq!(health.status(), 200);
    let models: Value = get_json(&s, "/v1/models");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, vec!["smollm2", "peft"]);
    assert_eq!(models["data"][1]["parent"], "smollm2");
    assert_eq!(models["data"][1]["adapter"]["rank"], 4);

    let (status, v, tag) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("smollm2", "What is the capital of France?"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert!(answer(&v).contains("Paris"), "{v}");
    assert_eq!(tag.as_deref(), Some("smollm2"));
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    // Streaming: SSE chunks whose deltas add up to the same greedy answer, then [DONE].
    let mut body = chat_body("smollm2", "What is the capital of France?");
    body["stream"] = json!(true);
    let resp = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .send_string(&body.to_string())
        .expect("stream");
    assert!(resp
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let mut streamed = String::new();
    let mut last = String::new();
    let mut finish = None;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.expect("line");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        last = data.to_string();
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).expect("chunk json");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
        if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(last, "[DONE]");
    assert_eq!(streamed, answer(&v));
    assert!(finish.is_some());

    // Completions with a stop string.
    let (status, v, _) = post(
        &s,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0, "stop": [" 7"]}),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().expect("text");
    assert!(text.starts_with(" 5") && !text.contains('7'), "{text:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // logprobs: one per generated token, each ≤ 0; greedy picks have the highest probability.
    let mut body = chat_body("smollm2", "What is the capital of France?");
    body["logprobs"] = json!(true);
    let (_, v, _) = post(&s, "/v1/chat/completions", &body, None);
    let lps = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .clone();
    assert_eq!(
        lps.len() as u64,
        v["usage"]["completion_tokens"].as_u64().expect("usage")
    );
    let joined: String = lps
        .iter()
        .map(|t| t["token"].as_str().expect("token"))
        .collect();
    assert_eq!(joined, answer(&v));
    assert!(lps
        .iter()
        .all(|t| t["logprob"].as_f64().expect("logprob") <= 0.0));

    // Prometheus metrics count what was served.
    let m = get_text(&s, "/metrics");
    let value = |name: &str| metric(&m, name);
    assert_eq!(value("graft_requests_total"), 4.0);
    assert!(value("graft_generated_tokens_total") >= 4.0);
    assert_eq!(value("graft_time_to_first_token_seconds_count"), 4.0);
    assert!(value("graft_inter_token_latency_seconds_count") > 0.0);
    assert_eq!(value("graft_requests_in_flight"), 0.0);
    assert!(
        m.contains("graft_model_requests_total{model=\"smollm2\"} 4"),
        "{m}"
    );
}

/// A copy of the PEFT adapter directory `from` at `to` (created).
fn copy_adapter(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy");
    }
}

/// The PEFT fixture adapter with `lora_alpha` raised so that it changes greedy answers.
pub(crate) fn strong_adapter(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("strong");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::copy(
        fixture("peft_adapter/adapter_model.safetensors"),
        out.join("adapter_model.safetensors"),
    )
    .expect("copy");
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("peft_adapter/adapter_config.json")).expect("config"),
    )
    .expect("json");
    cfg["lora_alpha"] = json!(400);
    std::fs::write(out.join("adapter_config.json"), cfg.to_string()).expect("write");
    out
}

/// `--adapter-dtype bf16` keeps an adapter in half the memory, counted so in its card, and
/// the adapter still steers the answer; a bad value is refused naming the flag's choices.
#[test]
fn bf16_adapters_take_half_the_memory_and_still_apply() {
    let dir = tempfile::tempdir().expect("temp dir");
    let strong = strong_adapter(dir.path());
    let adapter = format!("peft={}", strong.display());
    let bytes = |s: &Server| -> u64 {
        let list: Value = get_json(s, "/v1/adapters");
        list["data"]
            .as_array()
            .expect("list")
            .iter()
            .find(|a| a["name"] == "peft")
            .and_then(|a| a["bytes"].as_u64())
            .expect("peft's card has its bytes")
    };
    let f32_bytes = {
        let s = start(&["--adapter", &adapter]);
        bytes(&s)
    };
    let s = start(&["--adapter", &adapter, "--adapter-dtype", "bf16"]);
    assert_eq!(bytes(&s) * 2, f32_bytes);
    let q = "What is the capital of France?";
    let base = answer(&post(&s, "/v1/chat/completions", &chat_body("smollm2", q), None).1);
    let (status, v, _) = post(&s, "/v1/chat/completions", &chat_body("peft", q), None);
    assert_eq!(status, 200, "{v}");
    assert_ne!(answer(&v), base, "the bf16 adapter changes the answer");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_graft-serve"))
        .args(["--adapter-dtype", "f16"])
        .output()
        .expect("run graft-serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown adapter dtype 'f16'"), "{err}");
}

#[test]
fn requests_for_different_adapters_in_one_batch_equal_each_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = start(&[
        "--adapter",
        &format!("peft={}", strong_adapter(dir.path()).display()),
    ]);
    let cases = [
        ("smollm2", "What is the capital of France?"),
        ("peft", "What is the capital of France?"),
        ("peft", "Name a color."),
        ("smollm2", "Write a haiku about rain."),
    ];
    let alone: Vec<String> = cases
        .iter()
        .map(|(m, q)| answer(&post(&s, "/v1/chat/completions", &chat_body(m, q), None).1))
        .collect();
    assert_ne!(alone[0], alone[1], "the adapter changes the answer");
    let url = s.url.clone();
    let together: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(m, q)| {
                let url = url.clone();
                sc.spawn(move || {
                    let r = ureq::post(&format!("{url}/v1/chat/completions"))
                        .send_string(&chat_body(m, q).to_string())
                        .expect("request");
                    answer(&serde_json::from_str(&r.into_string().expect("body")).expect("json"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    assert_eq!(together, alone);
}

#[test]
fn adapters_load_replace_and_unload_at_runtime() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gguf_lora = dir.path().join("b.gguf");
    std::fs::copy(
        fixture("peft_adapter/adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .expect("copy");
    let s = start(&[
        "--adapters-dir",
        dir.path().to_str().expect("utf-8"),
        "--watch-interval-ms",
        "0",
    ]);
    // A PEFT directory inside the allowed root.
    let peft_dir = dir.path().join("p");
    copy_adapter(&fixture("peft_adapter"), &peft_dir);
    let (status, v, _) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "p", "lora_path": peft_dir}),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let v1 = v["version"].as_u64().expect("version");
    let (_, _, tag) = post(&s, "/v1/chat/completions", &chat_body("p", "Hi"), None);
    assert_eq!(tag, Some(format!("p@v{v1}")));
    let (status, v, _) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "p", "lora_path": peft_dir}),
        None,
    );
    assert_eq!(status, 200);
    let v2 = v["version"].as_u64().expect("version");
    assert!(v2 > v1, "a reload is a new version");
    let (_, _, tag) = post(&s, "/v1/chat/completions", &chat_body("p", "Hi"), None);
    assert_eq!(tag, Some(format!("p@v{v2}")));

    // Outside the adapters dir: refused. A missing path: 404.
    let (status, v, _) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "x", "lora_path": fixture("peft_adapter")}),
        None,
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("outside"),
        "{v}"
    );
    let (status, _, _) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "x", "lora_path": gguf_lora}),
        None,
    );
    assert_eq!(status, 404);

    let (status, _, _) = post(
        &s,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "p"}),
        None,
    );
    assert_eq!(status, 200);
    let (status, v, _) = post(&s, "/v1/chat/completions", &chat_body("p", "Hi"), None);
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[test]
fn bad_requests_and_keys_get_the_right_4xx() {
    let s = start(&["--api-key", "secret", "--admin-key", "root"]);
    let key = Some("secret");
    let (status, _, _) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("smollm2", "Hi"),
        None,
    );
    assert_eq!(status, 401);
    let (status, _, _) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("smollm2", "Hi"),
        Some("wrong"),
    );
    assert_eq!(status, 401);
    let (status, v, _) = post(&s, "/v1/chat/completions", &chat_body("nope", "Hi"), key);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("model_not_found")),
        "{v}"
    );
    let (status, v, _) = post(
        &s,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": "hi"}),
        key,
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("invalid request body"),
        "{v}"
    );
    let (status, _, _) = post(
        &s,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [], "max_tokens": "x"}),
        key,
    );
    assert_eq!(status, 400);
    let (status, v, _) = post(
        &s,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "word ".repeat(9000)}),
        key,
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("context"),
        "{v}"
    );
    let resp = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .set("Authorization", "Bearer secret")
        .send_string("{not json");
    let Err(ureq::Error::Status(code, _)) = resp else {
        panic!("malformed JSON accepted")
    };
    assert_eq!(code, 400);
    // Management needs the admin key, not the API key.
    let (status, _, _) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "a", "lora_path": fixture("peft_adapter")}),
        key,
    );
    assert_eq!(status, 401);
    let (status, v, _) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "../a", "lora_path": fixture("peft_adapter")}),
        Some("root"),
    );
    assert_eq!(status, 400, "{v}");
    let (status, _, _) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "a", "lora_path": fixture("peft_adapter")}),
        Some("root"),
    );
    assert_eq!(status, 200);
}

#[test]
fn hot_swaps_while_8_clients_stream_fail_no_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let strong = strong_adapter(dir.path());
    let s = start(&[
        "--adapter",
        &format!("p={}", strong.display()),
        "--max-batch",
        "8",
    ]);
    let url = s.url.clone();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let completed = std::sync::atomic::AtomicUsize::new(0);
    // Waits until the clients have finished `n` requests in all.
    let wait_for = |n: usize| {
        let t0 = std::time::Instant::now();
        while completed.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(t0.elapsed() < Duration::from_secs(300), "clients stalled");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (tags, versions) = std::thread::scope(|sc| {
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let (url, stop, completed) = (url.clone(), &stop, &completed);
                sc.spawn(move || {
                    let mut tags = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) || tags.is_empty() {
                        let mut body =
                            chat_body(if i % 2 == 0 { "p" } else { "smollm2" }, "Count to five.");
                        body["stream"] = json!(true);
                        body["max_tokens"] = json!(6);
                        let resp = ureq::post(&format!("{url}/v1/chat/completions"))
                            .send_string(&body.to_string())
                            .expect("no failed request");
                        let tag = resp.header("x-graft-adapter").expect("tagged").to_string();
                        let text = resp.into_string().expect("stream body");
                        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                        tags.push(tag);
                        completed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    tags
                })
            })
            .collect();
        let mut versions = vec![1u64];
        for round in 0..3 {
            wait_for(4 * (round + 1));
            let (status, v, _) = post(
                &s,
                "/v1/load_lora_adapter",
                &json!({"lora_name": "p", "lora_path": strong}),
                None,
            );
            assert_eq!(status, 200, "{v}");
            versions.push(v["version"].as_u64().expect("version"));
            let (status, _, _) = post(
                &s,
                "/v1/load_lora_adapter",
                &json!({"lora_name": format!("q{round}"), "lora_path": strong}),
                None,
            );
            assert_eq!(status, 200);
            let (status, _, _) = post(
                &s,
                "/v1/unload_lora_adapter",
                &json!({"lora_name": format!("q{round}")}),
                None,
            );
            assert_eq!(status, 200);
        }
        wait_for(16);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let tags: Vec<String> = clients
            .into_iter()
            .flat_map(|c| c.join().expect("client"))
            .collect();
        (tags, versions)
    });
    let p_versions: std::collections::BTreeSet<u64> = tags
        .iter()
        .filter_map(|t| t.strip_prefix("p@v"))
        .map(|v| v.parse().expect("version"))
        .collect();
    assert!(
        p_versions.iter().all(|v| versions.contains(v)),
        "{p_versions:?} vs {versions:?}"
    );
    assert!(
        p_versions.len() >= 2,
        "requests saw the replacement: {p_versions:?}"
    );
    assert!(tags.iter().any(|t| t == "smollm2"));
}

/// Runs a client script from `tests/clients` with the tools venv's Python; its one JSON line.
pub(crate) fn python_client(script: &str, args: &[&str]) -> Value {
    let python = graft_core::cache::cache_dir().join("venv-tools/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/prepare-test-models.sh",
        python.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json line")
}

#[test]
fn the_openai_python_client_streams_a_chat_completion_from_an_adapter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = start(&[
        "--adapter",
        &format!("tuned={}", strong_adapter(dir.path()).display()),
        "--api-key",
        "k",
    ]);
    let v = python_client("openai_stream.py", &[s.url.as_str(), "tuned", "k"]);
    assert_eq!(v["models"], json!(["smollm2", "tuned"]));
    assert!(!v["streamed"].as_str().expect("text").is_empty());
    assert_eq!(
        v["streamed"], v["plain"],
        "stream and non-stream agree for greedy decoding"
    );
    assert!(v["finish_reason"].is_string());
    assert!(v["usage"].as_u64().expect("usage") > 0);
}

#[test]
fn fifty_schema_constrained_answers_through_the_openai_client_all_validate() {
    let s = start(&[]);
    let v = python_client("structured.py", &[s.url.as_str(), "smollm2", "50"]);
    assert_eq!(v["requests"], 50);
    assert_eq!(v["valid"], 50, "{v}");
    assert_eq!(v["finish_reasons"], json!({"stop": 50}), "{v}");
}

/// Qwen2.5-Coder-0.5B-Instruct: its template renders tools and teaches Hermes-style calls.
#[test]
fn a_tool_call_round_trip_and_streamed_calls_through_the_openai_client() {
    let qwen = graft_core::cache::cache_dir()
        .join("models")
        .join("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf");
    assert!(
        qwen.is_file(),
        "{} is missing: run scripts/fetch-model.sh qwen2.5-coder",
        qwen.display()
    );
    let s = start_model(&qwen, "qwen", &[]);
    let v = python_client("tools.py", &[s.url.as_str(), "qwen"]);
    assert_eq!(v["finish_reason"], "tool_calls", "{v}");
    let calls = v["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["name"], "get_weather", "{v}");
    assert!(calls[0]["arguments"]["city"].is_string(), "{v}");
    // The result went back through the template and the model answered in text.
    assert!(
        v["answer"].as_str().is_some_and(|a| !a.trim().is_empty()),
        "{v}"
    );
    let streamed = v["streamed"].as_array().expect("streamed");
    assert_eq!(streamed.len(), 1, "{v}");
    assert_eq!(streamed[0]["name"], "get_time", "{v}");
    assert!(streamed[0]["arguments"]["zone"].is_string(), "{v}");
    assert_eq!(v["streamed_finish"], "tool_calls", "{v}");
    assert!(
        !v["streamed_text"]
            .as_str()
            .expect("text")
            .contains("<tool_call>"),
        "{v}"
    );
    // Left to itself (greedy), this model answers with the call it was taught.
    assert_eq!(v["auto_finish"], "tool_calls", "{v}");
    assert_eq!(v["auto_calls"], json!(["get_weather"]), "{v}");
}

#[test]
fn more_adapters_than_the_memory_budget_are_evicted_and_reloaded_on_demand() {
    let dir = tempfile::tempdir().expect("temp dir");
    let strong = strong_adapter(dir.path());
    // Each adapter is ~0.6 MiB: a 1.5 MiB budget holds two; "a0" is pinned.
    let mut args: Vec<String> = vec![
        "--adapter-memory-mb".into(),
        "1.5".into(),
        "--pin".into(),
        "a0".into(),
    ];
    for i in 0..5 {
        args.push("--adapter".into());
        args.push(format!("a{i}={}", strong.display()));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = start(&refs);
    let expected = answer(&post(&s, "/v1/chat/completions", &chat_body("a0", "Hi"), None).1);
    for round in 0..2 {
        for i in 0..5 {
            let (status, v, tag) = post(
                &s,
                "/v1/chat/completions",
                &chat_body(&format!("a{i}"), "Hi"),
                None,
            );
            assert_eq!(status, 200, "round {round} a{i}: {v}");
            assert_eq!(
                answer(&v),
                expected,
                "same files, same answer after a reload"
            );
            assert!(tag.expect("tagged").starts_with(&format!("a{i}@v")));
        }
    }
    let list: Value = get_json(&s, "/v1/adapters");
    let list = list["data"].as_array().expect("list");
    assert_eq!(list.len(), 5, "evicted adapters stay known");
    let in_memory = list.iter().filter(|a| a["location"] == "memory").count();
    assert!(in_memory <= 2, "{list:?}");
    assert!(
        list.iter()
            .any(|a| a["name"] == "a0" && a["location"] == "memory"),
        "pinned stays: {list:?}"
    );
    let m = get_text(&s, "/metrics");
    let value = |name: &str| metric(&m, name);
    assert!(value("graft_adapter_evictions_total") >= 4.0, "{m}");
    assert!(value("graft_adapter_reloads_total") >= 4.0, "{m}");
    assert!(value("graft_adapter_memory_bytes") <= 1.5 * 1024.0 * 1024.0);
}

/// The `server-timing` header of a chat request's answer (present when its adapter was read).
fn adapter_load_timing(s: &Server, model: &str) -> Option<String> {
    ureq::post(&format!("{}/v1/chat/completions", s.url))
        .send_string(&chat_body(model, "Hi").to_string())
        .expect("request")
        .header("server-timing")
        .map(str::to_string)
}

/// `GET /v1/adapters/{name}`.
fn adapter_entry(s: &Server, name: &str) -> Value {
    get_json(s, &format!("/v1/adapters/{name}"))
}

#[test]
fn an_adapters_dir_is_indexed_at_start_and_each_adapter_read_on_first_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let strong = strong_adapter(dir.path());
    let root = dir.path().join("adapters");
    std::fs::create_dir(&root).expect("mkdir");
    for name in ["good1", "good2", "broken"] {
        copy_adapter(&strong, &root.join(name));
    }
    let weights = root.join("broken/adapter_model.safetensors");
    std::fs::write(&weights, b"not a safetensors file").expect("corrupt");
    // ~0.6 MiB per adapter: the budget holds one besides the pinned one.
    let s = start(&[
        "--adapters-dir",
        root.to_str().expect("utf-8"),
        "--watch-interval-ms",
        "0",
        "--adapter-memory-mb",
        "1",
        "--pin",
        "good2",
    ]);
    // Known by name at start, nothing read (the broken one is not found out yet) but the
    // pinned one.
    for name in ["good1", "broken"] {
        let e = adapter_entry(&s, name);
        assert_eq!(e["location"], "disk", "{e}");
        assert!(e.get("rank").is_none(), "not read yet: {e}");
    }
    assert_eq!(adapter_entry(&s, "good2")["location"], "memory");
    let listed = get_json(&s, "/v1/adapters");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        listed["data"][1],
        adapter_entry(&s, "good1"),
        "one card = its list entry"
    );
    match ureq::get(&format!("{}/v1/adapters/nope", s.url)).call() {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("unknown adapter: {other:?}"),
    }
    let m = get_text(&s, "/metrics");
    assert_eq!(metric(&m, "graft_adapters_known"), 3.0);
    assert_eq!(metric(&m, "graft_adapters_loaded"), 1.0);

    // First use reads it, and the answer says what that cost.
    let timing = adapter_load_timing(&s, "good1").expect("a cold adapter's answer is timed");
    assert!(timing.starts_with("adapter-load;dur="), "{timing}");
    assert!(adapter_load_timing(&s, "good1").is_none(), "in memory now");
    let (_, first, tag) = post(&s, "/v1/chat/completions", &chat_body("good1", "Hi"), None);
    let v1 = adapter_entry(&s, "good1")["version"]
        .as_u64()
        .expect("version");
    assert_eq!(tag, Some(format!("good1@v{v1}")));
    assert_eq!(adapter_entry(&s, "good1")["rank"], json!(4));

    // Broken files: a 400 naming the file, and the catalog says why.
    let (status, v, _) = post(&s, "/v1/chat/completions", &chat_body("broken", "Hi"), None);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_adapter", "{v}");
    assert_eq!(v["error"]["param"], "model", "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
    let e = adapter_entry(&s, "broken");
    assert_eq!(e["location"], "broken", "{e}");
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("corrupt")),
        "{e}"
    );
    // Refused again at once while the files stay the same; served once they are mended.
    let (status, v, _) = post(&s, "/v1/chat/completions", &chat_body("broken", "Hi"), None);
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("broken")),
        "{v}"
    );
    std::fs::copy(strong.join("adapter_model.safetensors"), &weights).expect("mend");
    let (status, v, _) = post(&s, "/v1/chat/completions", &chat_body("broken", "Hi"), None);
    assert_eq!((status, answer(&v)), (200, answer(&first)), "{v}");
    assert_eq!(adapter_entry(&s, "broken")["location"], "memory");

    // good1 was evicted by the budget; asked for again, it is read again at its version.
    assert_eq!(adapter_entry(&s, "good1")["location"], "disk");
    let (status, again, tag) = post(&s, "/v1/chat/completions", &chat_body("good1", "Hi"), None);
    assert_eq!((status, tag), (200, Some(format!("good1@v{v1}"))));
    assert_eq!(answer(&again), answer(&first));
    let m = get_text(&s, "/metrics");
    assert_eq!(metric(&m, "graft_adapter_first_loads_total"), 3.0, "{m}");
    assert!(metric(&m, "graft_adapter_reloads_total") >= 1.0, "{m}");
    assert!(metric(&m, "graft_adapter_evictions_total") >= 2.0, "{m}");
}

#[test]
fn concurrent_first_requests_read_an_adapter_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let strong = strong_adapter(dir.path());
    let root = dir.path().join("adapters");
    std::fs::create_dir(&root).expect("mkdir");
    copy_adapter(&strong, &root.join("hot"));
    let s = start(&[
        "--adapters-dir",
        root.to_str().expect("utf-8"),
        "--watch-interval-ms",
        "0",
    ]);
    let e = adapter_entry(&s, "hot");
    assert_eq!(e["location"], "disk", "{e}");
    let timings: Vec<Option<String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|_| sc.spawn(|| adapter_load_timing(&s, "hot")))
            .collect();
        hs.into_iter().map(|h| h.join().expect("client")).collect()
    });
    assert!(timings.iter().any(Option::is_some), "{timings:?}");
    let m = get_text(&s, "/metrics");
    assert_eq!(metric(&m, "graft_adapter_first_loads_total"), 1.0, "{m}");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let s = start(&["--max-batch", "1", "--max-queue", "1"]);
    let url = s.url.clone();
    let results: Vec<(u16, Option<String>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                let url = url.clone();
                sc.spawn(move || {
                    let mut body = chat_body("smollm2", "Tell me a long story about a dragon.");
                    body["max_tokens"] = json!(24);
                    match ureq::post(&format!("{url}/v1/chat/completions"))
                        .send_string(&body.to_string())
                    {
                        Ok(r) => (r.status(), None),
                        Err(ureq::Error::Status(code, r)) => {
                            (code, r.header("retry-after").map(str::to_string))
                        }
                        Err(e) => panic!("transport error: {e}"),
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("client")).collect()
    });
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let limited: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(ok >= 1 && !limited.is_empty(), "{results:?}");
    assert_eq!(ok + limited.len(), 6, "{results:?}");
    assert!(
        limited.iter().all(|r| r.1.as_deref() == Some("1")),
        "Retry-After on every 429: {results:?}"
    );
}

#[test]
fn a_client_that_disconnects_frees_its_slot_and_a_timeout_ends_a_request() {
    let s = start(&["--max-batch", "1", "--request-timeout", "20"]);
    let mut body = chat_body("smollm2", "Write a very long story about the sea.");
    body["max_tokens"] = json!(3000);
    body["stream"] = json!(true);
    let resp = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .send_string(&body.to_string())
        .expect("stream");
    assert!(resp
        .header("x-request-id")
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    let mut reader = BufReader::new(resp.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).expect("first chunk");
    drop(reader); // the client goes away after the first chunk
    let t0 = std::time::Instant::now();
    let (status, v, _) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("smollm2", "Hi"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "the abandoned request kept the only slot for {:?}",
        t0.elapsed()
    );

    // Without a disconnect, the 20 s request timeout ends a 3000-token request with "length".
    body["stream"] = json!(false);
    let t0 = std::time::Instant::now();
    let (status, v, _) = post(&s, "/v1/chat/completions", &body, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["usage"]["completion_tokens"].as_u64().expect("usage") < 3000);
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn the_kv_cache_budget_makes_requests_wait_and_refuses_what_can_never_fit() {
    let s = start(&["--kv-cache-tokens", "120", "--max-batch", "8"]);
    let url = s.url.clone();
    let statuses: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let url = url.clone();
                sc.spawn(move || {
                    let mut body = chat_body("smollm2", "Hi");
                    body["max_tokens"] = json!(40);
                    ureq::post(&format!("{url}/v1/chat/completions"))
                        .send_string(&body.to_string())
                        .map(|r| r.status())
                        .unwrap_or(0)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("client")).collect()
    });
    assert_eq!(
        statuses,
        vec![200, 200, 200],
        "requests beyond the budget wait, then run"
    );
    let mut body = chat_body("smollm2", "Hi");
    body["max_tokens"] = json!(200);
    let (status, v, _) = post(&s, "/v1/chat/completions", &body, None);
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("KV cache budget"),
        "{v}"
    );
}

/// Polls `/v1/adapters` until `pred` holds for the named adapter's entry (or its absence).
fn wait_adapter(s: &Server, name: &str, pred: impl Fn(Option<&Value>) -> bool) -> Option<Value> {
    let t0 = std::time::Instant::now();
    loop {
        let list: Value = get_json(&s, "/v1/adapters");
        let entry = list["data"]
            .as_array()
            .expect("list")
            .iter()
            .find(|a| a["name"] == name)
            .cloned();
        if pred(entry.as_ref()) {
            return entry;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "adapter {name} never reached the expected state: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_watched_directory_indexes_replaces_and_removes_adapters() {
    watched_directory(false);
}

#[test]
fn the_polled_directory_indexes_replaces_and_removes_adapters() {
    watched_directory(true);
}

/// New, changed (while in memory and while not) and removed adapters, through the OS's file
/// events or (`poll`) by listing the directory. The directory is given relative to the
/// server's working directory, as in `configs/serve.toml`. A partial write over an adapter in
/// memory does not take its good version out of service.
fn watched_directory(poll: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let watched = dir.path().join("adapters");
    std::fs::create_dir(&watched).expect("mkdir");
    let mut args = vec!["--adapters-dir", "./adapters", "--watch-interval-ms", "200"];
    if poll {
        args.push("--watch-poll");
    }
    let s = start_in(dir.path(), &args);
    let staged = strong_adapter(dir.path());
    let target = watched.join("w1");
    // Staged in a hidden directory and renamed into place, as graft-train writes adapters.
    let hidden = watched.join(".w1.tmp");
    copy_adapter(&staged, &hidden);
    std::fs::rename(&hidden, &target).expect("rename");
    let v1 = wait_adapter(&s, "w1", |e| e.is_some()).expect("indexed")["version"]
        .as_u64()
        .expect("version");
    let version_after = |v: u64| {
        wait_adapter(&s, "w1", |e| {
            e.is_some_and(|e| e["version"].as_u64() != Some(v))
        })
        .expect("re-indexed")
    };
    let set_alpha = |alpha: f64| {
        let mut cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(target.join("adapter_config.json")).expect("config"),
        )
        .expect("json");
        cfg["lora_alpha"] = json!(alpha);
        let tmp = target.join(".adapter_config.json.tmp");
        std::fs::write(&tmp, format!("{cfg}\n")).expect("write");
        std::fs::rename(&tmp, target.join("adapter_config.json")).expect("rename");
    };
    let (_, base, _) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("smollm2", "Hi"),
        None,
    );

    // Changed while not in memory: indexed as a new version, the next request reads it.
    set_alpha(0.0);
    let e = version_after(v1);
    assert_eq!(e["location"], "disk", "not read until used: {e}");
    let v2 = e["version"].as_u64().expect("version");
    assert!(v2 > v1);
    let (status, v, tag) = post(&s, "/v1/chat/completions", &chat_body("w1", "Hi"), None);
    assert_eq!((status, tag), (200, Some(format!("w1@v{v2}"))));
    assert_eq!(answer(&v), answer(&base), "alpha 0: the base's answer");

    // Changed while in memory: read at once and replaced by the new version.
    set_alpha(400.0);
    let e = version_after(v2);
    assert_eq!(e["location"], "memory", "read by the watcher: {e}");
    let v3 = e["version"].as_u64().expect("version");
    let (status, v, tag) = post(&s, "/v1/chat/completions", &chat_body("w1", "Hi"), None);
    assert_eq!((status, tag), (200, Some(format!("w1@v{v3}"))));
    let strong_answer = answer(&v);
    assert_ne!(strong_answer, answer(&base));

    // A partial write over it (half the weights, in place): v3 stays in service, its card
    // says why the files were not taken; once the write completes, they are.
    let weights = std::fs::read(target.join("adapter_model.safetensors")).expect("weights");
    std::fs::write(
        target.join("adapter_model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .expect("partial write");
    let e = wait_adapter(&s, "w1", |e| e.is_some_and(|e| e["error"].is_string()))
        .expect("the failed read is reported");
    assert_eq!(
        (e["version"].as_u64(), e["location"].as_str()),
        (Some(v3), Some("memory")),
        "the good version stays: {e}"
    );
    let (status, v, tag) = post(&s, "/v1/chat/completions", &chat_body("w1", "Hi"), None);
    assert_eq!((status, tag), (200, Some(format!("w1@v{v3}"))));
    assert_eq!(answer(&v), strong_answer);
    std::fs::write(target.join("adapter_model.safetensors"), &weights).expect("complete write");
    let e = version_after(v3);
    assert!(e["error"].is_null(), "{e}");
    assert_eq!(e["location"], "memory", "{e}");

    std::fs::remove_dir_all(&target).expect("remove");
    wait_adapter(&s, "w1", |e| e.is_none());
    let (status, _, _) = post(&s, "/v1/chat/completions", &chat_body("w1", "Hi"), None);
    assert_eq!(status, 404);
}

#[test]
fn every_serve_config_in_configs_starts_a_server() {
    let configs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&configs).expect("configs dir") {
        let path = e.expect("entry").path();
        if !path
            .file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.starts_with("serve") && f.ends_with(".toml"))
        {
            continue;
        }
        // The model and port come from the command line, which wins over the file.
        let s = start(&["--config", path.to_str().expect("utf-8")]);
        let models: Value = get_json(&s, "/v1/models");
        assert_eq!(models["data"][0]["id"], "smollm2", "{}", path.display());
        n += 1;
    }
    assert!(n >= 1);
    // Unknown keys in a config are refused with the file and line.
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("serve.toml");
    std::fs::write(&bad, "port = 8001\nmax_batchez = 3\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_graft-serve"))
        .arg("--config")
        .arg(&bad)
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("serve.toml") && e.contains("max_batchez") && e.contains("line 2"),
        "{e}"
    );
}

#[test]
fn echo_scores_prompts_consistently_with_generation_logprobs() {
    let s = start(&[]);
    // Greedy generation with logprobs and 3 alternatives per token.
    let (status, gen, _) = post(
        &s,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 3}),
        None,
    );
    assert_eq!(status, 200, "{gen}");
    let g = &gen["choices"][0]["logprobs"];
    let gen_tokens: Vec<String> = g["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("token").to_string())
        .collect();
    let gen_lps: Vec<f64> = g["token_logprobs"]
        .as_array()
        .expect("lps")
        .iter()
        .map(|v| v.as_f64().expect("lp"))
        .collect();
    assert_eq!(
        gen_tokens.concat(),
        gen["choices"][0]["text"].as_str().expect("text")
    );
    for (i, alts) in g["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .enumerate()
    {
        let alts = alts.as_object().expect("map");
        assert_eq!(alts.len(), 3);
        let best = alts
            .values()
            .map(|v| v.as_f64().expect("lp"))
            .fold(f64::MIN, f64::max);
        assert!(
            (best - gen_lps[i]).abs() < 1e-5,
            "greedy picks the most likely token"
        );
    }

    // Scoring prompt + completion with echo (no generation) gives the same log-probabilities
    // for the completion's tokens: a full forward against incremental KV-cache decoding.
    let full = format!("The capital of France is{}", gen_tokens.concat());
    let (status, echo, _) = post(
        &s,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": full, "max_tokens": 0, "echo": true, "logprobs": 1}),
        None,
    );
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["choices"][0]["text"], full);
    assert_eq!(echo["usage"]["completion_tokens"], 0);
    let e = &echo["choices"][0]["logprobs"];
    let tokens = e["tokens"].as_array().expect("tokens");
    let lps = e["token_logprobs"].as_array().expect("lps");
    assert!(lps[0].is_null(), "the first token has no context");
    assert_eq!(
        tokens
            .iter()
            .map(|t| t.as_str().expect("token"))
            .collect::<String>(),
        full
    );
    let tail: Vec<f64> = lps[lps.len() - gen_lps.len()..]
        .iter()
        .map(|v| v.as_f64().expect("lp"))
        .collect();
    for (a, b) in tail.iter().zip(&gen_lps) {
        assert!(
            (a - b).abs() < 1e-3,
            "echo {tail:?} vs generation {gen_lps:?}"
        );
    }
}

#[test]
fn the_bench_command_drives_a_server_and_prints_figures() {
    let s = start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_graft-serve"))
        .args([
            "bench",
            "--url",
            &s.url,
            "--clients",
            "2",
            "--requests",
            "3",
            "--max-tokens",
            "3",
        ])
        .arg("--load-adapter")
        .arg(fixture("peft_adapter"))
        .args(["--load-count", "2"])
        .output()
        .expect("spawn bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("requests: 3 ok, 0 failed"), "{stdout}");
    for what in [
        "throughput:",
        "time to first token: p50",
        "inter-token latency: p50",
        "adapter load",
    ] {
        assert!(stdout.contains(what), "{what} missing: {stdout}");
    }
}

#[test]
fn a_symlink_out_of_the_adapters_dir_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("adapters");
    std::fs::create_dir(&root).expect("mkdir");
    std::os::unix::fs::symlink(fixture("peft_adapter"), root.join("escape")).expect("symlink");
    let s = start(&[
        "--adapters-dir",
        root.to_str().expect("utf-8"),
        "--watch-interval-ms",
        "0",
        "--admin-key",
        "root",
    ]);
    let list: Value = serde_json::from_str(
        &ureq::get(&format!("{}/v1/adapters", s.url))
            .set("Authorization", "Bearer root")
            .call()
            .expect("adapters")
            .into_string()
            .expect("body"),
    )
    .expect("json");
    assert_eq!(
        list["data"],
        json!([]),
        "the escaping link is not loaded at start either"
    );
    let (status, v, _) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "escape", "lora_path": root.join("escape")}),
        Some("root"),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("outside"),
        "{v}"
    );
    let (status, _, _) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "dots", "lora_path": root.join("../adapters/../..")}),
        Some("root"),
    );
    assert!(status == 400 || status == 404);
}

/// Starts a streamed completion of `tokens` tokens; returns once its first chunk arrived, with
/// a thread that reads the rest (the whole stream's text; cut or not).
fn stream_in_flight(s: &Server, tokens: usize) -> std::thread::JoinHandle<String> {
    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": tokens,
                      "ignore_eos": true, "temperature": 0, "stream": true});
    let resp = ureq::post(&format!("{}/v1/completions", s.url))
        .send_string(&body.to_string())
        .expect("stream");
    let mut reader = BufReader::new(resp.into_reader());
    let mut text = String::new();
    while !text.contains("\"text\"") {
        assert!(reader.read_line(&mut text).expect("a line") > 0, "{text}");
    }
    std::thread::spawn(move || {
        // A cut connection ends the read with an error: what arrived is the answer.
        let _ = std::io::Read::read_to_string(&mut reader, &mut text);
        text
    })
}

fn sigterm(s: &Server) {
    let status = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn sigterm_refuses_new_requests_lets_in_flight_ones_finish_then_exits() {
    let mut s = start(&[]);
    let client = stream_in_flight(&s, 120);
    sigterm(&s);
    // New connections are refused at once, while the stream still runs.
    let mut refused = false;
    for _ in 0..50 {
        let r = ureq::get(&format!("{}/health", s.url))
            .timeout(Duration::from_secs(2))
            .call();
        if matches!(r, Err(ureq::Error::Transport(_))) {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused, "a new connection was still accepted after SIGTERM");
    assert!(
        !client.is_finished(),
        "the stream ended before the refusal was seen: lengthen it"
    );
    let text = client.join().expect("client");
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the in-flight stream was cut: {text}"
    );
    let exit = s.child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn a_request_still_running_at_the_shutdown_timeout_is_cut_and_the_server_exits() {
    let mut s = start(&["--shutdown-timeout", "1"]);
    let client = stream_in_flight(&s, 4000);
    let t0 = std::time::Instant::now();
    sigterm(&s);
    let exit = s.child.wait().expect("wait");
    let took = t0.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM with --shutdown-timeout 1"
    );
    let text = client.join().expect("client");
    assert!(!text.contains("[DONE]"), "the stream was not cut: {text}");
}

/// Samples of a `/metrics` text, parsed by prometheus_client (the reference parser).
pub(crate) fn prometheus_samples(text: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("metrics.txt");
    std::fs::write(&path, text).expect("write");
    let v = python_client("prometheus_parse.py", &[path.to_str().expect("utf-8")]);
    v["samples"].as_array().expect("samples").clone()
}

/// The first `/metrics` text (polled every 20 ms, for up to a minute) with the line `line`.
pub(crate) fn metrics_once(s: &Server, lines: &[&str]) -> String {
    let t0 = std::time::Instant::now();
    loop {
        let text = get_text(s, "/metrics");
        if lines.iter().all(|line| text.lines().any(|l| l == *line)) {
            return text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never {lines:?} in one scrape:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn sample_value(samples: &[Value], name: &str) -> f64 {
    sample(samples, name)["value"].as_f64().expect("a number")
}

pub(crate) fn sample<'a>(samples: &'a [Value], name: &str) -> &'a Value {
    samples
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {samples:?}"))
}

#[test]
fn metrics_carry_the_inference_gateways_vllm_names() {
    let dir = tempfile::tempdir().expect("temp dir");
    let strong = strong_adapter(dir.path());
    let a1 = format!("a1={}", strong.display());
    let a2 = format!("a2={}", strong.display());
    let s = start(&["--max-batch", "1", "--adapter", &a1, "--adapter", &a2]);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64()
    };
    let check_idle = |samples: &[Value]| {
        assert_eq!(sample_value(samples, "vllm:num_requests_running"), 0.0);
        assert_eq!(sample_value(samples, "vllm:num_requests_waiting"), 0.0);
        assert_eq!(sample_value(samples, "vllm:kv_cache_usage_perc"), 0.0);
        let info = sample(samples, "vllm:lora_requests_info");
        assert_eq!(
            info["labels"],
            json!({"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""})
        );
        let at = sample_value(samples, "vllm:lora_requests_info");
        assert!((at - now()).abs() < 60.0, "{info}");
    };
    let samples = prometheus_samples(&get_text(&s, "/metrics"));
    check_idle(&samples);
    assert_eq!(
        sample(&samples, "vllm:num_requests_running")["labels"],
        json!({"model_name": "smollm2"})
    );
    assert_eq!(
        sample(&samples, "vllm:num_requests_running")["type"],
        "gauge"
    );

    // One slot, three long requests (a1, a2, a1 in that order): one runs, two wait.
    let busy = std::thread::scope(|sc| {
        for (i, model) in ["a1", "a2", "a1"].into_iter().enumerate() {
            let s = &s;
            sc.spawn(move || {
                std::thread::sleep(Duration::from_millis(150 * i as u64));
                let body = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 150, "ignore_eos": true, "temperature": 0});
                let (status, v, _) = post(s, "/v1/chat/completions", &body, None);
                assert_eq!(status, 200, "{v}");
            });
        }
        metrics_once(&s, &["vllm:num_requests_waiting{model_name=\"smollm2\"} 2"])
    });
    let samples = prometheus_samples(&busy);
    assert_eq!(sample_value(&samples, "vllm:num_requests_running"), 1.0);
    assert_eq!(sample_value(&samples, "vllm:num_requests_waiting"), 2.0);
    let usage = sample_value(&samples, "vllm:kv_cache_usage_perc");
    assert!(usage > 0.0 && usage <= 1.0, "{usage}");
    assert_eq!(
        sample(&samples, "vllm:lora_requests_info")["labels"],
        json!({"max_lora": "1", "running_lora_adapters": "a1", "waiting_lora_adapters": "a1,a2"})
    );
    // All answered (the scope waited for the clients); the engine empties its batch next.
    let idle = metrics_once(&s, &["vllm:num_requests_running{model_name=\"smollm2\"} 0"]);
    check_idle(&prometheus_samples(&idle));
}
