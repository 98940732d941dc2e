"""Masks and pre-pruning selections as safetensors files (no pickle, nothing executed on load).

Example:
    >>> import os, tempfile, torch, torch.nn as nn
    >>> import gradprune as gp
    >>> from gradprune.integrations.safetensors import save_masks, load_masks
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> res = gp.prune(model, sparsity=0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "masks.safetensors")
    >>> save_masks(res.masks, path)
    >>> fresh = gp.MaskSet(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> fresh.load_state_dict(load_masks(path))
    >>> fresh.sparsity()
    0.5
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from .._io import atomic_write, load_safetensors

__all__ = ["save_masks", "load_masks", "save_selection", "load_selection"]


def _st():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("safetensors is needed: pip install 'gradprune[hf]'") from exc
    return st


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike,
               metadata: Mapping[str, str] | None = None) -> None:
    """Write ``{name: bool mask}`` (a :class:`~gradprune.MaskSet` or a dict) atomically."""
    st = _st()
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a MaskSet or a mapping name -> bool tensor, got {type(masks).__name__}")
    tensors = {}
    for n, m in masks.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"mask {n!r} must be a bool tensor")
        tensors[n] = m.detach().cpu().contiguous()
    meta = {"format": "gradprune-masks", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    atomic_write(path, lambda tmp: st.save_file(tensors, tmp, metadata=meta))


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks` (``MaskSet.load_state_dict`` takes the result)."""
    st = _st()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    out = load_safetensors(path)
    bad = [n for n, t in out.items() if t.dtype != torch.bool]
    if bad:
        raise ValueError(f"{path} is not a mask file: {bad[:3]} are not bool tensors")
    return out


def save_selection(selection, path: str | os.PathLike) -> None:
    """Write a :func:`~gradprune.pre_prune` selection: kept indices and importances per parameter."""
    st = _st()
    tensors = {}
    for n, idx in selection.indices.items():
        tensors[f"indices/{n}"] = idx.detach().cpu().to(torch.int64).contiguous()
        tensors[f"importance/{n}"] = selection.importance[n].detach().cpu().contiguous()
    meta = {"format": "gradprune-selection", "kept_total": str(sum(int(i.numel()) for i in selection.indices.values()))}
    atomic_write(path, lambda tmp: st.save_file(tensors, tmp, metadata=meta))


def load_selection(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(indices, importance)`` per parameter from :func:`save_selection`."""
    st = _st()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"selection file not found: {path}")
    indices, importance = split_selection(load_safetensors(path))
    if not indices:
        raise ValueError(f"{path} is not a selection file")
    return indices, importance


def split_selection(raw: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """``(indices, importance)`` per parameter from the tensors of a :func:`save_selection` file
    (both empty when ``raw`` is not one)."""
    def part(prefix):
        return {k.split("/", 1)[1]: v for k, v in raw.items() if k.startswith(prefix)}
    return part("indices/"), part("importance/")
