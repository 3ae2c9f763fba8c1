#!/usr/bin/env python3
"""LoRA adapters between graft and HF PEFT, on SmolLM2 loaded by transformers (f32) from the GGUF.

Versions pinned in requirements.txt; CPU only, no network. Two commands:

  make-fixture GGUF OUT_DIR
      A PEFT adapter (r=4, lora_alpha=8, all seven Llama projections, layers 0, 1, 14 and 29,
      A from PEFT's default init, B ~ N(0, 0.02²) so that it changes the output), saved with
      save_pretrained into OUT_DIR/peft_adapter/, and PeftModel's logits on two prompts in
      OUT_DIR/peft_reference.safetensors: `p{i}.last_logits` (the last position, whole vocab)
      and `p{i}.probe_logits` ([positions, probes]: every 97th vocab id plus each position's
      top 8), with the prompts' ids and probe ids in OUT_DIR/peft_reference.json. graft's test
      loads the adapter and must reproduce them.

  check GGUF ADAPTER_DIR GRAFT_LOGITS
      Loads ADAPTER_DIR (e.g. a graft-train run's adapter/) with PeftModel.from_pretrained and
      compares its logits with those graft wrote (`graft-serve score --out GRAFT_LOGITS`: keys
      `input_ids` and `logits`). Prints max |Δ| and exits non-zero above 1e-3.

    /root/refenv/bin/python scripts/reference/peft_adapter.py make-fixture \\
        ~/.cache/graft/models/SmolLM2-135M-Instruct.Q4_1.gguf core/tests/fixtures
"""
import json
import os
import sys
from importlib.metadata import version

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

torch.set_num_threads(1)

TOLERANCE = 1e-3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n<|im_start|>assistant\n",
    "def add(a, b):\n    return",
]


def load_base(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


def make_fixture(gguf_path, out):
    from peft import LoraConfig, get_peft_model

    tok, base = load_base(gguf_path)
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                        layers_to_transform=[0, 1, 14, 29], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.eval()
    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    adapter_dir = os.path.join(out, "peft_adapter")
    model.save_pretrained(adapter_dir)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)  # the model card adds nothing to the fixture
    tensors, prompts = {}, []
    for i, text in enumerate(PROMPTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
            with model.disable_adapter():
                plain = model(torch.tensor([ids])).logits[0].float()
        probe = set(range(0, logits.shape[1], 97))
        for row in logits:
            probe.update(torch.topk(row, 8).indices.tolist())
        probe = sorted(probe)
        tensors[f"p{i}.last_logits"] = logits[-1].numpy()
        tensors[f"p{i}.probe_logits"] = logits[:, probe].contiguous().numpy()
        prompts.append({"text": text, "input_ids": ids, "vocab_probe_ids": probe,
                        "max_abs_adapter_effect": float((logits - plain).abs().max())})
    save_file(tensors, os.path.join(out, "peft_reference.safetensors"))
    meta = {
        "generator": "scripts/reference/peft_adapter.py make-fixture",
        "versions": {p: version(p) for p in ("torch", "transformers", "peft", "gguf", "safetensors")},
        "model": os.path.basename(gguf_path),
        "adapter": "peft_adapter/ (r=4, lora_alpha=8, layers 0, 1, 14, 29, all projections)",
        "logits": "PeftModel (f32) on prompts[i].input_ids: p{i}.last_logits = logits[-1, :], "
                  "p{i}.probe_logits[pos, k] = logits[pos, vocab_probe_ids[k]]",
        "prompts": prompts,
    }
    with open(os.path.join(out, "peft_reference.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
        f.write("\n")
    for p in prompts:
        print(f"adapter changes logits by up to {p['max_abs_adapter_effect']:.3f} on {p['text']!r}")


def check(gguf_path, adapter_dir, graft_logits):
    from peft import PeftModel

    _, base = load_base(gguf_path)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    g = load_file(graft_logits)
    ids = g["input_ids"].astype(np.int64).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        with model.disable_adapter():
            plain = model(torch.tensor([ids])).logits[0].float().numpy()
    d = float(np.abs(logits - g["logits"]).max())
    effect = float(np.abs(logits - plain).max())
    print(f"PEFT {version('peft')} vs graft on {len(ids)} tokens: max |Δ| = {d:.3g} "
          f"(the adapter itself moves logits by up to {effect:.3g})")
    if d > TOLERANCE:
        sys.exit(f"max |Δ| {d} exceeds {TOLERANCE}")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "make-fixture":
        make_fixture(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
