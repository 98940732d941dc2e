#!/usr/bin/env bash
# Build the virtualenv for benchmarks/dst_vs_peers.py at <repo>/.dst-venv:
# torch 2.13.0 (CPU), rigl-torch 0.5.2 (+ torchvision 0.28.0, which rigl-torch imports but does not
# declare), mnist1d, numpy, tqdm, and gradprune itself (editable, no deps).
# Safe to run again: reuses the venv, pip skips what is already installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.dst-venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install --upgrade pip >/dev/null

# torch is pinned on the SAME command line as every torch-dependent package, otherwise pip resolves
# a CUDA torch and downloads several GB. rigl-torch 0.5.2 does not declare torchvision although
# rigl_torch/util.py imports it; with torch pinned here pip resolves torchvision 0.28.0, the release
# built for torch 2.13.0 (an unpinned torchvision would pick 0.29.x, which wants a newer torch).
# That wheel is a CUDA build: importing it fails unless torchvision::nms / torchvision::qnms are
# defined with torch.library first -- benchmarks/dst_vs_peers.py does that before importing rigl_torch.
# tqdm: gradprune's own dependency (the editable install below skips dependencies).
"$PIP" install "torch==2.13.0" "torchvision==0.28.0" "rigl-torch==0.5.2" mnist1d numpy tqdm

# gradprune itself, editable, without touching the pinned deps above.
"$PIP" install --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null \
    || "$PIP" install --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import importlib
import torch
# Same workaround as the benchmark: define the two operators torchvision's CUDA wheel registers
# fake kernels for, before torchvision is imported.
for op in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{op}",
                             "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        pass
for m in ("torch", "torchvision", "rigl_torch.RigL", "mnist1d", "numpy", "gradprune"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:18s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:  # gradprune may still be under construction
        print(f"{m:18s} NOT importable: {type(e).__name__}: {e}")
PY
