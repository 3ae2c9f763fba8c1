#!/usr/bin/env python3
"""Loads an HF directory written by `graft-train merge --out` in transformers and compares its logits with graft's.

    /tmp/refenv/bin/python scripts/reference/check_hf_merge.py DIR SCORES.safetensors "PROMPT"

SCORES.safetensors is `graft-serve score --model DIR --prompt PROMPT --out SCORES.safetensors` (graft's logits at
every position, `logits` [len, vocab]). Prints the token count, max |Δ logit| against transformers (f32, eager
attention) and whether the greedy next token agrees at every position; exits non-zero above 1e-3. Also renders the
chat template with one user message through transformers, to show that tokenizer_config.json carries it.
"""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main(d, scores, prompt):
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids  # as graft-serve score
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits[0]
    got = load_file(scores)["logits"]
    if got.shape != ref.shape:
        sys.exit(f"shapes differ: graft {tuple(got.shape)}, transformers {tuple(ref.shape)} (tokenization?)")
    d_max = float((got - ref).abs().max())
    same = bool((got.argmax(-1) == ref.argmax(-1)).all())
    print(f"{ids.shape[1]} tokens: max |Δ logit| graft vs transformers {d_max:.2e}, same greedy token everywhere: {same}")
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        print("chat template renders:", repr(text[-60:]))
    if d_max > 1e-3:
        sys.exit("FAILED")


if __name__ == "__main__":
    main(*sys.argv[1:])
