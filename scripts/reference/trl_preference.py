#!/usr/bin/env python3
"""TRL's DPO and ORPO losses, metrics and LoRA gradients on a fixture batch: what graft's must equal.

Run on CPU with the versions pinned in requirements.txt (no network):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install -r scripts/reference/requirements.txt
    /tmp/refenv/bin/python scripts/reference/trl_preference.py core/tests/fixtures/families/llama train/tests/fixtures

The model is the tiny Llama fixture (transformers, f32) with its PEFT adapter (r=4, alpha 8, every
projection, B non-zero) loaded as the trainable policy; the reference of DPO is that model with the
adapter switched off, as TRL does for a PEFT model without ref_model. The batch is PAIRS below,
plain-text preference rows (explicit prompt), tokenized by TRL itself with the fixture's tokenizer.
For each case TRL's own trainer computes the loss of the one batch:

  dpo_sigmoid   DPOTrainer, loss_type sigmoid, beta 0.1   (compute_loss)
  dpo_ipo       DPOTrainer, loss_type ipo, beta 0.5        (compute_loss)
  orpo          ORPOTrainer (trl.experimental), beta 0.2   (get_batch_loss_metrics)

and loss.backward() gives the adapter's gradients. Written:

  <out>/preference_reference.json
      about, versions, the rows, per case: loss, TRL's logged metrics, and the token ids of each
      sequence with its completion mask (DPO: the collator's input_ids/completion_mask, padding
      removed; ORPO: chosen/rejected input_ids with labels != -100)
  <out>/preference_reference.safetensors
      "<case>.layers.<i>.<proj>.lora_A|lora_B": d loss / d weight, f32

Everything is deterministic (dropout 0, one thread), so a rerun with the same versions rewrites
identical files.
"""
import json
import os
import sys
import tempfile
from importlib.metadata import version

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_DISABLED"] = "true"

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(1)

PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a large city in the south."},
    {"prompt": "Two and two make", "chosen": " four", "rejected": " five, or so I was told"},
    {"prompt": "Name a colour:", "chosen": " blue", "rejected": " seven"},
]


def grads_of(model, case):
    out = {}
    for name, p in model.named_parameters():
        if "lora_" not in name or ".default." not in name:
            continue
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
        parts = name.split(".")
        i = parts.index("layers")
        layer, proj, ab = parts[i + 1], parts[i + 3], parts[i + 4]
        out[f"{case}.layers.{layer}.{proj}.{ab}"] = p.grad.detach().clone().contiguous()
    return out


def unpad(ids, mask):
    return [int(t) for t, m in zip(ids, mask) if m]


def main(model_dir, out_dir):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, os.path.join(model_dir, "peft_adapter"), is_trainable=True)
    data = Dataset.from_list(PAIRS)
    common = dict(
        per_device_train_batch_size=len(PAIRS),
        report_to="none",
        use_cpu=True,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        dataset_num_proc=None,
    )
    result = {"cases": {}}
    grads = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, loss_type, beta in [("dpo_sigmoid", "sigmoid", 0.1), ("dpo_ipo", "ipo", 0.5)]:
            args = DPOConfig(output_dir=tmp, beta=beta, loss_type=[loss_type], max_length=None, **common)
            trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
            # TRL keeps a frozen copy of an adapter it is given as "ref" (the reference when re-training an
            # adapter); graft's reference is the base with the adapter off, which is TRL's for a new adapter
            # (B = 0, where the two are the same): drop the copy so TRL disables the adapter instead.
            if "ref" in model.peft_config:
                model.delete_adapter("ref")
                model.set_adapter("default")
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
            model.train()
            model.zero_grad()
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            grads.update(grads_of(model, case))
            metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
            b = len(PAIRS)
            seqs = [
                {
                    "ids": unpad(batch["input_ids"][i].tolist(), batch["attention_mask"][i].tolist()),
                    "completion": unpad(batch["completion_mask"][i].tolist(), batch["attention_mask"][i].tolist()),
                }
                for i in range(2 * b)
            ]
            result["cases"][case] = {
                "loss_type": loss_type,
                "beta": beta,
                "loss": float(loss.detach()),
                "metrics": metrics,
                "chosen": seqs[:b],
                "rejected": seqs[b:],
            }
        args = ORPOConfig(output_dir=tmp, beta=0.2, max_length=64, **common)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
        model.train()
        model.zero_grad()
        loss, metrics = trainer.get_batch_loss_metrics(model, batch)
        loss.backward()
        grads.update(grads_of(model, "orpo"))

        def seq(prefix, i):
            mask = batch[f"{prefix}_attention_mask"][i].tolist()
            ids = unpad(batch[f"{prefix}_input_ids"][i].tolist(), mask)
            labels = unpad(batch[f"{prefix}_labels"][i].tolist(), mask)
            return {"ids": ids, "completion": [int(l != -100) for l in labels]}

        result["cases"]["orpo"] = {
            "beta": 0.2,
            "loss": float(loss.detach()),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "chosen": [seq("chosen", i) for i in range(len(PAIRS))],
            "rejected": [seq("rejected", i) for i in range(len(PAIRS))],
        }
    result["about"] = (
        "TRL's DPO (sigmoid, ipo) and ORPO on one batch of PAIRS with the tiny Llama fixture and its PEFT "
        "adapter as the trainable policy (reference: adapter off); written by scripts/reference/trl_preference.py"
    )
    result["versions"] = {p: version(p) for p in ["torch", "transformers", "peft", "trl", "datasets"]}
    result["pairs"] = PAIRS
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "preference_reference.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    save_file(
        grads,
        os.path.join(out_dir, "preference_reference.safetensors"),
        metadata={"about": "d loss / d LoRA weight per case of preference_reference.json"},
    )
    for case, c in result["cases"].items():
        print(case, "loss", c["loss"], {k: round(v, 5) for k, v in c["metrics"].items() if k.startswith("rewards")})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
