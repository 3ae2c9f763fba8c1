//! The targets. Each takes arbitrary bytes; file-based readers get them through a file in a
//! per-process scratch directory (the readers under test open paths, as graft does).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use graft_core::device::Cpu;
use graft_core::formats::gguf::GgufFile;
use graft_core::formats::safetensors_read::Header;
use graft_core::load::{load_gguf, LoadOptions};
use graft_core::model::Model;
use graft_core::text::chat::ChatTemplate;
use graft_datasets::format::Format;
use graft_serve::registry::Registry;
use graft_serve::wire;

/// Every target, by the name `graft-fuzz`, the corpus directories and the script use.
pub const TARGETS: &[&str] = &[
    "gguf",
    "safetensors",
    "peft_adapter",
    "gguf_lora",
    "chat_template",
    "train_config",
    "serve_config",
    "dataset_jsonl",
    "dataset_csv",
    "dataset_parquet",
    "dataset_arrow",
    "dataset_feather",
    "http_body",
    "adapter_path",
];

/// Runs `target` on `data`.
///
/// # Panics
/// On an unknown target name (and wherever graft has a bug: that is the point).
pub fn run(target: &str, data: &[u8]) {
    match target {
        "gguf" => gguf(data),
        "safetensors" => safetensors(data),
        "peft_adapter" => peft_adapter(data),
        "gguf_lora" => gguf_lora(data),
        "chat_template" => chat_template(data),
        "train_config" => train_config(data),
        "serve_config" => serve_config(data),
        "dataset_jsonl" => dataset(data, "jsonl"),
        "dataset_csv" => dataset(data, "csv"),
        "dataset_parquet" => dataset(data, "parquet"),
        "dataset_arrow" => dataset(data, "arrow"),
        "dataset_feather" => dataset(data, "feather"),
        "http_body" => http_body(data),
        "adapter_path" => adapter_path(data),
        other => panic!("unknown fuzz target '{other}' (one of {TARGETS:?})"),
    }
}

/// This process's scratch directory.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a scratch directory"))
        .path()
}

/// Writes `data` to `name` in the scratch directory.
fn file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, data).expect("scratch write");
    path
}

/// The committed tiny Llama (2 layers, hidden 64) that adapters are checked against.
fn tiny_model() -> &'static Model<Cpu> {
    static MODEL: OnceLock<Model<Cpu>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../core/tests/fixtures/families/llama/model.gguf");
        load_gguf::<Cpu>(&path, LoadOptions::default(), &Default::default())
            .expect("the tiny llama fixture loads")
            .model
    })
}

/// The GGUF reader (header, metadata, tensor infos, sizes and offsets), every tensor's blocks
/// decoded, then the whole load: config, tokenizer from metadata (used on a text), chat
/// template from metadata (rendered), weights.
fn gguf(data: &[u8]) {
    let path = file("m.gguf", data);
    let Ok(f) = GgufFile::open(&path) else { return };
    for t in &f.tensors {
        let bytes = f.tensor_bytes(t);
        let mut out = vec![0f32; t.n_elements() as usize];
        t.ty.dequantize(bytes, &mut out);
    }
    let Ok(loaded) = load_gguf::<Cpu>(&path, LoadOptions::default(), &Default::default()) else {
        return;
    };
    if let Some(tok) = loaded.tokenizer {
        if let Ok(ids) = tok.encode("Hello, world! <|im_start|> ünïcode 123", true) {
            let _ = tok.decode(&ids, false);
        }
        if let Some(t) = tok.chat_template.as_deref() {
            render(t.as_bytes());
        }
    }
}

/// The safetensors reader: header checks, then the data read into typed tensors.
fn safetensors(data: &[u8]) {
    let path = file("t.safetensors", data);
    if let Ok(h) = Header::read(&path) {
        let _ = h.tensors().count();
        let _ = h.read_data();
    }
}

/// A PEFT adapter directory: `adapter_config.json`, a NUL byte, then `adapter_model.safetensors`
/// (JSON holds no raw NUL), loaded against the tiny Llama.
fn peft_adapter(data: &[u8]) {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let dir = scratch().join("peft");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    std::fs::write(dir.join("adapter_config.json"), &data[..split]).expect("scratch write");
    let weights = data.get(split + 1..).unwrap_or_default();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).expect("scratch write");
    let _ = graft_core::adapters::peft::load(&dir, tiny_model());
}

/// A GGUF-LoRA file loaded against the tiny Llama.
fn gguf_lora(data: &[u8]) {
    let path = file("lora.gguf", data);
    let _ = graft_core::adapters::gguf_lora::load(&path, tiny_model());
}

/// A chat template (untrusted: it comes inside model files) compiled and rendered over a
/// conversation with a tool call, a tool result and a tool list.
fn chat_template(data: &[u8]) {
    render(data);
}

fn render(source: &[u8]) {
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    let Ok(t) = ChatTemplate::new(source, Some("<s>"), Some("</s>")) else {
        return;
    };
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        {"role": "assistant", "content": "18 C."},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}
    ]);
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let _ = t.render_json(&messages, Some(&tools), true);
    let _ = t.render_json(&messages, None, false);
}

/// A training config: TOML, then every section checked and defaults resolved.
fn train_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = scratch().join("train.toml");
    let Ok((text, raws)) = graft_train::config::read_text(&path, text.to_string(), &[]) else {
        return;
    };
    for raw in raws {
        let _ = graft_train::config::TrainConfig::from_raw(&path, &text, raw);
    }
}

/// A server config file, as `--config` reads it.
fn serve_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = toml::from_str::<graft_serve::config::ServeArgs>(text);
}

/// A dataset file of one kind: rows read, each row's format detected and its example built.
fn dataset(data: &[u8], ext: &str) {
    let path = file(&format!("data.{ext}"), data);
    let Ok((rows, _bad)) = graft_datasets::source::read_file(&path) else {
        return;
    };
    for row in &rows {
        if let Ok(format) = Format::detect(row) {
            if format.is_preference() {
                let _ = format.preference(row);
            } else {
                let _ = format.example(row);
            }
        }
    }
}

/// The HTTP bodies: every request type the server parses, and a parsed chat request's
/// messages rendered through a real chat template.
fn http_body(data: &[u8]) {
    if let Ok(chat) = wire::ChatCompletionRequest::parse(data) {
        if let Ok(messages) = serde_json::to_value(&chat.fields.messages) {
            let template = graft_core::text::chat::named_template("chatml").unwrap_or_default();
            if let Ok(t) = ChatTemplate::new(template, None, None) {
                let tools = chat.fields.tools.as_ref().map(serde_json::to_value);
                let _ = t.render_json(&messages, tools.and_then(Result::ok).as_ref(), true);
            }
        }
    }
    let _ = wire::CompletionRequest::parse(data);
    let _ = wire::parse::<wire::LoadLoraAdapterRequest>(data);
    let _ = wire::parse::<wire::UnloadLoraAdapterRequest>(data);
    let _ = wire::parse::<wire::TokenizeRequest>(data);
    let _ = wire::parse::<wire::DetokenizeRequest>(data);
}

/// Runtime adapter loads confined to the adapters directory: the input is `name`, a NUL byte,
/// then a path (`..`, symlinks, absolute and unicode forms). Whatever loads must lie inside
/// the root; the root holds an adapter and a symlink to one outside it.
fn adapter_path(data: &[u8]) {
    struct Sandbox {
        root: PathBuf,
        registry: Registry<Cpu>,
    }
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    let sb = SANDBOX.get_or_init(|| {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../core/tests/fixtures/families/llama/peft_adapter");
        let base = scratch().join("paths");
        let (root, outside) = (base.join("adapters"), base.join("outside"));
        for dir in [root.join("good"), outside.join("secret")] {
            std::fs::create_dir_all(&dir).expect("sandbox");
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(fixture.join(f), dir.join(f)).expect("sandbox");
            }
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(outside.join("secret"), root.join("link")).expect("symlink");
        let root = root.canonicalize().expect("canonical root");
        let registry = Registry::new("base".into(), vec![root.clone()], None, Vec::new());
        Sandbox { root, registry }
    });
    let text = String::from_utf8_lossy(data);
    let (name, path) = text.split_once('\0').unwrap_or(("a", &text));
    // Relative paths are taken from the root's parent, so `adapters/../outside/…` and
    // `outside/…` are both tried.
    let path = sb.root.parent().expect("parent").join(path);
    if sb.registry.load(name, &path, tiny_model()).is_ok() {
        let real = path.canonicalize().expect("a loaded path exists");
        assert!(
            real.starts_with(&sb.root),
            "{} loaded from outside the adapters directory",
            path.display()
        );
        let _ = sb.registry.unload(name);
    }
}
