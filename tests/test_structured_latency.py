"""The ``latency`` search constraint (ALGORITHMS.md §2: params, FLOPs and measured latency at once).

The search logic is tested with a deterministic stand-in for the timer (latency = a fixed cost
per parameter plus an optional constant), so every assertion is exact; one test runs the real
timer and checks only what it records, never a timing value.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import gradprune.structured as st
from test_structured_models import batches, build, loss_fn

search_mod = importlib.import_module("gradprune.structured.search")  # the module, not the function
torch.set_num_threads(1)
RULES = {"nn.Linear": {"feature_divisor": 1}, "nn.Conv2d": {"channel_divisor": 1},
         "nn.BatchNorm2d": {"feature_divisor": 1}}


def _fake_timer(overhead_ms: float = 0.0, log: list | None = None):
    """``_interleaved_ms`` stand-in: 1 ms per 1000 parameters (+ a constant), no clock involved."""
    def timed(models, args, repeats, warmup):
        if log is not None:
            log.append(sorted(models))
        return {k: overhead_ms + sum(p.numel() for p in m.parameters()) / 1000.0 for k, m in models.items()}
    return timed


@pytest.fixture(params=["mlp", "cnn_bn", "resnet"])
def case(request):
    name = request.param
    data = batches(name, 3, seed=1)
    return name, data, data[0][0]


def _search(name, constraints, data, x, method="gradnas"):
    torch.manual_seed(0)
    return st.search(build(name), constraints, data, loss_fn, method, x, rules=RULES)


@pytest.mark.parametrize("pct", ["70%", "45%"])
def test_latency_percentage_picks_the_subnet_the_equivalent_params_bound_picks(monkeypatch, case, pct):
    # with latency proportional to parameters, "latency <= p% of dense" IS "params <= p%"
    name, data, x = case
    monkeypatch.setattr(search_mod, "_interleaved_ms", _fake_timer())
    by_latency = _search(name, {"latency": pct}, data, x)
    by_params = _search(name, {"params": pct}, data, x)
    assert by_latency.widths == by_params.widths
    assert by_latency.widths != {gi: g.size for gi, g in enumerate(by_latency.groups)}  # it pruned
    ls = by_latency.latency_search
    assert ls["pruned_ms"] == by_latency.params / 1000.0 and ls["dense_ms"] == by_latency.dense_params / 1000.0
    assert ls["pruned_ms"] / ls["dense_ms"] <= float(pct[:-1]) / 100
    assert ls["bound_ratio"] == float(pct[:-1]) / 100 and ls["batch_size"] == x.shape[0]
    assert "latency constraint (batch" in str(by_latency.report)
    # and the export really has the timed size
    assert sum(p.numel() for p in by_latency.export().parameters()) == by_latency.params


def test_latency_in_milliseconds(monkeypatch, case):
    name, data, x = case
    monkeypatch.setattr(search_mod, "_interleaved_ms", _fake_timer())
    dense_ms = sum(p.numel() for p in build(name).parameters()) / 1000.0
    by_ms = _search(name, {"latency": 0.6 * dense_ms}, data, x)
    by_params = _search(name, {"params": 0.6 * dense_ms * 1000.0}, data, x)
    assert by_ms.widths == by_params.widths
    assert by_ms.latency_search["pruned_ms"] <= 0.6 * dense_ms
    assert by_ms.constraints["latency"] == pytest.approx(0.6 * dense_ms)


def test_latency_with_other_constraints_meets_all_and_times_only_candidates_that_meet_them(monkeypatch):
    data = batches("cnn_bn", 3, seed=1)
    x = data[0][0]
    log = []
    monkeypatch.setattr(search_mod, "_interleaved_ms", _fake_timer(overhead_ms=0.05, log=log))
    found = _search("cnn_bn", {"flops": "60%", "latency": "80%"}, data, x)
    assert found.flops <= 0.6 * found.dense_flops
    ls = found.latency_search
    assert ls["pruned_ms"] / ls["dense_ms"] <= 0.8
    # one dense-only measurement, then one per distinct candidate that met the FLOPs bound
    assert log[0] == ["dense"] and all(k == ["dense", "pruned"] for k in log[1:])
    assert ls["candidates_timed"] == len(log) - 1 >= 1
    fine = _search("cnn_bn", {"flops": "60%"}, data, x)
    # the FLOPs-only subnet is at least as wide in every group: latency only ever adds cuts
    assert all(found.widths[gi] <= fine.widths[gi] for gi in found.widths)


def test_unreachable_latency_names_the_smallest_measured(monkeypatch):
    data = batches("mlp", 2, seed=1)
    monkeypatch.setattr(search_mod, "_interleaved_ms", _fake_timer(overhead_ms=1.0))
    with pytest.raises(ValueError, match=r"smallest reachable are params=\d+ .*latency=[\d.]+ ms \(\d+\.\d% "
                                         r"of the dense [\d.]+ ms, measured\)"):
        _search("mlp", {"latency": "5%"}, data, data[0][0])


def test_bad_latency_constraint_fails_before_any_timing(monkeypatch):
    data = batches("mlp", 2, seed=1)

    def no_timing(*a, **k):
        raise AssertionError("timed before the constraint was checked")
    monkeypatch.setattr(search_mod, "_interleaved_ms", no_timing)
    for bad, exc in (("-5%", ValueError), (0, ValueError), (float("inf"), ValueError), ([3], TypeError)):
        with pytest.raises(exc, match="constraints\\['latency'\\]"):
            _search("mlp", {"latency": bad}, data, data[0][0])


def test_real_timer_records_the_measurement_it_used():
    data = batches("mlp", 2, seed=1)
    found = _search("mlp", {"params": "60%", "latency": 1e6}, data, data[0][0])
    ls = found.latency_search
    assert ls["dense_ms"] > 0 and ls["pruned_ms"] > 0 and ls["repeats"] == 15
    assert found.params <= 0.6 * found.dense_params


def test_probe_arguments_are_checked():
    model = build("mlp")
    analysis = st.find_groups(model, batches("mlp", 1)[0][0])
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        search_mod.LatencyProbe(analysis, torch.randn(2, 8), repeats=0)
    with pytest.raises(TypeError, match="warmup must be int"):
        search_mod.LatencyProbe(analysis, torch.randn(2, 8), warmup=1.5)


def test_interleaved_timer_restores_training_mode():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    out = search_mod._interleaved_ms({"a": m}, (torch.randn(2, 4),), repeats=2, warmup=1)
    assert set(out) == {"a"} and out["a"] >= 0 and m.training
