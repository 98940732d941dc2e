"""Global selection (``scope="global"``) against a reference that sorts every score at once.

``gradprune.select`` finds the global threshold by counting passes over chunks of each layer
(``_CHUNK`` units at a time) and, for large inputs, by bracketing it with a strided sample first
(``_SAMPLE``). Both constants are shrunk here so that tiny layers go through several chunks, the
sample path, its fallback to bisection and the tie marking across chunk borders. The reference
is the rule of the module docstring written out directly: one stable ``argsort`` over the
concatenation of every layer's float32 scores (forced units first; among equal scores the later
layer and the higher index first), then the prefix of that order that the counting rule picks.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from fractions import Fraction
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import gradprune.select as sel
from gradprune.select import Units, select

SETTINGS = settings(max_examples=60, deadline=None)
INF = float("inf")

# ---------------------------------------------------------------------------------------------
# strategies

_f32 = dict(width=32, allow_nan=False, allow_infinity=False)
POOLS = (
    st.sampled_from([0.0, 1.0, 2.0]),                                   # heavy ties
    st.sampled_from([-INF, -1.0, -0.0, 0.0, 0.0, 3.0, INF]),            # ties, signed zeros, infs
    st.floats(-1e3, 1e3, **_f32),                                       # mostly distinct
    st.floats(0.0, 1.0, width=64),                                      # float64 that round to ties
)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@st.composite
def global_case(draw, mixed_weights: bool = False):
    """Layers (scores, forced, unit weight) plus the chunk and sample sizes to run with."""
    pool = draw(st.sampled_from(POOLS))
    dtype = draw(st.sampled_from(DTYPES))
    weight = draw(st.integers(1, 3))
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        vals = draw(st.lists(pool, min_size=1, max_size=40))
        forced = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=len(vals), max_size=len(vals))))
        w = draw(st.integers(1, 4)) if mixed_weights else weight
        layers.append((torch.tensor(vals, dtype=torch.float64).to(dtype), forced, w))
    chunk = draw(st.sampled_from([1, 3, 8, 1 << 20]))
    sample = draw(st.sampled_from([1, 2, 4, 1 << 16]))   # 1, 2, 4: the sampled bracket runs
    return layers, chunk, sample


def make_units(layers):
    return [Units(f"l{i}", s, w, s.numel() * w, None if f is None else torch.tensor(f, dtype=torch.bool))
            for i, (s, f, w) in enumerate(layers)]


@contextmanager
def sizes(chunk: int, sample: int):
    with mock.patch.object(sel, "_CHUNK", chunk), mock.patch.object(sel, "_SAMPLE", sample):
        yield


def select_global(layers, chunk: int, sample: int, unreachable: bool, **kw):
    """``select(..., scope="global")`` with these chunk and sample sizes; ``None`` after checking
    that an ``unreachable`` target raises ``ValueError``."""
    with sizes(chunk, sample):
        if unreachable:
            with pytest.raises(ValueError, match="not reachable"):
                select(make_units(layers), scope="global", **kw)
            return None
        return select(make_units(layers), scope="global", **kw)


# ---------------------------------------------------------------------------------------------
# the reference

def ref_order(layers):
    """``(layer, index)`` of every unit in pruning order: forced first, then by float32 score;
    among equal scores the later layer and the higher index first (a stable sort of the reversed
    concatenation)."""
    scores = torch.cat([s.float().reshape(-1) for s, _, _ in layers] or [torch.zeros(0)])
    forced = torch.cat([torch.tensor(f if f is not None else [False] * s.numel(), dtype=torch.bool)
                        for s, f, _ in layers] or [torch.zeros(0, dtype=torch.bool)])
    where = [(li, i) for li, (s, _, _) in enumerate(layers) for i in range(s.numel())]
    rev = torch.arange(scores.numel() - 1, -1, -1)
    o = rev[torch.argsort(scores[rev], stable=True)]
    o = o[torch.argsort((~forced[o]).to(torch.uint8), stable=True)]
    return [where[j] for j in o.tolist()]


def ref_prefix(layers, target: float, rounding: str) -> int:
    """Length of the pruned prefix of :func:`ref_order`: the removed weight closest to
    ``target`` (a tie goes to the longer prefix), or with ``"floor"`` the longest prefix whose
    removed weight does not exceed it."""
    weights = [layers[li][2] for li, _ in ref_order(layers)]
    done, j = 0, 0
    while j < len(weights) and done + weights[j] <= target:
        done += weights[j]
        j += 1
    if j < len(weights) and done < target and rounding == "half_up":
        if done + weights[j] - target <= target - done:
            j += 1
    return j


def pruned_sets(keep):
    return {(int(name[1:]), i) for name, m in keep.items() for i in torch.nonzero(~m).flatten().tolist()}


def n_forced(layers):
    return [0 if f is None else sum(f) for _, f, _ in layers]


def count(frac: Fraction, rounding: str) -> int:
    return math.floor(frac) if rounding == "floor" else math.floor(frac + Fraction(1, 2))


# ---------------------------------------------------------------------------------------------
# against the reference

@SETTINGS
@given(case=global_case(), pct=st.integers(0, 100), rounding=st.sampled_from(["half_up", "floor"]))
def test_equal_weights_prune_a_prefix_of_the_sorted_order(case, pct, rounding):
    layers, chunk, sample = case
    n = sum(s.numel() for s, _, _ in layers)
    k = count(Fraction(pct, 100) * n, rounding)
    keep = select_global(layers, chunk, sample, sum(n_forced(layers)) > k, sparsity=pct / 100,
                         max_sparsity=1.0, count_rounding=rounding)
    assert keep is None or pruned_sets(keep) == set(ref_order(layers)[:k])


@SETTINGS
@given(case=global_case(mixed_weights=True), pct=st.integers(0, 100),
       rounding=st.sampled_from(["half_up", "floor"]))
def test_mixed_unit_weights_prune_the_closest_prefix(case, pct, rounding):
    layers, chunk, sample = case
    numel = sum(s.numel() * w for s, _, w in layers)
    if len({w for _, _, w in layers}) == 1:   # one unit weight: counts round as units
        target = count(Fraction(pct, 100) * numel / layers[0][2], rounding) * layers[0][2]
    else:  # s * N as the float the selection computes (noise rounded off for floor)
        target = pct / 100 * numel if rounding == "half_up" else round(pct / 100 * numel, 9)
    forced_weight = sum(k * w for k, (_, _, w) in zip(n_forced(layers), layers))
    keep = select_global(layers, chunk, sample, forced_weight > target, sparsity=pct / 100,
                         max_sparsity=1.0, count_rounding=rounding)
    assert keep is None or pruned_sets(keep) == set(ref_order(layers)[:ref_prefix(layers, target, rounding)])


@SETTINGS
@given(case=global_case(), pct=st.integers(0, 100), min_pct=st.integers(0, 60),
       max_pct=st.integers(30, 100), rounding=st.sampled_from(["half_up", "floor"]))
def test_bounds_water_fill_the_sorted_order(case, pct, min_pct, max_pct, rounding):
    """Layer ``i`` prunes ``clip(c_i, lo_i, hi_i)`` units, where ``c_i`` are its units in the
    shortest prefix of the global order whose clipped counts reach the target; its lowest ones."""
    layers, chunk, sample = case
    min_pct = min(min_pct, max_pct)
    ns = [s.numel() for s, _, _ in layers]
    forced = n_forced(layers)
    hi = [max(f, math.floor(Fraction(max_pct, 100) * n)) for f, n in zip(forced, ns)]
    lo = [min(h, max(f, count(Fraction(min_pct, 100) * n, rounding))) for f, n, h in zip(forced, ns, hi)]
    total = count(Fraction(pct, 100) * sum(ns), rounding)
    kw = dict(sparsity=pct / 100, min_sparsity=min_pct / 100, max_sparsity=max_pct / 100, count_rounding=rounding)
    keep = select_global(layers, chunk, sample, not sum(lo) <= total <= sum(hi), **kw)
    if keep is None:
        return
    order = ref_order(layers)
    counts, pos = [0] * len(layers), 0
    clipped = lambda: [min(max(c, l), h) for c, l, h in zip(counts, lo, hi)]  # noqa: E731
    while sum(clipped()) < total:
        counts[order[pos][0]] += 1
        pos += 1
    want = set()
    for li, k in enumerate(clipped()):   # each layer: its own k first units of the order
        want |= set([u for u in order if u[0] == li][:k])
    assert pruned_sets(keep) == want


@SETTINGS
@given(case=global_case(), frac=st.floats(0.0, 1.0))
def test_global_lowest_direct_with_forced_units(case, frac):
    """``_global_lowest`` as sparse training calls it: a unit count, forced units first."""
    layers, chunk, sample = case
    layers = [(s, f, 1) for s, f, _ in layers]
    n = sum(s.numel() for s, _, _ in layers)
    k = max(sum(n_forced(layers)), round(frac * n))
    with sizes(chunk, sample):
        got = sel._global_lowest(make_units(layers), k, [1] * len(layers))
    assert {(int(name[1:]), i) for name, m in got.items() for i in torch.nonzero(m).flatten().tolist()} \
        == set(ref_order(layers)[:k])


@settings(max_examples=25, deadline=None)
@given(case=global_case(mixed_weights=True), pct=st.integers(0, 100),
       rounding=st.sampled_from(["half_up", "floor"]))
def test_chunk_and_sample_sizes_never_change_the_masks(case, pct, rounding):
    layers, _, _ = case
    results = []
    for chunk, sample in ((1 << 20, 1 << 16), (1, 1), (3, 2), (8, 4)):
        with sizes(chunk, sample):
            try:
                keep = select(make_units(layers), sparsity=pct / 100, scope="global", max_sparsity=1.0,
                              count_rounding=rounding)
            except ValueError as e:
                results.append(str(e))
                continue
        results.append({n: m.tolist() for n, m in keep.items()})
    assert all(r == results[0] for r in results)


# ---------------------------------------------------------------------------------------------
# memory: no copy of any layer's scores

class _Allocations(TorchDispatchMode):
    """The storages (data pointer, bytes) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                st_ = t.untyped_storage()
                self.seen[st_.data_ptr()] = max(self.seen.get(st_.data_ptr(), 0), st_.nbytes())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("forced_fraction", [None, 0.3, 0.9])
def test_global_selection_allocates_chunks_besides_its_masks(dtype, forced_fraction):
    """Besides the masks it returns (a bool per unit: one tensor per layer for the pruned units,
    one for the keep mask), a global selection allocates nothing larger than one chunk: no copy
    of the scores (float), of the forced units' complement, or of the tie indices (int64). Only a
    layer with at most a quarter of its units free gets a compact float32 copy of those (at most
    one byte per unit of the layer)."""
    gen = torch.Generator().manual_seed(0)
    sizes_ = [1000, 3000, 500]
    scores = [torch.randint(0, 40, (n,), generator=gen).to(dtype) for n in sizes_]   # many ties
    forced = [None if forced_fraction is None else torch.rand(n, generator=gen) < forced_fraction
              for n in sizes_]
    units = [Units(f"l{i}", s, 1, s.numel(), f) for i, (s, f) in enumerate(zip(scores, forced))]
    inputs = {t.untyped_storage().data_ptr() for t in scores + [f for f in forced if f is not None]}
    chunk = 64
    with sizes(chunk, 1 << 16), _Allocations() as mode:
        keep = select(units, sparsity=0.95, scope="global", max_sparsity=1.0)
    assert sum(int((~m).sum()) for m in keep.values()) == round(0.95 * sum(sizes_))
    big = sorted(nbytes for ptr, nbytes in mode.seen.items() if ptr not in inputs and nbytes > 8 * chunk)
    # freed storages' addresses may be reused (counted once): these are upper bounds
    assert all(nbytes <= max(sizes_) for nbytes in big), big
    assert len(big) <= (3 if forced_fraction == 0.9 else 2) * len(sizes_), big


def test_nan_in_a_later_chunk_is_found():
    s = torch.zeros(50)
    s[47] = float("nan")
    with sizes(8, 1 << 16), pytest.raises(ValueError, match="scores of 'w' contain NaN"):
        select([Units("w", s, 1, 50)], sparsity=0.5, scope="global")
