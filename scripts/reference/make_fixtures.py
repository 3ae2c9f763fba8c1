#!/usr/bin/env python3
"""Reference fixtures for graft-core's parity tests, from gguf-py, bitsandbytes and transformers.

Run on CPU with the versions pinned in requirements.txt (no network; the model comes from
scripts/fetch-model.sh):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install -r scripts/reference/requirements.txt
    /tmp/refenv/bin/python scripts/reference/make_fixtures.py \
        ~/.cache/graft/models/SmolLM2-135M-Instruct.Q4_1.gguf core/tests/fixtures

`--only ggml_blocks OUT_DIR` writes just ggml_blocks.safetensors and needs only gguf, numpy and
safetensors (no torch, no model):

    python3 scripts/reference/make_fixtures.py --only ggml_blocks core/tests/fixtures

Everything is seeded, so a rerun with the same versions rewrites identical files. Writes:

  ggml_blocks.safetensors  `<TYPE>.bytes` (u8, 8 packed llama.cpp blocks of random bytes with finite,
                           moderate f16 scales) and `<TYPE>.values` (f32, gguf-py's dequantization)
                           for Q4_0 Q4_1 Q8_0 Q4_K Q5_K Q6_K Q5_0 Q5_1 Q2_K Q3_K IQ4_NL IQ4_XS,
                           plus 64 F16 and BF16 values, and MXFP4: 256 blocks, one per E8M0
                           exponent byte, random codes
  nf4.safetensors          bitsandbytes NF4 of a [33, 70] f32 matrix (a tail block of 6), blocksize
                           64, with double quantization (`packed`, `absmax` u8 codes,
                           `nested_absmax`, `nested_quant_map`, `nested_offset`, `quant_map`,
                           `dequantized`) and without it (`nodq.packed`, `nodq.absmax`,
                           `nodq.dequantized`), plus `weight` and `dynamic_map`
  smollm2_reference.json / .safetensors
                           transformers (f32) on the GGUF, four prompts: ids, greedy continuation
                           (24 tokens, no EOS stop) with top-1/top-2 margins, full logits of the last
                           prompt position (`p{i}.last_logits`) and logits of a probe set of vocab
                           ids at every prompt position (`p{i}.probe_logits`)
  tokenization.json        transformers' GGUF tokenizer: ids and decodings of mixed texts, its
                           normalizer / pre-tokenizer / post-processor / decoder and added tokens
  chat_template.json       apply_chat_template renderings of the GGUF's template
"""
import hashlib
import json
import os
import sys
from importlib.metadata import version

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

# ---------------------------------------------------------------------------------------------
# GGML blocks
# ---------------------------------------------------------------------------------------------

# Block byte sizes and where the f16 scale fields sit (llama.cpp layouts):
#   Q4_0  f16 d, 16 qs                    Q4_K  f16 d, f16 dmin, 12 scales, 128 qs
#   Q4_1  f16 d, f16 m, 16 qs             Q5_K  f16 d, f16 dmin, 12 scales, 32 qh, 128 qs
#   Q8_0  f16 d, 32 i8                    Q6_K  128 ql, 64 qh, 16 i8 scales, f16 d
#   Q5_0  f16 d, 4 qh, 16 qs              Q2_K  16 scales, 64 qs, f16 d, f16 dmin
#   Q5_1  f16 d, f16 m, 4 qh, 16 qs       Q3_K  32 hmask, 64 qs, 12 scales, f16 d
#   IQ4_NL f16 d, 16 qs                   IQ4_XS f16 d, u16 scales_h, 4 scales_l, 128 qs
# The types after Q6_K were added later: they are drawn after the F16/BF16 values, so that the
# earlier tensors stay byte-identical.
BLOCKS = {
    "Q4_0": (18, [0]),
    "Q4_1": (20, [0, 2]),
    "Q8_0": (34, [0]),
    "Q4_K": (144, [0, 2]),
    "Q5_K": (176, [0, 2]),
    "Q6_K": (210, [208]),
    "Q5_0": (22, [0]),
    "Q5_1": (24, [0, 2]),
    "Q2_K": (84, [80, 82]),
    "Q3_K": (110, [108]),
    "IQ4_NL": (18, [0]),
    "IQ4_XS": (136, [0]),
}
FIRST_BLOCKS = 6  # the types drawn before F16/BF16

# Super-block scales (d, dmin) that llama.cpp's quantizers only make non-negative; the others
# (including Q3_K's and Q6_K's d, whose sub-block scales are signed) are drawn with either sign.
NON_NEGATIVE = {"Q4_K", "Q5_K", "Q2_K"}


def random_blocks(rng, name, n_blocks):
    """Random packed blocks whose f16 scale fields hold finite values with |x| in [1e-3, 1e-1]."""
    size, scale_offsets = BLOCKS[name]
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in scale_offsets:
        mag = rng.uniform(1e-3, 1e-1, n_blocks)
        sign = 1.0 if name in NON_NEGATIVE else rng.choice([-1.0, 1.0], n_blocks)
        b[:, off:off + 2] = (mag * sign).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return b.reshape(-1)


def ggml_blocks(out):
    rng = np.random.default_rng(1)
    t = {}

    def blocks(names):
        for name in names:
            b = random_blocks(rng, name, 8)
            t[f"{name}.bytes"] = b
            t[f"{name}.values"] = dequantize(b, Q[name]).astype(np.float32).reshape(-1)

    names = list(BLOCKS)
    blocks(names[:FIRST_BLOCKS])
    # 64 floats: normal values plus zeros, subnormals, the f16 maximum and bf16 rounding ties.
    special = [0.0, -0.0, 6e-8, -3e-5, 65504.0, 1.00390625, 1.01171875, -2.0078125]
    vals = np.concatenate([rng.normal(0, 2, 64 - len(special)), special]).astype(np.float32)
    for name in ("F16", "BF16"):
        b = quantize(vals, Q[name]).view(np.uint8).reshape(-1)
        t[f"{name}.bytes"] = b
        t[f"{name}.values"] = dequantize(b, Q[name]).astype(np.float32).reshape(-1)
    blocks(names[FIRST_BLOCKS:])
    # MXFP4 (GPT-OSS's experts; drawn last): one block for each E8M0 exponent byte 0..255 --
    # ggml's subnormal half-scales below 2, and 2^127 whose larger codes overflow f32 to inf --
    # with random codes.
    b = rng.integers(0, 256, size=(256, 17), dtype=np.uint8)
    b[:, 0] = np.arange(256, dtype=np.uint8)
    b = b.reshape(-1)
    t["MXFP4.bytes"] = b
    with np.errstate(over="ignore"):
        t["MXFP4.values"] = dequantize(b, Q.MXFP4).astype(np.float32).reshape(-1)
    save_file(t, os.path.join(out, "ggml_blocks.safetensors"))


# ---------------------------------------------------------------------------------------------
# NF4 (bitsandbytes, CPU)
# ---------------------------------------------------------------------------------------------

NF4_NOTE = """bitsandbytes CPU NF4 rounding (checked below against a numpy re-implementation):
4-bit (torch 'default' kernel): per block of 64 (the last block may be short) absmax = max|x| in f32;
full blocks are scaled by multiplying with the f32 reciprocal, x * (1 / max(absmax, 1e-38)), the
short tail block by true division, x / max(absmax, 1e-38); both clamped to [-1, 1]. The code is
torch.bucketize(scaled, mid) with mid[i] = f32 (nf4[i] + nf4[i+1]) / 2 and right=False, i.e. the
number of midpoints strictly below the value: an exact tie goes to the LOWER code. An odd element
count is padded with 0.0 (code 7). Element 2k is the high nibble of byte k, 2k+1 the low nibble.
Double quant: offset = torch f32 mean of the absmax vector; absmax - offset is 8-bit quantized with
quantize_blockwise(blocksize=256, code=create_dynamic_map(signed=True)) by the C++ CPU kernel:
absmax2 = max|v| per 256, normed = v / absmax2 (true division), a 'Direct2' bucket search then
'take idx+1 if strictly closer'. That search is approximate: about 0.1% of random values land on a
neighbour of the nearest code (also away from ties, e.g. near zero where codes are dense), so
nested codes can only be matched up to such off-by-one picks.
Dequant: nf4[q] * absmax (f32 product); with double quant absmax = dyn[code] * absmax2 + offset
(f32 product, then f32 add)."""


def nf4_reference_quantize(w, code, blocksize=64):
    """numpy re-implementation of bitsandbytes' CPU quantize_4bit (see NF4_NOTE)."""
    a = w.reshape(-1).astype(np.float32)
    full = a.size - a.size % blocksize
    blocks = a[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    recip = np.float32(1) / np.maximum(absmax, np.float32(1e-38))
    scaled = [np.clip(blocks * recip[:, None], -1, 1).reshape(-1)]
    if full < a.size:
        tail_max = np.abs(a[full:]).max()
        absmax = np.append(absmax, tail_max)
        scaled.append(np.clip(a[full:] / np.maximum(tail_max, np.float32(1e-38)), -1, 1))
    scaled = np.concatenate(scaled)
    if scaled.size % 2:
        scaled = np.append(scaled, np.float32(0))
    mid = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    q = np.searchsorted(mid, scaled, side="left").astype(np.uint8)
    return (q[0::2] << 4) | q[1::2], absmax.astype(np.float32)


def nf4(out):
    import bitsandbytes.functional as F
    import torch

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(33, 70, generator=gen) * 0.02
    w[3, 5], w[20, 60], w[32, 69] = 0.3, -0.25, 0.11  # outliers, one in the 6-element tail block
    w[7, :] = 0.0  # a stretch of exact zeros
    packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    nodq_packed, nodq = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    t = {
        "weight": w.numpy(),
        "packed": packed.reshape(-1).numpy(),
        "absmax": st.absmax.reshape(-1).numpy(),
        "nested_absmax": st.state2.absmax.reshape(-1).float().numpy(),
        "nested_quant_map": st.state2.code.float().numpy(),
        "quant_map": st.code.float().numpy(),
        "nested_offset": np.array([float(st.offset)], dtype=np.float32),
        "dequantized": F.dequantize_4bit(packed, st).float().numpy(),
        "nodq.packed": nodq_packed.reshape(-1).numpy(),
        "nodq.absmax": nodq.absmax.reshape(-1).float().numpy(),
        "nodq.dequantized": F.dequantize_4bit(nodq_packed, nodq).float().numpy(),
        "dynamic_map": F.create_dynamic_map(signed=True).float().numpy(),
    }

    # The rounding rules of NF4_NOTE, checked on this fixture.
    ref_packed, ref_absmax = nf4_reference_quantize(t["weight"], t["quant_map"])
    assert np.array_equal(ref_packed, t["nodq.packed"]) and np.array_equal(ref_packed, t["packed"])
    assert np.array_equal(ref_absmax, t["nodq.absmax"])
    assert float(st.offset) == float(torch.from_numpy(ref_absmax).mean())
    nearest = np.abs((ref_absmax - t["nested_offset"][0])[:, None] / t["nested_absmax"][0]
                     - t["nested_quant_map"][None, :]).argmin(axis=1)
    print(f"nf4: nested absmax codes differing from the exact nearest code: "
          f"{int((nearest != t['absmax']).sum())} of {nearest.size}")
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()},
              os.path.join(out, "nf4.safetensors"), metadata={"rounding": NF4_NOTE})


# ---------------------------------------------------------------------------------------------
# SmolLM2 through transformers' GGUF loader
# ---------------------------------------------------------------------------------------------

GREEDY_TOKENS = 24
PROBE_STRIDE = 97
PROBE_TOP_K = 8


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def load_transformers(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


def greedy(model, ids):
    """model.generate, greedy, exactly GREEDY_TOKENS new tokens: EOS is not a stop token here."""
    import torch

    model.generation_config.eos_token_id = None  # a None argument would fall back to this default
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=False, max_new_tokens=GREEDY_TOKENS, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
    new = g.sequences[0, len(ids):].tolist()
    assert len(new) == GREEDY_TOKENS
    margins = []
    for tok_id, logits in zip(new, g.logits):
        top = torch.topk(logits[0].float(), 2)
        assert int(top.indices[0]) == tok_id  # raw logits: no logits processor interfered
        margins.append(float(top.values[0] - top.values[1]))
    return new, margins


# How every `<model>_reference.json` was made, written into it beside the prompts.
REFERENCE_PROTOCOL = {
    "generation": {"method": "model.generate(do_sample=False), generation_config.eos_token_id = None",
                   "max_new_tokens": GREEDY_TOKENS, "stops_at_eos": False,
                   "greedy_margins": "top-1 minus top-2 raw logit at each generated step"},
    "probe": {"vocab_probe_ids": f"every {PROBE_STRIDE}th vocab id and the union of the top-"
                                 f"{PROBE_TOP_K} ids of every prompt position, sorted",
              "probe_logits": "p{i}.probe_logits[pos, k] = logits[pos, vocab_probe_ids[k]]",
              "last_logits": "p{i}.last_logits = logits[len(input_ids) - 1, :]"},
}


def reference_prompts(tok, model, texts, add_special_tokens, label=None):
    """The protocol of every `<model>_reference` fixture, per prompt: ids, the last position's
    full logits (`p{i}.last_logits`), the probe ids' logits at every position
    (`p{i}.probe_logits`) and the greedy continuation with its top-1/top-2 margins."""
    import torch

    vocab = model.config.vocab_size
    tensors, prompts = {}, []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        probe = set(range(0, vocab, PROBE_STRIDE))
        for row in logits:
            probe.update(torch.topk(row, PROBE_TOP_K).indices.tolist())
        probe = sorted(probe)
        tensors[f"p{i}.last_logits"] = logits[-1].numpy()
        tensors[f"p{i}.probe_logits"] = logits[:, probe].contiguous().numpy()
        greedy_ids, margins = greedy(model, ids)
        prompts.append({"text": text, "input_ids": ids, "greedy_ids": greedy_ids,
                        "greedy_margins": margins, "vocab_probe_ids": probe})
        if label:
            print(f"{label} prompt {i}: {len(ids)} ids, greedy {tok.decode(greedy_ids)!r}")
    return tensors, prompts


def smollm2(tok, model, gguf_path, out):
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    texts = ["The capital of France is", chat, "def fibonacci(n):\n    ",
             "Café déjà vu — 東京 🚀 costs $3.50!"]
    tensors, prompts = reference_prompts(tok, model, texts, add_special_tokens=False)

    default_ids = tok(texts[0])["input_ids"]  # add_special_tokens=True, transformers' default
    plain_ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    meta = {
        "generator": "scripts/reference/make_fixtures.py",
        "versions": {p: version(p) for p in ("torch", "transformers", "tokenizers", "gguf",
                                             "bitsandbytes", "numpy", "safetensors")},
        "model": {"file": os.path.basename(gguf_path), "bytes": os.path.getsize(gguf_path),
                  "sha256": sha256(gguf_path)},
        "dtype": "float32",
        "tokenizer": {
            "encode": "tok(text, add_special_tokens=False)",
            "bos_added": default_ids[:1] == [tok.bos_token_id] and len(default_ids) > len(plain_ids),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        },
        **REFERENCE_PROTOCOL,
        "prompts": prompts,
    }
    write_json(os.path.join(out, "smollm2_reference.json"), meta)
    save_file(tensors, os.path.join(out, "smollm2_reference.safetensors"))


# Texts on which transformers' GGUF tokenizer and the SmolLM2 tokenizer proper disagree. transformers
# builds a plain GPT-2 ByteLevel pre-tokenizer from the GGUF; llama.cpp's "smollm" pre-tokenizer
# (tokenizer.ggml.pre) first splits off every \p{N} character, then applies the GPT-2 regex. ASCII
# digits never merge in this vocab, so digit runs agree, but (a) runs of 2+ spaces before a digit
# split differently ("  2": transformers "Ġ" "Ġ" "2", smollm "ĠĠ" "2") and (b) non-ASCII numerals
# (², ½, ３, ٣, Ⅻ) after a space are not split off (" ½": transformers "ĠÂ" "½", smollm "Ġ" "Â½").
DIVERGENT_TEXTS = [
    "if x  >  2:\n\treturn  10",
    "x² + y³ = ½ of ３４ and Ⅻ",
    "Price: ¼ cup, 2½ tsp; ٣٤ ²³",
]


def tokenization(tok, out):
    from tokenizers import Tokenizer, pre_tokenizers

    smollm = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])

    def case(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return {"text": text, "ids": ids, "decoded": tok.decode(ids),
                "ids_smollm_pretokenizer": smollm.encode(text, add_special_tokens=False).ids}

    texts = [
        "Café déjà vu — 東京 🚀 naïve façade, Ελληνικά, русский, हिन्दी.",
        "def f(x):\n\tif x  >  y:\n\t\treturn   x**2  # comment\n\n\n    pass  ",
        "In 2024 it cost 1234567 dollars (or 3.14159e-10 per unit).",
        "<|im_start|>user\nhi<|im_end|>\n",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    ]
    cases = [case(t) for t in texts]
    assert all(c["ids"] == c["ids_smollm_pretokenizer"] for c in cases)
    divergent = [case(t) for t in DIVERGENT_TEXTS]
    assert all(c["ids"] != c["ids_smollm_pretokenizer"] for c in divergent)

    backend = json.loads(tok.backend_tokenizer.to_str())
    built = {k: backend.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")}
    built["added_tokens"] = backend["added_tokens"]
    write_json(os.path.join(out, "tokenization.json"), {
        "source": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=...)",
        "encode": "tok(text, add_special_tokens=False); decoded = tok.decode(ids)",
        "ids_smollm_pretokenizer": "ids with the pre-tokenizer replaced by Sequence[Digits("
                                   "individual_digits=True), ByteLevel(add_prefix_space=False, "
                                   "use_regex=True)], as in SmolLM2's tokenizer.json and llama.cpp's "
                                   "'smollm' pre-tokenizer",
        "cases": cases,
        "pretokenizer_divergent_cases": divergent,
        "transformers_tokenizer": built,
    })


def chat_templates(tok, out):
    conversations = [
        [{"role": "user", "content": "Hello!"}],
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}],
    ]
    cases = []
    for messages in conversations:
        for add_generation_prompt in (True, False):
            rendered = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
            cases.append({"messages": messages, "add_generation_prompt": add_generation_prompt,
                          "rendered": rendered})
    write_json(os.path.join(out, "chat_template.json"), cases)


def main():
    args = sys.argv[1:]
    if len(args) == 3 and args[:2] == ["--only", "ggml_blocks"]:
        os.makedirs(args[2], exist_ok=True)
        ggml_blocks(args[2])
        return
    if len(args) not in (1, 2) or args[0].startswith("--"):
        sys.exit(__doc__)
    import torch

    torch.set_num_threads(1)  # deterministic reductions, and light on a shared machine
    gguf_path = args[0]
    out = args[1] if len(args) == 2 else "core/tests/fixtures"
    os.makedirs(out, exist_ok=True)
    ggml_blocks(out)
    nf4(out)
    tok, model = load_transformers(gguf_path)
    smollm2(tok, model, gguf_path, out)
    tokenization(tok, out)
    chat_templates(tok, out)
    for name in sorted(os.listdir(out)):
        print(f"{os.path.getsize(os.path.join(out, name)):>9}  {os.path.join(out, name)}")


if __name__ == "__main__":
    main()
