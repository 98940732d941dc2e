"""Exact selection over 1-D tensors sharded in rank order over a process group (FSDP2).

The single-process rules of :mod:`gradprune.sparse_training` (``_pick``: the ``n`` largest or
smallest candidates, ties at the cut broken by a seeded ``randperm``; ``_pick_random``) give the
same result here: the cut value is found by bisection over the float32 order with all-reduced
counts, and the tie (or candidate) positions are numbered globally, in rank order, so the one
``randperm`` every rank draws from the same generator picks the same entries as in one process.
Only counts cross ranks, never scores.
"""

from __future__ import annotations

from typing import Any

import torch

from ._distributed import all_reduce_floats, all_reduce_ints, rank_in
from .select import _key, _unkey

__all__ = ["count", "pick", "pick_random", "mean_over"]


def count(t: torch.Tensor, group: Any) -> int:
    """``count_nonzero(t)`` summed over ``group`` (``None``: this process)."""
    c = int(torch.count_nonzero(t))
    return c if group is None else all_reduce_ints([c], group, t.device)[0]


def mean_over(values: torch.Tensor, group: Any) -> float:
    """The mean of ``values`` over every rank's entries (float64 sums; ``0.0`` when there are none)."""
    total, n = float(values.double().sum()), values.numel()
    if group is not None:
        total = all_reduce_floats([total], group, values.device, op="sum")[0]
        n = all_reduce_ints([n], group, values.device)[0]
    return total / n if n else float("nan")


def _rank_counts(k: int, group: Any, device) -> tuple[list[int], int]:
    """Every rank's ``k`` (rank order) and this rank's index."""
    me, world = rank_in(group)
    return all_reduce_ints([k if r == me else 0 for r in range(world)], group, device), me


def _choose(idx: torch.Tensor, n: int, gen: torch.Generator, group: Any) -> torch.Tensor:
    """The entries of ``idx`` (this rank's part of a list numbered in rank order) that
    ``randperm(total, generator=gen)[:n]`` picks, as in one process."""
    per_rank, me = _rank_counts(idx.numel(), group, idx.device)
    perm = torch.randperm(sum(per_rank), generator=gen)[:n]
    lo = sum(per_rank[:me])
    mine = perm[(perm >= lo) & (perm < lo + idx.numel())] - lo
    return idx[mine.to(idx.device)]


def _nth_smallest(s: torch.Tensor, candidates: torch.Tensor, n: int, group: Any) -> float:
    """The ``n``-th smallest score among the candidates of every rank (bisection over float32
    keys; one small all-reduce per step)."""
    vals = s[candidates]
    lo_v = float(vals.min()) if vals.numel() else float("inf")
    hi_v = float(vals.max()) if vals.numel() else float("-inf")
    lo_v, neg_hi = all_reduce_floats([lo_v, -hi_v], group, s.device, op="min")
    lo, hi = _key(lo_v), _key(-neg_hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(vals <= _unkey(mid), group) >= n:
            hi = mid
        else:
            lo = mid + 1
    return _unkey(hi)


def pick(scores: torch.Tensor, candidates: torch.Tensor, n: int, largest: bool, gen: torch.Generator,
         group: Any) -> torch.Tensor:
    """``sparse_training._pick`` over a sharded layer: exactly ``n`` candidates over all ranks."""
    out = torch.zeros_like(candidates)
    n_cand = count(candidates, group)
    if n <= 0:
        return out
    if n >= n_cand:
        return candidates.clone()
    s = scores.float()
    if largest:  # the n largest of s are the n smallest of -s (negation is exact)
        s = -s
    t = _nth_smallest(s, candidates, n, group)
    strict = (s < t) & candidates
    out |= strict
    need = n - count(strict, group)
    if need > 0:
        ties = torch.nonzero((s == t) & candidates).flatten()
        out[_choose(ties, need, gen, group)] = True
    return out


def pick_random(candidates: torch.Tensor, n: int, gen: torch.Generator, group: Any) -> torch.Tensor:
    """``sparse_training._pick_random`` over a sharded layer."""
    if n <= 0:
        return torch.zeros_like(candidates)
    out = torch.zeros_like(candidates)
    out[_choose(torch.nonzero(candidates).flatten(), n, gen, group)] = True
    return out
