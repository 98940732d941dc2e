"""The pre_prune cache returns only what a fresh run would: its key covers the loss function's code,
the whole model state, the collate function and the data; inputs that cannot be keyed need an
explicit ``cache_key``; a ``cache_dir`` that is a file fails before any gradient."""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

import gradprune as gp


def _data(n=24):
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, generator=gen), "feature_class_id": i % 2, "factual": i % 2,
             "alternative": 1 - i % 2} for i in range(n)]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()


def _run(model, loss, tmp_path, data=None, **kw):
    collate = kw.pop("collate_fn", None)
    cfg = gp.PrePruneConfig(n_samples=8, topk=5, cache_dir=str(tmp_path), **kw)
    sel = gp.pre_prune(model, data if data is not None else _data(), cfg, loss, collate_fn=collate,
                       params=["0.weight"])
    return sel.report.cache, sel.report.backward_passes


def loss_a(model, batch, target):
    return F.cross_entropy(model(batch["x"]), batch[target])


def _two_versions():
    """Two loss functions with the same name and qualified name but different bodies."""
    src = "def loss(model, batch, target):\n    return F.cross_entropy(model(batch['x']){}, batch[target])\n"
    out = []
    for extra in ("", " * 2.0"):
        ns = {"F": F}
        exec(src.format(extra), ns)
        out.append(ns["loss"])
    return out


def test_identical_inputs_hit_without_any_gradient(tmp_path):
    model = _model()
    assert _run(model, loss_a, tmp_path) == (None, 1)
    assert _run(model, loss_a, tmp_path) == ("selection", 0)


def test_edited_loss_body_with_the_same_name_misses(tmp_path):
    v1, v2 = _two_versions()
    assert v1.__qualname__ == v2.__qualname__ and v1.__module__ == v2.__module__
    model = _model()
    assert _run(model, v1, tmp_path)[0] is None
    assert _run(model, v1, tmp_path)[0] == "selection"
    assert _run(model, v2, tmp_path)[0] is None       # a stale selection before the fix


def test_loss_closure_defaults_and_helpers_are_keyed(tmp_path):
    model = _model()
    scale = [1.0]

    def loss(model, batch, target):
        return F.cross_entropy(model(batch["x"]) * scale[0], batch[target])

    assert _run(model, loss, tmp_path)[0] is None
    assert _run(model, loss, tmp_path)[0] == "selection"
    scale[0] = 3.0                                      # a closure cell's content changed
    assert _run(model, loss, tmp_path)[0] is None
    part1 = functools.partial(_scaled, scale=1.0)
    part2 = functools.partial(_scaled, scale=2.0)
    assert _run(model, part1, tmp_path)[0] is None
    assert _run(model, part1, tmp_path)[0] == "selection"
    assert _run(model, part2, tmp_path)[0] is None


def _scaled(model, batch, target, scale):
    return F.cross_entropy(model(batch["x"]) * scale, batch[target])


@pytest.mark.parametrize("change", ["other_layer", "bn_stats", "mode"])
def test_state_outside_params_misses(tmp_path, change):
    model = _model()
    assert _run(model, loss_a, tmp_path)[0] is None
    assert _run(model, loss_a, tmp_path)[0] == "selection"
    with torch.no_grad():
        if change == "other_layer":
            model[3].weight.mul_(-1.0)                  # not scored, read by the forward
        elif change == "bn_stats":
            model[1].running_mean.add_(0.5)             # a buffer
        else:
            model[1].train()                            # BatchNorm in training mode
    assert _run(model, loss_a, tmp_path)[0] is None


def _collate_scaled(items):
    batch = default_collate(items)
    batch["x"] = batch["x"] * 2.0
    return batch


def test_changed_collate_misses(tmp_path):
    model = _model()
    assert _run(model, loss_a, tmp_path)[0] is None
    assert _run(model, loss_a, tmp_path)[0] == "selection"
    assert _run(model, loss_a, tmp_path, collate_fn=_collate_scaled)[0] is None
    assert _run(model, loss_a, tmp_path, collate_fn=_collate_scaled)[0] == "selection"


class _Opaque:
    """An item field with no content to fingerprint honestly (no tensors, default repr)."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def test_changed_data_misses(tmp_path):
    model = _model()
    data = _data()
    assert _run(model, loss_a, tmp_path, data=data)[0] is None
    data2 = [dict(it, x=it["x"] + 1.0) for it in data]
    assert _run(model, loss_a, tmp_path, data=data2)[0] is None


def test_data_that_cannot_be_keyed_needs_an_explicit_cache_key(tmp_path):
    model = _model()
    data = [dict(it, extra=_Opaque(1)) for it in _data()]

    def loss(model, batch, target):
        return F.cross_entropy(model(batch["x"]), batch[target])

    collate = lambda items: default_collate([{k: v for k, v in it.items() if k != "extra"}  # noqa: E731
                                             for it in items])
    with pytest.raises(ValueError, match="cache_key") as err:
        _run(model, loss, tmp_path, data=data, collate_fn=collate)
    assert "sampled data" in str(err.value) and "_Opaque" in str(err.value)
    assert _run(model, loss, tmp_path, data=data, collate_fn=collate, cache_key="v1")[0] is None
    assert _run(model, loss, tmp_path, data=data, collate_fn=collate, cache_key="v1")[0] == "selection"
    assert _run(model, loss, tmp_path, data=data, collate_fn=collate, cache_key="v2")[0] is None


class _SlotLoss:
    """A callable object whose state (``__slots__``, no ``__dict__``) cannot be fingerprinted."""
    __slots__ = ("scale",)

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, model, batch, target):
        return F.cross_entropy(model(batch["x"]) * self.scale, batch[target])


def test_callable_without_code_needs_an_explicit_cache_key(tmp_path):
    model = _model()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match="loss_fn .*cache_key"):
        _run(model, _SlotLoss(), tmp_path)
    assert calls == []                                  # before any gradient
    assert _run(model, _SlotLoss(), tmp_path, cache_key="slot-loss-v1")[0] is None
    assert _run(model, _SlotLoss(), tmp_path, cache_key="slot-loss-v1")[0] == "selection"


def test_cache_key_must_be_a_non_empty_string():
    with pytest.raises(TypeError, match="cache_key must be a non-empty str"):
        gp.PrePruneConfig(n_samples=4, topk=2, cache_key="")
    with pytest.raises(TypeError, match="cache_key must be a non-empty str"):
        gp.PrePruneConfig(n_samples=4, topk=2, cache_key=3)


def test_cache_dir_that_is_a_file_fails_before_any_gradient(tmp_path):
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    model = _model()
    calls = []

    def loss(model, batch, target):
        calls.append(1)
        return loss_a(model, batch, target)

    cfg = gp.PrePruneConfig(n_samples=8, topk=5, cache_dir=str(path))
    with pytest.raises(ValueError, match="not-a-folder"):
        gp.pre_prune(model, _data(), cfg, loss)
    assert calls == []
    assert path.read_text() == "x"


def test_code_of_a_module_without_a_file_is_keyed(tmp_path):
    """A notebook's ``__main__`` has no ``__file__``: its functions are user code, keyed by code."""
    import types

    model = _model()
    losses = []
    for extra in ("", " * 2.0"):
        mod = types.ModuleType("notebook_cell")
        exec("import torch.nn.functional as F\n"
             "def loss(model, batch, target):\n"
             f"    return F.cross_entropy(model(batch['x']){extra}, batch[target])\n", mod.__dict__)
        losses.append(mod)
    import sys
    try:
        sys.modules["notebook_cell"] = losses[0]
        assert _run(model, losses[0].loss, tmp_path)[0] is None
        assert _run(model, losses[0].loss, tmp_path)[0] == "selection"
        sys.modules["notebook_cell"] = losses[1]
        assert _run(model, losses[1].loss, tmp_path)[0] is None
    finally:
        sys.modules.pop("notebook_cell", None)
