"""``PruneConfig.count_rounding``: ``"half_up"`` (default) or ``"floor"`` (Neural Compressor's
``int(units * sparsity)``), pinned against counts computed here in exact integer arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import gradprune as gp
from gradprune.masks import build_masks
from gradprune.patterns import get_pattern
from gradprune.select import Units, select

SETTINGS = settings(max_examples=40, deadline=None)


def expected(k: int, d: int, units: int, rounding: str) -> int:
    """Units pruned at sparsity k/d of ``units``, exactly (no floats)."""
    if rounding == "floor":
        return (k * units) // d
    return (2 * k * units + d) // (2 * d)  # halves up


@st.composite
def layer_shapes(draw, pattern):
    rows, cols = {"1x1": (1, 1), "4x1": (4, 1), "1x4": (1, 4), "2x2": (2, 2)}[pattern]
    n_layers = draw(st.integers(1, 3))
    return [(rows * draw(st.integers(1, 6)), cols * draw(st.integers(1, 6))) for _ in range(n_layers)]


def _pruned_units(mask, pattern):
    kind_rows, kind_cols = {"1x1": (1, 1), "4x1": (4, 1), "1x4": (1, 4), "2x2": (2, 2)}[pattern]
    return int((~mask).sum()) // (kind_rows * kind_cols)


@SETTINGS
@given(data=st.data(), pattern=st.sampled_from(["1x1", "4x1", "1x4", "2x2"]),
       rounding=st.sampled_from(["floor", "half_up"]), scope=st.sampled_from(["local", "global"]),
       d=st.integers(1, 40))
def test_block_counts_match_exact_computation(data, pattern, rounding, scope, d):
    shapes = data.draw(layer_shapes(pattern))
    k = data.draw(st.integers(0, d - 1))
    sparsity = k / d
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    params = {f"l{i}": torch.ones(s) for i, s in enumerate(shapes)}
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
    masks = build_masks(params, scores, get_pattern(pattern), sparsity=sparsity, scope=scope,
                        max_sparsity=1.0, count_rounding=rounding)
    unit = {"1x1": 1, "4x1": 4, "1x4": 4, "2x2": 4}[pattern]
    units = {n: p.numel() // unit for n, p in params.items()}
    if scope == "local":
        for n in params:
            assert _pruned_units(masks[n], pattern) == expected(k, d, units[n], rounding)
    else:
        got = sum(_pruned_units(masks[n], pattern) for n in params)
        assert got == expected(k, d, sum(units.values()), rounding)


@SETTINGS
@given(data=st.data(), d=st.integers(2, 40), rounding=st.sampled_from(["floor", "half_up"]))
def test_nm_group_counts_match_exact_computation(data, d, rounding):
    out, groups = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    k = data.draw(st.integers(0, d // 2))          # at most 2:4's own ratio, 0.5
    w = torch.ones(out, 4 * groups)
    s = torch.rand(w.shape, generator=torch.Generator().manual_seed(k * 31 + d))
    m = build_masks({"w": w}, {"w": s}, get_pattern("2:4"), sparsity=k / d, max_sparsity=1.0,
                    count_rounding=rounding)["w"]
    # a 2:4 unit is one group of 4 made 2:4 (2 entries): s * numel / 2 groups, as INC counts them
    pruned = (~m).reshape(out, groups, 4).sum(-1)
    assert int((pruned == 2).sum()) == expected(k, 2 * d, w.numel(), rounding)
    assert ((pruned == 0) | (pruned == 2)).all()


@SETTINGS
@given(data=st.data(), d=st.integers(1, 30))
def test_global_mixed_unit_weights_floor_is_longest_prefix(data, d):
    """Units removing different numbers of weights: floor prunes the longest run of the order
    (lowest score first) whose removed weight does not exceed ``s * N``."""
    n_layers = data.draw(st.integers(1, 3))
    weights = [data.draw(st.integers(1, 5)) for _ in range(n_layers)]
    sizes = [data.draw(st.integers(1, 8)) for _ in range(n_layers)]
    perm = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(d)).float()
    layers, at = [], 0
    for i, (w, n) in enumerate(zip(weights, sizes)):
        layers.append(Units(f"l{i}", perm[at:at + n], weight=w, numel=n * w))
        at += n
    k = data.draw(st.integers(0, d - 1))
    keep = select(layers, sparsity=k / d, scope="global", max_sparsity=1.0, count_rounding="floor")
    total = sum(u.numel for u in layers)
    order = sorted(((float(s), u.weight, u.name, j) for u in layers for j, s in enumerate(u.scores)))
    budget, want = k * total, set()     # removed weight * d must stay <= k * total
    for _, w, name, j in order:
        if (sum(w2 for _, w2, _, _ in [o for o in order if (o[2], o[3]) in want]) + w) * d > budget:
            break
        want.add((name, j))
    got = {(u.name, j) for u in layers for j in range(u.n) if not bool(keep[u.name][j])}
    assert got == want


def test_half_up_and_floor_differ_by_one_unit_at_half():
    u = Units("w", torch.arange(10.0), weight=1, numel=10)
    assert int((~select([u], sparsity=0.75)["w"]).sum()) == 8
    assert int((~select([u], sparsity=0.75, count_rounding="floor")["w"]).sum()) == 7
    # float noise never moves a count: 0.29 * 100 = 28.999999999999996 floors to 29
    v = Units("v", torch.arange(100.0), weight=1, numel=100)
    assert int((~select([v], sparsity=0.29, count_rounding="floor")["v"]).sum()) == 29


def test_select_rejects_unknown_rounding():
    u = Units("w", torch.arange(4.0), weight=1, numel=4)
    with pytest.raises(ValueError, match="count_rounding must be one of half_up, floor; got 'trunc'"):
        select([u], sparsity=0.5, count_rounding="trunc")


# --- config ----------------------------------------------------------------------------------

def test_config_default_validation_and_round_trips(tmp_path):
    assert gp.PruneConfig().count_rounding == "half_up"
    cfg = gp.PruneConfig(count_rounding="floor", target_sparsity=0.5)
    assert gp.PruneConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_yaml(tmp_path / "c.yaml")
    assert gp.PruneConfig.from_yaml(tmp_path / "c.yaml").count_rounding == "floor"
    with pytest.raises(ValueError, match="count_rounding must be one of half_up, floor; got 'round'"):
        gp.PruneConfig(count_rounding="round")
    with pytest.raises(TypeError, match="count_rounding must be str, got bool"):
        gp.PruneConfig(count_rounding=True)
    with pytest.raises(ValueError, match="count_rounding"):
        cfg.count_rounding = "ceil"
    assert cfg.count_rounding == "floor"   # a rejected assignment leaves the config as it was


def test_one_shot_prune_honours_floor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    res = gp.prune(copy.deepcopy(model), sparsity=0.255, include=["0.weight"])      # 25.5 -> 26
    assert int((~res.masks["0.weight"]).sum()) == 26
    res = gp.prune(copy.deepcopy(model), sparsity=0.255, include=["0.weight"], count_rounding="floor")
    assert int((~res.masks["0.weight"]).sum()) == 25


# --- Pruner: every event, and resume -----------------------------------------------------------

def _train(pruner, model, steps, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        pruner.on_step_begin()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()
        opt.zero_grad()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


CFG = dict(criterion="snip_momentum", pattern="4x1", target_sparsity=0.75, scope="global",
           schedule="exp", start_step=9, end_step=29, frequency=10, include=["0.weight", "2.weight"])


@pytest.mark.parametrize("rounding", ["floor", "half_up"])
def test_pruner_counts_at_every_event(rounding):
    model = _model()
    pruner = gp.Pruner(model, gp.PruneConfig(count_rounding=rounding, **CFG))
    units = (16 * 32 + 32 * 32) // 4
    counts = []
    for _ in range(3):
        _train(pruner, model, 10)
        counts.append(sum(int((~m).sum()) for m in pruner.masks.values()) // 4)
    want = [gp.schedules.SparsitySchedule("exp", 0.0, 0.75, start_step=9, end_step=29, frequency=10)
            .sparsity_for_step(t) for t in (9, 19, 29)]
    from gradprune._checks import count_of
    assert counts == [count_of(s * units, rounding) for s in want]
    assert counts[-1] == 288


def test_pruner_resume_keeps_floor():
    model = _model()
    pruner = gp.Pruner(model, gp.PruneConfig(count_rounding="floor", **CFG))
    _train(pruner, model, 15)
    state = pruner.state_dict()
    assert state["config"]["count_rounding"] == "floor"
    fresh = copy.deepcopy(model)
    resumed = gp.Pruner(fresh, gp.PruneConfig(count_rounding="floor", **CFG))
    resumed.load_state_dict(state)
    _train(pruner, model, 20, seed=1)
    _train(resumed, fresh, 20, seed=1)
    assert all(torch.equal(pruner.masks[n], resumed.masks[n]) for n in pruner.masks)
    with pytest.raises(ValueError, match=r"fields \['count_rounding'\]"):
        gp.Pruner(copy.deepcopy(model), gp.PruneConfig(**CFG)).load_state_dict(state)


def test_old_state_without_the_field_resumes_as_half_up():
    model = _model()
    pruner = gp.Pruner(model, gp.PruneConfig(**CFG))
    _train(pruner, model, 12)
    state = pruner.state_dict()
    del state["config"]["count_rounding"]          # a checkpoint from before the field existed
    old = gp.Pruner(copy.deepcopy(model), gp.PruneConfig(**CFG))
    old.load_state_dict(state)
    assert old.config.count_rounding == "half_up" and old.step == 12
    with pytest.raises(ValueError, match=r"predates \['count_rounding'\] and ran with count_rounding='half_up'"):
        gp.Pruner(copy.deepcopy(model), gp.PruneConfig(count_rounding="floor", **CFG)).load_state_dict(state)
