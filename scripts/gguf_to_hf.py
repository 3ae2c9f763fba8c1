#!/usr/bin/env python3
"""Convert a Llama GGUF file into a Hugging Face Llama model directory with f32 weights.

numpy-only (gguf-py, numpy, safetensors): no torch or transformers, so CI can run it cheaply.
Every tensor is dequantized with gguf-py, llama.cpp's Q/K row permutation is undone, and the
directory gets config.json, generation_config.json, tokenizer_config.json and model.safetensors
(or, with --max-shard-bytes, model-0000X-of-0000Y.safetensors shards plus
model.safetensors.index.json). The output is assembled in a temporary directory next to OUT_DIR
and renamed into place; an OUT_DIR that already holds weights is left alone.

usage: gguf_to_hf.py MODEL.gguf OUT_DIR [--max-shard-bytes N]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def meta(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def f32_value(x):
    """A float stored as f32 in GGUF, written with its shortest f32 repr (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x))) if isinstance(x, (float, np.floating)) else x


def hf_name(name):
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")  # blk.N.<kind>.weight
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected tensor {name}")


def unpermute(w, n_head):
    """Undo llama.cpp's convert_hf_to_gguf permutation of Q/K rows (interleaved -> half-split rope)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_tensors(reader, n_head, n_kv):
    tensors = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]  # ggml ne order -> row-major [out, in]
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if kind == "attn_q":
            w = unpermute(w, n_head)
        elif kind == "attn_k":
            w = unpermute(w, n_kv)
        tensors[hf_name(t.name)] = np.ascontiguousarray(w)
    return tensors


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_weights(tensors, out, max_shard_bytes):
    if not max_shard_bytes:
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    write_json(os.path.join(out, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def convert(gguf_path, out_dir, max_shard_bytes=0):
    r = GGUFReader(gguf_path)
    arch = meta(r, "general.architecture")
    if arch != "llama":
        sys.exit(f"{gguf_path}: architecture {arch!r} is not llama")
    n_head = meta(r, "llama.attention.head_count")
    n_kv = meta(r, "llama.attention.head_count_kv", n_head)
    tokens = meta(r, "tokenizer.ggml.tokens")
    bos = meta(r, "tokenizer.ggml.bos_token_id")
    eos = meta(r, "tokenizer.ggml.eos_token_id")
    pad = meta(r, "tokenizer.ggml.padding_token_id", eos)
    tensors = load_tensors(r, n_head, n_kv)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta(r, "llama.embedding_length"),
        "intermediate_size": meta(r, "llama.feed_forward_length"),
        "num_hidden_layers": meta(r, "llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": f32_value(meta(r, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": f32_value(meta(r, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta(r, "llama.context_length"),
        "vocab_size": len(tokens),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    token = lambda i: tokens[i] if i is not None else None  # noqa: E731
    tokenizer_config = {
        "chat_template": meta(r, "tokenizer.chat_template"),
        "bos_token": token(bos),
        "eos_token": token(eos),
        "pad_token": token(pad),
        "add_bos_token": bool(meta(r, "tokenizer.ggml.add_bos_token", False)),
    }

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gguf_to_hf-", dir=parent)
    try:
        write_json(os.path.join(tmp, "config.json"), config)
        write_json(os.path.join(tmp, "generation_config.json"), {"bos_token_id": bos, "eos_token_id": eos})
        write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config)
        write_weights(tensors, tmp, max_shard_bytes)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)  # atomic; fails if out_dir exists and is not empty
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", help="input .gguf file (llama architecture)")
    p.add_argument("out_dir", help="output model directory")
    p.add_argument("--max-shard-bytes", type=int, default=0,
                   help="split weights into shards of at most this many bytes (HF index layout)")
    a = p.parse_args()
    done = any(os.path.exists(os.path.join(a.out_dir, f))
               for f in ("model.safetensors", "model.safetensors.index.json"))
    if not done:
        convert(a.gguf, a.out_dir, a.max_shard_bytes)
    print(a.out_dir)


if __name__ == "__main__":
    main()
