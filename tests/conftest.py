"""Tiny models shared by the tests, each with deterministic data and a loss.

Every factory is a :class:`ModelSpec`: ``spec.build(seed)`` gives a freshly initialised model
(``torch.manual_seed(seed)`` first), ``spec.batches(n, seed)`` gives ``n`` deterministic batches
(from their own ``torch.Generator``, so they never depend on the global RNG), and
``spec.loss_fn(model, batch)`` is a scalar cross-entropy loss.

Prunable layers under the default targets (the last ``Linear`` is the classifier, not pruned):

- ``mlp``:  ``0.weight`` [16, 8], ``2.weight`` [16, 16]
- ``cnn``:  ``0.weight`` [8, 1, 3, 3], ``2.weight`` [8, 8, 3, 3], ``6.weight`` [16, 32]
- ``transformer``: ``enc.self_attn.in_proj_weight`` [48, 16], ``enc.self_attn.out_proj.weight``
  [16, 16], ``enc.linear1.weight`` [32, 16], ``enc.linear2.weight`` [16, 32]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

N_CLASSES = 4

# CI (CI=true) runs every property test on the same, derandomized examples: a red CI is
# reproducible; locally hypothesis keeps exploring new examples.
import os

from hypothesis import settings as _hyp_settings

_hyp_settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")

# Tiny tensors: one intra-op thread is far faster than OpenMP threads contending on a small,
# shared machine (and results do not depend on it).
torch.set_num_threads(1)


def round_half_up(x: float) -> int:
    """The documented count rule: nearest integer, halves up, after rounding to 9 decimals."""
    return int(math.floor(round(x, 9) + 0.5))


def _ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _make_batches(input_shape, n, seed, batch_size=8):
    gen = torch.Generator().manual_seed(10_000 + seed)
    return [
        (torch.randn(batch_size, *input_shape, generator=gen),
         torch.randint(0, N_CLASSES, (batch_size,), generator=gen))
        for _ in range(n)
    ]


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(),
        nn.Linear(16, 16), nn.ReLU(),
        nn.Linear(16, N_CLASSES),
    )


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(4),                      # 8x8 -> 2x2
        nn.Flatten(),
        nn.Linear(32, 16), nn.ReLU(),
        nn.Linear(16, N_CLASSES),
    )


class TinyTransformer(nn.Module):
    """One ``nn.TransformerEncoderLayer`` and a Linear head on the mean over tokens."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32,
                                              dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, x):
        return self.head(self.enc(x).mean(dim=1))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory()

    def batches(self, n: int, seed: int = 0, batch_size: int = 8) -> list:
        return _make_batches(self.input_shape, n, seed, batch_size)

    @staticmethod
    def loss_fn(model, batch):
        return _ce(model, batch)

    def __repr__(self) -> str:  # readable parametrize ids
        return self.name


MLP = ModelSpec("mlp", make_mlp, (8,))
CNN = ModelSpec("cnn", make_cnn, (1, 8, 8))
TRANSFORMER = ModelSpec("transformer", TinyTransformer, (5, 16))
MODELS = {"mlp": MLP, "cnn": CNN, "transformer": TRANSFORMER}


@pytest.fixture
def mlp() -> ModelSpec:
    return MLP


@pytest.fixture
def cnn() -> ModelSpec:
    return CNN


@pytest.fixture
def transformer() -> ModelSpec:
    return TRANSFORMER


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def any_model(request) -> ModelSpec:
    return MODELS[request.param]


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over 20 s (several processes); -m 'not slow' skips it")
