//! A tiny random Llama (2 layers, hidden 64) written both as an HF safetensors directory and as
//! a GGUF file (with llama.cpp's q/k row permutation), for fast tests of the model and loaders.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

pub const LAYERS: usize = 2;
pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 16;
pub const INTER: usize = 128;
pub const VOCAB: usize = 96;

/// Named tensors in HF layout, row-major f32.
pub struct TinyWeights {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl TinyWeights {
    pub fn random(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut t = BTreeMap::new();
        let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n: usize = shape.iter().product();
            let v = (0..n)
                .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            t.insert(name, (shape, v));
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![VOCAB, HIDDEN],
            0.5,
            0.0,
        );
        for i in 0..LAYERS {
            let p = format!("model.layers.{i}");
            add(
                format!("{p}.self_attn.q_proj.weight"),
                vec![HEADS * HEAD_DIM, HIDDEN],
                0.15,
                0.0,
            );
            add(
                format!("{p}.self_attn.k_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                0.15,
                0.0,
            );
            add(
                format!("{p}.self_attn.v_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                0.15,
                0.0,
            );
            add(
                format!("{p}.self_attn.o_proj.weight"),
                vec![HIDDEN, HEADS * HEAD_DIM],
                0.15,
                0.0,
            );
            add(
                format!("{p}.mlp.gate_proj.weight"),
                vec![INTER, HIDDEN],
                0.15,
                0.0,
            );
            add(
                format!("{p}.mlp.up_proj.weight"),
                vec![INTER, HIDDEN],
                0.15,
                0.0,
            );
            add(
                format!("{p}.mlp.down_proj.weight"),
                vec![HIDDEN, INTER],
                0.1,
                0.0,
            );
            add(
                format!("{p}.input_layernorm.weight"),
                vec![HIDDEN],
                0.2,
                1.0,
            );
            add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![HIDDEN],
                0.2,
                1.0,
            );
        }
        add("model.norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
        TinyWeights { tensors: t }
    }

    pub fn config_json(&self) -> String {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
            "tie_word_embeddings": true, "hidden_act": "silu"
        })
        .to_string()
    }

    /// Writes `config.json` + `model.safetensors` (f32, or bf16 when `bf16`).
    pub fn write_hf_dir(&self, dir: &Path, bf16: bool) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config_json()).unwrap();
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(n, (s, v))| {
                let b = if bf16 {
                    v.iter()
                        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                        .collect()
                } else {
                    v.iter().flat_map(|x| x.to_le_bytes()).collect()
                };
                (n.clone(), s.clone(), b)
            })
            .collect();
        let dtype = if bf16 { Dtype::BF16 } else { Dtype::F32 };
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    }

    /// GGUF tensors (name, torch shape, f32 data) with llama.cpp's names and q/k permutation.
    pub fn gguf_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        for (name, (shape, v)) in &self.tensors {
            let g = hf_to_gguf_name(name);
            let v = if name.ends_with("q_proj.weight") {
                permute(v, shape[0], shape[1], HEADS)
            } else if name.ends_with("k_proj.weight") {
                permute(v, shape[0], shape[1], KV_HEADS)
            } else {
                v.clone()
            };
            out.push((g, shape.clone(), v));
        }
        out
    }
}

fn hf_to_gguf_name(n: &str) -> String {
    let n = n
        .replace("model.embed_tokens", "token_embd")
        .replace("model.norm", "output_norm");
    let n = n.replace("model.layers.", "blk.");
    n.replace("self_attn.q_proj", "attn_q")
        .replace("self_attn.k_proj", "attn_k")
        .replace("self_attn.v_proj", "attn_v")
        .replace("self_attn.o_proj", "attn_output")
        .replace("mlp.gate_proj", "ffn_gate")
        .replace("mlp.up_proj", "ffn_up")
        .replace("mlp.down_proj", "ffn_down")
        .replace("input_layernorm", "attn_norm")
        .replace("post_attention_layernorm", "ffn_norm")
}

/// llama.cpp's `LlamaModel.permute`: rows reshaped (heads, 2, d/2) and the last two swapped.
fn permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for t in 0..2 {
            for j in 0..d / 2 {
                let src = h * d + t * d / 2 + j;
                let dst = h * d + 2 * j + t;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Metadata value for the GGUF writer.
pub enum Kv {
    Str(String),
    U32(u32),
    F32(f32),
    Bool(bool),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// Minimal GGUF v3 writer: metadata, then tensors (given as raw bytes of a GGML type id).
pub fn write_gguf(path: &Path, kvs: &[(&str, Kv)], tensors: &[(String, Vec<usize>, u32, Vec<u8>)]) {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    let mut out = Vec::new();
    out.extend(0x4655_4747u32.to_le_bytes());
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        s(&mut out, k);
        match v {
            Kv::Str(x) => {
                out.extend(8u32.to_le_bytes());
                s(&mut out, x);
            }
            Kv::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::Bool(x) => {
                out.extend(7u32.to_le_bytes());
                out.push(*x as u8);
            }
            Kv::Strs(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    s(&mut out, x);
                }
            }
            Kv::I32s(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, shape, ty, bytes) in tensors {
        s(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (bytes.len() as u64).div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
        while out.len() % 32 != 0 {
            out.push(0);
        }
    }
    std::fs::write(path, out).unwrap();
}

/// The tiny model's GGUF metadata (byte-level BPE tokenizer over single-letter tokens).
pub fn tiny_metadata() -> Vec<(&'static str, Kv)> {
    let tokens: Vec<String> = (0..VOCAB).map(|i| format!("t{i}")).collect();
    let mut types = vec![1i32; VOCAB];
    types[0] = 3;
    types[1] = 3;
    vec![
        ("general.architecture", Kv::Str("llama".into())),
        ("general.name", Kv::Str("tiny".into())),
        ("llama.context_length", Kv::U32(256)),
        ("llama.embedding_length", Kv::U32(HIDDEN as u32)),
        ("llama.block_count", Kv::U32(LAYERS as u32)),
        ("llama.feed_forward_length", Kv::U32(INTER as u32)),
        ("llama.attention.head_count", Kv::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Kv::U32(KV_HEADS as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-5)),
        ("llama.rope.freq_base", Kv::F32(10000.0)),
        ("tokenizer.ggml.model", Kv::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Kv::Strs(tokens)),
        ("tokenizer.ggml.token_type", Kv::I32s(types)),
        ("tokenizer.ggml.merges", Kv::Strs(vec![])),
        ("tokenizer.ggml.eos_token_id", Kv::U32(1)),
        ("tokenizer.ggml.add_bos_token", Kv::Bool(false)),
    ]
}

/// f32 tensors as GGUF entries of type F32.
pub fn f32_entries(
    t: &[(String, Vec<usize>, Vec<f32>)],
) -> Vec<(String, Vec<usize>, u32, Vec<u8>)> {
    t.iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                0,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect()
}
