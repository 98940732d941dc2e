"""Feature-targeted pre-pruning: config validation, sampling, exact batched gradients, selection,
cache, and Hugging Face language models."""

import math
import os

import pytest
import torch
from torch import nn

import gradprune as gp
from gradprune.preprune import sample_indices


# ---------------------------------------------------------------------------------------------
# a tiny classification "feature" task: factual / alternative labels per item

def _data(n=30, n_classes=2, seed=0, dim=6):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        c = i % n_classes
        items.append({"x": torch.randn(dim, generator=g), "feature_class_id": c,
                      "factual": c, "alternative": (c + 1) % n_classes})
    return items


def _model(seed=0, dim=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 12), nn.Tanh(), nn.Linear(12, 3))


def _loss(model, batch, target):
    return nn.functional.cross_entropy(model(batch["x"]), batch[target])


def _reference_importance(model, items, source, statistic="mean"):
    """GRADIEND's documented loop: one backward per sample at batch size 1, flat fp32 running sum."""
    params = [p for p in model.parameters()]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
    for item in items:
        batch = torch.utils.data.default_collate([item])
        g = []
        for target, sign in (("factual", 1.0), ("alternative", -1.0)):
            if source != "diff" and target != source:
                continue
            model.zero_grad()
            _loss(model, batch, target).backward()
            g.append(sign * torch.cat([p.grad.reshape(-1) for p in params]))
        vec = sum(g)
        total += vec if statistic == "mean" else (vec.abs() if statistic == "mean_abs" else vec * vec)
    model.zero_grad()
    mean = total / len(items)
    return mean.abs() if statistic == "mean" else mean


def _flat(importance, model):
    return torch.cat([importance[n].reshape(-1) for n, _ in model.named_parameters()])


# ---------------------------------------------------------------------------------------------
# config

@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(n_samples="16", topk=5), TypeError, "n_samples must be int, got str"),
    (dict(n_samples=True, topk=5), TypeError, "n_samples must be int, got bool"),
    (dict(n_samples=0, topk=5), ValueError, "n_samples must be >= 1, got 0"),
    (dict(n_samples=4), ValueError, "at least one of topk or threshold must be set"),
    (dict(n_samples=4, topk=0), ValueError, "topk must be >= 1 when an int, got 0"),
    (dict(n_samples=4, topk=0.0), ValueError, "topk must be in (0, 1] when a float, got 0.0"),
    (dict(n_samples=4, topk=1.5), ValueError, "topk must be in (0, 1]"),
    (dict(n_samples=4, topk=True), TypeError, "topk must be int or float, got bool"),
    (dict(n_samples=4, threshold=False), TypeError, "threshold must be float, got bool"),
    (dict(n_samples=4, topk=2, source="x"), ValueError,
     "source must be one of factual, alternative, diff; got 'x'"),
    (dict(n_samples=4, topk=2, source=1), TypeError, "source must be str, got int"),
    (dict(n_samples=4, topk=2, batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(n_samples=4, topk=2, batch_size=2.0), TypeError, "batch_size must be int, got float"),
    (dict(n_samples=4, topk=2, feature_class_key=3), TypeError, "feature_class_key must be str, got int"),
    (dict(n_samples=4, topk=2, use_cached_gradients=1), TypeError, "use_cached_gradients must be bool, got int"),
    (dict(n_samples=4, topk=2, target_feature_class_ids=[]), ValueError, "must not be empty"),
    (dict(n_samples=4, topk=2, target_feature_class_ids=[True]), TypeError, "got bool"),
    (dict(n_samples=4, topk=2, statistic="median"), ValueError, "statistic must be one of"),
    (dict(n_samples=4, topk=2, mask={"w": torch.ones(2)}), TypeError, "must be a bool tensor"),
    (dict(n_samples=4, topk=2, cache_dir=3), TypeError, "cache_dir must be str or a path, got int"),
])
def test_config_validation_names_field_and_value(kwargs, exc, msg):
    with pytest.raises(exc) as info:
        gp.PrePruneConfig(**kwargs)
    assert msg in str(info.value)


def test_config_str_and_round_trip():
    cfg = gp.PrePruneConfig(n_samples=16, topk=0.01, source="diff")
    assert str(cfg) == "PrePruneConfig(n_samples=16, topk=0.01, threshold=None, source='diff')"
    again = gp.PrePruneConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="valid keys"):
        gp.PrePruneConfig.from_dict({"n_samples": 2, "topk": 1, "top_k": 3})


# ---------------------------------------------------------------------------------------------
# sampling

def test_sampling_is_stratified_seeded_and_nested():
    classes = [i % 3 for i in range(60)]
    small, q_small, _ = sample_indices(classes, [0, 1, 2], 7, seed=3)
    big, q_big, _ = sample_indices(classes, [0, 1, 2], 20, seed=3)
    assert q_small == {0: 3, 1: 2, 2: 2}       # remainder to the first classes
    assert q_big == {0: 7, 1: 7, 2: 6}
    assert big[: len(small)] == small          # a prefix
    assert sample_indices(classes, [0, 1, 2], 20, seed=3)[0] == big
    assert sample_indices(classes, [0, 1, 2], 20, seed=4)[0] != big
    assert len(set(big)) == len(big)           # without replacement while items last
    assert [classes[i] for i in small] == [0, 1, 2, 0, 1, 2, 0]


def test_too_few_items_fills_with_replacement_and_warns():
    items = _data(n=10)
    items = [it for it in items if it["feature_class_id"] == 0] + \
        [it for it in items if it["feature_class_id"] == 1][:2]
    with pytest.warns(UserWarning, match="sampled with replacement"):
        sel = gp.pre_prune(_model(), items, gp.PrePruneConfig(n_samples=8, topk=3), _loss)
    assert sel.report.samples_per_class == {0: 4, 1: 4}
    assert sel.report.filled_with_replacement == [1]


def test_target_classes_from_definition_and_config():
    items = _data(n=30, n_classes=3)

    class Definition:
        def get_target_feature_class_ids(self):
            return [0, 2]

    sel = gp.pre_prune(_model(), items, gp.PrePruneConfig(n_samples=6, topk=3), _loss,
                       definition=Definition())
    assert sel.report.samples_per_class == {0: 3, 2: 3}
    sel = gp.pre_prune(_model(), items, gp.PrePruneConfig(n_samples=6, topk=3,
                       target_feature_class_ids=[1]), _loss, definition=Definition())
    assert sel.report.samples_per_class == {1: 6}


# ---------------------------------------------------------------------------------------------
# gradients: batched equals the per-sample loop

@pytest.mark.parametrize("source", ["factual", "alternative", "diff"])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_batched_mean_gradient_equals_per_sample_loop(source, batch_size):
    items = _data(n=40)
    model = _model()
    cfg = gp.PrePruneConfig(n_samples=13, topk=1.0, source=source, batch_size=batch_size)
    calls = []

    def counting_loss(m, batch, target):
        calls.append(target)
        return _loss(m, batch, target)

    sel = gp.pre_prune(model, items, cfg, counting_loss)
    idx, _, _ = sample_indices([it["feature_class_id"] for it in items], [0, 1], 13, 0)
    ref = _reference_importance(model, [items[i] for i in idx], source)
    torch.testing.assert_close(_flat(sel.importance, model), ref, rtol=1e-5, atol=1e-7)
    per_batch = 2 if source == "diff" else 1
    assert len(calls) == math.ceil(13 / batch_size) * per_batch
    assert sel.report.backward_passes == len(calls)


def test_per_sample_loss_vector_is_accepted():
    items = _data()
    model = _model()

    def vec_loss(m, batch, target):
        return nn.functional.cross_entropy(m(batch["x"]), batch[target], reduction="none")

    a = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=10, topk=1.0, batch_size=3), vec_loss)
    b = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=10, topk=1.0, batch_size=3), _loss)
    torch.testing.assert_close(_flat(a.importance, model), _flat(b.importance, model))


@pytest.mark.parametrize("statistic", ["mean_abs", "mean_sq"])
@pytest.mark.parametrize("source", ["factual", "diff"])
def test_per_sample_statistics_match_reference(statistic, source):
    items = _data(n=24)
    model = _model()
    cfg = gp.PrePruneConfig(n_samples=9, topk=1.0, source=source, batch_size=4, statistic=statistic)
    sel = gp.pre_prune(model, items, cfg, _loss)
    idx, _, _ = sample_indices([it["feature_class_id"] for it in items], [0, 1], 9, 0)
    ref = _reference_importance(model, [items[i] for i in idx], source, statistic)
    torch.testing.assert_close(_flat(sel.importance, model), ref, rtol=1e-5, atol=1e-8)


def test_model_is_left_as_it_was():
    model = _model()
    model.train()
    model[0].bias.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model[2].weight.grad = torch.full_like(model[2].weight, 7.0)
    gp.pre_prune(model, _data(), gp.PrePruneConfig(n_samples=8, topk=4), _loss)
    assert model.training
    assert not model[0].bias.requires_grad
    assert torch.equal(model[2].weight.grad, torch.full_like(model[2].weight, 7.0))
    assert model[0].weight.grad is None
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


# ---------------------------------------------------------------------------------------------
# selection

def _importance_model():
    """A model whose scored importances we set by hand via params= and a custom loss."""
    model = nn.Linear(3, 2, bias=False)
    return model


def test_topk_int_float_threshold_and_mask_order():
    items = _data(n=20)
    model = _model()
    full = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=10, topk=1.0), _loss)
    flat = _flat(full.importance, model)
    n = flat.numel()
    assert sum(len(i) for i in full.indices.values()) == n          # topk=1.0 keeps everything
    one = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=10, topk=1), _loss)
    assert sum(len(i) for i in one.indices.values()) == 1            # topk=1 keeps exactly one
    best = int(torch.argmax(flat))
    names = [nm for nm, _ in model.named_parameters()]
    offsets = torch.tensor([0] + [p.numel() for _, p in model.named_parameters()]).cumsum(0)
    (name, idx), = [(nm, int(i)) for nm, ii in one.indices.items() for i in ii]
    assert int(offsets[names.index(name)]) + idx == best

    frac = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=10, topk=0.1), _loss)
    assert frac.report.kept_total == math.ceil(0.1 * n)
    kept_scores = torch.cat([full.importance[nm].reshape(-1)[frac.indices[nm]] for nm in names])
    assert float(kept_scores.min()) >= float(torch.topk(flat, math.ceil(0.1 * n)).values.min())

    thr = float(flat.median())
    by_thr = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=10, threshold=thr), _loss)
    assert by_thr.report.kept_total == int((flat >= thr).sum())
    # threshold first, then topk of what remains (a fraction of the remainder)
    both = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=10, threshold=thr, topk=0.5), _loss)
    assert both.report.kept_total == math.ceil(0.5 * int((flat >= thr).sum()))
    # a mask first: only its True entries are candidates in the parameters it names
    mask = {"0.weight": torch.zeros_like(model[0].weight, dtype=torch.bool)}
    mask["0.weight"][0, :3] = True
    masked = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=10, topk=1.0, mask=mask), _loss)
    assert masked.indices["0.weight"].tolist() == [0, 1, 2]
    assert masked.report.kept_total == n - model[0].weight.numel() + 3
    for nm in names:
        assert torch.equal(masked.masks[nm].reshape(-1).nonzero().flatten(), masked.indices[nm])


def test_ties_keep_lowest_flat_index():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].weight.fill_(1.0)
    items = [{"x": torch.ones(4), "feature_class_id": 0, "factual": torch.tensor(0.0),
              "alternative": torch.tensor(0.0)} for _ in range(4)]

    def loss(m, batch, target):  # d/dW0 is equal for all of layer 0's entries; W1 gets zero grad
        return (m[1](m[0](batch["x"]) + 1.0)).sum() * 0 + m(batch["x"]).sum()

    sel = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=4, topk=3), loss)
    assert sel.indices["0.weight"].tolist() == [0, 1, 2]
    assert sel.indices["1.weight"].tolist() == []


# ---------------------------------------------------------------------------------------------
# cache

def test_cache_hit_reuses_and_any_change_recomputes(tmp_path):
    items = _data()
    model = _model()
    calls = []  # counted by a hook: state the loss reads is part of the cache key
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    loss = _loss

    cfg = gp.PrePruneConfig(n_samples=8, topk=5, cache_dir=str(tmp_path))
    first = gp.pre_prune(model, items, cfg, loss)
    n_first = len(calls)
    assert first.report.cache is None and n_first > 0
    second = gp.pre_prune(model, items, cfg, loss)
    assert len(calls) == n_first and second.report.cache == "selection"
    assert {k: v.tolist() for k, v in second.indices.items()} == {k: v.tolist() for k, v in first.indices.items()}

    # a selection-only change recomputes... unless use_cached_gradients
    gp.pre_prune(model, items, cfg.replace(topk=6), loss)
    assert len(calls) == 2 * n_first
    reuse = gp.pre_prune(model, items, cfg.replace(topk=7, use_cached_gradients=True), loss)
    assert len(calls) == 2 * n_first and reuse.report.cache == "gradients"
    assert reuse.report.kept_total == 7

    # changed weights, data, or source: recomputed
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    gp.pre_prune(model, items, cfg, loss)
    assert len(calls) == 3 * n_first
    idx, _, _ = sample_indices([it["feature_class_id"] for it in items], [0, 1], 8, 0)
    unsampled = next(i for i in range(len(items)) if i not in idx)
    items2 = list(items)
    items2[unsampled] = dict(items2[unsampled], x=items2[unsampled]["x"] + 1)
    gp.pre_prune(model, items2, cfg, loss)   # an item that is not sampled changes nothing
    assert len(calls) == 3 * n_first
    items2[idx[0]] = dict(items2[idx[0]], x=items2[idx[0]]["x"] + 1)
    gp.pre_prune(model, items2, cfg, loss)
    assert len(calls) > 3 * n_first
    c = len(calls)
    gp.pre_prune(model, items2, cfg.replace(source="alternative"), loss)
    assert len(calls) > c


def test_damaged_cache_file_is_recomputed(tmp_path):
    items, model = _data(), _model()
    cfg = gp.PrePruneConfig(n_samples=6, topk=3, cache_dir=str(tmp_path))
    gp.pre_prune(model, items, cfg, _loss)
    for f in os.listdir(tmp_path):
        (tmp_path / f).write_bytes(b"not a checkpoint")
    again = gp.pre_prune(model, items, cfg, _loss)
    assert again.report.cache is None and again.report.kept_total == 3


# ---------------------------------------------------------------------------------------------
# bad input

def test_bad_inputs_fail_before_work():
    model = _model()
    cfg = gp.PrePruneConfig(n_samples=4, topk=2)
    with pytest.raises(TypeError, match="dataset must be a sequence"):
        gp.pre_prune(model, None, cfg, _loss)
    with pytest.raises(ValueError, match="must not be empty"):
        gp.pre_prune(model, [], cfg, _loss)
    with pytest.raises(TypeError, match="items must be dicts"):
        gp.pre_prune(model, [1, 2], cfg, _loss)
    with pytest.raises(ValueError, match="no feature_class_key 'feature_class_id'"):
        gp.pre_prune(model, [{"x": 1}], cfg, _loss)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gp.pre_prune(model, _data(), cfg, "loss")
    with pytest.raises(TypeError, match="config must be a PrePruneConfig"):
        gp.pre_prune(model, _data(), {"n_samples": 4}, _loss)
    with pytest.raises(ValueError, match="has no items"):
        gp.pre_prune(model, _data(), cfg.replace(target_feature_class_ids=[0, 5]), _loss)
    with pytest.raises(ValueError, match="mask\\['0.weight'\\] must have shape"):
        gp.pre_prune(model, _data(), cfg.replace(mask={"0.weight": torch.ones(2, dtype=torch.bool)}), _loss)


# ---------------------------------------------------------------------------------------------
# Hugging Face: tiny masked and causal LMs from configs (random weights, no download)

transformers = pytest.importorskip("transformers")


def _sentences():
    pairs = [("he", "she"), ("his", "her"), ("him", "her"), ("man", "woman")]
    items = []
    for k in range(12):
        f, a = pairs[k % len(pairs)]
        cls = k % 2
        if cls:
            f, a = a, f
        items.append({"input_ids": torch.tensor([2, 5 + k % 7, 4, 9 + k % 5, 3]),
                      "mask_pos": torch.tensor(2), "feature_class_id": cls,
                      "factual": torch.tensor(20 + 2 * (k % 4)), "alternative": torch.tensor(21 + 2 * (k % 4))})
    return items


def test_pre_prune_masked_lm():
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)

    def loss(m, batch, target):
        logits = m(input_ids=batch["input_ids"]).logits
        at = logits[torch.arange(len(logits)), batch["mask_pos"]]
        return nn.functional.cross_entropy(at, batch[target], reduction="none")

    sel = gp.pre_prune(model, _sentences(), gp.PrePruneConfig(n_samples=8, topk=0.01, source="diff",
                       batch_size=4), loss)
    n = sum(p.numel() for p in model.parameters())
    assert sel.report.kept_total == math.ceil(0.01 * n)
    assert sel.report.backward_passes == 4
    kept = torch.cat([sel.importance[k].reshape(-1)[v] for k, v in sel.indices.items()])
    dropped = torch.cat([sel.importance[k].reshape(-1)[~sel.masks[k].reshape(-1)] for k in sel.indices])
    assert float(kept.min()) >= float(dropped.max())


def test_pre_prune_causal_lm_matches_per_sample_loop():
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)

    def loss(m, batch, target):
        logits = m(input_ids=batch["input_ids"]).logits[:, -1]
        return nn.functional.cross_entropy(logits, batch[target], reduction="none")

    items = _sentences()
    sel = gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=6, topk=50, source="diff", batch_size=3), loss)
    # reference: one sample at a time
    model.eval()
    idx, _, _ = sample_indices([it["feature_class_id"] for it in items], [0, 1], 6, 0)
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in idx:
        b = torch.utils.data.default_collate([items[i]])
        for target, sign in (("factual", 1.0), ("alternative", -1.0)):
            model.zero_grad()
            loss(model, b, target).sum().backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    acc[n] += sign * p.grad / len(idx)
    model.zero_grad()
    for n in acc:
        torch.testing.assert_close(sel.importance[n], acc[n].abs(), rtol=1e-4, atol=1e-7)
    assert sel.report.kept_total == 50
