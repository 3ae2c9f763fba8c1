//! `graft-serve load`: a load and soak test of a running server over HTTP. Concurrent clients
//! send a mix of chat and completion requests, streamed and not, over several adapters; some
//! clients disconnect after the first chunk and some give up before the answer (a short
//! timeout). Meanwhile one thread replaces adapters with new versions and loads, uses and
//! unloads others. It prints the status counts, latency percentiles, the server's resident
//! memory over time (`--server-pid`) and the highest KV-cache usage `/metrics` reported, and
//! exits non-zero when a request failed: any status but 200 and 429, a 429 without
//! `Retry-After`, a transport error other than the client's own planned timeout, or a response
//! tagged with an adapter version the server never had.
//!
//! `--requests N` runs N requests; `--duration S` keeps going for S seconds (a soak).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::wire::{
    AdapterCard, ChatCompletionRequest, ChatFields, ChatMessage, CompletionFields,
    CompletionRequest, List, LoadLoraAdapterRequest, Prompt, Role, Sampling,
    UnloadLoraAdapterRequest,
};

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The server, e.g. http://127.0.0.1:8000.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Requests in all (ignored with `--duration`).
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Keep sending for this many seconds instead of a fixed count (a soak test).
    #[arg(long)]
    duration: Option<f64>,
    /// Models the requests spread over (adapter names, the base's name), chosen at random.
    #[arg(long, value_delimiter = ',', required = true)]
    models: Vec<String>,
    /// Tokens generated per request at most.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Adapter paths (as the server sees them) the replacements load under the names of
    /// `--models` and the load-use-unload cycles load under fresh names.
    #[arg(long, value_delimiter = ',')]
    replace_with: Vec<String>,
    /// Adapter operations during the run, spread evenly over it: replacements of a model in
    /// the mix by a new version, alternating with load → request → unload of a fresh name.
    #[arg(long, default_value_t = 100)]
    replacements: usize,
    /// Bearer key for inference requests.
    #[arg(long)]
    api_key: Option<String>,
    /// Bearer key for loads and unloads (default: `--api-key`).
    #[arg(long)]
    admin_key: Option<String>,
    /// The server's process id: its resident memory is sampled every `--sample-secs`.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 10.0)]
    sample_secs: f64,
    /// Seconds at the start whose memory samples the trend leaves out (default: the first
    /// tenth of the run). A soak's warm-up lasts until the bounded caches (the prefix cache,
    /// freed adapter buffers) have filled.
    #[arg(long)]
    warm_up: Option<f64>,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// What a client does with one request.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    ChatStream,
    Chat,
    Completion,
    CompletionStream,
    /// Streams, reads the first chunk, hangs up.
    Disconnect,
    /// Gives up after a few milliseconds, usually before the answer.
    Cancel,
}

impl Kind {
    /// The mix, in percent: 40 / 30 / 10 / 5 / 8 / 7.
    fn pick(r: u64) -> Kind {
        match r % 100 {
            0..40 => Kind::ChatStream,
            40..70 => Kind::Chat,
            70..80 => Kind::Completion,
            80..85 => Kind::CompletionStream,
            85..93 => Kind::Disconnect,
            _ => Kind::Cancel,
        }
    }

    fn streams(self) -> bool {
        matches!(
            self,
            Kind::ChatStream | Kind::CompletionStream | Kind::Disconnect
        )
    }
}

/// How one request ended.
enum Outcome {
    /// Answered in full: latency (s), and the adapter version it was served by.
    Answered(f64, Option<(String, u64)>),
    /// The client hung up as planned.
    HungUp,
    /// Still 429 after every retry: with or without `Retry-After`.
    Refused { retry_after: bool },
    /// Any other status, with the body's start.
    Status(u16, String),
    /// A transport error the client did not cause.
    Broken(String),
}

/// SplitMix64 of `x`: the request mix and timings from the seed and the request index.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn authed(req: ureq::Request, key: Option<&str>) -> ureq::Request {
    match key {
        Some(k) => req.set("Authorization", &format!("Bearer {k}")),
        None => req,
    }
}

/// `name@vN` of an `x-graft-adapter` header (the base's name has no `@v`).
fn version_tag(header: &str) -> Option<(String, u64)> {
    let (name, v) = header.rsplit_once("@v")?;
    Some((name.to_string(), v.parse().ok()?))
}

fn body(kind: Kind, model: &str, max_tokens: usize) -> (&'static str, String) {
    let sampling = Sampling {
        model: model.into(),
        max_tokens: Some(max_tokens),
        temperature: Some(0.7),
        stream: kind.streams(),
        ..Sampling::default()
    };
    let prompt = "Name three rivers of Europe.";
    match kind {
        Kind::Completion | Kind::CompletionStream => (
            "/v1/completions",
            serde_json::to_string(&CompletionRequest {
                sampling,
                fields: CompletionFields {
                    prompt: Prompt::One(prompt.into()),
                    logprobs: None,
                    echo: false,
                },
            })
            .unwrap_or_default(),
        ),
        _ => (
            "/v1/chat/completions",
            serde_json::to_string(&ChatCompletionRequest {
                sampling,
                fields: ChatFields {
                    messages: vec![ChatMessage::text(Role::User, prompt)],
                    logprobs: false,
                    top_logprobs: None,
                    tools: None,
                    tool_choice: None,
                },
            })
            .unwrap_or_default(),
        ),
    }
}

/// Tries a request refused with 429 again after its `Retry-After` (as a client should), up to
/// this many times.
const RETRIES: usize = 100;

/// Sends `body` to `path`, trying again after each 429 as its `Retry-After` says (the refusals
/// are counted in `refusals`: with and without the header); the last answer otherwise.
fn send(
    args: &LoadArgs,
    path: &str,
    body: &str,
    timeout: Duration,
    refusals: &mut Refusals,
) -> Result<ureq::Response, ureq::Error> {
    let mut tries = 0;
    loop {
        let req = authed(
            ureq::post(&format!("{}{path}", args.url)).timeout(timeout),
            args.api_key.as_deref(),
        );
        match req.send_string(body) {
            Err(ureq::Error::Status(429, resp)) if tries < RETRIES => {
                tries += 1;
                let header = resp.header("retry-after");
                match header {
                    Some(_) => refusals.with_retry_after += 1,
                    None => refusals.bare += 1,
                }
                // The advice in seconds (1 s for an HTTP date or none), capped at 10 s, with
                // jitter so that refused clients do not all return at once.
                let wait = header
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(1.0)
                    .min(10.0);
                let jitter = (mix(tries as u64 ^ t_nanos()) % 1000) as f64 / 1000.0;
                std::thread::sleep(Duration::from_secs_f64(wait * (0.5 + jitter)));
            }
            other => return other,
        }
    }
}

/// Nanoseconds of the clock, for jitter.
fn t_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()))
}

/// 429 answers a client got (and then tried again after).
#[derive(Default, Clone, Copy)]
struct Refusals {
    with_retry_after: usize,
    bare: usize,
}

fn one(args: &LoadArgs, i: u64, refusals: &mut Refusals) -> Outcome {
    let r = mix(args.seed ^ i.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let kind = Kind::pick(r);
    let model = &args.models[(r >> 8) as usize % args.models.len()];
    let (path, body) = body(kind, model, args.max_tokens);
    let timeout = if kind == Kind::Cancel {
        Duration::from_millis(2 + (r >> 20) % 40)
    } else {
        Duration::from_secs(600)
    };
    let t0 = Instant::now();
    let resp = match send(args, path, &body, timeout, refusals) {
        Ok(resp) => resp,
        Err(ureq::Error::Status(429, resp)) => {
            return Outcome::Refused {
                retry_after: resp.header("retry-after").is_some(),
            }
        }
        Err(ureq::Error::Status(code, resp)) => {
            let text = resp.into_string().unwrap_or_default();
            return Outcome::Status(code, text.chars().take(200).collect());
        }
        Err(e) if kind == Kind::Cancel && timed_out(&e) => return Outcome::HungUp,
        Err(e) => return Outcome::Broken(e.to_string()),
    };
    let tag = resp.header("x-graft-adapter").and_then(version_tag);
    let mut reader = BufReader::new(resp.into_reader());
    let read = if kind == Kind::Disconnect {
        // The first event, then hang up (the reader is dropped with the connection).
        let mut line = String::new();
        loop {
            match reader.read_line(&mut line) {
                Ok(0) => break Ok(()),
                Ok(_) if line.starts_with("data: ") => return Outcome::HungUp,
                Ok(_) => line.clear(),
                Err(e) => break Err(e),
            }
        }
    } else {
        let mut all = Vec::new();
        reader.read_to_end(&mut all).map(|_| ())
    };
    match read {
        Ok(()) => Outcome::Answered(t0.elapsed().as_secs_f64(), tag),
        Err(e) if kind == Kind::Cancel && io_timed_out(&e) => Outcome::HungUp,
        Err(e) => Outcome::Broken(format!("reading the answer: {e}")),
    }
}

/// Whether `e` is this client's own timeout (a planned cancellation), not a refused or broken
/// connection.
fn timed_out(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Transport(t) => std::error::Error::source(t)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(io_timed_out),
        ureq::Error::Status(..) => false,
    }
}

fn io_timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// The adapter versions the server reported having, per name.
type Versions = Arc<Mutex<BTreeMap<String, BTreeSet<u64>>>>;

fn record(versions: &Versions, card: &AdapterCard) {
    if let Ok(mut v) = versions.lock() {
        v.entry(card.name.clone()).or_default().insert(card.version);
    }
}

fn admin_post<T: serde::Serialize>(args: &LoadArgs, path: &str, body: &T) -> Result<String> {
    let key = args.admin_key.as_deref().or(args.api_key.as_deref());
    let req = authed(ureq::post(&format!("{}{path}", args.url)), key);
    Ok(req
        .send_string(&serde_json::to_string(body)?)
        .with_context(|| format!("POST {path}"))?
        .into_string()?)
}

/// One adapter operation: even `k` replaces a model of the mix with a new version, odd `k`
/// loads a fresh name, sends it one request, and unloads it.
fn operate(args: &LoadArgs, k: usize, versions: &Versions) -> Result<()> {
    let path = &args.replace_with[k % args.replace_with.len()];
    let adapters: Vec<&String> = args
        .models
        .iter()
        .filter(|m| versions.lock().is_ok_and(|v| v.contains_key(*m)))
        .collect();
    if k % 2 == 0 && !adapters.is_empty() {
        let name = adapters[k / 2 % adapters.len()].clone();
        let card: AdapterCard = serde_json::from_str(&admin_post(
            args,
            "/v1/load_lora_adapter",
            &LoadLoraAdapterRequest {
                lora_name: name,
                lora_path: path.clone(),
            },
        )?)?;
        record(versions, &card);
        return Ok(());
    }
    let name = format!("churn-{k}");
    let card: AdapterCard = serde_json::from_str(&admin_post(
        args,
        "/v1/load_lora_adapter",
        &LoadLoraAdapterRequest {
            lora_name: name.clone(),
            lora_path: path.clone(),
        },
    )?)?;
    record(versions, &card);
    let (route, body) = body(Kind::Chat, &name, 2);
    send(
        args,
        route,
        &body,
        Duration::from_secs(600),
        &mut Refusals::default(),
    )
    .with_context(|| format!("a request on the freshly loaded {name}"))?
    .into_string()?;
    admin_post(
        args,
        "/v1/unload_lora_adapter",
        &UnloadLoraAdapterRequest { lora_name: name },
    )?;
    Ok(())
}

/// Resident memory of `pid` in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The largest value of the series `name` in the server's `/metrics`.
fn metric(args: &LoadArgs, name: &str) -> Option<f64> {
    let text = ureq::get(&format!("{}/metrics", args.url))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Least-squares slope of `(t, y)`, per unit of `t`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mt, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, y)| (a + t / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (t, y)| {
        (a + (t - mt) * (y - my), b + (t - mt) * (t - mt))
    });
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

pub fn run(args: LoadArgs) -> Result<()> {
    if args.replacements > 0 && args.replace_with.is_empty() {
        bail!("--replacements needs --replace-with <adapter path,...>");
    }
    let args = Arc::new(args);
    let versions: Versions = Arc::default();
    // Warm up: one request per model reads every adapter, then their versions are noted.
    for m in &args.models {
        let (route, body) = body(Kind::Chat, m, 1);
        send(
            &args,
            route,
            &body,
            Duration::from_secs(600),
            &mut Refusals::default(),
        )
        .with_context(|| format!("warm-up request on {m}"))?;
    }
    let key = args.admin_key.as_deref().or(args.api_key.as_deref());
    let cards: List<AdapterCard> = serde_json::from_str(
        &authed(ureq::get(&format!("{}/v1/adapters", args.url)), key)
            .call()
            .context("GET /v1/adapters")?
            .into_string()?,
    )?;
    for c in &cards.data {
        record(&versions, c);
    }

    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let more = {
        let args = args.clone();
        move |i: usize| match args.duration {
            Some(d) => start.elapsed().as_secs_f64() < d,
            None => i < args.requests,
        }
    };
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..args.clients)
        .map(|_| {
            let (args, next, done, outcomes, more) = (
                args.clone(),
                next.clone(),
                done.clone(),
                outcomes.clone(),
                more.clone(),
            );
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if !more(i) {
                    break;
                }
                let mut refusals = Refusals::default();
                let o = one(&args, i as u64, &mut refusals);
                if let Ok(mut v) = outcomes.lock() {
                    v.push((o, refusals));
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    // Adapter operations spread over the run.
    let operator = {
        let (args, done, versions, finished) = (
            args.clone(),
            done.clone(),
            versions.clone(),
            finished.clone(),
        );
        std::thread::spawn(move || -> Vec<String> {
            let mut errors = Vec::new();
            for k in 0..args.replacements {
                // The k-th operation once k/n of the run has passed.
                let due = (k as f64 + 0.5) / args.replacements as f64;
                loop {
                    let progress = match args.duration {
                        Some(d) => start.elapsed().as_secs_f64() / d,
                        None => done.load(Ordering::Relaxed) as f64 / args.requests as f64,
                    };
                    if progress >= due || finished.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Err(e) = operate(&args, k, &versions) {
                    errors.push(format!("operation {k}: {e:#}"));
                }
            }
            errors
        })
    };
    // Memory and KV usage samples while the clients run.
    let mut rss = Vec::new();
    let mut kv_max: f64 = 0.0;
    let mut last_print = Instant::now();
    while clients.iter().any(|c| !c.is_finished()) {
        let t = start.elapsed().as_secs_f64();
        if let Some(m) = args.server_pid.and_then(rss_mib) {
            rss.push((t, m));
        }
        if let Some(u) = metric(&args, "vllm:kv_cache_usage_perc") {
            kv_max = kv_max.max(u);
        }
        if last_print.elapsed().as_secs_f64() >= 60.0 {
            last_print = Instant::now();
            eprintln!(
                "{:>6.0} s: {} requests done{}, prefix cache {:.0} tokens, freed adapter \
                 buffers {:.0} MiB",
                t,
                done.load(Ordering::Relaxed),
                rss.last()
                    .map_or(String::new(), |(_, m)| format!(", server RSS {m:.0} MiB")),
                metric(&args, "graft_prefix_cache_kept_tokens").unwrap_or(f64::NAN),
                metric(&args, "graft_adapter_read_buffers_free_bytes")
                    .map_or(f64::NAN, |b| b / 1048576.0),
            );
        }
        let until = Instant::now() + Duration::from_secs_f64(args.sample_secs);
        while Instant::now() < until && clients.iter().any(|c| !c.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for c in clients {
        let _ = c.join();
    }
    finished.store(true, Ordering::Relaxed);
    let op_errors = operator.join().unwrap_or_else(|_| vec!["panicked".into()]);
    let wall = start.elapsed().as_secs_f64();
    let outcomes = std::mem::take(&mut *outcomes.lock().map_err(|_| anyhow::anyhow!("lock"))?);
    report(&args, &outcomes, &versions, &rss, kv_max, wall, &op_errors)
}

fn report(
    args: &LoadArgs,
    outcomes: &[(Outcome, Refusals)],
    versions: &Versions,
    rss: &[(f64, f64)],
    kv_max: f64,
    wall: f64,
    op_errors: &[String],
) -> Result<()> {
    let known = versions
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .clone();
    let (mut answered, mut hung_up, mut refused, mut refused_bare) = (0, 0, 0, 0);
    let mut latencies = Vec::new();
    let mut statuses: BTreeMap<u16, (usize, String)> = BTreeMap::new();
    let mut broken: Vec<&str> = Vec::new();
    let mut unknown_versions = Vec::new();
    let (mut retried, mut retried_bare) = (0, 0);
    for (o, r) in outcomes {
        retried += r.with_retry_after;
        retried_bare += r.bare;
        match o {
            Outcome::Answered(t, tag) => {
                answered += 1;
                latencies.push(*t);
                if let Some((name, v)) = tag {
                    if !known.get(name).is_some_and(|s| s.contains(v)) {
                        unknown_versions.push(format!("{name}@v{v}"));
                    }
                }
            }
            Outcome::HungUp => hung_up += 1,
            Outcome::Refused { retry_after } => {
                refused += 1;
                if !retry_after {
                    refused_bare += 1;
                }
            }
            Outcome::Status(code, body) => {
                let e = statuses.entry(*code).or_insert((0, body.clone()));
                e.0 += 1;
            }
            Outcome::Broken(e) => broken.push(e),
        }
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "load: {} requests in {wall:.0} s by {} clients over {} models ({} tokens each at most); \
         {} adapter operations",
        outcomes.len(),
        args.clients,
        args.models.len(),
        args.max_tokens,
        args.replacements
    );
    println!(
        "429 answers {} ({} without Retry-After), each tried again after its Retry-After",
        retried + refused,
        retried_bare + refused_bare
    );
    println!(
        "answered {answered}, client hung up {hung_up} (disconnects and cancellations), \
         refused after {RETRIES} tries {refused}, other statuses {:?}, transport errors {}",
        statuses
            .iter()
            .map(|(c, (n, _))| format!("{c}: {n}"))
            .collect::<Vec<_>>(),
        broken.len()
    );
    println!(
        "latency of answered requests: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(&latencies, 0.5) * 1e3,
        pct(&latencies, 0.9) * 1e3,
        pct(&latencies, 0.99) * 1e3,
        latencies.last().copied().unwrap_or(f64::NAN) * 1e3
    );
    println!("highest KV-cache usage reported: {:.1}%", kv_max * 100.0);
    let mib = |name| metric(args, name).map_or(f64::NAN, |b| b / 1048576.0);
    println!(
        "at the end: adapters in memory {:.0} MiB, freed adapter buffers kept for reuse {:.0} MiB, \
         prompt tokens in the prefix cache {:.0}",
        mib("graft_adapter_memory_bytes"),
        mib("graft_adapter_read_buffers_free_bytes"),
        metric(args, "graft_prefix_cache_kept_tokens").unwrap_or(f64::NAN)
    );
    if rss.len() >= 2 {
        // After warm-up: by default the first tenth of the run is excluded.
        let warm_up = args.warm_up.unwrap_or(wall / 10.0);
        let warm: Vec<(f64, f64)> = rss.iter().copied().filter(|(t, _)| *t >= warm_up).collect();
        let warm = if warm.len() >= 2 { warm } else { rss.to_vec() };
        let ys = warm.iter().map(|p| p.1);
        let (lo, hi) = ys
            .clone()
            .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
        println!(
            "server RSS after {warm_up:.0} s of warm-up: {:.0} → {:.0} MiB (min {lo:.0}, max {hi:.0}, {} samples), \
             trend {:+.2} MiB/min",
            warm.first().map_or(f64::NAN, |p| p.1),
            warm.last().map_or(f64::NAN, |p| p.1),
            warm.len(),
            slope(&warm) * 60.0
        );
    }
    let mut failures = Vec::new();
    // Every model of the mix exists and every request is valid: any status but 200 and 429
    // (4xx included, e.g. a 404 from a replacement race) is a failure.
    for (code, (n, body)) in &statuses {
        failures.push(format!("{n} × {code}: {body}"));
    }
    if refused_bare + retried_bare > 0 {
        failures.push(format!(
            "{} 429 answers without Retry-After",
            refused_bare + retried_bare
        ));
    }
    if let Some(e) = broken.first() {
        failures.push(format!("{} transport errors, e.g. {e}", broken.len()));
    }
    if !unknown_versions.is_empty() {
        failures.push(format!(
            "{} answers tagged with versions the server never reported, e.g. {}",
            unknown_versions.len(),
            unknown_versions[0]
        ));
    }
    failures.extend(op_errors.iter().cloned());
    if kv_max > 1.0 {
        failures.push(format!("KV usage {kv_max} over the budget"));
    }
    if failures.is_empty() {
        println!("PASS: 0 failed requests, 0 failed adapter operations");
        Ok(())
    } else {
        bail!("FAIL:\n  {}", failures.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_tags_and_the_mix() {
        assert_eq!(version_tag("a0@v12"), Some(("a0".into(), 12)));
        assert_eq!(version_tag("my@vfoo@v3"), Some(("my@vfoo".into(), 3)));
        assert_eq!(version_tag("SmolLM2"), None);
        let kinds: BTreeSet<Kind> = (0..1000).map(|i| Kind::pick(mix(i))).collect();
        assert_eq!(kinds.len(), 6, "every kind of request is drawn");
        assert!((slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) - 2.0).abs() < 1e-12);
    }
}
