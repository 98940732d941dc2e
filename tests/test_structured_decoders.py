"""Hugging Face GPT-2 (Conv1D c_attn) and LLaMA (grouped-query attention): heads / KV groups and
MLP neurons found by module classes, gates that are multipliers before the output projection,
export with updated head counts, analytic params/FLOPs, save_pretrained round trips, search to a
params budget, uniform widths for plain from_pretrained; and the rules short-form fix."""

from __future__ import annotations

import pytest
import torch

import gradprune.structured as st

transformers = pytest.importorskip("transformers")
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, LlamaModel)

torch.set_num_threads(1)

VOCAB = 40
FINE = {"nn.Linear": {"feature_divisor": 1}}
TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _gpt2(cls=GPT2Model, seed=0, **kw):
    base = dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=16, n_inner=24,
                attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **TOKENS)
    base.update(kw)
    torch.manual_seed(seed)
    return cls(GPT2Config(**base)).eval()


def _llama(cls=LlamaModel, seed=0, **kw):
    # 6 query heads sharing 3 KV heads (2 per group), head_dim 4
    base = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=3, intermediate_size=20, max_position_embeddings=32, **TOKENS)
    base.update(kw)
    torch.manual_seed(seed)
    return cls(LlamaConfig(**base)).eval()


def _ids(seed=1, batch=3, length=7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 6:] = 0
    return ids, mask


KEEP = {"gpt2": {0: torch.tensor([0, 2]), 1: torch.arange(0, 24, 3), 2: torch.tensor([3]),
                 3: torch.tensor([1, 5, 6])},
        "llama": {0: torch.tensor([0, 2]), 1: torch.arange(0, 20, 3), 2: torch.tensor([1]),
                  3: torch.tensor([1, 5, 6])}}


def test_gpt2_groups_are_heads_of_c_attn_and_mlp_neurons():
    model = _gpt2()
    analysis = st.find_groups(model, _ids()[0])
    assert [(g.name, g.unit, g.size) for g in analysis.groups] == [
        ("h.0.attn", "heads", 4), ("h.0.mlp.c_fc", "channels", 24),
        ("h.1.attn", "heads", 4), ("h.1.mlp.c_fc", "channels", 24)]
    # c_attn is a Conv1D with weight [in, 3*hidden]: Q, K, V thirds are columns (dim 1)
    assert [s.describe() for s in analysis.groups[0].slices] == [
        "h.0.attn.c_attn.weight[dim 1] (4 per unit)",
        "h.0.attn.c_attn.weight[dim 1] at offset 16 (4 per unit)",
        "h.0.attn.c_attn.weight[dim 1] at offset 32 (4 per unit)",
        "h.0.attn.c_proj.weight[dim 0] (4 per unit)"]
    assert any("hidden size" in s["reason"] for s in analysis.skipped)


def test_llama_groups_are_kv_groups_with_their_query_heads():
    model = _llama()
    analysis = st.find_groups(model, _ids()[0])
    assert [(g.name, g.unit, g.size) for g in analysis.groups] == [
        ("layers.0.self_attn", "heads", 3), ("layers.0.mlp.up_proj", "channels", 20),
        ("layers.1.self_attn", "heads", 3), ("layers.1.mlp.up_proj", "channels", 20)]
    # unit g: query heads 2g, 2g+1 (8 rows), key head g and value head g (4 rows each)
    assert [s.describe() for s in analysis.groups[0].slices] == [
        "layers.0.self_attn.q_proj.weight[dim 0] (8 per unit)",
        "layers.0.self_attn.k_proj.weight[dim 0] (4 per unit)",
        "layers.0.self_attn.v_proj.weight[dim 0] (4 per unit)",
        "layers.0.self_attn.o_proj.weight[dim 1] (8 per unit)"]
    assert {s.module for s in analysis.groups[1].slices} == {
        "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"}


CASES = [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")]


@pytest.mark.parametrize("family,attn", CASES)
def test_export_equals_gated_model_and_counts_are_analytic(family, attn):
    model = (_gpt2 if family == "gpt2" else _llama)(attn_implementation=attn)
    ids, mask = _ids()
    analysis = st.find_groups(model, ids)
    ref = model(ids, attention_mask=mask).last_hidden_state
    with st.Gates(analysis):  # gates at 1 change nothing
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, ref)
    keep = KEEP[family]
    with st.Gates(analysis, keep=keep):
        gated = model(ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(gated, ref, atol=1e-3)
    small = st.export_model(analysis, keep)
    assert type(small) is type(model)
    if family == "gpt2":
        a0, a1 = small.h[0].attn, small.h[1].attn
        assert (a0.num_heads, a0.head_dim, a0.split_size) == (2, 4, 8)
        assert (a1.num_heads, a1.split_size) == (1, 4)
        assert a0.c_attn.weight.shape == (16, 24) and a0.c_proj.weight.shape == (8, 16)
        assert small.h[0].mlp.c_fc.nf == 8 and small.h[1].mlp.c_proj.weight.shape == (3, 16)
    else:
        a0, a1 = small.layers[0].self_attn, small.layers[1].self_attn
        assert (a0.num_heads, a0.num_key_value_heads, a0.num_key_value_groups) == (4, 2, 2)
        assert (a1.num_heads, a1.num_key_value_heads, a1.num_key_value_groups) == (2, 1, 2)
        assert a0.q_proj.weight.shape == (16, 24) and a0.k_proj.weight.shape == (8, 24)
        assert a1.o_proj.weight.shape == (24, 8)
        assert small.layers[1].mlp.gate_proj.out_features == 3
    torch.testing.assert_close(small(ids, attention_mask=mask).last_hidden_state, gated,
                               rtol=1e-4, atol=1e-5)
    cost = st.CostModel(analysis, ids)
    assert cost.dense_flops == st.count_flops(model, ids)
    assert cost.dense_params == st.count_params(model)
    widths = {gi: len(k) for gi, k in keep.items()}
    assert cost.costs(widths) == (st.count_params(small), st.count_flops(small, ids))
    assert not hasattr(model.config, "gradprune_widths")


def _by_hand_head_grads(model, family, loss):
    """Gradients of ``loss()`` w.r.t. a multiplier on each unit's output before the output
    projection (input columns of c_proj / o_proj), put there by hand."""
    layers = model.transformer.h if family == "gpt2" else model.model.layers
    gates, handles = [], []
    for layer in layers:
        if family == "gpt2":
            proj, n, per = layer.attn.c_proj, 4, 4
        else:
            proj, n, per = layer.self_attn.o_proj, 3, 8  # a KV group: 2 query heads x head_dim 4
        g = torch.ones(n, requires_grad=True)
        gates.append(g)
        handles.append(proj.register_forward_pre_hook(
            lambda mod, args, g=g, per=per: (args[0] * g.repeat_interleave(per),)))
    try:
        return torch.autograd.grad(loss(), gates)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_head_gates_are_multipliers_before_the_output_projection(family):
    model = _gpt2(GPT2LMHeadModel) if family == "gpt2" else _llama(LlamaForCausalLM)
    ids, mask = _ids()
    analysis = st.find_groups(model, ids)

    def loss_fn(m, batch):
        return m(batch[0], attention_mask=batch[1], labels=batch[0]).loss

    stats = st.gate_statistics(analysis, [(ids, mask)], loss_fn, n_batches=1)
    grads = _by_hand_head_grads(model, family, lambda: loss_fn(model, (ids, mask)))
    for gi, grad in zip((0, 2), grads):
        assert analysis.groups[gi].unit == "heads"
        torch.testing.assert_close(stats.score("gradnas")[gi], grad.double() ** 2,
                                   rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_pretrained_and_load_back(family, tmp_path):
    cls = GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM
    model = _gpt2(cls) if family == "gpt2" else _llama(cls)
    ids, mask = _ids()
    analysis = st.find_groups(model, ids)
    small = st.export_model(analysis, KEEP[family])
    small.save_pretrained(tmp_path / "pruned")
    again = st.load_pruned_pretrained(cls, tmp_path / "pruned")
    widths = again.config.gradprune_widths
    if family == "gpt2":
        assert widths["transformer.h.0.attn"] == {"num_heads": 2, "split_size": 8}
        assert widths["transformer.h.1.mlp.c_fc"] == {"nx": 16, "nf": 3}
        assert again.transformer.h[1].attn.num_heads == 1
        assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()
    else:
        assert widths["model.layers.1.self_attn"] == {
            "num_heads": 2, "num_key_value_heads": 1, "num_key_value_groups": 2}
        assert again.model.layers[0].self_attn.k_proj.out_features == 8
    torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                               small(ids, attention_mask=mask).logits)
    assert st.count_params(again) == st.count_params(small)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_search_with_a_params_budget(family):
    cls = GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM
    model = _gpt2(cls) if family == "gpt2" else _llama(cls)
    gen = torch.Generator().manual_seed(3)
    data = [torch.randint(1, VOCAB, (4, 6), generator=gen) for _ in range(3)]

    def loss_fn(m, batch):
        return m(batch, labels=batch).loss

    # LLaMA's tiny MLP scores far below its KV groups: only below 67% (every FFN at 1 neuron)
    # must a KV group go
    budget = 0.75 if family == "gpt2" else 0.6
    found = st.search(model, {"params": f"{budget:.0%}"}, data, loss_fn, "gradnas", data[0],
                      rules=FINE)
    assert found.params <= budget * found.dense_params
    assert any(found.widths[gi] < g.size for gi, g in enumerate(found.groups) if g.unit == "heads")
    small = found.export()
    assert st.count_params(small) == found.params
    assert st.count_flops(small, data[0]) == found.flops
    with found.gates():
        gated = model(data[0]).logits
    torch.testing.assert_close(small(data[0]).logits, gated, rtol=1e-4, atol=1e-5)
    rule_key = "hf.GPT2Attention" if family == "gpt2" else "hf.LlamaAttention"
    found = st.search(model, {"params": "75%"}, data, loss_fn, "magnitude", data[0],
                      rules={**FINE, rule_key: {"n_heads_divisor": 2}})
    allowed = (2, 4) if family == "gpt2" else (2, 3)  # the full width is always a choice
    assert all(found.widths[gi] in allowed for gi, g in enumerate(found.groups) if g.unit == "heads")
    assert found.params <= 0.75 * found.dense_params


def test_llama_uniform_search_loads_with_plain_from_pretrained(tmp_path):
    model = _llama(LlamaForCausalLM)
    gen = torch.Generator().manual_seed(4)
    data = [torch.randint(1, VOCAB, (4, 6), generator=gen) for _ in range(2)]

    def loss_fn(m, batch):
        return m(batch, labels=batch).loss

    found = st.search(model, {"params": "60%"}, data, loss_fn, "gradnas", data[0], rules=FINE,
                      uniform=True)
    assert found.uniform and found.params <= 0.6 * found.dense_params
    heads = {found.widths[gi] for gi, g in enumerate(found.groups) if g.unit == "heads"}
    ffn = {found.widths[gi] for gi, g in enumerate(found.groups) if g.unit == "channels"}
    assert len(heads) == 1 and len(ffn) == 1
    small = found.export()
    assert st.count_params(small) == found.params
    (h,), (w,) = heads, ffn
    assert h < 3 and w < 20  # both KV groups and neurons were cut, the same in every layer
    cfg = small.config
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) \
        == (h, 2 * h, 4, w)
    small.save_pretrained(tmp_path / "uniform")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    ids, mask = _ids()
    torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                               small(ids, attention_mask=mask).logits)
    for k, v in small.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


def test_gpt2_uniform_keeps_heads_and_prunes_the_mlp(tmp_path):
    model = _gpt2(GPT2LMHeadModel)
    gen = torch.Generator().manual_seed(5)
    data = [torch.randint(1, VOCAB, (4, 6), generator=gen) for _ in range(2)]
    found = st.search(model, {"params": "90%"}, data, lambda m, b: m(b, labels=b).loss, "taylor",
                      data[0], rules=FINE, uniform=True)
    assert all(found.widths[gi] == g.size for gi, g in enumerate(found.groups) if g.unit == "heads")
    (w,) = {found.widths[gi] for gi, g in enumerate(found.groups) if g.unit == "channels"}
    assert w < 24
    small = found.export()
    assert small.config.n_inner == w
    small.save_pretrained(tmp_path / "u")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "u").eval()
    torch.testing.assert_close(again(data[1]).logits, small(data[1]).logits)


# --------------------------------------------------------------------------------------------
# rules: a misspelled field in the short form


@pytest.mark.parametrize("rules,bad", [
    ({"nn.Conv2d": {"channel_ratio": [0.5]}}, "'channel_ratio'"),
    ({"nn.Linear": {"features_ratio": [0.5], "feature_divisr": 4}}, "'feature_divisr'"),
    ({"hf.LlamaAttention": {"n_head_divisor": 2}}, "'n_head_divisor'"),
])
def test_misspelled_short_form_field_raises_value_error_listing_fields(rules, bad):
    with pytest.raises(ValueError, match="unknown field") as info:
        st.SearchRules(rules)
    text = str(info.value)
    assert bad in text
    for valid in ("channels_ratio", "channel_divisor") if "Conv2d" in str(rules) else ():
        assert valid in text
    if "Linear" in str(rules):
        assert "features_ratio, feature_divisor" in text
    if "Llama" in str(rules):
        assert "n_heads_ratio, n_heads_divisor" in text


def test_rules_short_and_pattern_forms_still_parse():
    rules = st.SearchRules({"nn.Conv2d": {"channels_ratio": [0.5], "channel_divisor": 4},
                            "nn.Linear": {"*": {"feature_divisor": 2}, "head*": None},
                            "hf.GPT2Attention": {"n_heads_divisor": 2}})
    import torch.nn as nn
    assert rules.rule_for("c", nn.Conv2d(3, 8, 1)).channels_ratio == (0.5,)
    assert rules.rule_for("fc", nn.Linear(2, 2)).feature_divisor == 2
    assert rules.rule_for("head", nn.Linear(2, 2)) is None
    assert rules.rule_for("h.0.attn", nn.Identity(), "GPT2Attention").n_heads_divisor == 2
    with pytest.raises(ValueError, match="unknown FeatureRule key"):
        st.SearchRules({"nn.Linear": {"*": {"feature_divisr": 4}}})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_pruned_and_load_pruned_with_a_factory(family, tmp_path):
    make = (lambda: _gpt2(GPT2LMHeadModel)) if family == "gpt2" else (lambda: _llama(LlamaForCausalLM))
    model = make()
    ids, mask = _ids()
    small = st.export_model(st.find_groups(model, ids), KEEP[family])
    st.save_pruned(small, tmp_path / "p")
    again = st.load_pruned(make, tmp_path / "p").eval()
    torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                               small(ids, attention_mask=mask).logits)
    if family == "gpt2":
        assert (again.transformer.h[0].attn.num_heads, again.transformer.h[0].attn.split_size) == (2, 8)
    else:
        assert again.model.layers[1].self_attn.num_key_value_heads == 1
