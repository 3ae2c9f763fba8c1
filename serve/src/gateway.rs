//! The metrics Kubernetes' Gateway API Inference Extension routes by. Its endpoint picker
//! scrapes each replica's `/metrics` for vLLM's names — queue, running requests, KV cache use
//! and which adapters are running or waiting (adapter affinity) — so graft exports them under
//! those names beside its own:
//!
//! - `vllm:num_requests_waiting`, `vllm:num_requests_running` (gauges, label `model_name`);
//! - `vllm:kv_cache_usage_perc` (0–1: KV positions reserved by running requests over the
//!   budget, `--kv-cache-tokens` or max batch × context);
//! - `vllm:lora_requests_info` (value: the Unix time of the scrape; labels
//!   `running_lora_adapters` and `waiting_lora_adapters`, comma-joined without spaces, and
//!   `max_lora`, the most adapters one batch runs).
//!
//! `vllm:cache_config_info` is left out: graft's KV cache is not paged into blocks.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::metrics::Metrics;

/// What the scrape reports that does not change while the server runs.
#[derive(Debug, Clone)]
pub struct GatewayLabels {
    /// The base model's served name (`model_name`).
    pub model_name: String,
    /// Adapters one batch can run: the engine's max batch (`max_lora`).
    pub max_lora: usize,
    /// KV positions the running requests may reserve in all.
    pub kv_capacity: usize,
}

/// The vLLM-named series, in Prometheus text format, at Unix time `now`.
pub fn render(m: &Metrics, labels: &GatewayLabels, now: f64) -> String {
    let running = m.running.load(Ordering::Relaxed);
    let waiting = m.in_flight.load(Ordering::Relaxed).saturating_sub(running);
    let usage = if labels.kv_capacity == 0 {
        0.0
    } else {
        (m.kv_reserved.load(Ordering::Relaxed) as f64 / labels.kv_capacity as f64).min(1.0)
    };
    let running_adapters = m
        .running_adapters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .join(",");
    let waiting_adapters = m
        .waiting_adapters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    let model = escape(&labels.model_name);
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, labels: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {value}"
        );
    };
    gauge(
        "vllm:num_requests_running",
        "Requests in the engine's batch.",
        &format!("model_name=\"{model}\""),
        running as f64,
    );
    gauge(
        "vllm:num_requests_waiting",
        "Requests waiting for the engine.",
        &format!("model_name=\"{model}\""),
        waiting as f64,
    );
    gauge(
        "vllm:kv_cache_usage_perc",
        "KV cache use, 0 to 1.",
        &format!("model_name=\"{model}\""),
        usage,
    );
    gauge(
        "vllm:lora_requests_info",
        "Running and waiting adapters (value: the Unix time of the scrape).",
        &format!(
            "max_lora=\"{}\",running_lora_adapters=\"{running_adapters}\",waiting_lora_adapters=\"{waiting_adapters}\"",
            labels.max_lora
        ),
        now,
    );
    out
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_series_follow_the_engine_state_in_vllm_names() {
        let m = Metrics::default();
        let labels = GatewayLabels {
            model_name: "my \"base\"".into(),
            max_lora: 8,
            kv_capacity: 1000,
        };
        m.in_flight.store(3, Ordering::Relaxed);
        m.set_running(1, 250, ["b", "a", "b"].into_iter());
        m.waiting_add(Some("c"));
        m.waiting_add(Some("a"));
        m.waiting_add(None);
        let text = render(&m, &labels, 1.5e9);
        for line in [
            "vllm:num_requests_running{model_name=\"my \\\"base\\\"\"} 1",
            "vllm:num_requests_waiting{model_name=\"my \\\"base\\\"\"} 2",
            "vllm:kv_cache_usage_perc{model_name=\"my \\\"base\\\"\"} 0.25",
            "vllm:lora_requests_info{max_lora=\"8\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"a,c\"} 1500000000",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        m.waiting_remove(Some("a"));
        m.waiting_remove(Some("c"));
        m.set_running(0, 0, std::iter::empty());
        assert!(render(&m, &labels, 2.0)
            .contains("running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 2\n"));
    }
}
