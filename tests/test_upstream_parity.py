"""Parity with Neural Compressor / NVIDIA ASP conventions (issue #14, points 1 and 4).

* Conv ``"N:M"`` groups M consecutive *input channels at one kernel position* (the layout
  ``[out, kh, kw, in]``); ``"N:M-flat"`` keeps the older grouping of the flattened ``(in, kh, kw)``
  axis.
* ``PruneConfig.accumulate="last"`` keeps only the last batch's scores (INC's ``gradient`` and
  ``snip``); ``reduce_each_step=True`` reduces every step's scores to block units before
  accumulating (INC's block ``reduce="max"``).

The references here are written independently of gradprune's code, from those definitions.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import gradprune as gp
from gradprune.patterns import get_pattern
from gradprune.scores.criteria import _REGISTRY


# ---------------------------------------------------------------------------------------------
# point 1: conv N:M layout

@settings(max_examples=30, deadline=None)
@given(nm=st.sampled_from([(2, 4), (1, 4), (3, 4), (2, 8), (1, 2)]), out=st.integers(1, 3),
       in_groups=st.integers(1, 3), kh=st.integers(1, 3), kw=st.integers(1, 3), seed=st.integers(0, 99))
def test_conv_nm_keeps_n_of_every_m_input_channels_at_each_kernel_position(nm, out, in_groups, kh, kw, seed):
    n, m = nm
    shape = (out, in_groups * m, kh, kw)
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    p = get_pattern(f"{n}:{m}")
    assert p.misfit(torch.Size(shape)) is None
    mask = p.expand(torch.zeros(p.n_units(torch.Size(shape)), dtype=torch.bool), scores)
    assert mask.shape == scores.shape
    for o, y, x, g in itertools.product(range(out), range(kh), range(kw), range(in_groups)):
        chans = slice(g * m, (g + 1) * m)
        kept = mask[o, chans, y, x]
        assert int(kept.sum()) == n                      # exactly N of these M channels kept
        vals = scores[o, chans, y, x].abs()
        assert vals[kept].min() >= vals[~kept].max()     # ... the N with the highest |score|


def test_conv_nm_against_a_hand_computed_mask():
    # one filter, 4 input channels, a 1x2 kernel: groups are the 4 channels at x=0 and at x=1
    w = torch.tensor([[[[1.0, 8.0]], [[5.0, 2.0]], [[3.0, 7.0]], [[4.0, 6.0]]]])   # [1, 4, 1, 2]
    p = get_pattern("2:4")
    got = p.expand(torch.zeros(2, dtype=torch.bool), w)
    # x=0: channel values 1,5,3,4 -> keep 5 and 4 (channels 1 and 3)
    # x=1: channel values 8,2,7,6 -> keep 8 and 7 (channels 0 and 2)
    want = torch.tensor([[[[False, True]], [[True, False]], [[False, True]], [[True, False]]]])
    assert torch.equal(got, want)
    # the old grouping runs over the flattened (in, kh, kw) axis: [1, 8, 5, 2] and [3, 7, 4, 6]
    flat = get_pattern("2:4-flat").expand(torch.zeros(2, dtype=torch.bool), w)
    want_flat = torch.tensor([[[[False, True]], [[True, False]], [[False, True]], [[False, True]]]])
    assert torch.equal(flat, want_flat)
    assert not torch.equal(flat, got)


def test_conv_nm_needs_input_channels_divisible_by_m_and_flat_does_not():
    shape = torch.Size((8, 2, 3, 2))        # in*kh*kw = 12 (divisible by 4), in = 2 (not)
    assert "in (2)" in get_pattern("2:4").misfit(shape)
    assert get_pattern("2:4-flat").misfit(shape) is None


@pytest.mark.parametrize("spec", ["2:4", "2:4-flat"])
def test_gradual_conv_nm_keeps_its_layout_across_events(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = gp.Pruner(model, gp.PruneConfig(criterion="snip", pattern=spec, schedule="linear",
                                             start_step=0, end_step=4, frequency=2), optimizer=opt)
    for _ in range(6):
        pruner.on_step_begin()
        nn.functional.cross_entropy(model(torch.randn(4, 8, 4, 4)), torch.randint(0, 3, (4,))).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()
        opt.zero_grad()
    assert [s for s, _ in pruner.history] == [0, 2, 4]
    for name, mask in pruner.masks.items():
        groups = (mask.permute(0, 2, 3, 1) if spec == "2:4" else mask).reshape(mask.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all(), name
    assert pruner.masks.sparsity() == 0.5


# ---------------------------------------------------------------------------------------------
# point 4: accumulation over batches

def _feed(crit, param, grads, weights=None):
    for t, g in enumerate(grads):
        if weights is not None:
            with torch.no_grad():
                param.copy_(weights[t])
        param.grad = g.clone()
        crit.on_before_optimizer_step()


def _steps(seed, steps=4, shape=(8, 6)):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(shape, generator=gen) for _ in range(steps)],
            [torch.randn(shape, generator=gen) for _ in range(steps)])


@pytest.mark.parametrize("criterion, term", [
    ("gradient", lambda w, g: g.abs()),
    ("snip", lambda w, g: (w * g).abs()),
    ("taylor", lambda w, g: (w * g) ** 2),
    ("movement", lambda w, g: -w * g),
    ("fisher", lambda w, g: g * g),
])
@pytest.mark.parametrize("accumulate", ["mean", "last"])
def test_accumulate_mean_or_last(criterion, term, accumulate):
    grads, weights = _steps(3)
    param = nn.Parameter(torch.zeros(8, 6))
    crit = gp.get_criterion(gp.PruneConfig(criterion=criterion, accumulate=accumulate), {"w": param})
    _feed(crit, param, grads, weights)
    terms = [term(w, g) for w, g in zip(weights, grads)]
    want = terms[-1] if accumulate == "last" else sum(terms) / len(terms)
    torch.testing.assert_close(crit.scores["w"], want)
    crit.reset()                                          # after a prune event: the next batch only
    _feed(crit, param, grads[:1], weights[:1])
    torch.testing.assert_close(crit.scores["w"], terms[0])


def _block_max(t, rows, cols):           # independent reference: loops over the 2-D blocks
    out = torch.empty(t.shape[0] // rows, t.shape[1] // cols)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = t[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols].max()
    return out.reshape(-1)


@pytest.mark.parametrize("criterion", ["snip_momentum", "snip", "gradient"])
@pytest.mark.parametrize("accumulate", ["mean", "last"])
def test_reduce_each_step_max_matches_inc_per_step_block_max(criterion, accumulate):
    if criterion == "snip_momentum" and accumulate == "last":
        pytest.skip("snip_momentum is an exponential accumulation")
    grads, weights = _steps(5)
    param = nn.Parameter(torch.zeros(8, 6))
    cfg = gp.PruneConfig(criterion=criterion, pattern="4x2", reduce="max", reduce_each_step=True,
                         accumulate=accumulate)
    crit = gp.get_criterion(cfg, {"w": param})
    _feed(crit, param, grads, weights)
    per_step = [_block_max((w * g).abs() if criterion != "gradient" else g.abs(), 4, 2)
                for w, g in zip(weights, grads)]
    if criterion == "snip_momentum":           # S <- 0.9 S + 1.0 * reduce(|W G|), per step (INC)
        want = torch.zeros_like(per_step[0])
        for s in per_step:
            want = 0.9 * want + s
    elif accumulate == "last":
        want = per_step[-1]
    else:
        want = sum(per_step) / len(per_step)
    units = get_pattern("4x2").unit_scores(crit.scores["w"], "max")
    torch.testing.assert_close(units, want)
    # reducing once at the end gives other unit scores (so the option matters)
    if accumulate == "mean":
        plain = gp.get_criterion(cfg.replace(reduce_each_step=False), {"w": param})
        _feed(plain, param, grads, weights)
        assert not torch.allclose(get_pattern("4x2").unit_scores(plain.scores["w"], "max"), want)


@pytest.mark.parametrize("pattern", ["channel", "kernel"])
def test_reduce_each_step_channel_and_kernel_units(pattern):
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(4, 3, 2, 2, generator=gen) for _ in range(3)]
    param = nn.Parameter(torch.randn(4, 3, 2, 2, generator=gen))
    crit = gp.get_criterion(gp.PruneConfig(criterion="gradient", pattern=pattern, reduce="max",
                                           reduce_each_step=True), {"w": param})
    _feed(crit, param, grads)
    flat = 1 if pattern == "channel" else 2
    per_step = [g.abs().flatten(flat).amax(-1).reshape(-1) for g in grads]
    want = sum(per_step) / 3
    torch.testing.assert_close(get_pattern(pattern).unit_scores(crit.scores["w"], "max"), want)


def test_reduce_each_step_mean_is_reducing_once():
    grads, weights = _steps(9)
    param = nn.Parameter(torch.zeros(8, 6))
    units = []
    for each in (False, True):
        crit = gp.get_criterion(gp.PruneConfig(criterion="snip_momentum", pattern="4x1",
                                               reduce_each_step=each), {"w": param})
        _feed(crit, param, grads, weights)
        units.append(get_pattern("4x1").unit_scores(crit.scores["w"], "mean"))
    torch.testing.assert_close(units[0], units[1])


def test_accumulate_last_in_a_pruner_scores_only_the_event_step():
    # gradient criterion, 1 layer, target 50% at step 2: the mask follows step 2's gradient only
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2))
    w = model[0].weight
    grads = [torch.tensor([[9.0, 9.0, 0.0, 0.0], [9.0, 9.0, 0.0, 0.0]]),
             torch.tensor([[9.0, 9.0, 0.0, 0.0], [9.0, 9.0, 0.0, 0.0]]),
             torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])]
    masks = {}
    for accumulate in ("mean", "last"):
        pruner = gp.Pruner(model, criterion="gradient", target_sparsity=0.5, start_step=2, end_step=2,
                           include=["0.weight"], accumulate=accumulate)
        for g in grads:
            pruner.on_step_begin()
            w.grad = g.clone()
            pruner.on_before_optimizer_step()
            pruner.on_after_optimizer_step()
        masks[accumulate] = pruner.masks["0.weight"]
        w.grad = None
    assert masks["last"][:, 2:].all() and not masks["last"][:, :2].any()
    assert masks["mean"][:, :2].all() and not masks["mean"][:, 2:].any()


def test_accumulation_options_are_validated():
    with pytest.raises(ValueError, match="accumulate"):
        gp.PruneConfig(accumulate="sum")
    with pytest.raises(TypeError, match="reduce_each_step"):
        gp.PruneConfig(reduce_each_step="yes")
    param = {"w": nn.Parameter(torch.ones(4, 4))}
    with pytest.raises(ValueError, match="accumulate='last'.*snip_momentum"):
        gp.get_criterion(gp.PruneConfig(criterion="snip_momentum", accumulate="last"), param)
    for crit in ("magnitude", "random"):       # nothing accumulated: both options are no-ops
        cfg = gp.PruneConfig(criterion=crit, accumulate="last", reduce_each_step=True, reduce="max",
                             pattern="4x1")
        assert torch.equal(gp.get_criterion(cfg, param).scores["w"],
                           gp.get_criterion(crit, param).scores["w"])

    @gp.register_criterion("test_parity_custom", overwrite=True)
    class Custom(gp.Criterion):
        @property
        def scores(self):
            return {n: p.detach().abs() for n, p in self.params.items()}

    try:
        with pytest.raises(ValueError, match="reduce_each_step"):
            gp.get_criterion(gp.PruneConfig(criterion="test_parity_custom", reduce_each_step=True,
                                            reduce="max", pattern="4x1"), param)
        with pytest.raises(ValueError, match="accumulate"):
            gp.get_criterion(gp.PruneConfig(criterion="test_parity_custom", accumulate="last"), param)
    finally:
        _REGISTRY.pop("test_parity_custom", None)   # other tests loop over every registered criterion
    round_trip = gp.PruneConfig(accumulate="last", reduce_each_step=True)
    assert gp.PruneConfig.from_dict(round_trip.to_dict()) == round_trip
