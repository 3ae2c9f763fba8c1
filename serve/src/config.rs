//! The server's settings: one type read from the command line (clap) and from a `--config`
//! TOML file (serde), so a new setting is one field here. The file uses the flags' names
//! (`max_batch = 8`) with `adapters` as a `name = "path"` table; flags given on the command
//! line (or through their environment variables) win over the file, lists from both are
//! joined, and relative paths in the file are relative to the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, Context, Result};
use clap::{parser::ValueSource, ArgMatches, Args, FromArgMatches, Parser};
use graft_core::adapters::lora::AdapterDtype;
use graft_core::device::DeviceSpec;
use graft_core::model::ComputeDtype;
use graft_core::quant::{Activations, QuantKind};
use serde::{Deserialize, Serialize};

#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeArgs {
    /// Read settings from this TOML file (same names as the flags, with `adapters` as a
    /// `name = "path"` table); flags given on the command line win.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Base model: an HF directory, a .gguf file, ollama:NAME[:TAG] (a model Ollama pulled), or a
    /// hub id (owner/name[@revision]).
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
    #[serde(deserialize_with = "adapters_table_or_list")]
    pub adapters: Vec<AdapterSpec>,
    /// Serve every adapter in this directory (subdirectories with adapter_config.json and .gguf
    /// files, named after them): indexed at start, each read on its first request; runtime
    /// loads are restricted to it when given.
    #[arg(long)]
    pub adapters_dir: Option<PathBuf>,
    /// Where a requested adapter the server does not know is looked for, in order (repeatable):
    /// s3://bucket/prefix (adapter NAME at prefix/NAME/ or prefix/NAME.gguf; AWS's environment
    /// variables for credentials and region) or hf://owner (the hub repository owner/NAME).
    /// It is downloaded into the adapters directory (required), validated, then served.
    #[arg(long = "adapter-source", value_name = "URL")]
    pub adapter_sources: Vec<crate::source::SourceSpec>,
    /// An S3-compatible server for s3:// adapter sources (MinIO, Ceph, moto), addressed
    /// path-style; default: AWS's regional endpoint.
    #[arg(long, env = "AWS_ENDPOINT_URL_S3")]
    pub s3_endpoint: Option<String>,
    /// Apply new, changed and removed adapters in the adapters directory within this long
    /// (milliseconds; 0 disables watching).
    #[arg(long, default_value_t = 1000)]
    pub watch_interval_ms: u64,
    /// List the adapters directory every watch interval instead of relying on the OS's file
    /// events (for network filesystems, whose events do not report other machines' writes).
    #[arg(long)]
    pub watch_poll: bool,
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
    /// Tokens of recent prompts kept so that requests starting the same way (a shared system
    /// prompt) prefill only the rest; 0 disables prefix caching.
    #[arg(long, default_value_t = 4096)]
    pub prefix_cache_tokens: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// Seconds a request may run.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM or SIGINT (new connections are
    /// refused at once); the server then exits, cutting what is left.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Base weight storage: keep, nf4 or none.
    #[arg(long, default_value = "keep")]
    pub quantize: QuantKind,
    /// Products with packed weights: f32 keeps the reference numerics (transformers' within
    /// 2e-3); q8 rounds activations to 8 bits per block of 32 and uses integer dot products
    /// (llama.cpp's method and numerics; decode about 1.5-2× faster, logits up to ~2.5 off
    /// transformers' on SmolLM2, see the README).
    #[arg(long, default_value = "f32")]
    pub activations: Activations,
    /// How adapters' A and B are kept in memory: f32, or bf16 (half the memory, so twice the
    /// adapters in --adapter-memory-mb, and half the bytes each token reads; the term is still
    /// computed in f32, from the rounded values).
    #[arg(long, default_value = "f32")]
    pub adapter_dtype: AdapterDtype,
    /// The float type of the base projections' products: f32 (the reference numerics), or
    /// bf16/f16 for a GPU's half-precision GEMM (the packed base dequantized to it; adapter
    /// terms, norms, attention stay f32; on the CPU, rounding and no speed-up).
    #[arg(long, default_value = "f32")]
    pub compute_dtype: ComputeDtype,
    /// cpu, cuda, cuda:N, wgpu or wgpu:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

impl Default for ServeArgs {
    /// The flags' defaults (one source of truth for both the command line and the file).
    fn default() -> Self {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            args: ServeArgs,
        }
        Defaults::try_parse_from(["graft-serve"])
            .map(|d| d.args)
            .expect("every serve flag is optional or has a default")
    }
}

/// `--adapter name=path`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub name: String,
    pub path: PathBuf,
}

impl FromStr for AdapterSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(AdapterSpec {
                name: name.into(),
                path: path.into(),
            }),
            _ => Err(format!("'{s}' is not name=path")),
        }
    }
}

impl std::fmt::Display for AdapterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.name, self.path.display())
    }
}

graft_core::serde_as_str!(AdapterSpec);

/// `adapters = { name = "path" }` in a file, or a list of `name=path` strings.
fn adapters_table_or_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<AdapterSpec>, D::Error> {
    #[derive(Deserialize)]
    #[serde(
        untagged,
        expecting = "a table of name = \"path\" or a list of \"name=path\""
    )]
    enum Form {
        Table(BTreeMap<String, PathBuf>),
        List(Vec<AdapterSpec>),
    }
    Ok(match Form::deserialize(d)? {
        Form::Table(t) => t
            .into_iter()
            .map(|(name, path)| AdapterSpec { name, path })
            .collect(),
        Form::List(l) => l,
    })
}

impl ServeArgs {
    /// The settings from parsed flags and, when `--config` names one, its file.
    ///
    /// # Errors
    /// An unreadable file, TOML errors (with the file, line and column), unknown keys, bad
    /// values.
    pub fn from_matches(matches: &ArgMatches) -> Result<ServeArgs> {
        let cli = ServeArgs::from_arg_matches(matches)?;
        let Some(path) = cli.config.clone() else {
            return Ok(cli);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut file: ServeArgs = toml::from_str(&text)
            .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        file.resolve_paths(path.parent().unwrap_or(Path::new("")));
        let object = |a: &ServeArgs| match serde_json::to_value(a) {
            Ok(serde_json::Value::Object(o)) => Ok(o),
            // Paths that are not UTF-8 do not serialize.
            Ok(_) | Err(_) => Err(anyhow!("settings with paths that are not UTF-8")),
        };
        let (mut merged, given) = (object(&file)?, object(&cli)?);
        for (key, value) in given {
            let from_cli = matches!(
                matches.value_source(&key),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            match (merged.get_mut(&key), value) {
                // Lists join, the command line's first (so it is loaded first, as before).
                (Some(serde_json::Value::Array(a)), serde_json::Value::Array(mut b)) => {
                    b.append(a);
                    *a = b;
                }
                (_, value) if from_cli => {
                    merged.insert(key, value);
                }
                _ => {}
            }
        }
        let mut args: ServeArgs = serde_json::from_value(serde_json::Value::Object(merged))
            .context("merging the command line with the config file")?;
        args.config = Some(path);
        Ok(args)
    }

    /// Paths written in a file are relative to it; `~/` is the home directory. A model that is
    /// not a local path stays as written (a hub id).
    fn resolve_paths(&mut self, base: &Path) {
        let rel = |p: &Path| {
            if p.is_relative() {
                base.join(p)
            } else {
                p.to_path_buf()
            }
        };
        self.model = self
            .model
            .as_deref()
            .map(|m| graft_core::load::model_arg_in(base, m));
        self.adapters_dir = self.adapters_dir.as_deref().map(rel);
        for a in &mut self.adapters {
            a.path = rel(&a.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn settings(file: &str, argv: &[&str]) -> Result<ServeArgs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, file).expect("write");
        let mut all = vec!["graft-serve".to_string(), "--config".into()];
        all.push(path.display().to_string());
        all.extend(argv.iter().map(|s| s.to_string()));
        let matches = Cli::command().try_get_matches_from(all)?;
        ServeArgs::from_matches(&matches).map(|mut a| {
            a.config = None;
            a
        })
    }

    #[test]
    fn the_kubernetes_example_passes_flags_graft_serve_has() {
        let yaml = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/graft-serve.yaml"),
        )
        .expect("deploy/graft-serve.yaml");
        let args: Vec<&str> = yaml
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- --"))
            .collect();
        assert!(args.len() >= 5, "{args:?}");
        let mut argv = vec!["graft-serve".to_string()];
        argv.extend(args.iter().map(|a| format!("--{a}")));
        let matches = Cli::command()
            .try_get_matches_from(argv)
            .expect("the manifest's flags parse");
        let a = ServeArgs::from_matches(&matches).expect("settings");
        assert_eq!((a.host.as_str(), a.port), ("0.0.0.0", 8000));
        assert_eq!(a.adapter_sources[0].to_string(), "s3://my-adapters/prod");
        assert!(yaml.contains("kind: InferencePool") && yaml.contains("number: 8000"));
    }

    #[test]
    fn the_command_line_wins_over_the_file_and_lists_join() {
        let a = settings(
            "port = 9000\nmax_batch = 3\npin = [\"a\"]\nadapters = { a = \"ad/a\" }\nquantize = \"nf4\"\n",
            &["--port", "9100", "--pin", "b", "--adapter", "b=/x/b"],
        )
        .expect("settings");
        assert_eq!(a.port, 9100);
        assert_eq!(a.max_batch, 3);
        assert_eq!(a.pin, ["b", "a"]);
        assert_eq!(a.quantize, QuantKind::Nf4);
        assert_eq!(a.adapters.len(), 2);
        assert_eq!(a.adapters[0].path, PathBuf::from("/x/b"));
        assert!(a.adapters[1].path.ends_with("ad/a") && a.adapters[1].path.is_absolute());
        // Untouched settings keep the flags' defaults.
        assert_eq!(a.max_queue, ServeArgs::default().max_queue);
    }

    /// The merge asks clap where each serialized key came from: every key must be an argument
    /// id (clap panics on unknown ids in debug builds).
    #[test]
    fn every_file_key_is_a_flag() {
        let cmd = Cli::command();
        let ids: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
        let serde_json::Value::Object(keys) =
            serde_json::to_value(ServeArgs::default()).expect("serializes")
        else {
            panic!("settings serialize to an object");
        };
        for key in keys.keys() {
            assert!(
                ids.contains(&key.as_str()),
                "{key} is not a flag id: {ids:?}"
            );
        }
    }

    #[test]
    fn bad_values_name_the_key_and_line() {
        let e = settings("port = 9000\ndevice = \"tpu\"\n", &[]).expect_err("refused");
        let e = format!("{e:#}");
        assert!(
            e.contains("serve.toml") && e.contains("line 2") && e.contains("tpu"),
            "{e}"
        );
    }
}
