"""Tiny models for the structured-pruning tests, one per supported architecture pattern.

Each entry: ``name -> (factory, example input shape, expected number of groups)``. The other
``test_structured*`` modules import them from here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

N_CLASSES = 4


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(),
                         nn.Dropout(0.1), nn.Linear(12, N_CLASSES))


def mlp_bn1d():
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, N_CLASSES))


def cnn_bn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.MaxPool2d(4), nn.Flatten(),               # 6 x 2 x 2 -> 24 features, 4 per channel
        nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, N_CLASSES))


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c + 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c + 2)
        self.conv2 = nn.Conv2d(c + 2, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class ResNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = ResBlock(8)
        self.block2 = ResBlock(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, N_CLASSES)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, N_CLASSES)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = F.relu(self.bn(y))
        y = F.avg_pool2d(F.relu(self.c(y)), 2)
        return self.fc(y.view(y.size(0), -1))


def depthwise():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, N_CLASSES))


class Conv1dNorms(nn.Module):
    """Conv1d + GroupNorm + InstanceNorm, a mean over length, Linear + LayerNorm + Sigmoid."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv1d(8, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm1d(6, affine=True)
        self.fc1 = nn.Linear(6, 10)
        self.ln = nn.LayerNorm(10)
        self.act = nn.Sigmoid()
        self.fc2 = nn.Linear(10, N_CLASSES)

    def forward(self, x):
        x = F.gelu(self.gn(self.c1(x)))
        x = F.relu(self.inorm(self.c2(x)))
        x = x.mean(dim=2)
        return self.fc2(self.act(self.ln(self.fc1(x))))


class ConvTransposeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)                      # 6x6 -> 4x4
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)  # 4x4 -> 8x8
        self.bn = nn.BatchNorm2d(6)
        self.c3 = nn.Conv3d(1, 3, 2)
        self.fc = nn.Linear(6 + 3, N_CLASSES)

    def forward(self, x):
        y = F.relu(self.bn(self.up(F.relu(self.c(x)))))
        y = y.mean(dim=(2, 3))
        z = F.relu(self.c3(x.reshape(x.shape[0], 1, 2, 3, 6))).mean(dim=(2, 3, 4))
        return self.fc(torch.cat([y, z], dim=1))


class ResidualStream(nn.Module):
    """A transformer-like residual stream over tokens: LayerNorms, a GELU MLP, a residual add."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.ln1 = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.ln_f = nn.LayerNorm(8)
        self.head = nn.Linear(8, N_CLASSES)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.ln1(h))))
        return self.head(self.ln_f(h).mean(dim=1))


MODELS = {
    "mlp": (mlp, (8,), 2),
    "mlp_bn1d": (mlp_bn1d, (8,), 1),
    "cnn_bn": (cnn_bn, (1, 8, 8), 3),
    "resnet": (ResNetTiny, (3, 8, 8), 3),
    "concat": (Concat, (2, 8, 8), 3),
    "depthwise": (depthwise, (3, 8, 8), 2),
    "conv1d_norms": (Conv1dNorms, (2, 12), 3),
    "conv_transpose_3d": (ConvTransposeNet, (1, 6, 6), 3),
    "residual_stream": (ResidualStream, (5, 6), 2),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    # non-trivial BatchNorm statistics and affine parameters, so slicing them matters
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 1.5)
    model.eval()
    return model


def batches(name: str, n: int, seed: int = 0, batch_size: int = 6) -> list:
    gen = torch.Generator().manual_seed(1000 + seed)
    shape = MODELS[name][1]
    return [(torch.randn(batch_size, *shape, generator=gen),
             torch.randint(0, N_CLASSES, (batch_size,), generator=gen)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


import pytest  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.parametrize("name", list(MODELS))
def test_model_runs(name):
    model = build(name)
    x, y = batches(name, 1)[0]
    assert model(x).shape == (x.shape[0], N_CLASSES)
