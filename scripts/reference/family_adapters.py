#!/usr/bin/env python3
"""HF PEFT LoRA adapters and PeftModel logits for the tiny family fixtures (see families.py).

Run on CPU with the versions pinned in requirements.txt, after families.py has written the family
directories (no network):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install -r scripts/reference/requirements.txt
    /tmp/refenv/bin/python scripts/reference/family_adapters.py core/tests/fixtures/families [FAMILY...]

For each family (llama mistral qwen2 qwen3 gemma2 gemma3 phi3 olmo2, or those named) it loads
<family>/ with transformers (f32, eager attention), wraps it with PEFT's get_peft_model
(LoraConfig r=4, lora_alpha=8, target_modules="all-linear", i.e. every linear layer but lm_head:
q/k/v/o/gate/up/down, or phi3's fused qkv_proj/o_proj/gate_up_proj/down_proj) and replaces every
lora_A and lora_B with N(0, 0.1²) values (torch.manual_seed per family), so that the adapter
changes the logits clearly. Writes, per family, into core/tests/fixtures/families/<family>/:

  peft_adapter/adapter_config.json, adapter_model.safetensors
                          save_pretrained of the adapter (safetensors; PEFT's README.md removed;
                          target_modules sorted so that the file does not depend on hash order).
                          PEFT expands "all-linear" to full module paths
                          ("model.layers.0.self_attn.q_proj", ...) and shortens them to bare names
                          ("q_proj") only from 20 matches up, i.e. here for gemma3 (6 layers) only
  peft_reference.safetensors
                          `p{i}.logits` f32 [len, vocab]: PeftModel logits (eval, use_cache=False,
                          one forward of the whole prompt) for reference.json's prompts[i]; the
                          base model's logits are reference.safetensors' `p{i}.logits`; header
                          metadata `about`: generator, versions, adapter, meaning of the logits

Checks, printed per family (the script exits non-zero if one fails, after writing everything):
  - the base model (adapter disabled) reproduces reference.safetensors exactly;
  - the adapter moves the logits by more than 0.1 on every prompt;
  - an adapter written the way graft writes one (adapter_config.json with only peft_type, r,
    lora_alpha, lora_dropout, target_modules as short module names, base_model_name_or_path, bias,
    task_type, use_rslora, fan_in_fan_out; tensors
    `base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_{A|B}.weight`, names built from
    the config, not copied from PEFT's file) has the same tensor names as PEFT's, loads into a
    PeftModel with no missing or unexpected keys, and gives the same logits.

Everything is seeded, so a rerun with the same versions rewrites identical files.
"""
import json
import os
import re
import sys
import tempfile
import warnings
from importlib.metadata import version

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"]
SEED_BASE = 1000  # family k (index in FAMILIES) uses torch.manual_seed(SEED_BASE + k)
RANK, ALPHA, INIT_STD = 4, 8, 0.1
MIN_EFFECT = 0.1  # the adapter must move some logit of every prompt by more than this
ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"), ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def load_base(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


def logits(model, prompts):
    with torch.no_grad():
        return [model(torch.tensor([ids]), use_cache=False).logits[0].float().contiguous() for ids in prompts]


def max_diff(xs, ys):
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


def graft_targets(config):
    """The HF module names graft targets for "all projections" of this architecture."""
    if config.model_type == "phi3":
        return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_graft_style(peft_dir, out_dir, config, family):
    """Rewrites PEFT's adapter as graft writes it; returns the tensor names PEFT has and graft lacks,
    and those graft has and PEFT lacks."""
    targets = graft_targets(config)
    names = {f"base_model.model.model.layers.{i}.{'self_attn' if t in ATTN else 'mlp'}.{t}.lora_{ab}.weight"
             for i in range(config.num_hidden_layers) for t in targets for ab in "AB"}
    peft = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    only_peft, only_graft = sorted(set(peft) - names), sorted(names - set(peft))
    tensors = {}
    for key, t in peft.items():
        m = PEFT_KEY.match(key)
        if m is None:
            continue  # reported in only_peft
        layer, section, name, ab = m.groups()
        tensors[f"base_model.model.model.layers.{layer}.{section}.{name}.lora_{ab}.weight"] = t.float().contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": targets,
        "base_model_name_or_path": f"core/tests/fixtures/families/{family}", "bias": "none",
        "task_type": "CAUSAL_LM", "use_rslora": False, "fan_in_fan_out": False,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return only_peft, only_graft


def make_family(root, family, seed):
    from peft import LoraConfig, PeftModel, get_peft_model

    d = os.path.join(root, family)
    with open(os.path.join(d, "reference.json"), encoding="utf-8") as f:
        prompts = json.load(f)["prompts"]
    ref = load_file(os.path.join(d, "reference.safetensors"))
    base_ref = [ref[f"p{i}.logits"] for i in range(len(prompts))]
    failures = []

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                        init_lora_weights=True, task_type="CAUSAL_LM")
    model = get_peft_model(load_base(d), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.normal_(0.0, INIT_STD)
    cfg = model.peft_config["default"]
    cfg.base_model_name_or_path = f"core/tests/fixtures/families/{family}"
    cfg.target_modules = sorted(cfg.target_modules)  # PEFT's set would be saved in hash order
    adapter_dir = os.path.join(d, "peft_adapter")
    model.save_pretrained(adapter_dir, safe_serialization=True)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)  # the model card adds nothing to the fixture

    lora = logits(model, prompts)
    with model.disable_adapter():
        plain = logits(model, prompts)
    save_file({f"p{i}.logits": x for i, x in enumerate(lora)}, os.path.join(d, "peft_reference.safetensors"),
              # one key: safetensors writes the metadata map in hash order
              metadata={"about": json.dumps({
                  "generator": "scripts/reference/family_adapters.py",
                  "versions": {p: version(p) for p in ("torch", "transformers", "peft", "safetensors")},
                  "adapter": f"peft_adapter/ (r={RANK}, lora_alpha={ALPHA}, all-linear, A and B "
                             f"~ N(0, {INIT_STD}^2), torch.manual_seed({seed}))",
                  "logits": "p{i}.logits[pos, :] = PeftModel logits (f32, eval, eager attention, "
                            "use_cache=False) on reference.json prompts[i]"})})

    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    layer0 = [f"{m.group(2)}.{m.group(3)}.lora_{m.group(4)} {list(t.shape)}"
              for k, t in saved.items() if (m := PEFT_KEY.match(k)) and m.group(1) == "0"]
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        saved_cfg = json.load(f)
    print(f"== {family} ({type(model.base_model.model).__name__}, seed {seed}): "
          f"{len(saved)} tensors, r={saved_cfg['r']}, lora_alpha={saved_cfg['lora_alpha']}, "
          f"target_modules={saved_cfg['target_modules']}")
    print("   layer 0: " + ", ".join(sorted(layer0)))
    d_base = max_diff(plain, base_ref)
    effects = [float((x - y).abs().max()) for x, y in zip(lora, plain)]
    print(f"   base (adapter disabled) vs reference.safetensors: max |Δ| = {d_base:.3g}")
    print("   adapter effect max |Δ| per prompt: " + ", ".join(f"{e:.3f}" for e in effects))
    if d_base != 0.0:
        failures.append(f"base logits differ from reference.safetensors by {d_base}")
    if min(effects) <= MIN_EFFECT:
        failures.append(f"adapter effect {min(effects)} is not above {MIN_EFFECT}")

    # The saved PEFT adapter and a graft-style one, each loaded by PeftModel into a fresh base.
    with tempfile.TemporaryDirectory() as tmp:
        only_peft, only_graft = write_graft_style(adapter_dir, tmp, model.base_model.model.config, family)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reloaded = PeftModel.from_pretrained(load_base(d), adapter_dir).eval()
            d_reload = max_diff(logits(reloaded, prompts), lora)
            result = reloaded.load_adapter(tmp, adapter_name="graft")
            reloaded.set_adapter("graft")
            d_graft = max_diff(logits(reloaded, prompts), lora)
        load_warnings = [str(w.message) for w in caught if "adapter" in str(w.message).lower()]
    print(f"   PeftModel.from_pretrained(peft_adapter) vs saved logits: max |Δ| = {d_reload:.3g}")
    print(f"   graft-style adapter: names only in PEFT's file {only_peft}, only in graft's {only_graft}; "
          f"missing keys {list(result.missing_keys)}, unexpected keys {list(result.unexpected_keys)}; "
          f"logits vs PEFT's: max |Δ| = {d_graft:.3g}")
    for w in load_warnings:
        print(f"   warning while loading: {w}")
    if d_reload != 0.0:
        failures.append(f"reloaded PEFT adapter differs by {d_reload}")
    if only_peft or only_graft or result.missing_keys or result.unexpected_keys or d_graft != 0.0:
        failures.append("graft-style adapter does not match PEFT's")
    return failures


def main():
    if len(sys.argv) < 2 or any(f not in FAMILIES for f in sys.argv[2:]):
        sys.exit(__doc__)
    root = sys.argv[1]
    failed = {}
    for family in sys.argv[2:] or FAMILIES:
        failures = make_family(root, family, SEED_BASE + FAMILIES.index(family))
        if failures:
            failed[family] = failures
    for family, failures in failed.items():
        print(f"FAILED {family}: " + "; ".join(failures))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
