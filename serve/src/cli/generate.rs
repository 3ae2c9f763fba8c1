//! `graft-serve generate`: load a model, run one prompt, stream the answer.

use std::io::Write;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use graft_core::backend::GraftBackend;
use graft_core::device::{run_on, DeviceSpec, OnDevice};
use graft_core::generation::generate::generate;
use graft_core::generation::sampling::SamplingParams;
use graft_core::load::{load, LoadOptions, ModelSource};
use graft_core::quant::{Activations, QuantKind};
use graft_core::text::chat::{ChatTemplate, Message};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: an HF directory, a .gguf file, ollama:NAME[:TAG], or a hub id (owner/name[@revision]).
    #[arg(long)]
    model: String,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Chat template for --chat instead of the model's own: a name (chatml, alpaca) or a
    /// Jinja file. Needed for base models that ship none (e.g. Gemma 3 270M).
    #[arg(long)]
    chat_template: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// RNG seed (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past the model's end-of-sequence token (for timing decode).
    #[arg(long)]
    ignore_eos: bool,
    /// Base weight storage: keep (as shipped) or nf4 (quantize dense weights on load).
    #[arg(long, default_value = "keep")]
    quantize: QuantKind,
    /// Products with packed weights: f32 (the reference numerics) or q8 (8-bit activations,
    /// integer dot products: llama.cpp's method, faster, see the README).
    #[arg(long, default_value = "f32")]
    activations: Activations,
    /// A LoRA adapter to apply: a PEFT directory (adapter_config.json +
    /// adapter_model.safetensors), e.g. a graft-train run's `adapter/`.
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    /// How the adapter's A and B are kept in memory: f32 or bf16 (as on graft-serve).
    #[arg(long, default_value = "f32")]
    adapter_dtype: graft_core::adapters::lora::AdapterDtype,
    /// The base products' float type: f32, bf16 or f16 (as on graft-serve).
    #[arg(long, default_value = "f32")]
    compute_dtype: graft_core::model::ComputeDtype,
    /// cpu, cuda, cuda:N, wgpu or wgpu:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    run_on(args.device, args)?
}

impl OnDevice for GenerateArgs {
    type Output = Result<()>;
    fn run<B: GraftBackend>(self, device: B::Device) -> Result<()> {
        generate_on::<B>(&self, &device)
    }
}

fn generate_on<B: GraftBackend>(args: &GenerateArgs, device: &B::Device) -> Result<()> {
    let t0 = Instant::now();
    let source = ModelSource::parse(&args.model)?;
    let loaded = load::<B>(
        &source,
        LoadOptions {
            quantize: args.quantize,
            activations: args.activations,
            compute: args.compute_dtype,
        },
        device,
    )
    .with_context(|| format!("loading model '{}'", args.model))?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow!("model '{}' ships no tokenizer.json", args.model))?;
    tracing::info!(
        "loaded {} in {:.2}s: {} layers, base weights {:.1} MiB",
        loaded.name,
        t0.elapsed().as_secs_f64(),
        loaded.model.config.num_layers,
        loaded.model.base_bytes() as f64 / (1 << 20) as f64
    );
    let adapter = match &args.adapter {
        Some(dir) => {
            let (a, cfg) = graft_core::adapters::peft::load(dir, &loaded.model)?;
            tracing::info!(
                "adapter {}: r={} on {} modules",
                dir.display(),
                cfg.r,
                a.modules().count()
            );
            Some(a.stored_as(args.adapter_dtype))
        }
        None => None,
    };
    let prompt_text = if args.chat {
        let source = graft_core::text::chat::choose_template(
            args.chat_template.as_deref(),
            tok.chat_template.as_deref(),
        )
        .map_err(|e| anyhow!("--chat-template: {e}"))?
        .ok_or_else(|| {
            anyhow!(
                "model '{}' has no chat template (a base model?): run without --chat, or \
                 give one with --chat-template chatml|alpaca|FILE",
                args.model
            )
        })?;
        let template =
            ChatTemplate::new(&source, tok.bos_token.as_deref(), tok.eos_token.as_deref())?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s.clone()));
        }
        messages.push(Message::new("user", args.prompt.clone()));
        template.render(&messages, true)?
    } else {
        args.prompt.clone()
    };
    // A rendered chat template already carries its special tokens.
    let ids = tok
        .encode(&prompt_text, !args.chat)
        .map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        max_new_tokens: args.max_tokens,
        stop_token_ids: Vec::new(),
        stop_strings: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    };
    let mut stdout = std::io::stdout().lock();
    let out = generate(&loaded.model, tok, adapter.as_ref(), &ids, &params, |ev| {
        // A closed stdout (e.g. piped into `head`) ends the output, not the program.
        let _ = stdout
            .write_all(ev.text.as_bytes())
            .and_then(|_| stdout.flush());
    })?;
    let _ = writeln!(stdout);
    let decoded = out.tokens.len();
    let decode_rate = decoded.saturating_sub(1) as f64 / out.decode_secs.max(1e-9);
    tracing::info!(
        "prompt: {} tokens in {:.2}s ({:.1} tokens/s); decode: {} tokens in {:.2}s ({:.1} tokens/s, {:.1} GB/s of base weights); finish: {}; peak RSS {}",
        out.prompt_tokens,
        out.prefill_secs,
        out.prompt_tokens as f64 / out.prefill_secs.max(1e-9),
        decoded,
        out.decode_secs,
        decode_rate,
        // Every decode step reads every base weight once.
        decode_rate * loaded.model.base_bytes() as f64 / 1e9,
        out.finish_reason.as_str(),
        graft_core::process::peak_rss_bytes()
            .map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
    );
    Ok(())
}
