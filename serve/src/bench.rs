//! `graft-serve bench`: drives a running server over HTTP with concurrent streaming clients
//! spread over adapters, and prints throughput, time to first token and inter-token latency
//! percentiles, and adapter load latency, with the settings used. It measures; it never asserts.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

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
}

fn request(args: &BenchArgs, model: &str) -> Result<One> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.max_tokens,
                      "temperature": 0, "stream": true});
    let mut req =
        ureq::post(&format!("{}/v1/chat/completions", args.url)).timeout(Duration::from_secs(600));
    if let Some(k) = &args.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let t0 = Instant::now();
    let resp = req
        .send_string(&body.to_string())
        .with_context(|| format!("request for {model}"))?;
    let mut ttft = None;
    let mut last = t0;
    let mut gaps = Vec::new();
    let mut tokens = 0;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
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
        tokens,
    })
}

pub fn run(mut args: BenchArgs) -> Result<()> {
    let mut load_times = Vec::new();
    if let Some(path) = args.load_adapter.clone() {
        let path = std::path::absolute(&path)?.display().to_string();
        for i in 0..args.load_count {
            let name = format!("bench-{i}");
            let mut req = ureq::post(&format!("{}/v1/load_lora_adapter", args.url));
            if let Some(k) = &args.api_key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let t0 = Instant::now();
            req.send_string(&json!({"lora_name": name, "lora_path": path}).to_string())
                .with_context(|| format!("loading {name}"))?;
            load_times.push(t0.elapsed().as_secs_f64());
            args.models.push(name);
        }
    }
    if args.models.is_empty() {
        let models: Value = serde_json::from_str(
            &ureq::get(&format!("{}/v1/models", args.url))
                .call()?
                .into_string()?,
        )?;
        args.models.push(
            models["data"][0]["id"]
                .as_str()
                .context("no model listed")?
                .to_string(),
        );
    }
    if args.clients == 0 || args.requests == 0 {
        bail!("--clients and --requests must be at least 1");
    }
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
                        out.push(request(&args, &args.models[i % args.models.len()]));
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
    println!(
        "settings: {} clients, {} requests over {} model(s), max_tokens {}, greedy, prompt {:?}",
        args.clients,
        args.requests,
        args.models.len(),
        args.max_tokens,
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
    if !load_times.is_empty() {
        println!(
            "{}",
            summary("adapter load (POST /v1/load_lora_adapter)", load_times)
        );
    }
    if let Some(Err(e)) = failed.into_iter().next() {
        eprintln!("first failure: {e:#}");
    }
    Ok(())
}
