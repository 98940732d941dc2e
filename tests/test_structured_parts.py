"""Structured pruning parts: scores against hand computations, batch counting, search-space rules,
the global-threshold search, fastnas, and what the analysis refuses to prune (and says so)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradprune.structured as st
from gradprune.structured.rules import SearchRules, candidate_widths
from test_structured_models import Conv1dNorms, batches, build, loss_fn

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# scores


def _manual_gate_grads(model, batch):
    """Gate gradients of the mlp by hand: gates on the outputs of layers 0 and 2."""
    x, y = batch
    g0 = torch.ones(16, requires_grad=True)
    g1 = torch.ones(12, requires_grad=True)
    h = torch.relu(model[0](x) * g0)
    h = F.gelu(model[2](h) * g1)
    loss = F.cross_entropy(model[5](h), y)
    return torch.autograd.grad(loss, [g0, g1])


def test_gradnas_taylor_and_per_sample_match_hand_computation():
    model = build("mlp")
    data = batches("mlp", 3)
    analysis = st.find_groups(model, data[0][0])
    stats = st.gate_statistics(analysis, data, loss_fn, n_batches=3)
    manual = [_manual_gate_grads(model, b) for b in data]
    for gi in range(2):
        g = torch.stack([m[gi] for m in manual]).double()
        torch.testing.assert_close(stats.score("gradnas")[gi], (g ** 2).mean(0), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(stats.score("taylor")[gi], g.mean(0).abs(), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(stats.summary()["gradnas_sum"][gi], (g ** 2).sum(0), rtol=1e-5,
                                   atol=1e-12)
    assert stats.count == 3 and stats.n_samples == 18
    # per sample: one backward per sample by hand
    per = [_manual_gate_grads(model, (x[i:i + 1], y[i:i + 1])) for x, y in data for i in range(len(x))]
    for gi in range(2):
        g = torch.stack([p[gi] for p in per]).double()
        torch.testing.assert_close(stats.score("gradnas_per_sample")[gi], (g ** 2).mean(0),
                                   rtol=1e-5, atol=1e-12)
        m = g.abs().mean(0)
        torch.testing.assert_close(stats.score("michel")[gi], m / m.norm(), rtol=1e-5, atol=1e-12)


def test_exactly_max_iter_batches_and_weights_get_no_gradient():
    model = build("mlp")
    model.train()
    data = batches("mlp", 10)
    pulled = []
    flags = []

    def stream():
        for b in data:
            pulled.append(1)
            yield b

    def checking_loss(m, b):
        flags.append(any(p.requires_grad for p in m.parameters()))
        return loss_fn(m, b)

    analysis = st.find_groups(model, data[0][0])
    stats = st.gate_statistics(analysis, stream(), checking_loss, n_batches=4)
    assert stats.count == 4 and len(pulled) == 4
    assert flags == [False] * 4  # weight gradients off while scoring
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    stats = st.gate_statistics(analysis, data[:2], loss_fn)  # fewer available: all of them
    assert stats.count == 2


def test_default_max_iter_data_loader_is_128():
    model = build("mlp")
    data = batches("mlp", 130, batch_size=2)
    found = st.search(model, {"params": "95%"}, data, loss_fn, "gradnas", data[0][0],
                      rules={"nn.Linear": {"feature_divisor": 1}})
    assert found.batches == 128


def test_magnitude_scores_are_producer_row_norms():
    model = build("cnn_bn")
    analysis = st.find_groups(model, batches("cnn_bn", 1)[0][0])
    l1 = st.magnitude_scores(analysis, "l1")
    l2 = st.magnitude_scores(analysis, "l2")
    w = model[0].weight.detach().double()
    torch.testing.assert_close(l1[0], w.abs().sum((1, 2, 3)))
    torch.testing.assert_close(l2[0], w.pow(2).sum((1, 2, 3)).sqrt())


# ---------------------------------------------------------------------------------------------
# rules


def test_candidate_widths_follow_the_rounding_rule():
    assert candidate_widths(64, [0.25, 0.5, 1.0], 8) == (16, 32, 64)
    assert candidate_widths(100, [0.1], 32) == (32, 100)        # at least one divisor
    assert candidate_widths(100, [0.75], 32) == (96, 100)       # 64 lost > 10% of 75: +32
    assert candidate_widths(100, [0.7], 32) == (64, 100)        # 64 lost < 10% of 70
    assert candidate_widths(16, [0.05 * i for i in range(1, 21)], 32) == (16,)
    assert candidate_widths(10, [0.5], 1) == (5, 10)


def test_rules_globs_apply_in_order_and_none_disables():
    rules = SearchRules({
        "nn.Linear": {"*": {"feature_divisor": 4}, "enc.*": {"feature_divisor": 2}, "enc.head": None},
        "nn.Conv2d": None,
    })
    lin = nn.Linear(8, 8)
    assert rules.rule_for("fc", lin).feature_divisor == 4
    assert rules.rule_for("enc.fc", lin).feature_divisor == 2
    assert rules.rule_for("enc.head", lin) is None
    assert rules.rule_for("c", nn.Conv2d(1, 1, 1)) is None
    assert rules.rule_for("n", nn.BatchNorm2d(4)).feature_divisor == 32  # default kept
    assert SearchRules({"nn.Linear": {"x*": {}}}).rule_for("fc", lin) is None  # no match: off


def test_a_disabled_owner_freezes_its_group():
    model = build("cnn_bn")
    x = batches("cnn_bn", 1)[0][0]
    data = batches("cnn_bn", 2)
    rules = {"nn.Conv2d": {"channel_divisor": 1}, "nn.Linear": {"feature_divisor": 1},
             "nn.BatchNorm2d": {"*": {"feature_divisor": 1}, "4": None}}
    found = st.search(model, {"params": "80%"}, data, loss_fn, "magnitude", x, rules=rules)
    names = [g.name for g in found.groups]
    assert found.choices[names.index("3")] == (6,)  # conv 3's channels pass BatchNorm "4"
    assert len(found.choices[names.index("0")]) == 8


def test_groupnorm_keeps_equal_counts_per_norm_group():
    torch.manual_seed(0)
    model = Conv1dNorms().eval()
    data = batches("conv1d_norms", 2)
    rules = {"nn.Conv1d": {"channel_divisor": 1}, "nn.GroupNorm": {"channel_divisor": 1},
             "nn.Linear": {"feature_divisor": 1}, "nn.LayerNorm": {"feature_divisor": 1},
             "nn.InstanceNorm1d": {"feature_divisor": 1}}
    found = st.search(model, {"flops": "40%"}, data, loss_fn, "gradnas", data[0][0], rules=rules)
    gi = [g.name for g in found.groups].index("c1")
    assert all(w % 2 == 0 for w in found.choices[gi])
    keep = found.keep[gi]
    assert (keep < 4).sum() == (keep >= 4).sum()
    small = found.export()
    with found.gates():
        gated = model(data[0][0])
    torch.testing.assert_close(small(data[0][0]), gated, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# search


def test_threshold_is_the_smallest_that_meets_the_budget():
    model = build("resnet")
    data = batches("resnet", 2)
    x = data[0][0]
    rules = {"nn.Conv2d": {"channel_divisor": 1}, "nn.BatchNorm2d": {"feature_divisor": 1}}
    found = st.search(model, {"flops": "55%"}, data, loss_fn, "taylor", x, rules=rules)
    cost = st.CostModel(found.analysis, x)
    thresholds = sorted({v for s in found.sensitivity.values() for v in s.values()} | {0.0})

    def widths_at(t):
        return {gi: min(w for w in ch if found.sensitivity[gi][w] <= t)
                for gi, ch in found.choices.items()}

    feasible = [t for t in thresholds if cost.flops(widths_at(t)) <= 0.55 * cost.dense_flops]
    assert found.threshold == feasible[0]
    assert found.widths == widths_at(found.threshold)
    # kept units are the highest-scored ones
    for gi, keep in found.keep.items():
        s = found.scores[gi]
        dropped = torch.ones(len(s), dtype=torch.bool)
        dropped[keep] = False
        if dropped.any() and len(keep):
            assert s[keep].min() >= s[dropped].max()


def test_fastnas_evaluates_once_per_group_choice():
    model = build("mlp")
    data = batches("mlp", 2)
    calls = []

    def score_func(m):
        calls.append(1)
        with torch.no_grad():
            return -float(loss_fn(m, data[1]))

    rules = {"nn.Linear": {"features_ratio": [0.25, 0.5, 0.75], "feature_divisor": 1}}
    found = st.search(model, {"params": "60%"}, None, None, "fastnas", data[0][0], rules=rules,
                      score_func=score_func)
    assert len(calls) == 1 + sum(len(c) - 1 for c in found.choices.values())
    assert found.params <= 0.6 * found.dense_params
    assert st.count_params(found.export()) == found.params


def test_dry_run_report_lists_groups_and_skipped():
    model = build("mlp")
    data = batches("mlp", 1)
    found = st.search(model, {"params": "70%"}, data, loss_fn, "gradnas", data[0][0],
                      rules={"nn.Linear": {"feature_divisor": 1}})
    text = found.report()
    assert "group" in text and "kept" in text and "5: output is a model output" in text
    assert f"params: {found.dense_params} -> {found.params}" in text


# ---------------------------------------------------------------------------------------------
# what is left unpruned, and why


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.fc(x)
        return -self.fc(x)


class Mixed(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a = nn.Linear(4, 6)
        self.inner = Untraceable()
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = self.op(self.a(x))
        h = self.inner(h)
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize("op, reason", [
    (torch.sigmoid, "unsupported function sigmoid"),
    (lambda h: h + 1.0, "add of channels with a non-channel operand"),
    (lambda h: torch.cat(torch.split(h, 3, dim=1), dim=1), "split"),
    (lambda h: h @ torch.ones(6, 6), "matmul"),
])
def test_unknown_ops_leave_layers_unpruned_and_listed(op, reason):
    model = Mixed(op).eval()
    x = torch.randn(3, 4)
    analysis = st.find_groups(model, x)
    skipped = {s["module"]: s["reason"] for s in analysis.skipped}
    assert "torch.fx" in skipped["inner"]
    assert reason in skipped["a"]
    assert [g.name for g in analysis.groups] == ["b"]
    keep = {0: torch.tensor([1, 4])}
    with st.Gates(analysis, keep=keep):
        gated = model(x)
    torch.testing.assert_close(st.export_model(analysis, keep)(x), gated)


class SharedAndFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.b2 = nn.Linear(6, 6)
        self.b2.weight = self.b.weight  # tied
        self.g = nn.Conv1d(6, 6, 1, groups=2)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = F.linear(self.a(x), self.b2.weight)
        h = self.b(torch.relu(h))
        h = self.g(h.unsqueeze(-1)).squeeze(-1)
        return self.c(h)


def test_parameters_used_elsewhere_and_grouped_convs_are_not_pruned():
    model = SharedAndFunctional().eval()
    analysis = st.find_groups(model, torch.randn(2, 4))
    assert analysis.groups == []
    skipped = {s["module"]: s["reason"] for s in analysis.skipped}
    assert "unsupported function linear" in skipped["a"]
    assert "shares a parameter" in skipped["b"]
    assert "grouped convolution" in skipped["g"]


def test_untraceable_model_is_reported_not_broken():
    model = Untraceable()
    analysis = st.find_groups(model, torch.randn(2, 6))
    assert analysis.groups == [] and "torch.fx" in analysis.skipped[0]["reason"]
    with pytest.raises(ValueError, match="smallest reachable"):
        st.search(model, {"params": "50%"}, None, None, "magnitude", torch.randn(2, 6))


def test_per_sample_gradnas_search():
    model = build("cnn_bn")
    data = batches("cnn_bn", 2)
    rules = {"nn.Conv2d": {"channel_divisor": 1}, "nn.BatchNorm2d": {"feature_divisor": 1},
             "nn.Linear": {"feature_divisor": 1}}
    found = st.search(model, {"flops": "60%"}, data, loss_fn, "gradnas", data[0][0], rules=rules,
                      per_sample=True)
    stats = st.gate_statistics(found.analysis, data, loss_fn)
    for gi, s in stats.score("gradnas_per_sample").items():
        torch.testing.assert_close(found.scores[gi], s)
    assert found.flops <= 0.6 * found.dense_flops


try:
    from hypothesis import given, settings, strategies as hs
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    _ANALYSES = {}

    def _analysis(name):
        if name not in _ANALYSES:
            model = build(name)
            x = batches(name, 1, seed=5)[0][0]
            _ANALYSES[name] = (model, x, st.find_groups(model, x))
        return _ANALYSES[name]

    @settings(max_examples=15, deadline=None)
    @given(name=hs.sampled_from(["resnet", "concat", "depthwise", "residual_stream"]),
           data=hs.data())
    def test_property_any_kept_subset_exports_to_the_gated_model(name, data):
        model, x, analysis = _analysis(name)
        keep = {}
        for gi, g in enumerate(analysis.groups):
            units = data.draw(hs.sets(hs.integers(0, g.size - 1), min_size=1), label=g.name)
            keep[gi] = torch.tensor(sorted(units))
        with st.Gates(analysis, keep=keep):
            gated = model(x)
        small = st.export_model(analysis, keep)
        torch.testing.assert_close(small(x), gated, rtol=1e-4, atol=1e-5)
        widths = {gi: len(k) for gi, k in keep.items()}
        cost = st.CostModel(analysis, x)
        assert cost.costs(widths) == (st.count_params(small), st.count_flops(small, x))


def test_docs_structured_examples_run(capsys):
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "structured.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/structured.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "params:" in out and "output is a model output" in out
    found = namespace["found"]
    assert found.flops <= 0.5 * found.dense_flops and found.params <= 0.7 * found.dense_params
