"""Structured search errors say what to change (issue #13, point 7)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprune.structured as st


def loss_fn(model, batch):
    return model(batch).pow(2).mean()


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))


X = torch.randn(2, 3, 8, 8)


def test_unreachable_budget_names_the_blocking_group_rule_and_a_divisor_before_scoring():
    calls = []

    def counting_loss(model, batch):
        calls.append(1)
        return loss_fn(model, batch)

    with pytest.raises(ValueError) as info:
        st.search(small_cnn(), {"flops": "50%"}, [X, X], counting_loss, "gradnas", X)
    msg = str(info.value)
    assert "module '0' (16 channels)" in msg
    assert "channel_divisor=32 leaves it unprunable" in msg
    assert "use channel_divisor=8 or smaller" in msg
    assert "smallest reachable are params=" in msg
    assert calls == []  # known from the rules alone: no batch was scored
    # the suggestion works
    res = st.search(small_cnn(), {"flops": "50%"}, [X, X], loss_fn, "gradnas", X,
                    rules={"Conv2d": {"*": {"channel_divisor": 8}}})
    assert res.flops <= 0.5 * res.dense_flops


@pytest.mark.parametrize("key", ["flops", "params"])
@pytest.mark.parametrize("value", [0.5, 1, 1.0, 0.01])
def test_a_fraction_without_percent_sign_is_refused_as_ambiguous(key, value):
    with pytest.raises(ValueError, match=rf"constraints\['{key}'\].*ambiguous.*'{value * 100:g}%'"):
        st.search(small_cnn(), {key: value}, [X], loss_fn, "gradnas", X)


@pytest.mark.parametrize("bad", [torch.randn(2, 5, 8, 8), torch.randn(3), (X, X)])
def test_an_example_input_the_model_cannot_take_names_example_input(bad):
    with pytest.raises(ValueError, match="example_input"):
        st.search(small_cnn(), {"flops": "50%"}, [X], loss_fn, "gradnas", bad)


@pytest.mark.parametrize("empty", [nn.Sequential(), nn.Module(), nn.Sequential(nn.ReLU())])
def test_an_empty_model_is_a_value_error(empty):
    with pytest.raises(ValueError, match="no parameters"):
        st.search(empty, {"flops": "50%"}, [X], loss_fn, "gradnas", X)


@pytest.mark.parametrize("method", ["gradnas", "magnitude", "fastnas"])
def test_show_progress_must_be_a_bool_before_any_work(method):
    calls = []

    def score(model):
        calls.append(1)
        return 0.0

    with pytest.raises(TypeError, match="show_progress must be bool"):
        st.search(small_cnn(), {"flops": "90%"}, [X], loss_fn, method, X, score_func=score,
                  show_progress="yes")
    assert calls == []
