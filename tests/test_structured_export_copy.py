"""Exports copy the model without holding its weights twice (edited_copy), leave the model's
tensors untouched (same objects, values and version counters), also when the export fails, and
give the gated model's outputs."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import gradprune as gp
import gradprune.structured.export as export_mod
from gradprune.structured.export import edited_copy

V = 64


def llama(tie=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=tie)).eval()


def ids(seed=1):
    return torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(seed))


def loss_fn(m, b):
    return m(b, labels=b).loss


def snapshot(model):
    """Every tensor of ``model``: the object, a copy of its values, its version counter."""
    out = {}
    for key, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        out[key] = (t, t.detach().clone(), t._version)
    return out


def assert_untouched(model, before):
    now = dict(list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()))
    assert set(now) == set(before)
    for key, (t, values, version) in before.items():
        assert now[key] is t, key
        assert t._version == version, key
        assert torch.equal(t.detach(), values), key


def storages(model):
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}


def test_edited_copy_shares_while_editing_and_owns_after():
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    before = snapshot(m)
    seen = {}

    def edit(c):
        seen["shared"] = all(a is b for a, b in zip(c.parameters(), m.parameters()))
        c[0].weight = nn.Parameter(c[0].weight.detach()[:3].clone())
        c[0].bias = nn.Parameter(c[0].bias.detach()[:3])  # a view of the model's bias: copied after
    small = edited_copy(m, edit)
    assert seen["shared"]  # no copy of the weights was made before the edit
    assert_untouched(m, before)
    assert not storages(small) & storages(m)
    assert torch.equal(small[0].bias, m[0].bias[:3]) and torch.equal(small[2].weight, m[2].weight)

    def fail(c):
        c[0].weight = nn.Parameter(c[0].weight.detach()[:3].clone())
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        edited_copy(m, fail)
    assert_untouched(m, before)


def test_tied_weights_stay_tied_in_the_copy():
    m = llama(tie=True)
    c = edited_copy(m, lambda c: None)
    assert c.lm_head.weight is c.model.embed_tokens.weight
    assert c.lm_head.weight is not m.lm_head.weight
    assert not storages(c) & storages(m)


@pytest.mark.parametrize("tie", [False, True])
def test_width_export_leaves_the_model_untouched_and_equals_the_gated_model(tie):
    m, x = llama(tie), ids()
    before = snapshot(m)
    found = gp.search(m, {"params": "75%"}, [x], loss_fn, example_input=x, uniform=True)
    small = found.export()
    assert_untouched(m, before)
    assert not storages(small) & storages(m)
    assert sum(p.numel() for p in small.parameters()) == found.params < found.dense_params
    with torch.no_grad(), found.gates():
        gated = m(x).logits
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, gated, rtol=1e-5, atol=1e-5)
    assert (small.lm_head.weight is small.model.embed_tokens.weight) == tie


def test_a_failing_export_leaves_the_model_untouched(monkeypatch):
    m, x = llama(), ids()
    found = gp.search(m, {"params": "75%"}, [x], loss_fn, example_input=x, uniform=True)
    before = snapshot(m)

    def broken(*args, **kwargs):
        raise ValueError("config refused")
    monkeypatch.setattr(export_mod, "apply_uniform_config", broken)  # after every slice was made
    with pytest.raises(ValueError, match="config refused"):
        found.export()
    assert_untouched(m, before)


def test_hidden_export_leaves_the_model_untouched():
    m, x = llama(tie=True), ids()
    before = snapshot(m)
    found = gp.search(m, {"params": "80%"}, [x], loss_fn, example_input=x, axes=("hidden",),
                      hidden_divisor=8)
    small = found.export()
    assert_untouched(m, before)
    assert not storages(small) & storages(m)
    assert small.config.hidden_size == found.hidden_size < 32
    assert small.lm_head.weight is small.model.embed_tokens.weight
    with torch.no_grad(), found.gates():
        gated = m(x).logits
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, gated, rtol=1e-4, atol=1e-4)


def test_expert_export_leaves_the_model_untouched():
    torch.manual_seed(0)
    m = MixtralForCausalLM(MixtralConfig(vocab_size=V, hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_local_experts=4, num_experts_per_tok=2)).eval()
    x = ids()
    before = snapshot(m)
    found = gp.search(m, {"params": "80%"}, [x], loss_fn, example_input=x, axes=("experts",),
                      method="gradnas", uniform=True)
    small = found.export()
    assert_untouched(m, before)
    assert not storages(small) & storages(m)
    assert small.config.num_local_experts < 4
    with torch.no_grad(), found.gates():
        gated = m(x).logits
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, gated, rtol=1e-5, atol=1e-5)
