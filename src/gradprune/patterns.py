"""Units of removal.

A pattern views a weight as a matrix ``[out, in]`` (a conv weight ``[out, in, *kernel]`` becomes
``[out, in * prod(kernel)]``, the input dimension flattened with the kernel), reduces entry scores to
one score per *unit*, and expands a per-unit keep mask back to a bool mask shaped like the weight.

================ ============================================== ======================
pattern           unit                                           entries pruned / unit
================ ============================================== ======================
``"1x1"``         one entry                                      1
``"NxM"``         a block of N output rows x M input columns     N*M
``"N:M"``         a group of M consecutive inputs of one row;    M-N
                  pruning it zeroes its M-N lowest-scored
                  entries (so N of every M are KEPT); for a
                  conv, M consecutive *input channels* at one
                  kernel position (see below)
``"N:M-flat"``    as ``"N:M"``, but a conv's M consecutive       M-N
                  entries of the flattened ``(in, *kernel)``
                  axis (gradprune < 0.2's conv grouping)
``"channel"``     a whole output row (a conv filter)             in * prod(kernel)
``"kernel"``      one conv kernel ``weight[o, i]``               prod(kernel)
================ ============================================== ======================

Multi-entry units reduce the *absolute* entry scores with ``mean``, ``sum`` or ``max`` (signed
scores, such as movement's, are reduced as they are). An ``N:M`` layer at its full ratio has every
group pruned; a lower sparsity (during a gradual schedule) prunes the lowest-scored groups first.

Within an N:M group, among equal scores the higher input index is pruned first.

Conv N:M layout: for a conv weight ``[out, in, kh, kw]``, ``"N:M"`` groups M consecutive input
channels at a fixed kernel position, i.e. along ``in`` of the permuted layout ``[out, kh, kw, in]``
-- the layout that NVIDIA's ASP and Intel Neural Compressor use and that sparse tensor cores
accelerate. It needs ``in`` divisible by M. ``"N:M-flat"`` keeps the older grouping along the
flattened ``(in, kh, kw)`` axis (kernel positions of one channel grouped together, ``in * kh * kw``
divisible by M), which sparse tensor cores do not accelerate. For a ``Linear`` weight both are the
same.

Example:
    >>> import torch
    >>> from gradprune.patterns import get_pattern
    >>> p = get_pattern("2:4")
    >>> w = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    >>> p.expand(torch.tensor([False]), w)   # the one group is pruned: its 2 lowest go
    tensor([[ True, False,  True, False]])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from .config import parse_pattern

__all__ = ["Pattern", "get_pattern", "as_matrix"]


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """``[out, *rest]`` -> ``[out, prod(rest)]`` (a view when possible)."""
    return t.reshape(t.shape[0], -1)


def _reduce(x: torch.Tensor, dims, how: str) -> torch.Tensor:
    if how == "mean":
        return x.mean(dim=dims)
    if how == "sum":
        return x.sum(dim=dims)
    if how == "max":
        out = x
        for d in sorted(dims, reverse=True):
            out = out.amax(dim=d)
        return out
    raise ValueError(f"reduce must be one of mean, sum, max; got {how!r}")


class Pattern(ABC):
    """A unit of removal. ``spec`` is the string it was parsed from."""

    def __init__(self, spec: str):
        self.spec = spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def misfit(self, shape: torch.Size) -> str | None:
        """Why a weight of this shape cannot use the pattern, or ``None`` when it can."""
        if len(shape) < 2:
            return f"needs a weight with at least 2 dims, got shape {tuple(shape)}"
        return None

    @abstractmethod
    def unit_weight(self, shape: torch.Size) -> int:
        """How many entries one unit removes."""

    @abstractmethod
    def unit_scores(self, scores: torch.Tensor, reduce: str = "mean", signed: bool = False) -> torch.Tensor:
        """1-D float32 tensor: one score per unit, in a fixed (row-major) unit order."""

    @abstractmethod
    def expand(self, keep: torch.Tensor, scores: torch.Tensor, signed: bool = False) -> torch.Tensor:
        """Bool mask shaped like the weight from a 1-D per-unit ``keep`` mask."""

    def n_units(self, shape: torch.Size) -> int:
        return math.prod(shape) // self.unit_weight(shape)

    def max_sparsity(self, shape: torch.Size) -> float:
        """The largest sparsity this pattern can reach on the layer."""
        return self.n_units(shape) * self.unit_weight(shape) / math.prod(shape)


class BlockPattern(Pattern):
    def __init__(self, spec: str, rows: int, cols: int):
        super().__init__(spec)
        self.rows, self.cols = rows, cols

    def misfit(self, shape):
        why = super().misfit(shape)
        if why:
            return why
        out, inp = shape[0], math.prod(shape[1:])
        if out % self.rows or inp % self.cols:
            return (f"pattern {self.spec!r} needs out ({out}) divisible by {self.rows} and "
                    f"in ({inp}) divisible by {self.cols}")
        return None

    def unit_weight(self, shape):
        return self.rows * self.cols

    def unit_scores(self, scores, reduce="mean", signed=False):
        s = as_matrix(scores).float()
        if self.rows == self.cols == 1:
            return s.reshape(-1)
        if not signed:
            s = s.abs()
        o, i = s.shape
        s = s.reshape(o // self.rows, self.rows, i // self.cols, self.cols)
        return _reduce(s, (1, 3), reduce).reshape(-1)

    def expand(self, keep, scores, signed=False):
        shape = scores.shape
        o, i = shape[0], math.prod(shape[1:])
        if self.rows == self.cols == 1:
            return keep.reshape(shape)
        k = keep.reshape(o // self.rows, 1, i // self.cols, 1)
        k = k.expand(o // self.rows, self.rows, i // self.cols, self.cols)
        return k.reshape(shape)


class ChannelPattern(Pattern):
    def unit_weight(self, shape):
        return math.prod(shape[1:])

    def unit_scores(self, scores, reduce="mean", signed=False):
        s = as_matrix(scores).float()
        return _reduce(s if signed else s.abs(), (1,), reduce)

    def expand(self, keep, scores, signed=False):
        shape = scores.shape
        return keep.reshape(shape[0], *([1] * (len(shape) - 1))).expand(shape).clone()


class KernelPattern(Pattern):
    def misfit(self, shape):
        if len(shape) < 3:
            return f"pattern 'kernel' needs a conv weight [out, in, *kernel], got shape {tuple(shape)}"
        return None

    def unit_weight(self, shape):
        return math.prod(shape[2:])

    def unit_scores(self, scores, reduce="mean", signed=False):
        s = scores.float().reshape(scores.shape[0], scores.shape[1], -1)
        return _reduce(s if signed else s.abs(), (2,), reduce).reshape(-1)

    def expand(self, keep, scores, signed=False):
        shape = scores.shape
        k = keep.reshape(shape[0], shape[1], 1).expand(shape[0], shape[1], math.prod(shape[2:]))
        return k.reshape(shape)


class NMPattern(Pattern):
    """N of every M consecutive input weights KEPT (NVIDIA's meaning of ``"2:4"``)."""

    def __init__(self, spec: str, n: int, m: int, layout: str = "channels"):
        super().__init__(spec)
        if layout not in ("channels", "flat"):
            raise ValueError(f"layout must be 'channels' or 'flat'; got {layout!r}")
        self.n, self.m, self.layout = n, m, layout

    def misfit(self, shape):
        why = super().misfit(shape)
        if why:
            return why
        if self.layout == "channels" and len(shape) > 2:
            if shape[1] % self.m:
                return (f"pattern {self.spec!r} groups input channels at each kernel position: it needs "
                        f"in ({shape[1]}) divisible by {self.m} (the {self.n}:{self.m}-flat pattern "
                        "groups the flattened (in, kernel) axis instead)")
            return None
        inp = math.prod(shape[1:])
        if inp % self.m:
            return f"pattern {self.spec!r} needs in ({inp}) divisible by {self.m}"
        return None

    def groups(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the weight) as ``[out, groups, M]``, one row of M per N:M group.

        ``"channels"`` layout: a conv ``[out, in, *kernel]`` is read as ``[out, *kernel, in]``, so a
        group is M consecutive input channels at one kernel position.
        """
        if self.layout == "channels" and t.dim() > 2:
            t = t.movedim(1, -1)
        return t.reshape(t.shape[0], -1, self.m)

    def _ungroup(self, g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`groups`: ``[out, groups, M]`` back to ``shape``."""
        if self.layout == "channels" and len(shape) > 2:
            return g.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()
        return g.reshape(shape)

    def unit_weight(self, shape):
        return self.m - self.n

    def n_units(self, shape):
        return math.prod(shape) // self.m

    def _order(self, scores, signed):
        """Per group, entry indices from first-to-prune to last (ties: higher index first)."""
        s = scores.float()
        if not signed:
            s = s.abs()
        g = self.groups(s).flip(-1)
        vals, idx = torch.sort(g, dim=-1, stable=True)
        return vals, (self.m - 1) - idx

    def unit_scores(self, scores, reduce="mean", signed=False):
        vals, _ = self._order(scores, signed)
        return _reduce(vals[..., : self.m - self.n], (2,), reduce).reshape(-1)

    def expand(self, keep, scores, signed=False):
        shape = scores.shape
        _, idx = self._order(scores, signed)
        o = shape[0]
        groups = idx.shape[1]
        mask = torch.ones(o, groups, self.m, dtype=torch.bool, device=scores.device)
        pruned_groups = ~keep.reshape(o, groups, 1)
        drop = torch.zeros_like(mask)
        drop.scatter_(-1, idx[..., : self.m - self.n], True)
        mask &= ~(drop & pruned_groups)
        return self._ungroup(mask, shape)


def get_pattern(spec: str) -> Pattern:
    """Parse ``spec`` (``"1x1"``, ``"4x1"``, ``"2:4"``, ``"2:4-flat"``, ``"channel"``, ``"kernel"``)
    into a Pattern."""
    kind, a, b = parse_pattern(spec)
    if kind == "block":
        return BlockPattern(spec, a, b)
    if kind == "nm":
        return NMPattern(spec, a, b, layout="flat" if spec.endswith("-flat") else "channels")
    if kind == "channel":
        return ChannelPattern(spec)
    return KernelPattern(spec)
