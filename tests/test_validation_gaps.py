"""Validation gaps of issue #13 point 6: each raised before any work, naming the field."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradprune as gp
from gradprune.select import Units, select


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def loss_fn(model, batch):
    return model(batch).pow(2).mean()


def batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 4, generator=g) for _ in range(n)]


# -- threshold=inf -------------------------------------------------------------------------

def test_threshold_inf_is_refused_like_sparsity_one():
    with pytest.raises(ValueError, match="target_sparsity"):
        gp.PruneConfig(target_sparsity=1.0)
    with pytest.raises(ValueError, match="threshold=inf"):
        gp.PruneConfig(threshold=math.inf)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="threshold=inf"):
        gp.prune(model, threshold=math.inf)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="threshold=inf"):
        select([Units("w", torch.tensor([1.0, 2.0]), 1, 2)], threshold=math.inf)
    # a finite threshold and -inf (prunes nothing) still work
    assert select([Units("w", torch.tensor([1.0, 2.0]), 1, 2)], threshold=-math.inf)["w"].all()


# -- max_sparsity is hard ------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
       pct=st.integers(0, 99), max_pct=st.integers(1, 100), scope=st.sampled_from(["local", "global"]))
def test_max_sparsity_is_a_hard_per_layer_bound_tiny_layers_included(sizes, pct, max_pct, scope):
    s, mx = pct / 100, max_pct / 100
    g = torch.Generator().manual_seed(sum(sizes))
    layers = [Units(f"l{i}", torch.rand(n, generator=g), 1, n) for i, n in enumerate(sizes)]
    try:
        keep = select(layers, sparsity=s, scope=scope, max_sparsity=mx, min_sparsity=0.0)
    except ValueError as err:
        assert "not reachable" in str(err)
        return
    for u in layers:
        pruned = int((~keep[u.name]).sum())
        assert pruned <= mx * u.n + 1e-9, (u.n, pruned, mx)


def test_a_four_weight_layer_at_ninety_percent_keeps_a_weight():
    keep = select([Units("w", torch.tensor([0.1, 0.2, 0.3, 0.4]), 1, 4)], sparsity=0.9)
    assert int(keep["w"].sum()) == 1  # round(3.6) = 4 would exceed max_sparsity=0.98


# -- endless iterators ---------------------------------------------------------------------

def endless():
    """An endless stream, cut at 100 batches so that a missing check fails instead of hanging."""
    for i, b in enumerate(itertools.cycle(batches())):
        if i >= 100:
            raise AssertionError("an endless iterator was consumed without n_batches")
        yield b


@pytest.mark.parametrize("make", [
    endless,
    lambda: itertools.islice(itertools.cycle(batches()), 50),
    lambda: (b for b in batches()),
])
def test_an_iterator_without_length_needs_n_batches(make):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="n_batches"):
        gp.prune(model, sparsity=0.5, criterion="snip", data=make(), loss_fn=loss_fn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res = gp.prune(model, sparsity=0.5, criterion="snip", data=make(), loss_fn=loss_fn, n_batches=2)
    assert res.batches == 2


def test_lists_and_list_iterators_need_no_n_batches():
    assert gp.prune(tiny_model(), sparsity=0.5, criterion="snip", data=batches(3),
                    loss_fn=loss_fn).batches == 3
    assert gp.prune(tiny_model(), sparsity=0.5, criterion="snip", data=iter(batches(2)),
                    loss_fn=loss_fn).batches == 2


# -- loss not connected to the model -------------------------------------------------------

@pytest.mark.parametrize("bad", [
    lambda m, x: m(x).pow(2).mean().detach(),
    lambda m, x: torch.tensor(1.0, requires_grad=True) * 2,
    lambda m, x: (m(x).detach() * torch.ones(1, requires_grad=True)).mean(),
    lambda m, x: x.sum() * 0 + torch.tensor(0.5),
])
def test_a_loss_not_connected_to_the_model_is_a_value_error(bad):
    model = tiny_model()
    with pytest.raises(ValueError, match="does not depend on the model's parameters"):
        gp.prune(model, sparsity=0.5, criterion="snip", data=batches(), loss_fn=bad)
    assert model[0].weight.grad is None


# -- wrong types ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"n_batches": "x"}, "n_batches"),
    ({"n_batches": True}, "n_batches"),
    ({"show_progress": "yes"}, "show_progress"),
    ({"show_progress": 1}, "show_progress"),
])
def test_wrong_types_in_prune_are_type_errors(kwargs, field):
    for criterion in ("magnitude", "snip"):  # also where no batch is read
        with pytest.raises(TypeError, match=field):
            gp.prune(tiny_model(), sparsity=0.5, criterion=criterion, data=batches(),
                     loss_fn=loss_fn, **kwargs)


def test_wrong_types_in_stream_gradients_are_type_errors():
    model = tiny_model()
    params = {"0.weight": model[0].weight}
    with pytest.raises(TypeError, match="n_batches"):
        gp.stream_gradients(model, batches(), loss_fn, params, n_batches="x")
    with pytest.raises(TypeError, match="show_progress"):
        gp.stream_gradients(model, batches(), loss_fn, params, show_progress="yes")


# -- process_group -------------------------------------------------------------------------

@pytest.mark.parametrize("group", ["world", 0, object()])
def test_a_process_group_that_is_not_a_group_is_a_type_error(group):
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        gp.prune(tiny_model(), sparsity=0.5, process_group=group)  # magnitude: no batch read
    with pytest.raises(TypeError, match="process_group"):
        gp.prune(tiny_model(), sparsity=0.5, criterion="snip", data=batches(), loss_fn=loss_fn,
                 process_group=group)
    model = tiny_model()
    with pytest.raises(TypeError, match="process_group"):
        gp.stream_gradients(model, batches(), loss_fn, {"0.weight": model[0].weight},
                            process_group=group)


# -- decay callables -----------------------------------------------------------------------

@pytest.mark.parametrize("value, exc", [(1.5, ValueError), (-0.1, ValueError), (math.nan, ValueError),
                                        (math.inf, ValueError), ("0.3", TypeError), (None, TypeError)])
def test_a_decay_callable_must_return_a_finite_value_in_0_1(value, exc):
    torch.manual_seed(0)
    model = nn.Linear(6, 4, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = gp.SparseConfig(density=0.5, grow="random", decay=lambda t: value, update_interval=1,
                          end_step=3, include_classifier=True)
    trainer = gp.SparseTrainer(model, opt, cfg)
    trainer.step()
    before = trainer.masks["weight"].clone()
    w = model.weight.detach().clone()
    with pytest.raises(exc, match=r"decay\(1\)"):
        model(torch.randn(2, 6)).sum().backward()
        trainer.step()
    assert torch.equal(trainer.masks["weight"], before) and torch.equal(model.weight.detach(), w)


def test_a_decay_callable_may_return_a_tensor_scalar():
    model = nn.Linear(6, 4, bias=False)
    cfg = gp.SparseConfig(density=0.5, grow="random", decay=lambda t: torch.tensor(0.25),
                          update_interval=1, end_step=3, include_classifier=True)
    trainer = gp.SparseTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), cfg)
    for _ in range(2):
        model(torch.randn(2, 6)).sum().backward()
        trainer.step()
    assert int(trainer.masks["weight"].sum()) == 12


# -- more wrong types ----------------------------------------------------------------------

def test_strict_must_be_a_bool():
    model = tiny_model()
    masks = gp.MaskSet(model, names=["0.weight"])
    with pytest.raises(TypeError, match="strict must be bool"):
        masks.load_state_dict(masks.state_dict(), strict="no")


def test_a_string_where_a_list_of_names_is_expected_is_a_type_error():
    model = tiny_model()
    with pytest.raises(TypeError, match=r"names must be a list of str.*\['0.weight'\]"):
        gp.MaskSet(model, names="0.weight")


@pytest.mark.parametrize("step", [True, False, "3", 1.0])
def test_a_bool_or_non_int_step_is_a_type_error(step):
    sched = gp.SparsitySchedule("cubic", 0.0, 0.5, start_step=0, end_step=4, frequency=1)
    with pytest.raises(TypeError, match="step must be int"):
        sched.sparsity_for_step(step)
    model = nn.Linear(6, 4, bias=False)
    trainer = gp.SparseTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                               gp.SparseConfig(density=0.5, include_classifier=True))
    with pytest.raises(TypeError, match="step must be int"):
        trainer.is_update_step(step)


# -- YAML: unquoted 2:4 and 5e-1 -----------------------------------------------------------

@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (4, 8)])
def test_from_yaml_reads_an_unquoted_nm_pattern_and_exponent_floats(n, m):
    cfg = gp.PruneConfig.from_yaml(f"pattern: {n}:{m}\ntarget_sparsity: {(m - n) / m * 10:g}e-1\n"
                                   "min_sparsity: 1e-2\n")
    assert cfg.pattern == f"{n}:{m}"
    assert cfg.target_sparsity == pytest.approx((m - n) / m) and cfg.min_sparsity == 0.01
    assert gp.PruneConfig.from_yaml(cfg.to_yaml()) == cfg


def test_a_yaml_1_1_integer_pattern_says_how_to_write_it():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load("pattern: 2:4")  # what a plain yaml.safe_load gives: 124
    with pytest.raises(TypeError, match=r'base-60 integer 124; quote it: pattern: "2:4"'):
        gp.PruneConfig.from_dict(data)
    with pytest.raises(TypeError, match=r"target_sparsity must be float \(write '5e-1' as the number 0.5"):
        gp.PruneConfig.from_dict(yaml.safe_load("target_sparsity: 5e-1"))


def test_cli_recipe_reads_an_unquoted_nm_pattern(tmp_path, monkeypatch, capsys):
    import pathlib
    import shutil
    import sys

    from gradprune import cli

    recipes = pathlib.Path(__file__).resolve().parents[1] / "examples" / "recipes"
    shutil.copy(recipes / "tiny.py", tmp_path / "tiny.py")
    (tmp_path / "r.yaml").write_text(
        "workflow: prune\nmodel: tiny:make_model\ndata: tiny:make_batches\nloss_fn: tiny:loss_fn\n"
        "output: out\nn_batches: 2\nprune: {criterion: snip, pattern: 2:4, min_sparsity: 0e-1}\n")
    try:
        assert cli.main(["run", str(tmp_path / "r.yaml")]) == 0, capsys.readouterr().err
    finally:
        sys.modules.pop("tiny", None)
    masks = torch.load(tmp_path / "out" / "masks.pt", weights_only=True)
    for m in masks.values():
        assert int(m.sum()) * 2 == m.numel()


def test_pre_prune_refuses_a_string_of_params_and_a_non_bool_show_progress():
    from test_preprune import _data, _loss, _model

    cfg = gp.PrePruneConfig(n_samples=4, topk=3)
    model = _model()
    name = next(n for n, _ in model.named_parameters())
    with pytest.raises(TypeError, match=r"params must be a list of str"):
        gp.pre_prune(model, _data(n=10), cfg, _loss, params=name)
    with pytest.raises(TypeError, match="show_progress must be bool"):
        gp.pre_prune(model, _data(n=10), cfg, _loss, show_progress="yes")
