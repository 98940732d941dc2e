"""RigL with the RigL authors' semantics (issue #14, point 6).

The reference implementation (google-research/rigl ``sparse_optimizers_base.py``) and rigl-torch
0.5.2 drop ``int(active * f)`` connections per layer, grow among every connection inactive after
the drop (a just-dropped one may come back, keeping its value and optimizer state) and start new
connections at 0 with zero optimizer state. ``SparseConfig.rigl`` does the same by default;
``regrow_dropped=False, drop_rounding="half_up"`` is the disjoint variant.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradprune as gp

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def _rhu(x: float) -> int:
    return int(math.floor(round(x, 9) + 0.5))


def test_rigl_preset_follows_the_reference_and_the_disjoint_variant_is_an_option():
    cfg = gp.SparseConfig.rigl(density=0.1, total_steps=1000)
    assert (cfg.drop_rounding, cfg.regrow_dropped) == ("floor", True)
    old = gp.SparseConfig.rigl(density=0.1, total_steps=1000, regrow_dropped=False, drop_rounding="half_up")
    assert (old.drop_rounding, old.regrow_dropped) == ("half_up", False)
    # the other presets and a plain config keep the disjoint, half-up semantics
    for other in (gp.SparseConfig(), gp.SparseConfig.set(total_steps=1000), gp.SparseConfig.snfs(total_steps=1000)):
        assert (other.drop_rounding, other.regrow_dropped) == ("half_up", False)
    # saved and read back with every other field
    assert gp.SparseConfig.from_dict(cfg.to_dict()) == cfg
    assert gp.SparseConfig.from_yaml(cfg.to_yaml()).drop_rounding == "floor"


@pytest.mark.parametrize("value, exc", [("up", ValueError), ("Floor", ValueError), (1, TypeError), (None, TypeError)])
def test_drop_rounding_is_validated_naming_the_field_and_value(value, exc):
    with pytest.raises(exc, match="drop_rounding") as info:
        gp.SparseConfig.rigl(total_steps=10, drop_rounding=value)
    if exc is ValueError:
        assert repr(value) in str(info.value)
    cfg = gp.SparseConfig.rigl(total_steps=10)
    with pytest.raises(exc, match="drop_rounding"):
        cfg.drop_rounding = value
    assert cfg.drop_rounding == "floor"  # a rejected assignment changes nothing


@settings(max_examples=40, deadline=None)
@given(hidden=st.integers(1, 12), n_in=st.integers(1, 9), n_out=st.integers(1, 6),
       density=st.floats(0.05, 1.0), fraction=st.floats(0.0, 1.0),
       rounding=st.sampled_from(["floor", "half_up"]), regrow=st.booleans(), seed=st.integers(0, 3))
def test_drop_count_is_exact_per_layer_on_small_layers(hidden, n_in, n_out, density, fraction, rounding,
                                                       regrow, seed):
    """Each layer drops exactly ``int(active * f)`` (rigl-torch's and the reference's count) with
    ``drop_rounding="floor"``, ``f * active`` rounded half up with ``"half_up"``; per-layer counts
    are preserved exactly, and nothing outside the masks is nonzero."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    asked = []

    def prune(weight, mask, n, ctx):  # the magnitude drop, recording the count it is asked for
        asked.append((ctx.name, int(mask.sum()), n))
        scores = weight.abs().masked_fill(~mask, float("inf")).reshape(-1)
        out = mask.clone().reshape(-1)
        out[torch.argsort(scores, stable=True)[:n]] = False
        return out.reshape(mask.shape)

    cfg = gp.SparseConfig.rigl(density=density, init="uniform", total_steps=8, update_interval=2,
                               decay=lambda step: fraction, prune=prune, drop_rounding=rounding,
                               regrow_dropped=regrow, grow_zero_score=True, include_classifier=True,
                               seed=seed)
    trainer = gp.SparseTrainer(model, opt, cfg)
    start = {n: int(m.sum()) for n, m in trainer.masks.items()}
    numel = {n: m.numel() for n, m in trainer.masks.items()}
    for _ in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(5, n_in)), torch.randint(0, n_out, (5,))).backward()
        trainer.step()
        assert {n: int(m.sum()) for n, m in trainer.masks.items()} == start
        for n, p in trainer.params.items():
            assert bool((p.detach()[~trainer.masks[n]] == 0).all())
    assert trainer.updates == 2 and len(asked) == 2 * len(start)
    for name, active, n in asked:
        want = int(active * fraction) if rounding == "floor" else min(active, _rhu(fraction * active))
        if not regrow:  # the disjoint variant can regrow only where nothing was: never more than that
            want = min(want, numel[name] - active)
        assert n == want, (name, active, fraction, rounding)


# ---------------------------------------------------------------------------------------------
# a just-dropped connection with the largest gradient: regrown (keeping its value and momentum)
# by default, replaced by the disjoint variant

def _crafted_update(**overrides):
    """One 4x4 layer at density 1/2 and one update dropping 2 of its 8 connections.

    After an ordinary step (so every active connection has momentum), the active weights get
    distinct magnitudes; on the update step connection ``a`` (smallest |w|) has by far the largest
    gradient, ``b`` the second smallest |w| a small one, and the inactive connections distinct
    gradients, largest at ``c`` then ``d``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    p = model[0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = gp.SparseConfig.rigl(density=0.5, init="uniform", total_steps=100, update_interval=1,
                               decay=lambda step: 0.25, include_classifier=True, **overrides)
    trainer = gp.SparseTrainer(model, opt, cfg)
    mask = trainer.masks["0.weight"].clone()
    active, inactive = mask.reshape(-1).nonzero().flatten(), (~mask).reshape(-1).nonzero().flatten()
    assert active.numel() == 8 == inactive.numel()

    opt.zero_grad()
    (p * torch.ones(4, 4)).sum().backward()
    assert trainer.step() is False                                  # step 0: an ordinary step
    with torch.no_grad():
        flat = p.view(-1)
        flat[active] = torch.tensor([0.01, 0.02, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0])
    a, b = int(active[0]), int(active[1])
    c, d = int(inactive[7]), int(inactive[6])
    g = torch.zeros(16)
    g[active] = 0.5
    g[a] = 100.0
    g[b] = 0.1
    g[inactive] = torch.arange(1.0, 9.0)                            # c = inactive[7] largest
    opt.zero_grad()
    (p * g.reshape(4, 4)).sum().backward()
    w_before = p.detach().clone().view(-1)
    buf_before = opt.state[p]["momentum_buffer"].clone().view(-1)
    assert bool((buf_before[active] != 0).all())
    assert trainer.step() is True                                   # step 1: the update
    after = trainer.masks["0.weight"].reshape(-1)
    return dict(a=a, b=b, c=c, d=d, mask=mask.reshape(-1), after=after, w_before=w_before,
                w=p.detach().view(-1), buf_before=buf_before, buf=opt.state[p]["momentum_buffer"].view(-1))


def test_rigl_preset_regrows_a_just_dropped_connection_keeping_its_weight_and_momentum():
    r = _crafted_update()
    a, b, c = r["a"], r["b"], r["c"]
    assert bool(r["after"][a]) and not bool(r["after"][b]) and bool(r["after"][c])
    assert int(r["after"].sum()) == 8                               # exact count
    assert float(r["w"][a]) == float(r["w_before"][a]) != 0         # kept its value ...
    assert float(r["buf"][a]) == float(r["buf_before"][a]) != 0     # ... and its momentum
    assert float(r["w"][c]) == 0 and float(r["buf"][c]) == 0        # new: weight 0, momentum 0
    assert float(r["w"][b]) == 0 and float(r["buf"][b]) == 0        # dropped: zeroed
    kept = r["mask"] & r["after"]                                   # everything else untouched
    assert torch.equal(r["w"][kept], r["w_before"][kept])
    assert torch.equal(r["buf"][kept], r["buf_before"][kept])


def test_disjoint_variant_never_regrows_a_just_dropped_connection():
    r = _crafted_update(regrow_dropped=False, drop_rounding="half_up")
    a, b, c, d = r["a"], r["b"], r["c"], r["d"]
    assert not bool(r["after"][a]) and not bool(r["after"][b])     # both dropped, ...
    assert bool(r["after"][c]) and bool(r["after"][d])             # ... two others grown
    assert int(r["after"].sum()) == 8
    for i in (a, b, c, d):
        assert float(r["w"][i]) == 0 and float(r["buf"][i]) == 0


# ---------------------------------------------------------------------------------------------
# checkpoints saved before these fields existed

def _run(cfg, steps, state=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    trainer = gp.SparseTrainer(model, opt, cfg)
    if state is not None:
        trainer.load_state_dict(state["sparse"])
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(12)]
    for x, y in data[trainer.step_count:trainer.step_count + steps]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        trainer.step()
    return model, opt, trainer


def test_a_checkpoint_without_the_new_fields_resumes_only_with_the_old_semantics():
    old_cfg = gp.SparseConfig.rigl(density=0.3, total_steps=12, update_interval=2,
                                   regrow_dropped=False, drop_rounding="half_up")
    model, opt, trainer = _run(old_cfg, 5)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sparse": trainer.state_dict()})
    for k in ("drop_rounding", "regrow_dropped"):                   # as an older gradprune saved it
        del state["sparse"]["config"][k]
    # into the new preset: refused, naming the fields and the semantics the checkpoint ran with
    new_cfg = gp.SparseConfig.rigl(density=0.3, total_steps=12, update_interval=2)
    with pytest.raises(ValueError, match=r"drop_rounding.*regrow_dropped.*drop_rounding='half_up', "
                                         r"regrow_dropped=False"):
        _run(new_cfg, 0, state)
    # into the old semantics: resumes and continues exactly as the run that did not stop
    _, _, resumed = _run(old_cfg, 7, state)
    _, _, straight = _run(old_cfg, 12)
    assert resumed.step_count == straight.step_count == 12 and resumed.updates == straight.updates
    assert all(torch.equal(resumed.masks[n], straight.masks[n]) for n in straight.masks)


def test_the_new_fields_are_saved_and_checked_on_load():
    cfg = gp.SparseConfig.rigl(density=0.3, total_steps=12, update_interval=2)
    model, opt, trainer = _run(cfg, 5)
    saved = trainer.state_dict()
    assert (saved["config"]["drop_rounding"], saved["config"]["regrow_dropped"]) == ("floor", True)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sparse": saved}
    with pytest.raises(ValueError, match=r"fields \['drop_rounding'\]"):
        _run(cfg.replace(drop_rounding="half_up"), 0, copy.deepcopy(state))
    _, _, resumed = _run(cfg, 7, copy.deepcopy(state))
    _, _, straight = _run(cfg, 12)
    assert all(torch.equal(resumed.masks[n], straight.masks[n]) for n in straight.masks)
