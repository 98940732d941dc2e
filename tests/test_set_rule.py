"""Tests of the sign-split SET prune rule ``prune="set_signed"`` (issue #14 point 7).

Mocanu et al.'s SET drops, per layer, ζ of the positive and ζ of the negative weights closest to
zero: the smallest positive and the largest negative ones. The hand-built tensors below are chosen
so that plain magnitude pruning would drop a different set.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradprune as gp

torch.set_num_threads(1)


def rhu(x: float) -> int:
    return int(math.floor(round(x, 9) + 0.5))


def reference_drop(values: list[float], active: list[bool], n: int) -> set[int]:
    """Independent reference: zeros first, then the rest split by sign in proportion (halves to
    the positives), smallest positives and largest negatives (values assumed distinct per sign)."""
    zeros = [i for i, (v, a) in enumerate(zip(values, active)) if a and v == 0]
    pos = sorted((i for i, (v, a) in enumerate(zip(values, active)) if a and v > 0), key=lambda i: values[i])
    neg = sorted((i for i, (v, a) in enumerate(zip(values, active)) if a and v < 0), key=lambda i: -values[i])
    z = min(n, len(zeros))
    r = n - z
    k_pos = rhu(r * len(pos) / (len(pos) + len(neg))) if pos or neg else 0
    return set(zeros[:z]) | set(pos[:k_pos]) | set(neg[:r - k_pos])


def one_layer_trainer(values, active, fraction):
    """A single bias-free Linear layer holding ``values`` (masked by ``active``), SET with the
    sign-split drop, a constant drop fraction and an update every step (from the second)."""
    torch.manual_seed(0)
    lin = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([values]))
    model = nn.Sequential(lin)
    mask = torch.tensor([active])
    cfg = gp.SparseConfig.set(density=0.5, total_steps=100, init=lambda shapes, d, ctx: {"0.weight": mask.clone()},
                              prune="set_signed", decay=lambda step: fraction, update_interval=1,
                              include_classifier=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return model, gp.SparseTrainer(model, opt, cfg)


def update_once(model, trainer):
    """One ordinary step (lr 0: the weights stay as built), then the update step."""
    for update in (False, True):
        model.zero_grad()
        model(torch.randn(3, model[0].in_features)).sum().backward()
        assert trainer.is_update_step() == update
        before = trainer.masks["0.weight"].reshape(-1).clone()
        trainer.step()
    after = trainer.masks["0.weight"].reshape(-1)
    return before, after


# weights on a hand-built layer: small positives, large negatives (magnitude alone would drop only
# positives), and one inactive slot where growth can go
CASES = [
    # values, active, fraction
    ([0.5, 0.4, 0.3, 0.2, 0.1, -0.9, -0.8, -0.7, -0.6, 0.0, 0.0, 0.0], [True] * 9 + [False] * 3, 0.34),
    ([0.05, 0.01, 0.02, -2.0, -1.5, -3.0, -1.2, -1.1, 0.0, 0.0], [True] * 8 + [False] * 2, 0.25),
    # exact zeros among the active weights go first
    ([0.0, 0.3, -0.2, 0.0, 0.7, -0.9, 0.1, -0.5, 0.0, 0.0], [True] * 8 + [False] * 2, 0.25),
    # one sign only: all from the negatives
    ([-0.4, -0.1, -0.3, -0.2, 0.0, 0.0, 0.0], [True] * 4 + [False] * 3, 0.5),
]


@pytest.mark.parametrize("values,active,fraction", CASES)
def test_set_signed_drops_the_smallest_positives_and_largest_negatives(values, active, fraction):
    model, trainer = one_layer_trainer(values, active, fraction)
    before, after = update_once(model, trainer)
    dropped = set(torch.nonzero(before & ~after).flatten().tolist())
    n = rhu(fraction * sum(active))
    assert dropped == reference_drop(values, active, n)
    assert int(after.sum()) == sum(active)  # as many regrown as dropped


def test_set_signed_is_not_magnitude_on_a_skewed_layer():
    values, active, fraction = CASES[0]
    model, trainer = one_layer_trainer(values, active, fraction)
    before, after = update_once(model, trainer)
    dropped = set(torch.nonzero(before & ~after).flatten().tolist())
    # n = 3 of 5 positives and 4 negatives: 2 positives (0.1, 0.2) and the largest negative (-0.6);
    # magnitude would have dropped 0.1, 0.2, 0.3
    assert dropped == {4, 3, 8}


def test_set_signed_keeps_exact_counts_over_several_updates():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = gp.SparseConfig.set(density=0.3, total_steps=40, prune="set_signed", update_interval=5,
                              include_classifier=True)
    trainer = gp.SparseTrainer(model, opt, cfg)
    counts = {n: int(m.sum()) for n, m in trainer.masks.items()}
    updates = 0
    for _ in range(40):
        x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        is_update = trainer.is_update_step()
        before = {n: m.reshape(-1).clone() for n, m in trainer.masks.items()}
        weights = {n: p.detach().reshape(-1).clone() for n, p in trainer.params.items()}
        trainer.step()
        assert {n: int(m.sum()) for n, m in trainer.masks.items()} == counts
        if is_update:
            updates += 1
            for n, m in trainer.masks.items():
                after = m.reshape(-1)
                dropped = before[n] & ~after
                assert int(dropped.sum()) == int((after & ~before[n]).sum()) > 0
                w, kept = weights[n], before[n] & after
                # closest to zero on each side: no kept positive below a dropped one, no kept
                # negative above a dropped one
                for sign in (1.0, -1.0):
                    d, k = (w * sign)[dropped & (w * sign > 0)], (w * sign)[kept & (w * sign > 0)]
                    if d.numel() and k.numel():
                        assert float(d.max()) <= float(k.min())
    assert updates == trainer.updates >= 5


def test_set_signed_property_over_random_weights():
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st
    from gradprune.sparse_training import _set_signed_drop

    value = st.one_of(st.just(0.0), st.sampled_from([-0.5, 0.5]),
                      st.floats(-4, 4, allow_nan=False, width=32))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.lists(st.tuples(value, st.booleans()), min_size=1, max_size=40), st.floats(0, 1),
           st.integers(0, 2**16))
    def check(pairs, frac, seed):
        w = torch.tensor([v for v, _ in pairs], dtype=torch.float32)
        act = torch.tensor([a for _, a in pairs])
        n = int(frac * int(act.sum()))
        out = _set_signed_drop(w, act, n, torch.Generator().manual_seed(seed))
        assert out.dtype == torch.bool and out.shape == act.shape
        assert int(out.sum()) == n and not bool((out & ~act).any())
        zero, pos, neg = act & (w == 0), act & (w > 0), act & (w < 0)
        kept = act & ~out
        # exact zeros first
        assert int((out & zero).sum()) == min(n, int(zero.sum()))
        r = n - int((out & zero).sum())
        n_p, n_n = int(pos.sum()), int(neg.sum())
        if n_p + n_n:
            assert int((out & pos).sum()) == rhu(r * n_p / (n_p + n_n))
        # closest to zero on each side
        if (out & pos).any() and (kept & pos).any():
            assert float(w[out & pos].max()) <= float(w[kept & pos].min())
        if (out & neg).any() and (kept & neg).any():
            assert float(w[out & neg].min()) >= float(w[kept & neg].max())
        # same seed, same choice (ties included)
        again = _set_signed_drop(w, act, n, torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)

    check()


def test_set_signed_config_round_trip_and_names():
    cfg = gp.SparseConfig.set(density=0.2, total_steps=200, prune="set_signed")
    assert cfg.prune == "set_signed"
    assert gp.SparseConfig.from_dict(cfg.to_dict()) == cfg
    assert gp.SparseConfig.from_yaml(cfg.to_yaml()) == cfg
    # the default SET preset is unchanged: magnitude drop
    assert gp.SparseConfig.set(total_steps=100).prune == "magnitude"
    # sparselearning's name and misspellings are still refused, naming the field
    for bad in ("SET", "set-signed", "set_sign", "magnitude-negativity"):
        with pytest.raises(ValueError, match=f"prune must be one of .*set_signed.*got {bad!r}"):
            gp.SparseConfig.set(total_steps=100, prune=bad)
    # a sign is per weight: no kernel granularity
    with pytest.raises(ValueError, match="set_signed"):
        gp.SparseConfig(prune="set_signed", init="struct_random")
    with pytest.raises(ValueError, match="set_signed"):
        gp.SparseConfig(prune="set_signed", grow="struct_gradient")
