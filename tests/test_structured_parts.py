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


def _zeroed_units_score(model, x):
    """score_func for the tiny MLP: minus the number of hidden units that are off (all-zero
    columns entering the activations): every removed unit strictly lowers the score."""
    off = []
    hooks = [model[i].register_forward_hook(lambda mod, inp, out: off.append(int((inp[0] == 0).all(0).sum())))
             for i in (1, 3)]

    def score_func(m):
        off.clear()
        with torch.no_grad():
            m(x)
        return -float(sum(off))
    return score_func, hooks


def test_fastnas_evaluates_once_per_group_choice_while_removal_costs():
    model = build("mlp")
    data = batches("mlp", 2)
    score, hooks = _zeroed_units_score(model, data[1][0])
    calls = []

    def score_func(m):
        calls.append(1)
        return score(m)

    rules = {"nn.Linear": {"features_ratio": [0.25, 0.5, 0.75], "feature_divisor": 1}}
    found = st.search(model, {"params": "60%"}, None, None, "fastnas", data[0][0], rules=rules,
                      score_func=score_func)
    assert len(calls) == 1 + sum(len(c) - 1 for c in found.choices.values())
    assert found.params <= 0.6 * found.dense_params
    assert st.count_params(found.export()) == found.params
    for gi, sens in found.sensitivity.items():  # a narrower width always costs more
        widths = sorted(sens)
        assert all(sens[a] > sens[b] for a, b in zip(widths, widths[1:]))
        assert sens[found.groups[gi].size] == 0.0
    for h in hooks:
        h.remove()


def test_fastnas_stops_at_the_first_lossless_width_and_ties_do_not_overprune():
    model = build("mlp")
    data = batches("mlp", 2)
    calls = []

    def score_func(m):  # nothing ever loses: every width is lossless
        calls.append(1)
        return 1.0

    rules = {"nn.Linear": {"features_ratio": [0.25, 0.5, 0.75], "feature_divisor": 1}}
    found = st.search(model, {"params": "60%"}, None, None, "fastnas", data[0][0], rules=rules,
                      score_func=score_func)
    # the baseline, then only the narrowest width of each group (the wider ones are lossless too)
    assert len(calls) == 1 + sum(1 for c in found.choices.values() if len(c) > 1)
    assert found.params <= 0.6 * found.dense_params
    # the tie-breaker (removed consumer weight norm) orders the widths, so the search stops at the
    # budget instead of cutting every group to its narrowest lossless width
    smallest = {gi: min(c) for gi, c in found.choices.items()}
    assert found.widths != smallest
    for sens in found.sensitivity.values():
        widths = sorted(sens)
        assert all(sens[a] > sens[b] for a, b in zip(widths, widths[1:]))
        assert max(sens.values()) < 1e-6  # far below any measured difference


def test_fastnas_recalibrates_batchnorm_per_candidate_and_restores_it():
    torch.manual_seed(0)
    model = build("mlp_bn1d").eval()
    bn = model[1]
    with torch.no_grad():  # distinctive statistics that a recalibration would overwrite
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = batches("mlp_bn1d", 3, seed=2)
    seen = []

    def score_func(m):
        seen.append((bn.running_mean.clone(), bn.running_var.clone(), bn.training))
        return -float(loss_fn(m, calib[0]))

    found = st.search(model, {"params": "70%"}, calib, loss_fn, "fastnas", calib[0][0],
                      rules={"nn.Linear": {"feature_divisor": 4}, "nn.BatchNorm1d": {"feature_divisor": 4}},
                      score_func=score_func)
    # the baseline is scored with statistics of the calibration batches (cumulative average)
    with torch.no_grad():
        h = [model[0](x) for x, _ in calib]
    mean = torch.stack([t.mean(0) for t in h]).mean(0)
    var = torch.stack([t.var(0, unbiased=True) for t in h]).mean(0)
    assert torch.allclose(seen[0][0], mean, atol=1e-5) and torch.allclose(seen[0][1], var, atol=1e-5)
    assert seen[0][2] is False  # scored in eval mode
    assert len(seen) > 1 and not torch.equal(seen[1][0], seen[0][0])  # re-estimated per candidate
    for k, v in model.state_dict().items():  # the user's statistics are back, bit for bit
        assert torch.equal(v, before[k]), k
    assert bn.momentum == 0.1 and not model.training
    assert found.params <= 0.7 * found.dense_params


def test_fastnas_keeps_the_units_their_consumers_weigh_most():
    # producer rows and consumer columns rank the hidden units in opposite orders: fastnas keeps
    # the units the next layer uses most (ModelOpt's channel order)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        scale = torch.arange(1.0, 9.0)
        model[0].weight.copy_(torch.ones(8, 4) * scale[:, None])          # unit 7 largest row
        model[2].weight.copy_(torch.ones(2, 8) * scale.flip(0)[None, :])  # unit 0 largest column
    x = torch.randn(4, 4)
    found = st.search(model, {"params": "60%"}, None, None, "fastnas", x,
                      rules={"nn.Linear": {"feature_divisor": 2}}, score_func=lambda m: 1.0)
    kept = found.keep[0].tolist()
    assert kept == list(range(len(kept))) and len(kept) < 8


def test_recalibrate_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5)).eval()
    data = [(torch.randn(8, 4) * 2 + 1, None) for _ in range(5)]
    out = st.recalibrate_batchnorm(net, data, max_batches=3)
    assert out is net and not net.training and not net[1].training and net[1].momentum == 0.1
    with torch.no_grad():
        h = [net[0](x) for x, _ in data[:3]]
    assert torch.allclose(net[1].running_mean, torch.stack([t.mean(0) for t in h]).mean(0), atol=1e-6)
    assert int(net[1].num_batches_tracked) == 3
    seen = []
    st.recalibrate_batchnorm(net, [torch.ones(2, 4)], forward=lambda m, b: seen.append(m(b)))
    assert len(seen) == 1 and torch.allclose(net[1].running_mean, net[0](torch.ones(1, 4)).detach()[0])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        st.recalibrate_batchnorm("net", data)
    with pytest.raises(TypeError, match="forward must be callable"):
        st.recalibrate_batchnorm(net, data, forward=3)
    with pytest.raises(ValueError, match="max_batches must be >= 1, got 0"):
        st.recalibrate_batchnorm(net, data, max_batches=0)


def test_magnitude_scores_consumer_side():
    model = build("mlp")
    analysis = st.find_groups(model, batches("mlp", 1)[0][0])
    out_side = st.magnitude_scores(analysis, "l2")
    in_side = st.magnitude_scores(analysis, "l2", side="in")
    first = next(gi for gi, g in enumerate(analysis.groups) if g.size == 16)
    assert torch.allclose(out_side[first], model[0].weight.detach().double().norm(dim=1))
    assert torch.allclose(in_side[first], model[2].weight.detach().double().norm(dim=0))
    with pytest.raises(ValueError, match="side must be one of out, in; got 'both'"):
        st.magnitude_scores(analysis, "l2", side="both")


def test_dry_run_report_lists_groups_and_skipped():
    model = build("mlp")
    data = batches("mlp", 1)
    found = st.search(model, {"params": "70%"}, data, loss_fn, "gradnas", data[0][0],
                      rules={"nn.Linear": {"feature_divisor": 1}})
    text = str(found.report)
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
