#!/usr/bin/env python3
"""Rope frequency fixture from transformers' own `ROPE_INIT_FUNCTIONS` (versions pinned in
requirements.txt), for the rope types no tiny family model exercises.

    /tmp/refenv/bin/python scripts/reference/rope.py core/tests/fixtures/rope_yarn.json

Writes `rope_yarn.json`: Qwen2.5's documented long-context setting (yarn, factor 4 over 32768
positions, rope_theta 1e6, head_dim 64): the 32 inverse frequencies and the attention factor.
Deterministic (no randomness).
"""
import json
import sys

import transformers
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

params = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
          "original_max_position_embeddings": 32768}
c = Qwen2Config(hidden_size=896, num_attention_heads=14, rope_parameters=params,
                max_position_embeddings=131072)
inv, af = ROPE_INIT_FUNCTIONS["yarn"](c, "cpu")
json.dump({"transformers": transformers.__version__, "config": {"model_type": "qwen2",
           "hidden_size": 896, "num_attention_heads": 14, "max_position_embeddings": 131072,
           "rope_parameters": params},
           "inv_freq": inv.tolist(), "attention_factor": af}, open(sys.argv[1], "w"), indent=1)
