"""Uncalibrated width scores (activation, magnitude) compared within their kind of group: each
kind's scores are divided by its own scale (``per_kind_scale``) before the global threshold, so a
kind whose raw scores are 1024x larger is pruned exactly as before; loss-calibrated scores
(gradnas, taylor, fisher, michel, fastnas) are compared as they are."""

import dataclasses
import sys

import pytest
import torch

import gradprune as gp
from gradprune.structured import find_groups, scoring
from gradprune.structured.scoring import WIDTH_SCORES, per_kind_scale

transformers = pytest.importorskip("transformers")
search_module = sys.modules["gradprune.structured.search"]
RULES = {"nn.Linear": {"feature_divisor": 8}}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 12), generator=g) for _ in range(n)]


def loss_fn(model, batch):
    return model(batch, labels=batch).loss


def run(model, method, budget="70%"):
    data = batches()
    return gp.search(model, {"params": budget}, data, loss_fn, method=method, example_input=data[0],
                     axes=("heads", "mlp"), rules=RULES)


def scale_heads(model, factor=1024.0):
    """The same function with every head's ``o_proj`` input ``factor`` times larger: ``v_proj``
    times ``factor``, ``o_proj`` divided by it (a power of 2: exact in float32)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(factor)
            layer.self_attn.o_proj.weight.div_(factor)
    return model


def test_registry_marks_which_scores_are_loss_calibrated():
    flags = {name: spec.calibrated for name, spec in WIDTH_SCORES.items()}
    assert flags == {"gradnas": True, "taylor": True, "fisher": True, "michel": True,
                     "activation": False, "magnitude": False, "fastnas": True}


def test_per_kind_scale_is_the_mean_group_total_of_each_kind():
    model = tiny_llama()
    analysis = find_groups(model, batches(1)[0])
    kinds = [g.unit for g in analysis.groups]
    assert kinds == ["heads", "channels", "heads", "channels"]
    scores = {0: torch.tensor([1.0, 3.0]), 1: torch.full((64,), 0.5), 2: torch.tensor([2.0, 2.0]),
              3: torch.zeros(64)}
    assert per_kind_scale(analysis, scores, [0, 1, 2, 3]) == {"heads": 4.0, "channels": 16.0}
    assert per_kind_scale(analysis, scores, [0, 3]) == {"heads": 4.0, "channels": 1.0}  # all 0: scale 1


def test_activation_search_ignores_a_kinds_raw_scale():
    plain = run(tiny_llama(), "activation")
    scaled_model = scale_heads(tiny_llama())
    data = batches()
    with torch.no_grad():  # the same function, bit for bit
        assert torch.equal(tiny_llama()(data[0]).logits, scaled_model(data[0]).logits)
    scaled = run(scaled_model, "activation")
    heads = [gi for gi, g in enumerate(plain.groups) if g.unit == "heads"]
    for gi in heads:  # the head scores are 1024x larger ...
        assert torch.equal(scaled.scores[gi], plain.scores[gi] * 1024)
    # ... and the search prunes every kind as before: the same widths and units, to the bit
    assert scaled.widths == plain.widths and scaled.params == plain.params
    assert all(torch.equal(scaled.keep[gi], plain.keep[gi]) for gi in plain.keep)
    assert scaled.score_summary["kind_scale"]["heads"] == plain.score_summary["kind_scale"]["heads"] * 1024
    assert any(plain.widths[gi] < plain.groups[gi].size for gi in heads)  # heads do get pruned


def test_raw_scores_would_let_the_larger_kind_escape(monkeypatch):
    """The check above can fail: compared raw, the 1024x head scores keep every head."""
    normalised = run(scale_heads(tiny_llama()), "activation")
    monkeypatch.setitem(scoring.WIDTH_SCORES, "activation",
                        dataclasses.replace(WIDTH_SCORES["activation"], calibrated=True))
    raw = run(scale_heads(tiny_llama()), "activation")
    heads = [gi for gi, g in enumerate(raw.groups) if g.unit == "heads"]
    assert all(raw.widths[gi] == raw.groups[gi].size for gi in heads)
    assert any(normalised.widths[gi] < normalised.groups[gi].size for gi in heads)
    assert raw.widths != normalised.widths


def test_magnitude_search_ignores_a_kinds_raw_scale(monkeypatch):
    plain = run(tiny_llama(), "magnitude")
    real = search_module.magnitude_scores

    def inflated(analysis, *args, **kwargs):
        out = real(analysis, *args, **kwargs)
        return {gi: s * 1024 if analysis.groups[gi].unit == "heads" else s for gi, s in out.items()}

    monkeypatch.setattr(search_module, "magnitude_scores", inflated)
    scaled = run(tiny_llama(), "magnitude")
    assert scaled.widths == plain.widths
    assert all(torch.equal(scaled.keep[gi], plain.keep[gi]) for gi in plain.keep)


@pytest.mark.parametrize("method", ["activation", "magnitude"])
@pytest.mark.parametrize("budget", ["80%", "60%"])
def test_exact_budget_and_determinism(method, budget):
    model = tiny_llama()
    found = run(model, method, budget)
    assert found.params <= 0.01 * float(budget[:-1]) * found.dense_params
    assert sum(p.numel() for p in found.export().parameters()) == found.params
    again = run(model, method, budget)
    assert again.widths == found.widths and again.threshold == found.threshold
    assert all(torch.equal(again.keep[gi], found.keep[gi]) for gi in found.keep)


@pytest.mark.parametrize("method", ["gradnas", "taylor", "fisher"])
def test_calibrated_scores_are_compared_as_they_are(monkeypatch, method):
    """Loss-calibrated scores never go through the per-kind scale: the sensitivity of a width is
    the raw sum of the scores it removes (plus the tie-breaker far below any difference)."""
    def never(*args, **kwargs):
        raise AssertionError("per_kind_scale called for a calibrated score")

    monkeypatch.setattr(search_module, "per_kind_scale", never)
    found = run(tiny_llama(), method)
    assert "kind_scale" not in found.score_summary
    for gi, sens in found.sensitivity.items():
        for w, value in sens.items():
            removed = torch.ones(found.groups[gi].size, dtype=torch.bool)
            removed[search_module._keep_for(search_module._ranking(
                found.scores[gi], found.groups[gi].balance, scoring.magnitude_scores(found.analysis)[gi]), w)] = False
            raw = float(found.scores[gi].double()[removed].sum())
            assert raw <= value <= raw + 1e-3 * max(abs(raw), 1e-30) + 1e-12
