"""The ``kv_cache`` constraint of gp.search (issue 16, point 4): key/value-cache bytes per token,
counted from the kept key/value heads, equal to what the exported model's cache really holds;
several constraints at once; an unreachable budget named before scoring."""

import pytest
import torch
from torch import nn

import gradprune as gp
from gradprune.structured.search import CONSTRAINT_KEYS

transformers = pytest.importorskip("transformers")

T = 12


def _llama(kv_heads=4, layers=3, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=8)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _data():
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (4, T), generator=gen)} for _ in range(2)]


def _loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


def _cache_bytes_per_token(model) -> float:
    """Bytes the model's own cache holds after a forward of T tokens, per token."""
    with torch.no_grad():
        cache = model(_data()[0]["input_ids"][:1], use_cache=True).past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / T


@pytest.mark.parametrize("budget, uniform", [("75%", False), ("50%", False), ("30%", False), ("50%", True)])
def test_kv_cache_bound_is_met_and_equals_the_real_cache(budget, uniform):
    model, data = _llama(), _data()
    found = gp.search(model, {"kv_cache": budget}, data, _loss, example_input=data[0]["input_ids"],
                      uniform=uniform)
    dense = 3 * 2 * 4 * 8 * 4  # layers x (K, V) x KV heads x head_dim x float32 bytes
    assert found.dense_kv_cache == dense == _cache_bytes_per_token(model)
    assert found.kv_cache <= float(budget[:-1]) / 100 * dense
    small = found.export()
    assert found.kv_cache == _cache_bytes_per_token(small)
    if uniform:
        cfg = small.config
        assert found.kv_cache == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4


def test_several_constraints_at_once_and_an_absolute_bound_in_bytes():
    model, data = _llama(dtype=torch.bfloat16), _data()
    dense = 3 * 2 * 4 * 8 * 2  # bf16: 2 bytes per element
    found = gp.search(model, {"params": "85%", "flops": "90%", "kv_cache": dense // 2}, data, _loss,
                      example_input=data[0]["input_ids"])
    assert found.dense_kv_cache == dense
    assert found.kv_cache <= dense // 2 and found.params <= 0.85 * found.dense_params
    assert found.flops <= 0.9 * found.dense_flops
    assert found.kv_cache == _cache_bytes_per_token(found.export())
    assert f"kv_cache: {dense} -> {found.kv_cache} bytes/token" in str(found.report)


def test_multi_query_attention_cache_cannot_shrink_and_is_named_before_scoring():
    model, data = _llama(kv_heads=1), _data()
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return _loss(m, batch)

    with pytest.raises(ValueError, match=r"smallest reachable are .*kv_cache=192 bytes/token \(100\.0%\)"):
        gp.search(model, {"kv_cache": "90%"}, data, loss_fn, example_input=data[0]["input_ids"])
    assert calls == []  # refused before any scoring
    with pytest.raises(ValueError, match=r"kv_cache=192 bytes/token \(25\.0%\)"):  # GQA: one KV head per layer
        gp.search(_llama(), {"kv_cache": "10%", "params": "95%"}, data, loss_fn,
                  example_input=data[0]["input_ids"])
    assert calls == []


def test_kv_cache_key_is_listed_and_needs_attention():
    assert "kv_cache" in CONSTRAINT_KEYS
    model, data = _llama(), _data()
    with pytest.raises(ValueError, match="valid keys: params, flops, latency, kv_cache"):
        gp.search(model, {"kv": "50%"}, data, _loss, example_input=data[0]["input_ids"])
    with pytest.raises(ValueError, match=r"constraints\['kv_cache'\]=0.5 is ambiguous"):
        gp.search(model, {"kv_cache": 0.5}, data, _loss, example_input=data[0]["input_ids"])
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="no attention whose key/value cache"):
        gp.search(mlp, {"kv_cache": "50%"}, [(x, torch.zeros(4, dtype=torch.long))],
                  lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), example_input=x)
