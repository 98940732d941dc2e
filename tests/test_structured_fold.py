"""fold_batchnorm: outputs unchanged, BatchNorm gone where it can be folded, untouched elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradprune.structured as st
from test_structured_models import batches, build, loss_fn

torch.set_num_threads(1)


def _randomise_stats(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=gen))
                    m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return model.eval()


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv1d(3, 6, 3, bias=False), nn.BatchNorm1d(6), (2, 3, 10)),
    (nn.Conv2d(3, 6, 3, bias=True), nn.BatchNorm2d(6), (2, 3, 8, 8)),
    (nn.Conv3d(3, 6, 3, groups=3), nn.BatchNorm3d(6, affine=False), (2, 3, 5, 5, 5)),
    (nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.BatchNorm2d(4, eps=1e-3), (2, 4, 6, 6)),
], ids=["conv1d", "conv2d-bias", "conv3d-grouped-no-affine", "depthwise"])
def test_folded_outputs_equal(conv, bn, shape):
    model = _randomise_stats(nn.Sequential(conv, bn, nn.ReLU()))
    x = torch.randn(shape)
    before = model(x)
    assert st.fold_batchnorm(model) == [("0", "1")]
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None
    assert torch.allclose(model(x), before, atol=1e-5)


def test_exported_residual_model_folds_and_keeps_its_outputs():
    model = build("resnet")
    data = batches("resnet", 2)
    found = st.search(model, {"flops": "60%"}, data, loss_fn, "gradnas", data[0][0],
                      rules={"nn.Conv2d": {"channel_divisor": 1}, "nn.BatchNorm2d": {"feature_divisor": 1}})
    small = _randomise_stats(found.export())
    x = data[1][0]
    before = small(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    pairs = st.fold_batchnorm(small)
    assert len(pairs) == n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert torch.allclose(small(x), before, atol=1e-5)


class _TwoUses(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv output is used twice


class _SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 4, 3, padding=1)
        self.b = nn.Conv1d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))  # one BatchNorm after two convs


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.bn(self.conv(x))
        return self.conv(x)


@pytest.mark.parametrize("make", [
    lambda: _TwoUses(),
    lambda: _SharedBN(),
    lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.BatchNorm1d(4)),   # not right after
    lambda: nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)),                 # not a convolution
    lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4, track_running_stats=False)),
], ids=["conv-used-twice", "shared-bn", "bn-after-relu", "linear", "no-running-stats"])
def test_left_alone_when_folding_would_change_the_model(make):
    model = _randomise_stats(make())
    is_linear = isinstance(model, nn.Sequential) and isinstance(model[0], nn.Linear)
    x = torch.randn(3, 2) if is_linear else torch.randn(3, 2, 6)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert st.fold_batchnorm(model) == []
    assert torch.equal(model(x), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_training_mode_batchnorm_is_not_folded():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)).train()
    assert st.fold_batchnorm(model) == []
    assert isinstance(model[1], nn.BatchNorm1d)


def test_bad_input():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        st.fold_batchnorm("net")
    with pytest.raises(ValueError, match="torch.fx can trace"):
        st.fold_batchnorm(_Untraceable().eval())


def test_folded_model_saves_and_loads(tmp_path):
    model = _randomise_stats(nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU()))
    st.fold_batchnorm(model)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = nn.Sequential(nn.Conv2d(3, 6, 3, bias=True), nn.Identity(), nn.ReLU())
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(fresh(x), model(x))
