#!/usr/bin/env python3
"""PEFT's merge_and_unload on the tiny family fixtures: the merged projection weights graft's merge must equal.

Run on CPU with the versions pinned in requirements.txt, after family_adapters.py (no network):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install -r scripts/reference/requirements.txt
    /tmp/refenv/bin/python scripts/reference/peft_merge.py core/tests/fixtures/families [FAMILY...]

For each family (llama: Q/K rows permuted in its GGUF; phi3: fused qkv_proj and gate_up_proj; qwen2:
q/k/v biases, which LoRA leaves alone; or those named) it loads <family>/ with transformers (f32),
applies <family>/peft_adapter with PeftModel.from_pretrained, calls merge_and_unload() and writes

  <family>/peft_merged.safetensors
                          every tensor of the merged model's projections
                          (model.layers.{i}.{self_attn|mlp}.{name}.weight and .bias, f32, the
                          names transformers saves) and header metadata `about`: generator,
                          versions, what the tensors are

Checks, printed per family (the script exits non-zero if one fails, after writing everything): the
merged model's logits equal the PeftModel's on the first reference prompt (≤ 1e-4), and each
merged weight differs from the base's by scale·B·A computed here in float64 (≤ 1e-6).

Everything is deterministic, so a rerun with the same versions rewrites identical files.
"""
import json
import os
import sys
from importlib.metadata import version

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)

FAMILIES = ["llama", "phi3", "qwen2"]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")


def main(root, families):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    failures = []
    for family in families:
        d = os.path.join(root, family)
        with open(os.path.join(d, "reference.json"), encoding="utf-8") as f:
            prompt = torch.tensor([json.load(f)["prompts"][0]])
        base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        base_sd = {k: v.clone() for k, v in base.state_dict().items()}
        peft = PeftModel.from_pretrained(base, os.path.join(d, "peft_adapter")).eval()
        with torch.no_grad():
            want = peft(prompt, use_cache=False).logits[0]
        adapter = load_file(os.path.join(d, "peft_adapter", "adapter_model.safetensors"))
        with open(os.path.join(d, "peft_adapter", "adapter_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        scale = cfg["lora_alpha"] / cfg["r"]
        merged = peft.merge_and_unload().eval()
        with torch.no_grad():
            got = merged(prompt, use_cache=False).logits[0]
        d_logits = float((got - want).abs().max())
        out, d_weights = {}, 0.0
        for name, t in merged.state_dict().items():
            parts = name.split(".")
            if len(parts) < 5 or parts[-2] not in PROJ:
                continue
            out[name] = t.float().contiguous()
            if name.endswith(".weight"):
                stem = "base_model.model." + name[: -len(".weight")]
                a, b = adapter[stem + ".lora_A.weight"].double(), adapter[stem + ".lora_B.weight"].double()
                expect = base_sd[name].double() + scale * (b @ a)
                d_weights = max(d_weights, float((t.double() - expect).abs().max()))
        about = {
            "generator": "scripts/reference/peft_merge.py",
            "versions": {p: version(p) for p in ("torch", "transformers", "peft", "safetensors")},
            "tensors": "PeftModel.from_pretrained(base, peft_adapter).merge_and_unload() projections, f32",
        }
        save_file(out, os.path.join(d, "peft_merged.safetensors"), metadata={"about": json.dumps(about)})
        ok = d_logits <= 1e-4 and d_weights <= 1e-6
        print(f"{family}: {len(out)} tensors, merged vs PeftModel logits {d_logits:.2e}, "
              f"weights vs base + scale·B·A {d_weights:.2e} {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(family)
    if failures:
        sys.exit(f"failed: {failures}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or FAMILIES)
