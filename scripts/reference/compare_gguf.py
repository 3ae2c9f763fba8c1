#!/usr/bin/env python3
"""Compares two GGUF files tensor by tensor (gguf-py): type, shape, bytes, dequantized values.

    compare_gguf.py A.gguf B.gguf

Prints one line per tensor type: how many tensors have the same type and identical bytes in both
files, and the largest |difference| of the dequantized values where the bytes differ; then the
metadata keys only one file has. Exits non-zero if the tensor names or types differ.
"""
import sys
from collections import defaultdict

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def main(a_path, b_path):
    a, b = GGUFReader(a_path), GGUFReader(b_path)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    if set(ta) != set(tb):
        sys.exit(f"tensor names differ: only in A {sorted(set(ta) - set(tb))}, only in B {sorted(set(tb) - set(ta))}")
    per_type = defaultdict(lambda: [0, 0, 0.0, 0, 0])  # tensors, identical, max diff, blocks, same blocks
    mismatched = []
    for name, x in ta.items():
        y = tb[name]
        if x.tensor_type != y.tensor_type:
            mismatched.append(f"{name}: {x.tensor_type.name} vs {y.tensor_type.name}")
            continue
        s = per_type[x.tensor_type.name]
        s[0] += 1
        bx = np.ascontiguousarray(x.data).view(np.uint8).reshape(-1)
        by = np.ascontiguousarray(y.data).view(np.uint8).reshape(-1)
        if np.array_equal(bx, by):
            s[1] += 1
        else:
            dx = dequantize(x.data, x.tensor_type).astype(np.float64)
            dy = dequantize(y.data, y.tensor_type).astype(np.float64)
            s[2] = max(s[2], float(np.max(np.abs(dx - dy))))
        rows = bx.size // int(x.n_bytes / x.n_elements * 256) if x.n_elements % 256 == 0 else None
        if rows:
            bs = bx.size // rows
            same = np.all(bx.reshape(rows, bs) == by.reshape(rows, bs), axis=1)
            s[3] += rows
            s[4] += int(same.sum())
    for ty, (n, same, diff, blocks, same_blocks) in sorted(per_type.items()):
        frac = f", {same_blocks}/{blocks} 256-value groups identical" if blocks else ""
        print(f"{ty:6} {same}/{n} tensors byte-identical{frac}" + (f", max |Δ| {diff:.3g} elsewhere" if same < n else ""))
    ka, kb = set(a.fields), set(b.fields)
    print(f"metadata only in A: {sorted(ka - kb)}; only in B: {sorted(kb - ka)}")
    if mismatched:
        sys.exit("types differ: " + "; ".join(mismatched))


if __name__ == "__main__":
    main(*sys.argv[1:])
