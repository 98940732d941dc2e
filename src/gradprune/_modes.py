"""Restore every submodule's train/eval flag after a workflow ran.

``model.train(was)`` only sets one flag on every module, so a frozen ``BatchNorm`` (in eval mode
inside a model in training mode) would come back in training mode. :func:`preserve_modes` records
the flag of every module and puts each one back, also when the body raises.

Example:
    >>> import torch.nn as nn
    >>> from gradprune._modes import preserve_modes
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> _ = net[1].eval()                         # frozen BatchNorm in a training model
    >>> with preserve_modes(net):
    ...     _ = net.eval()
    >>> net.training, net[1].training
    (True, False)
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

__all__ = ["preserve_modes"]


@contextmanager
def preserve_modes(model: nn.Module):
    """Record ``module.training`` for every module of ``model`` and restore each on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def keeps_modes(fn):
    """Decorator: run ``fn(model, ...)`` inside :func:`preserve_modes` of its ``model`` (the first
    positional argument or the ``model`` keyword)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        if not isinstance(model, nn.Module):
            return fn(*args, **kwargs)
        with preserve_modes(model):
            return fn(*args, **kwargs)

    return wrapper
