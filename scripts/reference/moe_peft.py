#!/usr/bin/env python3
"""PEFT LoRA on the routed experts of the tiny MoE fixtures, both ways (see moe.py).

Run on CPU with the versions pinned in requirements.txt, after moe.py has written the family
directories (no network):

    /tmp/refenv/bin/python scripts/reference/moe_peft.py core/tests/fixtures/families

For each of mixtral, qwen3_moe, olmoe and qwen2_moe (or those named after the directory):

1. PEFT -> graft. Wraps <family>/ with get_peft_model(LoraConfig(r=4, lora_alpha=8,
   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=["mlp.gate.weight",
   "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])), i.e. attention, the router and every
   expert's gate/up and down (PEFT's ParamWrapper on transformers 5's 3-D expert parameters), and
   on qwen2_moe also gate_proj, up_proj, down_proj (its shared expert's) and shared_expert_gate,
   on deepseek_v3 latent attention's q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj in
   place of q/k/v/o,
   replaces every lora_A / lora_B with N(0, 0.1^2) values (torch.manual_seed(2000 + k), k the
   family's index in that list) and writes

     <family>/peft_adapter/             save_pretrained (README.md removed, lists sorted)
     <family>/peft_reference.safetensors
                                        `p{i}.logits` f32 [len, vocab]: PeftModel logits (eval,
                                        use_cache=False) on reference.json's prompts[i]

   and checks that the adapter moves the logits, and that the experts' part alone does.

2. graft -> PEFT. If <family>/graft_adapter/ exists (written by graft's test
   `moe::a_graft_expert_adapter_is_the_file_peft_reads`, which checks that graft still writes
   these exact bytes), loads it with PeftModel.from_pretrained into a fresh base, checks that
   every tensor of the file was loaded (get_peft_model_state_dict equals the file: same keys,
   same values) and writes

     <family>/graft_adapter_peft.safetensors
                                        `p{i}.logits`: PeftModel logits with graft's adapter

Everything is seeded, so a rerun with the same versions rewrites identical files.
"""
import json
import os
import sys
from importlib.metadata import version

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from family_adapters import load_base, logits, max_diff  # noqa: E402  (f32, eager, one thread)

FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"]
SEED = 2000
RANK, ALPHA, INIT_STD = 4, 8, 0.1
TARGET_MODULES = ["k_proj", "o_proj", "q_proj", "v_proj"]
TARGET_PARAMETERS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]
# Latent attention's projections in place of q/k/v (DeepSeek-V3).
ATTENTION_MODULES = {"deepseek_v3": ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]}
# A shared expert's projections (a sparse layer's only gate_proj/up_proj/down_proj) and its gate.
# Not on deepseek_v3: PEFT 0.21.2 turns gate_proj/up_proj/down_proj there into the routed experts'
# parameters (its transformers v4 -> v5 conversion, with rank_pattern/alpha_pattern regexes), so
# neither its shared experts nor its dense first layer's MLP can be named.
SHARED_MODULES = {"qwen2_moe": ["down_proj", "gate_proj", "shared_expert_gate", "up_proj"]}
MIN_EFFECT = 0.1


def versions():
    return {p: version(p) for p in ("torch", "transformers", "peft", "safetensors")}


def peft_to_graft(d, family, seed, prompts, base_ref):
    from peft import LoraConfig, get_peft_model

    failures = []
    torch.manual_seed(seed)
    modules = sorted(ATTENTION_MODULES.get(family, TARGET_MODULES) + SHARED_MODULES.get(family, []))
    # GPT-OSS's router is `mlp.router`; its experts are [E, in, out] with gate/up interleaved
    params = [p.replace("mlp.gate.", "mlp.router.") if family == "gpt_oss" else p for p in TARGET_PARAMETERS]
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=modules,
                        target_parameters=params, task_type="CAUSAL_LM")
    model = get_peft_model(load_base(d), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.normal_(0.0, INIT_STD)
    cfg = model.peft_config["default"]
    cfg.base_model_name_or_path = f"core/tests/fixtures/families/{family}"
    cfg.target_modules = sorted(cfg.target_modules)
    cfg.target_parameters = sorted(cfg.target_parameters)
    out = os.path.join(d, "peft_adapter")
    model.save_pretrained(out, safe_serialization=True)
    readme = os.path.join(out, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    lora = logits(model, prompts)
    with model.disable_adapter():
        plain = logits(model, prompts)
    save_file({f"p{i}.logits": x for i, x in enumerate(lora)}, os.path.join(d, "peft_reference.safetensors"),
              metadata={"about": json.dumps({
                  "generator": "scripts/reference/moe_peft.py", "versions": versions(),
                  "adapter": f"peft_adapter/ (r={RANK}, lora_alpha={ALPHA}, target_modules={modules}, "
                             f"target_parameters={params}, A and B ~ N(0, {INIT_STD}^2), "
                             f"torch.manual_seed({seed}))",
                  "logits": "p{i}.logits[pos, :] = PeftModel logits (f32, eval, eager attention, "
                            "use_cache=False) on reference.json prompts[i]"})})
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    print(f"== {family} PEFT adapter: {len(saved)} tensors; layer 0:")
    for k in sorted(saved):
        if ".layers.0." in k:
            print(f"   {k} {list(saved[k].shape)}")
    d_base = max_diff(plain, base_ref)
    effect = min(float((x - y).abs().max()) for x, y in zip(lora, plain))
    print(f"   base (adapter disabled) vs reference.safetensors: max |Δ| = {d_base:.3g}")
    print(f"   adapter effect (smallest per-prompt max |Δ|): {effect:.3f}")
    if d_base != 0.0:
        failures.append(f"base logits differ from reference.safetensors by {d_base}")
    if effect <= MIN_EFFECT:
        failures.append(f"adapter effect {effect} is not above {MIN_EFFECT}")
    # The experts' share alone: zero every other lora_B.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name and ".experts." not in name:
                p.zero_()
    experts_only = min(float((x - y).abs().max()) for x, y in zip(logits(model, prompts), plain))
    print(f"   the experts' LoRA alone moves the logits by at least {experts_only:.3f}")
    if experts_only <= MIN_EFFECT:
        failures.append(f"the experts' LoRA moves the logits by {experts_only} only")
    return failures


def graft_to_peft(d, prompts):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    src = os.path.join(d, "graft_adapter")
    if not os.path.isdir(src):
        print("   no graft_adapter/: run graft's test to write it (GRAFT_WRITE_FIXTURES=1)")
        return []
    failures = []
    model = PeftModel.from_pretrained(load_base(d), src).eval()
    file = load_file(os.path.join(src, "adapter_model.safetensors"))
    state = get_peft_model_state_dict(model)
    missing, extra = sorted(set(file) - set(state)), sorted(set(state) - set(file))
    differ = sorted(k for k in set(file) & set(state) if not torch.equal(file[k], state[k].float()))
    print(f"== graft adapter loaded by PeftModel: {len(file)} tensors; not loaded {missing}, "
          f"not in the file {extra}, loaded with other values {differ}")
    if missing or extra or differ:
        failures.append("PEFT did not load graft's adapter as written")
    out = logits(model, prompts)
    save_file({f"p{i}.logits": x for i, x in enumerate(out)}, os.path.join(d, "graft_adapter_peft.safetensors"),
              metadata={"about": json.dumps({
                  "generator": "scripts/reference/moe_peft.py", "versions": versions(),
                  "logits": "p{i}.logits[pos, :] = logits of PeftModel.from_pretrained(base, graft_adapter/) "
                            "(f32, eval, eager attention, use_cache=False) on reference.json prompts[i]"})})
    with model.disable_adapter():
        plain = logits(model, prompts)
    effect = min(float((x - y).abs().max()) for x, y in zip(out, plain))
    print(f"   graft's adapter moves PEFT's logits by at least {effect:.3f}")
    if effect <= MIN_EFFECT:
        failures.append(f"graft's adapter moves the logits by {effect} only")
    return failures


def main():
    if len(sys.argv) < 2 or any(f not in FAMILIES for f in sys.argv[2:]):
        sys.exit(__doc__)
    failures = []
    for family in sys.argv[2:] or FAMILIES:
        d = os.path.join(sys.argv[1], family)
        with open(os.path.join(d, "reference.json"), encoding="utf-8") as f:
            prompts = json.load(f)["prompts"]
        ref = load_file(os.path.join(d, "reference.safetensors"))
        base_ref = [ref[f"p{i}.logits"] for i in range(len(prompts))]
        seed = SEED + FAMILIES.index(family)
        failures += [f"{family}: {x}" for x in
                     peft_to_graft(d, family, seed, prompts, base_ref) + graft_to_peft(d, prompts)]
    for f in failures:
        print(f"FAILED: {f}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
