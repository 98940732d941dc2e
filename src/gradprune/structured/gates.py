"""Gates: one multiplier per unit of every group, attached with removable forward hooks.

A gate multiplies the channels of a group at every *mask point*: each producer's output and the
output of every per-channel layer (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, depthwise conv,
sigmoid-like activations) on the group's path. Between mask points only zero-keeping operations
run (ReLU, pooling, reshapes, residual additions…), so a gate at 0 removes the unit exactly as an
export does, and a gate at 1 changes nothing. ``LayerNorm``/``GroupNorm`` over pruned channels are
recomputed over the kept channels only (as the exported, narrower norm does).

Attention heads (groups with a ``handler``) are gated before the output projection: through the
value projection's output for Hugging Face attention, by a forward hook on the module for
``nn.MultiheadAttention`` (see :mod:`gradprune.structured.attention`). While gates are attached,
torch's fused multi-head-attention fast path is switched off
(``torch.backends.mha.set_fastpath_enabled``), as it would bypass the hooks; it is restored on
:meth:`Gates.remove`.

Two modes:

- ``Gates(analysis)`` (gradient mode): every forward creates all-ones gates of shape
  ``[batch, units]`` that require grad (one row per sample, so one backward gives both the batch
  gradient, the sum over rows, and the per-sample gradients); :meth:`Gates.collect` returns them.
- ``Gates(analysis, keep={group index: kept unit indices})`` (fixed mode): units not kept are off.

Example:
    >>> import torch, torch.nn as nn
    >>> from gradprune.structured import find_groups, Gates
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> x = torch.randn(3, 4)
    >>> analysis = find_groups(model, x)
    >>> with Gates(analysis, keep={0: torch.tensor([0, 2, 5])}):
    ...     y = model(x)
    >>> mask = torch.tensor([1., 0., 1., 0., 0., 1.])
    >>> bool(torch.allclose(y, model[2](torch.relu(model[0](x)) * mask)))
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .groups import Analysis, Layout

__all__ = ["Gates"]


class Gates:
    """Gate hooks on a model analysed by :func:`~gradprune.structured.find_groups`.

    Use as a context manager (or :meth:`attach` / :meth:`remove`).
    """

    def __init__(self, analysis: Analysis, keep: dict | None = None):
        self.analysis = analysis
        self.fixed = keep is not None
        self.values: dict = {}
        if keep is not None:
            for gi, g in enumerate(analysis.groups):
                v = torch.ones(g.size)
                if gi in keep:
                    idx = torch.as_tensor(keep[gi], dtype=torch.long)
                    v = torch.zeros(g.size)
                    v[idx] = 1.0
                self.values[gi] = v
        self.records: list = []
        self._handles: list = []
        self._fastpath = None

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self) -> "Gates":
        if self._handles:
            return self
        modules = dict(self.analysis.model.named_modules())
        for name, (layout, kind) in self.analysis.mask_points.items():
            mod = modules[name]
            self._handles.append(mod.register_forward_hook(self._hook(layout, kind)))
        for gi, g in enumerate(self.analysis.groups):
            if g.handler is not None:
                self._handles += g.handler.hooks(modules, self, gi)
        if any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer))
               for m in modules.values()):
            self._fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.records = []
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    def head_gate(self, gi: int, batch: int | None, ref: torch.Tensor) -> torch.Tensor:
        """The gate of head group ``gi``: ``[heads]`` (fixed) or a recorded ``[batch, heads]``
        leaf that requires grad (gradient mode; ``batch=None``, an unbatched input, counts as 1)."""
        if self.fixed:
            return self.values[gi].to(device=ref.device, dtype=ref.dtype)
        v = torch.ones(batch or 1, self.analysis.groups[gi].size, device=ref.device,
                       dtype=ref.dtype, requires_grad=True)
        self.records.append((gi, v))
        return v

    def __enter__(self) -> "Gates":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _vector(self, layout: Layout, batch: int | None, ref: torch.Tensor) -> torch.Tensor:
        """The gate along ``layout``'s channel dim: ``[S]`` (fixed) or ``[batch, S]`` (gradient)."""
        a = self.analysis
        parts = []
        for space, inner in layout.segs:
            gi = a.space_group.get(space)
            size = a.space_size[space]
            if gi is None:
                v = torch.ones(size) if batch is None else torch.ones(batch, size)
                v = v.to(device=ref.device, dtype=ref.dtype)
            elif batch is None:
                v = self.values[gi].to(device=ref.device, dtype=ref.dtype)
            else:
                v = torch.ones(batch, size, device=ref.device, dtype=ref.dtype, requires_grad=True)
                self.records.append((gi, v))
            if inner != 1:
                v = v.repeat_interleave(inner, dim=-1)
            parts.append(v)
        return torch.cat(parts, dim=-1)

    def _hook(self, layout: Layout, kind: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return None
            cdim = output.dim() + layout.rel
            shape = [1] * output.dim()
            shape[cdim] = -1
            if self.fixed:
                v = self._vector(layout, None, output)
                if kind != "mul" and bool((v == 0).any()):
                    output = _renormalise(module, inputs[0], v, cdim, kind)
                return output * v.view(shape)
            if cdim == 0:
                raise RuntimeError(f"gate on dim 0 of {type(module).__name__} output")
            v = self._vector(layout, output.shape[0], output)
            shape[0] = output.shape[0]
            return output * v.view(shape)
        return hook

    # -- gradient mode --------------------------------------------------------------------------
    def collect(self) -> dict:
        """After a backward: ``{group index: (batch_grad [units], per_sample [N, units] or None)}``,
        summed over every gate of the group used in the forward; clears the records."""
        out: dict = {}
        for gi, leaf in self.records:
            g = leaf.grad
            if g is None:
                g = torch.zeros_like(leaf)
            g = g.detach()
            batch, per = out.get(gi, (None, None))
            b = g.sum(0)
            batch = b if batch is None else batch + b
            if per is None and gi not in out:
                per = g
            elif per is not None:
                per = per + g if per.shape == g.shape else None
            out[gi] = (batch, per)
        self.records = []
        return out


def _renormalise(module: nn.Module, x: torch.Tensor, v: torch.Tensor, cdim: int, kind: str):
    """A LayerNorm/GroupNorm output computed over the kept channels only (zeros elsewhere)."""
    keep = torch.nonzero(v != 0).reshape(-1)
    out = torch.zeros(*x.shape, dtype=x.dtype, device=x.device)
    w = module.weight[keep] if getattr(module, "weight", None) is not None else None
    b = module.bias[keep] if getattr(module, "bias", None) is not None else None
    xk = x.index_select(cdim, keep)
    if kind == "layernorm":
        y = F.layer_norm(xk, (keep.numel(),), w, b, module.eps)
    else:
        n_groups = module.num_groups
        per = module.num_channels // n_groups
        counts = torch.bincount(keep // per, minlength=n_groups)
        if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise ValueError(f"GroupNorm needs the same number of kept channels in each of its "
                             f"{n_groups} groups, got {counts.tolist()}")
        y = F.group_norm(xk, n_groups, w, b, module.eps)
    out.index_copy_(cdim, keep, y)
    return out
