#!/usr/bin/env python3
"""Tiny random Mixture-of-Experts models (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, DeepSeek-V3) as HF dirs, llama.cpp GGUFs,
transformers logits and router choices.

Fixtures for graft-core's MoE parity tests, made like families.py's dense ones (same pinned
versions, same llama.cpp converter from the llama-cpp-python sdist, same tokenizers and prompts):

    /tmp/refenv/bin/python scripts/reference/moe.py \\
        /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz core/tests/fixtures/families [family ...]

(with family names after the directory, only those are written). A family's directory is
rewritten whole: its PEFT fixtures go too, so rerun graft's `moe::a_graft` test with
GRAFT_WRITE_FIXTURES=1 and then moe_peft.py for it.

Each model: hidden 64, 4 heads, 2 KV heads, head_dim 16, vocab 512, 2 layers, 8 routed experts of
intermediate 32, 2 active per token. Family features, each shown to change the logits in
reference.json's feature_checks:
  mixtral    softmax over all experts, top-2, the two weights renormalized (always, in Mixtral);
             SentencePiece tokenizer (Mistral's); GGUF architecture `llama` with q/k rows permuted
  qwen3_moe  per-head q/k RMSNorm, norm_topk_prob = true (renormalized top-k)
  olmoe      q/k RMSNorm over the whole projection, norm_topk_prob = false (the top-k softmax
             probabilities used as they are); rms_norm_eps 1e-5, which llama.cpp's converter
             writes for every olmoe model
  qwen2_moe  q/k/v biases N(0, 0.5), norm_topk_prob = false, and a shared expert (intermediate 48)
             every token runs, scaled by sigmoid(shared_expert_gate · x); GGUF `_shexp` tensors
  gpt_oss    biases on q/k/v/o, the router and the experts; attention sinks (one learned logit per
             head in each softmax); sliding window 8 on even layers (GPT-OSS: 128), full on odd;
             YaRN (factor 4 over 16, truncate false); the clamped SwiGLU (alpha 1.702, limit 7, `(up + 1)`;
             gate/up weights N(0, 0.6) so that the limit bites); gate and up interleaved in transformers'
             3-D gate_up_proj [E, hidden, 2I]; softmax over the top-k router logits; and
             model_mxfp4.gguf, its experts in MXFP4 (p{i}.logits_mxfp4 from transformers with them);
             the harmony chat template in tokenizer_config.json (and so the GGUF), with
             chat_template.json: conversations as transformers renders them
  deepseek_v3  3 layers, the first dense (first_k_dense_replace = 1); Multi-head Latent Attention
             (q_lora_rank 48 with its norm, kv_lora_rank 32 with its norm, qk_nope 16 + qk_rope 8
             per head, v_head_dim 16, interleaved rope); sigmoid router scores plus a random
             e_score_correction_bias N(0, 0.3) choose top-2 of 8 experts within the best 2 of 4
             groups, weights renormalized and scaled by routed_scaling_factor 2.5; one ungated
             shared expert; GGUF architecture `deepseek2`, kv_b_proj split into attn_k_b / attn_v_b;
             reference.safetensors also holds p{i}.logits_yarn, the logits with DeepSeek-V3's kind
             of YaRN rope parameters (reference.json's "yarn")

transformers 5 keeps routed experts as 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]) but save_pretrained writes them back per expert as the hub's
checkpoints have them (Mixtral `block_sparse_moe.experts.{e}.w1/w2/w3`, Qwen3-MoE and OLMoE
`mlp.experts.{e}.gate_proj/up_proj/down_proj`); llama.cpp's converter stacks them into 3-D
`ffn_{gate,up,down}_exps` tensors.

Writes, per family, core/tests/fixtures/families/<family>/: config.json, generation_config.json,
model.safetensors, tokenizer files, model.gguf (--outtype f32), reference.json (prompts, versions,
feature checks, GGUF metadata of the MoE keys and the layer-0 tensor names and shapes) and
reference.safetensors: `p{i}.logits` f32 [len, vocab] and `p{i}.experts{l}` i32 [len, top_k], the
experts transformers' router picks for each token at layer l, in its order (descending weight).
"""
import json
import os
import shutil
import sys
import tempfile
from importlib.metadata import version

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families as F  # noqa: E402  (sets the env, seeds and thread count as for the dense fixtures)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TOKENIZER = {"mixtral": "mistral", "qwen3_moe": "qwen3", "olmoe": "olmo2", "qwen2_moe": "qwen2",
             "deepseek_v3": "qwen2", "gpt_oss": "qwen2"}
MOE = dict(num_hidden_layers=2, head_dim=16, tie_word_embeddings=False)


def moe_configs():
    from transformers import (DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig,
                              Qwen3MoeConfig)

    return {
        "mixtral": (MixtralConfig, dict(
            MOE, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
            sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        "qwen3_moe": (Qwen3MoeConfig, dict(
            MOE, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        "olmoe": (OlmoeConfig, dict(
            MOE, intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
            # OLMoE's own epsilon: llama.cpp's converter writes 1e-5 for olmoe whatever the config says
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
        "qwen2_moe": (Qwen2MoeConfig, dict(
            MOE, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
            mlp_only_layers=[], use_sliding_window=False, qkv_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        "deepseek_v3": (DeepseekV3Config, dict(
            num_hidden_layers=3, tie_word_embeddings=False, num_key_value_heads=4,
            intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True, num_mtp_layers=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
        "gpt_oss": (GptOssConfig, dict(
            MOE, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], attention_bias=True,
            # GPT-OSS's own (llama.cpp hard-codes them for gpt-oss files); the experts' gate/up
            # weights are drawn wide enough (build_model) that the limit bites
            swiglu_alpha=1.702, swiglu_limit=7.0,
            # GPT-OSS's YaRN (factor 32 over 4096 there), shrunk to the tiny prompts
            rope_parameters={"rope_type": "yarn", "rope_theta": 1.5e5, "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})),
    }


STD = 0.15
# DeepSeek-V3's own YaRN settings (factor 40 over 4096 there), shrunk to the tiny prompts.
YARN = {"deepseek_v3": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                        "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                        "mscale": 1.0, "mscale_all_dim": 1.0}}
SEEDS = {"mixtral": 100, "qwen3_moe": 101, "olmoe": 102, "qwen2_moe": 103, "deepseek_v3": 104, "gpt_oss": 105}


def build_model(family, special_ids, seed):
    from transformers import AutoModelForCausalLM

    cls, kw = moe_configs()[family]
    cfg = dict(F.COMMON, **special_ids) | kw
    cfg["initializer_range"] = STD
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**cfg), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif name.endswith("mlp.gate.weight"):
                # A router with logits of O(1): the choices are clear-cut (no near ties), and
                # each token's weights still differ.
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith("experts.gate_up_proj"):
                # GPT-OSS: pre-activations of a few units, often past the SwiGLU limit of 7
                p.copy_(torch.randn_like(p) * 0.6)
            elif p.dim() in (2, 3):
                p.copy_(torch.randn_like(p) * STD)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # DeepSeek-V3's router bias: it shifts the choice, not the weights
                b.copy_(torch.randn_like(b) * 0.3)
    return model.eval()


def grouped_choices(model, ids):
    """DeepSeek-V3: per sparse layer, the experts transformers' router picks for each token (its
    own top-k, read by a hook), by descending weight; asserts that no choice is a near tie, in
    the group scores or among the chosen groups' experts."""
    k, picks, hooks = model.config.num_experts_per_tok, [], []
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue

        def hook(g, args, out):
            logits, weights, idx = out
            scores = logits.float().sigmoid() + g.e_score_correction_bias
            groups = scores.view(-1, g.num_group, g.num_experts // g.num_group).topk(2, dim=-1)[0].sum(-1)
            ranked = torch.sort(groups, dim=-1, descending=True).values
            gap = (ranked[:, g.topk_group - 1] - ranked[:, g.topk_group]).min()
            assert gap > 1e-4, ("near tie between groups", float(gap))
            chosen = torch.sort(scores.gather(1, idx), dim=-1, descending=True).values[:, -1]
            others = scores.scatter(1, idx, float("-inf"))
            mask = torch.zeros_like(groups).scatter(1, torch.topk(groups, g.topk_group, dim=-1)[1], 1)
            others = others.masked_fill(mask.repeat_interleave(g.num_experts // g.num_group, 1) == 0,
                                        float("-inf"))
            gap = (chosen - others.max(-1).values).min()
            assert gap > 1e-4, ("near tie in the router", float(gap))
            order = torch.argsort(weights, dim=-1, descending=True, stable=True)
            picks.append(idx.gather(1, order).to(torch.int32))

        hooks.append(gate.register_forward_hook(hook))
    try:
        out = model(torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert all(p.shape[1] == k for p in picks)
    return out.logits[0].float(), picks


def forward(model, prompts):
    """Logits and, per layer, the experts chosen for each token (transformers' own router)."""
    logits, experts = [], []
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        for ids in prompts:
            if model.config.model_type == "deepseek_v3":
                x, picks = grouped_choices(model, ids)
                logits.append(x)
                experts.append(picks)
                continue
            out = model(torch.tensor([ids]), use_cache=False, output_router_logits=True)
            logits.append(out.logits[0].float())
            per_layer = []
            for r in out.router_logits:
                probs = torch.softmax(r.float(), dim=-1)
                top = torch.topk(probs, k, dim=-1)
                # No near-ties: graft must make the same choice in f32. Measured on the router's
                # logits (the order of the probabilities), as tiny probabilities differ by tiny
                # amounts however clear their order.
                ranked = torch.sort(r.float(), dim=-1, descending=True).values
                gap = (ranked[:, k - 1] - ranked[:, k]).min()
                assert gap > 1e-3, ("near tie in the router", float(gap))
                per_layer.append(top.indices.to(torch.int32))
            experts.append(per_layer)
    return logits, experts


def feature_checks(family, model, prompts, ref):
    checks = {}
    c = model.config
    if family == "deepseek_v3":
        checks["score_bias_zero"] = F.variant(model, prompts, state_fn=lambda sd: {
            k: torch.zeros_like(v) if k.endswith("e_score_correction_bias") else v for k, v in sd.items()})
        checks["routed_scaling_1"] = F.variant(model, prompts, {"routed_scaling_factor": 1.0})
        checks["all_groups"] = F.variant(model, prompts, {"topk_group": c.n_group})
        checks["rope_not_interleaved"] = F.variant(model, prompts, {"rope_interleave": False})
        checks["shared_experts_zero"] = F.variant(model, prompts, state_fn=lambda sd: {
            k: torch.zeros_like(v) if ".shared_experts.down_proj" in k else v for k, v in sd.items()})
    if family == "gpt_oss":
        checks["sinks_off"] = F.variant(model, prompts, state_fn=lambda sd: {
            k: torch.full_like(v, -1e4) if k.endswith(".sinks") else v for k, v in sd.items()})
        checks["sliding_window_off"] = F.variant(model, prompts, {"layer_types": ["full_attention"] * 2})
        checks["swiglu_limit_off"] = F.variant(model, prompts, {"swiglu_limit": 1e4})
        checks["yarn_off"] = F.variant(model, prompts, {"rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 1.5e5}})
        checks["biases_zero"] = F.variant(model, prompts, state_fn=lambda sd: {
            k: torch.zeros_like(v) if k.endswith("bias") else v for k, v in sd.items()})
    if family in ("qwen3_moe", "olmoe", "deepseek_v3"):
        checks["norm_topk_prob_flipped"] = F.variant(model, prompts, {"norm_topk_prob": not c.norm_topk_prob})
    checks["top_k_1"] = F.variant(model, prompts, {"num_experts_per_tok": 1})
    if family == "qwen2_moe":
        checks["qkv_bias_zero"] = F.variant(model, prompts, state_fn=lambda sd: {
            k: torch.zeros_like(v) if k.endswith("_proj.bias") else v for k, v in sd.items()})
        checks["shared_expert_zero"] = F.variant(model, prompts, state_fn=lambda sd: {
            k: torch.zeros_like(v) if ".shared_expert.down_proj" in k else v for k, v in sd.items()})
        # sigmoid(0) = 1/2 for every token in place of the gate's own value
        checks["shared_expert_gate_zero"] = F.variant(model, prompts, state_fn=lambda sd: {
            k: torch.zeros_like(v) if "shared_expert_gate" in k else v for k, v in sd.items()})
    checks["qk_norm_neutral" if family in ("qwen3_moe", "olmoe") else "norm_weights_neutral"] = F.variant(
        model, prompts, state_fn=lambda sd: {k: torch.ones_like(v) if "norm" in k else v for k, v in sd.items()})
    return {name: [round(float((x - y).abs().max()), 4) for x, y in zip(logits, ref)]
            for name, logits in checks.items()}


def gguf_summary(path):
    meta, tensors = F.gguf_contents(path)
    keys = {k: F.fmt_value(v[1]) for k, v in meta.items()
            if any(s in k for s in ("expert", "architecture", "block_count", "feed_forward", "head_count",
                                    "rope", "embedding_length", "norm"))}
    layer0 = {n: f"{t} {shape}" for n, (t, shape, _) in tensors.items() if n.startswith("blk.0.")}
    return keys, layer0, tensors


def check_gguf_experts(model_dir, tensors, family, n_layers, n_experts):
    """The GGUF's 3-D expert tensors are the saved per-expert weights stacked (exact)."""
    from safetensors.numpy import load_file

    st = load_file(os.path.join(model_dir, "model.safetensors"))
    if family == "gpt_oss":
        # transformers keeps GPT-OSS's experts 3-D as x @ W ([E, in, out]), gate and up
        # interleaved in gate_up_proj's columns; the converter transposes and splits them.
        for layer in range(n_layers):
            pre = f"model.layers.{layer}.mlp.experts."
            gu, down = st[pre + "gate_up_proj"].transpose(0, 2, 1), st[pre + "down_proj"].transpose(0, 2, 1)
            gub = st[pre + "gate_up_proj_bias"]
            for g, want in (("ffn_gate_exps.weight", gu[:, 0::2]), ("ffn_up_exps.weight", gu[:, 1::2]),
                            ("ffn_down_exps.weight", down), ("ffn_gate_exps.bias", gub[:, 0::2]),
                            ("ffn_up_exps.bias", gub[:, 1::2]),
                            ("ffn_down_exps.bias", st[pre + "down_proj_bias"])):
                got = tensors[f"blk.{layer}.{g}"][2].reshape(want.shape)
                assert np.array_equal(got, want), (family, layer, g)
        return ("ffn_{gate,up}_exps = gate_up_proj transposed, even / odd rows; ffn_down_exps = down_proj "
                "transposed; biases split likewise (exact)")
    names = {"mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                         "block_sparse_moe.experts.{e}.w2")}.get(
        family, ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"))
    for layer in range(n_layers):
        if f"model.layers.{layer}.{names[0].format(e=0)}.weight" not in st:
            continue  # a dense layer (DeepSeek-V3's first_k_dense_replace)
        for g, hf in zip(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), names):
            stacked = np.stack([st[f"model.layers.{layer}.{hf.format(e=e)}.weight"] for e in range(n_experts)])
            got = tensors[f"blk.{layer}.{g}.weight"][2].reshape(stacked.shape)
            assert np.array_equal(got, stacked), (family, layer, g)
    return "ffn_{gate,up,down}_exps = the per-expert weights stacked along a new first axis (exact)"


def mxfp4_experts(d, model, prompts):
    """GPT-OSS as its released weights are: model.gguf with every expert weight re-encoded as
    MXFP4 by gguf-py (model_mxfp4.gguf, all else copied), and transformers' logits with the
    experts set to those MXFP4 values."""
    import copy

    import gguf
    from gguf.quants import dequantize, quantize

    Q = gguf.GGMLQuantizationType
    r = gguf.GGUFReader(os.path.join(d, "model.gguf"))
    w = gguf.GGUFWriter(os.path.join(d, "model_mxfp4.gguf"), arch=r.fields["general.architecture"].contents())
    for field in r.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vt = field.types[0]
        w.add_key_value(field.name, field.contents(), vt,
                        sub_type=field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    deq = {}
    for t in r.tensors:
        data = np.array(t.data)
        if t.name.endswith("_exps.weight"):
            q = quantize(data.astype(np.float32), Q.MXFP4)
            deq[t.name] = dequantize(q, Q.MXFP4).reshape(data.shape)
            w.add_tensor(t.name, q, raw_dtype=Q.MXFP4)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            x = layer.mlp.experts
            t = lambda n: torch.from_numpy(deq[f"blk.{i}.ffn_{n}_exps.weight"]).transpose(1, 2)  # noqa: E731
            x.gate_up_proj[:, :, 0::2] = t("gate")
            x.gate_up_proj[:, :, 1::2] = t("up")
            x.down_proj.copy_(t("down"))
    return forward(m, prompts)[0]


def harmony(d):
    """GPT-OSS's harmony chat template (the one TRL ships as GPT-OSS's own,
    trl/chat_templates/gptoss.jinja) in the tiny model's tokenizer_config.json, so that its GGUF
    carries it too; returns the conversations transformers renders with it (default kwargs:
    reasoning medium, ChatGPT's identity, today's date, which chat_template.json records)."""
    import datetime

    import trl
    from transformers import AutoTokenizer

    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "gptoss.jinja"), encoding="utf-8") as f:
        template = f.read()
    path = os.path.join(d, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["chat_template"] = template
    F.write_json(path, cfg)
    tok = AutoTokenizer.from_pretrained(d)
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
    ask = {"role": "user", "content": "What's the weather in Paris?"}
    called = [ask, {"role": "assistant", "thinking": "I should look it up.", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                     "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": "{\"temperature\": 18}"}]
    conversations = [
        ([{"role": "user", "content": "Hello!"}], None),
        ([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}], None),
        ([{"role": "developer", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}],
         None),
        ([{"role": "user", "content": "2+2?"},
          {"role": "assistant", "thinking": "Two and two make four.", "content": "4"},
          {"role": "user", "content": "And 3+3?"}], None),
        ([ask], [weather]),
        (called, [weather]),
        (called + [{"role": "assistant", "content": "It is 18 °C in Paris."}], [weather]),
    ]
    date = datetime.date.today().isoformat()
    cases = []
    for messages, tools in conversations:
        for add_generation_prompt in (True, False):
            rendered = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
            assert f"Current date: {date}" in rendered
            case = {"messages": messages, "add_generation_prompt": add_generation_prompt, "rendered": rendered}
            if tools is not None:
                case["tools"] = tools
            cases.append(case)
    F.write_json(os.path.join(d, "chat_template.json"), {
        "generator": "scripts/reference/moe.py", "template": "trl/chat_templates/gptoss.jinja (trl "
        f"{version('trl')}), in tokenizer_config.json", "date": date, "cases": cases})


def moe_fixture(family, seed, root, out_root):
    d = os.path.join(out_root, family)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    tok = TOKENIZER[family]
    special_ids = F.bpe_tokenizer(tok, d) if tok in F.BPE else F.spm_tokenizer(tok, d)
    model = build_model(family, special_ids, seed)
    model.save_pretrained(d)
    if family == "gpt_oss":
        harmony(d)
    if family == "deepseek_v3":
        # As DeepSeek-V3's own config.json says (transformers' config has no key for it): without
        # scoring_func, llama.cpp's converter writes no expert_gating_func and llama.cpp then
        # falls back to softmax for deepseek2 files.
        path = os.path.join(d, "config.json")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg.update(scoring_func="sigmoid", topk_method="noaux_tc")
        F.write_json(path, cfg)
    pre = F.BPE[tok][1] if tok in F.BPE else "-"
    F.convert(root, d, os.path.join(d, "model.gguf"), pre)

    g = np.random.default_rng(seed)
    prompts = [g.integers(0, F.VOCAB, n).tolist() for n in F.PROMPT_LENGTHS]
    ref, experts = forward(model, prompts)
    tensors = {f"p{i}.logits": x.contiguous() for i, x in enumerate(ref)}
    for i, per_layer in enumerate(experts):
        for layer, e in enumerate(per_layer):
            tensors[f"p{i}.experts{layer}"] = e.contiguous()
    yarn = YARN.get(family)
    if yarn:
        # The same weights with DeepSeek-V3's kind of YaRN rope (mscale_all_dim scales the
        # attention scores too): graft loads config.json with these rope_parameters.
        for i, x in enumerate(F.variant(model, prompts, {"rope_parameters": yarn})):
            assert float((x - ref[i]).abs().max()) > 1e-2, "YaRN changes the logits"
            tensors[f"p{i}.logits_yarn"] = x.contiguous()
    if family == "gpt_oss":
        for i, x in enumerate(mxfp4_experts(d, model, prompts)):
            assert float((x - ref[i]).abs().max()) > 1e-3, "MXFP4 rounding shows in the logits"
            tensors[f"p{i}.logits_mxfp4"] = x.contiguous()
    save_file(tensors, os.path.join(d, "reference.safetensors"))
    stds = [round(float(x.std()), 3) for x in ref]
    assert min(stds) >= 0.5, (family, stds)
    used = sorted({int(e) for per_layer in experts for t in per_layer for e in t.flatten()})
    assert len(used) == 8, ("every expert is chosen somewhere", used)
    checks = feature_checks(family, model, prompts, ref)
    for name, deltas in checks.items():
        assert max(deltas) > 1e-2, (family, name, deltas)

    keys, layer0, gt = gguf_summary(os.path.join(d, "model.gguf"))
    c = model.config
    stacked = check_gguf_experts(d, gt, family, c.num_hidden_layers, 8)
    verify = F.check_transformers_gguf(d, prompts, ref)
    F.write_json(os.path.join(d, "reference.json"), {
        "family": family,
        "generator": "scripts/reference/moe.py",
        "versions": {p: version(p) for p in ("torch", "transformers", "tokenizers", "sentencepiece",
                                             "safetensors", "numpy", "gguf")}
                    | {"llama-cpp-python (convert_hf_to_gguf.py)": F.LLAMA_CPP_PYTHON},
        "seed": seed,
        "dtype": "float32",
        "prompts": prompts,
        "logits": "reference.safetensors p{i}.logits[pos, :] = transformers logits (eval, eager attention, "
                  "use_cache=False, one forward of the whole prompt, no BOS added)",
        "experts": "reference.safetensors p{i}.experts{layer}[pos, :] = the top-k experts of transformers' "
                   "router for that token, by descending weight",
        **({"mxfp4": "model_mxfp4.gguf = model.gguf with ffn_{gate,up,down}_exps.weight re-encoded as MXFP4 "
                     "by gguf-py's quantize; reference.safetensors p{i}.logits_mxfp4 = transformers' logits "
                     "with the experts set to those MXFP4 values"} if family == "gpt_oss" else {}),
        **({"yarn": {"rope_parameters": YARN[family],
                     "logits": "reference.safetensors p{i}.logits_yarn = the logits with config.json's "
                               "rope_parameters replaced by these"}} if family in YARN else {}),
        "config_notes": {
            "architecture": type(model).__name__,
            "init": f"linear/embedding/expert weights N(0, {STD}), router N(0, 0.5), norm weights N(1, 0.3), "
                    "biases N(0, 0.5)",
            "logits_std": stds,
            "saved_expert_keys": sorted({k.split(".experts.")[1].split(".", 1)[-1]
                                         for k in _saved_keys(d) if ".experts." in k}),
        },
        "feature_checks": {"meaning": "max |d logits| per prompt when the feature is changed", **checks},
        "gguf": {"metadata": keys, "layer0_tensors": layer0, "experts": stacked},
        "gguf_checks": verify,
    })
    print(f"{family}: logits std {stds}; transformers GGUF {verify}; checks {checks}")


def _saved_keys(d):
    from safetensors import safe_open

    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        return list(f.keys())


def main():
    if len(sys.argv) < 2 or any(f not in moe_configs() for f in sys.argv[3:]):
        sys.exit(__doc__)
    out_root = sys.argv[2] if len(sys.argv) >= 3 else "core/tests/fixtures/families"
    only = sys.argv[3:]
    os.makedirs(out_root, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = F.llama_cpp_root(sys.argv[1], tmp)
        for family, seed in SEEDS.items():
            if not only or family in only:
                moe_fixture(family, seed, root, out_root)


if __name__ == "__main__":
    main()
