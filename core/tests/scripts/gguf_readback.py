#!/usr/bin/env python3
"""Reads a GGUF file graft wrote with gguf-py (the venv-tools pin, gguf==0.19.0) and prints JSON.

    gguf_readback.py FILE [REFERENCE_F32.gguf]

Prints {"metadata": {key: value or null}, "tensors": {name: {"type", "shape" (torch order),
"values": dequantized sum and sum of squares}}}, metadata values for scalars and strings only. With
a reference file holding the same tensors in F32, each tensor also gets "max_abs_vs_reference"
(gguf-py's dequantization against the reference values) and "same_bytes_as_gguf_py": whether
gguf-py's own quantize() of the reference values gives exactly the file's bytes (null for types
gguf-py cannot write, such as the K-quants).
"""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize, quantize


def field_value(f):
    if not f.types or f.types[0] == GGUFValueType.ARRAY:
        return None
    v = f.parts[f.data[0]]
    if f.types[0] == GGUFValueType.STRING:
        return bytes(v).decode("utf-8")
    return v.tolist()[0]


def main(path, ref_path=None):
    reader = GGUFReader(path)
    ref = {t.name: t for t in GGUFReader(ref_path).tensors} if ref_path else {}
    out = {
        "metadata": {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")},
        "tensors": {},
    }
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float64)
        entry = {
            "type": t.tensor_type.name,
            "shape": [int(d) for d in reversed(t.shape.tolist())],
            "sum": float(values.sum()),
            "sum_sq": float((values * values).sum()),
        }
        if t.name in ref:
            r = ref[t.name]
            x = dequantize(r.data, r.tensor_type).astype(np.float32)
            entry["max_abs_vs_reference"] = float(np.max(np.abs(values.reshape(-1) - x.reshape(-1))))
            try:
                mine = quantize(x, t.tensor_type)
                entry["same_bytes_as_gguf_py"] = bool(
                    np.ascontiguousarray(mine).view(np.uint8).tobytes()
                    == np.ascontiguousarray(t.data).view(np.uint8).tobytes()
                )
            except NotImplementedError:
                entry["same_bytes_as_gguf_py"] = None
        out["tensors"][t.name] = entry
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:])
