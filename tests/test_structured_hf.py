"""Hugging Face BERT: heads and FFN neurons found by module classes, gates through hooks (no
head_mask), export with updated head counts, analytic counts, save_pretrained round trip."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import gradprune.structured as st

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

torch.set_num_threads(1)

FINE = {"nn.Linear": {"feature_divisor": 1}}


def _config(**kw):
    base = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=24, max_position_embeddings=16, num_labels=3,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def _bert(cls=BertModel, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(_config(**kw)).eval()


def _ids(seed=1, batch=3, length=7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 5:] = 0
    return ids, mask


def _keep():
    return {0: torch.tensor([0, 2]), 1: torch.arange(0, 24, 3), 2: torch.tensor([3]),
            3: torch.tensor([1, 5, 6])}


def test_groups_are_heads_and_ffn_neurons_per_layer():
    model = _bert()
    analysis = st.find_groups(model, _ids()[0])
    assert [(g.name, g.unit, g.size) for g in analysis.groups] == [
        ("encoder.layer.0.attention.self", "heads", 4), ("encoder.layer.0.intermediate.dense", "channels", 24),
        ("encoder.layer.1.attention.self", "heads", 4), ("encoder.layer.1.intermediate.dense", "channels", 24)]
    assert [s.describe() for s in analysis.groups[0].slices][-1] == \
        "encoder.layer.0.attention.output.dense.weight[dim 1] (4 per unit)"
    assert any("hidden size" in s["reason"] for s in analysis.skipped)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_export_equals_gated_model_and_counts_are_analytic(attn):
    model = _bert(attn_implementation=attn)
    ids, mask = _ids()
    analysis = st.find_groups(model, ids)
    ref = model(ids, attention_mask=mask).last_hidden_state
    with st.Gates(analysis):
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, ref)
    keep = _keep()
    with st.Gates(analysis, keep=keep):
        gated = model(ids, attention_mask=mask).last_hidden_state
    small = st.export_model(analysis, keep)
    assert type(small) is BertModel
    sa = small.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.attention_head_size, sa.all_head_size) == (2, 4, 8)
    assert sa.query.weight.shape == (8, 16) and small.encoder.layer[0].attention.output.dense.in_features == 8
    assert small.encoder.layer[1].intermediate.dense.out_features == 3
    torch.testing.assert_close(small(ids, attention_mask=mask).last_hidden_state, gated,
                               rtol=1e-4, atol=1e-5)
    cost = st.CostModel(analysis, ids)
    assert cost.dense_flops == st.count_flops(model, ids)
    widths = {gi: len(k) for gi, k in keep.items()}
    assert cost.costs(widths) == (st.count_params(small), st.count_flops(small, ids))
    assert not hasattr(model.config, "gradprune_widths")  # the dense model is untouched


def test_head_gates_are_multipliers_on_head_outputs_before_the_output_dense():
    model = _bert(BertForSequenceClassification)
    ids, mask = _ids()
    labels = torch.tensor([0, 2, 1])
    analysis = st.find_groups(model, ids)

    def loss_fn(m, batch):
        return m(batch[0], attention_mask=batch[1], labels=batch[2]).loss

    stats = st.gate_statistics(analysis, [(ids, mask, labels)], loss_fn, n_batches=1)
    # by hand: a multiplier on each head's slice of the self-attention output
    gates = [torch.ones(4, requires_grad=True) for _ in range(2)]
    handles = []
    for layer, g in zip(model.bert.encoder.layer, gates):
        def hook(module, args, output, g=g):
            out = output[0]
            return (out * g.repeat_interleave(4),) + tuple(output[1:])
        handles.append(layer.attention.self.register_forward_hook(hook))
    try:
        grads = torch.autograd.grad(loss_fn(model, (ids, mask, labels)), gates)
    finally:
        for h in handles:
            h.remove()
    for gi, grad in zip((0, 2), grads):
        torch.testing.assert_close(stats.score("gradnas")[gi], grad.double() ** 2, rtol=1e-4, atol=1e-12)


def test_save_pretrained_and_load_back(tmp_path):
    model = _bert(BertForSequenceClassification)
    ids, mask = _ids()
    analysis = st.find_groups(model, ids)
    small = st.export_model(analysis, _keep())
    small.save_pretrained(tmp_path / "pruned")
    again = st.load_pruned_pretrained(BertForSequenceClassification, tmp_path / "pruned")
    assert again.config.gradprune_widths["bert.encoder.layer.0.attention.self"] == {
        "num_attention_heads": 2, "all_head_size": 8}
    torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                               small(ids, attention_mask=mask).logits)
    assert st.count_params(again) == st.count_params(small)
    with pytest.raises(TypeError, match="PreTrainedModel class"):
        st.load_pruned_pretrained(dict, tmp_path / "pruned")


def test_search_with_a_params_budget_on_bert():
    model = _bert(BertForSequenceClassification)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 40, (4, 6), generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(3)]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]).logits, batch[1])

    found = st.search(model, {"params": "90%"}, data, loss_fn, "gradnas", data[0][0], rules=FINE)
    assert found.params <= 0.9 * found.dense_params
    assert any(found.widths[gi] < g.size for gi, g in enumerate(found.groups) if g.unit == "heads")
    small = found.export()
    assert st.count_params(small) == found.params
    assert st.count_flops(small, data[0][0]) == found.flops
    with found.gates():
        gated = model(data[0][0]).logits
    torch.testing.assert_close(small(data[0][0]).logits, gated, rtol=1e-4, atol=1e-5)
    rules = {**FINE, "hf.BertSelfAttention": {"n_heads_divisor": 2}}
    found = st.search(model, {"params": "90%"}, data, loss_fn, "magnitude", data[0][0], rules=rules)
    assert all(found.widths[gi] in (2, 4) for gi, g in enumerate(found.groups) if g.unit == "heads")


def _search_data():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 40, (4, 6), generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(3)]


def _ce(m, batch):
    return F.cross_entropy(m(batch[0]).logits, batch[1])


def test_uniform_search_on_bert_loads_with_plain_from_pretrained(tmp_path):
    model = _bert(BertForSequenceClassification)
    data = _search_data()
    found = st.search(model, {"params": "90%"}, data, _ce, "gradnas", data[0][0], rules=FINE,
                      uniform=True)
    assert found.uniform and found.params <= 0.9 * found.dense_params
    # BERT derives the head size from hidden_size / num_attention_heads: heads are kept
    assert all(found.widths[gi] == 4 for gi, g in enumerate(found.groups) if g.unit == "heads")
    (w,) = {found.widths[gi] for gi, g in enumerate(found.groups) if g.unit == "channels"}
    assert w < 24
    small = found.export()
    assert st.count_params(small) == found.params
    assert (small.config.intermediate_size, small.config.num_attention_heads) == (w, 4)
    assert model.config.intermediate_size == 24  # the dense model is untouched
    small.save_pretrained(tmp_path / "uniform")
    again = BertForSequenceClassification.from_pretrained(tmp_path / "uniform").eval()
    ids, mask = _ids()
    torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                               small(ids, attention_mask=mask).logits)
    state = again.state_dict()
    for k, v in small.state_dict().items():
        torch.testing.assert_close(state[k], v)


def test_uniform_export_of_a_per_layer_result_takes_the_minimum_width(tmp_path):
    model = _bert(BertForSequenceClassification)
    data = _search_data()
    rules = {**FINE, "hf.BertSelfAttention": None}
    found = st.search(model, {"params": "85%"}, data, _ce, "taylor", data[0][0], rules=rules)
    ffn = [gi for gi, g in enumerate(found.groups) if g.unit == "channels"]
    widths = [found.widths[gi] for gi in ffn]
    assert len(set(widths)) > 1  # the per-layer search chose different widths
    small = found.export(uniform=True)
    w = min(widths)
    assert small.config.intermediate_size == w
    for gi, layer in zip(ffn, small.bert.encoder.layer):
        assert layer.intermediate.dense.out_features == w
        # each layer keeps its own highest-scored neurons
        top = torch.sort(-found.scores[gi], stable=True).indices[:w].sort().values
        torch.testing.assert_close(layer.intermediate.dense.weight,
                                   model.get_submodule(found.groups[gi].name).weight[top])
    small.save_pretrained(tmp_path / "min")
    again = BertForSequenceClassification.from_pretrained(tmp_path / "min").eval()
    ids, mask = _ids()
    torch.testing.assert_close(again(ids, attention_mask=mask).logits,
                               small(ids, attention_mask=mask).logits)
    # per-layer export is unchanged by default
    assert st.count_params(found.export()) == found.params


def test_uniform_refuses_what_a_plain_config_cannot_express():
    model = _bert(BertForSequenceClassification)
    data = _search_data()
    found = st.search(model, {"params": "80%"}, data, _ce, "gradnas", data[0][0], rules=FINE)
    assert any(found.widths[gi] < 4 for gi, g in enumerate(found.groups) if g.unit == "heads")
    with pytest.raises(ValueError, match="head size"):
        found.export(uniform=True)
    with pytest.raises(ValueError, match="different widths"):
        st.export_model(found.analysis, {1: torch.arange(5), 3: torch.arange(6)}, uniform=True)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="Hugging Face"):
        st.search(net, {"params": "80%"}, None, None, "magnitude", x, uniform=True)
    with pytest.raises(TypeError, match="uniform must be bool"):
        st.search(net, {"params": "80%"}, None, None, "magnitude", x, uniform="yes")


def test_bert_head_handler_config_fields_only_express_the_unpruned_count():
    # BERT and GPT-2 derive the head size from hidden_size / heads: the meta-device probe of the
    # config finds that fewer heads build wider heads, so uniform widths keep every head
    from transformers import GPT2Config, GPT2Model

    from gradprune.structured.hf import _uniform_problem, uniform_width_ok
    gpt2 = GPT2Model(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=4, n_positions=16))
    for net in (_bert(), gpt2):
        analysis = st.find_groups(net, torch.zeros(1, 4, dtype=torch.long))
        h = analysis.groups[0].handler
        assert h.n_heads == 4 and h.config_fields(4) == {}
        assert uniform_width_ok(analysis, 0, 4) and not uniform_width_ok(analysis, 0, 3)
        assert "cannot express 3 of 4 heads" in _uniform_problem(analysis, 0, 3)
