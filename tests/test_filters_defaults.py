"""Issue #19 points 5 and 7: filters that say when they match nothing, and honest defaults."""

import pytest

import gradprune as gp

PRESETS = ("rigl", "set", "snfs", "static", "pruning")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_requires_total_steps(preset):
    """No silent total_steps=1000: omitting it raises TypeError naming it."""
    with pytest.raises(TypeError, match="total_steps"):
        getattr(gp.SparseConfig, preset)(density=0.2)
    cfg = getattr(gp.SparseConfig, preset)(density=0.2, total_steps=80)
    assert cfg.total_steps == 80
    assert cfg.end_step in (0, 60)


def _mlp():
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_one_shot_prune_refuses_movement_pointing_to_pruner():
    import torch
    from torch import nn
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(4, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    for kw in (dict(criterion="movement"), dict(config=gp.PruneConfig(criterion="movement"))):
        with pytest.raises(ValueError, match=r"movement.*Pruner"):
            gp.prune(model, sparsity=0.5, data=data, loss_fn=loss_fn, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # movement stays available where it belongs: pruning while fine-tuning
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = gp.Pruner(model, optimizer=opt, criterion="movement", target_sparsity=0.5, start_step=0,
                       end_step=2, frequency=1)
    assert pruner.config.criterion == "movement"
