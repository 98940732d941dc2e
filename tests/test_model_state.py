"""The model is left as it was found (issue #13 point 4): every submodule's train/eval flag after
prune / pre_prune / search / training_flops, and MaskSet re-binding after parameters are replaced."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import gradprune as gp


def _cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4))
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a model in training mode
    return net


def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


def _batches(n=2):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 1, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _run_prune(model):
    gp.prune(model, sparsity=0.5, criterion="snip", data=_batches(), loss_fn=_ce)


def _run_pre_prune(model):
    items = [{"x": torch.randn(1, 6, 6), "feature_class_id": i % 2, "factual": i % 4, "alternative": (i + 1) % 4} for i in range(4)]
    gp.pre_prune(model, items, gp.PrePruneConfig(n_samples=4, topk=5),
                 lambda m, b, t: F.cross_entropy(m(b["x"]), b[t]))


def _run_search(model):
    from gradprune.structured import search

    search(model, {"params": "70%"}, _batches(), _ce, "gradnas", example_input=torch.randn(2, 1, 6, 6),
           rules={"nn.Conv2d": {"channel_divisor": 1, "channels_ratio": [0.5, 1.0]}})


def _run_training_flops(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gp.SparseTrainer(model, opt, gp.SparseConfig.rigl(density=0.5, total_steps=10)).training_flops(torch.randn(2, 1, 6, 6))


@pytest.mark.parametrize("run", [_run_prune, _run_pre_prune, _run_search,
                                 _run_training_flops])
def test_every_submodule_mode_is_restored(run):
    model = _cnn()
    before = _modes(model)
    assert before["1"] is False and before[""] is True
    run(model)
    assert _modes(model) == before


def test_modes_restored_when_the_workflow_raises():
    model = _cnn()
    before = _modes(model)

    def bad_loss(m, b):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gp.prune(model, sparsity=0.5, criterion="snip", data=_batches(), loss_fn=bad_loss)
    assert _modes(model) == before


# ---------------------------------------------------------------------------------------------
# MaskSet re-binds parameters replaced after the masks were built


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _zeros_match(model, masks):
    live = dict(model.named_parameters())
    return all(bool((live[n].detach()[~m] == 0).all()) for n, m in masks.items())


def test_load_state_dict_assign_rebinds_and_reapplies():
    model = _mlp()
    masks = gp.prune(model, sparsity=0.5, criterion="magnitude").masks
    dense = {k: torch.randn_like(v) for k, v in _mlp(1).state_dict().items()}
    model.load_state_dict(dense, assign=True)  # new Parameter objects, dense values
    assert masks.params()["0.weight"] is model[0].weight
    assert _zeros_match(model, masks)
    kept, total = masks.count()
    live_kept = sum(int((p.detach() != 0).sum()) for n, p in model.named_parameters() if n in masks)
    assert kept == live_kept and abs(masks.sparsity() - 0.5) < 1e-6


def test_replaced_parameter_is_kept_at_zero_by_the_optimizer_hook():
    model = _mlp()
    masks = gp.prune(model, sparsity=0.5, criterion="magnitude").masks
    model[0].weight = nn.Parameter(torch.randn(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(opt)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert _zeros_match(model, masks)


def test_storage_replaced_in_place_is_detected():
    model = _mlp()
    masks = gp.prune(model, sparsity=0.5, criterion="magnitude").masks
    model[2].weight.data = torch.randn(8, 8)  # same Parameter, new storage
    assert abs(masks.sparsity() - 0.5) < 1e-6
    assert _zeros_match(model, masks)


def test_replacement_of_another_shape_raises():
    model = _mlp()
    masks = gp.prune(model, sparsity=0.5, criterion="magnitude").masks
    model[0].weight = nn.Parameter(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"0\.weight.*\(4, 8\)"):
        masks.sparsity()
    with pytest.raises(ValueError, match=r"0\.weight"):
        masks.apply()
