"""MaskSet, the criteria formulas, the gradient-statistics engine, prune() and Pruner.

Expected values are computed by hand here (formulas from ALGORITHMS.md section 4 and the module
docstrings), never by calling the code under test a second way.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import gradprune as gp
from conftest import MLP, round_half_up

# ---------------------------------------------------------------------------------------------
# helpers


def random_masks(model, seed=0, p_keep=0.5, names=None):
    masks = gp.MaskSet(model, names=names)
    gen = torch.Generator().manual_seed(seed)
    for n in list(masks):
        masks[n] = torch.rand(masks[n].shape, generator=gen) < p_keep
    return masks


def params_of(model):
    return dict(model.named_parameters())


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_steps(model, opt, batches, hooks=None):
    model.train()
    for b in batches:
        opt.zero_grad()
        MLP.loss_fn(model, b).backward()
        opt.step()
        if hooks:
            hooks()


# =============================================================================================
# MaskSet


def test_default_masks_are_all_true_bool_on_default_targets(mlp):
    model = mlp.build()
    masks = gp.MaskSet(model)
    assert list(masks) == ["0.weight", "2.weight"]
    for n, m in masks.items():
        assert m.dtype == torch.bool and m.shape == params_of(model)[n].shape and bool(m.all())
    assert masks.sparsity() == 0.0


def test_apply_zeroes_exactly_the_pruned_weights(mlp):
    model = mlp.build()
    masks = random_masks(model)
    before = clone_state(model)
    masks.apply()
    p = params_of(model)
    for n, m in masks.items():
        assert bool((p[n].detach()[~m] == 0.0).all())
        assert torch.equal(p[n].detach()[m], before[n][m])
    # parameters without a mask are untouched
    for k in ("0.bias", "2.bias", "4.weight", "4.bias"):
        assert torch.equal(p[k].detach(), before[k])


def test_apply_to_grads(mlp):
    model = mlp.build()
    masks = random_masks(model)
    mlp.loss_fn(model, mlp.batches(1)[0]).backward()
    p = params_of(model)
    grads = {n: p[n].grad.clone() for n in masks}
    assert all(bool((g != 0).any()) for g in grads.values())
    masks.apply_to_grads()
    for n, m in masks.items():
        assert bool((p[n].grad[~m] == 0.0).all())
        assert torch.equal(p[n].grad[m], grads[n][m])


def test_fully_dense_masks_are_skipped_until_edited(mlp):
    # a mask that keeps everything is left out of the multiply; pruning it in place later must
    # bring it back (the plan follows the masks' version counters)
    model = mlp.build()
    masks = random_masks(model)
    dense_name = next(iter(masks.keys()))
    masks[dense_name].fill_(True)
    for step in range(2):
        model.zero_grad()
        mlp.loss_fn(model, mlp.batches(1)[0]).backward()
        p = params_of(model)
        grads = {n: p[n].grad.clone() for n in masks}
        masks.apply_to_grads()
        masks.apply()
        for n, m in masks.items():
            assert bool((p[n].grad[~m] == 0.0).all()) and torch.equal(p[n].grad[m], grads[n][m])
            assert bool((p[n].detach()[~m] == 0.0).all())
        masks[dense_name][0, :3] = False  # prune three entries of the dense layer in place
    assert int((~masks[dense_name]).sum()) == 3


@pytest.mark.parametrize("make_opt,keys", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), ("momentum_buffer",)),
    (lambda ps: torch.optim.Adam(ps, lr=0.01), ("exp_avg", "exp_avg_sq")),
    (lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
], ids=["sgd", "adam", "adamw-amsgrad"])
def test_apply_to_optimizer_state(mlp, make_opt, keys):
    model = mlp.build()
    opt = make_opt(model.parameters())
    train_steps(model, opt, mlp.batches(2))          # create dense optimizer state
    masks = random_masks(model)
    p = params_of(model)
    before = {n: {k: opt.state[p[n]][k].clone() for k in opt.state[p[n]]} for n in masks}
    masks.apply_to_optimizer(opt)
    for n, m in masks.items():
        st = opt.state[p[n]]
        for k in keys:
            assert bool((before[n][k][~m] != 0).any()), (n, k)   # there was something to zero
            assert bool((st[k][~m] == 0).all()), (n, k)
            assert torch.equal(st[k][m], before[n][k][m]), (n, k)
        if "step" in st:
            assert torch.equal(torch.as_tensor(st["step"]), torch.as_tensor(before[n]["step"]))
    # state of unmasked parameters is untouched
    st = opt.state[p["4.weight"]]
    assert bool((st[keys[0]] != 0).all())


def test_apply_rejects_non_optimizer(mlp):
    masks = gp.MaskSet(mlp.build())
    with pytest.raises(TypeError):
        masks.apply_to_optimizer("sgd")
    with pytest.raises(TypeError):
        masks.attach(object())


OPTIMIZERS = {
    "sgd-momentum-wd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1,
                                                           nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_attached_masks_keep_pruned_weights_exactly_zero(mlp, name):
    model = mlp.build()
    p = params_of(model)
    opt = OPTIMIZERS[name](model.parameters())
    train_steps(model, opt, mlp.batches(2))        # dense state before pruning, as in real use
    masks = random_masks(model, seed=3)
    handle = masks.attach(opt)                      # applies immediately, then after every step
    for n, m in masks.items():
        assert bool((p[n].detach()[~m] == 0.0).all())
    start = {n: p[n].detach().clone() for n in masks}

    def check():
        for n, m in masks.items():
            assert bool((p[n].detach()[~m] == 0.0).all()), n
            for k, v in opt.state[p[n]].items():
                if isinstance(v, torch.Tensor) and v.shape == m.shape:
                    assert bool((v[~m] == 0).all()), (n, k)

    train_steps(model, opt, mlp.batches(25, seed=1), hooks=check)
    for n, m in masks.items():  # training really happened on the kept weights
        assert not torch.equal(p[n].detach()[m], start[n][m])

    # without the hook the optimizer would move pruned weights: the hook is what kept them at zero
    handle.remove()
    train_steps(model, opt, mlp.batches(2, seed=2))
    assert any(bool((p[n].detach()[~m] != 0).any()) for n, m in masks.items())


def test_state_dict_round_trip_into_new_model_and_maskset(mlp, tmp_path):
    model = mlp.build(0)
    masks = random_masks(model, seed=5)
    state = masks.state_dict()
    assert set(state) == set(masks)
    assert all(v.dtype == torch.bool and v.device.type == "cpu" for v in state.values())
    state["0.weight"][0, 0] = not bool(state["0.weight"][0, 0])   # a copy, not the live mask
    assert masks["0.weight"][0, 0] != state["0.weight"][0, 0]

    torch.save(masks.state_dict(), tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    new_model = mlp.build(1)
    fresh = gp.MaskSet(new_model)
    fresh.load_state_dict(loaded)
    for n in masks:
        assert torch.equal(fresh[n], masks[n])
    fresh.apply()
    for n, m in fresh.items():
        assert bool((params_of(new_model)[n].detach()[~m] == 0).all())
    assert fresh.sparsity() == masks.sparsity()


def _bad_states(masks):
    good = {n: ~m for n, m in masks.state_dict().items()}  # a valid change for every layer
    bad_shape = dict(good, **{"2.weight": torch.ones(3, 3, dtype=torch.bool)})
    bad_dtype = dict(good, **{"2.weight": good["2.weight"].float()})
    bad_uint8 = dict(good, **{"2.weight": good["2.weight"].to(torch.uint8)})
    not_tensor = dict(good, **{"2.weight": [[True]]})
    missing = {"0.weight": good["0.weight"]}
    unexpected = dict(good, **{"9.weight": good["0.weight"]})
    return [
        (bad_shape, ValueError, "shape"),
        (bad_dtype, TypeError, "bool"),
        (bad_uint8, TypeError, "bool"),
        (not_tensor, TypeError, "bool"),
        (missing, ValueError, "missing"),
        (unexpected, ValueError, "unexpected"),
        ([("0.weight", good["0.weight"])], TypeError, "mapping"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_load_state_dict_rejects_bad_state_without_changing_anything(mlp, case):
    model = mlp.build()
    masks = random_masks(model, seed=1)
    masks.apply()
    before = {n: m.clone() for n, m in masks.items()}
    weights = clone_state(model)
    state, exc, words = _bad_states(masks)[case]
    with pytest.raises(exc, match=words):
        masks.load_state_dict(state)
    for n in masks:
        assert torch.equal(masks[n], before[n]), n
    masks.apply()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])


def test_load_state_dict_non_strict_loads_known_names_only(mlp):
    masks = gp.MaskSet(mlp.build())
    new0 = torch.zeros(16, 8, dtype=torch.bool)
    masks.load_state_dict({"0.weight": new0, "other.weight": torch.ones(2, 2, dtype=torch.bool)},
                          strict=False)
    assert torch.equal(masks["0.weight"], new0)
    assert bool(masks["2.weight"].all())


def test_setitem_validates(mlp):
    masks = gp.MaskSet(mlp.build())
    with pytest.raises(KeyError):
        masks["nope"] = torch.ones(2, dtype=torch.bool)
    with pytest.raises(TypeError):
        masks["0.weight"] = torch.ones(16, 8)
    with pytest.raises(ValueError):
        masks["0.weight"] = torch.ones(8, 16, dtype=torch.bool)
    with pytest.raises(ValueError):
        gp.MaskSet(mlp.build(), names=["0.weight", "nope.weight"])
    with pytest.raises(TypeError):
        gp.MaskSet("model")


def test_sparsity_overall_and_per_layer(mlp):
    masks = gp.MaskSet(mlp.build())
    masks["0.weight"][:4] = False          # 4 of 16 rows of [16, 8]: 32 of 128
    masks["2.weight"][:, :2] = False       # 2 of 16 columns of [16, 16]: 32 of 256
    assert masks.sparsity(per_layer=True) == {"0.weight": 32 / 128, "2.weight": 32 / 256}
    assert masks.sparsity() == pytest.approx(64 / 384, abs=1e-15)
    assert masks.count() == (384 - 64, 384)


def test_in_place_mask_edits_are_honoured_by_apply(mlp):
    model = mlp.build()
    masks = gp.MaskSet(model)
    masks.apply()                                   # caches the pruned view of the masks
    w = model[0].weight
    masks["0.weight"][0] = False                    # prune a row in place
    masks.apply()
    assert bool((w.detach()[0] == 0).all()) and bool((w.detach()[1:] != 0).all())
    masks["0.weight"].logical_and_(torch.arange(8) != 3)   # prune a column in place
    masks.apply()
    assert bool((w.detach()[:, 3] == 0).all())
    masks["0.weight"][0] = torch.arange(8) != 3     # un-prune the row but its column-3 entry
    with torch.no_grad():
        w[0] = 1.5
    masks.apply()
    assert bool((w.detach()[0, torch.arange(8) != 3] == 1.5).all())
    assert float(w.detach()[0, 3]) == 0.0


def test_apply_follows_replaced_parameter_storage_and_in_place_edits_of_grads(mlp):
    """The hot path caches detached views and float masks; it must notice a parameter whose
    storage was replaced (``p.data = ...``, e.g. after loading or casting) and mask edits between
    gradient passes."""
    model = mlp.build()
    masks = gp.MaskSet(model)
    masks["0.weight"][0] = False
    masks.apply()
    w = model[0].weight
    w.data = torch.full_like(w.data, 2.0)           # new storage: the cached view is stale
    masks.apply()
    assert bool((w.detach()[0] == 0).all()) and bool((w.detach()[1:] == 2.0).all())
    w.grad = torch.ones_like(w)
    masks.apply_to_grads()
    assert bool((w.grad[0] == 0).all()) and bool((w.grad[1:] == 1).all())
    masks["0.weight"][1] = False                    # in place, between two gradient passes
    w.grad = torch.ones_like(w)
    masks.apply_to_grads()
    assert bool((w.grad[:2] == 0).all()) and bool((w.grad[2:] == 1).all())
    g = torch.ones_like(w, requires_grad=True) * 1  # a gradient that is part of a graph (create_graph)
    w.grad = g
    masks.apply_to_grads()                          # falls back to the no_grad path
    assert bool((w.grad[:2] == 0).all()) and bool((w.grad[2:] == 1).all())


# -- torch.nn.utils.prune interop -------------------------------------------------------------

def test_to_torch_prune_is_what_torch_forward_uses(mlp):
    model = mlp.build()
    masks = random_masks(model, seed=2)
    x = mlp.batches(1)[0][0]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in masks.items():
            params_of(reference)[n].mul_(m)
    masks.to_torch_prune()
    for n, m in masks.items():
        mod = model.get_submodule(n.rsplit(".", 1)[0])
        assert isinstance(mod.weight_orig, nn.Parameter)
        assert torch.equal(mod.weight_mask.bool(), m)
        assert tprune.is_pruned(mod)
    sd = model.state_dict()
    assert {"0.weight_orig", "0.weight_mask", "2.weight_orig", "2.weight_mask"} <= set(sd)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    # a pruned entry of weight_orig no longer matters, a kept one does
    pruned_idx = tuple(torch.nonzero(~masks["0.weight"])[0].tolist())
    kept_idx = tuple(torch.nonzero(masks["0.weight"])[0].tolist())
    with torch.no_grad():
        model[0].weight_orig[pruned_idx] = 100.0
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    with torch.no_grad():
        model[0].weight_orig[kept_idx] += 100.0
    assert not torch.allclose(model(x), reference(x))


def test_to_torch_prune_twice_replaces_the_mask(mlp):
    model = mlp.build()
    masks = random_masks(model, seed=2)
    masks.to_torch_prune()
    masks["0.weight"] = masks["0.weight"] & (torch.arange(8) != 0)
    masks.to_torch_prune()
    assert torch.equal(model[0].weight_mask.bool(), masks["0.weight"])
    assert not hasattr(model[0], "weight_orig_orig")


def _torch_pruned_mlp(seed=0):
    model = MLP.build(seed)
    tprune.l1_unstructured(model[0], "weight", amount=0.5)
    tprune.l1_unstructured(model[2], "weight", amount=0.25)
    return model


def test_from_torch_prune_reads_masks_and_folds_back(mlp):
    model = _torch_pruned_mlp()
    expected = {"0.weight": model[0].weight_mask.bool().clone(),
                "2.weight": model[2].weight_mask.bool().clone()}
    x = mlp.batches(1)[0][0]
    y = model(x)
    masks = gp.MaskSet.from_torch_prune(model)
    assert list(masks) == ["0.weight", "2.weight"]
    for n, m in expected.items():
        assert torch.equal(masks[n], m)
    assert masks.sparsity(per_layer=True) == {"0.weight": 0.5, "2.weight": 0.25}
    # folded back to ordinary parameters, zero where pruned, same function
    assert isinstance(model[0].weight, nn.Parameter) and not hasattr(model[0], "weight_orig")
    assert not tprune.is_pruned(model)
    assert bool((model[0].weight.detach()[~expected["0.weight"]] == 0).all())
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    # the MaskSet keeps enforcing them on the plain weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    masks.attach(opt)
    train_steps(model, opt, mlp.batches(3))
    for n, m in expected.items():
        assert bool((params_of(model)[n].detach()[~m] == 0).all())


def test_from_torch_prune_without_remove_keeps_reparametrization(mlp):
    model = _torch_pruned_mlp()
    expected = model[0].weight_mask.bool().clone()
    x = mlp.batches(1)[0][0]
    y = model(x)
    masks = gp.MaskSet.from_torch_prune(model, remove=False)
    assert list(masks) == ["0.weight", "2.weight"]
    assert torch.equal(masks["0.weight"], expected)
    assert hasattr(model[0], "weight_orig") and tprune.is_pruned(model)
    masks.apply()                                   # enforced on the underlying weight_orig
    assert bool((model[0].weight_orig.detach()[~expected] == 0).all())
    assert bool((model[0].weight_orig.detach()[expected] != 0).all())
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)


def test_from_torch_prune_on_unpruned_model_raises(mlp):
    with pytest.raises(ValueError, match="torch.nn.utils.prune"):
        gp.MaskSet.from_torch_prune(mlp.build())


def test_state_dict_from_torch_prune(mlp):
    model = _torch_pruned_mlp()
    x = mlp.batches(1)[0][0]
    state = model.state_dict()
    plain, mask_state = gp.MaskSet.state_dict_from_torch_prune(state)
    assert set(plain) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert set(mask_state) == {"0.weight", "2.weight"}
    for n in mask_state:
        mod = model.get_submodule(n.split(".")[0])
        assert mask_state[n].dtype == torch.bool
        assert torch.equal(mask_state[n], mod.weight_mask.bool())
        assert torch.equal(plain[n], mod.weight_orig.detach() * mod.weight_mask)
    fresh = mlp.build(7)
    fresh.load_state_dict(plain)                    # strict: a plain model state
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    masks = gp.MaskSet(fresh)
    masks.load_state_dict(mask_state)
    assert masks.sparsity(per_layer=True) == {"0.weight": 0.5, "2.weight": 0.25}


# =============================================================================================
# criteria formulas


W1 = torch.tensor([[1.0, -2.0, 0.5], [3.0, -0.5, -1.0]])
W2 = torch.tensor([[0.5, -1.0, 2.0], [-3.0, 1.5, 0.0]])
G1 = torch.tensor([[0.5, -1.0, 2.0], [2.0, 0.0, -0.25]])
G2 = torch.tensor([[-1.5, 0.25, 1.0], [1.0, -3.0, 0.5]])


def feed(crit, param, steps):
    """Simulate training steps: weights ``w``, gradients ``g`` at each step."""
    for w, g in steps:
        with torch.no_grad():
            param.copy_(w)
        param.grad = g.clone()
        crit.on_step_begin()
        crit.on_before_optimizer_step()
        crit.on_after_optimizer_step()


HAND = {
    "gradient": (G1.abs() + G2.abs()) / 2,
    "snip": ((W1 * G1).abs() + (W2 * G2).abs()) / 2,
    "taylor": ((W1 * G1) ** 2 + (W2 * G2) ** 2) / 2,
    "movement": (-(W1 * G1) - (W2 * G2)) / 2,
    "fisher": (G1 ** 2 + G2 ** 2) / 2,
}


@pytest.mark.parametrize("name", list(HAND))
def test_accumulating_criteria_match_hand_computation(name):
    p = nn.Parameter(torch.zeros(2, 3))
    crit = gp.get_criterion(name, {"w": p})
    assert crit.needs_grad and not crit.ready()
    with pytest.raises(RuntimeError):
        crit.scores
    feed(crit, p, [(W1, G1), (W2, G2)])
    assert crit.ready()
    torch.testing.assert_close(crit.scores["w"], HAND[name], rtol=1e-6, atol=1e-7)
    assert crit.signed == (name == "movement")
    # state round-trip into a new criterion of a new parameter
    q = nn.Parameter(torch.zeros(2, 3))
    other = gp.get_criterion(name, {"w": q})
    other.load_state_dict(copy.deepcopy(crit.state_dict()))
    torch.testing.assert_close(other.scores["w"], crit.scores["w"], rtol=0, atol=0)
    # reset forgets
    crit.reset()
    assert not crit.ready()
    feed(crit, p, [(W2, G2)])
    single = {"gradient": G2.abs(), "snip": (W2 * G2).abs(), "taylor": (W2 * G2) ** 2,
              "movement": -(W2 * G2), "fisher": G2 ** 2}[name]
    torch.testing.assert_close(crit.scores["w"], single, rtol=1e-6, atol=1e-7)


def test_accumulating_criterion_mean_over_three_batches_with_a_missing_grad():
    p = nn.Parameter(torch.zeros(2, 3))
    crit = gp.get_criterion("gradient", {"w": p})
    feed(crit, p, [(W1, G1), (W2, G2)])
    p.grad = None                                   # an unused parameter: zero gradient, still a batch
    crit.on_before_optimizer_step()
    torch.testing.assert_close(crit.scores["w"], (G1.abs() + G2.abs()) / 3)


@pytest.mark.parametrize("alpha,beta", [(0.5, 2.0), (0.9, 1.0), (0.0, 0.3)])
def test_snip_momentum_formula(alpha, beta):
    p = nn.Parameter(torch.zeros(2, 3))
    opts = {} if (alpha, beta) == (0.9, 1.0) else {"alpha": alpha, "beta": beta}
    crit = gp.get_criterion("snip_momentum", {"w": p}, **opts)
    feed(crit, p, [(W1, G1), (W2, G2)])
    s1 = beta * (W1 * G1).abs()
    s2 = alpha * s1 + beta * (W2 * G2).abs()
    torch.testing.assert_close(crit.scores["w"], s2, rtol=1e-6, atol=1e-7)
    crit.reset()                                    # persists across prune events
    torch.testing.assert_close(crit.scores["w"], s2, rtol=1e-6, atol=1e-7)
    feed(crit, p, [(W1, G1)])
    torch.testing.assert_close(crit.scores["w"], alpha * s2 + beta * (W1 * G1).abs(), rtol=1e-6, atol=1e-7)


def test_snip_momentum_options_through_config():
    p = nn.Parameter(torch.zeros(2, 3))
    cfg = gp.PruneConfig(criterion="snip_momentum", criterion_options={"alpha": 0.25, "beta": 4.0})
    crit = gp.get_criterion(cfg, {"w": p})
    feed(crit, p, [(W1, G1), (W2, G2)])
    torch.testing.assert_close(crit.scores["w"], 0.25 * 4.0 * (W1 * G1).abs() + 4.0 * (W2 * G2).abs())
    with pytest.raises(ValueError, match="alpha"):
        gp.get_criterion("snip_momentum", {"w": p}, alpha=-1.0)


def test_magnitude_is_absolute_weight_and_needs_no_gradient():
    p = nn.Parameter(W1.clone())
    crit = gp.get_criterion("magnitude", {"w": p})
    assert not crit.needs_grad and crit.ready()
    assert torch.equal(crit.scores["w"], W1.abs())
    with torch.no_grad():
        p.copy_(W2)
    assert torch.equal(crit.scores["w"], W2.abs())


def test_random_scores_are_seeded_and_reproducible():
    p = nn.Parameter(torch.zeros(4, 8))
    torch.manual_seed(1)
    a = gp.get_criterion("random", {"w": p}, seed=3).scores["w"]
    torch.manual_seed(2)                            # the global RNG does not matter
    b = gp.get_criterion("random", {"w": p}, seed=3).scores["w"]
    c = gp.get_criterion("random", {"w": p}, seed=4).scores["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == p.shape and bool(((a >= 0) & (a < 1)).all())
    assert len(torch.unique(a)) == a.numel()
    crit = gp.get_criterion("random", {"w": p}, seed=3)
    assert torch.equal(crit.scores["w"], crit.scores["w"])
    # the config's seed reaches it
    d = gp.get_criterion(gp.PruneConfig(criterion="random", seed=3), {"w": p}).scores["w"]
    assert torch.equal(d, a)


def test_get_criterion_validation():
    p = {"w": nn.Parameter(torch.zeros(2, 2))}
    with pytest.raises(ValueError, match="valid options: alpha, beta"):
        gp.get_criterion("snip_momentum", p, gamma=1.0)
    with pytest.raises(ValueError, match="magnitude"):
        gp.get_criterion("no_such_criterion", p)
    with pytest.raises(TypeError):
        gp.get_criterion(3, p)
    with pytest.raises(ValueError):
        gp.get_criterion("magnitude", {})


def test_register_criterion_rejects_duplicates_and_non_criteria():
    with pytest.raises(ValueError, match="already registered"):
        @gp.register_criterion("magnitude")
        class Again(gp.Criterion):
            @property
            def scores(self):
                return {}
    with pytest.raises(TypeError):
        gp.register_criterion("not_a_criterion_cls")(object)
    assert gp.get_criterion("magnitude", {"w": nn.Parameter(W1.clone())}).scores["w"].equal(W1.abs())


def test_prune_scores_are_the_mean_over_the_batches_it_used(mlp):
    model = mlp.build()
    data = mlp.batches(5)
    ref = mlp.build()
    ref.eval()
    acc = {n: torch.zeros_like(params_of(ref)[n]) for n in ("0.weight", "2.weight")}
    for b in data[:3]:
        ref.zero_grad()
        mlp.loss_fn(ref, b).backward()
        for n in acc:
            acc[n] += params_of(ref)[n].grad ** 2
    res = gp.prune(model, sparsity=0.5, criterion="fisher", data=data, loss_fn=mlp.loss_fn, n_batches=3)
    assert res.batches == 3
    for n in acc:
        torch.testing.assert_close(res.scores[n], acc[n] / 3, rtol=1e-5, atol=1e-9)


# =============================================================================================
# GradientStatistics and stream_gradients


def test_gradient_statistics_match_hand_computation():
    p = nn.Parameter(W1.clone())
    stats = gp.GradientStatistics({"w": p}, ("mean", "mean_abs", "mean_sq", "mean_wg"))
    stats.update({"w": G1})
    p.grad = G2.clone()
    stats.update()                                  # from .grad
    p.grad = None
    stats.update()                                  # no gradient: counts as zero
    assert stats.count == 3
    torch.testing.assert_close(stats.get("mean")["w"], (G1 + G2) / 3)
    torch.testing.assert_close(stats.get("mean_abs")["w"], (G1.abs() + G2.abs()) / 3)
    torch.testing.assert_close(stats.get("mean_sq")["w"], (G1 ** 2 + G2 ** 2) / 3)
    torch.testing.assert_close(stats.get("mean_wg")["w"], (W1 * G1 + W1 * G2) / 3)
    # a state round-trip
    other = gp.GradientStatistics({"w": nn.Parameter(W1.clone())}, stats.stats)
    other.load_state_dict(copy.deepcopy(stats.state_dict()))
    assert other.count == 3
    torch.testing.assert_close(other.get("mean_sq")["w"], stats.get("mean_sq")["w"], rtol=0, atol=0)


def test_gradient_statistics_validation():
    p = nn.Parameter(W1.clone())
    with pytest.raises(ValueError, match="mean_abs"):
        gp.GradientStatistics({"w": p}, ("median",))
    stats = gp.GradientStatistics({"w": p}, ("mean",))
    with pytest.raises(RuntimeError):
        stats.get("mean")
    stats.update({"w": G1})
    with pytest.raises(ValueError):
        stats.get("mean_sq")


def test_stream_gradients_feeds_statistics_per_batch(mlp):
    model = mlp.build()
    data = mlp.batches(4)
    w = model[0].weight
    stats = gp.GradientStatistics({"w": w}, ("mean", "mean_sq"))
    n = gp.stream_gradients(model, data, mlp.loss_fn, {"w": w}, on_batch=stats.update)
    assert n == 4 and stats.count == 4
    ref = mlp.build()
    ref.eval()
    gs = []
    for b in data:
        ref.zero_grad()
        mlp.loss_fn(ref, b).backward()
        gs.append(ref[0].weight.grad.clone())
    torch.testing.assert_close(stats.get("mean")["w"], sum(gs) / 4, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats.get("mean_sq")["w"], sum(g * g for g in gs) / 4, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_stream_gradients_restores_the_model(mlp, training):
    model = mlp.build()
    model.train(training)
    model[2].bias.requires_grad_(False)
    model[0].weight.requires_grad_(False)           # scored even though the user froze it
    user_grads = {}
    for n, p in model.named_parameters():
        if n != "4.bias":
            p.grad = torch.full_like(p, 7.0)
            user_grads[n] = p.grad
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []

    def loss_fn(m, b):
        seen.append((m.training, {n: p.requires_grad for n, p in m.named_parameters()}))
        return mlp.loss_fn(m, b)

    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    grads_seen = []
    gp.stream_gradients(model, mlp.batches(2), loss_fn, params,
                        on_batch=lambda: grads_seen.append(model[0].weight.grad.clone()))
    # during scoring: eval mode, only the scored params need grad, and they got fresh gradients
    for mode, req in seen:
        assert mode is False
        assert {n for n, r in req.items() if r} == set(params)
    assert all(not bool((g == 7.0).all()) for g in grads_seen)
    # afterwards: everything as it was
    assert model.training is training and all(m.training is training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        if n in user_grads:
            assert p.grad is user_grads[n] and bool((p.grad == 7.0).all())
        else:
            assert p.grad is None


def test_stream_gradients_stops_at_exactly_n_batches(mlp):
    model = mlp.build()
    pulled, calls = [], []
    batches = mlp.batches(10)

    def source():
        for i, b in enumerate(batches):
            pulled.append(i)
            yield b

    def loss_fn(m, b):
        calls.append(1)
        return mlp.loss_fn(m, b)

    it = source()
    n = gp.stream_gradients(model, it, loss_fn, {"w": model[0].weight}, n_batches=3)
    assert n == 3 and len(calls) == 3
    assert pulled == [0, 1, 2]                     # no fourth batch drawn from the data
    assert next(it) is batches[3]                  # the caller's iterator resumes where scoring stopped
    # fewer batches than asked: all of them
    assert gp.stream_gradients(model, batches[:2], mlp.loss_fn, {"w": model[0].weight}, n_batches=5) == 2


def test_stream_gradients_errors_restore_the_model(mlp):
    model = mlp.build()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    user_grad = model[0].weight.grad
    params = {"w": model[0].weight}
    state = clone_state(model)

    def check_restored():
        assert model.training
        assert model[0].weight.grad is user_grad
        assert all(p.requires_grad for p in model.parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k])

    with pytest.raises(ValueError, match="no batches"):
        gp.stream_gradients(model, [], mlp.loss_fn, params)
    check_restored()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="non-finite"):
            gp.stream_gradients(model, mlp.batches(2), lambda m, b: mlp.loss_fn(m, b) * bad, params)
        check_restored()
    with pytest.raises(TypeError, match="scalar"):
        gp.stream_gradients(model, mlp.batches(2), lambda m, b: m(b[0]).sum(dim=1), params)
    check_restored()
    with pytest.raises(TypeError, match="scalar"):
        gp.stream_gradients(model, mlp.batches(2), lambda m, b: 1.0, params)
    check_restored()
    with pytest.raises(TypeError):
        gp.stream_gradients(model, 5, mlp.loss_fn, params)
    with pytest.raises(TypeError):
        gp.stream_gradients(model, mlp.batches(1), "loss", params)
    with pytest.raises(ValueError):
        gp.stream_gradients(model, None, mlp.loss_fn, params)
    with pytest.raises(ValueError):
        gp.stream_gradients(model, mlp.batches(1), mlp.loss_fn, params, n_batches=0)
    with pytest.raises(TypeError):
        gp.stream_gradients(model, mlp.batches(1), mlp.loss_fn, params, n_batches=1.0)
    check_restored()


# =============================================================================================
# prune(): selection order, chaining, validation


def _distinct_weight_mlp():
    """An MLP whose prunable weights are distinct magnitudes (no ties anywhere)."""
    model = MLP.build(0)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for lin, n in ((model[0], 128), (model[2], 256)):
            vals = (torch.randperm(n, generator=gen).float() + 1.0) / n
            signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
            lin.weight.copy_((vals * signs).reshape(lin.weight.shape))
    return model


def _expected_chain(score, prev, threshold, topk):
    """mask -> threshold -> topk on one layer, written out."""
    keep = prev.clone().reshape(-1)
    s = score.reshape(-1)
    if threshold is not None:
        keep &= s >= threshold
    remaining = int(keep.sum())
    if topk is not None:
        k = min(topk, remaining) if isinstance(topk, int) else min(remaining, math.ceil(topk * remaining))
        order = sorted(torch.nonzero(keep).flatten().tolist(), key=lambda i: -float(s[i]))
        keep = torch.zeros_like(keep)
        keep[order[:k]] = True
    return keep.reshape(score.shape)


@pytest.mark.parametrize("threshold,topk", [
    (0.3, 10), (0.3, 0.25), (None, 7), (0.5, None), (None, 1), (None, 1.0), (0.2, 1000),
])
def test_prune_chains_mask_threshold_topk(threshold, topk):
    model = _distinct_weight_mlp()
    w = {n: p.detach().clone() for n, p in params_of(model).items()}
    prev = {}
    for n in ("0.weight", "2.weight"):
        # the previous mask removes the 10 LARGEST weights: they must stay pruned
        flat = torch.ones(w[n].numel(), dtype=torch.bool)
        flat[w[n].abs().reshape(-1).topk(10).indices] = False
        prev[n] = flat.reshape(w[n].shape)
    res = gp.prune(model, criterion="magnitude", mask=prev, threshold=threshold, topk=topk)
    for n in prev:
        expected = _expected_chain(w[n].abs(), prev[n], threshold, topk)
        assert torch.equal(res.masks[n], expected), n
        assert bool((params_of(model)[n].detach()[~expected] == 0).all())
    if type(topk) is int and topk == 1:
        assert all(int(m.sum()) == 1 for m in res.masks.values())


def test_prune_with_a_maskset_as_mask_counts_it_toward_the_sparsity(mlp):
    model = mlp.build()
    first = gp.prune(model, sparsity=0.25, criterion="random", seed=1)
    prev = {n: m.clone() for n, m in first.masks.items()}
    res = gp.prune(model, sparsity=0.5, criterion="random", seed=2, mask=first.masks)
    for n, m in res.masks.items():
        assert int((~m).sum()) == round_half_up(0.5 * m.numel())
        assert not bool((~prev[n] & m).any())       # pruned before: still pruned


def test_prune_global_topk_keeps_the_k_best_overall():
    model = _distinct_weight_mlp()
    w = {n: p.detach().abs().clone() for n, p in params_of(model).items() if n in ("0.weight", "2.weight")}
    res = gp.prune(model, criterion="magnitude", topk=20, scope="global")
    kept = sum(int(m.sum()) for m in res.masks.values())
    assert kept == 20
    allw = torch.cat([w[n].reshape(-1) for n in w])
    cutoff = allw.topk(20).values.min()
    for n, m in res.masks.items():
        assert torch.equal(m, w[n] >= cutoff)


def test_prune_threshold_on_gradient_scores(mlp):
    model = mlp.build()
    data = mlp.batches(2)
    res = gp.prune(model, criterion="gradient", threshold=0.01, data=data, loss_fn=mlp.loss_fn)
    for n, m in res.masks.items():
        assert torch.equal(m, res.scores[n] >= 0.01)


def _model_fingerprint(model):
    return (clone_state(model), {n: p.requires_grad for n, p in model.named_parameters()},
            {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
            model.training)


def _assert_fingerprint(model, fp):
    state, flags, grads, training = fp
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None)
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n])
    assert model.training == training


BAD_CALLS = [
    ("sparsity-str", dict(sparsity="0.5"), TypeError, "target_sparsity"),
    ("sparsity-bool", dict(sparsity=True), TypeError, "target_sparsity"),
    ("sparsity-1", dict(sparsity=1.0), ValueError, "target_sparsity"),
    ("sparsity-neg", dict(sparsity=-0.1), ValueError, "target_sparsity"),
    ("sparsity-nan", dict(sparsity=float("nan")), ValueError, "target_sparsity"),
    ("sparsity-over-cap", dict(sparsity=0.99), ValueError, "sparsity"),
    ("over-max-global", dict(sparsity=0.9, max_sparsity=0.5, scope="global", criterion="snip"),
     ValueError, "max_sparsity"),
    ("nm-over-ratio", dict(sparsity=0.6, pattern="2:4"), ValueError, "2:4"),
    ("criterion-int", dict(sparsity=0.5, criterion=3), TypeError, "criterion"),
    ("criterion-unknown", dict(sparsity=0.5, criterion="nope"), ValueError, "magnitude"),
    ("pattern-bad", dict(sparsity=0.5, pattern="4x"), ValueError, "pattern"),
    ("unknown-keyword", dict(sparsity=0.5, sparsiti=0.3), ValueError, "valid keys: criterion"),
    ("topk-zero", dict(topk=0), ValueError, "topk"),
    ("topk-bool", dict(topk=True), TypeError, "topk"),
    ("topk-and-sparsity", dict(topk=3, sparsity=0.5), ValueError, "topk"),
    ("no-target", dict(), ValueError, "sparsity"),
    ("grad-no-data", dict(sparsity=0.5, criterion="snip", data=None), ValueError, "data"),
    ("grad-no-loss", dict(sparsity=0.5, criterion="taylor", loss_fn=None), ValueError, "loss_fn"),
    ("all-excluded", dict(sparsity=0.5, exclude=["*"]), ValueError, "no prunable"),
    ("criterion-option", dict(sparsity=0.5, criterion="snip_momentum", criterion_options={"gamma": 1}),
     ValueError, "gamma"),
    ("mask-shape", dict(sparsity=0.5, mask={"0.weight": torch.ones(3, 3, dtype=torch.bool)}),
     ValueError, "0.weight"),
    ("mask-dtype", dict(sparsity=0.5, mask={"0.weight": torch.ones(16, 8)}), ValueError, "bool"),
    ("mask-type", dict(sparsity=0.5, mask=[1, 2]), TypeError, "mask"),
    ("n-batches", dict(sparsity=0.5, criterion="snip", n_batches=0), ValueError, "n_batches"),
]


@pytest.mark.parametrize("kw,exc,words", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_prune_bad_input_changes_nothing(mlp, kw, exc, words):
    model = mlp.build()
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)
    model[2].bias.requires_grad_(False)
    fp = _model_fingerprint(model)
    call = dict(data=mlp.batches(2), loss_fn=mlp.loss_fn)
    call.update(kw)
    with pytest.raises(exc, match=words):
        gp.prune(model, **call)
    _assert_fingerprint(model, fp)


def test_prune_unknown_keyword_lists_every_valid_key(mlp):
    model = mlp.build()
    with pytest.raises(ValueError) as info:
        gp.prune(model, sparsity=0.5, scoep="global")
    msg = str(info.value)
    assert "'scoep'" in msg
    for key in gp.PruneConfig.field_names():
        assert key in msg
    with pytest.raises(ValueError, match="valid keys"):
        gp.prune(model, gp.PruneConfig(target_sparsity=0.5), scoep="global")


def test_prune_rejects_non_models_and_empty_models():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gp.prune("model", sparsity=0.5)
    with pytest.raises(TypeError, match="PruneConfig"):
        gp.prune(nn.Linear(4, 4), {"target_sparsity": 0.5})
    with pytest.raises(ValueError, match="no prunable"):
        gp.prune(nn.Sequential(), sparsity=0.5)
    norm_only = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    before = clone_state(norm_only)
    with pytest.raises(ValueError, match="no prunable"):
        gp.prune(norm_only, sparsity=0.5)
    for k, v in norm_only.state_dict().items():
        assert torch.equal(v, before[k])


def test_prune_config_object_and_keyword_override(mlp):
    cfg = gp.PruneConfig(criterion="magnitude", pattern="channel", target_sparsity=0.25)
    a = gp.prune(mlp.build(), cfg)
    b = gp.prune(mlp.build(), cfg, target_sparsity=0.5)
    assert a.masks.sparsity(per_layer=True) == {"0.weight": 0.25, "2.weight": 0.25}
    assert b.masks.sparsity(per_layer=True) == {"0.weight": 0.5, "2.weight": 0.5}
    assert cfg.target_sparsity == 0.25                # the caller's config is not modified


# =============================================================================================
# Pruner


def _pruner_loop(model, opt, pruner, batches, on_step=None):
    model.train()
    for b in batches:
        pruner.on_step_begin()
        opt.zero_grad()
        MLP.loss_fn(model, b).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()
        if on_step:
            on_step()


def _schedule_value(kind, p, s0, st):
    if kind == "linear":
        return s0 + (st - s0) * p
    if kind == "cubic":
        return st + (s0 - st) * (1 - p) ** 3
    if kind == "exp":
        return 1 - (1 - s0) * ((1 - st) / (1 - s0)) ** p
    if kind == "cube":
        return s0 + (st - s0) * p ** 3
    if kind == "cos":
        return s0 + (st - s0) * (1 - math.cos(math.pi * p / 2))
    raise AssertionError(kind)


def _expected_entries(pattern, shape, s):
    numel = math.prod(shape)
    w = {"1x1": 1, "4x1": 4, "2:4": 2, "channel": math.prod(shape[1:])}[pattern]
    return w * round_half_up(s * numel / w)


@pytest.mark.parametrize("schedule,pattern,criterion,target,initial", [
    ("linear", "1x1", "snip", 0.8, 0.0),
    ("cubic", "4x1", "snip_momentum", 0.75, 0.0),
    ("exp", "channel", "taylor", 0.75, 0.1),
    ("cube", "2:4", "movement", 0.5, 0.0),
    ("cos", "1x1", "magnitude", 0.6, 0.2),
])
def test_pruner_follows_the_schedule_to_the_exact_target(mlp, schedule, pattern, criterion, target, initial):
    start, end, freq, total_steps = 2, 9, 3, 13
    events = [2, 5, 8, 9]
    model = mlp.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    pruner = gp.Pruner(model, gp.PruneConfig(criterion=criterion, pattern=pattern, target_sparsity=target,
                                             initial_sparsity=initial, schedule=schedule,
                                             start_step=start, end_step=end, frequency=freq),
                       optimizer=opt)
    shapes = {n: p.shape for n, p in pruner.params.items()}
    expected_at = {e: _schedule_value(schedule, (k + 1) / len(events), initial, target)
                   for k, e in enumerate(events)}
    log = []
    prev_masks = {n: m.clone() for n, m in pruner.masks.items()}
    params = params_of(model)

    def on_step():
        step_done = pruner.step - 1
        counts = {n: int((~m).sum()) for n, m in pruner.masks.items()}
        log.append((step_done, counts))
        for n, m in pruner.masks.items():
            assert bool((params[n].detach()[~m] == 0.0).all())
            assert not bool((~prev_masks[n] & m).any()), "a pruned entry came back"
            prev_masks[n] = m.clone()

    _pruner_loop(model, opt, pruner, mlp.batches(total_steps), on_step)
    assert pruner.step == total_steps and pruner.done
    assert [h[0] for h in pruner.history] == events
    current = {n: 0 for n in shapes}
    for step, counts in log:
        if step in expected_at:
            current = {n: _expected_entries(pattern, shapes[n], expected_at[step]) for n in shapes}
        assert counts == current, (step, counts, current)
    # exact target at end_step, per layer
    assert pruner.masks.sparsity(per_layer=True) == {
        n: _expected_entries(pattern, s, target) / math.prod(s) for n, s in shapes.items()}
    for (step, s), e in zip(pruner.history, events):
        assert s == pytest.approx(sum(_expected_entries(pattern, shapes[n], expected_at[e])
                                      for n in shapes) / sum(math.prod(x) for x in shapes.values()))


def test_pruner_nm_pattern_defaults_to_its_ratio_and_adam_keeps_zeros(mlp):
    model = mlp.build()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    pruner = gp.Pruner(model, pattern="2:4", criterion="snip", schedule="linear", start_step=0,
                       end_step=4, frequency=2, optimizer=opt)
    params = params_of(model)

    def check():
        for n, m in pruner.masks.items():
            assert bool((params[n].detach()[~m] == 0.0).all())

    _pruner_loop(model, opt, pruner, mlp.batches(10), check)
    for n, m in pruner.masks.items():
        groups = (~m).reshape(m.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all())


def _accum_run(mode):
    model = MLP.build(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    pruner = gp.Pruner(model, criterion="snip", pattern="4x1", target_sparsity=0.5, schedule="linear",
                       start_step=0, end_step=4, frequency=2, optimizer=opt)
    micro = MLP.batches(12, seed=4)
    model.train()
    for step in range(6):
        a, b = micro[2 * step], micro[2 * step + 1]
        opt.zero_grad()
        if mode == "accumulate":                    # two micro-batches, one optimizer step
            for mb in (a, b):
                pruner.on_step_begin()
                (MLP.loss_fn(model, mb) / 2).backward()
        else:                                       # the same total gradient in one backward
            pruner.on_step_begin()
            ((MLP.loss_fn(model, a) + MLP.loss_fn(model, b)) / 2).backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()
    return model, pruner


def test_pruner_counts_optimizer_steps_not_micro_batches():
    m1, p1 = _accum_run("accumulate")
    m2, p2 = _accum_run("single")
    assert p1.step == p2.step == 6
    assert [h[0] for h in p1.history] == [h[0] for h in p2.history] == [0, 2, 4]
    for n in p1.masks:
        assert torch.equal(p1.masks[n], p2.masks[n])
        assert int((~p1.masks[n]).sum()) == round_half_up(0.5 * p1.masks[n].numel() / 4) * 4
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-7, msg=k)


def _snapshot_criterion(pruner):
    return copy.deepcopy(pruner.criterion.state_dict())


def _same_nested(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_nested(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
@pytest.mark.parametrize("criterion", ["snip", "snip_momentum"])
def test_pruner_skips_steps_with_non_finite_gradients(mlp, criterion, bad):
    batches = mlp.batches(8)

    def run(with_skip):
        model = mlp.build(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner = gp.Pruner(model, criterion=criterion, pattern="1x1", target_sparsity=0.5, schedule="linear",
                           start_step=0, end_step=6, frequency=3, optimizer=opt)
        model.train()
        for i, b in enumerate(batches):
            if with_skip and i == 3:               # an overflowing step, skipped like GradScaler does
                before = (pruner.step, _snapshot_criterion(pruner), {n: m.clone() for n, m in pruner.masks.items()},
                          clone_state(model))
                pruner.on_step_begin()
                opt.zero_grad()
                mlp.loss_fn(model, batches[7]).backward()
                model[2].weight.grad[1, 1] = bad
                pruner.on_before_optimizer_step()
                # no opt.step(): the scaler skipped it
                pruner.on_after_optimizer_step()
                assert pruner.step == before[0] == 3     # step 3 would have been a prune event
                assert pruner.skipped_steps == 1
                assert _same_nested(_snapshot_criterion(pruner), before[1])
                assert all(torch.equal(pruner.masks[n], before[2][n]) for n in pruner.masks)
                assert all(torch.equal(v, before[3][k]) for k, v in model.state_dict().items())
                assert [h[0] for h in pruner.history] == [0]
            pruner.on_step_begin()
            opt.zero_grad()
            mlp.loss_fn(model, b).backward()
            pruner.on_before_optimizer_step()
            opt.step()
            pruner.on_after_optimizer_step()
        return model, pruner

    m1, p1 = run(True)
    m2, p2 = run(False)
    assert p1.step == p2.step == len(batches) and p1.skipped_steps == 1 and p2.skipped_steps == 0
    assert p1.history == p2.history
    for n in p1.masks:
        assert torch.equal(p1.masks[n], p2.masks[n])
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_pruner_with_a_real_grad_scaler_on_cpu(mlp):
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=10 ** 6)
        with torch.autocast("cpu", dtype=torch.float16):
            probe = nn.Linear(2, 2)(torch.ones(1, 2))
        if probe.dtype != torch.float16:
            raise RuntimeError(f"autocast gave {probe.dtype}")
    except (RuntimeError, TypeError, AttributeError) as exc:  # pragma: no cover - depends on torch
        pytest.skip(f"torch.amp.GradScaler with float16 autocast is not supported on CPU here: {exc}")
    model = mlp.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = gp.Pruner(model, criterion="snip_momentum", pattern="1x1", target_sparsity=0.5,
                       schedule="linear", start_step=0, end_step=4, frequency=2, optimizer=opt)
    model.train()
    skipped = taken = 0
    for b in mlp.batches(16):
        step_before, crit_before, w_before = pruner.step, _snapshot_criterion(pruner), clone_state(model)
        pruner.on_step_begin()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mlp.loss_fn(model, b)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        pruner.on_before_optimizer_step()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        pruner.on_after_optimizer_step()
        if scaler.get_scale() < scale:             # the scaler found inf/NaN and skipped the step
            skipped += 1
            assert pruner.step == step_before
            assert _same_nested(_snapshot_criterion(pruner), crit_before)
            assert all(torch.equal(v, w_before[k]) for k, v in model.state_dict().items())
        else:
            taken += 1
            assert pruner.step == step_before + 1
    if skipped == 0:
        pytest.skip("float16 autocast on CPU did not overflow at init_scale 2**24: nothing to check")
    assert taken >= 5, "too few real steps to reach the end of the schedule"
    assert pruner.skipped_steps == skipped and pruner.step == taken
    assert pruner.done
    assert pruner.masks.sparsity(per_layer=True) == {"0.weight": 0.5, "2.weight": 0.5}


RESUME_CASES = [
    ("snip_momentum", "4x1", "cubic", torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("snip", "1x1", "linear", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ("movement", "channel", "exp", torch.optim.Adam, dict(lr=0.01)),
    ("random", "2:4", "linear", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("criterion,pattern,schedule,opt_cls,opt_kw", RESUME_CASES,
                         ids=[c[0] for c in RESUME_CASES])
def test_pruner_resume_mid_schedule_matches_a_straight_run(mlp, tmp_path, criterion, pattern, schedule,
                                                          opt_cls, opt_kw):
    target = 0.5 if pattern == "2:4" else 0.75
    cfg = gp.PruneConfig(criterion=criterion, pattern=pattern, target_sparsity=target, schedule=schedule,
                         start_step=0, end_step=8, frequency=3, seed=5)
    batches = mlp.batches(12)
    stop = 4                                        # between the events at steps 3 and 6

    def fresh(seed):
        model = mlp.build(seed)
        opt = opt_cls(model.parameters(), **opt_kw)
        return model, opt, gp.Pruner(model, cfg, optimizer=opt)

    ma, oa, pa = fresh(0)
    _pruner_loop(ma, oa, pa, batches)

    mb, ob, pb = fresh(0)
    _pruner_loop(mb, ob, pb, batches[:stop])
    assert pb.step == stop and not pb.done
    torch.save({"model": mb.state_dict(), "optimizer": ob.state_dict(), "pruner": pb.state_dict()},
               tmp_path / "ckpt.pt")
    del mb, ob, pb

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    mc, oc, pc = fresh(99)                          # a different init: everything must come from the file
    mc.load_state_dict(ckpt["model"])
    oc.load_state_dict(ckpt["optimizer"])
    pc.load_state_dict(ckpt["pruner"])
    assert pc.step == stop
    _pruner_loop(mc, oc, pc, batches[stop:])

    assert pc.step == pa.step == len(batches)
    assert pc.history == pa.history
    for n in pa.masks:
        assert torch.equal(pc.masks[n], pa.masks[n]), n
    for k, v in ma.state_dict().items():
        assert torch.equal(mc.state_dict()[k], v), k


def test_pruner_load_state_dict_with_a_different_config_raises(mlp):
    cfg = gp.PruneConfig(criterion="snip", target_sparsity=0.75, schedule="linear", end_step=6, frequency=2)
    model = mlp.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = gp.Pruner(model, cfg, optimizer=opt)
    _pruner_loop(model, opt, pruner, mlp.batches(3))
    state = pruner.state_dict()

    other = gp.Pruner(mlp.build(), cfg.replace(target_sparsity=0.5))
    with pytest.raises(ValueError, match="target_sparsity"):
        other.load_state_dict(state)
    assert other.step == 0 and other.history == [] and other.masks.sparsity() == 0.0
    assert not other.criterion.ready()

    same = gp.Pruner(mlp.build(), cfg)
    with pytest.raises(ValueError, match="missing"):
        same.load_state_dict({k: v for k, v in state.items() if k != "masks"})
    with pytest.raises(TypeError):
        same.load_state_dict([("step", 1)])
    assert same.step == 0


def test_pruner_validation(mlp):
    with pytest.raises(ValueError, match="target_sparsity"):
        gp.Pruner(mlp.build(), criterion="snip")
    with pytest.raises(ValueError, match="target_sparsity"):
        gp.Pruner(mlp.build(), topk=3)
    with pytest.raises(TypeError, match="optimizer"):
        gp.Pruner(mlp.build(), target_sparsity=0.5, optimizer="sgd")
    with pytest.raises(TypeError):
        gp.Pruner("model", target_sparsity=0.5)
    with pytest.raises(ValueError, match="valid keys"):
        gp.Pruner(mlp.build(), target_sparsity=0.5, end_stpe=3)


def test_pruner_event_without_scores_raises_clearly(mlp):
    model = mlp.build()
    pruner = gp.Pruner(model, criterion="snip", target_sparsity=0.5, schedule="oneshot", end_step=0)
    with pytest.raises(RuntimeError, match="no scores"):
        pruner.on_after_optimizer_step()           # an event step with no backward before it


def test_pruner_report_and_skipped_layers(cnn):
    model = cnn.build()
    with pytest.warns(UserWarning, match=r"skipping 0\.weight"):
        pruner = gp.Pruner(model, criterion="magnitude", pattern="2:4", schedule="oneshot", end_step=0)
    assert list(pruner.masks) == ["2.weight", "6.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    b = cnn.batches(1)[0]
    pruner.on_step_begin()
    cnn.loss_fn(model, b).backward()
    pruner.on_before_optimizer_step()
    opt.step()
    pruner.on_after_optimizer_step()
    rows = {r["name"]: r for r in pruner.report.rows}
    assert rows["0.weight"]["note"].startswith("skipped") and rows["0.weight"]["sparsity"] == 0.0
    assert rows["2.weight"]["sparsity"] == 0.5 and rows["6.weight"]["sparsity"] == 0.5


def test_pruner_starts_from_an_existing_mask():
    import gradprune as gp
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 2))
    start = gp.prune(model, sparsity=0.25, criterion="random").masks.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = gp.Pruner(model, gp.PruneConfig(criterion="magnitude", target_sparsity=0.5, end_step=4,
                                             frequency=2), optimizer=opt, mask=start)
    for _ in range(6):
        x = torch.randn(4, 8)
        opt.zero_grad()
        model(x).sum().backward()
        pruner.on_before_optimizer_step()
        opt.step()
        pruner.on_after_optimizer_step()
    assert pruner.masks.sparsity() == 0.5
    for n, m in start.items():
        assert not bool((~m & pruner.masks[n]).any())     # nothing the starting mask pruned came back
    with pytest.raises(ValueError, match="does not prune"):
        gp.Pruner(model, gp.PruneConfig(target_sparsity=0.5), mask={"4.weight": torch.ones(2, 16, dtype=torch.bool)})


def test_preprune_threshold_must_be_non_negative():
    import gradprune as gp
    with pytest.raises(ValueError, match="threshold must be in"):
        gp.PrePruneConfig(n_samples=4, threshold=-1.0)
