"""``gradprune report PATH``: per-layer sparsity, params and FLOPs of anything gradprune writes, and plots.

``PATH`` may be (the kind is told from the contents, never by running code: ``torch.load`` with
``weights_only=True``, JSON, safetensors):

- ``masks.pt`` (``MaskSet.state_dict()``) or a safetensors mask file: kept/total entries per mask;
- ``selection.pt`` of a ``preprune`` recipe, or a safetensors selection: kept/total per mask;
- a pruned model checkpoint (``pruned_model.pt``, a state dict; or a dict holding one under
  ``"model"`` and optionally bool masks under ``"masks"``, like the demo's ``best_model.pt``):
  zeros/total per weight tensor (2-D and up);
- a ``save_pruned`` folder (``architecture.json`` + ``model.pt``);
- a ``save_pretrained`` folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).

Anything else raises ``ValueError`` (``FileNotFoundError`` when nothing is there). Every overall
line says what it counts: the *prunable weights* (the masked tensors) or *all weight tensors*
(2-D and up), the two differ when some layers (e.g. the first and the last) are not pruned. With
``model``/``example_input`` factories the report also counts FLOPs (2 x MACs of one forward, dense
and with the measured per-layer density).

The report objects of the library (``.report`` of ``gp.prune``'s and ``gp.pre_prune``'s results,
of ``Pruner``, ``SparseTrainer`` and ``gp.search``'s result: :class:`SparsityReport`,
:class:`SelectionReport`, :class:`SearchReport`, all a :class:`Report` with ``str``, ``to_dict()``,
``to_markdown()`` and ``plot()``) are defined in ``gradprune._report`` and re-exported here; their
plots and this command's share :func:`series_style` and :func:`density_panel`.

Example:
    >>> import tempfile, os, torch, torch.nn as nn
    >>> from gradprune.report import checkpoint_report
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> with torch.no_grad():
    ...     model[0].weight[:2] = 0
    >>> with tempfile.TemporaryDirectory() as d:
    ...     torch.save(model.state_dict(), os.path.join(d, "m.pt"))
    ...     rep = checkpoint_report(os.path.join(d, "m.pt"))
    >>> rep["kind"], rep["layers"][0]["name"], rep["layers"][0]["sparsity"]
    ('checkpoint', '0.weight', 0.5)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch
from torch import nn

from ._io import load_json, load_safetensors, load_torch
from ._report import (ALL_WEIGHTS, PRUNABLE, Report, SearchReport, SelectionReport, SparsityReport,
                      density_panel, format_overall, series_style)
from ._table import format_table
from .config import atomic_write

__all__ = ["checkpoint_report", "format_report", "plot_report", "report_figure", "series_style", "format_overall",
           "PRUNABLE", "ALL_WEIGHTS", "Report", "SparsityReport", "SelectionReport", "SearchReport", "density_panel"]

KINDS = {"masks": "masks (kept entries per mask)",
         "selection": "pre-pruning selection (kept entries per mask)",
         "checkpoint": "model checkpoint (zero entries per weight tensor)",
         "save_pruned": "save_pruned folder (zero entries per weight tensor)",
         "save_pretrained": "save_pretrained folder (zero entries per weight tensor)"}

_EXPECTED = ("masks.pt, selection.pt, a pruned model checkpoint (a state dict), a save_pruned folder "
             "(architecture.json + model.pt) or a save_pretrained folder (config.json + "
             "model.safetensors or pytorch_model.bin)")


def _is_mask_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in obj.values()))


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())
            and any(v.is_floating_point() for v in obj.values()))


def _classify(obj, path: str) -> tuple[str, dict, dict]:
    """``(kind, weights, masks)`` of what a file holds; ``ValueError`` for anything else."""
    if isinstance(obj, dict) and _is_state_dict(obj.get("model")):
        masks = obj.get("masks") if _is_mask_dict(obj.get("masks")) else {}
        return "checkpoint", obj["model"], masks
    if isinstance(obj, dict) and "indices" in obj and _is_mask_dict(obj.get("masks")):
        return "selection", {}, obj["masks"]
    if _is_mask_dict(obj):
        return "masks", {}, obj
    if _is_state_dict(obj):
        return "checkpoint", obj, {}
    what = type(obj).__name__ if not isinstance(obj, dict) else f"a dict of {len(obj)} entries"
    raise ValueError(f"{path} holds {what}, not a file gradprune report reads; expected {_EXPECTED}")


def _safetensors_contents(raw: dict, path: str):
    from .integrations.safetensors import split_selection

    indices, importance = split_selection(raw)
    if indices:  # gradprune.integrations.safetensors.save_selection: kept indices + importances
        masks = {}
        for n, imp in importance.items():
            m = torch.zeros(imp.numel(), dtype=torch.bool)
            m[indices.get(n, torch.zeros(0, dtype=torch.int64)).flatten()] = True
            masks[n] = m.view(imp.shape)
        return "selection", {}, masks
    return _classify(raw, path)


def _load(path) -> tuple[str, dict, dict]:
    """``(kind, weights, masks)`` read from ``path`` (see the module docstring)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        from .structured.export import ARCH_FILE, WEIGHTS_FILE

        if os.path.isfile(os.path.join(path, ARCH_FILE)) and os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
            weights = os.path.join(path, WEIGHTS_FILE)
            state = load_torch(weights)
            if not _is_state_dict(state):
                raise ValueError(f"{weights} is not a state dict of tensors")
            return "save_pruned", state, {}
        if os.path.isfile(os.path.join(path, "config.json")):
            from .structured.hf import _read_state

            try:
                return "save_pretrained", _read_state(path), {}
            except FileNotFoundError:
                pass
        inside = [n for n in ("pruned_model.pt", "masks.pt", "selection.pt", "best_model.pt", "pruned")
                  if os.path.exists(os.path.join(path, n))]
        hint = f"; it holds {', '.join(inside)}: pass one of them" if inside else ""
        raise ValueError(f"folder {path} is not one gradprune writes: expected a save_pruned folder "
                         f"({ARCH_FILE} + {WEIGHTS_FILE}) or a save_pretrained folder (config.json + "
                         f"model.safetensors or pytorch_model.bin){hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (no such file or folder)")
    with open(path, "rb") as fh:
        head = fh.read(16)
    # a safetensors file starts with an 8-byte little-endian header length and then '{'
    if len(head) > 8 and head[8:9] == b"{" and not head.startswith(b"PK"):
        return _safetensors_contents(load_safetensors(path), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a checkpoint torch.load(weights_only=True) can read "
                         f"(expected {_EXPECTED}): {str(exc).splitlines()[0]}") from None
    return _classify(obj, path)


def _overall(what: str, total: int, zeros: int) -> dict:
    return {"counts": what, "total": total, "zeros": zeros,
            "sparsity": zeros / total if total else 0.0}


def _flops(kind, path, state, rows, model_factory, example_input) -> tuple[float, float]:
    """(dense, sparse) FLOPs of one forward: every weight tensor (2-D and up) of the model counts,
    at its measured density (a mask's kept fraction; 1 for a tensor neither masked nor saved)."""
    from .sparse_training import layer_macs

    if kind == "save_pruned":  # the saved widths: narrow the factory's dense model first
        from .structured.export import load_pruned

        model = load_pruned(model_factory, path)
    else:
        model = model_factory()
        if state:
            try:
                model.load_state_dict(state, strict=False)
            except RuntimeError as exc:
                detail = [ln.strip() for ln in str(exc).splitlines()[1:2]]
                raise ValueError(f"--model builds a model whose tensors do not match {path}: "
                                 f"{' '.join(detail)}") from None
    names = {n for n, p in model.named_parameters() if p.dim() >= 2}
    macs = layer_macs(model, example_input, names)
    density = {r["name"]: r["density"] for r in rows}
    return (2.0 * sum(macs.values()), 2.0 * sum(m * density.get(n, 1.0) for n, m in macs.items()))


def checkpoint_report(path, model_factory: Callable[[], nn.Module] | None = None,
                      example_input: Any = None) -> dict:
    """Per-layer sparsity of any file or folder gradprune writes (see the module docstring), and
    FLOPs when a model factory and an example input are given.

    ``rep["overall"]`` lists the overall sparsities, each with what it ``counts``
    (:data:`PRUNABLE` from the masks, :data:`ALL_WEIGHTS` from the weights).

    Example: see the module docstring."""
    kind, state, masks = _load(path)
    rows = []
    if state:
        for name, t in state.items():
            if t.dim() < 2 or not t.is_floating_point():
                continue
            nnz = int(torch.count_nonzero(t))
            row = {"name": name, "shape": tuple(t.shape), "numel": t.numel(), "nonzero": nnz,
                   "zeros": t.numel() - nnz, "sparsity": 1.0 - nnz / t.numel(), "density": nnz / t.numel()}
            if name in masks:
                row["mask_density"] = float(masks[name].float().mean())
            rows.append(row)
    else:
        for name, m in masks.items():
            kept = int(m.sum())
            rows.append({"name": name, "shape": tuple(m.shape), "numel": m.numel(), "kept": kept,
                         "nonzero": kept, "sparsity": 1.0 - kept / m.numel() if m.numel() else 0.0,
                         "density": kept / m.numel() if m.numel() else 0.0})
    overall = []
    if masks:
        total = sum(m.numel() for m in masks.values())
        overall.append(_overall(PRUNABLE, total, total - sum(int(m.sum()) for m in masks.values())))
    if state:
        total = sum(r["numel"] for r in rows)
        overall.append(_overall(ALL_WEIGHTS, total, sum(r["zeros"] for r in rows)))
    main = overall[-1]
    rep = {"checkpoint": os.path.abspath(path), "kind": kind, "layers": rows, "overall": overall,
           "overall_counts": main["counts"], "weights": main["total"],
           "nonzero_weights": main["total"] - main["zeros"], "overall_sparsity": main["sparsity"]}
    if state:
        floats = [t for t in state.values() if t.is_floating_point()]
        rep["params"] = sum(t.numel() for t in floats)
        rep["nonzero_params"] = sum(int(torch.count_nonzero(t)) for t in floats)
    if model_factory is not None and example_input is not None:
        from .sparse_training import layer_macs

        rep["flops_dense"], rep["flops_sparse"] = _flops(kind, path, state, rows, model_factory, example_input)
    return rep


def format_report(rep: dict) -> str:
    """The table and the overall lines ``gradprune report`` prints.

    Example: ``print(format_report(checkpoint_report("out/pruned_model.pt")))``."""
    if rep.get("kind") in ("masks", "selection"):
        cols = ["name", "shape", "numel", "kept", "sparsity"]
    else:
        cols = ["name", "shape", "numel", "zeros", "sparsity"]
    lines = [f"{rep['checkpoint']}: {KINDS.get(rep.get('kind'), rep.get('kind'))}",
             format_table(rep["layers"], cols)]
    lines += [format_overall(o["counts"], o["sparsity"], o["zeros"], o["total"]) for o in rep["overall"]]
    if "params" in rep:
        lines.append(f"params {rep['params']:,} (all floating-point tensors), nonzero {rep['nonzero_params']:,}")
    if "flops_dense" in rep:
        lines.append(f"FLOPs per forward: dense {rep['flops_dense']:,.0f}, with this sparsity "
                     f"{rep['flops_sparse']:,.0f}")
    return "\n".join(lines)


def report_figure(rep: dict, results: dict | None = None):
    """The matplotlib figure :func:`plot_report` saves: per-layer density bars and, with a demo
    ``results.json``, accuracy vs sparsity (one series per criterion x pattern). Every panel is
    titled; the caller closes the figure.

    Example: ``fig = report_figure(checkpoint_report("masks.pt"))``."""
    import matplotlib.pyplot as plt

    n_axes = 2 if results else 1
    names = [r["name"] for r in rep["layers"]]
    height = max(4.0, 0.18 * len(names) + 1.0)
    fig, axes = plt.subplots(1, n_axes, figsize=(6.5 * n_axes, height), squeeze=False)
    what = "kept fraction of each mask" if rep.get("kind") in ("masks", "selection") else "nonzero fraction"
    density_panel(axes[0][0], names, [r["density"] for r in rep["layers"]],
                  f"per-layer density; overall sparsity of {rep['overall_counts']}: {rep['overall_sparsity']:.3f}",
                  f"density ({what})")
    if results:
        ax2 = axes[0][1]
        groups: dict = {}
        for r in results.get("runs", []):
            groups.setdefault((r["criterion"], r["pattern"]), []).append(r)
        for i, ((crit, pattern), rs) in enumerate(groups.items()):
            rs = sorted(rs, key=lambda r: r["sparsity"])
            ax2.plot([r["sparsity"] for r in rs], [r["accuracy"] for r in rs], label=f"{crit} {pattern}",
                     markersize=5, **series_style(i))
        if "dense_accuracy" in results:
            ax2.axhline(results["dense_accuracy"], color="k", lw=0.8, label="dense")
        ax2.set_title(f"accuracy vs sparsity of {PRUNABLE} ({len(groups)} series)", fontsize=9)
        ax2.set_xlabel(f"sparsity of {PRUNABLE}")
        ax2.set_ylabel("accuracy")
        ax2.legend(fontsize=6, ncol=2 if len(groups) < 15 else 3)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_report(rep: dict, path: str, results: dict | None = None) -> str | None:
    """Save :func:`report_figure` as a PNG at ``path``.

    Returns the path, or ``None`` when matplotlib is not installed.

    Example: ``plot_report(checkpoint_report("pruned_model.pt"), "report.png")``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = report_figure(rep, results)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def write_report_json(rep: dict, path: str) -> None:
    def write(t):
        with open(t, "w", encoding="utf-8") as fh:
            json.dump(rep, fh, indent=2)
    atomic_write(path, write)
