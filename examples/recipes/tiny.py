"""Tiny model, data and losses for the example recipes (random data, runs in seconds)."""

import torch
from torch import nn


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def make_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(8)]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def example_input():
    return torch.randn(2, 16)


def make_items():
    """A contrast dataset for pre-pruning: factual / alternative labels per item."""
    g = torch.Generator().manual_seed(2)
    return [{"x": torch.randn(16, generator=g), "feature_class_id": i % 2,
             "factual": i % 2, "alternative": 1 - i % 2} for i in range(32)]


def feature_loss(model, batch, target):
    return nn.functional.cross_entropy(model(batch["x"]), batch[target], reduction="none")
