"""Contract tests of structured pruning, the same checks for every supported model:
groups found, all-ones gates change nothing, the exported model equals the gated model, analytic
params/FLOPs equal brute-force counts of the exported model, constraints are met, save/load
round-trips, and bad input is rejected naming the field and the value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprune.structured as st
from test_structured_models import MODELS, batches, build, loss_fn

torch.set_num_threads(1)

NAMES = list(MODELS)
FINE_RULES = {
    "nn.Linear": {"feature_divisor": 1}, "nn.Conv1d": {"channel_divisor": 1},
    "nn.Conv2d": {"channel_divisor": 1}, "nn.Conv3d": {"channel_divisor": 1},
    "nn.ConvTranspose2d": {"channel_divisor": 1}, "nn.GroupNorm": {"channel_divisor": 1},
    "nn.BatchNorm1d": {"feature_divisor": 1}, "nn.BatchNorm2d": {"feature_divisor": 1},
    "nn.LayerNorm": {"feature_divisor": 1}, "nn.InstanceNorm1d": {"feature_divisor": 1},
}


def _random_keep(analysis, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for gi, g in enumerate(analysis.groups):
        chunks = g.balance
        per_chunk = g.size // chunks
        k = int(torch.randint(1, per_chunk + 1, (1,), generator=gen))
        idx = []
        for c in range(chunks):
            idx += (torch.randperm(per_chunk, generator=gen)[:k] + c * per_chunk).tolist()
        keep[gi] = torch.tensor(sorted(idx))
    return keep


def _name(model):
    return next(n for n in NAMES if type(model) is type(build(n)) and
                [type(m) for m in model.modules()] == [type(m) for m in build(n).modules()])


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    name = request.param
    model = build(name)
    x = batches(name, 1, seed=7)[0][0]
    return name, model, x, st.find_groups(model, x)


def test_groups_found_and_final_layer_never_pruned(case):
    name, model, x, analysis = case
    assert len(analysis.groups) == MODELS[name][2]
    modules = list(dict(model.named_modules()))
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert last_linear in modules
    for g in analysis.groups:
        assert last_linear not in g.producers
        assert g.size >= 1 and g.slices
    assert {"module": last_linear, "reason": "output is a model output"} in analysis.skipped


def test_all_ones_gates_change_nothing(case):
    _, model, x, analysis = case
    ref = model(x)
    with st.Gates(analysis):
        out = model(x)
    torch.testing.assert_close(out, ref)
    with st.Gates(analysis, keep={gi: torch.arange(g.size) for gi, g in enumerate(analysis.groups)}):
        out = model(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model(x), ref)  # hooks are gone


@pytest.mark.parametrize("seed", [0, 1])
def test_export_equals_gated_model_and_counts_are_analytic(case, seed):
    _, model, x, analysis = case
    keep = _random_keep(analysis, seed)
    with st.Gates(analysis, keep=keep):
        gated = model(x)
    small = st.export_model(analysis, keep)
    assert type(small) is type(model)
    torch.testing.assert_close(small(x), gated, rtol=1e-4, atol=1e-5)
    widths = {gi: len(k) for gi, k in keep.items()}
    cost = st.CostModel(analysis, x)
    assert cost.params(widths) == st.count_params(small)
    assert cost.flops(widths) == st.count_flops(small, x)
    assert cost.dense_params == st.count_params(model)
    assert st.count_params(small) < st.count_params(model)
    assert all(a.shape == b.shape for a, b in zip(model.state_dict().values(),
                                                   build(_name(model)).state_dict().values()))


def test_search_meets_constraints_and_export_matches(case, tmp_path):
    name, model, x, analysis = case
    data = batches(name, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = st.search(model, {"flops": "70%", "params": "90%"}, data, loss_fn, "gradnas", x,
                      rules=FINE_RULES, max_iter_data_loader=2)
    assert found.batches == 2
    assert found.flops <= 0.7 * found.dense_flops and found.params <= 0.9 * found.dense_params
    for k, v in model.state_dict().items():  # search cuts nothing
        assert torch.equal(v, before[k])
    small = found.export()
    assert st.count_params(small) == found.params
    assert st.count_flops(small, x) == found.flops
    with found.gates():
        gated = model(x)
    torch.testing.assert_close(small(x), gated, rtol=1e-4, atol=1e-5)
    st.save_pruned(small, tmp_path / "pruned")
    again = st.load_pruned(lambda: build(name, seed=3), tmp_path / "pruned")
    again.eval()
    torch.testing.assert_close(again(x), small(x))
    assert "params:" in str(found.report) and "flops:" in str(found.report)


@pytest.mark.parametrize("method", ["taylor", "magnitude", "michel"])
def test_other_methods_meet_constraints(case, method):
    name, model, x, _ = case
    found = st.search(model, {"params": "80%"}, batches(name, 2), loss_fn, method, x,
                      rules=FINE_RULES)
    assert found.params <= 0.8 * found.dense_params
    assert st.count_params(found.export()) == found.params


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def mlp_case():
    model = build("mlp")
    data = batches("mlp", 2)
    return model, data, data[0][0]


@pytest.mark.parametrize("constraints, exc, words", [
    ([("flops", 1)], TypeError, "constraints must be a dict"),
    ({}, ValueError, "at least one"),
    ({"latncy": 3}, ValueError, "'latncy'.*valid keys: params, flops, latency"),
    ({"latency": "0%"}, ValueError, "'0%'"),
    ({"latency": -1.5}, ValueError, "-1.5"),
    ({"latency": "fast"}, ValueError, "'fast'"),
    ({"flops": "fifty"}, ValueError, "'fifty'"),
    ({"flops": "150%"}, ValueError, "'150%'"),
    ({"flops": "0%"}, ValueError, "'0%'"),
    ({"params": -3}, ValueError, "-3"),
    ({"params": True}, TypeError, "bool"),
    ({"params": [1]}, TypeError, "list"),
])
def test_bad_constraints(mlp_case, constraints, exc, words):
    model, data, x = mlp_case
    with pytest.raises(exc, match=words) as info:
        st.search(model, constraints, data, loss_fn, "gradnas", x)
    assert "constraints" in str(info.value)


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"method": "gradnass"}, ValueError, "method must be one of .*'gradnass'"),
    ({"method": 3}, TypeError, "method must be str, got int"),
    ({"example_input": None}, ValueError, "example_input"),
    ({"example_input": "x"}, TypeError, "example_input must be a tensor.*str"),
    ({"max_iter_data_loader": 0}, ValueError, "max_iter_data_loader must be >= 1, got 0"),
    ({"max_iter_data_loader": True}, TypeError, "max_iter_data_loader must be int, got bool"),
    ({"data": None}, ValueError, "data must be"),
    ({"loss_fn": "ce"}, TypeError, "loss_fn must be callable.*str"),
    ({"model": "net"}, TypeError, "model must be a torch.nn.Module, got str"),
    ({"method": "fastnas"}, TypeError, "score_func must be callable"),
    ({"per_sample": 1}, TypeError, "per_sample must be bool, got int"),
    ({"magnitude_norm": "l3"}, ValueError, "magnitude_norm must be one of l1, l2; got 'l3'"),
    ({"rules": {"nn.Dense": {}}}, ValueError, "unknown module type 'nn.Dense'"),
    ({"rules": {"nn.Linear": {"features_ratio": [0.0]}}}, ValueError, r"features_ratio items must be in \(0, 1\], got 0.0"),
    ({"rules": {"nn.Linear": {"feature_divisor": 0}}}, ValueError, "feature_divisor must be >= 1, got 0"),
    ({"rules": {"nn.Linear": {"feature_divisor": 2.5}}}, TypeError, "feature_divisor must be int, got float"),
    ({"rules": {"nn.Linear": {"*": {"channel_divisor": 2}}}}, ValueError, "'channel_divisor'.*valid keys: features_ratio, feature_divisor"),
    ({"rules": {"nn.Conv2d": {"kernel_size": [3]}}}, ValueError, "kernel_size"),
    ({"rules": [1]}, TypeError, "rules must be a dict, got list"),
])
def test_bad_arguments(mlp_case, kwargs, exc, words):
    model, data, x = mlp_case
    args = dict(model=model, constraints={"params": "50%"}, data=data, loss_fn=loss_fn,
                method="gradnas", example_input=x)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        st.search(**args)


def test_unreachable_budget_names_the_smallest_reachable_values(mlp_case):
    model, data, x = mlp_case
    with pytest.raises(ValueError, match=r"smallest reachable are params=\d+ .* and flops=\d+"):
        st.search(model, {"params": 10}, data, loss_fn, "gradnas", x, rules=FINE_RULES)


def test_save_load_rejects_a_different_architecture(tmp_path, mlp_case):
    model, _, _ = mlp_case
    st.save_pruned(model, tmp_path / "m")
    with pytest.raises(ValueError, match="module '2'"):
        st.load_pruned(lambda: nn.Sequential(nn.Linear(8, 16)), tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="save_pruned"):
        st.load_pruned(lambda: model, tmp_path / "nothing")
    with pytest.raises(TypeError, match="factory must be callable"):
        st.load_pruned(model.state_dict(), tmp_path / "m")
