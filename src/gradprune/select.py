"""From unit scores to masks: exact counts, deterministic ties.

Every layer is a :class:`Units`: one float score per unit (1-D), how many weight entries a unit
removes, the layer's number of weights, and optionally the units an earlier mask already pruned
(those stay pruned and count toward the target).

Rules, all exact:

- **Counts.** A layer of ``n`` weights whose units remove ``w`` entries each, at sparsity ``s``,
  prunes ``round_half_up(s * n / w)`` units (for every pattern but N:M that is ``round(s * units)``).
  Global scope prunes ``round_half_up(s * N / w)`` units over all layers when every unit removes the
  same ``w`` entries; otherwise the number whose removed-weight total is closest to ``s * N``.
  With ``count_rounding="floor"`` (Neural Compressor's ``int(units * s)``) every such count rounds
  down instead: ``floor(s * n / w)`` per layer, ``floor(s * N / w)`` globally, and with mixed unit
  weights the longest run of the selection order (lowest scores first, ties as below) whose removed
  weight does not exceed ``s * N``. The ``min_sparsity`` floor of a layer rounds the same way;
  ``max_sparsity`` always rounds down.
- **Ties.** Among equal scores, the unit that comes later (higher flat index; in global scope, the
  later layer first) is pruned first, so the lowest flat index is kept.
- **Global scope** finds one threshold by bisection over the float32 order, counting per layer, so
  no tensor holding every score is ever built; the counting compares one chunk of a layer at a
  time into a reused buffer and masks earlier-pruned units in place, so no layer's scores are
  copied either. Beyond the masks it returns (a bool per unit), its temporaries are one chunk's
  (``_CHUNK`` = 2^20 units) and, unsharded, the sample and the few scores inside the bracket.
- **Bounds.** ``min_sparsity``/``max_sparsity`` per layer: a layer at a bound is frozen there and
  the rest of the target goes to the others; an infeasible target raises ``ValueError`` first.
  ``max_sparsity`` is hard: a layer's count rounds down to stay within it (tiny layers included).
- **Sharded layers** (FSDP2: a layer's units split over the ranks of a process group, in order):
  the same rules, exactly. Counts, bounds and per-rank tie counts go through small all-reduces
  (the global threshold by 32 bisection steps); no rank gathers another's scores. Ties at the
  threshold are taken from the highest rank down, which is the higher flat index first.
- **Allocation** (local scope): ``uniform``, ``er`` (``(n_in + n_out) / (n_in * n_out)``) or ``erk``
  (``sum(shape) / prod(shape)``) raw densities scaled by one factor so the total matches, clipped to
  the bounds (so density never exceeds 1).
- **topk / threshold**: after an existing mask, keep units with ``score >= threshold``, then the
  ``topk`` best of what remains (int: a count, capped; float in (0, 1]: ``ceil(topk * remaining)``).

Example:
    >>> import torch
    >>> from gradprune.select import Units, select
    >>> u = Units("w", torch.tensor([0.5, 0.1, 0.1, 0.9]), weight=1, numel=4)
    >>> select([u], sparsity=0.5)["w"]        # keep-mask; the tie at 0.1 prunes index 2 first
    tensor([ True, False, False,  True])
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ._checks import COUNT_ROUNDINGS, check_choice, check_threshold, check_topk, count_of

__all__ = ["Units", "select", "allocate_densities", "raw_density"]

_NEG_INF = float("-inf")


@dataclass
class Units:
    """One layer's units for selection."""

    name: str
    scores: torch.Tensor          # 1-D float scores, one per unit
    weight: int                   # weight entries removed per unit
    numel: int                    # weights in the layer
    pruned: torch.Tensor | None = None   # 1-D bool: already pruned by an earlier mask
    raw: float = 1.0              # raw density for er/erk allocation
    group: Any = None             # process group the units are sharded over (FSDP2), in rank order
    total: int | None = None      # units over all ranks when sharded

    @property
    def n(self) -> int:
        return self.scores.numel() if self.total is None else self.total

    @property
    def scale(self) -> float:
        """Units that would remove every weight (``numel / weight``; > n for N:M)."""
        return self.numel / self.weight

    def n_forced(self) -> int:
        return _gcounts([self], [self.pruned])[0]

    def masked_scores(self) -> torch.Tensor:
        if self.pruned is None:
            return self.scores
        return self.scores.masked_fill(self.pruned, _NEG_INF)


def raw_density(shape: Sequence[int], allocation: str) -> float:
    """Un-normalised density of a layer for ``er``/``erk`` (``uniform``: 1)."""
    if allocation == "uniform":
        return 1.0
    if allocation == "er":
        n_out, n_in = shape[0], shape[1]
        return (n_in + n_out) / (n_in * n_out)
    if allocation == "erk":
        return sum(shape) / math.prod(shape)
    raise ValueError(f"allocation must be one of uniform, er, erk; got {allocation!r}")


# ---------------------------------------------------------------------------------------------
# counting over the ranks of sharded layers

def _gcounts(layers: Sequence[Units], tensors: Sequence[torch.Tensor | None]) -> list[int]:
    """``count_nonzero`` of each tensor (``None``: 0), summed over its layer's ranks: one
    all-reduce per process group."""
    return _gsum(layers, [0 if t is None else int(torch.count_nonzero(t)) for t in tensors])


def _gsum(layers: Sequence[Units], counts: list[int]) -> list[int]:
    """Each layer's count of this rank, summed over its layer's ranks: one all-reduce per
    process group."""
    counts = list(counts)
    groups: dict[int, tuple[Any, list[int], Any]] = {}
    for i, u in enumerate(layers):
        if u.group is not None:
            groups.setdefault(id(u.group), (u.group, [], u.scores.device))[1].append(i)
    if groups:
        from ._distributed import all_reduce_ints

        for group, idx, device in groups.values():
            summed = all_reduce_ints([counts[i] for i in idx], group, device)
            for i, c in zip(idx, summed):
                counts[i] = c
    return counts


def _sharded(layers: Sequence[Units]) -> list[Units]:
    return [u for u in layers if u.group is not None]


def _lowest_of(u: Units, scores: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_prune_lowest` of one layer, sharded or not (the same rule either way)."""
    if u.group is None:
        return _prune_lowest(scores, k, forced)
    one = Units(u.name, scores, 1, u.n, forced, group=u.group, total=u.n)
    return _global_lowest([one], k, [1])[u.name]


# ---------------------------------------------------------------------------------------------
# exact k-lowest in one tensor

def _prune_lowest(scores: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` lowest entries; among ties the higher index goes first.

    ``forced`` entries (an earlier mask) come first and count toward ``k``, even against free
    entries that score ``-inf``.
    """
    if forced is not None and bool(forced.any()):
        free = torch.nonzero(~forced).flatten()
        out = forced.clone()
        out[free[_prune_lowest(scores[free], k - int(forced.sum()))]] = True
        return out
    n = scores.numel()
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return out
    if k >= n:
        return ~out
    t = torch.kthvalue(scores.cpu() if scores.device.type == "mps" else scores, k).values.item()
    out = scores < t
    need = k - int(out.sum())
    if need > 0:
        ties = torch.nonzero(scores == t).flatten()
        out[ties[-need:]] = True
    return out


# ---------------------------------------------------------------------------------------------
# global threshold by bisection over float32 keys

def _key(f: float) -> int:
    b = struct.unpack("<I", struct.pack("<f", f))[0]
    return (~b & 0xFFFFFFFF) if b & 0x80000000 else b | 0x80000000


def _unkey(k: int) -> float:
    b = k & 0x7FFFFFFF if k & 0x80000000 else ~k & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", b))[0]


_SAMPLE = 1 << 16
_CHUNK = 1 << 20  # units compared at a time: the largest temporary of a counting pass


class _Scan:
    """Chunked comparisons of the free units of ``layers`` (units not in ``pruned``) with a
    float32 threshold, without copying any layer's scores.

    Every comparison writes into one bool buffer of at most :data:`_CHUNK` entries, reused by
    every pass (and, for scores that are not float32, one float32 buffer they are converted into
    chunk by chunk); forced units are masked out of it in place. A layer whose free units are at
    most a quarter of it is counted on a compact float32 copy of its free scores instead (no more
    bytes than one bool mask of the layer), so the repeated counting passes of the bisection read
    only its free units.

        >>> s = _Scan([torch.tensor([3.0, 1.0, 2.0, 1.0])], [torch.tensor([False, True, False, False])])
        >>> s.count(0, torch.le, 1.0), s.n_free
        (1, [3])
    """

    def __init__(self, scores: Sequence[torch.Tensor], pruned: Sequence[torch.Tensor | None]):
        self.scores, self.pruned = list(scores), list(pruned)
        self.n_free = [s.numel() - (0 if p is None else int(torch.count_nonzero(p)))
                       for s, p in zip(self.scores, self.pruned)]
        self._bufs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.compact = [self._compact(i) if p is not None and 4 * f <= s.numel() else None
                        for i, (s, p, f) in enumerate(zip(self.scores, self.pruned, self.n_free))]

    def _compact(self, i: int) -> torch.Tensor:
        """The free scores of layer ``i`` in order, float32, gathered chunk by chunk."""
        s, p = self.scores[i], self.pruned[i]
        out, at = torch.empty(self.n_free[i], dtype=torch.float32, device=s.device), 0
        for a in self._starts(i):
            c = self._chunk(i, a)
            v = c[~p[a:a + c.numel()]]
            out[at:at + v.numel()] = v
            at += v.numel()
        return out

    def _buf(self, like: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
        b = self._bufs.get((like.device, dtype))
        if b is None or b.numel() < n:
            b = self._bufs[(like.device, dtype)] = torch.empty(n, dtype=dtype, device=like.device)
        return b[:n]

    def _chunk(self, i: int, a: int) -> torch.Tensor:
        """Layer ``i``'s scores from ``a``, at most :data:`_CHUNK` of them, in float32 (a view,
        or the reused buffer: use it before taking the next)."""
        c = self.scores[i][a:a + _CHUNK]
        if c.dtype != torch.float32:
            c = self._buf(c, torch.float32, c.numel()).copy_(c)
        return c

    def _mask(self, i: int, a: int, op, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """``op(scores, t)`` of the free units of the chunk of layer ``i`` at ``a``, False at
        forced units, written into ``out`` (by default the reused buffer)."""
        c = self._chunk(i, a)
        b = op(c, t, out=self._buf(c, torch.bool, c.numel()) if out is None else out[a:a + c.numel()])
        if self.pruned[i] is not None:  # b and not pruned (as bools: b > pruned); in place
            torch.gt(b, self.pruned[i][a:a + c.numel()], out=b)
        return b

    def _starts(self, i: int) -> range:
        return range(0, self.scores[i].numel(), _CHUNK)

    def count(self, i: int, op, t: float) -> int:
        """Free units of layer ``i`` with ``op(score, t)`` (this rank's)."""
        c = self.compact[i]
        if c is not None:
            return sum(int(torch.count_nonzero(op(c[a:a + _CHUNK], t, out=self._buf(c, torch.bool, len(c[a:a + _CHUNK])))))
                       for a in range(0, c.numel(), _CHUNK))
        return sum(int(torch.count_nonzero(self._mask(i, a, op, t))) for a in self._starts(i))

    def fill(self, i: int, op, t: float) -> torch.Tensor:
        """A new bool tensor: ``op(score, t)`` for the free units of layer ``i``, False elsewhere."""
        s = self.scores[i]
        out = torch.empty(s.numel(), dtype=torch.bool, device=s.device)
        for a in self._starts(i):
            self._mask(i, a, op, t, out)
        return out

    def mark_last(self, i: int, t: float, k: int, out: torch.Tensor) -> None:
        """Set ``out`` at the ``k`` free units of layer ``i`` that score ``t`` with the highest
        indices."""
        for a in reversed(self._starts(i)):
            if k <= 0:
                return
            b = self._mask(i, a, torch.eq, t)
            n = int(torch.count_nonzero(b))
            p = 0
            if n > k:  # the largest p with k ties in b[p:] (counts only: no index tensor)
                hi = b.numel() - 1
                while p < hi:
                    mid = (p + hi + 1) // 2
                    if int(torch.count_nonzero(b[mid:])) >= k:
                        p = mid
                    else:
                        hi = mid - 1
            out[a + p:a + b.numel()].logical_or_(b[p:])
            k -= n

    def sample(self, i: int, stride: int) -> torch.Tensor:
        """Every ``stride``-th score of layer ``i`` that is free, float32 on the CPU."""
        if self.compact[i] is not None:
            return self.compact[i][::stride].cpu()
        s = self.scores[i][::stride]
        if self.pruned[i] is not None:
            s = s[~self.pruned[i][::stride]]
        return s.float().cpu()

    def between(self, i: int, lo: float, hi: float) -> torch.Tensor:
        """The free scores ``lo <= s <= hi`` of layer ``i``, float32 on the CPU."""
        parts, c = [], self.compact[i]
        if c is not None:
            for a in range(0, c.numel(), _CHUNK):
                v = c[a:a + _CHUNK]
                parts.append(v[(v >= lo).logical_and_(v <= hi)].cpu())
            return torch.cat(parts) if parts else torch.zeros(0)
        for a in self._starts(i):
            b = self._mask(i, a, torch.ge, lo)
            c = self._chunk(i, a)                    # the same scores (converted again if needed)
            parts.append(c[b.logical_and_(c <= hi)].cpu())
        return torch.cat(parts) if parts else torch.zeros(0)

    def bounds(self, i: int) -> tuple[float, float]:
        """``(min, max)`` of the scores of layer ``i`` in float32 (forced units included, except
        in a compacted layer; either bounds the threshold)."""
        if self.compact[i] is not None:
            if not self.compact[i].numel():
                return math.inf, -math.inf
            b = torch.aminmax(self.compact[i])
            return float(b.min), float(b.max)
        lo, hi = math.inf, -math.inf
        for a in self._starts(i):
            b = torch.aminmax(self._chunk(i, a))
            lo, hi = min(lo, float(b.min)), max(hi, float(b.max))
        return lo, hi


def _threshold(scan: _Scan, unit_weights, target, smin, smax, weight_at_most, sample: bool = True) -> float:
    """The smallest score ``t`` whose cumulative removed weight ``W(<= t)`` reaches ``target``.

    Fast path (unsharded layers only): bracket ``t`` with quantiles of a strided sample of the
    free units, verify the bracket by counting, then find ``t`` exactly among the few scores
    inside it. Otherwise (or if the bracket fails) bisection over the float32 order: 32 counting
    passes. Neither builds a tensor of all scores, nor copies a layer's scores.
    """
    layers = range(len(scan.scores))
    n_total = sum(scan.n_free)
    lo_key, hi_key = _key(smin), _key(smax)
    if sample and n_total > 4 * _SAMPLE:
        stride = max(1, n_total // _SAMPLE)
        parts = [scan.sample(i, stride) for i in layers]
        sample = torch.cat(parts)
        sample_w = torch.cat([torch.full((p.numel(),), float(w)) for p, w in zip(parts, unit_weights)])
        del parts
        order = torch.argsort(sample)
        cum = sample_w[order].cumsum(0) * (sum(w * n for w, n in zip(unit_weights, scan.n_free))
                                           / float(sample_w.sum()))
        m = sample.numel()
        pos = int(torch.searchsorted(cum, torch.tensor([float(target)], dtype=cum.dtype)).clamp(max=m - 1))
        q = min(max(pos / m, 1.0 / m), 1.0 - 1.0 / m)
        sigma = math.sqrt(m * q * (1.0 - q))   # rank spread of a sample quantile
        for widen in (1, 8):  # a failed bracket (a biased strided sample) is widened once
            margin = int(widen * (6 * sigma + 16))
            lo_v = float(sample[order[max(0, pos - margin)]])
            hi_v = float(sample[order[min(m - 1, pos + margin)]])
            below_n = [scan.count(i, torch.lt, lo_v) for i in layers]
            below = sum(w * c for w, c in zip(unit_weights, below_n))
            upto_n = [scan.count(i, torch.le, hi_v) for i in layers]
            upto = sum(w * c for w, c in zip(unit_weights, upto_n))
            if not below < target <= upto:
                continue
            if sum(upto_n) - sum(below_n) <= 64 * _SAMPLE:
                inside = [(scan.between(i, lo_v, hi_v), w) for i, w in zip(layers, unit_weights)]
                vals = torch.cat([c for c, _ in inside])
                wts = torch.cat([torch.full((c.numel(),), float(w), dtype=torch.float64) for c, w in inside])
                o = torch.argsort(vals)
                cw = below + wts[o].cumsum(0)
                i = int(torch.searchsorted(cw, torch.tensor([float(target)], dtype=torch.float64)))
                return float(vals[o[min(i, vals.numel() - 1)]])
            lo_key, hi_key = _key(lo_v), _key(hi_v)  # a narrower bracket for the bisection
            break
    lo, hi = lo_key, hi_key
    # keys of -inf/+inf bound every real float32; NaN keys lie outside [key(min), key(max)]
    while lo < hi:
        mid = (lo + hi) // 2
        if weight_at_most(_unkey(mid)) >= target:
            hi = mid
        else:
            lo = mid + 1
    return _unkey(hi)


def _global_lowest(layers: list[Units], target: float, unit_weights: list[int],
                   rounding: str = "half_up") -> dict[str, torch.Tensor]:
    """Prune the globally lowest units until the removed weight is (closest to) ``target``; with
    ``rounding="floor"``, the longest run of the order whose removed weight is at most ``target``.

    Units an earlier mask pruned come first and count toward ``target`` (also against free units
    that score ``-inf``): the rest is selected among the free units only. No layer's scores are
    copied: every pass compares one chunk at a time (:class:`_Scan`), so beyond the returned
    masks a call holds at most :data:`_CHUNK` units' temporaries.
    """
    forced = _gcounts(layers, [u.pruned for u in layers])
    if any(forced):
        target = target - sum(w * k for k, w in zip(forced, unit_weights))
    pruned = [u.pruned if k else None for u, k in zip(layers, forced)]
    total = sum(w * (u.n - k) for w, u, k in zip(unit_weights, layers, forced))
    if target <= 0 or target >= total:
        full = target > 0
        return {u.name: (p.clone() if p is not None and not full else
                         torch.full((u.scores.numel(),), full, dtype=torch.bool, device=u.scores.device))
                for u, p in zip(layers, pruned)}
    scan = _Scan([u.scores for u in layers], pruned)
    # the bracket of the bisection: forced units' scores widen it, never move the threshold
    bounds = [scan.bounds(i) for i, u in enumerate(layers) if u.scores.numel()]
    finite_min = min([b[0] for b in bounds], default=math.inf)
    finite_max = max([b[1] for b in bounds], default=-math.inf)
    sharded = _sharded(layers)
    if sharded:  # the bounds over every rank (the same group for every sharded layer)
        from ._distributed import all_reduce_floats

        lo, neg_hi = all_reduce_floats([finite_min, -finite_max], sharded[0].group,
                                       sharded[0].scores.device, op="min")
        finite_min, finite_max = lo, -neg_hi

    def weight_at_most(t: float) -> int:
        counts = _gsum(layers, [scan.count(i, torch.le, t) for i in range(len(layers))])
        return sum(w * c for w, c in zip(unit_weights, counts))

    t = _threshold(scan, unit_weights, target, finite_min, finite_max, weight_at_most,
                   sample=not sharded)
    out = {u.name: scan.fill(i, torch.lt, t) for i, u in enumerate(layers)}
    removed = sum(w * c for w, c in zip(unit_weights, _gcounts(layers, [out[u.name] for u in layers])))
    # ties at t: later layers first, higher index first, until the target is reached (closest)
    for i in reversed(range(len(layers))):
        u, w = layers[i], unit_weights[i]
        if removed >= target:
            break
        n_mine = scan.count(i, torch.eq, t)
        per_rank, me = [n_mine], 0
        if u.group is not None:  # the tie counts of every rank (rank order is index order)
            from ._distributed import all_reduce_ints, rank_in

            me, world = rank_in(u.group)
            per_rank = all_reduce_ints([n_mine if r == me else 0 for r in range(world)],
                                       u.group, u.scores.device)
        n_ties = sum(per_rank)
        if not n_ties:
            continue
        gap = target - removed
        take = min(n_ties, int(gap // w))
        stop = False
        if take < n_ties and rounding == "floor":
            stop = True            # the next unit would pass the target: the run ends here
        elif take < n_ties and gap - take * w > 0:
            rest = gap - take * w
            if w - rest <= rest:
                take += 1          # one more overshoots by less than stopping undershoots
            else:
                stop = True        # stopping here is closer to the target
        if take:
            # the highest ranks' ties go first; this rank takes what is left of ``take`` after them
            mine = min(per_rank[me], max(0, take - sum(per_rank[me + 1:])))
            if mine:
                scan.mark_last(i, t, mine, out[u.name])
            removed += take * w
        if stop:
            break
    for u, p in zip(layers, pruned):
        if p is not None:
            out[u.name].logical_or_(p)
    return out


def _global_with_bounds(layers, target_units_weight, unit_weights, lo_k, hi_k, rounding="half_up"):
    """Global selection where layer ``i`` must prune between ``lo_k[i]`` and ``hi_k[i]`` units."""
    fixed: dict[int, int] = {}
    result: dict[str, torch.Tensor] = {}
    while True:
        free = [i for i in range(len(layers)) if i not in fixed]
        rem = target_units_weight - sum(unit_weights[i] * k for i, k in fixed.items())
        result.clear()  # the last round's masks go before the next round's are made
        result = _global_lowest([layers[i] for i in free], rem, [unit_weights[i] for i in free],
                                rounding) if free else {}
        over, under, excess, deficit = {}, {}, 0, 0
        ks = _gcounts([layers[i] for i in free], [result[layers[i].name] for i in free])
        for i, k in zip(free, ks):
            if k > hi_k[i]:
                over[i] = hi_k[i]
                excess += unit_weights[i] * (k - hi_k[i])
            elif k < lo_k[i]:
                under[i] = lo_k[i]
                deficit += unit_weights[i] * (lo_k[i] - k)
        if not over and not under:
            break
        # Fix one side only: with excess >= deficit the final threshold is not lower, so the
        # layers over their cap stay there (and vice versa). Fixing both sides at once could
        # leave the total off the target.
        fixed.update(over if excess >= deficit else under)
    out = {}
    for i, u in enumerate(layers):
        if i in fixed:
            out[u.name] = _lowest_of(u, u.scores, fixed[i], u.pruned)
        else:
            out[u.name] = result[u.name]
    return out


# ---------------------------------------------------------------------------------------------
# allocation of per-layer densities (local scope)

def allocate_densities(numels, raws, density, lo, hi) -> list[float]:
    """Densities ``d_i = clip(eps * raw_i, lo_i, hi_i)`` with ``sum d_i * n_i = density * sum n_i``."""
    total = sum(numels)
    want = density * total
    low = sum(l * n for l, n in zip(lo, numels))
    high = sum(h * n for h, n in zip(hi, numels))
    if want < low - 1e-9 * total or want > high + 1e-9 * total:
        raise ValueError(
            f"sparsity {1 - density:g} is not reachable with the per-layer bounds "
            f"(reachable sparsity: {1 - high / total:g} to {1 - low / total:g})"
        )

    def f(eps):
        return sum(min(max(eps * r, l), h) * n for r, l, h, n in zip(raws, lo, hi, numels))

    a, b = 0.0, max(h / r for h, r in zip(hi, raws))
    for _ in range(200):
        mid = (a + b) / 2
        if f(mid) < want:
            a = mid
        else:
            b = mid
    return [min(max(b * r, l), h) for r, l, h in zip(raws, lo, hi)]


# ---------------------------------------------------------------------------------------------

def select(
    layers: Sequence[Units],
    *,
    sparsity: float | None = None,
    topk: int | float | None = None,
    threshold: float | None = None,
    scope: str = "local",
    allocation: str = "uniform",
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.98,
    count_rounding: str = "half_up",
) -> dict[str, torch.Tensor]:
    """Per layer, a 1-D bool *keep* mask over its units. See the module docstring for the rules.

    ``count_rounding`` (``"half_up"`` or ``"floor"``) turns ``sparsity`` into unit counts.
    A layer with no weights (``numel == 0``) is refused (``ValueError`` naming it) before any
    work: it has nothing to prune, and :func:`gradprune.prune` and :class:`gradprune.Pruner`
    skip such a layer (``not pruned: has no weights``) rather than pass it here.

        >>> import torch
        >>> u = Units("w", torch.tensor([0.5, 0.1, 0.2, 0.9]), weight=1, numel=4)
        >>> select([u], sparsity=0.7)["w"], select([u], sparsity=0.7, count_rounding="floor")["w"]  # 2.8 units
        (tensor([False, False, False,  True]), tensor([ True, False, False,  True]))
    """
    layers = list(layers)
    if not layers:
        raise ValueError("select needs at least one layer, got none")
    for u in layers:
        if u.numel <= 0 or u.weight <= 0:
            raise ValueError(f"layer {u.name!r} has no weights to select from (numel={u.numel}, "
                             f"weight={u.weight} per unit): leave an empty layer out, it has nothing to prune")
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be one of global, local; got {scope!r}")
    if sparsity is None and topk is None and threshold is None:
        raise ValueError("one of sparsity, topk or threshold must be set")
    check_topk("topk", topk)                  # bool and topk=0 are rejected everywhere
    check_threshold("threshold", threshold)
    check_choice("count_rounding", count_rounding, COUNT_ROUNDINGS)
    has_nan = [int(any(bool(torch.isnan(u.scores[a:a + _CHUNK]).any()) for a in range(0, u.scores.numel(), _CHUNK)))
               for u in layers]  # one chunk's temporary at a time
    for u, nans in zip(layers, _gsum(layers, has_nan)):
        if nans:
            raise ValueError(f"scores of {u.name!r} contain NaN")
    if sparsity is not None:
        pruned = _select_sparsity(layers, sparsity, scope, allocation, min_sparsity, max_sparsity,
                                  count_rounding)
    else:
        pruned = _select_topk_threshold(layers, topk, threshold, scope)
    out = {}
    for u in layers:  # each layer's pruned mask goes as its keep mask is made
        p = pruned.pop(u.name)
        out[u.name] = torch.logical_not(p) if u.pruned is None else torch.logical_or(p, u.pruned).logical_not_()
    return out


def _units_at_most(cap: float, u: Units) -> int:
    """The most units of ``u`` whose removal keeps its sparsity <= ``cap``: ``max_sparsity`` is a
    hard bound, so a tiny layer rounds down (4 weights at 0.98: 3 pruned, never 4)."""
    return min(u.n, int(math.floor(round(cap * u.scale, 9))))


def _select_sparsity(layers, sparsity, scope, allocation, min_s, max_s, rounding="half_up"):
    caps = [min(max_s, u.n / u.scale) for u in layers]
    floors = [min(min_s, c) for c in caps]
    if scope == "local":
        numels = [u.numel for u in layers]
        if allocation == "uniform" and all(f <= sparsity <= c for f, c in zip(floors, caps)):
            per_layer = [sparsity] * len(layers)
        else:
            raws = [u.raw for u in layers]
            dens = allocate_densities(numels, raws, 1.0 - sparsity,
                                      [1.0 - c for c in caps], [1.0 - f for f in floors])
            per_layer = [1.0 - d for d in dens]
        out = {}
        for u, s, c in zip(layers, per_layer, caps):
            k = max(u.n_forced(), min(_units_at_most(c, u), count_of(s * u.scale, rounding)))
            out[u.name] = _lowest_of(u, u.scores, k, u.pruned)
        return out
    # global
    weights = [u.weight for u in layers]
    total_numel = sum(u.numel for u in layers)
    same = len(set(weights)) == 1
    target = count_of(sparsity * total_numel / weights[0], rounding) * weights[0] if same \
        else (round(sparsity * total_numel, 9) if rounding == "floor" else sparsity * total_numel)
    hi_k = [max(u.n_forced(), _units_at_most(c, u)) for u, c in zip(layers, caps)]
    lo_k = [min(h, max(u.n_forced(), count_of(f * u.scale, rounding))) for u, f, h in zip(layers, floors, hi_k)]
    low = sum(w * k for w, k in zip(weights, lo_k))
    high = sum(w * k for w, k in zip(weights, hi_k))
    if target > high or target < low:
        raise ValueError(
            f"sparsity {sparsity:g} is not reachable with min_sparsity={min_s:g}, "
            f"max_sparsity={max_s:g} and this pattern (reachable: {low / total_numel:g} to "
            f"{high / total_numel:g})"
        )
    return _global_with_bounds(layers, target, weights, lo_k, hi_k, rounding)


def _select_topk_threshold(layers, topk, threshold, scope):
    # after an existing mask: threshold removes what scores below it, then topk keeps the best
    removed = {}
    for u in layers:
        if threshold is None:
            r = u.pruned  # None: nothing removed yet (no tensor needed)
        else:
            r = u.scores < threshold if u.pruned is None else u.pruned | (u.scores < threshold)
        removed[u.name] = r
    if topk is None:
        return {u.name: torch.zeros(u.scores.numel(), dtype=torch.bool, device=u.scores.device)
                if removed[u.name] is None else removed[u.name] for u in layers}

    def keep_count(remaining: int) -> int:
        if isinstance(topk, int):
            return min(topk, remaining)
        return min(remaining, math.ceil(round(topk * remaining, 9)))

    n_removed = _gcounts(layers, [removed[u.name] for u in layers])
    if scope == "local":
        out = {}
        for u, r in zip(layers, n_removed):
            out[u.name] = _lowest_of(u, u.scores.float(), u.n - keep_count(u.n - r), removed[u.name])
        return out
    remaining = sum(u.n - r for u, r in zip(layers, n_removed))
    k_prune = sum(u.n for u in layers) - keep_count(remaining)
    tmp = [Units(u.name, u.scores.float(), 1, u.n, removed[u.name], group=u.group, total=u.total)
           for u in layers]
    return _global_lowest(tmp, k_prune, [1] * len(tmp))
