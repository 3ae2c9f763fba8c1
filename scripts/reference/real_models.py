#!/usr/bin/env python3
"""Reference outputs of two real GGUF models (Gemma 3 270M and Qwen2.5-Coder 0.5B) from transformers.

The same protocol as make_fixtures.py's SmolLM2 fixtures (its helpers are imported from it, so the
layout and key names match and the Rust test helpers can be reused). Run on CPU with the versions
pinned in requirements.txt (no network; the models come from scripts/fetch-model.sh):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install -r scripts/reference/requirements.txt
    /tmp/refenv/bin/python scripts/reference/real_models.py ~/.cache/graft/models core/tests/fixtures

It reads gemma-3-270m-Q4_K_M.gguf (arch gemma3, a base model without a chat template) and
Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf (arch qwen2, ChatML template with tools; its tensors are
Q4_K / Q5_0 / Q6_K / Q8_0 / F32) through transformers' GGUF loader, which dequantizes every tensor to
f32 with gguf-py (so the reference is the f32 model of the quantized weights). Everything is
deterministic, so a rerun with the same versions rewrites identical files. Writes, for NAME in
gemma3 and qwen2_5_coder:

  NAME_reference.json / .safetensors
      as smollm2_reference.*: four prompts with their ids, greedy continuation (24 tokens, EOS is not
      a stop) with top-1/top-2 margins, full logits of the last prompt position (`p{i}.last_logits`)
      and logits of a probe set of vocab ids at every prompt position (`p{i}.probe_logits`).
      gemma3: plain-text continuations encoded with tok(text), which prepends <bos> as Gemma's
      tokenizer does (tokenizer.add_special_tokens = true in the JSON). qwen2_5_coder: two prompts
      rendered with the GGUF's chat template (add_generation_prompt, one of them the coding question
      "Write a Python function that reverses a string.") and two plain texts, encoded with
      tok(text, add_special_tokens=False) (Qwen adds no BOS).
  NAME_tokenization.json
      as tokenization.json: transformers' GGUF tokenizer, ids (add_special_tokens=False) and
      decodings of make_fixtures.py's mixed texts plus a few model-specific ones, and the tokenizer
      transformers builds (normalizer, pre-tokenizer, post-processor, decoder, added tokens; Gemma's
      6242 `<unusedN>` added tokens are given as id ranges in `added_unused_tokens`)
  qwen2_5_coder_chat_template.json
      as chat_template.json (a list of {messages, add_generation_prompt, rendered}), plus cases with
      `tools` (one OpenAI-style function schema): a tool-less system prompt, a question with tools,
      an assistant tool call (arguments as a JSON object, as transformers expects) followed by the
      tool result, and two parallel calls with two results
"""
import json
import os
import re
import sys
from importlib.metadata import version

sys.dont_write_bytecode = True  # no __pycache__ next to make_fixtures.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_fixtures import (DIVERGENT_TEXTS, REFERENCE_PROTOCOL,  # noqa: E402
                           load_transformers, reference_prompts, sha256, write_json)

import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

torch.set_num_threads(1)

GEMMA3 = "gemma-3-270m-Q4_K_M.gguf"
QWEN = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"

# make_fixtures.py's tokenization texts, then its pre-tokenizer-divergent ones.
MIXED_TEXTS = [
    "Café déjà vu — 東京 🚀 naïve façade, Ελληνικά, русский, हिन्दी.",
    "def f(x):\n\tif x  >  y:\n\t\treturn   x**2  # comment\n\n\n    pass  ",
    "In 2024 it cost 1234567 dollars (or 3.14159e-10 per unit).",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
] + DIVERGENT_TEXTS

EXTRA_TEXTS = {
    "gemma3": ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
               "<bos>Hello<eos> <pad> <unk>",
               "   leading spaces and trailing   ",
               "tab\tnew\nline\r\ncarriage  ▁ lower-eighth-block"],
    "qwen2_5_coder": ["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
                      "<|endoftext|><|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
                      "   leading spaces and trailing   ",
                      "x = [i ** 2 for i in range(10)]  # 10 squares"],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# ---------------------------------------------------------------------------------------------
# Logits, greedy continuations (make_fixtures.smollm2's protocol)
# ---------------------------------------------------------------------------------------------

def prompt_texts(name, tok):
    if name == "gemma3":
        return ["The capital of France is", "def fibonacci(n):\n    ",
                "Once upon a time, in a small village by the sea,",
                "Café déjà vu — 東京 🚀 costs $3.50!"]
    chat = lambda messages: tok.apply_chat_template(messages, tokenize=False,  # noqa: E731
                                                    add_generation_prompt=True)
    return [chat([{"role": "user", "content": "Write a Python function that reverses a string."}]),
            chat([{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is 2+2?"}]),
            "The capital of France is",
            "def fibonacci(n):\n    "]


def reference(name, tok, model, gguf_path, out):
    add_special = name == "gemma3"
    texts = prompt_texts(name, tok)
    tensors, prompts = reference_prompts(tok, model, texts, add_special_tokens=add_special,
                                         label=name)

    default_ids = tok(texts[-1])["input_ids"]
    plain_ids = tok(texts[-1], add_special_tokens=False)["input_ids"]
    from gguf import GGUFReader

    types = {}
    for t in GGUFReader(gguf_path).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    meta = {
        "generator": "scripts/reference/real_models.py",
        "versions": {p: version(p) for p in ("torch", "transformers", "tokenizers", "gguf", "numpy",
                                             "safetensors")},
        "model": {"file": os.path.basename(gguf_path), "bytes": os.path.getsize(gguf_path),
                  "sha256": sha256(gguf_path), "architecture": type(model).__name__,
                  "ggml_tensor_types": dict(sorted(types.items()))},
        "dtype": "float32 (every GGUF tensor dequantized by transformers / gguf-py)",
        "tokenizer": {
            "encode": f"tok(text, add_special_tokens={add_special})",
            "add_special_tokens": add_special,
            "bos_added": default_ids[:1] == [tok.bos_token_id] and len(default_ids) > len(plain_ids),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        },
        **REFERENCE_PROTOCOL,
        "prompts": prompts,
    }
    write_json(os.path.join(out, f"{name}_reference.json"), meta)
    save_file(tensors, os.path.join(out, f"{name}_reference.safetensors"))


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------

def split_unused(added):
    """Gemma's thousands of `<unusedN>` added tokens as id ranges: [first id, last id, first N]."""
    unused, kept, flags = [], [], set()
    for t in added:
        m = re.fullmatch(r"<unused(\d+)>", t["content"])
        if m is None:
            kept.append(t)
            continue
        unused.append((t["id"], int(m.group(1))))
        flags.add(json.dumps({k: v for k, v in t.items() if k not in ("id", "content")}, sort_keys=True))
    if not unused:
        return added, None
    assert len(flags) == 1, flags
    ranges = []
    for i, n in sorted(unused):
        if ranges and i == ranges[-1][1] + 1 and n == ranges[-1][2] + (i - ranges[-1][0]):
            ranges[-1][1] = i
        else:
            ranges.append([i, i, n])
    return kept, {"content": "<unused{N}>", "count": len(unused), "properties": json.loads(flags.pop()),
                  "id_ranges": ranges, "id_ranges_meaning": "[first id, last id, N of the first id]"}


def tokenization(name, tok, gguf_path, out):
    cases = []
    for text in MIXED_TEXTS + EXTRA_TEXTS[name]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids)})
    backend = json.loads(tok.backend_tokenizer.to_str())
    built = {k: backend.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")}
    built["added_tokens"], built["added_unused_tokens"] = split_unused(backend["added_tokens"])
    write_json(os.path.join(out, f"{name}_tokenization.json"), {
        "source": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=...)",
        "model": {"file": os.path.basename(gguf_path), "sha256": sha256(gguf_path)},
        "encode": "tok(text, add_special_tokens=False); decoded = tok.decode(ids)",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template,
        "cases": cases,
        "transformers_tokenizer": built,
    })


def chat_templates(tok, out):
    ask = {"role": "user", "content": "What's the weather in Paris?"}
    one_call = [ask, {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
                {"role": "tool", "content": "{\"temperature\": 18, \"unit\": \"celsius\"}"}]
    two_calls = [{"role": "user", "content": "Weather in Paris and in Tokyo, in fahrenheit?"},
                 {"role": "assistant", "content": "",
                  "tool_calls": [call("get_weather", city="Paris", unit="fahrenheit"),
                                 call("get_weather", city="Tokyo", unit="fahrenheit")]},
                 {"role": "tool", "content": "{\"temperature\": 64}"},
                 {"role": "tool", "content": "{\"temperature\": 75}"}]
    conversations = [
        ([{"role": "user", "content": "Hello!"}], None),
        ([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}], None),
        ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": "And 3+3?"}], None),
        ([ask], [WEATHER_TOOL]),
        ([{"role": "system", "content": "You are a weather bot."}, ask], [WEATHER_TOOL]),
        (one_call, [WEATHER_TOOL]),
        (one_call + [{"role": "assistant", "content": "It is 18 °C in Paris."}], [WEATHER_TOOL]),
        (two_calls, [WEATHER_TOOL]),
    ]
    cases = []
    for messages, tools in conversations:
        for add_generation_prompt in (True, False):
            rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
            case = {"messages": messages, "add_generation_prompt": add_generation_prompt,
                    "rendered": rendered}
            if tools is not None:
                case["tools"] = tools
            cases.append(case)
    write_json(os.path.join(out, "qwen2_5_coder_chat_template.json"), cases)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    models = os.path.expanduser(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) == 3 else "core/tests/fixtures"
    os.makedirs(out, exist_ok=True)
    only = os.environ.get("MODELS", "gemma3,qwen2_5_coder").split(",")
    for name, file in (("gemma3", GEMMA3), ("qwen2_5_coder", QWEN)):
        if name not in only:
            continue
        path = os.path.join(models, file)
        tok, model = load_transformers(path)
        print(f"{name}: {type(model).__name__}, vocab {model.config.vocab_size}, "
              f"chat template {'yes' if tok.chat_template else 'none'}")
        reference(name, tok, model, path, out)
        tokenization(name, tok, path, out)
        if name == "qwen2_5_coder":
            chat_templates(tok, out)
        del model
    for name in sorted(os.listdir(out)):
        if name.startswith(("gemma3_", "qwen2_5_coder_")):
            print(f"{os.path.getsize(os.path.join(out, name)):>9}  {os.path.join(out, name)}")


if __name__ == "__main__":
    main()
