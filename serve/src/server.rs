//! `graft-serve --model …`: load the base, register adapters, start the engine thread and
//! the HTTP server; ready when `/health` answers. SIGTERM or SIGINT stops accepting new
//! connections and lets in-flight requests finish.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use graft_core::backend::GraftBackend;
use graft_core::device::DeviceSpec;
use graft_core::load::{load, LoadOptions, ModelSource};
use graft_core::quant::QuantKind;
use graft_core::text::chat::ChatTemplate;

use crate::api::{router, AppState};
use crate::registry::Registry;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Read settings from this TOML file (same names as the flags, with `adapters` as a
    /// `name = "path"` table); flags given on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Base model: an HF directory, a .gguf file, or a hub id (owner/name[@revision]).
    #[arg(long)]
    pub model: Option<String>,
    /// Name the base model answers to in requests (default: the model's file or repo name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Chat template for chat completions instead of the model's own: a name (chatml, alpaca)
    /// or a Jinja file. Base models that ship none answer chat requests with 400 without it.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// An adapter to load at start: name=path (PEFT directory or GGUF-LoRA file); repeatable.
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    pub adapters: Vec<String>,
    /// Load every adapter in this directory at start (subdirectories with adapter_config.json
    /// and .gguf files, named after them); runtime loads are restricted to it when given.
    #[arg(long)]
    pub adapters_dir: Option<PathBuf>,
    /// Poll the adapters directory this often for new, changed and removed adapters
    /// (milliseconds; 0 disables watching).
    #[arg(long, default_value_t = 1000)]
    pub watch_interval_ms: u64,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on inference endpoints.
    #[arg(long, env = "GRAFT_API_KEY")]
    pub api_key: Option<String>,
    /// Require `Authorization: Bearer <key>` on adapter management endpoints.
    #[arg(long, env = "GRAFT_ADMIN_KEY")]
    pub admin_key: Option<String>,
    /// Memory for adapters in MiB; beyond it the least recently used unpinned adapters are
    /// evicted (and read again from disk when requested). Default: unlimited.
    #[arg(long)]
    pub adapter_memory_mb: Option<f64>,
    /// An adapter never evicted (repeatable).
    #[arg(long)]
    pub pin: Vec<String>,
    /// Requests decoded together.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests waiting beyond the running batch before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// KV cache budget in tokens over all running requests (each reserves its prompt plus
    /// max_tokens); requests that do not fit wait. Default: unlimited.
    #[arg(long)]
    pub kv_cache_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// Seconds a request may run.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Base weight storage: keep, nf4 or none.
    #[arg(long, default_value = "keep")]
    pub quantize: QuantKind,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

/// `--config` file contents: every field optional, unknown keys refused.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    model: Option<String>,
    served_model_name: Option<String>,
    chat_template: Option<String>,
    adapters: Option<std::collections::BTreeMap<String, String>>,
    adapters_dir: Option<PathBuf>,
    watch_interval_ms: Option<u64>,
    host: Option<String>,
    port: Option<u16>,
    api_key: Option<String>,
    admin_key: Option<String>,
    adapter_memory_mb: Option<f64>,
    pin: Option<Vec<String>>,
    max_batch: Option<usize>,
    max_queue: Option<usize>,
    kv_cache_tokens: Option<usize>,
    max_tokens_limit: Option<usize>,
    request_timeout: Option<u64>,
    quantize: Option<String>,
    device: Option<String>,
}

/// Fills `args` from its `--config` file where the command line did not set a value.
///
/// # Errors
/// An unreadable file, TOML errors (with line and column), unknown keys, bad values.
pub fn apply_config(args: &mut ServeArgs, matches: &clap::ArgMatches) -> Result<()> {
    let Some(path) = args.config.clone() else {
        return Ok(());
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let f: ServeFile = toml::from_str(&text)
        .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let cli = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        )
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    macro_rules! take {
        ($field:ident) => {
            if !cli(stringify!($field)) {
                if let Some(v) = f.$field {
                    args.$field = v.into();
                }
            }
        };
    }
    take!(served_model_name);
    take!(chat_template);
    take!(host);
    take!(port);
    take!(api_key);
    take!(admin_key);
    take!(adapter_memory_mb);
    take!(max_batch);
    take!(max_queue);
    take!(kv_cache_tokens);
    take!(max_tokens_limit);
    take!(request_timeout);
    take!(watch_interval_ms);
    if !cli("model") {
        if let Some(m) = f.model {
            let m = match (m.strip_prefix("~/"), std::env::var_os("HOME")) {
                (Some(rest), Some(home)) => Path::new(&home).join(rest).display().to_string(),
                _ => m,
            };
            let local = rel(PathBuf::from(&m));
            args.model = Some(if local.exists() {
                local.display().to_string()
            } else {
                m
            });
        }
    }
    if !cli("adapters_dir") {
        if let Some(d) = f.adapters_dir {
            args.adapters_dir = Some(rel(d));
        }
    }
    if let Some(pins) = f.pin {
        args.pin.extend(pins);
    }
    if let Some(adapters) = f.adapters {
        args.adapters.extend(
            adapters
                .into_iter()
                .map(|(n, p)| format!("{n}={}", rel(PathBuf::from(p)).display())),
        );
    }
    if !cli("quantize") {
        if let Some(q) = f.quantize {
            args.quantize = q
                .parse()
                .map_err(|e: String| anyhow!("{}: quantize = {q:?}: {e}", path.display()))?;
        }
    }
    if !cli("device") {
        if let Some(d) = f.device {
            args.device = d
                .parse()
                .map_err(|e: String| anyhow!("{}: device = {d:?}: {e}", path.display()))?;
        }
    }
    Ok(())
}

pub fn run(args: ServeArgs) -> Result<()> {
    args.device.check_available().map_err(|e| anyhow!(e))?;
    match args.device {
        DeviceSpec::Cpu => serve::<graft_core::device::Cpu>(args, Default::default()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            serve::<graft_core::device::Cuda>(args, graft_core::device::cuda_device(i))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("check_available rejects cuda in builds without it"),
    }
}

fn serve<B: GraftBackend>(args: ServeArgs, device: B::Device) -> Result<()>
where
    B::Device: Send + Sync,
{
    let t0 = Instant::now();
    let Some(model_arg) = args.model.clone() else {
        bail!("--model is required (a .gguf file, an HF model directory or a hub id)");
    };
    let source = ModelSource::parse(&model_arg)?;
    let loaded = load::<B>(
        &source,
        LoadOptions {
            quantize: args.quantize,
        },
        &device,
    )
    .with_context(|| format!("loading model '{model_arg}'"))?;
    let tokenizer = loaded
        .tokenizer
        .ok_or_else(|| anyhow!("model '{model_arg}' has no tokenizer"))?;
    let source = graft_core::text::chat::choose_template(
        args.chat_template.as_deref(),
        tokenizer.chat_template.as_deref(),
    )
    .map_err(|e| anyhow!("--chat-template: {e}"))?;
    let template = match source {
        Some(t) => Some(ChatTemplate::new(
            &t,
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        )?),
        None => None,
    };
    let base_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_name(&model_arg));
    let model = Arc::new(loaded.model);
    let roots: Vec<PathBuf> = args.adapters_dir.iter().cloned().collect();
    let budget = args
        .adapter_memory_mb
        .map(|mb| (mb * 1024.0 * 1024.0) as usize);
    let registry = Registry::new(base_name.clone(), roots, budget, args.pin.clone());
    let mut initial: Vec<(String, PathBuf)> = Vec::new();
    for spec in &args.adapters {
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--adapter '{spec}' is not name=path"))?;
        initial.push((name.to_string(), PathBuf::from(path)));
    }
    let show = |name: &str, e: &crate::registry::AdapterEntry<B>, path: &Path| {
        eprintln!(
            "adapter {name} v{}: r={} on {} modules ({} KiB) from {}",
            e.version,
            e.info.rank,
            e.info.modules,
            e.info.bytes / 1024,
            path.display()
        );
    };
    // Adapters named on the command line must load; those found in the directory are
    // skipped with a message when they cannot (as the watcher does later).
    for (name, path) in initial {
        let e = registry
            .load(&name, &path, &model)
            .with_context(|| format!("adapter '{name}' from {}", path.display()))?;
        show(&name, &e, &path);
    }
    if let Some(dir) = &args.adapters_dir {
        std::fs::read_dir(dir)
            .with_context(|| format!("reading --adapters-dir {}", dir.display()))?;
        for (name, path) in crate::watch::scan(dir) {
            match registry.load(&name, &path, &model) {
                Ok(e) => show(&name, &e, &path),
                Err(e) => eprintln!("skipping adapter {name} in {}: {e}", dir.display()),
            }
        }
    }

    let (tx, rx) = std::sync::mpsc::sync_channel(args.max_queue);
    let engine_model = model.clone();
    let engine_tok = Arc::new(tokenizer);
    let tok = engine_tok.clone();
    let max_batch = args.max_batch.max(1);
    let kv_tokens = args.kv_cache_tokens;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let engine_metrics = metrics.clone();
    let engine = std::thread::Builder::new()
        .name("graft-engine".into())
        .spawn(move || {
            crate::engine::run(
                engine_model,
                engine_tok,
                rx,
                max_batch,
                engine_metrics,
                kv_tokens,
            )
        })?;
    let state = Arc::new(AppState {
        model,
        tokenizer: tok,
        template,
        registry,
        engine: tx,
        base_name: base_name.clone(),
        api_key: args.api_key.clone(),
        admin_key: args.admin_key.clone(),
        max_tokens_limit: args.max_tokens_limit,
        kv_tokens: args.kv_cache_tokens,
        request_timeout: Duration::from_secs(args.request_timeout),
        metrics,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    if let (Some(dir), true) = (args.adapters_dir.clone(), args.watch_interval_ms > 0) {
        let (st, interval) = (state.clone(), Duration::from_millis(args.watch_interval_ms));
        std::thread::Builder::new()
            .name("graft-watch".into())
            .spawn(move || crate::watch::run(st, dir, interval))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!(
            "graft-serve: {base_name} ready on http://{} in {:.2}s",
            listener.local_addr()?,
            t0.elapsed().as_secs_f64()
        );
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        anyhow::Ok(())
    })?;
    // The router (and its engine sender) is gone: the engine drains and stops.
    let _ = engine.join();
    Ok(())
}

/// The base model's name in requests: the .gguf file stem or the directory / repo name.
fn default_name(model: &str) -> String {
    let p = std::path::Path::new(model.split('@').next().unwrap_or(model));
    p.file_stem()
        .or_else(|| p.file_name())
        .map_or_else(|| model.to_string(), |s| s.to_string_lossy().into_owned())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!("graft-serve: shutting down after in-flight requests");
}
