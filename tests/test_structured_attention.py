"""Attention heads and FFN neurons of torch.nn.MultiheadAttention / TransformerEncoderLayer:
groups, gates (a multiplier on each head's output before out_proj), export to fewer heads,
analytic params/FLOPs, search to a budget, rules, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradprune.structured as st
from gradprune.structured.rules import SearchRules

torch.set_num_threads(1)

N_CLASSES = 3
FINE = {"nn.Linear": {"feature_divisor": 1}, "nn.LayerNorm": {"feature_divisor": 1}}


class TinyTransformer(nn.Module):
    """Embedding Linear, a 2-layer TransformerEncoder, a standalone MultiheadAttention with a
    residual add, a mean over tokens and a classifier."""

    def __init__(self, batch_first=True, norm_first=False, activation="relu"):
        super().__init__()
        self.bf = batch_first
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.1, batch_first=batch_first,
                                           norm_first=norm_first, activation=activation)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, x, mask=None):
        h = self.enc(self.embed(x), src_key_padding_mask=mask)
        h = h + self.attn(h, h, h, key_padding_mask=mask)[0]
        return self.head(h.mean(dim=1 if self.bf else 0))


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyTransformer(**kw).eval()


def _x(bf=True, seed=1, batch=3, length=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 6, generator=gen)
    return x if bf else x.transpose(0, 1).contiguous()


def _data(n, bf=True, seed=2, features=6):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 5, features, generator=gen)
        out.append((x if bf else x.transpose(0, 1).contiguous(),
                    torch.randint(0, N_CLASSES, (4,), generator=gen)))
    return out


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _random_keep(analysis, seed):
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for gi, g in enumerate(analysis.groups):
        k = int(torch.randint(1, g.size + 1, (1,), generator=gen))
        keep[gi] = torch.sort(torch.randperm(g.size, generator=gen)[:k]).values
    return keep


def test_groups_heads_and_ffn_neurons():
    model = _model()
    analysis = st.find_groups(model, _x())
    summary = [(g.name, g.unit, g.size) for g in analysis.groups]
    assert summary == [("enc.layers.0.self_attn", "heads", 4), ("enc.layers.0.linear1", "channels", 24),
                       ("enc.layers.1.self_attn", "heads", 4), ("enc.layers.1.linear1", "channels", 24),
                       ("attn", "heads", 4)]
    heads = analysis.groups[0]
    assert [s.describe() for s in heads.slices] == [
        "enc.layers.0.self_attn.in_proj_weight[dim 0] (4 per unit)",
        "enc.layers.0.self_attn.in_proj_weight[dim 0] at offset 16 (4 per unit)",
        "enc.layers.0.self_attn.in_proj_weight[dim 0] at offset 32 (4 per unit)",
        "enc.layers.0.self_attn.out_proj.weight[dim 1] (4 per unit)"]
    assert [s.describe() for s in analysis.groups[1].slices] == [
        "enc.layers.0.linear1.weight[dim 0]", "enc.layers.0.linear2.weight[dim 1]"]
    skipped = {s["module"]: s["reason"] for s in analysis.skipped}
    assert "embed dim of TransformerEncoder is not pruned" in skipped["embed"]


def test_all_ones_gates_change_nothing_and_restore_the_fast_path():
    model = _model()
    x = _x()
    analysis = st.find_groups(model, x)
    ref = model(x)
    before = torch.backends.mha.get_fastpath_enabled()
    with st.Gates(analysis):
        torch.testing.assert_close(model(x), ref)
        assert not torch.backends.mha.get_fastpath_enabled()
    full = {gi: torch.arange(g.size) for gi, g in enumerate(analysis.groups)}
    with st.Gates(analysis, keep=full):
        torch.testing.assert_close(model(x), ref)
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kw", [dict(), dict(batch_first=False), dict(norm_first=True, activation="gelu")])
@pytest.mark.parametrize("seed", [0, 1])
def test_export_equals_gated_model_and_counts_are_analytic(kw, seed):
    model = _model(**kw)
    bf = kw.get("batch_first", True)
    x = _x(bf)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True  # padded keys of sample 0
    analysis = st.find_groups(model, x)
    keep = _random_keep(analysis, seed)
    keep[0] = torch.tensor([1, 3])  # some heads of the first layer always go
    with st.Gates(analysis, keep=keep):
        gated = model(x)
        gated_masked = model(x, mask)
    small = st.export_model(analysis, keep)
    assert isinstance(small.enc.layers[0].self_attn, st.PrunedMultiheadAttention)
    assert small.enc.layers[0].self_attn.num_heads == 2
    assert small.enc.layers[0].self_attn.embed_dim == 16
    assert small.enc.layers[0].self_attn.in_proj_weight.shape == (3 * 2 * 4, 16)
    assert small.enc.layers[0].self_attn.out_proj.weight.shape == (16, 2 * 4)
    torch.testing.assert_close(small(x), gated, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(small(x, mask), gated_masked, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # no fused fast path may run with the narrower heads
        torch.testing.assert_close(small(x), gated, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(small(x, mask), gated_masked, rtol=1e-4, atol=1e-5)
    widths = {gi: len(k) for gi, k in keep.items()}
    cost = st.CostModel(analysis, x)
    assert cost.dense_params == st.count_params(model)
    assert cost.dense_flops == st.count_flops(model, x)
    assert cost.costs(widths) == (st.count_params(small), st.count_flops(small, x))


class Holder(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v):
        return self.attn(q, k, v)[0]


def test_pruned_attention_matches_gated_attention_with_weights_and_masks():
    torch.manual_seed(3)
    attn = nn.MultiheadAttention(12, 3, batch_first=True).eval()
    q, kv = torch.randn(2, 4, 12), torch.randn(2, 6, 12)
    causal = torch.triu(torch.ones(4, 6, dtype=torch.bool), diagonal=3)
    kpm = torch.tensor([[False] * 5 + [True], [False] * 6])
    analysis = st.find_groups(Holder(attn), (q, kv, kv))
    assert [g.unit for g in analysis.groups] == ["heads"]
    keep = {0: torch.tensor([0, 2])}
    small = st.export_model(analysis, keep).attn
    for kwargs in (dict(), dict(attn_mask=causal), dict(key_padding_mask=kpm, need_weights=False),
                   dict(attn_mask=causal.float() * -1e4, key_padding_mask=kpm.float() * -1e4)):
        with st.Gates(analysis, keep=keep):
            gated = attn(q, kv, kv, **kwargs)[0]
        torch.testing.assert_close(small(q, kv, kv, **kwargs)[0], gated, rtol=1e-4, atol=1e-5)
        # all-ones gates reproduce torch's own forward
        with st.Gates(analysis):
            torch.testing.assert_close(attn(q, kv, kv, **kwargs)[0], attn.eval()(q, kv, kv, **kwargs)[0])
    out, weights = small(q, kv, kv, average_attn_weights=False)
    assert weights.shape == (2, 2, 4, 6)


def _manual_head_grads(attn, head, x, y):
    """d loss / d g for g multiplying each head's output before out_proj, written out by hand."""
    xs = x.transpose(0, 1) if not attn.batch_first else x
    bsz, length, e = xs.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = F.linear(xs, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.reshape(bsz, length, h, d).transpose(1, 2) for t in qkv.split(e, dim=-1))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    heads = probs @ v  # [bsz, h, length, d]
    g = torch.ones(bsz, h, requires_grad=True)
    heads = heads * g.view(bsz, h, 1, 1)
    out = attn.out_proj(heads.transpose(1, 2).reshape(bsz, length, e))
    loss = F.cross_entropy(head(out.mean(dim=1)), y)
    (grad,) = torch.autograd.grad(loss, g)
    return grad  # [bsz, h]: row i is d loss / d (gate of sample i)


@pytest.mark.parametrize("batch_first", [True, False])
def test_head_gate_gradients_are_the_head_output_multiplier_gradients(batch_first):
    torch.manual_seed(4)
    attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    head = nn.Linear(8, N_CLASSES)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = attn, head

        def forward(self, x):
            out = self.attn(x, x, x)[0]
            return self.head(out.mean(dim=1 if batch_first else 0))

    model = Net().eval()
    data = _data(2, bf=batch_first, features=8)
    analysis = st.find_groups(model, data[0][0])
    stats = st.gate_statistics(analysis, data, loss_fn, n_batches=2)
    batch_g = torch.stack([_manual_head_grads(attn, head, x, y).sum(0) for x, y in data]).double()
    torch.testing.assert_close(stats.score("gradnas")[0], (batch_g ** 2).mean(0), rtol=1e-4, atol=1e-10)
    per = torch.cat([_manual_head_grads(attn, head, x, y) * len(y) for x, y in data]).double()
    torch.testing.assert_close(stats.score("gradnas_per_sample")[0], (per ** 2).mean(0), rtol=1e-4,
                               atol=1e-10)


def test_search_with_a_params_budget_meets_it_and_round_trips(tmp_path):
    model = _model()
    data = _data(3)
    x = data[0][0]
    found = st.search(model, {"params": "60%"}, data, loss_fn, "gradnas", x, rules=FINE,
                      max_iter_data_loader=3)
    assert found.params <= 0.6 * found.dense_params
    head_widths = [found.widths[gi] for gi, g in enumerate(found.groups) if g.unit == "heads"]
    assert len(head_widths) == 3 and all(1 <= w <= 4 for w in head_widths)
    small = found.export()
    assert st.count_params(small) == found.params
    assert st.count_flops(small, x) == found.flops
    with found.gates():
        gated = model(x)
    torch.testing.assert_close(small(x), gated, rtol=1e-4, atol=1e-5)
    st.save_pruned(small, tmp_path / "p")
    again = st.load_pruned(lambda: _model(seed=5), tmp_path / "p").eval()
    assert isinstance(again.attn, st.PrunedMultiheadAttention) == isinstance(small.attn,
                                                                               st.PrunedMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))
    text = str(found.report)
    assert "heads" in text and "params:" in text


@pytest.mark.parametrize("method", ["magnitude", "taylor"])
def test_other_methods_prune_heads(method):
    model = _model()
    data = _data(2)
    found = st.search(model, {"flops": "70%"}, data, loss_fn, method, data[0][0], rules=FINE)
    assert found.flops <= 0.7 * found.dense_flops
    assert st.count_flops(found.export(), data[0][0]) == found.flops


def test_head_rules_ratio_divisor_and_disable():
    model = _model()
    x = _x()
    analysis = st.find_groups(model, x)
    from gradprune.structured.search import _group_choices
    heads = [gi for gi, g in enumerate(analysis.groups) if g.unit == "heads"]
    default = _group_choices(analysis, SearchRules(FINE))
    assert all(default[gi] == (1, 2, 3, 4) for gi in heads)
    rules = SearchRules({**FINE, "nn.MultiheadAttention": {"*": {"n_heads_divisor": 2},
                                                           "attn": {"n_heads_ratio": [0.25, 0.5]},
                                                           "enc.layers.1.*": None}})
    choices = _group_choices(analysis, rules)
    assert choices[heads[0]] == (2, 4)            # any count, multiples of 2
    assert choices[heads[1]] == (4,)              # disabled
    assert choices[heads[2]] == (1, 2, 4)         # ratios, divisor 1
    with pytest.raises(ValueError, match=r"n_heads_ratio items must be in \(0, 1\], got 1.5"):
        SearchRules({"nn.MultiheadAttention": {"n_heads_ratio": [1.5]}})
    with pytest.raises(ValueError, match="n_heads_divisor must be >= 1, got 0"):
        SearchRules({"nn.MultiheadAttention": {"n_heads_divisor": 0}})


def test_unsupported_attention_is_listed_not_broken():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    x = torch.randn(5, 2, 8)
    analysis = st.find_groups(Holder(attn), (x, x, x))
    assert analysis.groups == []
    assert any("add_bias_kv" in s["reason"] for s in analysis.skipped)


def test_latency_fields_in_the_report():
    model = _model()
    data = _data(1)
    found = st.search(model, {"params": "70%"}, data, loss_fn, "magnitude", data[0][0], rules=FINE,
                      measure_latency=True)
    lat = found.latency_ms
    assert set(lat["dense"]) == set(lat["pruned"]) == {1, 32}
    assert all(v > 0 for key in ("dense", "pruned") for v in lat[key].values())
    text = str(found.report)
    assert "latency batch 1:" in text and "latency batch 32:" in text
    calls = []

    def make(bs):
        calls.append(bs)
        return torch.randn(bs, 5, 6)

    lat = found.latency(make, batch_sizes=(2,), repeats=2, warmup=1)
    # one input per batch size, timed on both models in alternation
    assert calls == [2] and set(lat["dense"]) == set(lat["pruned"]) == {2} and lat["repeats"] == 2
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        found.latency(make, repeats=0)
    with pytest.raises(TypeError, match="measure_latency must be bool, got int"):
        st.search(model, {"params": "70%"}, data, loss_fn, "magnitude", data[0][0], measure_latency=1)
