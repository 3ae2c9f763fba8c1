//! Prometheus metrics (`GET /metrics`, text exposition format 0.0.4): request and token
//! counters, time-to-first-token and inter-token latency histograms, queue depth, running batch
//! size, adapter loads and load time, and requests per adapter (at most `MAX_ADAPTER_LABELS`
//! adapters get their own label; the rest are summed under `other`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const MAX_ADAPTER_LABELS: usize = 50;

/// Fixed-bucket histogram of seconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Adapter loads take milliseconds.
const LOAD_BOUNDS: &[f64] = &[
    0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The adapter registry's figures at the time of a scrape.
pub struct AdapterFigures {
    pub known: usize,
    pub loaded: usize,
    pub bytes: usize,
    pub evictions: u64,
    pub reloads: u64,
    pub first_loads: u64,
    /// Adapters downloaded from `--adapter-source`s, names none had, and failed downloads.
    pub fetched: u64,
    pub fetch_missing: u64,
    pub fetch_failed: u64,
}

pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    /// Requests ended by an engine fault (a panic, a failed read-back, non-finite logits).
    pub failed: AtomicU64,
    /// Batched steps that failed and were re-run one request at a time.
    pub step_faults: AtomicU64,
    /// Times the engine loop itself failed and was restarted.
    pub engine_restarts: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Requests submitted and not yet finished (running + waiting).
    pub in_flight: AtomicU64,
    /// Sequences in the engine's last forward call.
    pub batch_size: AtomicU64,
    pub adapter_loads: AtomicU64,
    pub adapter_unloads: AtomicU64,
    /// Requests that started from a kept prompt prefix, and the prompt tokens not recomputed.
    pub prefix_cache_hits: AtomicU64,
    pub prefix_cache_tokens: AtomicU64,
    /// Tokens of prompts the prefix cache keeps now (a gauge; its budget bounds it).
    pub prefix_cache_kept_tokens: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub adapter_load_secs: Histogram,
    /// Requests the engine is decoding (its batch), and the KV positions they reserve.
    pub running: AtomicU64,
    pub kv_reserved: AtomicU64,
    /// Adapters of the running requests, sorted, each once.
    pub running_adapters: Mutex<Vec<String>>,
    /// Requests submitted and not yet running, per adapter.
    pub waiting_adapters: Mutex<BTreeMap<String, usize>>,
    per_adapter: Mutex<Vec<(String, u64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            step_faults: AtomicU64::new(0),
            engine_restarts: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            batch_size: AtomicU64::new(0),
            adapter_loads: AtomicU64::new(0),
            adapter_unloads: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            prefix_cache_tokens: AtomicU64::new(0),
            prefix_cache_kept_tokens: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY_BOUNDS),
            itl: Histogram::new(LATENCY_BOUNDS),
            adapter_load_secs: Histogram::new(LOAD_BOUNDS),
            running: AtomicU64::new(0),
            kv_reserved: AtomicU64::new(0),
            running_adapters: Mutex::new(Vec::new()),
            waiting_adapters: Mutex::new(BTreeMap::new()),
            per_adapter: Mutex::new(Vec::new()),
        }
    }
}

impl Metrics {
    /// A request for `adapter` (None: the base) starts waiting for the engine.
    pub fn waiting_add(&self, adapter: Option<&str>) {
        if let Some(a) = adapter {
            let mut w = self
                .waiting_adapters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *w.entry(a.to_string()).or_default() += 1;
        }
    }

    /// A request for `adapter` stops waiting (admitted, dropped or refused).
    pub fn waiting_remove(&self, adapter: Option<&str>) {
        if let Some(a) = adapter {
            let mut w = self
                .waiting_adapters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = w.get_mut(a) {
                *n -= 1;
                if *n == 0 {
                    w.remove(a);
                }
            }
        }
    }

    /// The engine's batch after admission: its size, reserved KV positions and adapters.
    pub fn set_running<'a>(
        &self,
        count: usize,
        kv_reserved: usize,
        adapters: impl Iterator<Item = &'a str>,
    ) {
        let mut names: Vec<String> = adapters.map(str::to_string).collect();
        names.sort_unstable();
        names.dedup();
        self.running.store(count as u64, Ordering::Relaxed);
        self.kv_reserved
            .store(kv_reserved as u64, Ordering::Relaxed);
        *self
            .running_adapters
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// Counts a request for `model` (the base or an adapter name).
    pub fn request_for(&self, model: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut per = self.per_adapter.lock().expect("metrics lock");
        let label = if per.iter().any(|(m, _)| m == model) || per.len() < MAX_ADAPTER_LABELS - 1 {
            model
        } else {
            "other"
        };
        match per.iter().position(|(m, _)| m == label) {
            Some(i) => per[i].1 += 1,
            None => per.push((label.to_string(), 1)),
        }
    }

    pub fn render(&self, adapters: &AdapterFigures) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "graft_requests_total",
            "Generation requests accepted.",
            self.requests.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "graft_requests_rejected_total",
            "Requests refused because the queue was full.",
            self.rejected.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "graft_requests_failed_total",
            "Requests ended by an engine fault (answered 500 with their request id).",
            self.failed.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "graft_engine_step_faults_total",
            "Batched engine steps that failed and were re-run one request at a time.",
            self.step_faults.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "graft_engine_restarts_total",
            "Times the engine loop failed outside a step and was restarted.",
            self.engine_restarts.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "graft_generated_tokens_total",
            "Tokens generated.",
            self.generated_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "graft_prompt_tokens_total",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "graft_prefix_cache_hits_total",
            "Requests that reused a kept prompt prefix.",
            self.prefix_cache_hits.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "graft_prefix_cache_hit_tokens_total",
            "Prompt tokens taken from the prefix cache instead of computed.",
            self.prefix_cache_tokens.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "graft_prefix_cache_kept_tokens",
            "Tokens of prompts the prefix cache keeps (at most --prefix-cache-tokens).",
            self.prefix_cache_kept_tokens.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "graft_requests_in_flight",
            "Requests running or waiting.",
            self.in_flight.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "graft_batch_size",
            "Sequences in the last forward pass.",
            self.batch_size.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "graft_adapters_known",
            "Adapters known by name: in memory, on disk (indexed or evicted) or broken.",
            adapters.known as u64,
        );
        gauge(
            &mut out,
            "graft_adapters_loaded",
            "Adapters in memory.",
            adapters.loaded as u64,
        );
        counter(
            &mut out,
            "graft_adapter_loads_total",
            "Adapter loads (including replacements).",
            self.adapter_loads.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "graft_adapter_unloads_total",
            "Adapter unloads.",
            self.adapter_unloads.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "graft_adapter_memory_bytes",
            "Bytes of adapters in memory.",
            adapters.bytes as u64,
        );
        gauge(
            &mut out,
            "graft_adapter_read_buffers_free_bytes",
            "Bytes of freed adapter buffers kept for the next reads (at most 256 MiB).",
            graft_core::recycle::READ_BUFFERS.free_bytes() as u64,
        );
        counter(
            &mut out,
            "graft_adapter_evictions_total",
            "Adapters evicted from memory by the budget.",
            adapters.evictions,
        );
        counter(
            &mut out,
            "graft_adapter_reloads_total",
            "Evicted adapters read again on demand.",
            adapters.reloads,
        );
        counter(
            &mut out,
            "graft_adapter_first_loads_total",
            "Indexed adapters read on their first request.",
            adapters.first_loads,
        );
        counter(
            &mut out,
            "graft_adapter_fetches_total",
            "Adapters downloaded from an adapter source, validated and served.",
            adapters.fetched,
        );
        counter(
            &mut out,
            "graft_adapter_fetch_missing_total",
            "Requested adapters that no adapter source has.",
            adapters.fetch_missing,
        );
        counter(
            &mut out,
            "graft_adapter_fetch_failures_total",
            "Adapter downloads that failed or gave an invalid adapter.",
            adapters.fetch_failed,
        );
        self.ttft.render(
            "graft_time_to_first_token_seconds",
            "Time from request to its first token.",
            &mut out,
        );
        self.itl.render(
            "graft_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            &mut out,
        );
        self.adapter_load_secs.render(
            "graft_adapter_load_seconds",
            "Time to read and validate an adapter.",
            &mut out,
        );
        let _ = writeln!(out, "# HELP graft_model_requests_total Requests per model or adapter.\n# TYPE graft_model_requests_total counter");
        for (m, n) in self.per_adapter.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "graft_model_requests_total{{model=\"{}\"}} {n}",
                m.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        out
    }
}
