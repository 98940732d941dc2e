"""Property tests for ``gradprune.select``: exact counts, lowest-scored units, deterministic ties.

Every selection is compared with a brute-force reference written here from the rules in the
module docstring of ``gradprune.select`` (a stable sort over all units), never with the code
under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradprune._checks import round_half_up
from gradprune.select import Units, _prune_lowest, allocate_densities, raw_density, select

INF = float("inf")
SETTINGS = settings(max_examples=60, deadline=None)

# ---------------------------------------------------------------------------------------------
# strategies: small float32 score lists, often with many ties, negatives, -inf (and +inf)

_f32 = dict(width=32, allow_nan=False, allow_infinity=False)
SCORE_POOLS = (
    st.sampled_from([0.0, 1.0, 2.0]),                                  # heavy ties
    st.sampled_from([-INF, -1.0, 0.0, 0.0, 3.0]),                      # ties and -inf
    st.floats(-1e3, 1e3, **_f32),                                      # mostly distinct
    st.one_of(st.sampled_from([-INF, INF, -0.0, 0.0, -2.5, 1.0]), st.floats(-4, 4, **_f32)),
)


@st.composite
def score_layers(draw, min_layers=1, max_layers=4, min_size=1, max_size=12):
    pool = draw(st.sampled_from(SCORE_POOLS))
    n_layers = draw(st.integers(min_layers, max_layers))
    return [draw(st.lists(pool, min_size=min_size, max_size=max_size)) for _ in range(n_layers)]


@st.composite
def layers_with_forced(draw, **kw):
    layers = draw(score_layers(**kw))
    forced = [draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s))) for s in layers]
    return layers, forced


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


def make_units(layers, forced=None):
    out = []
    for i, s in enumerate(layers):
        p = None if forced is None else torch.tensor(forced[i], dtype=torch.bool)
        out.append(Units(f"l{i}", t32(s), weight=1, numel=len(s), pruned=p))
    return out


def pruned_of(keep):
    return {name: (~m).tolist() for name, m in keep.items()}


# ---------------------------------------------------------------------------------------------
# brute-force references

def ref_order(layers, forced=None):
    """Global pruning order: forced units first, then by score; among equal scores the later
    layer and the higher index first. Written as: list units in reverse, then a stable sort."""
    items = [(li, i) for li, s in enumerate(layers) for i in range(len(s))]
    items.reverse()

    def key(item):
        li, i = item
        f = forced[li][i] if forced is not None else False
        return (0 if f else 1, layers[li][i])

    return sorted(items, key=key)  # Python's sort is stable


def ref_prune_lowest(scores, k, forced=None):
    order = ref_order([scores], None if forced is None else [forced])
    out = [False] * len(scores)
    for _, i in order[: max(0, min(k, len(scores)))]:
        out[i] = True
    return out


def ref_global(layers, k, forced=None):
    out = [[False] * len(s) for s in layers]
    for li, i in ref_order(layers, forced)[:k]:
        out[li][i] = True
    return out


def ref_global_bounded(layers, total, lo, hi, forced=None):
    """Water-filling: walk the global order; layer i takes clip(count_i, lo_i, hi_i); stop at the
    first position where the clipped counts sum to ``total``; each layer prunes its lowest."""
    order = ref_order(layers, forced)
    counts = [0] * len(layers)

    def clipped():
        return [min(max(c, l), h) for c, l, h in zip(counts, lo, hi)]

    pos = 0
    while sum(clipped()) < total:
        counts[order[pos][0]] += 1
        pos += 1
    ks = clipped()
    assert sum(ks) == total
    return [ref_prune_lowest(s, k, None if forced is None else forced[li])
            for li, (s, k) in enumerate(zip(layers, ks))]


def half_up(frac: Fraction) -> int:
    return math.floor(frac + Fraction(1, 2))


def assert_lowest_pruned(scores, pruned, forced=None):
    """Every pruned (not forced) score <= every kept score."""
    p = [s for i, s in enumerate(scores) if pruned[i] and not (forced and forced[i])]
    k = [s for i, s in enumerate(scores) if not pruned[i]]
    if p and k:
        assert max(p) <= min(k)


# ---------------------------------------------------------------------------------------------
# _prune_lowest

@SETTINGS
@given(scores=score_layers(max_layers=1, max_size=20).map(lambda ls: ls[0]), data=st.data())
def test_prune_lowest_matches_reference(scores, data):
    k = data.draw(st.integers(-2, len(scores) + 2))
    got = _prune_lowest(t32(scores), k)
    assert got.dtype == torch.bool and got.shape == (len(scores),)
    assert got.tolist() == ref_prune_lowest(scores, k)
    assert int(got.sum()) == max(0, min(k, len(scores)))
    assert_lowest_pruned(scores, got.tolist())


def test_prune_lowest_ties_higher_index_first():
    s = t32([1.0, 0.0, 0.0, 0.0, 2.0])
    assert _prune_lowest(s, 1).tolist() == [False, False, False, True, False]
    assert _prune_lowest(s, 2).tolist() == [False, False, True, True, False]
    assert _prune_lowest(s, 4).tolist() == [True, True, True, True, False]


def test_docstring_example():
    u = Units("w", t32([0.5, 0.1, 0.1, 0.9]), weight=1, numel=4)
    assert select([u], sparsity=0.5)["w"].tolist() == [True, False, False, True]


# ---------------------------------------------------------------------------------------------
# sparsity, local scope

@SETTINGS
@given(layers=score_layers(), pct=st.integers(0, 100))
def test_local_exact_counts_and_lowest(layers, pct):
    s = pct / 100
    keep = select(make_units(layers), sparsity=s, scope="local", max_sparsity=1.0)
    assert list(keep) == [f"l{i}" for i in range(len(layers))]
    for i, scores in enumerate(layers):
        m = keep[f"l{i}"]
        assert m.dtype == torch.bool and m.shape == (len(scores),)
        k = half_up(Fraction(pct, 100) * len(scores))
        assert int((~m).sum()) == k
        assert (~m).tolist() == ref_prune_lowest(scores, k)
        assert_lowest_pruned(scores, (~m).tolist())


@pytest.mark.parametrize("s, n, k", [(0.5, 3, 2), (0.25, 2, 1), (0.25, 6, 2), (0.5, 1, 1),
                                     (0.9, 10, 9), (0.7, 5, 4), (0.3, 5, 2), (0.15, 10, 2),
                                     (0.58, 25, 15)])   # 0.58 * 25 = 14.499999999999998 in floats
def test_local_round_half_up(s, n, k):
    u = Units("w", torch.arange(n, dtype=torch.float32), weight=1, numel=n)
    keep = select([u], sparsity=s, max_sparsity=1.0)["w"]
    assert int((~keep).sum()) == k == round_half_up(s * n)
    assert (~keep).tolist() == [i < k for i in range(n)]  # the k lowest
    # global scope counts the same way over all layers together
    u = Units("a", torch.arange(n, dtype=torch.float32), 1, n)
    keep = select([u], sparsity=s, scope="global", max_sparsity=1.0)["a"]
    assert int((~keep).sum()) == k


@SETTINGS
@given(lf=layers_with_forced(), pct=st.integers(0, 100))
def test_local_chaining_with_pruned(lf, pct):
    layers, forced = lf
    keep = select(make_units(layers, forced), sparsity=pct / 100, scope="local", max_sparsity=1.0)
    for i, scores in enumerate(layers):
        pruned = (~keep[f"l{i}"]).tolist()
        n_forced = sum(forced[i])
        # forced units stay pruned ...
        assert all(p for p, f in zip(pruned, forced[i]) if f)
        # ... and count toward the target
        k = max(n_forced, half_up(Fraction(pct, 100) * len(scores)))
        assert sum(pruned) == k
        assert pruned == ref_prune_lowest(scores, k, forced[i])
        assert_lowest_pruned(scores, pruned, forced[i])


def test_local_forced_units_win_ties_with_minus_inf_scores():
    # a unit an earlier mask pruned and a free unit that scores -inf: the forced one counts
    u = Units("w", t32([0.0, -INF, 5.0]), weight=1, numel=3, pruned=torch.tensor([True, False, False]))
    keep = select([u], sparsity=1 / 3, max_sparsity=1.0)["w"]
    assert keep.tolist() == [False, True, True]
    keep = select([u], sparsity=2 / 3, max_sparsity=1.0)["w"]
    assert keep.tolist() == [False, False, True]


def test_local_same_result_twice():
    torch.manual_seed(3)
    s = torch.randint(0, 3, (50,)).float()
    a = select([Units("w", s, 1, 50)], sparsity=0.42)["w"]
    b = select([Units("w", s.clone(), 1, 50)], sparsity=0.42)["w"]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# sparsity, global scope

@SETTINGS
@given(layers=score_layers(), pct=st.integers(0, 100))
def test_global_matches_brute_force_sort(layers, pct):
    n_total = sum(map(len, layers))
    keep = select(make_units(layers), sparsity=pct / 100, scope="global", max_sparsity=1.0)
    k = half_up(Fraction(pct, 100) * n_total)
    got = [(~keep[f"l{i}"]).tolist() for i in range(len(layers))]
    assert sum(map(sum, got)) == k
    assert got == ref_global(layers, k)
    # one threshold: every pruned score <= every kept score, across layers
    flat_s = [x for s in layers for x in s]
    assert_lowest_pruned(flat_s, [x for p in got for x in p])


def test_global_ties_later_layer_first():
    a = Units("a", t32([1.0, 1.0]), 1, 2)
    b = Units("b", t32([1.0, 1.0]), 1, 2)
    keep = select([a, b], sparsity=0.25, scope="global", max_sparsity=1.0)
    assert keep["a"].tolist() == [True, True] and keep["b"].tolist() == [True, False]
    keep = select([a, b], sparsity=0.75, scope="global", max_sparsity=1.0)
    assert keep["a"].tolist() == [True, False] and keep["b"].tolist() == [False, False]


@SETTINGS
@given(lf=layers_with_forced(), pct=st.integers(0, 100))
def test_global_chaining_with_pruned(lf, pct):
    layers, forced = lf
    n_total = sum(map(len, layers))
    n_forced = sum(map(sum, forced))
    k = half_up(Fraction(pct, 100) * n_total)
    units = make_units(layers, forced)
    if n_forced > k:  # the forced units alone exceed the target
        with pytest.raises(ValueError, match="not reachable"):
            select(units, sparsity=pct / 100, scope="global", max_sparsity=1.0)
        return
    keep = select(units, sparsity=pct / 100, scope="global", max_sparsity=1.0)
    got = [(~keep[f"l{i}"]).tolist() for i in range(len(layers))]
    assert all(g for gl, fl in zip(got, forced) for g, f in zip(gl, fl) if f)
    assert sum(map(sum, got)) == k
    assert got == ref_global(layers, k, forced)


def test_global_forced_units_win_ties_with_minus_inf_scores():
    a = Units("a", t32([0.0, 1.0]), 1, 2, pruned=torch.tensor([True, False]))
    b = Units("b", t32([-INF, 1.0]), 1, 2)
    keep = select([a, b], sparsity=0.25, scope="global", max_sparsity=1.0)
    assert keep["a"].tolist() == [False, True] and keep["b"].tolist() == [True, True]


@SETTINGS
@given(layers=score_layers(min_layers=2, max_size=10), pct=st.integers(0, 100),
       max_pct=st.integers(10, 100))
def test_global_max_sparsity_caps_layers(layers, pct, max_pct):
    s, mx = pct / 100, max_pct / 100
    n_total = sum(map(len, layers))
    total = half_up(Fraction(pct, 100) * n_total)
    hi = [int(Fraction(max_pct, 100) * len(x)) for x in layers]  # max_sparsity is hard: floor
    units = make_units(layers)
    if total > sum(hi):
        with pytest.raises(ValueError, match="not reachable"):
            select(units, sparsity=s, scope="global", max_sparsity=mx)
        return
    keep = select(units, sparsity=s, scope="global", max_sparsity=mx)
    got = [(~keep[f"l{i}"]).tolist() for i in range(len(layers))]
    assert sum(map(sum, got)) == total                      # still exact in total
    assert all(sum(g) <= h for g, h in zip(got, hi))        # never above the cap
    assert got == ref_global_bounded(layers, total, [0] * len(layers), hi)


def test_global_capped_layer_share_goes_to_others():
    low = Units("low", torch.arange(10, dtype=torch.float32), 1, 10)          # would take all
    high = Units("high", torch.arange(100, 110, dtype=torch.float32), 1, 10)
    keep = select([low, high], sparsity=0.5, scope="global", max_sparsity=0.8)
    assert int((~keep["low"]).sum()) == 8
    assert int((~keep["high"]).sum()) == 2
    assert (~keep["high"]).tolist() == [True, True] + [False] * 8


@SETTINGS
@given(layers=score_layers(min_layers=2, max_size=10), pct=st.integers(0, 100),
       min_pct=st.integers(0, 60), max_pct=st.integers(40, 100))
def test_global_min_and_max_sparsity(layers, pct, min_pct, max_pct):
    assume(min_pct <= max_pct)
    n_total = sum(map(len, layers))
    total = half_up(Fraction(pct, 100) * n_total)
    hi = [int(Fraction(max_pct, 100) * len(x)) for x in layers]  # max_sparsity is hard: floor
    lo = [min(half_up(Fraction(min_pct, 100) * len(x)), h) for x, h in zip(layers, hi)]
    units = make_units(layers)
    kw = dict(sparsity=pct / 100, scope="global", min_sparsity=min_pct / 100,
              max_sparsity=max_pct / 100)
    if not sum(lo) <= total <= sum(hi):
        with pytest.raises(ValueError, match="not reachable"):
            select(units, **kw)
        return
    keep = select(units, **kw)
    got = [(~keep[f"l{i}"]).tolist() for i in range(len(layers))]
    assert sum(map(sum, got)) == total
    assert all(l <= sum(g) <= h for g, l, h in zip(got, lo, hi))
    assert got == ref_global_bounded(layers, total, lo, hi)


def test_global_min_and_max_both_bind():
    # the global order would prune all of "a" and none of "b"; a is capped at 8, b floored at 3
    a = Units("a", torch.arange(10, dtype=torch.float32), 1, 10)
    b = Units("b", torch.arange(100, 110, dtype=torch.float32), 1, 10)
    keep = select([a, b], sparsity=0.5, scope="global", min_sparsity=0.3, max_sparsity=0.8)
    assert int((~keep["a"]).sum()) + int((~keep["b"]).sum()) == 10
    assert (~keep["a"]).tolist() == [True] * 7 + [False] * 3
    assert (~keep["b"]).tolist() == [True] * 3 + [False] * 7


def test_global_mixed_unit_weights_closest_total():
    # an N:M-like layer (units remove 2 entries of 4-wide groups) beside an unstructured one
    torch.manual_seed(0)
    nm = Units("nm", torch.rand(8), weight=2, numel=32)   # 8 groups of 4, cap 0.5
    dense = Units("dense", torch.rand(20), weight=1, numel=20)
    for pct in range(0, 60, 3):
        keep = select([nm, dense], sparsity=pct / 100, scope="global", max_sparsity=1.0)
        removed = 2 * int((~keep["nm"]).sum()) + int((~keep["dense"]).sum())
        assert abs(removed - pct / 100 * 52) <= 1.0 + 1e-9


# ---------------------------------------------------------------------------------------------
# infeasible targets, NaN

@pytest.mark.parametrize("scope", ["local", "global"])
def test_infeasible_targets_raise(scope):
    units = [Units("a", torch.rand(10), 1, 10), Units("b", torch.rand(10), 1, 10)]
    with pytest.raises(ValueError):
        select(units, sparsity=0.99, scope=scope, max_sparsity=0.9)
    with pytest.raises(ValueError):
        select(units, sparsity=0.1, scope=scope, min_sparsity=0.5)
    # N:M units can remove at most half of each layer
    nm = [Units("nm", torch.rand(4), weight=2, numel=16)]
    with pytest.raises(ValueError):
        select(nm, sparsity=0.6, scope=scope, max_sparsity=1.0)


def test_local_capped_nm_layer_share_goes_to_others():
    nm = Units("nm", torch.rand(10), weight=2, numel=40)       # at most 20 of 40 entries
    dense = Units("dense", torch.rand(40), weight=1, numel=40)
    keep = select([nm, dense], sparsity=0.6, scope="local", max_sparsity=1.0)
    assert int((~keep["nm"]).sum()) == 10                        # every group pruned: 20 entries
    assert int((~keep["dense"]).sum()) == 28                     # 48 - 20


@pytest.mark.parametrize("scope", ["local", "global"])
def test_nan_scores_raise(scope):
    units = [Units("ok", torch.rand(4), 1, 4), Units("bad", t32([0.1, float("nan"), 0.2]), 1, 3)]
    with pytest.raises(ValueError, match="'bad'.*NaN"):
        select(units, sparsity=0.5, scope=scope)
    with pytest.raises(ValueError, match="NaN"):
        select(units, topk=1, scope=scope)


def test_select_argument_errors():
    u = Units("w", torch.rand(4), 1, 4)
    with pytest.raises(ValueError, match="at least one layer"):
        select([], sparsity=0.5)
    with pytest.raises(ValueError, match="scope"):
        select([u], sparsity=0.5, scope="globl")
    with pytest.raises(ValueError, match="sparsity, topk or threshold"):
        select([u])


@pytest.mark.parametrize("topk", [0, -1, True, False, 0.0, 1.5, -0.2, float("nan")])
def test_select_rejects_bad_topk(topk):
    u = Units("w", torch.rand(4), 1, 4)
    with pytest.raises((TypeError, ValueError), match="topk"):
        select([u], topk=topk)


# ---------------------------------------------------------------------------------------------
# topk / threshold / mask chaining

def ref_keep_count(topk, remaining, topk_frac):
    if topk_frac is None:
        return min(topk, remaining)
    return min(remaining, math.ceil(topk_frac * remaining))


@st.composite
def topk_args(draw):
    kind = draw(st.sampled_from(["int", "float", "none"]))
    if kind == "int":
        k = draw(st.integers(1, 30))
        return k, None
    if kind == "float":
        pct = draw(st.integers(1, 100))
        return pct / 100, Fraction(pct, 100)
    return None, None


@SETTINGS
@given(lf=layers_with_forced(), tk=topk_args(), scope=st.sampled_from(["local", "global"]),
       use_mask=st.booleans(), data=st.data())
def test_mask_threshold_topk_chain(lf, tk, scope, use_mask, data):
    layers, forced = lf
    if not use_mask:
        forced = [[False] * len(s) for s in layers]
    flat = [x for s in layers for x in s]
    threshold = data.draw(st.one_of(st.none(), st.sampled_from(flat)))
    topk, frac = tk
    assume(topk is not None or threshold is not None)
    assume(threshold != math.inf)  # refused: it would prune everything
    units = make_units(layers, forced if use_mask else None)
    keep = select(units, topk=topk, threshold=threshold, scope=scope)

    # reference: mask -> threshold (keep >= threshold) -> topk of what remains
    removed = [[f or (threshold is not None and x < threshold) for x, f in zip(s, fl)]
               for s, fl in zip(layers, forced)]
    if topk is None:
        want = removed
    elif scope == "local":
        want = []
        for s, r in zip(layers, removed):
            k_keep = ref_keep_count(topk, len(s) - sum(r), frac)
            want.append(ref_prune_lowest(s, len(s) - k_keep, r))
    else:
        remaining = sum(len(s) - sum(r) for s, r in zip(layers, removed))
        k_keep = ref_keep_count(topk, remaining, frac)
        want = ref_global(layers, len(flat) - k_keep, removed)
    got = [(~keep[f"l{i}"]).tolist() for i in range(len(layers))]
    assert got == want


def test_topk_int_and_float_semantics():
    s = t32([0.5, 0.9, 0.1, 0.7, 0.3])
    u = Units("w", s, 1, 5)
    assert select([u], topk=2)["w"].tolist() == [False, True, False, True, False]
    assert select([u], topk=1)["w"].tolist() == [False, True, False, False, False]  # int 1: one
    assert select([u], topk=1.0)["w"].all()                                       # float 1.0: all
    assert select([u], topk=99)["w"].all()                                        # capped
    assert int(select([u], topk=0.3)["w"].sum()) == 2                             # ceil(1.5)
    assert int(select([u], topk=0.2)["w"].sum()) == 1                             # ceil(1.0) exactly
    # threshold first: 0.5, 0.9, 0.7 remain; then topk of what remains
    assert select([u], threshold=0.5)["w"].tolist() == [True, True, False, True, False]
    assert select([u], threshold=0.5, topk=0.5)["w"].tolist() == [False, True, False, True, False]
    assert select([u], threshold=0.5, topk=1)["w"].tolist() == [False, True, False, False, False]
    # a mask first: 0.9 already pruned, then threshold, then topk
    um = Units("w", s, 1, 5, pruned=torch.tensor([False, True, False, False, False]))
    assert select([um], threshold=0.5, topk=5)["w"].tolist() == [True, False, False, True, False]
    assert select([um], threshold=0.5, topk=1)["w"].tolist() == [False, False, False, True, False]


def test_topk_global_one_count_over_layers():
    a = Units("a", t32([1.0, 5.0, 3.0]), 1, 3)
    b = Units("b", t32([4.0, 2.0]), 1, 2)
    keep = select([a, b], topk=2, scope="global")
    assert keep["a"].tolist() == [False, True, False] and keep["b"].tolist() == [True, False]
    keep = select([a, b], topk=0.5, scope="global")  # ceil(2.5) = 3
    assert keep["a"].tolist() == [False, True, True] and keep["b"].tolist() == [True, False]


# ---------------------------------------------------------------------------------------------
# allocation (er / erk)

SHAPES = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.tuples(st.integers(1, 16), st.integers(1, 16), st.integers(1, 3), st.integers(1, 3)),
)


@SETTINGS
@given(shapes=st.lists(SHAPES, min_size=1, max_size=5), allocation=st.sampled_from(["er", "erk"]),
       density=st.floats(0.01, 1.0), max_pct=st.integers(50, 100), min_pct=st.integers(0, 40))
def test_allocate_densities_bounds_and_total(shapes, allocation, density, max_pct, min_pct):
    numels = [math.prod(s) for s in shapes]
    raws = [raw_density(s, allocation) for s in shapes]
    lo = [1 - max_pct / 100] * len(shapes)
    hi = [1 - min_pct / 100] * len(shapes)
    total = sum(numels)
    assume(abs(density - lo[0]) > 1e-6 and abs(density - hi[0]) > 1e-6)
    if not lo[0] <= density <= hi[0]:
        with pytest.raises(ValueError, match="not reachable"):
            allocate_densities(numels, raws, density, lo, hi)
        return
    dens = allocate_densities(numels, raws, density, lo, hi)
    assert all(l <= d <= h and d <= 1.0 for d, l, h in zip(dens, lo, hi))
    assert sum(d * n for d, n in zip(dens, numels)) == pytest.approx(density * total, rel=1e-9,
                                                                      abs=1e-9)
    # one scale factor: layers strictly inside the bounds have density proportional to raw
    inside = [(d, r) for d, r, l, h in zip(dens, raws, lo, hi) if l + 1e-9 < d < h - 1e-9]
    for d, r in inside:
        assert d / r == pytest.approx(inside[0][0] / inside[0][1], rel=1e-9)
    # a larger raw density never gets a smaller density
    for (d1, r1) in zip(dens, raws):
        for (d2, r2) in zip(dens, raws):
            if r1 <= r2:
                assert d1 <= d2 + 1e-12


def test_raw_density_formulas():
    assert raw_density((16, 8), "uniform") == 1.0
    assert raw_density((16, 8), "er") == pytest.approx((8 + 16) / (8 * 16))
    assert raw_density((16, 8, 3, 3), "er") == pytest.approx((8 + 16) / (8 * 16))   # kernel ignored
    assert raw_density((16, 8, 3, 3), "erk") == pytest.approx((16 + 8 + 3 + 3) / (16 * 8 * 9))
    with pytest.raises(ValueError, match="allocation"):
        raw_density((4, 4), "lamp")


def test_erk_small_layer_clipped_dense_and_rest_rescaled():
    numels = [16, 1_000_000]
    raws = [raw_density((4, 4), "erk"), raw_density((1000, 1000), "erk")]
    dens = allocate_densities(numels, raws, 0.5, [0.0, 0.0], [1.0, 1.0])
    assert dens[0] == 1.0                                      # never above 1
    assert dens[1] == pytest.approx((0.5 * 1_000_016 - 16) / 1_000_000, rel=1e-12)


@pytest.mark.parametrize("allocation", ["er", "erk"])
def test_select_local_with_allocation(allocation):
    torch.manual_seed(0)
    shapes = [(8, 4), (32, 32), (16, 8, 3, 3)]
    units = [Units(f"l{i}", torch.rand(math.prod(s)), 1, math.prod(s),
                   raw=raw_density(s, allocation)) for i, s in enumerate(shapes)]
    keep = select(units, sparsity=0.7, scope="local", allocation=allocation, max_sparsity=0.98)
    numels = [u.numel for u in units]
    dens = allocate_densities(numels, [u.raw for u in units], 0.3, [0.02] * 3, [1.0] * 3)
    pruned = [int((~keep[u.name]).sum()) for u in units]
    assert pruned == [round_half_up((1 - d) * n) for d, n in zip(dens, numels)]
    assert abs(sum(pruned) - 0.7 * sum(numels)) <= len(units) / 2
    # the layer with the largest raw density keeps the most, proportionally
    order_raw = sorted(range(3), key=lambda i: units[i].raw)
    order_sp = sorted(range(3), key=lambda i: -pruned[i] / numels[i])
    assert order_raw == order_sp
    for u in units:  # within each layer, the lowest scores go
        assert_lowest_pruned(u.scores.tolist(), (~keep[u.name]).tolist())
