"""``gradprune report CHECKPOINT``: per-layer sparsity, params and FLOPs of a saved model, and plots.

A checkpoint is any file ``torch.load(path, weights_only=True)`` reads into a state dict (tensors
by name), or a dict holding one under ``"model"`` (and optionally bool masks under ``"masks"``), as
``gradprune demo`` and the recipes write. Per weight tensor (2-D or more) it reports the shape, the
number of entries, the nonzeros and the sparsity; with ``model``/``example_input`` factories it also
counts FLOPs (2 x MACs of one forward, dense and with the measured per-layer density).

Example:
    >>> import tempfile, os, torch, torch.nn as nn
    >>> from gradprune.report import checkpoint_report
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> with torch.no_grad():
    ...     model[0].weight[:2] = 0
    >>> with tempfile.TemporaryDirectory() as d:
    ...     torch.save(model.state_dict(), os.path.join(d, "m.pt"))
    ...     rep = checkpoint_report(os.path.join(d, "m.pt"))
    >>> rep["layers"][0]["name"], rep["layers"][0]["sparsity"]
    ('0.weight', 0.5)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch
from torch import nn

from ._table import format_table
from .config import atomic_write

__all__ = ["checkpoint_report", "format_report", "plot_report"]


def _load_state(path: str) -> tuple[dict, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a checkpoint torch.load(weights_only=True) can read: "
                         f"{str(exc).splitlines()[0]}") from None
    masks = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        masks = obj.get("masks") or {}
        obj = obj["model"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of name -> tensor)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, masks


def checkpoint_report(path: str, model_factory: Callable[[], nn.Module] | None = None,
                      example_input: Any = None) -> dict:
    """Per-layer sparsity (and FLOPs when a model factory and an example input are given)."""
    state, masks = _load_state(path)
    rows = []
    for name, t in state.items():
        if t.dim() < 2 or not t.is_floating_point():
            continue
        nnz = int(torch.count_nonzero(t))
        row = {"name": name, "shape": tuple(t.shape), "numel": t.numel(), "nonzero": nnz,
               "sparsity": 1.0 - nnz / t.numel(), "density": nnz / t.numel()}
        if name in masks:
            row["mask_density"] = float(masks[name].float().mean())
        rows.append(row)
    total = sum(r["numel"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    params = sum(t.numel() for t in state.values() if t.is_floating_point())
    rep = {"checkpoint": os.path.abspath(path), "layers": rows, "weights": total,
           "nonzero_weights": nonzero, "overall_sparsity": 1.0 - nonzero / total if total else 0.0,
           "params": params, "nonzero_params": sum(int(torch.count_nonzero(t)) for t in state.values()
                                                   if t.is_floating_point())}
    if model_factory is not None and example_input is not None:
        from .sparse_training import layer_macs

        model = model_factory()
        model.load_state_dict(state, strict=False)
        macs = layer_macs(model, example_input, {r["name"] for r in rows})
        density = {r["name"]: r["density"] for r in rows}
        rep["flops_dense"] = 2.0 * sum(macs.values())
        rep["flops_sparse"] = 2.0 * sum(m * density[n] for n, m in macs.items())
    return rep


def format_report(rep: dict) -> str:
    cols = ["name", "shape", "numel", "nonzero", "sparsity"]
    text = format_table(rep["layers"], cols)
    text += (f"\noverall: {rep['nonzero_weights']:,} of {rep['weights']:,} weights nonzero "
             f"(sparsity {rep['overall_sparsity']:.4f}); params {rep['params']:,}, nonzero "
             f"{rep['nonzero_params']:,}")
    if "flops_dense" in rep:
        text += f"\nFLOPs per forward: dense {rep['flops_dense']:,.0f}, with this sparsity {rep['flops_sparse']:,.0f}"
    return text


def plot_report(rep: dict, path: str, results: dict | None = None) -> str | None:
    """Per-layer density bars (and accuracy vs sparsity from a demo ``results.json``) as a PNG.

    Returns the path, or ``None`` when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n_axes = 2 if results else 1
    fig, axes = plt.subplots(1, n_axes, figsize=(6 * n_axes, 4), squeeze=False)
    ax = axes[0][0]
    names = [r["name"] for r in rep["layers"]]
    ax.barh(range(len(names)), [r["density"] for r in rep["layers"]], color="C0")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("density (nonzero fraction)")
    ax.invert_yaxis()
    ax.set_title(f"per-layer density (overall sparsity {rep['overall_sparsity']:.3f})")
    if results:
        ax2 = axes[0][1]
        groups: dict = {}
        for r in results.get("runs", []):
            groups.setdefault((r["criterion"], r["pattern"]), []).append(r)
        for (crit, pattern), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["sparsity"])
            ax2.plot([r["sparsity"] for r in rs], [r["accuracy"] for r in rs], "-o", label=f"{crit} {pattern}")
        if "dense_accuracy" in results:
            ax2.axhline(results["dense_accuracy"], color="k", lw=0.8, label="dense")
        ax2.set_xlabel("sparsity")
        ax2.set_ylabel("accuracy")
        ax2.legend(fontsize=6, ncol=2)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def write_report_json(rep: dict, path: str) -> None:
    def write(t):
        with open(t, "w", encoding="utf-8") as fh:
            json.dump(rep, fh, indent=2)
    atomic_write(path, write)
