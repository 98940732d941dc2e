#!/usr/bin/env bash
# Build the peer-benchmark virtualenv at <repo>/.bench-venv (separate from gradprune's own deps).
# Safe to run again: reuses the venv, pip skips what is already installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.bench-venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"

# torch is pinned on the SAME command line as every torch-dependent package; otherwise pip
# resolves a CUDA torch and downloads several GB. neural-compressor 3.7.1 needs setuptools<81
# (pkg_resources) and six; it downgrades numpy to 1.26. gradprune (installed --no-deps below)
# imports tqdm, and reads YAML with pyyaml.
"$PIP" install --upgrade pip >/dev/null
"$PIP" install "torch==2.13.0" "neural-compressor==3.7.1" "setuptools<81" six mnist1d scikit-learn numpy tqdm pyyaml

# gradprune itself, editable, without touching the pinned deps above.
if [ -f "$ROOT/pyproject.toml" ] || [ -f "$ROOT/setup.py" ]; then
    "$PIP" install --no-deps --no-build-isolation -e "$ROOT" \
        || "$PIP" install --no-deps -e "$ROOT"
else
    echo "setup_peers.sh: no pyproject.toml in $ROOT yet; skipping gradprune install (run again later)" >&2
fi

"$VENV/bin/python" - <<'PY'
import importlib
for m in ("torch", "neural_compressor", "mnist1d", "sklearn", "numpy", "gradprune"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:18s} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # gradprune may not exist yet
        print(f"{m:18s} NOT importable: {type(e).__name__}: {e}")
PY
