"""PEFT's side of the training comparison: the workload `graft-train bench` recorded.

Runs in a Python environment with torch, transformers and peft (scripts/reference/requirements.txt
pins the versions graft is checked against). It reads the run's `bench-inputs.json` (every step's
micro-batches as token ids and loss masks) and starts from the run's `init-adapter/`, so both
trainers take the same steps from the same adapter: plain LoRA on the f32 base (PEFT + torch on
the CPU), AdamW, gradient clipping, loss = summed cross-entropy over the trained tokens of a step
divided by their count. Examples of different lengths (the chat bench) are right-padded per
micro-batch with an attention mask; tokens/s counts the real tokens. Prints one JSON line:
tokens/s, seconds per step split into forward, backward and optimizer, peak RSS, and the loss
of every step.

    python scripts/bench/peft_train.py --run runs/bench/<run> --model <HF dir> [--threads 2]

On a GPU (`--device cuda`), `--qlora` loads the base as bitsandbytes' NF4 with double
quantization (QLoRA) instead of f32, its products in `--compute-dtype` (float32, or bfloat16 as
graft's `train.compute_dtype = "bf16"`: bitsandbytes' bnb_4bit_compute_dtype; the rest of the
model and the adapter stay f32 on both sides); the JSON then also has the peak device memory
torch allocated. A run recorded with `train.gradient_checkpointing = true` runs with
transformers' gradient checkpointing (non-reentrant) too.
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a graft-train bench run directory")
    ap.add_argument("--model", required=True, help="the base model as an HF directory (f32)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="default: every recorded step")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--qlora", action="store_true", help="NF4 base with bitsandbytes (cuda only)")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bitsandbytes' compute dtype of the NF4 products (with --qlora)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="transformers' gradient checkpointing (default: as the run recorded)")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    if a.qlora and not cuda:
        raise SystemExit("--qlora needs --device cuda (bitsandbytes' 4-bit kernels)")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    inputs = json.load(open(f"{a.run}/bench-inputs.json"))
    s = inputs["settings"]
    if s["lora_dropout"] != 0.0:
        raise SystemExit("the comparison needs lora_dropout = 0 (dropout masks cannot match)")
    if a.qlora:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=getattr(torch, a.compute_dtype))
        base = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32,
                                                    quantization_config=quant, device_map={"": a.device})
    else:
        base = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).to(a.device)
    if a.gradient_checkpointing or s.get("gradient_checkpointing"):
        # graft's train.gradient_checkpointing: each decoder layer recomputed in the backward
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(base, f"{a.run}/init-adapter", is_trainable=True).to(a.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=s["learning_rate"],
        betas=tuple(s["betas"]),
        eps=s["epsilon"],
        weight_decay=s["weight_decay"],
    )
    if s["lr_scheduler"] != "constant" or (s["warmup_steps"] or 0) != 0:
        raise SystemExit("the comparison supports a constant learning rate without warm-up")
    steps = inputs["steps"][: a.steps] if a.steps else inputs["steps"]
    rec = []
    for step in steps:
        t_step = time.perf_counter()
        n_trained = sum(sum(e["trained"][1:]) for mb in step for e in mb)
        n_tokens = sum(len(e["ids"]) for mb in step for e in mb)
        fwd = bwd = 0.0
        loss_total = 0.0
        opt.zero_grad(set_to_none=True)
        for mb in step:
            # Examples of different lengths (chat) are right-padded with an attention mask: the
            # padding is never attended to nor trained, and causal attention keeps it out of the
            # real tokens' values. graft runs the same batch without padding.
            width = max(len(e["ids"]) for e in mb)
            pad = lambda xs, v: xs + [v] * (width - len(xs))
            ids = torch.tensor([pad(e["ids"], 0) for e in mb], device=a.device)
            trained = torch.tensor([pad(e["trained"], False) for e in mb], dtype=torch.bool, device=a.device)
            attention = torch.tensor([pad([1] * len(e["ids"]), 0) for e in mb], device=a.device)
            sync()
            t = time.perf_counter()
            logits = model(input_ids=ids, attention_mask=attention).logits
            target = ids[:, 1:].masked_fill(~trained[:, 1:], -100)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ) / max(n_trained, 1)
            sync()
            fwd += time.perf_counter() - t
            t = time.perf_counter()
            loss.backward()
            sync()
            bwd += time.perf_counter() - t
            loss_total += loss.item()
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
        opt.step()
        sync()
        opt_secs = time.perf_counter() - t
        secs = time.perf_counter() - t_step
        rec.append(dict(loss=loss_total, secs=secs, fwd=fwd, bwd=bwd, opt=opt_secs, tps=n_tokens / secs))
    timed = rec[1:] if len(rec) > 1 else rec
    med = lambda k: statistics.median(r[k] for r in timed)
    print(json.dumps({
        "tokens_per_sec": med("tps"),
        "tokens_per_sec_range": [min(r["tps"] for r in timed), max(r["tps"] for r in timed)],
        "step_secs": med("secs"), "forward_secs": med("fwd"), "backward_secs": med("bwd"),
        "optimizer_secs": med("opt"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "device": a.device, "qlora": a.qlora,
        "gradient_checkpointing": bool(a.gradient_checkpointing or s.get("gradient_checkpointing")),
        "losses": [r["loss"] for r in rec],
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                     "transformers": __import__("transformers").__version__},
    }))


if __name__ == "__main__":
    main()
