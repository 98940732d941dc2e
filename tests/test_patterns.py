"""Tests for ``gradprune.patterns``: unit order, reduce, expand, N:M, misfit.

Each pattern is checked against a reference written here from the table in the module docstring:
a weight is viewed as ``[out, in * prod(kernel)]`` and every unit is a list of entries of that
matrix, in row-major unit order.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradprune.patterns import as_matrix, get_pattern

PATTERNS = ["1x1", "4x1", "2x2", "1x4", "2:4", "1:4", "2:4-flat", "channel", "kernel"]
LINEAR = (8, 16)
CONV2D = (8, 4, 3, 3)      # input flattened with the kernel: 36
CONV1D = (4, 2, 4)         # 8
SHAPES = [LINEAR, CONV2D, CONV1D]


def fits(spec, shape):
    return get_pattern(spec).misfit(torch.Size(shape)) is None


CASES = [(p, s) for p in PATTERNS for s in SHAPES if fits(p, s)]


def test_every_pattern_has_cases():
    assert {p for p, _ in CASES} == set(PATTERNS)
    assert ("kernel", LINEAR) not in CASES
    assert ("kernel", CONV2D) in CASES and ("2:4", CONV2D) in CASES


# ---------------------------------------------------------------------------------------------
# reference

def ref_units(spec, shape):
    """Units in order, each a list of (row, col) entries of the [out, in*kernel] matrix."""
    out, inp = shape[0], math.prod(shape[1:])
    if spec == "channel":
        return [[(o, c) for c in range(inp)] for o in range(out)]
    if spec == "kernel":
        k = math.prod(shape[2:])
        return [[(o, i * k + j) for j in range(k)] for o in range(out) for i in range(shape[1])]
    if ":" in spec:
        m = nm_of(spec)[1]
        if len(shape) > 2 and not spec.endswith("-flat"):   # m input channels at one kernel position
            k = math.prod(shape[2:])
            return [[(o, (g * m + j) * k + pos) for j in range(m)]
                    for o in range(out) for pos in range(k) for g in range(shape[1] // m)]
        return [[(o, g * m + j) for j in range(m)] for o in range(out) for g in range(inp // m)]
    r, c = map(int, spec.split("x"))
    return [[(br * r + i, bc * c + j) for i in range(r) for j in range(c)]
            for br in range(out // r) for bc in range(inp // c)]


def nm_of(spec):
    n, m = spec.removesuffix("-flat").split(":")
    return int(n), int(m)


def reduce_ref(values, how):
    if how == "mean":
        return sum(values) / len(values)
    if how == "sum":
        return sum(values)
    return max(values)


def nm_prune_order(group_scores):
    """Positions in a group from first-to-prune to last: lowest first, ties higher index first."""
    return sorted(range(len(group_scores)), key=lambda j: (group_scores[j], -j))


def ref_unit_scores(spec, scores, how, signed=False):
    mat = as_matrix(scores).double()
    if not signed:
        mat = mat.abs()
    out = []
    for unit in ref_units(spec, scores.shape):
        vals = [float(mat[r, c]) for r, c in unit]
        if ":" in spec:
            n, m = nm_of(spec)
            order = nm_prune_order(vals)
            out.append(reduce_ref([vals[j] for j in order[: m - n]], how))
        else:
            out.append(reduce_ref(vals, how))
    return out


def ref_expand(spec, keep, scores, signed=False):
    mat = as_matrix(scores).double()
    if not signed:
        mat = mat.abs()
    mask = torch.ones(mat.shape, dtype=torch.bool)
    for u, unit in enumerate(ref_units(spec, scores.shape)):
        if keep[u]:
            continue
        if ":" in spec:
            n, m = nm_of(spec)
            vals = [float(mat[r, c]) for r, c in unit]
            for j in nm_prune_order(vals)[: m - n]:
                mask[unit[j]] = False
        else:
            for rc in unit:
                mask[rc] = False
    return mask.reshape(scores.shape)


# ---------------------------------------------------------------------------------------------
# unit scores and expand against the reference

@pytest.mark.parametrize("spec, shape", CASES, ids=[f"{p}-{s}" for p, s in CASES])
@pytest.mark.parametrize("how", ["mean", "sum", "max"])
def test_unit_scores_shape_order_and_reduce(spec, shape, how):
    torch.manual_seed(1)
    scores = torch.randn(shape)          # signed: multi-entry units must reduce |scores|
    if spec == "1x1":                    # unsigned criteria give scores >= 0 (Criterion.signed)
        scores = scores.abs()
    p = get_pattern(spec)
    us = p.unit_scores(scores, how)
    assert us.dim() == 1 and us.dtype == torch.float32
    assert us.numel() == p.n_units(torch.Size(shape)) == len(ref_units(spec, shape))
    assert us.tolist() == pytest.approx(ref_unit_scores(spec, scores, how), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("spec, shape", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_expand_matches_reference(spec, shape):
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(shape, generator=gen)
    p = get_pattern(spec)
    n = p.n_units(torch.Size(shape))
    keep = torch.rand(n, generator=gen) < 0.5
    m = p.expand(keep, scores)
    assert m.dtype == torch.bool and m.shape == scores.shape
    assert torch.equal(m, ref_expand(spec, keep.tolist(), scores))


@pytest.mark.parametrize("spec, shape", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_expand_all_true_and_all_false(spec, shape):
    scores = torch.randn(shape)
    p = get_pattern(spec)
    size = torch.Size(shape)
    n = p.n_units(size)
    assert p.expand(torch.ones(n, dtype=torch.bool), scores).all()
    m = p.expand(torch.zeros(n, dtype=torch.bool), scores)
    pruned = int((~m).sum())
    assert pruned == n * p.unit_weight(size)
    assert pruned / m.numel() == p.max_sparsity(size)
    expected = {"2:4": 0.5, "2:4-flat": 0.5, "1:4": 0.75}.get(spec, 1.0)
    assert p.max_sparsity(size) == expected


FIXED_CASES = [(p, s) for p, s in CASES if ":" not in p]  # N:M: see the N:M tests


@pytest.mark.parametrize("spec, shape", FIXED_CASES, ids=[f"{p}-{s}" for p, s in FIXED_CASES])
def test_unit_order_one_hot(spec, shape):
    """Pruning unit u alone removes exactly the entries the reference lists for unit u."""
    p = get_pattern(spec)
    scores = torch.rand(shape)
    units = ref_units(spec, shape)
    for u in range(len(units)):
        keep = torch.ones(len(units), dtype=torch.bool)
        keep[u] = False
        gone = (~as_matrix(p.expand(keep, scores))).nonzero().tolist()
        assert sorted(map(tuple, gone)) == sorted(units[u])


# ---------------------------------------------------------------------------------------------
# block masks, reduce, signed

@settings(max_examples=30, deadline=None)
@given(spec=st.sampled_from(["4x1", "2x2", "1x4", "2x4"]), out_blocks=st.integers(1, 3),
       in_blocks=st.integers(1, 3), kernel=st.sampled_from([(), (1,), (2, 1)]), seed=st.integers(0, 99))
def test_block_masks_constant_within_blocks(spec, out_blocks, in_blocks, kernel, seed):
    r, c = map(int, spec.split("x"))
    k = math.prod(kernel)
    if (in_blocks * c) % k:
        in_blocks *= k
    shape = (out_blocks * r, in_blocks * c // k, *kernel) if kernel else (out_blocks * r, in_blocks * c)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=gen)
    p = get_pattern(spec)
    assert p.misfit(torch.Size(shape)) is None
    keep = torch.rand(p.n_units(torch.Size(shape)), generator=gen) < 0.5
    mat = as_matrix(p.expand(keep, scores)).reshape(out_blocks, r, -1, c)
    per_block = mat.permute(0, 2, 1, 3).reshape(out_blocks, -1, r * c)
    assert (per_block.all(-1) | ~per_block.any(-1)).all()              # constant in each block
    assert torch.equal(per_block[..., 0].reshape(-1), keep)            # row-major block order


def test_reduce_from_absolute_scores():
    s = torch.tensor([[-4.0, 1.0], [2.0, -3.0]])
    p = get_pattern("2x2")
    assert p.unit_scores(s, "mean").tolist() == [2.5]
    assert p.unit_scores(s, "sum").tolist() == [10.0]
    assert p.unit_scores(s, "max").tolist() == [4.0]
    # signed scores (e.g. movement) are reduced as they are
    assert p.unit_scores(s, "mean", signed=True).tolist() == [-1.0]
    assert p.unit_scores(s, "sum", signed=True).tolist() == [-4.0]
    assert p.unit_scores(s, "max", signed=True).tolist() == [2.0]
    c = get_pattern("channel")
    assert c.unit_scores(s, "max").tolist() == [4.0, 3.0]
    assert c.unit_scores(s, "sum", signed=True).tolist() == [-3.0, -1.0]
    k = get_pattern("kernel")
    w = torch.tensor([[[-1.0, 5.0], [2.0, -2.0]]])   # [1, 2, 2]
    assert k.unit_scores(w, "max").tolist() == [5.0, 2.0]
    assert k.unit_scores(w, "mean", signed=True).tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="reduce"):
        p.unit_scores(s, "median")


def test_one_by_one_is_the_identity():
    s = torch.randn(4, 3, 2)
    p = get_pattern("1x1")
    assert torch.equal(p.unit_scores(s, signed=True), s.reshape(-1))
    keep = torch.rand(24) < 0.5
    assert torch.equal(p.expand(keep, s), keep.reshape(4, 3, 2))
    assert p.unit_weight(s.shape) == 1 and p.n_units(s.shape) == 24


# ---------------------------------------------------------------------------------------------
# N:M

@settings(max_examples=40, deadline=None)
@given(nm=st.sampled_from([(2, 4), (1, 4), (3, 4), (1, 2), (2, 8)]), out=st.integers(1, 4),
       groups=st.integers(1, 3), conv=st.sampled_from(["", "-flat", "-conv2d"]),
       pool=st.sampled_from(["ties", "floats"]), data=st.data())
def test_nm_keeps_n_of_every_m(nm, out, groups, conv, pool, data):
    n, m = nm
    if conv == "-flat":  # [out, in, k]: the input is flattened with the kernel
        shape = (out, groups, m)
    elif conv == "-conv2d":  # [out, in, kh, kw]: m channels at each of the kh*kw positions
        shape = (out, m, 1, groups)
    else:
        shape = (out, groups * m)
    numel = math.prod(shape)
    elem = st.sampled_from([-1.0, 0.0, 1.0, 2.0]) if pool == "ties" else st.floats(-10, 10, width=32)
    scores = torch.tensor(data.draw(st.lists(elem, min_size=numel, max_size=numel)),
                          dtype=torch.float32).reshape(shape)
    p = get_pattern(f"{n}:{m}" + ("-flat" if conv == "-flat" else ""))
    assert p.misfit(torch.Size(shape)) is None
    units = p.n_units(torch.Size(shape))
    assert units == out * groups and p.unit_weight(torch.Size(shape)) == m - n
    mask = p.expand(torch.zeros(units, dtype=torch.bool), scores)
    if conv == "-conv2d":
        g_mask = mask.permute(0, 2, 3, 1).reshape(out, groups, m)
        g_abs = scores.abs().permute(0, 2, 3, 1).reshape(out, groups, m)
    else:
        g_mask = as_matrix(mask).reshape(out, groups, m)
        g_abs = as_matrix(scores).abs().reshape(out, groups, m)
    assert (g_mask.sum(-1) == n).all()                                  # exactly N kept of M
    for o in range(out):
        for g in range(groups):
            vals = g_abs[o, g].tolist()
            want = [True] * m
            for j in nm_prune_order(vals)[: m - n]:                    # lowest |score| pruned,
                want[j] = False                                        # ties: higher index first
            assert g_mask[o, g].tolist() == want
    # a kept group is untouched; a mix prunes only the chosen groups
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=units, max_size=units)))
    mixed = p.groups(p.expand(keep, scores)).reshape(out * groups, m)
    assert mixed[keep].all()
    assert torch.equal(mixed[~keep], g_mask.reshape(-1, m)[~keep])


def test_nm_docstring_example_and_ties():
    p = get_pattern("2:4")
    w = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    assert p.expand(torch.tensor([False]), w).tolist() == [[True, False, True, False]]
    t = torch.tensor([[1.0, 1.0, 1.0, 1.0, -5.0, 5.0, 0.0, 5.0]])
    m = p.expand(torch.tensor([False, False]), t)
    assert m.tolist() == [[True, True, False, False, True, True, False, False]]
    assert p.unit_scores(t, "mean").tolist() == [1.0, 2.5]   # mean |s| of the entries it prunes
    assert p.unit_scores(t, "max").tolist() == [1.0, 5.0]
    # signed: the lowest signed scores go
    ms = p.expand(torch.tensor([True, False]), t, signed=True)
    assert ms.tolist() == [[True, True, True, True, False, True, False, True]]


def test_nm_flat_conv_groups_run_over_the_flattened_kernel():
    p = get_pattern("2:4-flat")
    w = torch.arange(1.0, 17.0).reshape(1, 2, 2, 4).flip(-1)   # in*kh*kw = 16 -> 4 groups
    mask = p.expand(torch.zeros(4, dtype=torch.bool), w)
    flat = as_matrix(w)
    for g in range(4):
        vals = flat[0, 4 * g: 4 * g + 4]
        kept = as_matrix(mask)[0, 4 * g: 4 * g + 4]
        assert sorted(vals[kept].tolist()) == sorted(vals.tolist())[2:]


# ---------------------------------------------------------------------------------------------
# misfit and parsing

@pytest.mark.parametrize("spec, shape", [
    ("2:4", (4, 9)),             # in not divisible by 4
    ("2:4", (4, 2, 3)),          # conv: in*kernel = 6
    ("2:4", (4, 2, 2)),          # conv: in = 2 channels per kernel position
    ("2:4-flat", (4, 2, 3)),
    ("1:4", (4, 10)),
    ("kernel", (4, 8)),          # kernel needs a conv weight
    ("kernel", (8,)),
    ("4x1", (6, 8)),             # out not divisible by 4
    ("1x4", (8, 6)),
    ("2x2", (3, 4)),
    ("2x2", (4, 3, 1, 1)),
    ("1x1", (8,)),               # 1-D: never
    ("channel", (8,)),
    ("2:4", (8,)),
])
def test_misfit_gives_a_reason(spec, shape):
    why = get_pattern(spec).misfit(torch.Size(shape))
    assert isinstance(why, str) and why
    assert str(shape[0]) in why or spec in why or str(tuple(shape)) in why


@pytest.mark.parametrize("spec, shape", [
    ("2:4", (4, 8)), ("2:4", (4, 4, 2)), ("2:4-flat", (4, 2, 2)), ("kernel", (4, 2, 3)), ("kernel", (4, 2, 3, 3)),
    ("4x1", (8, 3)), ("1x4", (3, 8)), ("2x2", (4, 2, 1, 2)), ("1x1", (5, 7)), ("channel", (3, 5)),
    ("channel", (3, 2, 5, 5)),
])
def test_misfit_none_when_it_fits(spec, shape):
    assert get_pattern(spec).misfit(torch.Size(shape)) is None


def test_get_pattern_parsing():
    assert get_pattern("4x1").rows == 4 and get_pattern("4x1").cols == 1
    assert (get_pattern("2:4").n, get_pattern("2:4").m) == (2, 4)
    assert get_pattern("channel").spec == "channel"
    for bad in ["0x4", "4:2", "2:2", "0:4", "abc", "4x", "2 :4", ""]:
        with pytest.raises(ValueError, match="pattern"):
            get_pattern(bad)
    with pytest.raises(TypeError, match="pattern must be str, got int"):
        get_pattern(4)
