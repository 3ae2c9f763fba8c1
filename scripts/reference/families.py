#!/usr/bin/env python3
"""Tiny random models of eight dense families, as HF dirs, llama.cpp GGUFs and transformers logits.

Fixtures for graft-core's "model families" parity tests. Run on CPU with the versions pinned in
requirements.txt (no network besides the two package downloads below; nothing from the HF hub):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install -r scripts/reference/requirements.txt
    # llama.cpp's own converter, from the llama-cpp-python 0.3.36 sdist on PyPI. pip prepares the sdist's
    # metadata even for a download, and that needs a CMake on PATH (the `cmake` wheel will do):
    python3 -m venv /tmp/lcppenv && /tmp/lcppenv/bin/pip install scikit-build-core cmake
    PATH=/tmp/lcppenv/bin:$PATH /tmp/lcppenv/bin/pip download --no-deps --no-binary :all: \\
        --no-build-isolation llama-cpp-python==0.3.36 -d /tmp/lcpp
    /tmp/refenv/bin/python scripts/reference/families.py \\
        /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz core/tests/fixtures/families

The tarball is extracted to a temporary directory outside the repo; only its
vendor/llama.cpp/convert_hf_to_gguf.py (+ conversion/) and vendor/llama.cpp/gguf-py are used, in a
subprocess, and no llama.cpp code is written to the repo. Everything is seeded (torch.manual_seed per
family, numpy generators, single-threaded tokenizer training), so a rerun with the same versions
rewrites identical files.

Families (directory names): llama mistral qwen2 qwen3 gemma2 gemma3 phi3 olmo2. Each is a tiny f32
model: hidden 64, 4 heads, 2 KV heads, head_dim 16, intermediate 128, vocab 512, 2 layers, except
  qwen3, gemma2   head_dim 32 (q width 128 != hidden 64)
  gemma3          6 layers (transformers' default 5:1 sliding/full pattern: layer 5 is full attention),
                  head_dim 32 and intermediate 64 (to keep the files small)
and these features switched on so that each one changes the logits (the `feature_checks` in each
reference.json give max |d logits| when the feature is turned off):
  llama    tie_word_embeddings, rope_type llama3 (factor 8, low/high freq factor 1/4, original context
           16: the first rotary pair is smoothly interpolated, the other seven are divided by 8)
  mistral  sliding_window 8, untied, rope_theta 1e6
  qwen2    random q/k/v biases, untied, rope_theta 1e6
  qwen3    q_norm/k_norm (per head), tied, rope_theta 1e6
  gemma2   sliding_window 8 on even layers, attn_logit_softcapping 2.0, final_logit_softcapping 3.0,
           query_pre_attn_scalar = head_dim (llama.cpp has no key for it and uses 1/sqrt(head_dim)),
           pre/post attention and feed-forward norms, tied, sqrt(hidden) embedding scale
  gemma3   sliding_window 8 on layers 0-4, rope_theta 1e6 (full) / 1e4 (sliding), q/k norms,
           query_pre_attn_scalar = head_dim, tied
  phi3     fused qkv_proj / gate_up_proj, partial_rotary_factor 0.5, rope_type longrope with random
           short/long factors in [1, 4], original_max_position_embeddings 16 and
           max_position_embeddings 64 (transformers uses long_factor when the sequence is > 16 tokens)
  olmo2    post-attention / post-feed-forward norms only, q_norm/k_norm over the full q/k width, untied
Norm weights are random: N(1, 0.3) for x * w norms, N(0, 0.3) for Gemma's x * (1 + w) norms.

Tokenizers (so that transformers and the converter both accept the directory; prompts are random ids,
so the tokenizer only matters for the GGUF's tokenizer metadata):
  llama, qwen2, qwen3, olmo2   byte-level BPE trained with `tokenizers` on a seeded synthetic corpus,
      with the family's split regex and its special tokens at the end of the vocab. The converter
      identifies a BPE pre-tokenizer by the hash of its output on a test text and refuses unknown
      hashes; this tiny vocab has no known hash, so get_vocab_base_pre is monkeypatched to return the
      name llama.cpp uses for that regex: "llama-bpe" (Llama 3), "qwen2" (Qwen2 and Qwen3), "dbrx"
      (llama.cpp's name for the cl100k / GPT-4 regex, which OLMo-2's tokenizer uses).
  mistral, phi3, gemma2, gemma3   SentencePiece BPE (`sentencepiece`, byte_fallback, split_digits)
      trained on the same corpus and saved as tokenizer.model: Llama style (<unk> <s> </s>, dummy
      prefix) for mistral and phi3, Gemma style (<pad> <eos> <bos> <unk> <mask>, no dummy prefix) for
      the Gemmas. The converter reads tokenizer.model (tokenizer.ggml.model "llama"); the Gemma2
      converter requires it.

Writes, per family, core/tests/fixtures/families/<family>/:
  config.json, generation_config.json, model.safetensors   save_pretrained of the f32 model
  tokenizer.json, tokenizer_config.json (+ tokenizer.model for the SentencePiece families)
  model.gguf           llama.cpp's convert_hf_to_gguf.py --outtype f32 of that directory
  reference.json       family, versions, prompts (3 lists of random ids, lengths 5 / 13 / 24, no BOS),
                       config notes and feature checks
  reference.safetensors  `p{i}.logits` f32 [len, vocab]: transformers logits at every position
                       (eval, attn_implementation="eager", use_cache=False, one full forward);
                       mistral also `p{i}.logits_no_window` (sliding_window=None), because its GGUF
                       (arch "llama") has no sliding window
and families/NOTES.md: per family the GGUF metadata (token arrays elided), the tensor names of the
global tensors and of layer 0 with the HF tensor each comes from and the transform the converter
applied, found by comparing values (identity, +1 norm shift, rotary row permutation), and two checks:
the GGUF's tensors mapped back to HF names (inverse transforms) loaded into the HF model, and
transformers' own GGUF loader (`from_pretrained(dir, gguf_file="model.gguf")`), each as max |d logits|
against reference.safetensors.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(1)  # deterministic reductions, and light on a shared machine

LLAMA_CPP_PYTHON = "0.3.36"
PROMPT_LENGTHS = (5, 13, 24)
VOCAB = 512

# Split regexes of the real tokenizers (tokenizer.json pre_tokenizer), as llama.cpp lists them.
CL100K_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

BPE = {
    # family: (split regex, llama.cpp pre-tokenizer name, special tokens, bos, eos, pad, add_bos)
    "llama": (CL100K_REGEX, "llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>"],
              "<|begin_of_text|>", "<|end_of_text|>", None, True),
    "qwen2": (QWEN2_REGEX, "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              None, "<|im_end|>", "<|endoftext|>", False),
    "qwen3": (QWEN2_REGEX, "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              None, "<|im_end|>", "<|endoftext|>", False),
    "olmo2": (CL100K_REGEX, "dbrx", ["<|endoftext|>", "<|pad|>"],
              None, "<|endoftext|>", "<|pad|>", False),
}
SPM_LLAMA = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)
SPM_GEMMA = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                 bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<mask>"],
                 add_dummy_prefix=False)
SPM = {
    # family: (trainer options, tokenizer_class, bos, eos, unk, pad)
    "mistral": (SPM_LLAMA, "LlamaTokenizer", "<s>", "</s>", "<unk>", None),
    "phi3": (SPM_LLAMA, "LlamaTokenizer", "<s>", "</s>", "<unk>", None),
    "gemma2": (SPM_GEMMA, "GemmaTokenizer", "<bos>", "<eos>", "<unk>", "<pad>"),
    "gemma3": (SPM_GEMMA, "GemmaTokenizer", "<bos>", "<eos>", "<unk>", "<pad>"),
}

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6)


def family_configs(phi3_factors):
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Olmo2Config,
                              Phi3Config, Qwen2Config, Qwen3Config)

    short, long = phi3_factors
    return {
        "llama": (LlamaConfig, dict(
            head_dim=16, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16})),
        "mistral": (MistralConfig, dict(
            head_dim=16, sliding_window=8, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        "qwen2": (Qwen2Config, dict(
            tie_word_embeddings=False, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        "qwen3": (Qwen3Config, dict(
            head_dim=32, tie_word_embeddings=True, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        "gemma2": (Gemma2Config, dict(
            head_dim=32, query_pre_attn_scalar=32, sliding_window=8, attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
        "gemma3": (Gemma3TextConfig, dict(
            num_hidden_layers=6, head_dim=32, intermediate_size=64, query_pre_attn_scalar=32,
            sliding_window=8, tie_word_embeddings=True,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
        "phi3": (Phi3Config, dict(
            tie_word_embeddings=False, original_max_position_embeddings=16, sliding_window=None,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5, "original_max_position_embeddings": 16,
                             "short_factor": short, "long_factor": long})),
        "olmo2": (Olmo2Config, dict(
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
    }


# Weight scale: large enough that logits are O(1) and the families' features visibly matter.
INIT_STD = {"gemma2": 0.25}
DEFAULT_INIT_STD = 0.15
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"]
GEMMA_NORMS = {"gemma2", "gemma3"}  # RMSNorm computes x * (1 + w)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def corpus(seed=0, n=1500):
    """A seeded synthetic text: short sentences, numbers, a little code."""
    words = ("the of and to in is was for on that with as by at from it this be are or an which "
             "model layer token weight attention head value query key norm rope window cache batch "
             "train serve adapter rank scale matrix vector sum mean function return print string "
             "python rust graft gemma llama qwen mistral phi olmo tensor float int byte file path "
             "hello world data time day year people water light music river mountain city house "
             "don't it's we're they've I'll she'd").split()
    r = random.Random(seed)
    lines = []
    for _ in range(n):
        s = " ".join(r.choice(words) for _ in range(r.randint(3, 12)))
        s = s[0].upper() + s[1:]
        if r.random() < 0.2:
            s += f" {r.randint(0, 99999)}"
        if r.random() < 0.1:
            s = f"def {r.choice(words)}(x):\n    return x + {r.randint(1, 9)}"
        lines.append(s + r.choice([".", ".", "!", "?", ",", ":", ";"]))
    return lines


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def bpe_tokenizer(family, d):
    """Byte-level BPE with the family's split regex; returns special token ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    regex, _, specials, bos, eos, pad, add_bos = BPE[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    assert tok.get_vocab_size() == VOCAB - len(specials), tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "pad_token": pad, "add_bos_token": add_bos, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "model_max_length": 64}
    write_json(os.path.join(d, "tokenizer_config.json"), cfg)
    tid = tok.token_to_id
    return {"bos_token_id": tid(bos) if bos else None, "eos_token_id": tid(eos),
            "pad_token_id": tid(pad) if pad else None}


def spm_tokenizer(family, d):
    """SentencePiece BPE with byte fallback, saved as tokenizer.model plus transformers' tokenizer.json."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    opts, cls, bos, eos, unk, pad = SPM[family]
    proto = io.BytesIO()  # trained from memory: no file paths end up in the model's trainer_spec
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=proto, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=1, minloglevel=2, **opts)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(proto.getvalue())
    cfg = {"tokenizer_class": cls, "bos_token": bos, "eos_token": eos, "unk_token": unk,
           "pad_token": pad, "add_bos_token": True, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "model_max_length": 64}
    write_json(os.path.join(d, "tokenizer_config.json"), cfg)
    tok = AutoTokenizer.from_pretrained(d)  # converts tokenizer.model with transformers' SpmConverter
    tok.backend_tokenizer.save(os.path.join(d, "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    sample = "Hello  world, the model 123 héllo 東京"
    assert tok(sample, add_special_tokens=False)["input_ids"] == sp.encode(sample), family
    return {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
            "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else None}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def phi3_factors():
    g = np.random.default_rng(7)
    n = int(16 * 0.5) // 2  # head_dim * partial_rotary_factor / 2 rotary pairs
    return ([float(round(x, 4)) for x in g.uniform(1, 4, n)], [float(round(x, 4)) for x in g.uniform(1, 4, n)])


def build_model(family, special_ids, seed):
    from transformers import AutoModelForCausalLM

    cls, kw = family_configs(phi3_factors())[family]
    cfg = dict(COMMON, **kw, **special_ids)
    std = INIT_STD.get(family, DEFAULT_INIT_STD)
    cfg["initializer_range"] = std
    config = cls(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family in GEMMA_NORMS else 1.0))
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) * std)
    return model.eval()


def logits_of(model, prompts):
    with torch.no_grad():
        return [model(torch.tensor([ids]), use_cache=False).logits[0].float() for ids in prompts]


def max_delta(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def variant(model, prompts, config_changes=None, state_fn=None):
    """Logits of a copy of the model with some config values or weights changed."""
    from transformers import AutoModelForCausalLM

    config = type(model.config).from_dict(model.config.to_dict())
    for k, v in (config_changes or {}).items():
        setattr(config, k, v)
    m = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if state_fn:
        sd = state_fn(sd)
    m.load_state_dict(sd)
    return logits_of(m.eval(), prompts)


def feature_checks(family, model, prompts, ref):
    """max |d logits| when each feature of the family is switched off: every one must bite."""
    norms_off = lambda sd: {k: (torch.zeros_like(v) if family in GEMMA_NORMS else torch.ones_like(v))  # noqa: E731
                            if "norm" in k else v for k, v in sd.items()}
    checks = {"norm_weights_neutral": variant(model, prompts, state_fn=norms_off)}
    c = model.config
    if family == "llama":
        checks["rope_llama3_off"] = variant(model, prompts, {"rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0}})
    if family in ("mistral", "gemma2", "gemma3"):
        checks["sliding_window_off"] = variant(model, prompts, {"sliding_window": None} if family == "mistral"
                                               else {"sliding_window": 64})
    if family == "qwen2":
        checks["qkv_bias_zero"] = variant(model, prompts, state_fn=lambda sd: {
            k: torch.zeros_like(v) if k.endswith("_proj.bias") else v for k, v in sd.items()})
    if family == "gemma2":
        checks["attn_logit_softcapping_off"] = variant(model, prompts, {"attn_logit_softcapping": None})
        checks["final_logit_softcapping_off"] = variant(model, prompts, {"final_logit_softcapping": None})
    if family == "gemma3":
        rp = json.loads(json.dumps(c.rope_parameters))
        rp["sliding_attention"]["rope_theta"] = rp["full_attention"]["rope_theta"]
        checks["local_rope_theta_as_global"] = variant(model, prompts, {"rope_parameters": rp})
    if family == "phi3":
        rp = dict(c.rope_parameters, long_factor=c.rope_parameters["short_factor"])
        checks["long_factor_as_short"] = variant(model, prompts, {"rope_parameters": rp})
    out = {}
    for name, logits in checks.items():
        out[name] = [round(float((x - y).abs().max()), 4) for x, y in zip(logits, ref)]
    return out


# ---------------------------------------------------------------------------------------------
# llama.cpp's converter
# ---------------------------------------------------------------------------------------------

CONVERT = r"""
import runpy, sys
root, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base
if pre != "-":
    # The tiny BPE vocab has no known pre-tokenizer hash; name the regex it was built with.
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_root(path, tmp):
    if os.path.isdir(path):
        base = path
    else:
        with tarfile.open(path) as t:
            t.extractall(tmp, filter="data")
        base = os.path.join(tmp, f"llama_cpp_python-{LLAMA_CPP_PYTHON}")
    with open(os.path.join(base, "PKG-INFO"), encoding="utf-8") as f:
        pkg = f.read()
    assert f"\nVersion: {LLAMA_CPP_PYTHON}\n" in pkg, "expected llama-cpp-python " + LLAMA_CPP_PYTHON
    return os.path.join(base, "vendor", "llama.cpp")


def convert(root, hf_dir, out_path, pre):
    env = dict(os.environ, PYTHONHASHSEED="0")
    r = subprocess.run([sys.executable, "-c", CONVERT, root, pre, hf_dir, "--outtype", "f32",
                        "--outfile", out_path], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{r.stderr[-4000:]}")
    return r.stderr


# ---------------------------------------------------------------------------------------------
# GGUF analysis
# ---------------------------------------------------------------------------------------------

TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges")


def gguf_contents(path):
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(path)
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        kind = GGUFValueType(field.types[0]).name
        if field.types[0] == GGUFValueType.ARRAY:
            sub = GGUFValueType(field.types[-1]).name
            n = len(field.data)
            value = field.contents() if name not in TOKEN_ARRAYS else None
            meta[name] = (f"ARRAY[{sub}; {n}]", value)
        else:
            meta[name] = (kind, field.contents())
    tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape], np.array(t.data)) for t in r.tensors}
    return meta, tensors


def permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: HF half-split rotary rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def relate(g, h, n_head, n_kv):
    """How the GGUF tensor g was made from the HF tensor h (exact f32 comparisons)."""
    if g.shape != h.shape:
        if g.size == h.size:
            g = g.reshape(h.shape)
        elif g.ndim == h.ndim and g.shape[1:] == h.shape[1:] and g.shape[0] < h.shape[0]:
            return "rows truncated" if np.array_equal(g, h[:g.shape[0]]) else None
        else:
            return None
    if np.array_equal(g, h):
        return "identity"
    if np.array_equal(g, (torch.from_numpy(h) + 1).numpy()):
        return "+1 (HF x*(1+w) norm stored as 1+w)"
    if h.shape[0] % n_head == 0 and np.array_equal(g, permute(h, n_head)):
        return f"rows permuted: permute(w, n_head={n_head})"
    if h.shape[0] % n_kv == 0 and np.array_equal(g, permute(h, n_kv)):
        return f"rows permuted: permute(w, n_head={n_kv})"
    return None


def inverse(g, h_shape, how, n_head, n_kv):
    g = g.reshape(h_shape) if g.size == int(np.prod(h_shape)) else g
    if how == "identity":
        return g
    if how.startswith("+1"):
        return (torch.from_numpy(g.copy()) - 1).numpy()
    if how.startswith("rows permuted"):
        return unpermute(g, n_head if f"n_head={n_head})" in how else n_kv)
    raise ValueError(how)


def analyse_gguf(family, model, gguf_path):
    import gguf

    meta, tensors = gguf_contents(gguf_path)
    arch_name = meta["general.architecture"][1]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    c = model.config
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
    tmap = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    hf = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    gguf_to_hf = {}
    for name in hf:
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is not None and g in tensors:
            gguf_to_hf.setdefault(g, name)
    rows, rebuilt = {}, {}
    for gname, (dtype, shape, data) in tensors.items():
        hname = gguf_to_hf.get(gname)
        how = relate(data, hf[hname], n_head, n_kv) if hname else None
        if hname and how is None:
            raise AssertionError(f"{family}: {gname} is not a known transform of {hname}")
        rows[gname] = (dtype, shape, hname, how, data)
        if hname:
            rebuilt[hname] = inverse(data, hf[hname].shape, how, n_head, n_kv)
    missing = sorted(set(hf) - set(rebuilt))
    return meta, rows, rebuilt, missing


def check_rebuilt(model, rebuilt, missing, prompts, ref):
    """HF model from config.json with the GGUF's tensors mapped back to HF names."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager", dtype=torch.float32)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rebuilt.items()}
    if model.config.tie_word_embeddings and "lm_head.weight" in missing:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd, strict=True)
    return max_delta(logits_of(m.eval(), prompts), ref)


def same_value(a, b):
    """Equal, or equal once rounded to f32 (GGUF stores FLOAT32: rms_norm_eps 1e-6 reads back as 9.99e-07)."""
    if isinstance(a, float) and isinstance(b, float):
        return np.float32(a) == np.float32(b)
    return a == b


CONFIG_DIFF_IGNORE = {"architectures", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "initializer_range",
                      "use_cache", "output_attentions", "output_hidden_states", "return_dict"}


def check_transformers_gguf(d, prompts, ref):
    """transformers' own GGUF loader: config from GGUF metadata, and config.json + GGUF weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    try:  # what transformers' GGUF config mapping gets wrong or leaves at its defaults
        g = AutoConfig.from_pretrained(d, gguf_file="model.gguf").to_dict()
        h = AutoConfig.from_pretrained(d).to_dict()
        out["gguf_config_differs"] = {
            k: f"GGUF {json.dumps(g.get(k))} vs config.json {json.dumps(h.get(k))}"
            for k in sorted(set(g) | set(h)) if k not in CONFIG_DIFF_IGNORE and not same_value(g.get(k), h.get(k))}
    except Exception as e:  # noqa: BLE001
        out["gguf_config_differs"] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    for label, extra in (("gguf_config", {}), ("config_json", {"config": AutoConfig.from_pretrained(d)})):
        try:
            m = AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", dtype=torch.float32,
                                                     attn_implementation="eager", **extra).eval()
            out[label] = f"{max_delta(logits_of(m, prompts), ref):.3g}"
        except Exception as e:  # noqa: BLE001 - recorded in NOTES.md as the reason
            out[label] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    try:
        from transformers import AutoTokenizer
        tg = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
        th = AutoTokenizer.from_pretrained(d)
        text = "Hello  world, the model 123 don't héllo 東京"
        same = tg(text, add_special_tokens=False)["input_ids"] == th(text, add_special_tokens=False)["input_ids"]
        out["tokenizer"] = "same ids as tokenizer.json" if same else "ids differ from tokenizer.json"
    except Exception as e:  # noqa: BLE001
        out["tokenizer"] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return out


def fmt_value(v):
    if isinstance(v, float):
        return repr(float(np.float32(v)))
    if isinstance(v, list) and len(v) > 16:
        return f"[{', '.join(map(str, v[:8]))}, ...]"
    if isinstance(v, str) and len(v) > 80:
        return repr(v[:80] + "...")
    return repr(v)


def notes_section(family, model, meta, rows, missing, checks, extra):
    c = model.config
    lines = [f"## {family}", "",
             f"HF `{type(model).__name__}` (`model_type` {c.model_type}) -> GGUF architecture "
             f"`{meta['general.architecture'][1]}`.", ""]
    lines += extra + [""]
    lines += ["Metadata (token arrays elided):", "", "| key | type | value |", "| --- | --- | --- |"]
    for k, (t, v) in meta.items():
        lines.append(f"| `{k}` | {t} | {'(elided)' if v is None else fmt_value(v)} |")
    lines += ["", "Tensors (global and layer 0; GGUF shape is ggml order, ne0 first; all F32):", "",
              "| GGUF tensor | GGUF shape | from HF tensor | transform |", "| --- | --- | --- | --- |"]
    for g, (dtype, shape, h, how, data) in rows.items():
        if g.startswith("blk.") and not g.startswith("blk.0."):
            continue
        if h is None:
            src, how = "(none: generated by the converter)", "values: " + ", ".join(f"{x:.6g}" for x in data.reshape(-1))
        else:
            src = f"`{h}`"
        lines.append(f"| `{g}` | {shape} | {src} | {how} |")
    if missing:
        lines += ["", "HF tensors with no GGUF tensor: " + ", ".join(f"`{m}`" for m in missing)
                  + (" (tied to `token_embd.weight`; the GGUF has no `output.weight`)" if c.tie_word_embeddings else "")]
    lines += ["", "Checks against reference.safetensors (max |d logits| over the 3 prompts"
              + ("; the transformers GGUF checks against `p{i}.logits_no_window`" if family == "mistral" else "")
              + "):", "",
              f"- GGUF tensors mapped back (inverse transforms) into the HF model: {checks['rebuilt']:.3g}",
              f"- transformers `from_pretrained(dir, gguf_file=\"model.gguf\")`, config from the GGUF: "
              f"{checks['transformers']['gguf_config']}",
              f"- the same with `config=AutoConfig.from_pretrained(dir)` (config.json): "
              f"{checks['transformers']['config_json']}",
              f"- transformers' tokenizer from the GGUF: {checks['transformers']['tokenizer']}"]
    differs = checks["transformers"]["gguf_config_differs"]
    if isinstance(differs, dict) and differs:
        lines += ["- transformers' config from the GGUF differs from config.json in: "
                  + "; ".join(f"`{k}`: {v}" for k, v in differs.items())]
    elif differs:
        lines += [f"- transformers' config from the GGUF: {differs}"]
    lines += [""]
    return lines


FAMILY_NOTES = {
    "llama": ["- q/k rows permuted (HF rotates halves; llama.cpp's `llama` arch uses rope type NORM, "
              "adjacent pairs): `permute(w, n)` = `w.reshape(n, 2, rows/n/2, cols).swapaxes(1, 2)`, "
              "n = n_head for q, n_head_kv for k. Undo with `w.reshape(n, rows/n/2, 2, cols).swapaxes(1, 2)`.",
              "- llama3 rope scaling is not in the metadata: it is the `rope_freqs.weight` tensor, one "
              "divisor per rotary pair (llama.cpp divides the frequency theta^(-2i/d) by it).",
              "- tied embeddings: no `output.weight`; the output projection is `token_embd.weight`."],
    "mistral": ["- Converted as `LlamaForCausalLM` -> GGUF arch `llama`: q/k rows permuted as for llama.",
                "- The GGUF has NO sliding window key: config.json's `sliding_window` 8 is lost, and "
                "llama.cpp runs full attention. reference.safetensors therefore also has "
                "`p{i}.logits_no_window` (HF with sliding_window=None), which is what the GGUF computes."],
    "qwen2": ["- No q/k permutation (arch `qwen2` uses rope type NEOX, the HF half-split layout).",
              "- q/k/v biases stored as `attn_{q,k,v}.bias`, unchanged."],
    "qwen3": ["- No q/k permutation (NEOX). Per-head q/k RMSNorm: `attn_q_norm.weight` / "
              "`attn_k_norm.weight` [head_dim], applied before rope, x*w (not shifted).",
              "- head_dim 32 != hidden/heads: `qwen3.attention.key_length` / `value_length` carry it."],
    "gemma2": ["- Every `*norm.weight` (attn_norm, post_attention_norm, ffn_norm, post_ffw_norm, "
               "output_norm) is stored as 1 + w (the converter adds 1): in the GGUF the norm is x * g.",
               "- Four norms per layer. Names: HF `input_layernorm` -> `attn_norm`, "
               "`post_attention_layernorm` -> `post_attention_norm` (a post-norm of the attention output, "
               "unlike llama where it is the pre-FFN `ffn_norm`), `pre_feedforward_layernorm` -> `ffn_norm`, "
               "`post_feedforward_layernorm` -> `post_ffw_norm`.",
               "- No `gemma2.rope.freq_base` key (the converter does not write one): llama.cpp and "
               "transformers both default to 10000.",
               "- `attn_logit_softcapping` / `final_logit_softcapping` keys: scores = c * tanh(scores / c) "
               "before the mask and softmax; logits = c * tanh(logits / c).",
               "- No q/k permutation (NEOX). Attention scale: llama.cpp uses 1/sqrt(key_length) (except for "
               "the 27B size class) - there is no query_pre_attn_scalar key; here it equals head_dim.",
               "- Sliding window on even layers (llama.cpp `set_swa_pattern(2)`: layer il is SWA iff "
               "il % 2 < 1), mask iff pos_q - pos_k >= sliding_window, as in HF.",
               "- Embedding scale sqrt(hidden) and gelu-tanh MLP are implied by the arch (no keys)."],
    "gemma3": ["- Every `*norm.weight` including `attn_q_norm` / `attn_k_norm` (per head, [head_dim], "
               "before rope) is stored as 1 + w.",
               "- The same four per-layer norm names as gemma2 (HF `post_attention_layernorm` -> "
               "`post_attention_norm`, `pre_feedforward_layernorm` -> `ffn_norm`). No softcapping.",
               "- No q/k permutation (NEOX). Attention scale 1/sqrt(key_length) as for gemma2.",
               "- No layer-pattern key: llama.cpp derives `set_swa_pattern(6)` (layer il is SWA iff "
               "il % 6 < 5), which equals transformers' default layer_types. `rope.freq_base` is the "
               "full-attention theta, `rope.freq_base_swa` the sliding one.",
               "- The converter trims `token_embd` to the tokenizer's real vocab (no-op here: 512)."],
    "phi3": ["- Fused tensors kept fused: `attn_qkv.weight` = HF `qkv_proj` (q rows, then k, then v) and "
             "`ffn_up.weight` = HF `gate_up_proj` (gate rows first, then up; llama.cpp splits it in half "
             "for SwiGLU). No q/k permutation (NEOX).",
             "- Partial rotary: `phi3.rope.dimension_count` = int(partial_rotary_factor * hidden) / n_head "
             "(8 of head_dim 16).",
             "- longrope: `rope_factors_short.weight` / `rope_factors_long.weight` (one divisor per rotary "
             "pair) and `phi3.rope.scaling.attn_factor` = sqrt(1 + ln(64/16) / ln(16)). transformers picks "
             "long factors when the forward's sequence is longer than original_max_position_embeddings "
             "(prompt 2, 24 tokens; prompts 0 and 1 use short factors); llama.cpp picks them for the whole "
             "run when the per-sequence context size (n_ctx_seq) exceeds "
             "`phi3.rope.scaling.original_context_length`. Both scale cos/sin by the attn_factor."],
    "olmo2": ["- No q/k permutation (arch `olmo2` uses NEOX). `attn_q_norm` / `attn_k_norm` span the full "
              "q / k width (n_head*head_dim, n_kv*head_dim), applied to the projections before the head "
              "split, x*w (not shifted).",
              "- No pre-norms (no `attn_norm` / `ffn_norm`): `post_attention_norm` (HF "
              "`post_attention_layernorm`, which for llama/qwen/phi is the pre-FFN `ffn_norm`!) and "
              "`post_ffw_norm` (HF `post_feedforward_layernorm`) normalize the sublayer outputs before "
              "the residual add."],
}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def family_fixture(family, seed, root, out_root):
    d = os.path.join(out_root, family)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    if family in BPE:
        special_ids = bpe_tokenizer(family, d)
    else:
        special_ids = spm_tokenizer(family, d)
    model = build_model(family, special_ids, seed)
    model.save_pretrained(d)
    pre = BPE[family][1] if family in BPE else "-"
    convert(root, d, os.path.join(d, "model.gguf"), pre)

    g = np.random.default_rng(seed)
    prompts = [g.integers(0, VOCAB, n).tolist() for n in PROMPT_LENGTHS]
    ref = logits_of(model, prompts)
    tensors = {f"p{i}.logits": x.contiguous() for i, x in enumerate(ref)}
    if family == "mistral":
        for i, x in enumerate(variant(model, prompts, {"sliding_window": None})):
            tensors[f"p{i}.logits_no_window"] = x.contiguous()
    save_file(tensors, os.path.join(d, "reference.safetensors"))
    stds = [round(float(x.std()), 3) for x in ref]
    assert min(stds) >= 0.5, (family, stds)
    checks = feature_checks(family, model, prompts, ref)
    for name, deltas in checks.items():
        assert deltas[-1] > 1e-2, (family, name, deltas)  # the 24-token prompt exceeds every window

    meta, rows, rebuilt, missing = analyse_gguf(family, model, os.path.join(d, "model.gguf"))
    gguf_ref = [tensors[f"p{i}.logits_no_window"] for i in range(3)] if family == "mistral" else ref
    verify = {"rebuilt": check_rebuilt(model, rebuilt, missing, prompts, ref),
              "transformers": check_transformers_gguf(d, prompts, gguf_ref)}
    norms = sorted({n.split(".")[-2] for n in model.state_dict() if "norm" in n})
    write_json(os.path.join(d, "reference.json"), {
        "family": family,
        "generator": "scripts/reference/families.py",
        "versions": {p: version(p) for p in ("torch", "transformers", "tokenizers", "sentencepiece",
                                             "safetensors", "numpy", "gguf")}
                    | {"llama-cpp-python (convert_hf_to_gguf.py)": LLAMA_CPP_PYTHON},
        "seed": seed,
        "dtype": "float32",
        "prompts": prompts,
        "logits": "reference.safetensors p{i}.logits[pos, :] = transformers logits (eval, eager attention, "
                  "use_cache=False, one forward of the whole prompt, no BOS added)",
        "config_notes": {
            "architecture": type(model).__name__,
            "init": f"linear/embedding weights N(0, {INIT_STD.get(family, DEFAULT_INIT_STD)}), "
                    + ("norm weights N(0, 0.3) (applied as 1 + w)" if family in GEMMA_NORMS
                       else "norm weights N(1, 0.3)") + ", biases N(0, 0.5)",
            "norms": norms,
            "tie_word_embeddings": model.config.tie_word_embeddings,
            "gguf_pre_tokenizer": pre if family in BPE else "default (SentencePiece tokenizer.model)",
            "logits_std": stds,
        },
        "feature_checks": {"meaning": "max |d logits| per prompt when the feature is switched off",
                           **checks},
        "gguf_checks": verify,
    })
    extra = FAMILY_NOTES[family]
    print(f"{family}: logits std {stds}; rebuilt-from-GGUF max|d| {verify['rebuilt']:.3g}; "
          f"transformers GGUF {verify['transformers']}")
    return notes_section(family, model, meta, rows, missing, verify, extra)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out_root = sys.argv[2] if len(sys.argv) == 3 else "core/tests/fixtures/families"
    only = os.environ.get("FAMILIES", "").split(",") if os.environ.get("FAMILIES") else FAMILIES
    os.makedirs(out_root, exist_ok=True)
    notes = ["# GGUF notes for the tiny family fixtures", "",
             "Generated by scripts/reference/families.py from llama.cpp's convert_hf_to_gguf.py "
             f"(llama-cpp-python {LLAMA_CPP_PYTHON} sdist, --outtype f32) and transformers "
             f"{version('transformers')}. Transforms were found by comparing the GGUF tensor values "
             "with the HF ones exactly (f32). `permute` is convert_hf_to_gguf.py's LlamaModel.permute.",
             "",
             "A GGUF shape is listed in ggml order (ne0 first): `[64, 128]` is the HF/torch tensor "
             "`[128, 64]` ([out, in]) with the same row-major data, up to the listed transform. The "
             "metadata tables list every key in file order; array values other than the token arrays "
             "are shown (long ones cut).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        root = llama_cpp_root(sys.argv[1], tmp)
        for seed, family in enumerate(FAMILIES):
            if family not in only:
                continue
            notes += family_fixture(family, seed, root, out_root)
    with open(os.path.join(out_root, "NOTES.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(notes).rstrip() + "\n")
    total = 0
    for dirpath, _, files in sorted(os.walk(out_root)):
        for name in sorted(files):
            size = os.path.getsize(os.path.join(dirpath, name))
            total += size
            print(f"{size:>9}  {os.path.join(dirpath, name)}")
    print(f"{total:>9}  total")


if __name__ == "__main__":
    main()
