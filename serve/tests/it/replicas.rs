//! Two replicas as the Gateway API Inference Extension sees them: each scraped and parsed with
//! the reference Prometheus parser while it serves a different adapter — one loaded through
//! vLLM's `/v1/load_lora_adapter`, one resolved from S3 (moto on loopback) on first use.

use std::time::Duration;

use serde_json::{json, Value};

use crate::server::{
    get_json, get_text, metrics_once, post, prometheus_samples, sample, sample_value, start_env,
    strong_adapter, Server,
};
use crate::sources::Moto;

fn long_request(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
           "max_tokens": 200, "ignore_eos": true, "temperature": 0})
}

fn model_ids(s: &Server) -> Vec<String> {
    get_json(s, "/v1/models")["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect()
}

#[test]
fn two_replicas_report_the_gateways_metric_contract_for_their_own_adapters() {
    let work = tempfile::tempdir().expect("temp dir");
    let strong = strong_adapter(work.path());
    let moto = Moto::start();
    moto.create_bucket("fleet");
    moto.put_dir("fleet", "lora/sql", &strong);
    let replica = |i: usize| {
        let dir = work.path().join(format!("replica{i}"));
        std::fs::create_dir(&dir).expect("mkdir");
        start_env(
            &[
                "--max-batch",
                "1",
                "--adapters-dir",
                dir.to_str().expect("utf-8"),
                "--adapter-source",
                "s3://fleet/lora",
                "--s3-endpoint",
                &moto.url,
            ],
            &[
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
            ],
        )
    };
    let (r1, r2) = (replica(1), replica(2));

    // Replica 1: an adapter loaded as the gateway's dynamic-LoRA sidecar loads one.
    let local = work.path().join("replica1/chat");
    std::fs::create_dir(&local).expect("mkdir");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(strong.join(f), local.join(f)).expect("copy");
    }
    let (status, v, _) = post(
        &r1,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "chat", "lora_path": local.display().to_string()}),
        None,
    );
    assert_eq!(status, 200, "{v}");
    // Replica 2: the adapter's first request downloads it from S3.
    let (status, v, _) = post(
        &r2,
        "/v1/chat/completions",
        &json!({"model": "sql", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(model_ids(&r1), ["smollm2", "chat"]);
    assert_eq!(model_ids(&r2), ["smollm2", "sql"]);

    // Idle: nothing running or waiting, the LoRA info gauge carries the time.
    for r in [&r1, &r2] {
        // Answered; the engine empties its batch at its next turn.
        let idle = metrics_once(r, &["vllm:num_requests_running{model_name=\"smollm2\"} 0"]);
        let samples = prometheus_samples(&idle);
        assert_eq!(sample_value(&samples, "vllm:num_requests_waiting"), 0.0);
        assert_eq!(
            sample(&samples, "vllm:num_requests_running")["labels"],
            json!({"model_name": "smollm2"})
        );
        assert_eq!(
            sample(&samples, "vllm:lora_requests_info")["labels"]["running_lora_adapters"],
            ""
        );
    }

    // Busy: each replica runs one request on its adapter with another waiting behind it.
    std::thread::scope(|sc| {
        for (r, model) in [(&r1, "chat"), (&r2, "sql")] {
            for i in 0..2u64 {
                sc.spawn(move || {
                    std::thread::sleep(Duration::from_millis(100 * i));
                    let (status, v, _) =
                        post(r, "/v1/chat/completions", &long_request(model), None);
                    assert_eq!(status, 200, "{v}");
                });
            }
        }
        for (r, model) in [(&r1, "chat"), (&r2, "sql")] {
            // One scrape with the first request running and the second queued (the first may
            // itself wait a moment while its adapter is read).
            let text = metrics_once(
                r,
                &[
                    "vllm:num_requests_waiting{model_name=\"smollm2\"} 1",
                    "vllm:num_requests_running{model_name=\"smollm2\"} 1",
                ],
            );
            let samples = prometheus_samples(&text);
            assert_eq!(
                sample(&samples, "vllm:num_requests_waiting")["type"],
                "gauge"
            );
            assert_eq!(sample_value(&samples, "vllm:num_requests_running"), 1.0);
            let usage = sample_value(&samples, "vllm:kv_cache_usage_perc");
            assert!(usage > 0.0 && usage <= 1.0, "{usage}");
            assert_eq!(
                sample(&samples, "vllm:lora_requests_info")["labels"],
                json!({"max_lora": "1", "running_lora_adapters": model,
                       "waiting_lora_adapters": model}),
                "{text}"
            );
        }
    });
    for r in [&r1, &r2] {
        let idle = metrics_once(r, &["vllm:num_requests_running{model_name=\"smollm2\"} 0"]);
        let samples = prometheus_samples(&idle);
        assert_eq!(sample_value(&samples, "vllm:num_requests_waiting"), 0.0);
        assert_eq!(sample_value(&samples, "vllm:kv_cache_usage_perc"), 0.0);
    }
    let m = get_text(&r2, "/metrics");
    assert_eq!(crate::metric(&m, "graft_adapter_fetches_total"), 1.0);
}
