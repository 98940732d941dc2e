"""Hugging Face GPT-2 (Conv1D c_attn) and LLaMA-style decoders (LLaMA, Mistral, Qwen2 with q/k/v
biases, Qwen3 with q_norm/k_norm; grouped-query attention, and multi-query attention with one KV
head): heads / KV groups and MLP neurons found by module classes, gates that are multipliers
before the output projection, export with updated head counts, analytic params/FLOPs,
save_pretrained round trips, search to a params budget, uniform widths for plain from_pretrained,
unsupported layers listed in skipped; and the rules short-form fix."""

from __future__ import annotations

import pytest
import torch

import gradprune.structured as st

transformers = pytest.importorskip("transformers")
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, LlamaModel, MistralConfig, MistralForCausalLM,
                          MistralModel, Qwen2Config, Qwen2ForCausalLM, Qwen2Model, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3Model)

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


# LLaMA-style family -> (config class, base model, causal LM, config fields); "mqa": LLaMA with a
# single KV head (its 6 query heads are the units), "qwen2-mqa" likewise with Qwen2's biases
LLAMA_STYLE = {
    "llama": (LlamaConfig, LlamaModel, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralModel, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2Model, Qwen2ForCausalLM, {}),  # biases on q/k/v_proj
    "qwen3": (Qwen3Config, Qwen3Model, Qwen3ForCausalLM, {"head_dim": 4}),  # q_norm/k_norm
    "mqa": (LlamaConfig, LlamaModel, LlamaForCausalLM, {"num_key_value_heads": 1}),
    "qwen2-mqa": (Qwen2Config, Qwen2Model, Qwen2ForCausalLM, {"num_key_value_heads": 1}),
}
MQA = ("mqa", "qwen2-mqa")


def _llama(cls=LlamaModel, seed=0, family="llama", **kw):
    # 6 query heads sharing 3 KV heads (2 per group), head_dim 4
    config_cls, base_cls, lm_cls, extra = LLAMA_STYLE[family]
    base = dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=3, intermediate_size=20, max_position_embeddings=32, **TOKENS)
    base.update(extra)
    base.update(kw)
    torch.manual_seed(seed)
    cls = {LlamaModel: base_cls, LlamaForCausalLM: lm_cls}.get(cls, cls)
    return cls(config_cls(**base)).eval()


def _model(family, lm=False, **kw):
    if family == "gpt2":
        return _gpt2(GPT2LMHeadModel if lm else GPT2Model, **kw)
    return _llama(LlamaForCausalLM if lm else LlamaModel, family=family, **kw)


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
                  3: torch.tensor([1, 5, 6])},
        # a single KV head: units are query heads (3 kept in layer 0, 1 in layer 1)
        "mqa": {0: torch.tensor([0, 2, 5]), 1: torch.arange(0, 20, 3), 2: torch.tensor([1]),
                3: torch.tensor([1, 5, 6])}}


def _keep(family):
    return KEEP["mqa" if family in MQA else "gpt2" if family == "gpt2" else "llama"]


# the attention heads of the two layers after _keep(family): (num_heads, num_key_value_heads,
# num_key_value_groups) per layer
HEADS = {"gqa": ((4, 2, 2), (2, 1, 2)), "mqa": ((3, 1, 3), (1, 1, 1))}


def _heads(family):
    return HEADS["mqa" if family in MQA else "gqa"]


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


def test_llama_style_groups_of_other_families_and_of_a_single_kv_head():
    for family in ("mistral", "qwen2", "qwen3"):
        analysis = st.find_groups(_llama(family=family), _ids()[0])
        assert [(g.name, g.size, g.kind) for g in analysis.groups][:2] == [
            ("layers.0.self_attn", 3, f"{family}.heads"), ("layers.0.mlp.up_proj", 20, f"{family}.ffn")]
        assert analysis.groups[0].rule_type == f"{family.capitalize()}Attention"
        assert len(analysis.skipped) == 1  # the hidden size only
    # one KV head: a unit is one query head (q_proj rows, o_proj columns); k/v_proj are kept
    analysis = st.find_groups(_llama(family="mqa"), _ids()[0])
    assert [(g.name, g.unit, g.size) for g in analysis.groups][:2] == [
        ("layers.0.self_attn", "heads", 6), ("layers.0.mlp.up_proj", "channels", 20)]
    assert [s.describe() for s in analysis.groups[0].slices] == [
        "layers.0.self_attn.q_proj.weight[dim 0] (4 per unit)",
        "layers.0.self_attn.o_proj.weight[dim 1] (4 per unit)"]


CASES = [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager"),
         ("mistral", "sdpa"), ("qwen2", "sdpa"), ("qwen2", "eager"), ("qwen3", "sdpa"),
         ("mqa", "sdpa"), ("mqa", "eager"), ("qwen2-mqa", "sdpa")]


@pytest.mark.parametrize("family,attn", CASES)
def test_export_equals_gated_model_and_counts_are_analytic(family, attn):
    model = _model(family, attn_implementation=attn)
    ids, mask = _ids()
    analysis = st.find_groups(model, ids)
    ref = model(ids, attention_mask=mask).last_hidden_state
    with st.Gates(analysis):  # gates at 1 change nothing
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, ref)
    keep = _keep(family)
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
        h0, h1 = _heads(family)
        assert (a0.num_heads, a0.num_key_value_heads, a0.num_key_value_groups) == h0
        assert (a1.num_heads, a1.num_key_value_heads, a1.num_key_value_groups) == h1
        assert a0.q_proj.weight.shape == (4 * h0[0], 24) and a0.k_proj.weight.shape == (4 * h0[1], 24)
        assert a1.o_proj.weight.shape == (24, 4 * h1[0])
        assert small.layers[1].mlp.gate_proj.out_features == 3
        dense = model.layers[1].self_attn
        if dense.q_proj.bias is not None:  # Qwen2: the biases of the kept heads' rows
            rows = torch.cat([torch.arange(4 * u, 4 * u + 4) for u in range(6)
                              if u in ([1] if family in MQA else [2, 3])])
            torch.testing.assert_close(a1.q_proj.bias, dense.q_proj.bias[rows])
            assert a1.v_proj.bias.shape == (4 * h1[1],)
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
        elif family in MQA:
            proj, n, per = layer.self_attn.o_proj, 6, 4  # a query head: head_dim 4
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


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mqa"])
def test_head_gates_are_multipliers_before_the_output_projection(family):
    model = _model(family, lm=True)
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


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "qwen3", "mqa"])
def test_save_pretrained_and_load_back(family, tmp_path):
    model = _model(family, lm=True)
    cls = type(model)
    ids, mask = _ids()
    analysis = st.find_groups(model, ids)
    small = st.export_model(analysis, _keep(family))
    small.save_pretrained(tmp_path / "pruned")
    again = st.load_pruned_pretrained(cls, tmp_path / "pruned")
    widths = again.config.gradprune_widths
    if family == "gpt2":
        assert widths["transformer.h.0.attn"] == {"num_heads": 2, "split_size": 8}
        assert widths["transformer.h.1.mlp.c_fc"] == {"nx": 16, "nf": 3}
        assert again.transformer.h[1].attn.num_heads == 1
        assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()
    else:
        names = ("num_heads", "num_key_value_heads", "num_key_value_groups")
        assert widths["model.layers.1.self_attn"] == dict(zip(names, _heads(family)[1]))
        assert again.model.layers[0].self_attn.k_proj.out_features == 4 * _heads(family)[0][1]
    torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                               small(ids, attention_mask=mask).logits)
    assert st.count_params(again) == st.count_params(small)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mqa"])
def test_search_with_a_params_budget(family):
    model = _model(family, lm=True)
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
    attention = model.transformer.h[0].attn if family == "gpt2" else model.model.layers[0].self_attn
    rule_key = f"hf.{type(attention).__name__}"  # hf.GPT2Attention, hf.Qwen2Attention…
    found = st.search(model, {"params": "75%"}, data, loss_fn, "magnitude", data[0],
                      rules={**FINE, rule_key: {"n_heads_divisor": 2}})
    # the full width is always a choice
    allowed = {"gpt2": (2, 4), "mqa": (2, 4, 6)}.get(family, (2, 3))
    assert all(found.widths[gi] in allowed for gi, g in enumerate(found.groups) if g.unit == "heads")
    assert found.params <= 0.75 * found.dense_params


@pytest.mark.parametrize("family", ["llama", "qwen2", "mqa"])
def test_llama_uniform_search_loads_with_plain_from_pretrained(family, tmp_path):
    model = _model(family, lm=True)
    cls = type(model)
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
    # both heads (KV groups; MQA: query heads) and neurons were cut, the same in every layer
    assert h < found.groups[0].size and w < 20
    cfg = small.config
    expected = (1, h) if family in MQA else (h, 2 * h)
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) \
        == (*expected, 4, w)
    assert not hasattr(model.config, "gradprune_widths")
    small.save_pretrained(tmp_path / "uniform")
    again = cls.from_pretrained(tmp_path / "uniform").eval()
    ids, mask = _ids()
    torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                               small(ids, attention_mask=mask).logits)
    for k, v in small.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


@pytest.mark.parametrize("cross", [False, True])
def test_gpt2_uniform_keeps_heads_and_prunes_the_mlp(cross, tmp_path):
    # cross: a decoder with cross-attention (heads kept too) on fixed encoder states
    model = _gpt2(GPT2LMHeadModel, add_cross_attention=cross)
    gen = torch.Generator().manual_seed(5)
    data = [torch.randint(1, VOCAB, (4, 6), generator=gen) for _ in range(2)]
    memory = {"encoder_hidden_states": torch.randn(4, 9, 16, generator=gen)} if cross else {}
    found = st.search(model, {"params": "90%"}, data, lambda m, b: m(b, labels=b, **memory).loss,
                      "taylor", data[0], rules=FINE, uniform=True)
    assert {g.kind for g in found.groups} >= ({"gpt2.cross_heads"} if cross else {"gpt2.heads"})
    assert all(found.widths[gi] == g.size for gi, g in enumerate(found.groups) if g.unit == "heads")
    (w,) = {found.widths[gi] for gi, g in enumerate(found.groups) if g.unit == "channels"}
    assert w < 24
    small = found.export()
    assert small.config.n_inner == w
    small.save_pretrained(tmp_path / "u")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "u").eval()
    torch.testing.assert_close(again(data[1], **memory).logits, small(data[1], **memory).logits)


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


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "qwen3", "mqa"])
def test_save_pruned_and_load_pruned_with_a_factory(family, tmp_path):
    def make():
        return _model(family, lm=True)

    model = make()
    ids, mask = _ids()
    small = st.export_model(st.find_groups(model, ids), _keep(family))
    st.save_pruned(small, tmp_path / "p")
    again = st.load_pruned(make, tmp_path / "p").eval()
    torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                               small(ids, attention_mask=mask).logits)
    if family == "gpt2":
        assert (again.transformer.h[0].attn.num_heads, again.transformer.h[0].attn.split_size) == (2, 8)
    else:
        a1 = again.model.layers[1].self_attn
        assert (a1.num_heads, a1.num_key_value_heads, a1.num_key_value_groups) == _heads(family)[1]


# --------------------------------------------------------------------------------------------
# layers that stay unpruned are listed in skipped


def test_unsupported_llama_style_layers_are_listed_in_skipped():
    model = _llama(family="qwen2", num_attention_heads=1, num_key_value_heads=1, head_dim=24)
    analysis = st.find_groups(model, _ids()[0])
    assert [g.name for g in analysis.groups] == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    assert {"module": "layers.0.self_attn",
            "reason": "Qwen2Attention: heads not pruned (a single query head)"} in analysis.skipped
    # recognition is by structure: a LLaMA attention inside a Mistral model is a head group too
    model = _llama(family="mistral")
    model.layers[1].self_attn = _llama().layers[1].self_attn
    model.layers[1].mlp = torch.nn.Identity()
    analysis = st.find_groups(model, _ids()[0])
    assert [g.name for g in analysis.groups] == ["layers.0.self_attn", "layers.0.mlp.up_proj",
                                                 "layers.1.self_attn"]
    assert analysis.groups[2].rule_type == "LlamaAttention"


def test_an_unknown_layout_is_listed_and_left_untouched():
    from transformers import GemmaConfig, GemmaModel
    torch.manual_seed(0)
    model = GemmaModel(GemmaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   intermediate_size=20, **TOKENS)).eval()
    # projections under names no registered layout uses
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    attn.wq, attn.wo = attn.q_proj, attn.o_proj
    del attn.q_proj, attn.o_proj
    mlp.w1, mlp.w2 = mlp.up_proj, mlp.down_proj
    del mlp.up_proj, mlp.down_proj
    analysis = st.find_groups(model, _ids()[0])
    assert analysis.groups == []
    reasons = {s["module"]: s["reason"] for s in analysis.skipped}
    assert "outside any recognised attention or MLP block" in reasons["layers.0.self_attn.wq"]
    assert "outside any recognised attention or MLP block" in reasons["layers.0.mlp.w1"]
    assert "no attention or MLP block of a registered layout" in reasons[""]
