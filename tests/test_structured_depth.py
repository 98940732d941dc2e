"""Depth pruning (``search(..., axes=("layers",))``, issue 16): the ``axes`` validation, the three
layer scores against hand computations, budgets met and counted exactly, export with renumbered
``layer_idx`` and a consistent config (``num_hidden_layers``, ``layer_types``,
``max_window_layers``), ``save_pretrained`` / ``from_pretrained`` round trips, ``generate()``,
outputs equal to the gated model's and tied embeddings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gradprune as gp

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM,  # noqa: E402
                          Gemma3ForCausalLM, Gemma3TextConfig,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

torch.set_num_threads(1)

VOCAB = 40
BASE = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    # sliding window on layers >= max_window_layers: layer_types full, full, sliding, sliding
    "qwen2-sliding": (Qwen2Config, Qwen2ForCausalLM,
                      {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
    # layer_types sliding, full, sliding, full; soft-capping; head_dim independent of hidden size
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 8, "sliding_window": 3}),
    # local/global rotary embeddings per layer type: sliding, full, sliding, full
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
               {"head_dim": 8, "sliding_window": 3, "sliding_window_pattern": 2}),
}
METHODS = ("gradnas", "block_influence", "loss_drop")


def _model(family="llama", seed=0, **kw):
    config_cls, lm_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return lm_cls(config_cls(**{**BASE, **extra, **kw})).eval()


def _batches(n=2, seed=1, batch=2, length=9):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (batch, length), generator=gen) for _ in range(n)]


def loss_fn(model, batch):
    return model(batch, labels=batch).loss


def _search(model, constraints, method="block_influence", data=None, **kw):
    data = _batches() if data is None else data
    return gp.search(model, constraints, data, loss_fn, method=method, example_input=data[0],
                     axes=("layers",), **kw)


# ---------------------------------------------------------------- axes validation
def test_default_axes_are_todays_width_search():
    model, data = _model(), _batches()
    rules = {"nn.Linear": {"feature_divisor": 4}}
    a = gp.search(model, {"params": "90%"}, data, loss_fn, "gradnas", data[0], rules)
    b = gp.search(model, {"params": "90%"}, data, loss_fn, "gradnas", data[0], rules, axes=("mlp", "heads"))
    assert a.widths == b.widths and a.params == b.params and isinstance(b, gp.SearchResult)


@pytest.mark.parametrize("axis", ["heads", "mlp"])
def test_width_axes_select_what_is_pruned(axis):
    model, data = _model(), _batches()
    rules = {"nn.Linear": {"feature_divisor": 4}}
    found = gp.search(model, {"params": "92%"}, data, loss_fn, "gradnas", data[0], rules, axes=(axis,))
    cut = {g.unit for gi, g in enumerate(found.groups) if found.widths[gi] < g.size}
    assert cut == {"heads" if axis == "heads" else "channels"}
    assert found.params <= 0.92 * found.dense_params


@pytest.mark.parametrize("axes, exc, words", [
    (("layers", "depth"), ValueError, ["'depth'", "heads", "mlp", "hidden", "layers", "experts"]),
    ((), ValueError, ["axes"]),
    ("layers", TypeError, ["axes", "tuple"]),
])
def test_axes_validation(axes, exc, words):
    model, data = _model(), _batches()
    before = copy.deepcopy(model.state_dict())

    def never(*a):
        raise AssertionError("scored before validating axes")
    with pytest.raises(exc) as info:
        gp.search(model, {"params": "50%"}, data, never, "gradnas", data[0], axes=axes)
    for w in words:
        assert w in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kw, words", [
    (dict(method="taylor"), ["method", "'taylor'", "block_influence"]),
    (dict(constraints={"latency": "0%"}), ["latency", "percentage in (0%, 100%]"]),
    (dict(loss_fn=None), ["loss_fn"]),
    (dict(rules={"nn.Linear": {"feature_divisor": 4}}), ["rules", "layers"]),
])
def test_layers_input_errors(kw, words):
    model, data = _model(), _batches()
    args = dict(constraints={"params": "80%"}, method="gradnas", loss_fn=loss_fn, rules=None)
    args.update(kw)
    with pytest.raises((TypeError, ValueError)) as info:
        gp.search(model, args["constraints"], data, args["loss_fn"], method=args["method"],
                  example_input=data[0], rules=args["rules"], axes=("layers",))
    for w in words:
        assert w in str(info.value)


def test_unreachable_budget_names_smallest_before_scoring():
    model, data = _model(), _batches()

    def never(*a):
        raise AssertionError("scored although the budget is unreachable")
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    smallest = sum(p.numel() for p in model.parameters()) - 3 * layer  # one of 4 layers kept
    with pytest.raises(ValueError) as info:
        gp.search(model, {"params": smallest - 1}, data, never, method="gradnas",
                  example_input=data[0], axes=("layers",))
    assert f"params={smallest}" in str(info.value) and "smallest reachable" in str(info.value)
    found = _search(model, {"params": smallest})
    assert found.params == smallest and len(found.kept) == 1


# ---------------------------------------------------------------- scores
class _HandGate(nn.Module):
    """A decoder layer whose residual branch is scaled by a scalar parameter (written out)."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.g = layer, nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        return hidden_states + self.g * (out - hidden_states)


def test_gradnas_layer_score_is_squared_gate_gradient():
    model, data = _model().double(), _batches(n=3)
    found = _search(model, {"params": "80%"}, "gradnas", data)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # weights untouched
    hand = copy.deepcopy(model)
    hand.model.layers = nn.ModuleList([_HandGate(layer) for layer in hand.model.layers])
    expected = torch.zeros(4, dtype=torch.float64)
    for batch in data:
        gates = [layer.g for layer in hand.model.layers]
        grads = torch.autograd.grad(loss_fn(hand, batch), gates)
        expected += torch.stack(grads) ** 2
    torch.testing.assert_close(found.scores, expected / len(data), rtol=1e-6, atol=1e-12)
    assert found.batches == 3


def test_block_influence_is_one_minus_cosine_over_tokens():
    model, data = _model().double(), _batches(n=2)
    found = _search(model, {"params": "80%"}, "block_influence", data)
    with torch.no_grad():
        hs = [model(b, output_hidden_states=True).hidden_states for b in data]
    for i in range(3):  # the last hidden state has the final norm applied: layers 0..2
        cos = torch.cat([nn.functional.cosine_similarity(h[i], h[i + 1], dim=-1).flatten() for h in hs])
        assert float(found.scores[i]) == pytest.approx(float((1 - cos).mean()), rel=1e-9)


def test_loss_drop_is_the_measured_loss_increase():
    model, data = _model().double(), _batches(n=2)
    found = _search(model, {"params": "80%"}, "loss_drop", data)
    from gradprune.structured.depth import drop_layers
    with torch.no_grad():
        base = sum(float(loss_fn(model, b)) for b in data) / len(data)
        for i in range(4):
            small = drop_layers(copy.deepcopy(model), [i])
            dropped = sum(float(loss_fn(small, b)) for b in data) / len(data)
            assert float(found.scores[i]) == pytest.approx(dropped - base, rel=1e-9, abs=1e-12)
    assert found.dropped == [int(torch.argmin(found.scores))]


def test_layer_scores_run_in_eval_mode_and_restore_it():
    model, data = _model(attention_dropout=0.5).train(), _batches()
    a = _search(model, {"params": "80%"}, "loss_drop", data).scores
    assert model.training and all(m.training for m in model.modules())
    b = _search(model, {"params": "80%"}, "loss_drop", data).scores
    assert torch.equal(a, b)


# ---------------------------------------------------------------- budgets
def _flops(model, ids):
    from gradprune.structured.flops import _custom_flops  # CPU sdpa counted like the CUDA kernels
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
        model(ids)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen3", "gemma2"])
@pytest.mark.parametrize("constraints", [{"params": "75%"}, {"flops": "60%"}, {"kv_cache": "50%"},
                                         {"params": "90%", "flops": "70%"}])
def test_budget_met_and_counted_exactly(family, constraints):
    model = _model(family)
    data = _batches()
    found = _search(model, constraints, "gradnas")
    small = found.export()
    params = sum(p.numel() for p in small.parameters())
    flops = _flops(small, data[0])
    cfg = small.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    assert (params, flops, kv) == (found.params, found.flops, found.kv_cache)
    assert _flops(model, data[0]) == found.dense_flops
    measured = {"params": params, "flops": flops, "kv_cache": kv}
    for key, bound in found.constraints.items():
        assert measured[key] <= bound
    # as few layers as needed: keeping back the cheapest dropped layer breaks a bound
    from gradprune.structured.depth import _LayerCosts
    costs = _LayerCosts(model, data[0])
    order = sorted(found.dropped, key=lambda i: (float(found.scores[i]), i))
    fewer = costs.of(order[:-1])
    assert any(fewer[k] > b for k, b in found.constraints.items())
    assert set(found.dropped) == set(sorted(range(4), key=lambda i: (float(found.scores[i]), i))[:len(found.dropped)])


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_round_trip_equals_gated_model(family, tmp_path):
    model = _model(family)
    data = _batches(length=10)
    found = _search(model, {"params": "60%"}, "loss_drop", data)
    assert 0 < len(found.dropped) < 4
    small = found.export()
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # original untouched
    layers = small.model.layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(found.kept)))
    assert small.config.num_hidden_layers == len(found.kept)
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        assert small.config.layer_types == [types[i] for i in found.kept]
    small.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == len(found.kept)
    assert getattr(loaded.config, "layer_types", None) == getattr(small.config, "layer_types", None)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert small.lm_head.weight is small.model.embed_tokens.weight
    ids = data[0]
    with torch.no_grad():
        with found.gates():
            gated = model(ids).logits
        torch.testing.assert_close(small(ids).logits, gated, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(ids).logits, gated, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(ids).logits, gated)  # the dropped layers mattered


def _generate(model, ids, use_cache):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "qwen2-sliding", "gemma2", "gemma3"])
def test_generate_with_cache_after_dropping_layers(family):
    model = _model(family)
    from gradprune.structured.depth import drop_layers
    ids = _batches(n=1, batch=1, length=5)[0]
    for drop in ([0], [1, 2]):  # the first layers go: every kept layer_idx changes
        small = drop_layers(copy.deepcopy(model), drop)
        cached = _generate(small, ids, True)
        torch.testing.assert_close(cached, _generate(small, ids, False))
        found = _search(model, {"params": "80%"}, "gradnas", [ids])
        found.dropped, found.kept = drop, [i for i in range(4) if i not in drop]
        with found.gates():
            torch.testing.assert_close(cached, _generate(model, ids, False))


def test_config_per_layer_fields_follow_the_kept_layers():
    from gradprune.structured.depth import drop_layers
    model = _model("qwen2-sliding")
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    small = drop_layers(copy.deepcopy(model), [1, 3])
    assert small.config.layer_types == ["full_attention", "sliding_attention"]
    assert small.config.max_window_layers == 1
    rebuilt = Qwen2Config.from_dict(small.config.to_dict())
    assert rebuilt.layer_types == small.config.layer_types and rebuilt.num_hidden_layers == 2
    with pytest.raises(ValueError, match="at least one"):
        drop_layers(copy.deepcopy(model), [0, 1, 2, 3])


# ---------------------------------------------------------------- layers with widths
def test_layers_combined_with_widths(tmp_path):
    model, data = _model("llama-tied"), _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # widths alone reach ~50% of the params at best: the budget needs layers dropped too
    rules = {"nn.Linear": {"feature_divisor": 8}}
    found = gp.search(model, {"params": "45%"}, data, loss_fn, method="gradnas", example_input=data[0],
                      rules=rules, axes=("layers", "heads", "mlp"), uniform=True)
    assert found.dropped_layers and found.layer_scores.shape == (4,)
    assert found.dense_params == sum(p.numel() for p in model.parameters())
    small = found.export()
    assert small.config.num_hidden_layers == 4 - len(found.dropped_layers)
    assert sum(p.numel() for p in small.parameters()) == found.params <= 0.45 * found.dense_params
    assert _flops(small, data[0]) == found.flops
    assert small.lm_head.weight is small.model.embed_tokens.weight
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        with found.gates():
            gated = found.analysis.model(data[0]).logits
        torch.testing.assert_close(loaded(data[0]).logits, gated, rtol=1e-5, atol=1e-5)
    assert len(model.model.layers) == 4  # the user's model is untouched
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # the searched depth-pruned copy shares the dense weights (memory); the export owns its own
    shared = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in found.analysis.model.parameters()} <= shared
    assert not {p.data_ptr() for p in small.parameters()} & shared
    with pytest.raises(ValueError, match="gradnas"):
        gp.search(model, {"params": "45%"}, data, loss_fn, method="taylor", example_input=data[0],
                  axes=("layers", "mlp"))


def test_layers_export_copies_only_the_kept_layers():
    model = _model("llama-tied")
    found = _search(model, {"params": "60%"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = found.export()
    assert small.lm_head.weight is small.model.embed_tokens.weight
    assert not {p.data_ptr() for p in small.parameters()} & {p.data_ptr() for p in model.parameters()}
    assert len(model.model.layers) == 4 and len(found.model.model.layers) == 4
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_layers_with_widths_unreachable_budget_named_before_scoring():
    model, data = _model(), _batches()

    def never(*a):
        raise AssertionError("scored although the budget is unreachable")
    with pytest.raises(ValueError, match="smallest reachable.*one of 4 decoder layers kept"):
        gp.search(model, {"params": "5%"}, data, never, method="gradnas", example_input=data[0],
                  rules={"nn.Linear": {"feature_divisor": 8}}, axes=("layers", "mlp"))
