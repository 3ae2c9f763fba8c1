//! `graft-serve --model …`: load the base, register adapters, start the engine thread (and the
//! directory watcher), then serve HTTP; ready when `/health` answers. SIGTERM or SIGINT stops
//! accepting new connections and lets in-flight requests finish.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use graft_core::backend::GraftBackend;
use graft_core::device::{run_on, OnDevice};
use graft_core::generation::constraint::GrammarCompiler;
use graft_core::load::{load, LoadOptions, ModelSource};
use graft_core::text::chat::ChatTemplate;
use graft_core::text::tool_calls::ToolFormat;

use crate::config::ServeArgs;
use crate::engine::{EngineConfig, FaultHook};
use crate::http::{router, AppState};
use crate::metrics::Metrics;
use crate::registry::Registry;

/// A server ready to answer: its state (give it to [`router`]) and the engine thread, which
/// ends once every clone of the state is gone.
pub struct Started<B: GraftBackend> {
    pub state: Arc<AppState<B>>,
    pub engine: JoinHandle<()>,
}

/// Runs the server until SIGTERM or SIGINT, on the device `args` names.
///
/// # Errors
/// Anything that stops it from starting (model, adapters, address), with context.
pub fn run(args: ServeArgs) -> Result<()> {
    struct Serve(ServeArgs);
    impl OnDevice for Serve {
        type Output = Result<()>;
        fn run<B: GraftBackend>(self, device: B::Device) -> Result<()>
        where
            B::Device: Send + Sync,
        {
            serve::<B>(self.0, &device)
        }
    }
    run_on(args.device, Serve(args))?
}

/// Loads the model and the adapters named in `args` and starts the engine (and, with an
/// adapters directory, its watcher).
///
/// # Errors
/// No `--model`, a model or adapter that does not load, an unreadable adapters directory.
pub fn start<B: GraftBackend>(args: &ServeArgs, device: &B::Device) -> Result<Started<B>>
where
    B::Device: Send + Sync,
{
    start_with_faults(args, device, None)
}

/// [`start`], with a hook that makes chosen requests meet engine faults (tests of recovery).
///
/// # Errors
/// As [`start`].
#[doc(hidden)]
pub fn start_with_faults<B: GraftBackend>(
    args: &ServeArgs,
    device: &B::Device,
    faults: Option<FaultHook>,
) -> Result<Started<B>>
where
    B::Device: Send + Sync,
{
    let Some(model_arg) = args.model.clone() else {
        anyhow::bail!(
            "--model is required (a .gguf file, an HF model directory, ollama:NAME[:TAG] or a hub id)"
        );
    };
    let source = ModelSource::parse(&model_arg)?;
    let loaded = load::<B>(
        &source,
        LoadOptions {
            quantize: args.quantize,
            activations: args.activations,
            compute: args.compute_dtype,
        },
        device,
    )
    .with_context(|| format!("loading model '{model_arg}'"))?;
    let tokenizer = loaded
        .tokenizer
        .ok_or_else(|| anyhow!("model '{model_arg}' has no tokenizer"))?;
    let template_source = graft_core::text::chat::choose_template(
        args.chat_template.as_deref(),
        tokenizer.chat_template.as_deref(),
    )
    .map_err(|e| anyhow!("--chat-template: {e}"))?;
    let tool_format = ToolFormat::for_template(template_source.as_deref().unwrap_or_default());
    let template = template_source
        .map(|t| {
            ChatTemplate::new(
                &t,
                tokenizer.bos_token.as_deref(),
                tokenizer.eos_token.as_deref(),
            )
        })
        .transpose()?;
    let base_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_name(&model_arg));
    let grammars = GrammarCompiler::new(&tokenizer, loaded.model.config.vocab_size).map_err(|e| {
        tracing::warn!(event = "structured_outputs_unavailable", error = %e, "{e}");
        e.to_string()
    });
    let model = Arc::new(loaded.model);
    let registry = Arc::new(
        Registry::new(
            base_name.clone(),
            args.adapters_dir.iter().cloned().collect(),
            args.adapter_memory_mb
                .map(|mb| (mb * 1024.0 * 1024.0) as usize),
            args.pin.clone(),
        )
        .with_dtype(args.adapter_dtype),
    );
    let indexed = load_initial_adapters(args, &registry, &model)?;
    let gateway = crate::gateway::GatewayLabels {
        model_name: base_name.clone(),
        max_lora: args.max_batch.max(1),
        kv_capacity: args
            .kv_cache_tokens
            .unwrap_or(args.max_batch.max(1) * model.config.max_position_embeddings),
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(args.max_queue);
    let metrics = Arc::new(Metrics::default());
    let tokenizer = Arc::new(tokenizer);
    let engine = {
        let (model, tokenizer, metrics) = (model.clone(), tokenizer.clone(), metrics.clone());
        let config = EngineConfig {
            max_batch: args.max_batch,
            kv_tokens: args.kv_cache_tokens,
            prefix_cache_tokens: args.prefix_cache_tokens,
        };
        std::thread::Builder::new()
            .name("graft-engine".into())
            .spawn(move || crate::engine::run(model, tokenizer, rx, config, metrics, faults))?
    };
    let applied = indexed.map(|a| Arc::new(std::sync::Mutex::new(a)));
    let resolver = resolver(args, applied.as_ref())?;
    if let (Some(dir), Some(applied), true) = (
        args.adapters_dir.clone(),
        applied,
        args.watch_interval_ms > 0,
    ) {
        let served = crate::watch::Served {
            registry: Arc::downgrade(&registry),
            model: Arc::downgrade(&model),
        };
        let interval = Duration::from_millis(args.watch_interval_ms);
        let events = !args.watch_poll;
        std::thread::Builder::new()
            .name("graft-watch".into())
            .spawn(move || crate::watch::run(served, dir, interval, events, applied))?;
    }
    let state = Arc::new(AppState {
        model,
        tokenizer,
        template,
        grammars,
        tool_format,
        registry,
        engine: tx,
        base_name,
        api_key: args.api_key.clone(),
        admin_key: args.admin_key.clone(),
        max_tokens_limit: args.max_tokens_limit,
        max_queue: args.max_queue,
        kv_tokens: args.kv_cache_tokens,
        request_timeout: Duration::from_secs(args.request_timeout),
        metrics,
        started: crate::http::now_secs(),
        gateway,
        resolver,
    });
    Ok(Started { state, engine })
}

/// The resolver of `--adapter-source`s, which download into the adapters directory
/// (`applied`: what the watcher has applied there).
fn resolver(
    args: &ServeArgs,
    applied: Option<&Arc<std::sync::Mutex<crate::watch::Applied>>>,
) -> Result<Option<Arc<crate::source::resolver::Resolver>>> {
    if args.adapter_sources.is_empty() {
        return Ok(None);
    }
    let (Some(dir), Some(applied)) = (&args.adapters_dir, applied) else {
        bail!("--adapter-source needs --adapters-dir: adapters are downloaded into it");
    };
    let sources = args
        .adapter_sources
        .iter()
        .map(|spec| {
            crate::source::Source::new(spec, args.s3_endpoint.as_deref())
                .with_context(|| format!("--adapter-source {spec}"))
        })
        .collect::<Result<Vec<_>>>()?;
    tracing::info!(
        event = "adapter_sources",
        sources = %args.adapter_sources.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "adapters not in {} are looked for in {}",
        dir.display(),
        args.adapter_sources.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    );
    Ok(Some(Arc::new(crate::source::resolver::Resolver::new(
        sources,
        dir.clone(),
        applied.clone(),
    ))))
}

/// Adapters named with `--adapter` must load; those in the adapters directory are indexed,
/// not read (read on first use; pinned ones now), and skipped with a message when their name
/// or link is not acceptable. Returns what was indexed from the directory (the watcher's starting point).
fn load_initial_adapters<B: GraftBackend>(
    args: &ServeArgs,
    registry: &Registry<B>,
    model: &graft_core::model::Model<B>,
) -> Result<Option<crate::watch::Applied>> {
    for a in &args.adapters {
        let e = registry
            .load(&a.name, &a.path, model)
            .with_context(|| format!("adapter '{}' from {}", a.name, a.path.display()))?;
        tracing::info!(
            event = "adapter_loaded",
            adapter = %e.name,
            version = e.version,
            rank = e.info.rank,
            modules = e.info.modules,
            kib = e.info.bytes / 1024,
            path = %a.path.display(),
            "adapter {} v{}: r={} on {} modules ({} KiB) from {}",
            e.name,
            e.version,
            e.info.rank,
            e.info.modules,
            e.info.bytes / 1024,
            a.path.display()
        );
    }
    let Some(dir) = &args.adapters_dir else {
        return Ok(None);
    };
    std::fs::read_dir(dir).with_context(|| format!("reading --adapters-dir {}", dir.display()))?;
    let t0 = Instant::now();
    let found = crate::adapter_files::scan(dir);
    let mut indexed = 0;
    for (name, f) in &found {
        match registry.index(name, &f.path, f.symlink) {
            Ok(_) => indexed += 1,
            Err(e) => tracing::warn!(
                event = "adapter_index_failed",
                adapter = %name,
                error = %e,
                "skipping adapter {name} in {}: {e}",
                dir.display()
            ),
        }
    }
    // Pinned adapters are meant to be in memory: read them now.
    for name in found.keys().filter(|n| registry.is_pinned(n)) {
        if let Err(e) = registry.reload(name, model) {
            tracing::warn!(
                event = "adapter_load_failed",
                adapter = %name,
                error = %e,
                "pinned adapter {name} not loaded: {e}"
            );
        }
    }
    tracing::info!(
        event = "adapters_indexed",
        count = indexed,
        dir = %dir.display(),
        "{indexed} adapters indexed from {} in {:.0} ms (each read on first use)",
        dir.display(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(Some(
        found
            .into_iter()
            .map(|(name, f)| (name, f.signature))
            .collect(),
    ))
}

fn serve<B: GraftBackend>(args: ServeArgs, device: &B::Device) -> Result<()>
where
    B::Device: Send + Sync,
{
    let t0 = Instant::now();
    let Started { state, engine } = start::<B>(&args, device)?;
    let base_name = state.base_name.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let grace = Duration::from_secs(args.shutdown_timeout);
    let cut = rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(
            event = "ready",
            "graft-serve: {base_name} ready on http://{} in {:.2}s",
            listener.local_addr()?,
            t0.elapsed().as_secs_f64()
        );
        let (signalled, mut on_signal) = tokio::sync::watch::channel(false);
        let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
            shutdown_signal().await;
            let _ = signalled.send(true);
        });
        let deadline = async move {
            // Never fires unless the signal came (a closed channel waits forever).
            if on_signal.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = server => { served?; anyhow::Ok(false) }
            () = deadline => anyhow::Ok(true),
        }
    })?;
    if cut {
        tracing::warn!(
            event = "shutdown_timeout",
            "graft-serve: requests still running after --shutdown-timeout {}s were cut",
            grace.as_secs()
        );
        // Connection tasks are dropped; the engine thread ends with the process.
        rt.shutdown_timeout(Duration::from_secs(1));
        return Ok(());
    }
    // The router (and its engine sender) is gone: the engine drains and stops.
    let _ = engine.join();
    Ok(())
}

/// The base model's name in requests: the .gguf file stem or the directory / repo name.
fn default_name(model: &str) -> String {
    let p = PathBuf::from(model.split('@').next().unwrap_or(model));
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
    tracing::info!(
        event = "shutdown",
        "graft-serve: shutting down after in-flight requests"
    );
}
