//! Seed corpora, made from the project's real files: the tiny family models' metadata (their
//! tokenizers and chat templates) with a few small tensors of each block type, the PEFT
//! fixtures, a GGUF-LoRA written by graft, the example configs and datasets, request bodies.
//! `graft-fuzz seeds fuzz/corpus` writes them; they are committed.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use graft_core::device::Cpu;
use graft_core::formats::gguf::GgufFile;
use graft_core::formats::gguf_write::{write_with, TensorSpec};
use graft_core::load::{load_gguf, LoadOptions};
use graft_core::quant::GgmlType;

type Error = Box<dyn std::error::Error>;

/// Writes every target's seeds under `out/<target>/`.
///
/// # Errors
/// A fixture that cannot be read, an output that cannot be written.
pub fn write_all(out: &Path) -> Result<(), Error> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixtures = repo.join("core/tests/fixtures");
    let put = |target: &str, name: &str, bytes: &[u8]| -> Result<(), Error> {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
        Ok(())
    };
    let families = [
        "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2",
    ];
    for family in families {
        let dir = fixtures.join("families").join(family);
        // GGUF: the family's metadata with small tensors of several block types.
        let f = GgufFile::open(dir.join("model.gguf"))?;
        let meta: Vec<_> = f
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let tensors = [
            (GgmlType::F32, 8),
            (GgmlType::F16, 8),
            (GgmlType::Q8_0, 32),
            (GgmlType::Q4_0, 32),
            (GgmlType::Q4_K, 256),
            (GgmlType::Q6_K, 256),
        ];
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .enumerate()
            .map(|(i, &(ty, n))| TensorSpec {
                name: format!("t{i}.weight"),
                shape: vec![n],
                ty,
            })
            .collect();
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("m.gguf");
        write_with(&path, &meta, &specs, |i| {
            let n = specs[i].n_bytes().unwrap_or_default() as usize;
            Ok::<_, std::io::Error>(Cow::Owned((0..n).map(|b| (b * 7 % 251) as u8).collect()))
        })?;
        put("gguf", &format!("{family}.gguf"), &std::fs::read(&path)?)?;
        // PEFT adapter: config, NUL, weights.
        let peft = dir.join("peft_adapter");
        let mut bytes = std::fs::read(peft.join("adapter_config.json"))?;
        bytes.push(0);
        bytes.extend(std::fs::read(peft.join("adapter_model.safetensors"))?);
        put("peft_adapter", &format!("{family}.bin"), &bytes)?;
        // Chat templates: the family's own, from its GGUF metadata.
        if let Some(graft_core::formats::gguf::GgufValue::String(t)) =
            f.metadata.get("tokenizer.chat_template")
        {
            put("chat_template", &format!("{family}.jinja"), t.as_bytes())?;
        }
    }
    // The real models' templates (Gemma 3, Qwen2.5-Coder) and the named ones.
    for name in ["gemma3", "qwen2_5_coder"] {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(
            fixtures.join(format!("{name}_tokenization.json")),
        )?)?;
        if let Some(t) = v["chat_template"].as_str() {
            put("chat_template", &format!("{name}.jinja"), t.as_bytes())?;
        }
    }
    for name in ["chatml", "alpaca"] {
        if let Some(t) = graft_core::text::chat::named_template(name) {
            put("chat_template", &format!("{name}.jinja"), t.as_bytes())?;
        }
    }
    // GGUF-LoRA: the tiny Llama's PEFT adapter written by graft.
    let llama = fixtures.join("families/llama");
    let model = load_gguf::<Cpu>(
        &llama.join("model.gguf"),
        LoadOptions::default(),
        &Default::default(),
    )?
    .model;
    let (adapter, _) = graft_core::adapters::peft::load(&llama.join("peft_adapter"), &model)?;
    let tmp = tempfile::tempdir()?;
    let lora = tmp.path().join("lora.gguf");
    graft_core::adapters::gguf_lora::save(&lora, &adapter, &model)?;
    put("gguf_lora", "llama.gguf", &std::fs::read(&lora)?)?;
    // safetensors.
    for (name, path) in [
        (
            "peft_llama.safetensors",
            llama.join("peft_adapter/adapter_model.safetensors"),
        ),
        ("nf4.safetensors", fixtures.join("nf4.safetensors")),
    ] {
        put("safetensors", name, &std::fs::read(path)?)?;
    }
    // Configs.
    for name in ["quickstart.toml", "dpo.toml", "bench.toml"] {
        put(
            "train_config",
            name,
            &std::fs::read(repo.join("configs").join(name))?,
        )?;
    }
    put(
        "serve_config",
        "serve.toml",
        &std::fs::read(repo.join("configs/serve.toml"))?,
    )?;
    // Datasets: the example files as JSONL, and their first rows as CSV, Parquet and Arrow.
    for name in ["capitals.jsonl", "preferences.jsonl"] {
        let text = std::fs::read_to_string(repo.join("configs/data").join(name))?;
        let head: String = text.lines().take(4).map(|l| format!("{l}\n")).collect();
        put("dataset_jsonl", name, head.as_bytes())?;
    }
    let rows = [
        ("What is the capital of France?", "Paris."),
        ("2 + 2?", "4, \"quoted\", with a comma"),
    ];
    let csv: String = std::iter::once("prompt,completion\n".to_string())
        .chain(
            rows.iter()
                .map(|(p, c)| format!("\"{p}\",\"{}\"\n", c.replace('"', "\"\""))),
        )
        .collect();
    put("dataset_csv", "completion.csv", csv.as_bytes())?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new("completion", DataType::Utf8, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let mut pq = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut pq, schema.clone(), None)?;
    w.write(&batch)?;
    w.close()?;
    put("dataset_parquet", "completion.parquet", &pq)?;
    let mut ipc = Vec::new();
    let mut s = arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &schema)?;
    s.write(&batch)?;
    s.finish()?;
    drop(s);
    put("dataset_arrow", "completion.arrow", &ipc)?;
    let mut file = Vec::new();
    let mut f = arrow::ipc::writer::FileWriter::try_new(&mut file, &schema)?;
    f.write(&batch)?;
    f.finish()?;
    drop(f);
    put("dataset_feather", "completion.feather", &file)?;
    // Request bodies.
    let bodies = [
        (
            "chat_tools.json",
            serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
            "tool_choice": "auto", "temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "n": 2,
            "stop": ["\n\n"], "logprobs": true, "top_logprobs": 3, "stream": true,
            "stream_options": {"include_usage": true}, "seed": 1, "user": "u"}),
        ),
        (
            "completion.json",
            serde_json::json!({"model": "m", "prompt": ["a", "b"], "echo": true,
            "logprobs": 2, "max_tokens": 0, "logit_bias": {"42": -100}, "min_tokens": 0,
            "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
            "top_k": 5, "min_p": 0.1, "ignore_eos": true}),
        ),
        (
            "structured.json",
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
            "guided_regex": "[a-z]+", "guided_choice": ["a", "b"]}),
        ),
        (
            "load.json",
            serde_json::json!({"lora_name": "a", "lora_path": "/adapters/a"}),
        ),
        (
            "tokenize.json",
            serde_json::json!({"model": "m", "prompt": "Hello", "add_special_tokens": true}),
        ),
        (
            "detokenize.json",
            serde_json::json!({"model": "m", "tokens": [1, 2, 3]}),
        ),
    ];
    for (name, body) in bodies {
        put("http_body", name, body.to_string().as_bytes())?;
    }
    // Adapter paths: name, NUL, path (relative to the adapters directory's parent).
    let paths: [&[u8]; 7] = [
        b"good\0adapters/good",
        b"link\0adapters/link",
        b"out\0outside/secret",
        b"dots\0adapters/../outside/secret",
        b"abs\0/etc",
        b"uni\0adapters/g\xc3\xb6\xc3\xb6d",
        b"../x\0adapters/./good/",
    ];
    for (i, p) in paths.iter().enumerate() {
        put("adapter_path", &format!("{i}.bin"), p)?;
    }
    Ok(())
}
