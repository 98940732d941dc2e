"""A layer with no weights (a dimension of size 0, e.g. ``nn.Linear(8, 0)``) has nothing to
prune. Contract: ``gp.prune`` and ``gp.Pruner`` skip it like a layer the pattern does not fit
(reason ``has no weights``, a warning naming it, listed as not pruned); when it is all that is
left to prune, the ``ValueError`` names it, before any scoring and with no weight changed.
``select()`` itself refuses an empty layer with a ``ValueError`` naming it (it used to divide by
zero)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import gradprune as gp
from gradprune.select import Units, select


def _model(empty: tuple) -> nn.Sequential:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="zero-element"):  # torch's own init warning
        last = nn.Linear(*empty)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), last)


def _loss(m, b):
    return m[0](b).pow(2).sum()  # only the non-empty layer carries a gradient


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("empty", [(8, 0), (0, 4)])  # weight shapes (0, 8) and (4, 0)
def test_prune_with_only_the_empty_layer_raises_naming_it(scope, empty):
    model = _model(empty)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shape = tuple(model[2].weight.shape)
    with pytest.warns(UserWarning, match=r"skipping 2\.weight: has no weights"):
        with pytest.raises(ValueError, match=re.escape(f"'2.weight': 'has no weights (shape {shape}): nothing to prune'")):
            gp.prune(model, sparsity=0.5, criterion="snip", scope=scope, include=["2"],
                     data=[torch.randn(3, 4)], loss_fn=_never)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _never(m, b):
    raise AssertionError("scored before the empty layer was refused")


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("criterion", ["magnitude", "snip"])
def test_prune_skips_the_empty_layer_and_prunes_the_rest_exactly(scope, criterion):
    model = _model((8, 0))
    with pytest.warns(UserWarning, match=r"skipping 2\.weight: has no weights \(shape \(0, 8\)\)"):
        res = gp.prune(model, sparsity=0.5, criterion=criterion, scope=scope, include=["0", "2"],
                       data=[torch.randn(3, 4)], loss_fn=_loss)
    assert list(res.masks) == ["0.weight"]
    assert int((model[0].weight == 0).sum()) == 16  # exactly half of 32, the same in both scopes
    assert res.report.overall == 0.5
    assert "skipped: has no weights (shape (0, 8)): nothing to prune" in str(res.report)


def test_pruner_skips_the_empty_layer():
    model = _model((8, 0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"skipping 2\.weight: has no weights"):
        pruner = gp.Pruner(model, optimizer=opt, criterion="magnitude", target_sparsity=0.5, include=["0", "2"])
    assert pruner.skipped == {"2.weight": "has no weights (shape (0, 8)): nothing to prune"}


@pytest.mark.parametrize("scope", ["local", "global"])
def test_select_refuses_an_empty_layer_naming_it(scope):
    full = Units("a", torch.tensor([0.5, 0.1, 0.2, 0.9]), weight=1, numel=4)
    empty = Units("b", torch.empty(0), weight=1, numel=0)
    with pytest.raises(ValueError, match=r"layer 'b' has no weights to select from \(numel=0"):
        select([full, empty], sparsity=0.5, scope=scope)
    with pytest.raises(ValueError, match=r"layer 'b' has no weights"):
        select([empty, full], topk=1, scope=scope)
    assert select([full], sparsity=0.5, scope=scope)["a"].tolist() == [True, False, False, True]
