"""Measured budgets on every axis (issue 16, item 4): the ``latency`` (prefill) and
``decode_latency`` (ms per token at batch 1 on the key/value cache) constraints on the layer,
hidden and expert axes alone and combined (the staged search), with counted bounds at once.

The selection logic is tested with deterministic stand-ins for the two timers (prefill: 1 ms per
1000 parameters; decode: 1 ms per decoder layer), so every assertion is exact; a real measured
run checks only that the recorded measurement meets its bound, never a timing value.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gradprune as gp  # noqa: E402
from test_structured_experts import _ids, _model as moe_model  # noqa: E402
from test_structured_hidden import BASE, _batches  # noqa: E402

search_mod = importlib.import_module("gradprune.structured.search")  # the module, not the function
torch.set_num_threads(1)


def loss_fn(m, b):
    return m(b, labels=b).loss


def _numel(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _llama(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**BASE, "num_hidden_layers": layers})
    return transformers.LlamaForCausalLM(cfg).eval()


def _prefill_timer(log: list | None = None):
    """``_interleaved_ms`` stand-in: 1 ms per 1000 parameters, no clock involved."""
    def timed(models, args, repeats, warmup):
        if log is not None:
            log.append({k: _numel(m) for k, m in models.items()})
        return {k: _numel(m) / 1000.0 for k, m in models.items()}
    return timed


def _decode_timer(log: list | None = None):
    """``_interleaved_decode_ms`` stand-in: 1 ms per token per decoder layer."""
    def timed(models, ids, steps, repeats, warmup):
        assert ids.shape[0] == 1 and not ids.is_floating_point()  # batch 1, token ids
        if log is not None:
            log.append(ids.shape)
        return {k: float(m.config.num_hidden_layers) for k, m in models.items()}
    return timed


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(search_mod, "_interleaved_ms", _prefill_timer())
    monkeypatch.setattr(search_mod, "_interleaved_decode_ms", _decode_timer())


def _search(model, constraints, axes, data=None, **kw):
    data = data or _batches()
    return gp.search(model, constraints, data, loss_fn, example_input=data[0], axes=axes, **kw)


# ---- one axis alone -----------------------------------------------------------------------


@pytest.mark.parametrize("axes,kw", [(("layers",), {}), (("hidden",), {"hidden_divisor": 8})])
def test_latency_alone_picks_what_the_equal_params_bound_picks(fake, axes, kw):
    # with latency proportional to parameters, "latency <= 60% of dense" IS "params <= 60%"
    by_latency = _search(_llama(), {"latency": "60%"}, axes, **kw)
    by_params = _search(_llama(), {"params": "60%"}, axes, **kw)
    assert by_latency.params == by_params.params < by_latency.dense_params
    assert by_latency.export().state_dict().keys() == by_params.export().state_dict().keys()
    ls = by_latency.latency_search
    assert ls["pruned_ms"] == by_latency.params / 1000.0 and ls["dense_ms"] == by_latency.dense_params / 1000.0
    assert ls["pruned_ms"] <= 0.6 * ls["dense_ms"] and ls["bound_ratio"] == 0.6
    assert by_latency.constraints["latency"] == pytest.approx(0.6 * ls["dense_ms"])
    assert _numel(by_latency.export()) == by_latency.params


def test_layers_time_only_candidates_that_meet_the_counted_bounds(monkeypatch):
    log = []
    monkeypatch.setattr(search_mod, "_interleaved_ms", _prefill_timer(log))
    model = _llama()
    dense = _numel(model)
    found = _search(model, {"params": "90%", "latency": "40%"}, ("layers",))
    timed = [entry["pruned"] for entry in log if "pruned" in entry]
    assert timed and all(n <= 0.9 * dense for n in timed)  # never a candidate over the params bound
    assert found.latency_search["candidates_timed"] == len(timed)
    assert found.params == timed[-1] <= 0.4 * dense  # the first timed candidate that met the bound
    assert all(n > 0.4 * dense for n in timed[:-1])
    assert set(found.constraints) == {"params", "latency"}


def test_experts_alone_latency_equals_params(fake):
    data = [_ids(seed=s) for s in range(2)]
    for uniform in (True, False):
        by_latency = _search(moe_model("mixtral"), {"latency": "80%"}, ("experts",), data, uniform=uniform)
        by_params = _search(moe_model("mixtral"), {"params": "80%"}, ("experts",), data, uniform=uniform)
        assert {k: v.tolist() for k, v in by_latency.keep.items()} == \
            {k: v.tolist() for k, v in by_params.keep.items()}
        assert by_latency.latency_search["pruned_ms"] == by_latency.params / 1000.0


def test_decode_latency_on_layers_with_a_counted_bound(fake):
    # decode time = layers: "50%" of 4 layers drops 2, whatever the params bound (a loose one) says
    found = _search(_llama(), {"decode_latency": "50%", "params": "95%"}, ("layers",))
    assert len(found.dropped) == 2
    ds = found.decode_latency_search
    assert (ds["dense_ms"], ds["pruned_ms"], ds["bound_ratio"], ds["batch_size"]) == (4.0, 2.0, 0.5, 1)
    assert ds["decode_steps"] == search_mod.DECODE_STEPS and ds["prompt_tokens"] == _batches()[0].shape[1]
    # both measured bounds at once: the prefill one (params-proportional) is the tighter here
    both = _search(_llama(), {"decode_latency": "75%", "latency": "40%"}, ("layers",))
    assert both.params <= 0.4 * both.dense_params and len(both.dropped) >= 1
    assert both.decode_latency_search["pruned_ms"] <= 3.0


def test_unmet_latency_names_the_smallest_measured(fake):
    with pytest.raises(ValueError, match=r"no subnet meets constraints \(params <= .*latency <= .*keeping only "
                                         r"the best-scored layer .*latency=[\d.]+ ms \(\d+\.\d% of the dense"):
        _search(_llama(), {"latency": "1%"}, ("layers",))
    with pytest.raises(ValueError, match=r"by pruning the hidden size: the smallest reachable .*decode_latency="
                                         r"[\d.]+ ms per token"):
        _search(_llama(), {"decode_latency": "50%"}, ("hidden",), hidden_divisor=8)


# ---- several axes: the staged search ------------------------------------------------------


def test_staged_latency_equals_params(fake):
    axes = ("layers", "mlp")
    by_latency = _search(_llama(3), {"latency": "60%"}, axes)
    by_params = _search(_llama(3), {"params": "60%"}, axes)
    assert by_latency.dropped_layers == by_params.dropped_layers
    assert by_latency.widths == by_params.widths and by_latency.params == by_params.params
    ls = by_latency.latency_search  # timed against the original model, not a stage's copy
    assert ls["dense_ms"] == by_latency.dense_params / 1000.0 and ls["pruned_ms"] == by_latency.params / 1000.0
    assert ls["candidates_timed"] >= 2 and "latency constraint (batch 2, measured)" in str(by_latency.report)


def test_staged_decode_latency_and_kv_cache_at_once(fake):
    found = _search(_llama(4), {"decode_latency": "50%", "kv_cache": "80%"}, ("layers", "heads"))
    assert found.decode_latency_search["pruned_ms"] <= 2.0
    assert found.kv_cache <= 0.8 * found.dense_kv_cache
    assert found.export().config.num_hidden_layers <= 2
    assert set(found.constraints) == {"kv_cache", "decode_latency"}
    assert "decode latency constraint (batch 1" in str(found.report)


def test_measure_latency_times_against_the_original(monkeypatch):
    log = []
    monkeypatch.setattr(search_mod, "_interleaved_ms", _prefill_timer(log))
    model = _llama(3)
    staged = _search(model, {"params": "70%"}, ("layers", "mlp"), measure_latency=True)
    assert staged.latency_ms["dense"][1] == _numel(model) / 1000.0  # the original, not the shallower copy
    assert staged.latency_ms["pruned"][32] == staged.params / 1000.0
    assert "latency batch 32" in str(staged.report)
    alone = _search(_llama(3), {"params": "70%"}, ("layers",), measure_latency=True)
    assert alone.latency_ms["pruned"][1] == alone.params / 1000.0


# ---- errors before any scoring ------------------------------------------------------------


def _never(m, b):
    raise AssertionError("scored before the input was checked")


@pytest.mark.parametrize("axes", [("layers",), ("layers", "mlp"), ("heads", "mlp")])
def test_decode_latency_refuses_a_model_that_cannot_decode(axes):
    torch.manual_seed(0)
    base = transformers.LlamaModel(transformers.LlamaConfig(**{**BASE, "num_hidden_layers": 2})).eval()
    ids = _batches()[0]
    with pytest.raises(ValueError, match=r"decode_latency.*causal LM .*(no logits|failed)"):
        gp.search(base, {"decode_latency": "50%"}, [ids], _never, example_input=ids, axes=axes)
    # floats: the decode check says so (the width search's structure analysis may refuse them first)
    with pytest.raises(ValueError, match=r"decode_latency.*token ids of shape \(batch, length\)|"
                                         r"example_input does not fit"):
        gp.search(_llama(2), {"decode_latency": 5.0}, [ids], _never, example_input=ids.float(), axes=axes)


def test_measured_bound_syntax():
    ids = _batches()[0]
    with pytest.raises(ValueError, match=r"constraints\['decode_latency'\] must be a percentage in"):
        gp.search(_llama(2), {"decode_latency": "0%"}, [ids], _never, example_input=ids, axes=("layers",))
    with pytest.raises(TypeError, match="measure_latency must be bool"):
        gp.search(_llama(2), {"params": "50%"}, [ids], _never, example_input=ids, axes=("layers",),
                  measure_latency=1)
    # a bound in ms may be below 1 (it is not a fraction of a count)
    assert search_mod.parse_constraints({"decode_latency": 0.5}, {})["decode_latency"] == 0.5


# ---- real timers: the recorded measurement meets its bound --------------------------------


def test_real_measured_run_records_a_measurement_that_meets_its_bound():
    data = _batches(n=1)
    found = _search(_llama(2), {"latency": 1e4, "decode_latency": "100%"}, ("layers",), data)
    ls, ds = found.latency_search, found.decode_latency_search
    assert ls["pruned_ms"] <= ls["bound_ms"] == 1e4
    assert ds["pruned_ms"] / ds["dense_ms"] <= 1.0 and ds["repeats"] >= 1
    assert 0 < ds["dense_ms"] and 0 < ls["dense_ms"]


# ---- every single-axis result reports its measurements (shared formatting) -----------------


@pytest.mark.parametrize("axes,kw", [(("layers",), {}), (("hidden",), {"hidden_divisor": 8}), (("experts",), {})])
def test_single_axis_reports_print_the_measurements(fake, axes, kw):
    moe = axes == ("experts",)
    data = [_ids(seed=s) for s in range(2)] if moe else _batches()
    model = moe_model("mixtral") if moe else _llama()
    found = _search(model, {"latency": "80%"}, axes, data, measure_latency=True, **kw)
    ls, lat = found.latency_search, found.latency_ms
    text = str(found.report).splitlines()
    # the stand-in timer makes every figure exact: 1 ms per 1000 parameters
    dense_ms, pruned_ms = found.dense_params / 1000.0, found.params / 1000.0
    assert (ls["dense_ms"], ls["pruned_ms"]) == (dense_ms, pruned_ms) and found.params < found.dense_params
    want = (f"latency constraint (batch {data[0].shape[0]}, measured): {dense_ms:.3f} ms -> {pruned_ms:.3f} ms "
            f"({pruned_ms / dense_ms:.1%}; bound 80.0% of dense; {ls['candidates_timed']} candidates timed, "
            f"median of {ls['repeats']} interleaved runs)")
    assert want in text
    for bs in (1, 32):
        assert (f"latency batch {bs}: {dense_ms:.3f} ms -> {pruned_ms:.3f} ms ({pruned_ms / dense_ms:.1%}; "
                f"CPU median of {lat['repeats']} runs)") in text
    d = found.report.to_dict()
    assert d["latency_search"] == ls and d["decode_latency_search"] == {}
    assert d["latency_ms"] == json.loads(json.dumps(lat))  # to_dict is JSON: batch sizes as strings
    # the same lines as the width search's report: one formatter for every result
    assert [line for line in text if "latency" in line] == search_mod.latency_lines(found)


def test_single_axis_report_prints_decode_latency_and_nothing_unmeasured(fake):
    found = _search(_llama(), {"decode_latency": "50%"}, ("layers",))
    ds = found.decode_latency_search
    line = (f"decode latency constraint (batch 1, ms per token over {search_mod.DECODE_STEPS} cached steps after "
            f"a {_batches()[0].shape[1]}-token prefill, measured): 4.000 ms -> 2.000 ms (50.0%; bound 50.0% of "
            f"dense; {ds['candidates_timed']} candidates timed, median of {ds['repeats']} interleaved runs)")
    assert line in str(found.report).splitlines()
    plain = _search(_llama(), {"params": "60%"}, ("layers",))
    assert "latency" not in str(plain.report)
    assert plain.report.to_dict()["latency_ms"] == {}
