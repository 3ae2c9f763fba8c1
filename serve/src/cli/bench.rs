//! `graft-serve bench`: drives a running server over HTTP with concurrent streaming clients
//! spread over adapters, and prints throughput, time to first token and inter-token latency
//! percentiles, and adapter load latency, with the settings used. It measures; it never asserts.
//!
//! Workloads: round robin or Zipf-distributed popularity over the adapters named, or over every
//! adapter the server knows (`--all-adapters`); load-to-first-token of freshly loaded adapters
//! (`--cold`). The same client drives llama.cpp's `llama-server`: a model named `lora:K` sends
//! llama-server's per-request `"lora": [{"id": K, "scale": 1}]` instead of a model name, so that
//! comparisons (`scripts/bench/compare.py`) measure both servers with one client.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::wire::{
    AdapterCard, ChatCompletionChunk, ChatCompletionRequest, ChatFields, ChatMessage, List,
    LoadLoraAdapterRequest, ModelCard, Role, Sampling, UnloadLoraAdapterRequest,
};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The server, e.g. http://127.0.0.1:8000.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Models to spread requests over (adapter names or the base name), round robin.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Before the run, load this adapter `--load-count` times as bench-0, bench-1, … (timing
    /// each load) and spread requests over those names.
    #[arg(long)]
    load_adapter: Option<String>,
    #[arg(long, default_value_t = 0)]
    load_count: usize,
    /// Tokens generated per request (greedy).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    #[arg(long, default_value = "Write a short story about a lighthouse keeper.")]
    prompt: String,
    /// Bearer key for inference and management endpoints.
    #[arg(long)]
    api_key: Option<String>,
    /// Spread requests over every adapter the server knows (`GET /v1/adapters`), in memory
    /// or on disk.
    #[arg(long)]
    all_adapters: bool,
    /// Pick each request's model with Zipf popularity of this exponent (rank k is chosen with
    /// probability ∝ 1/k^s, in the order the models are listed) instead of round robin.
    #[arg(long)]
    zipf: Option<f64>,
    /// Seed for the Zipf draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generate `max_tokens` tokens even past end-of-sequence (vLLM's and llama-server's
    /// `ignore_eos`), so that every request decodes the same number of tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Before the run, load `--load-adapter` this many times under fresh names and time each
    /// load-to-first-token: the load request, then a one-token request on the new adapter.
    #[arg(long, default_value_t = 0)]
    cold: usize,
    /// Only measure this machine's memory read bandwidth (1 GiB read by every core) and exit:
    /// the ceiling that decode's weight traffic is compared with.
    #[arg(long)]
    bandwidth: bool,
}

/// GB/s of a parallel read of a 1 GiB buffer (best of 5), one thread per core.
pub fn read_bandwidth() -> (f64, usize) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        let total: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = buf
                .chunks(words.div_ceil(threads))
                .map(|part| {
                    sc.spawn(move || {
                        // Four independent sums so the loop vectorizes and is load-bound.
                        let mut acc = [0u64; 4];
                        for c in part.chunks_exact(4) {
                            for k in 0..4 {
                                acc[k] = acc[k].wrapping_add(c[k]);
                            }
                        }
                        acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    (best, threads)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{name}: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms (n = {})",
        pct(&v, 0.5) * 1e3,
        pct(&v, 0.9) * 1e3,
        pct(&v, 0.99) * 1e3,
        v.len()
    )
}

struct One {
    ttft: f64,
    gaps: Vec<f64>,
    tokens: usize,
    /// Seconds the server spent reading this request's adapter first (its `server-timing`).
    adapter_load: Option<f64>,
}

/// The `adapter-load` duration of a `server-timing` header, in seconds.
fn adapter_load(header: &str) -> Option<f64> {
    header.split(',').find_map(|metric| {
        let mut parts = metric.trim().split(';');
        (parts.next()? == "adapter-load").then_some(())?;
        parts
            .find_map(|p| p.trim().strip_prefix("dur="))
            .and_then(|d| d.parse::<f64>().ok())
            .map(|ms| ms / 1e3)
    })
}

/// A greedy streaming chat request for `model` (`lora:K` names llama-server's adapter K).
fn body(args: &BenchArgs, model: &str, max_tokens: usize) -> Value {
    let request = ChatCompletionRequest {
        sampling: Sampling {
            model: model.into(),
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            stream: true,
            ignore_eos: args.ignore_eos,
            ..Sampling::default()
        },
        fields: ChatFields {
            messages: vec![ChatMessage::text(Role::User, args.prompt.clone())],
            logprobs: false,
            top_logprobs: None,
            tools: None,
            tool_choice: None,
        },
    };
    let mut body = serde_json::to_value(&request).unwrap_or_default();
    if let Some(id) = model
        .strip_prefix("lora:")
        .and_then(|k| k.parse::<u64>().ok())
    {
        // llama-server's per-request adapter selection; it has no adapter names.
        if let Some(o) = body.as_object_mut() {
            o.remove("model");
        }
        body["lora"] = json!([{"id": id, "scale": 1.0}]);
    }
    body
}

/// `req` with the bench's bearer key, if any.
fn authed(args: &BenchArgs, req: ureq::Request) -> ureq::Request {
    match &args.api_key {
        Some(k) => req.set("Authorization", &format!("Bearer {k}")),
        None => req,
    }
}

fn post(args: &BenchArgs, path: &str) -> ureq::Request {
    authed(
        args,
        ureq::post(&format!("{}{path}", args.url)).timeout(Duration::from_secs(600)),
    )
}

fn request(args: &BenchArgs, model: &str) -> Result<One> {
    request_n(args, model, args.max_tokens, Instant::now())
}

/// Streams one request; times are measured from `t0`.
fn request_n(args: &BenchArgs, model: &str, max_tokens: usize, t0: Instant) -> Result<One> {
    let body = body(args, model, max_tokens);
    let req = post(args, "/v1/chat/completions");
    let resp = req
        .send_string(&body.to_string())
        .with_context(|| format!("request for {model}"))?;
    let load = resp.header("server-timing").and_then(adapter_load);
    let mut ttft = None;
    let mut last = t0;
    let mut gaps = Vec::new();
    let mut tokens = 0;
    // Content chunks, for servers that report no usage in streams.
    let mut counted = 0;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: ChatCompletionChunk =
            serde_json::from_str(data).with_context(|| format!("stream chunk {data}"))?;
        if let Some(u) = chunk.usage {
            tokens = u.completion_tokens;
        }
        let content = chunk
            .choices
            .first()
            .and_then(|c| c.delta.content.as_deref());
        if content.is_some_and(|c| !c.is_empty()) {
            counted += 1;
            let now = Instant::now();
            match ttft {
                None => ttft = Some(now.duration_since(t0).as_secs_f64()),
                Some(_) => gaps.push(now.duration_since(last).as_secs_f64()),
            }
            last = now;
        }
    }
    Ok(One {
        ttft: ttft.unwrap_or(f64::NAN),
        gaps,
        tokens: if tokens > 0 { tokens } else { counted },
        adapter_load: load,
    })
}

/// Zipf(s) draws over `n` ranks by inverse CDF, from a seeded SplitMix64 stream.
struct Zipf {
    cdf: Vec<f64>,
    state: u64,
}

impl Zipf {
    fn new(n: usize, s: f64, seed: u64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        cdf.iter_mut().for_each(|c| *c /= acc);
        Zipf { cdf, state: seed }
    }

    fn next(&mut self) -> usize {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let u = (z ^ (z >> 31)) as f64 / u64::MAX as f64;
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

fn get_json<T: DeserializeOwned>(args: &BenchArgs, path: &str) -> Result<T> {
    let req = authed(args, ureq::get(&format!("{}{path}", args.url)));
    Ok(serde_json::from_str(&req.call()?.into_string()?)?)
}

/// Load-to-first-token of `n` fresh adapters: (load seconds, load start → first token,
/// first token of the same request once the adapter is in memory).
fn cold_starts(args: &BenchArgs, path: &str, n: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let (mut loads, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("cold-{}-{i}", std::process::id());
        let t0 = Instant::now();
        post(args, "/v1/load_lora_adapter")
            .send_string(&serde_json::to_string(&LoadLoraAdapterRequest {
                lora_name: name.clone(),
                lora_path: path.into(),
            })?)
            .with_context(|| format!("loading {name}"))?;
        loads.push(t0.elapsed().as_secs_f64());
        cold.push(request_n(args, &name, 1, t0)?.ttft);
        warm.push(request_n(args, &name, 1, Instant::now())?.ttft);
        let _ = post(args, "/v1/unload_lora_adapter").send_string(&serde_json::to_string(
            &UnloadLoraAdapterRequest { lora_name: name },
        )?);
    }
    Ok((loads, cold, warm))
}

pub fn run(mut args: BenchArgs) -> Result<()> {
    if args.bandwidth {
        let (gbs, threads) = read_bandwidth();
        println!("memory read bandwidth: {gbs:.1} GB/s ({threads} threads, 1 GiB, best of 5)");
        return Ok(());
    }
    if (args.cold > 0 || args.load_count > 0) && args.load_adapter.is_none() {
        bail!("--cold and --load-count need --load-adapter <adapter path>");
    }
    let mut load_times = Vec::new();
    let mut cold = None;
    if let Some(path) = args.load_adapter.clone() {
        let path = std::path::absolute(&path)?.display().to_string();
        if args.cold > 0 {
            cold = Some(cold_starts(&args, &path, args.cold)?);
        }
        for i in 0..args.load_count {
            let name = format!("bench-{i}");
            let t0 = Instant::now();
            post(&args, "/v1/load_lora_adapter")
                .send_string(&serde_json::to_string(&LoadLoraAdapterRequest {
                    lora_name: name.clone(),
                    lora_path: path.clone(),
                })?)
                .with_context(|| format!("loading {name}"))?;
            load_times.push(t0.elapsed().as_secs_f64());
            args.models.push(name);
        }
    }
    if args.all_adapters {
        let list: List<AdapterCard> = get_json(&args, "/v1/adapters")?;
        args.models.extend(list.data.into_iter().map(|a| a.name));
    }
    if args.models.is_empty() {
        let models: List<ModelCard> = get_json(&args, "/v1/models")?;
        args.models.push(
            models
                .data
                .into_iter()
                .next()
                .context("no model listed")?
                .id,
        );
    }
    if args.clients == 0 || args.requests == 0 {
        bail!("--clients and --requests must be at least 1");
    }
    // The model of every request, fixed before the clock starts.
    let picks: Vec<usize> = match args.zipf {
        Some(s) => {
            let mut z = Zipf::new(args.models.len(), s, args.seed);
            (0..args.requests).map(|_| z.next()).collect()
        }
        None => (0..args.requests).map(|i| i % args.models.len()).collect(),
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t0 = Instant::now();
    let results: Vec<Result<One>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..args.clients)
            .map(|_| {
                sc.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= args.requests {
                            break out;
                        }
                        out.push(request(&args, &args.models[picks[i]]));
                    }
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let (ok, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let ok: Vec<One> = ok.into_iter().map(|r| r.expect("partitioned ok")).collect();
    let tokens: usize = ok.iter().map(|o| o.tokens).sum();
    let distinct = {
        let mut p = picks.clone();
        p.sort_unstable();
        p.dedup();
        p.len()
    };
    println!(
        "settings: {} clients, {} requests over {} model(s) ({}; {distinct} distinct used), max_tokens {}{}, greedy, prompt {:?}",
        args.clients,
        args.requests,
        args.models.len(),
        args.zipf.map_or("round robin".into(), |s| format!("Zipf s={s}")),
        args.max_tokens,
        if args.ignore_eos { " (ignore_eos)" } else { "" },
        args.prompt
    );
    println!(
        "requests: {} ok, {} failed; wall {wall:.2} s",
        ok.len(),
        failed.len()
    );
    println!(
        "throughput: {:.1} generated tokens/s ({tokens} tokens)",
        tokens as f64 / wall
    );
    println!(
        "{}",
        summary("time to first token", ok.iter().map(|o| o.ttft).collect())
    );
    println!(
        "{}",
        summary(
            "inter-token latency",
            ok.iter().flat_map(|o| o.gaps.iter().copied()).collect()
        )
    );
    let reads: Vec<f64> = ok.iter().filter_map(|o| o.adapter_load).collect();
    if !reads.is_empty() {
        println!(
            "{}",
            summary(
                "adapter read before the first token (server-timing, requests that needed one)",
                reads
            )
        );
    }
    if !load_times.is_empty() {
        println!(
            "{}",
            summary("adapter load (POST /v1/load_lora_adapter)", load_times)
        );
    }
    if let Some((loads, cold, warm)) = cold {
        println!("{}", summary("cold adapter: load request", loads));
        println!(
            "{}",
            summary("cold adapter: load start → first token", cold)
        );
        println!("{}", summary("same adapter in memory: first token", warm));
    }
    if let Ok(m) = ureq::get(&format!("{}/metrics", args.url))
        .call()
        .and_then(|r| Ok(r.into_string()?))
    {
        for line in m.lines().filter(|l| {
            [
                "graft_adapter_reloads_total",
                "graft_adapter_first_loads_total",
                "graft_adapter_evictions_total",
                "graft_adapters_loaded",
                "graft_adapters_known",
            ]
            .iter()
            .any(|m| l.starts_with(m))
        }) {
            println!("server: {line}");
        }
    }
    if let Some(Err(e)) = failed.into_iter().next() {
        tracing::warn!("first failure: {e:#}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn zipf_draws_follow_rank_popularity() {
        let mut z = Zipf::new(100, 1.0, 7);
        let mut counts = [0usize; 100];
        for _ in 0..100_000 {
            counts[z.next()] += 1;
        }
        // P(rank 1) / P(rank 2) = 2 and P(rank 1) = 1 / H(100) ≈ 0.193 for s = 1.
        let (c0, c1) = (counts[0] as f64, counts[1] as f64);
        assert!((c0 / c1 - 2.0).abs() < 0.1, "{c0} / {c1}");
        assert!((c0 / 100_000.0 - 0.193).abs() < 0.01, "{c0}");
        assert!(counts[99] > 0 && counts[99] < counts[9]);
        // Same seed, same sequence.
        let (mut a, mut b) = (Zipf::new(10, 1.2, 3), Zipf::new(10, 1.2, 3));
        assert!((0..50).all(|_| a.next() == b.next()));
    }

    #[test]
    fn server_timing_gives_the_adapter_read() {
        assert_eq!(adapter_load("adapter-load;dur=3.5"), Some(0.0035));
        assert_eq!(
            adapter_load("db;dur=1, adapter-load;desc=\"x\";dur=12"),
            Some(0.012)
        );
        assert_eq!(adapter_load("db;dur=1"), None);
        assert_eq!(adapter_load("adapter-load"), None);
    }

    #[test]
    fn llama_server_adapters_are_named_by_id() {
        let args = Cli::parse_from(["bench", "--ignore-eos"]).bench;
        let b = body(&args, "lora:3", 5);
        assert_eq!(b["lora"], json!([{"id": 3, "scale": 1.0}]));
        assert!(b.get("model").is_none());
        assert_eq!(b["ignore_eos"], json!(true));
        let b = body(&args, "support-bot", 5);
        assert_eq!(b["model"], json!("support-bot"));
        assert!(b.get("lora").is_none());
    }
}
